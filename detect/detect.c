/*
 * detect/detect.c — mp_detect: read the attributes of one MoE block instance into a struct
 * moe_spec, or refuse it with a one-line reason. Generic structure rules first (router, experts in
 * either layout, K, groups, shared experts; every expert checked); the family table (families.c)
 * only supplies what attributes cannot tell. Candidates are never tested with isinstance or by
 * class name; only the activation module's type name is read, because that *is* the fact we need.
 *
 * Error codes: MOE_EINVAL when the block lacks the structure of an MoE block (missing attribute,
 * ill-shaped or inconsistent tensors), MOE_EUNSUPPORTED when it is one but uses something the fused
 * path does not do (LoRA, quantization, ZeRO-3, biases, another activation or dtype, a family
 * rule).
 */
#include "spec.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "families.h"
#include "pyattr.h"

#define DTYPE_LEN 32
#define WHAT_LEN 96

struct ctx {
    PyObject *block, *router, *experts, *config;
    const struct mp_family *fam; /* table row; NULL for an unknown family, which is refused */
    struct moe_spec *spec;
    char dtype[DTYPE_LEN]; /* dtype of the expert weights, "" until the first one */
    char *reason;
    size_t reason_len;
};

__attribute__((format(printf, 3, 4))) static int fail(struct ctx *c, int err, const char *fmt, ...)
{
    if (c->reason && c->reason_len) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->reason, c->reason_len, fmt, ap);
        va_end(ap);
    }
    return err;
}

static void copy_name(char *dst, const char *src)
{
    snprintf(dst, MP_NAME, "%s", src ? src : "");
}

/* First of names present on o (new reference), its name in *found. */
static PyObject *first_attr(PyObject *o, const char *const *names, const char **found)
{
    for (; *names; names++) {
        PyObject *v = mp__attr(o, *names);
        if (v) {
            if (found)
                *found = *names;
            return v;
        }
    }
    return NULL;
}

/* ---- tensors and linear layers ---- */

static int is_float_dtype(const char *s)
{
    return !strcmp(s, "torch.float32") || !strcmp(s, "torch.bfloat16") ||
           !strcmp(s, "torch.float16");
}

/* 1: t carries DeepSpeed ZeRO-3's partition attributes (its data is this rank's shard, often
   empty, and its shape then says nothing about the module). */
static int zero3_partitioned(PyObject *t)
{
    static const char *const zero3[] = {"ds_id", "ds_status", "ds_shape", NULL};
    PyObject *hit = t ? first_attr(t, zero3, NULL) : NULL;
    Py_XDECREF(hit);
    return hit != NULL;
}

static int zero3_refusal(struct ctx *c, const char *what)
{
    return fail(c, MOE_EUNSUPPORTED,
                "%s is partitioned by DeepSpeed ZeRO-3; ZeRO-3 is not supported", what);
}

/* t is a float tensor of nd dimensions, not partitioned nor quantized; dims and dtype filled. */
static int check_tensor(struct ctx *c, PyObject *t, const char *what, int nd, int64_t *dims,
                        char *dtype)
{
    static const char *const quant[] = {"quant_state", "SCB", NULL};
    PyObject *hit;

    if (!t)
        return fail(c, MOE_EINVAL, "%s is missing", what);
    if (zero3_partitioned(t))
        return zero3_refusal(c, what);
    if ((hit = first_attr(t, quant, NULL))) {
        Py_DECREF(hit);
        return fail(c, MOE_EUNSUPPORTED, "%s is quantized; quantized experts are not supported yet",
                    what);
    }
    if (!mp__dtype(t, dtype, DTYPE_LEN))
        return fail(c, MOE_EINVAL, "%s has no dtype", what);
    if (!is_float_dtype(dtype))
        return fail(c, MOE_EUNSUPPORTED,
                    "%s has dtype %s; only float32, bfloat16 and float16 are supported", what,
                    dtype);
    if (mp__shape(t, dims, MP_MAX_DIMS) != nd)
        return fail(c, MOE_EINVAL, "%s is not a %d-D tensor", what, nd);
    return 0;
}

