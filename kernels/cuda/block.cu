/*
 * kernels/cuda/block.cu — the whole MoE block on the GPU: moe_forward_cuda, moe_backward_cuda and
 * the sizes of the caller-allocated workspace and saved state.
 *
 * Two engines for the routed experts' GEMMs:
 * - Hopper (p->engine set, sm_90, shapes it tiles; kernels/cuda/gemm_sm90.cu): route → counting
 * sort (device) → grouped GEMM gate|up reading x's rows through perm → SwiGLU → grouped GEMM down →
 * gather-sum combine; the backward mirrors it (input grads with the weights read MN-major, weight
 * grads as varlen-K GEMMs that also write the zeros of experts without rows). Rows stay packed and
 * no count goes to the host, so neither pass waits for the GPU.
 * - cuBLAS (anything else): one device-to-host copy of the per-expert counts (p->counts_host; the
 *   batched GEMMs need host sizes) → gather → batched GEMMs over a padded layout (below).
 * A no-grad forward of at most DECODE_MAX_T tokens (p->infer, p->engine) takes neither: route →
 * a GEMV per touched expert for gate|up with SwiGLU, another for down (kernels/cuda/decode_mlp.cu,
 * no sort; the shared expert too) → combine of the slot-ordered rows. Nothing is saved.
 * The forward copies the counts only when the backward will need them (fwd_needs_host_counts); a
 * backward that unexpectedly needs them copies them itself. The shared expert always runs on
 * cuBLAS (one dense GEMM per projection). Saved for backward: the pre-activations [T*K, 2I] (and
 * [T, 2Is] of the shared expert), perm, inv, device counts and offsets.
 *
 * Padded layout (moe__gg_call in internal.h): the routed rows of the workspace start each expert on
 * its own run of ceil(count / P) * P rows, zeros past its rows, so the grouped GEMMs run as one
 * batched GEMM per distinct padded count (a handful of launches instead of one per expert). The
 * saved state stays packed: the forward's SwiGLU writes the packed pre-activations.
 *
 * Design choice: the routing-weight grad comes from the down projection's input side,
 * dw = <a, W_downᵀ dy> (with da = w · W_downᵀ dy), so the expert outputs are never stored.
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

/* ---- buffer plans (the same code measures and carves) ---- */

struct saved_bufs {
    void *h, *hs;
    int32_t *perm, *inv;
    int64_t *counts, *offsets;
};

struct fwd_bufs {
    void **ptrs;
    int64_t *poffsets, *shift;
    void *perm_scratch, *xg, *a, *out, *as, *ys; /* routed rows: padded layout (fwd_padded) */
    void *hp; /* padded gate|up output, aliases out (fwd_padded), else NULL */
    float *gs;
    int joint; /* fwd_decode_shared: as and ys follow a's and out's routed rows */
};

struct bwd_bufs {
    void **ptrs;
    int64_t *poffsets, *shift;
    void *rows, *dau, *dh, *aw; /* routed rows, padded layout; rows: gathered dy, x, then dx rows */
    float *dw;
    void *dau_s, *dh_s, *aw_s, *dxs;
    float *gs, *dgs;
    void *gate_scratch;
};

static int64_t n_rows(const struct moe_problem *p)
{
    return p->T * p->route.K;
}

/* x's row stride as the GEMMs see it: any stride serves a single row, cuBLAS wants ld >= H. */
static int64_t x_stride(const struct moe_problem *p)
{
    return p->T <= 1 ? p->H : p->x_rs;
}

/* Row granule of the backward's padded layout (see moe__gg_call): the largest power of two up to
   64 whose worst-case padding, min(E, R) * (P - 1) rows, stays within a fifth of the R rows. P
   bounds both the extra workspace (<= 20 %) and the extra weight-grad work (~E * P / 2 rows). */
static int pad_of(const struct moe_problem *p)
{
    const int64_t R = n_rows(p), E = p->route.E, nz = R < E ? R : E;
    int P = 64;
    while (P > 1 && nz * (P - 1) * 5 > R)
        P /= 2;
    return P;
}

/* Most rows the padded layout can need: every expert with rows wastes at most P - 1. */
static int64_t padded_rows_max(const struct moe_problem *p)
{
    const int64_t R = n_rows(p), E = p->route.E, nz = R < E ? R : E;
    return R + nz * (pad_of(p) - 1);
}

/* An activation operand of the engine: rows with stride rs, read through gather[r] / div. */
static struct moe_gemm_op rows_operand(const void *base, int64_t rs, const int32_t *gather, int div)
{
    struct moe_gemm_op o;
    memset(&o, 0, sizeof o);
    o.rows = 1;
    o.base = base;
    o.rs = rs;
    o.gather = gather;
    o.gather_div = div;
    return o;
}

/* The routed experts' forward GEMMs in the Hopper engine's terms (moe_grouped_gemm_cuda): gate|up
   reads x's rows through perm into the packed pre-activation h, down reads the packed SwiGLU
   output a into out. With s or f NULL (sizing), the buffers they hold stay NULL. */
static void engine_gemms(const struct moe_problem *p, const struct saved_bufs *s,
                         const struct fwd_bufs *f, struct moe_gemm *gu, struct moe_gemm *dn)
{
    const struct moe_mlp *m = &p->experts;
    const int64_t R = p->T * p->route.K, H = p->H, I = m->I;
    memset(gu, 0, sizeof *gu);
    gu->dtype = p->dtype;
    gu->E = p->route.E;
    gu->rows_max = R;
    gu->offsets = s ? s->offsets : NULL;
    gu->stream = p->stream;
    *dn = *gu;
    gu->N = 2 * I;
    gu->D = H;
    gu->a = rows_operand(p->x, x_stride(p), s ? s->perm : NULL, p->route.K);
    gu->b.m[0] = m->gate;
    gu->b.m[1] = m->up;
    gu->b.split = I;
    gu->c = s ? s->h : NULL;
    gu->c_rs = 2 * I;
    dn->N = H;
    dn->D = I;
    dn->a = rows_operand(f ? f->a : NULL, I, NULL, 1);
    dn->b.m[0] = dn->b.m[1] = m->down;
    dn->b.split = H;
    dn->c = f ? f->out : NULL;
    dn->c_rs = H;
}

