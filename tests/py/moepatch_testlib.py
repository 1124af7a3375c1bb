"""Helpers of the Python integration tests: run probe_block.py in a subprocess in one of three modes, read
its results back, compare tensors, and read the shared tolerances from tests/c/tolerance.h.

Modes (the A/B switch a user flips):
    "off"    no LD_PRELOAD at all: the reference
    "inert"  LD_PRELOAD=$MOEPATCH_LIB with MOEPATCH=0: loaded, must change nothing
    "on"     LD_PRELOAD=$MOEPATCH_LIB: every MoE block the library accepts runs fused

The pytest process itself never has the library preloaded; only the probes do.
"""

import json
import os
import re
import subprocess
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
FIXTURES = os.path.join(ROOT, "tests", "fixtures")
PROBE = os.path.join(HERE, "probe_block.py")
TOLERANCE_H = os.path.join(ROOT, "tests", "c", "tolerance.h")
# The interpreter the probes run in: the one running pytest (the Makefile uses /usr/bin/python3).
PYTHON = sys.executable
MODES = ("off", "inert", "on")

# ---------------------------------------------------------------- tolerances (one source with the C tests)

_DEFINE = re.compile(r"^\s*#\s*define\s+(MOE_TOL_\w+)\s+\(?\s*([-+0-9.eE]+)[fFlL]?\s*\)?", re.M)


def parse_tolerances(text):
    """{"MOE_TOL_F32": 1e-05, ...} from the #defines of a C header."""
    return {name: float(value) for name, value in _DEFINE.findall(text)}


def tolerances():
    with open(TOLERANCE_H) as f:
        return parse_tolerances(f.read())


def tol(name):
    """A tolerance from tests/c/tolerance.h; until that header exists, the values of the numerics
    contract in ARCHITECTURE.md (test_tolerance_header_exists fails meanwhile)."""
    if os.path.exists(TOLERANCE_H):
        return tolerances()[name]
    return {"MOE_TOL_F32": 1e-5, "MOE_TOL_BF16": 1e-2, "MOE_TOL_F16": 1e-3}[name]


# ---------------------------------------------------------------- subprocess probes

def library():
    lib = os.environ.get("MOEPATCH_LIB") or os.path.join(ROOT, "build", "libmoepatch.so")
    return os.path.abspath(lib)


def base_env(mode, extra=None):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MOEPATCH") and k != "LD_PRELOAD"}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["OMP_NUM_THREADS"] = "1"  # deterministic CPU reductions, and cheap on 2 cores
    if mode in ("inert", "on"):
        env["LD_PRELOAD"] = library()
    if mode == "inert":
        env["MOEPATCH"] = "0"
    env.update(extra or {})
    return env


class ProbeResult:
    def __init__(self, info, data, stderr, returncode):
        self.info, self.data, self.stderr, self.returncode = info, data, stderr, returncode

    @property
    def log(self):
        """The library's own lines on stderr."""
        return [ln for ln in self.stderr.splitlines() if ln.startswith("moepatch")]

    def patched(self, when="after"):
        """True when every MoE block of the probe carries the glue's state and an instance forward."""
        states = self.info[when]
        return bool(states) and all(s["state"] and s["instance_forward"] and not s["disabled"]
                                    for s in states)

    def unpatched(self, when="after"):
        return all(not s["instance_forward"] for s in self.info[when])


