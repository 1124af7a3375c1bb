/*
 * kernels/cuda/decode_mlp.cu — the routed experts' forward GEMMs of a decode-size call with no
 * backward after it: a GEMV per touched expert, SwiGLU in the gate|up pass, rows in slot order.
 *
 * Design choice: with a few rows per expert the forward is a read of the touched experts'
 * weights. The Hopper engine's 128-row tiles pay a TMA/WGMMA set-up per tile and quantize a few
 * hundred tiles into waves; at T = 8 they streamed the weights at 3.4–3.6 TB/s against a copy's
 * 4.2. Here a warp owns weight rows (gate and up of one column, or down columns), reads each once
 * with 16-byte non-allocating loads and applies it to every row of the expert. There is no sort:
 * gemv_kernel's block of slot s finds its expert's slots by scanning idx and works only when s is
 * the first of them; the wide down kernel (short reductions) plans the touched experts once per
 * resident block and splits their columns evenly. Either way each expert's weights are read once.
 * Each lane sums its own elements in order and the warp adds the lanes in a fixed tree: the same
 * bits every run. They are not the engine's bits, whose products are summed in another order; h
 * is rounded to the dtype before SwiGLU, as on every other path.
 */
#include "internal.h"

#define GEMV_WARPS 8  /* warps per block (the wide down kernel: one planning thread per slot) */
#define GEMV_ROWS 8   /* the expert's rows summed per pass over its weights */
#define GEMV_UNROLL 4 /* 16-byte vectors per lane per weight row per step: loads in flight */
#define WIDE_COLS 8   /* the wide down kernel: output columns (weight rows) per warp unit */
#define WIDE_ROWS 2   /* the wide down kernel: the expert's rows per pass (registers: 128) */
#define WIDE_VECS 2   /* the wide down kernel: 16-byte vectors per lane per row, all in one step */
static_assert(GEMV_WARPS * 32 == MOE_GEMV_MAX_SLOTS, "one planning thread per slot");

/* A 16-byte vector of weights, read past L1 (each weight element is used by one warp, once): the
   rows of x or a stay in L1 for the block's other warps. Kept raw until used: half the registers
   of its fp32 values, so twice the loads in flight per SM. */
