"""nn.ModuleList experts' gradients written to .grad by the fused backward (MOEPATCH_DIRECT_GRADS, on
by default): every way a training loop takes gradients gives what autograd gives unpatched, and the
cases the glue cannot see through (a hook known at forward, MOEPATCH_DIRECT_GRADS=0) go through
autograd. fp32 on the CPU backend: the same glue runs for CUDA tensors.
"""

import pytest
import torch

import moepatch_testlib as lib
from conftest import FAMILIES

MODULELIST = ("bailing_moe_v2", "mixtral-tf4")
MODES = ("again", "zero_again", "clone_again", "partial_again", "hook_expert", "hook_expert_early", "autograd_grad_x", "backward_inputs_x")


def case_of(fid, mode):
    case = dict(FAMILIES[fid][1])
    case["grad_mode"] = mode
    return case


def direct_calls(res):
    return [s["direct_calls"] for s in res.info["after"]]


@pytest.mark.parametrize("fid", MODULELIST)
@pytest.mark.parametrize("mode", MODES)
def test_expert_grads_match_unpatched(fid, mode, probe, preload_lib):
    off = probe(case_of(fid, mode), "off")
    on = probe(case_of(fid, mode), "on")
    assert on.patched(), on.stderr
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))
    calls = 2 if mode.endswith("again") else 1
    # a hook seen at forward keeps autograd; every other case writes the grads itself
    assert direct_calls(on) == [0 if mode == "hook_expert_early" else calls], on.info
    if mode in ("autograd_grad_x", "backward_inputs_x"):
        assert on.data["x_grad"] is not None
        assert all(g is None for g in on.data["grads"].values()), \
            [n for n, g in on.data["grads"].items() if g is not None]


@pytest.mark.parametrize("fid", MODULELIST)
def test_direct_grads_off_takes_autograd_and_gives_the_same_bits(fid, probe, preload_lib):
    on = probe(case_of(fid, "again"), "on")
    auto = probe(case_of(fid, "again"), "on", env={"MOEPATCH_DIRECT_GRADS": "0"})
    assert direct_calls(auto) == [0] and direct_calls(on) == [2]
    lib.assert_bit_identical(on.data, auto.data)


def test_3d_experts_never_take_direct_grads(probe, preload_lib):
    on = probe(case_of("qwen3_moe-tf5", "again"), "on")
    assert on.patched() and direct_calls(on) == [0]


@pytest.mark.parametrize("fid", MODULELIST)
def test_ddp_keeps_autograd(fid, probe, preload_lib):
    case = dict(case_of(fid, "again"), ddp=True)
    off = probe(case, "off")
    on = probe(case, "on")
    assert on.patched() and direct_calls(on) == [0], on.info
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


@pytest.mark.parametrize("fid", MODULELIST)
@pytest.mark.parametrize("reentrant", (True, False))
def test_gradient_checkpointing_gives_the_same_grads(fid, reentrant, probe, preload_lib):
    case = dict(case_of(fid, "again"), checkpoint=reentrant)
    off = probe(case, "off")
    on = probe(case, "on")
    assert on.patched(), on.stderr
    # reentrant: the forward runs without grad, the recomputation in backward with it; non-reentrant:
    # both with it, so forward and recomputation count, unless the recomputation stops as soon as
    # the saved tensors are back (torch >= 2.1), before the call is counted
    assert direct_calls(on)[0] in ((2,) if reentrant else (2, 4)), on.info
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


@pytest.mark.parametrize("fid", MODULELIST)
def test_an_expert_sharing_another_ones_weights_keeps_autograd(fid, probe, preload_lib):
    case = dict(case_of(fid, "again"), post=[["tie_expert", [0, 1]]])
    off = probe(case, "off")
    on = probe(case, "on")
    assert on.patched() and direct_calls(on) == [0], on.info
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


@pytest.mark.skipif(not hasattr(torch.Tensor, "register_post_accumulate_grad_hook"),
                    reason="torch < 2.1 has no post-accumulate grad hooks")
@pytest.mark.parametrize("fid", MODULELIST)
def test_post_accumulate_hook_registered_after_forward_runs(fid, probe, preload_lib):
    off = probe(case_of(fid, "post_hook_expert"), "off")
    on = probe(case_of(fid, "post_hook_expert"), "on")
    assert on.patched() and direct_calls(on) == [1], on.info
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))
