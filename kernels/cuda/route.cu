/*
 * kernels/cuda/route.cu — routing forward (logits → idx, w) and backward (dw → dlogits) for both
 * recipes of moe.h. One warp per token, the token's E scores in shared memory; at decode sizes
 * (T <= RB_T_MAX) the forward instead gives each token a block, a thread per expert, with the same
 * bits. The forward reads logits of any dtype (fp32 as float; bf16/fp16 widened exactly, which is
 * torch's cast).
 *
 * Also the router's own fp32 logits where the forward makes them (moe_problem.router_w).
 *
 * Design choice: every top-k is a repeated warp arg-max whose comparison prefers the lower index
 * on equal values, so the choice (and the slot order: descending score) is the CPU reference's.
 * Sums are warp-shuffle trees in a fixed order: the same input gives the same bits every run.
 */
#include <math.h>

#include "internal.h"

#define ROUTE_MAX_WARPS 4

static __device__ __forceinline__ bool better(float v, int i, float bv, int bi)
{
    return i >= 0 && (bi < 0 || v > bv || (v == bv && i < bi));
}

/* Arg-max over the unmarked entries of v[0..n): lower index wins ties; -1 when none is left. */
static __device__ int warp_argmax(const float *v, const int *taken, int n, int lane)
{
    float bv = -INFINITY;
    int bi = -1;
    for (int e = lane; e < n; e += 32)
        if (!taken[e] && better(v[e], e, bv, bi)) {
            bv = v[e];
            bi = e;
        }
    for (int o = 16; o > 0; o >>= 1) {
        float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (better(ov, oi, bv, bi)) {
            bv = ov;
            bi = oi;
        }
    }
    return bi;
}

static __device__ float warp_sum(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

static __device__ float warp_max(float v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

#define STAGE_LOADS 8 /* loads per lane issued before any is stored */

/* Element e of a selection bias of dtype dt, as fp32 (bf16/fp16 widened exactly). */
static __device__ __forceinline__ float bias_at(const void *b, moe_dtype dt, int e)
{
    if (dt == MOE_BF16)
        return __bfloat162float(__ldg((const __nv_bfloat16 *)b + e));
    if (dt == MOE_F16)
        return __half2float(__ldg((const __half *)b + e));
    return __ldg((const float *)b + e);
}

/* One warp: d0[e] = s0[e] and, with s1 (of dtype s1t), d1[e] = s1[e], for e < n, into shared
   memory. A load per iteration of a loop with a run-time trip count would wait for the one before
   it; at decode sizes the kernel is a chain of such round trips. */
template <typename L>
static __device__ void warp_stage(const L *__restrict__ s0, float *d0, const void *s1,
                                  moe_dtype s1t, float *d1, int n, int lane)
{
    for (int e0 = 0; e0 < n; e0 += 32 * STAGE_LOADS) {
        float v0[STAGE_LOADS], v1[STAGE_LOADS];
#pragma unroll
        for (int j = 0; j < STAGE_LOADS; j++) {
            const int e = e0 + 32 * j + lane;
            v0[j] = e < n ? moe__to_f(__ldg(s0 + e)) : 0.f;
            v1[j] = e < n && s1 ? bias_at(s1, s1t, e) : 0.f;
        }
#pragma unroll
        for (int j = 0; j < STAGE_LOADS; j++) {
            const int e = e0 + 32 * j + lane;
            if (e < n) {
                d0[e] = v0[j];
                if (s1)
                    d1[e] = v1[j];
            }
        }
    }
}

/* val[e] = the recipe's probability (softmax p or sigmoid s) of the token's logits, which val
   holds on entry (shared memory). */
static __device__ void route_scores(const struct moe_route_cfg &c, float *val, int lane)
{
    const int E = c.E;
    if (c.recipe == MOE_ROUTE_SOFTMAX_TOPK) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32)
            m = fmaxf(m, val[e]);
        m = warp_max(m);
        float s = 0.f;
        for (int e = lane; e < E; e += 32) {
            float x = expf(val[e] - m);
            val[e] = x;
            s += x;
        }
        s = warp_sum(s);
        for (int e = lane; e < E; e += 32)
            val[e] = val[e] / s;
    } else {
        for (int e = lane; e < E; e += 32)
            val[e] = 1.f / (1.f + expf(-val[e]));
    }
}

