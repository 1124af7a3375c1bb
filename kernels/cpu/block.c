/*
 * kernels/cpu/block.c — forward and backward of a whole MoE block on the CPU (moe_forward_cpu,
 * moe_backward_cpu): route, permute, expert MLPs, combine, shared expert, and the way back.
 * Design choice: the backend keeps no state between the two calls; the backward recomputes every
 * intermediate from x, idx and w, one expert at a time, so its memory is one expert's fp32 weights
 * and grads plus the [T, H] fp32 accumulator of dx, and all sums run in a fixed order (bitwise
 * deterministic, single-threaded).
 */
#include <string.h>

#include "cpu.h"
#include "dtype.h"

static int same_shape(const struct moe_mlp *a, const struct moe_mlp *b)
{
    return a->n == b->n && a->H == b->H && a->I == b->I;
}

static int problem_valid(const struct moe_problem *p, int backward)
{
    if (!p || !moe__route_cfg_valid(&p->route) || !moe__dtype_valid(p->dtype) || p->T < 0 ||
        p->H < 1)
        return 0;
    if (p->experts.n != p->route.E || p->experts.H != p->H || !moe__mlp_valid(&p->experts))
        return 0;
    if (p->shared.n != 0 &&
        (p->shared.n != 1 || p->shared.H != p->H || !moe__mlp_valid(&p->shared)))
        return 0;
    if (p->shared_gate && p->shared.n == 0)
        return 0;
    if (p->T > 0 && (!p->x || !p->idx || !p->w || (p->T > 1 && p->x_rs < p->H)))
        return 0;
    if (p->bias && p->bias_dtype != MOE_F32) /* others: CUDA only */
        return 0;
    if (p->router_w) /* the forward makes the logits (moe_problem.router_w): no backward follows */
        return !backward && (p->T == 0 || p->logits_out) && p->router_w_rs >= p->H &&
               (p->T == 0 || p->y);
    if ((p->T > 0 && !p->logits) || p->logits_dtype != MOE_F32) /* others: CUDA only */
        return 0;
    if (!backward)
        return p->T == 0 || p->y;
    /* weight grads are written even when T == 0 (as zeros), so their pointers are always needed */
    if (!same_shape(&p->d_experts, &p->experts) || !moe__mlp_valid(&p->d_experts))
        return 0;
    if (p->shared.n && (!same_shape(&p->d_shared, &p->shared) || !moe__mlp_valid(&p->d_shared)))
        return 0;
    if (p->shared_gate && !p->d_shared_gate)
        return 0;
    return p->T == 0 || (p->dy && p->dx && p->dlogits);
}

static const void *row_of(const void *a, moe_dtype dt, int64_t t, int64_t rs)
{
    return (const char *)a + t * rs * (int64_t)moe_dtype_size(dt);
}

/* The routing's grouping of slots by expert, shared by forward and backward. */
struct groups {
    int64_t *counts, *offsets;
    int32_t *perm;
};

static void groups_free(struct groups *g)
{
    free(g->counts);
    free(g->offsets);
    free(g->perm);
}

static int groups_build(struct groups *g, const struct moe_problem *p)
{
    int E = p->route.E;
    g->counts = moe__alloc((size_t)E, sizeof(int64_t));
    g->offsets = moe__alloc((size_t)E + 1, sizeof(int64_t));
    g->perm = moe__alloc((size_t)(p->T * p->route.K), sizeof(int32_t));
    if (!g->counts || !g->offsets || !g->perm) {
        groups_free(g);
        return MOE_ENOMEM;
    }
    int rc = moe_permute_cpu(p->T, p->route.K, E, p->idx, g->counts, g->offsets, g->perm);
    if (rc != MOE_OK)
        groups_free(g);
    return rc;
}

/* The shared expert's multiplier for token row xin: 1, or sigmoid(shared_gate · x) when gated. */
static float shared_gate_value(const float *sg32, const float *xin, int64_t H)
{
    return sg32 ? moe__sigmoid(moe__dot(sg32, xin, H)) : 1.0f;
}

/* y32 += gate_t · shared(x_t) for every token. */
static int shared_forward(const struct moe_problem *p, float *y32)
{
    int64_t H = p->H;
    struct moe__expert ex;
    struct moe__row r;
    float *sout = moe__alloc((size_t)H, sizeof(float));
    float *sg32 = p->shared_gate ? moe__alloc((size_t)H, sizeof(float)) : NULL;
    int rc = moe__expert_alloc(&ex, H, p->shared.I);
    if (rc == MOE_OK && (rc = moe__row_alloc(&r, H, p->shared.I)) != MOE_OK)
        moe__expert_free(&ex);
    if (rc != MOE_OK || !sout || (p->shared_gate && !sg32)) {
        if (rc == MOE_OK) {
            moe__row_free(&r);
            moe__expert_free(&ex);
        }
        free(sout);
        free(sg32);
        return MOE_ENOMEM;
    }
    if (sg32)
        moe__load_row(p->dtype, p->shared_gate, H, sg32);
    moe__expert_unpack(&ex, &p->shared, p->dtype, 0);
    for (int64_t t = 0; t < p->T; t++) {
        moe__load_row(p->dtype, row_of(p->x, p->dtype, t, p->x_rs), H, r.xin);
        moe__expert_row_forward(&ex, &r, sout);
        float gate = shared_gate_value(sg32, r.xin, H);
        for (int64_t h = 0; h < H; h++)
            y32[t * H + h] += gate * sout[h];
    }
    moe__row_free(&r);
    moe__expert_free(&ex);
    free(sout);
    free(sg32);
    return MOE_OK;
}

