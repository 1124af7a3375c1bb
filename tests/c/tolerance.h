/*
 * tests/c/tolerance.h — the accuracy contract shared by the C and the Python tests: the largest
 * allowed relative error per dtype, against a float64 reference. The Python tests parse the
 * "#define MOE_TOL_<DTYPE> <number>" lines, so keep them that simple.
 * Design choice: the error is normwise (max |got - ref| over max |ref|), so that near-zero
 * elements of a tensor do not demand impossible per-element relative accuracy.
 */
#ifndef MOE_TEST_TOLERANCE_H
#define MOE_TEST_TOLERANCE_H

#include <math.h>
#include <stddef.h>

#define MOE_TOL_F32 1e-5
#define MOE_TOL_BF16 1e-2
#define MOE_TOL_F16 1e-2

/* Tolerance for a dtype code of kernels/moe.h (0 fp32, 1 bf16, 2 fp16). */
static inline double moe_tol(int dtype)
{
    return dtype == 1 ? MOE_TOL_BF16 : dtype == 2 ? MOE_TOL_F16 : MOE_TOL_F32;
}

/* max_i |got_i - ref_i| / max_i |ref_i|; a NaN anywhere in got gives +inf (unwritten output).
   An all-zero ref compares absolutely. */
static inline double moe_rel_err(const double *got, const double *ref, size_t n)
{
    double err = 0.0, scale = 0.0;
    for (size_t i = 0; i < n; i++) {
        if (isnan(got[i]) || isnan(ref[i]))
            return INFINITY;
        double d = fabs(got[i] - ref[i]);
        err = d > err ? d : err;
        scale = fabs(ref[i]) > scale ? fabs(ref[i]) : scale;
    }
    return scale > 0.0 ? err / scale : err;
}

#endif /* MOE_TEST_TOLERANCE_H */