#define ROUTE_REG 16 /* selection scores per lane in registers: E <= 512 takes reg_topk */

/* Order-preserving map of a float to an unsigned key (-0 made +0 first, as == compares). */
static __device__ __forceinline__ unsigned ordered_key(float v)
{
    const unsigned u = __float_as_uint(v + 0.f);
    return u & 0x80000000u ? ~u : u | 0x80000000u;
}

/* the best of the lanes' (key, index) candidates, those with ok: the highest key, then the
   lowest index; index INT_MAX when no lane has one */
static __device__ __forceinline__ int warp_best(unsigned key, int i, bool ok, unsigned *top)
{
    *top = __reduce_max_sync(0xffffffffu, ok ? key : 0u);
    return (int)__reduce_min_sync(0xffffffffu, ok && key == *top ? (unsigned)i : 0x7fffffffu);
}

/* warp_argmax K times over v (E <= 32 · ROUTE_REG: lane l holds experts l, l + 32, ...; the live
   bits say which are left), with the scores in registers: a round is a lane-local scan and two
   warp reductions (the best key, then the lowest expert holding it) instead of five shuffle rounds
   over shared memory. The same choice: the best score, the lower index on ties. idx[k] (idx64[k]
   too, if any) and wk[k] = val[idx[k]] get the K slots. */
static __device__ __forceinline__ void reg_topk(const float (&v)[ROUTE_REG], unsigned live, int K,
                                                int lane, const float *val, int32_t *idx,
                                                int64_t *idx64, float *wk)
{
    for (int k = 0; k < K; k++) {
        float bv = 0.f;
        int bj = -1;
#pragma unroll
        for (int j = 0; j < ROUTE_REG; j++)
            if ((live >> j & 1u) && (bj < 0 || v[j] > bv)) {
                bv = v[j];
                bj = j;
            }
        unsigned top;
        const int e = warp_best(bj < 0 ? 0u : ordered_key(bv), lane + 32 * bj, bj >= 0, &top);
        if (lane == e % 32)
            live &= ~(1u << (e / 32));
        if (lane == 0) {
            idx[k] = e;
            if (idx64)
                idx64[k] = e;
            wk[k] = val[e];
        }
    }
}

/* Shared memory words per warp: val[E], sel[E], taken[E], gscore[G], gtaken[G], wk[K]. */
static size_t route_words(const struct moe_route_cfg *c)
{
    return 3 * (size_t)c->E + 2 * (size_t)c->n_group + (size_t)c->K;
}

/* One token: scores and selection values in shared memory, the group limit, the top-K (in
   registers for E <= 512, else by repeated warp arg-max). */