/* gu with SwiGLU fused into its output: a = silu(gate) · up, [rows, I]. */
static struct moe_gemm fused_swiglu(const struct moe_gemm *gu, void *a)
{
    struct moe_gemm f = *gu;
    f.act = a;
    f.act_rs = gu->N / 2;
    return f;
}

/* The decode GEMVs of a no-grad forward (decode_mlp.cu): R slots of the experts m routed by idx,
   input rows x's rows slot / div (m NULL, R 0: none), then nx slots of sh's one expert, one per x
   row (sh NULL, nx 0: none). gate|up with SwiGLU into a [R + nx, I], down from a into out
   [R + nx, H], both in slot order: one launch each reads every touched expert's weights once. */
static void decode_gemvs(const struct moe_problem *p, const struct moe_mlp *m, int64_t R,
                         const int32_t *idx, int div, const struct moe_mlp *sh, int64_t nx, void *a,
                         void *out, struct moe__gemv *gu, struct moe__gemv *dn)
{
    const struct moe_mlp *any = m ? m : sh;
    memset(gu, 0, sizeof *gu);
    gu->dtype = p->dtype;
    gu->R = (int)(R + nx);
    gu->nx = (int)nx;
    gu->idx = idx;
    gu->stream = p->stream;
    *dn = *gu;
    gu->act = 1;
    gu->div = div;
    gu->a = p->x;
    gu->a_rs = x_stride(p);
    gu->xs = R; /* the extra slot R + t reads x's row t */
    gu->D = p->H;
    gu->N = any->I;
    if (m) {
        gu->w0 = m->gate;
        gu->w1 = m->up;
        dn->w0 = dn->w1 = m->down;
    }
    if (sh) {
        gu->x0 = sh->gate;
        gu->x1 = sh->up;
        dn->x0 = dn->x1 = sh->down;
    }
    gu->c = a;
    dn->div = 1;
    dn->a = a;
    dn->a_rs = any->I;
    dn->D = any->I;
    dn->N = p->H;
    dn->c = out;
}

static int decode_ok(const struct moe_problem *p, const struct moe_mlp *m, int64_t R, int div,
                     const struct moe_mlp *sh, int64_t nx)
{
    struct moe__gemv gu, dn;
    decode_gemvs(p, m, R, NULL, div, sh, nx, NULL, NULL, &gu, &dn);
    return R + nx <= MOE_GEMV_MAX_SLOTS && moe__gemv_ok(&gu) && moe__gemv_ok(&dn);
}

/* Largest decode-size call: at T = 16 the engine's tiles were already faster than these GEMVs
   (tests/bench/RESULTS.md, thirteenth session). It also bounds an expert's rows (T), so one pass
   of the kernel (GEMV_ROWS) covers them. */
#define DECODE_MAX_T 8

/* 1: the routed experts' forward runs as decode GEMVs (a no-grad call of few tokens). */
static int fwd_decode(const struct moe_problem *p)
{
    return p->infer && p->engine && p->T > 0 && p->T <= DECODE_MAX_T &&
           decode_ok(p, &p->experts, n_rows(p), p->route.K, NULL, 0);
}

/* 1: the shared expert runs inside the routed experts' decode GEMVs, as their last T slots (its
   own launches took 32 us for 6 MB at Ring-mini's T = 8: one expert's few columns per block row
   leave most SMs idle). Needs the routed width, so that a and out hold both. */
static int fwd_decode_shared(const struct moe_problem *p)
{
    return p->shared.n == 1 && p->shared.I == p->experts.I && fwd_decode(p) &&
           decode_ok(p, &p->experts, n_rows(p), p->route.K, &p->shared, p->T);
}

/* 1: the routed experts' forward runs on the Hopper engine (packed rows, x gathered inside the
   GEMM); else on cuBLAS. */
static int fwd_engine(const struct moe_problem *p)
{
    struct moe_gemm gu, dn;
    engine_gemms(p, NULL, NULL, &gu, &dn);
    /* the fused form, checked with a stand-in for a (sizing: no buffers yet) */
    const struct moe_gemm fu = fused_swiglu(&gu, (void *)(uintptr_t)256);
    return p->engine && p->T > 0 && (moe__gemm_sm90_ok(&gu) || moe__gemm_sm90_ok(&fu)) &&
           moe__gemm_sm90_ok(&dn);
}

/* Expert weights (element (r, c) of moe_mats m) read as the operand (x = c, k = r): W itself where
   the product needs Wᵀ's rows, i.e. MN-major. */
static struct moe_mats transposed(const struct moe_mats *m)
{
    struct moe_mats t = {m->ptr, m->base, m->es, m->cs, m->rs};
    return t;
}

/* The routed experts' backward GEMMs in the engine's terms, writing the weight grads described by d
   (p->d_experts; p->experts stands in for its layout before the grads exist): g[0] dau = dyg
   W_down, g[1] the down-proj weight grad, g[2] the gate|up weight grads, g[3] the input-grad rows
   dxr = dh [W_gate; W_up]. dyg and the x rows are read through perm. s, b NULL: sizing only. */
