/*
 * kernels/cuda/expert_mlp.cu — the expert MLP's pieces: the grouped GEMM engine
 * (cublasGemmGroupedBatchedEx), SwiGLU forward and backward, and zeroing of the weight grads of
 * experts that got no rows.
 *
 * Design choice: an operand is a logical matrix with element strides; the engine maps a unit
 * column stride to a transposed cuBLAS operand and a unit row stride to a plain one (and a
 * row-major C to the transposed product), so ModuleList, 3-D and transposed 3-D weights are read
 * and written in place. Per-group sizes live in host arrays (from the host counts); the A/B/C
 * pointer arrays are written on the device from moe_mats and the device offsets.
 */
#include <stdlib.h>

#include "internal.h"

/* ---- grouped GEMM ---- */

struct gg_ptr_args {
    struct moe__gg_operand op[MOE_GG_MAX_PARTS][3];
    int n_parts;
};

static __device__ char *operand_ptr(const struct moe__gg_operand &o, int e, const int64_t *offsets,
                                    int64_t elt)
{
    const char *p;
    if (o.rows)
        p = (const char *)o.base + (offsets ? offsets[e] : 0) * o.step * elt;
    else
        p = o.ptr ? (const char *)o.ptr[e] : (const char *)o.base + e * o.es * elt;
    return (char *)p + o.off * elt;
}

/* arr[(which * n_parts + part) * nz + j] for the j-th expert with rows; which: 0 A, 1 B, 2 C. */
static __global__ void gg_ptr_kernel(struct gg_ptr_args a, int n, int nz, const int64_t *counts,
                                     const int64_t *offsets, int64_t elt, void **arr)
{
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        if (counts && counts[e] == 0)
            continue;
        int j = 0;
        if (counts)
            for (int x = 0; x < e; x++)
                j += counts[x] != 0;
        else
            j = e;
        for (int p = 0; p < a.n_parts; p++)
            for (int w = 0; w < 3; w++)
                arr[(w * a.n_parts + p) * nz + j] = operand_ptr(a.op[p][w], e, offsets, elt);
    }
}

/* A logical [rows, cols] matrix with strides (rs, cs) as a column-major cuBLAS operand. */
static int as_operand(int64_t rs, int64_t cs, cublasOperation_t *op, int64_t *ld)
{
    if (rs == 1) {
        *op = CUBLAS_OP_N;
        *ld = cs;
    } else if (cs == 1) {
        *op = CUBLAS_OP_T;
        *ld = rs;
    } else {
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "as_operand",
                         "no unit stride in the matrix");
    }
    return MOE_OK;
}

struct gg_form { /* one part, in cuBLAS column-major terms */
    cublasOperation_t ta, tb;
    int64_t lda, ldb, ldc;
    int swap; /* C was row-major: computed as C^T = B^T A^T */
};

static int gg_form_of(const struct moe__gg_part *p, struct gg_form *f)
{
    int64_t ar = p->a.rs, ac = p->a.cs, br = p->b.rs, bc = p->b.cs;
    if (p->c.cs == 1) {
        f->swap = 1;
        f->ldc = p->c.rs;
        /* A' = B^T, B' = A^T: transposing a logical matrix swaps its strides. */
        MOE_TRY(as_operand(bc, br, &f->ta, &f->lda));
        MOE_TRY(as_operand(ac, ar, &f->tb, &f->ldb));
    } else if (p->c.rs == 1) {
        f->swap = 0;
        f->ldc = p->c.cs;
        MOE_TRY(as_operand(ar, ac, &f->ta, &f->lda));
        MOE_TRY(as_operand(br, bc, &f->tb, &f->ldb));
    } else {
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "gg_form_of",
                         "no unit stride in the output");
    }
    MOE_REQUIRE(f->lda <= INT32_MAX && f->ldb <= INT32_MAX && f->ldc <= INT32_MAX,
                MOE_EUNSUPPORTED);
    return MOE_OK;
}

static cudaDataType_t cuda_type(moe_dtype dt)
{
    return dt == MOE_F32 ? CUDA_R_32F : dt == MOE_BF16 ? CUDA_R_16BF : CUDA_R_16F;
}

struct gg_host { /* the host arrays of one cublasGemmGroupedBatchedEx call */
    cublasOperation_t *ta, *tb;
    int *m, *n, *k, *lda, *ldb, *ldc, *size;
    float *alpha, *beta;
};

