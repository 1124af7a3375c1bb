"""Probe for tests/gpu/test_hf_families.py: tiny random models of every MoE family the installed
transformers (>= 5) ships, built through the real loader path, run under LD_PRELOAD=libmoepatch.so.

    LD_PRELOAD=$PWD/build/libmoepatch.so python3 tests/gpu/hf_probe.py families OUT.json [MODEL_TYPE ...]
    LD_PRELOAD=$PWD/build/libmoepatch.so python3 tests/gpu/hf_probe.py ring MODEL_DIR OUT.pt
    python3 tests/gpu/hf_probe.py list                 # the enumerated families, no model built
    python3 tests/gpu/hf_probe.py save-ring MODEL_DIR  # write the Ring remote-code model folder

How the families are found (design choice a reader must know): every model_type of transformers'
CONFIG_MAPPING is instantiated with its defaults (no hub access), and it is an MoE family when the
config itself carries an expert count (EXPERT_COUNT_KEYS, also inside DBRX's ffn_config). Composite
configs (vision-language, omni) whose expert count lives only in a sub-config are listed as
"composite" with the sub-config's model_type: that text family is tested on its own when transformers
registers it; composites themselves are not built. Keys are read off the config, never off class
names, so a new transformers version shows new families (and dropped ones) in the table.

Per family ("families" mode), in one process (the library patches at construction):
  1. a tiny config: AutoConfig.for_model(model_type, **shrunk sizes) (hidden 64, 2 layers, 8 experts,
     top-2, vocab 128, attention sizes consistent, dropouts and jitter 0, every layer an MoE layer);
  2. AutoModelForCausalLM.from_config (AutoModel when the family has no causal LM), fp32; the
     library's stderr lines during construction are captured: the summary line and refusals;
  3. if patched: loss (+ aux_loss with output_router_logits=True where the family has it and
     transformers can compute it) and every parameter gradient, patched; then `_moepatch.unpatch`
     on every patched block of the same model and the same again (the reference); then greedy
     generate, unpatched vs re-patched. A family without a causal LM (AutoModel) has no generate and
     no LM loss: its loss is the mean square of the last hidden state projected on a fixed random
     direction (the plain mean square is nearly constant after the final RMSNorm, so its gradients
     are rounding noise), and an eval/no_grad forward stands in for generate;
  4. the same in bf16 (from_config(dtype=torch.bfloat16)): loss and aux loss compared;
  5. VARIANTS: the family built again with a config change (e.g. DeepSeek-V2's
     topk_method=group_limited_greedy), construction only: its summary and refusal lines.
It writes the JSON after every family ("running" names the one in progress), so the test can tell
a crash from a failure and resume after it.
"""

import contextlib
import copy
import io
import json
import math
import os
import re
import sys
import time
import traceback

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

HERE = os.path.dirname(os.path.abspath(__file__))
RING_FIXTURE = os.path.join(HERE, "..", "fixtures", "ring_remote")

EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts",
                     "num_routed_experts")
DEVICE = os.environ.get("MOEPATCH_HF_DEVICE") or None  # default: cuda when available, else cpu
B, S = 2, 12  # tokens per run: 24
GEN_NEW = 6

# ------------------------------------------------------------------------------------ enumeration


