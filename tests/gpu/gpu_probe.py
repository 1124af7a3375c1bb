"""GPU probe for tests/gpu/test_gpu_families.py: one process, run under LD_PRELOAD=libmoepatch.so, that
checks every case of CASES on CUDA and writes one JSON record per case.

    LD_PRELOAD=build/libmoepatch.so python3 tests/gpu/gpu_probe.py OUT.json [CASE_NAME ...]

For each case it builds the fixture family's block, runs forward + backward (1) patched, twice, (2) through
the class forward of the same block (unpatched, same dtype, same weights) and (3) through the class forward
of a float64 copy (the reference), and records normwise errors, bitwise determinism, and whether the fused
path really ran (block._moepatch present, not disabled, call counter advanced).

Design choice a reader must know: unless a case says "random", the inputs are built so that routing has a
wide margin. Top-K on random logits has near ties that the rounding of bf16 (or even fp32) logits flips
differently from the float64 reference, and one flipped token moves the output by far more than the
tolerance; so the probe picks each token's experts first and solves for an input whose router logits put
them well clear of the rest. "random" cases use plain random inputs; the tests compare them with the
unpatched block row by row (their float64 numbers are recorded for information). Importing this file
needs no torch: the test reads CASES from it.
"""

import copy
import importlib.util
import json
import math
import os
import random
import re
import sys
import traceback
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURES = os.path.join(HERE, "..", "fixtures")
TOLERANCE_H = os.path.join(HERE, "..", "c", "tolerance.h")

H, I = 128, 64  # small, but multiples of 16 like every real model
# The tests run it on "cuda"; MOEPATCH_PROBE_DEVICE=cpu runs the same checks on the CPU backend.
DEVICE = os.environ.get("MOEPATCH_PROBE_DEVICE", "cuda")


def _cfg_bailing(E, K, G, TG, H=H, I=I):
    return dict(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K, n_group=G,
                topk_group=TG, num_shared_experts=1, routed_scaling_factor=2.5)


def _cfg_qwen3(E, K, G, TG, H=H, I=I):
    return dict(hidden_size=H, moe_intermediate_size=I, num_experts=E, num_experts_per_tok=K,
                norm_topk_prob=True)


def _cfg_mixtral(E, K, G, TG, H=H, I=I):
    return dict(hidden_size=H, intermediate_size=I, num_local_experts=E, num_experts_per_tok=K,
                router_jitter_noise=0.0)


def _cfg_olmoe(E, K, G, TG, H=H, I=I):
    return dict(hidden_size=H, intermediate_size=I, num_experts=E, num_experts_per_tok=K, norm_topk_prob=False)


def _cfg_qwen2(E, K, G, TG, H=H, I=I):
    return dict(hidden_size=H, moe_intermediate_size=I, shared_expert_intermediate_size=96, num_experts=E,
                num_experts_per_tok=K, norm_topk_prob=True)


def _cfg_deepseek(E, K, G, TG, H=H, I=I):
    return dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                n_shared_experts=1, n_group=G, topk_group=TG, norm_topk_prob=True, routed_scaling_factor=2.5)


def _cfg_glm4(E, K, G, TG, H=H, I=I):
    return dict(hidden_size=H, moe_intermediate_size=I, n_routed_experts=E, num_experts_per_tok=K,
                n_shared_experts=1, n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8)


# name: (fixture path, routing recipe, config builder, selection-bias tensor or None, layout)
FAMILIES = {
    "bailing_moe_v2": ("bailing/modeling_bailing_moe_v2.py", "group", _cfg_bailing, "gate.expert_bias",
                       "modulelist"),
    "qwen3_moe_tf5": ("tf5/modeling_qwen3_moe.py", "softmax", _cfg_qwen3, None, "3d"),
    "qwen3_moe_tf4": ("tf4/modeling_qwen3_moe.py", "softmax", _cfg_qwen3, None, "modulelist"),
    "mixtral_tf5": ("tf5/modeling_mixtral.py", "softmax", _cfg_mixtral, None, "3d"),
    "mixtral_tf4": ("tf4/modeling_mixtral.py", "softmax", _cfg_mixtral, None, "modulelist"),
    "olmoe_tf5": ("tf5/modeling_olmoe.py", "softmax", _cfg_olmoe, None, "3d"),
    "qwen2_moe_tf5": ("tf5/modeling_qwen2_moe.py", "softmax", _cfg_qwen2, None, "3d"),
    "deepseek_v3_tf5": ("tf5/modeling_deepseek_v3.py", "group", _cfg_deepseek, "gate.e_score_correction_bias",
                        "3d"),
    "glm4_moe_tf5": ("tf5/modeling_glm4_moe.py", "group", _cfg_glm4, "gate.e_score_correction_bias", "3d"),
}