static void engine_bwd_gemms(const struct moe_problem *p, const struct moe_mlp *d,
                             const struct saved_bufs *s, const struct bwd_bufs *b,
                             struct moe_gemm g[4])
{
    const struct moe_mlp *m = &p->experts;
    const int64_t R = p->T * p->route.K, H = p->H, I = m->I;
    const int32_t *perm = s ? s->perm : NULL;
    const struct moe_gemm_op dyg = rows_operand(p->dy, H, perm, p->route.K);
    const struct moe_gemm_op dh = rows_operand(b ? b->dh : NULL, 2 * I, NULL, 1);
    memset(g, 0, 4 * sizeof *g);
    g[0].dtype = p->dtype;
    g[0].E = p->route.E;
    g[0].rows_max = R;
    g[0].offsets = s ? s->offsets : NULL;
    g[0].stream = p->stream;
    g[1] = g[2] = g[3] = g[0];

    g[0].N = I;
    g[0].D = H;
    g[0].a = dyg;
    g[0].b.m[0] = g[0].b.m[1] = transposed(&m->down);
    g[0].b.split = H;
    g[0].b.split_k = 1;
    g[0].c = b ? b->dau : NULL;
    g[0].c_rs = I;

    g[1].varlen_k = 1;
    g[1].M = H;
    g[1].N = I;
    g[1].a = dyg;
    g[1].b = rows_operand(b ? b->aw : NULL, I, NULL, 1);
    g[1].cm[0] = g[1].cm[1] = d->down;
    g[1].c_split = H;

    g[2].varlen_k = 1;
    g[2].M = 2 * I;
    g[2].N = H;
    g[2].a = dh;
    g[2].b = rows_operand(p->x, x_stride(p), perm, p->route.K);
    g[2].cm[0] = d->gate;
    g[2].cm[1] = d->up;
    g[2].c_split = I;

    g[3].N = H;
    g[3].D = 2 * I;
    g[3].a = dh;
    g[3].b.m[0] = transposed(&m->gate);
    g[3].b.m[1] = transposed(&m->up);
    g[3].b.split = I;
    g[3].b.split_k = 1;
    g[3].c = b ? b->rows : NULL;
    g[3].c_rs = H;
}

/* 1: the routed experts' backward runs on the Hopper engine with grads laid out as d. */
static int bwd_engine_for(const struct moe_problem *p, const struct moe_mlp *d)
{
    struct moe_gemm g[4];
    if (!p->engine || p->T == 0)
        return 0;
    engine_bwd_gemms(p, d, NULL, NULL, g);
    for (int i = 0; i < 4; i++)
        if (!moe__gemm_sm90_ok(&g[i]))
            return 0;
    return 1;
}

/* The forward copies the per-expert counts to the host (for the cuBLAS backward) unless both passes
   run on the engine, judged with the grads laid out like the weights (as the glue allocates them);
   a backward that then cannot use the engine copies them itself. */
static int fwd_needs_host_counts(const struct moe_problem *p)
{
    return !(fwd_engine(p) && bwd_engine_for(p, &p->experts));
}

/* The forward runs in the padded layout too when the padded [rows, 2I] gate|up output fits in the
   [rows, H] output buffer (2I <= H: it is dead before the down projection writes there). */
static int fwd_padded(const struct moe_problem *p)
{
    return 2 * p->experts.I <= p->H;
}

static size_t plan_saved(const struct moe_problem *p, char *base, struct saved_bufs *b)
{
    struct moe__arena a = {base, 0};
    const size_t es = moe_dtype_size(p->dtype);
    const int64_t R = n_rows(p), E = p->route.E;
    b->h = moe__take(&a, es * (size_t)(R * 2 * p->experts.I));
    b->hs = p->shared.n ? moe__take(&a, es * (size_t)(p->T * 2 * p->shared.I)) : NULL;
    b->perm = (int32_t *)moe__take(&a, sizeof(int32_t) * (size_t)R);
    b->inv = (int32_t *)moe__take(&a, sizeof(int32_t) * (size_t)R);
    b->counts = (int64_t *)moe__take(&a, sizeof(int64_t) * (size_t)E);
    b->offsets = (int64_t *)moe__take(&a, sizeof(int64_t) * (size_t)(E + 1));
    return a.off;
}

static size_t plan_fwd(const struct moe_problem *p, char *base, struct fwd_bufs *b)
{
    struct moe__arena a = {base, 0};
    const size_t es = moe_dtype_size(p->dtype);
    const int64_t R = n_rows(p), T = p->T, H = p->H, I = p->experts.I, Is = p->shared.I;
    const int eng = fwd_engine(p), pd = !eng && fwd_padded(p);
    const int64_t Rp = pd ? padded_rows_max(p) : R, E = p->route.E;
    b->ptrs = (void **)moe__take(&a, moe__gg_ptr_bytes(p->route.E));
    b->poffsets = pd ? (int64_t *)moe__take(&a, sizeof(int64_t) * (size_t)(E + 1)) : NULL;
    b->shift = pd ? (int64_t *)moe__take(&a, sizeof(int64_t) * (size_t)E) : NULL;
    b->perm_scratch = moe__take(&a, moe_permute_scratch_bytes_cuda(T, p->route.K, p->route.E));
    /* the shared expert's rows right after the routed ones: the decode GEMVs run both at once */
    const int joint = b->joint = fwd_decode_shared(p);
    /* the engine reads x's rows in place: xg is only the down-proj output there */
    b->xg = moe__take(&a, es * (size_t)((Rp + (joint ? T : 0)) * H));
    b->a = moe__take(&a, es * (size_t)((Rp + (joint ? T : 0)) * I));
    /* the gathered x is dead once gate|up ran: the down-proj output reuses it */
    b->out = b->xg;
    b->hp = pd ? moe__take(&a, es * (size_t)(Rp * 2 * I)) : NULL;
    if (joint) {
        b->as = (char *)b->a + es * (size_t)(Rp * I);
        b->ys = (char *)b->xg + es * (size_t)(Rp * H);
    } else {
        b->as = p->shared.n ? moe__take(&a, es * (size_t)(T * Is)) : NULL;
        b->ys = p->shared.n ? moe__take(&a, es * (size_t)(T * H)) : NULL;
    }
    b->gs =
        p->shared.n && p->shared_gate ? (float *)moe__take(&a, sizeof(float) * (size_t)T) : NULL;
    return a.off;
}