template <typename L>
static __device__ void smem_route(const struct moe_route_cfg &c, const L *__restrict__ lg,
                                  const void *bias, moe_dtype bdt, int lane, float *val,
                                  int32_t *idx, int64_t *idx64, float *wk)
{
    const int E = c.E, K = c.K, G = c.n_group;
    float *sel = val + E;
    int *taken = (int *)(sel + E);
    float *gscore = (float *)(taken + E);
    int *gtaken = (int *)(gscore + G);

    warp_stage(lg, val, bias, bdt, sel, E, lane); /* sel: the bias, for now */
    __syncwarp();
    route_scores(c, val, lane);
    for (int e = lane; e < E; e += 32) {
        sel[e] = bias ? val[e] + sel[e] : val[e]; /* softmax too: aux-free selection bias */
        taken[e] = 0;
    }
    __syncwarp();

    if (c.recipe == MOE_ROUTE_SIGMOID_GROUP && G > 1 && c.topk_group < G) {
        const int gs = E / G;
        for (int g = lane; g < G; g += 32) {
            float b1 = -INFINITY, b2 = -INFINITY;
            for (int e = g * gs; e < (g + 1) * gs; e++) {
                float v = sel[e];
                if (v > b1) {
                    b2 = b1;
                    b1 = v;
                } else if (v > b2) {
                    b2 = v;
                }
            }
            gscore[g] = gs >= 2 ? b1 + b2 : b1;
            gtaken[g] = 0;
        }
        __syncwarp();
        for (int j = 0; j < c.topk_group; j++) {
            int g = warp_argmax(gscore, gtaken, G, lane);
            if (lane == 0 && g >= 0)
                gtaken[g] = 1;
            __syncwarp();
        }
        for (int e = lane; e < E; e += 32)
            if (!gtaken[e / gs])
                sel[e] = c.mask_value;
        __syncwarp();
    }

    if (E <= 32 * ROUTE_REG) {
        float v[ROUTE_REG];
        unsigned live = 0;
#pragma unroll
        for (int j = 0; j < ROUTE_REG; j++) {
            const int e = lane + 32 * j;
            v[j] = e < E ? sel[e] : 0.f;
            live |= (e < E ? 1u : 0u) << j;
        }
        reg_topk(v, live, K, lane, val, idx, idx64, wk);
        return;
    }
    for (int k = 0; k < K; k++) {
        int e = warp_argmax(sel, taken, E, lane);
        if (lane == 0) {
            taken[e] = 1;
            idx[k] = e;
            if (idx64)
                idx64[k] = e;
            wk[k] = val[e];
        }
        __syncwarp();
    }
}

/* A token's K weights from its chosen scores wk (shared memory, slot order), by one warp: every
   lane sums them in slot order (the CPU reference's), then renormalises and scales. */
static __device__ void write_weights(const struct moe_route_cfg &c, const float *wk, int lane,
                                     float *w)
{
    float sum = 0.f;
    for (int k = 0; k < c.K; k++)
        sum += wk[k];
    const float denom = c.norm ? sum + c.norm_eps : 1.f;
    for (int k = lane; k < c.K; k += 32)
        w[k] = c.norm ? wk[k] / denom * c.scale : wk[k] * c.scale;
}

/* One warp per token; the weights from wk in shared memory (write_weights). */
template <typename L>
static __global__ void route_kernel(struct moe_route_cfg c, int64_t T, const L *logits,
                                    const void *bias, moe_dtype bdt, int32_t *idx, int64_t *idx64,
                                    float *w, int words)
{
    extern __shared__ float smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= T)
        return;
    const int E = c.E, K = c.K;
    float *val = smem + (size_t)warp * words;
    float *wk = val + 3 * E + 2 * c.n_group; /* [K] the chosen experts' scores, in slot order */
    int64_t *ik64 = idx64 ? idx64 + t * K : NULL;
    smem_route(c, logits + t * E, bias, bdt, lane, val, idx + t * K, ik64, wk);
    __syncwarp();
    write_weights(c, wk, lane, w + t * K);
}

/* ---- decode sizes: a block per token, a thread per expert ----
   At T <= RB_T_MAX the warp kernel's chain of dependent shared-memory passes is the whole cost.
   Here every expert's score is computed at once; the softmax sum, group scores, group choice and
   top-K follow the warp kernel's orders and tie rules, so a token gets the same bits from either
   kernel: the sum as lane l's experts l, l + 32, ... in order, then the warp butterfly; a group's
   score the top-2 of its multiset (max and min are exact); every choice the best value, the lower
   index on ties. The top-K: each warp its own best min(K, 32) (two warp reductions a round), then
   warp 0 merges the warps' sorted lists head by head. */
#define RB_T_MAX 256
#define RB_MAX_E 1024
#define RB_MAX_K 32
#define RB_WARPS (RB_MAX_E / 32)

/* whether route_block_kernel takes c: group limits over whole runs of lanes (a group inside a
   warp, or whole warps per group), at most one warp of groups */
