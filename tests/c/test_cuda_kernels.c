/*
 * tests/c/test_cuda_kernels.c — the CUDA backend against the CPU reference, through the public API
 * only (moe_forward/backward_cuda vs moe_forward/backward_cpu), on fresh random data per case.
 * Every output and grad is compared (fp32 1e-5, bf16/fp16 1e-2, tests/c/tolerance.h); device
 * outputs are poisoned with 0xFF (NaN) first, so an unwritten element fails; each case runs twice
 * on the GPU and must give the same bits. Without a GPU every test skips with a message. Design
 * choice: one struct describes a case (shape, recipe, dtype, weight layout); one function builds
 * the identical problem in host and device memory and checks it, so each Test is one line.
 */
#include <criterion/criterion.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../kernels/moe.h"
#include "tolerance.h"

enum layout { L3D, LLIST, LT3D }; /* transformers-5 3-D, ModuleList pointers, Llama-4 transposed */

struct tcase {
    const char *name;
    moe_dtype dt;
    int64_t T, H, I, Is; /* Is: shared intermediate, 0 = no shared expert */
    int E, K;
    moe_recipe recipe;
    int n_group, topk_group;
    int gated; /* Qwen2 sigmoid gate on the shared expert */
    enum layout lay;
    int empty;     /* expert 1 gets no token */
    int ties;      /* logits quantised to quarters: many exact ties */
    int64_t x_pad; /* extra elements per x row */
    float skew;    /* logits += skew * e / E: uneven loads, several padded-count buckets */
};

static void need_gpu(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess || n == 0)
        cr_skip_test("no CUDA device (%s)", e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
}

