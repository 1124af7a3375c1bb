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
#include <string.h>

#include "internal.h"

/* ---- grouped GEMM ---- */

struct gg_ptr_args {
    struct moe__gg_operand op[MOE_GG_MAX_PARTS][3];
    int n_parts;
};

static __device__ __host__ int64_t padded_count(int64_t c, int pad)
{
    return (c + pad - 1) / pad * pad;
}

static __device__ char *operand_ptr(const struct moe__gg_operand &o, int e, const int64_t *offsets,
                                    const int64_t *poffsets, int64_t elt)
{
    const char *p;
    if (o.rows) {
        const int64_t *starts = o.padded ? poffsets : offsets;
        p = (const char *)o.base + (starts ? starts[e] : 0) * o.step * elt;
    } else {
        p = o.ptr ? (const char *)o.ptr[e] : (const char *)o.base + e * o.es * elt;
    }
    return (char *)p + o.off * elt;
}

#define GG_PTR_THREADS 1024
#define GG_MAX_SMEM_EXPERTS 4096

/* arr[(which * n_parts + part) * nz + j] for the j-th expert with rows; which: 0 A, 1 B, 2 C.
   j counts the experts with rows before e; bucketed (pad > 0), the experts are ordered by padded
   count first (the host's group order), then by index. counts are staged in shared memory. */
