/*
 * tests/c/kernels_ref.h — what the kernel tests share: a seeded RNG, poisoning, dtype buffers, the
 * three expert weight layouts, and an independent float64 re-implementation of the MoE block
 * (routing included) with central finite differences over any of its inputs.
 * Design choice: the reference holds every input as float64 values that are exactly representable
 * in the block's dtype (quantised once at set-up), so the C backend and the reference see identical
 * inputs and any difference is the backend's own arithmetic. The reference's top-k is a rank count,
 * a different algorithm from the backend's repeated arg-max.
 */
#ifndef MOE_TEST_KERNELS_REF_H
#define MOE_TEST_KERNELS_REF_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <criterion/criterion.h>

#include "../../kernels/moe.h"
#include "../../kernels/cpu/dtype.h"
#include "tolerance.h"

/* ---- random numbers, poison, allocation ---- */

static inline uint64_t ref_rand(uint64_t *s)
{
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static inline double ref_uniform(uint64_t *s, double lo, double hi)
{
    return lo + (hi - lo) * (double)(ref_rand(s) >> 11) * 0x1p-53;
}

/* All bits set: NaN in fp32, bf16 and fp16, -1 in integers, so an unwritten output shows. */
static inline void ref_poison(void *p, size_t bytes)
{
    memset(p, 0xff, bytes);
}

static inline void *ref_alloc(size_t bytes)
{
    void *p = malloc(bytes ? bytes : 1);
    cr_assert(p != NULL);
    ref_poison(p, bytes);
    return p;
}

static inline double *ref_doubles(size_t n)
{
    return (double *)ref_alloc(n * sizeof(double));
}

/* v rounded to what dtype dt can hold. */
static inline double ref_q(moe_dtype dt, double v)
{
    uint32_t buf;
    moe__store(dt, &buf, 0, (float)v);
    return moe__load(dt, &buf, 0);
}

static inline double ref_get(moe_dtype dt, const void *p, int64_t i)
{
    return moe__load(dt, p, i);
}

static inline void ref_put(moe_dtype dt, void *p, int64_t i, double v)
{
    moe__store(dt, p, i, (float)v);
}

static inline double ref_silu(double g)
{
    return g / (1.0 + exp(-g));
}

static inline double ref_sigmoid(double v)
{
    return 1.0 / (1.0 + exp(-v));
}

static inline const char *ref_dtype_name(moe_dtype dt)
{
    return dt == MOE_BF16 ? "bf16" : dt == MOE_F16 ? "fp16" : "fp32";
}

/* ---- expert weight layouts ---- */

enum ref_layout {
    REF_3D,  /* transformers 5: gate_up [E, 2I, H] (gate rows first), down [E, H, I] */
    REF_PTR, /* ModuleList of Linear: one [I, H] / [H, I] buffer per expert and projection */
    REF_T,   /* Llama-4, transposed: gate_up [E, H, 2I], down [E, I, H] */
};

static inline const char *ref_layout_name(enum ref_layout L)
{
    return L == REF_3D ? "3d" : L == REF_PTR ? "ptr" : "transposed";
}

enum ref_proj { REF_GATE, REF_UP, REF_DOWN };

/* One struct moe_mlp and the storage it describes. */
struct ref_mlp {
    struct moe_mlp m;
    enum ref_layout L;
    moe_dtype dt;
    void *gu, *dn;         /* REF_3D and REF_T */
    void **pg, **pu, **pd; /* REF_PTR */
};

static inline void ref_mlp_make(struct ref_mlp *b, enum ref_layout L, moe_dtype dt, int n,
                                int64_t H, int64_t I)
{
    size_t esz = moe_dtype_size(dt);
    memset(b, 0, sizeof *b);
    b->L = L;
    b->dt = dt;
    b->m.n = n;
    b->m.H = H;
    b->m.I = I;
    if (L == REF_PTR) {
        b->pg = (void **)ref_alloc((size_t)n * sizeof(void *));
        b->pu = (void **)ref_alloc((size_t)n * sizeof(void *));
        b->pd = (void **)ref_alloc((size_t)n * sizeof(void *));
        for (int e = 0; e < n; e++) {
            b->pg[e] = ref_alloc((size_t)(I * H) * esz);
            b->pu[e] = ref_alloc((size_t)(I * H) * esz);
            b->pd[e] = ref_alloc((size_t)(H * I) * esz);
        }
        b->m.gate = (struct moe_mats){b->pg, NULL, 0, H, 1};
        b->m.up = (struct moe_mats){b->pu, NULL, 0, H, 1};
        b->m.down = (struct moe_mats){b->pd, NULL, 0, I, 1};
        return;
    }
    b->gu = ref_alloc((size_t)(n * 2 * I * H) * esz);
    b->dn = ref_alloc((size_t)(n * H * I) * esz);
    if (L == REF_3D) {
        b->m.gate = (struct moe_mats){NULL, b->gu, 2 * I * H, H, 1};
        b->m.up = (struct moe_mats){NULL, (char *)b->gu + I * H * esz, 2 * I * H, H, 1};
        b->m.down = (struct moe_mats){NULL, b->dn, H * I, I, 1};
    } else {
        b->m.gate = (struct moe_mats){NULL, b->gu, 2 * I * H, 1, 2 * I};
        b->m.up = (struct moe_mats){NULL, (char *)b->gu + I * esz, 2 * I * H, 1, 2 * I};
        b->m.down = (struct moe_mats){NULL, b->dn, I * H, 1, H};
    }
}

static inline void ref_mlp_free(struct ref_mlp *b)
{
    if (b->L == REF_PTR) {
        for (int e = 0; e < b->m.n; e++) {
            free(b->pg[e]);
            free(b->pu[e]);
            free(b->pd[e]);
        }
        free(b->pg);
        free(b->pu);
        free(b->pd);
    }
    free(b->gu);
    free(b->dn);
}

/* Buffer and element index of (r, c) of projection j of expert e, written out per layout (not
   through struct moe_mats, which is what the backend interprets). gate/up: r < I, c < H;
   down: r < H, c < I. */
static inline void *ref_mlp_elem(const struct ref_mlp *b, enum ref_proj j, int e, int64_t r,
                                 int64_t c, int64_t *at)
{
    int64_t H = b->m.H, I = b->m.I;
    if (b->L == REF_PTR) {
        *at = j == REF_DOWN ? r * I + c : r * H + c;
        return j == REF_GATE ? b->pg[e] : j == REF_UP ? b->pu[e] : b->pd[e];
    }
    if (b->L == REF_3D) {
        if (j == REF_DOWN) {
            *at = (e * H + r) * I + c;
            return b->dn;
        }
        *at = (e * 2 * I + (j == REF_UP ? I : 0) + r) * H + c;
        return b->gu;
    }
    if (j == REF_DOWN) {
        *at = (e * I + c) * H + r;
        return b->dn;
    }
    *at = (e * H + c) * 2 * I + (j == REF_UP ? I : 0) + r;
    return b->gu;
}

static inline int64_t ref_proj_size(const struct moe_mlp *m)
{
    return m->I * m->H;
}

/* w: the dense float64 values [n][rows][cols] of projection j (rows/cols as in ref_mlp_elem). */
static inline void ref_mlp_write(struct ref_mlp *b, enum ref_proj j, const double *w)
{
    int64_t R = j == REF_DOWN ? b->m.H : b->m.I, C = j == REF_DOWN ? b->m.I : b->m.H, at;
    for (int e = 0; e < b->m.n; e++)
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < C; c++) {
                void *buf = ref_mlp_elem(b, j, e, r, c, &at);
                ref_put(b->dt, buf, at, w[(e * R + r) * C + c]);
            }
}

