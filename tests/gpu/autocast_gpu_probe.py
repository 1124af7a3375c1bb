"""Probe for test_gpu_autocast.py (run under LD_PRELOAD): blocks called under
torch.autocast("cuda", bfloat16), in the two layouts autocast users meet —
  bf16-weights: bf16 weights, fp32 input (axolotl's fp32 residual stream),
  fp32-weights: fp32 weights and input (plain PyTorch AMP) —
for the Qwen3 tf5 fixture (3-D experts) and the Bailing fixture (ModuleList + shared expert). Per case:
whether the fused path ran, output / input-grad dtypes, and the error of every output and gradient
against the block's own forward in float64 (outside autocast, on the same weights and input), for the
fused path and for the original under autocast (None where the original cannot run: the Bailing loop
under autocast with an fp32 input). Prints one JSON line."""

import copy
import importlib.util
import json
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures")
sys.path.insert(0, os.path.join(HERE, "..", "py"))
from probe_block import init_tensors  # noqa: E402  spread routing: no top-k ties to flip
CASES = {"qwen3_moe-tf5": "tf5/modeling_qwen3_moe.py", "bailing_moe_v2": "bailing/modeling_bailing_moe_v2.py"}


def load(rel):
    path = os.path.join(FIXTURES, rel)
    name = os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    m = importlib.util.module_from_spec(spec)
    sys.modules[name] = m
    spec.loader.exec_module(m)
    return m


DEV = os.environ.get("AUTOCAST_PROBE_DEVICE", "cuda")  # cpu: a smoke run of this script on the CPU backend


def run(block, call, x, dy, amp):
    for p in block.parameters():
        p.grad = None
    leaf = x.detach().clone().requires_grad_(True)
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=amp):
        out = call(leaf)
    y = out[0] if isinstance(out, tuple) else out
    (y.float() * dy.float()).sum().backward()
    res = {"y": y.detach(), "x_grad": leaf.grad}
    res.update({"grad:" + n: p.grad for n, p in block.named_parameters() if p.grad is not None})
    return res


def rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main():
    out = {}
    g = torch.Generator().manual_seed(0)
    for fid, rel_path in CASES.items():
        m = load(rel_path)
        for layout in ("bf16-weights", "fp32-weights"):
            torch.manual_seed(0)
            cfg = m.tiny_config()
            block = getattr(m, m.BLOCK_CLASS)(cfg)
            init_tensors(block, cfg.hidden_size, 0)
            wdt = torch.bfloat16 if layout == "bf16-weights" else torch.float32
            block.to(device=DEV, dtype=wdt).train()
            H = cfg.hidden_size
            x = torch.randn(4, 64, H, generator=g).to(DEV)  # [B, S, H]: what the blocks take
            dy = torch.randn(4, 64, H, generator=g).to(DEV)
            st = block.__dict__.get("_moepatch")
            calls = st.calls if st else 0
            fused = run(block, block, x, dy, True)
            st = block.__dict__.get("_moepatch")
            rec = {"fused_ran": bool(st and st.calls > calls and st.disabled is None),
                   "y_dtype": str(fused["y"].dtype), "x_grad_dtype": str(fused["x_grad"].dtype),
                   "grad_dtypes": sorted({str(v.dtype) for k, v in fused.items() if k.startswith("grad:")})}
            ref_block = copy.deepcopy(block).double()  # the class forward: the copy keeps the patch state
            ref = run(ref_block, lambda inp: type(ref_block).forward(ref_block, inp), x.double(), dy.double(),
                      False)
            try:
                orig = run(block, lambda inp: type(block).forward(block, inp), x, dy, True)
            except RuntimeError as e:
                orig, rec["orig_error"] = None, str(e).splitlines()[0]
            rec["err"] = {k: [rel(fused[k], r), rel(orig[k], r) if orig else None] for k, r in ref.items()}
            out["%s/%s" % (fid, layout)] = rec
    print(json.dumps(out))


if __name__ == "__main__":
    main()
