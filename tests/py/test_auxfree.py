"""Aux-loss-free load balancing and expert-load telemetry (MOEPATCH_AUXFREE*, MOEPATCH_TELEMETRY*):
the counts the fused forward reports, the update rule after each optimizer step, warmup and cap,
gradient accumulation, the all-reduce over two gloo ranks, where the bias lives (native buffer, on
the router or on the block, or the library's), the selection bias of the softmax recipe, telemetry
files, and bad values.

Each test runs auxfree_probe.py in a subprocess under LD_PRELOAD (the pytest process never loads the
library) and asserts on the JSON it prints.
"""

import json
import os
import struct
import subprocess
import zlib

import pytest

import moepatch_testlib as lib

PROBE = os.path.join(lib.HERE, "auxfree_probe.py")
QWEN3 = {"fixture": "tf5/modeling_qwen3_moe.py", "module_name": "fixtures_tf5.modeling_qwen3_moe"}
QWEN3_TF4 = {"fixture": "tf4/modeling_qwen3_moe.py", "module_name": "fixtures_tf4.modeling_qwen3_moe"}
BAILING = {"fixture": "bailing/modeling_bailing_moe_v2.py", "load": "remote"}
DEEPSEEK = {"fixture": "tf5/modeling_deepseek_v3.py", "module_name": "fixtures_tf5.modeling_deepseek_v3"}
MINIMAX_M2 = {"fixture": "tf5/modeling_minimax_m2.py", "module_name": "fixtures_tf5.modeling_minimax_m2"}
ON = {"MOEPATCH_AUXFREE": "1"}


def spawn(tmp_path, case, env, mode="on"):
    case = dict(case, out=str(tmp_path / "probe.out"))
    return subprocess.Popen([lib.PYTHON, PROBE, json.dumps(case)], env=lib.base_env(mode, env),
                            cwd=str(tmp_path), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=180):
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, "probe failed (rc %d)\n%s" % (proc.returncode, err[-6000:])
    return json.loads(out.strip().splitlines()[-1]), err


def run(tmp_path, case, env=None, mode="on"):
    return finish(spawn(tmp_path, case, env, mode))


def moepatch_lines(stderr):
    return [ln for ln in stderr.splitlines() if ln.startswith("moepatch")]


def rule(counts_per_step, E, rate=0.01, momentum=0.9, cap=2.0, warmup=0):
    """The documented update, in float64: the bias after each optimizer step (None = no forward)."""
    bias, ema, out = [0.0] * E, None, []
    for step, counts in enumerate(counts_per_step, 1):
        if counts is not None and sum(counts) > 0:
            load = [c / sum(counts) for c in counts]
            ema = load if ema is None else [momentum * a + (1 - momentum) * b for a, b in zip(ema, load)]
            if step > warmup:
                bias = [b + rate * (1.0 / E - a) for b, a in zip(bias, ema)]
                mean = sum(bias) / E
                bias = [min(cap, max(-cap, b - mean)) for b in bias]
        out.append(list(bias))
    return out


def assert_lists_close(got, want, tol=1e-6):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g == pytest.approx(w, abs=tol), (got, want)


# ---------------------------------------------------------------- counts

def test_counts_equal_a_bincount_of_the_routing_indices(tmp_path, preload_lib):
    res, _ = run(tmp_path, dict(BAILING, steps=2), ON)
    assert res["patched"] == [True]
    for counts, idx_counts in zip(res["counts"], res["idx_counts"]):
        assert counts == idx_counts
        assert sum(counts[0]) == 2 * 6 * 2  # B * S * K slots


def test_gradient_accumulation_counts_every_micro_batch_once(tmp_path, preload_lib):
    res, _ = run(tmp_path, dict(BAILING, steps=2, micro=2), ON)
    counts = res["counts"][0][0]
    assert counts == res["idx_counts"][0][0]  # the sum over both micro-batches
    assert sum(counts) == 2 * (2 * 6 * 2)
    assert res["ema"][0][0] == pytest.approx([c / sum(counts) for c in counts], abs=1e-7)