/* All expert (and shared expert) weights share one dtype: the kernels take one. */
static int same_dtype(struct ctx *c, const char *what, const char *dtype)
{
    if (!c->dtype[0])
        snprintf(c->dtype, sizeof c->dtype, "%s", dtype);
    else if (strcmp(c->dtype, dtype) != 0)
        return fail(c, MOE_EUNSUPPORTED, "mixed dtypes: %s is %s, other expert weights are %s",
                    what, dtype, c->dtype);
    return 0;
}

/* A wrapped or quantized layer: peft LoRA, GPTQ/AWQ, fp8 and bitsandbytes modules. */
static int check_plain_module(struct ctx *c, PyObject *m, const char *what)
{
    static const char *const lora[] = {"base_layer", "lora_A", NULL};
    static const char *const quant[] = {"qweight",          "qzeros",      "weight_scale",
                                        "weight_scale_inv", "quant_state", NULL};
    PyObject *hit;

    if ((hit = first_attr(m, lora, NULL))) {
        Py_DECREF(hit);
        return fail(c, MOE_EUNSUPPORTED,
                    "%s is LoRA-wrapped (peft); LoRA experts are not supported yet", what);
    }
    if ((hit = first_attr(m, quant, NULL))) {
        Py_DECREF(hit);
        return fail(c, MOE_EUNSUPPORTED, "%s is quantized; quantized experts are not supported yet",
                    what);
    }
    return 0;
}

/* m is a Linear without bias whose weight is [*rows, *cols]; a size <= 0 is learnt, not checked. */
static int check_linear(struct ctx *c, PyObject *m, const char *what, int64_t *rows, int64_t *cols,
                        char *dtype)
{
    char wname[WHAT_LEN + 8];
    int64_t d[MP_MAX_DIMS] = {0};
    int rc;

    if (!m)
        return fail(c, MOE_EINVAL, "%s is missing", what);
    if ((rc = check_plain_module(c, m, what)) < 0)
        return rc;
    if (mp__has(m, "bias"))
        return fail(c, MOE_EUNSUPPORTED, "%s has a bias; biased experts are not supported", what);
    snprintf(wname, sizeof wname, "%s.weight", what);
    PyObject *w = mp__attr(m, "weight");
    rc = check_tensor(c, w, wname, 2, d, dtype);
    Py_XDECREF(w);
    if (rc < 0)
        return rc;
    if ((*rows > 0 && d[0] != *rows) || (*cols > 0 && d[1] != *cols))
        return fail(c, MOE_EINVAL, "%s is [%lld, %lld], expected [%lld, %lld]", wname,
                    (long long)d[0], (long long)d[1], (long long)*rows, (long long)*cols);
    *rows = d[0];
    *cols = d[1];
    return 0;
}

/* gate/up [I, H] and down [H, I] of one SwiGLU MLP; *I learnt from the first one. */
static int check_mlp(struct ctx *c, PyObject *mlp, const char *what, const char *const names[3],
                     int64_t H, int64_t *I)
{
    char w[WHAT_LEN], dtype[DTYPE_LEN];
    int rc = 0;

    for (int p = 0; p < 3 && rc == 0; p++) {
        int64_t rows = p < 2 ? *I : H, cols = p < 2 ? H : *I;
        snprintf(w, sizeof w, "%s.%s", what, names[p]);
        PyObject *lin = mp__attr(mlp, names[p]);
        rc = check_linear(c, lin, w, &rows, &cols, dtype);
        Py_XDECREF(lin);
        if (rc == 0)
            rc = same_dtype(c, w, dtype);
        if (rc == 0 && p == 0)
            *I = rows;
    }
    return rc;
}

/* ---- router ---- */

