/*
 * tests/c/test_detect.c — detection (mp_detect) on plain Python objects in an embedded interpreter.
 * The fixtures below are namespaces with the attribute names, shapes and dtypes of each family's
 * MoE block (fake tensors: .shape tuple, .dtype whose str() is "torch.bfloat16"); detection must
 * judge them by attributes alone, so the class names here are deliberately meaningless. Each test
 * runs in its own process (Criterion), so each starts its own interpreter.
 */
#include <Python.h>

#include <criterion/criterion.h>
#include <math.h>
#include <string.h>

#include "../../detect/spec.h"

static const char fixtures[] =
    "BF16, F32 = 'torch.bfloat16', 'torch.float32'\n"
    "H, I, E = 16, 8, 8\n"
    "class DType:\n"
    "    def __init__(self, name): self.name = name\n"
    "    def __str__(self): return self.name\n"
    "class Obj:\n"
    "    def __init__(self, **attrs): self.__dict__.update(attrs)\n"
    "class Tensor(Obj):\n"
    "    def __init__(self, *shape, dtype=BF16, **extra):\n"
    "        super().__init__(shape=tuple(shape), dtype=DType(dtype), **extra)\n"
    "class SiLU: pass\n"
    "class SiLUActivation: pass\n"
    "class GELUActivation: pass\n"
    "def linear(rows, cols, dtype=BF16, **extra):\n"
    "    return Obj(weight=Tensor(rows, cols, dtype=dtype), bias=None, **extra)\n"
    "def mlp(H, I, names=('gate_proj', 'up_proj', 'down_proj'), dtype=BF16, act=SiLU, **extra):\n"
    "    g, u, d = names\n"
    "    return Obj(**{g: linear(I, H, dtype), u: linear(I, H, dtype), d: linear(H, I, dtype)},\n"
    "               act_fn=act(), **extra)\n"
    "def experts3d(transposed=False, dtype=BF16, **extra):\n"
    "    gu = (E, H, 2 * I) if transposed else (E, 2 * I, H)\n"
    "    dn = (E, I, H) if transposed else (E, H, I)\n"
    "    attrs = dict(gate_up_proj=Tensor(*gu, dtype=dtype), down_proj=Tensor(*dn, dtype=dtype),\n"
    "                 act_fn=SiLUActivation(), has_bias=False, has_gate=True,\n"
    "                 is_transposed=transposed, is_concatenated=True)\n"
    "    attrs.update(extra)\n"
    "    return Obj(**attrs)\n"
    "def block(module, **attrs):\n"
    "    return type('Thing', (Obj,), {'__module__': module})(**attrs)\n"
    "def tf(name): return 'transformers.models.%s.modeling_%s' % (name, name)\n"
    "def config(model_type, **kw): return Obj(model_type=model_type, hidden_act='silu', **kw)\n"
    "def edit(b, fn):\n"
    "    fn(b)\n"
    "    return b\n"
    "BAILING = 'transformers_modules.inclusionAI.Ring_mini_2_0.abc123.modeling_bailing_moe_v2'\n"
    "def bailing(K=2, bias_param=False, **over):\n"
    "    bias = Tensor(E, dtype=F32, requires_grad=False) if bias_param else Tensor(E, dtype=F32)\n"
    "    cfg = config('bailing_moe_v2', num_experts_per_tok=K, norm_topk_prob=True, n_group=4,\n"
    "                 topk_group=2, routed_scaling_factor=2.5)\n"
    "    gate = Obj(config=cfg, weight=Tensor(E, H), expert_bias=bias, top_k=K, num_experts=E,\n"
    "               n_group=4, topk_group=2, routed_scaling_factor=2.5)\n"
    "    attrs = dict(config=cfg, num_experts_per_tok=K, gate=gate,\n"
    "                 experts=[mlp(H, I, config=cfg) for _ in range(E)],\n"
    "                 shared_experts=mlp(H, 2 * I, config=cfg))\n"
    "    attrs.update(over)\n"
    "    return block(BAILING, **attrs)\n"
    "def softmax_tf5(family, K=2, norm=True, **over):\n"
    "    cfg = config(family, num_experts_per_tok=K, norm_topk_prob=norm)\n"
    "    gate = Obj(weight=Tensor(E, H), top_k=K, num_experts=E, norm_topk_prob=norm, "
    "hidden_dim=H)\n"
    "    attrs = dict(gate=gate, experts=experts3d(config=cfg))\n"
    "    attrs.update(over)\n"
    "    return block(tf(family), **attrs)\n"
    "def softmax_tf4(family, K=2, norm=False, **over):\n"
    "    cfg = config(family, num_experts_per_tok=K, norm_topk_prob=norm)\n"
    "    attrs = dict(num_experts=E, top_k=K, norm_topk_prob=norm, gate=linear(E, H),\n"
    "                 experts=[mlp(H, I, config=cfg) for _ in range(E)])\n"
    "    attrs.update(over)\n"
    "    return block(tf(family), **attrs)\n"
    "def mixtral_tf4(**over):\n"
    "    attrs = dict(hidden_dim=H, ffn_dim=I, num_experts=E, top_k=2, gate=linear(E, H),\n"
    "                 experts=[mlp(H, I, names=('w1', 'w3', 'w2')) for _ in range(E)],\n"
    "                 jitter_noise=0.1)\n"
    "    attrs.update(over)\n"
    "    return block(tf('mixtral'), **attrs)\n"
    "def qwen2_tf4(**over):\n"
    "    attrs = dict(shared_expert=mlp(H, 3 * I), shared_expert_gate=linear(1, H))\n"
    "    attrs.update(over)\n"
    "    return softmax_tf4('qwen2_moe', **attrs)\n"
    "DEEPSEEK_REMOTE = 'transformers_modules.deepseek_ai.DeepSeek_V3.h.modeling_deepseek'\n"
    "def deepseek(module=tf('deepseek_v3'), family='deepseek_v3', K=2, fused=False, n_group=4,\n"
    "             **over):\n"
    "    cfg = config(family, num_experts_per_tok=K, n_group=n_group, topk_group=2,\n"
    "                 norm_topk_prob=True, routed_scaling_factor=2.5, n_routed_experts=E)\n"
    "    bias = Tensor(E, dtype=F32)\n"
    "    if fused:\n"
    "        gate = Obj(weight=Tensor(E, H), e_score_correction_bias=bias, top_k=K, "
    "num_experts=E,\n"
    "                   num_group=n_group, topk_group=2, norm_topk_prob=True,\n"
    "                   routed_scaling_factor=2.5, hidden_dim=H)\n"
    "        experts = experts3d(config=cfg)\n"
    "    else:\n"
    "        gate = Obj(config=cfg, weight=Tensor(E, H), e_score_correction_bias=bias, top_k=K,\n"
    "                   n_routed_experts=E, n_group=n_group, topk_group=2, norm_topk_prob=True,\n"
    "                   routed_scaling_factor=2.5)\n"
    "        experts = [mlp(H, I, config=cfg) for _ in range(E)]\n"
    "    attrs = dict(config=cfg, gate=gate, experts=experts, shared_experts=mlp(H, 2 * I))\n"
    "    attrs.update(over)\n"
    "    return block(module, **attrs)\n"
    "def llama4():\n"
    "    cfg = config('llama4_text', num_experts_per_tok=1)\n"
    "    return block(tf('llama4'), top_k=1, hidden_dim=H, num_experts=E,\n"
    "                 experts=experts3d(transposed=True, config=cfg),\n"
    "                 router=linear(E, H, top_k=1, num_experts=E), shared_expert=mlp(H, 2 * I))\n"
    "def block_bias(family, K=2, **over):\n"
    "    cfg = config(family, num_experts_per_tok=K, num_local_experts=E)\n"
    "    gate = Obj(weight=Tensor(E, H), top_k=K, num_experts=E, hidden_dim=H)\n"
    "    attrs = dict(top_k=K, gate=gate, experts=experts3d(config=cfg),\n"
    "                 e_score_correction_bias=Tensor(E, dtype=F32))\n"
    "    attrs.update(over)\n"
    "    return block(tf(family), **attrs)\n"
    "def hy_v3(**over):\n"
    "    b = block_bias('hy_v3', shared_experts=mlp(H, I), enable_moe_fp32_combine=True, **over)\n"
    "    b.gate.router_scaling_factor = 2.826\n"
    "    return b\n"
    "def minimax_m2(**over):\n"
    "    return block_bias('minimax_m2', jitter_noise=0.0, **over)\n"
    "def deepseek_v2(method='greedy', **over):\n"
    "    cfg = config('deepseek_v2', num_experts_per_tok=2, n_group=4, topk_group=2,\n"
    "                 topk_method=method, norm_topk_prob=True, routed_scaling_factor=2.5,\n"
    "                 n_routed_experts=E)\n"
    "    gate = Obj(weight=Tensor(E, H), top_k=2, num_experts=E, hidden_dim=H,\n"
    "               routed_scaling_factor=2.5, topk_method=method, num_group=4, topk_group=2)\n"
    "    attrs = dict(config=cfg, gate=gate, experts=experts3d(config=cfg),\n"
    "                 shared_experts=mlp(H, 2 * I))\n"
    "    attrs.update(over)\n"
    "    return block(tf('deepseek_v2'), **attrs)\n"
    "class Raising(Obj):\n"
    "    @property\n"
    "    def experts(self): raise RuntimeError('boom')\n";

