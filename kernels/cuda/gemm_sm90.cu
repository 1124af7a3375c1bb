/*
 * kernels/cuda/gemm_sm90.cu — the Hopper grouped GEMM (moe_grouped_gemm_cuda): varlen-M over
 * experts, row ranges read from device offsets, rows of A gathered while loading, wgmma (sm_90a) on
 * 128-byte-swizzled shared-memory tiles. No host round trip: the launch needs only a host bound on
 * the row count.
 *
 * Design choices a reader must know:
 * - Persistent grid. Each CTA reads offsets[0..E], builds the tile list (ceil(rows_e / BM) × N / BN
 *   tiles per expert, expert-major, N fastest so that CTAs side by side share the gathered A rows)
 *   as a prefix in shared memory, and walks it with a grid stride.
 * - Loads are 16-byte cp.async chunks issued by all 256 threads into an S-stage ring; a gathered
 *   row costs the same as a packed one, and rows past an expert's end are zero-filled by the copy.
 *   Both warpgroups compute (64 × 256 each); the ring runs S - 2 tiles ahead of the tensor cores,
 *   because a stage is refilled only after every warpgroup's wgmma on it has retired.
 * - Tile 128 × 256 × 64, 4 stages: 192 KB of shared memory, one CTA per SM.
 */
#include <stdint.h>
#include <string.h>

#include "internal.h"

#define SM90_BM 128
#define SM90_BN 256
#define SM90_BK 64
#define SM90_STAGES 4
#define SM90_THREADS 256
#define SM90_MAX_E 1024
#define SM90_A_BYTES (SM90_BM * SM90_BK * 2)
#define SM90_B_BYTES (SM90_BN * SM90_BK * 2)
#define SM90_STAGE_BYTES (SM90_A_BYTES + SM90_B_BYTES)
#define SM90_SMEM_BYTES (SM90_STAGES * SM90_STAGE_BYTES + 1024)

struct sm90_args {
    const char *a;
    int64_t a_rs; /* bytes */
    const int32_t *gather;
    int gather_div;
    const int64_t *offsets;
    int E, N, D;
    int n_split;
    void *const *b_ptr[2];
    const char *b_base[2];
    int64_t b_es[2], b_rs[2]; /* bytes */
    char *c;
    int64_t c_rs; /* bytes */
};

#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ == 900 && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define SM90_DEVICE 1
#endif

#ifdef SM90_DEVICE

static __device__ __forceinline__ uint32_t smem_u32(const void *p)
{
    return (uint32_t)__cvta_generic_to_shared(p);
}

static __device__ __forceinline__ void cp_async16(uint32_t dst, const void *src, int bytes)
{
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
                 "r"(bytes));
}

/* K-major operand, 128-byte swizzle: 8-row groups 1024 bytes apart (the leading offset is unused
   by this layout and encoded as 1). */
static __device__ __forceinline__ uint64_t smem_desc(uint32_t addr)
{
    return (uint64_t)((addr & 0x3FFFF) >> 4) | ((uint64_t)1 << 16) | ((uint64_t)(1024 >> 4) << 32) |
           ((uint64_t)1 << 62);
}

#define D8(i)                                                                                      \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]),    \
        "+f"(d[i + 6]), "+f"(d[i + 7])
#define D128_REGS                                                                                  \
    "{%0, %1, %2, %3, %4, %5, %6, %7, "                                                            \
    "%8, %9, %10, %11, %12, %13, %14, %15, "                                                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, "                                                     \
    "%24, %25, %26, %27, %28, %29, %30, %31, "                                                     \
    "%32, %33, %34, %35, %36, %37, %38, %39, "                                                     \
    "%40, %41, %42, %43, %44, %45, %46, %47, "                                                     \
    "%48, %49, %50, %51, %52, %53, %54, %55, "                                                     \
    "%56, %57, %58, %59, %60, %61, %62, %63, "                                                     \
    "%64, %65, %66, %67, %68, %69, %70, %71, "                                                     \
    "%72, %73, %74, %75, %76, %77, %78, %79, "                                                     \
    "%80, %81, %82, %83, %84, %85, %86, %87, "                                                     \
    "%88, %89, %90, %91, %92, %93, %94, %95, "                                                     \
    "%96, %97, %98, %99, %100, %101, %102, %103, "                                                 \
    "%104, %105, %106, %107, %108, %109, %110, %111, "                                             \
    "%112, %113, %114, %115, %116, %117, %118, %119, "                                             \
    "%120, %121, %122, %123, %124, %125, %126, %127}"