static __device__ __forceinline__ uint4 ld_weights(const void *p)
{
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

template <typename T> static __device__ __forceinline__ float elem_of(const uint4 &r, int i)
{
    return moe__to_f(((const T *)&r)[i]);
}

template <typename T>
static __device__ __forceinline__ const T *mat_row(const struct moe_mats &m, int e, int64_t r)
{
    const T *b = m.ptr ? (const T *)m.ptr[e] : (const T *)m.base + (int64_t)e * m.es;
    return b + r * m.rs;
}

static __device__ float warp_total(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

/* Warp 0: the slots routed to slot s's expert, ascending, into rows; 0 when an earlier slot has
   that expert (its block does the work). */
static __device__ int expert_slots(const int32_t *idx, int R, int s, int lane, int *rows)
{
    const int e = idx[s];
    int n = 0;
    for (int j0 = 0; j0 < R; j0 += 32) {
        const int j = j0 + lane;
        const unsigned hit = __ballot_sync(0xffffffffu, j < R && idx[j] == e);
        const unsigned before = j0 + 32 <= s ? ~0u : s > j0 ? (1u << (s - j0)) - 1u : 0u;
        if (hit & before)
            return 0;
        if (hit >> lane & 1u)
            rows[n + __popc(hit & ((1u << lane) - 1u))] = j;
        n += __popc(hit);
    }
    return n;
}

/* Block (x, s): columns [x·COLS·GEMV_WARPS, ...) of every slot of slot s's expert.
   ACT: c[slot, n] = silu(h_g) · h_u of the dtype-rounded h_g = a·w0[n], h_u = a·w1[n];
   else c[slot, n] = a·w0[n], two columns per warp. a's row of slot j: a + (j / div) · a_rs. */
template <typename T, bool ACT>
static __global__ void __launch_bounds__(GEMV_WARPS * 32, 3)
    gemv_kernel(struct moe__gemv g, const T *a, T *c)
{
    __shared__ int rows[MOE_GEMV_MAX_SLOTS];
    __shared__ int n_rows;
    constexpr int V = 16 / sizeof(T), COLS = ACT ? 1 : 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, s = blockIdx.y;
    if (warp == 0) {
        const int n = g.idx ? expert_slots(g.idx, g.R, s, lane, rows) : g.R;
        if (!g.idx) /* one expert (a shared one): every slot, one block row */
            for (int j = lane; j < g.R; j += 32)
                rows[j] = j;
        if (lane == 0)
            n_rows = n;
    }
    __syncthreads();
    const int n = n_rows, e = g.idx ? g.idx[s] : 0;
    const int64_t col = ((int64_t)blockIdx.x * GEMV_WARPS + warp) * COLS;
    if (n == 0 || col >= g.N)
        return;
    const bool two = ACT || col + 1 < g.N;
    const T *w0 = mat_row<T>(g.w0, e, col);
    const T *w1 = ACT ? mat_row<T>(g.w1, e, col) : mat_row<T>(g.w0, e, two ? col + 1 : col);
    const int64_t DV = g.D / V;
    for (int r0 = 0; r0 < n; r0 += GEMV_ROWS) {
        const int nr = n - r0 < GEMV_ROWS ? n - r0 : GEMV_ROWS;
        float acc0[GEMV_ROWS], acc1[GEMV_ROWS];
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++)
            acc0[r] = acc1[r] = 0.f;
        for (int64_t v0 = lane; v0 < DV; v0 += 32 * GEMV_UNROLL) {
            uint4 p[GEMV_UNROLL], q[GEMV_UNROLL];
#pragma unroll
            for (int u = 0; u < GEMV_UNROLL; u++)
                if (v0 + 32 * u < DV) {
                    p[u] = ld_weights(w0 + (v0 + 32 * u) * V);
                    q[u] = ld_weights(w1 + (v0 + 32 * u) * V);
                }
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; r++) {
                if (r >= nr)
                    break;
                const T *ar = a + (int64_t)(rows[r0 + r] / g.div) * g.a_rs;
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; u++)
                    if (v0 + 32 * u < DV) {
                        float xv[V];
                        moe__ldv<V>(xv, ar + (v0 + 32 * u) * V);
#pragma unroll
                        for (int i = 0; i < V; i++) {
                            acc0[r] += elem_of<T>(p[u], i) * xv[i];
                            acc1[r] += elem_of<T>(q[u], i) * xv[i];
                        }
                    }
            }
        }
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; r++) {
            if (r >= nr)
                break;
            const float h0 = warp_total(acc0[r]), h1 = warp_total(acc1[r]);
            if (lane != 0)
                continue;
            T *out = c + (int64_t)rows[r0 + r] * g.N + col;
            if (ACT) {
                const float hg = moe__to_f(moe__from_f<T>(h0)), hu = moe__to_f(moe__from_f<T>(h1));
                out[0] = moe__from_f<T>(moe__silu(hg) * hu);
            } else {
                out[0] = moe__from_f<T>(h0);
                if (two)
                    out[1] = moe__from_f<T>(h1);
            }
        }
    }
}

/* The warp's totals of COLS columns (v: each lane's partial sums), reduced and scattered: each
   halving step sends the half of the columns a lane does not keep, so COLS = 8 takes 9 shuffles
   where a warp_total per column takes 40 (and a divergent store between those chains serialised
   them: down's warps then spent longer reducing than loading). Returns the column whose total
   v[0] now holds; every lane of a group of 32 / COLS holds it. A fixed tree: the same bits every
   run. */
template <int COLS> static __device__ __forceinline__ int column_totals(float *v, int lane)
{
    int k = 0, o = 16;
#pragma unroll
    for (int n = COLS; n > 1; n /= 2, o /= 2) {
        const bool upper = lane & o;
#pragma unroll
        for (int i = 0; i < n / 2; i++) {
            const float send = upper ? v[i] : v[i + n / 2], keep = upper ? v[i + n / 2] : v[i];
            v[i] = keep + __shfl_xor_sync(0xffffffffu, send, o);
        }
        k += upper ? n / 2 : 0;
    }
#pragma unroll
    for (; o > 0; o /= 2)
        v[0] += __shfl_xor_sync(0xffffffffu, v[0], o);
    return k;
}

/* The touched experts, in the order of their first slots: expert d is exp[d], its slots
   rows[start[d] .. start[d + 1]) ascending. */
struct gemv_plan {
    int nd;
    int exp[MOE_GEMV_MAX_SLOTS], start[MOE_GEMV_MAX_SLOTS + 1], rows[MOE_GEMV_MAX_SLOTS];
};

/* The whole block plans; thread j owns slot j. Every block plans the same (it is a few hundred
   shared-memory reads), so no kernel or global scratch sits between routing and the GEMV. */
