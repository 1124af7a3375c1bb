/*
 * kernels/cuda/internal.h — what the CUDA step files share: element types and their fp32
 * conversions, the dtype dispatch, the buffer carving helper, and the internal step entry points
 * (moe__<step>_cuda: device pointers, validate inputs, launch on the given stream).
 *
 * Design choice: kernels are templates over the element type (float, __nv_bfloat16, __half);
 * the dtype is chosen once per launch by MOE_DISPATCH, and every accumulation is fp32.
 */
#ifndef MOE_CUDA_INTERNAL_H
#define MOE_CUDA_INTERNAL_H

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include "check.h"

/* ---- element types ---- */
static __device__ __forceinline__ float moe__to_f(float v)
{
    return v;
}
static __device__ __forceinline__ float moe__to_f(__nv_bfloat16 v)
{
    return __bfloat162float(v);
}
static __device__ __forceinline__ float moe__to_f(__half v)
{
    return __half2float(v);
}
template <typename T> static __device__ __forceinline__ T moe__from_f(float v);
template <> __device__ __forceinline__ float moe__from_f<float>(float v)
{
    return v;
}
template <> __device__ __forceinline__ __nv_bfloat16 moe__from_f<__nv_bfloat16>(float v)
{
    return __float2bfloat16_rn(v);
}
template <> __device__ __forceinline__ __half moe__from_f<__half>(float v)
{
    return __float2half_rn(v);
}

/* SwiGLU's activation, one expression for the SwiGLU kernel and the GEMM epilogue that fuses it
   (the same bits from both) */
static __device__ __forceinline__ float moe__silu(float g)
{
    return g / (1.f + expf(-g));
}

/* Runs body with T bound to the element type of dtype dt; an unknown dtype returns MOE_EINVAL. */
#define MOE_DISPATCH(dt, body)                                                                     \
    do {                                                                                           \
        switch (dt) {                                                                              \
        case MOE_F32: {                                                                            \
            typedef float T;                                                                       \
            body;                                                                                  \
        } break;                                                                                   \
        case MOE_BF16: {                                                                           \
            typedef __nv_bfloat16 T;                                                               \
            body;                                                                                  \
        } break;                                                                                   \
        case MOE_F16: {                                                                            \
            typedef __half T;                                                                      \
            body;                                                                                  \
        } break;                                                                                   \
        default:                                                                                   \
            return moe__fail(MOE_EINVAL, __FILE__, __LINE__, "MOE_DISPATCH", "bad dtype");         \
        }                                                                                          \
    } while (0)

/* V consecutive elements as fp32: one 16-byte access where V = 16 / sizeof(T) (the caller checked
   the alignment), one element where V = 1. Elementwise kernels are bandwidth-bound: 2-byte
   accesses reach about a third of what 16-byte ones do. */
template <int V, typename T> static __device__ __forceinline__ void moe__ldv(float *f, const T *p)
{
    static_assert(V == 1 || V * sizeof(T) == 16, "one element or 16 bytes");
    if constexpr (V == 1) {
        f[0] = moe__to_f(*p);
    } else {
        const uint4 r = *(const uint4 *)p;
        const T *e = (const T *)&r;
#pragma unroll
        for (int i = 0; i < V; i++)
            f[i] = moe__to_f(e[i]);
    }
}
template <int V, typename T> static __device__ __forceinline__ void moe__stv(T *p, const float *f)
{
    static_assert(V == 1 || V * sizeof(T) == 16, "one element or 16 bytes");
    if constexpr (V == 1) {
        *p = moe__from_f<T>(f[0]);
    } else {
        uint4 r;
        T *e = (T *)&r;
#pragma unroll
        for (int i = 0; i < V; i++)
            e[i] = moe__from_f<T>(f[i]);
        *(uint4 *)p = r;
    }
}

/* Elements per access for rows of n elements of dtype dt at these pointers (NULL ones skipped):
   16 / size (16-byte vectors) where every row start is 16-byte aligned, else 1. */
