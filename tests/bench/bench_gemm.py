#!/usr/bin/env python3
"""The grouped GEMM engine alone (moe_grouped_gemm_cuda, kernels/cuda/gemm_sm90.cu) against torch's
`_grouped_mm` on the identical grouped problem, for the six expert GEMMs of one MoE layer's forward and
backward, at Ring-mini-2.0 and Qwen3-30B-A3B shapes, bf16, in one run.

    python3 tests/bench/bench_gemm.py [--lib build/libmoepatch_cuda.so] [--tokens 16384] [--out f.json]

Rows per expert come from a random top-K routing of T tokens (about T*K/E each, uneven). Where a GEMM
reads token rows (x or dy: slot -> token = slot / K) our kernel gathers them while loading; `_grouped_mm`
needs them gathered first, so it is timed both alone (on pre-gathered rows) and with the `index_select`.
Every output is checked first (normwise rel err vs `_grouped_mm` and vs float64 on three experts; it is
NaN-poisoned before the call, so an unwritten element fails), and a CUDA graph capture of our call
proves that it needs no host synchronisation. Then the same six GEMMs on a uniform split of the rows
(T*K/E per expert, no gather): ours against cuBLAS strided-batched (`torch.bmm`), the ceiling of a
grouped GEMM (skip with --no-uniform). TFLOP/s = 2 * rows * N * D / time. Exits non-zero when a check
fails.

A seventh row, "fwd gate_up + SwiGLU", is the forward's gate_up GEMM as the layer runs it: SwiGLU fused
into its output (c and act = silu(gate) up); its anchor is `_grouped_mm` followed by torch's silu * up.
The layer's six GEMMs are the other six rows (old builds passed with --lib just fail the seventh).
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
SCHEDULE_NAMES = {0: "moepatch sm90 default (warp-specialized)", 1: "moepatch sm90 schedule 1 (all threads)",
                  2: "moepatch sm90 schedule 2 (warp-specialized)", 3: "moepatch sm90 schedule 3 (ping-pong)",
                  4: "moepatch sm90 schedule 4 (cooperative, TMA stores)",
                  6: "moepatch sm90 schedule 6 (narrow ping-pong, 128x64)"}
ONE_PART = 1 << 40  # a split past every dimension: one operand part


class Mats(ctypes.Structure):
    _fields_ = [("ptr", ctypes.c_void_p), ("base", ctypes.c_void_p), ("es", ctypes.c_int64),
                ("rs", ctypes.c_int64), ("cs", ctypes.c_int64)]


class Op(ctypes.Structure):
    _fields_ = [("rows", ctypes.c_int), ("base", ctypes.c_void_p), ("rs", ctypes.c_int64),
                ("gather", ctypes.c_void_p), ("gather_div", ctypes.c_int), ("m", Mats * 2),
                ("split", ctypes.c_int64), ("split_k", ctypes.c_int)]


class Gemm(ctypes.Structure):
    _fields_ = [("dtype", ctypes.c_int), ("E", ctypes.c_int), ("varlen_k", ctypes.c_int),
                ("M", ctypes.c_int64), ("N", ctypes.c_int64), ("D", ctypes.c_int64),
                ("rows_max", ctypes.c_int64), ("offsets", ctypes.c_void_p), ("a", Op), ("b", Op),
                ("c", ctypes.c_void_p), ("c_rs", ctypes.c_int64), ("cm", Mats * 2),
                ("c_split", ctypes.c_int64), ("stream", ctypes.c_void_p), ("schedule", ctypes.c_int),
                ("ctas", ctypes.c_int), ("act", ctypes.c_void_p), ("act_rs", ctypes.c_int64)]


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


def rows_op(t, gather=None, div=1):
    """Activations [rows, width] (row stride t.stride(0)), optionally read through gather[r] // div."""
    return Op(1, t.data_ptr(), t.stride(0), gather.data_ptr() if gather is not None else None, div)


def weights_op(w, mn):
    """3-D weights read as (x, k): w [E, X, K] K-major (mn=0), or w [E, K, X] MN-major (mn=1)."""
    _, A, B = w.shape
    m = Mats(None, w.data_ptr(), A * B, 1, B) if mn else Mats(None, w.data_ptr(), A * B, B, 1)
    o = Op(0, None, 0, None, 1)
    o.m[0] = o.m[1] = m
    o.split, o.split_k = ONE_PART, mn
    return o


