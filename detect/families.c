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
    /* Rows below were checked against transformers 5.17 (3-D experts) and, where the family
       exists there, 4.57.6; each row admits only the layouts so checked (.layouts). "Copy of X"
       means the router, experts, block and shared-MLP classes are X's after renaming. */

    /* qwen3_vl_moe text model (model_type qwen3_vl_moe_text): the Qwen3-MoE softmax router, but
       always ÷ Σ (no norm_topk_prob read). 5.17: Qwen3VLMoeTextTopKRouter, [E, 2I, H], returns
       y. 4.57: gate = nn.Linear, transposed [E, H, 2I] experts, block returns (y, logits [T, E]),
       router_logits recorded from block output 1. No config on block/gate/experts. */
    {.name = "qwen3_vl_moe",
     .hints = {"qwen3_vl_moe", "qwen3_vl_moe_text"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm = MP_NORM_ALWAYS,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .ret_3d_t = MP_RET_LOGITS,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D) | MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D_T)},
    /* qwen3_5_moe text model (qwen3_5_moe_text), 5.17 only: copy of Qwen3-Next (sigmoid-gated
       shared_expert) except that the router always ÷ Σ; its config has no norm_topk_prob. */
    {.name = "qwen3_5_moe",
     .hints = {"qwen3_5_moe", "qwen3_5_moe_text"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm = MP_NORM_ALWAYS,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* 5.17-only copies of the transformers-5 DeepSeek-V3 / GLM-4.5 block: fp32 logits, sigmoid,
       + e_score_correction_bias, top-2 group sums masked -inf, ÷ (Σ + 1e-20) if norm_topk_prob,
       × routed_scaling_factor, plain shared_experts (none in mimo_v2_flash), returns y. Only
       differences: the bias buffer is created fp32 (as glm4_moe's); the attention (MLA, DSA
       indexer, linear attention) is outside the block. */
    {.name = "deepseek_v3_tf5_copies",
     .hints = {"deepseek_v32", "glm4_moe_lite", "glm_moe_dsa", "exaone_moe", "kimi_linear",
               "solar_open", "mimo_v2_flash"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm_default = 1,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = 0.0f,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* copies of glm4_moe in both versions: 5.17 3-D as above; 4.57 nn.ModuleList with the
       transformers-4 router (masked_fill 0.0, gate returns (idx, weights)), block returns y. */
    {.name = "glm4_moe_copies",
     .hints = {"dots1", "glm4v_moe", "glm4v_moe_text"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm_default = 1,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = 0.0f,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_TENSOR,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_MODULELIST) | MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* axk2, 5.17 only: the DeepSeek-V3 block, but masked groups score 0.0 (as the remote code)
       and the group step is skipped when n_group is None (then one group here). */
    {.name = "axk2",
     .hints = {"axk2"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm_default = 1,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = 0.0f,
     .mask_3d = 0.0f,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* copy of qwen3_moe, 5.17 only (norm_topk_prob, logits in the input dtype). */
    {.name = "mellum",
     .hints = {"mellum"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* copy of qwen3_moe in both versions: 4.57 gate = nn.Linear + nn.ModuleList, returns
       (y, logits); 5.17 3-D, returns y. */
    {.name = "flex_olmo",
     .hints = {"flex_olmo"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_MODULELIST) | MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* copy of mixtral in both versions (4.57 w1/w3/w2 nn.ModuleList returning (y, logits); 5.17
       MixtralTopKRouter math, returns y), jitter_noise from config.router_jitter_noise. */
    {.name = "minimax",
     .hints = {"minimax"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm = MP_NORM_ALWAYS,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR,
     .jitter_attr = "jitter_noise",
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_MODULELIST) | MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* Granite MoE, 5.17 (router named router): logits in the input dtype, .float(), top-K of the
       logits, softmax over those K = the top-K softmax probabilities ÷ Σ; returns y. (4.57's
       ParallelExperts input_linear/output_linear are not an experts layout detection knows.) */
    {.name = "granitemoe",
     .hints = {"granitemoe", "granitemoe_swa", "granitemoeshared"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm = MP_NORM_ALWAYS,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* Jamba: block.router = nn.Linear (input dtype), softmax fp32, top-K, never ÷ Σ, cast to the
       input dtype; 4.57 nn.ModuleList returns (y, logits), 5.17 3-D returns y. */
    {.name = "jamba",
     .hints = {"jamba"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm = MP_NORM_NEVER,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_list = MP_RET_LOGITS,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_MODULELIST) | MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D)},
    /* hy_v3, 5.17 only. HYV3MoE holds e_score_correction_bias (buffer, fp32: in
       _keep_in_fp32_modules_strict) and calls gate(x, bias); HYV3TopKRouter: fp32 logits, sigmoid,
       top-K of sigmoid + bias (sorted=False; no groups), weights = the unbiased sigmoid ÷ (Σ +
       1e-20) always (no norm_topk_prob), × router.router_scaling_factor. Plain shared_experts
       (summed in fp32 if enable_moe_fp32_combine, one rounding either way); returns y. Router
       logits of the outputs recorder: router output 0 (the model adds no aux loss: aux_loss=None).
     */
    {.name = "hy_v3",
     .hints = {"hy_v3"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm = MP_NORM_ALWAYS,
     .norm_eps = 1e-20f,
     .logits_fp32 = 1,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D),
     .block_bias = 1,
     .scale_attr = "router_scaling_factor",
     .no_groups = 1},
    /* minimax_m2, 5.17 only. The block holds e_score_correction_bias (buffer in the model dtype)
       and calls gate(x, bias); MiniMaxM2TopKRouter: logits F.linear in the weight dtype, sigmoid of
       logits.float(), top-K of sigmoid + bias (sorted=False; no groups), weights = the unbiased
       sigmoid ÷ Σ (no eps) always, no scale. No shared expert; jitter_noise on the block (input
       scaled in training); returns y. Aux loss (softmax, Switch) from router output 0. */
    {.name = "minimax_m2",
     .hints = {"minimax_m2"},
     .recipe = MOE_ROUTE_SIGMOID_GROUP,
     .norm = MP_NORM_ALWAYS,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D),
     .jitter_attr = "jitter_noise",
     .block_bias = 1,
     .scale_attr = "",
     .no_groups = 1},
    /* deepseek_v2, 5.17 only, topk_method "greedy" (the config default; DeepSeek-V2-Lite):
       DeepseekV2TopkRouter: fp32 logits, softmax fp32, top-K (sorted=False), never ÷ Σ (the router
       never reads norm_topk_prob), × router.routed_scaling_factor; n_group/topk_group are read only
       by group_limited_greedy, which is refused (topk_method). Plain shared_experts; returns y. No
       router logits are recorded and there is no aux loss. */
    {.name = "deepseek_v2",
     .hints = {"deepseek_v2"},
     .recipe = MOE_ROUTE_SOFTMAX_TOPK,
     .norm = MP_NORM_NEVER,
     .logits_fp32 = 1,
     .mask_list = -INFINITY,
     .mask_3d = -INFINITY,
     .ret_3d = MP_RET_TENSOR,
     .layouts = MP_LAYOUT_BIT(MP_LAYOUT_FUSED3D),
     .no_groups = 1,
     .topk_method = "greedy"},
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
        for (size_t h = 0;
             h < sizeof families[i].hints / sizeof families[i].hints[0] && families[i].hints[h];
             h++)
            if (strcmp(families[i].hints[h], hint) == 0)
                return &families[i];
    return NULL;
}
