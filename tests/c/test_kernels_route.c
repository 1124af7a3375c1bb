/*
 * tests/c/test_kernels_route.c — routing on the CPU (moe_route_cpu, moe_route_backward_cpu): both
 * recipes on hand-computed cases (ties, group limits, -inf and 0.0 masks, norm, scale, K = 1,
 * K = E, the selection bias of either recipe), argument checks, and the backward against float64
 * central differences; the router's own logits (moe_router_logits_cpu) against float64 and in
 * their documented sum order.
 */
#include "kernels_ref.h"

static struct moe_route_cfg softmax_cfg(int E, int K, int norm, float scale)
{
    return (struct moe_route_cfg){MOE_ROUTE_SOFTMAX_TOPK, E, K, 1, 1, norm, 0.0f, scale, 0.0f};
}

static struct moe_route_cfg sigmoid_cfg(int E, int K, int G, int keep, int norm, float scale,
                                        float mask)
{
    return (struct moe_route_cfg){
        MOE_ROUTE_SIGMOID_GROUP, E, K, G, keep, norm, 1e-20f, scale, mask};
}

/* Route one token and return idx / w in caller arrays of size K (poisoned first). */
static void route1(const struct moe_route_cfg *c, const float *l, const float *bias, int32_t *idx,
                   float *w)
{
    ref_poison(idx, (size_t)c->K * sizeof *idx);
    ref_poison(w, (size_t)c->K * sizeof *w);
    cr_assert_eq(moe_route_cpu(c, 1, l, bias, idx, w), MOE_OK);
}

static void expect_idx(const int32_t *got, const int32_t *want, int K)
{
    for (int k = 0; k < K; k++)
        cr_expect_eq(got[k], want[k], "slot %d: expert %d, expected %d", k, got[k], want[k]);
}

static void expect_w(const float *got, const double *want, int K)
{
    for (int k = 0; k < K; k++)
        cr_expect(fabs(got[k] - want[k]) <= MOE_TOL_F32 * fabs(want[k]), "slot %d: %.9g vs %.9g", k,
                  (double)got[k], want[k]);
}

/* softmax of l at e, in float64 */
static double softmax_at(const float *l, int E, int e)
{
    double z = 0.0;
    for (int f = 0; f < E; f++)
        z += exp((double)l[f]);
    return exp((double)l[e]) / z;
}

Test(kernels_route, softmax_topk_picks_largest_in_descending_order)
{
    float l[] = {1.0f, 3.0f, 2.0f, 0.0f, -1.0f};
    struct moe_route_cfg c = softmax_cfg(5, 2, 0, 1.0f);
    int32_t idx[2];
    float w[2];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){1, 2}, 2);
    expect_w(w, (double[]){softmax_at(l, 5, 1), softmax_at(l, 5, 2)}, 2);
}

Test(kernels_route, softmax_ties_go_to_lower_index)
{
    float l[] = {0.5f, 2.0f, 2.0f, 2.0f, 1.0f};
    struct moe_route_cfg c = softmax_cfg(5, 2, 0, 1.0f);
    int32_t idx[3];
    float w[3];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){1, 2}, 2);
    c.K = 3;
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){1, 2, 3}, 3);
}

Test(kernels_route, softmax_norm_divides_by_the_sum_then_scales)
{
    float l[] = {0.25f, -1.0f, 1.5f, 0.75f};
    struct moe_route_cfg c = softmax_cfg(4, 2, 1, 2.5f);
    int32_t idx[2];
    float w[2];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){2, 3}, 2);
    /* renormalised top-2 of a softmax = softmax over the two chosen logits */
    double w0 = 1.0 / (1.0 + exp(0.75 - 1.5));
    expect_w(w, (double[]){2.5 * w0, 2.5 * (1.0 - w0)}, 2);
}

Test(kernels_route, softmax_scale_applies_without_norm)
{
    float l[] = {0.25f, -1.0f, 1.5f, 0.75f};
    struct moe_route_cfg c = softmax_cfg(4, 2, 0, 3.0f);
    int32_t idx[2];
    float w[2];
    route1(&c, l, NULL, idx, w);
    expect_w(w, (double[]){3.0 * softmax_at(l, 4, 2), 3.0 * softmax_at(l, 4, 3)}, 2);
}