#define D_OPERANDS                                                                                 \
    D8(0), D8(8), D8(16), D8(24), D8(32), D8(40), D8(48), D8(56), D8(64), D8(72), D8(80), D8(88),  \
        D8(96), D8(104), D8(112), D8(120)

/* Pins the accumulators in place: reads of d may not move above a wgmma wait, writes below it. */
static __device__ __forceinline__ void fence_d(float *d)
{
    asm volatile("" : D_OPERANDS::"memory");
}

/* d[64 x 256 per warpgroup] (+)= A[64 x 16] · B[256 x 16]ᵀ, both from shared memory. */
template <typename T> struct wgmma_op;
template <> struct wgmma_op<__nv_bfloat16> {
    static __device__ __forceinline__ void mma(float *d, uint64_t da, uint64_t db, int accumulate)
    {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 " D128_REGS
                     ", %128, %129, p, 1, 1, 0, 0;\n}\n"
                     : D_OPERANDS
                     : "l"(da), "l"(db), "r"(accumulate));
    }
};
template <> struct wgmma_op<__half> {
    static __device__ __forceinline__ void mma(float *d, uint64_t da, uint64_t db, int accumulate)
    {
        asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"
                     "wgmma.mma_async.sync.aligned.m64n256k16.f32.f16.f16 " D128_REGS
                     ", %128, %129, p, 1, 1, 0, 0;\n}\n"
                     : D_OPERANDS
                     : "l"(da), "l"(db), "r"(accumulate));
    }
};

static __device__ __forceinline__ void pack2(__nv_bfloat16 *dst, float x, float y)
{
    *(__nv_bfloat162 *)dst = __floats2bfloat162_rn(x, y);
}
static __device__ __forceinline__ void pack2(__half *dst, float x, float y)
{
    *(__half2 *)dst = __floats2half2_rn(x, y);
}

/* tiles[e] = first tile of expert e (exclusive prefix), tiles[E] = all tiles. 256 threads, each
   sums up to SM90_MAX_E / 256 experts, then a Hillis–Steele scan of the 256 partial sums. */
static __device__ void tile_prefix(const int64_t *offsets, int E, int nt, int *tiles, int *part)
{
    const int t = threadIdx.x, per = (E + SM90_THREADS - 1) / SM90_THREADS;
    int sum = 0;
    for (int j = 0; j < per; j++) {
        const int e = t * per + j;
        if (e < E)
            sum += (int)((offsets[e + 1] - offsets[e] + SM90_BM - 1) / SM90_BM) * nt;
    }
    part[t] = sum;
    __syncthreads();
    for (int s = 1; s < SM90_THREADS; s *= 2) {
        const int v = t >= s ? part[t - s] : 0;
        __syncthreads();
        part[t] += v;
        __syncthreads();
    }
    int run = part[t] - sum;
    for (int j = 0; j < per; j++) {
        const int e = t * per + j;
        if (e < E) {
            tiles[e] = run;
            run += (int)((offsets[e + 1] - offsets[e] + SM90_BM - 1) / SM90_BM) * nt;
        }
    }
    if (t == SM90_THREADS - 1)
        tiles[E] = part[t];
    __syncthreads();
}

/* The expert whose tile range holds tile q: the last e with tiles[e] <= q. */
static __device__ __forceinline__ int tile_expert(const int *tiles, int E, int q)
{
    int lo = 0, hi = E - 1;
    while (lo < hi) {
        const int mid = (lo + hi + 1) / 2;
        if (tiles[mid] <= q)
            lo = mid;
        else
            hi = mid - 1;
    }
    return lo;
}

/* What one thread copies of each stage: chunk (tid % 8) of tile rows tid / 8 + 32 i, i.e. 4 rows
   of A and 8 rows of B. The shared-memory offset of a chunk is row * 128 + ((chunk ^ row % 8) * 16)
   (the 128-byte swizzle wgmma reads), and row % 8 is the same for all of a thread's rows. */
struct sm90_loads {
    const char *a[4];
    int a_bytes[4];
    const char *b[8];
    uint32_t dst; /* offset of the thread's first chunk in a tile */
};

