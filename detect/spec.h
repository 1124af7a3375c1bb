/*
 * detect/spec.h — what detection learns about one MoE block instance (struct moe_spec), or why it
 * refuses it. Detection reads attributes only (never isinstance or class names of candidates); the
 * family hint (module name, config.model_type) only picks the routing recipe and return convention.
 * The spec holds attribute *names*, not tensors: weights move (FSDP, .to(), checkpoint loads), so
 * the glue re-reads the tensors through these names and re-validates them on every call.
 */
#ifndef MP_SPEC_H
#define MP_SPEC_H

#include "../kernels/moe.h"

#define MP_NAME 48
#define MP_REASON 256

typedef enum {
    MP_LAYOUT_MODULELIST = 0, /* experts = ModuleList of MLPs with gate/up/down Linear (no bias) */
    MP_LAYOUT_FUSED3D =
        1, /* experts.gate_up_proj [E, 2I, H] (gate rows, then up), down_proj [E, H, I] */
    MP_LAYOUT_FUSED3D_T =
        2, /* transposed: gate_up_proj [E, H, 2I], down_proj [E, I, H] (Llama-4) */
} mp_layout;

typedef enum {
    MP_RET_TENSOR = 0,  /* y [B, S, H] (transformers 5 native, DeepSeek/GLM remote code) */
    MP_RET_LOGITS = 1,  /* (y, router_logits [B*S, E]) (transformers 4 Mixtral/Qwen/OLMoE) */
    MP_RET_BAILING = 2, /* (y, (router_logits [B, S, E], topk_idx [B, S, K])) (Bailing V2) */
} mp_return;

typedef enum {
    MP_SHARED_NONE = 0,
    MP_SHARED_PLAIN = 1, /* y += shared(x) */
    MP_SHARED_GATED = 2, /* y += sigmoid(shared_gate(x)) * shared(x) (Qwen2-MoE, Qwen3-Next) */
} mp_shared;

struct moe_spec {
    char family[MP_NAME]; /* e.g. "bailing_moe_v2", "qwen3_moe", "deepseek_v3" */
    struct moe_route_cfg route;
    int64_t H, I;
    mp_layout layout;
    mp_return ret;

    /* router: block.<router> is a module with .weight [E, H] */
    char router[MP_NAME]; /* "gate" or "router" */
    int logits_fp32; /* logits = x.float() @ W.float().T (else in the input dtype, then .float()) */
    char bias[MP_NAME]; /* attribute holding the selection bias [E], "" = none */
    int bias_on_block;  /* the bias is block.<bias> (passed to the router: router(x, bias)), else
                           <router>.<bias> */

    /* experts: block.<experts>; ModuleList: experts[e].<gate>/<up>/<down>.weight;
       3-D: experts.<gate> is gate_up_proj, experts.<down> is down_proj, <up> is "" */
    char experts[MP_NAME];
    char gate[MP_NAME], up[MP_NAME], down[MP_NAME];

    /* shared expert: block.<shared_name> MLP with gate_proj/up_proj/down_proj, optional gate Linear
     */
    mp_shared shared;
    char shared_name[MP_NAME];
    char shared_gate_name[MP_NAME];
    int64_t shared_I;

    /* Mixtral-style input jitter: the fused path refuses calls made in training with jitter > 0 */
    char jitter_attr[MP_NAME];
};

/* 0 and a filled spec, or a negative code and a one-line reason (never both). */
#ifdef MP_HAVE_PYTHON
#include <Python.h>
int mp_detect(PyObject *block, struct moe_spec *spec, char *reason, size_t reason_len);
#endif

#endif /* MP_SPEC_H */