static __device__ void plan_experts(const int32_t *idx, int R, struct gemv_plan &pl)
{
    __shared__ int e_of[MOE_GEMV_MAX_SLOTS], d_of[MOE_GEMV_MAX_SLOTS];
    __shared__ int warp_nd[GEMV_WARPS], warp_rows[GEMV_WARPS];
    const int j = threadIdx.x, warp = j / 32, lane = j % 32;
    const int e = j >= R ? -1 : idx ? idx[j] : 0; /* idx == NULL: one (shared) expert */
    e_of[j] = e;
    __syncthreads();
    int fs = j, rank = 0, cnt = 0; /* e's first slot, slots of e before j, slots of e */
    for (int i = 0; i < R; i++) {
        const bool m = e_of[i] == e;
        fs = m && i < fs ? i : fs;
        rank += m && i < j;
        cnt += m;
    }
    const bool first = j < R && fs == j;
    const unsigned firsts = __ballot_sync(0xffffffffu, first);
    int upto = first ? cnt : 0; /* inclusive scan of the first slots' counts */
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, upto, o);
        upto += lane >= o ? t : 0;
    }
    if (lane == 31) {
        warp_nd[warp] = __popc(firsts);
        warp_rows[warp] = upto;
    }
    __syncthreads();
    int d = __popc(firsts & ((1u << lane) - 1u)), before = 0;
    for (int w = 0; w < GEMV_WARPS; w++) {
        d += w < warp ? warp_nd[w] : 0;
        before += w < warp ? warp_rows[w] : 0;
    }
    if (first) {
        pl.exp[d] = e;
        pl.start[d] = before + upto - cnt;
        d_of[j] = d;
    }
    if (j == GEMV_WARPS * 32 - 1) {
        pl.nd = d + first;
        pl.start[d + first] = R;
    }
    __syncthreads();
    if (j < R)
        pl.rows[pl.start[d_of[fs]] + rank] = j;
    __syncthreads();
}

/* The wide down kernel's unit: output columns [col, col + WIDE_COLS) of expert d's slots,
   c[slot, n] = a·w0[n], the weight rows read together, WIDE_VECS 16-byte vectors per lane each
   (the reduction has no more: I ≤ 512 in bf16); rows past N are read as row N - 1 and not
   written. */
template <typename T>
static __device__ __forceinline__ void wide_unit(const struct moe__gemv &g, const gemv_plan &pl,
                                                 int d, int64_t col, const T *a, T *c, int lane)
{
    constexpr int V = 16 / sizeof(T), COLS = WIDE_COLS, U = WIDE_VECS;
    const int e = pl.exp[d], r_beg = pl.start[d], n = pl.start[d + 1] - r_beg;
    const T *w = mat_row<T>(g.w0, e, col); /* row k at w + min(k, last) · rs: one register pair */
    const int last = g.N - 1 - col < COLS - 1 ? (int)(g.N - 1 - col) : COLS - 1;
    const int64_t DV = g.D / V;
    for (int r0 = 0; r0 < n; r0 += WIDE_ROWS) {
        const int nr = n - r0 < WIDE_ROWS ? n - r0 : WIDE_ROWS;
        float acc[COLS][WIDE_ROWS];
#pragma unroll
        for (int k = 0; k < COLS; k++)
#pragma unroll
            for (int r = 0; r < WIDE_ROWS; r++)
                acc[k][r] = 0.f;
        for (int64_t v0 = lane; v0 < DV; v0 += 32 * U) {
            uint4 p[COLS][U];
#pragma unroll
            for (int u = 0; u < U; u++)
                if (v0 + 32 * u < DV)
#pragma unroll
                    for (int k = 0; k < COLS; k++)
                        p[k][u] =
                            ld_weights(w + (k < last ? k : last) * g.w0.rs + (v0 + 32 * u) * V);
#pragma unroll
            for (int r = 0; r < WIDE_ROWS; r++) {
                if (r >= nr)
                    break;
                const T *ar = a + (int64_t)pl.rows[r_beg + r0 + r] * g.a_rs;
#pragma unroll
                for (int u = 0; u < U; u++)
                    if (v0 + 32 * u < DV) {
                        float xv[V];
                        moe__ldv<V>(xv, ar + (v0 + 32 * u) * V);
#pragma unroll
                        for (int i = 0; i < V; i++)
#pragma unroll
                            for (int k = 0; k < COLS; k++)
                                acc[k][r] += elem_of<T>(p[k][u], i) * xv[i];
                    }
            }
        }
#pragma unroll
        for (int r = 0; r < WIDE_ROWS; r++) {
            if (r >= nr)
                break;
            float v[COLS];
#pragma unroll
            for (int k = 0; k < COLS; k++)
                v[k] = acc[k][r];
            const int k = column_totals<COLS>(v, lane);
            if (lane % (32 / COLS) == 0 && col + k < g.N)
                c[(int64_t)pl.rows[r_beg + r0 + r] * g.N + col + k] = moe__from_f<T>(v[0]);
        }
    }
}

