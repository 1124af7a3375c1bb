/*
 * kernels/cuda/gemm_sm90.cu — the Hopper grouped GEMM engine (moe_grouped_gemm_cuda): experts' row
 * ranges read from device offsets, as the M dimension (varlen-M: forward and input grads) or as the
 * reduction (varlen-K: weight grads); rows of activations gathered while loading; wgmma (sm_90a) on
 * 128-byte-swizzled shared-memory tiles, K-major or MN-major per operand. No host round trip: a
 * launch needs only a host bound on the row count.
 *
 * Design choices a reader must know:
 * - Persistent grid. varlen-M: each CTA reads offsets[0..E] and builds the tile list
 *   (ceil(rows_e / BM) × N / BN tiles per expert, N fastest so that CTAs side by side share the
 *   gathered rows) as a prefix in shared memory; varlen-K: every expert has (M / BM) × (N / BN)
 *   tiles, an expert without rows writes zeros. CTAs walk the list with a grid stride.
 * - Loads are 16-byte cp.async chunks into an S-stage ring; a gathered row costs the same as a
 *   packed one, and rows past an expert's end are zero-filled by the copy. On the schedules that
 *   store by TMA, packed varlen-M rows and 3-D weights load by TMA instead (sm90_load_maps; one
 *   thread issues, its own kernel instantiation TL). Gather indices are loaded before they are
 *   needed (a tile's rows at once; varlen-K rows one k-step ahead) and
 *   divided by top-k with a multiply and a shift: a copy never waits on an index. A loading
 *   thread computes each row's source address once per k-step for all its copies of that row
 *   (MN-major activations: 8 chunks × the atoms of a row). Two computing warpgroups (64 × 256
 *   each, BK = 64). The ring does not drain between tiles: it runs across this CTA's whole tile
 *   list, so short reductions (the down projection, the weight grads) do not pay a refill per
 *   tile. Schedules (moe_gemm.schedule), all with the same per-element wgmma order, so the same
 *   bits: 4 and 2 — warp-specialized cooperative, a third warpgroup loads up to S k-steps ahead,
 *   mbarriers between them (sm90w_*); 3 — the same loader, ping-pong: 128 x 128 tiles, each
 *   computing warpgroup on its own (sm90p_*); 1 — all 256 threads load and compute, the ring runs
 *   S - 2 k-steps ahead (sm90_producer; a stage is refilled only after every warpgroup's wgmma on
 *   it has retired); 6 — ping-pong on 128 x 64 tiles (varlen-M). 4, 3 and 6 store through TMA,
 *   2 and 1 do not. 0, the default, is 4, or where 4's tiles would leave SMs idle (decode) 6 or
 *   3 (sm90_pingpong). On an H200 the cooperative warp-specialized kernel is the fastest on every
 *   form of the training shapes (tests/bench/RESULTS.md).
 * - Output: each computing warp writes its 16 accumulator rows out through a 2 KB buffer of its
 *   own, so the ring's stages all go back to the loader as soon as the tile's wgmma retired and
 *   the next tile's loads run on while a tile is written out. Schedules 0/3/4/6, output one strided
 *   tensor (a TMA map): 16 x 32 sub-tiles, double-buffered, one bulk tensor store each, which
 *   drain while the next tile computes; else (and for a warp with rows past the expert's end)
 *   64 columns at a time, copied with 128-byte row pieces, four per warp store. Outputs not
 *   16-byte aligned (pointer arrays) are stored from the registers.
 * - SwiGLU fused (moe_gemm.act, its own kernel instantiation, ACT): a tile holds 128 gate and the
 *   same 128 up columns (B's upper rows from the up part), c gets both halves as stored, act
 *   silu(gate) up of the rounded halves (the unfused SwiGLU kernel's bits). Its epilogue runs while
 *   the tensor cores wait, so it costs more than the separate kernel; the block uses it only where
 *   the plain GEMM cannot tile the parts (I an odd multiple of 128).
 * - Wasted work at expert edges: a warpgroup whose 64 rows of a varlen-M tile are all past the
 *   expert's end skips its wgmma; a weight-grad tile's last k-step runs only its 16-deep slices
 *   that hold rows.
 * - Tile layouts: K-major = rows of 64 k (128 bytes, chunk c of row r at c ^ r % 8); MN-major =
 *   atoms of 8 k × 64 x (1024 bytes), the 8 k-groups of an atom column contiguous, atoms along x
 *   SM90_ATOM_STRIDE apart. 128 × 256 × 64 tiles, 4 stages (ping-pong: 128 × 128 × 64, 6): 192 KB
 *   of shared memory (+ 16 KB of output buffers), one CTA per SM.
 */
#include <cuda.h> /* CUtensorMap and its enums only: the encoder comes through the runtime */
#include <stdint.h>
#include <string.h>

#include <type_traits>

#include "internal.h"

/* Diagnostic builds (make NVCC_DEFS=-DMOE_DIAG=n; never shipped, their outputs are wrong): 1 the
   loaders fill no stage (they only arrive), 2 the computing warps issue no wgmma, 3 the output
   stores never wait for their buffer to be read. They time where a tile's time goes. */
#ifndef MOE_DIAG
#define MOE_DIAG 0
#endif

#define SM90_BM 128
#define SM90_BN 256
#define SM90_BK 64
#define SM90_STAGES 4
#define SM90_THREADS 256
#define SM90_MAX_E 1024
#define SM90_A_BYTES (SM90_BM * SM90_BK * 2)
#define SM90_B_BYTES (SM90_BN * SM90_BK * 2)
#define SM90_STAGE_BYTES (SM90_A_BYTES + SM90_B_BYTES)
/* Each computing warp's own output buffer: 16 rows x 64 columns (one sub-tile), 2 KB. */
#define SM90_EPI_WARP_BYTES 2048
#define SM90_EPI_BYTES (8 * SM90_EPI_WARP_BYTES)
#define SM90_SMEM_BYTES (SM90_STAGES * SM90_STAGE_BYTES + SM90_EPI_BYTES + 1024)

/* One operand in bytes (struct moe_gemm_op); its majorness is a kernel template parameter. */
struct sm90_op {
    int rows;
    const char *base;
    int64_t rs;
    const int32_t *gather;
    uint32_t div_m; /* gather[r] / gather_div as a multiply and a shift (fastdiv) */
    int div_s;
    void *const *ptr[2];
    const char *mbase[2];
    int64_t es[2], xs[2], ks[2];
    int split, split_k;
    int xhi; /* K-major weights: the B tile's upper 128 rows are x + xhi (SwiGLU: the up part) */
};

struct sm90_args {
    struct sm90_op a, b;
    const int64_t *offsets;
    int E, varlen_k, M, N, D;
    char *c;
    int64_t c_rs;
    void *const *cptr[2];
    char *cbase[2];
    int64_t ces[2], crs[2];
    int c_split;
    /* TMA store maps of the output (varlen-M: [rows, N]; varlen-K: part p as [E, rows, N]),
       tma[p] 0 where there is none (pointer arrays, no encoder, schedules that do not use it) */
    CUtensorMap cmap[2];
    int tma[2];
    /* SwiGLU fused (varlen-M): a tile holds 128 gate and the same 128 up columns (B's upper rows
       xhi further on), c gets both, act [rows, N / 2] silu(gate) up (TMA map amap if atma) */
    char *act;
    int64_t act_rs;
    CUtensorMap amap;
    int atma;
    /* TMA loads (warp-specialized schedules 0, 3, 4, 6): the A tile of packed (ungathered) varlen-M
       rows from lmap_a ([rows_max, D], boxes 128 x 64), the weight tile from lmap_b[part] (3-D
       weights: K-major [E, x, k] boxes BN x 64; MN-major [E, k, x] boxes 64 x 64); ld_a / ld_b 0:
       that operand is copied by the loading threads (gathered rows, pointer arrays, no encoder) */
    CUtensorMap lmap_a, lmap_b[2];
    int ld_a, ld_b;
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

/* A shared-memory operand with the 128-byte swizzle. K-major: 8-row groups 1024 bytes apart (the
   leading offset is unused and encoded as 1). MN-major: the leading offset is the distance between
   64-element atoms along M/N (SM90_ATOM_STRIDE), the stride offset between 8-deep k groups (1024).
 */
#define SM90_ATOM_STRIDE 8192
static __device__ __forceinline__ uint64_t smem_desc(uint32_t addr, int mn)
{
    const uint64_t lbo = mn ? SM90_ATOM_STRIDE >> 4 : 1;
    return (uint64_t)((addr & 0x3FFFF) >> 4) | (lbo << 16) | ((uint64_t)(1024 >> 4) << 32) |
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

/* d[64 x 256 per warpgroup] (+)= A[64 x 16] · B[256 x 16]ᵀ, both from shared memory, elements of
   PTX type TY ("bf16" or "f16"). TA / TB: 1 reads that operand MN-major (the transpose bits). */
#define SM90_WGMMA(TY)                                                                             \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %130, 0;\n"                                     \
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32." TY "." TY " " D128_REGS            \
                 ", %128, %129, p, 1, 1, %131, %132;\n}\n"                                         \
                 : D_OPERANDS                                                                      \
                 : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB))

#define D64_REGS                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, "                                                            \
    "%8, %9, %10, %11, %12, %13, %14, %15, "                                                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, "                                                     \
    "%24, %25, %26, %27, %28, %29, %30, %31, "                                                     \
    "%32, %33, %34, %35, %36, %37, %38, %39, "                                                     \
    "%40, %41, %42, %43, %44, %45, %46, %47, "                                                     \
    "%48, %49, %50, %51, %52, %53, %54, %55, "                                                     \
    "%56, %57, %58, %59, %60, %61, %62, %63}"
#define D64_OPERANDS D8(0), D8(8), D8(16), D8(24), D8(32), D8(40), D8(48), D8(56)

/* The ping-pong schedule's half: d[64 x 128] (+)= A[64 x 16] · B[128 x 16]ᵀ (64 floats of d). */
#define SM90_WGMMA128(TY)                                                                          \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"                                      \
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32." TY "." TY " " D64_REGS             \
                 ", %64, %65, p, 1, 1, %67, %68;\n}\n"                                             \
                 : D64_OPERANDS                                                                    \
                 : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB))

#define D32_REGS                                                                                   \
    "{%0, %1, %2, %3, %4, %5, %6, %7, "                                                            \
    "%8, %9, %10, %11, %12, %13, %14, %15, "                                                       \
    "%16, %17, %18, %19, %20, %21, %22, %23, "                                                     \
    "%24, %25, %26, %27, %28, %29, %30, %31}"
#define D32_OPERANDS D8(0), D8(8), D8(16), D8(24)