# (dtype, T, E, K, n_group, topk_group, zero-token expert, random routing). Group sizes only matter to the
# group-limited families (GLM keeps its shipped n_group = topk_group = 1).
SHAPES = [
    ("fp32", 1, 8, 1, 4, 2, False, False),
    ("fp32", 7, 6, 2, 3, 2, True, False),  # E not a power of two, one expert gets no token
    ("bf16", 7, 6, 1, 3, 2, True, False),  # K = 1
    ("fp32", 4096, 16, 4, 4, 2, False, False),
    ("bf16", 4096, 16, 4, 4, 2, True, False),
    ("bf16", 4096, 16, 4, 4, 2, False, True),  # routing on plain random data
]


# The same checks with H = I = 256 and _moepatch.set_engine(True) (and (2): its warp-specialized schedule):
# on an sm_90 GPU the routed experts run on the Hopper GEMM engine (kernels/cuda/gemm_sm90.cu) in both
# passes; elsewhere they run on cuBLAS.
ENGINE_SHAPES = [
    ("bf16", 4096, 16, 4, 4, 2, True, False),
    ("bf16", 300, 8, 2, 4, 2, False, False),
]
ENGINE_H, ENGINE_I = 256, 256


def case_name(family, shape, engine=0):
    dtype, T, E, K, _, _, zero, rnd = shape
    return "%s-%s-T%d-E%d-K%d%s%s%s" % (family, dtype, T, E, K, "-zero" if zero else "", "-random" if rnd else "",
                                        {0: "", 1: "-engine", 2: "-engine-ws"}[engine])


def _build_cases():
    cases = []
    for family, spec in FAMILIES.items():
        if not os.path.exists(os.path.join(FIXTURES, spec[0])):
            continue
        # engine 2: the engine's warp-specialized schedule (set_engine(2))
        for engine, shapes in ((0, SHAPES), (1, ENGINE_SHAPES), (2, ENGINE_SHAPES)):
            for shape in shapes:
                dtype, T, E, K, G, TG, zero, rnd = shape
                cases.append({"name": case_name(family, shape, engine), "family": family, "dtype": dtype, "T": T,
                              "E": E, "K": K, "G": G, "TG": TG, "zero": zero, "random": rnd, "engine": engine})
    return cases


CASES = _build_cases()


def tolerances():
    """{"fp32": .., "bf16": ..} from tests/c/tolerance.h, the contract the C tests use too."""
    tol = {"fp32": 1e-5, "bf16": 1e-2}
    try:
        with open(TOLERANCE_H) as f:
            text = f.read()
        for key, macro in (("fp32", "F32"), ("bf16", "BF16")):
            m = re.search(r"#define\s+MOE_TOL_%s\s+([0-9.eE+-]+)" % macro, text)
            if m:
                tol[key] = float(m.group(1))
    except OSError:
        pass
    return tol


# ------------------------------------------------------------------------------------------ the probe

_modules = {}


def load_fixture(rel):
    """By path, under a name whose last part starts with modeling_ (what the preload hook watches)."""
    if rel in _modules:
        return _modules[rel]
    path = os.path.abspath(os.path.join(FIXTURES, rel))
    name = "gpu_%s.%s" % (os.path.dirname(rel), os.path.splitext(os.path.basename(rel))[0])
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    _modules[rel] = module
    return module


def pick_experts(rng, T, E, K, recipe, G, TG, zero):
    """Each token's K experts; for group routing they sit in at most topk_group groups."""
    allowed = [e for e in range(E) if e != zero]
    sets = []
    if recipe == "softmax":
        for _ in range(T):
            sets.append(rng.sample(allowed, K))
        return sets
    per = E // G
    groups = [[e for e in range(g * per, (g + 1) * per) if e != zero] for g in range(G)]
    ng = min(TG, K)
    for _ in range(T):
        while True:
            gs = rng.sample(range(G), ng)
            if all(groups[g] for g in gs) and sum(len(groups[g]) for g in gs) >= K:
                break
        chosen = [rng.choice(groups[g]) for g in gs]
        rest = [e for g in gs for e in groups[g] if e not in chosen]
        sets.append(chosen + rng.sample(rest, K - ng))
    return sets