static __global__ void gg_ptr_kernel(struct gg_ptr_args a, int n, int nz, const int64_t *counts,
                                     const int64_t *offsets, const int64_t *poffsets, int pad,
                                     int64_t elt, void **arr)
{
    __shared__ int64_t key[GG_MAX_SMEM_EXPERTS];
    if (counts)
        for (int e = threadIdx.x; e < n; e += blockDim.x)
            key[e] = pad > 0 ? padded_count(counts[e], pad) : counts[e];
    __syncthreads();
    for (int e = threadIdx.x; e < n; e += blockDim.x) {
        int j = e;
        if (counts) {
            const int64_t k = key[e];
            if (k == 0)
                continue;
            j = 0;
            if (pad > 0)
                for (int x = 0; x < n; x++)
                    j += key[x] != 0 && (key[x] < k || (key[x] == k && x < e));
            else
                for (int x = 0; x < e; x++)
                    j += key[x] != 0;
        }
        for (int p = 0; p < a.n_parts; p++)
            for (int w = 0; w < 3; w++)
                arr[(w * a.n_parts + p) * nz + j] =
                    operand_ptr(a.op[p][w], e, offsets, poffsets, elt);
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
    int64_t *key; /* [n experts]: the row count of each group (per part), ascending */
};

/* The host arrays live in one per-thread buffer that only grows: no allocation per call. */
static __thread char *gg_mem;
static __thread size_t gg_mem_bytes;

static int gg_host_arrays(int G, int n, struct gg_host *a)
{
    const size_t need =
        (size_t)G * (2 * sizeof(cublasOperation_t) + 7 * sizeof(int) + 2 * sizeof(float)) +
        sizeof(int64_t) * (size_t)n + 16;
    if (need > gg_mem_bytes) {
        char *m = (char *)realloc(gg_mem, need);
        MOE_REQUIRE(m != NULL, MOE_ENOMEM);
        gg_mem = m;
        gg_mem_bytes = need;
    }
    a->key = (int64_t *)gg_mem;
    a->ta = (cublasOperation_t *)(a->key + n);
    a->tb = a->ta + G;
    a->m = (int *)(a->tb + G);
    a->n = a->m + G;
    a->k = a->n + G;
    a->lda = a->k + G;
    a->ldb = a->lda + G;
    a->ldc = a->ldb + G;
    a->size = a->ldc + G;
    a->alpha = (float *)(a->size + G);
    a->beta = a->alpha + G;
    return MOE_OK;
}

static int cmp_i64(const void *x, const void *y)
{
    int64_t a = *(const int64_t *)x, b = *(const int64_t *)y;
    return (a > b) - (a < b);
}

/* Row count of each group, in group order, into key[0..ng) with multiplicities size[0..ng):
   one group per expert with rows, or (bucketed) one per distinct padded count, ascending. */
static int gg_groups(const struct moe__gg_call *c, int64_t *key, int *size)
{
    int m = 0;
    for (int e = 0; e < c->n_experts; e++) {
        int64_t cnt = c->counts_host[e];
        if (cnt != 0)
            key[m++] = c->bucket ? padded_count(cnt, c->pad) : cnt;
    }
    if (!c->bucket) {
        for (int g = 0; g < m; g++)
            size[g] = 1;
        return m;
    }
    qsort(key, (size_t)m, sizeof *key, cmp_i64);
    int ng = 0;
    for (int i = 0; i < m; i++) {
        if (ng > 0 && key[ng - 1] == key[i]) {
            size[ng - 1]++;
        } else {
            key[ng] = key[i];
            size[ng++] = 1;
        }
    }
    return ng;
}

static int gg_launch(const struct moe__gg_call *c, const struct gg_form *form, int nz, moe_dtype dt,
                     void **arr, cublasHandle_t h, cudaStream_t st)
{
    const int P = c->n_parts;
    struct gg_ptr_args pa;
    pa.n_parts = P;
    for (int p = 0; p < P; p++) {
        pa.op[p][0] = c->part[p].a;
        pa.op[p][1] = c->part[p].b;
        pa.op[p][2] = c->part[p].c;
    }
    int threads = c->n_experts < GG_PTR_THREADS ? c->n_experts : GG_PTR_THREADS;
    gg_ptr_kernel<<<1, threads, 0, st>>>(pa, c->n_experts, nz, c->counts_dev, c->offsets_dev,
                                         c->poffsets_dev, c->bucket ? c->pad : 0,
                                         (int64_t)moe_dtype_size(dt), arr);
    MOE_CHECK_LAUNCH();

    /* group sizes first (into the size array of part 0), then every part repeats them */
    struct gg_host a;
    memset(&a, 0, sizeof a);
    MOE_TRY(gg_host_arrays(P * nz, c->n_experts, &a));
    const int ng = gg_groups(c, a.key, a.size);
    const int G = P * ng;
    int g = 0, bad = 0;
    for (int p = 0; p < P; p++) {
        const struct moe__gg_part *q = &c->part[p];
        for (int i = 0; i < ng; i++) {
            int64_t cnt = a.key[i];
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
            a.size[g] = a.size[i];
            a.alpha[g] = 1.f;
            a.beta[g] = q->beta;
            g++;
        }
    }
    if (bad)
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "gg_launch", "dim over INT32_MAX");
    /* Column-major A' and B' are (B, A) when C is row-major: the pointer arrays swap with them.
       The arrays hold P * nz entries: part-major, each part in group order. */
    const int NZ = P * nz;
    void **A = arr, **B = arr + NZ, **C = arr + 2 * NZ;
    cudaDataType_t ty = cuda_type(dt);
    /* Parts of one call share the orientation (checked by the caller), so one swap serves all. */
    void **A1 = form[0].swap ? B : A, **B1 = form[0].swap ? A : B;
    MOE_CHECK(cublasSetStream(h, st));
    if (c->bucket || ng == 1) {
        /* One pointer-array batched GEMM per group: cuBLAS runs these as Hopper (sm90) kernels,
           where the grouped call picks CUTLASS sm80 ones for groups of several GEMMs or a single
           one (H100, CUDA 13: Ring-mini T=16384 fwd+bwd 12.6 ms grouped vs 9.6 ms batched). The
           grouped call stays for one GEMM per expert (a single launch where an inner dim is M). */
        for (int i = 0, at = 0; i < G; at += a.size[i], i++)
            MOE_CHECK(cublasGemmBatchedEx(h, a.ta[i], a.tb[i], a.m[i], a.n[i], a.k[i], &a.alpha[i],
                                          (const void *const *)(A1 + at), ty, a.lda[i],
                                          (const void *const *)(B1 + at), ty, a.ldb[i], &a.beta[i],
                                          C + at, ty, a.ldc[i], a.size[i], CUBLAS_COMPUTE_32F,
                                          CUBLAS_GEMM_DEFAULT));
        return MOE_OK;
    }
    MOE_CHECK(cublasGemmGroupedBatchedEx(
        h, a.ta, a.tb, a.m, a.n, a.k, a.alpha, (const void *const *)A1, ty, a.lda,
        (const void *const *)B1, ty, a.ldb, a.beta, C, ty, a.ldc, G, a.size, CUBLAS_COMPUTE_32F));
    return MOE_OK;
}