static PyObject *globals;

static void setup(void)
{
    Py_InitializeEx(0);
    globals = PyDict_New();
    PyDict_SetItemString(globals, "__builtins__", PyEval_GetBuiltins());
    PyObject *code = Py_CompileString(fixtures, "fixtures", Py_file_input);
    PyObject *r = code ? PyEval_EvalCode(code, globals, globals) : NULL;
    if (!r)
        PyErr_Print();
    cr_assert(r, "fixtures failed to run");
    Py_DECREF(r);
    Py_DECREF(code);
}

static void teardown(void)
{
    Py_CLEAR(globals);
    Py_FinalizeEx();
}

TestSuite(detect, .init = setup, .fini = teardown);

/* mp_detect on the value of a Python expression over the fixtures. */
static int run(const char *expr, struct moe_spec *s, char *reason)
{
    PyObject *code = Py_CompileString(expr, "expr", Py_eval_input);
    PyObject *block = code ? PyEval_EvalCode(code, globals, globals) : NULL;
    if (!block)
        PyErr_Print();
    cr_assert(block, "fixture expression failed: %s", expr);
    int rc = mp_detect(block, s, reason, MP_REASON);
    cr_assert(!PyErr_Occurred(), "mp_detect left a Python exception set");
    Py_DECREF(block);
    Py_DECREF(code);
    return rc;
}