static int route_block_ok(const struct moe_route_cfg *c)
{
    if (c->E > RB_MAX_E || c->K > RB_MAX_K)
        return 0;
    if (c->recipe != MOE_ROUTE_SIGMOID_GROUP || c->n_group <= 1 || c->topk_group >= c->n_group)
        return 1;
    const int gs = c->E / c->n_group;
    return c->n_group <= 32 && (gs % 32 == 0 || 32 % gs == 0);
}

/* the top-2 pair (b1 >= b2) of a multiset, merged with another's: exact */
static __device__ __forceinline__ void pair_merge(float &b1, float &b2, float o1, float o2)
{
    const float lo = fminf(b1, o1);
    b1 = fmaxf(b1, o1);
    b2 = fmaxf(lo, fmaxf(b2, o2));
}

/* the group limit: sel of the experts outside the kept groups becomes mask_value */
static __device__ float block_group_limit(const struct moe_route_cfg &c, float sel, int e, int lane,
                                          int warp, float2 *pw, float *gs_score, unsigned *gmask)
{
    const int G = c.n_group, gs = c.E / G;
    const bool live = e < c.E;
    float b1 = live ? sel : -INFINITY, b2 = -INFINITY;
    const int span = gs < 32 ? gs : 32;
    for (int o = span / 2; o > 0; o >>= 1) {
        const float o1 = __shfl_xor_sync(0xffffffffu, b1, o);
        const float o2 = __shfl_xor_sync(0xffffffffu, b2, o);
        pair_merge(b1, b2, o1, o2);
    }
    if (gs <= 32) {
        if (live && lane % gs == 0)
            gs_score[e / gs] = gs >= 2 ? b1 + b2 : b1;
    } else if (lane == 0) {
        pw[warp] = make_float2(b1, b2);
    }
    __syncthreads();
    if (gs > 32 && threadIdx.x < G) { /* whole warps per group: their pairs in order */
        const int per = gs / 32, g = threadIdx.x;
        float p1 = -INFINITY, p2 = -INFINITY;
        for (int j = 0; j < per; j++)
            pair_merge(p1, p2, pw[g * per + j].x, pw[g * per + j].y);
        gs_score[g] = p1 + p2;
    }
    __syncthreads();
    if (warp == 0) {
        const float v = lane < G ? gs_score[lane] : 0.f;
        bool left = lane < G;
        unsigned kept = 0, top;
        for (int j = 0; j < c.topk_group; j++) {
            const int g = warp_best(ordered_key(v), lane, left, &top);
            kept |= 1u << g;
            if (lane == g)
                left = false;
        }
        if (lane == 0)
            *gmask = kept;
    }
    __syncthreads();
    return live && !(*gmask >> (e / gs) & 1u) ? c.mask_value : sel;
}