static inline void ref_mlp_read(const struct ref_mlp *b, enum ref_proj j, double *w)
{
    int64_t R = j == REF_DOWN ? b->m.H : b->m.I, C = j == REF_DOWN ? b->m.I : b->m.H, at;
    for (int e = 0; e < b->m.n; e++)
        for (int64_t r = 0; r < R; r++)
            for (int64_t c = 0; c < C; c++) {
                const void *buf = ref_mlp_elem(b, j, e, r, c, &at);
                w[(e * R + r) * C + c] = ref_get(b->dt, buf, at);
            }
}

/* ---- float64 reference math ---- */

/* out [H] = down_e(silu(gate_e x) * up_e x) with dense [n][I][H], [n][I][H], [n][H][I] weights;
   g, u [I] receive the pre-activations when non-NULL. */
static inline void ref_mlp_row(const double *wg, const double *wu, const double *wd, int e,
                               int64_t H, int64_t I, const double *x, double *out, double *g,
                               double *u)
{
    double *a = (double *)ref_alloc((size_t)I * sizeof(double));
    for (int64_t i = 0; i < I; i++) {
        double gi = 0.0, ui = 0.0;
        for (int64_t h = 0; h < H; h++) {
            gi += wg[(e * I + i) * H + h] * x[h];
            ui += wu[(e * I + i) * H + h] * x[h];
        }
        a[i] = ref_silu(gi) * ui;
        if (g)
            g[i] = gi;
        if (u)
            u[i] = ui;
    }
    for (int64_t h = 0; h < H; h++) {
        double o = 0.0;
        for (int64_t i = 0; i < I; i++)
            o += wd[(e * H + h) * I + i] * a[i];
        out[h] = o;
    }
    free(a);
}