def margin_input(torch, W, T, E, K, recipe, G, TG, zero, rng, gen):
    """x [T, H] (float64) whose router logits x @ W.T are: chosen experts high, the rest low, the
    zero-token expert very low; the margins (>= 3 logits softmax, >= 0.3 in sigmoid score) are far above
    what bf16 rounding of x, W or the logits can move. Plus noise orthogonal to W's rows."""
    sets = pick_experts(rng, T, E, K, recipe, G, TG, zero)
    if recipe == "softmax":
        hi = (3.0 + 0.5 * torch.randn(T, E, generator=gen, dtype=torch.float64)).clamp_min(1.5)
        lo = (-3.0 + 0.5 * torch.randn(T, E, generator=gen, dtype=torch.float64)).clamp_max(-1.5)
    else:
        hi = (2.5 + 1.0 * torch.randn(T, E, generator=gen, dtype=torch.float64)).clamp_min(0.0)
        lo = (-4.0 + 0.5 * torch.randn(T, E, generator=gen, dtype=torch.float64)).clamp_max(-2.5)
    mask = torch.zeros(T, E, dtype=torch.bool)
    for t, s in enumerate(sets):
        mask[t, s] = True
    target = torch.where(mask, hi, lo)
    if zero is not None:
        target[:, zero] = -12.0
    pinv = torch.linalg.pinv(W)  # [H, E]; W has full row rank (E <= H)
    x = target @ pinv.T
    g = torch.randn(T, W.shape[1], generator=gen, dtype=torch.float64)
    x = x + g - (g @ pinv) @ W  # the part of g in W's row space removed: logits unchanged
    return x, sets


def init_block(torch, block, bias_name, gen):
    """Weights ~ N(0, 1/fan_in); selection bias in [0, 0.04) (positive, as the CPU tests keep it)."""
    with torch.no_grad():
        for name, t in sorted(list(block.named_parameters()) + list(block.named_buffers())):
            if not t.dtype.is_floating_point or t.numel() == 0:
                continue
            if bias_name is not None and name == bias_name:
                t.copy_(torch.rand(t.shape, generator=gen) * 0.04)
            elif t.dim() == 1:
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=gen))
            else:
                t.copy_(torch.randn(t.shape, generator=gen) * t.shape[-1] ** -0.5)


def flatten(out):
    if isinstance(out, (tuple, list)):
        items = []
        for o in out:
            items.extend(flatten(o))
        return items
    return [out] if hasattr(out, "dtype") else []


def fwd_bwd(torch, block, call, x, dy):
    """One forward + backward; returns outputs and gradients (None grads as zeros) detached."""
    for p in block.parameters():
        p.grad = None
    leaf = x.detach().clone().requires_grad_(True)
    out = call(leaf.view(1, *leaf.shape))
    outs = flatten(out)
    y = outs[0]
    y.backward(dy.view_as(y))
    if leaf.is_cuda:
        torch.cuda.synchronize()
    grads = {"input": leaf.grad.detach().clone()}
    for n, p in block.named_parameters():
        if p.requires_grad:
            grads[n] = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
    return {"outs": [o.detach().clone() for o in outs], "grads": grads}


# Gradients that are zero by construction (K = 1 with renormalised weights: every weight is exactly 1, so
# the router gets no gradient) hold only rounding residue in the reference (seen: 4e-9 of the largest
# gradient, from autograd's g/S - g*v/S^2, identical in fp32 and fp64, while the fused path returns an
# exact 0); their errors are measured against this fraction of the largest reference gradient instead of
# their own size. Any tensor above 1 % of the largest is still judged on its own size.
GRAD_FLOOR = 1e-2


def errors(a, b, floor_max=0.0, floor_fro=0.0):
    """{"max": max|a-b| / max|b| (tests/c/tolerance.h), "fro": ||a-b|| / ||b|| (METHOD.md)}, each scale
    at least its floor; NaN/inf anywhere -> inf; an all-zero scale compares absolutely."""
    if a.numel() == 0:
        return {"max": 0.0, "fro": 0.0}
    a, b = a.double(), b.double()
    if not bool(a.isfinite().all()) or not bool(b.isfinite().all()):
        return {"max": math.inf, "fro": math.inf}
    d = a - b
    smax = max(b.abs().max().item(), floor_max)
    sfro = max(b.norm().item(), floor_fro)
    return {"max": d.abs().max().item() / (smax or 1.0), "fro": d.norm().item() / (sfro or 1.0)}