template <typename L>
static __global__ void __launch_bounds__(RB_MAX_E)
    route_block_kernel(struct moe_route_cfg c, const L *logits, const void *bias, moe_dtype bdt,
                       int32_t *idx, int64_t *idx64, float *w)
{
    __shared__ float val[RB_MAX_E];
    __shared__ unsigned lkey[RB_WARPS][RB_MAX_K];
    __shared__ int lidx[RB_WARPS][RB_MAX_K], lcnt[RB_WARPS];
    __shared__ float red[RB_WARPS], wk[RB_MAX_K];
    __shared__ float2 pw[RB_WARPS];
    __shared__ float gs_score[32];
    __shared__ unsigned gmask;
    const int E = c.E, K = c.K, e = threadIdx.x, lane = e & 31, warp = e >> 5;
    const int nw = blockDim.x / 32;
    const int64_t t = blockIdx.x;
    const bool live = e < E;
    const float l = live ? moe__to_f(__ldg(logits + t * E + e)) : 0.f;
    const float b = live && bias ? bias_at(bias, bdt, e) : 0.f;

    float p;
    if (c.recipe == MOE_ROUTE_SOFTMAX_TOPK) {
        const float m0 = warp_max(live ? l : -INFINITY);
        if (lane == 0)
            red[warp] = m0;
        __syncthreads();
        float m = red[0];
        for (int j = 1; j < nw; j++)
            m = fmaxf(m, red[j]);
        const float x = live ? expf(l - m) : 0.f;
        val[e] = x;
        __syncthreads();
        /* the warp kernel's order: lane l's experts in order, then the butterfly */
        if (warp == 0) {
            float s = 0.f;
            for (int j = lane; j < E; j += 32)
                s += val[j];
            s = warp_sum(s);
            if (lane == 0)
                red[0] = s;
        }
        __syncthreads();
        p = x / red[0];
    } else {
        p = 1.f / (1.f + expf(-l));
    }
    float sel = bias ? p + b : p;
    __syncthreads(); /* val (the softmax terms) is rewritten with the scores */
    if (live)
        val[e] = p;
    if (c.recipe == MOE_ROUTE_SIGMOID_GROUP && c.n_group > 1 && c.topk_group < c.n_group)
        sel = block_group_limit(c, sel, e, lane, warp, pw, gs_score, &gmask);

    /* each warp's best min(K, 32), in order */
    const unsigned key = ordered_key(sel);
    bool left = live;
    int n = 0;
    for (; n < K; n++) {
        unsigned top;
        const int i = warp_best(key, lane, left, &top);
        if (i == 0x7fffffff)
            break;
        if (lane == i)
            left = false;
        if (lane == 0) {
            lkey[warp][n] = top;
            lidx[warp][n] = warp * 32 + i;
        }
    }
    if (lane == 0)
        lcnt[warp] = n;
    __syncthreads();
    if (warp != 0)
        return;
    /* warp 0: lane j holds the head of warp j's list */
    int h = 0;
    const int cnt = lane < nw ? lcnt[lane] : 0;
    for (int k = 0; k < K; k++) {
        unsigned top;
        const bool has = h < cnt;
        const int i = warp_best(has ? lkey[lane][h] : 0u, has ? lidx[lane][h] : 0, has, &top);
        if (has && lidx[lane][h] == i)
            h++;
        if (lane == 0) {
            idx[t * K + k] = i;
            if (idx64)
                idx64[t * K + k] = i;
            wk[k] = val[i];
        }
    }
    __syncwarp();
    write_weights(c, wk, lane, w + t * K);
}

static __global__ void route_backward_kernel(struct moe_route_cfg c, int64_t T, const float *logits,
                                             const int32_t *idx, const float *dw, float *dlogits,
                                             int words)
{
    extern __shared__ float smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= T)
        return;
    const int E = c.E, K = c.K;
    float *val = smem + (size_t)warp * words;
    float *dval = val + E;

    warp_stage(logits + t * E, val, NULL, MOE_F32, NULL, E, lane);
    __syncwarp();
    route_scores(c, val, lane);
    for (int e = lane; e < E; e += 32)
        dval[e] = 0.f;
    __syncwarp();
    if (lane == 0) {
        float S = 0.f, GV = 0.f;
        for (int k = 0; k < K; k++) {
            float v = val[idx[t * K + k]];
            S += v;
            GV += dw[t * K + k] * v;
        }
        S += c.norm_eps;
        for (int k = 0; k < K; k++) {
            float g = dw[t * K + k];
            /* K = 1 with norm: w = scale · v / (v + eps), whose gradient is exactly
               scale · eps / S² (0 for softmax families); the general form leaves rounding noise */
            float dv = !c.norm  ? c.scale * g
                       : K == 1 ? c.scale * g * (c.norm_eps / (S * S))
                                : c.scale * (g / S - GV / (S * S));
            dval[idx[t * K + k]] = dv;
        }
    }
    __syncwarp();
    float *out = dlogits + t * E;
    if (c.recipe == MOE_ROUTE_SOFTMAX_TOPK) {
        /* dl_e = p_e (dp_e − Σ dp p): −p_e·dot everywhere, then the K chosen experts get
           p_e (dp_e (1 − p_e) − Σ_{f≠e} dp_f p_f) with 1 − p_e summed from the other
           probabilities (as a difference it cancels when p_e ≈ 1), as the CPU reference does */
        float dot = 0.f;
        for (int k = 0; k < K; k++)
            dot += dval[idx[t * K + k]] * val[idx[t * K + k]];
        for (int e = lane; e < E; e += 32)
            out[e] = -val[e] * dot;
        __syncwarp();
        for (int k = 0; k < K; k++) {
            const int e = idx[t * K + k];
            float others = 0.f;
            for (int f = lane; f < E; f += 32)
                others += f == e ? 0.f : val[f];
            others = warp_sum(others);
            if (lane == 0) {
                float cross = 0.f;
                for (int j = 0; j < K; j++)
                    if (j != k)
                        cross += dval[idx[t * K + j]] * val[idx[t * K + j]];
                out[e] = val[e] * (dval[e] * others - cross);
            }
        }
    } else {
        const float *l = logits + t * E;
        for (int e = lane; e < E; e += 32)
            out[e] = dval[e] * val[e] / (1.f + expf(l[e])); /* 1 − s = sigmoid(−l) */
    }
}

