"""GPU half of tests/py/test_autocast.py: under torch.autocast("cuda", bfloat16) the fused block runs
(bf16 weights with an fp32 input, and fp32 weights: cast per call), returns the input's dtype and
fp32 gradients where the parameters are fp32, and is within the bf16 tolerance of float64 and no worse
than the original under autocast by more than 1.5x + 1e-3. Skips without CUDA (CI)."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: GPU tests skipped", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = os.environ.get("MOEPATCH_LIB", os.path.join(HERE, "..", "..", "build", "libmoepatch.so"))
sys.path.insert(0, os.path.join(HERE, "..", "py"))
import moepatch_testlib as lib  # noqa: E402

CASES = ["qwen3_moe-tf5/bf16-weights", "qwen3_moe-tf5/fp32-weights", "bailing_moe_v2/bf16-weights",
         "bailing_moe_v2/fp32-weights"]


@pytest.fixture(scope="module")
def result():
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEPATCH")}
    env["LD_PRELOAD"] = os.path.abspath(LIB)
    out = subprocess.run([sys.executable, os.path.join(HERE, "autocast_gpu_probe.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_fused_runs_and_keeps_the_dtypes(result, case):
    r = result[case]
    assert r["fused_ran"], r
    assert r["y_dtype"] == r["x_grad_dtype"] == "torch.float32"
    want = "torch.float32" if case.endswith("fp32-weights") else "torch.bfloat16"
    assert r["grad_dtypes"] == [want]


@pytest.mark.parametrize("case", CASES)
def test_as_close_to_fp64_as_the_original(result, case):
    r = result[case]
    bound = lib.tol("MOE_TOL_BF16")
    bad = []
    for k, (fused, orig) in r["err"].items():
        if not fused < bound or (orig is not None and fused > 1.5 * orig + 1e-3):
            bad.append("%s: fused %.3g, original %s" % (k, fused, orig))
    assert not bad, bad
    if case.startswith("bailing"):  # its loop cannot run an fp32 input under autocast
        assert "dtypes match" in r.get("orig_error", ""), r.get("orig_error")
