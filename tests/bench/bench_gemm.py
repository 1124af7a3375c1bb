#!/usr/bin/env python3
"""The grouped GEMM engine alone (moe_grouped_gemm_cuda, kernels/cuda/gemm_sm90.cu) against torch's
`_grouped_mm` on the identical grouped problem and against cuBLAS strided-batched (`torch.bmm`) on a
uniform one, at the MoE forward GEMMs of Ring-mini-2.0 and Qwen3-30B-A3B, bf16, in one run.

    python3 tests/bench/bench_gemm.py [--lib build/libmoepatch_cuda.so] [--tokens 16384] [--out f.json]

Rows per expert come from a random top-K routing of T tokens (about T*K/E each, uneven). gate_up reads
its rows gathered from x (token = slot / K) inside our kernel; `_grouped_mm` needs them gathered first,
so it is timed both alone (on pre-gathered rows) and with the `index_select`. Every implementation's
output is checked first (normwise rel err vs `_grouped_mm` and vs float64 on three experts; the output
is NaN-poisoned before the call, so an unwritten element fails); a CUDA graph capture of our call
proves it needs no host synchronisation. TFLOP/s = 2 * rows * N * D / time.
"""

import argparse
import ctypes
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))

SHAPES = {  # name: E, K, H, I
    "ring-mini-2.0": (256, 8, 2048, 512),
    "qwen3-30b-a3b": (128, 8, 2048, 768),
}
MOE_BF16 = 1


class Mats(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("base", ctypes.c_void_p), ("es", ctypes.c_int64),
                ("rs", ctypes.c_int64), ("cs", ctypes.c_int64)]


class Gemm(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("E", ctypes.c_int), ("N", ctypes.c_int64), ("D", ctypes.c_int64),
                ("rows_max", ctypes.c_int64), ("a", ctypes.c_void_p), ("a_rs", ctypes.c_int64),
                ("gather", ctypes.c_void_p), ("gather_div", ctypes.c_int), ("offsets", ctypes.c_void_p),
                ("b", Mats * 2), ("n_split", ctypes.c_int64), ("c", ctypes.c_void_p), ("c_rs", ctypes.c_int64),
                ("stream", ctypes.c_void_p)]


def load_lib(path):
    lib = ctypes.CDLL(path)
    lib.moe_grouped_gemm_cuda.argtypes = [ctypes.POINTER(Gemm)]
    lib.moe_grouped_gemm_cuda.restype = ctypes.c_int
    lib.moe_last_error_cuda.restype = ctypes.c_char_p
    return lib


def routing(torch, T, E, K, gen):
    logits = torch.randn(T, E, device="cuda", generator=gen)
    flat = torch.topk(logits, K, dim=1).indices.flatten()
    perm = torch.sort(flat, stable=True).indices.to(torch.int32)  # row -> slot
    counts = torch.bincount(flat, minlength=E)
    offsets = torch.zeros(E + 1, dtype=torch.int64, device="cuda")
    offsets[1:] = torch.cumsum(counts, 0)
    return perm, counts, offsets


def ours_call(torch, lib, x, w, out, offsets, gather, K):
    """A callable running moe_grouped_gemm_cuda: out[r] = x[src(r)] @ w[e].T on torch's current stream."""
    E, N, D = w.shape
    g = Gemm()
    g.dtype, g.E, g.N, g.D, g.rows_max = MOE_BF16, E, N, D, out.shape[0]
    g.a, g.a_rs = x.data_ptr(), x.stride(0)
    g.gather, g.gather_div = (gather.data_ptr() if gather is not None else None), K
    g.offsets = offsets.data_ptr()
    g.b[0] = Mats(None, w.data_ptr(), N * D, D, 1)
    g.b[1] = g.b[0]
    g.n_split, g.c, g.c_rs = N, out.data_ptr(), out.stride(0)

    def run():
        g.stream = torch.cuda.current_stream().cuda_stream
        rc = lib.moe_grouped_gemm_cuda(ctypes.byref(g))
        if rc != 0:
            raise RuntimeError("moe_grouped_gemm_cuda: %d %s" % (rc, lib.moe_last_error_cuda().decode()))
    return run


def median_ms(torch, fn, reps):
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


def fp64_err(out, xs, w, offsets, experts):
    worst = 0.0
    for e in experts:
        r0, r1 = int(offsets[e]), int(offsets[e + 1])
        if r1 > r0:
            want = xs[r0:r1].double() @ w[e].double().T
            worst = max(worst, rel(out[r0:r1], want))
    return worst


