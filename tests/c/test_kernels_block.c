/*
 * tests/c/test_kernels_block.c — the whole block on the CPU (moe_forward_cpu, moe_backward_cpu):
 * forward against the float64 reference of kernels_ref.h for both recipes, every layout and dtype,
 * with and without a (gated) shared expert; every backward output against float64 central
 * differences; zero tokens, unused experts, determinism and argument checks.
 */
#include "kernels_ref.h"

enum { T = 6, H = 8, I = 5, IS = 4 };

static struct moe_route_cfg softmax_cfg(void)
{
    return (struct moe_route_cfg){MOE_ROUTE_SOFTMAX_TOPK, 6, 2, 1, 1, 1, 0.0f, 1.0f, 0.0f};
}

static struct moe_route_cfg sigmoid_cfg(float mask)
{
    return (struct moe_route_cfg){MOE_ROUTE_SIGMOID_GROUP, 8, 3, 4, 2, 1, 1e-20f, 2.5f, mask};
}

static const moe_dtype dtypes[] = {MOE_F32, MOE_BF16, MOE_F16};
static const enum ref_layout layouts[] = {REF_3D, REF_PTR, REF_T};

/* Forward of one configuration against the reference: same choice, same weights, same y. */
static void check_forward(const struct moe_route_cfg *c, int Is, int gated, uint64_t seed)
{
    for (size_t d = 0; d < 3; d++)
        for (size_t l = 0; l < 3; l++) {
            struct ref_block b;
            moe_dtype dt = dtypes[d];
            ref_block_init(&b, c, dt, layouts[l], T, H, I, Is, gated,
                           c->recipe == MOE_ROUTE_SIGMOID_GROUP, seed + 10 * d + l);
            cr_assert_eq(moe_forward_cpu(&b.p), MOE_OK);
            int32_t want_idx[T * 8];
            double want_w[T * 8], want_y[T * H];
            ref_block_select(&b, want_idx);
            for (int s = 0; s < T * c->K; s++)
                cr_assert_eq(b.idx[s], want_idx[s], "%s %s slot %d", ref_dtype_name(dt),
                             ref_layout_name(layouts[l]), s);
            ref_block_forward(&b, want_idx, want_y, want_w);
            double *got_w = ref_read(MOE_F32, b.w, T * c->K), *got_y = ref_read(dt, b.yb, T * H);
            double ew = moe_rel_err(got_w, want_w, T * c->K),
                   ey = moe_rel_err(got_y, want_y, T * H);
            cr_expect_lt(ew, MOE_TOL_F32, "w rel err %g", ew);
            cr_expect_lt(ey, moe_tol(dt), "%s %s shared %d gated %d: y rel err %g",
                         ref_dtype_name(dt), ref_layout_name(layouts[l]), Is, gated, ey);
            free(got_w);
            free(got_y);
            ref_block_free(&b);
        }
}

Test(kernels_block, forward_softmax_matches_reference)
{
    struct moe_route_cfg c = softmax_cfg();
    check_forward(&c, 0, 0, 100);
}

Test(kernels_block, forward_softmax_with_gated_shared_expert_matches_reference)
{
    struct moe_route_cfg c = softmax_cfg();
    check_forward(&c, IS, 1, 200);
}

Test(kernels_block, forward_sigmoid_groups_with_shared_expert_matches_reference)
{
    struct moe_route_cfg c = sigmoid_cfg(-INFINITY);
    check_forward(&c, IS, 0, 300);
}

Test(kernels_block, forward_sigmoid_groups_zero_mask_matches_reference)
{
    struct moe_route_cfg c = sigmoid_cfg(0.0f);
    check_forward(&c, 0, 0, 400);
}

/* ---- backward ---- */

/* Relative error of one grad output (n dtype values at got, or fp32 when dt is MOE_F32) against the
   finite differences of param; logs it, and returns it. */