/* The narrow ping-pong's half: d[64 x 64] (+)= A[64 x 16] · B[64 x 16]ᵀ (32 floats of d). */
#define SM90_WGMMA64(TY)                                                                           \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %34, 0;\n"                                      \
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32." TY "." TY " " D32_REGS              \
                 ", %32, %33, p, 1, 1, %35, %36;\n}\n"                                             \
                 : D32_OPERANDS                                                                    \
                 : "l"(da), "l"(db), "r"(accumulate), "n"(TA), "n"(TB))

/* One wgmma of width N (256: SM90_WGMMA, 128: SM90_WGMMA128, 64: SM90_WGMMA64) on elements of
   type T. */
template <int N, typename T, int TA, int TB>
static __device__ __forceinline__ void wgmma(float *d, uint64_t da, uint64_t db, int accumulate)
{
    static_assert(N == 256 || N == 128 || N == 64, "wgmma widths");
    constexpr bool f16 = std::is_same<T, __half>::value;
    if constexpr (N == 256 && f16)
        SM90_WGMMA("f16");
    else if constexpr (N == 256)
        SM90_WGMMA("bf16");
    else if constexpr (N == 128 && f16)
        SM90_WGMMA128("f16");
    else if constexpr (N == 128)
        SM90_WGMMA128("bf16");
    else if constexpr (f16)
        SM90_WGMMA64("f16");
    else
        SM90_WGMMA64("bf16");
}

/* tiles[e] = first tile of expert e (exclusive prefix), tiles[E] = all tiles. 256 threads, each
   sums up to SM90_MAX_E / 256 experts, then a Hillis–Steele scan of the 256 partial sums. */
