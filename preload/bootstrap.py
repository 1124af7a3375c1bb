"""libmoepatch bootstrap: runs once inside the module `_moepatch` when the interpreter is about to run
user code (every Python process under LD_PRELOAD, so it stays small). It wraps SourceFileLoader's
exec_module, which both normal imports and transformers' remote-code loader go through, and hands
every `modeling_*` module to the glue (preload/glue.py), compiled only when the first one appears.
Modules imported before this ran are found by one scan of sys.modules.
"""

import os
import sys

_mp = sys.modules["_moepatch"]
_glue = []


def _log(msg):
    sys.stderr.write("moepatch: " + msg + "\n")


def _load_glue():
    if not _glue:
        ns = {"__name__": "_moepatch.glue", "__builtins__": __builtins__}
        exec(compile(_mp.glue_source(), "<moepatch glue>", "exec"), ns)
        _glue.append(ns)
    return _glue[0]


def _is_modeling(name):
    return name.rsplit(".", 1)[-1].startswith("modeling_")


def _postprocess(module):
    name = getattr(module, "__name__", "")
    if not _is_modeling(name) or "torch" not in sys.modules:
        return
    try:
        _load_glue()["postprocess"](module)
    except Exception as e:  # never break an import
        _log("could not process %s: %r" % (name, e))


def _install_loader_hook():
    loader = sys.modules["_frozen_importlib_external"].SourceFileLoader
    orig = loader.exec_module
    if getattr(orig, "__moepatch_wrapped__", False):
        return

    def exec_module(self, module):
        orig(self, module)
        _postprocess(module)

    exec_module.__moepatch_wrapped__ = True
    loader.exec_module = exec_module


def _after_fork_in_child():
    if _glue:
        _glue[0]["after_fork_in_child"]()


def patch(block):
    """Patch one block by hand (benchmarks, tests). True when detection accepted it."""
    return _load_glue()["patch"](block)


def unpatch(block):
    """Give one block its own forward back."""
    _load_glue()["unpatch"](block)


def set_engine(on):
    """Override MOEPATCH_GEMM (benchmarks, tests): True or 1 the Hopper GEMM engine, 2 its
    warp-specialized schedule by name (its default too), False or 0 cuBLAS, None back to
    MOEPATCH_GEMM."""
    _load_glue()["set_engine"](on)


def engine_for():
    """moe_problem.engine that a CUDA call gets now (0 cuBLAS, 1 the Hopper engine, 2 its
    warp-specialized schedule)."""
    return _load_glue()["_engine_for"]()


try:
    _install_loader_hook()
    for _module in list(sys.modules.values()):
        if _module is not None:
            _postprocess(_module)
    os.register_at_fork(after_in_child=_after_fork_in_child)
except Exception as e:  # the program must run unmodified
    _log("not installed: %r" % (e,))