static size_t plan_bwd(const struct moe_problem *p, char *base, struct bwd_bufs *b)
{
    struct moe__arena a = {base, 0};
    const size_t es = moe_dtype_size(p->dtype);
    const int64_t R = n_rows(p), T = p->T, H = p->H, I = p->experts.I, Is = p->shared.I;
    const int eng = bwd_engine_for(p, &p->d_experts);
    const int64_t Rp = eng ? R : padded_rows_max(p), E = p->route.E;
    const int sh = p->shared.n != 0, gated = sh && p->shared_gate;
    b->ptrs = (void **)moe__take(&a, moe__gg_ptr_bytes(p->route.E));
    b->poffsets = eng ? NULL : (int64_t *)moe__take(&a, sizeof(int64_t) * (size_t)(E + 1));
    b->shift = eng ? NULL : (int64_t *)moe__take(&a, sizeof(int64_t) * (size_t)E);
    b->rows = moe__take(&a, es * (size_t)(Rp * H));
    b->dau = moe__take(&a, es * (size_t)(Rp * I));
    b->dh = moe__take(&a, es * (size_t)(Rp * 2 * I));
    b->aw = moe__take(&a, es * (size_t)(Rp * I));
    b->dw = (float *)moe__take(&a, sizeof(float) * (size_t)R);
    b->dau_s = sh ? moe__take(&a, es * (size_t)(T * Is)) : NULL;
    b->dh_s = sh ? moe__take(&a, es * (size_t)(T * 2 * Is)) : NULL;
    b->aw_s = sh ? moe__take(&a, es * (size_t)(T * Is)) : NULL;
    b->dxs = sh ? moe__take(&a, es * (size_t)(T * H)) : NULL;
    b->gs = gated ? (float *)moe__take(&a, sizeof(float) * (size_t)T) : NULL;
    b->dgs = gated ? (float *)moe__take(&a, sizeof(float) * (size_t)T) : NULL;
    b->gate_scratch = gated ? moe__take(&a, moe__shared_gate_scratch_bytes(T, H)) : NULL;
    return a.off;
}

/* ---- operand helpers for the grouped GEMM engine ---- */

/* Packed activations: expert e's rows start at offsets[e] (padded: poffsets[e]); logical
   [rows, width] row-major. */
static struct moe__gg_operand rows_op(const void *base, int64_t step, int64_t off, int padded = 0)
{
    struct moe__gg_operand o = {NULL, base, 0, 1, step, off, step, 1, padded};
    return o;
}

/* The transpose of rows_op: logical [width, rows]. */
static struct moe__gg_operand rows_t_op(const void *base, int64_t step, int64_t off, int padded = 0)
{
    struct moe__gg_operand o = {NULL, base, 0, 1, step, off, 1, step, padded};
    return o;
}

/* Expert weights as stored ([R, C] with the moe_mats strides) or transposed ([C, R]). */
static struct moe__gg_operand mats_op(const struct moe_mats *m, int transposed)
{
    struct moe__gg_operand o = {m->ptr, m->base, m->es, 0, 0, 0, m->rs, m->cs, 0};
    if (transposed) {
        o.rs = m->cs;
        o.cs = m->rs;
    }
    return o;
}

static struct moe__gg_part part(struct moe__gg_operand a, struct moe__gg_operand b,
                                struct moe__gg_operand c, int64_t M, int64_t N, int64_t K,
                                float beta)
{
    struct moe__gg_part q = {a, b, c, M, N, K, beta};
    return q;
}

/* Everything an MLP pass over one set of experts needs: routed (n = E, counts from the sort) or
   shared (n = 1, all T rows, offsets NULL). The routed experts add the padded layout (ctx_pad:
   pad > 0, pm.poffsets == poffsets_dev) in the backward, and in the forward where fwd_padded. */
struct mlp_ctx {
    const struct moe_mlp *m;
    const int64_t *counts_host, *counts_dev, *offsets_dev;
    moe_dtype dt;
    void **ptrs;
    cublasHandle_t h;
    cudaStream_t st;
    const int64_t *poffsets_dev;
    int pad;
    struct moe__pad_map pm;
};

static struct mlp_ctx ctx_of(const struct moe_mlp *m, const int64_t *counts_host,
                             const int64_t *counts_dev, const int64_t *offsets_dev, moe_dtype dt,
                             void **ptrs, cublasHandle_t h, cudaStream_t st)
{
    struct mlp_ctx c;
    memset(&c, 0, sizeof c);
    c.m = m;
    c.counts_host = counts_host;
    c.counts_dev = counts_dev;
    c.offsets_dev = offsets_dev;
    c.dt = dt;
    c.ptrs = ptrs;
    c.h = h;
    c.st = st;
    return c;
}

/* Adds the padded layout of n experts (poffsets from moe__pad_offsets_cuda) to a routed context. */
static void ctx_pad(struct mlp_ctx *c, int n, const int64_t *poffsets, int pad)
{
    c->poffsets_dev = poffsets;
    c->pad = pad;
    c->pm.n = n;
    c->pm.offsets = c->offsets_dev;
    c->pm.poffsets = poffsets;
}