Test(kernels_route, softmax_k1_with_norm_is_the_scale)
{
    float l[] = {0.1f, 0.9f, -0.4f};
    struct moe_route_cfg c = softmax_cfg(3, 1, 1, 1.75f);
    int32_t idx[1];
    float w[1];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){1}, 1);
    expect_w(w, (double[]){1.75}, 1);
}

Test(kernels_route, softmax_k_equals_e_orders_every_expert)
{
    float l[] = {0.3f, -0.2f, 0.9f, 0.3f};
    struct moe_route_cfg c = softmax_cfg(4, 4, 1, 1.0f);
    int32_t idx[4];
    float w[4];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){2, 0, 3, 1}, 4);
    double p[4];
    for (int k = 0; k < 4; k++)
        p[k] = softmax_at(l, 4, idx[k]);
    expect_w(w, p, 4);
}

Test(kernels_route, softmax_is_shift_invariant_for_large_logits)
{
    float l[] = {1000.0f, 1001.0f, 999.0f};
    struct moe_route_cfg c = softmax_cfg(3, 1, 0, 1.0f);
    int32_t idx[1];
    float w[1];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){1}, 1);
    expect_w(w, (double[]){1.0 / (1.0 + exp(-1.0) + exp(-2.0))}, 1);
}

Test(kernels_route, softmax_bias_moves_the_choice_not_the_weights)
{
    /* p ≈ {.474, .287, .174, .064}; + bias {0, 0, .2, 0} → {.474, .287, .374, .064} */
    float l[] = {2.0f, 1.5f, 1.0f, 0.0f};
    float bias[] = {0.0f, 0.0f, 0.2f, 0.0f};
    struct moe_route_cfg c = softmax_cfg(4, 2, 0, 1.0f);
    int32_t idx[2];
    float w[2];
    route1(&c, l, bias, idx, w);
    expect_idx(idx, (int32_t[]){0, 2}, 2);
    expect_w(w, (double[]){softmax_at(l, 4, 0), softmax_at(l, 4, 2)}, 2);
}

Test(kernels_route, softmax_bias_renormalises_the_unbiased_probabilities)
{
    float l[] = {2.0f, 1.5f, 1.0f, 0.0f};
    float bias[] = {-1.0f, 0.0f, 0.0f, 0.5f}; /* selection: 3 (.564), then 1 (.287) */
    struct moe_route_cfg c = softmax_cfg(4, 2, 1, 2.0f);
    int32_t idx[2];
    float w[2];
    route1(&c, l, bias, idx, w);
    expect_idx(idx, (int32_t[]){3, 1}, 2);
    double a = softmax_at(l, 4, 3), b = softmax_at(l, 4, 1);
    expect_w(w, (double[]){2.0 * a / (a + b), 2.0 * b / (a + b)}, 2);
}

Test(kernels_route, softmax_zero_bias_chooses_as_no_bias)
{
    uint64_t seed = 3;
    enum { T = 32, E = 8 };
    float l[T * E], zero[E] = {0}, w0[T * 2], w1[T * 2];
    int32_t i0[T * 2], i1[T * 2];
    for (int i = 0; i < T * E; i++)
        l[i] = (float)ref_uniform(&seed, -2.0, 2.0);
    l[5] = l[6]; /* a tie: still the lower index with a zero bias */
    struct moe_route_cfg c = softmax_cfg(E, 2, 1, 1.0f);
    cr_assert_eq(moe_route_cpu(&c, T, l, NULL, i0, w0), MOE_OK);
    cr_assert_eq(moe_route_cpu(&c, T, l, zero, i1, w1), MOE_OK);
    cr_expect_eq(memcmp(i0, i1, sizeof i0), 0);
    cr_expect_eq(memcmp(w0, w1, sizeof w0), 0);
}

Test(kernels_route, softmax_bias_ties_go_to_lower_index)
{
    /* p = {.25, .25, .25, .25}; biases make experts 1 and 3 tie above the rest */
    float l[] = {0.0f, 0.0f, 0.0f, 0.0f};
    float bias[] = {0.0f, 0.1f, -0.1f, 0.1f};
    struct moe_route_cfg c = softmax_cfg(4, 1, 0, 1.0f);
    int32_t idx[1];
    float w[1];
    route1(&c, l, bias, idx, w);
    expect_idx(idx, (int32_t[]){1}, 1);
    expect_w(w, (double[]){0.25}, 1);
}

