"""Where a decode-size forward's GPU time goes: the patched forward of transformers 5's Qwen3 class at
the Ring-mini-2.0 and Qwen3-30B-A3B shapes (3-D experts) and, with --blocks remote, the Ring
remote-code block (bailing fixture: ModuleList experts, shared expert, fp32 router), captured in a
CUDA graph and replayed under torch.profiler; prints, for one replay, every kernel's start offset and
duration, then the span and the busy time. This is the quantity bench_moe.py's decode table reports
as "fwd graph ms".

    LD_PRELOAD=$PWD/build/libmoepatch.so python3 tests/bench/profile_decode.py [--tokens 1,8] [--shapes ...]
        [--blocks tf5,remote]
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_moe  # noqa: E402  (the block builders, the graph capture and its timing)

REPLAYS = 10  # profiled replays; the middle one is printed


def one_replay(torch, graph):
    """The kernels of one replay (the middle of REPLAYS), sorted by start."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(5):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(REPLAYS):
            graph.replay()
        torch.cuda.synchronize()
    evs = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                 key=lambda e: e.time_range.start)
    n = len(evs) // REPLAYS
    return evs[REPLAYS // 2 * n:(REPLAYS // 2 + 1) * n]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", default="1,8")
    ap.add_argument("--shapes", default="ring-mini-2.0,qwen3-30b-a3b")
    ap.add_argument("--seed", type=int, default=0, help="bench_moe.py's --seed: the same block and input")
    ap.add_argument("--blocks", default="tf5", help="tf5 (Qwen3 class, 3-D experts) and/or remote "
                    "(Ring's remote-code block; Ring shapes only)")
    args = ap.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("profile_decode: no CUDA device")
    src = bench_moe.qwen3_source()
    for name in args.shapes.split(","):
        s = bench_moe.SHAPES[name]
        for kind in args.blocks.split(","):
            if kind == "remote" and s["kind"] != "ring":
                continue
            profile_block(torch, args, name, s, kind, make_block(torch, src, args, s, kind))


def make_block(torch, src, args, s, kind):
    """bench_moe.impls_for's block (and seed) for the moepatch_tf5 / moepatch row of this shape."""
    if kind == "remote":
        block = bench_moe.make_bailing(torch, s, args.seed + 1)
    else:
        block, _ = bench_moe.make_qwen3(torch, src, s, seed=args.seed + (2 if s["kind"] == "ring" else 3))
    if getattr(block, "_moepatch", None) is None:
        sys.exit("profile_decode: the block is not patched (run under LD_PRELOAD)")
    return block


def profile_block(torch, args, name, s, kind, block):
    for T in (int(t) for t in args.tokens.split(",")):
        # bench_moe.py's first input for this T (the routing, so the rows per expert, follow x)
        g = torch.Generator(device="cuda").manual_seed(args.seed + T)
        x = torch.randn(1, T, s["H"], device="cuda", generator=g).to(torch.bfloat16)
        ms = bench_moe.graph_fwd_ms(torch, block, x)
        kernels = one_replay(torch, bench_moe.capture_fwd(torch, block, x))
        print("== %s %s T=%d: graph fwd %.4f ms, %d kernels per replay" % (name, kind, T, ms, len(kernels)))
        t0 = kernels[0].time_range.start
        for e in kernels:
            print("  +%6.1f us  %6.1f us  %s" % (e.time_range.start - t0, e.time_range.elapsed_us(), e.name[:90]))
        print("  span %.1f us, busy %.1f us" % (kernels[-1].time_range.end - t0,
                                               sum(e.time_range.elapsed_us() for e in kernels)))


if __name__ == "__main__":
    main()
