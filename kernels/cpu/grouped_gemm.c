/*
 * kernels/cpu/grouped_gemm.c — the reference for the grouped GEMM over experts
 * (moe_grouped_gemm_cpu): the same function as the Hopper engine, one dot product per output
 * element, fp32 accumulation in j order. It exists so that the CUDA kernel is checked alone.
 */
#include "cpu.h"
#include "dtype.h"

/* Element (n, j) of expert e's operand, rows n >= n_split from b[1]. */
static float b_elem(const struct moe_gemm *g, int e, int64_t n, int64_t j)
{
    const struct moe_mats *b = &g->b[n >= g->n_split];
    const int64_t row = n >= g->n_split ? n - g->n_split : n;
    const char *base = b->ptr ? (const char *)b->ptr[e]
                              : (const char *)b->base +
                                    b->es * (int64_t)e * (int64_t)moe_dtype_size(g->dtype);
    return moe__load(g->dtype, base, row * b->rs + j * b->cs);
}

int moe_grouped_gemm_cpu(const struct moe_gemm *g)
{
    if (!g || !g->offsets || !g->a || !g->c || g->E < 1 || g->N < 1 || g->D < 1 ||
        g->n_split < 0 || g->n_split > g->N || (g->gather && g->gather_div < 1))
        return MOE_EINVAL;
    for (int e = 0; e < g->E; e++)
        for (int64_t r = g->offsets[e]; r < g->offsets[e + 1]; r++) {
            const int64_t src = g->gather ? g->gather[r] / g->gather_div : r;
            for (int64_t n = 0; n < g->N; n++) {
                float acc = 0.0f;
                for (int64_t j = 0; j < g->D; j++)
                    acc += moe__load(g->dtype, g->a, src * g->a_rs + j) * b_elem(g, e, n, j);
                moe__store(g->dtype, g->c, r * g->c_rs + n, acc);
            }
        }
    return MOE_OK;
}