static struct moe_spec accepted(const char *expr)
{
    struct moe_spec s;
    char reason[MP_REASON];
    int rc = run(expr, &s, reason);
    cr_assert_eq(rc, 0, "%s refused: %s", expr, reason);
    return s;
}

static void refused(const char *expr, int err, const char *needle)
{
    struct moe_spec s;
    char reason[MP_REASON];
    int rc = run(expr, &s, reason);
    cr_assert_eq(rc, err, "%s: rc %d (%s), expected %d", expr, rc, reason, err);
    cr_assert(strstr(reason, needle), "%s: reason '%s' lacks '%s'", expr, reason, needle);
    cr_assert(strchr(reason, '\n') == NULL, "reason is not one line");
}

/* ---- accepted families ---- */

Test(detect, bailing_remote_modulelist_with_buffer_bias)
{
    struct moe_spec s = accepted("bailing()");
    cr_assert_str_eq(s.family, "bailing_moe_v2");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SIGMOID_GROUP);
    cr_assert_eq(s.route.E, 8);
    cr_assert_eq(s.route.K, 2);
    cr_assert_eq(s.route.n_group, 4);
    cr_assert_eq(s.route.topk_group, 2);
    cr_assert_eq(s.route.norm, 1);
    cr_assert_float_eq(s.route.norm_eps, 1e-20f, 1e-25f);
    cr_assert_float_eq(s.route.scale, 2.5f, 1e-6f);
    cr_assert(isinf(s.route.mask_value) && s.route.mask_value < 0);
    cr_assert_eq(s.H, 16);
    cr_assert_eq(s.I, 8);
    cr_assert_eq(s.layout, MP_LAYOUT_MODULELIST);
    cr_assert_eq(s.ret, MP_RET_BAILING);
    cr_assert_str_eq(s.router, "gate");
    cr_assert_eq(s.logits_fp32, 1);
    cr_assert_str_eq(s.bias, "expert_bias");
    cr_assert_str_eq(s.experts, "experts");
    cr_assert_str_eq(s.gate, "gate_proj");
    cr_assert_str_eq(s.up, "up_proj");
    cr_assert_str_eq(s.down, "down_proj");
    cr_assert_eq(s.shared, MP_SHARED_PLAIN);
    cr_assert_str_eq(s.shared_name, "shared_experts");
    cr_assert_eq(s.shared_I, 16);
    cr_assert_str_eq(s.jitter_attr, "");
}

Test(detect, bailing_bias_as_frozen_parameter)
{
    struct moe_spec s = accepted("bailing(bias_param=True)");
    cr_assert_str_eq(s.bias, "expert_bias");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SIGMOID_GROUP);
}

Test(detect, bailing_renormalises_only_when_k_above_one)
{
    struct moe_spec s = accepted("bailing(K=1)");
    cr_assert_eq(s.route.K, 1);
    cr_assert_eq(s.route.norm, 0);
}

Test(detect, bailing_without_shared_experts)
{
    struct moe_spec s = accepted("edit(bailing(), lambda b: delattr(b, 'shared_experts'))");
    cr_assert_eq(s.shared, MP_SHARED_NONE);
    cr_assert_str_eq(s.shared_name, "");
}

Test(detect, qwen3_moe_tf5_fused)
{
    struct moe_spec s = accepted("softmax_tf5('qwen3_moe')");
    cr_assert_str_eq(s.family, "qwen3_moe");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SOFTMAX_TOPK);
    cr_assert_eq(s.route.K, 2);
    cr_assert_eq(s.route.n_group, 1);
    cr_assert_eq(s.route.topk_group, 1);
    cr_assert_eq(s.route.norm, 1);
    cr_assert_float_eq(s.route.norm_eps, 0.0f, 0.0f);
    cr_assert_float_eq(s.route.scale, 1.0f, 0.0f);
    cr_assert_eq(s.layout, MP_LAYOUT_FUSED3D);
    cr_assert_str_eq(s.gate, "gate_up_proj");
    cr_assert_str_eq(s.up, "");
    cr_assert_str_eq(s.down, "down_proj");
    cr_assert_eq(s.I, 8);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
    cr_assert_eq(s.logits_fp32, 0);
    cr_assert_str_eq(s.bias, "");
    cr_assert_eq(s.shared, MP_SHARED_NONE);
}

