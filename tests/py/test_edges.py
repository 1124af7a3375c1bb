"""Shapes and routings at the edges: each case runs patched and unpatched and must agree (fp32)."""

import pytest

import moepatch_testlib as lib

QWEN3 = {"fixture": "tf5/modeling_qwen3_moe.py", "module_name": "fixtures_tf5.modeling_qwen3_moe"}
QWEN3_TF4 = {"fixture": "tf4/modeling_qwen3_moe.py", "module_name": "fixtures_tf4.modeling_qwen3_moe"}
BAILING = {"fixture": "bailing/modeling_bailing_moe_v2.py", "load": "remote"}
DEEPSEEK = {"fixture": "tf5/modeling_deepseek_v3.py", "module_name": "fixtures_tf5.modeling_deepseek_v3"}

# Bailing's tiny config has 4 groups of 2 experts; a selection bias of -10 on expert 5 sinks its group,
# so no token can reach it.
STARVED = 5
STARVE_BIAS = [0.05, 0.02, 0.08, 0.01, 0.03, -10.0, 0.04, 0.06]

EDGES = {
    "no_tokens": dict(QWEN3, shape=[1, 0]),
    "one_token": dict(BAILING, shape=[1, 1]),
    "top1_no_renormalisation": dict(BAILING, config={"num_experts_per_tok": 1}),
    "top1_softmax": dict(QWEN3, config={"num_experts_per_tok": 1}),
    "topk_equals_num_experts": dict(QWEN3_TF4, config={"num_experts_per_tok": 8}),
    "expert_without_tokens": dict(BAILING, post=[["set_tensor", {"gate.expert_bias": STARVE_BIAS}]]),
    "non_contiguous_input": dict(QWEN3, noncontig=True),
    "non_contiguous_input_bailing": dict(BAILING, noncontig=True),
    "input_2d": dict(DEEPSEEK, shape=[12]),
    "input_2d_non_contiguous": dict(DEEPSEEK, shape=[12], noncontig=True),
    "input_3d": dict(DEEPSEEK, shape=[3, 4]),
}


@pytest.mark.parametrize("edge", sorted(EDGES))
def test_patched_matches_unpatched_at_the_edge(edge, probe, preload_lib):
    off = probe(EDGES[edge], "off")
    on = probe(EDGES[edge], "on")
    assert on.patched(), "not patched: %s\n%s" % (on.info, on.stderr)
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


def test_no_tokens_gives_an_empty_output_of_the_input_shape(probe, preload_lib):
    on = probe(EDGES["no_tokens"], "on")
    assert tuple(on.data["y"].shape) == (1, 0, 16)


def test_starved_expert_gets_no_tokens_and_zero_gradient(probe, preload_lib):
    off = probe(EDGES["expert_without_tokens"], "off")
    on = probe(EDGES["expert_without_tokens"], "on")
    assert STARVED not in lib.experts_with_gradient(off.data)  # the setup does starve it
    for name in ("gate_proj", "up_proj", "down_proj"):
        g = on.data["grads"]["experts.%d.%s.weight" % (STARVED, name)]
        assert g is not None and not bool(g.abs().sum()), name
    assert lib.experts_with_gradient(on.data) == lib.experts_with_gradient(off.data)


def test_2d_input_keeps_its_shape(probe, preload_lib):
    on = probe(EDGES["input_2d"], "on")
    assert tuple(on.data["y"].shape) == (12, 16)
