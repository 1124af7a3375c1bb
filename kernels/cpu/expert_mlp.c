/*
 * kernels/cpu/expert_mlp.c — the SwiGLU MLP of one expert (forward and backward of one row) and the
 * grouped forward over all experts (moe_expert_mlp_cpu).
 * Design choice: an expert's three matrices are unpacked once to dense row-major fp32
 * (struct moe__expert), whatever their dtype, pointer-array or 3-D base, and strides (transposed
 * layouts are just swapped strides); weight grads are accumulated in the same form and written back
 * through the same addressing, so only unpack/store know about layouts.
 */
#include <string.h>

#include "cpu.h"
#include "dtype.h"

static int mats_valid(const struct moe_mats *m, int n)
{
    if (m->ptr) {
        for (int e = 0; e < n; e++)
            if (!m->ptr[e])
                return 0;
        return 1;
    }
    return m->base != NULL;
}

int moe__mlp_valid(const struct moe_mlp *m)
{
    return m->n >= 1 && m->H >= 1 && m->I >= 1 && mats_valid(&m->gate, m->n) &&
           mats_valid(&m->up, m->n) && mats_valid(&m->down, m->n);
}

/* Address of element (0, 0) of expert e's matrix. */
static char *mat_base(const struct moe_mats *m, moe_dtype dt, int e)
{
    if (m->ptr)
        return (char *)m->ptr[e];
    return (char *)m->base + m->es * (int64_t)e * (int64_t)moe_dtype_size(dt);
}

static void unpack_mat(const struct moe_mats *m, moe_dtype dt, int e, int64_t R, int64_t C,
                       float *dst)
{
    const char *b = mat_base(m, dt, e);
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++)
            dst[r * C + c] = moe__load(dt, b, r * m->rs + c * m->cs);
}

static void store_mat(const struct moe_mats *m, moe_dtype dt, int e, int64_t R, int64_t C,
                      const float *src)
{
    char *b = mat_base(m, dt, e);
    for (int64_t r = 0; r < R; r++)
        for (int64_t c = 0; c < C; c++)
            moe__store(dt, b, r * m->rs + c * m->cs, src[r * C + c]);
}

int moe__expert_alloc(struct moe__expert *x, int64_t H, int64_t I)
{
    x->H = H;
    x->I = I;
    x->gate = moe__alloc((size_t)(I * H), sizeof(float));
    x->up = moe__alloc((size_t)(I * H), sizeof(float));
    x->down = moe__alloc((size_t)(H * I), sizeof(float));
    if (x->gate && x->up && x->down)
        return MOE_OK;
    moe__expert_free(x);
    return MOE_ENOMEM;
}

void moe__expert_free(struct moe__expert *x)
{
    free(x->gate);
    free(x->up);
    free(x->down);
    x->gate = x->up = x->down = NULL;
}

void moe__expert_zero(struct moe__expert *x)
{
    size_t n = (size_t)(x->I * x->H) * sizeof(float);
    memset(x->gate, 0, n);
    memset(x->up, 0, n);
    memset(x->down, 0, n);
}

void moe__expert_unpack(struct moe__expert *x, const struct moe_mlp *m, moe_dtype dt, int e)
{
    unpack_mat(&m->gate, dt, e, x->I, x->H, x->gate);
    unpack_mat(&m->up, dt, e, x->I, x->H, x->up);
    unpack_mat(&m->down, dt, e, x->H, x->I, x->down);
}

void moe__expert_store(const struct moe__expert *x, const struct moe_mlp *m, moe_dtype dt, int e)
{
    store_mat(&m->gate, dt, e, x->I, x->H, x->gate);
    store_mat(&m->up, dt, e, x->I, x->H, x->up);
    store_mat(&m->down, dt, e, x->H, x->I, x->down);
}

int moe__row_alloc(struct moe__row *r, int64_t H, int64_t I)
{
    /* one block: xin, dxin [H] and the six [I] vectors */
    float *b = moe__alloc((size_t)(2 * H + 6 * I), sizeof(float));
    r->xin = b;
    if (!b)
        return MOE_ENOMEM;
    r->dxin = b + H;
    r->g = b + 2 * H;
    r->u = r->g + I;
    r->a = r->u + I;
    r->da = r->a + I;
    r->dg = r->da + I;
    r->du = r->dg + I;
    return MOE_OK;
}