def varlen_m(E, N, D, rows, offsets, a, b, out):
    """out [rows, N]: out[r] = Σ_k A[r, k] B_e[n, k]."""
    g = Gemm()
    g.dtype, g.E, g.varlen_k, g.N, g.D, g.rows_max = MOE_BF16, E, 0, N, D, rows
    g.offsets, g.a, g.b, g.c, g.c_rs = offsets.data_ptr(), a, b, out.data_ptr(), out.stride(0)
    return g


def varlen_k(E, M, N, rows, offsets, a, b, out):
    """out [E, M, N]: C_e = Σ_r A[m, r] B[n, r] over expert e's rows."""
    g = Gemm()
    g.dtype, g.E, g.varlen_k, g.M, g.N, g.rows_max = MOE_BF16, E, 1, M, N, rows
    g.offsets, g.a, g.b = offsets.data_ptr(), a, b
    g.cm[0] = g.cm[1] = Mats(None, out.data_ptr(), M * N, N, 1)
    g.c_split = ONE_PART
    return g


def ours_call(torch, lib, g):
    """A callable running moe_grouped_gemm_cuda(g) on torch's current stream."""
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


def operands(torch, gen, device, E, H, I, x_rows, rows):
    """Random bf16 operands of one layer's six GEMMs: x, dy [x_rows, H]; a [rows, I]; dh [rows, 2I];
    w_gu [E, 2I, H], w_dn [E, H, I] scaled by 1/sqrt(fan-in)."""
    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, generator=gen) * scale).bfloat16()

    return (rnd(x_rows, H), rnd(x_rows, H), rnd(rows, I), rnd(rows, 2 * I),
            rnd(E, 2 * I, H, scale=H ** -0.5), rnd(E, H, I, scale=I ** -0.5))


def bf16_empty(torch, device, *shape):
    return torch.empty(*shape, device=device, dtype=torch.bfloat16)


def selected(only, name):
    """--gemms: name contains one of the comma-separated words (no filter: every GEMM)."""
    return not only or any(w.strip() in name for w in only.split(","))