#define CK(x)                                                                                      \
    do {                                                                                           \
        cudaError_t ck_ = (x);                                                                     \
        cr_assert(ck_ == cudaSuccess, "%s: %s", #x, cudaGetErrorString(ck_));                      \
    } while (0)

/* ---- host dtype helpers (round to nearest even, as torch casts) ---- */

static uint16_t f2bf(float f)
{
    uint32_t u;
    memcpy(&u, &f, 4);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static double elem(moe_dtype dt, const void *p, size_t i)
{
    if (dt == MOE_F32)
        return ((const float *)p)[i];
    if (dt == MOE_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return (double)((const _Float16 *)p)[i];
}

static void set_elem(moe_dtype dt, void *p, size_t i, float v)
{
    if (dt == MOE_F32)
        ((float *)p)[i] = v;
    else if (dt == MOE_BF16)
        ((uint16_t *)p)[i] = f2bf(v);
    else
        ((_Float16 *)p)[i] = (_Float16)v;
}

static uint64_t rng_state;
static float urand(void) /* uniform in [-1, 1) */
{
    rng_state = rng_state * 6364136223846793005ull + 1442695040888963407ull;
    return (float)((rng_state >> 40) * (1.0 / 16777216.0)) * 2.0f - 1.0f;
}

static void fill(moe_dtype dt, void *p, size_t n, float scale)
{
    for (size_t i = 0; i < n; i++)
        set_elem(dt, p, i, urand() * scale);
}

/* ---- a host/device pair of buffers ---- */

struct pair {
    void *h, *d;
    size_t bytes;
};

static struct pair pair_new(size_t bytes)
{
    struct pair p = {calloc(bytes ? bytes : 1, 1), NULL, bytes};
    cr_assert(p.h);
    CK(cudaMalloc(&p.d, bytes ? bytes : 1));
    return p;
}

static void pair_up(struct pair *p)
{
    CK(cudaMemcpy(p->d, p->h, p->bytes, cudaMemcpyHostToDevice));
}

static void pair_free(struct pair *p)
{
    free(p->h);
    cudaFree(p->d);
}

/* ---- one MLP's weights (or grads) in a layout, host and device ---- */

struct mlp_bufs {
    int n;
    int64_t H, I;
    enum layout lay;
    size_t es;
    struct pair gu, dn;  /* L3D / LT3D: [n, 2I, H] or [n, H, 2I]; down [n, H, I] or [n, I, H] */
    struct pair g, u, d; /* LLIST: host contiguous [n, I, H] etc. */
    void **dev_g, **dev_u, **dev_d; /* LLIST: one device allocation per expert */
    void **hp_g, **hp_u, **hp_d;    /* LLIST: host pointer arrays (for the CPU) */
    void **dp_g, **dp_u, **dp_d;    /* LLIST: device arrays of device pointers (for the GPU) */
    struct moe_mlp cpu, gpu;
};

static void **dev_ptr_array(void **src, int n)
{
    void **d;
    CK(cudaMalloc((void **)&d, sizeof(void *) * (size_t)n));
    CK(cudaMemcpy(d, src, sizeof(void *) * (size_t)n, cudaMemcpyHostToDevice));
    return d;
}

static void list_part(struct mlp_bufs *m, struct pair *p, int64_t R, int64_t C, void ***dev,
                      void ***hp, void ***dp, struct moe_mats *cpu, struct moe_mats *gpu)
{
    size_t one = (size_t)(R * C) * m->es;
    *p = pair_new(one * (size_t)m->n);
    *dev = calloc((size_t)m->n, sizeof(void *));
    *hp = calloc((size_t)m->n, sizeof(void *));
    for (int e = 0; e < m->n; e++) {
        CK(cudaMalloc(&(*dev)[e], one));
        (*hp)[e] = (char *)p->h + one * (size_t)e;
    }
    *dp = dev_ptr_array(*dev, m->n);
    struct moe_mats c = {(void *const *)*hp, NULL, 0, C, 1};
    struct moe_mats g = {(void *const *)*dp, NULL, 0, C, 1};
    *cpu = c;
    *gpu = g;
}

static void mlp_new(struct mlp_bufs *m, int n, int64_t H, int64_t I, enum layout lay, moe_dtype dt)
{
    memset(m, 0, sizeof *m);
    m->n = n;
    m->H = H;
    m->I = I;
    m->lay = lay;
    m->es = moe_dtype_size(dt);
    struct moe_mlp c = {n, H, I, {0}, {0}, {0}}, g = c;
    if (lay == LLIST) {
        list_part(m, &m->g, I, H, &m->dev_g, &m->hp_g, &m->dp_g, &c.gate, &g.gate);
        list_part(m, &m->u, I, H, &m->dev_u, &m->hp_u, &m->dp_u, &c.up, &g.up);
        list_part(m, &m->d, H, I, &m->dev_d, &m->hp_d, &m->dp_d, &c.down, &g.down);
    } else {
        m->gu = pair_new((size_t)(n * 2 * I * H) * m->es);
        m->dn = pair_new((size_t)(n * H * I) * m->es);
        char *gh = m->gu.h, *gd = m->gu.d, *dh = m->dn.h, *dd = m->dn.d;
        size_t up_off = lay == L3D ? (size_t)(I * H) * m->es : (size_t)I * m->es;
        /* gate/up (i, h): L3D at i*H + h (+ I*H for up); LT3D at h*2I + i (+ I for up) */
        struct moe_mats gate = {NULL, NULL, 2 * I * H, lay == L3D ? H : 1, lay == L3D ? 1 : 2 * I};
        /* down (h, i): L3D at h*I + i; LT3D at i*H + h */
        struct moe_mats down = {NULL, NULL, H * I, lay == L3D ? I : 1, lay == L3D ? 1 : H};
        c.gate = g.gate = c.up = g.up = gate;
        c.down = g.down = down;
        c.gate.base = gh;
        c.up.base = gh + up_off;
        g.gate.base = gd;
        g.up.base = gd + up_off;
        c.down.base = dh;
        g.down.base = dd;
    }
    m->cpu = c;
    m->gpu = g;
}

/* Host -> device (weights). */
static void mlp_upload(struct mlp_bufs *m)
{
    if (m->lay != LLIST) {
        pair_up(&m->gu);
        pair_up(&m->dn);
        return;
    }
    struct pair *p[3] = {&m->g, &m->u, &m->d};
    void **dev[3] = {m->dev_g, m->dev_u, m->dev_d};
    for (int j = 0; j < 3; j++) {
        size_t one = p[j]->bytes / (size_t)m->n;
        for (int e = 0; e < m->n; e++)
            CK(cudaMemcpy(dev[j][e], (char *)p[j]->h + one * (size_t)e, one,
                          cudaMemcpyHostToDevice));
    }
}

/* Device -> host buffer dst laid out as the host copy (grads). */
static void mlp_download(struct mlp_bufs *m, int j, void *dst)
{
    if (m->lay != LLIST) {
        struct pair *p = j == 0 ? &m->gu : &m->dn;
        CK(cudaMemcpy(dst, p->d, p->bytes, cudaMemcpyDeviceToHost));
        return;
    }
    struct pair *p = j == 0 ? &m->g : j == 1 ? &m->u : &m->d;
    void **dev = j == 0 ? m->dev_g : j == 1 ? m->dev_u : m->dev_d;
    size_t one = p->bytes / (size_t)m->n;
    for (int e = 0; e < m->n; e++)
        CK(cudaMemcpy((char *)dst + one * (size_t)e, dev[e], one, cudaMemcpyDeviceToHost));
}

static void mlp_poison(struct mlp_bufs *m)
{
    if (m->lay != LLIST) {
        CK(cudaMemset(m->gu.d, 0xff, m->gu.bytes));
        CK(cudaMemset(m->dn.d, 0xff, m->dn.bytes));
        return;
    }
    struct pair *p[3] = {&m->g, &m->u, &m->d};
    void **dev[3] = {m->dev_g, m->dev_u, m->dev_d};
    for (int j = 0; j < 3; j++)
        for (int e = 0; e < m->n; e++)
            CK(cudaMemset(dev[j][e], 0xff, p[j]->bytes / (size_t)m->n));
}

static int mlp_nbuf(const struct mlp_bufs *m)
{
    return m->lay == LLIST ? 3 : 2;
}

static struct pair *mlp_buf(struct mlp_bufs *m, int j)
{
    if (m->lay == LLIST)
        return j == 0 ? &m->g : j == 1 ? &m->u : &m->d;
    return j == 0 ? &m->gu : &m->dn;
}

static void mlp_free(struct mlp_bufs *m)
{
    if (m->lay != LLIST) {
        pair_free(&m->gu);
        pair_free(&m->dn);
        return;
    }
    struct pair *p[3] = {&m->g, &m->u, &m->d};
    void **dev[3] = {m->dev_g, m->dev_u, m->dev_d};
    void **hp[3] = {m->hp_g, m->hp_u, m->hp_d};
    void **dp[3] = {m->dp_g, m->dp_u, m->dp_d};
    for (int j = 0; j < 3; j++) {
        for (int e = 0; e < m->n; e++)
            cudaFree(dev[j][e]);
        free(dev[j]);
        free(hp[j]);
        cudaFree(dp[j]);
        pair_free(p[j]);
    }
}

/* ---- comparison ---- */

static double worst[3]; /* per dtype, over the whole run of one test process */

static double rel_err(moe_dtype dt, const void *got, const void *ref, size_t n)
{
    double *g = malloc(sizeof(double) * (n ? n : 1)), *r = malloc(sizeof(double) * (n ? n : 1));
    cr_assert(g && r);
    for (size_t i = 0; i < n; i++) {
        g[i] = elem(dt, got, i);
        r[i] = elem(dt, ref, i);
    }
    double e = moe_rel_err(g, r, n);
    free(g);
    free(r);
    return e;
}

static void expect_close(const struct tcase *c, const char *what, moe_dtype dt, const void *got,
                         const void *ref, size_t n)
{
    double e = rel_err(dt, got, ref, n);
    double tol = moe_tol(c->dt);
    if (e > worst[c->dt])
        worst[c->dt] = e;
    fprintf(stderr, "  %-28s %-14s rel %.3g\n", c->name, what, e);
    cr_expect(e <= tol, "%s: %s rel err %g > %g", c->name, what, e, tol);
}

/* ---- the case ---- */

struct gpu_out { /* everything the GPU writes, downloaded */
    void *y, *dx, *dsg;
    int32_t *idx;
    float *w, *dlogits, *logits;
    int64_t *idx64;
    void *dexp[3], *dsh[3];
};

/* The backward's outputs of run o against the CPU's (dsh_g, dsh_c NULL: no shared expert). */
static void expect_grads_close(const struct tcase *c, const struct gpu_out *o, const void *dx_c,
                               const float *dl_c, const void *dsg_c, struct mlp_bufs *dex_g,
                               struct mlp_bufs *dex_c, struct mlp_bufs *dsh_g,
                               struct mlp_bufs *dsh_c)
{
    const moe_dtype dt = c->dt;
    const size_t es = moe_dtype_size(dt);
    expect_close(c, "dx", dt, o->dx, dx_c, (size_t)(c->T * c->H));
    expect_close(c, "dlogits", MOE_F32, o->dlogits, dl_c, (size_t)(c->T * c->E));
    static const char *names3d[] = {"d_gate_up", "d_down"},
                      *names_list[] = {"d_gate", "d_up", "d_down"};
    for (int j = 0; j < mlp_nbuf(dex_g); j++)
        expect_close(c, c->lay == LLIST ? names_list[j] : names3d[j], dt, o->dexp[j],
                     mlp_buf(dex_c, j)->h, mlp_buf(dex_c, j)->bytes / es);
    for (int j = 0; dsh_g && j < mlp_nbuf(dsh_g); j++)
        expect_close(c, c->lay == LLIST ? "shared d_gate.." : "shared d_*", dt, o->dsh[j],
                     mlp_buf(dsh_c, j)->h, mlp_buf(dsh_c, j)->bytes / es);
    if (c->gated)
        expect_close(c, "d_shared_gate", dt, o->dsg, dsg_c, (size_t)c->H);
}

/* The GPU's own logits: the CPU's bits (moe_router_logits_cpu's order), and within the fp32
   tolerance of float64 sums of x [T, H] (row stride xrs) · w [E, H]ᵀ (row stride wrs). */
static void expect_router_logits(const struct tcase *c, const float *got, const float *cpu,
                                 const void *x, int64_t xrs, const void *w, int64_t wrs)
{
    const int64_t T = c->T, E = c->E, H = c->H;
    int differ = 0;
    double err = 0.0, scale = 0.0;
    for (int64_t t = 0; t < T; t++)
        for (int64_t e = 0; e < E; e++) {
            double ref = 0.0;
            for (int64_t h = 0; h < H; h++)
                ref +=
                    elem(c->dt, x, (size_t)(t * xrs + h)) * elem(c->dt, w, (size_t)(e * wrs + h));
            const float g = got[t * E + e];
            differ += memcmp(&g, &cpu[t * E + e], sizeof g) != 0;
            err = fmax(err, isnan(g) ? INFINITY : fabs(g - ref));
            scale = fmax(scale, fabs(ref));
        }
    fprintf(stderr, "  %-28s %-14s rel %.3g\n", c->name, "logits", err / scale);
    cr_expect_eq(differ, 0, "%s: %d router logits differ from the CPU's", c->name, differ);
    cr_expect(err <= MOE_TOL_F32 * scale, "%s: router logits rel err %g", c->name, err / scale);
}

/* engine: moe_problem.engine of the GPU side (the Hopper engine where it tiles the shapes).
   infer: moe_problem.infer, a forward with no backward after it (only y, idx and w are checked);
   path: what moe_forward_path_cuda must answer, or NULL. ldt: the GPU's logits dtype (bf16/fp16
   with infer only), the CPU gets their exact fp32 values. router (infer only): both sides make
   the logits from router weights (moe_problem.router_w), which must be the same bits, and close
   to float64 sums. */
static void run_case_mode(const struct tcase *c, int engine, int infer, const char *path,
                          moe_dtype ldt, int router)
{
    need_gpu();
    rng_state = 0x9e3779b97f4a7c15ull ^ (uint64_t)(c->T * 1315423911u + c->E * 2654435761u +
                                                   (uint64_t)c->H * 97 + (uint64_t)c->dt);
    const moe_dtype dt = c->dt;
    const size_t es = moe_dtype_size(dt);
    const int64_t T = c->T, H = c->H, E = c->E, K = c->K, xrs = c->H + c->x_pad;
    const int shared = c->Is > 0;

    /* K = 1 with renormalisation makes w ≡ scale and dlogits pure rounding noise: norm only if K >
     * 1 */
    struct moe_route_cfg rc = {c->recipe, c->E, c->K, c->n_group, c->topk_group,
                               c->K > 1,  0.0f, 1.0f, -INFINITY};
    if (c->recipe == MOE_ROUTE_SIGMOID_GROUP) {
        rc.norm_eps = 1e-20f;
        rc.scale = 2.5f;
        rc.mask_value = c->n_group > 1 ? -INFINITY : 0.0f;
    }

    /* inputs */
    struct pair x = pair_new((size_t)(T * xrs) * es), dy = pair_new((size_t)(T * H) * es);
    struct pair lg = pair_new(sizeof(float) * (size_t)(T * E)), bias = pair_new(sizeof(float) * E);
    struct pair sg = pair_new((size_t)H * es);
    fill(dt, x.h, (size_t)(T * xrs), 1.0f);
    fill(dt, dy.h, (size_t)(T * H), 1.0f);
    fill(dt, sg.h, (size_t)H, 1.0f / sqrtf((float)H));
    float *l = lg.h;
    for (int64_t i = 0; i < T * E; i++)
        l[i] = (c->ties ? roundf(urand() * 8.0f) / 4.0f : urand() * 3.0f) +
               c->skew * (float)(i % E) / (float)E;
    if (c->empty)
        for (int64_t t = 0; t < T; t++)
            l[t * E + 1] = -30.0f;
    float *b = bias.h;
    for (int e = 0; e < E; e++)
        b[e] = c->ties ? 0.0f : urand() * 0.1f;
    if (c->empty)
        b[1] = -1.0f;
    pair_up(&x);
    pair_up(&dy);
    /* narrow logits: the CPU gets their exact fp32 values, the GPU the narrow ones */
    struct pair lgn = pair_new(moe_dtype_size(ldt) * (size_t)(T * E));
    for (int64_t i = 0; i < T * E; i++) {
        set_elem(ldt, lgn.h, (size_t)i, l[i]);
        l[i] = (float)elem(ldt, lgn.h, (size_t)i);
    }
    pair_up(&lg);
    pair_up(&lgn);
    /* the router's weights [E, H] with padded rows, and where each side writes the logits */
    const int64_t rrs = H + 3;
    struct pair rw = pair_new((size_t)(E * rrs) * es),
                lo = pair_new(sizeof(float) * (size_t)(T * E));
    if (router) { /* only then: the other cases keep their random numbers */
        fill(dt, rw.h, (size_t)(E * rrs), 2.0f / sqrtf((float)H));
        pair_up(&rw);
    }
    /* router cases: the GPU reads the bias in the block's dtype (moe_problem.bias_dtype), the CPU
       its exact fp32 values, and the GPU writes idx as int64 too */
    struct pair biasn = pair_new(es * (size_t)E), idx64 = pair_new(8 * (size_t)(T * K));
    for (int e = 0; router && e < E; e++) {
        set_elem(dt, biasn.h, (size_t)e, b[e]);
        b[e] = (float)elem(dt, biasn.h, (size_t)e);
    }
    pair_up(&biasn);
    pair_up(&bias);
    pair_up(&sg);

    /* weights: same bytes on both sides */
    struct mlp_bufs ex, sh, dex_c, dsh_c, dex_g, dsh_g;
    mlp_new(&ex, c->E, H, c->I, c->lay, dt);
    for (int j = 0; j < mlp_nbuf(&ex); j++)
        fill(dt, mlp_buf(&ex, j)->h, mlp_buf(&ex, j)->bytes / es, 1.0f / sqrtf((float)H));
    mlp_upload(&ex);
    /* grads: CPU writes its host copy of dex_c, GPU writes the device copy of dex_g */
    mlp_new(&dex_c, c->E, H, c->I, c->lay, dt);
    mlp_new(&dex_g, c->E, H, c->I, c->lay, dt);
    if (shared) {
        enum layout sl = c->lay == LLIST ? LLIST : L3D;
        mlp_new(&sh, 1, H, c->Is, sl, dt);
        for (int j = 0; j < mlp_nbuf(&sh); j++)
            fill(dt, mlp_buf(&sh, j)->h, mlp_buf(&sh, j)->bytes / es, 1.0f / sqrtf((float)H));
        mlp_upload(&sh);
        mlp_new(&dsh_c, 1, H, c->Is, sl, dt);
        mlp_new(&dsh_g, 1, H, c->Is, sl, dt);
    }

    /* CPU reference */
    struct moe_problem pc;
    memset(&pc, 0, sizeof pc);
    pc.route = rc;
    pc.dtype = dt;
    pc.T = T;
    pc.H = H;
    pc.x = x.h;
    pc.x_rs = xrs;
    pc.logits = router ? NULL : lg.h;
    pc.router_w = router ? rw.h : NULL;
    pc.router_w_rs = rrs;
    pc.logits_out = router ? lo.h : NULL;
    pc.bias = bias.h; /* both recipes: softmax selection is biased too (aux-free) */
    pc.experts = ex.cpu;
    pc.shared = shared ? sh.cpu : (struct moe_mlp){0};
    pc.shared_gate = c->gated ? sg.h : NULL;
    void *y_c = calloc((size_t)(T * H) * es + 1, 1), *dx_c = calloc((size_t)(T * H) * es + 1, 1);
    int32_t *idx_c = calloc((size_t)(T * K) + 1, 4);
    float *w_c = calloc((size_t)(T * K) + 1, 4), *dl_c = calloc((size_t)(T * E) + 1, 4);
    void *dsg_c = calloc((size_t)H * es, 1);
    pc.y = y_c;
    pc.idx = idx_c;
    pc.w = w_c;
    pc.dy = dy.h;
    pc.dx = dx_c;
    pc.dlogits = dl_c;
    pc.d_experts = dex_c.cpu;
    pc.d_shared = shared ? dsh_c.cpu : (struct moe_mlp){0};
    pc.d_shared_gate = c->gated ? dsg_c : NULL;
    cr_assert_eq(moe_forward_cpu(&pc), MOE_OK, "%s: cpu forward", c->name);
    if (!infer) /* nothing of a backward is compared after a no-grad forward */
        cr_assert_eq(moe_backward_cpu(&pc), MOE_OK, "%s: cpu backward", c->name);

    /* GPU */
    struct moe_problem pg = pc;
    pg.engine = engine;
    pg.infer = infer;
    /* the engine runs these shapes on sm_90 only; elsewhere the flag falls back to cuBLAS. Both
       passes need I and H multiples of 256; with I an odd multiple of 128 only the forward runs
       there (SwiGLU fused into gate|up), the backward on cuBLAS, from host counts. */
    int major = 0;
    CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, 0));
    const int on_engine = engine && major == 9 && c->I % 256 == 0 && c->H % 256 == 0;
    const int decode = !strncmp(moe_forward_path_cuda(&pg), "decode", 6);
    if (path)
        cr_expect_str_eq(moe_forward_path_cuda(&pg), path, "%s: forward path", c->name);
    struct pair y = pair_new((size_t)(T * H) * es), dx = pair_new((size_t)(T * H) * es);
    struct pair idx = pair_new(4 * (size_t)(T * K)), w = pair_new(4 * (size_t)(T * K));
    struct pair dl = pair_new(4 * (size_t)(T * E)), dsg = pair_new((size_t)H * es);
    cudaStream_t st;
    CK(cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking));
    pg.x = x.d;
    pg.logits = router ? NULL : ldt == MOE_F32 ? lg.d : lgn.d;
    pg.router_w = router ? rw.d : NULL;
    pg.logits_out = router ? lo.d : NULL;
    pg.logits_dtype = ldt;
    pg.bias = pc.bias ? (router ? biasn.d : bias.d) : NULL;
    pg.bias_dtype = router ? dt : MOE_F32;
    pg.idx64 = router ? idx64.d : NULL;
    pg.experts = ex.gpu;
    pg.shared = shared ? sh.gpu : (struct moe_mlp){0};
    pg.shared_gate = c->gated ? sg.d : NULL;
    pg.y = y.d;
    pg.idx = idx.d;
    pg.w = w.d;
    pg.dy = dy.d;
    pg.dx = dx.d;
    pg.dlogits = dl.d;
    pg.d_experts = dex_g.gpu;
    pg.d_shared = shared ? dsh_g.gpu : (struct moe_mlp){0};
    pg.d_shared_gate = c->gated ? dsg.d : NULL;
    pg.stream = st;
    int64_t *counts = calloc((size_t)E, sizeof(int64_t));
    pg.counts_host = counts;
    size_t sb = moe_saved_bytes_cuda(&pg), wf = moe_workspace_bytes_cuda(&pg, 0),
           wb = moe_workspace_bytes_cuda(&pg, 1), wsb = wf > wb ? wf : wb;
    CK(cudaMalloc(&pg.saved, sb ? sb : 1));
    CK(cudaMalloc(&pg.workspace, wsb ? wsb : 1));
    pg.workspace_bytes = wsb;

    struct gpu_out run[2];
    memset(run, 0, sizeof run);
    for (int r = 0; r < 2; r++) {
        struct pair *outs[] = {&y, &dx, &idx, &w, &dl, &dsg, &lo, &idx64};
        for (size_t j = 0; j < sizeof outs / sizeof *outs; j++)
            CK(cudaMemset(outs[j]->d, 0xff, outs[j]->bytes));
        CK(cudaMemset(pg.saved, 0xff, sb ? sb : 1));
        CK(cudaMemset(pg.workspace, 0xff, wsb ? wsb : 1));
        mlp_poison(&dex_g);
        if (shared)
            mlp_poison(&dsh_g);
        /* cudaMemset runs on the legacy stream, which does not order against a non-blocking one */
        CK(cudaDeviceSynchronize());
        if ((on_engine || decode) && r == 1) {
            /* the engine path never waits on the host: the whole forward and backward capture into
               one CUDA graph, whose replay must give the eager run's bits (checked below) */
            cudaGraph_t graph;
            cudaGraphExec_t exec;
            CK(cudaStreamBeginCapture(st, cudaStreamCaptureModeThreadLocal));
            int rf = moe_forward_cuda(&pg),
                rb = rf == MOE_OK && !infer ? moe_backward_cuda(&pg) : rf;
            cudaError_t ce = cudaStreamEndCapture(st, &graph);
            cr_assert_eq(rf, MOE_OK, "%s: captured forward: %s", c->name, moe_last_error_cuda());
            cr_assert_eq(rb, MOE_OK, "%s: captured backward: %s", c->name, moe_last_error_cuda());
            cr_assert_eq(ce, cudaSuccess, "%s: capture: %s", c->name, cudaGetErrorString(ce));
            CK(cudaGraphInstantiate(&exec, graph, 0));
            CK(cudaGraphLaunch(exec, st));
            CK(cudaStreamSynchronize(st));
            CK(cudaGraphExecDestroy(exec));
            CK(cudaGraphDestroy(graph));
        } else {
            int rf = moe_forward_cuda(&pg);
            cr_assert_eq(rf, MOE_OK, "%s: cuda forward: %s", c->name, moe_last_error_cuda());
            int rb = infer ? MOE_OK : moe_backward_cuda(&pg);
            cr_assert_eq(rb, MOE_OK, "%s: cuda backward: %s", c->name, moe_last_error_cuda());
            CK(cudaStreamSynchronize(st));
        }
        struct gpu_out *o = &run[r];
        o->y = malloc(y.bytes + 1);
        o->dx = malloc(dx.bytes + 1);
        o->idx = malloc(idx.bytes + 1);
        o->w = malloc(w.bytes + 1);
        o->dlogits = malloc(dl.bytes + 1);
        o->dsg = malloc(dsg.bytes + 1);
        o->logits = malloc(lo.bytes + 1);
        CK(cudaMemcpy(o->logits, lo.d, lo.bytes, cudaMemcpyDeviceToHost));
        o->idx64 = malloc(idx64.bytes + 1);
        CK(cudaMemcpy(o->idx64, idx64.d, idx64.bytes, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(o->y, y.d, y.bytes, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(o->dx, dx.d, dx.bytes, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(o->idx, idx.d, idx.bytes, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(o->w, w.d, w.bytes, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(o->dlogits, dl.d, dl.bytes, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(o->dsg, dsg.d, dsg.bytes, cudaMemcpyDeviceToHost));
        for (int j = 0; j < mlp_nbuf(&dex_g); j++) {
            o->dexp[j] = malloc(mlp_buf(&dex_g, j)->bytes);
            mlp_download(&dex_g, j, o->dexp[j]);
        }
        for (int j = 0; shared && j < mlp_nbuf(&dsh_g); j++) {
            o->dsh[j] = malloc(mlp_buf(&dsh_g, j)->bytes);
            mlp_download(&dsh_g, j, o->dsh[j]);
        }
    }

    /* the per-expert counts the cuBLAS path leaves on the host; the engine path never waits on the
       host, so its buffer stays as it was (zeros) */
    int64_t total = 0;
    for (int e = 0; e < E; e++)
        total += counts[e];
    const int host_counts = !on_engine && !decode && !infer;
    if (!infer || decode)
        cr_expect_eq(total, host_counts ? T * K : 0, "%s: host counts sum %lld", c->name,
                     (long long)total);
    if (c->empty && T > 0 && host_counts)
        cr_expect_eq(counts[1], 0, "%s: expert 1 should get no token", c->name);

    /* against the CPU */
    struct gpu_out *o = &run[0];
    int idx_bad = 0;
    for (int64_t i = 0; i < T * K; i++)
        idx_bad += o->idx[i] != idx_c[i];
    cr_expect_eq(idx_bad, 0, "%s: %d routing choices differ", c->name, idx_bad);
    int idx64_bad = 0;
    for (int64_t i = 0; router && i < T * K; i++)
        idx64_bad += o->idx64[i] != o->idx[i];
    cr_expect_eq(idx64_bad, 0, "%s: %d of idx64 differ from idx", c->name, idx64_bad);
    if (router)
        expect_router_logits(c, o->logits, lo.h, x.h, xrs, rw.h, rrs);
    expect_close(c, "y", dt, o->y, y_c, (size_t)(T * H));
    expect_close(c, "w", MOE_F32, o->w, w_c, (size_t)(T * K));
    if (!infer) /* else no backward ran: its outputs are still the poison */
        expect_grads_close(c, o, dx_c, dl_c, dsg_c, &dex_g, &dex_c, shared ? &dsh_g : NULL,
                           shared ? &dsh_c : NULL);

    /* determinism: the second run gives the same bits */
    struct gpu_out *o2 = &run[1];
    int same = !memcmp(o->y, o2->y, y.bytes) && !memcmp(o->idx, o2->idx, idx.bytes) &&
               !memcmp(o->w, o2->w, w.bytes) &&
               (!router || !memcmp(o->logits, o2->logits, lo.bytes));
    if (!infer) {
        same &= !memcmp(o->dx, o2->dx, dx.bytes) && !memcmp(o->dlogits, o2->dlogits, dl.bytes) &&
                (!c->gated || !memcmp(o->dsg, o2->dsg, dsg.bytes));
        for (int j = 0; j < mlp_nbuf(&dex_g); j++)
            same &= !memcmp(o->dexp[j], o2->dexp[j], mlp_buf(&dex_g, j)->bytes);
        for (int j = 0; shared && j < mlp_nbuf(&dsh_g); j++)
            same &= !memcmp(o->dsh[j], o2->dsh[j], mlp_buf(&dsh_g, j)->bytes);
    }
    cr_expect(same, "%s: %s", c->name,
              on_engine || decode ? "the CUDA-graph replay differs from the eager run"
                                  : "two GPU runs differ");

    fprintf(stderr, "  %-28s worst rel: f32 %.3g bf16 %.3g f16 %.3g\n", c->name, worst[0], worst[1],
            worst[2]);
    for (int r = 0; r < 2; r++) {
        free(run[r].y);
        free(run[r].dx);
        free(run[r].idx);
        free(run[r].w);
        free(run[r].dlogits);
        free(run[r].dsg);
        free(run[r].logits);
        free(run[r].idx64);
        for (int j = 0; j < 3; j++) {
            free(run[r].dexp[j]);
            free(run[r].dsh[j]);
        }
    }
    cudaFree(pg.saved);
    cudaFree(pg.workspace);
    cudaStreamDestroy(st);
    free(counts);
    free(y_c);
    free(dx_c);
    free(idx_c);
    free(w_c);
    free(dl_c);
    free(dsg_c);
    struct pair *ps[] = {&x,   &dy, &lg, &lgn, &bias, &sg, &y,     &dx,
                         &idx, &w,  &dl, &dsg, &rw,   &lo, &biasn, &idx64};
    for (size_t j = 0; j < sizeof ps / sizeof *ps; j++)
        pair_free(ps[j]);
    mlp_free(&ex);
    mlp_free(&dex_c);
    mlp_free(&dex_g);
    if (shared) {
        mlp_free(&sh);
        mlp_free(&dsh_c);
        mlp_free(&dsh_g);
    }
}

static void run_case_on(const struct tcase *c, int engine)
{
    run_case_mode(c, engine, 0, NULL, MOE_F32, 0);
}

static void run_case(const struct tcase *c)
{
    run_case_on(c, 0);
}

#define SOFTMAX MOE_ROUTE_SOFTMAX_TOPK
#define SIGMOID MOE_ROUTE_SIGMOID_GROUP

/*                      name, dtype, T, H, I, Is, E, K, recipe, n_group, topk_group, gated, layout,
                        empty, ties, x_pad */
Test(cuda_kernels, softmax_topk_fp32_matches_cpu)
{
    run_case(&(struct tcase){"softmax fp32", MOE_F32, 7, 64, 32, 0, 12, 2, SOFTMAX, 1, 1, 0, L3D, 0,
                             0, 0, 0.0f});
}

Test(cuda_kernels, softmax_topk_bf16_matches_cpu)
{
    run_case(&(struct tcase){"softmax bf16", MOE_BF16, 7, 64, 32, 0, 12, 2, SOFTMAX, 1, 1, 0, L3D,
                             0, 0, 0, 0.0f});
}

Test(cuda_kernels, fp16_matches_cpu)
{
    run_case(&(struct tcase){"softmax fp16", MOE_F16, 33, 64, 48, 0, 10, 3, SOFTMAX, 1, 1, 0, L3D,
                             0, 0, 0, 0.0f});
}

Test(cuda_kernels, one_token_matches_cpu)
{
    run_case(
        &(struct tcase){"T=1", MOE_F32, 1, 64, 32, 32, 6, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, top1_routing_matches_cpu)
{
    run_case(
        &(struct tcase){"K=1", MOE_F32, 29, 64, 32, 0, 5, 1, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, zero_tokens_write_zero_weight_grads)
{
    run_case(
        &(struct tcase){"T=0", MOE_F32, 0, 64, 32, 32, 6, 2, SOFTMAX, 1, 1, 1, L3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, expert_without_tokens_gets_zero_grads)
{
    run_case(&(struct tcase){"empty expert", MOE_F32, 40, 64, 32, 0, 9, 2, SOFTMAX, 1, 1, 0, L3D, 1,
                             0, 0, 0.0f});
}

Test(cuda_kernels, sigmoid_group_limited_fp32_matches_cpu)
{
    run_case(&(struct tcase){"sigmoid groups fp32", MOE_F32, 50, 64, 32, 64, 24, 4, SIGMOID, 6, 3,
                             0, L3D, 1, 0, 0, 0.0f});
}

Test(cuda_kernels, sigmoid_group_limited_bf16_matches_cpu)
{
    run_case(&(struct tcase){"sigmoid groups bf16", MOE_BF16, 50, 64, 32, 64, 24, 4, SIGMOID, 6, 3,
                             0, L3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, sigmoid_without_groups_matches_cpu)
{
    run_case(&(struct tcase){"sigmoid no groups", MOE_F32, 21, 64, 32, 0, 11, 3, SIGMOID, 1, 1, 0,
                             L3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, ties_go_to_the_lower_index)
{
    run_case(&(struct tcase){"ties softmax", MOE_F32, 64, 64, 32, 0, 16, 4, SOFTMAX, 1, 1, 0, L3D,
                             0, 1, 0, 0.0f});
    run_case(&(struct tcase){"ties sigmoid groups", MOE_F32, 64, 64, 32, 0, 16, 4, SIGMOID, 4, 2, 0,
                             L3D, 0, 1, 0, 0.0f});
}

/* Routing shapes that earlier cases miss: the group limit on groups of 32, 64, 96 and 128 experts
   (Ring's and DeepSeek-V3's 8 groups of 32 among them), ties among them, E > 512 (top-K by
   repeated warp arg-max instead of in registers), a decode call. The routing must be the CPU's
   bit for bit. */
Test(cuda_kernels, routing_paths_match_cpu, .timeout = 60)
{
    run_case(&(struct tcase){"groups of 32 fp32", MOE_F32, 40, 64, 32, 0, 256, 8, SIGMOID, 8, 4, 0,
                             L3D, 0, 0, 0, 0.0f});
    run_case(&(struct tcase){"groups of 128 ties", MOE_F32, 33, 64, 32, 0, 512, 8, SIGMOID, 4, 2, 0,
                             L3D, 0, 1, 0, 0.0f});
    run_case(&(struct tcase){"groups of 96 bf16", MOE_BF16, 17, 64, 32, 0, 384, 6, SIGMOID, 4, 3, 0,
                             L3D, 0, 0, 0, 0.0f});
    run_case(&(struct tcase){"E=600 softmax", MOE_F32, 5, 64, 32, 0, 600, 4, SOFTMAX, 1, 1, 0, L3D,
                             0, 0, 0, 0.0f});
    run_case_mode(&(struct tcase){"groups of 64 decode ties", MOE_BF16, 8, 64, 32, 0, 128, 4,
                                  SIGMOID, 2, 1, 0, L3D, 0, 1, 0, 0.0f},
                  1, 1, "decode", MOE_F32, 0);
}

Test(cuda_kernels, modulelist_pointer_arrays_match_cpu)
{
    run_case(&(struct tcase){"modulelist fp32", MOE_F32, 31, 64, 32, 48, 7, 2, SIGMOID, 1, 1, 0,
                             LLIST, 1, 0, 0, 0.0f});
    run_case(&(struct tcase){"modulelist bf16", MOE_BF16, 31, 64, 32, 48, 7, 2, SOFTMAX, 1, 1, 1,
                             LLIST, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, transposed_3d_layout_matches_cpu)
{
    run_case(&(struct tcase){"transposed 3-D fp32", MOE_F32, 23, 64, 32, 0, 6, 2, SOFTMAX, 1, 1, 0,
                             LT3D, 1, 0, 0, 0.0f});
    run_case(&(struct tcase){"transposed 3-D bf16", MOE_BF16, 23, 64, 32, 0, 6, 2, SOFTMAX, 1, 1, 0,
                             LT3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, gated_shared_expert_matches_cpu)
{
    run_case(&(struct tcase){"qwen2 gated shared fp32", MOE_F32, 19, 64, 32, 96, 8, 2, SOFTMAX, 1,
                             1, 1, L3D, 0, 0, 0, 0.0f});
    run_case(&(struct tcase){"qwen2 gated shared bf16", MOE_BF16, 19, 64, 32, 96, 8, 2, SOFTMAX, 1,
                             1, 1, L3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, strided_x_rows_match_cpu)
{
    run_case(&(struct tcase){"x row stride", MOE_F32, 17, 64, 32, 32, 6, 2, SOFTMAX, 1, 1, 1, L3D,
                             0, 0, 8, 0.0f});
}

/* Widths that are no multiple of 8 bf16 elements: the elementwise kernels (SwiGLU, its backward,
   the combines) take their one-element path instead of 16-byte vectors. */
Test(cuda_kernels, odd_widths_match_cpu)
{
    run_case(&(struct tcase){"odd widths bf16", MOE_BF16, 29, 68, 36, 20, 8, 2, SOFTMAX, 1, 1, 0,
                             L3D, 0, 0, 0, 0.0f});
}

Test(cuda_kernels, large_batch_matches_cpu, .timeout = 300)
{
    if (getenv("MOE_TEST_SMALL")) /* under compute-sanitizer: the small cases cover every kernel */
        cr_skip_test("MOE_TEST_SMALL is set");
    run_case(&(struct tcase){"T=4096 fp32", MOE_F32, 4096, 128, 64, 64, 60, 4, SIGMOID, 4, 2, 0,
                             L3D, 1, 0, 0, 0.0f});
    run_case(&(struct tcase){"T=4096 bf16", MOE_BF16, 4096, 128, 64, 0, 60, 4, SOFTMAX, 1, 1, 0,
                             LLIST, 0, 0, 0, 0.0f});
}

/* Uneven loads: experts fall into several padded-count buckets of the backward's weight-grad GEMMs
   (granule 64 at R = 8192, E = 16; 16 at R = 3072, E = 24), one of them gets no token. */
Test(cuda_kernels, skewed_loads_match_cpu, .timeout = 120)
{
    run_case(&(struct tcase){"skewed bf16 list", MOE_BF16, 2048, 64, 32, 0, 16, 4, SOFTMAX, 1, 1, 0,
                             LLIST, 1, 0, 0, 6.0f});
    run_case(&(struct tcase){"skewed fp32 3-D", MOE_F32, 1024, 64, 32, 32, 24, 3, SIGMOID, 4, 2, 0,
                             L3D, 1, 0, 0, 4.0f});
    run_case(&(struct tcase){"skewed fp32 T3D", MOE_F32, 700, 64, 48, 0, 12, 2, SOFTMAX, 1, 1, 0,
                             LT3D, 0, 0, 0, 8.0f});
}

/* One token over many experts: K experts of one row each, the rest empty. */
Test(cuda_kernels, one_token_many_experts_match_cpu)
{
    run_case(&(struct tcase){"T=1 E=64 K=8", MOE_F32, 1, 64, 32, 0, 64, 8, SOFTMAX, 1, 1, 0, L3D, 0,
                             0, 0, 0.0f});
    run_case(&(struct tcase){"T=1 E=64 K=8 bf16", MOE_BF16, 1, 64, 32, 32, 64, 8, SIGMOID, 8, 4, 0,
                             LLIST, 0, 0, 0, 0.0f});
    /* K over the combine's batch of 8 rows: a full batch and a partial one */
    run_case(&(struct tcase){"T=5 E=32 K=11", MOE_F32, 5, 64, 32, 32, 32, 11, SOFTMAX, 1, 1, 0, L3D,
                             0, 0, 0, 0.0f});
}

/* A no-grad forward of few tokens (moe_problem.infer) runs the routed experts as GEMVs over the
   touched experts (kernels/cuda/decode_mlp.cu), on any GPU, a shared expert of the routed
   width in the same launches ("decode+shared"); the second run is a CUDA-graph replay. The rest
   take the other paths: weights not contiguous along the reduction (Llama-4's transposed layout),
   rows of no multiple of 16 bytes, more than 8 tokens, the engine flag off. Some read bf16/fp16
   logits as the router made them (moe_problem.logits_dtype). */
Test(cuda_kernels, decode_forward_matches_cpu, .timeout = 120)
{
    const struct {
        struct tcase c;
        int engine;
        const char *path;
        moe_dtype logits;
        int router; /* the forward makes the logits (moe_problem.router_w) */
    } cases[] = {
        {{"decode bf16 groups", MOE_BF16, 8, 256, 128, 0, 64, 8, SIGMOID, 8, 4, 0, L3D, 0, 0, 0,
          0.0f},
         1,
         "decode",
         MOE_BF16,
         0},
        {{"decode bf16 T=1 list shared", MOE_BF16, 1, 512, 256, 128, 32, 8, SOFTMAX, 1, 1, 0, LLIST,
          0, 0, 0, 0.0f},
         1,
         "decode",
         MOE_F32,
         0},
        /* 256 slots, the most one call takes: every planning thread owns a slot; skewed loads
           give some experts all 8 tokens and leave others untouched */
        {{"decode bf16 256 slots", MOE_BF16, 8, 128, 64, 0, 64, 32, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0,
          4.0f},
         1,
         "decode",
         MOE_BF16,
         0},
        /* every token on both experts: 8 rows each, all of one pass */
        {{"decode fp16 crowded", MOE_F16, 8, 128, 64, 0, 2, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0,
          0.0f},
         1,
         "decode",
         MOE_F16,
         0},
        /* fewer 16-byte vectors per row than lanes; a strided x */
        {{"decode fp32 narrow", MOE_F32, 5, 96, 40, 0, 12, 3, SOFTMAX, 1, 1, 0, L3D, 1, 0, 4, 0.0f},
         1,
         "decode",
         MOE_F32,
         0},
        /* long reductions (many 16-byte vectors per lane); down with 3 vectors a lane takes
           gemv_kernel, the others the wide down kernel */
        {{"decode fp32 split", MOE_F32, 1, 1024, 384, 0, 8, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0,
          0.0f},
         1,
         "decode",
         MOE_F32,
         0},
        {{"decode bf16 split", MOE_BF16, 1, 512, 512, 0, 8, 2, SIGMOID, 1, 1, 0, LLIST, 0, 0, 0,
          0.0f},
         1,
         "decode",
         MOE_BF16,
         0},
        {{"decode fp32 K=11", MOE_F32, 5, 64, 32, 32, 32, 11, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0, 0.0f},
         1,
         "decode+shared",
         MOE_F32,
         0},
        {{"decode bf16 gated shared", MOE_BF16, 3, 64, 32, 96, 8, 2, SOFTMAX, 1, 1, 1, L3D, 0, 0, 0,
          0.0f},
         1,
         "decode",
         MOE_F32,
         0},
        /* the shared expert as the GEMVs' last T slots (its width is the routed one): Ring's
           form (pointer arrays, sigmoid groups, wide down kernel), a gated one on gemv_kernel's
           down (fp32, 96 vectors a lane), and 256 routed slots, where it runs on its own */
        {{"decode bf16 joint shared", MOE_BF16, 8, 256, 128, 128, 32, 4, SIGMOID, 8, 4, 0, LLIST, 0,
          0, 0, 0.0f},
         1,
         "decode+shared",
         MOE_F32,
         0},
        {{"decode fp32 joint gated", MOE_F32, 5, 128, 384, 384, 16, 3, SOFTMAX, 1, 1, 1, L3D, 0, 0,
          0, 0.0f},
         1,
         "decode+shared",
         MOE_F32,
         0},
        {{"decode bf16 256 slots shared", MOE_BF16, 8, 128, 64, 64, 64, 32, SOFTMAX, 1, 1, 0, L3D,
          0, 0, 0, 0.0f},
         1,
         "decode",
         MOE_BF16,
         0},
        /* the forward makes the router's logits (moe_problem.router_w): Ring's form (16-byte
           rows, two chunks a lane, the shared expert joint); a row stride of no multiple of 16
           bytes and a partial chunk (element loads); more than 8 tokens (two passes) and E not a
           multiple of the block's 4 experts, off the decode path */
        {{"router bf16 joint shared", MOE_BF16, 8, 2048, 64, 64, 32, 4, SIGMOID, 8, 4, 0, LLIST, 0,
          0, 0, 0.0f},
         1,
         "decode+shared",
         MOE_F32,
         1},
        {{"router fp16 odd rows", MOE_F16, 5, 200, 40, 0, 12, 3, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0,
          0.0f},
         1,
         NULL,
         MOE_F32,
         1},
        {{"router fp32 T=13", MOE_F32, 13, 96, 40, 0, 14, 3, SOFTMAX, 1, 1, 0, L3D, 0, 0, 4, 0.0f},
         1,
         "cublas",
         MOE_F32,
         1},
        {{"decode ties", MOE_F32, 8, 64, 32, 0, 16, 4, SIGMOID, 4, 2, 0, LLIST, 0, 1, 0, 0.0f},
         1,
         "decode",
         MOE_F32,
         0},
        {{"decode transposed bf16", MOE_BF16, 4, 64, 32, 0, 6, 2, SOFTMAX, 1, 1, 0, LT3D, 0, 0, 0,
          0.0f},
         1,
         "cublas",
         MOE_BF16,
         0},
        {{"decode odd widths bf16", MOE_BF16, 6, 68, 36, 0, 8, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0,
          0.0f},
         1,
         "cublas",
         MOE_F32,
         0},
        {{"decode T=9", MOE_BF16, 9, 64, 32, 0, 8, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0, 0.0f},
         1,
         "cublas",
         MOE_F32,
         0},
        {{"decode engine off", MOE_BF16, 8, 64, 32, 0, 8, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0, 0.0f},
         0,
         "cublas",
         MOE_F32,
         0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        run_case_mode(&cases[i].c, cases[i].engine, 1, cases[i].path, cases[i].logits,
                      cases[i].router);
}

/* ---- the routing permutation alone (moe_permute_cuda vs moe_permute_cpu) ---- */

/* T*K slots routed by a fixed-seed generator: uniform over E, or (skew) mostly to the low experts,
   or (one) all but every 97th slot to expert E / 2. perm, counts and offsets must be the CPU's
   bits (the sort is stable: the order within an expert is the slots'), inv perm's inverse. */
static void check_permute(int64_t T, int K, int E, int skew, int one)
{
    const int64_t n = T * K;
    int32_t *idx = malloc(sizeof(int32_t) * (size_t)(n + 1)),
            *perm = malloc(sizeof(int32_t) * (size_t)(n + 1));
    int32_t *got = malloc(sizeof(int32_t) * (size_t)(n + 1)),
            *inv = malloc(sizeof(int32_t) * (size_t)(n + 1));
    int64_t *counts = malloc(sizeof(int64_t) * (size_t)E),
            *offsets = malloc(sizeof(int64_t) * (size_t)(E + 1));
    int64_t *gcounts = malloc(sizeof(int64_t) * (size_t)E),
            *goffsets = malloc(sizeof(int64_t) * (size_t)(E + 1));
    uint64_t r = 0x9e3779b97f4a7c15ull ^ (uint64_t)(n * 31 + E);
    for (int64_t s = 0; s < n; s++) {
        r = r * 6364136223846793005ull + 1442695040888963407ull;
        const uint32_t u = (uint32_t)(r >> 33);
        idx[s] = one ? (s % 97 ? E / 2 : (int32_t)(u % (uint32_t)E))
                     : (int32_t)(skew ? (u % (uint32_t)E) * (u % (uint32_t)E) / (uint32_t)E
                                      : u % (uint32_t)E);
    }
    cr_assert_eq(moe_permute_cpu(T, K, E, idx, counts, offsets, perm), MOE_OK);
    int32_t *didx, *dperm, *dinv;
    int64_t *dcounts, *doffsets;
    void *scratch;
    const size_t sb = moe_permute_scratch_bytes_cuda(T, K, E);
    CK(cudaMalloc((void **)&didx, sizeof(int32_t) * (size_t)(n + 1)));
    CK(cudaMalloc((void **)&dperm, sizeof(int32_t) * (size_t)(n + 1)));
    CK(cudaMalloc((void **)&dinv, sizeof(int32_t) * (size_t)(n + 1)));
    CK(cudaMalloc((void **)&dcounts, sizeof(int64_t) * (size_t)E));
    CK(cudaMalloc((void **)&doffsets, sizeof(int64_t) * (size_t)(E + 1)));
    CK(cudaMalloc(&scratch, sb + 1));
    CK(cudaMemcpy(didx, idx, sizeof(int32_t) * (size_t)n, cudaMemcpyHostToDevice));
    for (int rep = 0; rep < 2; rep++) {
        CK(cudaMemset(dperm, 0xff, sizeof(int32_t) * (size_t)(n + 1)));
        CK(cudaMemset(dinv, 0xff, sizeof(int32_t) * (size_t)(n + 1)));
        CK(cudaMemset(dcounts, 0xff, sizeof(int64_t) * (size_t)E));
        CK(cudaMemset(doffsets, 0xff, sizeof(int64_t) * (size_t)(E + 1)));
        CK(cudaMemset(scratch, 0xff, sb + 1));
        cr_assert_eq(moe_permute_cuda(T, K, E, didx, dcounts, doffsets, dperm, dinv, scratch, NULL),
                     MOE_OK, "T=%lld E=%d: %s", (long long)T, E, moe_last_error_cuda());
        CK(cudaDeviceSynchronize());
        CK(cudaMemcpy(got, dperm, sizeof(int32_t) * (size_t)n, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(inv, dinv, sizeof(int32_t) * (size_t)n, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(gcounts, dcounts, sizeof(int64_t) * (size_t)E, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(goffsets, doffsets, sizeof(int64_t) * (size_t)(E + 1),
                      cudaMemcpyDeviceToHost));
        cr_expect(memcmp(gcounts, counts, sizeof(int64_t) * (size_t)E) == 0,
                  "T=%lld K=%d E=%d: counts", (long long)T, K, E);
        cr_expect(memcmp(goffsets, offsets, sizeof(int64_t) * (size_t)(E + 1)) == 0,
                  "T=%lld K=%d E=%d: offsets", (long long)T, K, E);
        cr_expect(memcmp(got, perm, sizeof(int32_t) * (size_t)n) == 0, "T=%lld K=%d E=%d: perm",
                  (long long)T, K, E);
        int64_t bad = 0;
        for (int64_t q = 0; q < n; q++)
            bad += got[q] < 0 || got[q] >= n || inv[got[q]] != q;
        cr_expect_eq(bad, 0, "T=%lld K=%d E=%d: %lld rows where inv is not perm's inverse",
                     (long long)T, K, E, (long long)bad);
    }
    cudaFree(didx);
    cudaFree(dperm);
    cudaFree(dinv);
    cudaFree(dcounts);
    cudaFree(doffsets);
    cudaFree(scratch);
    free(idx);
    free(perm);
    free(got);
    free(inv);
    free(counts);
    free(offsets);
    free(gcounts);
    free(goffsets);
}

Test(cuda_kernels, permutation_is_the_cpu_s_bits, .timeout = 120)
{
    need_gpu();
    check_permute(16384, 8, 256, 0, 0); /* Ring-mini at T = 16384: 128 chunks */
    check_permute(40000, 8, 128, 1, 0); /* 313 chunks: the per-expert scan's second tile */
    check_permute(5000, 4, 1024, 0, 1); /* E = 1024, nearly all in one expert */
    check_permute(3000, 1, 1, 0, 0);
    check_permute(1, 8, 256, 0, 0);
    check_permute(128, 8, 256, 1, 0); /* 1024 slots: exactly one chunk, the one-block sort */
    check_permute(8, 8, 1024, 0, 1);  /* one chunk, E = 1024 */
    check_permute(129, 8, 256, 0, 0); /* 1032 slots: two chunks, the three-kernel sort */
    check_permute(0, 8, 16, 0, 0);
}

/* ---- the routing alone (moe_route_cuda vs moe_route_cpu) ---- */

#define RC_T 300 /* tokens of the warp-per-token kernel's call (above its block kernel's 256) */
#define RC_B 37  /* the first tokens again, in a call the block-per-token kernel takes */

struct rcase {
    moe_recipe recipe;
    int E, K, n_group, topk_group, norm;
    float scale, mask_value;
    int bias, ties;
};

static void route_on_gpu(const struct moe_route_cfg *rc, int64_t T, const float *dl,
                         const float *db, int32_t *idx, float *w)
{
    const size_t n = (size_t)(T * rc->K);
    int32_t *didx;
    float *dw;
    CK(cudaMalloc((void **)&didx, sizeof(int32_t) * n));
    CK(cudaMalloc((void **)&dw, sizeof(float) * n));
    CK(cudaMemset(didx, 0xff, sizeof(int32_t) * n));
    CK(cudaMemset(dw, 0xff, sizeof(float) * n)); /* NaN: an unwritten weight fails */
    cr_assert_eq(moe_route_cuda(rc, T, dl, db, didx, dw, NULL), MOE_OK, "E=%d K=%d T=%lld: %s",
                 rc->E, rc->K, (long long)T, moe_last_error_cuda());
    CK(cudaDeviceSynchronize());
    CK(cudaMemcpy(idx, didx, sizeof(int32_t) * n, cudaMemcpyDeviceToHost));
    CK(cudaMemcpy(w, dw, sizeof(float) * n, cudaMemcpyDeviceToHost));
    cudaFree(didx);
    cudaFree(dw);
}

/* RC_T tokens against the CPU (idx exact; w within fp32 rounding: the softmax sum's order and
   the device's expf differ), and the first RC_B of them in a call of their own, which must give
   the first call's bits. */
static void check_route(const struct rcase *r)
{
    const struct moe_route_cfg rc = {r->recipe,
                                     r->E,
                                     r->K,
                                     r->n_group,
                                     r->topk_group,
                                     r->norm,
                                     r->recipe == SIGMOID ? 1e-20f : 0.f,
                                     r->scale,
                                     r->mask_value};
    const int E = r->E, K = r->K;
    const size_t nl = (size_t)RC_T * (size_t)E, nk = (size_t)RC_T * (size_t)K;
    float *lg = malloc(sizeof(float) * nl), *bias = malloc(sizeof(float) * (size_t)E);
    float *w_c = malloc(sizeof(float) * nk), *w_a = malloc(sizeof(float) * nk),
          *w_b = malloc(sizeof(float) * nk);
    int32_t *i_c = malloc(sizeof(int32_t) * nk), *i_a = malloc(sizeof(int32_t) * nk),
            *i_b = malloc(sizeof(int32_t) * nk);
    rng_state = 0x5bd1e995u ^ (uint64_t)(E * 131 + K * 7 + r->n_group);
    for (size_t i = 0; i < nl; i++)
        lg[i] = r->ties ? roundf(urand() * 12.f) / 4.f : urand() * 3.f;
    for (int e = 0; e < E; e++)
        bias[e] = r->ties ? roundf(urand() * 2.f) / 4.f : urand() * 0.5f;
    const float *hb = r->bias ? bias : NULL;
    cr_assert_eq(moe_route_cpu(&rc, RC_T, lg, hb, i_c, w_c), MOE_OK);
    float *dl, *db;
    CK(cudaMalloc((void **)&dl, sizeof(float) * nl));
    CK(cudaMalloc((void **)&db, sizeof(float) * (size_t)E));
    CK(cudaMemcpy(dl, lg, sizeof(float) * nl, cudaMemcpyHostToDevice));
    CK(cudaMemcpy(db, bias, sizeof(float) * (size_t)E, cudaMemcpyHostToDevice));
    route_on_gpu(&rc, RC_T, dl, r->bias ? db : NULL, i_a, w_a);
    route_on_gpu(&rc, RC_B, dl, r->bias ? db : NULL, i_b, w_b);
    int bad_i = 0, bad_w = 0;
    for (size_t i = 0; i < nk; i++) {
        bad_i += i_a[i] != i_c[i];
        bad_w += !(fabsf(w_a[i] - w_c[i]) <= 1e-5f * fabsf(w_c[i]) + 1e-30f);
    }
    const size_t nb = (size_t)RC_B * (size_t)K;
    cr_expect_eq(bad_i, 0, "E=%d K=%d G=%d: %d choices differ from the CPU's", E, K, r->n_group,
                 bad_i);
    cr_expect_eq(bad_w, 0, "E=%d K=%d G=%d: %d weights off the CPU's", E, K, r->n_group, bad_w);
    cr_expect(!memcmp(i_b, i_a, sizeof(int32_t) * nb) && !memcmp(w_b, w_a, sizeof(float) * nb),
              "E=%d K=%d G=%d: the decode-size call's bits differ from the larger call's", E, K,
              r->n_group);
    cudaFree(dl);
    cudaFree(db);
    free(lg);
    free(bias);
    free(w_c);
    free(w_a);
    free(w_b);
    free(i_c);
    free(i_a);
    free(i_b);
}

/* Both routing kernels on every recipe form: E from 1 to 1024 (a partial last warp, more than 512
   experts), K up to 32, the group limit on groups of 1 to 128 experts (inside a warp, whole warps,
   and 48, which the block kernel leaves to the warp kernel), a selection bias, exact ties. */
Test(cuda_kernels, routing_alone_matches_cpu, .timeout = 60)
{
    need_gpu();
    const float NI = -INFINITY;
    static const struct rcase cases[] = {
        {SOFTMAX, 1, 1, 1, 1, 0, 1.f, NI, 0, 0},      {SOFTMAX, 7, 2, 1, 1, 1, 1.f, NI, 0, 0},
        {SOFTMAX, 32, 4, 1, 1, 0, 1.f, NI, 0, 0},     {SOFTMAX, 60, 8, 1, 1, 1, 1.f, NI, 0, 1},
        {SOFTMAX, 128, 8, 1, 1, 1, 1.f, NI, 0, 0},    {SOFTMAX, 128, 8, 1, 1, 0, 1.f, NI, 1, 0},
        {SOFTMAX, 256, 8, 1, 1, 1, 1.f, NI, 0, 0},    {SOFTMAX, 600, 4, 1, 1, 0, 1.f, NI, 0, 0},
        {SOFTMAX, 1024, 32, 1, 1, 1, 1.f, NI, 0, 0},  {SOFTMAX, 1024, 8, 1, 1, 1, 1.f, NI, 0, 1},
        {SOFTMAX, 40, 32, 1, 1, 1, 1.f, NI, 0, 1},    {SIGMOID, 64, 6, 1, 1, 1, 2.5f, NI, 1, 0},
        {SIGMOID, 384, 8, 1, 1, 1, 2.827f, NI, 1, 0}, {SIGMOID, 256, 8, 8, 4, 1, 2.5f, 0.f, 1, 0},
        {SIGMOID, 256, 8, 8, 4, 1, 2.5f, NI, 1, 1},   {SIGMOID, 64, 4, 32, 8, 1, 1.f, NI, 1, 0},
        {SIGMOID, 32, 4, 32, 5, 0, 1.f, 0.f, 1, 1},   {SIGMOID, 128, 4, 16, 3, 1, 1.f, NI, 1, 0},
        {SIGMOID, 512, 8, 4, 2, 1, 1.f, NI, 1, 1},    {SIGMOID, 384, 6, 4, 3, 1, 1.f, NI, 0, 0},
        {SIGMOID, 160, 6, 10, 3, 1, 1.f, NI, 1, 0},   {SIGMOID, 192, 6, 4, 2, 1, 1.f, NI, 1, 0},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        check_route(&cases[i]);
}

/* ---- the Hopper grouped GEMM alone (moe_grouped_gemm_cuda vs moe_grouped_gemm_cpu) ---- */

struct gcase {
    const char *name;
    moe_dtype dt;
    int varlen_k;
    int64_t M, N, D; /* varlen-M: M unused; varlen-K: D unused */
    int b_mn;        /* varlen-M: weights MN-major (input grads) instead of K-major (forward) */
    int64_t split;   /* varlen-M: weight split (along k if b_mn, else along n); varlen-K: C's */
    int list;        /* per-expert allocations (pointer arrays) instead of one 3-D tensor */
    int topk;        /* gather_div of the gathered operand; 0: nothing gathered */
    int gather_b;    /* varlen-K: the gather is on B instead of A */
    const int64_t *counts; /* rows per expert */
    int E;
    int skew; /* varlen-K, list: each expert's output 8 bytes past an allocation's start (4- but
                 not 16-byte aligned: the kernel cannot buffer such tiles and stores them directly)
               */
    int act;  /* varlen-M gate|up (split = N / 2): SwiGLU fused, act [R, N / 2] of row stride
                 N / 2 + 8 */
};

/* The schedule list from MOE_TEST_SCHEDULES ("s:ctas,s:ctas,...", at most 16): its length, else
   (unset or malformed) reps, the list untouched. */
static int schedules_from_env(int (*out)[2], int reps)
{
    const char *e = getenv("MOE_TEST_SCHEDULES");
    int got[16][2], n = 0, used = 0;
    while (e && *e && n < 16 && sscanf(e, "%d:%d%n", &got[n][0], &got[n][1], &used) == 2) {
        n++;
        e += used;
        if (*e == ',')
            e++;
    }
    if (!e || *e || n == 0)
        return reps;
    memcpy(out, got, sizeof got[0] * (size_t)n);
    return n;
}

/* E experts' [rows, cols] matrices (row-major), host copy contiguous, device copy 3-D or one
   allocation per expert; mats for both sides with strides (xs, ks) = (cols, 1) or, transposed,
   (1, cols). */
struct etwin {
    struct pair all;
    void **dev, **hp, **dp; /* dev: the experts' matrices (list: skew bytes into an allocation) */
    int E, skew;
    struct moe_mats cpu, gpu;
};

static void etwin_new(struct etwin *t, moe_dtype dt, int E, int64_t rows, int64_t cols, int list,
                      int transposed, int fill_it, int skew)
{
    const size_t es = moe_dtype_size(dt), one = (size_t)(rows * cols) * es;
    memset(t, 0, sizeof *t);
    t->E = E;
    t->all = pair_new(one * (size_t)E);
    if (fill_it) {
        fill(dt, t->all.h, (size_t)(rows * cols) * (size_t)E, 1.0f / sqrtf((float)cols));
        pair_up(&t->all);
    }
    const int64_t xs = transposed ? 1 : cols, ks = transposed ? cols : 1;
    t->cpu = (struct moe_mats){NULL, t->all.h, rows * cols, xs, ks};
    t->gpu = (struct moe_mats){NULL, t->all.d, rows * cols, xs, ks};
    if (!list)
        return;
    t->dev = calloc((size_t)E, sizeof(void *));
    t->hp = calloc((size_t)E, sizeof(void *));
    t->skew = skew;
    for (int e = 0; e < E; e++) {
        CK(cudaMalloc(&t->dev[e], one + (size_t)skew));
        t->dev[e] = (char *)t->dev[e] + skew;
        t->hp[e] = (char *)t->all.h + one * (size_t)e;
        CK(cudaMemcpy(t->dev[e], t->hp[e], one, cudaMemcpyHostToDevice));
    }
    t->dp = dev_ptr_array(t->dev, E);
    t->cpu = (struct moe_mats){(void *const *)t->hp, NULL, 0, xs, ks};
    t->gpu = (struct moe_mats){(void *const *)t->dp, NULL, 0, xs, ks};
}

static void etwin_poison(struct etwin *t)
{
    if (!t->dev) {
        CK(cudaMemset(t->all.d, 0xff, t->all.bytes));
        return;
    }
    for (int e = 0; e < t->E; e++)
        CK(cudaMemset(t->dev[e], 0xff, t->all.bytes / (size_t)t->E));
}

static void etwin_download(struct etwin *t, void *dst)
{
    if (!t->dev) {
        CK(cudaMemcpy(dst, t->all.d, t->all.bytes, cudaMemcpyDeviceToHost));
        return;
    }
    const size_t one = t->all.bytes / (size_t)t->E;
    for (int e = 0; e < t->E; e++)
        CK(cudaMemcpy((char *)dst + one * (size_t)e, t->dev[e], one, cudaMemcpyDeviceToHost));
}

static void etwin_free(struct etwin *t)
{
    if (t->dev) {
        for (int e = 0; e < t->E; e++)
            cudaFree((char *)t->dev[e] - t->skew);
        cudaFree(t->dp);
        free(t->dev);
        free(t->hp);
    }
    pair_free(&t->all);
}

static int need_sm90(void)
{
    need_gpu();
    int dev = 0, major = 0, minor = 0;
    CK(cudaGetDevice(&dev));
    CK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
    CK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
    if (major != 9 || minor != 0)
        cr_skip_test("the grouped GEMM engine needs an sm_90 GPU (this one is sm_%d%d)", major,
                     minor);
    return 1;
}

/* An activation operand: src_rows rows of w elements, row stride w + 8 (16-byte rows). */
struct atwin {
    struct pair v;
    int64_t rs;
};

static void atwin_new(struct atwin *t, moe_dtype dt, int64_t src_rows, int64_t w)
{
    t->rs = w + 8;
    t->v = pair_new((size_t)(src_rows * t->rs) * moe_dtype_size(dt));
    fill(dt, t->v.h, (size_t)(src_rows * t->rs), 1.0f);
    pair_up(&t->v);
}

/* rows x cols elements of dt at row stride rs, packed (malloc'd) */
static void *packed_rows(moe_dtype dt, const void *src, int64_t rows, int64_t cols, int64_t rs)
{
    const size_t es = moe_dtype_size(dt);
    char *out = malloc((size_t)(rows * cols) * es + 1);
    for (int64_t r = 0; r < rows; r++)
        memcpy(out + (size_t)(r * cols) * es, (const char *)src + (size_t)(r * rs) * es,
               (size_t)cols * es);
    return out;
}

/* The fused SwiGLU's act [R, I] (packed) against the CPU's, and element by element against
   silu(gate) up computed here, in the kernel's expression, from the GPU's own c [R, 2 I]: the
   column mapping exactly; host and device expf may differ in the last fp32 bit, so an element
   may differ by one unit of the 16-bit type, rarely. */
static void check_act(const struct gcase *c, const void *c_gpu, const void *act_gpu,
                      const void *act_cpu, int64_t R)
{
    const int64_t I = c->N / 2;
    const double e = rel_err(c->dt, act_gpu, act_cpu, (size_t)(R * I));
    fprintf(stderr, "  %-28s %-14s rel %.3g\n", c->name, "act", e);
    cr_expect(e <= moe_tol(c->dt), "%s: act rel err %g", c->name, e);
    int64_t off = 0, worst_ulp = 0;
    for (int64_t r = 0; r < R; r++)
        for (int64_t i = 0; i < I; i++) {
            const float g = (float)elem(c->dt, c_gpu, (size_t)(r * c->N + i));
            const float u = (float)elem(c->dt, c_gpu, (size_t)(r * c->N + I + i));
            uint16_t want[2], got; /* set_elem of an fp32 would write 4 bytes */
            set_elem(c->dt, want, 0, g / (1.f + expf(-g)) * u);
            memcpy(&got, (const char *)act_gpu + (size_t)(r * I + i) * 2, 2);
            const int64_t d = llabs((int64_t)(int16_t)want[0] - (int64_t)(int16_t)got);
            off += d != 0;
            worst_ulp = d > worst_ulp ? d : worst_ulp;
        }
    fprintf(stderr, "  %-28s act vs silu(c): %lld of %lld differ, by <= %lld unit\n", c->name,
            (long long)off, (long long)(R * I), (long long)worst_ulp);
    cr_expect(worst_ulp <= 1 && off * 1000 <= R * I, "%s: act is not silu(gate) up of c", c->name);
}

static void run_gemm_case(const struct gcase *c)
{
    need_sm90();
    rng_state = 0x2545f4914f6cdd1dull ^
                (uint64_t)(c->E * 7919 + c->N * 31 + c->D + c->M * 13 + c->varlen_k * 5 + c->b_mn);
    const size_t es = moe_dtype_size(c->dt);
    const int E = c->E;
    int64_t *off = calloc((size_t)E + 1, sizeof(int64_t));
    for (int e = 0; e < E; e++)
        off[e + 1] = off[e] + c->counts[e];
    const int64_t R = off[E], src_rows = c->topk ? R / c->topk + 1 : R;
    struct pair gat = pair_new(sizeof(int32_t) * (size_t)(R ? R : 1));
    struct pair offs = pair_new(sizeof(int64_t) * (size_t)(E + 1));
    int32_t *gh = gat.h;
    for (int64_t r = 0; r < R; r++) /* every source row at most topk times, scattered */
        gh[r] = (int32_t)((r * 7919) % (src_rows * (c->topk ? c->topk : 1)));
    memcpy(offs.h, off, sizeof(int64_t) * (size_t)(E + 1));
    pair_up(&gat);
    pair_up(&offs);

    struct moe_gemm gc, gg;
    memset(&gc, 0, sizeof gc);
    gc.dtype = c->dt;
    gc.E = E;
    gc.varlen_k = c->varlen_k;
    gc.M = c->M;
    gc.N = c->N;
    gc.D = c->D;
    gc.rows_max = R;
    gc.offsets = offs.h;
    gg = gc;
    gg.offsets = offs.d;

    struct atwin a, b;
    struct etwin w0, w1, c0, c1;
    struct pair cv = {0}, av = {0};
    const int64_t act_rs = c->N / 2 + 8;
    size_t out_bytes;
    const int gather_a = c->topk && !(c->varlen_k && c->gather_b);
    atwin_new(&a, c->dt, gather_a ? src_rows : R, c->varlen_k ? c->M : c->D);
    gc.a = (struct moe_gemm_op){1, a.v.h, a.rs, gather_a ? gat.h : NULL, c->topk, {{0}, {0}}, 0, 0};
    gg.a = gc.a;
    gg.a.base = a.v.d;
    gg.a.gather = gather_a ? gat.d : NULL;
    if (c->varlen_k) {
        const int gather_b = c->topk && c->gather_b;
        atwin_new(&b, c->dt, gather_b ? src_rows : R, c->N);
        gc.b = (struct moe_gemm_op){1,       b.v.h,      b.rs, gather_b ? gat.h : NULL,
                                    c->topk, {{0}, {0}}, 0,    0};
        gg.b = gc.b;
        gg.b.base = b.v.d;
        gg.b.gather = gather_b ? gat.d : NULL;
        const int two = c->split < c->M;
        etwin_new(&c0, c->dt, E, c->split, c->N, c->list, 0, 0, c->skew);
        if (two)
            etwin_new(&c1, c->dt, E, c->M - c->split, c->N, c->list, 0, 0, c->skew);
        gc.cm[0] = c0.cpu;
        gg.cm[0] = c0.gpu;
        gc.cm[1] = two ? c1.cpu : c0.cpu;
        gg.cm[1] = two ? c1.gpu : c0.gpu;
        gc.c_split = c->split;
        gg.c_split = c->split;
        out_bytes = (size_t)(E * c->M * c->N) * es;
    } else {
        /* weights (x = n, k): K-major parts [n', D] split along n, or MN-major parts [k', N] */
        const int64_t len = c->b_mn ? c->D : c->N, two = c->split < len;
        const int64_t r0 = c->split, r1 = len - c->split;
        etwin_new(&w0, c->dt, E, r0, c->b_mn ? c->N : c->D, c->list, c->b_mn, 1, 0);
        if (two)
            etwin_new(&w1, c->dt, E, r1, c->b_mn ? c->N : c->D, c->list, c->b_mn, 1, 0);
        gc.b = (struct moe_gemm_op){0,        NULL,   0, NULL, 1, {w0.cpu, two ? w1.cpu : w0.cpu},
                                    c->split, c->b_mn};
        gg.b = (struct moe_gemm_op){0,        NULL,   0, NULL, 1, {w0.gpu, two ? w1.gpu : w0.gpu},
                                    c->split, c->b_mn};
        cv = pair_new((size_t)(R * c->N) * es);
        gc.c = cv.h;
        gg.c = cv.d;
        gc.c_rs = gg.c_rs = c->N;
        out_bytes = (size_t)(R * c->N) * es;
        if (c->act) {
            av = pair_new((size_t)(R * act_rs) * es);
            gc.act = av.h;
            gg.act = av.d;
            gc.act_rs = gg.act_rs = act_rs;
        }
    }
    void *want = calloc(out_bytes + 1, 1), *got = calloc(out_bytes + 1, 1),
         *other = calloc(out_bytes + 1, 1);
    cr_assert_eq(moe_grouped_gemm_cpu(&gc), MOE_OK, "%s: cpu", c->name);
    if (c->varlen_k) {
        const size_t b0 = c0.all.bytes;
        memcpy(want, c0.all.h, b0);
        if (c->split < c->M)
            memcpy((char *)want + b0, c1.all.h, c1.all.bytes);
    } else {
        memcpy(want, cv.h, out_bytes);
    }
    void *want_act = c->act ? packed_rows(c->dt, av.h, R, c->N / 2, act_rs) : NULL, *got_act = NULL;
    /* schedule 1, then schedule 1 again (determinism) and every other schedule: the same
       per-element wgmma order (ping-pong's narrower tiles too), so the same bits; then grids of
       1-3 CTAs, so that a CTA walks many tiles (the ring, the output buffers and ping-pong's turns
       across tile edges). Under compute-sanitizer (MOE_TEST_SMALL) the first three;
       MOE_TEST_SCHEDULES="s:ctas,..." runs those instead (the first is the reference). */
    static const int all_schedules[][2] = {{1, 0}, {4, 1}, {3, 1}, {0, 0}, {1, 0}, {2, 0},
                                           {2, 3}, {4, 0}, {4, 3}, {0, 1}, {3, 0}, {3, 3},
                                           {3, 2}, {1, 3}, {6, 0}, {6, 1}};
    int schedules[16][2], reps = (int)(sizeof all_schedules / sizeof all_schedules[0]);
    memcpy(schedules, all_schedules, sizeof all_schedules);
    if (getenv("MOE_TEST_SMALL"))
        reps = 3;
    reps = schedules_from_env(schedules, reps);
    for (int rep = 0; rep < reps; rep++) {
        void *dst = rep == 0 ? got : other;
        gg.schedule = schedules[rep][0];
        gg.ctas = schedules[rep][1];
        if (getenv("MOE_TEST_TRACE"))
            fprintf(stderr, "  %s: schedule %d, %d CTAs\n", c->name, gg.schedule, gg.ctas);
        if (c->varlen_k) {
            etwin_poison(&c0);
            if (c->split < c->M)
                etwin_poison(&c1);
        } else {
            CK(cudaMemset(cv.d, 0xff, cv.bytes)); /* NaN: an unwritten element fails */
            if (c->act)
                CK(cudaMemset(av.d, 0xff, av.bytes));
        }
        int rc = moe_grouped_gemm_cuda(&gg);
        cr_assert_eq(rc, MOE_OK, "%s (schedule %d, %d CTAs): %s", c->name, gg.schedule, gg.ctas,
                     moe_last_error_cuda());
        CK(cudaDeviceSynchronize());
        if (c->varlen_k) {
            etwin_download(&c0, dst);
            if (c->split < c->M)
                etwin_download(&c1, (char *)dst + c0.all.bytes);
        } else {
            CK(cudaMemcpy(dst, cv.d, out_bytes, cudaMemcpyDeviceToHost));
        }
        if (rep > 0)
            cr_expect(memcmp(got, other, out_bytes) == 0,
                      "%s: schedule %d (%d CTAs) differs from schedule 1", c->name, gg.schedule,
                      gg.ctas);
        if (c->act) {
            CK(cudaMemcpy(av.h, av.d, av.bytes, cudaMemcpyDeviceToHost));
            void *a = packed_rows(c->dt, av.h, R, c->N / 2, act_rs);
            if (rep == 0)
                got_act = a;
            else {
                cr_expect(memcmp(got_act, a, (size_t)(R * c->N / 2) * es) == 0,
                          "%s: act of schedule %d (%d CTAs) differs from schedule 1", c->name,
                          gg.schedule, gg.ctas);
                free(a);
            }
        }
    }
    const double e = rel_err(c->dt, got, want, out_bytes / es);
    fprintf(stderr, "  %-28s %-14s rel %.3g\n", c->name, "c", e);
    cr_expect(e <= moe_tol(c->dt), "%s: rel err %g", c->name, e);
    /* c as the unfused GEMM writes it, bit for bit (where it tiles the parts) */
    if (c->act && c->split % 256 == 0) {
        struct moe_gemm plain = gg;
        plain.act = NULL;
        plain.schedule = plain.ctas = 0;
        CK(cudaMemset(cv.d, 0xff, cv.bytes));
        cr_assert_eq(moe_grouped_gemm_cuda(&plain), MOE_OK, "%s: unfused", c->name);
        CK(cudaMemcpy(other, cv.d, out_bytes, cudaMemcpyDeviceToHost));
        cr_expect(memcmp(got, other, out_bytes) == 0, "%s: c differs from the unfused GEMM's",
                  c->name);
    }
    if (c->act) {
        check_act(c, got, got_act, want_act, R);
        free(want_act);
        free(got_act);
        pair_free(&av);
    }

    if (c->varlen_k) {
        pair_free(&b.v);
        etwin_free(&c0);
        if (c->split < c->M)
            etwin_free(&c1);
    } else {
        etwin_free(&w0);
        if (c->split < (c->b_mn ? c->D : c->N))
            etwin_free(&w1);
        pair_free(&cv);
    }
    pair_free(&a.v);
    pair_free(&gat);
    pair_free(&offs);
    free(off);
    free(want);
    free(got);
    free(other);
}

/* Row counts that hit every tile edge: empty, 1, a full tile, one past it, several tiles. */
static const int64_t gemm_counts[] = {0, 1, 128, 129, 300, 0, 64, 513, 255, 7};

Test(cuda_kernels, grouped_gemm_gathered_3d_bf16_matches_cpu, .timeout = 120)
{
    run_gemm_case(&(struct gcase){"gemm gather 3-D bf16", MOE_BF16, 0, 0, 512, 256, 0, 256, 0, 4, 0,
                                  gemm_counts, 10, 0, 0});
}

Test(cuda_kernels, grouped_gemm_pointer_arrays_two_parts_match_cpu, .timeout = 120)
{
    run_gemm_case(&(struct gcase){"gemm list gate|up bf16", MOE_BF16, 0, 0, 768, 192, 0, 256, 1, 8,
                                  0, gemm_counts, 10, 0, 0});
}

Test(cuda_kernels, grouped_gemm_packed_fp16_matches_cpu, .timeout = 120)
{
    run_gemm_case(&(struct gcase){"gemm packed fp16", MOE_F16, 0, 0, 256, 512, 0, 256, 0, 0, 0,
                                  gemm_counts, 10, 0, 0});
}

/* The input-grad form: weights read MN-major (W, not Wᵀ), split along the reduction. */
Test(cuda_kernels, grouped_gemm_mn_major_weights_match_cpu, .timeout = 120)
{
    run_gemm_case(&(struct gcase){"gemm MN weights split-k", MOE_BF16, 0, 0, 256, 384, 1, 128, 1, 4,
                                  0, gemm_counts, 10, 0, 0});
    run_gemm_case(&(struct gcase){"gemm MN weights 3-D", MOE_BF16, 0, 0, 512, 256, 1, 256, 0, 2, 0,
                                  gemm_counts, 10, 0, 0});
    /* two 3-D parts along k, rows packed: both operands through TMA on schedules 0, 3 and 4 */
    run_gemm_case(&(struct gcase){"gemm MN 3-D split-k packed", MOE_BF16, 0, 0, 256, 384, 1, 128, 0,
                                  0, 0, gemm_counts, 10, 0, 0});
}

/* The weight-grad form: the experts' rows are the reduction; experts without rows get zeros. */
Test(cuda_kernels, grouped_gemm_varlen_k_matches_cpu, .timeout = 180)
{
    run_gemm_case(&(struct gcase){"gemm varlen-K gather A", MOE_BF16, 1, 256, 256, 0, 0, 128, 0, 4,
                                  0, gemm_counts, 10, 0, 0});
    run_gemm_case(&(struct gcase){"gemm varlen-K gather B list", MOE_F16, 1, 384, 512, 0, 0, 256, 1,
                                  8, 1, gemm_counts, 10, 0, 0});
}

/* The output paths on short reductions and unaligned outputs: D = 64 / 128 (one / two k-steps)
   go out through the warp buffers (TMA stores or row copies), tiles without rows and the skewed
   pointer arrays (8-byte aligned outputs) straight from the registers. */
Test(cuda_kernels, grouped_gemm_output_paths_match_cpu, .timeout = 180)
{
    run_gemm_case(&(struct gcase){"gemm one k-step", MOE_BF16, 0, 0, 256, 64, 0, 256, 0, 4, 0,
                                  gemm_counts, 10, 0, 0});
    run_gemm_case(&(struct gcase){"gemm two k-steps", MOE_BF16, 0, 0, 512, 128, 1, 128, 0, 0, 0,
                                  gemm_counts, 10, 0, 0});
    run_gemm_case(&(struct gcase){"gemm varlen-K skewed list", MOE_BF16, 1, 256, 256, 0, 0, 128, 1,
                                  4, 0, gemm_counts, 10, 8, 0});
}

/* The forward's gate|up GEMM with SwiGLU fused: a tile holds 128 gate and the same 128 up
   columns; c as without it, act = silu(gate) up of c. Pointer arrays and one 3-D tensor, bf16
   and fp16, rows gathered. */
Test(cuda_kernels, grouped_gemm_fused_swiglu_matches_cpu, .timeout = 180)
{
    run_gemm_case(&(struct gcase){"gemm SwiGLU list bf16", MOE_BF16, 0, 0, 512, 256, 0, 256, 1, 4,
                                  0, gemm_counts, 10, 0, 1});
    run_gemm_case(&(struct gcase){"gemm SwiGLU 3-D fp16", MOE_F16, 0, 0, 768, 192, 0, 384, 0, 8, 0,
                                  gemm_counts, 10, 0, 1});
}

Test(cuda_kernels, grouped_gemm_refuses_what_it_does_not_tile)
{
    need_sm90();
    int64_t off[2] = {0, 0};
    struct moe_gemm g;
    memset(&g, 0, sizeof g);
    g.dtype = MOE_F32;
    g.E = 1;
    g.N = 256;
    g.D = 64;
    g.offsets = off;
    g.a = (struct moe_gemm_op){1, (void *)16, 64, NULL, 1, {{0}, {0}}, 0, 0};
    g.b.m[0] = (struct moe_mats){NULL, (void *)16, 0, 64, 1};
    g.b.split = 256;
    g.c = (void *)16;
    g.c_rs = 256;
    cr_expect_eq(moe_grouped_gemm_cuda(&g), MOE_EUNSUPPORTED, "fp32");
    g.dtype = MOE_BF16;
    g.N = 200;
    g.b.split = 200;
    cr_expect_eq(moe_grouped_gemm_cuda(&g), MOE_EUNSUPPORTED, "N not a multiple of 256");
    g.N = 512;
    g.b.split = 128;
    g.act = (void *)16;
    g.act_rs = 256;
    cr_expect_eq(moe_grouped_gemm_cuda(&g), MOE_EUNSUPPORTED, "SwiGLU with parts not N / 2");
}

/* Shapes the Hopper engine tiles (2I, H multiples of 256): with moe_problem.engine on an sm_90 GPU
   the routed experts run moe_grouped_gemm_cuda in both passes (x and dy gathered in the loads, no
   host counts); the same cases on cuBLAS first. On the engine the second run is a CUDA-graph
   capture of the whole forward and backward, replayed: the proof that nothing in it waits on the
   host. */
Test(cuda_kernels, engine_shapes_match_cpu, .timeout = 300)
{
    const struct tcase cases[] = {
        {"engine bf16 3-D", MOE_BF16, 300, 256, 256, 0, 8, 2, SOFTMAX, 1, 1, 0, L3D, 1, 0, 8, 2.0f},
        {"engine bf16 list shared", MOE_BF16, 257, 256, 256, 256, 8, 4, SIGMOID, 4, 2, 0, LLIST, 0,
         0, 0, 0.0f},
        {"engine fp16 3-D", MOE_F16, 129, 512, 256, 0, 6, 3, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0, 0.0f},
        {"engine bf16 T=1", MOE_BF16, 1, 256, 256, 0, 8, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0, 0.0f},
        {"engine fwd I=384 bf16", MOE_BF16, 300, 256, 384, 0, 8, 2, SOFTMAX, 1, 1, 0, L3D, 0, 0, 0,
         0.0f},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++)
        for (int engine = 0; engine < 3; engine++) /* cuBLAS, engine, engine warp-specialized */
            run_case_on(&cases[i], engine);
}

/* ---- what the forward keeps for backward (host arithmetic: runs without a GPU) ---- */

static size_t saved_for(int64_t T, int64_t H, int64_t I, int64_t Is, int K, int E)
{
    struct moe_problem p;
    memset(&p, 0, sizeof p);
    p.dtype = MOE_BF16;
    p.T = T;
    p.H = H;
    p.route.E = E;
    p.route.K = K;
    p.experts = (struct moe_mlp){.n = E, .H = H, .I = I};
    if (Is)
        p.shared = (struct moe_mlp){.n = 1, .H = H, .I = Is};
    return moe_saved_bytes_cuda(&p);
}

/* Issue 4's activation bound: besides x, the logits, idx and w (the caller's tensors), a layer
   keeps only the gate|up pre-activations (routed rows and shared expert) and the routing
   permutation: no permuted copy of x and no expert outputs, so nothing of size H. Ring-mini-2.0 at
   T = 16384. */
Test(cuda_kernels, saved_state_is_preactivation_and_routing_metadata)
{
    const int64_t T = 16384, H = 2048, I = 512, Is = 512;
    const int K = 8, E = 256;
    const int64_t R = T * K;
    const size_t pre = 2 * (size_t)(R * 2 * I + T * 2 * Is); /* bf16 */
    const size_t routing =
        4 * 2 * (size_t)R + 8 * (size_t)(2 * E + 1); /* perm, inv, counts, offsets */
    const size_t got = saved_for(T, H, I, Is, K, E);
    cr_expect_geq(got, pre + routing);
    cr_expect_leq(got, pre + routing + 6 * 256, "%zu bytes saved, bound %zu (+ alignment)", got,
                  pre + routing);
    cr_expect_eq(saved_for(T, 4 * H, I, Is, K, E), got, "saved state grows with H");
    cr_expect_lt(saved_for(T, H, I, 0, K, E), got, "no shared expert: its pre-activation goes");
}