Test(kernels_route, sigmoid_bias_moves_the_choice_not_the_weights)
{
    float l[] = {1.0f, 0.5f, -0.5f, 0.0f};
    float bias[] = {0.0f, 0.0f, 1.0f, 0.0f};
    struct moe_route_cfg c = sigmoid_cfg(4, 2, 1, 1, 0, 1.0f, -INFINITY);
    int32_t idx[2];
    float w[2];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){0, 1}, 2);
    expect_w(w, (double[]){ref_sigmoid(1.0), ref_sigmoid(0.5)}, 2);
    route1(&c, l, bias, idx, w);
    expect_idx(idx, (int32_t[]){2, 0}, 2);
    expect_w(w, (double[]){ref_sigmoid(-0.5), ref_sigmoid(1.0)}, 2);
}

Test(kernels_route, sigmoid_norm_and_scale)
{
    float l[] = {1.0f, 0.5f, -0.5f, 0.0f};
    struct moe_route_cfg c = sigmoid_cfg(4, 2, 1, 1, 1, 2.5f, -INFINITY);
    int32_t idx[2];
    float w[2];
    route1(&c, l, NULL, idx, w);
    double a = ref_sigmoid(1.0), b = ref_sigmoid(0.5), s = a + b + 1e-20;
    expect_w(w, (double[]){2.5 * a / s, 2.5 * b / s}, 2);
}

/* E = 8 in 4 groups of 2, keep 2: group scores = sum of both members of each group. */
Test(kernels_route, sigmoid_group_limit_masks_weak_groups)
{
    /* sigmoid(l) + bias with bias chosen so that c = {.9,.1 | .6,.55 | .95,.0 | .5,.5} (approx):
       group sums 1.0, 1.15, 0.95, 1.0 -> keep groups 1 and 0 (tie 0 vs 3 goes to group 0) */
    float c_want[] = {0.9f, 0.1f, 0.6f, 0.55f, 0.95f, 0.0f, 0.5f, 0.5f};
    float l[8], bias[8];
    for (int e = 0; e < 8; e++) {
        l[e] = 0.0f; /* sigmoid(0) = 0.5 exactly */
        bias[e] = c_want[e] - 0.5f;
    }
    struct moe_route_cfg c = sigmoid_cfg(8, 3, 4, 2, 0, 1.0f, -INFINITY);
    int32_t idx[3];
    float w[3];
    route1(&c, l, bias, idx, w);
    /* expert 4 (0.95) is in a dropped group: the best kept are 0 (.9), 2 (.6), 3 (.55) */
    expect_idx(idx, (int32_t[]){0, 2, 3}, 3);
    expect_w(w, (double[]){0.5, 0.5, 0.5}, 3);
}

Test(kernels_route, sigmoid_group_score_is_top2_sum_not_max)
{
    /* groups of 4: group 0 has the single best expert but a poor second; group 1 wins on top-2 */
    float c_want[] = {0.99f, 0.1f, 0.1f, 0.1f, 0.7f, 0.7f, 0.1f, 0.1f};
    float l[8], bias[8];
    for (int e = 0; e < 8; e++) {
        l[e] = 0.0f;
        bias[e] = c_want[e] - 0.5f;
    }
    struct moe_route_cfg c = sigmoid_cfg(8, 1, 2, 1, 0, 1.0f, -INFINITY);
    int32_t idx[1];
    float w[1];
    route1(&c, l, bias, idx, w);
    expect_idx(idx, (int32_t[]){4}, 1);
}

Test(kernels_route, sigmoid_group_of_one_scores_by_its_value)
{
    float l[] = {-1.0f, 2.0f, 0.5f, 1.0f};
    struct moe_route_cfg c = sigmoid_cfg(4, 2, 4, 2, 0, 1.0f, -INFINITY);
    int32_t idx[2];
    float w[2];
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){1, 3}, 2);
    /* keep 3 groups, K = 3: the three best experts */
    c.topk_group = 3;
    c.K = 3;
    int32_t idx3[3];
    float w3[3];
    route1(&c, l, NULL, idx3, w3);
    expect_idx(idx3, (int32_t[]){1, 3, 2}, 3);
}

