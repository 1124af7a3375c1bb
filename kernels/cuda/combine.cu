/*
 * kernels/cuda/combine.cu — moving rows between token order and expert order: the gather of
 * token rows into expert-sorted rows, and the weighted gather-sum back to tokens.
 *
 * Design choice: the way back is a gather (each output element reads its K rows through inv and
 * sums them in k order in fp32), never a scatter-add: no atomics, the same bits every run.
 */
#include "internal.h"

/* One row per block iteration: the source row index is computed once per row, not per element.
   With a pad map, dst row q holds packed row r (or zeros past its expert's rows). */
template <typename V>
static __global__ void gather_rows_kernel(int64_t R, int64_t n, const V *src, int64_t src_rs,
                                          const int32_t *perm, int K, struct moe__pad_map pm,
                                          V *dst)
{
    for (int64_t q = blockIdx.x; q < R; q += gridDim.x) {
        const int64_t r = pm.poffsets ? moe__unpad_row(pm, q) : q;
        V *d = dst + q * n;
        if (r < 0) {
            const V z = V();
            for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
                d[c] = z;
            continue;
        }
        int64_t t = perm ? perm[r] / K : r;
        const V *s = src + t * src_rs;
        for (int64_t c = threadIdx.x; c < n; c += blockDim.x)
            d[c] = s[c];
    }
}

/* 16-byte vectors when the row length, the source stride and both pointers allow: the gather moves
   T·K rows of H elements, the largest memory traffic of the forward. */
static int gather_rows_launch(int64_t R, int64_t H, const void *src, int64_t src_rs,
                              const int32_t *perm, int K, struct moe__pad_map pm, void *dst,
                              moe_dtype dt, cudaStream_t st)
{
    const int64_t es = (int64_t)moe_dtype_size(dt);
    const unsigned blocks = (unsigned)(R < 65535 ? R : 65535);
    if ((H * es) % 16 == 0 && (src_rs * es) % 16 == 0 && (uintptr_t)src % 16 == 0 &&
        (uintptr_t)dst % 16 == 0) {
        const int64_t v = 16 / es;
        gather_rows_kernel<int4><<<blocks, 128, 0, st>>>(R, H / v, (const int4 *)src, src_rs / v,
                                                         perm, K, pm, (int4 *)dst);
    } else if (es == 4) {
        gather_rows_kernel<float>
            <<<blocks, 256, 0, st>>>(R, H, (const float *)src, src_rs, perm, K, pm, (float *)dst);
    } else {
        gather_rows_kernel<unsigned short><<<blocks, 256, 0, st>>>(
            R, H, (const unsigned short *)src, src_rs, perm, K, pm, (unsigned short *)dst);
    }
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__gather_rows_cuda(int64_t R, int64_t H, const void *src, int64_t src_rs,
                          const int32_t *perm, int K, const struct moe__pad_map *pad, void *dst,
                          moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(R >= 0 && H > 0 && K > 0 && src_rs >= H, MOE_EINVAL);
    if (R == 0)
        return MOE_OK;
    MOE_REQUIRE(src && dst, MOE_EINVAL);
    MOE_REQUIRE(!pad || (pad->n > 0 && pad->offsets && pad->poffsets), MOE_EINVAL);
    struct moe__pad_map pm = {0, NULL, NULL};
    if (pad)
        pm = *pad;
    return gather_rows_launch(R, H, src, src_rs, perm, K, pm, dst, dt, st);
}

#define COMBINE_BATCH 8

/* Each thread: V consecutive columns of one token (V = 16 / sizeof(T) where every row is 16-byte
   aligned, else 1), the K rows summed in order in fp32. */
template <typename T, int V>
static __global__ void combine_kernel(int64_t T_, int K, int64_t H, const T *rows,
                                      const int32_t *inv, const int32_t *idx, const int64_t *shift,
                                      const float *w, const T *dense, const float *dense_scale,
                                      const float *vec_scale, const T *vec, T *y)
{
    const int64_t HV = H / V;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < T_ * HV;
         i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t t = i / HV, c = (i % HV) * V;
        float acc[V], v[V];
#pragma unroll
        for (int j = 0; j < V; j++)
            acc[j] = 0.f;
        /* COMBINE_BATCH rows at a time: their indices, then the rows themselves, are loaded
           before any is summed, so that the loads overlap (at decode sizes a thread per column
           chunk is all there is: K dependent index-then-row loads one after the other took the
           kernel 5.3 us at T = 8, batched 3.2); the sum stays in k order */
        for (int k0 = 0; rows && k0 < K; k0 += COMBINE_BATCH) {
            int64_t r[COMBINE_BATCH];
            float rv[COMBINE_BATCH][V];
#pragma unroll
            for (int b = 0; b < COMBINE_BATCH; b++) {
                const int64_t s = t * K + k0 + b;
                r[b] = k0 + b >= K ? 0 : shift ? inv[s] + shift[idx[s]] : inv ? inv[s] : s;
            }
#pragma unroll
            for (int b = 0; b < COMBINE_BATCH; b++)
                if (k0 + b < K)
                    moe__ldv<V>(rv[b], rows + r[b] * H + c);
#pragma unroll
            for (int b = 0; b < COMBINE_BATCH; b++) {
                if (k0 + b >= K)
                    break;
                const int64_t s = t * K + k0 + b;
#pragma unroll
                for (int j = 0; j < V; j++)
                    acc[j] += w ? w[s] * rv[b][j] : rv[b][j];
            }
        }
        if (dense) {
            const float sc = dense_scale ? dense_scale[t] : 1.f;
            moe__ldv<V>(v, dense + t * H + c);
#pragma unroll
            for (int j = 0; j < V; j++)
                acc[j] += sc * v[j];
        }
        if (vec) {
            moe__ldv<V>(v, vec + c);
#pragma unroll
            for (int j = 0; j < V; j++)
                acc[j] += vec_scale[t] * v[j];
        }
        moe__stv<V>(y + t * H + c, acc);
    }
}