/* bucket: one cuBLAS group per distinct padded count (only where the padded layout exists). */
static int gg(const struct mlp_ctx *c, int n_parts, struct moe__gg_part p0, struct moe__gg_part p1,
              int bucket = 0)
{
    struct moe__gg_call call;
    call.n_experts = c->m->n;
    call.counts_host = c->counts_host;
    call.counts_dev = c->counts_dev;
    call.offsets_dev = c->offsets_dev;
    call.poffsets_dev = c->poffsets_dev;
    call.pad = c->pad;
    call.bucket = bucket && c->pad > 0 && c->counts_dev != NULL;
    call.n_parts = n_parts;
    call.part[0] = p0;
    call.part[1] = p1;
    return moe__grouped_gemm(&call, c->dt, c->ptrs, c->h, c->st);
}

/* h = [x Wgᵀ | x Wuᵀ], a = silu(gate) · up, out = a Wdᵀ. x: rows with row stride x_step. With
   c->pad, x, h, a and out are in the padded layout (rows: its row count), the GEMMs run bucketed
   and h_pack receives the packed h (what backward reads); else h_pack is unused. */
static int mlp_forward(const struct mlp_ctx *c, const void *x, int64_t x_step, void *h,
                       void *h_pack, void *a, int64_t rows, void *out)
{
    const int64_t H = c->m->H, I = c->m->I;
    const int pd = c->pad > 0;
    MOE_TRY(gg(c, 2,
               part(rows_op(x, x_step, 0, pd), mats_op(&c->m->gate, 1), rows_op(h, 2 * I, 0, pd),
                    -1, I, H, 0.f),
               part(rows_op(x, x_step, 0, pd), mats_op(&c->m->up, 1), rows_op(h, 2 * I, I, pd), -1,
                    I, H, 0.f),
               pd));
    MOE_TRY(moe__swiglu_cuda(rows, I, h, a, pd ? &c->pm : NULL, h_pack, c->dt, c->st));
    struct moe__gg_part down =
        part(rows_op(a, I, 0, pd), mats_op(&c->m->down, 1), rows_op(out, H, 0, pd), -1, H, I, 0.f);
    return gg(c, 1, down, down, pd);
}

/* Backward of one MLP pass. dy: rows (row stride H); w: per-slot weights through perm (or per-row,
   perm NULL; NULL: 1); dw: per-slot grads of w (may be NULL). Writes the weight grads of d and
   dxr = dh_gate Wg + dh_up Wu ([rows, H]). With c->pad, x, dy, dau, dh, aw and dxr are in the
   padded layout (rows: its row count; h and perm stay packed), the weight grads run bucketed. */
/* First half of an MLP backward: everything that reads dy (dau = dy W_down, SwiGLU backward giving
   dh, aw and dw, and the down-proj weight grad). */
static int mlp_backward_dy(const struct mlp_ctx *c, const struct moe_mlp *d, const void *dy,
                           const void *h, int64_t rows, const int32_t *perm, const float *w,
                           float *dw, void *dau, void *dh, void *aw)
{
    const int64_t H = c->m->H, I = c->m->I;
    const int pd = c->pad > 0;
    struct moe__gg_part p;
    p = part(rows_op(dy, H, 0, pd), mats_op(&c->m->down, 0), rows_op(dau, I, 0, pd), -1, I, H, 0.f);
    MOE_TRY(gg(c, 1, p, p, pd));
    MOE_TRY(moe__swiglu_backward_cuda(rows, I, h, dau, perm, pd ? &c->pm : NULL, w, dw, dh, aw,
                                      c->dt, c->st));
    p = part(rows_t_op(dy, H, 0, pd), rows_op(aw, I, 0, pd), mats_op(&d->down, 0), H, I, -1, 0.f);
    return gg(c, 1, p, p, 1);
}

/* Second half: the gate/up weight grads (read x) and the input-grad rows dxr = dh [W_gate; W_up].
   dxr may be the buffer x was read from: the stream orders the two. */
static int mlp_backward_x(const struct mlp_ctx *c, const struct moe_mlp *d, const void *x,
                          int64_t x_step, const void *dh, void *dxr)
{
    const int64_t H = c->m->H, I = c->m->I;
    const int pd = c->pad > 0;
    struct moe__gg_part p;
    MOE_TRY(gg(c, 2,
               part(rows_t_op(dh, 2 * I, 0, pd), rows_op(x, x_step, 0, pd), mats_op(&d->gate, 0), I,
                    H, -1, 0.f),
               part(rows_t_op(dh, 2 * I, I, pd), rows_op(x, x_step, 0, pd), mats_op(&d->up, 0), I,
                    H, -1, 0.f),
               1));
    p = part(rows_op(dh, 2 * I, 0, pd), mats_op(&c->m->gate, 0), rows_op(dxr, H, 0, pd), -1, H, I,
             0.f);
    MOE_TRY(gg(c, 1, p, p, pd));
    p = part(rows_op(dh, 2 * I, I, pd), mats_op(&c->m->up, 0), rows_op(dxr, H, 0, pd), -1, H, I,
             1.f);
    return gg(c, 1, p, p, pd);
}

/* Experts without rows get zero weight grads (counts_dev NULL: every expert); n_empty of them. */
static int zero_empty(const struct moe_mlp *d, int n, const int64_t *counts_dev, int n_empty,
                      moe_dtype dt, cudaStream_t st)
{
    MOE_TRY(moe__zero_empty_cuda(&d->gate, n, d->I, d->H, counts_dev, n_empty, dt, st));
    MOE_TRY(moe__zero_empty_cuda(&d->up, n, d->I, d->H, counts_dev, n_empty, dt, st));
    return moe__zero_empty_cuda(&d->down, n, d->H, d->I, counts_dev, n_empty, dt, st);
}

