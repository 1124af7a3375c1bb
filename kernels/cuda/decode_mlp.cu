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
 * A shared expert of the routed width rides in the same launches as the last T slots (an "extra"
 * expert): on its own, its few columns per block row left most SMs idle (32 us for Ring-mini's
 * 6 MB at T = 8).
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
/* the extra (shared) expert's id in a plan: routed ids are >= 0, -1 an empty slot */
#define GEMV_EXTRA (-2)
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

/* Row 0 of expert e's weights m, or of the extra expert's x (e == GEMV_EXTRA). Its rows lie
   m.rs apart either way (moe__gemv_cuda: the extra expert's row stride is the routed one). */
template <typename T>
static __device__ __forceinline__ const T *expert_w(const struct moe_mats &m,
                                                    const struct moe_mats &x, int e)
{
    if (e == GEMV_EXTRA)
        return (const T *)(x.ptr ? x.ptr[0] : x.base);
    return m.ptr ? (const T *)m.ptr[e] : (const T *)m.base + (int64_t)e * m.es;
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

/* Block (x, y): columns [x·COLS·GEMV_WARPS, ...) of every slot of slot s's expert, s = y; with an
   extra expert (EXTRA), block row 0 takes its nx slots and s = y - 1 (its blocks, with every
   token's row, start first rather than trail).
   ACT: c[slot, n] = silu(h_g) · h_u of the dtype-rounded h_g = a·w0[n], h_u = a·w1[n];
   else c[slot, n] = a·w0[n], two columns per warp. a's row of slot j: a + (j / div) · a_rs
   (routed), a + (j - xs) · a_rs (extra). */
template <typename T, bool ACT, bool EXTRA>
static __global__ void __launch_bounds__(GEMV_WARPS * 32, 3)
    gemv_kernel(struct moe__gemv g, const T *a, T *c)
{
    __shared__ int rows[MOE_GEMV_MAX_SLOTS]; /* a's row of each: rows[i] / div */
    __shared__ int n_rows;
    constexpr int V = 16 / sizeof(T), COLS = ACT ? 1 : 2;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, R0 = g.R - g.nx;
    const int s = EXTRA ? (int)blockIdx.y - 1 : (int)blockIdx.y;
    const bool extra = EXTRA && s < 0; /* !EXTRA: nx = 0, the routed kernel alone */
    if (warp == 0) {
        const int n = extra ? g.nx : expert_slots(g.idx, R0, s, lane, rows);
        /* the extra expert's slots, the last nx; the entries hold a's row times div, so that
           the loop below is the routed one (its codegen is what streams) */
        if (extra)
            for (int j = lane; j < n; j += 32)
                rows[j] = (R0 + j - (int)g.xs) * g.div;
        if (lane == 0)
            n_rows = n;
    }
    __syncthreads();
    const int n = n_rows, e = extra ? GEMV_EXTRA : g.idx[s];
    const int64_t col = ((int64_t)blockIdx.x * GEMV_WARPS + warp) * COLS;
    if (n == 0 || col >= g.N)
        return;
    const bool two = ACT || col + 1 < g.N;
    const T *w0, *w1;
    if (EXTRA) {
        w0 = expert_w<T>(g.w0, g.x0, e) + col * g.w0.rs;
        w1 = ACT ? expert_w<T>(g.w1, g.x1, e) + col * g.w1.rs : w0 + (two ? g.w0.rs : 0);
    } else { /* the routed kernel's code as it was before the extra expert */
        w0 = mat_row<T>(g.w0, e, col);
        w1 = ACT ? mat_row<T>(g.w1, e, col) : mat_row<T>(g.w0, e, two ? col + 1 : col);
    }
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
            const int slot = extra ? rows[r0 + r] / g.div + (int)g.xs : rows[r0 + r];
            T *out = c + (int64_t)slot * g.N + col;
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

/* The touched experts as pieces of at most WIDE_ROWS slots each (one pass of the wide kernel over
   the weights), in the order of the experts' first slots: piece d has expert exp[d]'s slots
   rows[start[d] .. start[d + 1]) ascending. An expert with more slots has more pieces: its loads
   are those of its passes either way, but the pieces spread over the blocks (a shared expert has
   every token's slot; as one unit per 8 columns it held back the blocks that drew it). */
struct gemv_plan {
    int nd;
    int exp[MOE_GEMV_MAX_SLOTS], start[MOE_GEMV_MAX_SLOTS + 1], rows[MOE_GEMV_MAX_SLOTS];
};

/* The whole block plans; thread j owns slot j. Every block plans the same (it is a few hundred
   shared-memory reads), so no kernel or global scratch sits between routing and the GEMV. The
   extra expert's slots (the last nx) plan as expert GEMV_EXTRA. */
static __device__ void plan_experts(const int32_t *idx, int R, int nx, struct gemv_plan &pl)
{
    __shared__ int e_of[MOE_GEMV_MAX_SLOTS], r_of[MOE_GEMV_MAX_SLOTS];
    __shared__ int warp_nd[GEMV_WARPS], warp_rows[GEMV_WARPS];
    const int j = threadIdx.x, warp = j / 32, lane = j % 32;
    const int e = j >= R ? -1 : j < R - nx ? idx[j] : GEMV_EXTRA;
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
    const int pieces = first ? (cnt + WIDE_ROWS - 1) / WIDE_ROWS : 0;
    int upto = first ? cnt : 0, pup = pieces; /* inclusive scans: the first slots' counts, pieces */
    for (int o = 1; o < 32; o <<= 1) {
        const int t = __shfl_up_sync(0xffffffffu, upto, o), q = __shfl_up_sync(0xffffffffu, pup, o);
        upto += lane >= o ? t : 0;
        pup += lane >= o ? q : 0;
    }
    if (lane == 31) {
        warp_nd[warp] = pup;
        warp_rows[warp] = upto;
    }
    __syncthreads();
    int d = pup - pieces, before = 0;
    for (int w = 0; w < GEMV_WARPS; w++) {
        d += w < warp ? warp_nd[w] : 0;
        before += w < warp ? warp_rows[w] : 0;
    }
    if (first) {
        const int r0 = before + upto - cnt;
        for (int k = 0; k < pieces; k++) {
            pl.exp[d + k] = e;
            pl.start[d + k] = r0 + k * WIDE_ROWS;
        }
        r_of[j] = r0;
    }
    if (j == GEMV_WARPS * 32 - 1) {
        pl.nd = d + pieces;
        pl.start[d + pieces] = R;
    }
    __syncthreads();
    if (j < R)
        pl.rows[r_of[fs] + rank] = j;
    __syncthreads();
}

/* The wide down kernel's unit: output columns [col, col + WIDE_COLS) of piece d's slots,
   c[slot, n] = a·w0[n], the weight rows read together, WIDE_VECS 16-byte vectors per lane each
   (the reduction has no more: I ≤ 512 in bf16); rows past N are read as row N - 1 and not
   written. */
template <typename T>
static __device__ __forceinline__ void wide_unit(const struct moe__gemv &g, const gemv_plan &pl,
                                                 int d, int64_t col, const T *a, T *c, int lane)
{
    constexpr int V = 16 / sizeof(T), COLS = WIDE_COLS, U = WIDE_VECS;
    const int e = pl.exp[d], r_beg = pl.start[d], n = pl.start[d + 1] - r_beg;
    /* row k at w + min(k, last) · rs: one register pair */
    const T *w = expert_w<T>(g.w0, g.x0, e) + col * g.w0.rs;
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
   Here the grid is the resident blocks; each plans once and takes an equal run of the (piece of
   a touched expert, 8 columns) units, its warps side by side over one stretch of weights, 8 KB in
   flight a warp: 34-36 us. (With 3 vectors per lane, Qwen3-30B-A3B's I = 768, the same scheme
   measured slower than gemv_kernel, 66 against 57 us, unexplained: gemv_kernel keeps those.) */
template <typename T>
static __global__ void __launch_bounds__(GEMV_WARPS * 32, 2)
    wide_down_kernel(struct moe__gemv g, const T *a, T *c)
{
    __shared__ struct gemv_plan pl;
    plan_experts(g.idx, g.R, g.nx, pl);
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
    const int R0 = g->R - g->nx;
    return es && g->R > 0 && g->R <= MOE_GEMV_MAX_SLOTS && g->nx >= 0 && R0 >= 0 && g->xs >= 0 &&
           g->xs <= R0 && g->D > 0 && g->N > 0 && g->div > 0 && (g->D * (int64_t)es) % 16 == 0 &&
           (g->a_rs * (int64_t)es) % 16 == 0 && (uintptr_t)g->a % 16 == 0 &&
           (!R0 || (mats_streamable(&g->w0, es) && (!g->act || mats_streamable(&g->w1, es)))) &&
           (!g->nx || (mats_streamable(&g->x0, es) && (!g->act || mats_streamable(&g->x1, es)))) &&
           (!R0 || !g->nx || (g->x0.rs == g->w0.rs && (!g->act || g->x1.rs == g->w1.rs)));
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
    if (!ACT && g->div == 1 && g->xs == 0 && g->D / (16 / (int64_t)sizeof(T)) <= 32 * WIDE_VECS) {
        wide_down_kernel<T><<<wide_blocks<T>(), GEMV_WARPS * 32, 0, (cudaStream_t)g->stream>>>(
            *g, (const T *)g->a, (T *)g->c);
        return;
    }
    const int64_t per_block = (int64_t)GEMV_WARPS * gemv_cols(ACT);
    const dim3 grid((unsigned)((g->N + per_block - 1) / per_block),
                    (unsigned)(g->R - g->nx + (g->nx > 0)));
    if (g->nx)
        gemv_kernel<T, ACT, true>
            <<<grid, GEMV_WARPS * 32, 0, (cudaStream_t)g->stream>>>(*g, (const T *)g->a, (T *)g->c);
    else
        gemv_kernel<T, ACT, false>
            <<<grid, GEMV_WARPS * 32, 0, (cudaStream_t)g->stream>>>(*g, (const T *)g->a, (T *)g->c);
}

int moe__gemv_cuda(const struct moe__gemv *g)
{
    MOE_REQUIRE(moe__gemv_ok(g) && g->a && g->c, MOE_EINVAL);
    /* the extra expert alone: the kernels step its rows by w0's and w1's stride */
    struct moe__gemv k = *g;
    if (k.nx == k.R) {
        k.w0.rs = k.x0.rs;
        k.w1.rs = k.x1.rs;
    }
    if (k.act)
        MOE_DISPATCH(k.dtype, (gemv_go<T, true>(&k)));
    else
        MOE_DISPATCH(k.dtype, (gemv_go<T, false>(&k)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}