/* ---- the router's own logits (moe_problem.router_w): logits = x · wᵀ in fp32 ---- */

#define ROUTER_EXPERTS 4 /* experts per block: each x chunk it loads serves all of them */
#define ROUTER_TOKENS 8  /* tokens per pass: ROUTER_EXPERTS x ROUTER_TOKENS sums per thread */

/* MOE_ROUTER_CHUNK (8) raw elements: one 16-byte vector, two for fp32 */
template <typename T> struct raw8 {
    uint4 v[sizeof(T) / 2];
};

/* elements h0.. h0 + 7 of a row (zeros past H: a zero product leaves the sum's bits unchanged, as
   the CPU's skipped terms do, since the sum starts at +0 and never becomes -0) */
template <typename T, bool VEC>
static __device__ __forceinline__ raw8<T> load8(const T *__restrict__ row, int64_t h0, int64_t H)
{
    raw8<T> r;
    if (VEC && h0 + MOE_ROUTER_CHUNK <= H) {
#pragma unroll
        for (int i = 0; i < (int)(sizeof(T) / 2); i++)
            r.v[i] = __ldg((const uint4 *)(row + h0) + i);
    } else {
        T *e = (T *)&r;
#pragma unroll
        for (int j = 0; j < MOE_ROUTER_CHUNK; j++)
            e[j] = h0 + j < H ? row[h0 + j] : moe__from_f<T>(0.f);
    }
    return r;
}

template <typename T> static __device__ __forceinline__ float elem8(const raw8<T> &r, int j)
{
    return moe__to_f(((const T *)&r)[j]);
}

/* A block of MOE_ROUTER_LANES threads: ROUTER_EXPERTS experts' logits of every token, thread l
   summing chunks l, l + 128, ... (moe_router_logits_cpu's order), then the four warps' butterflies
   meet in shared memory. VEC: rows 16-byte aligned, chunks loaded as vectors. */