/* ---- validation ---- */

static int mats_ok(const struct moe_mats *m)
{
    return (m->ptr || m->base) && (m->rs == 1 || m->cs == 1);
}

static int mlp_ok(const struct moe_mlp *m, int n, int64_t H)
{
    return m->n == n && m->H == H && m->I > 0 && mats_ok(&m->gate) && mats_ok(&m->up) &&
           mats_ok(&m->down);
}

static int problem_ok(const struct moe_problem *p)
{
    MOE_REQUIRE(p, MOE_EINVAL);
    MOE_REQUIRE(p->dtype == MOE_F32 || p->dtype == MOE_BF16 || p->dtype == MOE_F16, MOE_EINVAL);
    MOE_REQUIRE(p->T >= 0 && p->H > 0 && p->route.E > 0 && p->route.K > 0, MOE_EINVAL);
    MOE_REQUIRE(p->T * p->route.K < INT32_MAX, MOE_EUNSUPPORTED);
    MOE_REQUIRE(mlp_ok(&p->experts, p->route.E, p->H), MOE_EINVAL);
    MOE_REQUIRE(p->shared.n == 0 || mlp_ok(&p->shared, 1, p->H), MOE_EINVAL);
    MOE_REQUIRE(p->shared.n == 1 || !p->shared_gate, MOE_EINVAL);
    /* logits of another dtype only where no backward (which reads them as fp32) follows */
    MOE_REQUIRE(p->logits_dtype == MOE_F32 ||
                    (p->infer && (p->logits_dtype == MOE_BF16 || p->logits_dtype == MOE_F16)),
                MOE_EINVAL);
    MOE_REQUIRE(p->bias_dtype == MOE_F32 || p->bias_dtype == MOE_BF16 || p->bias_dtype == MOE_F16,
                MOE_EINVAL);
    MOE_REQUIRE(p->counts_host && p->saved, MOE_EINVAL);
    MOE_REQUIRE(p->T == 0 || (p->x && (p->logits || p->router_w) && p->idx && p->w), MOE_EINVAL);
    /* logits made here (moe_problem.router_w): no backward, which would read them, follows */
    MOE_REQUIRE(!p->router_w ||
                    (p->infer && (p->T == 0 || p->logits_out) && p->router_w_rs >= p->H),
                MOE_EINVAL);
    MOE_REQUIRE(p->T <= 1 || p->x_rs >= p->H, MOE_EINVAL);
    return MOE_OK;
}

static int workspace_ok(const struct moe_problem *p, size_t need)
{
    MOE_REQUIRE(p->workspace && p->workspace_bytes >= need, MOE_EINVAL);
    return MOE_OK;
}

/* ---- public entry points ---- */

extern "C" MOE_API size_t moe_saved_bytes_cuda(const struct moe_problem *p)
{
    struct saved_bufs b;
    return p ? plan_saved(p, NULL, &b) : 0;
}

extern "C" MOE_API size_t moe_workspace_bytes_cuda(const struct moe_problem *p, int backward)
{
    struct fwd_bufs f;
    struct bwd_bufs b;
    if (!p)
        return 0;
    return backward ? plan_bwd(p, NULL, &b) : plan_fwd(p, NULL, &f);
}

/* h = x [W_gate | W_up]ᵀ, then a = silu(gate) · up by the SwiGLU kernel; where the engine tiles
   only the fused form (I an odd multiple of 128), SwiGLU fused into the GEMM's output. Same bits
   either way. The fused form is not the default: its epilogue (an expf and a division per
   element, half as many stores again) runs while the tensor cores wait, and costs more than the
   separate kernel (tests/bench/RESULTS.md, seventh session). */
static int gate_up_swiglu(const struct moe_gemm *gu, void *a, int64_t R)
{
    if (!moe__gemm_sm90_ok(gu)) {
        const struct moe_gemm f = fused_swiglu(gu, a);
        return moe_grouped_gemm_cuda(&f);
    }
    MOE_TRY(moe_grouped_gemm_cuda(gu));
    return moe__swiglu_cuda(R, gu->N / 2, gu->c, a, NULL, NULL, gu->dtype,
                            (cudaStream_t)gu->stream);
}