def compare_outs(outs, ref_outs):
    """Per output: normwise errors for float tensors, per-row set equality for index tensors."""
    res = {}
    for i, (a, b) in enumerate(zip(outs, ref_outs)):
        key = "out%d" % i
        if a.dtype.is_floating_point:
            res[key] = errors(a, b)
        else:
            sa = a.reshape(-1, a.shape[-1]).sort(dim=-1)[0]
            sb = b.reshape(-1, b.shape[-1]).sort(dim=-1)[0]
            res[key] = {"rows_differ": int((sa != sb).any(dim=-1).sum().item())}
    return res


def compare(run, ref):
    """compare_outs of the outputs, and normwise errors of the gradients."""
    res = compare_outs(run["outs"], ref["outs"])
    gmax = max(g.abs().max().item() for g in ref["grads"].values())
    gfro = max(g.double().norm().item() for g in ref["grads"].values())
    for n, a in run["grads"].items():
        res["grad:" + n] = errors(a, ref["grads"][n], GRAD_FLOOR * gmax, GRAD_FLOOR * gfro)
    return res


def rowwise(a, b, tol):
    """Random-routing comparison: rows of y that differ by more than 10x the tolerance (a token whose
    top-K flipped on a near tie) and the error over the remaining rows."""
    a = a.double().reshape(-1, a.shape[-1])
    b = b.double().reshape(-1, b.shape[-1])
    d = (a - b).abs().max(dim=-1)[0]
    scale = b.abs().max().item() or 1.0
    bad = d > 10 * tol * scale
    good = ~bad
    err = (d[good].max().item() / scale) if good.any() else 0.0
    return {"rows": int(a.shape[0]), "rows_far": int(bad.sum().item()), "max_good": err}


def same_bits(r1, r2):
    diff = []
    for i, (a, b) in enumerate(zip(r1["outs"], r2["outs"])):
        if not (a.shape == b.shape and bool((a == b).all().item())):
            diff.append("out%d" % i)
    for n, a in r1["grads"].items():
        b = r2["grads"][n]
        if not (a.shape == b.shape and bool((a == b).all().item())):
            diff.append("grad:" + n)
    return diff


def zero_expert_grads(run, E, e0):
    """Largest |grad| over the parameters of expert e0 (ModuleList entry or 3-D slice)."""
    worst, seen = 0.0, []
    for n, g in run["grads"].items():
        parts = n.split(".")
        if "experts" not in parts:
            continue
        i = parts.index("experts")
        if i + 1 < len(parts) and parts[i + 1].isdigit():
            if int(parts[i + 1]) != e0:
                continue
            sl = g
        elif g.dim() == 3 and g.shape[0] == E:
            sl = g[e0]
        else:
            continue
        seen.append(n)
        worst = max(worst, sl.abs().max().item())
    return worst, seen


