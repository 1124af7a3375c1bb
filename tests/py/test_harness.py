"""The harness itself: the shared tolerance header, and a probe that can tell the modes apart."""

import os

import moepatch_testlib as lib


def test_tolerance_header_exists_and_defines_every_dtype():
    assert os.path.exists(lib.TOLERANCE_H)
    t = lib.tolerances()
    assert t["MOE_TOL_F32"] == 1e-5
    assert 0 < t["MOE_TOL_BF16"] <= 1e-2
    assert "MOE_TOL_F16" in t


def test_tolerance_parser_reads_the_define_format():
    text = "#define MOE_TOL_F32 1e-5\n#  define MOE_TOL_BF16 (1.0e-2f)\n#define OTHER 3\n"
    assert lib.parse_tolerances(text) == {"MOE_TOL_F32": 1e-5, "MOE_TOL_BF16": 1e-2}


def test_rel_err_is_normwise():
    import torch
    b = torch.tensor([3.0, 4.0])
    assert lib.rel_err(b + torch.tensor([0.0, 0.5]), b) == 0.1
    assert lib.rel_err(torch.zeros(0), torch.zeros(0)) == 0.0


def test_unpatched_probe_reports_no_patch_state(probe):
    off = probe({"fixture": "tf5/modeling_qwen3_moe.py", "module_name": "fixtures_tf5.modeling_qwen3_moe"}, "off")
    assert off.unpatched("at_build") and not off.patched() and off.log == []


def _run(y, g):
    import torch
    return {"y": torch.tensor(y), "x_grad": None, "grads": {"w": torch.tensor(g)}}


def test_assert_close_compares_a_near_zero_tensor_absolutely():
    import pytest
    lib.assert_close(_run([1.0, 2.0], [3e-9, 0.0]), _run([1.0, 2.0], [-2e-9, 1e-9]), 1e-5)
    with pytest.raises(AssertionError):
        lib.assert_close(_run([1.0, 2.0], [1e-2, 0.0]), _run([1.0, 2.0], [-2e-9, 1e-9]), 1e-5)


def test_by_role_merges_per_expert_tensors_in_expert_order():
    import torch
    merged = lib.by_role({"grad:experts.10.w1.weight": torch.tensor([3.0]),
                          "grad:experts.2.w1.weight": torch.tensor([1.0]), "y": torch.tensor([0.0])})
    assert set(merged) == {"grad:experts.*.w1.weight", "y"}
    assert merged["grad:experts.*.w1.weight"].tolist() == [1.0, 3.0]
