"""Probe of test_gpu_auxfree.py, run under LD_PRELOAD with MOEPATCH_AUXFREE=1: the per-expert
counts the balancer accumulated from the CUDA routing kernel, against a direct count of the experts
the block returned (Bailing returns topk_idx) and against the CPU backend on the same inputs.
Prints one JSON object on its last stdout line."""

import copy
import importlib.util
import json
import os
import sys

import torch

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "bailing")


def load():
    name = "transformers_modules.gpu_org.0abc.modeling_bailing_moe_v2"
    spec = importlib.util.spec_from_file_location(name, os.path.join(FIX, "modeling_bailing_moe_v2.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    spec.loader.exec_module(mod)
    return mod


def tracked_counts(block):
    bal = sys.modules["_moepatch"]._glue[0]["_bal"]
    for tr in bal.tracks:
        if tr.ref() is block:
            return tr.acc.cpu().tolist()
    raise AssertionError("block is not tracked by the balancer")


def run(block, x):
    y, (_, idx) = block(x)
    y.float().square().mean().backward()
    return idx


def main():
    mod = load()
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        cfg = mod.tiny_config(hidden_size=64, moe_intermediate_size=32, num_experts=24, num_experts_per_tok=4,
                              n_group=4, topk_group=2)
        cpu_block = mod.BailingMoeV2SparseMoeBlock(cfg).to(dtype).train()
        with torch.no_grad():
            cpu_block.gate.expert_bias.uniform_(-0.05, 0.05)
        gpu_block = mod.BailingMoeV2SparseMoeBlock(cfg).to(dtype).train()
        gpu_block.load_state_dict(copy.deepcopy(cpu_block.state_dict()))
        gpu_block.cuda()
        x = torch.randn(3, 333, 64, generator=torch.Generator().manual_seed(1)).to(dtype)
        idx_gpu = run(gpu_block, x.cuda())
        idx_cpu = run(cpu_block, x)
        E = cfg.num_experts
        out[str(dtype)] = {
            "patched": [getattr(b, "_moepatch", None) is not None and b._moepatch.disabled is None
                        for b in (cpu_block, gpu_block)],
            "gpu_counts": tracked_counts(gpu_block),
            "gpu_idx_counts": torch.bincount(idx_gpu.reshape(-1).cpu(), minlength=E).tolist(),
            "cpu_counts": tracked_counts(cpu_block),
            "cpu_idx_counts": torch.bincount(idx_cpu.reshape(-1), minlength=E).tolist(),
            "slots": int(idx_gpu.numel()),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