static double grad_err(struct ref_block *b, const char *what, double *got, double *param, int64_t n)
{
    double *fd = ref_doubles((size_t)n);
    ref_block_fd(b, b->idx, param, n, fd);
    double err = moe_rel_err(got, fd, (size_t)n);
    cr_log_info("%s %s shared %lld gated %d recipe %d: d%s rel err %.3g", ref_dtype_name(b->dt),
                ref_layout_name(b->L), (long long)b->Is, b->gated, b->cfg.recipe, what, err);
    free(fd);
    free(got);
    return err;
}

static double mlp_grad_err(struct ref_block *b, const char *what, const struct ref_mlp *g,
                           enum ref_proj j, double *param)
{
    int64_t n = (int64_t)g->m.n * ref_proj_size(&g->m);
    double *got = ref_doubles((size_t)n);
    ref_mlp_read(g, j, got);
    return grad_err(b, what, got, param, n);
}

/* Every grad output of one configuration against finite differences; returns the worst error. */
static double check_backward(const struct moe_route_cfg *c, moe_dtype dt, enum ref_layout L, int Is,
                             int gated, uint64_t seed)
{
    struct ref_block b;
    ref_block_init(&b, c, dt, L, T, H, I, Is, gated, c->recipe == MOE_ROUTE_SIGMOID_GROUP, seed);
    cr_assert_eq(moe_forward_cpu(&b.p), MOE_OK);
    cr_assert_eq(moe_backward_cpu(&b.p), MOE_OK);
    double e[10] = {0};
    int E = c->E;
    e[0] = grad_err(&b, "x", ref_read(dt, b.dxb, T * H), b.x, T * H);
    e[1] = grad_err(&b, "logits", ref_read(MOE_F32, b.dlogits, T * E), b.logits, T * E);
    e[2] = mlp_grad_err(&b, "W_gate", &b.dex, REF_GATE, b.wg);
    e[3] = mlp_grad_err(&b, "W_up", &b.dex, REF_UP, b.wu);
    e[4] = mlp_grad_err(&b, "W_down", &b.dex, REF_DOWN, b.wd);
    if (Is) {
        e[5] = mlp_grad_err(&b, "shared W_gate", &b.dsh, REF_GATE, b.swg);
        e[6] = mlp_grad_err(&b, "shared W_up", &b.dsh, REF_UP, b.swu);
        e[7] = mlp_grad_err(&b, "shared W_down", &b.dsh, REF_DOWN, b.swd);
    }
    if (b.gated)
        e[8] = grad_err(&b, "shared_gate", ref_read(dt, b.dsgb, H), b.sg, H);
    double worst = 0.0;
    for (int i = 0; i < 10; i++) {
        cr_expect_lt(e[i], moe_tol(dt), "%s %s grad %d: rel err %g", ref_dtype_name(dt),
                     ref_layout_name(L), i, e[i]);
        worst = e[i] > worst ? e[i] : worst;
    }
    ref_block_free(&b);
    return worst;
}

static void check_backward_all(const struct moe_route_cfg *c, int Is, int gated, uint64_t seed)
{
    double worst[3] = {0};
    for (size_t d = 0; d < 3; d++)
        for (size_t l = 0; l < 3; l++) {
            double w = check_backward(c, dtypes[d], layouts[l], Is, gated, seed + 10 * d + l);
            worst[d] = w > worst[d] ? w : worst[d];
        }
    cr_log_info("recipe %d shared %d gated %d worst rel err: fp32 %.3g bf16 %.3g fp16 %.3g",
                c->recipe, Is, gated, worst[0], worst[1], worst[2]);
}

Test(kernels_block, backward_softmax_matches_finite_differences)
{
    struct moe_route_cfg c = softmax_cfg();
    check_backward_all(&c, 0, 0, 500);
}

Test(kernels_block, backward_softmax_no_norm_with_gated_shared_matches_finite_differences)
{
    struct moe_route_cfg c = softmax_cfg();
    c.norm = 0;
    c.scale = 1.5f;
    check_backward_all(&c, IS, 1, 600);
}

Test(kernels_block, backward_sigmoid_groups_with_shared_matches_finite_differences)
{
    struct moe_route_cfg c = sigmoid_cfg(-INFINITY);
    check_backward_all(&c, IS, 0, 700);
}