int moe__grouped_gemm(const struct moe__gg_call *c, moe_dtype dt, void **ptr_scratch,
                      cublasHandle_t h, cudaStream_t st)
{
    MOE_REQUIRE(c && c->n_experts > 0 && c->counts_host && ptr_scratch, MOE_EINVAL);
    MOE_REQUIRE(c->n_experts <= GG_MAX_SMEM_EXPERTS, MOE_EUNSUPPORTED);
    MOE_REQUIRE(c->n_parts >= 1 && c->n_parts <= MOE_GG_MAX_PARTS, MOE_EINVAL);
    MOE_REQUIRE(!c->bucket || (c->pad > 0 && c->counts_dev && c->poffsets_dev), MOE_EINVAL);
    struct gg_form form[MOE_GG_MAX_PARTS];
    for (int p = 0; p < c->n_parts; p++) {
        MOE_TRY(gg_form_of(&c->part[p], &form[p]));
        MOE_REQUIRE(form[p].swap == form[0].swap, MOE_EUNSUPPORTED);
        const struct moe__gg_operand *o[3] = {&c->part[p].a, &c->part[p].b, &c->part[p].c};
        for (int w = 0; w < 3; w++)
            MOE_REQUIRE(!o[w]->rows || !o[w]->padded || c->poffsets_dev, MOE_EINVAL);
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

/* ---- padded layout ---- */

/* One block: exclusive scan of the padded counts through shared memory, chunk by chunk. */
static __global__ void pad_offsets_kernel(int n, const int64_t *counts, const int64_t *offsets,
                                          int pad, int64_t *poffsets, int64_t *shift)
{
    __shared__ int64_t part[GG_PTR_THREADS];
    int64_t carry = 0;
    for (int base = 0; base < n; base += blockDim.x) {
        const int e = base + threadIdx.x;
        const int64_t v = e < n ? padded_count(counts[e], pad) : 0;
        part[threadIdx.x] = v;
        __syncthreads();
        for (int o = 1; o < (int)blockDim.x; o <<= 1) {
            int64_t add = threadIdx.x >= (unsigned)o ? part[threadIdx.x - o] : 0;
            __syncthreads();
            part[threadIdx.x] += add;
            __syncthreads();
        }
        if (e < n) {
            const int64_t at = carry + part[threadIdx.x] - v;
            poffsets[e] = at;
            shift[e] = at - offsets[e];
        }
        carry += part[blockDim.x - 1];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        poffsets[n] = carry;
}

int moe__pad_offsets_cuda(int n, const int64_t *counts_dev, const int64_t *offsets_dev, int pad,
                          int64_t *poffsets, int64_t *shift, cudaStream_t st)
{
    MOE_REQUIRE(n > 0 && pad > 0 && counts_dev && offsets_dev && poffsets && shift, MOE_EINVAL);
    pad_offsets_kernel<<<1, GG_PTR_THREADS, 0, st>>>(n, counts_dev, offsets_dev, pad, poffsets,
                                                     shift);
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int64_t moe__padded_rows(int n, const int64_t *counts_host, int pad)
{
    int64_t r = 0;
    for (int e = 0; e < n; e++)
        r += padded_count(counts_host[e], pad);
    return r;
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

/* Blocks per expert scale down with the number of empty experts: the blocks of experts with rows
   exit at once, and a few empty experts each get enough blocks to fill the GPU. */
static int zero_empty_launch(const struct moe_mats *m, int n, int64_t R, int64_t C,
                             const int64_t *counts, int n_empty, moe_dtype dt, cudaStream_t st)
{
    unsigned bx = moe__blocks(R * C, 256);
    unsigned cap = (unsigned)(2048 / n_empty);
    cap = cap < 1 ? 1 : cap > 1024 ? 1024 : cap;
    bx = bx > cap ? cap : bx;
    dim3 grid(bx, (unsigned)n);
    MOE_DISPATCH(dt, (zero_empty_kernel<T><<<grid, 256, 0, st>>>(*m, R, C, counts)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__zero_empty_cuda(const struct moe_mats *m, int n, int64_t R, int64_t C,
                         const int64_t *counts_dev, int n_empty, moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(m && n > 0 && n <= 65535 && R >= 0 && C >= 0 && n_empty >= 0, MOE_EINVAL);
    MOE_REQUIRE(m->ptr || m->base, MOE_EINVAL);
    if (R * C == 0 || n_empty == 0)
        return MOE_OK;
    return zero_empty_launch(m, n, R, C, counts_dev, n_empty, dt, st);
}

/* ---- SwiGLU ---- */

/* V consecutive columns per thread (16-byte accesses where I and the buffers allow, else 1) */
template <typename T, int V>
static __global__ void swiglu_kernel(int64_t R, int64_t I, const T *h, T *a)
{
    const int64_t IV = I / V;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < R * IV;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t r = i / IV, c = (i % IV) * V;
        float g[V], u[V];
        moe__ldv<V>(g, h + r * 2 * I + c);
        moe__ldv<V>(u, h + r * 2 * I + I + c);
#pragma unroll
        for (int j = 0; j < V; j++)
            g[j] = moe__silu(g[j]) * u[j];
        moe__stv<V>(a + r * I + c, g);
    }
}

template <typename T>
static void swiglu_go(int v, int64_t R, int64_t I, const T *h, T *a, cudaStream_t st)
{
    auto *k = v == 1 ? swiglu_kernel<T, 1> : swiglu_kernel<T, 16 / sizeof(T)>;
    k<<<moe__blocks(R * I / v, 256), 256, 0, st>>>(R, I, h, a);
}

static int swiglu_launch(int64_t R, int64_t I, const void *h, void *a, moe_dtype dt,
                         cudaStream_t st)
{
    const void *ptrs[2] = {h, a};
    const int v = moe__vec_width(I, dt, ptrs, 2);
    MOE_DISPATCH(dt, (swiglu_go<T>(v, R, I, (const T *)h, (T *)a, st)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

/* Padded layout: one row per block iteration (the row's source is found once); h_pack gets the
   packed copy of h, a gets zeros past each expert's rows. */
template <typename T>
static __global__ void swiglu_padded_kernel(int64_t R, int64_t I, const T *h, T *a,
                                            struct moe__pad_map pm, T *h_pack)
{
    for (int64_t q = blockIdx.x; q < R; q += gridDim.x) {
        const int64_t r = moe__unpad_row(pm, q);
        const T *hq = h + q * 2 * I;
        for (int64_t c = threadIdx.x; c < I; c += blockDim.x) {
            if (r < 0) {
                a[q * I + c] = moe__from_f<T>(0.f);
                continue;
            }
            const T gv = hq[c], uv = hq[I + c];
            a[q * I + c] = moe__from_f<T>(moe__silu(moe__to_f(gv)) * moe__to_f(uv));
            h_pack[r * 2 * I + c] = gv;
            h_pack[r * 2 * I + I + c] = uv;
        }
    }
}

static int swiglu_padded_launch(int64_t R, int64_t I, const void *h, void *a,
                                struct moe__pad_map pm, void *h_pack, moe_dtype dt, cudaStream_t st)
{
    const unsigned blocks = (unsigned)(R < 65535 * 4 ? R : 65535 * 4);
    MOE_DISPATCH(dt, (swiglu_padded_kernel<T>
                      <<<blocks, 256, 0, st>>>(R, I, (const T *)h, (T *)a, pm, (T *)h_pack)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__swiglu_cuda(int64_t R, int64_t I, const void *h, void *a, const struct moe__pad_map *pad,
                     void *h_pack, moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(R >= 0 && I > 0, MOE_EINVAL);
    if (R == 0)
        return MOE_OK;
    MOE_REQUIRE(h && a, MOE_EINVAL);
    if (pad) {
        MOE_REQUIRE(pad->n > 0 && pad->offsets && pad->poffsets && h_pack, MOE_EINVAL);
        return swiglu_padded_launch(R, I, h, a, *pad, h_pack, dt, st);
    }
    return swiglu_launch(R, I, h, a, dt, st);
}

#define SWB_THREADS 256

/* The block's sum of dot, in a fixed order for a given block size (deterministic): each warp's
   shuffle tree, then the warps' partials in order. */
static __device__ __forceinline__ float block_sum(float dot, float *red)
{
    for (int o = 16; o > 0; o >>= 1)
        dot += __shfl_down_sync(0xffffffffu, dot, o);
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = dot;
    __syncthreads();
    float total = 0.f;
    if (threadIdx.x == 0)
        for (int i = 0; i < (int)(blockDim.x + 31) / 32; i++)
            total += red[i];
    return total;
}

/* One block per row (blockDim a multiple of 32, at most SWB_THREADS), V consecutive columns per
   thread (16-byte accesses where I and the buffers allow, else 1); the dot product <a, dau> for
   the router-weight grad is block_sum. Block q is a row of dau/dh/aw; with a pad map it reads
   packed row r of h (zero rows: none). */
template <typename T, int V>
static __global__ void swiglu_backward_kernel(int64_t I, const T *h, const T *dau,
                                              const int32_t *perm, struct moe__pad_map pm,
                                              const float *w, float *dw, T *dh, T *aw)
{
    __shared__ float red[SWB_THREADS / 32];
    const int64_t q = blockIdx.x;
    const int64_t r = pm.poffsets ? moe__unpad_row(pm, q) : q;
    if (r < 0) { /* padding: zero rows of dh and aw, the operands of the weight-grad GEMMs */
        for (int64_t c = threadIdx.x; c < 2 * I; c += blockDim.x)
            dh[q * 2 * I + c] = moe__from_f<T>(0.f);
        for (int64_t c = threadIdx.x; c < I; c += blockDim.x)
            aw[q * I + c] = moe__from_f<T>(0.f);
        return;
    }
    const int64_t slot = perm ? perm[r] : r;
    const float v = w ? w[slot] : 1.f;
    const T *hr = h + r * 2 * I;
    float dot = 0.f;
    for (int64_t c = threadIdx.x * V; c < I; c += blockDim.x * V) {
        float g[V], u[V], d[V], o_g[V], o_u[V];
        moe__ldv<V>(g, hr + c);
        moe__ldv<V>(u, hr + I + c);
        moe__ldv<V>(d, dau + q * I + c);
#pragma unroll
        for (int j = 0; j < V; j++) {
            const float sg = 1.f / (1.f + expf(-g[j])), sj = g[j] * sg, da = v * d[j];
            dot += sj * u[j] * d[j];
            o_g[j] = da * u[j] * sg * (1.f + g[j] * (1.f - sg));
            o_u[j] = da * sj;
            d[j] = v * sj * u[j]; /* d[j] is read: it becomes aw */
        }
        moe__stv<V>(dh + q * 2 * I + c, o_g);
        moe__stv<V>(dh + q * 2 * I + I + c, o_u);
        if (aw)
            moe__stv<V>(aw + q * I + c, d);
    }
    if (!dw)
        return;
    const float total = block_sum(dot, red);
    if (threadIdx.x == 0)
        dw[slot] = total;
}

/* One block per row: enough threads for one pass over the row's vectors, whole warps, at most
   SWB_THREADS. */
template <typename T>
static void swiglu_backward_go(int v, int64_t R, int64_t I, const T *h, const T *dau,
                               const int32_t *perm, struct moe__pad_map pm, const float *w,
                               float *dw, T *dh, T *aw, cudaStream_t st)
{
    const int64_t warps = (I / v + 31) / 32;
    const int threads = (int)(warps * 32 < SWB_THREADS ? warps * 32 : SWB_THREADS);
    auto *k = v == 1 ? swiglu_backward_kernel<T, 1> : swiglu_backward_kernel<T, 16 / sizeof(T)>;
    k<<<(unsigned)R, threads, 0, st>>>(I, h, dau, perm, pm, w, dw, dh, aw);
}

static int swiglu_backward_launch(int64_t R, int64_t I, const void *h, const void *dau,
                                  const int32_t *perm, struct moe__pad_map pm, const float *w,
                                  float *dw, void *dh, void *aw, moe_dtype dt, cudaStream_t st)
{
    const void *ptrs[4] = {h, dau, dh, aw};
    const int v = moe__vec_width(I, dt, ptrs, 4);
    MOE_DISPATCH(dt, (swiglu_backward_go<T>(v, R, I, (const T *)h, (const T *)dau, perm, pm, w, dw,
                                            (T *)dh, (T *)aw, st)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__swiglu_backward_cuda(int64_t R, int64_t I, const void *h, const void *dau,
                              const int32_t *perm, const struct moe__pad_map *pad, const float *w,
                              float *dw, void *dh, void *aw, moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(R >= 0 && R <= INT32_MAX && I > 0, MOE_EINVAL);
    if (R == 0)
        return MOE_OK;
    MOE_REQUIRE(h && dau && dh, MOE_EINVAL);
    MOE_REQUIRE(!pad || (pad->n > 0 && pad->offsets && pad->poffsets && aw), MOE_EINVAL);
    struct moe__pad_map pm = {0, NULL, NULL};
    if (pad)
        pm = *pad;
    return swiglu_backward_launch(R, I, h, dau, perm, pm, w, dw, dh, aw, dt, st);
}
