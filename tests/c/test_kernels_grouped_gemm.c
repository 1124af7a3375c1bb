/*
 * tests/c/test_kernels_grouped_gemm.c — the grouped GEMM reference (moe_grouped_gemm_cpu) against
 * a direct float64 computation on dense logical matrices, in every form the fused path uses:
 * varlen-M with gathered rows and K-major weights split along N (forward gate | up), varlen-M with
 * MN-major weights split along K (input grads), varlen-K with a gathered operand and an output
 * split along M (weight grads); an expert without rows (zeros for varlen-K); every dtype.
 */
#include "kernels_ref.h"

enum { E = 4, N = 6, D = 5, SPLIT = 2, SRC = 7, TOPK = 2, RPAD = 3 };

/* Rows per expert: expert 2 gets none. */
static const int64_t offsets[E + 1] = {0, 3, 5, 5, 9};
static const int32_t gather[9] = {13, 0, 6, 7, 2, 11, 5, 1, 12}; /* slots; row = slot / TOPK */

/* Activations: SRC * TOPK rows of w doubles, stored with row stride w + RPAD. */
static void *activations(moe_dtype dt, uint64_t *seed, int64_t w, double **vals)
{
    *vals = ref_doubles((size_t)(SRC * TOPK * w));
    ref_fill(seed, *vals, SRC * TOPK * w, -1.0, 1.0, dt);
    void *b = ref_alloc((size_t)(SRC * TOPK * (w + RPAD)) * moe_dtype_size(dt));
    for (int64_t r = 0; r < SRC * TOPK; r++)
        for (int64_t c = 0; c < w; c++)
            ref_put(dt, b, r * (w + RPAD) + c, (*vals)[r * w + c]);
    return b;
}

/* Weights: logical [E][X][K] doubles in two parts split at `split` along x (mn = 0: each part
   K-major, [X', K] row-major) or along k (mn = 1: each part MN-major, [K', X] row-major), one
   allocation per expert and part (pointer arrays). */
struct wparts {
    double *v;
    void *p[2][E];
};

static void weights(struct wparts *w, moe_dtype dt, uint64_t *seed, int64_t X, int64_t K, int mn,
                    int64_t split, struct moe_gemm_op *op)
{
    w->v = ref_doubles((size_t)(E * X * K));
    ref_fill(seed, w->v, E * X * K, -1.0, 1.0, dt);
    const int64_t len = mn ? K : X;
    for (int e = 0; e < E; e++)
        for (int part = 0; part < 2; part++) {
            const int64_t n = part ? len - split : split;
            w->p[part][e] = ref_alloc((size_t)((mn ? n * X : n * K) + 1) * moe_dtype_size(dt));
        }
    for (int e = 0; e < E; e++)
        for (int64_t x = 0; x < X; x++)
            for (int64_t k = 0; k < K; k++) {
                const int64_t at = mn ? k : x, part = at >= split, loc = at - (part ? split : 0);
                const int64_t i = mn ? loc * X + x : loc * K + k;
                ref_put(dt, w->p[part][e], i, w->v[(e * X + x) * K + k]);
            }
    memset(op, 0, sizeof *op);
    for (int part = 0; part < 2; part++)
        op->m[part] = mn ? (struct moe_mats){(void *const *)w->p[part], NULL, 0, 1, X}
                         : (struct moe_mats){(void *const *)w->p[part], NULL, 0, K, 1};
    op->split = split;
    op->split_k = mn;
}

static void weights_free(struct wparts *w)
{
    for (int part = 0; part < 2; part++)
        for (int e = 0; e < E; e++)
            free(w->p[part][e]);
    free(w->v);
}

static int64_t src_of(int gathered, int64_t r)
{
    return gathered ? gather[r] / TOPK : r;
}

struct err {
    double worst, scale;
};

static void note(struct err *m, double got, double want)
{
    const double d = fabs(got - want);
    m->worst = d > m->worst ? d : m->worst;
    m->scale = fabs(want) > m->scale ? fabs(want) : m->scale;
}

/* A varlen-M problem on the fixture: fresh activations sb (s: their values in fp64), gathered or
   not, weights w (K-major split along n at split, or MN-major split along k), c [R, N], and g
   set up over them. */
