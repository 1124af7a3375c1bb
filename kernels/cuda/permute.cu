/*
 * kernels/cuda/permute.cu — stable counting sort of the T*K slots by expert, on the device:
 * histogram per chunk of slots, a scan per expert over the chunks, scatter.
 *
 * Design choices: a slot's row is offsets[e] + (slots of e in earlier chunks) + (slots of e earlier
 * in its own chunk); within a chunk the rank comes from __match_any_sync per warp plus per-warp
 * counts, walked in slot order. No atomics decide a position, so the result is the CPU
 * reference's, bit for bit, on every run. The scan runs one block per expert over that expert's
 * contiguous chunk counts (a single block over all E x NB counts took ~67 us at T = 16384, Ring),
 * and every scatter block scans the E totals into offsets itself (a few KB), so no step runs on
 * one block over the whole table. Where all slots fit one chunk (decode sizes) one block does all
 * three steps in one launch: the launches, not the work, were the sort's time there.
 */
#include "internal.h"

#define PERM_THREADS 256
#define PERM_WARPS (PERM_THREADS / 32)
#define PERM_TILES 4
#define PERM_CHUNK (PERM_THREADS * PERM_TILES)
#define PERM_SCAN_THREADS 256
static_assert(PERM_THREADS == PERM_SCAN_THREADS, "the scatter blocks scan the expert totals too");

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

/* Exclusive scan of v over the block (PERM_SCAN_THREADS threads, blockDim.x); *total gets the
   sum. wsum: PERM_SCAN_THREADS / 32 ints of shared memory, free again on return. */
static __device__ int block_exclusive_scan(int v, int *total, int *wsum)
{
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(0xffffffffu, x, o);
        if (lane >= o)
            x += y;
    }
    if (lane == 31)
        wsum[warp] = x;
    __syncthreads();
    int before = 0, all = 0;
    for (int w = 0; w < PERM_SCAN_THREADS / 32; w++) {
        const int s = wsum[w];
        before += w < warp ? s : 0;
        all += s;
    }
    __syncthreads();
    *total = all;
    return before + x - v;
}

/* Block e: bc[e * NB + b] <- slots of expert e in chunks before b; counts[e] <- all of them
   (sums fit int: fewer than 2^31 slots). */
static __global__ void permute_scan_kernel(int64_t NB, int32_t *bc, int64_t *counts)
{
    __shared__ int wsum[PERM_SCAN_THREADS / 32];
    int32_t *row = bc + (int64_t)blockIdx.x * NB;
    int carry = 0;
    for (int64_t b0 = 0; b0 < NB; b0 += PERM_SCAN_THREADS) {
        const int64_t b = b0 + threadIdx.x;
        const int v = b < NB ? row[b] : 0;
        int total;
        const int before = block_exclusive_scan(v, &total, wsum);
        if (b < NB)
            row[b] = carry + before;
        carry += total;
    }
    if (threadIdx.x == 0)
        counts[blockIdx.x] = carry;
}

/* first[e] <- offsets[e], the exclusive scan of counts over the experts (shared memory, [E]);
   block 0 also writes offsets[0..E]. Each thread sums a contiguous run of experts. */
static __device__ void expert_offsets(const int64_t *counts, int E, int *first, int64_t *offsets,
                                      int64_t slots)
{
    __shared__ int wsum[PERM_SCAN_THREADS / 32];
    const int per = (E + PERM_SCAN_THREADS - 1) / PERM_SCAN_THREADS;
    const int lo = threadIdx.x * per, hi = lo + per < E ? lo + per : E;
    int mine = 0, total;
    for (int e = lo; e < hi; e++)
        mine += (int)counts[e];
    int run = block_exclusive_scan(mine, &total, wsum);
    for (int e = lo; e < hi; e++) {
        first[e] = run;
        if (blockIdx.x == 0)
            offsets[e] = run;
        run += (int)counts[e];
    }
    if (blockIdx.x == 0 && threadIdx.x == 0)
        offsets[E] = slots;
}

/* perm[row] = slot, inv[slot] = row for the slots of chunk b, walked tile by tile in slot
   order; run[e] (shared, [E]) holds the first row of expert e for this chunk, wcnt (shared,
   [PERM_WARPS][E]) zeros. */
