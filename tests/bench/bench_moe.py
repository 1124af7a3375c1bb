#!/usr/bin/env python3
"""MoE block benchmark: libmoepatch against the per-expert Python loop and transformers 5's grouped_mm
experts, side by side, at Ring-mini-2.0 and Qwen3-30B-A3B shapes, bf16, forward and forward+backward,
next to the FLOP floor (18*T*K*H*I for fwd+bwd, 6*T*K*H*I for fwd, at a bf16 GEMM rate measured in the
same run). See tests/bench/README.md for how to run it and what each column means.

    LD_PRELOAD=$PWD/build/libmoepatch.so python3 tests/bench/bench_moe.py --out bench.json [--quick]
    python3 tests/bench/bench_moe.py --lib build/libmoepatch.so ...   (re-executes itself under LD_PRELOAD)

Design choice a reader must know: each patched block is timed against itself unpatched (the same
instance, weights and inputs; _moepatch.unpatch/patch toggle it), after a correctness gate on one input;
anchors that route differently (the Qwen3 class at Ring shape) are labelled as such, because only the
routed GEMM work is the same there.
"""

import argparse
import datetime
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import weakref

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(REPO, "tests", "fixtures")

SHAPES = {
    "ring-mini-2.0": dict(kind="ring", H=2048, I=512, E=256, K=8, n_group=8, topk_group=4, shared=1, scale=2.5),
    "qwen3-30b-a3b": dict(kind="qwen3", H=2048, I=768, E=128, K=8),
    # smoke-test sizes (--shapes tiny-ring,tiny-qwen3 --tokens 64): not part of the default run
    "tiny-ring": dict(kind="ring", H=64, I=32, E=16, K=4, n_group=4, topk_group=2, shared=1, scale=2.5),
    "tiny-qwen3": dict(kind="qwen3", H=64, I=32, E=16, K=4),
}
DEFAULT_SHAPES = "ring-mini-2.0,qwen3-30b-a3b"
DEV = "cuda"  # --device cpu runs the same code on the CPU (a smoke test of the script, not a benchmark)
GATE_TOL = 2e-2  # patched vs unpatched, both bf16: twice the per-side tolerance (MOEPATCH_CHECK's)