static __device__ void tile_prefix(const int64_t *offsets, int E, int nt, int *tiles, int *part)
{
    const int t = threadIdx.x, per = (E + SM90_THREADS - 1) / SM90_THREADS;
    const int on = t < SM90_THREADS; /* a larger block's other threads only meet the barriers */
    int sum = 0;
    for (int j = 0; on && j < per; j++) {
        const int e = t * per + j;
        if (e < E)
            sum += (int)((offsets[e + 1] - offsets[e] + SM90_BM - 1) / SM90_BM) * nt;
    }
    if (on)
        part[t] = sum;
    __syncthreads();
    for (int s = 1; s < SM90_THREADS; s *= 2) {
        const int v = on && t >= s ? part[t - s] : 0;
        __syncthreads();
        if (on)
            part[t] += v;
        __syncthreads();
    }
    int run = on ? part[t] - sum : 0;
    for (int j = 0; on && j < per; j++) {
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

/* One output tile: expert e, rows r0..r_end of it (varlen-M: the tile's M rows start at r0;
   varlen-K: the reduction), first m (varlen-K) and n, k-tiles. */
struct sm90_tile {
    int e, KT, m0, n0;
    int64_t r0, r_end;
};

static __device__ __forceinline__ const char *weight_base(const struct sm90_op &o, int p, int e)
{
    return o.ptr[p] ? (const char *)o.ptr[p][e] : o.mbase[p] + (int64_t)e * o.es[p];
}

/* n / d for 0 <= n < 2^31, (m, s) from fastdiv_of(d): a hardware division is ~20 dependent
   instructions, and a loader does one per gathered row */
static __device__ __forceinline__ uint32_t fastdiv(uint32_t n, uint32_t m, int s)
{
    return (__umulhi(n, m) + n) >> s;
}

/* The source row of operand row r (valid: r < the operand's rows) from gather[r], loaded earlier
   (raw = gather[r]; without a gather, raw = r) so that the load's latency overlaps other work. */
static __device__ __forceinline__ uint32_t gather_raw(const int32_t *gather, int64_t r)
{
    return gather ? (uint32_t)__ldg(gather + r) : (uint32_t)r;
}
static __device__ __forceinline__ int64_t source_row(const int32_t *gather, uint32_t m, int s,
                                                     uint32_t raw)
{
    return gather ? fastdiv(raw, m, s) : raw;
}

/* What one of NT loading threads (threadIdx.x < NT) copies of an X-wide operand tile per stage.
   ROWS: the operand is activation rows (else weights), known per kernel kind (sm90_kind). */
template <int X, int MN, int NT, int ROWS> struct sm90_loader;

/* K-major: chunk (tid % 8) of tile rows tid / 8 + (NT / 8) i; its shared-memory offset in the tile
   is row * 128 + ((chunk ^ row % 8) * 16), and row % 8 is the same for all of a thread's rows. Rows
   are x (varlen-M: global rows from x0 = r0, gathered; weights: part by x). */
template <int X, int NT, int ROWS> struct sm90_loader<X, 0, NT, ROWS> {
    static constexpr int RSTEP = NT / 8, NR = X / RSTEP;
    static_assert(RSTEP % 8 == 0 && X % RSTEP == 0, "rows of a thread share row % 8");
    const char *p[NR];
    int bytes[NR];
    uint32_t dst;

    __device__ __forceinline__ void plan(const struct sm90_op &o, const struct sm90_tile &t,
                                         int64_t x0)
    {
        const int tid = threadIdx.x, chunk = tid & 7, row = tid >> 3;
        dst = (uint32_t)(row * 128 + ((chunk ^ (row & 7)) << 4));
        if constexpr (ROWS) {
            /* every gather index is loaded before the first is used (a row past the expert's end
               reads row r0, which a varlen-M tile always has, and copies nothing) */
            uint32_t raw[NR];
#pragma unroll
            for (int i = 0; i < NR; i++) {
                const int64_t x = x0 + row + RSTEP * i;
                raw[i] = gather_raw(o.gather, x < t.r_end ? x : t.r0);
            }
#pragma unroll
            for (int i = 0; i < NR; i++) {
                bytes[i] = x0 + row + RSTEP * i < t.r_end ? 16 : 0;
                p[i] = o.base + source_row(o.gather, o.div_m, o.div_s, raw[i]) * o.rs + chunk * 16;
            }
        } else {
#pragma unroll
            for (int i = 0; i < NR; i++) {
                /* SwiGLU: the tile's upper 128 rows are the up part's (o.xhi further on) */
                const int64_t x = x0 + row + RSTEP * i + (X == SM90_BN && i >= NR / 2 ? o.xhi : 0);
                const int part = x >= o.split;
                p[i] = weight_base(o, part, t.e) + (x - (part ? o.split : 0)) * o.xs[part] +
                       chunk * 16;
                bytes[i] = 16;
            }
        }
    }

    __device__ __forceinline__ void load(uint32_t tile, int kt)
    {
        const int64_t k = (int64_t)kt * SM90_BK * 2;
#pragma unroll
        for (int i = 0; i < NR; i++)
            cp_async16(tile + dst + i * RSTEP * 128, p[i] + k, bytes[i]);
    }
};

/* MN-major weights: x-chunk (tid % XC) of the weight rows (k) tid / XC + KSTEP j, the part by k.
   A KSTEP below 8 (128 threads on a 256-wide tile) moves a thread's k rows within their 8-row
   group. */
template <int X, int NT> struct sm90_loader<X, 1, NT, 0> {
    static constexpr int XC = X / 8, KSTEP = NT / XC, NJ = SM90_BK / KSTEP;
    static_assert(KSTEP >= 1 && SM90_BK % KSTEP == 0 && (KSTEP % 8 == 0 || 8 % KSTEP == 0),
                  "k rows of a thread");
    const char *xb0, *xb1; /* part 0 / 1 */
    int64_t ks0, ks1;
    int k_first, split;
    /* KSTEP >= 8: where k row k_first goes; below 8, k rows k_first + KSTEP p (p < 8 / KSTEP)
       of the first 8-row group (row k_first + KSTEP j is dst[j % P] + 1024 (j / P)) */
    static constexpr int P = KSTEP >= 8 ? 1 : 8 / KSTEP;
    uint32_t dst[P];

    __device__ __forceinline__ void plan(const struct sm90_op &o, const struct sm90_tile &t,
                                         int64_t x0)
    {
        const int tid = threadIdx.x, xc = tid % XC;
        k_first = tid / XC;
#pragma unroll
        for (int p = 0; p < P; p++) {
            const int k = k_first + (P > 1 ? KSTEP * p : 0), kr = k & 7;
            dst[p] = (uint32_t)((xc >> 3) * SM90_ATOM_STRIDE + (k >> 3) * 1024 + kr * 128 +
                                (((xc & 7) ^ kr) << 4));
        }
        split = o.split;
        const int64_t xoff = (x0 + 8 * xc) * 2;
        ks0 = o.ks[0];
        ks1 = o.ks[1];
        xb0 = weight_base(o, 0, t.e) + xoff;
        xb1 = weight_base(o, 1, t.e) + xoff - (int64_t)o.split * o.ks[1];
    }

    /* where k row k_first + KSTEP j of this thread's x-chunk goes in the tile */
    __device__ __forceinline__ uint32_t stage_offset(int j) const
    {
        if constexpr (P == 1)
            return dst[0] + (uint32_t)(j * (KSTEP / 8) * 1024);
        return dst[j % P] + (uint32_t)((j / P) * 1024);
    }

    __device__ __forceinline__ void load(uint32_t tile, int kt)
    {
        /* a k-step lies in one part (split % BK == 0, sm90_kind): one base and step for all j */
        const int k0 = kt * SM90_BK, two = k0 >= split;
        const int64_t ks = two ? ks1 : ks0;
        const char *b = (two ? xb1 : xb0) + (int64_t)(k0 + k_first) * ks;
        const int64_t step = ks * KSTEP;
#pragma unroll
        for (int j = 0; j < NJ; j++)
            cp_async16(tile + stage_offset(j), b + j * step, 16);
    }
};

/* MN-major activation rows (varlen-K: k rows are the expert's global rows, gathered, zero past
   r_end): chunk c = tid % 8 of each 64-wide atom m < X / 64, of the k rows tid / 8 + KSTEP i. A
   thread's NM copies of a row share its one gather index and address: the loader's work per
   k-step is per row, and rows are few (an earlier mapping, one chunk of many rows per thread,
   spent ~600 instructions per k-step on row addresses and starved the tensor cores; ncu). Since
   KSTEP is a multiple of 8, all of a thread's rows sit at the same place in their 8-row groups.
   The gather indices are loaded a k-step ahead (raw), so that a copy never waits for one (more
   k-steps ahead measured no faster). */
template <int X, int NT> struct sm90_loader<X, 1, NT, 1> {
    static constexpr int KSTEP = NT / 8, NI = SM90_BK / KSTEP, NM = X / 64;
    static_assert(KSTEP % 8 == 0 && SM90_BK % KSTEP == 0 && X % 64 == 0, "rows of a thread");
    const char *xb;
    int64_t rs;
    const int32_t *gather;
    uint32_t div_m;
    int div_s;
    int r0, r_end; /* row counts fit 31 bits (sm90_kind): 32-bit compares in the loop */
    int k_first;
    uint32_t dst;     /* row k_first, atom 0 */
    uint32_t raw[NI]; /* the gather indices of the next k-step's rows */

    /* raw for k-step kt (a row past the expert's end reads row r0: a tile with k-steps has it) */
    __device__ __forceinline__ void prefetch(int kt)
    {
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const int r = r0 + kt * SM90_BK + k_first + KSTEP * i;
            raw[i] = gather_raw(gather, r < r_end ? r : r0);
        }
    }

    __device__ __forceinline__ void plan(const struct sm90_op &o, const struct sm90_tile &t,
                                         int64_t x0)
    {
        const int tid = threadIdx.x, c = tid & 7, kr = (tid >> 3) & 7;
        k_first = tid >> 3;
        dst = (uint32_t)((k_first >> 3) * 1024 + kr * 128 + ((c ^ kr) << 4));
        gather = o.gather;
        div_m = o.div_m;
        div_s = o.div_s;
        r0 = (int)t.r0;
        r_end = (int)t.r_end;
        rs = o.rs;
        xb = o.base + (x0 + 8 * c) * 2;
        prefetch(0);
    }

    __device__ __forceinline__ void load(uint32_t tile, int kt)
    {
        const int k0 = r0 + kt * SM90_BK + k_first;
#pragma unroll
        for (int i = 0; i < NI; i++) {
            const char *src = xb + source_row(gather, div_m, div_s, raw[i]) * rs;
            const int bytes = k0 + KSTEP * i < r_end ? 16 : 0;
            const uint32_t at = tile + dst + (uint32_t)(i * (KSTEP / 8) * 1024);
#pragma unroll
            for (int m = 0; m < NM; m++)
                cp_async16(at + m * SM90_ATOM_STRIDE, src + m * 128, bytes);
        }
        prefetch(kt + 1);
    }
};

/* Where a tile's rows go: tile row i (0 .. BM-1) at base + i * rs, rows i >= lim not written
   (varlen-M: past the expert's end). */
struct sm90_dst {
    char *base;
    int64_t rs;
    int64_t lim;
    const CUtensorMap *map; /* NULL: no TMA store; else the tile's rows at (x, y[, z]) in it */
    int x, y, z, rank3;
    int xhi; /* the tile's columns from 128 on go xhi columns further (SwiGLU: the up half) */
};

static __device__ __forceinline__ struct sm90_dst dst_of(const struct sm90_args &g,
                                                         const struct sm90_tile &t)
{
    struct sm90_dst o;
    if (g.varlen_k) {
        const int part = t.m0 >= g.c_split;
        char *base =
            g.cptr[part] ? (char *)g.cptr[part][t.e] : g.cbase[part] + (int64_t)t.e * g.ces[part];
        o.rs = g.crs[part];
        o.base = base + (t.m0 - (part ? g.c_split : 0)) * o.rs + (int64_t)t.n0 * 2;
        o.lim = SM90_BM;
        o.map = g.tma[part] ? &g.cmap[part] : NULL;
        o.y = t.m0 - (part ? g.c_split : 0);
        o.z = t.e;
        o.rank3 = 1;
    } else {
        o.rs = g.c_rs;
        o.base = g.c + t.r0 * o.rs + (int64_t)t.n0 * 2;
        o.lim = t.r_end - t.r0;
        o.map = g.tma[0] ? &g.cmap[0] : NULL;
        o.y = (int)t.r0;
        o.z = 0;
        o.rank3 = 0;
    }
    o.x = t.n0;
    o.xhi = g.b.xhi;
    return o;
}

/* The activation tile of a fused SwiGLU: the tile's rows of act, its 128 columns from n0. */
static __device__ __forceinline__ struct sm90_dst act_of(const struct sm90_args &g,
                                                         const struct sm90_tile &t)
{
    struct sm90_dst o = dst_of(g, t);
    o.rs = g.act_rs;
    o.base = g.act + t.r0 * o.rs + (int64_t)t.n0 * 2;
    o.map = g.atma ? &g.amap : NULL;
    o.xhi = 0;
    return o;
}

static __device__ __forceinline__ uint32_t pack2(__nv_bfloat16, float x, float y)
{
    const __nv_bfloat162 v = __floats2bfloat162_rn(x, y);
    return *(const uint32_t *)&v;
}
static __device__ __forceinline__ uint32_t pack2(__half, float x, float y)
{
    const __half2 v = __floats2half2_rn(x, y);
    return *(const uint32_t *)&v;
}

/* silu(g) u of the two halves as stored (rounded to T): moe__swiglu_cuda's bits */
template <typename T> static __device__ __forceinline__ float swiglu_of(float g, float u)
{
    return moe__silu(moe__to_f(moe__from_f<T>(g))) * moe__to_f(moe__from_f<T>(u));
}

/* Output columns of a COLS-wide accumulator fragment: all, or with SwiGLU's activation (ACT) the
   gate half's. */
#define SM90_OUT_COLS(ACT, COLS) ((ACT) ? (COLS) / 2 : (COLS))

/* The pair of outputs at fragment element i (even; columns c, c + 1 of one row) as two T: the
   accumulators, or (ACT) SwiGLU of the gate pair at i and the up pair 64 elements (128 columns)
   further on. */
template <typename T, int ACT>
static __device__ __forceinline__ uint32_t out_pair(const float *d, int i)
{
    if (ACT)
        return pack2(T(), swiglu_of<T>(d[i], d[i + 64]), swiglu_of<T>(d[i + 1], d[i + 65]));
    return pack2(T(), d[i], d[i + 1]);
}

/* A warp's accumulator fragment of a 64 x COLS wgmma: rows ra = row0 + lane / 4 and ra + 8 of the
   tile (row0: the warp's first), columns 2 (lane % 4) + 8 j, j < COLS / 8. Written straight to
   global memory: 16 bytes per row per warp store, so the slow path (outputs not 16-byte aligned).
   ZERO: a tile without k-steps (varlen-K, an expert without rows) writes zeros and never touches
   d: ordinary writes to the accumulators can make ptxas serialize every wgmma of the kernel
   (C7515). */
template <typename T, int ZERO = 0, int ACT = 0, int COLS = SM90_BN>
static __device__ __forceinline__ void store_direct(const struct sm90_dst &o, const float *d,
                                                    int row0, int lane)
{
    const int64_t ra = row0 + (lane >> 2), rb = ra + 8;
    uint32_t *pa = (uint32_t *)(o.base + ra * o.rs) + (lane & 3);
    uint32_t *pb = (uint32_t *)(o.base + rb * o.rs) + (lane & 3);
#pragma unroll
    for (int j = 0; j < SM90_OUT_COLS(ACT, COLS) / 8; j++) {
        const int hi = j >= 16 ? o.xhi / 2 : 0; /* in pairs */
        if (ra < o.lim)
            pa[4 * j + hi] = ZERO ? 0u : out_pair<T, ACT>(d, 4 * j);
        if (rb < o.lim)
            pb[4 * j + hi] = ZERO ? 0u : out_pair<T, ACT>(d, 4 * j + 2);
    }
}

/* The tile's output through the warp's own 2 KB buffer (not a ring stage: the loads run on into
   all stages while the tile is written out, and no barrier but the warp's own is needed). Per
   64-column sub-tile: the warp's 16 accumulator rows into the buffer (rows of 128 bytes, 16-byte
   chunk c of row r at c ^ r % 8: conflict-free both ways), then out with 16-byte stores, four
   whole 128-byte row pieces per warp store. Rows >= o.lim are not written. (Earlier designs
   staged the whole tile in the tile's last two ring stages: the ring then drained at every tile
   edge, which cost ~25 % on the 8-k-step tiles against cuBLAS on the same uniform problem.) */
template <typename T, int ACT, int COLS>
static __device__ __forceinline__ void store_tile(const struct sm90_dst &o, const float *d,
                                                  uint32_t buf, int row0, int lane)
{
    const int64_t rows = o.lim - row0; /* > 0: write_tile skips warps without rows */
    const int r = lane >> 2; /* writes: rows r and r + 8, 4 bytes at column 2 (lane % 4) + 8 jj */
    const uint32_t wa = buf + (uint32_t)(r * 128 + 4 * (lane & 3));
    const int rr = lane >> 3, c = lane & 7; /* reads: chunk c of rows rr + 4 i */
    char *dst = o.base + (int64_t)(row0 + rr) * o.rs + c * 16;
#pragma unroll
    for (int sub = 0; sub < SM90_OUT_COLS(ACT, COLS) / 64; sub++) {
#pragma unroll
        for (int jj = 0; jj < 8; jj++) {
            const int i = 4 * (sub * 8 + jj);
            const uint32_t at = wa + (uint32_t)(((jj ^ r) & 7) << 4);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(out_pair<T, ACT>(d, i))
                         : "memory");
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at + 8 * 128),
                         "r"(out_pair<T, ACT>(d, i + 2))
                         : "memory");
        }
        __syncwarp();
#pragma unroll
        for (int i = 0; i < 4; i++) {
            const int row = rr + 4 * i;
            uint32_t x, y, z, w;
            asm volatile("ld.shared.v4.b32 {%0, %1, %2, %3}, [%4];\n"
                         : "=r"(x), "=r"(y), "=r"(z), "=r"(w)
                         : "r"(buf + (uint32_t)(row * 128 + ((c ^ (row & 7)) << 4))));
            if (row < rows)
                asm volatile(
                    "st.global.v4.b32 [%0], {%1, %2, %3, %4};\n" ::"l"(
                        dst + (int64_t)(4 * i) * o.rs + sub * 128 + (sub >= 2 ? o.xhi * 2 : 0)),
                    "r"(x), "r"(y), "r"(z), "r"(w)
                    : "memory");
        }
        __syncwarp(); /* every lane has read the buffer before the next sub-tile overwrites it */
    }
}

/* A tile whose output can go through the warp buffers: 16-byte aligned rows (pointer-array bases
   are only known here). */
static __device__ __forceinline__ int bufferable(const struct sm90_dst &o)
{
    return (((uintptr_t)o.base | (uintptr_t)o.rs) & 15) == 0;
}