def test_no_grad_and_eval_forwards_are_not_counted(tmp_path, preload_lib):
    res, _ = run(tmp_path, dict(BAILING, steps=2), ON)
    assert res["nograd_counted"] == [False, False]
    assert [c[0] for c in res["counts"]] == [c[0] for c in res["idx_counts"]]


# ---------------------------------------------------------------- the update rule

HAND = {"MOEPATCH_AUXFREE": "1", "MOEPATCH_AUXFREE_RATE": "0.1", "MOEPATCH_AUXFREE_MOMENTUM": "0.5",
        "MOEPATCH_AUXFREE_CAP": "0.08"}


def test_update_rule_matches_a_hand_computed_sequence(tmp_path, preload_lib):
    # E = 4, rate 0.1, momentum 0.5, cap 0.08:
    # step 1 load (.75, .25, 0, 0) = ema; bias = .1 (1/4 - ema) = (-.05, 0, .025, .025)
    # step 2 load (1, 0, 0, 0): ema (.875, .125, 0, 0); bias (-.1125, .0125, .05, .05) -> cap -.08
    # step 3 load (0, 0, .5, .5): ema (.4375, .0625, .25, .25); bias (-.09875, .03125, .05, .05),
    #        mean .008125 -> (-.106875, .023125, .041875, .041875) -> cap -.08
    # step 4 no forward since step 3: nothing changes
    case = dict(QWEN3, scenario="rule", config={"num_experts": 4},
                counts=[[6, 2, 0, 0], [8, 0, 0, 0], [0, 0, 4, 4], None])
    res, _ = run(tmp_path, case, HAND)
    want_bias = [[-0.05, 0.0, 0.025, 0.025], [-0.08, 0.0125, 0.05, 0.05],
                 [-0.08, 0.023125, 0.041875, 0.041875], [-0.08, 0.023125, 0.041875, 0.041875]]
    want_ema = [[0.75, 0.25, 0.0, 0.0], [0.875, 0.125, 0.0, 0.0], [0.4375, 0.0625, 0.25, 0.25],
                [0.4375, 0.0625, 0.25, 0.25]]
    assert_lists_close(res["bias"], want_bias)
    assert_lists_close(res["ema"], want_ema)


def test_warmup_keeps_the_bias_and_still_measures_the_load(tmp_path, preload_lib):
    case = dict(QWEN3, scenario="rule", config={"num_experts": 4}, counts=[[6, 2, 0, 0]] * 3)
    res, _ = run(tmp_path, case, dict(HAND, MOEPATCH_AUXFREE_WARMUP="2", MOEPATCH_AUXFREE_CAP="1"))
    assert res["bias"][0] == [0.0] * 4
    assert res["bias"][1] == [0.0] * 4
    assert res["ema"][0] == pytest.approx([0.75, 0.25, 0.0, 0.0])
    assert res["bias"][2] == pytest.approx([-0.05, 0.0, 0.025, 0.025], abs=1e-7)


def test_cap_bounds_every_bias_in_training(tmp_path, preload_lib):
    env = {"MOEPATCH_AUXFREE": "1", "MOEPATCH_AUXFREE_RATE": "1.0", "MOEPATCH_AUXFREE_CAP": "0.05"}
    res, _ = run(tmp_path, dict(QWEN3, steps=4, skew=1.0), env)
    biases = [b for step in res["bias"] for b in step[0]]
    assert max(abs(b) for b in biases) <= 0.05 + 1e-7
    assert max(abs(b) for b in biases) == pytest.approx(0.05)


def test_training_run_follows_the_rule_on_its_measured_counts(tmp_path, preload_lib):
    env = {"MOEPATCH_AUXFREE": "1", "MOEPATCH_AUXFREE_RATE": "0.2", "MOEPATCH_AUXFREE_MOMENTUM": "0.5"}
    res, _ = run(tmp_path, dict(QWEN3, steps=4, micro=2), env)
    want = rule([c[0] for c in res["counts"]], 8, rate=0.2, momentum=0.5)
    assert_lists_close([b[0] for b in res["bias"]], want)