static int forward(struct moe_problem *p, cudaStream_t st)
{
    struct saved_bufs s;
    struct fwd_bufs f;
    plan_saved(p, (char *)p->saved, &s);
    MOE_TRY(workspace_ok(p, plan_fwd(p, NULL, &f)));
    plan_fwd(p, (char *)p->workspace, &f);
    const int E = p->route.E, K = p->route.K;
    const int64_t T = p->T, R = n_rows(p), H = p->H;
    cublasHandle_t h;
    MOE_TRY(moe__cublas_handle(&h));

    const void *logits = p->logits;
    moe_dtype ldt = p->logits_dtype;
    if (p->router_w) {
        MOE_TRY(moe__router_logits_cuda(T, H, E, p->dtype, p->x, p->x_rs, p->router_w,
                                        p->router_w_rs, p->logits_out, st));
        logits = p->logits_out;
        ldt = MOE_F32;
    }
    MOE_TRY(moe__route_cuda(&p->route, T, logits, ldt, p->bias, p->bias_dtype, p->idx, p->idx64,
                            p->w, st));
    /* the decode GEMVs need no sort; the per-expert counts, when asked for, come from it */
    const int decode = fwd_decode(p);
    if (!decode || p->counts)
        MOE_TRY(moe_permute_cuda(T, K, E, p->idx, s.counts, s.offsets, s.perm, s.inv,
                                 f.perm_scratch, st));
    if (p->counts)
        MOE_CHECK(T ? cudaMemcpyAsync(p->counts, s.counts, sizeof(int64_t) * (size_t)E,
                                      cudaMemcpyDeviceToDevice, st)
                    : cudaMemsetAsync(p->counts, 0, sizeof(int64_t) * (size_t)E, st));
    if (T == 0) {
        memset(p->counts_host, 0, sizeof(int64_t) * (size_t)E);
        return MOE_OK;
    }
    if (!decode && fwd_needs_host_counts(p)) {
        MOE_CHECK(cudaMemcpyAsync(p->counts_host, s.counts, sizeof(int64_t) * (size_t)E,
                                  cudaMemcpyDeviceToHost, st));
        MOE_CHECK(cudaStreamSynchronize(st));
    }

    struct mlp_ctx ex =
        ctx_of(&p->experts, p->counts_host, s.counts, s.offsets, p->dtype, f.ptrs, h, st);
    if (decode) { /* f.joint: the shared expert's rows land at f.as and f.ys (plan_fwd) */
        struct moe__gemv gu, dn;
        decode_gemvs(p, &p->experts, R, p->idx, K, f.joint ? &p->shared : NULL, f.joint ? T : 0,
                     f.a, f.out, &gu, &dn);
        MOE_TRY(moe__gemv_cuda(&gu));
        MOE_TRY(moe__gemv_cuda(&dn));
    } else if (fwd_engine(p)) {
        struct moe_gemm gu, dn;
        engine_gemms(p, &s, &f, &gu, &dn);
        MOE_TRY(gate_up_swiglu(&gu, f.a, R));
        MOE_TRY(moe_grouped_gemm_cuda(&dn));
    } else if (fwd_padded(p)) {
        const int pad = pad_of(p);
        const int64_t Rp = moe__padded_rows(E, p->counts_host, pad);
        MOE_REQUIRE(Rp <= padded_rows_max(p) && Rp <= INT32_MAX, MOE_EINVAL);
        MOE_TRY(moe__pad_offsets_cuda(E, s.counts, s.offsets, pad, f.poffsets, f.shift, st));
        ctx_pad(&ex, E, f.poffsets, pad);
        MOE_TRY(
            moe__gather_rows_cuda(Rp, H, p->x, x_stride(p), s.perm, K, &ex.pm, f.xg, p->dtype, st));
        MOE_TRY(mlp_forward(&ex, f.xg, H, f.hp, s.h, f.a, Rp, f.out));
    } else {
        MOE_TRY(
            moe__gather_rows_cuda(R, H, p->x, x_stride(p), s.perm, K, NULL, f.xg, p->dtype, st));
        MOE_TRY(mlp_forward(&ex, f.xg, H, s.h, NULL, f.a, R, f.out));
    }

    if (p->shared.n && !f.joint) {
        const int64_t all[1] = {T};
        struct mlp_ctx sh = ctx_of(&p->shared, all, NULL, NULL, p->dtype, f.ptrs, h, st);
        if (decode && decode_ok(p, NULL, 0, 1, &p->shared, T)) {
            struct moe__gemv gu, dn;
            decode_gemvs(p, NULL, 0, NULL, 1, &p->shared, T, f.as, f.ys, &gu, &dn);
            MOE_TRY(moe__gemv_cuda(&gu));
            MOE_TRY(moe__gemv_cuda(&dn));
        } else {
            MOE_TRY(mlp_forward(&sh, p->x, x_stride(p), s.hs, NULL, f.as, T, f.ys));
        }
    }
    if (p->shared_gate) /* shared.n == 1 (problem_ok) */
        MOE_TRY(moe__shared_gate_cuda(T, H, p->x, x_stride(p), p->shared_gate, f.gs, p->dtype, st));
    return moe__combine_cuda(T, K, H, f.out, decode ? NULL : s.inv, p->idx, decode ? NULL : f.shift,
                             p->w, f.ys, f.gs, NULL, NULL, p->y, p->dtype, st);
}

extern "C" MOE_API const char *moe_forward_path_cuda(const struct moe_problem *p)
{
    if (fwd_decode(p))
        return fwd_decode_shared(p) ? "decode+shared" : "decode";
    return fwd_engine(p) ? "engine" : "cublas";
}

extern "C" MOE_API int moe_forward_cuda(struct moe_problem *p)
{
    MOE_TRY(problem_ok(p));
    MOE_REQUIRE(p->T == 0 || p->y, MOE_EINVAL);
    return forward(p, (cudaStream_t)p->stream);
}

/* The routed experts' backward on the Hopper engine: packed rows, dy and x read through perm, no
   host counts (the weight-grad GEMM writes zeros for experts without rows). dxr -> b->rows. */
static int routed_backward_engine(struct moe_problem *p, const struct saved_bufs *s,
                                  const struct bwd_bufs *b, cudaStream_t st)
{
    struct moe_gemm g[4];
    engine_bwd_gemms(p, &p->d_experts, s, b, g);
    MOE_TRY(moe_grouped_gemm_cuda(&g[0]));
    MOE_TRY(moe__swiglu_backward_cuda(n_rows(p), p->experts.I, s->h, b->dau, s->perm, NULL, p->w,
                                      b->dw, b->dh, b->aw, p->dtype, st));
    for (int i = 1; i < 4; i++)
        MOE_TRY(moe_grouped_gemm_cuda(&g[i]));
    return MOE_OK;
}

