"""The preload objects from the outside: inert in non-Python processes, nothing exported but the
stage-2 entry, `_moepatch` installed in every supported interpreter and every way of starting one,
the A/B switch and bad values, and the start-up cost (printed and written to build/startup.txt).

Environment: MOEPATCH_LIB is the absolute path of build/libmoepatch.so; TEST_PYTHONS lists extra
interpreters (missing ones are skipped). LD_PRELOAD must be absolute: a relative path is resolved
against each process's working directory, so tools that chdir lose the library (the user's
responsibility, documented in the README).
"""

import glob
import os
import shutil
import statistics
import subprocess
import sys
import time

import pytest

PRINT_VERSION = "import _moepatch, sys; print(_moepatch.version)"
HAS_MODULE = "import sys; print('_moepatch' in sys.modules)"


def _interpreters():
    found = [sys.executable] + os.environ.get("TEST_PYTHONS", "").split()
    unique = []
    for p in found:
        if p not in unique:
            unique.append(p)
    return unique


@pytest.fixture(scope="session")
def lib():
    path = os.environ.get("MOEPATCH_LIB", "")
    if not os.path.isabs(path) or not os.path.exists(path):
        pytest.skip("MOEPATCH_LIB must be the absolute path of libmoepatch.so (run via make test-py)")
    return path


@pytest.fixture(scope="session")
def lib_py(lib):
    return os.path.join(os.path.dirname(lib), "libmoepatch_py.so")


def _clean_env():
    return {k: v for k, v in os.environ.items()
            if not k.startswith("MOEPATCH") and k not in ("LD_PRELOAD", "LD_BIND_NOW")}


@pytest.fixture
def env(lib):
    """The environment of a user's job: the library preloaded, every option at its default."""
    e = _clean_env()
    e["LD_PRELOAD"] = lib
    return e


def run(argv, env, **kw):
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120, **kw)


@pytest.fixture(params=_interpreters())
def python(request):
    if not os.path.exists(request.param):
        pytest.skip("%s not installed" % request.param)
    return request.param


def _dyn_symbols(path, which):
    if not shutil.which("nm"):
        pytest.skip("nm (binutils) not installed")
    out = subprocess.run(["nm", "-D", which, path], capture_output=True, text=True,
                         check=True).stdout
    return {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}


# ---------------------------------------------------------------- non-Python processes stay inert

def test_bash_true_is_inert(env):
    r = run(["bash", "-c", "true"], env)
    assert (r.returncode, r.stderr) == (0, "")


def test_bin_true_is_inert_under_bind_now(env):
    env["LD_BIND_NOW"] = "1"
    r = run(["/bin/true"], env)
    assert (r.returncode, r.stderr) == (0, "")


def test_gcc_version_is_inert(env):
    if not shutil.which("gcc"):
        pytest.skip("gcc not installed")
    r = run(["gcc", "--version"], env)
    assert (r.returncode, r.stderr) == (0, "")
    assert "gcc" in r.stdout.lower()


def test_bad_value_is_silent_outside_python(env):
    env["MOEPATCH_LOG"] = "bogus"
    r = run(["bash", "-c", "true"], env)
    assert (r.returncode, r.stderr) == (0, "")


# ---------------------------------------------------------------- what the objects export and need

def test_stage1_exports_nothing(lib):
    assert _dyn_symbols(lib, "--defined-only") == set()


def test_stage1_references_no_python_symbol(lib):
    undefined = _dyn_symbols(lib, "--undefined-only")
    assert sorted(s for s in undefined if s.startswith(("Py", "_Py"))) == []


def test_stage1_needs_only_libc(lib):
    if not shutil.which("readelf"):
        pytest.skip("readelf (binutils) not installed")
    out = subprocess.run(["readelf", "-d", lib], capture_output=True, text=True, check=True).stdout
    needed = {line.split("[")[1].rstrip("]") for line in out.splitlines() if "(NEEDED)" in line}
    assert needed <= {"libc.so.6", "libdl.so.2"}, needed


def test_stage2_exports_only_its_entry(lib_py):
    assert _dyn_symbols(lib_py, "--defined-only") == {"mp_stage2_init"}


