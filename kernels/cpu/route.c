/*
 * kernels/cpu/route.c — routing on the CPU: logits -> (idx, w) for both recipes, and its backward
 * dw -> dlogits. Design choice: every top-k is a repeated arg-max with a strict ">" scanned in
 * ascending index order, which gives exactly the contract of moe.h (lower index wins ties, slots in
 * descending score) for any value, -inf and 0.0 mask values included, at O(K·E) per token.
 * A selection bias (aux-loss-free balancing) moves the choice of either recipe, never the weights.
 * Also the router's own logits (moe_router_logits_cpu), in the sum order the CUDA kernel uses.
 */
#include <math.h>
#include <string.h>

#include "cpu.h"
#include "dtype.h"

int moe__route_cfg_valid(const struct moe_route_cfg *c)
{
    if (!c || (c->recipe != MOE_ROUTE_SOFTMAX_TOPK && c->recipe != MOE_ROUTE_SIGMOID_GROUP))
        return 0;
    if (c->E < 1 || c->K < 1 || c->K > c->E || c->n_group < 1 || c->E % c->n_group != 0)
        return 0;
    return c->topk_group >= 1 && c->topk_group <= c->n_group;
}

/* The k best of score[0..n) into out[0..k), best first. taken [n] is scratch. An element that is
   not strictly greater than the current best never replaces it, so ties go to the lower index, and
   the first free index is the fallback, so NaN or -inf scores still yield k distinct indices. */
static void topk(const float *score, int n, int k, int32_t *out, unsigned char *taken)
{
    memset(taken, 0, (size_t)n);
    for (int j = 0; j < k; j++) {
        int best = -1;
        for (int i = 0; i < n; i++)
            if (!taken[i] && (best < 0 || score[i] > score[best]))
                best = i;
        taken[best] = 1;
        out[j] = best;
    }
}

/* p = softmax(l) in fp32, max-subtracted. */
static void softmax(const float *l, int E, float *p)
{
    float m = l[0];
    for (int e = 1; e < E; e++)
        m = l[e] > m ? l[e] : m;
    float sum = 0.0f;
    for (int e = 0; e < E; e++) {
        p[e] = expf(l[e] - m);
        sum += p[e];
    }
    for (int e = 0; e < E; e++)
        p[e] /= sum;
}

/* Sum of the two largest values of v[0..n); the value itself when n == 1. */
static float top2_sum(const float *v, int n)
{
    if (n < 2)
        return v[0];
    float a = v[0] >= v[1] ? v[0] : v[1], b = v[0] >= v[1] ? v[1] : v[0];
    for (int i = 2; i < n; i++) {
        if (v[i] > a) {
            b = a;
            a = v[i];
        } else if (v[i] > b) {
            b = v[i];
        }
    }
    return a + b;
}

/* The selection score of the sigmoid recipe into c (from s and bias), group limit applied.
   gscore [n_group], gidx [topk_group] and taken [E] are scratch. */
static void group_select_scores(const struct moe_route_cfg *c, const float *s, const float *bias,
                                float *sel, float *gscore, int32_t *gidx, unsigned char *taken)
{
    for (int e = 0; e < c->E; e++)
        sel[e] = s[e] + (bias ? bias[e] : 0.0f);
    int gs = c->n_group > 1 ? c->E / c->n_group : 0;
    if (gs < 1) /* no group limit (validation guarantees n_group divides E) */
        return;
    for (int g = 0; g < c->n_group; g++)
        gscore[g] = top2_sum(sel + g * gs, gs);
    topk(gscore, c->n_group, c->topk_group, gidx, taken);
    memset(taken, 0, (size_t)c->n_group);
    for (int j = 0; j < c->topk_group; j++)
        taken[gidx[j]] = 1;
    for (int e = 0; e < c->E; e++)
        if (!taken[e / gs])
            sel[e] = c->mask_value;
}

/* w = v ÷ (Σ v + eps) if norm, × scale: the shared tail of both recipes. */
static void finish_weights(const struct moe_route_cfg *c, float *w)
{
    if (c->norm) {
        float sum = 0.0f;
        for (int k = 0; k < c->K; k++)
            sum += w[k];
        float denom = sum + c->norm_eps;
        for (int k = 0; k < c->K; k++)
            w[k] /= denom;
    }
    for (int k = 0; k < c->K; k++)
        w[k] *= c->scale;
}

/* Per-call scratch of the routing: the probabilities / sigmoid scores, the selection scores, group
   scores and the taken flags. */
struct route_scratch {
    float *p, *sel, *gscore;
    int32_t *gidx;
    unsigned char *taken;
};