/* Indices of the k largest of v[0..n) by rank counting (rank = how many beat me, lower index
   winning ties), best first. */
static inline void ref_topk(const double *v, int n, int k, int32_t *out)
{
    for (int i = 0; i < n; i++) {
        int rank = 0;
        for (int j = 0; j < n; j++)
            rank += v[j] > v[i] || (v[j] == v[i] && j < i);
        if (rank < k)
            out[rank] = i;
    }
}

/* The K weights of one token for the chosen idx, from its logits (the differentiable half). */
static inline void ref_route_weights(const struct moe_route_cfg *c, const double *l,
                                     const int32_t *idx, double *w)
{
    double sum = 0.0, m = l[0], z = 0.0;
    for (int e = 1; e < c->E; e++)
        m = l[e] > m ? l[e] : m;
    for (int e = 0; e < c->E; e++)
        z += exp(l[e] - m);
    for (int k = 0; k < c->K; k++) {
        double le = l[idx[k]];
        w[k] = c->recipe == MOE_ROUTE_SOFTMAX_TOPK ? exp(le - m) / z : ref_sigmoid(le);
        sum += w[k];
    }
    for (int k = 0; k < c->K; k++)
        w[k] = (c->norm ? w[k] / (sum + c->norm_eps) : w[k]) * c->scale;
}

/* The choice of one token (idx [K]) from its logits and bias (may be NULL). */
static inline void ref_route_select(const struct moe_route_cfg *c, const double *l,
                                    const double *bias, int32_t *idx)
{
    int E = c->E, G = c->n_group, gs = E / G;
    double *sel = ref_doubles((size_t)E), *gscore = ref_doubles((size_t)G);
    int32_t *keep = (int32_t *)ref_alloc((size_t)G * sizeof(int32_t));
    double m = l[0], z = 0.0;
    for (int e = 1; e < E; e++)
        m = l[e] > m ? l[e] : m;
    for (int e = 0; e < E; e++)
        z += exp(l[e] - m);
    for (int e = 0; e < E; e++)
        sel[e] = (c->recipe == MOE_ROUTE_SOFTMAX_TOPK ? exp(l[e] - m) / z : ref_sigmoid(l[e])) +
                 (bias ? bias[e] : 0.0);
    if (c->recipe == MOE_ROUTE_SIGMOID_GROUP && G > 1) {
        int32_t top2[2];
        for (int g = 0; g < G; g++) {
            if (gs == 1) {
                gscore[g] = sel[g];
                continue;
            }
            ref_topk(sel + g * gs, gs, 2, top2);
            gscore[g] = sel[g * gs + top2[0]] + sel[g * gs + top2[1]];
        }
        ref_topk(gscore, G, c->topk_group, keep);
        for (int e = 0; e < E; e++) {
            int kept = 0;
            for (int j = 0; j < c->topk_group; j++)
                kept |= keep[j] == e / gs;
            if (!kept)
                sel[e] = c->mask_value;
        }
    }
    ref_topk(sel, E, c->K, idx);
    free(sel);
    free(gscore);
    free(keep);
}

