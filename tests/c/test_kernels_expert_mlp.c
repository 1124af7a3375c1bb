/*
 * tests/c/test_kernels_expert_mlp.c — the grouped SwiGLU expert MLP (moe_expert_mlp_cpu) against a
 * direct float64 computation, in every weight layout (3-D, pointer array, transposed) and dtype,
 * with a padded input row stride and an expert that gets no token.
 */
#include "kernels_ref.h"

enum { T = 11, K = 2, E = 5, H = 12, I = 7, XRS = H + 5, N = T * K };

static void check_layout(enum ref_layout L, moe_dtype dt, uint64_t seed)
{
    size_t esz = moe_dtype_size(dt);
    double *wg = ref_doubles(E * I * H), *wu = ref_doubles(E * I * H), *wd = ref_doubles(E * H * I);
    double *x = ref_doubles(T * H);
    ref_fill(&seed, wg, E * I * H, -0.5, 0.5, dt);
    ref_fill(&seed, wu, E * I * H, -0.5, 0.5, dt);
    ref_fill(&seed, wd, E * H * I, -0.5, 0.5, dt);
    ref_fill(&seed, x, T * H, -1.0, 1.0, dt);
    struct ref_mlp m;
    ref_mlp_make(&m, L, dt, E, H, I);
    ref_mlp_write(&m, REF_GATE, wg);
    ref_mlp_write(&m, REF_UP, wu);
    ref_mlp_write(&m, REF_DOWN, wd);
    void *xb = ref_alloc(T * XRS * esz);
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++)
            ref_put(dt, xb, t * XRS + h, x[t * H + h]);
    /* expert 3 gets no token */
    int32_t idx[N], perm[N];
    int64_t counts[E], offsets[E + 1];
    for (int s = 0; s < N; s++) {
        int e = (s * 3 + s / 4) % 4;
        idx[s] = e == 3 ? 4 : e;
    }
    cr_assert_eq(moe_permute_cpu(T, K, E, idx, counts, offsets, perm), MOE_OK);
    cr_assert_eq(counts[3], 0);
    float *out = ref_alloc(N * H * sizeof(float)), *hb = ref_alloc(N * 2 * I * sizeof(float));
    cr_assert_eq(moe_expert_mlp_cpu(&m.m, dt, xb, XRS, K, offsets, perm, hb, out), MOE_OK);

    double *want = ref_doubles(N * H), *got = ref_doubles(N * H);
    double *want_h = ref_doubles(N * 2 * I), *got_h = ref_doubles(N * 2 * I);
    for (int r = 0; r < N; r++) {
        int s = perm[r], t = s / K;
        ref_mlp_row(wg, wu, wd, idx[s], H, I, x + t * H, want + r * H, want_h + r * 2 * I,
                    want_h + r * 2 * I + I);
    }
    for (int i = 0; i < N * H; i++)
        got[i] = out[i];
    for (int i = 0; i < N * 2 * I; i++)
        got_h[i] = hb[i];
    /* out and h are fp32 whatever the dtype: inputs are exact, so the fp32 bound applies */
    double err = moe_rel_err(got, want, N * H), err_h = moe_rel_err(got_h, want_h, N * 2 * I);
    cr_expect_lt(err, MOE_TOL_F32, "%s %s: out rel err %g", ref_layout_name(L), ref_dtype_name(dt),
                 err);
    cr_expect_lt(err_h, MOE_TOL_F32, "%s %s: h rel err %g", ref_layout_name(L), ref_dtype_name(dt),
                 err_h);
    /* without h */
    ref_poison(out, N * H * sizeof(float));
    cr_assert_eq(moe_expert_mlp_cpu(&m.m, dt, xb, XRS, K, offsets, perm, NULL, out), MOE_OK);
    for (int i = 0; i < N * H; i++)
        got[i] = out[i];
    cr_expect_lt(moe_rel_err(got, want, N * H), MOE_TOL_F32);

    free(wg), free(wu), free(wd), free(x), free(xb), free(out), free(hb);
    free(want), free(got), free(want_h), free(got_h);
    ref_mlp_free(&m);
}

Test(kernels_expert_mlp, layout_3d_every_dtype)
{
    check_layout(REF_3D, MOE_F32, 1);
    check_layout(REF_3D, MOE_BF16, 2);
    check_layout(REF_3D, MOE_F16, 3);
}

Test(kernels_expert_mlp, layout_pointer_array_every_dtype)
{
    check_layout(REF_PTR, MOE_F32, 4);
    check_layout(REF_PTR, MOE_BF16, 5);
    check_layout(REF_PTR, MOE_F16, 6);
}

Test(kernels_expert_mlp, layout_transposed_every_dtype)
{
    check_layout(REF_T, MOE_F32, 7);
    check_layout(REF_T, MOE_BF16, 8);
    check_layout(REF_T, MOE_F16, 9);
}

Test(kernels_expert_mlp, rejects_unaddressable_weights)
{
    struct ref_mlp m;
    ref_mlp_make(&m, REF_3D, MOE_F32, E, H, I);
    int64_t offsets[E + 1] = {0};
    float x[H], out[H];
    struct moe_mlp bad = m.m;
    bad.up.base = NULL;
    cr_expect_eq(moe_expert_mlp_cpu(&bad, MOE_F32, x, H, K, offsets, NULL, NULL, out), MOE_EINVAL);
    bad = m.m;
    bad.I = 0;
    cr_expect_eq(moe_expert_mlp_cpu(&bad, MOE_F32, x, H, K, offsets, NULL, NULL, out), MOE_EINVAL);
    cr_expect_eq(moe_expert_mlp_cpu(&m.m, MOE_F32, x, H, 0, offsets, NULL, NULL, out), MOE_EINVAL);
    cr_expect_eq(moe_expert_mlp_cpu(&m.m, MOE_F32, x, H, K, offsets, NULL, NULL, out), MOE_OK,
                 "no rows at all");
    ref_mlp_free(&m);

    struct ref_mlp pm;
    ref_mlp_make(&pm, REF_PTR, MOE_F32, E, H, I);
    void *keep = pm.pd[2];
    pm.pd[2] = NULL;
    cr_expect_eq(moe_expert_mlp_cpu(&pm.m, MOE_F32, x, H, K, offsets, NULL, NULL, out), MOE_EINVAL);
    pm.pd[2] = keep;
    ref_mlp_free(&pm);
}
