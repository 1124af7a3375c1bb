/*
 * kernels/cpu/combine.c — the weighted sum of each token's K expert outputs.
 * Design choice: one fp32 accumulator per output element, summed in k order, then a single rounding
 * to the block's dtype; block.c reuses the fp32 half so that the shared expert is added before that
 * one rounding.
 */
#include "cpu.h"
#include "dtype.h"

void moe__combine_f32(int64_t T, int K, int64_t H, const float *out, const int32_t *inv,
                      const float *w, float *y32)
{
    for (int64_t t = 0; t < T; t++) {
        float *y = y32 + t * H;
        for (int64_t h = 0; h < H; h++)
            y[h] = 0.0f;
        for (int k = 0; k < K; k++) {
            float wk = w[t * K + k];
            const float *o = out + (int64_t)inv[t * K + k] * H;
            for (int64_t h = 0; h < H; h++)
                y[h] += wk * o[h];
        }
    }
}

int moe_combine_cpu(int64_t T, int K, int64_t H, const float *out, const int32_t *inv,
                    const float *w, moe_dtype dt, void *y)
{
    if (T < 0 || K < 1 || H < 1 || !moe__dtype_valid(dt) || (T > 0 && (!out || !inv || !w || !y)))
        return MOE_EINVAL;
    for (int64_t s = 0; s < T * K; s++)
        if (inv[s] < 0 || inv[s] >= T * K)
            return MOE_EINVAL;
    float *row = moe__alloc((size_t)H, sizeof(float));
    if (!row)
        return MOE_ENOMEM;
    for (int64_t t = 0; t < T; t++) {
        moe__combine_f32(1, K, H, out, inv + t * K, w + t * K, row);
        moe__store_row(dt, (char *)y + t * H * (int64_t)moe_dtype_size(dt), H, row);
    }
    free(row);
    return MOE_OK;
}
