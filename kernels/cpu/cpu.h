/*
 * kernels/cpu/cpu.h — internal helpers shared by the CPU reference backend's files (route.c,
 * permute.c, expert_mlp.c, combine.c, block.c). Nothing here is exported.
 * Design choice: one expert is handled at a time through struct moe__expert, its three matrices
 * unpacked to dense row-major fp32 once, so the strided / pointer-array / dtype cases are resolved
 * in one place and every loop after that runs on contiguous floats in a fixed (deterministic)
 * order.
 */
#ifndef MOE_CPU_H
#define MOE_CPU_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "../moe.h"

/* malloc of n elements, NULL on overflow or failure; n == 0 still returns a unique pointer so that
   NULL always means "out of memory". */
static inline void *moe__alloc(size_t n, size_t size)
{
    if (n == 0)
        n = 1;
    if (n > SIZE_MAX / size)
        return NULL;
    return malloc(n * size);
}

static inline int moe__dtype_valid(moe_dtype dt)
{
    return dt == MOE_F32 || dt == MOE_BF16 || dt == MOE_F16;
}

static inline float moe__sigmoid(float v)
{
    return 1.0f / (1.0f + expf(-v));
}

static inline float moe__dot(const float *a, const float *b, int64_t n)
{
    float s = 0.0f;
    for (int64_t i = 0; i < n; i++)
        s += a[i] * b[i];
    return s;
}

/* ---- route.c ---- */
int moe__route_cfg_valid(const struct moe_route_cfg *c);

/* ---- permute.c ---- */
/* inv[perm[r]] = r for the n rows. */
void moe__invert_perm(int64_t n, const int32_t *perm, int32_t *inv);

/* ---- combine.c ---- */
/* y32[t] = Σ_k w[t, k] · out[inv[t*K + k]] in fp32, k in order; y32 is overwritten. */
void moe__combine_f32(int64_t T, int K, int64_t H, const float *out, const int32_t *inv,
                      const float *w, float *y32);

/* ---- expert_mlp.c ---- */
/* Non-zero when every projection of m is addressable and H, I > 0. */
int moe__mlp_valid(const struct moe_mlp *m);

/* One expert, dense fp32: gate, up [I, H]; down [H, I]. Also the fp32 accumulator of its grads. */
struct moe__expert {
    int64_t H, I;
    float *gate, *up, *down;
};

int moe__expert_alloc(struct moe__expert *x, int64_t H, int64_t I);
void moe__expert_free(struct moe__expert *x);
void moe__expert_zero(struct moe__expert *x);
/* Expert e of m (dtype dt, any strides) -> x. */
void moe__expert_unpack(struct moe__expert *x, const struct moe_mlp *m, moe_dtype dt, int e);
/* x -> expert e of m, rounded to dt. */
void moe__expert_store(const struct moe__expert *x, const struct moe_mlp *m, moe_dtype dt, int e);

/* Scratch for one row of an expert's forward and backward (all fp32). */
struct moe__row {
    float *xin;          /* [H] the token's input */
    float *g, *u, *a;    /* [I] gate, up pre-activations and silu(g) * u */
    float *da, *dg, *du; /* [I] */
    float *dxin;         /* [H] */
};

int moe__row_alloc(struct moe__row *r, int64_t H, int64_t I);
void moe__row_free(struct moe__row *r);

/* r->g, r->u, r->a and out [H] from r->xin. */
void moe__expert_row_forward(const struct moe__expert *x, struct moe__row *r, float *out);
/* Backward of one row given d_out [H], after moe__expert_row_forward on the same r: accumulates the
   weight grads into grad and writes r->dxin (the row's input grad). */
void moe__expert_row_backward(const struct moe__expert *x, struct moe__expert *grad,
                              struct moe__row *r, const float *d_out);

#endif /* MOE_CPU_H */