/* ---- TMA stores: a warp's full 16 rows go out as 8 sub-tiles of 16 x 32 through two 1 KB
   halves of its buffer (64-byte swizzle: chunk c of row r at c ^ (r / 2) % 4, conflict-free for
   the accumulator layout), one bulk tensor store each. The warp only waits until the store
   before last has read its half: the global writes drain while the next tile computes. (With
   every warp storing synchronously, the stores were ~15-30 % of the 8-k-step GEMMs' time:
   measured by dropping them. Through TMA the long tiles gained 11-15 %, the 8-k-step ones
   nothing: their cost is the tile-end drain and late loads, tests/bench/RESULTS.md.) ---- */

/* until at most N of this thread's bulk stores are still reading shared memory */
template <int N> static __device__ __forceinline__ void bulk_wait_read()
{
#if MOE_DIAG != 3 /* diagnostic: no waits (racy output; timing only) */
    asm volatile("cp.async.bulk.wait_group.read %0;\n" ::"n"(N) : "memory");
#endif
}

static __device__ __forceinline__ void tma_store(const struct sm90_dst &o, uint32_t src, int x,
                                                 int y)
{
    if (o.rank3)
        asm volatile(
            "cp.async.bulk.tensor.3d.global.shared::cta.bulk_group [%0, {%2, %3, %4}], [%1];\n" ::
                "l"(o.map),
            "r"(src), "r"(x), "r"(y), "r"(o.z)
            : "memory");
    else
        asm volatile(
            "cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%2, %3}], [%1];\n" ::"l"(
                o.map),
            "r"(src), "r"(x), "r"(y)
            : "memory");
    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
}

template <typename T, int ACT, int COLS>
static __device__ __forceinline__ void store_tile_tma(const struct sm90_dst &o, const float *d,
                                                      uint32_t buf, int row0, int lane)
{
    const int r = lane >> 2;
    const uint32_t wa = buf + (uint32_t)(r * 64 + 4 * (lane & 3));
    const int sw = (r >> 1) & 3; /* rows r and r + 8 share it */
#pragma unroll
    /* an even count of sub-tiles per call (8, or 4 of the activation or a 128-wide fragment): the
       half that sub-tile sub uses is sub % 2 across tiles and calls as well */
    for (int sub = 0; sub < SM90_OUT_COLS(ACT, COLS) / 32; sub++) {
        const uint32_t half = (uint32_t)((sub & 1) * 1024);
        if (lane == 0)
            bulk_wait_read<1>(); /* the store before last (this half's) has read it */
        __syncwarp();
#pragma unroll
        for (int jj = 0; jj < 4; jj++) {
            const int i = 4 * (sub * 4 + jj);
            const uint32_t at = wa + half + (uint32_t)((jj ^ sw) << 4);
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at), "r"(out_pair<T, ACT>(d, i))
                         : "memory");
            asm volatile("st.shared.b32 [%0], %1;\n" ::"r"(at + 8 * 64),
                         "r"(out_pair<T, ACT>(d, i + 2))
                         : "memory");
        }
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); /* visible to the TMA */
        __syncwarp();
        if (lane == 0)
            tma_store(o, buf + half, o.x + sub * 32 + (sub >= 4 ? o.xhi : 0), o.y + row0);
    }
}

/* A warp's fragment (64 x COLS wgmma, rows from row0) out, through buf, its own buffer: TMA
   stores for a warp with 16 rows to write into a mapped output, else the row copies (or,
   unaligned, the direct stores), after the warp's earlier TMA stores have read its buffer. */
template <typename T, int ACT, int COLS>
static __device__ __forceinline__ void write_tile(const struct sm90_dst &o, const float *d,
                                                  uint32_t buf, int row0, int lane)
{
    if (o.lim <= row0)
        return; /* also a warpgroup that skipped its wgmma: its d was never computed */
    if (o.map && o.lim >= row0 + 16) {
        store_tile_tma<T, ACT, COLS>(o, d, buf, row0, lane);
        return;
    }
    if (lane == 0)
        bulk_wait_read<0>();
    __syncwarp();
    if (bufferable(o))
        store_tile<T, ACT, COLS>(o, d, buf, row0, lane);
    else
        store_direct<T, 0, ACT, COLS>(o, d, row0, lane);
}

/* The cooperative schedules' fragment of computing thread tid (of 256): warpgroup wg's 64 rows
   of the tile, the warp's 16 of them from row0, its output buffer. */
struct sm90_frag {
    int row0, lane;
    uint32_t buf;
};

static __device__ __forceinline__ struct sm90_frag frag_of(int tid, uint32_t epi)
{
    const int wg = tid >> 7, warp = (tid >> 5) & 3;
    return {wg * 64 + warp * 16, tid & 31, epi + (uint32_t)((wg * 4 + warp) * SM90_EPI_WARP_BYTES)};
}

/* A finished tile's outputs: c, and with SwiGLU fused (only the K/K kernel: the forward's gate|up
   GEMM) its activation. */
template <typename T, int ACT>
static __device__ __forceinline__ void write_out(const struct sm90_args &g,
                                                 const struct sm90_tile &t, const float *d,
                                                 uint32_t epi, int tid)
{
    const struct sm90_frag f = frag_of(tid, epi);
    write_tile<T, 0, SM90_BN>(dst_of(g, t), d, f.buf, f.row0, f.lane);
    if (ACT)
        write_tile<T, 1, SM90_BN>(act_of(g, t), d, f.buf, f.row0, f.lane);
}

/* Before the kernel ends: every TMA store of this thread has completed. */
static __device__ __forceinline__ void bulk_wait_all()
{
    asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
}

/* One k-step of warpgroup wg: d (+)= its 64 A rows × the 256 B rows of the stage at stage_addr,
   over the first NK of the step's four 16-deep slices, committed as one wgmma group (acc 0 on a
   tile's first k-step: d is overwritten). */
