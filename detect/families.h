/*
 * detect/families.h — the one table of family rules. A family hint (the defining module's file
 * name, else config.model_type) picks the row; the row only says what the attributes cannot: the
 * routing recipe when no selection bias is present, how the K weights are renormalised, the dtype
 * of the router logits, the selection score of masked groups, the return convention, the Mixtral
 * jitter, which expert layouts were checked against the family's source, whether the selection bias
 * lives on the block, the name of the scale attribute, whether the code has a group step at all and
 * which topk_method it implements. Structure (router, experts, shapes, K, groups, scale, shared
 * experts) always comes from attributes.
 */
#ifndef MP_FAMILIES_H
#define MP_FAMILIES_H

#include "spec.h"

typedef enum {
    MP_NORM_ATTR = 0,   /* norm_topk_prob attribute (block, router, config), else norm_default */
    MP_NORM_ALWAYS = 1, /* always renormalise (Mixtral) */
    MP_NORM_K_GT_1 = 2, /* renormalise iff K > 1, whatever norm_topk_prob says (Bailing V2) */
    MP_NORM_NEVER = 3,  /* never renormalise, whatever norm_topk_prob says (Jamba) */
} mp_norm_rule;

/* Bit of one mp_layout in mp_family.layouts. */
#define MP_LAYOUT_BIT(layout) (1u << (unsigned)(layout))

struct mp_family {
    const char *name;     /* canonical name of the rules, e.g. "deepseek_v3" */
    const char *hints[8]; /* exact names: module file "modeling_<hint>" or config.model_type */
    moe_recipe recipe;    /* recipe when the router carries no selection bias */
    mp_norm_rule norm;
    int norm_default;      /* MP_NORM_ATTR without the attribute */
    int norm_needs_k_gt_1; /* MP_NORM_ATTR and K > 1 (DeepSeek remote code) */
    float norm_eps;
    int logits_fp32;            /* router computes x.float() @ W.float().T */
    float mask_list, mask_3d;   /* selection score of experts outside kept groups, per layout */
    mp_return ret_list, ret_3d; /* return convention, per layout */
    mp_return ret_3d_t;         /* ... of the transposed 3-D layout (MP_RET_TENSOR unless set) */
    unsigned layouts; /* MP_LAYOUT_BITs of the layouts checked against a source, the others are
                         refused; 0 = any layout (the rows written before this field) */
    const char *jitter_attr; /* Mixtral input jitter attribute, NULL = none */
    int prefer_transposed;   /* 3-D shapes that fit both layouts: take the transposed one */
    const char *refuse;      /* non-NULL: the family is recognised but not supported (why) */
    int block_bias; /* the block (not the router) holds the selection bias and passes it to the
                       router as its second argument, gate(x, bias) (HY-V3, MiniMax-M2); a bias on
                       the router, or none, is refused. 0: the bias, if any, is on the router */
    const char *scale_attr;  /* attribute of the routed scale; NULL: routed_scaling_factor; "": the
                                family has no scale (1, whatever the config carries) */
    int no_groups;           /* the code has no group step: n_group/topk_group are ignored */
    const char *topk_method; /* the one topk_method the code implements, read from router, block
                                or config, any other value (or none) refused; NULL: where one is
                                named, noaux_tc or greedy */
};

/* Row for a hint (module file name without "modeling_", or a model_type); NULL when unknown. */
const struct mp_family *mp__family_find(const char *hint);
/* Rules for blocks of no known family, by the recipe their router's attributes call for. */

#endif /* MP_FAMILIES_H */
