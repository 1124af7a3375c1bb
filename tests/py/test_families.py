"""Every family fixture, unpatched vs MOEPATCH=0 vs patched: same numbers, same experts, one summary line.

bf16 criterion (test_bf16_*): both the fused path and the block's own bf16 forward are compared with the
block's own forward run in float64 on the same bf16-rounded weights and inputs. The fused path must be
within MOE_TOL_BF16 and no worse than the original bf16 forward by more than 1.5x + 1e-3: the two round
at different points (the fused path accumulates in fp32 and rounds once; the eager loop rounds after each
matmul), so they are not bit-comparable, but a real defect (wrong weight, wrong expert) shows up as an
error far above either bound. Per-expert gradients of an nn.ModuleList are judged together per role
(all w1 grads as one tensor), as the 3-D layouts are: a single expert that got one or two tokens has a
rank-1 gradient whose bf16 error is a few roundings wide, too noisy to rank two implementations by.
"""

import os

import pytest
import torch

import moepatch_testlib as lib
from conftest import FAMILIES

IDS = sorted(FAMILIES)


def case_of(fid, **extra):
    case = dict(FAMILIES[fid][1])
    case.update(extra)
    return case


@pytest.mark.parametrize("fid", IDS)
def test_inert_library_leaves_outputs_and_grads_bit_identical(fid, probe, preload_lib):
    off = probe(case_of(fid), "off")
    inert = probe(case_of(fid), "inert")
    assert inert.unpatched("at_build") and inert.unpatched()
    lib.assert_bit_identical(inert.data, off.data)


@pytest.mark.parametrize("fid", IDS)
def test_block_is_patched_at_construction(fid, probe, preload_lib):
    on = probe(case_of(fid), "on")
    assert on.patched("at_build"), on.info["at_build"]
    assert on.patched("after"), on.info["after"]


@pytest.mark.parametrize("fid", IDS)
def test_patched_fp32_output_and_every_grad_match_unpatched(fid, probe, preload_lib):
    off = probe(case_of(fid), "off")
    on = probe(case_of(fid), "on")
    assert on.patched(), "not patched: %s\n%s" % (on.info, on.stderr)
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


@pytest.mark.parametrize("fid", IDS)
def test_patched_chooses_the_same_experts(fid, probe, preload_lib):
    off = probe(case_of(fid), "off")
    on = probe(case_of(fid), "on")
    assert on.patched()
    if FAMILIES[fid][0] == "bailing_moe_v2":
        # the block returns topk_idx [B, S, K]: compare the set of experts of every token
        want = off.data["extras"][1].reshape(-1, off.data["extras"][1].shape[-1]).tolist()
        got = on.data["extras"][1].reshape(-1, on.data["extras"][1].shape[-1]).tolist()
        assert [sorted(r) for r in got] == [sorted(r) for r in want]
    else:
        # the other families do not return indices: an expert got tokens iff its weights got gradient
        assert lib.experts_with_gradient(on.data) == lib.experts_with_gradient(off.data)
    assert len(lib.experts_with_gradient(off.data)) > 1


@pytest.mark.parametrize("fid", IDS)
def test_summary_line_names_the_family_as_patched(fid, probe, preload_lib):
    on = probe(case_of(fid), "on")
    family = FAMILIES[fid][0]
    lines = [ln for ln in on.log if "patched" in ln and family in ln]
    assert len(lines) == 1, on.stderr


@pytest.mark.parametrize("fid", IDS)
def test_bf16_error_vs_fp64_is_small_and_no_worse_than_the_original(fid, probe, preload_lib):
    on = probe(case_of(fid, dtype="bfloat16", reference64=True), "on")
    assert on.patched()
    fused, orig, ref = (lib.by_role(lib.result_tensors(r)) for r in (on.data, on.data["orig"], on.data["ref64"]))
    bound = lib.tol("MOE_TOL_BF16")
    report = []
    for name, want in ref.items():
        if want is None or not want.dtype.is_floating_point:
            continue
        e_fused, e_orig = lib.rel_err(fused[name], want), lib.rel_err(orig[name], want)
        if not (e_fused < bound and e_fused <= 1.5 * e_orig + 1e-3):
            report.append("%s: fused %.3g, original bf16 %.3g" % (name, e_fused, e_orig))
    assert not report, "; ".join(report)


TF5 = [fid for fid in IDS if fid.endswith("-tf5")]


@pytest.mark.parametrize("fid", TF5)
def test_router_hooks_see_the_same_router_logits(fid, probe, preload_lib):
    # transformers 5 records router logits for the aux loss with forward hooks on the gate module
    off = probe(case_of(fid, hook_router=True), "off")
    on = probe(case_of(fid, hook_router=True), "on")
    assert on.patched()
    assert len(on.data["hooked"]) == len(off.data["hooked"]) == 1
    assert lib.rel_err(on.data["hooked"][0], off.data["hooked"][0]) <= lib.tol("MOE_TOL_F32")


# ---------------------------------------------------------------- Bailing: every way the module arrives

BAILING = {"fixture": "bailing/modeling_bailing_moe_v2.py"}


def test_bailing_loaded_as_remote_code_keeps_its_transformers_modules_name(probe, preload_lib):
    on = probe(dict(BAILING, load="remote"), "on")
    assert on.info["module"] == "transformers_modules.my_org.abc123hash.modeling_bailing_moe_v2"
    assert on.patched()


def test_bailing_loaded_by_plain_import_is_patched_and_matches(probe, preload_lib):
    off = probe(dict(BAILING, load="remote"), "off")
    on = probe(dict(BAILING, load="import"), "on")
    assert on.info["module"] == "modeling_bailing_moe_v2"
    assert on.patched()
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


def test_bailing_imported_before_the_hook_is_patched(probe, preload_lib, tmp_path):
    # sitecustomize runs before the cpython.run_* audit event that installs the bootstrap, so the module
    # is already in sys.modules when the hook arrives: the bootstrap's scan must catch it.
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import builtins, sys\n"
        "builtins.__moepatch_test_preimported__ = '_moepatch' not in sys.modules\n"
        "sys.path.insert(0, %r)\n"
        "import modeling_bailing_moe_v2\n" % os.path.join(lib.FIXTURES, "bailing"))
    off = probe(dict(BAILING, load="remote"), "off")
    on = probe(dict(BAILING, load="preimported"), "on", pythonpath=str(site))
    assert on.info["preimported_before_hook"] is True
    assert on.patched(), on.stderr
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


def test_bailing_forked_child_runs_patched_and_returns_the_same_numbers(probe, preload_lib):
    off = probe(dict(BAILING, load="remote"), "off")
    on = probe(dict(BAILING, load="remote", fork=True), "on")
    assert on.info["forked"] and on.info["child_status"] == 0
    assert on.patched("after"), "the child ran unpatched: %s" % on.info
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))


def test_bailing_causal_lm_patches_every_layer_and_matches_loss_and_grads(probe, preload_lib):
    case = dict(BAILING, load="remote", kind="lm")
    off = probe(case, "off")
    on = probe(case, "on")
    assert on.info["n_blocks"] == 2 and on.patched()
    assert [ln for ln in on.log if "patched 2/2" in ln], on.stderr
    lib.assert_close(on.data, off.data, lib.tol("MOE_TOL_F32"))
    assert torch.isfinite(on.data["loss"]).item()