static int find_router(struct ctx *c)
{
    static const char *const names[] = {"gate", "router"};
    int64_t d[MP_MAX_DIMS] = {0};
    char dtype[DTYPE_LEN], what[WHAT_LEN];
    int rc;

    for (int i = 0; i < 2 && !c->router; i++) {
        PyObject *r = mp__attr(c->block, names[i]);
        PyObject *w = mp__attr(r, "weight");
        if (zero3_partitioned(w)) { /* its shape is the shard's: say why, not "no router" */
            Py_DECREF(w);
            Py_DECREF(r);
            snprintf(what, sizeof what, "%s.weight", names[i]);
            return zero3_refusal(c, what);
        }
        if (w && mp__shape(w, d, MP_MAX_DIMS) == 2) {
            c->router = r;
            copy_name(c->spec->router, names[i]);
        } else {
            Py_XDECREF(r);
        }
        Py_XDECREF(w);
    }
    if (!c->router)
        return fail(c, MOE_EINVAL,
                    "no router: neither block.gate nor block.router has a 2-D weight");
    snprintf(what, sizeof what, "%s", c->spec->router);
    if ((rc = check_plain_module(c, c->router, what)) < 0)
        return rc;
    if (mp__has(c->router, "bias"))
        return fail(c, MOE_EUNSUPPORTED, "router %s has a bias; not supported", what);
    snprintf(what, sizeof what, "%s.weight", c->spec->router);
    PyObject *w = mp__attr(c->router, "weight");
    rc = check_tensor(c, w, what, 2, d, dtype);
    Py_XDECREF(w);
    if (rc < 0)
        return rc;
    if (d[0] < 1 || d[1] < 1 || d[0] > 1 << 20)
        return fail(c, MOE_EINVAL, "%s has shape [%lld, %lld]", what, (long long)d[0],
                    (long long)d[1]);
    c->spec->route.E = (int)d[0];
    c->spec->H = d[1];
    return 0;
}

/* ---- family hint ---- */

/* "transformers_modules.x.y.modeling_bailing_moe_v2" -> "bailing_moe_v2"; "" if not modeling_*. */
static void module_hint(PyObject *block, char *buf, size_t len)
{
    char mod[256];
    buf[0] = '\0';
    if (!mp__type_module(block, mod, sizeof mod))
        return;
    const char *last = strrchr(mod, '.');
    last = last ? last + 1 : mod;
    if (strncmp(last, "modeling_", 9) == 0)
        snprintf(buf, len, "%s", last + 9);
}

static void find_config(struct ctx *c)
{
    c->config = mp__attr(c->block, "config");
    if (!c->config)
        c->config = mp__attr(c->experts, "config");
    if (!c->config)
        c->config = mp__attr(c->router, "config");
    if (!c->config && mp__seq_len(c->experts) > 0) {
        PyObject *e0 = mp__seq_item(c->experts, 0);
        c->config = mp__attr(e0, "config");
        Py_XDECREF(e0);
    }
}

/* Family name (model_type, else the module hint, else "unknown") and the table row (module hint
   first: the code decides the math; model_type second). */
static int find_family(struct ctx *c)
{
    char hint[MP_NAME], model_type[MP_NAME] = "";

    module_hint(c->block, hint, sizeof hint);
    mp__attr_str(c->config, "model_type", model_type, sizeof model_type);
    c->fam = mp__family_find(hint);
    if (!c->fam)
        c->fam = mp__family_find(model_type);
    copy_name(c->spec->family, model_type[0] ? model_type : hint[0] ? hint : "unknown");
    if (c->fam && c->fam->refuse)
        return fail(c, MOE_EUNSUPPORTED, "%s", c->fam->refuse);
    /* many families name it router (Llama-4, DBRX, Jamba, PhiMoE...), each with its own math */
    if (!c->fam && strcmp(c->spec->router, "router") == 0)
        return fail(c, MOE_EUNSUPPORTED,
                    "block.router of unknown family %s: its routing math is unknown",
                    c->spec->family);
    return 0;
}

/* ---- experts ---- */