template <typename T, int AMN, int BMN, int NK>
static __device__ __forceinline__ void sm90_mma_slices(float *d, uint32_t stage_addr, int wg,
                                                       int acc)
{
    const uint32_t sa = stage_addr, sb = sa + SM90_A_BYTES;
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int ks = 0; ks < NK; ks++) {
        const uint32_t a_at =
            AMN ? sa + wg * SM90_ATOM_STRIDE + ks * 2048 : sa + wg * 64 * 128 + ks * 32;
        const uint32_t b_at = BMN ? sb + ks * 2048 : sb + ks * 32;
        wgmma<SM90_BN, T, AMN, BMN>(d, smem_desc(a_at, AMN), smem_desc(b_at, BMN), acc || ks > 0);
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

/* The same with the first nk slices only (the rest of a weight-grad tile's last k-step lies past
   the expert's rows: zeros). Each count is its own straight-line group: a branch between the
   wgmma of one group makes ptxas serialize every wgmma of the kernel (C7520). */
template <typename T, int AMN, int BMN>
static __device__ __forceinline__ void sm90_mma_stage(float *d, uint32_t stage_addr, int wg,
                                                      int acc, int nk)
{
    if (nk >= SM90_BK / 16)
        sm90_mma_slices<T, AMN, BMN, SM90_BK / 16>(d, stage_addr, wg, acc);
    else if (nk == 3)
        sm90_mma_slices<T, AMN, BMN, 3>(d, stage_addr, wg, acc);
    else if (nk == 2)
        sm90_mma_slices<T, AMN, BMN, 2>(d, stage_addr, wg, acc);
    else
        sm90_mma_slices<T, AMN, BMN, 1>(d, stage_addr, wg, acc);
}

/* Ping-pong (schedules 3 and 6): one k-step of a warpgroup's own 128 x BN tile (BN 128 or 64),
   as NH halves of 64 rows (d and d + BN / 2, m64nBN each; NH 1: the tile's rows 64.. are all past
   the expert's end) over the first NK slices, one wgmma group. The same per-element k order as
   sm90_mma_slices: the bits of the other schedules. */
template <typename T, int AMN, int BMN, int NK, int NH, int BN>
static __device__ __forceinline__ void sm90p_mma_slices(float *d, uint32_t stage_addr, int acc)
{
    const uint32_t sa = stage_addr, sb = sa + SM90_A_BYTES;
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
    for (int ks = 0; ks < NK; ks++) {
        const uint32_t b_at = BMN ? sb + ks * 2048 : sb + ks * 32;
#pragma unroll
        for (int h = 0; h < NH; h++) {
            const uint32_t a_at =
                AMN ? sa + h * SM90_ATOM_STRIDE + ks * 2048 : sa + h * 64 * 128 + ks * 32;
            wgmma<BN, T, AMN, BMN>(d + BN / 2 * h, smem_desc(a_at, AMN), smem_desc(b_at, BMN),
                                   acc || ks > 0);
        }
    }
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}

/* varlen-M: all four slices, one or two halves; varlen-K: both halves, nk slices (each its own
   straight-line group, as in sm90_mma_stage) */
template <typename T, int AMN, int BMN, int BN>
static __device__ __forceinline__ void sm90p_mma_stage(float *d, uint32_t stage_addr, int acc,
                                                       int nk, int nh)
{
    if (nh == 1)
        sm90p_mma_slices<T, AMN, BMN, SM90_BK / 16, 1, BN>(d, stage_addr, acc);
    else if (nk >= SM90_BK / 16)
        sm90p_mma_slices<T, AMN, BMN, SM90_BK / 16, 2, BN>(d, stage_addr, acc);
    else if (nk == 3)
        sm90p_mma_slices<T, AMN, BMN, 3, 2, BN>(d, stage_addr, acc);
    else if (nk == 2)
        sm90p_mma_slices<T, AMN, BMN, 2, 2, BN>(d, stage_addr, acc);
    else
        sm90p_mma_slices<T, AMN, BMN, 1, 2, BN>(d, stage_addr, acc);
}

/* The 16-deep slices of k-step kt that hold rows: all four, except in a weight-grad tile's last
   k-step. */
static __device__ __forceinline__ int kslices(const struct sm90_args &g, const struct sm90_tile &t,
                                              int kt)
{
    if (!g.varlen_k)
        return SM90_BK / 16;
    const int64_t left = t.r_end - t.r0 - (int64_t)kt * SM90_BK;
    return left >= SM90_BK ? SM90_BK / 16 : (int)((left + 15) / 16);
}

/* 0: warpgroup wg's 64 rows of the tile are all past its expert's end (the last tile of a
   varlen-M expert with at most 64 rows left): the warpgroup skips its wgmma, halving the cost of
   such tiles; its accumulators are never stored (copies stop at the end). */
static __device__ __forceinline__ int wg_live(const struct sm90_args &g, const struct sm90_tile &t,
                                              int wg)
{
    return g.varlen_k || t.r_end - t.r0 > (int64_t)wg * 64;
}

template <int BN = SM90_BN>
static __device__ __forceinline__ struct sm90_tile tile_of(const struct sm90_args &g,
                                                           const int *tiles, int nt, int q)
{
    struct sm90_tile t;
    if (g.varlen_k) {
        const int per = (g.M / SM90_BM) * nt, local = q % per;
        t.e = q / per;
        t.m0 = (local / nt) * SM90_BM;
        t.n0 = (local % nt) * BN;
        t.r0 = g.offsets[t.e];
        t.r_end = g.offsets[t.e + 1];
        t.KT = (int)((t.r_end - t.r0 + SM90_BK - 1) / SM90_BK);
    } else {
        t.e = tile_expert(tiles, g.E, q);
        const int local = q - tiles[t.e];
        t.m0 = 0;
        t.n0 = (local % nt) * (g.act ? BN / 2 : BN); /* SwiGLU: gate columns */
        t.r0 = g.offsets[t.e] + (int64_t)(local / nt) * SM90_BM;
        t.r_end = g.offsets[t.e + 1];
        t.KT = g.D / SM90_BK;
    }
    return t;
}

/* The copy side of the ring: walks this CTA's tiles (q = blockIdx.x, + gridDim.x, ...), skipping
   tiles without k-steps, and fills one stage per call, so the next tile's first stages load while
   the current tile's last ones compute. Every call commits one cp.async group (empty past the end),
   which keeps the group count equal to the consumer's slot count. */
template <int AMN, int BMN> struct sm90_producer {
    sm90_loader<SM90_BM, AMN, SM90_THREADS, 1> la;   /* A: always activation rows */
    sm90_loader<SM90_BN, BMN, SM90_THREADS, AMN> lb; /* B: rows only in varlen-K (MN/MN) */
    int q, kt, KT, slot;

    __device__ __forceinline__ void seek(const struct sm90_args &g, const int *tiles, int nt,
                                         int total)
    {
        for (; q < total; q += gridDim.x) {
            const struct sm90_tile t = tile_of(g, tiles, nt, q);
            if (t.KT > 0) {
                la.plan(g.a, t, g.varlen_k ? t.m0 : t.r0);
                lb.plan(g.b, t, t.n0);
                KT = t.KT;
                kt = 0;
                return;
            }
        }
    }

    __device__ __forceinline__ void fill(const struct sm90_args &g, const int *tiles, int nt,
                                         int total, uint32_t ring)
    {
        if (q < total) {
            const uint32_t st = ring + (slot % SM90_STAGES) * SM90_STAGE_BYTES;
            la.load(st, kt);
            lb.load(st + SM90_A_BYTES, kt);
            if (++kt == KT) {
                q += gridDim.x;
                seek(g, tiles, nt, total);
            }
        }
        slot++;
        asm volatile("cp.async.commit_group;\n" ::);
    }
};

template <typename T, int AMN, int BMN, int ACT>
static __global__ void __launch_bounds__(SM90_THREADS, 1)
    sm90_gemm_kernel(const __grid_constant__ struct sm90_args g)
{
    extern __shared__ char smem_raw[];
    __shared__ int tiles[SM90_MAX_E + 1];
    __shared__ int part[SM90_THREADS];
    const uint32_t ring = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t epi = ring + SM90_STAGES * SM90_STAGE_BYTES;
    const int nt = g.N / SM90_BN, wg = threadIdx.x >> 7;
    float d[128];

    int total;
    if (g.varlen_k) {
        total = g.E * (g.M / SM90_BM) * nt;
    } else {
        tile_prefix(g.offsets, g.E, nt, tiles, part);
        total = tiles[g.E];
    }
    struct sm90_producer<AMN, BMN> pr;
    pr.q = blockIdx.x;
    pr.slot = 0;
    pr.seek(g, tiles, nt, total);
#pragma unroll
    for (int s = 0; s < SM90_STAGES - 2; s++)
        pr.fill(g, tiles, nt, total, ring);

    /* slot: the consumer's k-steps so far, over all tiles; its stage is slot % STAGES, filled by
       the producer STAGES - 2 calls earlier. A stage is refilled only after every warpgroup's wgmma
       on it has retired (wait_group 1 of the previous slot, then the barrier of this one). */
    int slot = 0;
    for (int q = blockIdx.x; q < total; q += gridDim.x) {
        const struct sm90_tile t = tile_of(g, tiles, nt, q);
        if (t.KT == 0) {
            store_direct<T, 1>(dst_of(g, t), NULL, frag_of(threadIdx.x, 0).row0, threadIdx.x & 31);
            continue;
        }
        for (int kt = 0; kt < t.KT; kt++, slot++) {
            asm volatile("cp.async.wait_group %0;\n" ::"n"(SM90_STAGES - 3));
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
            __syncthreads();
            if (wg_live(g, t, wg))
                sm90_mma_stage<T, AMN, BMN>(d, ring + (slot % SM90_STAGES) * SM90_STAGE_BYTES, wg,
                                            kt > 0, kslices(g, t, kt));
            /* the refill (maybe of the next tile) goes out while the tensor cores work */
            pr.fill(g, tiles, nt, total, ring);
            asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        }
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
        fence_d(d);
        write_out<T, ACT>(g, t, d, epi, threadIdx.x);
    }
    asm volatile("cp.async.wait_group 0;\n" ::);
    bulk_wait_all();
}

/* ---- schedule 2: warp-specialized (warpgroup 0 loads, warpgroups 1 and 2 compute) ----
   The loading warpgroup runs up to S k-steps ahead (not S - 2): it refills a stage as soon as
   both computing warpgroups have retired their wgmma on it, told by an mbarrier ("empty", one
   arrival per computing warp), and its cp.async copies complete a second one ("full", one
   arrival per loading thread, cp.async.mbarrier.arrive.noinc). The computing warpgroups never
   wait for an address computation or a gather index, and while they write a tile out, the next
   tile's stages keep loading. Same tile walk and the same wgmma sequence per tile as schedule 1,
   so the same bits. */

static __device__ __forceinline__ void mbar_init(uint32_t bar, int count)
{
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}

static __device__ __forceinline__ void mbar_wait(uint32_t bar, int parity)
{
    asm volatile("{\n.reg .pred done;\n"
                 "MOE_MBAR_WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra MOE_MBAR_WAIT;\n}\n" ::"r"(bar),
                 "r"(parity)
                 : "memory");
}

static __device__ __forceinline__ void mbar_arrive(uint32_t bar)
{
    asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.shared::cta.b64 state, [%0];\n}\n" ::"r"(bar)
                 : "memory");
}

/* the barrier completes (for this thread's arrival) when its earlier cp.async copies have landed */
static __device__ __forceinline__ void mbar_arrive_on_copies(uint32_t bar)
{
    asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}

/* one arrival that also expects bytes more to land through TMA before the phase completes */
static __device__ __forceinline__ void mbar_arrive_expect(uint32_t bar, uint32_t bytes)
{
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes)
                 : "memory");
}

/* box (x, y[, z]) of map m into shared memory at dst (1024-byte aligned: the 128-byte swizzle's
   pattern is the same as the loaders' copies), completing bytes on barrier bar */
static __device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap *m, int x, int y,
                                                uint32_t bar)
{
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3}], [%4];\n" ::"r"(dst),
                 "l"(m), "r"(x), "r"(y), "r"(bar)
                 : "memory");
}
static __device__ __forceinline__ void tma_load(uint32_t dst, const CUtensorMap *m, int x, int y,
                                                int z, uint32_t bar)
{
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes"
                 " [%0], [%1, {%2, %3, %4}], [%5];\n" ::"r"(dst),
                 "l"(m), "r"(x), "r"(y), "r"(z), "r"(bar)
                 : "memory");
}

/* The TMA loads of one stage (k-step kt of tile t) that g maps (ld_a, ld_b), issued by one
   thread. B: K-major weights split along x (the tile lies in one part), MN-major along k (the
   k-step does), as the loaders' parts. */
template <int BMN, int BN>
static __device__ __forceinline__ void
tma_stage(const struct sm90_args &g, const struct sm90_tile &t, int kt, uint32_t st, uint32_t bar)
{
    const int k0 = kt * SM90_BK;
    mbar_arrive_expect(bar, (g.ld_a ? SM90_A_BYTES : 0) + (g.ld_b ? BN * SM90_BK * 2 : 0));
    if (g.ld_a)
        tma_load(st, &g.lmap_a, k0, (int)t.r0, bar);
    if (!g.ld_b)
        return;
    const uint32_t sb = st + SM90_A_BYTES;
    if (!BMN) {
        const int two = t.n0 >= g.b.split;
        tma_load(sb, &g.lmap_b[two], k0, t.n0 - (two ? g.b.split : 0), t.e, bar);
        return;
    }
    const int two = k0 >= g.b.split;
#pragma unroll
    for (int j = 0; j < BN / 64; j++)
        tma_load(sb + j * SM90_ATOM_STRIDE, &g.lmap_b[two], t.n0 + 64 * j,
                 k0 - (two ? g.b.split : 0), t.e, bar);
}

#define SM90W_THREADS 384
#define SM90W_LOADERS 128
#define SM90W_COMPUTE_WARPS ((SM90W_THREADS - SM90W_LOADERS) / 32)
/* The fused SwiGLU kernel's registers per thread after setmaxnreg (the others keep 168 each): the
   pool of 168 x 384 allows 128 (168 - L) >= 256 (C - 168). ptxas still spills ~28 bytes there (the
   loader's row pointers). A build with a leaner loader (32-bit rows, one pointer per half),
   setmaxnreg and the SwiGLU epilogue all in the common K/K kernel spilled nothing but ran the plain
   forward GEMM ~8 % slower at the Qwen3 shape (which of the three cost it was not isolated), so
   the common kernels stay as they were. */
#define SM90W_LOADER_REGS 136
#define SM90W_COMPUTE_REGS 184

/* The warp-specialized kernel's tiles: cooperative (PP 0; schedules 4 and 2) 128 x 256, both
   computing warpgroups on one tile, 4 stages; ping-pong (PP 1; schedule 3) 128 x 128, each
   computing warpgroup on its own tiles (the CTA's even and odd ones), so that one's drain and
   stores overlap the other's wgmma, 6 stages of the same bytes; narrow ping-pong (PP 2; schedule
   6, varlen-M) the same on 128 x 64 tiles, 8 stages: four times the cooperative kernel's tiles
   for the same B bytes, which pays only where the wider tiles would leave SMs idle (decode;
   sm90_pingpong). */
template <int PP> struct sm90w_cfg {
    static constexpr int BN = PP == 2 ? 64 : PP ? 128 : SM90_BN;
    static constexpr int STAGES = PP == 2 ? 8 : PP ? 6 : SM90_STAGES;
    static constexpr int STAGE_BYTES = SM90_A_BYTES + BN * SM90_BK * 2;
    /* arrivals that free a stage: the warps that computed on it */
    static constexpr int USERS = PP ? SM90W_COMPUTE_WARPS / 2 : SM90W_COMPUTE_WARPS;
    static_assert(STAGES * STAGE_BYTES <= SM90_STAGES * SM90_STAGE_BYTES, "shared memory");
};