/* down where the reduction is short (a's rows: the slots, div 1). There gemv_kernel's warps hold
   2 KB of weights each, and a block per slot and column range spends as long on its set-up (the
   scan of idx, a round trip) as on its loads: Ring-mini's down took 48 us at T = 8 for 120 MB.
   Here the grid is the resident blocks; each plans once and takes an equal run of the (touched
   expert, 8 columns) units, its warps side by side over one stretch of weights, 8 KB in flight a
   warp: 34-36 us. (With 3 vectors per lane, Qwen3-30B-A3B's I = 768, the same scheme measured
   slower than gemv_kernel, 66 against 57 us, unexplained: gemv_kernel keeps those.) */
template <typename T>
static __global__ void __launch_bounds__(GEMV_WARPS * 32, 2)
    wide_down_kernel(struct moe__gemv g, const T *a, T *c)
{
    __shared__ struct gemv_plan pl;
    plan_experts(g.idx, g.R, pl);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    constexpr int COLS = WIDE_COLS;
    const int64_t per_e = (g.N + COLS - 1) / COLS, units = pl.nd * per_e;
    const int64_t run = (units + gridDim.x - 1) / gridDim.x; /* the block's units */
    const int64_t q0 = (int64_t)blockIdx.x * run, q1 = q0 + run < units ? q0 + run : units;
    /* the block's warps side by side: at any time they read one contiguous stretch of weights */
    for (int64_t q = q0 + warp; q < q1; q += GEMV_WARPS)
        wide_unit<T>(g, pl, (int)(q / per_e), q % per_e * COLS, a, c, lane);
}

/* Columns per warp of the kernel (ACT: one gate|up pair, else two down columns). */
static int gemv_cols(int act)
{
    return act ? 1 : 2;
}

/* Weights the kernel reads with 16-byte loads: contiguous along the reduction, every row and
   expert 16-byte aligned (pointer arrays: torch's allocations are). */
static int mats_streamable(const struct moe_mats *m, size_t es)
{
    return m->cs == 1 && (m->rs * (int64_t)es) % 16 == 0 &&
           (m->ptr || ((uintptr_t)m->base % 16 == 0 && (m->es * (int64_t)es) % 16 == 0));
}

int moe__gemv_ok(const struct moe__gemv *g)
{
    const size_t es = moe_dtype_size(g->dtype);
    return es && g->R > 0 && g->R <= MOE_GEMV_MAX_SLOTS && g->D > 0 && g->N > 0 && g->div > 0 &&
           (g->D * (int64_t)es) % 16 == 0 && (g->a_rs * (int64_t)es) % 16 == 0 &&
           (uintptr_t)g->a % 16 == 0 && mats_streamable(&g->w0, es) &&
           (!g->act || mats_streamable(&g->w1, es));
}

/* The wide down kernel's grid: the blocks the device holds at once (any grid gives the same
   bits, only the balance changes). */
template <typename T> static unsigned wide_blocks(void)
{
    static __thread unsigned blocks = 0;
    if (!blocks) {
        int dev = 0, sms = 0, per_sm = 0;
        if (cudaGetDevice(&dev) != cudaSuccess ||
            cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
            cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, wide_down_kernel<T>,
                                                          GEMV_WARPS * 32, 0) != cudaSuccess)
            cudaGetLastError(); /* these queries' own error: a real one shows at the launch */
        blocks = (unsigned)(sms > 0 ? sms : 132) * (unsigned)(per_sm > 0 ? per_sm : 1);
    }
    return blocks;
}

template <typename T, bool ACT> static void gemv_go(const struct moe__gemv *g)
{
    if (!ACT && g->div == 1 && g->D / (16 / (int64_t)sizeof(T)) <= 32 * WIDE_VECS) {
        wide_down_kernel<T><<<wide_blocks<T>(), GEMV_WARPS * 32, 0, (cudaStream_t)g->stream>>>(
            *g, (const T *)g->a, (T *)g->c);
        return;
    }
    const int64_t per_block = (int64_t)GEMV_WARPS * gemv_cols(ACT);
    const dim3 grid((unsigned)((g->N + per_block - 1) / per_block), g->idx ? (unsigned)g->R : 1u);
    gemv_kernel<T, ACT>
        <<<grid, GEMV_WARPS * 32, 0, (cudaStream_t)g->stream>>>(*g, (const T *)g->a, (T *)g->c);
}

int moe__gemv_cuda(const struct moe__gemv *g)
{
    MOE_REQUIRE(moe__gemv_ok(g) && g->a && g->c, MOE_EINVAL);
    if (g->act)
        MOE_DISPATCH(g->dtype, (gemv_go<T, true>(g)));
    else
        MOE_DISPATCH(g->dtype, (gemv_go<T, false>(g)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}