static int gg_launch(const struct moe__gg_call *c, const struct gg_form *form, int nz, moe_dtype dt,
                     void **arr, cublasHandle_t h, cudaStream_t st)
{
    const int P = c->n_parts, G = P * nz;
    struct gg_ptr_args pa;
    pa.n_parts = P;
    for (int p = 0; p < P; p++) {
        pa.op[p][0] = c->part[p].a;
        pa.op[p][1] = c->part[p].b;
        pa.op[p][2] = c->part[p].c;
    }
    int threads = c->n_experts < 1024 ? c->n_experts : 1024;
    gg_ptr_kernel<<<1, threads, 0, st>>>(pa, c->n_experts, nz, c->counts_dev, c->offsets_dev,
                                         (int64_t)moe_dtype_size(dt), arr);
    MOE_CHECK_LAUNCH();

    size_t words = (size_t)G;
    char *mem = (char *)malloc(
        words * (2 * sizeof(cublasOperation_t) + 7 * sizeof(int) + 2 * sizeof(float)));
    MOE_REQUIRE(mem != NULL, MOE_ENOMEM);
    struct gg_host a;
    a.ta = (cublasOperation_t *)mem;
    a.tb = a.ta + G;
    a.m = (int *)(a.tb + G);
    a.n = a.m + G;
    a.k = a.n + G;
    a.lda = a.k + G;
    a.ldb = a.lda + G;
    a.ldc = a.ldb + G;
    a.size = a.ldc + G;
    a.alpha = (float *)(a.size + G);
    a.beta = a.alpha + G;
    int g = 0, bad = 0;
    for (int p = 0; p < P; p++) {
        const struct moe__gg_part *q = &c->part[p];
        for (int e = 0; e < c->n_experts; e++) {
            int64_t cnt = c->counts_host[e];
            if (cnt == 0)
                continue;
            int64_t M = q->M < 0 ? cnt : q->M, N = q->N < 0 ? cnt : q->N, K = q->K < 0 ? cnt : q->K;
            bad |= M > INT32_MAX || N > INT32_MAX || K > INT32_MAX;
            a.ta[g] = form[p].ta;
            a.tb[g] = form[p].tb;
            a.m[g] = (int)(form[p].swap ? N : M);
            a.n[g] = (int)(form[p].swap ? M : N);
            a.k[g] = (int)K;
            a.lda[g] = (int)form[p].lda;
            a.ldb[g] = (int)form[p].ldb;
            a.ldc[g] = (int)form[p].ldc;
            a.size[g] = 1;
            a.alpha[g] = 1.f;
            a.beta[g] = q->beta;
            g++;
        }
    }
    if (bad) {
        free(mem);
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "gg_launch", "dim over INT32_MAX");
    }
    /* Column-major A' and B' are (B, A) when C is row-major: the pointer arrays swap with them. */
    void **A = arr, **B = arr + G, **C = arr + 2 * G;
    cublasStatus_t s = CUBLAS_STATUS_SUCCESS;
    cudaDataType_t ty = cuda_type(dt);
    /* Parts of one call share the orientation (checked by the caller), so one swap serves all. */
    void **A1 = form[0].swap ? B : A, **B1 = form[0].swap ? A : B;
    s = cublasSetStream(h, st);
    if (s == CUBLAS_STATUS_SUCCESS)
        s = cublasGemmGroupedBatchedEx(h, a.ta, a.tb, a.m, a.n, a.k, a.alpha,
                                       (const void *const *)A1, ty, a.lda, (const void *const *)B1,
                                       ty, a.ldb, a.beta, C, ty, a.ldc, G, a.size,
                                       CUBLAS_COMPUTE_32F);
    free(mem);
    MOE_CHECK(s);
    return MOE_OK;
}

int moe__grouped_gemm(const struct moe__gg_call *c, moe_dtype dt, void **ptr_scratch,
                      cublasHandle_t h, cudaStream_t st)
{
    MOE_REQUIRE(c && c->n_experts > 0 && c->counts_host && ptr_scratch, MOE_EINVAL);
    MOE_REQUIRE(c->n_parts >= 1 && c->n_parts <= MOE_GG_MAX_PARTS, MOE_EINVAL);
    struct gg_form form[MOE_GG_MAX_PARTS];
    for (int p = 0; p < c->n_parts; p++) {
        MOE_TRY(gg_form_of(&c->part[p], &form[p]));
        MOE_REQUIRE(form[p].swap == form[0].swap, MOE_EUNSUPPORTED);
    }
    int nz = 0;
    for (int e = 0; e < c->n_experts; e++) {
        MOE_REQUIRE(c->counts_host[e] >= 0, MOE_EINVAL);
        nz += c->counts_host[e] != 0;
    }
    if (nz == 0)
        return MOE_OK;
    return gg_launch(c, form, nz, dt, ptr_scratch, h, st);
}

/* ---- zero grads of experts without rows ---- */

