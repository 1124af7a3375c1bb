/*
 * tests/c/test_kernels_permute.c — grouping of slots by expert (moe_permute_cpu): a hand-worked
 * case, then random round trips checking the permutation, its inverse, stability and empty experts.
 */
#include "kernels_ref.h"

Test(kernels_permute, hand_case_counts_offsets_and_stable_rows)
{
    /* T = 3, K = 2: slots 0..5 go to experts 2 0 | 2 3 | 0 2; expert 1 gets nothing */
    int32_t idx[] = {2, 0, 2, 3, 0, 2};
    int64_t counts[4], offsets[5];
    int32_t perm[6];
    ref_poison(counts, sizeof counts);
    ref_poison(offsets, sizeof offsets);
    ref_poison(perm, sizeof perm);
    cr_assert_eq(moe_permute_cpu(3, 2, 4, idx, counts, offsets, perm), MOE_OK);
    int64_t want_counts[] = {2, 0, 3, 1}, want_offsets[] = {0, 2, 2, 5, 6};
    int32_t want_perm[] = {1, 4, 0, 2, 5, 3};
    for (int e = 0; e < 4; e++)
        cr_expect_eq(counts[e], want_counts[e], "counts[%d]", e);
    for (int e = 0; e < 5; e++)
        cr_expect_eq(offsets[e], want_offsets[e], "offsets[%d]", e);
    for (int r = 0; r < 6; r++)
        cr_expect_eq(perm[r], want_perm[r], "perm[%d]", r);
}

Test(kernels_permute, random_round_trip_is_a_stable_grouping)
{
    enum { T = 97, K = 4, E = 16, N = T * K };
    uint64_t seed = 3;
    int32_t idx[N], perm[N], inv[N];
    int64_t counts[E], offsets[E + 1];
    /* experts 5 and 11 never chosen */
    for (int i = 0; i < N; i++) {
        int e;
        do
            e = (int)(ref_rand(&seed) % E);
        while (e == 5 || e == 11);
        idx[i] = e;
    }
    ref_poison(perm, sizeof perm);
    cr_assert_eq(moe_permute_cpu(T, K, E, idx, counts, offsets, perm), MOE_OK);
    cr_expect_eq(counts[5], 0);
    cr_expect_eq(counts[11], 0);
    cr_expect_eq(offsets[0], 0);
    cr_expect_eq(offsets[E], N);
    ref_poison(inv, sizeof inv);
    for (int r = 0; r < N; r++) {
        cr_assert(perm[r] >= 0 && perm[r] < N, "row %d", r);
        inv[perm[r]] = r;
    }
    for (int s = 0; s < N; s++)
        cr_assert_eq(perm[inv[s]], s, "slot %d appears twice or never", s);
    for (int e = 0; e < E; e++) {
        cr_expect_eq(offsets[e + 1] - offsets[e], counts[e], "expert %d", e);
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
            cr_expect_eq(idx[perm[r]], e, "row %lld belongs to expert %d", (long long)r, e);
            if (r > offsets[e])
                cr_expect_lt(perm[r - 1], perm[r], "rows of expert %d out of slot order", e);
        }
    }
}

Test(kernels_permute, zero_tokens_gives_empty_groups)
{
    int64_t counts[3], offsets[4];
    ref_poison(counts, sizeof counts);
    ref_poison(offsets, sizeof offsets);
    cr_assert_eq(moe_permute_cpu(0, 2, 3, NULL, counts, offsets, NULL), MOE_OK);
    for (int e = 0; e < 3; e++)
        cr_expect_eq(counts[e], 0);
    for (int e = 0; e < 4; e++)
        cr_expect_eq(offsets[e], 0);
}

Test(kernels_permute, rejects_experts_out_of_range)
{
    int32_t idx[] = {0, 3};
    int64_t counts[3], offsets[4];
    int32_t perm[2];
    cr_expect_eq(moe_permute_cpu(1, 2, 3, idx, counts, offsets, perm), MOE_EINVAL);
    idx[1] = -1;
    cr_expect_eq(moe_permute_cpu(1, 2, 3, idx, counts, offsets, perm), MOE_EINVAL);
    idx[1] = 1;
    cr_expect_eq(moe_permute_cpu(1, 0, 3, idx, counts, offsets, perm), MOE_EINVAL);
    cr_expect_eq(moe_permute_cpu(1, 2, 3, idx, NULL, offsets, perm), MOE_EINVAL);
    cr_expect_eq(moe_permute_cpu(1, 2, 3, idx, counts, offsets, perm), MOE_OK);
}
