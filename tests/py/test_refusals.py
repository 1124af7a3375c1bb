"""What the fused path does not support keeps the block's own forward, bit for bit, with one log line
that says why; MOEPATCH_CHECK compares and falls back loudly."""

import pytest

import moepatch_testlib as lib

WRAPPED = {"fixture": "refuse/modeling_qwen3_moe.py", "module_name": "fixtures_refuse.modeling_qwen3_moe"}

# case, and words of which the one reason line must contain at least one
REFUSED_AT_CONSTRUCTION = {
    "gelu_activation": (dict(fixture="tf4/modeling_qwen3_moe.py", module_name="fixtures_tf4.modeling_qwen3_moe",
                             config={"hidden_act": "gelu"}), ("gelu", "activation", "act_fn")),
    "gelu_activation_tf5": (dict(fixture="tf5/modeling_qwen3_moe.py", module_name="fixtures_tf5.modeling_qwen3_moe",
                                 config={"hidden_act": "gelu"}), ("gelu", "activation", "act_fn")),
    "lora_wrapped_experts": (dict(WRAPPED, config={"expert_kind": "lora"}), ("lora", "peft", "adapter")),
    "int8_experts": (dict(WRAPPED, config={"expert_kind": "int8"}), ("int8", "dtype", "quant")),
    "zero3_partitioned_experts": (dict(WRAPPED, config={"expert_kind": "zero3"}),
                                  ("zero", "ds_", "partition", "empty", "numel")),
    "gpt_oss_experts_with_bias": (dict(fixture="refuse/modeling_gpt_oss.py",
                                       module_name="fixtures_refuse.modeling_gpt_oss"), ("bias", "gpt_oss", "gpt-oss")),
}


def reason_lines(result, words):
    return [ln for ln in result.log if any(w in ln.lower() for w in words)]


@pytest.mark.parametrize("name", sorted(REFUSED_AT_CONSTRUCTION))
def test_refused_block_keeps_its_forward(name, probe, preload_lib):
    case, _ = REFUSED_AT_CONSTRUCTION[name]
    on = probe(case, "on")
    assert on.unpatched("at_build") and on.unpatched("after"), on.info


@pytest.mark.parametrize("name", sorted(REFUSED_AT_CONSTRUCTION))
def test_refused_block_output_is_bit_identical_to_no_preload(name, probe, preload_lib):
    case, _ = REFUSED_AT_CONSTRUCTION[name]
    lib.assert_bit_identical(probe(case, "on").data, probe(case, "off").data)


@pytest.mark.parametrize("name", sorted(REFUSED_AT_CONSTRUCTION))
def test_refusal_is_logged_once_with_its_reason(name, probe, preload_lib):
    case, words = REFUSED_AT_CONSTRUCTION[name]
    on = probe(case, "on")
    assert len(reason_lines(on, words)) == 1, on.stderr


# ---------------------------------------------------------------- decided at call time

LORA_AFTER = dict(WRAPPED, config={"expert_kind": "plain"}, post=[["wrap_lora", None]])


def test_lora_wrapping_after_patching_is_not_silently_ignored(probe, preload_lib):
    # PEFT wraps the expert Linears after the model (and so the patch) was built; LoRA layers expose the
    # base weight as `.weight`, so a fused path that reads `.weight` alone would drop the adapters.
    off = probe(LORA_AFTER, "off")
    on = probe(LORA_AFTER, "on")
    assert on.patched("at_build")
    lib.assert_bit_identical(on.data, off.data)
    lines = reason_lines(on, ("lora", "peft", "adapter"))
    assert len(lines) == 1, on.stderr
    # qualified class names: PEFT's LoRA layer is also called `Linear`
    assert "torch.nn.modules.linear.Linear" in lines[0], lines[0]


MIXTRAL_JITTER = {
    "tf5": dict(fixture="tf5/modeling_mixtral.py", module_name="fixtures_tf5.modeling_mixtral",
                config={"router_jitter_noise": 0.1}, clone_input=True),
    "tf4": dict(fixture="tf4/modeling_mixtral.py", module_name="fixtures_tf4.modeling_mixtral",
                config={"router_jitter_noise": 0.1}, clone_input=True),
}


@pytest.mark.parametrize("flavour", sorted(MIXTRAL_JITTER))
def test_mixtral_jitter_in_training_runs_the_original_forward(flavour, probe, preload_lib):
    case = dict(MIXTRAL_JITTER[flavour], train=True)
    off = probe(case, "off")
    on = probe(case, "on")
    assert on.patched("at_build")
    lib.assert_bit_identical(on.data, off.data)
    assert len(reason_lines(on, ("jitter",))) == 1, on.stderr


@pytest.mark.parametrize("flavour", sorted(MIXTRAL_JITTER))
def test_mixtral_jitter_in_eval_mode_runs_fused(flavour, probe, preload_lib):
    case = dict(MIXTRAL_JITTER[flavour], train=False)
    off = probe(case, "off")
    on = probe(case, "on")
    assert on.patched()
    assert not reason_lines(on, ("jitter",)), on.stderr
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


# ---------------------------------------------------------------- MOEPATCH_CHECK

QWEN3 = {"fixture": "tf5/modeling_qwen3_moe.py", "module_name": "fixtures_tf5.modeling_qwen3_moe"}
CHECK_ENV = {"MOEPATCH_CHECK": "2", "MOEPATCH_LOG": "info"}


def test_check_logs_the_compared_error_of_each_checked_call(probe, preload_lib):
    on = probe(dict(QWEN3, calls=3), "on", env=CHECK_ENV)
    checks = [ln for ln in on.log if "rel err" in ln]
    assert len(checks) == 2, on.stderr  # N = 2: the first two calls only
    assert on.patched(), on.info


def test_check_on_a_good_block_keeps_the_fused_result(probe, preload_lib):
    off = probe(dict(QWEN3, calls=3), "off")
    on = probe(dict(QWEN3, calls=3), "on", env=CHECK_ENV)
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


SCALED = {"fixture": "check/modeling_qwen3_moe.py", "module_name": "fixtures_check.modeling_qwen3_moe",
          "post": [["set_class_attr", {"output_scale": 1.5}]]}


def test_check_mismatch_falls_back_loudly_to_the_original_forward(probe, preload_lib):
    off = probe(SCALED, "off")
    on = probe(SCALED, "on", env={"MOEPATCH_CHECK": "2"})
    assert on.patched("at_build")
    assert not on.patched("after"), "a block that failed its check still runs fused: %s" % on.info
    lib.assert_bit_identical(on.data, off.data)
    assert len(reason_lines(on, ("moepatch_check", "differs", "mismatch"))) == 1, on.stderr


def test_mismatching_block_without_check_is_what_check_protects_against(probe, preload_lib):
    # the premise of the test above: unchecked, the fused path really computes something else here
    off = probe(SCALED, "off")
    on = probe(SCALED, "on")
    assert on.patched()
    assert lib.rel_err(on.data["y"], off.data["y"]) > 0.1