static void scratch_free(struct route_scratch *s)
{
    free(s->p);
    free(s->sel);
    free(s->gscore);
    free(s->gidx);
    free(s->taken);
}

static int scratch_alloc(struct route_scratch *s, const struct moe_route_cfg *c)
{
    s->p = moe__alloc((size_t)c->E, sizeof(float));
    s->sel = moe__alloc((size_t)c->E, sizeof(float));
    s->gscore = moe__alloc((size_t)c->n_group, sizeof(float));
    s->gidx = moe__alloc((size_t)c->topk_group, sizeof(int32_t));
    s->taken = moe__alloc((size_t)c->E, 1);
    if (s->p && s->sel && s->gscore && s->gidx && s->taken)
        return MOE_OK;
    scratch_free(s);
    return MOE_ENOMEM;
}

static void route_token(const struct moe_route_cfg *c, const float *l, const float *bias,
                        struct route_scratch *s, int32_t *idx, float *w)
{
    if (c->recipe == MOE_ROUTE_SOFTMAX_TOPK) {
        softmax(l, c->E, s->p);
        if (bias) {
            for (int e = 0; e < c->E; e++)
                s->sel[e] = s->p[e] + bias[e];
            topk(s->sel, c->E, c->K, idx, s->taken);
        } else {
            topk(s->p, c->E, c->K, idx, s->taken);
        }
    } else {
        for (int e = 0; e < c->E; e++)
            s->p[e] = moe__sigmoid(l[e]);
        group_select_scores(c, s->p, bias, s->sel, s->gscore, s->gidx, s->taken);
        topk(s->sel, c->E, c->K, idx, s->taken);
    }
    for (int k = 0; k < c->K; k++)
        w[k] = s->p[idx[k]];
    finish_weights(c, w);
}

int moe_route_cpu(const struct moe_route_cfg *c, int64_t T, const float *logits, const float *bias,
                  int32_t *idx, float *w)
{
    if (!moe__route_cfg_valid(c) || T < 0 || (T > 0 && (!logits || !idx || !w)))
        return MOE_EINVAL;
    if (T == 0)
        return MOE_OK;
    struct route_scratch s;
    if (scratch_alloc(&s, c) != MOE_OK)
        return MOE_ENOMEM;
    for (int64_t t = 0; t < T; t++)
        route_token(c, logits + t * c->E, bias, &s, idx + t * c->K, w + t * c->K);
    scratch_free(&s);
    return MOE_OK;
}

/* dv [K]: the grad of the K unscaled, unnormalised weights v = p[idx] (or s[idx]) from dw.
   With norm, w_j = scale · v_j / S, S = Σ v + eps, so dv_j = scale/S · (dw_j − Σ_k dw_k v_k / S).
 */
static void weights_backward(const struct moe_route_cfg *c, const float *v, const float *dw,
                             float *dv)
{
    if (!c->norm) {
        for (int k = 0; k < c->K; k++)
            dv[k] = c->scale * dw[k];
        return;
    }
    if (c->K == 1) {
        /* w = scale · v / (v + eps): the general formula would return rounding noise around the
           true gradient scale · eps / S², which is exactly 0 for the softmax families. */
        float S = v[0] + c->norm_eps;
        dv[0] = c->scale * dw[0] * (c->norm_eps / (S * S));
        return;
    }
    float sum = 0.0f, dot = 0.0f;
    for (int k = 0; k < c->K; k++)
        sum += v[k];
    float S = sum + c->norm_eps;
    for (int k = 0; k < c->K; k++)
        dot += dw[k] * v[k];
    for (int k = 0; k < c->K; k++)
        dv[k] = c->scale / S * (dw[k] - dot / S);
}

/* dl_e = p_e · (dp_e − Σ_f dp_f p_f) for every logit; dp is nonzero only at the K chosen experts.
   For a chosen e this is p_e · (dp_e · (1 − p_e) − Σ_{f≠e} dp_f p_f), and 1 − p_e is summed from
   the other probabilities: written as a difference it cancels when p_e ≈ 1 (a confident router). */
static void softmax_backward(const struct moe_route_cfg *c, const float *p, const int32_t *idx,
                             const float *dp, float *dl)
{
    float dot = 0.0f;
    for (int k = 0; k < c->K; k++)
        dot += dp[idx[k]] * p[idx[k]];
    for (int e = 0; e < c->E; e++)
        dl[e] = -p[e] * dot;
    for (int k = 0; k < c->K; k++) {
        int e = idx[k];
        float others = 0.0f, cross = 0.0f;
        for (int f = 0; f < c->E; f++)
            if (f != e)
                others += p[f];
        for (int j = 0; j < c->K; j++)
            if (j != k)
                cross += dp[idx[j]] * p[idx[j]];
        dl[e] = p[e] * (dp[e] * others - cross);
    }
}