Test(kernels_route, sigmoid_group_ties_keep_lower_group)
{
    float l[] = {0.5f, 0.25f, 0.25f, 0.5f, 1.0f, -3.0f};
    struct moe_route_cfg c = sigmoid_cfg(6, 2, 3, 1, 0, 1.0f, -INFINITY);
    int32_t idx[2];
    float w[2];
    /* group sums: g0 = σ(.5)+σ(.25), g1 = σ(.25)+σ(.5) (equal), g2 = σ(1)+σ(-3) < both */
    route1(&c, l, NULL, idx, w);
    expect_idx(idx, (int32_t[]){0, 1}, 2);
}

/* DeepSeek-V3 style masked_fill(0.0): a masked expert scores 0.0 and beats kept negative scores. */
Test(kernels_route, sigmoid_zero_mask_can_pick_masked_experts)
{
    float l[] = {0.0f, 0.5f, -0.5f, -1.0f};
    float bias[] = {-1.0f, -1.0f, -1.0f, -1.0f}; /* every c = σ(l) - 1 < 0 */
    struct moe_route_cfg c = sigmoid_cfg(4, 2, 2, 1, 0, 1.0f, 0.0f);
    int32_t idx[2];
    float w[2];
    route1(&c, l, bias, idx, w);
    /* group 0 is kept; the masked 2 and 3 score 0.0 > any kept c; tie 2 vs 3 -> 2 first */
    expect_idx(idx, (int32_t[]){2, 3}, 2);
    expect_w(w, (double[]){ref_sigmoid(-0.5), ref_sigmoid(-1.0)}, 2);
    c.mask_value = -INFINITY;
    route1(&c, l, bias, idx, w);
    expect_idx(idx, (int32_t[]){1, 0}, 2);
}

Test(kernels_route, sigmoid_zero_mask_ties_with_kept_zero_go_to_lower_index)
{
    /* c = σ(0) - 0.5 = 0 exactly for expert 3 (kept); experts 0, 1 masked at 0.0 */
    float l[] = {3.0f, 3.0f, -2.0f, 0.0f};
    float bias[] = {-5.0f, -5.0f, 0.0f, -0.5f};
    struct moe_route_cfg c = sigmoid_cfg(4, 3, 2, 1, 0, 1.0f, 0.0f);
    int32_t idx[3];
    float w[3];
    route1(&c, l, bias, idx, w);
    /* scores: 0 (masked), 0 (masked), σ(-2) ≈ .12, 0 (kept) -> 2, then ties 0, 1, 3 */
    expect_idx(idx, (int32_t[]){2, 0, 1}, 3);
}

Test(kernels_route, neg_inf_mask_still_fills_k_when_groups_run_short)
{
    float l[] = {1.0f, 2.0f, 3.0f, 4.0f};
    struct moe_route_cfg c = sigmoid_cfg(4, 3, 2, 1, 0, 1.0f, -INFINITY);
    int32_t idx[3];
    float w[3];
    route1(&c, l, NULL, idx, w);
    /* group 1 kept (3, 2); then the -inf masked group in index order */
    expect_idx(idx, (int32_t[]){3, 2, 0}, 3);
}

Test(kernels_route, many_tokens_match_the_reference_choice)
{
    uint64_t seed = 7;
    struct moe_route_cfg cfgs[] = {softmax_cfg(16, 4, 1, 1.0f), softmax_cfg(16, 16, 0, 1.0f),
                                   sigmoid_cfg(16, 4, 4, 2, 1, 2.5f, -INFINITY),
                                   sigmoid_cfg(16, 6, 8, 3, 1, 1.0f, 0.0f)};
    enum { T = 64, E = 16 };
    for (size_t ci = 0; ci < sizeof cfgs / sizeof cfgs[0]; ci++) {
        const struct moe_route_cfg *c = &cfgs[ci];
        float l[T * E], bias[E], w[T * E];
        double ld[E], bd[E], wd[E];
        int32_t idx[T * E], want[E];
        for (int e = 0; e < E; e++)
            bias[e] = (float)ref_uniform(&seed, -0.5, 0.5);
        for (int i = 0; i < T * E; i++)
            l[i] = (float)ref_uniform(&seed, -3.0, 3.0);
        ref_poison(idx, sizeof idx);
        ref_poison(w, sizeof w);
        cr_assert_eq(moe_route_cpu(c, T, l, bias, idx, w), MOE_OK);
        for (int t = 0; t < T; t++) {
            for (int e = 0; e < E; e++) {
                ld[e] = l[t * E + e];
                bd[e] = bias[e];
            }
            ref_route_select(c, ld, bd, want);
            ref_route_weights(c, ld, want, wd);
            expect_idx(idx + t * c->K, want, c->K);
            expect_w(w + t * c->K, wd, c->K);
        }
    }
}

