"""GPU half of the aux-free balancing tests: the per-expert counts come out of the CUDA routing
kernel and equal a direct count of the chosen experts, and the CPU backend's counts on the same
inputs. Skips without CUDA (CI)."""

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


@pytest.fixture(scope="module")
def result():
    env = dict(os.environ, LD_PRELOAD=os.path.abspath(LIB), MOEPATCH="1", MOEPATCH_AUXFREE="1")
    env.pop("MOEPATCH_BACKEND", None)
    out = subprocess.run([sys.executable, os.path.join(HERE, "auxfree_gpu_probe.py")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_both_backends_patched(result, dtype):
    assert result[dtype]["patched"] == [True, True]


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.bfloat16"])
def test_cuda_counts_equal_a_count_of_the_chosen_experts(result, dtype):
    r = result[dtype]
    assert r["gpu_counts"] == r["gpu_idx_counts"]
    assert sum(r["gpu_counts"]) == r["slots"]


def test_cuda_counts_equal_the_cpu_backend_in_fp32(result):
    r = result["torch.float32"]
    assert r["cpu_counts"] == r["cpu_idx_counts"]
    assert r["gpu_counts"] == r["cpu_counts"]
