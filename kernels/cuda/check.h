/*
 * kernels/cuda/check.h — the one checking macro for CUDA runtime and cuBLAS calls, and the
 * per-thread record of the last failure. A failed call records "statement (error) at file:line"
 * and makes the enclosing function return MOE_ECUDA or MOE_ECUBLAS: library code never aborts.
 */
#ifndef MOE_CUDA_CHECK_H
#define MOE_CUDA_CHECK_H

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "../moe.h"

/* Records a failure (printf-style detail) as the thread's last error; returns code. */
int moe__fail(int code, const char *file, int line, const char *stmt, const char *detail);

static inline const char *moe__status_text(cudaError_t e)
{
    return cudaGetErrorString(e);
}

static inline const char *moe__status_text(cublasStatus_t s)
{
    return cublasGetStatusString(s);
}

static inline bool moe__status_ok(cudaError_t e)
{
    return e == cudaSuccess;
}

static inline bool moe__status_ok(cublasStatus_t s)
{
    return s == CUBLAS_STATUS_SUCCESS;
}

static inline int moe__status_code(cudaError_t)
{
    return MOE_ECUDA;
}

static inline int moe__status_code(cublasStatus_t)
{
    return MOE_ECUBLAS;
}

/* MOE_CHECK(cudaMemsetAsync(...)); MOE_CHECK(cublasGemmEx(...)); — returns from the caller on
 * error. */
#define MOE_CHECK(stmt)                                                                            \
    do {                                                                                           \
        auto moe__s = (stmt);                                                                      \
        if (!moe__status_ok(moe__s))                                                               \
            return moe__fail(moe__status_code(moe__s), __FILE__, __LINE__, #stmt,                  \
                             moe__status_text(moe__s));                                            \
    } while (0)

/* After a kernel launch: a bad configuration shows up here, not at the launch itself. */
#define MOE_CHECK_LAUNCH() MOE_CHECK(cudaGetLastError())

/* Propagates a negative return code of an internal step unchanged. */
#define MOE_TRY(expr)                                                                              \
    do {                                                                                           \
        int moe__r = (expr);                                                                       \
        if (moe__r != MOE_OK)                                                                      \
            return moe__r;                                                                         \
    } while (0)

/* Input validation failure: records where, returns MOE_EINVAL (or the given code). */
#define MOE_REQUIRE(cond, code)                                                                    \
    do {                                                                                           \
        if (!(cond))                                                                               \
            return moe__fail((code), __FILE__, __LINE__, #cond, "requirement not met");            \
    } while (0)

/* The calling thread's cuBLAS handle for the current device, created on first use. */
int moe__cublas_handle(cublasHandle_t *out);

#endif /* MOE_CUDA_CHECK_H */