Test(detect, qwen3_moe_tf4_modulelist)
{
    struct moe_spec s = accepted("softmax_tf4('qwen3_moe')");
    cr_assert_str_eq(s.family, "qwen3_moe");
    cr_assert_eq(s.layout, MP_LAYOUT_MODULELIST);
    cr_assert_eq(s.ret, MP_RET_LOGITS);
    cr_assert_eq(s.route.norm, 0);
    cr_assert_eq(s.logits_fp32, 0);
}

Test(detect, mixtral_tf4_w1_w3_w2_always_normalises_and_flags_jitter)
{
    struct moe_spec s = accepted("mixtral_tf4()");
    cr_assert_str_eq(s.family, "mixtral"); /* no config anywhere: from the module name */
    cr_assert_str_eq(s.gate, "w1");
    cr_assert_str_eq(s.up, "w3");
    cr_assert_str_eq(s.down, "w2");
    cr_assert_eq(s.route.norm, 1);
    cr_assert_eq(s.ret, MP_RET_LOGITS);
    cr_assert_str_eq(s.jitter_attr, "jitter_noise");
}

Test(detect, mixtral_tf5_fused_returns_tensor)
{
    struct moe_spec s = accepted("softmax_tf5('mixtral', jitter_noise=0.0)");
    cr_assert_eq(s.route.norm, 1);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
    cr_assert_str_eq(s.jitter_attr, "jitter_noise");
}

Test(detect, olmoe_tf4)
{
    struct moe_spec s = accepted("softmax_tf4('olmoe')");
    cr_assert_str_eq(s.family, "olmoe");
    cr_assert_eq(s.route.norm, 0);
    cr_assert_eq(s.ret, MP_RET_LOGITS);
}

Test(detect, qwen2_moe_gated_shared_expert)
{
    struct moe_spec s = accepted("qwen2_tf4()");
    cr_assert_str_eq(s.family, "qwen2_moe");
    cr_assert_eq(s.shared, MP_SHARED_GATED);
    cr_assert_str_eq(s.shared_name, "shared_expert");
    cr_assert_str_eq(s.shared_gate_name, "shared_expert_gate");
    cr_assert_eq(s.shared_I, 24);
}

Test(detect, deepseek_v3_tf4_groups_bias_shared)
{
    struct moe_spec s = accepted("deepseek()");
    cr_assert_str_eq(s.family, "deepseek_v3");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SIGMOID_GROUP);
    cr_assert_eq(s.route.n_group, 4);
    cr_assert_eq(s.route.topk_group, 2);
    cr_assert_eq(s.route.norm, 1);
    cr_assert_float_eq(s.route.norm_eps, 1e-20f, 1e-25f);
    cr_assert_float_eq(s.route.scale, 2.5f, 1e-6f);
    cr_assert_float_eq(s.route.mask_value, 0.0f, 0.0f); /* masked_fill(~mask, 0.0) in 4.x */
    cr_assert_str_eq(s.bias, "e_score_correction_bias");
    cr_assert_eq(s.logits_fp32, 1);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
    cr_assert_eq(s.shared, MP_SHARED_PLAIN);
    cr_assert_eq(s.shared_I, 16);
}

Test(detect, deepseek_v3_tf5_masks_with_minus_infinity)
{
    struct moe_spec s = accepted("deepseek(fused=True)");
    cr_assert_eq(s.layout, MP_LAYOUT_FUSED3D);
    cr_assert_eq(s.route.n_group, 4); /* router.num_group */
    cr_assert(isinf(s.route.mask_value) && s.route.mask_value < 0);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
}

Test(detect, glm4_moe_tf5)
{
    struct moe_spec s = accepted("deepseek(module=tf('glm4_moe'), family='glm4_moe', fused=True)");
    cr_assert_str_eq(s.family, "glm4_moe");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SIGMOID_GROUP);
    cr_assert(isinf(s.route.mask_value));
}

Test(detect, deepseek_remote_code_skips_norm_for_top1)
{
    struct moe_spec s = accepted("deepseek(module=DEEPSEEK_REMOTE, K=1)");
    cr_assert_str_eq(s.family, "deepseek_v3");
    cr_assert_eq(s.route.norm, 0);
    cr_assert_float_eq(s.route.mask_value, 0.0f, 0.0f);
    s = accepted("deepseek(K=1)"); /* transformers 4 renormalises even one weight */
    cr_assert_eq(s.route.norm, 1);
}

