/*
 * tests/c/test_kernels_combine.c — the weighted sum of expert outputs (moe_combine_cpu): a
 * hand-worked sum, all three output dtypes on random data, argument checks.
 */
#include "kernels_ref.h"

Test(kernels_combine, hand_sum)
{
    /* T = 2, K = 2, H = 3; rows are stored in some permuted order */
    float out[] = {1, 2, 3, /* row 0 */ 10, 20, 30, /* row 1 */ -1, 0, 1, /* row 2 */ 4, 4, 4};
    int32_t inv[] = {2, 0, 3, 1}; /* slot -> row */
    float w[] = {0.5f, 2.0f, 0.25f, -1.0f};
    float y[6];
    ref_poison(y, sizeof y);
    cr_assert_eq(moe_combine_cpu(2, 2, 3, out, inv, w, MOE_F32, y), MOE_OK);
    float want[] = {0.5f * -1 + 2.0f * 1, 0.5f * 0 + 2.0f * 2, 0.5f * 1 + 2.0f * 3,
                    0.25f * 4 - 10,       0.25f * 4 - 20,      0.25f * 4 - 30};
    for (int i = 0; i < 6; i++)
        cr_expect_eq(y[i], want[i], "y[%d] = %g, expected %g", i, (double)y[i], (double)want[i]);
}

Test(kernels_combine, random_in_every_dtype)
{
    enum { T = 13, K = 3, H = 24, N = T * K };
    moe_dtype dts[] = {MOE_F32, MOE_BF16, MOE_F16};
    uint64_t seed = 17;
    float out[N * H], w[N];
    int32_t inv[N];
    double want[T * H];
    for (int i = 0; i < N * H; i++)
        out[i] = (float)ref_uniform(&seed, -2.0, 2.0);
    for (int i = 0; i < N; i++) {
        w[i] = (float)ref_uniform(&seed, 0.0, 1.0);
        inv[i] = (i * 7) % N; /* 7 is coprime with 39: a permutation */
    }
    for (int t = 0; t < T; t++)
        for (int h = 0; h < H; h++) {
            double s = 0.0;
            for (int k = 0; k < K; k++)
                s += (double)w[t * K + k] * out[inv[t * K + k] * H + h];
            want[t * H + h] = s;
        }
    for (size_t d = 0; d < 3; d++) {
        void *y = ref_alloc((size_t)(T * H) * moe_dtype_size(dts[d]));
        cr_assert_eq(moe_combine_cpu(T, K, H, out, inv, w, dts[d], y), MOE_OK);
        double *got = ref_read(dts[d], y, T * H);
        double err = moe_rel_err(got, want, T * H);
        cr_expect_lt(err, moe_tol(dts[d]), "%s: rel err %g", ref_dtype_name(dts[d]), err);
        free(got);
        free(y);
    }
}

Test(kernels_combine, rejects_bad_arguments)
{
    float out[4] = {0}, w[2] = {1, 1}, y[2];
    int32_t inv[] = {0, 2};
    cr_expect_eq(moe_combine_cpu(1, 2, 2, out, inv, w, MOE_F32, y), MOE_EINVAL, "row 2 of 2");
    inv[1] = 1;
    cr_expect_eq(moe_combine_cpu(1, 2, 2, out, inv, w, (moe_dtype)5, y), MOE_EINVAL);
    cr_expect_eq(moe_combine_cpu(1, 2, 0, out, inv, w, MOE_F32, y), MOE_EINVAL);
    cr_expect_eq(moe_combine_cpu(1, 2, 2, out, inv, w, MOE_F32, NULL), MOE_EINVAL);
    cr_expect_eq(moe_combine_cpu(0, 2, 2, NULL, NULL, NULL, MOE_F32, NULL), MOE_OK);
    cr_expect_eq(moe_combine_cpu(1, 2, 2, out, inv, w, MOE_F32, y), MOE_OK);
}
