"""GPU tests: every fixture family's MoE block, patched by libmoepatch, on CUDA against (a) the same block
unpatched and (b) a float64 reference, plus bitwise determinism and proof that the fused path ran.
Without a CUDA device (CI) the whole module is skipped with "no CUDA device: GPU tests skipped".

Design choice a reader must know: one subprocess (tests/gpu/gpu_probe.py under LD_PRELOAD=$MOEPATCH_LIB,
default build/libmoepatch.so) checks all cases — 9 families x 6 shapes: T in {1, 7, 4096}, K = 1, E = 6,
an expert without tokens, fp32 and bf16, ModuleList and 3-D layouts, margin and plain random routing; plus
2 shapes at H = I = 256 with _moepatch.set_engine(True) (names ending in -engine: the Hopper GEMM engine on
an sm_90 GPU) and set_engine(2) (-engine-ws: its warp-specialized schedule) — and writes JSON; the tests only read it. Errors are ||got - ref|| / ||ref|| per tensor (METHOD.md); the
JSON also holds max|got - ref| / max|ref| (tests/c/tolerance.h's metric), and the tolerances come from
tests/c/tolerance.h.

Rules (ARCHITECTURE.md, numerics contract), per output and per gradient:
  vs float64:   (margin-routing cases) err < tol (fp32 1e-5, bf16 1e-2), and for bf16 err <= 1.5 * err(original bf16 block) + 1e-3.
                Where the original block itself misses tol (its own bf16 router logits, e.g. OLMoE at K=1),
                only the second rule applies: the fused path must compute the block's function, no better.
  vs unpatched: err < 2 * tol (each side within tol), or within err_fused + err_original where the
                original misses tol. Random routing: at most 1% of rows may differ (a top-K near tie
                flipped), the others within 2 * tol; gradients are compared only when no row differs.
"""

import importlib.util
import json
import os
import subprocess
import sys
import tempfile

import pytest

try:
    import torch

    _HAVE_CUDA = torch.cuda.is_available()
except ImportError:
    _HAVE_CUDA = False