Test(detect, qwen3_vl_moe_tf5_always_normalises)
{
    /* the router has no norm_topk_prob; a stray config value must not turn the ÷ Σ off */
    struct moe_spec s =
        accepted("softmax_tf5('qwen3_vl_moe', norm=False, experts=experts3d(config=config("
                 "'qwen3_vl_moe_text', norm_topk_prob=False)))");
    cr_assert_str_eq(s.family, "qwen3_vl_moe_text");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SOFTMAX_TOPK);
    cr_assert_eq(s.route.norm, 1);
    cr_assert_float_eq(s.route.norm_eps, 0.0f, 0.0f);
    cr_assert_eq(s.layout, MP_LAYOUT_FUSED3D);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
    cr_assert_eq(s.logits_fp32, 0);
}

Test(detect, qwen3_vl_moe_tf4_transposed_returns_logits)
{
    /* transformers 4.57: gate = nn.Linear, experts [E, H, 2I] / [E, I, H], no config anywhere */
    struct moe_spec s = accepted("block(tf('qwen3_vl_moe'), hidden_size=H, num_experts=E, top_k=2,"
                                 " gate=linear(E, H), experts=Obj(gate_up_proj=Tensor(E, H, 2 * I),"
                                 " down_proj=Tensor(E, I, H), act_fn=SiLU()))");
    cr_assert_str_eq(s.family, "qwen3_vl_moe");
    cr_assert_eq(s.layout, MP_LAYOUT_FUSED3D_T);
    cr_assert_eq(s.I, 8);
    cr_assert_eq(s.ret, MP_RET_LOGITS);
    cr_assert_eq(s.route.norm, 1);
}

Test(detect, qwen3_5_moe_gated_shared_expert_always_normalises)
{
    struct moe_spec s =
        accepted("softmax_tf5('qwen3_5_moe', norm=False, shared_expert=mlp(H, 3 * I),"
                 " shared_expert_gate=linear(1, H))");
    cr_assert_eq(s.route.norm, 1);
    cr_assert_eq(s.shared, MP_SHARED_GATED);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
}

Test(detect, deepseek_v3_copies_tf5)
{
    static const char *const fams[] = {"deepseek_v32", "glm4_moe_lite", "glm_moe_dsa",
                                       "exaone_moe",   "kimi_linear",   "solar_open",
                                       "mimo_v2_flash"};
    char expr[256];
    for (size_t i = 0; i < sizeof fams / sizeof fams[0]; i++) {
        snprintf(expr, sizeof expr, "deepseek(module=tf('%s'), family='%s', fused=True)", fams[i],
                 fams[i]);
        struct moe_spec s = accepted(expr);
        cr_assert_str_eq(s.family, fams[i]);
        cr_assert_eq(s.route.recipe, MOE_ROUTE_SIGMOID_GROUP);
        cr_assert_eq(s.route.n_group, 4);
        cr_assert(isinf(s.route.mask_value) && s.route.mask_value < 0);
        cr_assert_float_eq(s.route.scale, 2.5f, 1e-6f);
        cr_assert_str_eq(s.bias, "e_score_correction_bias");
        cr_assert_eq(s.ret, MP_RET_TENSOR);
    }
}

Test(detect, hy_v3_bias_on_block_always_normalises_router_scaling_factor)
{
    struct moe_spec s = accepted("hy_v3()");
    cr_assert_str_eq(s.family, "hy_v3");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SIGMOID_GROUP);
    cr_assert_str_eq(s.bias, "e_score_correction_bias");
    cr_assert_eq(s.bias_on_block, 1);
    cr_assert_eq(s.route.n_group, 1);
    cr_assert_eq(s.route.topk_group, 1);
    cr_assert_eq(s.route.norm, 1);
    cr_assert_float_eq(s.route.norm_eps, 1e-20f, 1e-25f);
    cr_assert_float_eq(s.route.scale, 2.826f, 1e-6f); /* router.router_scaling_factor */
    cr_assert_eq(s.logits_fp32, 1);
    cr_assert_eq(s.layout, MP_LAYOUT_FUSED3D);
    cr_assert_eq(s.shared, MP_SHARED_PLAIN);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
    /* K = 1 still divides (w / w): the router has no K > 1 condition */
    s = accepted("hy_v3(K=1)");
    cr_assert_eq(s.route.norm, 1);
}

Test(detect, minimax_m2_bias_on_block_logits_in_weight_dtype_no_scale)
{
    /* stray config keys the code never reads: groups, a scale, norm_topk_prob */
    struct moe_spec s = accepted("edit(minimax_m2(), lambda b: b.experts.config.__dict__.update("
                                 "n_group=4, topk_group=2, routed_scaling_factor=2.5, "
                                 "norm_topk_prob=False))");
    cr_assert_str_eq(s.family, "minimax_m2");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SIGMOID_GROUP);
    cr_assert_str_eq(s.bias, "e_score_correction_bias");
    cr_assert_eq(s.bias_on_block, 1);
    cr_assert_eq(s.route.n_group, 1);
    cr_assert_eq(s.route.norm, 1);
    cr_assert_float_eq(s.route.norm_eps, 0.0f, 0.0f);
    cr_assert_float_eq(s.route.scale, 1.0f, 0.0f);
    cr_assert_eq(s.logits_fp32, 0);
    cr_assert_eq(s.shared, MP_SHARED_NONE);
    cr_assert_str_eq(s.jitter_attr, "jitter_noise");
    cr_assert_eq(s.ret, MP_RET_TENSOR);
}