static int experts_modulelist(struct ctx *c, Py_ssize_t n)
{
    static const char *const hf[3] = {"gate_proj", "up_proj", "down_proj"};
    static const char *const mixtral[3] = {"w1", "w3", "w2"};
    struct moe_spec *s = c->spec;
    char what[WHAT_LEN];
    int rc = 0;

    if (n != s->route.E)
        return fail(c, MOE_EINVAL, "block.experts has %lld entries, the router %d experts",
                    (long long)n, s->route.E);
    PyObject *e0 = mp__seq_item(c->experts, 0);
    const char *const *names = mp__has(e0, "gate_proj") ? hf : mp__has(e0, "w1") ? mixtral : NULL;
    Py_XDECREF(e0);
    if (!names)
        return fail(c, MOE_EINVAL,
                    "experts[0] has neither gate_proj/up_proj/down_proj nor w1/w3/w2");
    s->layout = MP_LAYOUT_MODULELIST;
    copy_name(s->gate, names[0]);
    copy_name(s->up, names[1]);
    copy_name(s->down, names[2]);
    s->I = 0;
    for (Py_ssize_t e = 0; e < n && rc == 0; e++) {
        PyObject *ex = mp__seq_item(c->experts, e);
        snprintf(what, sizeof what, "experts[%lld]", (long long)e);
        rc = ex ? check_mlp(c, ex, what, names, s->H, &s->I)
                : fail(c, MOE_EINVAL, "%s is missing", what);
        Py_XDECREF(ex);
    }
    return rc;
}

/* Attributes of a transformers-5 experts module that the fused path cannot honour. */
static int check_fused_flags(struct ctx *c)
{
    int flag;
    if (mp__has(c->experts, "gate_up_proj_bias") || mp__has(c->experts, "down_proj_bias") ||
        (mp__attr_bool(c->experts, "has_bias", &flag) && flag))
        return fail(c, MOE_EUNSUPPORTED, "experts have biases (gpt-oss style); not supported");
    if (mp__attr_bool(c->experts, "has_gate", &flag) && !flag)
        return fail(c, MOE_EUNSUPPORTED,
                    "experts have no gate projection; only SwiGLU is supported");
    if (mp__attr_bool(c->experts, "is_concatenated", &flag) && !flag)
        return fail(c, MOE_EUNSUPPORTED,
                    "experts.gate_up_proj interleaves gate and up columns; not supported");
    return check_plain_module(c, c->experts, "experts");
}

/* Orientation from experts.is_transposed when present, else from the shapes (H is known from the
   router, so at most one orientation fits; the family preference is only a tie-break). */
static int fused_orientation(struct ctx *c, const int64_t *gu, const int64_t *dn)
{
    int64_t H = c->spec->H;
    int fits_n = gu[2] == H && dn[1] == H && gu[1] == 2 * dn[2];
    int fits_t = gu[1] == H && dn[2] == H && gu[2] == 2 * dn[1];
    int flag;

    if (mp__attr_bool(c->experts, "is_transposed", &flag)) {
        fits_n = fits_n && !flag;
        fits_t = fits_t && flag;
    }
    if (fits_n && fits_t)
        return c->fam && c->fam->prefer_transposed ? MP_LAYOUT_FUSED3D_T : MP_LAYOUT_FUSED3D;
    if (fits_n || fits_t)
        return fits_t ? MP_LAYOUT_FUSED3D_T : MP_LAYOUT_FUSED3D;
    return fail(c, MOE_EINVAL,
                "experts.gate_up_proj [%lld, %lld, %lld] and down_proj [%lld, %lld, %lld] do not "
                "match H=%lld",
                (long long)gu[0], (long long)gu[1], (long long)gu[2], (long long)dn[0],
                (long long)dn[1], (long long)dn[2], (long long)H);
}

static int experts_fused(struct ctx *c)
{
    struct moe_spec *s = c->spec;
    int64_t gu[MP_MAX_DIMS] = {0}, dn[MP_MAX_DIMS] = {0};
    char dtype[DTYPE_LEN];
    int rc;

    if ((rc = check_fused_flags(c)) < 0)
        return rc;
    PyObject *t = mp__attr(c->experts, "gate_up_proj");
    rc = check_tensor(c, t, "experts.gate_up_proj", 3, gu, dtype);
    Py_XDECREF(t);
    if (rc == 0)
        rc = same_dtype(c, "experts.gate_up_proj", dtype);
    if (rc < 0)
        return rc;
    t = mp__attr(c->experts, "down_proj");
    rc = check_tensor(c, t, "experts.down_proj", 3, dn, dtype);
    Py_XDECREF(t);
    if (rc == 0)
        rc = same_dtype(c, "experts.down_proj", dtype);
    if (rc < 0)
        return rc;
    if (gu[0] != s->route.E || dn[0] != s->route.E)
        return fail(c, MOE_EINVAL, "experts hold %lld/%lld experts, the router %d",
                    (long long)gu[0], (long long)dn[0], s->route.E);
    if ((rc = fused_orientation(c, gu, dn)) < 0)
        return rc;
    s->layout = (mp_layout)rc;
    s->I = s->layout == MP_LAYOUT_FUSED3D ? dn[2] : dn[1];
    copy_name(s->gate, "gate_up_proj");
    copy_name(s->up, "");
    copy_name(s->down, "down_proj");
    return 0;
}