# ---------------------------------------------------------------- where the bias lives

@pytest.mark.parametrize("fixture,config,name", [
    (BAILING, {}, "gate.expert_bias"),
    (BAILING, {"expert_bias_as_parameter": True}, "gate.expert_bias"),
    (DEEPSEEK, {}, "gate.e_score_correction_bias"),
    (MINIMAX_M2, {}, "e_score_correction_bias"),  # held by the block, passed to the router
], ids=["bailing-buffer", "bailing-parameter", "deepseek_v3", "minimax_m2-block"])
def test_native_bias_is_updated_in_place_and_is_in_state_dict(tmp_path, preload_lib, fixture, config, name):
    res, _ = run(tmp_path, dict(fixture, steps=3, config=config), ON)
    assert res["bias_names"] == [name]
    assert res["state_dict_keys"] == [name]  # no second, library-owned bias
    assert any(b != 0.0 for b in res["bias"][-1][0])
    assert_lists_close([b[0] for b in res["bias"]], rule([c[0] for c in res["counts"]], 8))


@pytest.mark.parametrize("fixture", [QWEN3, QWEN3_TF4], ids=["qwen3_moe-tf5", "qwen3_moe-tf4"])
def test_softmax_family_gets_a_library_bias_buffer_in_state_dict(tmp_path, preload_lib, fixture):
    res, _ = run(tmp_path, dict(fixture, steps=3, reload=True), ON)
    assert res["bias_names"] == ["moepatch_expert_bias"]
    assert res["state_dict_keys"] == ["moepatch_expert_bias"]
    last = res["bias"][-1][0]
    assert any(b != 0.0 for b in last)
    assert sum(last) == pytest.approx(0.0, abs=1e-6)  # mean-centred
    assert res["bias_after_reload"] == [last]  # a strict load without the key keeps the bias


def test_softmax_selection_uses_the_bias_and_weights_stay_unbiased(tmp_path, preload_lib):
    bias = [0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.3, 0.2]
    res, _ = run(tmp_path, dict(QWEN3, scenario="select", bias=bias), ON)
    assert res["counts"] == res["ref_counts"]
    assert res["counts"] != res["unbiased_counts"]
    assert res["rel_err"] < lib.tol("MOE_TOL_F32")


def test_off_by_default(tmp_path, preload_lib):
    res, _ = run(tmp_path, dict(QWEN3, steps=1), {})
    assert res["balancer"] is False
    assert res["state_dict_keys"] == []


# ---------------------------------------------------------------- distributed

def run_ranks(tmp_path, case, env, world=2):
    init = tmp_path / "init"
    procs = []
    for rank in range(world):
        d = tmp_path / ("rank%d" % rank)
        d.mkdir()
        procs.append(spawn(d, dict(case, scenario="dist", rank=rank, world=world, init_file=str(init)), env))
    return [finish(p)[0] for p in procs]


def test_two_gloo_ranks_sum_counts_and_end_with_identical_biases(tmp_path, preload_lib):
    env = {"MOEPATCH_AUXFREE": "1", "MOEPATCH_AUXFREE_RATE": "0.2"}
    r0, r1 = run_ranks(tmp_path, dict(QWEN3, steps=3), env)
    assert r0["counts"] != r1["counts"]  # different data on each rank
    assert r0["bias"] == r1["bias"]
    summed = [[a + b for a, b in zip(c0[0], c1[0])] for c0, c1 in zip(r0["counts"], r1["counts"])]
    assert_lists_close([b[0] for b in r0["bias"]], rule(summed, 8, rate=0.2))