Test(detect, router_held_bias_is_not_on_the_block)
{
    struct moe_spec s = accepted("deepseek(fused=True)");
    cr_assert_eq(s.bias_on_block, 0);
    s = accepted("bailing()");
    cr_assert_eq(s.bias_on_block, 0);
}

Test(detect, block_bias_family_refuses_a_bias_elsewhere_or_none)
{
    refused("edit(minimax_m2(), lambda b: (setattr(b.gate, 'e_score_correction_bias',"
            " b.e_score_correction_bias), delattr(b, 'e_score_correction_bias')))",
            MOE_EUNSUPPORTED, "minimax_m2 keeps its selection bias on the block, but it is gate.");
    refused("edit(hy_v3(), lambda b: delattr(b, 'e_score_correction_bias'))", MOE_EUNSUPPORTED,
            "hy_v3 block has no selection bias");
    refused("minimax_m2(e_score_correction_bias=Tensor(E + 1, dtype=F32))", MOE_EINVAL,
            "block.e_score_correction_bias has 9 entries, E=8");
}

Test(detect, deepseek_v2_greedy_softmax_ignores_groups_and_norm)
{
    struct moe_spec s = accepted("deepseek_v2()");
    cr_assert_str_eq(s.family, "deepseek_v2");
    cr_assert_eq(s.route.recipe, MOE_ROUTE_SOFTMAX_TOPK);
    cr_assert_eq(s.route.n_group, 1); /* num_group=4, topk_group=2: greedy never reads them */
    cr_assert_eq(s.route.topk_group, 1);
    cr_assert_eq(s.route.norm, 0); /* norm_topk_prob=True is never read by the router */
    cr_assert_float_eq(s.route.scale, 2.5f, 1e-6f);
    cr_assert_eq(s.logits_fp32, 1);
    cr_assert_str_eq(s.bias, "");
    cr_assert_eq(s.shared, MP_SHARED_PLAIN);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
}

Test(detect, deepseek_v2_other_topk_methods_are_refused)
{
    refused("deepseek_v2('group_limited_greedy')", MOE_EUNSUPPORTED,
            "deepseek_v2 routes with topk_method=group_limited_greedy, which the fused path does "
            "not implement (only greedy)");
    refused("deepseek_v2('noaux_tc')", MOE_EUNSUPPORTED, "topk_method=noaux_tc");
    /* the router's own attribute decides, whatever the config says */
    refused("edit(deepseek_v2(), lambda b: setattr(b.gate, 'topk_method', "
            "'group_limited_greedy'))",
            MOE_EUNSUPPORTED, "topk_method=group_limited_greedy");
    /* None (or no attribute anywhere): the code has no default branch */
    refused("edit(deepseek_v2(None), lambda b: delattr(b.config, 'topk_method'))", MOE_EUNSUPPORTED,
            "deepseek_v2: no topk_method on router, block or config");
    refused("deepseek_v2(method=None)", MOE_EUNSUPPORTED, "no topk_method");
}

Test(detect, layout_not_checked_for_the_family_is_refused)
{
    /* these families exist only with 3-D experts: an nn.ModuleList version was never read */
    refused("deepseek(module=tf('deepseek_v32'), family='deepseek_v32')", MOE_EUNSUPPORTED,
            "deepseek_v32 with nn.ModuleList experts: that layout of the family was not checked");
    refused("softmax_tf4('qwen3_vl_moe')", MOE_EUNSUPPORTED, "not checked");
    refused("softmax_tf5('qwen3_5_moe', experts=experts3d(transposed=True))", MOE_EUNSUPPORTED,
            "transposed 3-D experts");
}

Test(detect, glm4_moe_copies_tf4_mask_with_zero)
{
    struct moe_spec s = accepted("deepseek(module=tf('dots1'), family='dots1')");
    cr_assert_eq(s.layout, MP_LAYOUT_MODULELIST);
    cr_assert_float_eq(s.route.mask_value, 0.0f, 0.0f);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
    s = accepted("deepseek(module=tf('glm4v_moe'), family='glm4v_moe_text', fused=True)");
    cr_assert_str_eq(s.family, "glm4v_moe_text");
    cr_assert(isinf(s.route.mask_value));
}

Test(detect, axk2_masks_groups_with_zero_in_3d)
{
    struct moe_spec s = accepted("deepseek(module=tf('axk2'), family='axk2', fused=True)");
    cr_assert_eq(s.route.n_group, 4);
    cr_assert_float_eq(s.route.mask_value, 0.0f, 0.0f);
}