/* A family row that lists its checked layouts refuses the others: the same family name in another
   layout (another transformers version, remote code) may route or return differently. */
static int check_layout(struct ctx *c)
{
    static const char *const names[] = {"nn.ModuleList experts", "3-D experts [E, 2I, H]",
                                        "transposed 3-D experts [E, H, 2I]"};
    mp_layout l = c->spec->layout;

    if (!c->fam || !c->fam->layouts || (c->fam->layouts & MP_LAYOUT_BIT(l)))
        return 0;
    return fail(c, MOE_EUNSUPPORTED,
                "%s with %s: that layout of the family was not checked against its source; not "
                "supported",
                c->spec->family, names[l]);
}

static int find_experts(struct ctx *c)
{
    copy_name(c->spec->experts, "experts");
    if (!c->experts)
        return fail(c, MOE_EINVAL, "no experts: block.experts is missing");
    if (mp__has(c->experts, "gate_up_proj"))
        return experts_fused(c);
    Py_ssize_t n = mp__seq_len(c->experts);
    if (n > 0)
        return experts_modulelist(c, n);
    return fail(
        c, MOE_EINVAL,
        "block.experts is neither a list of expert MLPs nor a module with 3-D gate_up_proj");
}

/* ---- activation ---- */

/* act is an nn.SiLU / transformers SiLUActivation module or the function silu; its name in name. */
static int silu_act_fn(PyObject *act, char *name, size_t len)
{
    if (mp__type_name(act, name, len) && (!strcmp(name, "SiLU") || !strcmp(name, "SiLUActivation")))
        return 1;
    mp__attr_str(act, "__name__", name, len); /* a plain function: torch.nn.functional.silu */
    return !strcmp(name, "silu");
}

static int check_activation(struct ctx *c)
{
    char act[64], name[64];

    int have_cfg = mp__attr_str(c->config, "hidden_act", act, sizeof act);
    if (have_cfg && strcmp(act, "silu") != 0 && strcmp(act, "swish") != 0)
        return fail(c, MOE_EUNSUPPORTED, "activation %s is not supported (only silu)", act);
    PyObject *fn = mp__attr(c->experts, "act_fn");
    if (!fn && mp__seq_len(c->experts) > 0) {
        PyObject *e0 = mp__seq_item(c->experts, 0);
        fn = mp__attr(e0, "act_fn");
        Py_XDECREF(e0);
    }
    int ok = fn ? silu_act_fn(fn, name, sizeof name) : have_cfg;
    Py_XDECREF(fn);
    if (!fn && !have_cfg)
        return fail(c, MOE_EUNSUPPORTED,
                    "cannot tell the experts' activation (no config.hidden_act, no act_fn)");
    if (!ok)
        return fail(c, MOE_EUNSUPPORTED, "activation %s is not supported (only silu)", name);
    return 0;
}

/* ---- routing ---- */

/* First integer found as one of names on block, router, config, in that order of objects. */
static int find_long(PyObject *const *objs, const char *const *names, long *out)
{
    for (int o = 0; objs[o]; o++)
        for (int n = 0; names[n]; n++)
            if (mp__attr_long(objs[o], names[n], out))
                return 1;
    return 0;
}

static int find_top_k(struct ctx *c)
{
    static const char *const k_names[] = {"top_k", "num_experts_per_tok", NULL};
    PyObject *objs[4] = {c->block, c->router, c->config, NULL};
    long K;

    if (!c->config)
        objs[2] = NULL;
    if (!find_long(objs, k_names, &K))
        return fail(c, MOE_EINVAL, "no top-k: block/router top_k or num_experts_per_tok");
    if (K < 1 || K > c->spec->route.E)
        return fail(c, MOE_EINVAL, "top-k %ld is outside 1..E=%d", K, c->spec->route.E);
    c->spec->route.K = (int)K;
    return 0;
}