Test(kernels_block, backward_sigmoid_no_norm_zero_mask_matches_finite_differences)
{
    struct moe_route_cfg c = sigmoid_cfg(0.0f);
    c.norm = 0;
    check_backward_all(&c, IS, 1, 800);
}

/* The check is tight: moving one weight grad by 1e-4 of the largest one fails it. */
Test(kernels_block, fd_check_detects_a_small_error)
{
    struct ref_block b;
    struct moe_route_cfg c = softmax_cfg();
    ref_block_init(&b, &c, MOE_F32, REF_3D, T, H, I, 0, 0, 0, 900);
    cr_assert_eq(moe_forward_cpu(&b.p), MOE_OK);
    cr_assert_eq(moe_backward_cpu(&b.p), MOE_OK);
    int64_t n = 6 * I * H;
    double *got = ref_doubles((size_t)n), *fd = ref_doubles((size_t)n);
    ref_mlp_read(&b.dex, REF_UP, got);
    ref_block_fd(&b, b.idx, b.wu, n, fd);
    cr_assert_lt(moe_rel_err(got, fd, (size_t)n), MOE_TOL_F32);
    double mx = 0.0;
    int64_t at = 0;
    for (int64_t i = 0; i < n; i++)
        if (fabs(fd[i]) > mx) {
            mx = fabs(fd[i]);
            at = i;
        }
    got[(at + 1) % n] += 1e-4 * mx;
    cr_expect_gt(moe_rel_err(got, fd, (size_t)n), MOE_TOL_F32);
    free(got);
    free(fd);
    ref_block_free(&b);
}

Test(kernels_block, unused_experts_get_exact_zero_grads)
{
    struct moe_route_cfg c = softmax_cfg();
    c.K = 1;
    struct ref_block b;
    ref_block_init(&b, &c, MOE_BF16, REF_PTR, 2, H, I, 0, 0, 0, 1000);
    cr_assert_eq(moe_forward_cpu(&b.p), MOE_OK);
    cr_assert_eq(moe_backward_cpu(&b.p), MOE_OK);
    double *g = ref_doubles((size_t)c.E * I * H);
    ref_mlp_read(&b.dex, REF_GATE, g);
    for (int e = 0; e < c.E; e++) {
        int used = e == b.idx[0] || e == b.idx[1];
        double norm = 0.0;
        for (int i = 0; i < I * H; i++)
            norm += fabs(g[e * I * H + i]);
        if (used)
            cr_expect_gt(norm, 0.0, "expert %d", e);
        else
            cr_expect_eq(norm, 0.0, "expert %d", e);
    }
    free(g);
    ref_block_free(&b);
}

Test(kernels_block, zero_tokens_forward_is_a_no_op_and_backward_zeroes_weight_grads)
{
    struct ref_block b;
    struct moe_route_cfg c = sigmoid_cfg(-INFINITY);
    ref_block_init(&b, &c, MOE_F16, REF_T, 0, H, I, IS, 1, 1, 1100);
    b.p.x = b.p.y = b.p.dx = NULL;
    b.p.dy = NULL;
    b.p.logits = b.p.dlogits = b.p.w = NULL;
    b.p.idx = NULL;
    cr_expect_eq(moe_forward_cpu(&b.p), MOE_OK);
    cr_assert_eq(moe_backward_cpu(&b.p), MOE_OK);
    int64_t n = 8 * I * H;
    double *g = ref_doubles((size_t)n);
    for (int j = 0; j < 3; j++) {
        ref_mlp_read(&b.dex, (enum ref_proj)j, g);
        for (int64_t i = 0; i < n; i++)
            cr_assert_eq(g[i], 0.0, "expert grad %d element %lld", j, (long long)i);
        ref_mlp_read(&b.dsh, (enum ref_proj)j, g);
        for (int64_t i = 0; i < IS * H; i++)
            cr_assert_eq(g[i], 0.0, "shared grad %d element %lld", j, (long long)i);
    }
    for (int64_t h = 0; h < H; h++)
        cr_assert_eq(ref_get(MOE_F16, b.dsgb, h), 0.0);
    free(g);
    ref_block_free(&b);
}