template <int AMN, int BMN, int PP, int TL>
static __device__ __forceinline__ void sm90w_load(const struct sm90_args &g, const int *tiles,
                                                  int nt, int total, uint32_t ring, uint32_t full,
                                                  uint32_t empty)
{
    typedef sm90w_cfg<PP> C;
    sm90_loader<SM90_BM, AMN, SM90W_LOADERS, 1> la;
    sm90_loader<C::BN, BMN, SM90W_LOADERS, AMN> lb;
    /* with both operands through TMA one thread issues everything: the other warps leave rather
       than spin on the barriers */
    const int lda = TL && g.ld_a, ldb = TL && g.ld_b; /* TL 0: the kernel without TMA loads */
    const int copies = !(lda && ldb), tma = lda || ldb;
    if (!copies && threadIdx.x >= 32)
        return;
    int slot = 0;
    for (int q = blockIdx.x; q < total; q += gridDim.x) {
        const struct sm90_tile t = tile_of<C::BN>(g, tiles, nt, q);
        if (t.KT == 0)
            continue;
        if (!lda)
            la.plan(g.a, t, g.varlen_k ? t.m0 : t.r0);
        if (!ldb)
            lb.plan(g.b, t, t.n0);
        for (int kt = 0; kt < t.KT; kt++, slot++) {
            const int s = slot % C::STAGES, phase = (slot / C::STAGES) & 1;
            mbar_wait(empty + 8 * s, phase ^ 1); /* a fresh barrier: the "previous" phase is done */
            const uint32_t st = ring + s * C::STAGE_BYTES;
#if MOE_DIAG == 1
            if (tma && threadIdx.x == 0)
                mbar_arrive(full + 8 * s);
            if (copies)
                mbar_arrive(full + 8 * s);
            continue;
#endif
            if (tma && threadIdx.x == 0)
                tma_stage<BMN, C::BN>(g, t, kt, st, full + 8 * s);
            if (!copies)
                continue;
            if (!lda)
                la.load(st, kt);
            if (!ldb)
                lb.load(st + SM90_A_BYTES, kt);
            mbar_arrive_on_copies(full + 8 * s);
        }
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
}

/* One tile's k-steps for a computing warpgroup (slot counts k-steps over the CTA's tiles). A
   stage goes back to the loader (one arrival per warp) as soon as this warp's wgmma on it
   retired: the previous k-step's after this one's wait_group 1, the tile's last after the loop.
   Cooperative (PP 0): warpgroup wg's 64 rows of the 128 x 256 tile, skipped when they are all
   past the expert's end. Ping-pong (PP 1): the warpgroup's own 128 x 128 tile, as many 64-row
   halves as hold rows; its leader lets the other warpgroup start (turn_other) once it has seen
   k-step KT - STAGES arrive (see sm90p_compute). */
template <typename T, int AMN, int BMN, int PP>
static __device__ __forceinline__ void
sm90w_ksteps(const struct sm90_args &g, float *d, const struct sm90_tile &t, uint32_t ring,
             uint32_t full, int wg, int lane, uint32_t empty, int &slot, uint32_t turn_other = 0,
             int leader = 0)
{
    typedef sm90w_cfg<PP> C;
    const int live = PP ? (g.varlen_k || t.r_end - t.r0 > 64 ? 2 : 1) : wg_live(g, t, wg);
    const int sig = PP && t.KT > C::STAGES ? t.KT - C::STAGES : 0;
    for (int kt = 0; kt < t.KT; kt++, slot++) {
        const int s = slot % C::STAGES;
        mbar_wait(full + 8 * s, (slot / C::STAGES) & 1);
        if (PP && kt == sig && leader)
            mbar_arrive(turn_other);
        /* lanes leave the wait loop apart; the .aligned wgmma wants them together */
        __syncwarp();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
        if constexpr (MOE_DIAG == 2)
            (void)live;
        else if constexpr (PP)
            sm90p_mma_stage<T, AMN, BMN, C::BN>(d, ring + s * C::STAGE_BYTES, kt > 0,
                                                kslices(g, t, kt), live);
        else if (live)
            sm90_mma_stage<T, AMN, BMN>(d, ring + s * C::STAGE_BYTES, wg, kt > 0,
                                        kslices(g, t, kt));
        asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
        if (kt > 0 && lane == 0)
            mbar_arrive(empty + 8 * ((slot - 1) % C::STAGES));
    }
    asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    fence_d(d);
    if (lane == 0)
        mbar_arrive(empty + 8 * ((slot - 1) % C::STAGES));
}

template <typename T, int AMN, int BMN, int ACT>
static __device__ __forceinline__ void sm90w_compute(const struct sm90_args &g, const int *tiles,
                                                     int nt, int total, uint32_t ring,
                                                     uint32_t full, uint32_t empty, uint32_t epi)
{
    const int ctid = threadIdx.x - SM90W_LOADERS, wg = ctid >> 7, lane = ctid & 31;
    float d[128];
    int slot = 0;
    for (int q = blockIdx.x; q < total; q += gridDim.x) {
        const struct sm90_tile t = tile_of(g, tiles, nt, q);
        if (t.KT == 0) {
            store_direct<T, 1>(dst_of(g, t), NULL, frag_of(ctid, 0).row0, ctid & 31);
            continue;
        }
        sm90w_ksteps<T, AMN, BMN, 0>(g, d, t, ring, full, wg, lane, empty, slot);
        write_out<T, ACT>(g, t, d, epi, ctid);
    }
    bulk_wait_all();
}

/* ---- schedule 3, ping-pong: warpgroup w computes the CTA's tiles j with j % 2 == w (j counts
   the CTA's tiles), the whole 128 x 128 tile, and skips the other's k-steps in the ring. Its
   mainloop of tile j begins only when the other warpgroup, on tile j - 1, has seen a stage
   arrive that is at most STAGES slots before tile j's first ("turn" barriers, one per
   warpgroup): the loader fills slots in order, so every fill a "full" phase of tile j could be
   mistaken for has landed by then (an mbarrier's parity tells only two phases apart; for the
   turns themselves, a warpgroup meets at a named barrier after each wait). While one
   warpgroup drains and stores a tile, the other's wgmma keep the tensor cores busy. ---- */

template <typename T, int AMN, int BMN, int PP>
static __device__ __forceinline__ void
sm90p_compute(const struct sm90_args &g, const int *tiles, int nt, int total, uint32_t ring,
              uint32_t full, uint32_t empty, uint32_t turn, uint32_t epi)
{
    constexpr int BN = sm90w_cfg<PP>::BN;
    const int ctid = threadIdx.x - SM90W_LOADERS, wg = ctid >> 7, warp = (ctid >> 5) & 3;
    const int lane = ctid & 31, leader = (ctid & 127) == 0;
    const uint32_t buf = frag_of(ctid, epi).buf; /* the rows are per half, not frag_of's */
    const uint32_t mine = turn + 8 * wg, other = turn + 8 * (wg ^ 1);
    float d[128];
    int slot = 0;
    for (int q = blockIdx.x, j = 0; q < total; q += gridDim.x, j++) {
        const struct sm90_tile t = tile_of<BN>(g, tiles, nt, q);
        if ((j & 1) != wg) {
            slot += t.KT;
            continue;
        }
        if (j > 0)
            mbar_wait(mine, ((j - 1) >> 1) & 1);
        /* every warp of the warpgroup past the wait before its leader lets the other go on: else
           the other could turn this barrier twice (tiles without k-steps take no time) while a
           warp still waits for the first, and the parity would hide that phase from it */
        asm volatile("bar.sync %0, 128;\n" ::"r"(1 + wg) : "memory");
        const struct sm90_dst o = dst_of(g, t);
        if (t.KT == 0) {
            if (leader)
                mbar_arrive(other);
            for (int h = 0; h < 2; h++)
                store_direct<T, 1, 0, BN>(o, NULL, h * 64 + warp * 16, lane);
            continue;
        }
        sm90w_ksteps<T, AMN, BMN, PP>(g, d, t, ring, full, wg, threadIdx.x & 31 /* = lane */, empty,
                                      slot, other, leader);
        write_tile<T, 0, BN>(o, d, buf, warp * 16, lane);
        write_tile<T, 0, BN>(o, d + BN / 2, buf, 64 + warp * 16, lane);
    }
    bulk_wait_all();
}

template <typename T, int AMN, int BMN, int ACT, int PP, int TL>
static __global__ void __launch_bounds__(SM90W_THREADS, 1)
    sm90w_gemm_kernel(const __grid_constant__ struct sm90_args g)
{
    typedef sm90w_cfg<PP> C;
    static_assert(!(PP && ACT), "the fused SwiGLU runs on the cooperative tiles");
    extern __shared__ char smem_raw[];
    __shared__ int tiles[SM90_MAX_E + 1];
    __shared__ int part[SM90_THREADS];
    __shared__ __align__(8) uint64_t bars[2 * C::STAGES + 2];
    const uint32_t ring = (smem_u32(smem_raw) + 1023) & ~1023u;
    const uint32_t epi = ring + SM90_STAGES * SM90_STAGE_BYTES;
    const uint32_t full = smem_u32(bars), empty = full + 8 * C::STAGES;
    const uint32_t turn = empty + 8 * C::STAGES;
    const int nt = g.N / C::BN;

    if (threadIdx.x == 0) {
        /* "full": an arrival per copying thread (their copies landed), one more with the TMA
           bytes expected */
        const int lda = TL && g.ld_a, ldb = TL && g.ld_b;
        const int fills = (lda && ldb ? 0 : SM90W_LOADERS) + (lda || ldb ? 1 : 0);
        for (int s = 0; s < C::STAGES; s++) {
            mbar_init(full + 8 * s, fills);
            mbar_init(empty + 8 * s, C::USERS);
        }
        mbar_init(turn, 1);
        mbar_init(turn + 8, 1);
        if (TL)
            asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    int total;
    if (g.varlen_k) {
        total = g.E * (g.M / SM90_BM) * nt;
        __syncthreads(); /* the barriers' initialisation, seen by every thread */
    } else {
        tile_prefix(g.offsets, g.E, nt, tiles, part); /* ends with a barrier */
        total = tiles[g.E];
    }
    /* the fused SwiGLU's epilogue needs more registers than the computing warps' share of 168 */
    if (threadIdx.x < SM90W_LOADERS) {
        if (ACT)
            asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(SM90W_LOADER_REGS));
        sm90w_load<AMN, BMN, PP, TL>(g, tiles, nt, total, ring, full, empty);
    } else {
        if (ACT)
            asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(SM90W_COMPUTE_REGS));
        if (PP)
            sm90p_compute<T, AMN, BMN, PP>(g, tiles, nt, total, ring, full, empty, turn, epi);
        else
            sm90w_compute<T, AMN, BMN, ACT>(g, tiles, nt, total, ring, full, empty, epi);
    }
}