/* ---- the whole block in float64 ---- */

struct ref_block {
    struct moe_route_cfg cfg;
    moe_dtype dt;
    enum ref_layout L;
    int64_t T, H, I, Is; /* Is: shared expert intermediate, 0 = no shared expert */
    int gated;           /* shared expert behind a sigmoid gate */
    /* float64 values (dtype-exact) */
    double *x, *logits, *bias, *wg, *wu, *wd, *swg, *swu, *swd, *sg, *dy;
    /* what the backend reads and writes */
    int64_t x_rs;
    void *xb, *dyb, *yb, *dxb, *sgb, *dsgb;
    float *logitsf, *biasf, *w, *dlogits;
    int32_t *idx;
    struct ref_mlp ex, sh, dex, dsh;
    struct moe_problem p;
};

static inline void ref_fill(uint64_t *seed, double *v, int64_t n, double lo, double hi,
                            moe_dtype dt)
{
    for (int64_t i = 0; i < n; i++)
        v[i] = ref_q(dt, ref_uniform(seed, lo, hi));
}

/* A random block. x has a padded row stride, to exercise x_rs. */
static inline void ref_block_init(struct ref_block *b, const struct moe_route_cfg *cfg,
                                  moe_dtype dt, enum ref_layout L, int64_t T, int64_t H, int64_t I,
                                  int64_t Is, int gated, int with_bias, uint64_t seed)
{
    int E = cfg->E, K = cfg->K;
    size_t esz = moe_dtype_size(dt);
    memset(b, 0, sizeof *b);
    b->cfg = *cfg;
    b->dt = dt;
    b->L = L;
    b->T = T;
    b->H = H;
    b->I = I;
    b->Is = Is;
    b->gated = gated && Is > 0;
    b->x_rs = H + 3;
    double ws = 1.0 / sqrt((double)H), wds = 1.0 / sqrt((double)I);
    b->x = ref_doubles((size_t)(T * H));
    b->dy = ref_doubles((size_t)(T * H));
    b->logits = ref_doubles((size_t)(T * E));
    b->bias = ref_doubles((size_t)E);
    b->wg = ref_doubles((size_t)(E * I * H));
    b->wu = ref_doubles((size_t)(E * I * H));
    b->wd = ref_doubles((size_t)(E * H * I));
    ref_fill(&seed, b->x, T * H, -1.0, 1.0, dt);
    ref_fill(&seed, b->dy, T * H, -1.0, 1.0, dt);
    ref_fill(&seed, b->logits, T * E, -2.0, 2.0, MOE_F32);
    ref_fill(&seed, b->bias, E, -0.3, 0.3, MOE_F32);
    ref_fill(&seed, b->wg, E * I * H, -2.0 * ws, 2.0 * ws, dt);
    ref_fill(&seed, b->wu, E * I * H, -2.0 * ws, 2.0 * ws, dt);
    ref_fill(&seed, b->wd, E * H * I, -wds, wds, dt);
    b->xb = ref_alloc((size_t)(T * b->x_rs) * esz);
    b->dyb = ref_alloc((size_t)(T * H) * esz);
    b->yb = ref_alloc((size_t)(T * H) * esz);
    b->dxb = ref_alloc((size_t)(T * H) * esz);
    b->logitsf = (float *)ref_alloc((size_t)(T * E) * sizeof(float));
    b->biasf = (float *)ref_alloc((size_t)E * sizeof(float));
    b->w = (float *)ref_alloc((size_t)(T * K) * sizeof(float));
    b->dlogits = (float *)ref_alloc((size_t)(T * E) * sizeof(float));
    b->idx = (int32_t *)ref_alloc((size_t)(T * K) * sizeof(int32_t));
    for (int64_t t = 0; t < T; t++)
        for (int64_t h = 0; h < H; h++) {
            ref_put(dt, b->xb, t * b->x_rs + h, b->x[t * H + h]);
            ref_put(dt, b->dyb, t * H + h, b->dy[t * H + h]);
        }
    for (int64_t i = 0; i < T * E; i++)
        b->logitsf[i] = (float)b->logits[i];
    for (int e = 0; e < E; e++)
        b->biasf[e] = (float)b->bias[e];
    if (!with_bias)
        memset(b->bias, 0, (size_t)E * sizeof(double));
    ref_mlp_make(&b->ex, L, dt, E, H, I);
    ref_mlp_make(&b->dex, L, dt, E, H, I);
    ref_mlp_write(&b->ex, REF_GATE, b->wg);
    ref_mlp_write(&b->ex, REF_UP, b->wu);
    ref_mlp_write(&b->ex, REF_DOWN, b->wd);

    struct moe_problem *p = &b->p;
    p->route = *cfg;
    p->dtype = dt;
    p->T = T;
    p->H = H;
    p->x = b->xb;
    p->x_rs = b->x_rs;
    p->logits = b->logitsf;
    p->bias = with_bias ? b->biasf : NULL;
    p->experts = b->ex.m;
    p->y = b->yb;
    p->idx = b->idx;
    p->w = b->w;
    p->dy = b->dyb;
    p->dx = b->dxb;
    p->dlogits = b->dlogits;
    p->d_experts = b->dex.m;
    if (Is > 0) {
        double ss = 1.0 / sqrt((double)Is);
        b->swg = ref_doubles((size_t)(Is * H));
        b->swu = ref_doubles((size_t)(Is * H));
        b->swd = ref_doubles((size_t)(H * Is));
        ref_fill(&seed, b->swg, Is * H, -2.0 * ws, 2.0 * ws, dt);
        ref_fill(&seed, b->swu, Is * H, -2.0 * ws, 2.0 * ws, dt);
        ref_fill(&seed, b->swd, H * Is, -ss, ss, dt);
        ref_mlp_make(&b->sh, L, dt, 1, H, Is);
        ref_mlp_make(&b->dsh, L, dt, 1, H, Is);
        ref_mlp_write(&b->sh, REF_GATE, b->swg);
        ref_mlp_write(&b->sh, REF_UP, b->swu);
        ref_mlp_write(&b->sh, REF_DOWN, b->swd);
        p->shared = b->sh.m;
        p->d_shared = b->dsh.m;
    }
    if (b->gated) {
        b->sg = ref_doubles((size_t)H);
        ref_fill(&seed, b->sg, H, -2.0 * ws, 2.0 * ws, dt);
        b->sgb = ref_alloc((size_t)H * esz);
        b->dsgb = ref_alloc((size_t)H * esz);
        for (int64_t h = 0; h < H; h++)
            ref_put(dt, b->sgb, h, b->sg[h]);
        p->shared_gate = b->sgb;
        p->d_shared_gate = b->dsgb;
    }
}