Test(kernels_route, rejects_bad_configs)
{
    float l[4] = {0};
    int32_t idx[4];
    float w[4];
    struct moe_route_cfg bad[] = {
        softmax_cfg(4, 0, 0, 1.0f),                       /* K = 0 */
        softmax_cfg(4, 5, 0, 1.0f),                       /* K > E */
        softmax_cfg(0, 1, 0, 1.0f),                       /* E = 0 */
        sigmoid_cfg(4, 1, 3, 1, 0, 1.0f, 0.0f),           /* groups do not divide E */
        sigmoid_cfg(4, 1, 2, 0, 0, 1.0f, 0.0f),           /* topk_group = 0 */
        sigmoid_cfg(4, 1, 2, 3, 0, 1.0f, 0.0f),           /* topk_group > n_group */
        sigmoid_cfg(4, 1, 0, 1, 0, 1.0f, 0.0f),           /* n_group = 0 */
        {(moe_recipe)7, 4, 1, 1, 1, 0, 0.0f, 1.0f, 0.0f}, /* unknown recipe */
    };
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        cr_expect_eq(moe_route_cpu(&bad[i], 1, l, NULL, idx, w), MOE_EINVAL, "config %zu", i);
        cr_expect_eq(moe_route_backward_cpu(&bad[i], 1, l, idx, w, l), MOE_EINVAL, "config %zu", i);
    }
    struct moe_route_cfg ok = softmax_cfg(4, 2, 0, 1.0f);
    cr_expect_eq(moe_route_cpu(NULL, 1, l, NULL, idx, w), MOE_EINVAL);
    cr_expect_eq(moe_route_cpu(&ok, 1, NULL, NULL, idx, w), MOE_EINVAL);
    cr_expect_eq(moe_route_cpu(&ok, -1, l, NULL, idx, w), MOE_EINVAL);
    idx[0] = 4;
    idx[1] = 0;
    cr_expect_eq(moe_route_backward_cpu(&ok, 1, l, idx, w, l), MOE_EINVAL, "expert out of range");
}

Test(kernels_route, zero_tokens_is_a_no_op)
{
    struct moe_route_cfg c = softmax_cfg(4, 2, 1, 1.0f);
    cr_expect_eq(moe_route_cpu(&c, 0, NULL, NULL, NULL, NULL), MOE_OK);
    cr_expect_eq(moe_route_backward_cpu(&c, 0, NULL, NULL, NULL, NULL), MOE_OK);
}

/* ---- backward ---- */

enum { BT = 5, BE = 8 };

/* dlogits of L = Σ dw · w(logits) for the fixed choice, by central differences in float64. */
static void fd_route(const struct moe_route_cfg *c, const float *l, const int32_t *idx,
                     const float *dw, double *g)
{
    double ld[BE], w[BE];
    for (int t = 0; t < BT; t++) {
        for (int e = 0; e < BE; e++)
            ld[e] = l[t * BE + e];
        for (int e = 0; e < BE; e++) {
            double old = ld[e], lp = 0.0, lm = 0.0;
            ld[e] = old + REF_FD_STEP;
            ref_route_weights(c, ld, idx + t * c->K, w);
            for (int k = 0; k < c->K; k++)
                lp += dw[t * c->K + k] * w[k];
            ld[e] = old - REF_FD_STEP;
            ref_route_weights(c, ld, idx + t * c->K, w);
            for (int k = 0; k < c->K; k++)
                lm += dw[t * c->K + k] * w[k];
            ld[e] = old;
            g[t * BE + e] = (lp - lm) / (2.0 * REF_FD_STEP);
        }
    }
}