struct vm_case {
    double *s;
    void *sb, *c;
    struct wparts w;
    struct moe_gemm g;
};

static void vm_new(struct vm_case *v, moe_dtype dt, uint64_t seed, int gathered, int mn,
                   int64_t split)
{
    memset(v, 0, sizeof *v);
    v->sb = activations(dt, &seed, D, &v->s);
    weights(&v->w, dt, &seed, N, D, mn, split, &v->g.b);
    v->c = ref_alloc((size_t)(offsets[E] * N) * moe_dtype_size(dt));
    struct moe_gemm *g = &v->g;
    g->dtype = dt;
    g->E = E;
    g->N = N;
    g->D = D;
    g->rows_max = offsets[E];
    g->offsets = offsets;
    g->a =
        (struct moe_gemm_op){1, v->sb, D + RPAD, gathered ? gather : NULL, TOPK, {{0}, {0}}, 0, 0};
    g->c = v->c;
    g->c_rs = N;
}

static void vm_free(struct vm_case *v)
{
    weights_free(&v->w);
    free(v->s);
    free(v->sb);
    free(v->c);
}

/* varlen-M: c[r, n] = Σ_k S[src(r), k] W_e[n, k]. */
static void check_varlen_m(moe_dtype dt, int gathered, int mn)
{
    struct vm_case v;
    vm_new(&v, dt, 0x51ed2701u + (uint64_t)dt * 3 + (uint64_t)gathered * 5 + (uint64_t)mn * 7,
           gathered, mn, mn ? 3 : SPLIT);
    const double *s = v.s, *wv = v.w.v;
    cr_assert_eq(moe_grouped_gemm_cpu(&v.g), MOE_OK);
    struct err m = {0, 0};
    for (int e = 0; e < E; e++)
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++)
            for (int64_t n = 0; n < N; n++) {
                double want = 0.0;
                for (int64_t k = 0; k < D; k++)
                    want += s[src_of(gathered, r) * D + k] * wv[(e * N + n) * D + k];
                note(&m, ref_get(dt, v.c, r * N + n), want);
            }
    cr_expect(m.worst / m.scale <= moe_tol(dt), "%s gathered=%d mn=%d: rel err %g",
              ref_dtype_name(dt), gathered, mn, m.worst / m.scale);
    vm_free(&v);
}

/* varlen-K: C_e[m, n] = Σ_r S1[src(r), m] S2[r, n] (gathered: the first operand, else the second),
   the output split along m into two pointer arrays. */
static void check_varlen_k(moe_dtype dt, int gather_first)
{
    uint64_t seed = 0x7a11u + (uint64_t)dt * 3 + (uint64_t)gather_first;
    enum { M = 5, CSPLIT = 2 };
    double *s1, *s2;
    void *b1 = activations(dt, &seed, M, &s1), *b2 = activations(dt, &seed, N, &s2);
    void *cp[2][E];
    for (int e = 0; e < E; e++) {
        cp[0][e] = ref_alloc((size_t)(CSPLIT * N) * moe_dtype_size(dt));
        cp[1][e] = ref_alloc((size_t)((M - CSPLIT) * N) * moe_dtype_size(dt));
    }
    struct moe_gemm g;
    memset(&g, 0, sizeof g);
    g.dtype = dt;
    g.E = E;
    g.varlen_k = 1;
    g.M = M;
    g.N = N;
    g.rows_max = offsets[E];
    g.offsets = offsets;
    g.a =
        (struct moe_gemm_op){1, b1, M + RPAD, gather_first ? gather : NULL, TOPK, {{0}, {0}}, 0, 0};
    g.b =
        (struct moe_gemm_op){1, b2, N + RPAD, gather_first ? NULL : gather, TOPK, {{0}, {0}}, 0, 0};
    g.cm[0] = (struct moe_mats){(void *const *)cp[0], NULL, 0, N, 1};
    g.cm[1] = (struct moe_mats){(void *const *)cp[1], NULL, 0, N, 1};
    g.c_split = CSPLIT;
    cr_assert_eq(moe_grouped_gemm_cpu(&g), MOE_OK);
    struct err m = {0, 0};
    for (int e = 0; e < E; e++)
        for (int64_t i = 0; i < M; i++)
            for (int64_t n = 0; n < N; n++) {
                double want = 0.0;
                for (int64_t r = offsets[e]; r < offsets[e + 1]; r++)
                    want +=
                        s1[src_of(gather_first, r) * M + i] * s2[src_of(!gather_first, r) * N + n];
                const int part = i >= CSPLIT;
                const double got = ref_get(dt, cp[part][e], (i - (part ? CSPLIT : 0)) * N + n);
                note(&m, got, want);
                if (offsets[e] == offsets[e + 1])
                    cr_expect(got == 0.0, "expert %d without rows: C[%ld, %ld] = %g", e, (long)i,
                              (long)n, got);
            }
    cr_expect(m.worst / m.scale <= moe_tol(dt), "%s varlen-K gather_first=%d: rel err %g",
              ref_dtype_name(dt), gather_first, m.worst / m.scale);
    for (int e = 0; e < E; e++) {
        free(cp[0][e]);
        free(cp[1][e]);
    }
    free(s1);
    free(s2);
    free(b1);
    free(b2);
}