int moe_forward_cpu(struct moe_problem *p)
{
    if (!problem_valid(p, 0))
        return MOE_EINVAL;
    if (p->counts)
        memset(p->counts, 0, (size_t)p->route.E * sizeof(int64_t));
    if (p->T == 0)
        return MOE_OK;
    int64_t T = p->T, H = p->H, TK = T * p->route.K;
    const float *logits = p->logits;
    if (p->router_w) {
        int rc = moe_router_logits_cpu(T, H, p->route.E, p->dtype, p->x, p->x_rs, p->router_w,
                                       p->router_w_rs, p->logits_out);
        if (rc != MOE_OK)
            return rc;
        logits = p->logits_out;
    }
    int rc = moe_route_cpu(&p->route, T, logits, p->bias, p->idx, p->w);
    if (rc != MOE_OK)
        return rc;
    for (int64_t i = 0; p->idx64 && i < TK; i++)
        p->idx64[i] = p->idx[i];
    struct groups g;
    if ((rc = groups_build(&g, p)) != MOE_OK)
        return rc;
    if (p->counts)
        memcpy(p->counts, g.counts, (size_t)p->route.E * sizeof(int64_t));
    int32_t *inv = moe__alloc((size_t)TK, sizeof(int32_t));
    float *out = moe__alloc((size_t)(TK * H), sizeof(float));
    float *y32 = moe__alloc((size_t)(T * H), sizeof(float));
    if (!inv || !out || !y32) {
        rc = MOE_ENOMEM;
        goto done;
    }
    moe__invert_perm(TK, g.perm, inv);
    rc = moe_expert_mlp_cpu(&p->experts, p->dtype, p->x, p->x_rs, p->route.K, g.offsets, g.perm,
                            NULL, out);
    if (rc != MOE_OK)
        goto done;
    moe__combine_f32(T, p->route.K, H, out, inv, p->w, y32);
    if (p->shared.n == 1 && (rc = shared_forward(p, y32)) != MOE_OK)
        goto done;
    moe__store_row(p->dtype, p->y, T * H, y32);
done:
    groups_free(&g);
    free(inv);
    free(out);
    free(y32);
    return rc;
}

/* Per-call scratch of the backward: one expert's weights and grads, one row, the dy / out rows, and
   the fp32 accumulators of dx [T, H] and dw [T, K]. */
struct bwd {
    struct moe__expert ex, grad;
    struct moe__row r;
    float *dyrow, *orow, *d_out, *dx32, *dw;
};

static void bwd_free(struct bwd *b)
{
    moe__expert_free(&b->ex);
    moe__expert_free(&b->grad);
    moe__row_free(&b->r);
    free(b->dyrow);
    free(b->orow);
    free(b->d_out);
    free(b->dx32);
    free(b->dw);
}

/* Scratch for MLPs of intermediate size up to I. */
static int bwd_alloc(struct bwd *b, const struct moe_problem *p, int64_t I)
{
    int64_t H = p->H;
    memset(b, 0, sizeof *b);
    int ok = moe__expert_alloc(&b->ex, H, I) == MOE_OK;
    ok &= moe__expert_alloc(&b->grad, H, I) == MOE_OK;
    ok &= moe__row_alloc(&b->r, H, I) == MOE_OK;
    b->dyrow = moe__alloc((size_t)H, sizeof(float));
    b->orow = moe__alloc((size_t)H, sizeof(float));
    b->d_out = moe__alloc((size_t)H, sizeof(float));
    b->dx32 = moe__alloc((size_t)(p->T * H), sizeof(float));
    b->dw = moe__alloc((size_t)(p->T * p->route.K), sizeof(float));
    if (ok && b->dyrow && b->orow && b->d_out && b->dx32 && b->dw) {
        memset(b->dx32, 0, (size_t)(p->T * H) * sizeof(float));
        return MOE_OK;
    }
    bwd_free(b);
    return MOE_ENOMEM;
}

/* Resize the expert scratch to m's I (the shared expert may be wider than a routed one). */
static void bwd_shape(struct bwd *b, const struct moe_mlp *m)
{
    b->ex.I = b->grad.I = m->I;
}