/* Runs route then route backward on random data; returns the relative error against FD. */
static double route_backward_err(const struct moe_route_cfg *c, uint64_t seed, float *dl_out)
{
    float l[BT * BE], bias[BE], w[BT * BE], dw[BT * BE], dl[BT * BE];
    int32_t idx[BT * BE];
    double fd[BT * BE], got[BT * BE];
    for (int i = 0; i < BT * BE; i++)
        l[i] = (float)ref_uniform(&seed, -2.0, 2.0);
    for (int i = 0; i < BE; i++)
        bias[i] = (float)ref_uniform(&seed, -0.2, 0.2);
    for (int i = 0; i < BT * c->K; i++)
        dw[i] = (float)ref_uniform(&seed, -1.0, 1.0);
    cr_assert_eq(moe_route_cpu(c, BT, l, bias, idx, w), MOE_OK);
    ref_poison(dl, sizeof dl);
    cr_assert_eq(moe_route_backward_cpu(c, BT, l, idx, dw, dl), MOE_OK);
    fd_route(c, l, idx, dw, fd);
    for (int i = 0; i < BT * BE; i++)
        got[i] = dl[i];
    if (dl_out)
        memcpy(dl_out, dl, sizeof dl);
    double err = moe_rel_err(got, fd, BT * BE);
    cr_log_info("route backward recipe %d K %d norm %d: rel err %.3g", c->recipe, c->K, c->norm,
                err);
    return err;
}

Test(kernels_route, backward_softmax_matches_finite_differences)
{
    struct moe_route_cfg cfgs[] = {softmax_cfg(BE, 3, 0, 1.0f), softmax_cfg(BE, 3, 1, 1.0f),
                                   softmax_cfg(BE, 1, 0, 2.0f), softmax_cfg(BE, BE, 0, 1.0f),
                                   softmax_cfg(BE, 2, 1, 2.5f)};
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++)
        cr_expect_lt(route_backward_err(&cfgs[i], 11 + i, NULL), MOE_TOL_F32, "config %zu", i);
}

Test(kernels_route, backward_softmax_with_eps_reaches_unchosen_logits)
{
    /* with norm_eps > 0 the renormalised weights still depend on the softmax denominator */
    struct moe_route_cfg c = softmax_cfg(BE, 2, 1, 1.0f);
    c.norm_eps = 0.5f;
    float dl[BT * BE];
    cr_expect_lt(route_backward_err(&c, 3, dl), MOE_TOL_F32);
}

Test(kernels_route, backward_sigmoid_matches_finite_differences)
{
    struct moe_route_cfg cfgs[] = {
        sigmoid_cfg(BE, 3, 1, 1, 0, 1.0f, -INFINITY), sigmoid_cfg(BE, 3, 1, 1, 1, 2.5f, -INFINITY),
        sigmoid_cfg(BE, 2, 4, 2, 1, 1.0f, 0.0f), sigmoid_cfg(BE, 1, 2, 1, 1, 1.5f, -INFINITY)};
    for (size_t i = 0; i < sizeof cfgs / sizeof cfgs[0]; i++)
        cr_expect_lt(route_backward_err(&cfgs[i], 21 + i, NULL), MOE_TOL_F32, "config %zu", i);
}

Test(kernels_route, backward_sigmoid_leaves_unchosen_logits_exactly_zero)
{
    struct moe_route_cfg c = sigmoid_cfg(BE, 2, 1, 1, 1, 1.0f, -INFINITY);
    float l[BT * BE], w[BT * 2], dw[BT * 2], dl[BT * BE];
    int32_t idx[BT * 2];
    uint64_t seed = 5;
    for (int i = 0; i < BT * BE; i++)
        l[i] = (float)ref_uniform(&seed, -2.0, 2.0);
    for (int i = 0; i < BT * 2; i++)
        dw[i] = 1.0f;
    cr_assert_eq(moe_route_cpu(&c, BT, l, NULL, idx, w), MOE_OK);
    ref_poison(dl, sizeof dl);
    cr_assert_eq(moe_route_backward_cpu(&c, BT, l, idx, dw, dl), MOE_OK);
    for (int t = 0; t < BT; t++)
        for (int e = 0; e < BE; e++)
            if (e != idx[t * 2] && e != idx[t * 2 + 1])
                cr_expect_eq(dl[t * BE + e], 0.0f, "token %d expert %d", t, e);
}

/* The tolerance is tight enough to see a small slip: a perturbation of 1e-4 of the largest
   gradient in one element must fail the check. */