/* s->sel holds dp (the grad of every probability) here; s->gscore is not used. */
static void route_backward_token(const struct moe_route_cfg *c, const float *l, const int32_t *idx,
                                 const float *dw, struct route_scratch *s, float *dv, float *v,
                                 float *dl)
{
    if (c->recipe == MOE_ROUTE_SOFTMAX_TOPK)
        softmax(l, c->E, s->p);
    else
        for (int e = 0; e < c->E; e++)
            s->p[e] = moe__sigmoid(l[e]);
    for (int k = 0; k < c->K; k++)
        v[k] = s->p[idx[k]];
    weights_backward(c, v, dw, dv);
    float *dp = s->sel;
    memset(dp, 0, (size_t)c->E * sizeof(float));
    for (int k = 0; k < c->K; k++)
        dp[idx[k]] += dv[k];
    if (c->recipe == MOE_ROUTE_SOFTMAX_TOPK)
        softmax_backward(c, s->p, idx, dp, dl);
    else /* sigmoid is elementwise: only the chosen experts get a grad; 1 − s = sigmoid(−l) */
        for (int e = 0; e < c->E; e++)
            dl[e] = dp[e] * s->p[e] * moe__sigmoid(-l[e]);
}

int moe_route_backward_cpu(const struct moe_route_cfg *c, int64_t T, const float *logits,
                           const int32_t *idx, const float *dw, float *dlogits)
{
    if (!moe__route_cfg_valid(c) || T < 0 || (T > 0 && (!logits || !idx || !dw || !dlogits)))
        return MOE_EINVAL;
    for (int64_t i = 0; i < T * c->K; i++)
        if (idx[i] < 0 || idx[i] >= c->E)
            return MOE_EINVAL;
    if (T == 0)
        return MOE_OK;
    struct route_scratch s;
    float *dv = moe__alloc((size_t)c->K, sizeof(float));
    float *v = moe__alloc((size_t)c->K, sizeof(float));
    int rc = scratch_alloc(&s, c);
    if (rc == MOE_OK && dv && v) {
        for (int64_t t = 0; t < T; t++)
            route_backward_token(c, logits + t * c->E, idx + t * c->K, dw + t * c->K, &s, dv, v,
                                 dlogits + t * c->E);
        scratch_free(&s);
    } else if (rc == MOE_OK) {
        scratch_free(&s);
        rc = MOE_ENOMEM;
    }
    free(dv);
    free(v);
    return rc;
}

/* One logit in moe.h's order: the lanes' partial sums, then the 32-lane butterflies, then the
   four groups pairwise. */
static float router_logit(moe_dtype dt, const void *x, const void *w, int64_t H, float *lane)
{
    const int64_t chunks = (H + MOE_ROUTER_CHUNK - 1) / MOE_ROUTER_CHUNK;
    for (int l = 0; l < MOE_ROUTER_LANES; l++) {
        float acc = 0.0f;
        for (int64_t c = l; c < chunks; c += MOE_ROUTER_LANES)
            for (int64_t h = c * MOE_ROUTER_CHUNK; h < (c + 1) * MOE_ROUTER_CHUNK && h < H; h++)
                acc = fmaf(moe__load(dt, x, h), moe__load(dt, w, h), acc);
        lane[l] = acc;
    }
    for (int g = 0; g < MOE_ROUTER_LANES; g += 32)
        for (int o = 16; o > 0; o >>= 1)
            for (int l = 0; l < o; l++)
                lane[g + l] = lane[g + l] + lane[g + l + o];
    return (lane[0] + lane[32]) + (lane[64] + lane[96]);
}

int moe_router_logits_cpu(int64_t T, int64_t H, int E, moe_dtype dt, const void *x, int64_t x_rs,
                          const void *w, int64_t w_rs, float *logits)
{
    if (T < 0 || H < 1 || E < 1 || !moe__dtype_valid(dt) || (T > 1 && x_rs < H) || w_rs < H ||
        (T > 0 && (!x || !w || !logits)))
        return MOE_EINVAL;
    const size_t es = moe_dtype_size(dt);
    float lane[MOE_ROUTER_LANES];
    for (int64_t t = 0; t < T; t++)
        for (int e = 0; e < E; e++)
            logits[t * E + e] =
                router_logit(dt, (const char *)x + (size_t)(t * x_rs) * es,
                             (const char *)w + (size_t)((int64_t)e * w_rs) * es, H, lane);
    return MOE_OK;
}
