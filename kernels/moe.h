/*
 * kernels/moe.h — the one C API of libmoepatch's compute: route, permute, expert MLP, combine,
 * and the backward of the whole block. Everything else (detect/, the Python glue) calls only this.
 *
 * Shape letters, used everywhere: T tokens, H hidden, E experts, K top-k, I expert intermediate,
 * G groups. A "slot" is one (token, k) pair: slot s = t*K + k, T*K slots in all.
 *
 * Design choice a reader must know: expert weights are never copied. Each projection of each expert
 * is addressed as a base pointer plus element strides (struct moe_mats), which serves an
 * nn.ModuleList of per-expert Linear layers (a pointer array), a transformers-5 3-D parameter (base
 * + e * expert stride) and the transposed Llama-4 layout (swapped row/column strides) with one code
 * path. Gradients of the weights are written through the same description.
 *
 * Backends: kernels/cpu (reference: plain C, fp32 accumulation) and kernels/cuda (dlopened lazily).
 * Each public entry point exists as moe_<step>_cpu and moe_<step>_cuda with the same arguments.
 */
#ifndef MOE_H
#define MOE_H

#include <stddef.h>
#include <stdint.h>

#if defined(__GNUC__)
#define MOE_API __attribute__((visibility("default")))
#else
#define MOE_API
#endif

