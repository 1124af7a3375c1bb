/*
 * tests/c/test_kernels_grouped_gemm.c — the grouped GEMM reference (moe_grouped_gemm_cpu) against
 * a direct float64 computation: gathered and packed rows, one 3-D operand and two pointer-array
 * parts (gate | up), an expert without rows, every dtype.
 */
#include "kernels_ref.h"

enum { E = 4, N = 6, D = 5, SPLIT = 2, SRC = 7, TOPK = 2 };

/* Rows per expert: expert 2 gets none. */
static const int64_t offsets[E + 1] = {0, 3, 5, 5, 9};

static void check(moe_dtype dt, int gathered, int parts)
{
    uint64_t seed = 0x51ed2701u + (uint64_t)dt * 3 + (uint64_t)gathered * 5 + (uint64_t)parts;
    const size_t es = moe_dtype_size(dt);
    const int64_t R = offsets[E], split = parts ? SPLIT : N;
    double *a = ref_doubles(SRC * TOPK * D), *b = ref_doubles(E * N * D);
    ref_fill(&seed, a, SRC * TOPK * D, -1.0, 1.0, dt);
    ref_fill(&seed, b, E * N * D, -1.0, 1.0, dt);
    void *ab = ref_alloc((size_t)(SRC * TOPK * D) * es), *c = ref_alloc((size_t)(R * N) * es);
    for (int64_t i = 0; i < SRC * TOPK * D; i++)
        ref_put(dt, ab, i, a[i]);
    /* b as parts: part 0 rows [0, split), part 1 rows [split, N), one allocation per expert */
    void *p0[E], *p1[E];
    for (int e = 0; e < E; e++) {
        p0[e] = ref_alloc((size_t)(split * D) * es);
        p1[e] = ref_alloc((size_t)((N - split) * D + 1) * es);
        for (int64_t n = 0; n < N; n++)
            for (int64_t j = 0; j < D; j++)
                ref_put(dt, n < split ? p0[e] : p1[e], (n < split ? n : n - split) * D + j,
                        b[(e * N + n) * D + j]);
    }
    int32_t gather[9] = {13, 0, 6, 7, 2, 11, 5, 1, 12}; /* slots; source row = slot / TOPK */
    struct moe_gemm g = {dt,      E,        N,    D,  R, ab, D, gathered ? gather : NULL, TOPK,
                         offsets, {{0}, {0}}, split, c, N, NULL};
    g.b[0] = (struct moe_mats){(void *const *)p0, NULL, 0, D, 1};
    g.b[1] = (struct moe_mats){(void *const *)p1, NULL, 0, D, 1};
    cr_assert_eq(moe_grouped_gemm_cpu(&g), MOE_OK);
    double worst = 0.0, scale = 0.0;
    for (int e = 0; e < E; e++)
        for (int64_t r = offsets[e]; r < offsets[e + 1]; r++) {
            const int64_t src = gathered ? gather[r] / TOPK : r;
            for (int64_t n = 0; n < N; n++) {
                double want = 0.0;
                for (int64_t j = 0; j < D; j++)
                    want += a[src * D + j] * b[(e * N + n) * D + j];
                const double d = fabs(ref_get(dt, c, r * N + n) - want);
                worst = d > worst ? d : worst;
                scale = fabs(want) > scale ? fabs(want) : scale;
            }
        }
    cr_expect(worst / scale <= moe_tol(dt), "%s gathered=%d parts=%d: rel err %g",
              ref_dtype_name(dt), gathered, parts, worst / scale);
    for (int e = 0; e < E; e++) {
        free(p0[e]);
        free(p1[e]);
    }
    free(a);
    free(b);
    free(ab);
    free(c);
}

Test(kernels_grouped_gemm, gathered_rows_match_fp64)
{
    for (int dt = MOE_F32; dt <= MOE_F16; dt++)
        check((moe_dtype)dt, 1, 0);
}

Test(kernels_grouped_gemm, packed_rows_match_fp64)
{
    for (int dt = MOE_F32; dt <= MOE_F16; dt++)
        check((moe_dtype)dt, 0, 0);
}

Test(kernels_grouped_gemm, two_operand_parts_match_fp64)
{
    for (int dt = MOE_F32; dt <= MOE_F16; dt++)
        check((moe_dtype)dt, 1, 1);
}

Test(kernels_grouped_gemm, bad_arguments_are_refused)
{
    struct moe_gemm g = {MOE_F32, E, N, D, 0, NULL, D, NULL, 1, offsets, {{0}, {0}}, N, NULL, N,
                         NULL};
    cr_expect_eq(moe_grouped_gemm_cpu(&g), MOE_EINVAL);
    cr_expect_eq(moe_grouped_gemm_cpu(NULL), MOE_EINVAL);
}
