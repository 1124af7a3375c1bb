/*
 * detect/families.c — the table of family rules (see families.h), each row checked against the
 * family's source: transformers 4.57 (nn.ModuleList experts) and 5.17 / 5.23 (3-D experts), and
 * the remote-code files modeling_bailing_moe_v2.py (inclusionAI) and modeling_deepseek.py
 * (DeepSeek-V3 / Kimi-K2). The one fact a reader must know: the masked-group score of the
 * DeepSeek-V3 / GLM-4.5 recipe changed between versions (masked_fill 0.0 in transformers 4 and in
 * the remote code, -inf in transformers 5), so it is keyed on the experts layout.
 */
#include "families.h"

#include <math.h>
#include <string.h>

static const struct mp_family families[] = {
    /* gate: fp32 logits; sigmoid; + expert_bias; top-2 group sums; masked -inf; weights ÷ (Σ +
       1e-20) iff top_k > 1; × routed_scaling_factor. Block returns (y, (logits, topk_idx)). */
    {.name = "bailing_moe_v2",
     .hints = {"bailing_moe_v2"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm = MP_NORM_K_GT_1,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_BAILING,
     .ret_3d = MP_RET_BAILING},
    /* transformers: fp32 logits; masked 0.0 (4.x) / -inf (5.x); ÷ (Σ + 1e-20) if norm_topk_prob
       (config default True); block returns the tensor. */
    {.name = "deepseek_v3",
     .hints = {"deepseek_v3"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm_default = 1,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = 0.0f,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_TENSOR,
     .ret_3d = MP_RET_TENSOR},
    {.name = "glm4_moe",
     .hints = {"glm4_moe"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm_default = 1,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = 0.0f,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_TENSOR,
     .ret_3d = MP_RET_TENSOR},
    /* remote modeling_deepseek.py (MoEGate): as transformers 4, but ÷ only if top_k > 1. */
    {.name = "deepseek_remote",
     .hints = {"deepseek", "kimi_k2"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm_default = 1,
     .norm_needs_k_gt_1 = 1,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = 0.0f,
     .mask_3d = 0.0f,
     .ret_list = MP_RET_TENSOR,
     .ret_3d = MP_RET_TENSOR},
    /* logits F.linear in the input dtype; softmax fp32; top-K; ÷ Σ (no eps) if norm_topk_prob
       (config default False; Qwen3-Next True); 4.x returns (y, logits), 5.x y. */
    {.name = "qwen2_moe",
     .hints = {"qwen2_moe"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR},
    {.name = "qwen3_moe",
     .hints = {"qwen3_moe"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR},
    {.name = "qwen3_next",
     .hints = {"qwen3_next"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm_default = 1,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR},
    {.name = "olmoe",
     .hints = {"olmoe"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR},
    /* as Qwen, but always ÷ Σ; jitter_noise scales the input in training. */
    {.name = "mixtral",
     .hints = {"mixtral"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm = MP_NORM_ALWAYS,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR,
     .jitter_attr = "jitter_noise"},
    {.name = "llama4",
     .hints = {"llama4", "llama4_text"},
     .prefer_transposed = 1,
     .refuse = "llama4 routing scales the expert input; not supported yet"},
    {.name = "gpt_oss",
     .hints = {"gpt_oss"},
     .prefer_transposed = 1,
     .refuse = "gpt-oss experts (biases, clamped SwiGLU) are not supported yet"},
};

const struct mp_family *mp__family_find(const char *hint)
{
    if (!hint || !*hint)
        return NULL;
    for (size_t i = 0; i < sizeof families / sizeof families[0]; i++)
        for (size_t h = 0; h < 4 && families[i].hints[h]; h++)
            if (strcmp(families[i].hints[h], hint) == 0)
                return &families[i];
    return NULL;
}