Test(kernels_block, backward_is_bitwise_deterministic)
{
    struct ref_block b;
    struct moe_route_cfg c = sigmoid_cfg(-INFINITY);
    ref_block_init(&b, &c, MOE_F32, REF_3D, T, H, I, IS, 1, 1, 1200);
    cr_assert_eq(moe_forward_cpu(&b.p), MOE_OK);
    cr_assert_eq(moe_backward_cpu(&b.p), MOE_OK);
    size_t ng = (size_t)(8 * 2 * I * H) * sizeof(float), nd = (size_t)(T * H) * sizeof(float);
    float *gu = malloc(ng), *dx = malloc(nd), *dl = malloc((size_t)(T * 8) * sizeof(float));
    memcpy(gu, b.dex.gu, ng);
    memcpy(dx, b.dxb, nd);
    memcpy(dl, b.dlogits, (size_t)(T * 8) * sizeof(float));
    ref_poison(b.dex.gu, ng);
    ref_poison(b.dxb, nd);
    cr_assert_eq(moe_backward_cpu(&b.p), MOE_OK);
    /* bit patterns on purpose: the same run must give the very same bits */
    cr_expect_eq(memcmp(gu, b.dex.gu, ng), 0);
    cr_expect_eq(memcmp(dx, b.dxb, nd), 0);
    cr_expect_eq(memcmp(dl, b.dlogits, (size_t)(T * 8) * sizeof(float)), 0);
    free(gu);
    free(dx);
    free(dl);
    ref_block_free(&b);
}

