"""Where the time of one fused MoE layer goes: torch.profiler over a patched fwd+bwd at the
Ring-mini-2.0 shape, printing the kernels by total CUDA time. --block ring (default): the Ring
remote-code block (ModuleList experts, shared expert, fp32 router); --block tf5: transformers 5's
Qwen3 class at the Ring shape (3-D experts; the layer issue 4 times).

    LD_PRELOAD=$PWD/build/libmoepatch.so python3 tests/bench/profile_moe.py [--tokens 16384] [--block tf5]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moe  # noqa: E402  (fixtures loader and the Ring block builder)

STEPS = 5  # profiled fwd+bwd steps


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--block", choices=("ring", "tf5"), default="ring")
    args = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        sys.exit("profile_moe: no CUDA device")
    shape = bench_moe.SHAPES["ring-mini-2.0"]
    if args.block == "tf5":
        block, _ = bench_moe.make_qwen3(torch, bench_moe.qwen3_source(), shape, seed=0)
    else:
        block = bench_moe.make_bailing(torch, shape, seed=0)
    if getattr(block, "_moepatch", None) is None:
        sys.exit("profile_moe: the block is not patched (run under LD_PRELOAD)")
    x = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(1, args.tokens, 2048, device="cuda", dtype=torch.bfloat16)

    def step():
        # gradients dropped first, as a training step's zero_grad(set_to_none) does: otherwise the
        # profile shows an add into every parameter's .grad that training does not pay
        bench_moe.clear_grads(block, [x])
        y = bench_moe.first(block(x))
        y.backward(dy)

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    table = prof.key_averages().table
    print(table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print("host side (self CPU time):")
    print(table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))
    print_gaps(torch, prof, steps=STEPS)


def gpu_intervals(torch, prof):
    """(start_us, end_us, name) of every GPU activity the profiler saw, in start order."""
    cuda = torch.autograd.DeviceType.CUDA
    iv = [(e.time_range.start, e.time_range.end, e.name) for e in prof.events()
          if e.device_type == cuda and e.time_range.end > e.time_range.start]
    return sorted(iv)


def print_gaps(torch, prof, steps, show=8):
    """Where the GPU idles between kernels: busy time (union of kernel intervals) against the span
    from the first kernel to the last, per step, and the longest idle gaps with their neighbours."""
    iv = gpu_intervals(torch, prof)
    if not iv:
        print("gaps: the profiler recorded no GPU activity")
        return
    busy, gaps, end, prev = 0.0, [], iv[0][0], None
    for s, e, name in iv:
        if s > end:
            gaps.append((s - end, prev, name))
        busy += max(0.0, e - max(s, end))
        if e > end:
            end, prev = e, name
    span = end - iv[0][0]
    print("GPU busy %.3f ms of a %.3f ms span per fwd+bwd (%d steps): idle %.3f ms, in %d gaps" % (
        busy / 1e3 / steps, span / 1e3 / steps, steps, (span - busy) / 1e3 / steps, len(gaps)))
    for g, before, after in sorted(gaps, key=lambda x: x[0], reverse=True)[:show]:
        print("  idle %7.1f us  after %-40.40s  before %-40.40s" % (g, before, after))


if __name__ == "__main__":
    main()