Test(kernels_route, fd_check_detects_a_small_error)
{
    struct moe_route_cfg c = softmax_cfg(BE, 3, 1, 1.0f);
    float l[BT * BE], w[BT * 3], dw[BT * 3], dl[BT * BE];
    int32_t idx[BT * 3];
    double fd[BT * BE], got[BT * BE];
    uint64_t seed = 9;
    for (int i = 0; i < BT * BE; i++)
        l[i] = (float)ref_uniform(&seed, -2.0, 2.0);
    for (int i = 0; i < BT * 3; i++)
        dw[i] = (float)ref_uniform(&seed, -1.0, 1.0);
    cr_assert_eq(moe_route_cpu(&c, BT, l, NULL, idx, w), MOE_OK);
    cr_assert_eq(moe_route_backward_cpu(&c, BT, l, idx, dw, dl), MOE_OK);
    fd_route(&c, l, idx, dw, fd);
    double mx = 0.0;
    for (int i = 0; i < BT * BE; i++) {
        got[i] = dl[i];
        mx = fabs(fd[i]) > mx ? fabs(fd[i]) : mx;
    }
    cr_assert_lt(moe_rel_err(got, fd, BT * BE), MOE_TOL_F32);
    got[7] += 1e-4 * mx;
    cr_expect_gt(moe_rel_err(got, fd, BT * BE), MOE_TOL_F32);
}

/* A confident router: the chosen expert's probability is within 1e-5 of 1. Its own gradient is
   dw · p (1 − p) (softmax) or dw · s (1 − s) (sigmoid); an fp32 `1 − p` keeps only a few digits
   there, so this checks the backward against closed forms in double to 1e-6. */
static double confident_router_err(moe_recipe recipe)
{
    enum { E = 8 };
    struct moe_route_cfg c = {.recipe = recipe,
                              .E = E,
                              .K = 1,
                              .n_group = 1,
                              .topk_group = 1,
                              .scale = 1.0f,
                              .mask_value = -INFINITY};
    float l[E] = {0.3f, -0.7f, 12.5f, 0.1f, -0.2f, 0.9f, -1.0f, 0.4f}, w[1], dw[1] = {0.75f};
    float dl[E];
    int32_t idx[1];
    cr_assert_eq(moe_route_cpu(&c, 1, l, NULL, idx, w), MOE_OK);
    cr_assert_eq(idx[0], 2);
    cr_assert_eq(moe_route_backward_cpu(&c, 1, l, idx, dw, dl), MOE_OK);
    double ref[E], num = 0.0, den = 0.0, z = 0.0;
    for (int e = 0; e < E; e++)
        z += exp((double)l[e] - (double)l[2]);
    for (int e = 0; e < E; e++) {
        if (recipe == MOE_ROUTE_SOFTMAX_TOPK) {
            double p = exp((double)l[e] - (double)l[2]) / z, ps = 1.0 / z;
            ref[e] = e == 2 ? dw[0] * ps * (1.0 - ps) : -dw[0] * ps * p;
        } else {
            double s = 1.0 / (1.0 + exp(-(double)l[e]));
            ref[e] = e == 2 ? dw[0] * s * (1.0 / (1.0 + exp((double)l[e]))) : 0.0;
        }
        num += (dl[e] - ref[e]) * (dl[e] - ref[e]);
        den += ref[e] * ref[e];
    }
    return sqrt(num / den);
}

Test(kernels_route, backward_softmax_is_accurate_for_a_confident_router)
{
    cr_expect_lt(confident_router_err(MOE_ROUTE_SOFTMAX_TOPK), 1e-6);
}

Test(kernels_route, backward_sigmoid_is_accurate_for_a_confident_router)
{
    cr_expect_lt(confident_router_err(MOE_ROUTE_SIGMOID_GROUP), 1e-6);
}

/* ---- the router's own logits (moe_router_logits_cpu) ---- */