def run_case(mp, torch, c, tol):
    path, recipe, cfg_fn, bias_name, layout = FAMILIES[c["family"]]
    module = load_fixture(path)
    dev = torch.device(DEVICE)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[c["dtype"]]
    T, E, K, G, TG = c["T"], c["E"], c["K"], c["G"], c["TG"]
    seed = zlib.crc32(c["name"].encode())
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    zero = (seed % E) if c["zero"] else None

    dims = (ENGINE_H, ENGINE_I) if c["engine"] else (H, I)
    cfg = module.tiny_config(**cfg_fn(E, K, G, TG, *dims))
    block = getattr(module, module.BLOCK_CLASS)(cfg)
    rec = {"layout": layout, "recipe": recipe, "zero_expert": zero}
    rec["patched_at_build"] = "_moepatch" in block.__dict__ and "forward" in block.__dict__
    init_block(torch, block, bias_name, gen)
    block.to(device=dev, dtype=dtype)
    block.train()
    if not rec["patched_at_build"]:
        if not mp.patch(block):
            rec["patched"] = False
            rec["why"] = "detection refused the block: %s" % mp.detect(block)
            return rec

    Hh = cfg.hidden_size
    if c["random"]:
        x = torch.randn(T, Hh, generator=gen, dtype=torch.float64)
        sets = None
    else:
        W = block.gate.weight.detach().double().cpu()
        x, sets = margin_input(torch, W, T, E, K, recipe, G, TG, zero, rng, gen)
    x = x.to(dtype).to(dev)
    dy = torch.randn(T, Hh, generator=gen, dtype=torch.float64).to(dtype).to(dev)

    st = block.__dict__.get("_moepatch")
    calls0 = st.calls if st is not None else 0
    fast0 = getattr(st, "fast_router_calls", 0)
    p1 = fwd_bwd(torch, block, block, x, dy)
    p2 = fwd_bwd(torch, block, block, x, dy)
    st = block.__dict__.get("_moepatch")
    rec["fast_router_calls"] = getattr(st, "fast_router_calls", 0) - fast0
    rec["patched"] = bool(st is not None and st.disabled is None and "forward" in block.__dict__
                          and st.calls >= calls0 + 2)
    rec["why"] = None if rec["patched"] else (
        "no _moepatch state" if st is None else
        "disabled: %s" % st.disabled if st.disabled else
        "instance forward gone" if "forward" not in block.__dict__ else
        "fused path not called (calls %d -> %d)" % (calls0, st.calls))
    rec["nondeterministic"] = same_bits(p1, p2)

    cls_forward = type(block).forward
    u = fwd_bwd(torch, block, lambda inp: cls_forward(block, inp), x, dy)
    rec["vs_unpatched"] = compare(p1, u)
    if c["random"]:
        rec["rowwise_vs_unpatched"] = rowwise(p1["outs"][0], u["outs"][0], tol[c["dtype"]])
    ref = copy.deepcopy(block).double()
    r = fwd_bwd(torch, ref, lambda inp: type(ref).forward(ref, inp), x.double(), dy.double())
    rec["vs_fp64"] = compare(p1, r)
    rec["orig_vs_fp64"] = compare(u, r)
    if zero is not None:
        rec["zero_grad_patched"], rec["zero_grad_params"] = zero_expert_grads(p1, E, zero)
        rec["zero_grad_unpatched"], _ = zero_expert_grads(u, E, zero)
    rec["finite"] = all(bool(torch.isfinite(t).all().item()) for t in p1["outs"] if t.dtype.is_floating_point)
    if T <= INFER_MAX_T:
        rec.update(infer_case(torch, block, ref, x, st))
    return rec


INFER_MAX_T = 16  # decode sizes: where a no-grad forward of an fp32-logits family makes its own logits


def infer_case(torch, block, ref, x, st):
    """A no-grad forward (the decode path; for bf16 fp32-logits families the kernels make the router
    logits, glue _own_router) patched, unpatched and in float64: errors of every output, and how many
    calls made their own logits."""
    own0 = getattr(st, "own_router_calls", 0)
    with torch.no_grad():
        p = [o.detach().clone() for o in flatten(block(x.view(1, *x.shape)))]
        own = getattr(st, "own_router_calls", 0) - own0
        u = [o.detach().clone() for o in flatten(type(block).forward(block, x.view(1, *x.shape)))]
        r = [o.detach().clone() for o in flatten(type(ref).forward(ref, x.double().view(1, *x.shape)))]
    return {"own_router_calls": own, "infer_vs_unpatched": compare_outs(p, u),
            "infer_vs_fp64": compare_outs(p, r), "infer_orig_vs_fp64": compare_outs(u, r)}


def main(argv):
    out_path = argv[1]
    wanted = set(argv[2:])
    result = {"meta": {}, "cases": {}, "running": None}

    def dump():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1, default=str)
        os.replace(tmp, out_path)

    mp = sys.modules.get("_moepatch")
    if mp is None:
        result["fatal"] = ("module _moepatch is not loaded: run under LD_PRELOAD=build/libmoepatch.so "
                           "(and not MOEPATCH=0)")
        dump()
        return 3
    import torch
    if DEVICE == "cuda" and not torch.cuda.is_available():
        result["fatal"] = "torch sees no CUDA device"
        dump()
        return 3
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    tol = tolerances()
    result["meta"] = {"device": torch.cuda.get_device_name(0) if DEVICE == "cuda" else DEVICE, "torch": torch.__version__, "tol": tol,
                      "options": dict(getattr(mp, "options", {}))}
    for c in CASES:
        if wanted and c["name"] not in wanted:
            continue
        result["running"] = c["name"]
        dump()
        try:
            mp.set_engine(c["engine"])
            result["cases"][c["name"]] = run_case(mp, torch, c, tol)
        except Exception:
            result["cases"][c["name"]] = {"error": traceback.format_exc()}
        finally:
            mp.set_engine(False)
        result["running"] = None
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
