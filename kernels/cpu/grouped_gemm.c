/*
 * kernels/cpu/grouped_gemm.c — the reference for the grouped GEMM over experts
 * (moe_grouped_gemm_cpu, both varlen-M and varlen-K): the same function as the Hopper engine, one
 * dot product per output element, fp32 accumulation in reduction order. It exists so that the CUDA
 * kernel can be checked alone.
 */
#include "cpu.h"
#include "dtype.h"

/* Element (x, k) of operand o for expert e; the global row is x (varlen-M) or k (varlen-K). */
static float op_elem(const struct moe_gemm *g, const struct moe_gemm_op *o, int e, int64_t x,
                     int64_t k)
{
    if (o->rows) {
        const int64_t row = g->varlen_k ? k : x, other = g->varlen_k ? x : k;
        const int64_t src = o->gather ? o->gather[row] / o->gather_div : row;
        return moe__load(g->dtype, o->base, src * o->rs + other);
    }
    const int64_t at = o->split_k ? k : x;
    const int part = at >= o->split;
    const struct moe_mats *m = &o->m[part];
    if (part) {
        if (o->split_k)
            k -= o->split;
        else
            x -= o->split;
    }
    const char *base =
        m->ptr ? (const char *)m->ptr[e]
               : (const char *)m->base + m->es * (int64_t)e * (int64_t)moe_dtype_size(g->dtype);
    return moe__load(g->dtype, base, x * m->rs + k * m->cs);
}

static int op_valid(const struct moe_gemm_op *o)
{
    if (o->rows)
        return o->base != NULL && (!o->gather || o->gather_div >= 1);
    return (o->m[0].ptr || o->m[0].base) && o->split >= 0;
}

static void varlen_m(const struct moe_gemm *g)
{
    for (int e = 0; e < g->E; e++)
        for (int64_t r = g->offsets[e]; r < g->offsets[e + 1]; r++)
            for (int64_t n = 0; n < g->N; n++) {
                float acc = 0.0f;
                for (int64_t k = 0; k < g->D; k++)
                    acc += op_elem(g, &g->a, e, r, k) * op_elem(g, &g->b, e, n, k);
                moe__store(g->dtype, g->c, r * g->c_rs + n, acc);
            }
}

/* act = silu(gate) · up of c's stored halves (the fused SwiGLU of moe_gemm.act) */
static void swiglu_rows(const struct moe_gemm *g)
{
    const int64_t I = g->N / 2;
    for (int64_t r = 0; r < g->offsets[g->E]; r++)
        for (int64_t i = 0; i < I; i++) {
            const float gv = moe__load(g->dtype, g->c, r * g->c_rs + i);
            const float uv = moe__load(g->dtype, g->c, r * g->c_rs + I + i);
            moe__store(g->dtype, g->act, r * g->act_rs + i, gv * moe__sigmoid(gv) * uv);
        }
}

static void varlen_k(const struct moe_gemm *g)
{
    for (int e = 0; e < g->E; e++)
        for (int64_t m = 0; m < g->M; m++) {
            const int part = m >= g->c_split;
            const struct moe_mats *cm = &g->cm[part];
            char *base = cm->ptr ? (char *)cm->ptr[e]
                                 : (char *)cm->base +
                                       cm->es * (int64_t)e * (int64_t)moe_dtype_size(g->dtype);
            const int64_t mm = part ? m - g->c_split : m;
            for (int64_t n = 0; n < g->N; n++) {
                float acc = 0.0f;
                for (int64_t r = g->offsets[e]; r < g->offsets[e + 1]; r++)
                    acc += op_elem(g, &g->a, e, m, r) * op_elem(g, &g->b, e, n, r);
                moe__store(g->dtype, base, mm * cm->rs + n * cm->cs, acc);
            }
        }
}

int moe_grouped_gemm_cpu(const struct moe_gemm *g)
{
    if (!g || !g->offsets || g->E < 1 || g->N < 1 || !op_valid(&g->a) || !op_valid(&g->b))
        return MOE_EINVAL;
    if (g->varlen_k) {
        if (g->M < 1 || (!g->cm[0].ptr && !g->cm[0].base) || g->c_split < 0)
            return MOE_EINVAL;
        varlen_k(g);
    } else {
        if (g->D < 1 || !g->c || (g->act && (g->N % 2 || g->b.split * 2 != g->N)))
            return MOE_EINVAL;
        varlen_m(g);
        if (g->act)
            swiglu_rows(g);
    }
    return MOE_OK;
}
