"""Where the time of one fused MoE layer goes: torch.profiler over a patched fwd+bwd at the
Ring-mini-2.0 shape (the Ring remote-code block), printing the kernels by total CUDA time.

    LD_PRELOAD=$PWD/build/libmoepatch.so python3 tests/bench/profile_moe.py [--tokens 16384]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moe  # noqa: E402  (fixtures loader and the Ring block builder)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=25)
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("profile_moe: no CUDA device")
    block = bench_moe.make_bailing(torch, bench_moe.SHAPES["ring-mini-2.0"], seed=0)
    if getattr(block, "_moepatch", None) is None:
        sys.exit("profile_moe: the block is not patched (run under LD_PRELOAD)")
    x = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16)

    def step():
        # gradients dropped first, as a training step's zero_grad(set_to_none) does: otherwise the
        # profile shows an add into every parameter's .grad that training does not pay
        for p in block.parameters():
            p.grad = None
        x.grad = None
        y = block(x)[0]
        y.backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