if not _HAVE_CUDA:
    pytest.skip("no CUDA device: GPU tests skipped", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
PROBE = os.path.join(HERE, "gpu_probe.py")
TIMEOUT = int(os.environ.get("MOEPATCH_GPU_PROBE_TIMEOUT", "480"))


def _load_probe_module():
    spec = importlib.util.spec_from_file_location("moepatch_gpu_probe", PROBE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_probe_mod = _load_probe_module()
CASES = {c["name"]: c for c in _probe_mod.CASES}
ALL = sorted(CASES)
MARGIN = [n for n in ALL if not CASES[n]["random"]]
RANDOM = [n for n in ALL if CASES[n]["random"]]
ZERO = [n for n in ALL if CASES[n]["zero"]]
BF16_RULE = (1.5, 1e-3)  # bf16: err <= 1.5 * err(original) + 1e-3


@pytest.fixture(scope="module")
def probe():
    lib = os.environ.get("MOEPATCH_LIB") or os.path.join(REPO, "build", "libmoepatch.so")
    if not os.path.exists(lib):
        pytest.fail("%s does not exist: build it first (make)" % lib)
    env = dict(os.environ)
    env["LD_PRELOAD"] = lib + (" " + env["LD_PRELOAD"] if env.get("LD_PRELOAD") else "")
    env["MOEPATCH"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    for var in ("MOEPATCH_MODELS", "MOEPATCH_BACKEND", "MOEPATCH_PROBE_DEVICE"):
        env.pop(var, None)
    with tempfile.TemporaryDirectory(prefix="moepatch_gpu_") as tmp:
        out = os.path.join(tmp, "probe.json")
        try:
            proc = subprocess.run([sys.executable, PROBE, out], env=env, capture_output=True, text=True,
                                  timeout=TIMEOUT)
            rc, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as e:
            rc, stderr = "timeout after %ds" % TIMEOUT, (e.stderr or b"").decode(errors="replace")
        data = None
        if os.path.exists(out):
            with open(out) as f:
                data = json.load(f)
    if data is None:
        pytest.fail("GPU probe wrote no result (exit %s):\n%s" % (rc, stderr[-4000:]))
    if "fatal" in data:
        pytest.fail("GPU probe: %s" % data["fatal"])
    data["_rc"], data["_stderr"] = rc, stderr[-4000:]
    return data


def _result(probe, name):
    r = probe["cases"].get(name)
    if r is None:
        pytest.fail("no result for %s: the probe stopped while running %s (exit %s)\n%s"
                    % (name, probe.get("running"), probe["_rc"], probe["_stderr"]))
    if "error" in r:
        pytest.fail("the probe raised on %s:\n%s" % (name, r["error"]))
    return r


def _log_lines(probe):
    lines = [ln for ln in probe["_stderr"].splitlines() if ln.startswith("moepatch:")]
    return ("\nlibrary log (last lines):\n  " + "\n  ".join(lines[-8:])) if lines else ""


def _patched(probe, name):
    r = _result(probe, name)
    if not r.get("patched"):
        pytest.fail("%s: the fused path did not run (%s); its numbers would be the original's%s"
                    % (name, r["why"], _log_lines(probe)))
    return r


def _tol(probe, name):
    return probe["meta"]["tol"][CASES[name]["dtype"]]


def _fmt(failures):
    return "\n  ".join(failures)


def _fp64_limit(orig, tol, bf16):
    """The allowed error against float64 given the original block's own: below tol, and for bf16 at
    most BF16_RULE times the original's; where the original misses tol, only the second rule."""
    limit = BF16_RULE[0] * orig + BF16_RULE[1] if bf16 else max(tol, 1.5 * orig + tol / 10)
    return min(tol, limit) if orig < tol else limit


@pytest.mark.parametrize("name", ALL)
def test_fused_path_ran_and_stayed_enabled(probe, name):
    r = _result(probe, name)
    assert r["patched"], "%s: %s%s" % (name, r["why"], _log_lines(probe))


# the families whose router computes fp32 logits (detect/families.c: logits_fp32)
FP32_LOGITS = {"bailing_moe_v2", "deepseek_v3_tf5", "glm4_moe_tf5"}


@pytest.mark.parametrize("name", ALL)
def test_fast_router_taken_exactly_for_bf16_fp32_logits(probe, name):
    """MOEPATCH_FAST_ROUTER: both fused calls of a bf16 case of an fp32-logits family take it (and
    the fp64 and unpatched comparisons below then cover its logits and router-weight grads)."""
    r = _patched(probe, name)
    c = CASES[name]
    want = 2 if c["family"] in FP32_LOGITS and c["dtype"] == "bf16" else 0
    assert r["fast_router_calls"] == want, (name, r["fast_router_calls"])


@pytest.mark.parametrize("name", MARGIN)
def test_output_and_grads_match_float64_reference(probe, name):
    r = _patched(probe, name)
    tol = _tol(probe, name)
    bf16 = CASES[name]["dtype"] == "bf16"
    failures = []
    for key, e in sorted(r["vs_fp64"].items()):
        o = r["orig_vs_fp64"][key]
        if "rows_differ" in e:
            if e["rows_differ"]:
                failures.append("%s: expert sets differ from the reference on %d rows" % (key, e["rows_differ"]))
            continue
        err, orig = e["fro"], o["fro"]
        limit = _fp64_limit(orig, tol, bf16)
        if not err < limit:
            failures.append("%s: rel err %.3g (max-norm %.3g) > %.3g; original block %.3g"
                            % (key, err, e["max"], limit, orig))
    assert not failures, "%s vs float64:\n  %s" % (name, _fmt(failures))


@pytest.mark.parametrize("name", ALL)
def test_matches_unpatched_block(probe, name):
    r = _patched(probe, name)
    tol = _tol(probe, name)
    failures = []
    if CASES[name]["random"]:
        rw = r["rowwise_vs_unpatched"]
        if rw["rows_far"] > 0.01 * rw["rows"]:
            failures.append("out0: %d of %d rows differ (more than top-K near ties explain)"
                            % (rw["rows_far"], rw["rows"]))
        if not rw["max_good"] < 2 * tol:
            failures.append("out0: rel err %.3g on the rows that agree, > %.3g" % (rw["max_good"], 2 * tol))
        if rw["rows_far"]:
            assert not failures, "%s vs unpatched:\n  %s" % (name, _fmt(failures))
            return
    for key, e in sorted(r["vs_unpatched"].items()):
        if "rows_differ" in e:
            allowed = 0.01 * CASES[name]["T"] if CASES[name]["random"] else 0
            if e["rows_differ"] > allowed:
                failures.append("%s: expert sets differ on %d rows" % (key, e["rows_differ"]))
            continue
        if CASES[name]["random"] and key == "out0":
            continue
        limit = 2 * tol
        ref_p, ref_o = r["vs_fp64"].get(key), r["orig_vs_fp64"].get(key)
        if ref_o is not None and ref_o["fro"] >= tol:
            limit = max(limit, ref_p["fro"] + ref_o["fro"] + tol / 10)
        if not e["fro"] < limit:
            failures.append("%s: rel err %.3g (max-norm %.3g) > %.3g" % (key, e["fro"], e["max"], limit))
    assert not failures, "%s vs unpatched:\n  %s" % (name, _fmt(failures))


@pytest.mark.parametrize("name", ALL)
def test_two_patched_runs_are_bitwise_equal(probe, name):
    r = _patched(probe, name)
    assert not r["nondeterministic"], "%s: these differ between two identical runs: %s" % (
        name, ", ".join(r["nondeterministic"]))


@pytest.mark.parametrize("name", ZERO)
def test_expert_without_tokens_gets_zero_gradient(probe, name):
    r = _patched(probe, name)
    e0 = r["zero_expert"]
    assert r["zero_grad_params"], "%s: found no parameters of expert %d" % (name, e0)
    assert r["zero_grad_unpatched"] == 0.0, (
        "%s: the probe's inputs sent tokens to expert %d (unpatched grad %g): probe bug" % (
            name, e0, r["zero_grad_unpatched"]))
    assert r["zero_grad_patched"] == 0.0, "%s: expert %d got no token but its gradient reaches %g" % (
        name, e0, r["zero_grad_patched"])


# margin cases of decode size: gpu_probe.infer_case runs a no-grad forward of them
INFER = [n for n in MARGIN if CASES[n]["T"] <= _probe_mod.INFER_MAX_T]


@pytest.mark.parametrize("name", INFER)
def test_no_grad_forward_makes_router_logits_exactly_for_bf16_fp32_logits(probe, name):
    """A decode-size no-grad call of a bf16 fp32-logits family has the kernels make its router logits
    (glue _own_router, moe_problem.router_w); every other case keeps the router's own."""
    r = _patched(probe, name)
    c = CASES[name]
    want = 1 if c["family"] in FP32_LOGITS and c["dtype"] == "bf16" else 0
    assert r["own_router_calls"] == want, (name, r["own_router_calls"])


@pytest.mark.parametrize("name", INFER)
def test_no_grad_forward_matches_float64_and_unpatched(probe, name):
    """The no-grad forward under the same rules as the training forward's outputs; returned router
    logits (Bailing's block returns them) within the fp32 tolerance of the original's, made by the
    kernels or not."""
    r = _patched(probe, name)
    tol = _tol(probe, name)
    bf16 = CASES[name]["dtype"] == "bf16"
    failures = []
    for key, e in sorted(r["infer_vs_fp64"].items()):
        unp, o = r["infer_vs_unpatched"][key], r["infer_orig_vs_fp64"][key]
        if "rows_differ" in e:
            if e["rows_differ"] or unp["rows_differ"]:
                failures.append("%s: expert sets differ on %d rows (fp64), %d (unpatched)"
                                % (key, e["rows_differ"], unp["rows_differ"]))
            continue
        limit = _fp64_limit(o["fro"], tol, bf16)
        if not e["fro"] < limit:
            failures.append("%s vs float64: rel err %.3g > %.3g; original block %.3g"
                            % (key, e["fro"], limit, o["fro"]))
        logits = key != "out0"
        limit_u = _probe_mod.tolerances()["fp32"] if logits else 2 * tol
        if o["fro"] >= tol and not logits:
            limit_u = max(limit_u, e["fro"] + o["fro"] + tol / 10)
        if not unp["fro"] < limit_u:
            failures.append("%s vs unpatched: rel err %.3g > %.3g" % (key, unp["fro"], limit_u))
    assert not failures, "%s, no-grad forward:\n  %s" % (name, _fmt(failures))