def bench_problem(torch, lib, name, proj, T, E, K, H, I, reps, gen):
    perm, counts, offsets = routing(torch, T, E, K, gen)
    rows = T * K
    if proj == "gate_up":
        N, D, src = 2 * I, H, torch.randn(T, H, device="cuda", generator=gen).bfloat16()
        gather = perm
        xs = src.index_select(0, (perm // K).long())  # what _grouped_mm must read
    else:
        N, D = H, I
        src = torch.randn(rows, I, device="cuda", generator=gen).bfloat16()
        gather, xs = None, src
    w = (torch.randn(E, N, D, device="cuda", generator=gen) / D ** 0.5).bfloat16()
    flops = 2.0 * rows * N * D
    offs32 = offsets[1:].to(torch.int32)
    out = torch.empty(rows, N, device="cuda", dtype=torch.bfloat16)
    ours = ours_call(torch, lib, src, w, out, offsets, gather, K)
    res = {"shape": name, "proj": proj, "T": T, "rows": rows, "N": N, "D": D, "E": E,
           "min_rows": int(counts.min()), "max_rows": int(counts.max()), "impls": {}}

    out.fill_(float("nan"))
    ours()
    ref = torch._grouped_mm(xs, w.transpose(1, 2), offs=offs32)
    res["err_vs_grouped_mm"] = rel(out, ref)
    res["err_vs_fp64"] = fp64_err(out, xs, w, offsets, [0, E // 2, E - 1])
    res["err_grouped_mm_vs_fp64"] = fp64_err(ref, xs, w, offsets, [0, E // 2, E - 1])
    res["all_written"] = bool(torch.isfinite(out).all())

    # no host synchronisation: the call captures into a CUDA graph, and replays give the same bits
    graph, first = torch.cuda.CUDAGraph(), out.clone()
    with torch.cuda.graph(graph):
        ours()
    out.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    res["graph_replay_equal"] = bool(torch.equal(out, first))

    def add(impl, ms):
        res["impls"][impl] = {"ms": ms, "tflops": flops / ms / 1e9}

    add("moepatch sm90" + (" (gather fused)" if gather is not None else ""), median_ms(torch, ours, reps))
    add("moepatch sm90 (graph replay)", median_ms(torch, graph.replay, reps))
    add("torch _grouped_mm", median_ms(torch, lambda: torch._grouped_mm(xs, w.transpose(1, 2), offs=offs32), reps))
    if gather is not None:
        idx = (perm // K).long()
        add("torch index_select + _grouped_mm",
            median_ms(torch, lambda: torch._grouped_mm(src.index_select(0, idx), w.transpose(1, 2), offs=offs32),
                      reps))
    # uniform problem: rows/E each, cuBLAS strided-batched vs ours on the same uniform split
    m = rows // E
    xu = xs[: m * E].reshape(E, m, D)
    add("uniform: cuBLAS strided-batched (bmm)", median_ms(torch, lambda: torch.bmm(xu, w.transpose(1, 2)), reps))
    uoff = torch.arange(E + 1, device="cuda", dtype=torch.int64) * m
    uout = torch.empty(m * E, N, device="cuda", dtype=torch.bfloat16)
    add("uniform: moepatch sm90", median_ms(torch, ours_call(torch, lib, xs, w, uout, uoff, None, 1), reps))
    res["err_uniform_vs_bmm"] = rel(uout.reshape(E, m, N), torch.bmm(xu, w.transpose(1, 2)))
    return res


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", default=os.path.join(REPO, "build", "libmoepatch_cuda.so"))
    p.add_argument("--tokens", default="16384")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_gemm: needs a CUDA GPU")
    lib = load_lib(os.path.abspath(args.lib))
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for T in [int(t) for t in args.tokens.split(",")]:
        for name, (E, K, H, I) in SHAPES.items():
            for proj in ("gate_up", "down"):
                results.append(bench_problem(torch, lib, name, proj, T, E, K, H, I, args.reps, gen))
    print("| shape | GEMM | T | rows/expert | implementation | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for impl, v in r["impls"].items():
            print("| %s | %s [%d x %d x %d] | %d | %d..%d | %s | %.3f | %.0f |" % (
                r["shape"], r["proj"], r["rows"], r["N"], r["D"], r["T"], r["min_rows"], r["max_rows"], impl,
                v["ms"], v["tflops"]))
    print()
    for r in results:
        print("%s %s: err vs _grouped_mm %.2e, vs fp64 %.2e (_grouped_mm vs fp64 %.2e), uniform vs bmm %.2e, "
              "all written %s, graph replay equal %s" % (
                  r["shape"], r["proj"], r["err_vs_grouped_mm"], r["err_vs_fp64"], r["err_grouped_mm_vs_fp64"],
                  r["err_uniform_vs_bmm"], r["all_written"], r["graph_replay_equal"]))
    bad = [r for r in results if not (r["all_written"] and r["graph_replay_equal"] and r["err_vs_fp64"] < 1e-2
                                      and r["err_vs_grouped_mm"] < 2e-2)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)
    if bad:
        sys.exit("bench_gemm: correctness gate failed for %d problems" % len(bad))


if __name__ == "__main__":
    main()
