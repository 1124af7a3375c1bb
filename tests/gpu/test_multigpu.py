"""Multi-GPU (issue 5): under torchrun every rank patches the same blocks, they stay on the fused path,
and DDP / FSDP2 training tracks the single-GPU loss curve. Skips without 2 CUDA devices."""

import json
import os
import shutil
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
    pytest.skip("fewer than 2 CUDA devices: multi-GPU tests skipped", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
LIB = os.path.abspath(os.environ.get("MOEPATCH_LIB", os.path.join(HERE, "..", "..", "build", "libmoepatch.so")))


def train(tmp_path, mode, nproc):
    out = tmp_path / ("%s.json" % mode)
    env = dict(os.environ, LD_PRELOAD=LIB, MOEPATCH="1", NCCL_NVLS_ENABLE="0",
               TORCH_SYMM_MEM_DISABLE_MULTICAST="1")
    torchrun = shutil.which("torchrun") or sys.executable
    cmd = ([torchrun] if torchrun != sys.executable else [sys.executable, "-m", "torch.distributed.run"])
    cmd += ["--standalone", "--nproc_per_node", str(nproc), os.path.join(HERE, "multigpu_train.py"),
            "--mode", mode, "--out", str(out)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multigpu")
    return {"single": train(tmp, "single", 1), "ddp": train(tmp, "ddp", 2), "fsdp": train(tmp, "fsdp", 2)}


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_every_rank_patches_the_same_blocks_and_stays_fused(runs, mode):
    r = runs[mode]
    assert r["patched_per_rank"] == [2, 2]
    assert r["fused_per_rank"] == [True, True]


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_loss_tracks_the_single_gpu_curve(runs, mode):
    single, multi = runs["single"]["losses"], runs[mode]["losses"]
    assert multi[-1] < 0.5 * multi[0]  # it trains
    worst = max(abs(a - b) / abs(b) for a, b in zip(multi, single))
    assert worst < 1e-3, "worst relative loss difference %.3g" % worst
