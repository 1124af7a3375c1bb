/*
 * kernels/cuda/route.cu — routing forward (logits → idx, w) and backward (dw → dlogits) for both
 * recipes of moe.h. One warp per token; the token's E scores live in shared memory.
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

/* val[e] = the recipe's probability (softmax p or sigmoid s) of the token's logits row. */
static __device__ void route_scores(const struct moe_route_cfg &c, const float *row, float *val,
                                    int lane)
{
    const int E = c.E;
    if (c.recipe == MOE_ROUTE_SOFTMAX_TOPK) {
        float m = -INFINITY;
        for (int e = lane; e < E; e += 32)
            m = fmaxf(m, row[e]);
        m = warp_max(m);
        float s = 0.f;
        for (int e = lane; e < E; e += 32) {
            float x = expf(row[e] - m);
            val[e] = x;
            s += x;
        }
        s = warp_sum(s);
        for (int e = lane; e < E; e += 32)
            val[e] = val[e] / s;
    } else {
        for (int e = lane; e < E; e += 32)
            val[e] = 1.f / (1.f + expf(-row[e]));
    }
}

/* Shared memory words per warp: val[E], sel[E], taken[E], gscore[G], gtaken[G], wk[K]. */
static size_t route_words(const struct moe_route_cfg *c)
{
    return 3 * (size_t)c->E + 2 * (size_t)c->n_group + (size_t)c->K;
}

static __global__ void route_kernel(struct moe_route_cfg c, int64_t T, const float *logits,
                                    const float *bias, int32_t *idx, float *w, int words)
{
    extern __shared__ float smem[];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int64_t t = (int64_t)blockIdx.x * (blockDim.x / 32) + warp;
    if (t >= T)
        return;
    const int E = c.E, K = c.K, G = c.n_group;
    float *val = smem + (size_t)warp * words;
    float *sel = val + E;
    int *taken = (int *)(sel + E);
    float *gscore = (float *)(taken + E);
    int *gtaken = (int *)(gscore + G);
    float *wk = (float *)(gtaken + G); /* [K] the chosen experts' scores, in slot order */

    route_scores(c, logits + t * E, val, lane);
    for (int e = lane; e < E; e += 32) {
        sel[e] = val[e];
        if (bias) /* softmax too: aux-free selection bias */
            sel[e] += bias[e];
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

    /* every lane sums the same scores in slot order (the CPU reference's order); the weights are
       written once, from shared memory, instead of being read back from global memory slot by
       slot (measured: no change at decode sizes, where the kernel takes ~8 us for reasons not
       found; tests/bench/RESULTS.md) */
    float sum = 0.f;
    for (int k = 0; k < K; k++) {
        int e = warp_argmax(sel, taken, E, lane);
        if (lane == 0) {
            taken[e] = 1;
            idx[t * K + k] = e;
            wk[k] = val[e];
        }
        sum += val[e];
        __syncwarp();
    }
    const float denom = c.norm ? sum + c.norm_eps : 1.f;
    for (int k = lane; k < K; k += 32)
        w[t * K + k] = c.norm ? wk[k] / denom * c.scale : wk[k] * c.scale;
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

    route_scores(c, logits + t * E, val, lane);
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

static int route_geometry(size_t words_per_warp, int *warps, size_t *smem)
{
    size_t per = words_per_warp * 4;
    MOE_REQUIRE(per <= 48 * 1024, MOE_EUNSUPPORTED);
    int w = (int)((48 * 1024) / per);
    *warps = w > ROUTE_MAX_WARPS ? ROUTE_MAX_WARPS : w;
    *smem = per * (size_t)*warps;
    return MOE_OK;
}

static int route_launch(const struct moe_route_cfg *c, int64_t T, const float *logits,
                        const float *bias, int32_t *idx, float *w, cudaStream_t st)
{
    int warps = 1;
    size_t smem = 0, words = route_words(c);
    MOE_TRY(route_geometry(words, &warps, &smem));
    unsigned blocks = (unsigned)((T + warps - 1) / warps);
    route_kernel<<<blocks, 32 * warps, smem, st>>>(*c, T, logits, bias, idx, w, (int)words);
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

int moe__route_cuda(const struct moe_route_cfg *c, int64_t T, const float *logits,
                    const float *bias, int32_t *idx, float *w, cudaStream_t st)
{
    MOE_TRY(route_cfg_ok(c));
    MOE_REQUIRE(T >= 0, MOE_EINVAL);
    if (T == 0)
        return MOE_OK;
    MOE_REQUIRE(logits && idx && w, MOE_EINVAL);
    return route_launch(c, T, logits, bias, idx, w, st);
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