def test_sync_groups_of_one_keep_each_rank_to_its_own_counts(tmp_path, preload_lib):
    env = {"MOEPATCH_AUXFREE": "1", "MOEPATCH_AUXFREE_RATE": "0.2", "MOEPATCH_AUXFREE_SYNC": "1"}
    r0, r1 = run_ranks(tmp_path, dict(QWEN3, steps=2), env)
    assert r0["bias"] != r1["bias"]
    for r in (r0, r1):
        assert_lists_close([b[0] for b in r["bias"]], rule([c[0] for c in r["counts"]], 8, rate=0.2))


# ---------------------------------------------------------------- telemetry

def read_png(path):
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, pos = {}, 8
    while pos < len(data):
        n, = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        crc, = struct.unpack(">I", data[pos + 8 + n:pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xffffffff
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, colour = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    raw = zlib.decompress(chunks[b"IDAT"])
    assert len(raw) == h * (1 + 3 * w)
    return w, h, depth, colour


def test_telemetry_writes_a_jsonl_line_per_layer_every_n_steps_and_a_heatmap(tmp_path, preload_lib):
    path = tmp_path / "load.jsonl"
    env = {"MOEPATCH_AUXFREE": "1", "MOEPATCH_TELEMETRY": str(path), "MOEPATCH_TELEMETRY_EVERY": "2"}
    res, _ = run(tmp_path, dict(BAILING, kind="lm", steps=5), env)
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [(r["step"], r["layer"]) for r in recs] == [(2, 0), (2, 1), (4, 0), (4, 1)]
    for r in recs:
        assert set(r) >= {"step", "layer", "load", "bias"}
        assert len(r["load"]) == len(r["bias"]) == 8
        assert sum(r["load"]) == pytest.approx(1.0, abs=1e-5)
    w, h, depth, colour = read_png(str(path) + ".png")
    assert (depth, colour) == (8, 2)
    assert w % 8 == 0 and h % 2 == 0 and w // 8 == h // 2  # 2 layers x 8 experts, square cells


def test_telemetry_alone_measures_without_touching_the_model(tmp_path, preload_lib):
    path = tmp_path / "load.jsonl"
    res, _ = run(tmp_path, dict(QWEN3, steps=2), {"MOEPATCH_TELEMETRY": str(path),
                                                  "MOEPATCH_TELEMETRY_EVERY": "1"})
    recs = [json.loads(ln) for ln in path.read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2]
    assert recs[-1]["bias"] == [0.0] * 8
    assert res["state_dict_keys"] == []  # no library buffer without MOEPATCH_AUXFREE


# ---------------------------------------------------------------- messages

def test_model_aux_loss_is_left_alone_and_said_once(tmp_path, preload_lib):
    config = {"output_router_logits": True, "router_aux_loss_coef": 0.01}
    _, err = run(tmp_path, dict(BAILING, scenario="build", kind="lm", config=config), ON)
    lines = [ln for ln in moepatch_lines(err) if "auxiliary load-balancing loss" in ln]
    assert len(lines) == 1, err
    assert "leaves that loss as it is" in lines[0]
    _, err = run(tmp_path, dict(BAILING, scenario="build", kind="lm", config=config), {})
    assert not [ln for ln in moepatch_lines(err) if "auxiliary" in ln], err


@pytest.mark.parametrize("name,value", [("MOEPATCH_AUXFREE_MOMENTUM", "1.5"), ("MOEPATCH_AUXFREE_RATE", "0"),
                                        ("MOEPATCH_AUXFREE_SYNC", "zero"), ("MOEPATCH_TELEMETRY_EVERY", "0")])
def test_bad_value_prints_one_error_and_the_library_stays_inert(tmp_path, preload_lib, name, value):
    res, err = run(tmp_path, dict(QWEN3, scenario="build"), {"MOEPATCH_AUXFREE": "1", name: value})
    lines = moepatch_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("moepatch: error: %s='%s' is not valid" % (name, value))
    assert lines[0].endswith("library inert")
    assert res["patched"] == [False] and res["balancer"] is False