Test(detect, jamba_never_normalises)
{
    struct moe_spec s = accepted("softmax_tf4('jamba', norm=True, gate=None, router=linear(E, H))");
    cr_assert_str_eq(s.router, "router");
    cr_assert_eq(s.route.norm, 0);
    cr_assert_eq(s.ret, MP_RET_LOGITS);
    s = accepted("softmax_tf5('jamba', norm=True)");
    cr_assert_eq(s.route.norm, 0);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
}

Test(detect, granitemoe_router_named_router)
{
    struct moe_spec s =
        accepted("block(tf('granitemoe'), router=Obj(weight=Tensor(E, H), top_k=2,"
                 " num_experts=E), experts=experts3d(config=config('granitemoe')))");
    cr_assert_str_eq(s.router, "router");
    cr_assert_eq(s.route.norm, 1);
    cr_assert_eq(s.ret, MP_RET_TENSOR);
}

Test(detect, minimax_as_mixtral)
{
    struct moe_spec s = accepted("block(tf('minimax'), num_experts=E, top_k=2, gate=linear(E, H),"
                                 " experts=[mlp(H, I, names=('w1', 'w3', 'w2')) for _ in range(E)],"
                                 " jitter_noise=0.0)");
    cr_assert_str_eq(s.gate, "w1");
    cr_assert_eq(s.route.norm, 1);
    cr_assert_eq(s.ret, MP_RET_LOGITS);
    cr_assert_str_eq(s.jitter_attr, "jitter_noise");
}

Test(detect, unknown_family_is_refused)
{
    refused("block('mymodels.custom', gate=Obj(weight=Tensor(E, H), top_k=2),"
            " experts=experts3d(transposed=True, config=Obj(hidden_act='silu')))",
            MOE_EUNSUPPORTED, "unknown MoE family");
}

Test(detect, transposed_flag_without_matching_shapes_is_refused)
{
    refused("softmax_tf5('qwen3_moe', experts=experts3d(is_transposed=True))", MOE_EINVAL,
            "do not match");
}

/* ---- refusals ---- */

Test(detect, llama4_input_scaled_routing)
{
    refused("llama4()", MOE_EUNSUPPORTED, "llama4 routing scales the expert input");
}

Test(detect, router_of_unknown_family)
{
    refused("block('x.y', router=linear(E, H), top_k=2, experts=experts3d())", MOE_EUNSUPPORTED,
            "unknown family");
}

Test(detect, missing_router)
{
    refused("softmax_tf4('qwen3_moe', gate=None)", MOE_EINVAL, "no router");
    refused("softmax_tf4('qwen3_moe', gate=Obj(weight=Tensor(E, H, 1)))", MOE_EINVAL, "no router");
}

Test(detect, router_with_bias)
{
    refused("softmax_tf4('qwen3_moe', gate=Obj(weight=Tensor(E, H), bias=Tensor(E)))",
            MOE_EUNSUPPORTED, "router gate has a bias");
}

Test(detect, missing_experts)
{
    refused("softmax_tf4('qwen3_moe', experts=None)", MOE_EINVAL, "no experts");
    refused("softmax_tf4('qwen3_moe', experts=Obj())", MOE_EINVAL, "neither a list");
}

Test(detect, raising_attribute_is_absent_and_cleared)
{
    refused("Raising(gate=linear(E, H), top_k=2)", MOE_EINVAL, "no experts");
}

Test(detect, expert_count_differs_from_router)
{
    refused("softmax_tf4('qwen3_moe', experts=[mlp(H, I) for _ in range(E - 1)])", MOE_EINVAL,
            "7 entries, the router 8");
}

Test(detect, expert_without_projections)
{
    refused("softmax_tf4('qwen3_moe', experts=[Obj() for _ in range(E)])", MOE_EINVAL,
            "experts[0] has neither");
}

Test(detect, inconsistent_expert_shape)
{
    refused("edit(softmax_tf4('qwen3_moe'), lambda b: setattr(b.experts[5], 'up_proj',"
            " linear(I + 1, H)))",
            MOE_EINVAL, "experts[5].up_proj.weight is [9, 16], expected [8, 16]");
}

Test(detect, expert_bias)
{
    refused("edit(softmax_tf4('qwen3_moe'), lambda b: setattr(b.experts[2].down_proj, 'bias',"
            " Tensor(H)))",
            MOE_EUNSUPPORTED, "experts[2].down_proj has a bias");
}

Test(detect, lora_wrapped_expert)
{
    refused("edit(bailing(), lambda b: setattr(b.experts[3], 'gate_proj',"
            " Obj(base_layer=linear(I, H), lora_A={}, weight=Tensor(I, H))))",
            MOE_EUNSUPPORTED, "experts[3].gate_proj is LoRA-wrapped (peft)");
}

Test(detect, lora_wrapped_fused_experts)
{
    refused("edit(softmax_tf5('qwen3_moe'), lambda b: setattr(b.experts, 'lora_A', {}))",
            MOE_EUNSUPPORTED, "LoRA");
}