/* v: 1, or 16 / sizeof(T) (16-byte vectors) */
template <typename T>
static void combine_go(int v, int64_t T_, int K, int64_t H, const T *rows, const int32_t *inv,
                       const int32_t *idx, const int64_t *shift, const float *w, const T *dense,
                       const float *dense_scale, const float *vec_scale, const T *vec, T *y,
                       cudaStream_t st)
{
    auto *k = v == 1 ? combine_kernel<T, 1> : combine_kernel<T, 16 / sizeof(T)>;
    k<<<moe__blocks(T_ * H / v, 256), 256, 0, st>>>(T_, K, H, rows, inv, idx, shift, w, dense,
                                                    dense_scale, vec_scale, vec, y);
}

static int combine_launch(int64_t T_, int K, int64_t H, const void *rows, const int32_t *inv,
                          const int32_t *idx, const int64_t *shift, const float *w,
                          const void *dense, const float *dense_scale, const float *vec_scale,
                          const void *vec, void *y, moe_dtype dt, cudaStream_t st)
{
    const void *ptrs[4] = {rows, dense, vec, y};
    const int v = moe__vec_width(H, dt, ptrs, 4);
    MOE_DISPATCH(dt,
                 (combine_go<T>(v, T_, K, H, (const T *)rows, inv, idx, shift, w, (const T *)dense,
                                dense_scale, vec_scale, (const T *)vec, (T *)y, st)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__combine_cuda(int64_t T, int K, int64_t H, const void *rows, const int32_t *inv,
                      const int32_t *idx, const int64_t *shift, const float *w, const void *dense,
                      const float *dense_scale, const float *vec_scale, const void *vec, void *y,
                      moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(T >= 0 && K > 0 && H > 0, MOE_EINVAL);
    if (T == 0)
        return MOE_OK;
    MOE_REQUIRE(y && (!vec || vec_scale) && (!shift || (idx && inv)), MOE_EINVAL);
    return combine_launch(T, K, H, rows, inv, idx, shift, w, dense, dense_scale, vec_scale, vec, y,
                          dt, st);
}