static inline int moe__vec_width(int64_t n, moe_dtype dt, const void *const *ptrs, int count)
{
    const int es = (int)moe_dtype_size(dt);
    if ((n * es) % 16)
        return 1;
    for (int i = 0; i < count; i++)
        if ((uintptr_t)ptrs[i] % 16)
            return 1;
    return 16 / es;
}

static inline unsigned moe__blocks(int64_t n, int threads)
{
    int64_t b = (n + threads - 1) / threads;
    return (unsigned)(b < 1 ? 1 : (b > 65535 * 16 ? 65535 * 16 : b));
}

/* Bump allocator over caller memory; with base == NULL it only measures. 256-byte alignment. */
struct moe__arena {
    char *base;
    size_t off;
};
static inline void *moe__take(struct moe__arena *a, size_t bytes)
{
    size_t at = (a->off + 255) & ~(size_t)255;
    a->off = at + bytes;
    return a->base ? a->base + at : NULL;
}

/* ---- grouped GEMM engine (expert_mlp.cu) ----
 * One call = up to MOE_GG_MAX_PARTS products per expert, all in one cublasGemmGroupedBatchedEx.
 * Each product is C[M, N] = A[M, K] · B[K, N] in row/column-stride terms; dims < 0 mean "the
 * expert's row count". Experts with zero rows are left out. Operand pointers are built on the
 * device by a tiny kernel, so ModuleList pointer arrays never leave the device.
 *
 * Padded layout (the routed rows of the workspace): expert e's rows start at poffsets[e] and span
 * ceil(counts[e] / pad) * pad rows; the rows past counts[e] are zero. A bucketed call uses that
 * padded row count for every dim < 0 and issues one cublasGemmBatchedEx per distinct padded count
 * (batch = experts in it) instead of one grouped GEMM per expert: cuBLAS launches a kernel per
 * group when the inner dimension varies (~E launches), and runs sm80 kernels for the grouped call.
 * Zero rows add exact zeros along a varying inner dimension; along a varying M they compute rows
 * nobody reads. */
#define MOE_GG_MAX_PARTS 2

struct moe__gg_operand {
    void *const *ptr; /* device [n] per-expert base pointers, or NULL */
    const void *base;
    int64_t es;     /* elements between experts (weights: ptr == NULL) */
    int rows;       /* 1: packed activations, pointer = base + offsets[e] * step */
    int64_t step;   /* elements per row of the packed activations */
    int64_t off;    /* elements added to the pointer */
    int64_t rs, cs; /* element strides of the logical matrix */
    int padded;     /* rows: in the padded layout (poffsets[e] instead of offsets[e]) */
};

struct moe__gg_part {
    struct moe__gg_operand a, b, c;
    int64_t M, N, K; /* < 0: the expert's row count (bucketed: its padded row count) */
    float beta;
};

struct moe__gg_call {
    int n_experts;
    const int64_t *counts_host;  /* [n] rows per expert, host */
    const int64_t *counts_dev;   /* [n] same on the device, or NULL when every count is > 0 */
    const int64_t *offsets_dev;  /* [n+1] first row of each expert, or NULL: all start at row 0 */
    const int64_t *poffsets_dev; /* [n+1] first row of each expert in the padded layout, or NULL */
    int pad;                     /* row granule of the padded layout (>= 1), 0: none */
    int bucket; /* 1: one group per distinct padded count (needs pad, counts_dev, and every operand
                   that spans a dim < 0 in the padded layout) */
    int n_parts;
    struct moe__gg_part part[MOE_GG_MAX_PARTS];
};

/* Device scratch for the pointer arrays of one call: 3 * MOE_GG_MAX_PARTS * n pointers. */
static inline size_t moe__gg_ptr_bytes(int n)
{
    return sizeof(void *) * 3 * MOE_GG_MAX_PARTS * (size_t)(n > 0 ? n : 1);
}
int moe__grouped_gemm(const struct moe__gg_call *call, moe_dtype dt, void **ptr_scratch,
                      cublasHandle_t h, cudaStream_t st);