def _expert_count(cfg):
    """(key, value) of the config's expert count, or None. A key that is present but None or 1 counts
    too (Gemma-4, HunYuan-V1-MoE and others ship MoE off by default): the tiny config turns it on."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for k in EXPERT_COUNT_KEYS:
        if k in d and (d[k] is None or isinstance(d[k], int)) and not isinstance(d[k], bool):
            return k, d[k]
    ffn = d.get("ffn_config")  # DBRX keeps its MoE keys in a sub-config
    if isinstance(ffn, dict):
        for k in EXPERT_COUNT_KEYS:
            if isinstance(ffn.get(k), int):
                return "ffn_config." + k, ffn[k]
    return None


def _sub_configs(cfg):
    for name in sorted(getattr(cfg, "sub_configs", {}) or {}):
        sub = getattr(cfg, name, None)
        if sub is not None and hasattr(sub, "to_dict"):
            yield name, sub


def enumerate_families():
    """[{"model_type", "kind": "text" | "composite", "key", "E", "sub"?, "head"}]; errors of configs
    that cannot be instantiated with defaults are ignored (they are not MoE families we can build)."""
    import transformers
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto import modeling_auto as ma

    out = []
    with contextlib.redirect_stderr(io.StringIO()), _quiet_transformers():
        for mt in sorted(CONFIG_MAPPING_NAMES):
            try:
                cfg = transformers.AutoConfig.for_model(mt)
            except Exception:
                continue
            found = _expert_count(cfg)
            head = ("causal_lm" if mt in ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
                    else "base" if mt in ma.MODEL_MAPPING_NAMES else None)
            if found:
                out.append({"model_type": mt, "kind": "text", "key": found[0], "E": found[1], "head": head})
                continue
            for name, sub in _sub_configs(cfg):
                sf = _expert_count(sub)
                if not sf:
                    for _, subsub in _sub_configs(sub):
                        if _expert_count(subsub):
                            sf, sub = _expert_count(subsub), subsub
                            break
                if sf:
                    out.append({"model_type": mt, "kind": "composite", "key": name + "." + sf[0], "E": sf[1],
                                "sub": getattr(sub, "model_type", None), "head": head})
                    break
    return out


@contextlib.contextmanager
def _quiet_transformers():
    try:
        from transformers.utils import logging as tlog
        old = tlog.get_verbosity()
        tlog.set_verbosity_error()
    except Exception:
        tlog = None
    try:
        yield
    finally:
        if tlog is not None:
            tlog.set_verbosity(old)


# ------------------------------------------------------------------------------------ tiny configs

H, E, K, LAYERS, VOCAB = 64, 8, 2, 2, 128
HEADS, KV_HEADS, HEAD_DIM = 4, 2, 16

# set when the config has the key (plain attribute names of transformers 5 configs)
SIZES = {
    "vocab_size": VOCAB, "hidden_size": H, "d_model": H, "intermediate_size": 96,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 48, "expert_ffn_hidden_size": 32,
    "moe_shared_expert_intermediate_size": 48, "share_expert_dim": 48, "ffn_hidden_size": 96,
    "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
    "head_dim": HEAD_DIM, "max_position_embeddings": 256,
    # MLA (DeepSeek-V2/V3 and relatives)
    "kv_lora_rank": 16, "q_lora_rank": 24, "qk_rope_head_dim": 8, "qk_nope_head_dim": 16, "v_head_dim": 16,
    "qk_head_dim": 24,
    # experts: every spelling of E, K and the group limit
    "num_experts": E, "num_local_experts": E, "n_routed_experts": E, "moe_num_experts": E, "n_experts": E,
    "num_routed_experts": E, "num_experts_per_tok": K, "num_experts_per_token": K, "moe_k": K, "moe_topk": K,
    "top_k_experts": K, "n_group": 4, "topk_group": 2, "num_expert_group": 4,
    # every layer an MoE layer
    "first_k_dense_replace": 0, "decoder_sparse_step": 1, "moe_layer_freq": 1, "expert_layer_period": 1,
    "expert_layer_offset": 0, "moe_layer_start_index": 0, "num_dense_layers": 0, "mlp_only_layers": [],
    # recurrent / linear-attention sizes of hybrid families
    "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_num_key_heads": 2,
    "linear_num_value_heads": 4, "mamba_d_state": 8, "mamba_dt_rank": 8, "mamba_n_heads": 4,
    "mamba_d_head": 16, "mamba_n_groups": 1, "ssm_state_size": 8, "mamba_head_dim": 16, "n_groups": 1,
    "sliding_window": 16, "num_nextn_predict_layers": 0,
    # deterministic training forward
    "enable_moe_block": True, "moe_topk": K,
    "router_jitter_noise": 0.0, "jitter_noise": 0.0, "output_router_logits": True,
}
# per-family overrides, where the generic sizes do not fit the family's constraints
OVERRIDES = {
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "use_mamba_kernels": False},
    "glm4_moe": {"n_group": 1, "topk_group": 1},
    # M-RoPE sections must add up to the rotary frequencies of HEAD_DIM 16 at partial rotary 0.5
    "glm4v_moe_text": {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0,
                                           "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1]}},
}
# DeepSeek-V2 greedy: a scale that shows, and a norm_topk_prob its router never reads (must stay unused)
OVERRIDES["deepseek_v2"] = {"topk_method": "greedy", "routed_scaling_factor": 2.5, "norm_topk_prob": True}
# Variants of a family built once more (fp32, construction only) with these config changes: the
# library must give the stated outcome, and a refusal must contain the stated words.
VARIANTS = {
    "deepseek_v2": {"group_limited_greedy": ({"topk_method": "group_limited_greedy"}, "refused",
                                             "topk_method=group_limited_greedy")},
}
# Granite MoE in transformers 5.17 records no router logits, so with output_router_logits=True its aux
# loss is the int 0 and `aux_loss.to` raises, with or without the library: run those without it.
for _mt in ("granitemoe", "granitemoe_swa", "granitemoeshared"):
    OVERRIDES[_mt] = {"output_router_logits": False}
EVAL_TOL = 1e-5  # eval/no_grad forward of a family without generate, fp32, norm-wise relative


def tiny_kwargs(model_type, cfg):
    """The keyword arguments for AutoConfig.for_model: SIZES restricted to keys the family's default
    config has, lists of one entry per layer cut to LAYERS, dropouts 0, token ids inside the vocab."""
    d = cfg.to_dict()
    n_layers = d.get("num_hidden_layers")
    kw = {k: v for k, v in SIZES.items() if k in d}
    for k, v in d.items():
        if "dropout" in k and isinstance(v, float):
            kw[k] = 0.0
        elif isinstance(v, list) and n_layers and len(v) == n_layers and k not in kw:
            kw[k] = v[:LAYERS]
        elif k.endswith("_token_id") and isinstance(v, int) and v >= VOCAB:
            kw[k] = min(v, VOCAB - 1) if k in ("pad_token_id", "bos_token_id", "eos_token_id") else None
    if "layer_types" in kw and isinstance(kw["layer_types"], list) and d.get("layer_types"):
        kinds = list(dict.fromkeys(d["layer_types"]))  # keep one layer of each kind
        kw["layer_types"] = (kinds + kw["layer_types"])[:LAYERS] if len(kinds) <= LAYERS else kw["layer_types"]
    if "mlp_layer_types" in d and isinstance(d["mlp_layer_types"], list):
        kw["mlp_layer_types"] = ["sparse"] * LAYERS
    if "qk_rope_head_dim" in d and "head_dim" in d:  # MLA: head_dim is the rotary part
        kw["head_dim"] = SIZES["qk_rope_head_dim"]
    if "kv_lora_rank" in d and "num_key_value_heads" in d:  # MLA has no grouped KV heads
        kw["num_key_value_heads"] = HEADS
    for k in ("n_shared_experts", "num_shared_experts"):
        if k in d and d[k] is None:
            kw[k] = 1
    if d.get("is_moe") is False:
        kw["is_moe"] = True
    kw.update(OVERRIDES.get(model_type, {}))
    return kw


def tiny_config(model_type, **extra):
    import transformers
    base = transformers.AutoConfig.for_model(model_type)
    return transformers.AutoConfig.for_model(model_type, **dict(tiny_kwargs(model_type, base), **extra))


# ------------------------------------------------------------------------------------ one family

def _mp():
    return sys.modules.get("_moepatch")


def _patched_blocks(model):
    out = []
    for name, m in model.named_modules():
        st = m.__dict__.get("_moepatch")
        if st is not None and "forward" in m.__dict__ and not st.disabled:
            out.append((name, m))
    return out


def _moe_like(model):
    """Modules that look like MoE blocks to the probe (independently of the library): a child named
    `experts`, or an Experts / SparseMoe class name. Used to flag families the library never sees."""
    names = []
    for name, m in model.named_modules():
        ch = m._modules
        if "experts" in ch and not re.search(r"experts$", name):
            names.append((name, type(m).__name__))
    return names


def _summary(lines):
    summ = [ln for ln in lines if "MoE blocks" in ln and "patched" in ln]
    kept = [ln for ln in lines if "kept the original forward" in ln]
    other = [ln for ln in lines if ln not in summ and ln not in kept]
    return summ, kept, other


def _capture(fn, *a, **kw):
    buf = io.StringIO()
    with contextlib.redirect_stderr(buf):
        res = fn(*a, **kw)
    return res, [ln[len("moepatch: "):] for ln in buf.getvalue().splitlines() if ln.startswith("moepatch: ")]


def _build(model_type, head, dtype, torch, **extra):
    import transformers
    cfg = tiny_config(model_type, **extra)
    torch.manual_seed(1234)
    cls = transformers.AutoModelForCausalLM if head == "causal_lm" else transformers.AutoModel
    model, lines = _capture(cls.from_config, cfg, dtype=dtype)
    with torch.no_grad():  # fresh selection biases are zeros: make them matter
        for name, buf in model.named_buffers():
            if name.endswith(("e_score_correction_bias", "expert_bias")) and buf.is_floating_point():
                buf.copy_(torch.randn(buf.shape, generator=torch.Generator().manual_seed(5)) * 0.05)
    return model, lines


def _inputs(model, torch, device):
    g = torch.Generator().manual_seed(7)
    vocab = getattr(model.config, "vocab_size", VOCAB) or VOCAB
    ids = torch.randint(3, min(vocab, VOCAB), (B, S), generator=g).to(device)
    return ids


def _loss_and_grads(model, ids, torch, with_aux):
    model.zero_grad(set_to_none=True)
    kw = {"output_router_logits": True} if with_aux else {}
    if hasattr(model, "lm_head") or "ForCausalLM" in type(model).__name__:
        out = model(input_ids=ids, labels=ids, **kw)
        loss = out.loss
    else:
        out = model(input_ids=ids, **kw)
        h = out.last_hidden_state.float()
        direction = torch.randn(h.shape[-1], generator=torch.Generator().manual_seed(11)).to(h.device)
        loss = (h @ direction).pow(2).mean()
    aux = getattr(out, "aux_loss", None)
    loss.backward()
    grads = {n: p.grad.detach().double().cpu() for n, p in model.named_parameters()
             if p.grad is not None}
    return float(loss.detach().double()), (None if aux is None else float(aux.detach().double())), grads


def rel(a, b):
    den = abs(b)
    return abs(a - b) / den if den else (0.0 if a == b else float("inf"))


def grad_errors(got, want):
    """Worst norm-wise relative error over the gradients, plus the names of tensors over 1e-4. A
    reference gradient with norm below 1e-6 of the largest one (e.g. the router of a top-1 renormalised
    family: exactly zero analytically) is judged absolutely against that largest norm."""
    scale = max([w.norm().item() for w in want.values()] + [0.0])
    worst, bad, missing = 0.0, [], sorted(set(want) ^ set(got))
    for n, w in want.items():
        if n not in got:
            continue
        d = (got[n] - w).norm().item()
        wn = w.norm().item()
        e = d / scale if wn < 1e-6 * scale else d / wn
        worst = max(worst, e)
        if e > 1e-4:
            bad.append("%s %.3g" % (n, e))
    return worst, bad, missing


def _calls(model):
    return sum(m.__dict__["_moepatch"].calls for _, m in model.named_modules() if "_moepatch" in m.__dict__)


def _set_patched(blocks, on):
    mp = _mp()
    for _, b in blocks:
        if on:
            mp.patch(b)
        else:
            mp.unpatch(b)


def _generate(model, ids, torch):
    model.eval()
    with torch.no_grad():
        out = model.generate(input_ids=ids[:1, :6], max_new_tokens=GEN_NEW, do_sample=False,
                             pad_token_id=0)
    model.train()
    return out[0].tolist()


def _eval_forward(model, ids, torch):
    """The stand-in for generate of a model without one: last hidden state of an eval forward under
    no_grad (the inference path of the blocks) on the first prompt."""
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids[:1, :6]).last_hidden_state.double().cpu()
    model.train()
    return out


def _compare_inference(model, blocks, ids, torch):
    """Greedy generate (or, without generate, an eval forward), unpatched vs re-patched. The model
    comes in unpatched and leaves patched."""
    if hasattr(model, "generate"):
        gen_r = _generate(model, ids, torch)
        _set_patched(blocks, True)
        calls0 = _calls(model)
        gen_p = _generate(model, ids, torch)
        return {"patched": gen_p, "ref": gen_r, "same": gen_p == gen_r, "fused_calls": _calls(model) - calls0}
    ref = _eval_forward(model, ids, torch)
    _set_patched(blocks, True)
    calls0 = _calls(model)
    got = _eval_forward(model, ids, torch)
    err = ((got - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    return {"eval_rel": err, "same": err < EVAL_TOL, "fused_calls": _calls(model) - calls0,
            "note": "no generate: eval forward compared"}


def run_variants(mt, head, torch):
    """{name: {"want", "needle", "summary", "refusals", "patched_blocks"}} of VARIANTS[mt]."""
    out = {}
    for name, (extra, want, needle) in sorted(VARIANTS.get(mt, {}).items()):
        try:
            model, lines = _build(mt, head, torch.float32, torch, **extra)
        except Exception as e:
            out[name] = {"want": want, "needle": needle, "error": "%s: %s" % (type(e).__name__, str(e)[:300])}
            continue
        summ, kept, _ = _summary(lines)
        out[name] = {"want": want, "needle": needle, "summary": summ, "refusals": kept,
                     "patched_blocks": len(_patched_blocks(model))}
        del model
    return out


def run_family(fam, torch, device):
    mt, head = fam["model_type"], fam["head"]
    rec = {"model_type": mt, "head": head}
    if mt in VARIANTS:
        rec["variants"] = run_variants(mt, head, torch)
    t0 = time.time()
    (model, lines) = _build(mt, head, torch.float32, torch)
    summ, kept, other = _summary(lines)
    rec.update(summary=summ, refusals=kept, log=other, moe_like=_moe_like(model))
    blocks = _patched_blocks(model)
    rec["patched_blocks"] = len(blocks)
    rec["block_classes"] = sorted({type(b).__name__ for _, b in blocks})
    if not blocks:
        rec["seconds"] = round(time.time() - t0, 2)
        return rec
    model.to(device).train()
    ids = _inputs(model, torch, device)
    with_aux = getattr(model.config, "output_router_logits", None) is True
    calls0 = _calls(model)
    (loss_p, aux_p, grads_p), run_lines = _capture(_loss_and_grads, model, ids, torch, with_aux)
    rec["fused_calls"] = _calls(model) - calls0
    rec["run_log"] = run_lines
    rec["still_patched"] = len(_patched_blocks(model))
    _set_patched(blocks, False)
    loss_r, aux_r, grads_r = _loss_and_grads(model, ids, torch, with_aux)
    worst, bad, missing = grad_errors(grads_p, grads_r)
    rec["fp32"] = {"loss": loss_p, "loss_ref": loss_r, "loss_rel": rel(loss_p, loss_r),
                   "aux": aux_p, "aux_ref": aux_r,
                   "aux_rel": None if aux_r is None or aux_p is None else rel(aux_p, aux_r),
                   "grad_worst": worst, "grad_bad": bad[:8], "grad_missing": missing[:8],
                   "n_grads": len(grads_r)}
    # greedy generation: reference (unpatched), then patched again
    try:
        rec["generate"] = _compare_inference(model, blocks, ids, torch)
    except Exception as e:
        rec["generate"] = {"error": "%s: %s" % (type(e).__name__, str(e).splitlines()[0][:200])}
    del model
    # bf16 through from_config(dtype=...)
    (mb, _lines_b) = _build(mt, head, torch.bfloat16, torch)
    blocks_b = _patched_blocks(mb)
    mb.to(device).train()
    calls0 = _calls(mb)
    (lp, ap, gp), run_b = _capture(_loss_and_grads, mb, ids, torch, with_aux)
    fused_b = _calls(mb) - calls0
    _set_patched(blocks_b, False)
    lr, ar, gr = _loss_and_grads(mb, ids, torch, with_aux)
    worst_b, _, _ = grad_errors(gp, gr)
    rec["bf16"] = {"loss": lp, "loss_ref": lr, "loss_rel": rel(lp, lr), "aux": ap, "aux_ref": ar,
                   "aux_rel": None if ar is None or ap is None else rel(ap, ar), "grad_worst": worst_b,
                   "patched_blocks": len(blocks_b), "fused_calls": fused_b, "run_log": run_b}
    rec["seconds"] = round(time.time() - t0, 2)
    return rec


def families_main(out_path, only):
    import torch
    import transformers
    device = DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    fams = enumerate_families()
    res = {"meta": {"transformers": transformers.__version__, "torch": torch.__version__, "device": device,
                    "moepatch_loaded": _mp() is not None, "families": fams},
           "families": {}, "running": None}
    if os.path.exists(out_path):  # resume after a crash: keep what is there
        with open(out_path) as f:
            old = json.load(f)
        res["families"] = old.get("families", {})
    todo = [f for f in fams if f["kind"] == "text" and (not only or f["model_type"] in only)
            and f["model_type"] not in res["families"]]

    def dump():
        tmp = out_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(res, f, indent=1)
        os.replace(tmp, out_path)

    for fam in todo:
        res["running"] = fam["model_type"]
        dump()
        try:
            with _quiet_transformers():
                rec = run_family(fam, torch, device)
        except Exception as e:
            rec = {"model_type": fam["model_type"], "head": fam["head"],
                   "error": "%s: %s" % (type(e).__name__, str(e)[:400]),
                   "traceback": traceback.format_exc()[-3000:]}
        res["families"][fam["model_type"]] = rec
        res["running"] = None
        dump()
        if hasattr(torch, "cuda") and torch.cuda.is_available():
            torch.cuda.empty_cache()
    dump()


# ------------------------------------------------------------------------------------ Ring (remote code)

RING_CONFIG = dict(vocab_size=VOCAB, hidden_size=H, moe_intermediate_size=32, num_experts=E,
                   num_experts_per_tok=K, num_shared_experts=1, n_group=4, topk_group=2,
                   routed_scaling_factor=2.5, num_hidden_layers=2, num_attention_heads=HEADS,
                   max_position_embeddings=256)


def save_ring(model_dir):
    """A local Ring model folder: our remote-code files + config.json with auto_map + random weights
    saved with save_pretrained. Built in a process without the library (weights do not depend on it)."""
    import shutil

    import torch
    os.makedirs(model_dir, exist_ok=True)
    for f in ("configuration_bailing_moe_v2.py", "modeling_bailing_moe_v2.py"):
        shutil.copy(os.path.join(RING_FIXTURE, f), os.path.join(model_dir, f))
    import importlib.util
    import types
    pkg = types.ModuleType("ring_fixture_pkg")  # the files import each other relatively
    pkg.__path__ = [model_dir]
    sys.modules[pkg.__name__] = pkg
    mods = {}
    for name in ("configuration_bailing_moe_v2", "modeling_bailing_moe_v2"):
        spec = importlib.util.spec_from_file_location(pkg.__name__ + "." + name, os.path.join(model_dir, name + ".py"))
        mods[name] = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mods[name]
        spec.loader.exec_module(mods[name])
    cfgmod, modmod = mods["configuration_bailing_moe_v2"], mods["modeling_bailing_moe_v2"]
    cfg = cfgmod.BailingMoeV2Config(**RING_CONFIG)
    cfg.auto_map = {"AutoConfig": "configuration_bailing_moe_v2.BailingMoeV2Config",
                    "AutoModelForCausalLM": "modeling_bailing_moe_v2.BailingMoeV2ForCausalLM"}
    torch.manual_seed(99)
    model = modmod.BailingMoeV2ForCausalLM(cfg)
    with torch.no_grad():  # a visible selection bias, so that the bias path matters
        for layer in model.model.layers:
            layer.mlp.gate.expert_bias.copy_(torch.randn(E) * 0.05)
    model.save_pretrained(model_dir)
    # save_pretrained writes the auto_map of the classes it knows; make sure both entries are there
    with open(os.path.join(model_dir, "config.json")) as f:
        cj = json.load(f)
    cj["auto_map"] = cfg.auto_map
    with open(os.path.join(model_dir, "config.json"), "w") as f:
        json.dump(cj, f, indent=2)


def ring_main(model_dir, out_path):
    """Load the folder with AutoModelForCausalLM.from_pretrained(trust_remote_code=True), run loss +
    grads (fp32 and bf16 loss) and greedy generation; torch.save everything for the test to compare
    with a MOEPATCH=0 run of the same command."""
    import torch
    import transformers
    device = DEVICE or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False
    res = {"device": device}
    model, lines = _capture(transformers.AutoModelForCausalLM.from_pretrained, model_dir, trust_remote_code=True)
    res["log"] = lines
    res["module"] = type(model).__module__
    blocks = _patched_blocks(model)
    res["patched_blocks"] = len(blocks)
    model.to(device).train()
    ids = _inputs(model, torch, device)
    c0 = _calls(model)
    loss, _aux, grads = _loss_and_grads(model, ids, torch, False)
    res["fused_calls"] = _calls(model) - c0
    res["loss"], res["grads"] = loss, grads
    c0 = _calls(model)
    res["generate"] = _generate(model, ids, torch)
    res["generate_fused_calls"] = _calls(model) - c0
    del model
    mb, _ = _capture(transformers.AutoModelForCausalLM.from_pretrained, model_dir, trust_remote_code=True,
                     dtype=torch.bfloat16)
    mb.to(device).train()
    c0 = _calls(mb)
    lb, _, gb = _loss_and_grads(mb, ids, torch, False)
    res["bf16_loss"], res["bf16_grads"], res["bf16_fused_calls"] = lb, gb, _calls(mb) - c0
    res["bf16_dtype"] = str(next(mb.parameters()).dtype)
    torch.save(res, out_path)


def main(argv):
    if argv[0] == "list":
        for f in enumerate_families():
            print(json.dumps(f))
    elif argv[0] == "families":
        families_main(argv[1], set(argv[2:]))
    elif argv[0] == "save-ring":
        save_ring(argv[1])
    elif argv[0] == "ring":
        ring_main(argv[1], argv[2])
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