/* Selection bias [E]: on the router (Bailing expert_bias, DeepSeek/GLM e_score_correction_bias), or
   on the block where the family row says the block holds it and passes it to the router (HY-V3,
   MiniMax-M2: gate(x, self.e_score_correction_bias)). */
static int find_bias(struct ctx *c)
{
    static const char *const names[] = {"e_score_correction_bias", "expert_bias", NULL};
    const char *name = NULL;
    char what[WHAT_LEN], dtype[DTYPE_LEN];
    int64_t d[MP_MAX_DIMS] = {0};
    int want_block = c->fam && c->fam->block_bias;
    int on_block = 0;

    PyObject *b = first_attr(c->router, names, &name);
    if (!b && (b = first_attr(c->block, names, &name)))
        on_block = 1;
    if (on_block && !want_block) {
        Py_DECREF(b);
        return fail(c, MOE_EUNSUPPORTED,
                    "selection bias block.%s is not on the router; "
                    "not supported",
                    name);
    }
    if (want_block && !on_block) {
        Py_XDECREF(b);
        if (b)
            return fail(c, MOE_EUNSUPPORTED,
                        "%s keeps its selection bias on the block, but it is %s.%s; not supported",
                        c->fam->name, c->spec->router, name);
        return fail(c, MOE_EUNSUPPORTED,
                    "%s block has no selection bias (e_score_correction_bias), which its router "
                    "takes; not supported",
                    c->fam->name);
    }
    if (!b)
        return 0;
    if (on_block)
        snprintf(what, sizeof what, "block.%s", name);
    else
        snprintf(what, sizeof what, "%s.%s", c->spec->router, name);
    int rc = check_tensor(c, b, what, 1, d, dtype);
    Py_DECREF(b);
    if (rc < 0)
        return rc;
    if (d[0] != c->spec->route.E)
        return fail(c, MOE_EINVAL, "%s has %lld entries, E=%d", what, (long long)d[0],
                    c->spec->route.E);
    copy_name(c->spec->bias, name);
    c->spec->bias_on_block = on_block;
    return 0;
}

/* topk_method, where router, block or config names one: a family row that implements one method
   (DeepSeek-V2: greedy) accepts only that one and requires it to be named (its code has no
   default); other rows accept noaux_tc and greedy. A config that switches the method (DeepSeek-V2's
   group_limited_greedy: the best topk_group groups by their max score, the others masked 0) is
   refused rather than routed the greedy way. */
static int check_topk_method(struct ctx *c)
{
    PyObject *objs[4] = {c->router, c->block, c->config, NULL};
    const char *want = c->fam ? c->fam->topk_method : NULL;
    char v[32];

    for (int o = 0; objs[o]; o++) {
        if (!mp__attr_str(objs[o], "topk_method", v, sizeof v))
            continue;
        if (want && strcmp(v, want) != 0)
            return fail(c, MOE_EUNSUPPORTED,
                        "%s routes with topk_method=%s, which the fused path does not implement "
                        "(only %s); not supported",
                        c->fam->name, v, want);
        if (!want && strcmp(v, "noaux_tc") != 0 && strcmp(v, "greedy") != 0)
            return fail(c, MOE_EUNSUPPORTED, "top-k method %s is not supported", v);
        return 0;
    }
    if (want)
        return fail(c, MOE_EUNSUPPORTED,
                    "%s: no topk_method on router, block or config (only %s is implemented); not "
                    "supported",
                    c->fam->name, want);
    return 0;
}

/* Recipe: a selection bias or the family says sigmoid; scoring_func / topk_method, where a remote
   config names them, must agree with what the kernels do. */