static inline void ref_block_free(struct ref_block *b)
{
    double *d[] = {b->x,   b->logits, b->bias, b->wg, b->wu, b->wd,
                   b->swg, b->swu,    b->swd,  b->sg, b->dy};
    for (size_t i = 0; i < sizeof d / sizeof d[0]; i++)
        free(d[i]);
    void *v[] = {b->xb,      b->dyb,   b->yb, b->dxb,     b->sgb, b->dsgb,
                 b->logitsf, b->biasf, b->w,  b->dlogits, b->idx};
    for (size_t i = 0; i < sizeof v / sizeof v[0]; i++)
        free(v[i]);
    ref_mlp_free(&b->ex);
    ref_mlp_free(&b->dex);
    if (b->Is > 0) {
        ref_mlp_free(&b->sh);
        ref_mlp_free(&b->dsh);
    }
}

/* y [T, H] of the block in float64 for the given choice idx [T, K] (the routing weights still
   follow the logits); w [T, K] receives the routing weights when non-NULL. */
static inline void ref_block_forward(const struct ref_block *b, const int32_t *idx, double *y,
                                     double *w)
{
    int K = b->cfg.K;
    int64_t H = b->H;
    double *o = ref_doubles((size_t)H), *wk = ref_doubles((size_t)K);
    for (int64_t t = 0; t < b->T; t++) {
        const double *xt = b->x + t * H;
        double *yt = y + t * H;
        ref_route_weights(&b->cfg, b->logits + t * b->cfg.E, idx + t * K, wk);
        for (int64_t h = 0; h < H; h++)
            yt[h] = 0.0;
        for (int k = 0; k < K; k++) {
            ref_mlp_row(b->wg, b->wu, b->wd, idx[t * K + k], H, b->I, xt, o, NULL, NULL);
            for (int64_t h = 0; h < H; h++)
                yt[h] += wk[k] * o[h];
            if (w)
                w[t * K + k] = wk[k];
        }
        if (b->Is > 0) {
            double gate = 1.0;
            if (b->gated) {
                double z = 0.0;
                for (int64_t h = 0; h < H; h++)
                    z += b->sg[h] * xt[h];
                gate = ref_sigmoid(z);
            }
            ref_mlp_row(b->swg, b->swu, b->swd, 0, H, b->Is, xt, o, NULL, NULL);
            for (int64_t h = 0; h < H; h++)
                yt[h] += gate * o[h];
        }
    }
    free(o);
    free(wk);
}

