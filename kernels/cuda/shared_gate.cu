/*
 * kernels/cuda/shared_gate.cu — the Qwen2-style sigmoid gate of the shared expert:
 * g[t] = sigmoid(<x_t, gate>) forward; the gate-logit grad and d gate = Σ_t dlogit[t] · x_t
 * backward.
 *
 * Design choice: the sum over tokens is two fixed-order passes (per-chunk partial sums, then the
 * chunks in order) instead of atomics, so the weight grad has the same bits every run.
 */
#include "internal.h"

#define SG_THREADS 256
#define SG_CHUNK 64

template <typename T>
static __global__ void shared_gate_kernel(int64_t H, const T *x, int64_t x_rs, const T *gate,
                                          float *g)
{
    __shared__ float red[SG_THREADS];
    const int64_t t = blockIdx.x;
    float acc = 0.f;
    for (int64_t c = threadIdx.x; c < H; c += blockDim.x)
        acc += moe__to_f(x[t * x_rs + c]) * moe__to_f(gate[c]);
    red[threadIdx.x] = acc;
    __syncthreads();
    for (int o = SG_THREADS / 2; o > 0; o >>= 1) {
        if ((int)threadIdx.x < o)
            red[threadIdx.x] += red[threadIdx.x + o];
        __syncthreads();
    }
    if (threadIdx.x == 0)
        g[t] = 1.f / (1.f + expf(-red[0]));
}

static int shared_gate_launch(int64_t nt, int64_t H, const void *x, int64_t x_rs, const void *gate,
                              float *g, moe_dtype dt, cudaStream_t st)
{
    MOE_DISPATCH(dt, (shared_gate_kernel<T><<<(unsigned)nt, SG_THREADS, 0, st>>>(
                         H, (const T *)x, x_rs, (const T *)gate, g)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__shared_gate_cuda(int64_t T, int64_t H, const void *x, int64_t x_rs, const void *gate,
                          float *g, moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(T >= 0 && T <= INT32_MAX && H > 0 && x_rs >= H, MOE_EINVAL);
    if (T == 0)
        return MOE_OK;
    MOE_REQUIRE(x && gate && g, MOE_EINVAL);
    return shared_gate_launch(T, H, x, x_rs, gate, g, dt, st);
}

static __global__ void gate_logit_grad_kernel(int64_t T, const float *g, float *dg)
{
    for (int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; t < T;
         t += (int64_t)gridDim.x * blockDim.x)
        dg[t] = dg[t] * g[t] * (1.f - g[t]);
}

/* part[chunk, c] = Σ_{t in chunk} dg[t] · x[t, c]. */
template <typename T>
static __global__ void gate_partial_kernel(int64_t T_, int64_t H, const T *x, int64_t x_rs,
                                           const float *dg, float *part)
{
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= H)
        return;
    const int64_t t0 = (int64_t)blockIdx.y * SG_CHUNK;
    const int64_t t1 = t0 + SG_CHUNK < T_ ? t0 + SG_CHUNK : T_;
    float acc = 0.f;
    for (int64_t t = t0; t < t1; t++)
        acc += dg[t] * moe__to_f(x[t * x_rs + c]);
    part[blockIdx.y * H + c] = acc;
}

template <typename T>
static __global__ void gate_reduce_kernel(int64_t H, int64_t chunks, const float *part, T *dgate)
{
    const int64_t c = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= H)
        return;
    float acc = 0.f;
    for (int64_t j = 0; j < chunks; j++)
        acc += part[j * H + c];
    dgate[c] = moe__from_f<T>(acc);
}

size_t moe__shared_gate_scratch_bytes(int64_t T, int64_t H)
{
    return sizeof(float) * (size_t)((T + SG_CHUNK - 1) / SG_CHUNK) * (size_t)H;
}

static int shared_gate_backward_launch(int64_t nt, int64_t H, const void *x, int64_t x_rs,
                                       const float *g, float *dg, void *dgate, float *part,
                                       moe_dtype dt, cudaStream_t st)
{
    const int64_t chunks = (nt + SG_CHUNK - 1) / SG_CHUNK;
    gate_logit_grad_kernel<<<moe__blocks(nt, 256), 256, 0, st>>>(nt, g, dg);
    MOE_CHECK_LAUNCH();
    dim3 grid((unsigned)((H + 255) / 256), (unsigned)chunks);
    MOE_DISPATCH(
        dt, (gate_partial_kernel<T><<<grid, 256, 0, st>>>(nt, H, (const T *)x, x_rs, dg, part)));
    MOE_CHECK_LAUNCH();
    MOE_DISPATCH(dt, (gate_reduce_kernel<T>
                      <<<(unsigned)((H + 255) / 256), 256, 0, st>>>(H, chunks, part, (T *)dgate)));
    MOE_CHECK_LAUNCH();
    return MOE_OK;
}

int moe__shared_gate_backward_cuda(int64_t T, int64_t H, const void *x, int64_t x_rs,
                                   const float *g, float *dg, void *dgate, void *scratch,
                                   moe_dtype dt, cudaStream_t st)
{
    MOE_REQUIRE(T >= 0 && H > 0 && x_rs >= H && dgate, MOE_EINVAL);
    MOE_REQUIRE((T + SG_CHUNK - 1) / SG_CHUNK <= 65535, MOE_EUNSUPPORTED);
    if (T == 0) {
        MOE_CHECK(cudaMemsetAsync(dgate, 0, moe_dtype_size(dt) * (size_t)H, st));
        return MOE_OK;
    }
    MOE_REQUIRE(x && g && dg && scratch, MOE_EINVAL);
    return shared_gate_backward_launch(T, H, x, x_rs, g, dg, dgate, (float *)scratch, dt, st);
}