static int find_recipe(struct ctx *c)
{
    PyObject *objs[4] = {c->router, c->block, c->config, NULL};
    char v[32];
    moe_recipe r = c->spec->bias[0] ? MOE_ROUTE_SIGMOID_GROUP
                   : c->fam         ? c->fam->recipe
                                    : MOE_ROUTE_SOFTMAX_TOPK;

    if (c->fam && c->fam->recipe == MOE_ROUTE_SOFTMAX_TOPK && c->spec->bias[0])
        return fail(c, MOE_EUNSUPPORTED, "%s routes with softmax but the router has %s",
                    c->fam->name, c->spec->bias);
    for (int o = 0; objs[o]; o++) {
        if (mp__attr_str(objs[o], "scoring_func", v, sizeof v)) {
            if (strcmp(v, "sigmoid") == 0 && !c->fam)
                r = MOE_ROUTE_SIGMOID_GROUP;
            else if (strcmp(v, r == MOE_ROUTE_SIGMOID_GROUP ? "sigmoid" : "softmax") != 0)
                return fail(c, MOE_EUNSUPPORTED, "scoring function %s is not supported here", v);
            break;
        }
    }
    int rc = check_topk_method(c);
    if (rc < 0)
        return rc;
    c->spec->route.recipe = r;
    /* Guessing the routing details or the return value of an unknown family could silently change
       what the model computes: only families in the table are patched. */
    if (!c->fam)
        return fail(c, MOE_EUNSUPPORTED,
                    "unknown MoE family %s: its routing and return convention are not in the "
                    "family table",
                    c->spec->family);
    return 0;
}

static int find_groups(struct ctx *c)
{
    static const char *const g_names[] = {"n_group", "num_group", "n_groups", NULL};
    static const char *const tg_names[] = {"topk_group", NULL};
    PyObject *objs[4] = {c->router, c->block, c->config, NULL};
    struct moe_route_cfg *r = &c->spec->route;
    long G = 1, TG;

    if (c->fam && c->fam->no_groups) { /* the family's code never reads them */
        r->n_group = r->topk_group = 1;
        return 0;
    }
    find_long(objs, g_names, &G);
    TG = G;
    find_long(objs, tg_names, &TG);
    if (G < 1 || TG < 1 || TG > G)
        return fail(c, MOE_EINVAL, "groups n_group=%ld topk_group=%ld are inconsistent", G, TG);
    if (r->recipe == MOE_ROUTE_SOFTMAX_TOPK && TG < G)
        return fail(c, MOE_EUNSUPPORTED, "group-limited softmax routing is not supported");
    if (r->recipe == MOE_ROUTE_SOFTMAX_TOPK)
        G = TG = 1;
    if (r->E % G != 0)
        return fail(c, MOE_EUNSUPPORTED, "E=%d experts do not split into n_group=%ld groups", r->E,
                    G);
    if (G > 1 && r->E / G < 2)
        return fail(c, MOE_EUNSUPPORTED, "groups of one expert (E=%d, n_group=%ld)", r->E, G);
    if (r->K > TG * (r->E / G))
        return fail(c, MOE_EUNSUPPORTED, "top-k %d exceeds the %ld experts of the kept groups",
                    r->K, TG * (r->E / G));
    r->n_group = (int)G;
    r->topk_group = (int)TG;
    return 0;
}

static void find_norm_scale(struct ctx *c)
{
    PyObject *objs[4] = {c->block, c->router, c->config, NULL};
    struct moe_route_cfg *r = &c->spec->route;
    const struct mp_family *f = c->fam;
    const char *scale_attr = f->scale_attr ? f->scale_attr : "routed_scaling_factor";
    int norm = f->norm_default;
    double scale = 1.0;

    for (int o = 0; objs[o]; o++)
        if (mp__attr_bool(objs[o], "norm_topk_prob", &norm))
            break;
    if (f->norm == MP_NORM_ALWAYS)
        norm = 1;
    else if (f->norm == MP_NORM_NEVER)
        norm = 0;
    else if (f->norm == MP_NORM_K_GT_1 || f->norm_needs_k_gt_1)
        norm = (f->norm == MP_NORM_K_GT_1 || norm) && r->K > 1;
    r->norm = norm;
    r->norm_eps = f->norm_eps;

    /* softmax families apply a scale only where their code holds one (router or block) */
    if (r->recipe == MOE_ROUTE_SOFTMAX_TOPK)
        objs[2] = NULL;
    for (int o = 0; *scale_attr && objs[o]; o++)
        if (mp__attr_double(objs[o], scale_attr, &scale))
            break;
    r->scale = (float)scale;
}