/* The padded layout of n experts: poffsets[e] = Σ_{x<e} ceil(counts[x] / pad) * pad (n+1
   entries), shift[e] = poffsets[e] - offsets[e] (a row's padded index minus its packed one). */
int moe__pad_offsets_cuda(int n, const int64_t *counts_dev, const int64_t *offsets_dev, int pad,
                          int64_t *poffsets, int64_t *shift, cudaStream_t st);
/* Padded rows of the host counts: Σ ceil(counts[e] / pad) * pad. */
int64_t moe__padded_rows(int n, const int64_t *counts_host, int pad);

/* Writes zeros to the [R, C] matrix (strides rs, cs) of every expert e with counts[e] == 0
   (counts == NULL: every expert). n_empty: how many such experts (from the host counts); 0 launches
   nothing. */
int moe__zero_empty_cuda(const struct moe_mats *m, int n, int64_t R, int64_t C,
                         const int64_t *counts_dev, int n_empty, moe_dtype dt, cudaStream_t st);

/* ---- Hopper grouped GEMM (gemm_sm90.cu, moe_grouped_gemm_cuda) ---- */
/* 1 when moe_grouped_gemm_cuda runs g: an sm_90 device, an sm_90a build, a shape it tiles. NULL
   pointers pass the alignment checks, so a problem can be judged before its buffers exist. */
int moe__gemm_sm90_ok(const struct moe_gemm *g);

/* ---- decode-size expert GEMVs (decode_mlp.cu) ---- */
#define MOE_GEMV_MAX_SLOTS 256 /* slots (T·K) one call takes: each block scans them all */
/* c[j, n] for every slot j < R: slots j < R - nx are routed, expert idx[j], a's row j / div; the
   last nx slots belong to an extra expert (a shared one, weights x0 / x1, expert 0 of those), a's
   row j - xs (gate|up over x: xs = R - nx; down over a [R, D]: 0). act: silu(h_g) · h_u of the
   dtype-rounded h_g = <a_j, w0_e[n, :]>, h_u = <a_j, w1_e[n, :]> (gate and up: the SwiGLU
   kernel's bits from those h); else <a_j, w0_e[n, :]>. Weights as moe_mats with the reduction
   along c; c dense [R, N] in slot order. One launch reads each touched expert's weights once. */
struct moe__gemv {
    moe_dtype dtype;
    int R, div, act, nx;
    const int32_t *idx;
    const void *a;
    int64_t a_rs, xs;
    int64_t D, N; /* reduction length, output columns */
    struct moe_mats w0, w1, x0, x1;
    void *c;
    void *stream;
};
/* 1 when moe__gemv_cuda runs g (16-byte-aligned rows contiguous along the reduction; NULL pointers
   pass, so a problem can be judged before its buffers exist). */
int moe__gemv_ok(const struct moe__gemv *g);
int moe__gemv_cuda(const struct moe__gemv *g);

/* ---- routing (route.cu) ---- */
/* logits of dtype ldt and the bias of dtype bdt (widened to fp32 exactly); idx64 NULL or [T, K]:
   idx as int64 too */
int moe__route_cuda(const struct moe_route_cfg *c, int64_t T, const void *logits, moe_dtype ldt,
                    const void *bias, moe_dtype bdt, int32_t *idx, int64_t *idx64, float *w,
                    cudaStream_t st);
/* logits [T, E] = x [T, H] · w [E, H]ᵀ in fp32, in moe_router_logits_cpu's sum order (its bits) */
int moe__router_logits_cuda(int64_t T, int64_t H, int E, moe_dtype dt, const void *x, int64_t x_rs,
                            const void *w, int64_t w_rs, float *logits, cudaStream_t st);
int moe__route_backward_cuda(const struct moe_route_cfg *c, int64_t T, const float *logits,
                             const int32_t *idx, const float *dw, float *dlogits, cudaStream_t st);

/* ---- row movement and combine (combine.cu) ---- */
/* Where a row of a padded layout (n experts, moe__pad_offsets_cuda) comes from: NULL pad means
   dst row q is packed row q. */