/* The routed experts' backward on cuBLAS: padded layout from the host counts (copied here when the
   forward left them on the device). dxr -> b->rows in the padded layout. */
static int routed_backward_cublas(struct moe_problem *p, const struct saved_bufs *s,
                                  const struct bwd_bufs *b, cublasHandle_t h, cudaStream_t st)
{
    const int E = p->route.E, K = p->route.K;
    const int64_t H = p->H;
    if (!fwd_needs_host_counts(p)) {
        MOE_CHECK(cudaMemcpyAsync(p->counts_host, s->counts, sizeof(int64_t) * (size_t)E,
                                  cudaMemcpyDeviceToHost, st));
        MOE_CHECK(cudaStreamSynchronize(st));
    }
    int n_empty = E;
    for (int e = 0; e < E; e++)
        n_empty -= p->counts_host[e] != 0;
    MOE_TRY(zero_empty(&p->d_experts, E, s->counts, n_empty, p->dtype, st));

    /* the routed rows in the padded layout (zero rows past each expert's rows) */
    const int pad = pad_of(p);
    const int64_t Rp = moe__padded_rows(E, p->counts_host, pad);
    MOE_REQUIRE(Rp <= padded_rows_max(p) && Rp <= INT32_MAX, MOE_EINVAL);
    MOE_TRY(moe__pad_offsets_cuda(E, s->counts, s->offsets, pad, b->poffsets, b->shift, st));
    const struct moe__pad_map pm = {E, s->offsets, b->poffsets};
    struct mlp_ctx ex =
        ctx_of(&p->experts, p->counts_host, s->counts, s->offsets, p->dtype, b->ptrs, h, st);
    ctx_pad(&ex, E, b->poffsets, pad);
    /* b->rows holds the gathered dy, then the gathered x, then the input-grad rows: their lives do
       not overlap, and each is [T·K (padded), H], the largest buffers of the backward */
    MOE_TRY(moe__gather_rows_cuda(Rp, H, p->dy, H, s->perm, K, &pm, b->rows, p->dtype, st));
    MOE_TRY(mlp_backward_dy(&ex, &p->d_experts, b->rows, s->h, Rp, s->perm, p->w, b->dw, b->dau,
                            b->dh, b->aw));
    MOE_TRY(
        moe__gather_rows_cuda(Rp, H, p->x, x_stride(p), s->perm, K, &pm, b->rows, p->dtype, st));
    return mlp_backward_x(&ex, &p->d_experts, b->rows, H, b->dh, b->rows);
}

static int backward(struct moe_problem *p, cudaStream_t st)
{
    struct saved_bufs s;
    struct bwd_bufs b;
    plan_saved(p, (char *)p->saved, &s);
    MOE_TRY(workspace_ok(p, plan_bwd(p, NULL, &b)));
    plan_bwd(p, (char *)p->workspace, &b);
    const int E = p->route.E, K = p->route.K;
    const int64_t T = p->T, H = p->H;
    cublasHandle_t h;
    MOE_TRY(moe__cublas_handle(&h));

    if (T == 0) {
        MOE_TRY(zero_empty(&p->d_experts, E, NULL, E, p->dtype, st));
        if (p->shared.n)
            MOE_TRY(zero_empty(&p->d_shared, 1, NULL, 1, p->dtype, st));
        if (p->shared_gate)
            MOE_TRY(moe__shared_gate_backward_cuda(0, H, p->x, H, NULL, NULL, p->d_shared_gate,
                                                   NULL, p->dtype, st));
        return MOE_OK;
    }
    if (bwd_engine_for(p, &p->d_experts))
        MOE_TRY(routed_backward_engine(p, &s, &b, st));
    else
        MOE_TRY(routed_backward_cublas(p, &s, &b, h, st));
    MOE_TRY(moe__route_backward_cuda(&p->route, T, p->logits, p->idx, b.dw, p->dlogits, st));

    if (p->shared.n) {
        const int64_t all[1] = {T};
        struct mlp_ctx sh = ctx_of(&p->shared, all, NULL, NULL, p->dtype, b.ptrs, h, st);
        if (p->shared_gate)
            MOE_TRY(
                moe__shared_gate_cuda(T, H, p->x, x_stride(p), p->shared_gate, b.gs, p->dtype, st));
        MOE_TRY(mlp_backward_dy(&sh, &p->d_shared, p->dy, s.hs, T, NULL, b.gs, b.dgs, b.dau_s,
                                b.dh_s, b.aw_s));
        MOE_TRY(mlp_backward_x(&sh, &p->d_shared, p->x, x_stride(p), b.dh_s, b.dxs));
        if (p->shared_gate)
            MOE_TRY(moe__shared_gate_backward_cuda(T, H, p->x, x_stride(p), b.gs, b.dgs,
                                                   p->d_shared_gate, b.gate_scratch, p->dtype, st));
    }
    return moe__combine_cuda(T, K, H, b.rows, s.inv, p->idx, b.shift, NULL, b.dxs, NULL, b.dgs,
                             p->shared_gate, p->dx, p->dtype, st);
}

extern "C" MOE_API int moe_backward_cuda(struct moe_problem *p)
{
    MOE_TRY(problem_ok(p));
    MOE_REQUIRE(mlp_ok(&p->d_experts, p->route.E, p->H), MOE_EINVAL);
    MOE_REQUIRE(p->shared.n == 0 || mlp_ok(&p->d_shared, 1, p->H), MOE_EINVAL);
    MOE_REQUIRE(!p->shared_gate || p->d_shared_gate, MOE_EINVAL);
    MOE_REQUIRE(p->T == 0 || (p->dy && p->dx && p->dlogits), MOE_EINVAL);
    return backward(p, (cudaStream_t)p->stream);
}