Test(kernels_grouped_gemm, gathered_rows_and_kmajor_weights_split_along_n_match_fp64)
{
    for (int dt = MOE_F32; dt <= MOE_F16; dt++)
        check_varlen_m((moe_dtype)dt, 1, 0);
}

Test(kernels_grouped_gemm, packed_rows_and_mnmajor_weights_split_along_k_match_fp64)
{
    for (int dt = MOE_F32; dt <= MOE_F16; dt++)
        check_varlen_m((moe_dtype)dt, 0, 1);
}

Test(kernels_grouped_gemm, varlen_k_weight_grads_match_fp64_and_zero_empty_experts)
{
    for (int dt = MOE_F32; dt <= MOE_F16; dt++) {
        check_varlen_k((moe_dtype)dt, 1);
        check_varlen_k((moe_dtype)dt, 0);
    }
}

/* SwiGLU fused (moe_gemm.act): act[r, i] = silu(c[r, i]) c[r, I + i] of the stored
   halves (I = N / 2, the weight split), act at its own row stride. */
static void check_swiglu(moe_dtype dt)
{
    enum { I = N / 2, ARS = I + 2 };
    const int64_t R = offsets[E];
    struct vm_case v;
    vm_new(&v, dt, 0x5e1u + (uint64_t)dt, 1, 0, I);
    struct moe_gemm *g = &v.g;
    const void *c = v.c;
    void *act = ref_alloc((size_t)(R * ARS) * moe_dtype_size(dt));
    g->act = act;
    g->act_rs = ARS;
    cr_assert_eq(moe_grouped_gemm_cpu(g), MOE_OK);
    struct err m = {0, 0};
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < I; i++) {
            const double gv = ref_get(dt, c, r * N + i), uv = ref_get(dt, c, r * N + I + i);
            note(&m, ref_get(dt, act, r * ARS + i), gv / (1.0 + exp(-gv)) * uv);
        }
    cr_expect(m.worst / m.scale <= moe_tol(dt), "%s: act rel err %g", ref_dtype_name(dt),
              m.worst / m.scale);
    g->b.split = 2; /* the halves must be the two parts */
    cr_expect_eq(moe_grouped_gemm_cpu(g), MOE_EINVAL, "act with parts not N / 2");
    vm_free(&v);
    free(act);
}

Test(kernels_grouped_gemm, fused_swiglu_is_silu_of_the_stored_halves)
{
    for (int dt = MOE_F32; dt <= MOE_F16; dt++)
        check_swiglu((moe_dtype)dt);
}

Test(kernels_grouped_gemm, bad_arguments_are_refused)
{
    struct moe_gemm g;
    memset(&g, 0, sizeof g);
    g.E = E;
    g.N = N;
    g.D = D;
    g.offsets = offsets;
    cr_expect_eq(moe_grouped_gemm_cpu(&g), MOE_EINVAL, "no operands");
    cr_expect_eq(moe_grouped_gemm_cpu(NULL), MOE_EINVAL);
}
