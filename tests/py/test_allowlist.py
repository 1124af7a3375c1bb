"""MOEPATCH_MODELS restricts patching to the listed families."""

import moepatch_testlib as lib

ENV = {"MOEPATCH_MODELS": "qwen3_moe"}
QWEN3 = {"fixture": "tf5/modeling_qwen3_moe.py", "module_name": "fixtures_tf5.modeling_qwen3_moe"}
BAILING = {"fixture": "bailing/modeling_bailing_moe_v2.py", "load": "remote"}


def test_listed_family_is_patched(probe, preload_lib):
    assert probe(QWEN3, "on", env=ENV).patched()


def test_unlisted_family_keeps_its_forward_bit_identical(probe, preload_lib):
    on = probe(BAILING, "on", env=ENV)
    assert on.unpatched("at_build") and on.unpatched("after")
    lib.assert_bit_identical(on.data, probe(BAILING, "off").data)
