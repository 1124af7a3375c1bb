/*
 * kernels/cuda/check.cu — the last-error record behind MOE_CHECK, and the cuBLAS handle cache.
 *
 * Design choice: both are thread-local. Forward and backward run on different threads under
 * autograd; a handle per (thread, device) needs no lock, and its stream is set on every call.
 * Handles live as long as the thread (a handle is cheap next to a training step).
 */
#include <stdio.h>

#include "check.h"

#define MOE_MAX_DEVICES 64

static __thread char last_error[512];
static __thread cublasHandle_t handles[MOE_MAX_DEVICES];

int moe__fail(int code, const char *file, int line, const char *stmt, const char *detail)
{
    snprintf(last_error, sizeof last_error, "%s:%d: %s: %s (%s)", file, line, stmt, detail,
             moe_strerror(code));
    return code;
}

extern "C" MOE_API const char *moe_last_error_cuda(void)
{
    return last_error;
}

int moe__cublas_handle(cublasHandle_t *out)
{
    int dev;
    MOE_CHECK(cudaGetDevice(&dev));
    MOE_REQUIRE(dev >= 0 && dev < MOE_MAX_DEVICES, MOE_EUNSUPPORTED);
    if (!handles[dev]) {
        cublasHandle_t h;
        MOE_CHECK(cublasCreate(&h));
        /* fp32 GEMMs stay true fp32 (no TF32): results within 1e-5 of the CPU reference. */
        MOE_CHECK(cublasSetMathMode(h, CUBLAS_DEFAULT_MATH));
        handles[dev] = h;
    }
    *out = handles[dev];
    return MOE_OK;
}