/* x [T, H] · w [E, H]ᵀ of dtype dt with padded rows, against float64 sums of the same values. */
static void check_router_logits(moe_dtype dt, int64_t T, int64_t H, int E, uint64_t seed)
{
    const int64_t xrs = H + 5, wrs = H + 3;
    const size_t es = moe_dtype_size(dt);
    void *x = ref_alloc((size_t)(T * xrs) * es), *w = ref_alloc((size_t)((int64_t)E * wrs) * es);
    for (int64_t i = 0; i < T * xrs; i++)
        ref_put(dt, x, i, ref_uniform(&seed, -1.0, 1.0));
    for (int64_t i = 0; i < E * wrs; i++)
        ref_put(dt, w, i, ref_uniform(&seed, -1.0, 1.0));
    float *got = ref_alloc((size_t)(T * E) * sizeof(float));
    cr_assert_eq(moe_router_logits_cpu(T, H, E, dt, x, xrs, w, wrs, got), MOE_OK);
    double *want = ref_doubles((size_t)(T * E)), *gotd = ref_read(MOE_F32, got, T * E);
    for (int64_t t = 0; t < T; t++)
        for (int e = 0; e < E; e++) {
            double s = 0.0;
            for (int64_t h = 0; h < H; h++)
                s += ref_get(dt, x, t * xrs + h) * ref_get(dt, w, e * wrs + h);
            want[t * E + e] = s;
        }
    double err = moe_rel_err(gotd, want, (size_t)(T * E));
    cr_expect_lt(err, MOE_TOL_F32, "%s T %lld H %lld E %d: rel err %g", ref_dtype_name(dt),
                 (long long)T, (long long)H, E, err);
    free(x);
    free(w);
    free(got);
    free(want);
    free(gotd);
}

Test(kernels_route, router_logits_match_float64)
{
    check_router_logits(MOE_BF16, 5, 2048, 24, 1);
    check_router_logits(MOE_F16, 3, 203, 7, 2); /* a partial last chunk */
    check_router_logits(MOE_F32, 1, 1031, 9, 3);
    check_router_logits(MOE_BF16, 2, 5, 3, 4); /* fewer elements than one chunk */
}

/* The documented order, where it shows: 2^27 in chunk 0 and -2^27 in chunk 128 share lane 0 and
   cancel there, so the 1 of chunk 1 (lane 1) survives; a sum in element order loses it. */
Test(kernels_route, router_logits_sum_in_the_documented_lane_order)
{
    const int64_t H = 2 * MOE_ROUTER_LANES * MOE_ROUTER_CHUNK;
    float x[2 * MOE_ROUTER_LANES * MOE_ROUTER_CHUNK], w[2 * MOE_ROUTER_LANES * MOE_ROUTER_CHUNK];
    for (int64_t h = 0; h < H; h++)
        x[h] = w[h] = 0.0f;
    x[0] = 0x1p27f;
    x[MOE_ROUTER_CHUNK] = 1.0f;
    x[MOE_ROUTER_LANES * MOE_ROUTER_CHUNK] = -0x1p27f;
    w[0] = w[MOE_ROUTER_CHUNK] = w[MOE_ROUTER_LANES * MOE_ROUTER_CHUNK] = 1.0f;
    float l = -1.0f;
    cr_assert_eq(moe_router_logits_cpu(1, H, 1, MOE_F32, x, H, w, H, &l), MOE_OK);
    cr_expect_eq(l, 1.0f, "logit %g", (double)l);
}

Test(kernels_route, router_logits_reject_bad_arguments)
{
    float x[8] = {0}, w[8] = {0}, l[4];
    cr_expect_eq(moe_router_logits_cpu(-1, 8, 1, MOE_F32, x, 8, w, 8, l), MOE_EINVAL);
    cr_expect_eq(moe_router_logits_cpu(1, 0, 1, MOE_F32, x, 8, w, 8, l), MOE_EINVAL);
    cr_expect_eq(moe_router_logits_cpu(1, 8, 0, MOE_F32, x, 8, w, 8, l), MOE_EINVAL);
    cr_expect_eq(moe_router_logits_cpu(1, 8, 1, (moe_dtype)7, x, 8, w, 8, l), MOE_EINVAL);
    cr_expect_eq(moe_router_logits_cpu(2, 8, 1, MOE_F32, x, 4, w, 8, l), MOE_EINVAL);
    cr_expect_eq(moe_router_logits_cpu(1, 8, 1, MOE_F32, x, 8, w, 4, l), MOE_EINVAL);
    cr_expect_eq(moe_router_logits_cpu(1, 8, 1, MOE_F32, NULL, 8, w, 8, l), MOE_EINVAL);
    cr_expect_eq(moe_router_logits_cpu(0, 8, 1, MOE_F32, NULL, 8, NULL, 8, NULL), MOE_OK);
}