void moe__row_free(struct moe__row *r)
{
    free(r->xin);
    r->xin = NULL;
}

void moe__expert_row_forward(const struct moe__expert *x, struct moe__row *r, float *out)
{
    int64_t H = x->H, I = x->I;
    for (int64_t i = 0; i < I; i++) {
        r->g[i] = moe__dot(x->gate + i * H, r->xin, H);
        r->u[i] = moe__dot(x->up + i * H, r->xin, H);
        r->a[i] = r->g[i] * moe__sigmoid(r->g[i]) * r->u[i];
    }
    for (int64_t h = 0; h < H; h++)
        out[h] = moe__dot(x->down + h * I, r->a, I);
}

void moe__expert_row_backward(const struct moe__expert *x, struct moe__expert *grad,
                              struct moe__row *r, const float *d_out)
{
    int64_t H = x->H, I = x->I;
    /* out = down · a:  d_down += d_out aᵀ,  da = downᵀ d_out */
    memset(r->da, 0, (size_t)I * sizeof(float));
    for (int64_t h = 0; h < H; h++) {
        const float *wd = x->down + h * I;
        float *gd = grad->down + h * I;
        for (int64_t i = 0; i < I; i++) {
            gd[i] += d_out[h] * r->a[i];
            r->da[i] += wd[i] * d_out[h];
        }
    }
    /* a = silu(g) · u, silu'(g) = σ(g) · (1 + g · (1 − σ(g))) */
    for (int64_t i = 0; i < I; i++) {
        float sg = moe__sigmoid(r->g[i]);
        r->du[i] = r->da[i] * r->g[i] * sg;
        r->dg[i] = r->da[i] * r->u[i] * sg * (1.0f + r->g[i] * (1.0f - sg));
    }
    /* g = gate · x, u = up · x:  d_gate += dg xᵀ, d_up += du xᵀ, dx = gateᵀ dg + upᵀ du */
    memset(r->dxin, 0, (size_t)H * sizeof(float));
    for (int64_t i = 0; i < I; i++) {
        const float *wg = x->gate + i * H, *wu = x->up + i * H;
        float *gg = grad->gate + i * H, *gu = grad->up + i * H;
        for (int64_t h = 0; h < H; h++) {
            gg[h] += r->dg[i] * r->xin[h];
            gu[h] += r->du[i] * r->xin[h];
            r->dxin[h] += wg[h] * r->dg[i] + wu[h] * r->du[i];
        }
    }
}

int moe_expert_mlp_cpu(const struct moe_mlp *m, moe_dtype dt, const void *x, int64_t x_rs, int K,
                       const int64_t *offsets, const int32_t *perm, float *h, float *out)
{
    if (!m || !moe__mlp_valid(m) || !moe__dtype_valid(dt) || K < 1 || !offsets)
        return MOE_EINVAL;
    int64_t rows = offsets[m->n];
    if (rows > 0 && (!x || !perm || !out))
        return MOE_EINVAL;
    int64_t H = m->H, I = m->I;
    size_t esz = moe_dtype_size(dt);
    struct moe__expert ex;
    struct moe__row r;
    if (moe__expert_alloc(&ex, H, I) != MOE_OK)
        return MOE_ENOMEM;
    if (moe__row_alloc(&r, H, I) != MOE_OK) {
        moe__expert_free(&ex);
        return MOE_ENOMEM;
    }
    for (int e = 0; e < m->n; e++) {
        if (offsets[e + 1] == offsets[e])
            continue; /* no token: its weights are never read */
        moe__expert_unpack(&ex, m, dt, e);
        for (int64_t row = offsets[e]; row < offsets[e + 1]; row++) {
            int64_t t = perm[row] / K;
            moe__load_row(dt, (const char *)x + t * x_rs * (int64_t)esz, H, r.xin);
            moe__expert_row_forward(&ex, &r, out + row * H);
            if (h) {
                memcpy(h + row * 2 * I, r.g, (size_t)I * sizeof(float));
                memcpy(h + row * 2 * I + I, r.u, (size_t)I * sizeof(float));
            }
        }
    }
    moe__row_free(&r);
    moe__expert_free(&ex);
    return MOE_OK;
}
