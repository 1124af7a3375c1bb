/*
 * tests/c/test_kernels_dtype.c — the CPU backend's fp32 <-> bf16 / fp16 conversions
 * (kernels/cpu/dtype.h): exact bit patterns at the edges, round-to-nearest-even on ties, and an
 * exhaustive round trip of every 16-bit pattern.
 */
#include <math.h>

#include <criterion/criterion.h>

#include "../../kernels/cpu/dtype.h"

/* The float64 value of fp16 bits, computed from the definition (independent of dtype.h). */
static double f16_value(uint16_t h)
{
    int exp = (h >> 10) & 0x1f, mant = h & 0x3ff;
    double sign = (h & 0x8000) ? -1.0 : 1.0;
    if (exp == 0)
        return sign * ldexp(mant, -24);
    if (exp == 31)
        return mant ? NAN : sign * INFINITY;
    return sign * ldexp(1024 + mant, exp - 25);
}

Test(kernels_dtype, f16_known_bit_patterns)
{
    cr_expect_eq(moe__f32_to_f16(1.0f), 0x3c00);
    cr_expect_eq(moe__f32_to_f16(-2.0f), 0xc000);
    cr_expect_eq(moe__f32_to_f16(65504.0f), 0x7bff);
    cr_expect_eq(moe__f32_to_f16(65519.0f), 0x7bff);
    cr_expect_eq(moe__f32_to_f16(65520.0f), 0x7c00, "halfway above the largest finite is inf");
    cr_expect_eq(moe__f32_to_f16(INFINITY), 0x7c00);
    cr_expect_eq(moe__f32_to_f16(-INFINITY), 0xfc00);
    cr_expect_eq(moe__f32_to_f16(0x1p-14f), 0x0400, "smallest normal");
    cr_expect_eq(moe__f32_to_f16(0x1p-24f), 0x0001, "smallest subnormal");
    cr_expect_eq(moe__f32_to_f16(0x1p-25f), 0x0000, "tie between 0 and 2^-24 goes to even 0");
    cr_expect_eq(moe__f32_to_f16(0x1.8p-24f), 0x0002, "tie 1.5 units goes to even 2");
    cr_expect_eq(moe__f32_to_f16(-0.0f), 0x8000);
    cr_expect_eq(moe__f32_to_f16(1.0f + 0x1p-11f), 0x3c00, "tie rounds down to even");
    cr_expect_eq(moe__f32_to_f16(1.0f + 0x1.8p-10f), 0x3c02, "tie rounds up to even");
    cr_expect_eq(moe__f32_to_f16(1.0f + 0x1.01p-11f), 0x3c01, "above the tie rounds up");
    uint16_t n = moe__f32_to_f16(NAN);
    cr_expect((n & 0x7c00) == 0x7c00 && (n & 0x3ff) != 0, "NaN stays NaN");
}

Test(kernels_dtype, bf16_known_bit_patterns)
{
    cr_expect_eq(moe__f32_to_bf16(1.0f), 0x3f80);
    cr_expect_eq(moe__f32_to_bf16(-3.0f), 0xc040);
    cr_expect_eq(moe__f32_to_bf16(1.0f + 0x1p-8f), 0x3f80, "tie rounds down to even");
    cr_expect_eq(moe__f32_to_bf16(1.0f + 0x1.8p-7f), 0x3f82, "tie rounds up to even");
    cr_expect_eq(moe__f32_to_bf16(1.0f + 0x1.02p-8f), 0x3f81, "above the tie rounds up");
    cr_expect_eq(moe__f32_to_bf16(0x1.fffffep127f), 0x7f80, "overflow rounds to inf");
    cr_expect_eq(moe__f32_to_bf16(INFINITY), 0x7f80);
    uint16_t n = moe__f32_to_bf16(moe__bits_f32(0x7f800001u));
    cr_expect((n & 0x7f80) == 0x7f80 && (n & 0x7f) != 0, "a NaN with only low payload stays NaN");
}

Test(kernels_dtype, f16_every_pattern_decodes_exactly_and_round_trips)
{
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = moe__f16_to_f32((uint16_t)h);
        double want = f16_value((uint16_t)h);
        if (isnan(want)) {
            cr_assert(isnan(f), "0x%04x", h);
            continue;
        }
        cr_assert_eq((double)f, want, "0x%04x decodes to %g, not %g", h, (double)f, want);
        if (h != 0x8000u || signbit(f))
            cr_assert_eq(moe__f32_to_f16(f), h, "0x%04x does not round trip", h);
    }
}

Test(kernels_dtype, bf16_every_pattern_round_trips)
{
    for (uint32_t h = 0; h < 0x10000u; h++) {
        float f = moe__bf16_to_f32((uint16_t)h);
        if (isnan(f))
            continue;
        cr_assert_eq(moe__f32_to_bf16(f), h, "0x%04x does not round trip", h);
    }
}

/* Between two neighbouring fp16 values every fp32 goes to the nearer one. */
Test(kernels_dtype, f16_rounds_to_nearest)
{
    for (uint32_t h = 0x0001u; h < 0x7bffu; h += 7) {
        double lo = f16_value((uint16_t)h), hi = f16_value((uint16_t)(h + 1));
        float below = (float)(lo + (hi - lo) * 0.49), above = (float)(lo + (hi - lo) * 0.51);
        cr_assert_eq(moe__f32_to_f16(below), h, "0x%04x", h);
        cr_assert_eq(moe__f32_to_f16(above), h + 1, "0x%04x", h);
    }
}

Test(kernels_dtype, generic_load_store_by_dtype)
{
    uint16_t b[1];
    float f[1];
    moe__store(MOE_BF16, b, 0, 1.5f);
    cr_expect_eq(b[0], 0x3fc0);
    cr_expect_eq(moe__load(MOE_BF16, b, 0), 1.5f);
    moe__store(MOE_F16, b, 0, 1.5f);
    cr_expect_eq(b[0], 0x3e00);
    cr_expect_eq(moe__load(MOE_F16, b, 0), 1.5f);
    moe__store(MOE_F32, f, 0, 0.1f);
    cr_expect_eq(moe__load(MOE_F32, f, 0), 0.1f);
}