static __device__ void scatter_chunk(int64_t slots, int E, const int32_t *idx, int64_t b, int *run,
                                     int *wcnt, int32_t *perm, int32_t *inv)
{
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    for (int tile = 0; tile < PERM_TILES; tile++) {
        const int64_t s = b * PERM_CHUNK + tile * PERM_THREADS + threadIdx.x;
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

static __global__ void permute_scatter_kernel(int64_t slots, int E, const int32_t *idx,
                                              const int32_t *bc, const int64_t *counts, int64_t NB,
                                              int64_t *offsets, int32_t *perm, int32_t *inv)
{
    extern __shared__ int sm[];
    int *run = sm, *wcnt = sm + E;
    expert_offsets(counts, E, run, offsets, slots);
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        run[e] += bc[(int64_t)e * NB + blockIdx.x];
    for (int i = threadIdx.x; i < PERM_WARPS * E; i += blockDim.x)
        wcnt[i] = 0;
    __syncthreads();
    scatter_chunk(slots, E, idx, blockIdx.x, run, wcnt, perm, inv);
}

/* The whole sort in one block where the slots fit one chunk (decode sizes: T * K <= PERM_CHUNK),
   instead of three launches whose latency was most of the permutation's time there: the same
   counts, offsets and rows as the three kernels (one chunk: no counts before it). */
static __global__ void permute_one_chunk_kernel(int64_t slots, int E, const int32_t *idx,
                                                int64_t *counts, int64_t *offsets, int32_t *perm,
                                                int32_t *inv)
{
    extern __shared__ int sm[];
    int *run = sm, *wcnt = sm + E;
    for (int i = threadIdx.x; i < PERM_WARPS * E; i += blockDim.x)
        wcnt[i] = 0;
    __syncthreads();
    for (int j = threadIdx.x; j < slots; j += blockDim.x)
        atomicAdd(&wcnt[idx[j]], 1); /* a count: the order of the adds does not matter */
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        counts[e] = wcnt[e];
    __syncthreads(); /* the counts, seen by the block (expert_offsets reads them back) */
    for (int e = threadIdx.x; e < E; e += blockDim.x)
        wcnt[e] = 0;
    expert_offsets(counts, E, run, offsets, slots);
    __syncthreads();
    scatter_chunk(slots, E, idx, 0, run, wcnt, perm, inv);
}

static int permute_launch(int64_t T, int K, int E, const int32_t *idx, int64_t *counts,
                          int64_t *offsets, int32_t *perm, int32_t *inv, int32_t *bc,
                          cudaStream_t st)
{
    const int64_t slots = T * K, NB = n_chunks(slots);
    if (NB == 1) {
        permute_one_chunk_kernel<<<1, PERM_THREADS, sizeof(int) * (PERM_WARPS + 1) * E, st>>>(
            slots, E, idx, counts, offsets, perm, inv);
        MOE_CHECK_LAUNCH();
        return MOE_OK;
    }
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
    permute_scan_kernel<<<(unsigned)E, PERM_SCAN_THREADS, 0, st>>>(NB, bc, counts);
    MOE_CHECK_LAUNCH();
    permute_scatter_kernel<<<(unsigned)NB, PERM_THREADS, sizeof(int) * (PERM_WARPS + 1) * E, st>>>(
        slots, E, idx, bc, counts, NB, offsets, perm, inv);
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

extern "C" MOE_API size_t moe_permute_scratch_bytes_cuda(int64_t T, int K, int E)
{
    return T >= 0 && K > 0 && E > 0 ? sizeof(int32_t) * (size_t)E * (size_t)n_chunks(T * K) : 0;
}

extern "C" MOE_API int moe_permute_cuda(int64_t T, int K, int E, const int32_t *idx,
                                        int64_t *counts, int64_t *offsets, int32_t *perm,
                                        int32_t *inv, void *scratch, void *stream)
{
    MOE_REQUIRE(T >= 0 && K > 0 && E > 0, MOE_EINVAL);
    MOE_REQUIRE(T * K < INT32_MAX, MOE_EUNSUPPORTED);
    MOE_REQUIRE(sizeof(int) * (PERM_WARPS + 1) * (size_t)E <= 48 * 1024, MOE_EUNSUPPORTED);
    MOE_REQUIRE(counts && offsets, MOE_EINVAL);
    MOE_REQUIRE(T == 0 || (idx && perm && inv && scratch), MOE_EINVAL);
    return permute_launch(T, K, E, idx, counts, offsets, perm, inv, (int32_t *)scratch,
                          (cudaStream_t)stream);
}
