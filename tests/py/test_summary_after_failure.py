"""Regression: a model whose construction raises must not leave its blocks in the next model's summary
line. Found with transformers 5.17 (tests/gpu/test_hf_families.py): a tiny mistral4 config that failed in
its rotary embedding after two MoE blocks were built made the next model (mixtral) report
"patched 2/4 MoE blocks" plus a refusal of 2 mistral4 blocks it does not have."""

import os
import subprocess
import sys

import moepatch_testlib as lib

MODELING = '''
import torch
from torch import nn
from modeling_qwen3_moe import Qwen3MoeSparseMoeBlock, tiny_config


class BrokenModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = nn.ModuleList([Qwen3MoeSparseMoeBlock(cfg), Qwen3MoeSparseMoeBlock(cfg)])
        raise ValueError("bad config")


class GoodModel(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = Qwen3MoeSparseMoeBlock(cfg)
'''

SCRIPT = '''
import torch
import modeling_summary_case as m
cfg = m.tiny_config()
try:
    m.BrokenModel(cfg)
except ValueError:
    pass
good = m.GoodModel(cfg)
print("_moepatch" in good.mlp.__dict__)
'''


def test_failed_construction_does_not_leak_into_the_next_summary(tmp_path):
    (tmp_path / "modeling_summary_case.py").write_text(MODELING)
    env = lib.base_env("on", {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.path.join(lib.FIXTURES, "tf5")])})
    proc = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "True", proc.stdout + proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("moepatch:")]
    summaries = [ln for ln in lines if "MoE blocks" in ln]
    assert summaries == ["moepatch: patched 1/1 MoE blocks [qwen3_moe: 1 (softmax_topk)]; backend auto"], lines