template <typename T, bool VEC>
static __global__ void __launch_bounds__(MOE_ROUTER_LANES)
    router_logits_kernel(int64_t n_tok, int64_t H, int E, const T *__restrict__ x, int64_t x_rs,
                         const T *__restrict__ w, int64_t w_rs, float *__restrict__ out)
{
    __shared__ float part[MOE_ROUTER_LANES / 32][ROUTER_EXPERTS * ROUTER_TOKENS];
    const int tid = threadIdx.x, lane = tid & 31, grp = tid >> 5;
    const int e0 = blockIdx.x * ROUTER_EXPERTS;
    const int64_t chunks = (H + MOE_ROUTER_CHUNK - 1) / MOE_ROUTER_CHUNK;
    for (int64_t t0 = 0; t0 < n_tok; t0 += ROUTER_TOKENS) {
        const int nt = n_tok - t0 < ROUTER_TOKENS ? (int)(n_tok - t0) : ROUTER_TOKENS;
        float acc[ROUTER_EXPERTS][ROUTER_TOKENS];
#pragma unroll
        for (int e = 0; e < ROUTER_EXPERTS; e++)
#pragma unroll
            for (int r = 0; r < ROUTER_TOKENS; r++)
                acc[e][r] = 0.f;
        for (int64_t c = tid; c < chunks; c += MOE_ROUTER_LANES) {
            const int64_t h0 = c * MOE_ROUTER_CHUNK;
            raw8<T> wr[ROUTER_EXPERTS], xr[ROUTER_TOKENS];
#pragma unroll
            for (int e = 0; e < ROUTER_EXPERTS; e++)
                wr[e] = load8<T, VEC>(w + (int64_t)(e0 + (e0 + e < E ? e : 0)) * w_rs, h0, H);
#pragma unroll
            for (int r = 0; r < ROUTER_TOKENS; r++)
                xr[r] = load8<T, VEC>(x + (t0 + (r < nt ? r : 0)) * x_rs, h0, H);
#pragma unroll
            for (int j = 0; j < MOE_ROUTER_CHUNK; j++)
#pragma unroll
                for (int e = 0; e < ROUTER_EXPERTS; e++)
#pragma unroll
                    for (int r = 0; r < ROUTER_TOKENS; r++)
                        acc[e][r] = fmaf(elem8(xr[r], j), elem8(wr[e], j), acc[e][r]);
        }
#pragma unroll
        for (int e = 0; e < ROUTER_EXPERTS; e++)
#pragma unroll
            for (int r = 0; r < ROUTER_TOKENS; r++) {
                float v = acc[e][r];
                for (int o = 16; o > 0; o >>= 1)
                    v += __shfl_xor_sync(0xffffffffu, v, o);
                if (lane == 0)
                    part[grp][e * ROUTER_TOKENS + r] = v;
            }
        __syncthreads();
        if (tid < ROUTER_EXPERTS * ROUTER_TOKENS) {
            const int e = tid / ROUTER_TOKENS, r = tid % ROUTER_TOKENS;
            if (e0 + e < E && r < nt)
                out[(t0 + r) * E + e0 + e] =
                    (part[0][tid] + part[1][tid]) + (part[2][tid] + part[3][tid]);
        }
        __syncthreads(); /* part is refilled by the next pass */
    }
}

