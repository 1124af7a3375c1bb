/*
 * kernels/cuda/permute.cu — stable counting sort of the T*K slots by expert, on the device:
 * histogram per chunk of slots, one exclusive scan in expert-major order, scatter.
 *
 * Design choice: a slot's row is offsets[e] + (slots of e in earlier chunks) + (slots of e earlier
 * in its own chunk); within a chunk the rank comes from __match_any_sync per warp plus per-warp
 * counts, walked in slot order. No atomics decide a position, so the result is the CPU
 * reference's, bit for bit, on every run.
 */
#include "internal.h"

#define PERM_THREADS 256
#define PERM_WARPS (PERM_THREADS / 32)
#define PERM_TILES 4
#define PERM_CHUNK (PERM_THREADS * PERM_TILES)
#define PERM_SCAN_THREADS 1024

static int64_t n_chunks(int64_t slots)
{
    return (slots + PERM_CHUNK - 1) / PERM_CHUNK;
}

/* bc[e * NB + b] = slots of expert e in chunk b. */
static __global__ void permute_count_kernel(int64_t slots, int E, const int32_t *idx, int32_t *bc,
                                            int64_t NB)
{
    extern __shared__ int cnt[];
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        cnt[e] = 0;
    __syncthreads();
    const int64_t s0 = (int64_t)blockIdx.x * PERM_CHUNK;
    for (int j = threadIdx.x; j < PERM_CHUNK; j += blockDim.x)
        if (s0 + j < slots)
            atomicAdd(&cnt[idx[s0 + j]], 1);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        bc[(int64_t)e * NB + blockIdx.x] = cnt[e];
}

/* In place exclusive scan of bc[0..E*NB) (one block), then counts and offsets. */
static __global__ void permute_scan_kernel(int E, int64_t NB, int32_t *bc, int64_t *counts,
                                           int64_t *offsets, int64_t slots)
{
    __shared__ int64_t part[PERM_SCAN_THREADS];
    const int64_t n = (int64_t)E * NB;
    const int64_t seg = (n + blockDim.x - 1) / blockDim.x;
    const int64_t lo = threadIdx.x * seg, hi = lo + seg < n ? lo + seg : n;
    int64_t s = 0;
    for (int64_t i = lo; i < hi; i++)
        s += bc[i];
    part[threadIdx.x] = s;
    __syncthreads();
    for (int o = 1; o < (int)blockDim.x; o <<= 1) {
        int64_t v = threadIdx.x >= (unsigned)o ? part[threadIdx.x - o] : 0;
        __syncthreads();
        part[threadIdx.x] += v;
        __syncthreads();
    }
    int64_t run = part[threadIdx.x] - s;
    for (int64_t i = lo; i < hi; i++) {
        int32_t c = bc[i];
        bc[i] = (int32_t)run;
        run += c;
    }
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        offsets[e] = bc[(int64_t)e * NB];
    if (threadIdx.x == 0)
        offsets[E] = slots;
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        counts[e] = offsets[e + 1] - offsets[e];
}

/* perm[row] = slot, inv[slot] = row; walks the chunk's tiles in slot order. */
static __global__ void permute_scatter_kernel(int64_t slots, int E, const int32_t *idx,
                                              const int32_t *bc, int64_t NB, int32_t *perm,
                                              int32_t *inv)
{
    extern __shared__ int sm[];
    int *run = sm;      /* [E] next row of expert e for this chunk */
    int *wcnt = sm + E; /* [PERM_WARPS][E] slots of e per warp in the current tile */
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        run[e] = bc[(int64_t)e * NB + blockIdx.x];
    for (int i = threadIdx.x; i < PERM_WARPS * E; i += blockDim.x)
        wcnt[i] = 0;
    __syncthreads();
    for (int tile = 0; tile < PERM_TILES; tile++) {
        const int64_t s = (int64_t)blockIdx.x * PERM_CHUNK + tile * PERM_THREADS + threadIdx.x;
        const int e = s < slots ? idx[s] : -1;
        const unsigned same = __match_any_sync(0xffffffffu, e);
        const int rank = __popc(same & ((1u << lane) - 1));
        if (e >= 0 && rank == 0)
            wcnt[warp * E + e] = __popc(same);
        __syncthreads();
        if (e >= 0) {
            int pos = run[e] + rank;
            for (int w = 0; w < warp; w++)
                pos += wcnt[w * E + e];
            perm[pos] = (int32_t)s;
            inv[s] = pos;
        }
        __syncthreads();
        for (int x = threadIdx.x; x < E; x += blockDim.x) {
            int add = 0;
            for (int w = 0; w < PERM_WARPS; w++) {
                add += wcnt[w * E + x];
                wcnt[w * E + x] = 0;
            }
            run[x] += add;
        }
        __syncthreads();
    }
}

size_t moe__permute_scratch_bytes(int64_t T, int K, int E)
{
    return sizeof(int32_t) * (size_t)E * (size_t)n_chunks(T * K);
}

static int permute_launch(int64_t T, int K, int E, const int32_t *idx, int64_t *counts,
                          int64_t *offsets, int32_t *perm, int32_t *inv, int32_t *bc,
                          cudaStream_t st)
{
    const int64_t slots = T * K, NB = n_chunks(slots);
    if (NB > 0) {
        permute_count_kernel<<<(unsigned)NB, PERM_THREADS, sizeof(int) * E, st>>>(slots, E, idx, bc,
                                                                                  NB);
        MOE_CHECK_LAUNCH();
    }
    if (NB == 0) {
        MOE_CHECK(cudaMemsetAsync(counts, 0, sizeof(int64_t) * E, st));
        MOE_CHECK(cudaMemsetAsync(offsets, 0, sizeof(int64_t) * (E + 1), st));
        return MOE_OK;
    }
    permute_scan_kernel<<<1, PERM_SCAN_THREADS, 0, st>>>(E, NB, bc, counts, offsets, slots);
    MOE_CHECK_LAUNCH();
    permute_scatter_kernel<<<(unsigned)NB, PERM_THREADS, sizeof(int) * (PERM_WARPS + 1) * E, st>>>(
        slots, E, idx, bc, NB, perm, inv);
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__permute_cuda(int64_t T, int K, int E, const int32_t *idx, int64_t *counts,
                      int64_t *offsets, int32_t *perm, int32_t *inv, void *scratch, cudaStream_t st)
{
    MOE_REQUIRE(T >= 0 && K > 0 && E > 0, MOE_EINVAL);
    MOE_REQUIRE(T * K < INT32_MAX, MOE_EUNSUPPORTED);
    MOE_REQUIRE(sizeof(int) * (PERM_WARPS + 1) * (size_t)E <= 48 * 1024, MOE_EUNSUPPORTED);
    MOE_REQUIRE(counts && offsets, MOE_EINVAL);
    MOE_REQUIRE(T == 0 || (idx && perm && inv && scratch), MOE_EINVAL);
    return permute_launch(T, K, E, idx, counts, offsets, perm, inv, (int32_t *)scratch, st);
}