def run_probe(tmp_dir, case, mode, env=None, pythonpath=None, timeout=180):
    """Run probe_block.py on `case` (dict, see the probe) in `mode`; raise with its stderr on failure."""
    case = dict(case)
    os.makedirs(tmp_dir, exist_ok=True)
    n = len([f for f in os.listdir(tmp_dir) if f.endswith(".pt")])
    case["out"] = os.path.join(str(tmp_dir), "probe%d_%s.pt" % (n, mode))
    e = base_env(mode, env)
    if pythonpath:
        e["PYTHONPATH"] = os.pathsep.join([pythonpath] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else []))
    proc = subprocess.run([PYTHON, PROBE, json.dumps(case)], env=e, cwd=str(tmp_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError("probe failed (mode %s, rc %d) for %s\n--- stderr ---\n%s"
                             % (mode, proc.returncode, json.dumps(case), proc.stderr[-6000:]))
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    data = torch.load(case["out"])
    return ProbeResult(info, data, proc.stderr, proc.returncode)


class ProbeCache:
    """Session-wide memo of probe runs: the same (case, mode, env) is run once per test session."""

    def __init__(self, tmp_dir):
        self.tmp_dir = tmp_dir
        self.memo = {}

    def __call__(self, case, mode, env=None, pythonpath=None):
        key = json.dumps([case, mode, env, pythonpath], sort_keys=True)
        if key not in self.memo:
            self.memo[key] = run_probe(self.tmp_dir, case, mode, env, pythonpath)
        return self.memo[key]


# ---------------------------------------------------------------- comparisons

def rel_err(a, b):
    """Norm-wise relative error ‖a − b‖ / ‖b‖ in float64 (0 when both are empty or zero)."""
    a, b = a.double(), b.double()
    den = b.norm().item()
    num = (a - b).norm().item()
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


def result_tensors(res):
    """name -> tensor for everything a probe run compares: output, returned extras, dx, every grad."""
    out = {"y": res["y"]}
    for i, t in enumerate(res.get("extras", [])):
        out["extra%d" % i] = t
    if res.get("x_grad") is not None:
        out["x_grad"] = res["x_grad"]
    if "loss" in res:
        out["loss"] = res["loss"].reshape(1)
    for name, g in res["grads"].items():
        out["grad:" + name] = g
    return out


def assert_bit_identical(got, want):
    a, b = result_tensors(got), result_tensors(want)
    assert a.keys() == b.keys()
    for name in b:
        if b[name] is None:
            assert a[name] is None, name
            continue
        assert a[name] is not None, "%s: missing" % name
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        assert torch.equal(a[name], b[name]), "%s differs (max abs %.3g)" % (
            name, (a[name].double() - b[name].double()).abs().max().item())


def assert_close(got, want, rtol, skip=()):
    """Every compared tensor within rtol (norm-wise relative); both None or both present.

    A reference tensor that is zero at this precision (norm below rtol × the largest norm of the run,
    e.g. the router gradient of a top-1 renormalised router, which is exactly 0 analytically and rounding
    noise numerically) is compared absolutely instead: ‖a − b‖ ≤ rtol × that largest norm."""
    a, b = result_tensors(got), result_tensors(want)
    assert a.keys() == b.keys()
    scale = max([t.double().norm().item() for t in b.values() if t is not None and t.dtype.is_floating_point]
                + [0.0])
    worst = []
    for name in b:
        if name in skip:
            continue
        if b[name] is None or a[name] is None:
            assert (a[name] is None) == (b[name] is None) or _all_zero(a[name]) and _all_zero(b[name]), \
                "%s: present in one run only" % name
            continue
        assert a[name].shape == b[name].shape, "%s: shape %s vs %s" % (name, a[name].shape, b[name].shape)
        if not a[name].dtype.is_floating_point:
            assert torch.equal(a[name], b[name]), name
            continue
        if b[name].double().norm().item() < rtol * scale:
            diff = (a[name].double() - b[name].double()).norm().item()
            if not diff <= rtol * scale:
                worst.append("%s: abs err %.3g of a near-zero tensor (run scale %.3g)" % (name, diff, scale))
            continue
        e = rel_err(a[name], b[name])
        if not e <= rtol:
            worst.append("%s: rel err %.3g" % (name, e))
    assert not worst, "beyond rel tol %.0e: %s" % (rtol, "; ".join(worst))


def by_role(tensors):
    """Merge the per-expert tensors of an nn.ModuleList (grad:experts.3.w1.weight ...) into one flat
    tensor per role (grad:experts.*.w1.weight), so that ModuleList and 3-D layouts are judged alike."""
    out, parts = {}, {}
    for name, t in tensors.items():
        m = re.match(r"(.*experts\.)(\d+)(\..*)", name)
        if m and t is not None:
            parts.setdefault(m.group(1) + "*" + m.group(3), []).append((int(m.group(2)), t))
        else:
            out[name] = t
    for name, items in parts.items():
        out[name] = torch.cat([t.reshape(-1) for _, t in sorted(items, key=lambda it: it[0])])
    return out


def _all_zero(t):
    return t is None or not bool(t.abs().sum())


def experts_with_gradient(res):
    """Set of expert indices whose weights received a nonzero gradient (= got at least one token)."""
    used = set()
    for name, g in res["grads"].items():
        if g is None:
            continue
        m = re.search(r"experts\.(\d+)\.", name)
        if m and bool(g.abs().sum()):
            used.add(int(m.group(1)))
        elif re.search(r"experts\.(gate_up_proj|down_proj)$", name):
            used |= {e for e in range(g.shape[0]) if bool(g[e].abs().sum())}
    return used


# ---------------------------------------------------------------- loading fixtures in-process (no preload)

def load_fixture(rel_path, module_name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(module_name, os.path.join(FIXTURES, rel_path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------- the glue's functions in-process

def glue_namespace(options=None):
    """preload/glue.py's namespace, executed against a stand-in for the C module (its options only):
    for unit tests of glue functions that need no kernels. Nothing is patched by this."""
    import types
    from unittest import mock

    path = os.path.join(ROOT, "preload", "glue.py")
    fake = types.ModuleType("_moepatch")
    fake.options = dict(options or {})
    ns = {"__name__": "glue_under_test"}
    with mock.patch.dict(sys.modules, {"_moepatch": fake}):
        with open(path) as f:
            exec(compile(f.read(), path, "exec"), ns)
    return ns