/* The reference's own choice of experts for every token. */
static inline void ref_block_select(const struct ref_block *b, int32_t *idx)
{
    for (int64_t t = 0; t < b->T; t++)
        ref_route_select(&b->cfg, b->logits + t * b->cfg.E, b->bias, idx + t * b->cfg.K);
}

/* L = Σ dy · y for the fixed choice idx. */
static inline double ref_block_loss(const struct ref_block *b, const int32_t *idx)
{
    double *y = ref_doubles((size_t)(b->T * b->H)), L = 0.0;
    ref_block_forward(b, idx, y, NULL);
    for (int64_t i = 0; i < b->T * b->H; i++)
        L += b->dy[i] * y[i];
    free(y);
    return L;
}

#define REF_FD_STEP 1e-5

/* grad [n] = dL/dparam by central differences, param being one of b's float64 input arrays. */
static inline void ref_block_fd(struct ref_block *b, const int32_t *idx, double *param, int64_t n,
                                double *grad)
{
    for (int64_t i = 0; i < n; i++) {
        double old = param[i];
        param[i] = old + REF_FD_STEP;
        double lp = ref_block_loss(b, idx);
        param[i] = old - REF_FD_STEP;
        double lm = ref_block_loss(b, idx);
        param[i] = old;
        grad[i] = (lp - lm) / (2.0 * REF_FD_STEP);
    }
}

/* Read n dtype (or fp32, dt = MOE_F32) values into float64. */
static inline double *ref_read(moe_dtype dt, const void *p, int64_t n)
{
    double *d = ref_doubles((size_t)n);
    for (int64_t i = 0; i < n; i++)
        d[i] = ref_get(dt, p, i);
    return d;
}

#endif /* MOE_TEST_KERNELS_REF_H */