Test(detect, quantized_dtype)
{
    refused("edit(softmax_tf4('qwen3_moe'), lambda b: setattr(b.experts[0].gate_proj.weight,"
            " 'dtype', DType('torch.uint8')))",
            MOE_EUNSUPPORTED, "dtype torch.uint8");
}

Test(detect, quantized_module)
{
    refused("edit(softmax_tf4('qwen3_moe'), lambda b: setattr(b.experts[1].up_proj, 'qweight',"
            " Tensor(1, dtype='torch.int32')))",
            MOE_EUNSUPPORTED, "experts[1].up_proj is quantized");
    refused("edit(softmax_tf4('qwen3_moe'), lambda b: setattr(b.experts[1].up_proj.weight,"
            " 'quant_state', Obj()))",
            MOE_EUNSUPPORTED, "quantized");
}

Test(detect, zero3_partitioned_weight)
{
    refused("edit(softmax_tf4('qwen3_moe'), lambda b: setattr(b.experts[0].gate_proj.weight,"
            " 'ds_id', 7))",
            MOE_EUNSUPPORTED, "ZeRO-3");
    refused("edit(softmax_tf5('qwen3_moe'), lambda b: setattr(b.experts.down_proj,"
            " 'ds_status', Obj()))",
            MOE_EUNSUPPORTED, "ZeRO-3");
}

Test(detect, float64_weights)
{
    refused("softmax_tf5('qwen3_moe', experts=experts3d(dtype='torch.float64'))", MOE_EUNSUPPORTED,
            "dtype torch.float64");
}

Test(detect, mixed_expert_dtypes)
{
    refused("edit(softmax_tf4('qwen3_moe'), lambda b: b.experts.__setitem__(4, mlp(H, I, "
            "dtype=F32)))",
            MOE_EUNSUPPORTED, "mixed dtypes");
}

Test(detect, fp32_router_of_bf16_experts_is_fine)
{
    struct moe_spec s = accepted("softmax_tf4('qwen3_moe', gate=linear(E, H, dtype=F32))");
    cr_assert_eq(s.route.E, 8);
}

Test(detect, unsupported_activation_from_config)
{
    refused("edit(bailing(), lambda b: setattr(b.config, 'hidden_act', 'gelu'))", MOE_EUNSUPPORTED,
            "activation gelu is not supported");
}

Test(detect, unsupported_activation_module)
{
    refused("mixtral_tf4(experts=[mlp(H, I, names=('w1', 'w3', 'w2'), act=GELUActivation)"
            " for _ in range(E)])",
            MOE_EUNSUPPORTED, "activation GELUActivation is not supported");
}

Test(detect, top_k_outside_range)
{
    refused("softmax_tf4('qwen3_moe', top_k=9)", MOE_EINVAL, "top-k 9 is outside 1..E=8");
    refused("softmax_tf4('qwen3_moe', top_k=0)", MOE_EINVAL, "top-k 0");
}

Test(detect, experts_not_divisible_by_groups)
{
    refused("deepseek(n_group=3)", MOE_EUNSUPPORTED, "do not split into n_group=3");
}

Test(detect, gpt_oss_style_expert_biases)
{
    refused("softmax_tf5('qwen3_moe', experts=experts3d(gate_up_proj_bias=Tensor(E, 2 * I)))",
            MOE_EUNSUPPORTED, "biases");
}

Test(detect, fused_shapes_that_fit_no_layout)
{
    refused("softmax_tf5('qwen3_moe', experts=Obj(gate_up_proj=Tensor(E, 2 * I, H + 1),"
            " down_proj=Tensor(E, H, I), config=config('qwen3_moe')))",
            MOE_EINVAL, "do not match H=16");
}

Test(detect, selection_bias_on_block_not_router)
{
    refused("softmax_tf4('qwen3_moe', e_score_correction_bias=Tensor(E, dtype=F32))",
            MOE_EUNSUPPORTED, "not on the router");
}

Test(detect, softmax_family_with_selection_bias)
{
    refused("softmax_tf4('qwen3_moe', gate=linear(E, H, expert_bias=Tensor(E)))", MOE_EUNSUPPORTED,
            "routes with softmax");
}

Test(detect, group_limited_greedy_routing)
{
    refused("edit(deepseek(module=DEEPSEEK_REMOTE), lambda b: setattr(b.config, 'topk_method',"
            " 'group_limited_greedy'))",
            MOE_EUNSUPPORTED, "top-k method group_limited_greedy");
}

Test(detect, shared_gate_with_wrong_shape)
{
    refused("qwen2_tf4(shared_expert_gate=linear(2, H))", MOE_EINVAL,
            "shared_expert_gate.weight is [2, 16], expected [1, 16]");
}

Test(detect, spec_is_zeroed_on_refusal)
{
    struct moe_spec s;
    char reason[MP_REASON];
    memset(&s, 0x5a, sizeof s);
    cr_assert_lt(run("llama4()", &s, reason), 0);
    cr_assert_eq(s.route.E, 0);
    cr_assert_str_eq(s.family, "");
}