/* Recompute token t's input and dy rows into b->r.xin and b->dyrow, then expert row forward. */
static void row_recompute(struct bwd *b, const struct moe_problem *p, int64_t t)
{
    moe__load_row(p->dtype, row_of(p->x, p->dtype, t, p->x_rs), p->H, b->r.xin);
    moe__load_row(p->dtype, row_of(p->dy, p->dtype, t, p->H), p->H, b->dyrow);
    moe__expert_row_forward(&b->ex, &b->r, b->orow);
}

static void add_row(float *dst, const float *src, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] += src[i];
}

/* Routed experts: dw, dx contributions, and every expert's weight grads (zeros when unused). */
static void experts_backward(struct bwd *b, const struct moe_problem *p, const struct groups *g)
{
    int64_t H = p->H;
    int K = p->route.K;
    bwd_shape(b, &p->experts);
    for (int e = 0; e < p->experts.n; e++) {
        moe__expert_zero(&b->grad);
        if (g->offsets[e + 1] > g->offsets[e])
            moe__expert_unpack(&b->ex, &p->experts, p->dtype, e);
        for (int64_t row = g->offsets[e]; row < g->offsets[e + 1]; row++) {
            int64_t s = g->perm[row], t = s / K;
            row_recompute(b, p, t);
            /* y_t = Σ_k w_k out_k:  dw_k = <dy_t, out_k>,  d_out_k = w_k dy_t */
            b->dw[s] = moe__dot(b->dyrow, b->orow, H);
            for (int64_t h = 0; h < H; h++)
                b->d_out[h] = p->w[s] * b->dyrow[h];
            moe__expert_row_backward(&b->ex, &b->grad, &b->r, b->d_out);
            add_row(b->dx32 + t * H, b->r.dxin, H);
        }
        moe__expert_store(&b->grad, &p->d_experts, p->dtype, e);
    }
}

/* Shared expert (and its sigmoid gate): dx contributions, weight grads, shared-gate grad. */
static int shared_backward(struct bwd *b, const struct moe_problem *p)
{
    int64_t H = p->H;
    float *sg32 = NULL, *dsg32 = NULL;
    if (p->shared_gate) {
        sg32 = moe__alloc((size_t)H, sizeof(float));
        dsg32 = moe__alloc((size_t)H, sizeof(float));
        if (!sg32 || !dsg32) {
            free(sg32);
            free(dsg32);
            return MOE_ENOMEM;
        }
        moe__load_row(p->dtype, p->shared_gate, H, sg32);
        memset(dsg32, 0, (size_t)H * sizeof(float));
    }
    bwd_shape(b, &p->shared);
    moe__expert_zero(&b->grad);
    moe__expert_unpack(&b->ex, &p->shared, p->dtype, 0);
    for (int64_t t = 0; t < p->T; t++) {
        row_recompute(b, p, t);
        float gate = shared_gate_value(sg32, b->r.xin, H);
        for (int64_t h = 0; h < H; h++)
            b->d_out[h] = gate * b->dyrow[h];
        moe__expert_row_backward(&b->ex, &b->grad, &b->r, b->d_out);
        add_row(b->dx32 + t * H, b->r.dxin, H);
        if (sg32) {
            /* y += σ(z) · out, z = sg · x:  dz = <dy, out> σ(1 − σ) */
            float dz = moe__dot(b->dyrow, b->orow, H) * gate * (1.0f - gate);
            for (int64_t h = 0; h < H; h++) {
                dsg32[h] += dz * b->r.xin[h];
                b->dx32[t * H + h] += dz * sg32[h];
            }
        }
    }
    moe__expert_store(&b->grad, &p->d_shared, p->dtype, 0);
    if (sg32)
        moe__store_row(p->dtype, p->d_shared_gate, H, dsg32);
    free(sg32);
    free(dsg32);
    return MOE_OK;
}

int moe_backward_cpu(struct moe_problem *p)
{
    if (!problem_valid(p, 1))
        return MOE_EINVAL;
    int64_t I = p->experts.I;
    if (p->shared.n == 1 && p->shared.I > I)
        I = p->shared.I;
    struct groups g;
    struct bwd b;
    int rc = groups_build(&g, p);
    if (rc != MOE_OK)
        return rc;
    if ((rc = bwd_alloc(&b, p, I)) != MOE_OK) {
        groups_free(&g);
        return rc;
    }
    experts_backward(&b, p, &g);
    if (p->shared.n == 1)
        rc = shared_backward(&b, p);
    if (rc == MOE_OK && p->T > 0) {
        moe__store_row(p->dtype, p->dx, p->T * p->H, b.dx32);
        rc = moe_route_backward_cpu(&p->route, p->T, p->logits, p->idx, b.dw, p->dlogits);
    }
    bwd_free(&b);
    groups_free(&g);
    return rc;
}