def test_stage2_python_symbols_exist_in_python39(lib_py):
    libs = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.9*/lib/libpython3.9.so")))
    if not libs:
        pytest.skip("pyenv Python 3.9 with --enable-shared not found (~/.pyenv/versions/3.9*)")
    wanted = {s for s in _dyn_symbols(lib_py, "--undefined-only") if s.startswith(("Py", "_Py"))}
    assert wanted, "stage 2 should use the Python API"
    assert sorted(wanted - _dyn_symbols(libs[-1], "--defined-only")) == []


# ---------------------------------------------------------------- inside Python

def test_module_loads_with_dash_c(python, env):
    r = run([python, "-c", PRINT_VERSION], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "0.1.0\n", "")


def test_module_loads_isolated_without_site(python, env):
    r = run([python, "-I", "-S", "-E", "-c", PRINT_VERSION], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "0.1.0\n", "")


def test_module_loads_with_dash_m(python, env, tmp_path):
    (tmp_path / "mp_probe.py").write_text(PRINT_VERSION + "\n")
    r = run([python, "-m", "mp_probe"], env, cwd=tmp_path)
    assert (r.returncode, r.stdout, r.stderr) == (0, "0.1.0\n", "")


def test_module_loads_for_a_script_file(python, env, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(PRINT_VERSION + "\n")
    r = run([python, str(script)], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "0.1.0\n", "")


def test_module_loads_from_stdin(python, env):
    r = run([python, "-"], env, input=PRINT_VERSION + "\n")
    assert (r.returncode, r.stdout, r.stderr) == (0, "0.1.0\n", "")


def test_module_loads_under_bind_now(python, env):
    env["LD_BIND_NOW"] = "1"
    r = run([python, "-c", PRINT_VERSION], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "0.1.0\n", "")


def test_not_installed_while_site_runs(python, env, tmp_path):
    # sitecustomize runs inside `import site`: the hook must wait for the user's code.
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\nimport json\nprint('site', '_moepatch' in sys.modules)\n")
    env["PYTHONPATH"] = str(tmp_path)
    r = run([python, "-c", HAS_MODULE], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "site False\nTrue\n", "")


def test_options_reach_the_module(env):
    env.update(MOEPATCH_LOG="Info", MOEPATCH_MODELS=" qwen3_moe,bailing_moe_v2 ",
               MOEPATCH_BACKEND="CPU", MOEPATCH_CHECK="3", MOEPATCH="yes", MOEPATCH_AUXFREE_RATE="1e-3",
               MOEPATCH_AUXFREE_SYNC="4", MOEPATCH_TELEMETRY=" /tmp/a b.jsonl ", MOEPATCH_GEMM="SM90-ws",
               MOEPATCH_DIRECT_GRADS="off", MOEPATCH_FAST_ROUTER="0")
    r = run([sys.executable, "-c", "import _moepatch; print(sorted(_moepatch.options.items()))"],
            env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == str(sorted({"enabled": True, "log": "info", "backend": "cpu", "check": 3,
                                   "models": "qwen3_moe,bailing_moe_v2", "auxfree": False,
                                   "auxfree_rate": 0.001, "auxfree_momentum": 0.9, "auxfree_cap": 2.0,
                                   "auxfree_warmup": 0, "auxfree_sync": 4, "telemetry": "/tmp/a b.jsonl",
                                   "telemetry_every": 10, "gemm": "sm90-ws",
                                   "direct_grads": False, "fast_router": False}.items())) + "\n"


ENGINE_FOR = ("import _moepatch as m; f = m.engine_for; r = [f()]; "
              "m.set_engine(2); r.append(f()); m.set_engine(False); r.append(f()); "
              "m.set_engine(None); r.append(f()); print(r)")


@pytest.mark.parametrize("value, want", [(None, "[1, 2, 0, 1]"), ("cublas", "[0, 2, 0, 0]"),
                                         ("sm90", "[1, 2, 0, 1]"), ("sm90-ws", "[2, 2, 0, 2]")])
def test_gemm_choice_and_override(env, value, want):
    """MOEPATCH_GEMM picks moe_problem.engine (auto: the Hopper engine); set_engine overrides it
    until set_engine(None)."""
    if value is not None:
        env["MOEPATCH_GEMM"] = value
    r = run([sys.executable, "-c", ENGINE_FOR], env)
    assert (r.returncode, r.stdout) == (0, want + "\n"), r.stderr


def test_lib_dir_is_the_directory_of_the_libraries(lib, env):
    r = run([sys.executable, "-c", "import _moepatch; print(_moepatch.lib_dir)"], env)
    assert (r.returncode, r.stdout) == (0, os.path.dirname(os.path.realpath(lib)) + "\n")


def test_moepatch_off_leaves_no_module(python, env):
    env["MOEPATCH"] = "0"
    r = run([python, "-c", HAS_MODULE], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "False\n", "")


def test_bad_log_value_prints_one_error_and_stays_inert(python, env):
    env["MOEPATCH_LOG"] = "bogus"
    r = run([python, "-c", HAS_MODULE], env)
    assert (r.returncode, r.stdout) == (0, "False\n")
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("moepatch: error: MOEPATCH_LOG='bogus' is not valid")
    assert "warn, info, debug" in lines[0] and lines[0].endswith("; library inert")


def test_bad_value_is_silent_when_off(env):
    env.update(MOEPATCH="off", MOEPATCH_CHECK="-1")
    r = run([sys.executable, "-c", HAS_MODULE], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "False\n", "")


def test_python38_is_inert_and_says_so_at_info():
    py38 = sorted(glob.glob(os.path.expanduser("~/.pyenv/versions/3.8*/bin/python3")))
    lib = os.environ.get("MOEPATCH_LIB", "")
    if not py38 or not os.path.isabs(lib):
        pytest.skip("pyenv Python 3.8 not found")
    e = dict(_clean_env(), LD_PRELOAD=lib)
    quiet = run([py38[-1], "-c", HAS_MODULE], e)
    assert (quiet.returncode, quiet.stdout, quiet.stderr) == (0, "False\n", "")
    e["MOEPATCH_LOG"] = "info"
    told = run([py38[-1], "-c", HAS_MODULE], e)
    assert told.stderr.startswith("moepatch: Python 3.8") and "library inert" in told.stderr


EMBEDDER = r"""
#include <Python.h>
int main(void)
{
    Py_Initialize();
    int rc = PyRun_SimpleString("import sys\nimport json\nprint('_moepatch' in sys.modules)\n");
    return Py_FinalizeEx() < 0 || rc ? 1 : 0;
}
"""


def test_embedder_gets_module_at_first_top_level_import(env, tmp_path):
    # Py_Initialize + PyRun_* raise no cpython.run_* event: the first import from Python code,
    # outside any import in progress, installs instead.
    config = sys.executable + "-config"
    if not shutil.which("cc") or not os.path.exists(config):
        pytest.skip("no C compiler or %s" % config)
    flags = subprocess.run([config, "--includes", "--embed", "--ldflags"], capture_output=True,
                           text=True)
    if flags.returncode:
        pytest.skip("%s --embed failed" % config)
    (tmp_path / "embed.c").write_text(EMBEDDER)
    exe = tmp_path / "embed"
    build = subprocess.run(["cc", str(tmp_path / "embed.c"), "-o", str(exe)] + flags.stdout.split(),
                           capture_output=True, text=True)
    if build.returncode:
        pytest.skip("cannot build an embedder: " + build.stderr[-300:])
    r = run([str(exe)], env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "True\n", "")


# ---------------------------------------------------------------- start-up cost (printed)

def _median_ms(argv, env, runs):
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def _added_ms(argv, env, runs):
    """Median with and without the preload, measured in alternating rounds against drift."""
    plain = _clean_env()
    base, pre = [], []
    for _ in range(5):
        base.append(_median_ms(argv, plain, runs // 5))
        pre.append(_median_ms(argv, env, runs // 5))
    b, p = statistics.median(base), statistics.median(pre)
    return b, p, p - b


def test_startup_cost_is_reported(lib, env):
    rows = []
    for label, argv, runs in (("/bin/true", ["/bin/true"], 200),
                              ("python3 -c pass", [sys.executable, "-c", "pass"], 50)):
        b, p, added = _added_ms(argv, env, runs)
        rows.append("%-16s without %7.3f ms  with %7.3f ms  added %+7.3f ms  (median of %d)"
                    % (label, b, p, added, runs))
        assert added < 50, rows[-1]
    report = "start-up cost of LD_PRELOAD=libmoepatch.so\n" + "\n".join(rows) + "\n"
    with open(os.path.join(os.path.dirname(lib), "startup.txt"), "w") as f:
        f.write(report)
    print("\n" + report)