#else /* not sm_90a: never launched (moe_grouped_gemm_cuda checks the device first) */

template <typename T, int AMN, int BMN, int ACT>
static __global__ void sm90_gemm_kernel(const __grid_constant__ struct sm90_args g)
{
    (void)g;
}

template <typename T, int AMN, int BMN, int ACT, int PP, int TL>
static __global__ void sm90w_gemm_kernel(const __grid_constant__ struct sm90_args g)
{
    (void)g;
}

#define SM90W_THREADS 384

#endif

/* ---- host side ---- */

/* 1: the current device is sm_90 (H100/H200) and this build has sm_90a code; cached per thread. */
static int sm90_ready(int *sms)
{
    static __thread int known = -1, count = 0;
    if (known < 0) {
        int dev = 0, major = 0, minor = 0;
        cudaFuncAttributes fa;
        known =
            cudaGetDevice(&dev) == cudaSuccess &&
            cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) == cudaSuccess &&
            cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev) == cudaSuccess &&
            major == 9 && minor == 0 &&
            cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, dev) == cudaSuccess &&
            cudaFuncGetAttributes(&fa, sm90_gemm_kernel<__nv_bfloat16, 0, 0, 0>) == cudaSuccess &&
            fa.binaryVersion == 90;
        cudaGetLastError();
    }
    *sms = count;
    return known;
}

static int aligned16(const void *p, int64_t bytes)
{
    return ((uintptr_t)p & 15) == 0 && bytes % 16 == 0;
}

/* An activation operand: rows 16-byte aligned, the other coordinate contiguous. */
static int rows_ok(const struct moe_gemm_op *o)
{
    return o->rows && (!o->gather || o->gather_div >= 1) && aligned16(o->base, o->rs * 2);
}

/* A weight operand: one unit stride (mn: along x), split on a tile edge of its own axis (K-major
   weights split along x, MN-major ones along k), 16-byte aligned rows of the contiguous axis. */
static int weights_ok(const struct moe_gemm_op *o, int mn, int64_t x_len, int64_t k_len, int x_tile)
{
    const int64_t len = o->split_k ? k_len : x_len;
    if (o->rows || o->split_k != mn || o->split < 1)
        return 0;
    if (o->split < len && o->split % (o->split_k ? SM90_BK : x_tile))
        return 0;
    for (int p = 0; p < (o->split < len ? 2 : 1); p++) {
        const struct moe_mats *m = &o->m[p];
        const int64_t unit = mn ? m->rs : m->cs, other = mn ? m->cs : m->rs;
        if (unit != 1 || !aligned16(m->ptr ? NULL : m->base, other * 2) || (m->es * 2) % 16)
            return 0;
    }
    return 1;
}

/* Which kernel runs g: 0 none (unsupported), 1 K/K, 2 K/MN, 3 MN/MN (A/B majorness), 4 K/K with
   SwiGLU fused. */
static int sm90_kind(const struct moe_gemm *g)
{
    if (g->dtype != MOE_BF16 && g->dtype != MOE_F16)
        return 0;
    if (g->E < 1 || g->E > SM90_MAX_E || g->N % SM90_BN || g->N > INT32_MAX || g->rows_max < 0 ||
        g->rows_max > INT32_MAX)
        return 0;
    if (g->varlen_k) {
        if (g->M % SM90_BM || g->M > INT32_MAX || !g->b.rows || !rows_ok(&g->a) || !rows_ok(&g->b))
            return 0;
        if (g->c_split < 1 || (g->c_split < g->M && g->c_split % SM90_BM))
            return 0;
        for (int p = 0; p < (g->c_split < g->M ? 2 : 1); p++)
            if (g->cm[p].cs != 1 ||
                !aligned16(g->cm[p].ptr ? NULL : g->cm[p].base, g->cm[p].rs * 2) ||
                (g->cm[p].es * 2) % 16)
                return 0;
        return (int64_t)g->E * (g->M / SM90_BM) * (g->N / SM90_BN) <= INT32_MAX ? 3 : 0;
    }
    if (g->D % SM90_BK || g->D > INT32_MAX || !rows_ok(&g->a) || !aligned16(g->c, g->c_rs * 2))
        return 0;
    if (g->act) /* SwiGLU fused: gate and up K-major, tiles of 128 columns of each */
        return g->b.split * 2 == g->N && g->b.split % (SM90_BN / 2) == 0 &&
                       aligned16(g->act, g->act_rs * 2) &&
                       weights_ok(&g->b, 0, g->N, g->D, SM90_BN / 2)
                   ? 4
                   : 0;
    if (weights_ok(&g->b, 0, g->N, g->D, SM90_BN))
        return 1;
    return weights_ok(&g->b, 1, g->N, g->D, SM90_BN) ? 2 : 0;
}

int moe__gemm_sm90_ok(const struct moe_gemm *g)
{
    int sms = 0;
    return sm90_ready(&sms) && sm90_kind(g) != 0;
}

/* (m, s) with n / d = (umulhi(n, m) + n) >> s for every 0 <= n < 2^31 (d >= 1): s = ceil(log2 d),
   m = floor(2^32 (2^s - d) / d) + 1, which fits 32 bits */
static void fastdiv_of(int d, uint32_t *m, int *s)
{
    int l = 0;
    while (((int64_t)1 << l) < d)
        l++;
    *s = l;
    *m = (uint32_t)((((uint64_t)1 << 32) * (uint64_t)(((int64_t)1 << l) - d)) / (uint64_t)d + 1);
}

static struct sm90_op op_of(const struct moe_gemm_op *o)
{
    struct sm90_op s;
    memset(&s, 0, sizeof s);
    s.rows = o->rows;
    s.base = (const char *)o->base;
    s.rs = o->rs * 2;
    s.gather = o->gather;
    fastdiv_of(o->gather ? o->gather_div : 1, &s.div_m, &s.div_s);
    for (int p = 0; p < 2; p++) {
        const struct moe_mats *m = &o->m[p];
        s.ptr[p] = m->ptr;
        s.mbase[p] = (const char *)m->base;
        s.es[p] = m->es * 2;
        s.xs[p] = m->rs * 2;
        s.ks[p] = m->cs * 2;
    }
    s.split = (int)(o->split < INT32_MAX ? o->split : INT32_MAX);
    s.split_k = o->split_k;
    return s;
}

typedef void (*sm90_kernel_fn)(const struct sm90_args);

typedef CUresult (*sm90_encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *,
                                   const cuuint64_t *, const cuuint64_t *, const cuuint32_t *,
                                   const cuuint32_t *, CUtensorMapInterleave, CUtensorMapSwizzle,
                                   CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

/* The driver's tensor-map encoder, looked up through the runtime (the library does not link
   libcuda); NULL where the driver lacks it: the kernels then store without TMA. */
static sm90_encode_fn sm90_encoder(void)
{
    static __thread int tried;
    static __thread sm90_encode_fn fn;
    if (!tried) {
        void *p = NULL;
        cudaDriverEntryPointQueryResult q = cudaDriverEntryPointSymbolNotFound;
#if CUDART_VERSION >= 12050 /* the versioned query; the plain one is deprecated from CUDA 13 */
        const cudaError_t rc = cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000,
                                                                cudaEnableDefault, &q);
#else
        const cudaError_t rc =
            cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &p, cudaEnableDefault, &q);
#endif
        if (rc == cudaSuccess && q == cudaDriverEntryPointSuccess)
            fn = (sm90_encode_fn)p;
        cudaGetLastError();
        tried = 1;
    }
    return fn;
}

/* m: a tiled TMA map of rank 2 or 3 over elements of dt, dim[0] contiguous, stride[i] bytes
   between steps of dim[i + 1], boxes of box[] with swizzle sw. 1 done, 0 not possible (alignment,
   extents, no encoder): the caller then copies without TMA. */
