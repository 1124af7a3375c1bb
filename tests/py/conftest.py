"""Shared pytest fixtures of the integration tests: the probe runner (memoised for the session, so the
unpatched reference of a case runs once however many tests compare against it) and the family table."""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import moepatch_testlib as lib  # noqa: E402

# One entry per family fixture: the probe case, and the family name the library should report.
# Bailing is loaded the way transformers 5 loads remote code; the others by path, under module names that
# tell the transformers-4 and -5 fixtures apart.
FAMILIES = {
    "bailing_moe_v2": ("bailing_moe_v2", {"fixture": "bailing/modeling_bailing_moe_v2.py", "load": "remote"}),
    "bailing_moe_v2-bias_param": ("bailing_moe_v2", {"fixture": "bailing/modeling_bailing_moe_v2.py",
                                                     "load": "remote",
                                                     "config": {"expert_bias_as_parameter": True}}),
    "qwen3_moe-tf5": ("qwen3_moe", {"fixture": "tf5/modeling_qwen3_moe.py",
                                    "module_name": "fixtures_tf5.modeling_qwen3_moe"}),
    "mixtral-tf5": ("mixtral", {"fixture": "tf5/modeling_mixtral.py", "module_name": "fixtures_tf5.modeling_mixtral"}),
    "olmoe-tf5": ("olmoe", {"fixture": "tf5/modeling_olmoe.py", "module_name": "fixtures_tf5.modeling_olmoe"}),
    "qwen2_moe-tf5": ("qwen2_moe", {"fixture": "tf5/modeling_qwen2_moe.py",
                                    "module_name": "fixtures_tf5.modeling_qwen2_moe"}),
    "deepseek_v3-tf5": ("deepseek_v3", {"fixture": "tf5/modeling_deepseek_v3.py",
                                        "module_name": "fixtures_tf5.modeling_deepseek_v3"}),
    "glm4_moe-tf5": ("glm4_moe", {"fixture": "tf5/modeling_glm4_moe.py",
                                  "module_name": "fixtures_tf5.modeling_glm4_moe"}),
    "minimax_m2-tf5": ("minimax_m2", {"fixture": "tf5/modeling_minimax_m2.py",
                                      "module_name": "fixtures_tf5.modeling_minimax_m2"}),
    "mixtral-tf4": ("mixtral", {"fixture": "tf4/modeling_mixtral.py", "module_name": "fixtures_tf4.modeling_mixtral"}),
    "qwen3_moe-tf4": ("qwen3_moe", {"fixture": "tf4/modeling_qwen3_moe.py",
                                    "module_name": "fixtures_tf4.modeling_qwen3_moe"}),
}


@pytest.fixture(scope="session")
def probe(tmp_path_factory):
    """probe(case, mode, env=None, pythonpath=None) -> ProbeResult, memoised for the session."""
    return lib.ProbeCache(str(tmp_path_factory.mktemp("probes")))


@pytest.fixture(scope="session")
def preload_lib():
    """The preload object; the patched and inert modes need it built (make test-py builds it)."""
    path = lib.library()
    assert os.path.exists(path), "%s is missing: run `make` (or set MOEPATCH_LIB)" % path
    return path