template <typename T>
static __global__ void zero_empty_kernel(struct moe_mats m, int64_t R, int64_t C,
                                         const int64_t *counts)
{
    const int e = blockIdx.y;
    if (counts && counts[e] != 0)
        return;
    T *p = m.ptr ? (T *)m.ptr[e] : (T *)m.base + e * m.es;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < R * C;
         i += (int64_t)gridDim.x * blockDim.x)
        p[(i / C) * m.rs + (i % C) * m.cs] = moe__from_f<T>(0.f);
}

static int zero_empty_launch(const struct moe_mats *m, int n, int64_t R, int64_t C,
                             const int64_t *counts, moe_dtype dt, cudaStream_t st)
{
    unsigned bx = moe__blocks(R * C, 256);
    bx = bx > 1024 ? 1024 : bx;
    dim3 grid(bx, (unsigned)n);
    MOE_DISPATCH(dt, (zero_empty_kernel<T><<<grid, 256, 0, st>>>(*m, R, C, counts)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__zero_empty_cuda(const struct moe_mats *m, int n, int64_t R, int64_t C,
                         const int64_t *counts_dev, moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(m && n > 0 && n <= 65535 && R >= 0 && C >= 0, MOE_EINVAL);
    MOE_REQUIRE(m->ptr || m->base, MOE_EINVAL);
    if (R * C == 0)
        return MOE_OK;
    return zero_empty_launch(m, n, R, C, counts_dev, dt, st);
}

/* ---- SwiGLU ---- */

static __device__ __forceinline__ float silu(float g)
{
    return g / (1.f + expf(-g));
}

template <typename T> static __global__ void swiglu_kernel(int64_t R, int64_t I, const T *h, T *a)
{
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < R * I;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t r = i / I, c = i % I;
        float g = moe__to_f(h[r * 2 * I + c]), u = moe__to_f(h[r * 2 * I + I + c]);
        a[i] = moe__from_f<T>(silu(g) * u);
    }
}

static int swiglu_launch(int64_t R, int64_t I, const void *h, void *a, moe_dtype dt,
                         cudaStream_t st)
{
    MOE_DISPATCH(dt, (swiglu_kernel<T>
                      <<<moe__blocks(R * I, 256), 256, 0, st>>>(R, I, (const T *)h, (T *)a)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__swiglu_cuda(int64_t R, int64_t I, const void *h, void *a, moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(R >= 0 && I > 0, MOE_EINVAL);
    if (R == 0)
        return MOE_OK;
    MOE_REQUIRE(h && a, MOE_EINVAL);
    return swiglu_launch(R, I, h, a, dt, st);
}

#define SWB_THREADS 256

/* One block per row: the dot product <a, dau> is a fixed-order block tree (deterministic). */
template <typename T>
static __global__ void swiglu_backward_kernel(int64_t I, const T *h, const T *dau,
                                              const int32_t *perm, const float *w, float *dw, T *dh,
                                              T *aw)
{
    __shared__ float red[SWB_THREADS];
    const int64_t r = blockIdx.x;
    const int64_t slot = perm ? perm[r] : r;
    const float v = w ? w[slot] : 1.f;
    const T *hr = h + r * 2 * I;
    float dot = 0.f;
    for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
        float g = moe__to_f(hr[c]), u = moe__to_f(hr[I + c]);
        float sg = 1.f / (1.f + expf(-g)), s = g * sg;
        float d = moe__to_f(dau[r * I + c]);
        dot += s * u * d;
        float da = v * d;
        dh[r * 2 * I + c] = moe__from_f<T>(da * u * sg * (1.f + g * (1.f - sg)));
        dh[r * 2 * I + I + c] = moe__from_f<T>(da * s);
        if (aw)
            aw[r * I + c] = moe__from_f<T>(v * s * u);
    }
    if (!dw)
        return;
    red[threadIdx.x] = dot;
    __syncthreads();
    for (int o = SWB_THREADS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o)
            red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        dw[slot] = red[0];
}

static int swiglu_backward_launch(int64_t R, int64_t I, const void *h, const void *dau,
                                  const int32_t *perm, const float *w, float *dw, void *dh,
                                  void *aw, moe_dtype dt, cudaStream_t st)
{
    MOE_DISPATCH(dt, (swiglu_backward_kernel<T><<<(unsigned)R, SWB_THREADS, 0, st>>>(
                         I, (const T *)h, (const T *)dau, perm, w, dw, (T *)dh, (T *)aw)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__swiglu_backward_cuda(int64_t R, int64_t I, const void *h, const void *dau,
                              const int32_t *perm, const float *w, float *dw, void *dh, void *aw,
                              moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(R >= 0 && R <= INT32_MAX && I > 0, MOE_EINVAL);
    if (R == 0)
        return MOE_OK;
    MOE_REQUIRE(h && dau && dh, MOE_EINVAL);
    return swiglu_backward_launch(R, I, h, dau, perm, w, dw, dh, aw, dt, st);
}