Test(kernels_block, rejects_inconsistent_problems)
{
    struct ref_block b;
    struct moe_route_cfg c = softmax_cfg();
    ref_block_init(&b, &c, MOE_F32, REF_3D, T, H, I, IS, 1, 0, 1300);
    struct moe_problem ok = b.p, p;
    cr_expect_eq(moe_forward_cpu(NULL), MOE_EINVAL);
    cr_expect_eq(moe_backward_cpu(NULL), MOE_EINVAL);
#define EXPECT_BAD(change)                                                                         \
    do {                                                                                           \
        p = ok;                                                                                    \
        change;                                                                                    \
        cr_expect_eq(moe_forward_cpu(&p), MOE_EINVAL, "forward accepts: %s", #change);             \
        cr_expect_eq(moe_backward_cpu(&p), MOE_EINVAL, "backward accepts: %s", #change);           \
    } while (0)
    EXPECT_BAD(p.experts.n = 5);
    EXPECT_BAD(p.experts.H = H + 1);
    EXPECT_BAD(p.experts.gate.base = NULL);
    EXPECT_BAD(p.shared.n = 2);
    EXPECT_BAD(p.shared.H = 3);
    EXPECT_BAD((p.shared.n = 0, p.shared_gate = b.sgb));
    EXPECT_BAD(p.dtype = (moe_dtype)9);
    EXPECT_BAD(p.H = 0);
    EXPECT_BAD(p.T = -1);
    EXPECT_BAD(p.x = NULL);
    EXPECT_BAD(p.x_rs = H - 1);
    EXPECT_BAD(p.logits = NULL);
    EXPECT_BAD(p.route.K = 7);
    EXPECT_BAD(p.route.n_group = 4);
#undef EXPECT_BAD
    p = ok;
    p.y = NULL;
    cr_expect_eq(moe_forward_cpu(&p), MOE_EINVAL);
    cr_assert_eq(moe_forward_cpu(&ok), MOE_OK);
    p = ok;
    p.d_experts.up.base = NULL;
    cr_expect_eq(moe_backward_cpu(&p), MOE_EINVAL);
    p = ok;
    p.d_shared.n = 0;
    cr_expect_eq(moe_backward_cpu(&p), MOE_EINVAL);
    p = ok;
    p.d_shared_gate = NULL;
    cr_expect_eq(moe_backward_cpu(&p), MOE_EINVAL);
    p = ok;
    p.dy = NULL;
    cr_expect_eq(moe_backward_cpu(&p), MOE_EINVAL);
    p = ok;
    p.idx[3] = 6;
    cr_expect_eq(moe_backward_cpu(&p), MOE_EINVAL, "expert index out of range");
    ref_block_free(&b);
}

/* moe_problem.router_w: the forward makes the logits itself (moe_router_logits_cpu's bits) and
   routes from them, as a forward given those logits does; no backward can follow. idx64 gets idx
   as int64; a bias other than fp32 is CUDA's only. */
Test(kernels_block, forward_makes_the_router_logits_from_router_w)
{
    struct ref_block b;
    struct moe_route_cfg c = sigmoid_cfg(-INFINITY);
    ref_block_init(&b, &c, MOE_BF16, REF_PTR, T, H, I, IS, 0, 1, 1400);
    uint64_t seed = 77;
    const int E = c.E;
    uint16_t *rw = ref_alloc((size_t)(E * (H + 3)) * 2);
    for (int64_t i = 0; i < E * (H + 3); i++)
        ref_put(MOE_BF16, rw, i, ref_uniform(&seed, -1.0, 1.0));
    float *want_l = ref_alloc((size_t)(T * E) * sizeof(float));
    cr_assert_eq(moe_router_logits_cpu(T, H, E, MOE_BF16, b.p.x, b.p.x_rs, rw, H + 3, want_l),
                 MOE_OK);
    struct moe_problem given = b.p;
    given.logits = want_l;
    const size_t ny = (size_t)(T * H) * 2, nk = (size_t)(T * c.K);
    cr_assert_eq(moe_forward_cpu(&given), MOE_OK);
    void *want_y = malloc(ny);
    int32_t *want_idx = malloc(nk * sizeof(int32_t));
    float *want_w = malloc(nk * sizeof(float));
    memcpy(want_y, b.yb, ny);
    memcpy(want_idx, b.idx, nk * sizeof(int32_t));
    memcpy(want_w, b.w, nk * sizeof(float));

    struct moe_problem own = b.p;
    float *got_l = ref_alloc((size_t)(T * E) * sizeof(float));
    own.logits = NULL;
    own.router_w = rw;
    own.router_w_rs = H + 3;
    own.logits_out = got_l;
    ref_poison(b.yb, ny);
    ref_poison(b.idx, nk * sizeof(int32_t));
    ref_poison(b.w, nk * sizeof(float));
    int64_t idx64[T * 8];
    ref_poison(idx64, sizeof idx64);
    own.idx64 = idx64; /* idx as int64 too */
    cr_assert_eq(moe_forward_cpu(&own), MOE_OK);
    for (size_t i = 0; i < nk; i++)
        cr_expect_eq(idx64[i], b.idx[i], "idx64[%zu]", i);
    cr_expect_eq(memcmp(got_l, want_l, (size_t)(T * E) * sizeof(float)), 0, "logits differ");
    cr_expect_eq(memcmp(b.yb, want_y, ny), 0, "y differs");
    cr_expect_eq(memcmp(b.idx, want_idx, nk * sizeof(int32_t)), 0, "idx differs");
    cr_expect_eq(memcmp(b.w, want_w, nk * sizeof(float)), 0, "w differs");
    cr_expect_eq(moe_backward_cpu(&own), MOE_EINVAL, "a backward after router_w");
    own.logits_out = NULL;
    cr_expect_eq(moe_forward_cpu(&own), MOE_EINVAL, "router_w without logits_out");
    own.logits_out = got_l;
    own.router_w_rs = H - 1;
    cr_expect_eq(moe_forward_cpu(&own), MOE_EINVAL, "router_w_rs < H");
    own.router_w_rs = H + 3;
    own.bias_dtype = MOE_BF16; /* a narrow bias: CUDA only */
    cr_expect_eq(moe_forward_cpu(&own), MOE_EINVAL, "a bf16 bias on the CPU");
    free(rw);
    free(want_l);
    free(got_l);
    free(want_y);
    free(want_idx);
    free(want_w);
    ref_block_free(&b);
}