def problems(torch, T, E, K, H, I, gen):
    """The six routed-expert GEMMs of one MoE layer (forward gate_up and down; backward input grads
    and weight grads of both), each: name, FLOPs, our Gemm, its output tensor, the `_grouped_mm` anchor
    on pre-gathered rows, the anchor with its gather (or None), an fp64 check per expert."""
    perm, counts, offsets = routing(torch, T, E, K, gen)
    rows, tok, offs32 = T * K, (perm // K).long(), offsets[1:].to(torch.int32)
    x, dy, a, dh, w_gu, w_dn = operands(torch, gen, "cuda", E, H, I, T, rows)
    xg, dyg = x.index_select(0, tok), dy.index_select(0, tok)
    lo = offsets.tolist()

    def span(e):
        return slice(lo[e], lo[e + 1])

    def check_m(A, W):  # out[r] = A[r] @ W[e]ᵀ with W [E, N, D]
        return lambda e, o: (o[span(e)], A[span(e)].double() @ W[e].double().T)

    def check_k(A, B):  # out[e] = A[rows]ᵀ @ B[rows]
        return lambda e, o: (o[e], A[span(e)].double().T @ B[span(e)].double())

    def empty(*shape):
        return bf16_empty(torch, "cuda", *shape)

    gm = torch._grouped_mm
    p = []
    o = empty(rows, 2 * I)
    p.append(("fwd gate_up (x gathered)", varlen_m(E, 2 * I, H, rows, offsets, rows_op(x, perm, K),
                                                   weights_op(w_gu, 0), o), o,
              lambda: gm(xg, w_gu.transpose(1, 2), offs=offs32),
              lambda: gm(x.index_select(0, tok), w_gu.transpose(1, 2), offs=offs32), check_m(xg, w_gu)))
    # the same GEMM with SwiGLU in its output (what the layer runs): gate and up as two parts
    o, act = empty(rows, 2 * I), empty(rows, I)
    g = varlen_m(E, 2 * I, H, rows, offsets, rows_op(x, perm, K), weights_op(w_gu, 0), o)
    g.b.m[1] = Mats(None, w_gu.data_ptr() + I * H * w_gu.element_size(), 2 * I * H, H, 1)
    g.b.split, g.act, g.act_rs = I, act.data_ptr(), I
    g.act_tensor = act

    def unfused():
        h = gm(xg, w_gu.transpose(1, 2), offs=offs32)
        return h, torch.nn.functional.silu(h[:, :I]) * h[:, I:]
    p.append(("fwd gate_up + SwiGLU (x gathered)", g, o, lambda: unfused()[0], None, check_m(xg, w_gu)))
    o = empty(rows, H)
    p.append(("fwd down", varlen_m(E, H, I, rows, offsets, rows_op(a), weights_op(w_dn, 0), o), o,
              lambda: gm(a, w_dn.transpose(1, 2), offs=offs32), None, check_m(a, w_dn)))
    o = empty(rows, I)
    p.append(("bwd dgrad down (dy gathered)", varlen_m(E, I, H, rows, offsets, rows_op(dy, perm, K),
                                                       weights_op(w_dn, 1), o), o,
              lambda: gm(dyg, w_dn, offs=offs32), lambda: gm(dy.index_select(0, tok), w_dn, offs=offs32),
              check_m(dyg, w_dn.transpose(1, 2))))
    o = empty(rows, H)
    p.append(("bwd dgrad gate_up", varlen_m(E, H, 2 * I, rows, offsets, rows_op(dh), weights_op(w_gu, 1), o), o,
              lambda: gm(dh, w_gu, offs=offs32), None, check_m(dh, w_gu.transpose(1, 2))))
    o = empty(E, H, I)
    p.append(("bwd wgrad down (dy gathered)", varlen_k(E, H, I, rows, offsets, rows_op(dy, perm, K),
                                                       rows_op(a), o), o,
              lambda: gm(dyg.T, a, offs=offs32), lambda: gm(dy.index_select(0, tok).T, a, offs=offs32),
              check_k(dyg, a)))
    o = empty(E, 2 * I, H)
    p.append(("bwd wgrad gate_up (x gathered)", varlen_k(E, 2 * I, H, rows, offsets, rows_op(dh),
                                                         rows_op(x, perm, K), o), o,
              lambda: gm(dh.T, xg, offs=offs32), lambda: gm(dh.T, x.index_select(0, tok), offs=offs32),
              check_k(dh, xg)))
    flops = 2.0 * rows * H * I
    mult = {"fwd gate_up (x gathered)": 2, "fwd gate_up + SwiGLU (x gathered)": 2, "bwd dgrad gate_up": 2,
            "bwd wgrad gate_up (x gathered)": 2}
    keep = (x, dy, a, dh, w_gu, w_dn, perm, offsets, offs32, xg, dyg)
    return [(n, flops * mult.get(n, 1), g, o, an, ag, ck) for n, g, o, an, ag, ck in p], keep, counts


def uniform_problems(torch, E, H, I, m, gen, device="cuda"):
    """The same six GEMMs on a uniform split, m rows per expert and no gather, each: name, FLOPs, our
    Gemm, its output, and cuBLAS strided-batched (`torch.bmm`) on the identical problem, whose result has
    the output's shape. The ceiling for a grouped GEMM: equal experts, one batched call."""
    rows = E * m
    offsets = torch.arange(E + 1, device=device, dtype=torch.int64) * m
    x, dy, a, dh, w_gu, w_dn = operands(torch, gen, device, E, H, I, rows, rows)

    def empty(*shape):
        return bf16_empty(torch, device, *shape)

    def per(t):  # [rows, w] as [E, m, w]
        return t.view(E, m, t.shape[1])

    bmm = torch.bmm
    p = [("fwd gate_up", 2, varlen_m, (E, 2 * I, H), rows_op(x), weights_op(w_gu, 0), empty(rows, 2 * I),
          lambda: bmm(per(x), w_gu.transpose(1, 2))),
         ("fwd down", 1, varlen_m, (E, H, I), rows_op(a), weights_op(w_dn, 0), empty(rows, H),
          lambda: bmm(per(a), w_dn.transpose(1, 2))),
         ("bwd dgrad down", 1, varlen_m, (E, I, H), rows_op(dy), weights_op(w_dn, 1), empty(rows, I),
          lambda: bmm(per(dy), w_dn)),
         ("bwd dgrad gate_up", 2, varlen_m, (E, H, 2 * I), rows_op(dh), weights_op(w_gu, 1), empty(rows, H),
          lambda: bmm(per(dh), w_gu)),
         ("bwd wgrad down", 1, varlen_k, (E, H, I), rows_op(dy), rows_op(a), empty(E, H, I),
          lambda: bmm(per(dy).transpose(1, 2), per(a))),
         ("bwd wgrad gate_up", 2, varlen_k, (E, 2 * I, H), rows_op(dh), rows_op(x), empty(E, 2 * I, H),
          lambda: bmm(per(dh).transpose(1, 2), per(x)))]
    flops = 2.0 * rows * H * I
    out = []
    for name, mult, form, dims, opa, opb, o, anchor in p:
        g = form(*dims, rows, offsets, opa, opb, o)
        out.append(("uniform " + name, flops * mult, g, o, anchor))
    return out, (x, dy, a, dh, w_gu, w_dn, offsets)


def bench_uniform(torch, lib, name, T, E, K, H, I, reps, gen, only=None):
    """Ours and cuBLAS strided-batched on the uniform split of the same T*K rows (T*K % E == 0)."""
    rows = T * K
    if rows % E:
        return []
    plist, keep = uniform_problems(torch, E, H, I, rows // E, gen)
    results = []
    for pname, flops, g, out, anchor in plist:
        if not selected(only, pname):
            continue
        ours = ours_call(torch, lib, g)
        res = {"shape": name, "gemm": pname, "T": T, "E": E, "min_rows": rows // E, "max_rows": rows // E,
               "impls": {}, "uniform": True}
        out.fill_(float("nan"))
        ours()
        ref = anchor()
        res["all_written"] = bool(torch.isfinite(out).all())
        res["err_vs_bmm"] = rel(out.view(ref.shape), ref)
        for impl, fn in (("uniform: moepatch sm90 default", ours), ("uniform: cuBLAS strided-batched (bmm)", anchor)):
            ms = median_ms(torch, fn, reps)
            res["impls"][impl] = {"ms": ms, "tflops": flops / ms / 1e9}
        results.append(res)
    del keep
    return results


def bench_shape(torch, lib, name, T, E, K, H, I, reps, gen, only=None, schedules=(0,)):
    plist, keep, counts = problems(torch, T, E, K, H, I, gen)
    results = []
    for pname, flops, g, out, anchor, anchor_gather, check in plist:
        if not selected(only, pname):
            continue
        g.schedule = 1
        ours = ours_call(torch, lib, g)
        res = {"shape": name, "gemm": pname, "T": T, "E": E, "min_rows": int(counts.min()),
               "max_rows": int(counts.max()), "impls": {}}
        out.fill_(float("nan"))
        ours()
        try:
            ref = anchor()
        except RuntimeError as exc:  # this torch's _grouped_mm does not take the form
            ref, anchor, anchor_gather = None, None, None
            res["anchor_error"] = str(exc).splitlines()[0]
        res["all_written"] = bool(torch.isfinite(out).all())
        # three experts that have rows (decode sizes leave most experts empty; an empty one has nothing
        # to compare)
        busy = [e for e in range(E) if int(counts[e]) > 0]
        experts = sorted({busy[0], busy[len(busy) // 2], busy[-1]}) if busy else []
        res["err_vs_fp64"] = max((rel(*check(e, out)) for e in experts), default=0.0)
        res["err_vs_grouped_mm"] = rel(out, ref) if ref is not None else 0.0
        res["err_grouped_mm_vs_fp64"] = (max((rel(*check(e, ref)) for e in experts), default=0.0)
                                         if ref is not None else 0.0)
        if g.act:  # SwiGLU of our own stored halves, in fp32, against the fused output
            half = out.shape[1] // 2
            want = (torch.nn.functional.silu(out[:, :half].float()) * out[:, half:].float()).to(out.dtype)
            res["act_err"] = rel(g.act_tensor, want)
            res["all_written"] = res["all_written"] and bool(torch.isfinite(g.act_tensor).all())
        graph, first = torch.cuda.CUDAGraph(), out.clone()
        with torch.cuda.graph(graph):
            ours()
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        res["graph_replay_equal"] = bool(torch.equal(out, first))

        def add(impl, ms):
            res["impls"][impl] = {"ms": ms, "tflops": flops / ms / 1e9}

        add(SCHEDULE_NAMES[1], median_ms(torch, ours, reps))
        # the other schedules: the same bits as schedule 1 (same tiles and wgmma order), every element written
        for sched in schedules:
            if sched == 1:
                continue
            g2 = type(g).from_buffer_copy(g)
            g2.schedule = sched
            other = ours_call(torch, lib, g2)
            try:
                out.fill_(float("nan"))
                other()
                torch.cuda.synchronize()
                res["schedules_equal"] = res.get("schedules_equal", True) and bool(torch.equal(out, first))
                add(SCHEDULE_NAMES[sched], median_ms(torch, other, reps))
            except RuntimeError as exc:
                res["schedules_equal"] = False
                res["schedule_error"] = "schedule %d: %s" % (sched, exc)
        if anchor is not None:
            add("torch _grouped_mm", median_ms(torch, anchor, reps))
        if anchor_gather is not None:
            add("torch index_select + _grouped_mm", median_ms(torch, anchor_gather, reps))
        results.append(res)
    del keep
    return results


def ok(r):
    """The correctness gate of one result row."""
    if r.get("uniform"):
        return r["all_written"] and r["err_vs_bmm"] < 2e-2
    return (r["all_written"] and r["graph_replay_equal"] and r["err_vs_fp64"] < 1e-2
            and r["err_vs_grouped_mm"] < 2e-2 and r.get("schedules_equal", True) and r.get("act_err", 0) < 1e-2)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lib", default=os.path.join(REPO, "build", "libmoepatch_cuda.so"))
    p.add_argument("--tokens", default="16384")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--out")
    p.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated, from: " + ", ".join(SHAPES))
    p.add_argument("--schedules", default="0",
                   help="engine schedules timed after schedule 1 (0 = the library's default per form)")
    p.add_argument("--no-uniform", action="store_true",
                   help="skip the uniform-split rows (ours and cuBLAS strided-batched, no gather)")
    p.add_argument("--gemms", help="only the GEMMs whose name contains one of these comma-separated words "
                                   "(e.g. 'fwd gate_up,wgrad gate_up'; for ncu runs)")
    args = p.parse_args()
    import torch
    if not torch.cuda.is_available():
        sys.exit("bench_gemm: needs a CUDA GPU")
    lib = load_lib(os.path.abspath(args.lib))
    gen = torch.Generator(device="cuda").manual_seed(0)
    results = []
    for T in [int(t) for t in args.tokens.split(",")]:
        for name in args.shapes.split(","):
            E, K, H, I = SHAPES[name]
            results += bench_shape(torch, lib, name, T, E, K, H, I, args.reps, gen, args.gemms,
                                   [int(x) for x in args.schedules.split(",")])
            if not args.no_uniform:
                results += bench_uniform(torch, lib, name, T, E, K, H, I, args.reps, gen, args.gemms)
    print("| shape | GEMM | T | rows/expert | implementation | ms | TFLOP/s |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        for impl, v in r["impls"].items():
            print("| %s | %s | %d | %d..%d | %s | %.3f | %.0f |" % (
                r["shape"], r["gemm"], r["T"], r["min_rows"], r["max_rows"], impl, v["ms"], v["tflops"]))
    print()
    for r in results:
        if r.get("uniform"):
            print("%s %s: err vs bmm %.2e, all written %s" % (r["shape"], r["gemm"], r["err_vs_bmm"],
                                                            r["all_written"]))
            continue
        if "anchor_error" in r:
            print("%s %s: _grouped_mm anchor unavailable: %s" % (r["shape"], r["gemm"], r["anchor_error"]))
        print("%s %s: err vs _grouped_mm %.2e, vs fp64 %.2e (_grouped_mm vs fp64 %.2e), all written %s, "
              "graph replay equal %s, other schedules equal %s" % (
                  r["shape"], r["gemm"], r["err_vs_grouped_mm"], r["err_vs_fp64"], r["err_grouped_mm_vs_fp64"],
                  r["all_written"], r["graph_replay_equal"], r.get("schedule_error", r.get("schedules_equal")))
              + (", act vs silu(c) %.2e" % r["act_err"] if "act_err" in r else ""))
    bad = [r for r in results if not ok(r)]
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "results": results}, f,
                      indent=1)
    if bad:
        sys.exit("bench_gemm: correctness gate failed for %d problems" % len(bad))


if __name__ == "__main__":
    main()