struct moe__pad_map {
    int n;
    const int64_t *offsets, *poffsets; /* [n+1] each, device */
};
/* The packed row held by row q of the padded layout, or -1 for a zero row past its expert's rows
   (binary search: the last expert whose padded block starts at or before q). */
static __device__ __forceinline__ int64_t moe__unpad_row(const struct moe__pad_map &m, int64_t q)
{
    int lo = 0, hi = m.n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (m.poffsets[mid] <= q)
            lo = mid;
        else
            hi = mid - 1;
    }
    int64_t r = m.offsets[lo] + (q - m.poffsets[lo]);
    return r < m.offsets[lo + 1] ? r : -1;
}
/* dst[r, :] = src[perm[r] / K, :] (perm == NULL: row r), dst dense [R, H], src row stride src_rs.
   With pad: R is the padded row count, dst row q holds packed row r of its expert (zeros past the
   expert's rows). */
int moe__gather_rows_cuda(int64_t R, int64_t H, const void *src, int64_t src_rs,
                          const int32_t *perm, int K, const struct moe__pad_map *pad, void *dst,
                          moe_dtype dt, cudaStream_t st);
/* y[t] = Σ_k w[t*K+k] · rows[inv[t*K+k] + (shift ? shift[idx[t*K+k]] : 0)]  (w == NULL: 1;
   inv == NULL: rows in slot order, row t*K+k),
   summed in k order in fp32,
   + dense_scale[t] · dense[t] (dense != NULL; dense_scale == NULL: 1)
   + vec_scale[t] · vec (vec != NULL: a [H] row) — written once as dtype. */
int moe__combine_cuda(int64_t T, int K, int64_t H, const void *rows, const int32_t *inv,
                      const int32_t *idx, const int64_t *shift, const float *w, const void *dense,
                      const float *dense_scale, const float *vec_scale, const void *vec, void *y,
                      moe_dtype dt, cudaStream_t st);

/* ---- SwiGLU (expert_mlp.cu) ---- */
/* a[r, i] = silu(h[r, i]) · h[r, I + i]. With pad: R is the padded row count, h and a are in the
   padded layout (a gets zero rows past each expert's rows), and h_pack [rows, 2I] receives the
   packed copy of h (what the forward saves). */
int moe__swiglu_cuda(int64_t R, int64_t I, const void *h, void *a, const struct moe__pad_map *pad,
                     void *h_pack, moe_dtype dt, cudaStream_t st);
/* Per row r with weight v = w[slot] (slot = perm ? perm[r] : r; w == NULL: 1):
   a = silu(g)·u from h; dw[slot] = <a, dau[r]> (fp32, if dw); da = v·dau[r];
   dh[r] = [da·u·silu'(g) | da·silu(g)]; aw[r] = v·a.
   With pad: R is the padded row count; dau, dh and aw are in the padded layout (h, perm are
   packed), and dh, aw get zero rows past each expert's rows. */
int moe__swiglu_backward_cuda(int64_t R, int64_t I, const void *h, const void *dau,
                              const int32_t *perm, const struct moe__pad_map *pad, const float *w,
                              float *dw, void *dh, void *aw, moe_dtype dt, cudaStream_t st);

/* ---- shared-expert sigmoid gate (shared_gate.cu) ---- */
/* g[t] = sigmoid(<x_t, gate>) in fp32. */
int moe__shared_gate_cuda(int64_t T, int64_t H, const void *x, int64_t x_rs, const void *gate,
                          float *g, moe_dtype dt, cudaStream_t st);
/* In place: dg[t] ← dg[t] · g[t] · (1 - g[t]) (the gate logit grad); dgate = Σ_t dg[t] x_t (dtype).
 */
size_t moe__shared_gate_scratch_bytes(int64_t T, int64_t H);
int moe__shared_gate_backward_cuda(int64_t T, int64_t H, const void *x, int64_t x_rs,
                                   const float *g, float *dg, void *dgate, void *scratch,
                                   moe_dtype dt, cudaStream_t st);

#endif /* MOE_CUDA_INTERNAL_H */