static __device__ __forceinline__ void plan_loads(const struct sm90_args &g, int e, int64_t r0, int64_t r_end,
                                  int n0, struct sm90_loads *L)
{
    const int tid = threadIdx.x, chunk = tid & 7, row = tid >> 3;
    L->dst = (uint32_t)(row * 128 + ((chunk ^ (row & 7)) << 4));
    for (int i = 0; i < 4; i++) {
        const int64_t r = r0 + row + 32 * i;
        const int ok = r < r_end;
        const int64_t src = !ok ? 0 : g.gather ? g.gather[r] / g.gather_div : r;
        L->a[i] = g.a + src * g.a_rs + chunk * 16;
        L->a_bytes[i] = ok ? 16 : 0;
    }
    for (int j = 0; j < 8; j++) {
        int n = n0 + row + 32 * j, part = n >= g.n_split;
        n -= part ? g.n_split : 0;
        const char *base = g.b_ptr[part] ? (const char *)g.b_ptr[part][e]
                                         : g.b_base[part] + (int64_t)e * g.b_es[part];
        L->b[j] = base + (int64_t)n * g.b_rs[part] + chunk * 16;
    }
}

static __device__ __forceinline__ void load_stage(const struct sm90_loads &L, uint32_t stage, int kt)
{
    const int64_t k = (int64_t)kt * SM90_BK * 2;
    for (int i = 0; i < 4; i++)
        cp_async16(stage + L.dst + i * 32 * 128, L.a[i] + k, L.a_bytes[i]);
    for (int j = 0; j < 8; j++)
        cp_async16(stage + SM90_A_BYTES + L.dst + j * 32 * 128, L.b[j] + k, 16);
}

template <typename T>
static __device__ __forceinline__ void store_tile(const struct sm90_args &g, const float *d, int64_t r0,
                                  int64_t r_end, int n0)
{
    const int tid = threadIdx.x, wg = tid >> 7, warp = (tid >> 5) & 3, lane = tid & 31;
    const int64_t ra = r0 + wg * 64 + warp * 16 + (lane >> 2), rb = ra + 8;
    const int col = n0 + 2 * (lane & 3);
    T *pa = (T *)(g.c + ra * g.c_rs) + col, *pb = (T *)(g.c + rb * g.c_rs) + col;
#pragma unroll
    for (int j = 0; j < 32; j++) {
        if (ra < r_end)
            pack2(pa + 8 * j, d[4 * j], d[4 * j + 1]);
        if (rb < r_end)
            pack2(pb + 8 * j, d[4 * j + 2], d[4 * j + 3]);
    }
}

template <typename T>
static __global__ void __launch_bounds__(SM90_THREADS, 1) sm90_gemm_kernel(const struct sm90_args g)
{
    extern __shared__ char smem_raw[];
    __shared__ int tiles[SM90_MAX_E + 1];
    __shared__ int part[SM90_THREADS];
    const uint32_t ring = (smem_u32(smem_raw) + 1023) & ~1023u;
    const int nt = g.N / SM90_BN, KT = g.D / SM90_BK, wg = threadIdx.x >> 7;
    float d[128];

    tile_prefix(g.offsets, g.E, nt, tiles, part);
    const int total = tiles[g.E];
    for (int q = blockIdx.x; q < total; q += gridDim.x) {
        const int e = tile_expert(tiles, g.E, q), local = q - tiles[e];
        const int64_t r0 = g.offsets[e] + (int64_t)(local / nt) * SM90_BM, r_end = g.offsets[e + 1];
        const int n0 = (local % nt) * SM90_BN;
        struct sm90_loads L;
        plan_loads(g, e, r0, r_end, n0, &L);

        __syncthreads(); /* the previous tile's wgmma reads of the ring are over in every warpgroup */
#pragma unroll
        for (int s = 0; s < SM90_STAGES - 2; s++) {
            if (s < KT)
                load_stage(L, ring + s * SM90_STAGE_BYTES, s);
            asm volatile("cp.async.commit_group;\n" ::);
        }
        for (int kt = 0; kt < KT; kt++) {
            asm volatile("cp.async.wait_group %0;\n" ::"n"(SM90_STAGES - 3));
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncthreads();
            const int next = kt + SM90_STAGES - 2;
            if (next < KT)
                load_stage(L, ring + (next % SM90_STAGES) * SM90_STAGE_BYTES, next);
            asm volatile("cp.async.commit_group;\n" ::);

            const uint32_t sa = ring + (kt % SM90_STAGES) * SM90_STAGE_BYTES;
            asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
            for (int ks = 0; ks < SM90_BK / 16; ks++)
                wgmma_op<T>::mma(d, smem_desc(sa + wg * 64 * 128 + ks * 32),
                                 smem_desc(sa + SM90_A_BYTES + ks * 32), kt > 0 || ks > 0);
            asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        fence_d(d);
        store_tile<T>(g, d, r0, r_end, n0);
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
}

#else /* not sm_90a: never launched (moe_grouped_gemm_cuda checks the device first) */

template <typename T> static __global__ void sm90_gemm_kernel(const struct sm90_args g)
{
    (void)g;
}

#endif

/* ---- host side ---- */

/* 1: the current device is sm_90 (H100/H200) and this build has sm_90a code; cached per thread. */
static int sm90_ready(int *sms)
{
    static __thread int known = -1, count = 0;
    if (known < 0) {
        int dev = 0, major = 0, minor = 0;
        cudaFuncAttributes fa;
        known = cudaGetDevice(&dev) == cudaSuccess &&
                cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) ==
                    cudaSuccess &&
                cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) ==
                    cudaSuccess &&
                major == 9 && minor == 0 &&
                cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) ==
                    cudaSuccess &&
                cudaFuncGetAttributes(&fa, sm90_gemm_kernel<__nv_bfloat16>) == cudaSuccess &&
                fa.binaryVersion == 90;
        cudaGetLastError();
    }
    *sms = count;
    return known;
}