/* ---- shared experts ---- */

static int find_shared(struct ctx *c)
{
    static const char *const names[3] = {"gate_proj", "up_proj", "down_proj"};
    struct moe_spec *s = c->spec;
    const char *name = mp__has(c->block, "shared_experts")  ? "shared_experts"
                       : mp__has(c->block, "shared_expert") ? "shared_expert"
                                                            : NULL;
    int rc;

    s->shared = MP_SHARED_NONE;
    if (!name)
        return 0;
    PyObject *m = mp__attr(c->block, name);
    s->shared_I = 0;
    rc = check_mlp(c, m, name, names, s->H, &s->shared_I);
    if (rc == 0 && mp__has(m, "act_fn")) {
        PyObject *act = mp__attr(m, "act_fn");
        char an[64];
        if (!silu_act_fn(act, an, sizeof an))
            rc = fail(c, MOE_EUNSUPPORTED, "%s activation %s is not supported", name, an);
        Py_XDECREF(act);
    }
    Py_XDECREF(m);
    if (rc < 0)
        return rc;
    copy_name(s->shared_name, name);
    s->shared = MP_SHARED_PLAIN;
    PyObject *g = mp__attr(c->block, "shared_expert_gate");
    if (g) {
        int64_t rows = 1, cols = s->H;
        char dtype[DTYPE_LEN];
        rc = check_linear(c, g, "shared_expert_gate", &rows, &cols, dtype);
        if (rc == 0)
            rc = same_dtype(c, "shared_expert_gate.weight", dtype);
        Py_DECREF(g);
        if (rc < 0)
            return rc;
        s->shared = MP_SHARED_GATED;
        copy_name(s->shared_gate_name, "shared_expert_gate");
    }
    return 0;
}

/* ---- the whole ---- */

static void finish(struct ctx *c)
{
    struct moe_spec *s = c->spec;
    int list = s->layout == MP_LAYOUT_MODULELIST;
    s->logits_fp32 = c->fam->logits_fp32;
    s->ret = list                               ? c->fam->ret_list
             : s->layout == MP_LAYOUT_FUSED3D_T ? c->fam->ret_3d_t
                                                : c->fam->ret_3d;
    s->route.mask_value = list ? c->fam->mask_list : c->fam->mask_3d;
    if (s->route.recipe == MOE_ROUTE_SOFTMAX_TOPK)
        s->route.mask_value = -INFINITY; /* unused: no group limit */
    if (mp__has(c->block, "jitter_noise"))
        copy_name(s->jitter_attr, "jitter_noise");
    else if (c->fam->jitter_attr)
        copy_name(s->jitter_attr, c->fam->jitter_attr);
}

static int detect(struct ctx *c)
{
    int rc;
    if ((rc = find_router(c)) < 0)
        return rc;
    c->experts = mp__attr(c->block, "experts");
    find_config(c);
    if ((rc = find_family(c)) < 0 || (rc = find_experts(c)) < 0 || (rc = check_layout(c)) < 0 ||
        (rc = check_activation(c)) < 0 || (rc = find_top_k(c)) < 0 || (rc = find_bias(c)) < 0 ||
        (rc = find_recipe(c)) < 0 || (rc = find_groups(c)) < 0)
        return rc;
    find_norm_scale(c);
    if ((rc = find_shared(c)) < 0)
        return rc;
    finish(c);
    return 0;
}

int mp_detect(PyObject *block, struct moe_spec *spec, char *reason, size_t reason_len)
{
    struct ctx c = {.block = block, .spec = spec, .reason = reason, .reason_len = reason_len};
    if (reason && reason_len)
        reason[0] = '\0';
    if (!block || !spec)
        return fail(&c, MOE_EINVAL, "no block or no spec");
    memset(spec, 0, sizeof *spec);
    int rc = detect(&c);
    Py_XDECREF(c.router);
    Py_XDECREF(c.experts);
    Py_XDECREF(c.config);
    if (PyErr_Occurred())
        PyErr_Clear();
    if (rc < 0) {
        memset(spec, 0, sizeof *spec);
        return rc;
    }
    return 0;
}