static int sm90_map(CUtensorMap *m, moe_dtype dt, int rank, const void *base, const int64_t *dim,
                    const int64_t *stride, const uint32_t *box, CUtensorMapSwizzle sw,
                    CUtensorMapL2promotion l2)
{
    const sm90_encode_fn enc = sm90_encoder();
    if (!enc || !base || ((uintptr_t)base & 15))
        return 0;
    cuuint64_t d[3], st[2];
    cuuint32_t bx[3];
    const cuuint32_t estride[3] = {1, 1, 1};
    for (int i = 0; i < rank; i++) {
        if (dim[i] < 1 || dim[i] > ((int64_t)1 << 32))
            return 0;
        d[i] = (cuuint64_t)dim[i];
        bx[i] = box[i];
    }
    for (int i = 0; i + 1 < rank; i++) {
        if (stride[i] < 16 || stride[i] % 16 || stride[i] >= ((int64_t)1 << 40))
            return 0;
        st[i] = (cuuint64_t)stride[i];
    }
    const CUtensorMapDataType ty =
        dt == MOE_BF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
    return enc(m, ty, (cuuint32_t)rank, (void *)base, d, st, bx, estride,
               CU_TENSOR_MAP_INTERLEAVE_NONE, sw, l2,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

/* m: a TMA store map of [E][rows][cols] elements of dt (E 0: a 2-D [rows][cols]), strides in
   bytes, boxes of 32 x 16 (x 1) with the 64-byte swizzle of store_tile_tma. */
static int sm90_out_map(CUtensorMap *m, moe_dtype dt, void *base, int64_t cols, int64_t rows,
                        int64_t rs, int64_t E, int64_t es)
{
    if (rows < 1 || (E > 0 && (es % 16 || es < rows * rs)))
        return 0;
    const int64_t dim[3] = {cols, rows, E > 0 ? E : 1}, stride[2] = {rs, es};
    const uint32_t box[3] = {32, 16, 1};
    return sm90_map(m, dt, E > 0 ? 3 : 2, base, dim, stride, box, CU_TENSOR_MAP_SWIZZLE_64B,
                    CU_TENSOR_MAP_L2_PROMOTION_NONE);
}

/* The TMA load maps (sm90_args.lmap_a / lmap_b) of a varlen-M GEMM on the warp-specialized
   schedules that use TMA (0, 3, 4, 6; not the fused SwiGLU, whose B tile is two halves): A where
   its rows are packed (rows past the last expert's end read as zeros; the map spans rows_max rows,
   which the buffer must hold), B where every part is one 3-D tensor (pointer arrays: the loaders
   copy) and it is MN-major or A goes through TMA too: K-major weights by TMA beside gathered rows
   copied by the loaders measured 5-15 % slower than all copies (fwd gate_up, H200). bn: the
   tile's width. */
static void sm90_load_maps(const struct moe_gemm *g, struct sm90_args *a, int mn, int bn)
{
    if (g->schedule == 1 || g->schedule == 2 || g->act || g->varlen_k)
        return;
    if (!g->a.gather) {
        const int64_t dim[2] = {g->D, g->rows_max}, stride[1] = {g->a.rs * 2};
        const uint32_t box[2] = {SM90_BK, SM90_BM};
        a->ld_a = sm90_map(&a->lmap_a, g->dtype, 2, g->a.base, dim, stride, box,
                           CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
    }
    if (!mn && !a->ld_a)
        return;
    const struct moe_gemm_op *b = &g->b;
    const int64_t len = mn ? g->D : g->N;
    const int two = b->split < len;
    int ok = 1;
    for (int p = 0; ok && p < (two ? 2 : 1); p++) {
        const struct moe_mats *m = &b->m[p];
        const int64_t part = two ? (p ? len - b->split : b->split) : len;
        const int64_t xk = mn ? m->cs * 2 : m->rs * 2; /* bytes per step of dim 1 */
        /* one expert: its stride is never stepped, any valid one will do */
        const int64_t es = g->E == 1 && m->es * 2 < part * xk ? part * xk : m->es * 2;
        const int64_t dim[3] = {mn ? g->N : g->D, part, g->E}, stride[2] = {xk, es};
        const uint32_t box[3] = {SM90_BK, mn ? SM90_BK : (uint32_t)bn, 1};
        ok = !m->ptr && sm90_map(&a->lmap_b[p], g->dtype, 3, m->base, dim, stride, box,
                                 CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B);
    }
    a->ld_b = ok;
}

/* The output's TMA store maps, for the schedules that store through them (all but 1 and 2). */
static void sm90_out_maps(const struct moe_gemm *g, struct sm90_args *a)
{
    if (g->schedule == 1 || g->schedule == 2)
        return;
    if (!g->varlen_k) {
        a->tma[0] = sm90_out_map(&a->cmap[0], g->dtype, g->c, g->N, g->rows_max, g->c_rs * 2, 0, 0);
        if (g->act)
            a->atma = sm90_out_map(&a->amap, g->dtype, g->act, g->N / 2, g->rows_max, g->act_rs * 2,
                                   0, 0);
        return;
    }
    const int two = g->c_split < g->M;
    for (int p = 0; p < (two ? 2 : 1); p++) {
        const struct moe_mats *m = &g->cm[p];
        const int64_t rows = two ? (p ? g->M - g->c_split : g->c_split) : g->M;
        if (!m->ptr)
            a->tma[p] = sm90_out_map(&a->cmap[p], g->dtype, m->base, g->N, rows, m->rs * 2, g->E,
                                     m->es * 2);
    }
}

/* Raises k's dynamic shared-memory limit once per (kernel, device) and thread, not on every
   launch: six launches per layer and step would each pay the driver call. */
static int sm90_smem_ready(sm90_kernel_fn k)
{
    static __thread sm90_kernel_fn done[32];
    static __thread int done_dev[32], n_done;
    int dev = 0;
    MOE_CHECK(cudaGetDevice(&dev));
    for (int i = 0; i < n_done; i++)
        if (done[i] == k && done_dev[i] == dev)
            return MOE_OK;
    MOE_CHECK(
        cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SM90_SMEM_BYTES));
    if (n_done < 32) {
        done[n_done] = k;
        done_dev[n_done++] = dev;
    }
    return MOE_OK;
}

/* At most this many output tiles BN wide (varlen-M: each expert with rows has at most one partial
   tile, and at most rows_max experts have rows). */
static int64_t sm90_tile_bound(const struct moe_gemm *g, int bn)
{
    const int64_t nt = g->N / bn, busy = g->rows_max < g->E ? g->rows_max : g->E;
    return g->varlen_k ? g->E * (g->M / SM90_BM) * nt : (g->rows_max / SM90_BM + busy) * nt;
}

/* Which tiles g runs on: 0 cooperative (128 x 256), 1 ping-pong (128 x 128), 2 narrow ping-pong
   (128 x 64, varlen-M). The fused SwiGLU has only the cooperative ones. Schedule 3 asks for 1,
   6 for 2 (1 for varlen-K). The default (decode sizes: an expert's rows fit one tile, which
   streams its part of the weights) takes the widest tiles that still give every SM one, where
   the cooperative ones would leave SMs idle: 2 where its tiles fit one wave, else 1 where the
   cooperative tiles are fewer than the SMs, else 0. Narrower tiles cost more per byte streamed
   (each tile's fixed cost: at T = 8, narrow tiles everywhere made Ring's gate|up 91 against
   68 us); they pay only for SMs that would idle otherwise (Ring's gate|up at T = 1: 15.3 against
   19.8 us; tests/bench/RESULTS.md). Ping-pong measured slower on every training GEMM: ncu shows it
   latency-bound (tensor pipe 47 % of the cycles against the cooperative kernel's 81 %, fwd
   gate_up). */
static int sm90_pingpong(const struct moe_gemm *g, int sms)
{
    if (g->act)
        return 0;
    if (g->schedule == 6)
        return g->varlen_k ? 1 : 2;
    if (g->schedule == 3)
        return 1;
    if (g->schedule != 0 || g->varlen_k || sm90_tile_bound(g, SM90_BN) >= sms)
        return 0;
    return sm90_tile_bound(g, 64) <= sms ? 2 : 1;
}

/* The output tile's width of a ping-pong mode (sm90_pingpong): sm90w_cfg<pp>::BN on the host. */
static int sm90_bn(int pp)
{
    return pp == 2 ? 64 : pp ? 128 : SM90_BN;
}

/* The kernel of a schedule: 1 all threads load and compute; else warp-specialized, ping-pong (pp)
   or cooperative (tests/bench/RESULTS.md). 0, 3, 4 and 6 store through TMA (sm90_out_maps). */
template <typename T, int AMN, int BMN, int ACT>
static sm90_kernel_fn sm90_kernel_of(int schedule, int pp, int tl)
{
    if (schedule == 1)
        return sm90_gemm_kernel<T, AMN, BMN, ACT>;
    /* TMA loads only where sm90_load_maps mapped an operand: their own instantiation, so that
       the kernels that copy everything keep their code (branches on the flags measured 5-10 %
       slower there) */
    if constexpr (!AMN && !ACT) {
        if (tl)
            return pp == 2 ? sm90w_gemm_kernel<T, AMN, BMN, 0, 2, 1>
                   : pp    ? sm90w_gemm_kernel<T, AMN, BMN, 0, 1, 1>
                           : sm90w_gemm_kernel<T, AMN, BMN, 0, 0, 1>;
        if (pp == 2) /* the narrow tiles: varlen-M only (sm90_pingpong) */
            return sm90w_gemm_kernel<T, AMN, BMN, 0, 2, 0>;
    }
    if (!ACT && pp)
        return sm90w_gemm_kernel<T, AMN, BMN, 0, 1, 0>;
    return sm90w_gemm_kernel<T, AMN, BMN, ACT, 0, 0>;
}

template <int AMN, int BMN, int ACT>
static int sm90_launch(const struct sm90_args &a, const struct moe_gemm *g, int pp, unsigned grid)
{
    const int schedule = g->schedule, tl = a.ld_a || a.ld_b;
    const sm90_kernel_fn k = g->dtype == MOE_BF16
                                 ? sm90_kernel_of<__nv_bfloat16, AMN, BMN, ACT>(schedule, pp, tl)
                                 : sm90_kernel_of<__half, AMN, BMN, ACT>(schedule, pp, tl);
    cudaStream_t st = (cudaStream_t)g->stream;
    MOE_TRY(sm90_smem_ready(k));
    k<<<grid, schedule == 1 ? SM90_THREADS : SM90W_THREADS, SM90_SMEM_BYTES, st>>>(a);
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

extern "C" int moe_grouped_gemm_cuda(const struct moe_gemm *g)
{
    int sms = 0;
    MOE_REQUIRE(g && g->offsets, MOE_EINVAL);
    if (!sm90_ready(&sms))
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "moe_grouped_gemm_cuda",
                         "needs an sm_90 GPU and an sm_90a build");
    const int kind = sm90_kind(g);
    if (!kind)
        return moe__fail(MOE_EUNSUPPORTED, __FILE__, __LINE__, "moe_grouped_gemm_cuda",
                         "dtype, shape, layout or alignment not tiled by the sm_90 kernel");
    const int pp = sm90_pingpong(g, sms);
    const int64_t bound = sm90_tile_bound(g, sm90_bn(pp));
    if (bound == 0 || (!g->varlen_k && g->rows_max == 0))
        return MOE_OK;
    struct sm90_args a;
    memset(&a, 0, sizeof a);
    a.a = op_of(&g->a);
    a.b = op_of(&g->b);
    a.offsets = g->offsets;
    a.E = g->E;
    a.varlen_k = g->varlen_k;
    a.M = (int)g->M;
    a.N = (int)g->N;
    a.D = (int)g->D;
    a.c = (char *)g->c;
    a.c_rs = g->c_rs * 2;
    for (int p = 0; p < 2; p++) {
        const struct moe_mats *m = &g->cm[p < 1 || g->c_split < g->M ? p : 0];
        a.cptr[p] = m->ptr;
        a.cbase[p] = (char *)m->base;
        a.ces[p] = m->es * 2;
        a.crs[p] = m->rs * 2;
    }
    a.c_split = (int)(g->c_split < INT32_MAX ? g->c_split : INT32_MAX);
    if (g->act) {
        a.act = (char *)g->act;
        a.act_rs = g->act_rs * 2;
        a.b.xhi = (int)(g->b.split - SM90_BN / 2);
    }
    sm90_out_maps(g, &a);
    sm90_load_maps(g, &a, kind == 2, sm90_bn(pp));
    const int64_t cap = g->ctas > 0 && g->ctas < sms ? g->ctas : sms;
    const unsigned grid = (unsigned)(bound < cap ? bound : cap);
    if (kind == 1)
        return sm90_launch<0, 0, 0>(a, g, pp, grid);
    if (kind == 2)
        return sm90_launch<0, 1, 0>(a, g, pp, grid);
    if (kind == 4)
        return sm90_launch<0, 0, 1>(a, g, pp, grid);
    return sm90_launch<1, 1, 0>(a, g, pp, grid);
}