static int aligned16(const void *p, int64_t stride_bytes)
{
    return ((uintptr_t)p & 15) == 0 && stride_bytes % 16 == 0;
}

/* The shapes this kernel tiles; anything else is MOE_EUNSUPPORTED and the caller falls back. */
static int sm90_supported(const struct moe_gemm *g)
{
    const int64_t es = 2;
    if (g->dtype != MOE_BF16 && g->dtype != MOE_F16)
        return 0;
    if (g->E < 1 || g->E > SM90_MAX_E || g->N % SM90_BN || g->D % SM90_BK || g->N > INT32_MAX ||
        g->D > INT32_MAX || g->n_split % SM90_BN || g->n_split < SM90_BN || g->n_split > g->N)
        return 0;
    if (g->gather && g->gather_div < 1)
        return 0;
    if (!aligned16(g->a, g->a_rs * es) || !aligned16(g->c, g->c_rs * es))
        return 0;
    for (int p = 0; p < (g->n_split < g->N ? 2 : 1); p++) {
        const struct moe_mats *b = &g->b[p];
        if (b->cs != 1 || !aligned16(b->ptr ? NULL : b->base, b->rs * es) ||
            (b->es * es) % 16 != 0)
            return 0;
    }
    return 1;
}

extern "C" int moe_grouped_gemm_cuda(const struct moe_gemm *g)
{
    int sms = 0;
    MOE_REQUIRE(g && g->offsets && g->rows_max >= 0, MOE_EINVAL);
    if (!sm90_ready(&sms))
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "moe_grouped_gemm_cuda",
                         "needs an sm_90 GPU and an sm_90a build");
    if (!sm90_supported(g))
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "moe_grouped_gemm_cuda",
                         "dtype, shape or alignment not tiled by the sm_90 kernel");
    const int64_t nt = g->N / SM90_BN, bound = (g->rows_max / SM90_BM + g->E) * nt;
    if (bound == 0 || g->rows_max == 0)
        return MOE_OK;
    struct sm90_args a;
    memset(&a, 0, sizeof a);
    a.a = (const char *)g->a;
    a.a_rs = g->a_rs * 2;
    a.gather = g->gather;
    a.gather_div = g->gather ? g->gather_div : 1;
    a.offsets = g->offsets;
    a.E = g->E;
    a.N = (int)g->N;
    a.D = (int)g->D;
    a.n_split = (int)g->n_split;
    for (int p = 0; p < 2; p++) {
        const struct moe_mats *b = &g->b[p < 1 || g->n_split < g->N ? p : 0];
        a.b_ptr[p] = b->ptr;
        a.b_base[p] = (const char *)b->base;
        a.b_es[p] = b->es * 2;
        a.b_rs[p] = b->rs * 2;
    }
    a.c = (char *)g->c;
    a.c_rs = g->c_rs * 2;
    const unsigned grid = (unsigned)(bound < sms ? bound : sms);
    cudaStream_t st = (cudaStream_t)g->stream;
    if (g->dtype == MOE_BF16) {
        MOE_CHECK(cudaFuncSetAttribute(sm90_gemm_kernel<__nv_bfloat16>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       SM90_SMEM_BYTES));
        sm90_gemm_kernel<__nv_bfloat16><<<grid, SM90_THREADS, SM90_SMEM_BYTES, st>>>(a);
    } else {
        MOE_CHECK(cudaFuncSetAttribute(sm90_gemm_kernel<__half>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       SM90_SMEM_BYTES));
        sm90_gemm_kernel<__half><<<grid, SM90_THREADS, SM90_SMEM_BYTES, st>>>(a);
    }
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}