int moe__router_logits_cuda(int64_t n_tok, int64_t H, int E, moe_dtype dt, const void *x,
                            int64_t x_rs, const void *w, int64_t w_rs, float *logits,
                            cudaStream_t st)
{
    MOE_REQUIRE(n_tok >= 0 && H > 0 && E > 0 && (n_tok <= 1 || x_rs >= H) && w_rs >= H, MOE_EINVAL);
    if (n_tok == 0)
        return MOE_OK;
    MOE_REQUIRE(x && w && logits, MOE_EINVAL);
    const int64_t es = (int64_t)moe_dtype_size(dt);
    const bool vec = (uintptr_t)x % 16 == 0 && (uintptr_t)w % 16 == 0 && (w_rs * es) % 16 == 0 &&
                     (n_tok == 1 || (x_rs * es) % 16 == 0);
    const unsigned blocks = (unsigned)((E + ROUTER_EXPERTS - 1) / ROUTER_EXPERTS);
    if (vec)
        MOE_DISPATCH(dt, (router_logits_kernel<T, true><<<blocks, MOE_ROUTER_LANES, 0, st>>>(
                             n_tok, H, E, (const T *)x, x_rs, (const T *)w, w_rs, logits)));
    else
        MOE_DISPATCH(dt, (router_logits_kernel<T, false><<<blocks, MOE_ROUTER_LANES, 0, st>>>(
                             n_tok, H, E, (const T *)x, x_rs, (const T *)w, w_rs, logits)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

static int route_geometry(size_t words_per_warp, int *warps, size_t *smem)
{
    size_t per = words_per_warp * 4;
    MOE_REQUIRE(per <= 48 * 1024, MOE_EUNSUPPORTED);
    int w = (int)((48 * 1024) / per);
    *warps = w > ROUTE_MAX_WARPS ? ROUTE_MAX_WARPS : w;
    *smem = per * (size_t)*warps;
    return MOE_OK;
}

static int route_launch(const struct moe_route_cfg *c, int64_t n_tok, const void *logits,
                        moe_dtype ldt, const void *bias, moe_dtype bdt, int32_t *idx,
                        int64_t *idx64, float *w, cudaStream_t st)
{
    if (n_tok <= RB_T_MAX && route_block_ok(c)) {
        const unsigned threads = (unsigned)((c->E + 31) / 32 * 32);
        MOE_DISPATCH(ldt, (route_block_kernel<T><<<(unsigned)n_tok, threads, 0, st>>>(
                              *c, (const T *)logits, bias, bdt, idx, idx64, w)));
        MOE_CHECK_LAUNCH();
        return MOE_OK;
    }
    int warps = 1;
    size_t smem = 0, words = route_words(c);
    MOE_TRY(route_geometry(words, &warps, &smem));
    unsigned blocks = (unsigned)((n_tok + warps - 1) / warps);
    MOE_DISPATCH(ldt, (route_kernel<T><<<blocks, 32 * warps, smem, st>>>(
                          *c, n_tok, (const T *)logits, bias, bdt, idx, idx64, w, (int)words)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

static int route_backward_launch(const struct moe_route_cfg *c, int64_t T, const float *logits,
                                 const int32_t *idx, const float *dw, float *dlogits,
                                 cudaStream_t st)
{
    int warps = 1;
    size_t smem = 0, words = 2 * (size_t)c->E;
    MOE_TRY(route_geometry(words, &warps, &smem));
    unsigned blocks = (unsigned)((T + warps - 1) / warps);
    route_backward_kernel<<<blocks, 32 * warps, smem, st>>>(*c, T, logits, idx, dw, dlogits,
                                                            (int)words);
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

static int route_cfg_ok(const struct moe_route_cfg *c)
{
    MOE_REQUIRE(c && c->E > 0 && c->K > 0 && c->K <= c->E, MOE_EINVAL);
    MOE_REQUIRE(c->recipe == MOE_ROUTE_SOFTMAX_TOPK || c->recipe == MOE_ROUTE_SIGMOID_GROUP,
                MOE_EINVAL);
    MOE_REQUIRE(c->n_group >= 1 && c->E % c->n_group == 0, MOE_EINVAL);
    MOE_REQUIRE(c->topk_group >= 1 && c->topk_group <= c->n_group, MOE_EINVAL);
    return MOE_OK;
}

int moe__route_cuda(const struct moe_route_cfg *c, int64_t T, const void *logits, moe_dtype ldt,
                    const void *bias, moe_dtype bdt, int32_t *idx, int64_t *idx64, float *w,
                    cudaStream_t st)
{
    MOE_TRY(route_cfg_ok(c));
    MOE_REQUIRE(T >= 0 && (bdt == MOE_F32 || bdt == MOE_BF16 || bdt == MOE_F16), MOE_EINVAL);
    if (T == 0)
        return MOE_OK;
    MOE_REQUIRE(logits && idx && w, MOE_EINVAL);
    return route_launch(c, T, logits, ldt, bias, bdt, idx, idx64, w, st);
}

int moe__route_backward_cuda(const struct moe_route_cfg *c, int64_t T, const float *logits,
                             const int32_t *idx, const float *dw, float *dlogits, cudaStream_t st)
{
    MOE_TRY(route_cfg_ok(c));
    MOE_REQUIRE(T >= 0, MOE_EINVAL);
    if (T == 0)
        return MOE_OK;
    MOE_REQUIRE(logits && idx && dw && dlogits, MOE_EINVAL);
    return route_backward_launch(c, T, logits, idx, dw, dlogits, st);
}

extern "C" MOE_API int moe_route_cuda(const struct moe_route_cfg *c, int64_t T, const float *logits,
                                      const float *bias, int32_t *idx, float *w, void *stream)
{
    return moe__route_cuda(c, T, logits, MOE_F32, bias, MOE_F32, idx, NULL, w,
                           (cudaStream_t)stream);
}
