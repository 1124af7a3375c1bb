/*
 * kernels/cpu/dtype.h — fp32 <-> bf16 / fp16 conversions and dtype-generic loads and stores for the
 * CPU backend. Design choice: everything is plain integer bit manipulation (no _Float16, which
 * strict C11 does not promise), and every store rounds to nearest even, as torch's casts do.
 */
#ifndef MOE_CPU_DTYPE_H
#define MOE_CPU_DTYPE_H

#include <stdint.h>
#include <string.h>

#include "../moe.h"

static inline uint32_t moe__f32_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static inline float moe__bits_f32(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static inline float moe__bf16_to_f32(uint16_t h)
{
    return moe__bits_f32((uint32_t)h << 16);
}

static inline uint16_t moe__f32_to_bf16(float f)
{
    uint32_t u = moe__f32_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) /* NaN: keep it a (quiet) NaN, truncation could make inf */
        return (uint16_t)((u >> 16) | 0x0040u);
    /* Round to nearest even: add 0x7fff plus the lowest kept bit, then truncate. Overflow of the
       largest finite values carries into the exponent and correctly yields inf. */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float moe__f16_to_f32(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    uint32_t exp = (h >> 10) & 0x1fu;
    uint32_t mant = h & 0x3ffu;
    if (exp == 0) { /* zero or subnormal: mant * 2^-24 is exact in fp32 */
        float v = (float)mant * 0x1p-24f;
        return moe__bits_f32(moe__f32_bits(v) | sign);
    }
    if (exp == 31) /* inf or NaN, payload kept */
        return moe__bits_f32(sign | 0x7f800000u | (mant << 13));
    return moe__bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

static inline uint16_t moe__f32_to_f16(float f)
{
    uint32_t u = moe__f32_bits(f);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) /* NaN -> quiet NaN */
        return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) /* >= 65520: rounds to inf (65504 is the largest finite) */
        return (uint16_t)(sign | 0x7c00u);
    if (a < 0x38800000u) {
        /* Below the smallest normal (2^-14): adding 0.5f places the value's 2^-24 units in the low
           mantissa bits; the fp32 addition itself rounds to nearest even. */
        float v = moe__bits_f32(a) + 0.5f;
        return (uint16_t)(sign | (moe__f32_bits(v) - 0x3f000000u));
    }
    /* Normal: rebias the exponent (127 -> 15), then round the 13 dropped bits to nearest even. */
    a += (uint32_t)(15 - 127) << 23;
    a += 0xfffu + ((a >> 13) & 1u);
    return (uint16_t)(sign | (a >> 13));
}

/* Element i of a dtype array, as fp32. */
static inline float moe__load(moe_dtype dt, const void *p, int64_t i)
{
    switch (dt) {
    case MOE_BF16:
        return moe__bf16_to_f32(((const uint16_t *)p)[i]);
    case MOE_F16:
        return moe__f16_to_f32(((const uint16_t *)p)[i]);
    default:
        return ((const float *)p)[i];
    }
}

static inline void moe__store(moe_dtype dt, void *p, int64_t i, float v)
{
    switch (dt) {
    case MOE_BF16:
        ((uint16_t *)p)[i] = moe__f32_to_bf16(v);
        break;
    case MOE_F16:
        ((uint16_t *)p)[i] = moe__f32_to_f16(v);
        break;
    default:
        ((float *)p)[i] = v;
        break;
    }
}

/* n contiguous dtype elements -> fp32, and back. */
static inline void moe__load_row(moe_dtype dt, const void *src, int64_t n, float *dst)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = moe__load(dt, src, i);
}

static inline void moe__store_row(moe_dtype dt, void *dst, int64_t n, const float *src)
{
    for (int64_t i = 0; i < n; i++)
        moe__store(dt, dst, i, src[i]);
}

#endif /* MOE_CPU_DTYPE_H */