# Boolean options the glue reads on every call (_moepatch.options), so that one process can flip them
AB_OPTIONS = ("fast_router", "direct_grads")
AB_ROUNDS = 3


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="write the full results as JSON here")
    p.add_argument("--quick", action="store_true", help="T=4096 only, fewer repetitions")
    p.add_argument("--commit", help="git commit to record (default: $MOEPATCH_COMMIT, then git)")
    p.add_argument("--lib", help="libmoepatch.so to re-execute under when it is not preloaded")
    p.add_argument("--tokens", help="comma-separated T values (default 4096,16384; --quick 4096)")
    p.add_argument("--shapes", default=DEFAULT_SHAPES, help="comma-separated, from: " + ", ".join(SHAPES))
    p.add_argument("--reps", type=int, help="timed repetitions of the fast implementations")
    p.add_argument("--no-loop", action="store_true", help="skip the per-expert loop anchors")
    p.add_argument("--engine", action="store_true",
                   help="also time every patched row with each GEMM engine forced (_moepatch.set_engine): "
                        "cuBLAS, the Hopper engine")
    p.add_argument("--ab", choices=AB_OPTIONS,
                   help="also time every patched row's fwd+bwd with this glue option on and off, "
                        "alternating in this process (%d rounds): host-bound rows move by ~1 ms from one "
                        "process to the next, so separate runs cannot tell such an option's effect" % AB_ROUNDS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def ensure_preloaded(args):
    """Re-execute under LD_PRELOAD=--lib (or $MOEPATCH_LIB) once when the library is not active."""
    if "_moepatch" in sys.modules or os.environ.get("_MOEPATCH_BENCH_REEXEC"):
        return
    lib = args.lib or os.environ.get("MOEPATCH_LIB")
    if not lib:
        return
    lib = os.path.abspath(lib)
    if not os.path.exists(lib):
        sys.exit("bench_moe: %s does not exist (run make first)" % lib)
    env = dict(os.environ, _MOEPATCH_BENCH_REEXEC="1")
    env["LD_PRELOAD"] = lib + (" " + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    os.execve(sys.executable, [sys.executable, os.path.abspath(__file__)] + sys.argv[1:], env)


def git_commit(args):
    if args.commit:
        return args.commit
    if os.environ.get("MOEPATCH_COMMIT"):
        return os.environ["MOEPATCH_COMMIT"]
    try:
        head = subprocess.run(["git", "-C", REPO, "rev-parse", "--short=12", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", REPO, "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


# ------------------------------------------------------------------------------------------ blocks

def load_fixture(rel, name):
    """A fixture module by path, named modeling_* so that the preload hook processes it."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, os.path.join(FIXTURES, rel))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def init_(torch, block, gen_seed):
    """N(0, 1/fan_in) weights; selection biases small and positive. On the block's device."""
    g = torch.Generator(device=DEV).manual_seed(gen_seed)
    with torch.no_grad():
        for name, t in list(block.named_parameters()) + list(block.named_buffers()):
            if not t.dtype.is_floating_point:
                continue
            if name.endswith(("expert_bias", "e_score_correction_bias")):
                t.copy_(torch.rand(t.shape, generator=g, device=t.device) * 0.01)
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g, device=t.device) * t.shape[-1] ** -0.5)


def make_bailing(torch, s, seed):
    mod = load_fixture("bailing/modeling_bailing_moe_v2.py", "modeling_bailing_moe_v2")
    cfg = mod.tiny_config(hidden_size=s["H"], moe_intermediate_size=s["I"], num_experts=s["E"],
                          num_experts_per_tok=s["K"], n_group=s["n_group"], topk_group=s["topk_group"],
                          num_shared_experts=s["shared"], routed_scaling_factor=s["scale"], norm_topk_prob=True)
    with on_device(torch):
        block = getattr(mod, mod.BLOCK_CLASS)(cfg)
    block.to(DEV)
    init_(torch, block, seed)
    return block.to(torch.bfloat16).train()


def qwen3_source():
    """(module, config class, where) for transformers 5's Qwen3-MoE, else the tf5 test fixture."""
    try:
        from transformers.models.qwen3_moe import modeling_qwen3_moe as m
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        import transformers
        if hasattr(m, "Qwen3MoeExperts"):
            return m, Qwen3MoeConfig, "transformers " + transformers.__version__
        why = "transformers %s has no Qwen3MoeExperts (4.x layout)" % transformers.__version__
    except ImportError as e:
        why = "transformers not importable (%s)" % e
    mod = load_fixture("tf5/modeling_qwen3_moe.py", "modeling_qwen3_moe")
    return mod, mod.Qwen3MoeConfig, "tests/fixtures/tf5 (eager only: %s)" % why


def set_experts_implementation(cfg, name):
    """transformers 5: PreTrainedConfig._experts_implementation is a property over
    _experts_implementation_internal; the experts' forward reads it on every call (None -> eager)."""
    try:
        cfg._experts_implementation = name
    except (AttributeError, ValueError, TypeError):
        pass
    if getattr(cfg, "_experts_implementation", None) != name:
        cfg._experts_implementation_internal = name
    return getattr(cfg, "_experts_implementation", None)


def make_qwen3(torch, src, s, seed, impl="grouped_mm"):
    mod, cfg_cls, where = src
    cfg = cfg_cls(hidden_size=s["H"], moe_intermediate_size=s["I"], num_experts=s["E"],
                  num_experts_per_tok=s["K"], norm_topk_prob=True, hidden_act="silu")
    got = set_experts_implementation(cfg, impl) if where.startswith("transformers") else "eager (fixture)"
    with on_device(torch):
        block = mod.Qwen3MoeSparseMoeBlock(cfg)
    block.to(DEV)
    init_(torch, block, seed)
    return block.to(torch.bfloat16).train(), got


def tf4_loop_class(torch):
    nn, F = torch.nn, torch.nn.functional

    class MLP(nn.Module):
        def __init__(self, H, I):
            super().__init__()
            self.gate_proj = nn.Linear(H, I, bias=False)
            self.up_proj = nn.Linear(H, I, bias=False)
            self.down_proj = nn.Linear(I, H, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Tf4Qwen3MoeLoopBlock(nn.Module):
        """transformers 4.x Qwen3-MoE block: ModuleList experts, one Python iteration per expert hit."""

        def __init__(self, H, I, E, K):
            super().__init__()
            self.E, self.K = E, K
            self.gate = nn.Linear(H, E, bias=False)
            self.experts = nn.ModuleList([MLP(H, I) for _ in range(E)])

        def forward(self, hidden_states):
            B, S, H = hidden_states.shape
            x = hidden_states.view(-1, H)
            logits = self.gate(x)
            w = F.softmax(logits, dim=1, dtype=torch.float)
            w, idx = torch.topk(w, self.K, dim=-1)
            w = (w / w.sum(dim=-1, keepdim=True)).to(x.dtype)
            out = torch.zeros_like(x)
            hits = F.one_hot(idx, num_classes=self.E).permute(2, 1, 0)
            for e in torch.greater(hits.sum(dim=(-1, -2)), 0).nonzero().flatten().tolist():
                slot, tok = torch.where(hits[e])
                out.index_add_(0, tok, (self.experts[e](x[tok]) * w[tok, slot, None]).to(x.dtype))
            return out.view(B, S, H), logits

    return Tf4Qwen3MoeLoopBlock


def make_tf4_loop_from(torch, tf5_block, s):
    """The tf4-style loop block holding the same weights as a transformers-5 Qwen3 block."""
    H, I, E, K = s["H"], s["I"], s["E"], s["K"]
    with on_device(torch):
        block = tf4_loop_class(torch)(H, I, E, K)
    block = block.to(device=DEV, dtype=torch.bfloat16)
    with torch.no_grad():
        block.gate.weight.copy_(tf5_block.gate.weight)
        gu, dn = tf5_block.experts.gate_up_proj, tf5_block.experts.down_proj
        for e, ex in enumerate(block.experts):
            ex.gate_proj.weight.copy_(gu[e, :I])
            ex.up_proj.weight.copy_(gu[e, I:])
            ex.down_proj.weight.copy_(dn[e])
    return block.train()


def on_device(torch):
    """Create parameters directly on the device (torch >= 2.0); elsewhere on the CPU, moved after."""
    import contextlib
    dev = torch.device(DEV)
    return dev if hasattr(dev, "__enter__") else contextlib.nullcontext()


# ------------------------------------------------------------------------------------------ measuring

class Span:
    """A timed region: CUDA events on the GPU, the host clock (after the work) on the CPU."""

    def __init__(self, torch):
        self.torch = torch
        if DEV == "cuda":
            self.s, self.e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)

    def start(self):
        if DEV == "cuda":
            self.s.record()
        else:
            self.t0 = time.perf_counter()

    def stop(self):
        if DEV == "cuda":
            self.e.record()
        else:
            self.t1 = time.perf_counter()

    def ms(self):
        return self.s.elapsed_time(self.e) if DEV == "cuda" else (self.t1 - self.t0) * 1e3


def sync(torch):
    if DEV == "cuda":
        torch.cuda.synchronize()


def first(out):
    while isinstance(out, (tuple, list)):
        out = out[0]
    return out


_PARAMS = weakref.WeakKeyDictionary()  # block -> its parameters: listed once, as an optimizer holds them


def clear_grads(block, xs=()):
    """Drop the gradients, as zero_grad(set_to_none=True) does: over a parameter list made once, since
    walking a 256-expert ModuleList's modules costs ~4 ms of host time, which a training step never pays
    (it would make a host-bound block look slower than it is)."""
    params = _PARAMS.get(block)
    if params is None:
        params = _PARAMS[block] = list(block.parameters())
    for p in params:
        p.grad = None
    for x in xs:
        x.grad = None


def time_impl(torch, block, pool, mode, warmup, reps):
    """Median/min/mean ms of `reps` calls timed with CUDA events, after `warmup` calls; inputs rotate over
    a pool of distinct random tensors; gradients are dropped (host only) outside the timed region."""
    spans = []
    for i in range(warmup + reps):
        x, dy = pool[i % len(pool)]
        clear_grads(block, [x])
        span = Span(torch)
        span.start()
        y = first(block(x))
        if mode == "fwdbwd":
            y.backward(dy)
        span.stop()
        del y
        if i >= warmup:
            spans.append(span)
    sync(torch)
    clear_grads(block, [p[0] for p in pool])
    ms = [span.ms() for span in spans]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "mean_ms": statistics.fmean(ms),
            "reps": len(ms), "warmup": warmup, "all_ms": ms}


GRAPH_T_MAX = 64  # decode sizes: the forward is also timed replayed from a CUDA graph


def capture_fwd(torch, block, x):
    """A CUDA graph of one no-grad forward of block on x (raises where the path syncs with the host)."""
    with torch.no_grad():
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graphs asks
            for _ in range(3):
                first(block(x))
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            first(block(x))
    return graph


def graph_fwd_ms(torch, block, x, reps=20):
    """Median ms of one no-grad forward replayed from a CUDA graph: the GPU side of a decode step, without
    the launches and the Python around them (what a captured generate loop pays). A path that syncs with
    the host cannot be captured: the error's first words instead."""
    try:
        graph = capture_fwd(torch, block, x)
        spans = []
        for _ in range(reps):
            span = Span(torch)
            span.start()
            graph.replay()
            span.stop()
            spans.append(span)
        sync(torch)
        return statistics.median(span.ms() for span in spans)
    except Exception as e:  # not capturable: say why, keep benchmarking
        sync(torch)
        return "%s: %s" % (type(e).__name__, " ".join(str(e).split())[:60])


def peak_memory(torch, block, x, dy):
    """Extra device memory one fwd+bwd allocates at its peak (MiB), parameter gradients included."""
    if DEV != "cuda":
        return float("nan")
    clear_grads(block, [x])
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    first(block(x)).backward(dy)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    clear_grads(block, [x])
    return peak / 2 ** 20


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def fwd_bwd_values(block, x, dy):
    clear_grads(block, [x])
    y = first(block(x))
    y.backward(dy)
    grads = [p.grad.detach().clone() if p.grad is not None else None for p in block.parameters()]
    res = y.detach().clone(), x.grad.detach().clone(), grads
    clear_grads(block, [x])
    return res


def gate(torch, mp, block, x, dy):
    """Patched vs unpatched (same block, input and upstream gradient): rel err of y, dx and of all
    parameter gradients together (a missing gradient counts as zeros)."""
    set_patched(mp, block, False)
    yu, dxu, gu = fwd_bwd_values(block, x, dy)
    set_patched(mp, block, True)
    yp, dxp, gp = fwd_bwd_values(block, x, dy)
    num = den = 0.0
    for a, b in zip(gp, gu):
        if a is None and b is None:
            continue
        a = a.float() if a is not None else torch.zeros_like(b, dtype=torch.float32)
        b = b.float() if b is not None else torch.zeros_like(a)
        num += (a - b).norm().item() ** 2
        den += b.norm().item() ** 2
        del a, b
    res = {"y": rel(yp, yu), "dx": rel(dxp, dxu), "grads": (num ** 0.5) / max(den ** 0.5, 1e-30)}
    res["ok"] = all(v < GATE_TOL for v in res.values())
    return res


def set_patched(mp, block, on):
    if on:
        st = block.__dict__.get("_moepatch")
        if st is None or st.disabled or "forward" not in block.__dict__:
            if not mp.patch(block):
                raise RuntimeError("detection refused the block: %s" % mp.detect(block))
    else:
        mp.unpatch(block)


def patch_status(block, calls_before):
    st = block.__dict__.get("_moepatch")
    if st is None:
        return "no _moepatch state"
    if st.disabled:
        return "FELL BACK: %s" % st.disabled
    if "forward" not in block.__dict__:
        return "instance forward gone"
    if st.calls <= calls_before:
        return "fused path never ran (refused per call; see the moepatch: log lines)"
    return None


def median_ms(torch, fn, reps, warmup=3):
    """Median device time of fn() over reps calls, after warmup untimed ones."""
    for _ in range(warmup):
        fn()
    sync(torch)
    spans = []
    for _ in range(reps):
        span = Span(torch)
        span.start()
        fn()
        span.stop()
        spans.append(span)
    sync(torch)
    return statistics.median(span.ms() for span in spans)


def gemm_tflops(torch, reps=10):
    """Median rate of an n^3 bf16 matmul (n = 8192 on the GPU) on random data."""
    n = 8192 if DEV == "cuda" else 256
    g = torch.Generator(device=DEV).manual_seed(1234)
    a = torch.randn(n, n, device=DEV, generator=g).to(torch.bfloat16)
    b = torch.randn(n, n, device=DEV, generator=g).to(torch.bfloat16)
    ms = median_ms(torch, lambda: a @ b, reps)
    return 2 * n ** 3 / (ms * 1e-3) / 1e12


def hbm_gbps(torch, reps=10):
    """Median device-memory bandwidth of a 2 GiB copy (read + write bytes), in GB/s."""
    n = (1 << 30) if DEV == "cuda" else (1 << 22)
    src = torch.empty(n, dtype=torch.uint8, device=DEV).fill_(1)
    dst = torch.empty_like(src)
    ms = median_ms(torch, lambda: dst.copy_(src), reps, warmup=2)
    return 2 * n / (ms * 1e-3) / 1e9


def weight_read_bytes(s, T):
    """Bytes of bf16 weights a forward of T tokens must read at least: the router, the shared expert,
    and the routed experts that get a token, E·(1 − (1 − K/E)^T) of them for uniformly spread routing
    (the decode-size bound of issue 4)."""
    E, K, H, I = s["E"], s["K"], s["H"], s["I"]
    touched = E * (1.0 - (1.0 - K / E) ** T)
    return 2 * (E * H + (touched + s.get("shared", 0)) * 3 * H * I)


def grouped_mm_seen(torch, block, x):
    """Whether a forward of the block reaches a real grouped GEMM op (aten::_grouped_mm, under
    F.grouped_mm), not transformers' per-expert fallback op transformers::grouped_mm_fallback."""
    try:
        from torch.profiler import ProfilerActivity, profile
        with torch.no_grad(), profile(activities=[ProfilerActivity.CPU]) as prof:
            first(block(x))
        keys = sorted({ev.key for ev in prof.key_averages() if "grouped_mm" in ev.key})
        return True if any("fallback" not in k for k in keys) else "no (ops: %s)" % (", ".join(keys) or "none")
    except Exception as e:  # the profiler is an extra check, never a reason to stop
        return "unknown (%s)" % e


# ------------------------------------------------------------------------------------------ driver

def impls_for(torch, mp, shape_name, s, src, args, log):
    """[(key, label, block, patched?, note, engine)] for one shape; the same block instance may appear
    several times (unpatched anchor, then patched with the default GEMM choice, engine None, then with
    each engine forced)."""
    out = []
    if s["kind"] == "ring":
        ring = make_bailing(torch, s, args.seed + 1)
        if not args.no_loop:
            out.append(("loop", "Ring remote-code block, per-expert loop", ring, False,
                        "bailing fixture, training path: K token copies, one boolean mask per expert"))
        q, got = make_qwen3(torch, src, s, args.seed + 2)
        out.append(("grouped_mm", "transformers Qwen3 block, experts=%s" % got, q, False,
                    "Qwen3 class at E=256/I=512: softmax top-8, no groups, no shared expert; the routed "
                    "GEMM work is the same as Ring's, the routing is not"))
        if mp is not None:
            out.append(("moepatch", "libmoepatch, Ring block", ring, True,
                        "bailing fixture block patched; includes its shared expert (+1/K GEMM work)"))
            out.append(("moepatch_tf5", "libmoepatch, Qwen3 class at Ring shape", q, True,
                        "same instance as the grouped_mm row, patched"))
    else:
        q, got = make_qwen3(torch, src, s, args.seed + 3)
        if not args.no_loop:
            out.append(("loop", "transformers-4 style ModuleList loop", make_tf4_loop_from(torch, q, s), False,
                        "one Python iteration per expert hit; same weights as the rows below"))
        out.append(("grouped_mm", "transformers Qwen3 block, experts=%s" % got, q, False, src[2]))
        if mp is not None:
            out.append(("moepatch", "libmoepatch, Qwen3 block", q, True, "same instance as grouped_mm, patched"))
    out = [impl + (None,) for impl in out]
    if args.engine and mp is not None:
        patched = [impl for impl in out if impl[3]]
        out += [(key + "_cublas", label + ", cuBLAS", block, True, note + "; moe_problem.engine = 0", 0)
                for key, label, block, _, note, _ in patched]
        out += [(key + "_engine", label + ", Hopper engine", block, True, note + "; moe_problem.engine = 1", 1)
                for key, label, block, _, note, _ in patched]
    return out


def run(args):
    import torch

    global DEV
    DEV = args.device
    mp = sys.modules.get("_moepatch")
    if DEV == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_moe: torch sees no CUDA device; nothing to measure")
    torch.backends.cuda.matmul.allow_tf32 = False
    tokens = [int(t) for t in args.tokens.split(",")] if args.tokens else ([4096] if args.quick else [4096, 16384])
    fast_reps = args.reps or (8 if args.quick else 20)

    def log(*a):
        print(*a, flush=True)

    try:
        import transformers
        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    meta = {
        "gpu": torch.cuda.get_device_name(0) if DEV == "cuda" else "none (--device %s)" % DEV,
        "capability": "%d.%d" % torch.cuda.get_device_capability(0) if DEV == "cuda" else "-",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": tf_version,
        "python": platform.python_version(), "commit": git_commit(args),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:], "quick": bool(args.quick),
        "moepatch_active": mp is not None,
        "moepatch_options": dict(getattr(mp, "options", {})) if mp is not None else None,
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
    }
    if mp is None:
        log("WARNING: module _moepatch is not loaded (no LD_PRELOAD, or MOEPATCH=0): anchors only")
    meta["gemm_tflops_start"] = gemm_tflops(torch)
    meta["hbm_gbps"] = hbm_gbps(torch)
    log("GPU %s | torch %s | transformers %s | commit %s | bf16 GEMM 8192^3: %.0f TFLOP/s"
        % (meta["gpu"], meta["torch"], tf_version, meta["commit"], meta["gemm_tflops_start"]))
    src = qwen3_source()
    meta["qwen3_source"] = src[2]
    rows = []
    for shape_name in args.shapes.split(","):
        s = SHAPES[shape_name]
        impls = impls_for(torch, mp, shape_name, s, src, args, log)
        gates = {}
        for T in tokens:
            g = torch.Generator(device=DEV).manual_seed(args.seed + T)
            pool = []
            for _ in range(3):
                x = torch.randn(1, T, s["H"], device=DEV, generator=g).to(torch.bfloat16)
                dy = torch.randn(1, T, s["H"], device=DEV, generator=g).to(torch.bfloat16)
                pool.append((x.requires_grad_(True), dy))
            fl = 6 * T * s["K"] * s["H"] * s["I"]
            floor = {"fwd": fl, "fwdbwd": 3 * fl}
            rate = meta["gemm_tflops_start"] * 1e12
            rows.append({"shape": shape_name, "T": T, "impl": "floor", "label": "FLOP floor at measured GEMM rate",
                         "fwd": {"median_ms": floor["fwd"] / rate * 1e3},
                         "fwdbwd": {"median_ms": floor["fwdbwd"] / rate * 1e3},
                         "weight_read_ms": weight_read_bytes(s, T) / (meta["hbm_gbps"] * 1e9) * 1e3,
                         "flops_fwd": floor["fwd"], "flops_fwdbwd": floor["fwdbwd"]})
            for key, label, block, patched, note, engine in impls:
                row = {"shape": shape_name, "T": T, "impl": key, "label": label, "note": note,
                       "flops_fwd": floor["fwd"], "flops_fwdbwd": floor["fwdbwd"]}
                rows.append(row)
                try:
                    if mp is not None:
                        set_patched(mp, block, patched)
                        mp.set_engine(engine)
                    if patched and (key, id(block)) not in gates:
                        gates[(key, id(block))] = gate(torch, mp, block, pool[0][0], pool[0][1])
                        log("gate %s %-13s vs unpatched: y %.2e  dx %.2e  grads %.2e  %s" % (
                            shape_name, key, gates[(key, id(block))]["y"], gates[(key, id(block))]["dx"],
                            gates[(key, id(block))]["grads"], "ok" if gates[(key, id(block))]["ok"] else "FAIL"))
                    if patched:
                        row["gate"] = gates[(key, id(block))]
                    if key == "grouped_mm" and "grouped_mm_seen" not in row:
                        row["grouped_mm_seen"] = grouped_mm_seen(torch, block, pool[0][0])
                    st = block.__dict__.get("_moepatch")
                    calls0 = st.calls if st is not None else 0
                    loop = key == "loop"
                    if loop:
                        warm, reps = (1, 2) if args.quick else ((1, 3) if T <= 4096 else (0, 1))
                    else:
                        warm, reps = (3 if args.quick else 5), (fast_reps if T <= 4096 else max(3, fast_reps // 2))
                    for mode in ("fwd", "fwdbwd"):
                        row[mode] = time_impl(torch, block, pool, mode, warm, reps)
                    row["peak_mib"] = peak_memory(torch, block, pool[1][0], pool[1][1])
                    # cuBLAS rows sync with the host: a failed capture would make the glue give the
                    # block its own forward back for the rows after it (engine_for: this row's choice)
                    if DEV == "cuda" and T <= GRAPH_T_MAX and not loop and (not patched or mp.engine_for() != 0):
                        row["fwd_graph_ms"] = graph_fwd_ms(torch, block, pool[0][0])
                    if patched and args.ab and mp is not None:
                        row["ab"] = ab_times(torch, mp, block, pool, args.ab, warm, reps)
                    if patched:
                        row["patch_problem"] = patch_status(block, calls0)
                    for mode in ("fwd", "fwdbwd"):
                        row[mode]["tflops"] = row["flops_" + mode] / (row[mode]["median_ms"] * 1e-3) / 1e12
                    log("%-14s T=%-6d %-13s fwd %9.3f ms  fwd+bwd %9.3f ms  peak %8.0f MiB%s" % (
                        shape_name, T, key, row["fwd"]["median_ms"], row["fwdbwd"]["median_ms"], row["peak_mib"],
                        "  [%s]" % row["patch_problem"] if row.get("patch_problem") else ""))
                except Exception as e:  # one broken implementation must not hide the others
                    import traceback
                    row["error"] = "%s: %s" % (type(e).__name__, e)
                    row["traceback"] = traceback.format_exc()
                    log("%-14s T=%-6d %-13s ERROR %s" % (shape_name, T, key, row["error"]))
                    sync(torch)
            del pool
        del impls
        if DEV == "cuda":
            torch.cuda.empty_cache()
    meta["gemm_tflops_end"] = gemm_tflops(torch)
    return {"meta": meta, "rows": rows}


def ab_times(torch, mp, block, pool, name, warm, reps):
    """fwd+bwd median ms with options[name] on and off, alternating, AB_ROUNDS rounds; the option's
    own value is restored after."""
    opts, was = mp.options, mp.options.get(name, True)
    out = {"option": name, "on": [], "off": []}
    try:
        for _ in range(AB_ROUNDS):
            for value, key in ((True, "on"), (False, "off")):
                opts[name] = value
                out[key].append(time_impl(torch, block, pool, "fwdbwd", warm, reps)["median_ms"])
    finally:
        opts[name] = was
    return out


def ab_table(rows):
    """The one-process A/B rows (--ab)."""
    got = [r for r in rows if "ab" in r]
    if not got:
        return []
    name = got[0]["ab"]["option"]
    lines = ["", "One-process A/B of MOEPATCH_%s (fwd+bwd median ms per round, alternating on/off):" % name.upper(),
             "", "| shape | T | implementation | on | off | on / off (medians) |", "|---|---|---|---|---|---|"]
    for r in got:
        on, off = r["ab"]["on"], r["ab"]["off"]
        lines.append("| %s | %d | %s | %s | %s | %.3f |" % (
            r["shape"], r["T"], r["impl"], " / ".join("%.2f" % v for v in on),
            " / ".join("%.2f" % v for v in off), statistics.median(on) / statistics.median(off)))
    return lines


def fmt_ms(d):
    return "%.2f" % d["median_ms"] if d else "-"


def table(result):
    meta, rows = result["meta"], result["rows"]
    lines = ["", "## MoE block benchmark (bf16, median of timed reps; T = tokens per call)", "",
             "GPU %s (sm %s), torch %s, CUDA %s, transformers %s, commit %s, %s"
             % (meta["gpu"], meta["capability"], meta["torch"], meta["cuda"],
                meta["transformers"], meta["commit"], meta["date_utc"]),
             "bf16 GEMM 8192^3: %.0f TFLOP/s at start, %.0f at end; Qwen3 block from %s; libmoepatch %s"
             % (meta["gemm_tflops_start"], meta["gemm_tflops_end"], meta["qwen3_source"],
                "active" if meta["moepatch_active"] else "NOT LOADED"),
             "",
             "| shape | T | implementation | fwd ms | fwd TFLOP/s | fwd+bwd ms | fwd+bwd TFLOP/s | x floor "
             "| fwd x weight read | speed-up vs grouped_mm | peak MiB | check |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    floors = {(r["shape"], r["T"]): r for r in rows if r["impl"] == "floor"}
    anchors = {(r["shape"], r["T"]): r for r in rows if r["impl"] == "grouped_mm" and "fwdbwd" in r}
    for r in rows:
        fl = floors[(r["shape"], r["T"])]
        if r["impl"] == "floor":
            lines.append("| %s | %d | FLOP floor (18·T·K·H·I at the GEMM rate); weight read %.3f ms | %s | | %s "
                         "| | 1.00 | | | | |" % (r["shape"], r["T"], r.get("weight_read_ms", float("nan")),
                                                  fmt_ms(r["fwd"]), fmt_ms(r["fwdbwd"])))
            continue
        if "error" in r:
            lines.append("| %s | %d | %s | | | | | | | | | ERROR %s |" % (r["shape"], r["T"], r["impl"],
                                                                      r["error"][:80]))
            continue
        wread = r["fwd"]["median_ms"] / fl["weight_read_ms"] if fl.get("weight_read_ms") else float("nan")
        fb = r["fwdbwd"]["median_ms"]
        anchor = anchors.get((r["shape"], r["T"]))
        speed = "%.2fx" % (anchor["fwdbwd"]["median_ms"] / fb) if anchor else ""
        check = ""
        if "gate" in r:
            check = "%s y %.1e dx %.1e" % ("ok" if r["gate"]["ok"] else "FAIL", r["gate"]["y"], r["gate"]["dx"])
        if r.get("patch_problem"):
            check += " " + r["patch_problem"]
        if r["impl"] == "grouped_mm" and r.get("grouped_mm_seen") is not True:
            check += " grouped_mm not seen in profile: %s" % r.get("grouped_mm_seen")
        reps = "" if r["fwdbwd"]["reps"] > 1 else " (1 rep)"
        lines.append("| %s | %d | %s%s | %s | %.0f | %s | %.0f | %.2f | %.2f | %s | %.0f | %s |" % (
            r["shape"], r["T"], r["impl"], reps, fmt_ms(r["fwd"]), r["fwd"]["tflops"], fmt_ms(r["fwdbwd"]),
            r["fwdbwd"]["tflops"], fb / fl["fwdbwd"]["median_ms"], wread, speed, r["peak_mib"], check))
    lines += ["",
              "TFLOP/s = routed-expert FLOPs (6·T·K·H·I fwd, 18·T·K·H·I fwd+bwd) / median time; router and "
              "shared-expert work are not counted. x floor = fwd+bwd time / floor time. peak MiB = extra memory "
              "of one fwd+bwd, parameter gradients included. fwd x weight read = fwd time / the time to read the "
              "weights a forward must touch (router, shared expert, the routed experts that get a token for "
              "uniform routing) at the measured copy bandwidth (%.0f GB/s): the decode bound, "
              "meaningful for T <= 64. check = patched vs unpatched rel err (y, dx) on "
              "one input, ok below %.0e." % (meta.get("hbm_gbps", float("nan")), GATE_TOL),
              "ring-mini-2.0 grouped_mm/moepatch_tf5 rows use the Qwen3 class at E=256, I=512: same routed GEMM "
              "work, different routing (softmax top-8, no groups, no shared expert)."]
    return "\n".join(lines + graph_table(rows, floors) + ab_table(rows))


def graph_table(rows, floors):
    """The decode forwards replayed from a CUDA graph (rows with fwd_graph_ms)."""
    got = [r for r in rows if "fwd_graph_ms" in r]
    if not got:
        return []
    lines = ["", "Decode forward replayed from a CUDA graph (no launches or Python: the GPU side; x weight "
             "read as above; rows that sync with the host cannot be captured):", "",
             "| shape | T | implementation | fwd graph ms | fwd graph x weight read | eager fwd ms |",
             "|---|---|---|---|---|---|"]
    for r in got:
        g, fl = r["fwd_graph_ms"], floors[(r["shape"], r["T"])]
        if isinstance(g, str):
            lines.append("| %s | %d | %s | not capturable: %s | | %s |" % (r["shape"], r["T"], r["impl"], g,
                                                                        fmt_ms(r.get("fwd"))))
            continue
        lines.append("| %s | %d | %s | %.3f | %.2f | %s |" % (r["shape"], r["T"], r["impl"], g,
                                                            g / fl["weight_read_ms"], fmt_ms(r.get("fwd"))))
    return lines


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    for name in args.shapes.split(","):
        if name not in SHAPES:
            sys.exit("bench_moe: unknown shape %r (known: %s)" % (name, ", ".join(SHAPES)))
    ensure_preloaded(args)
    if importlib.util.find_spec("torch") is None:
        sys.exit("bench_moe: torch is not importable")
    result = run(args)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    print(table(result))
    if args.out:
        print("\nfull results: %s" % args.out)
    bad = [r for r in result["rows"] if "error" in r or r.get("patch_problem")
           or ("gate" in r and not r["gate"]["ok"])]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