#ifdef __cplusplus
extern "C" {
#endif

/* Errors are negative; one list generates the strings (moe_strerror). */
#define MOE_ERRORS(X)                                                                              \
    X(MOE_OK, 0, "ok")                                                                             \
    X(MOE_EINVAL, -1, "invalid argument")                                                          \
    X(MOE_ENOMEM, -2, "out of memory")                                                             \
    X(MOE_EUNSUPPORTED, -3, "unsupported case")                                                    \
    X(MOE_ECUDA, -4, "CUDA runtime error")                                                         \
    X(MOE_ECUBLAS, -5, "cuBLAS error")                                                             \
    X(MOE_ENOBACKEND, -6, "backend not available")

enum moe_err {
#define MOE_ERR_ENUM(name, value, text) name = value,
    MOE_ERRORS(MOE_ERR_ENUM)
#undef MOE_ERR_ENUM
};

MOE_API const char *moe_strerror(int err);

typedef enum { MOE_F32 = 0, MOE_BF16 = 1, MOE_F16 = 2 } moe_dtype;

MOE_API size_t moe_dtype_size(moe_dtype dt);

/* Routing recipes. Router logits are fp32 (CUDA, for a forward with infer set: also bf16/fp16,
   widened exactly, moe_problem.logits_dtype); the caller computes them, or for a forward with
   infer set the forward itself (moe_problem.router_w). */
typedef enum {
    /* p = softmax(logits); idx = top-K of p, or of p + bias when a bias is given (selection only:
       the aux-loss-free balancing bias of families without a native one); w = p[idx] (unbiased),
       ÷ (Σ w + norm_eps) if norm, × scale. Qwen2/3-MoE, Mixtral, OLMoE. */
    MOE_ROUTE_SOFTMAX_TOPK = 0,
    /* s = sigmoid(logits); c = s + bias (selection only); group score = sum of the top-2 of c in
       each of n_group equal groups; the best topk_group groups survive, experts outside get
       mask_value; idx = top-K of c; w = s[idx] (unbiased), ÷ (Σ w + norm_eps) if norm, × scale.
       DeepSeek-V3, GLM-4.5, Bailing V2 (Ring/Ling 2.0). */
    MOE_ROUTE_SIGMOID_GROUP = 1,
} moe_recipe;

struct moe_route_cfg {
    moe_recipe recipe;
    int E, K;
    int n_group;      /* 1 = no group limit */
    int topk_group;   /* groups kept; n_group when no limit */
    int norm;         /* renormalise the K weights */
    float norm_eps;   /* added to the sum before dividing: 0 (softmax families), 1e-20 (sigmoid) */
    float scale;      /* routed_scaling_factor; 1 when the family has none */
    float mask_value; /* selection score of experts outside the kept groups (-INFINITY or 0) */
};

/* Ties in every top-k: the lower expert (or group) index wins. The K slots of a token are ordered
   by descending selection score. */

/* One projection of each of n experts: element (r, c) of expert e's matrix lives at
   (ptr ? ptr[e] : base + e * es) + r * rs + c * cs   (in elements of the block's dtype). */
struct moe_mats {
    void *const *ptr; /* [n] per-expert base pointers, or NULL to use base + e * es */
    void *base;
    int64_t es, rs, cs;
};

/* A SwiGLU MLP per expert: out = down( silu(gate x) * up x ). gate, up: [I, H]; down: [H, I]. */
struct moe_mlp {
    int n; /* number of experts (E for routed experts, 1 for the shared expert, 0 = absent) */
    int64_t H, I;
    struct moe_mats gate, up, down;
};

/* Everything one block's fused forward and backward read and write. All tensors are dense row-major
   unless a stride says otherwise; "dtype" tensors are in p->dtype, accumulation is always fp32. */
struct moe_problem {
    struct moe_route_cfg route;
    moe_dtype dtype;
    int64_t T, H;

    /* inputs */
    const void *x; /* [T, H] dtype, row stride x_rs elements */
    int64_t x_rs;
    const float *logits;    /* [T, E] fp32 router logits (logits_dtype) */
    moe_dtype logits_dtype; /* MOE_F32; CUDA with infer set: MOE_BF16 or MOE_F16 too (the
                               pointer is then of that type) */
    const void *bias;       /* [E] selection bias (both recipes, see moe_recipe), or NULL */
    moe_dtype bias_dtype;   /* MOE_F32; CUDA: MOE_BF16 or MOE_F16 too (widened exactly) */
    /* The router's fp32 logits made here (the families whose gate is x.float() @ W.float()ᵀ):
       with router_w set, the forward first writes logits_out = x · router_wᵀ
       (moe_router_logits_cpu's sum order, the same bits on both backends; not torch's order, so the
       last bits differ from its fp32 GEMM) and routes from them; logits and logits_dtype are then
       not read. router_w: [E, H] in dtype, row stride router_w_rs elements, contiguous along H.
       With infer only: the backward reads logits. */
    const void *router_w;
    int64_t router_w_rs;
    float *logits_out;       /* [T, E] fp32 */
    struct moe_mlp experts;  /* n = E */
    struct moe_mlp shared;   /* n = 1, or n = 0 when the block has no shared expert */
    const void *shared_gate; /* [H] dtype: Qwen2 sigmoid gate of the shared expert, or NULL */

    /* forward outputs (backward reads idx and w) */
    void *y;         /* [T, H] dtype */
    int32_t *idx;    /* [T, K] */
    int64_t *idx64;  /* [T, K] idx as int64 too (what torch's topk gives), or NULL */
    float *w;        /* [T, K] fp32 routing weights */
    int64_t *counts; /* [E] slots routed to each expert by this call, on the tensors' device;
                        optional (the load telemetry of aux-loss-free balancing reads it) */

    /* backward: input and outputs. Every grad output is fully written (zeros where no token went).
     */
    const void *dy;           /* [T, H] dtype */
    void *dx;                 /* [T, H] dtype */
    float *dlogits;           /* [T, E] fp32 */
    struct moe_mlp d_experts; /* same layout description as experts, grad pointers, dtype */
    struct moe_mlp d_shared;  /* same as shared */
    void *d_shared_gate;      /* [H] dtype, when shared_gate */

    /* state kept from forward to backward by backends that want it (CUDA: the pre-activation);
       caller-allocated, moe_saved_bytes_cuda bytes; NULL for the CPU backend, which recomputes */
    void *saved;
    /* [E] host buffer, caller-owned and kept from forward to backward: the cuBLAS path writes the
       per-expert counts (its one device-to-host copy), the backward reads them. The engine path
       neither writes nor reads it. NULL on the CPU. */
    int64_t *counts_host;

    /* CUDA: 1 lets an sm_90 GPU run the routed experts' GEMMs on the Hopper engine
       (moe_grouped_gemm_cuda) where it tiles the shapes, with no host round trip, on its default
       schedule (moe_gemm.schedule 0, warp-specialized; 2 names the same); 0 keeps the cuBLAS path.
       Forward and backward of one call must pass the same value. */
    int engine;
    /* 1: no backward follows this forward (a no-grad call: inference, decoding). The saved state
       may be left unwritten; CUDA with engine set runs a decode-size call (T <= 8, T*K <= 256)
       as GEMVs over the touched experts (kernels/cuda/decode_mlp.cu: other summation order, so
       not the engine's bits). moe_backward_* must not be called after such a forward. */
    int infer;

    /* backend state: CUDA stream (cudaStream_t) and a caller-allocated workspace */
    void *stream;
    void *workspace;
    size_t workspace_bytes;
};

/* ---- whole block (what the glue calls) ---- */
MOE_API int moe_forward_cpu(struct moe_problem *p);
MOE_API int moe_backward_cpu(struct moe_problem *p);

/* ---- the steps, public so that tests and the CUDA backend can be checked piece by piece ---- */

/* idx [T, K], w [T, K] from logits [T, E] (+ bias [E], NULL = none: it moves the selection of
   either recipe and never enters the weights). */
MOE_API int moe_route_cpu(const struct moe_route_cfg *c, int64_t T, const float *logits,
                          const float *bias, int32_t *idx, float *w);

/* logits [T, E] fp32 = x [T, H] · w [E, H]ᵀ (dtype dt, row strides x_rs and w_rs elements), in
   this sum order (the CUDA forward's too, so both give the same bits): element h belongs to
   chunk h / 8 and chunk c to lane c % 128; a lane sums its chunks in ascending order with fmaf;
   the lanes form 4 groups of 32 (lane / 32), each summed as a butterfly (v[l] += v[l + o] for
   o = 16, 8, 4, 2, 1), and the groups as (g0 + g1) + (g2 + g3). */
#define MOE_ROUTER_CHUNK 8   /* elements per chunk of moe_router_logits_cpu's sum order */
#define MOE_ROUTER_LANES 128 /* its lanes: 4 groups of 32 */
MOE_API int moe_router_logits_cpu(int64_t T, int64_t H, int E, moe_dtype dt, const void *x,
                                  int64_t x_rs, const void *w, int64_t w_rs, float *logits);

/* dlogits [T, E] from dw [T, K] through the recipe (selection itself has no gradient). */
MOE_API int moe_route_backward_cpu(const struct moe_route_cfg *c, int64_t T, const float *logits,
                                   const int32_t *idx, const float *dw, float *dlogits);

/* Counting sort of the T*K slots by expert, stable in slot order.
   counts [E]; offsets [E+1] (offsets[e]..offsets[e+1] are expert e's rows); perm [T*K]: row ->
   slot. */
MOE_API int moe_permute_cpu(int64_t T, int K, int E, const int32_t *idx, int64_t *counts,
                            int64_t *offsets, int32_t *perm);

/* For each expert e and row r in offsets[e]..offsets[e+1]: token t = perm[r] / K,
   h[r] = [gate x_t | up x_t] (fp32 [rows, 2I], may be NULL) and out[r] = expert_e(x_t) (fp32 [rows,
   H]). */
MOE_API int moe_expert_mlp_cpu(const struct moe_mlp *m, moe_dtype dt, const void *x, int64_t x_rs,
                               int K, const int64_t *offsets, const int32_t *perm, float *h,
                               float *out);

/* y[t] = Σ_k w[t, k] · out[row of slot t*K+k], summed in k order (deterministic, no atomics).
   inv [T*K]: slot -> row (the inverse of perm). y is dtype [T, H]. */
MOE_API int moe_combine_cpu(int64_t T, int K, int64_t H, const float *out, const int32_t *inv,
                            const float *w, moe_dtype dt, void *y);

/* Grouped GEMM over experts with row ranges in offsets (on the tensors' device). Expert e owns the
   rows r in offsets[e]..offsets[e+1]; they are the M dimension (varlen-M: c[r, n] = Σ_k A[r, k]
   B[n, k], the forward and the input grads) or the reduction (varlen-K: C_e[m, n] = Σ_r A[m, r]
   B[n, r], the weight grads; an expert without rows gets C_e = 0). fp32 accumulation, dtype in and
   out. An operand's element (x, k) — x along M for A, along N for B — is read as:
   - activations (rows = 1), indexed by the global row on the varlen side (x for varlen-M, k for
     varlen-K): base + src(row) * rs + other, src(row) = gather ? gather[row] / gather_div : row
     (the other coordinate is contiguous);
   - weights (rows = 0): element (x, k) of expert e in m[part] (struct moe_mats, rs the x stride, cs
     the k stride), part 1 where the split coordinate (k if split_k, else x) is >= split, which is
     then counted from split: the gate and up projections of a ModuleList expert form one operand.
 */
struct moe_gemm_op {
    int rows;
    const void *base;
    int64_t rs;
    const int32_t *gather;
    int gather_div;
    struct moe_mats m[2];
    int64_t split; /* >= the split dimension's length: one part */
    int split_k;
};

/* The CUDA version is the Hopper engine (kernels/cuda/gemm_sm90.cu): it needs no host copy of the
   offsets, only the bound rows_max >= offsets[E]; it returns MOE_EUNSUPPORTED (the caller falls
   back) off sm_90, for fp32, and for shapes it does not tile (N a multiple of 256; varlen-M: D of
   64; varlen-K: M of 128; splits on tile edges; unit strides as described; 16-byte rows). A
   varlen-M A without a gather must hold rows_max rows: its tiles are loaded whole by TMA. */
struct moe_gemm {
    moe_dtype dtype;
    int E;
    int varlen_k;
    int64_t M, N, D; /* varlen-M: M unused (the rows), D the reduction; varlen-K: D unused */
    int64_t rows_max;
    const int64_t *offsets; /* [E+1] */
    struct moe_gemm_op a, b;
    void *c; /* varlen-M: [rows, N], row stride c_rs elements */
    int64_t c_rs;
    struct moe_mats cm[2]; /* varlen-K: C_e (m, n) in cm[m >= c_split] (m counted from c_split) */
    int64_t c_split;
    void *stream; /* CUDA: cudaStream_t */
    /* CUDA kernel schedule: 4 warp-specialized (one warpgroup loads, two compute on 128 x 256
       tiles), output tiles stored by TMA where the output is one strided tensor; 2 the same with
       every store from the computing warps; 3 warp-specialized ping-pong (each computing
       warpgroup on its own 128 x 128 tiles; not with act, which runs as 4); 1 all threads load
       and compute; 6 the ping-pong on 128 x 64 tiles (varlen-M; varlen-K runs as 3); 0 the
       default: 4, or at varlen-M decode sizes, where 4's tiles would be fewer than the SMs, 6
       where its tiles fit one wave, else 3. Same results; the CPU ignores it. */
    int schedule;
    /* CUDA: at most this many CTAs in the persistent grid (0: one per SM). Same results; tests
       use a few, so that each CTA walks many tiles. */
    int ctas;
    /* (Last, so that benchmarks can drive older builds.) varlen-M, SwiGLU fused into the output:
       with act set, the B parts are gate and up (b.split = N / 2, K-major weights) and act [rows, N
       / 2] (row stride act_rs elements) also gets silu(gate) · up of c's two halves as stored: the
       bits of the unfused SwiGLU on c. CUDA needs N / 2 a multiple of 128 (else unsupported:
       MOE_EUNSUPPORTED, moe__gemm_sm90_ok 0). */
    void *act;
    int64_t act_rs;
};
MOE_API int moe_grouped_gemm_cpu(const struct moe_gemm *g);

/* ---- CUDA backend (kernels/cuda, libmoepatch_cuda.so): same arguments, work on p->stream ---- */
MOE_API int moe_forward_cuda(struct moe_problem *p);
MOE_API int moe_backward_cuda(struct moe_problem *p);
/* Bytes of workspace the caller must allocate (torch's allocator) and pass in p->workspace. */
MOE_API size_t moe_workspace_bytes_cuda(const struct moe_problem *p, int backward);
MOE_API size_t moe_saved_bytes_cuda(const struct moe_problem *p);
MOE_API int moe_grouped_gemm_cuda(const struct moe_gemm *g);
/* moe_permute_cpu on the device (device pointers, on stream), the same bits, and inv [T*K]: slot
   -> row. scratch: moe_permute_scratch_bytes_cuda bytes of device memory. */
MOE_API size_t moe_permute_scratch_bytes_cuda(int64_t T, int K, int E);
MOE_API int moe_permute_cuda(int64_t T, int K, int E, const int32_t *idx, int64_t *counts,
                             int64_t *offsets, int32_t *perm, int32_t *inv, void *scratch,
                             void *stream);
/* moe_route_cpu on the device (device pointers, fp32 logits and bias, on stream): the same idx, w
   within fp32 rounding (the softmax sums in another order), the same bits whichever kernel the
   call's T picks (a block per token at decode sizes, else a warp per token). */
MOE_API int moe_route_cuda(const struct moe_route_cfg *c, int64_t T, const float *logits,
                           const float *bias, int32_t *idx, float *w, void *stream);
/* The calling thread's last CUDA-backend failure: "file:line: statement: detail (error)". */
MOE_API const char *moe_last_error_cuda(void);
/* Which kernels moe_forward_cuda would run p's routed experts on: "decode" (GEMVs, p->infer;
   "decode+shared" where the shared expert rides in the same GEMV launches), "engine" (Hopper
   grouped GEMMs) or "cublas". Judged from shapes, strides and flags only. */
MOE_API const char *moe_forward_path_cuda(const struct moe_problem *p);

#ifdef __cplusplus
}
#endif

#endif /* MOE_H */
