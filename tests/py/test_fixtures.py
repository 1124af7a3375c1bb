"""The fixtures themselves (no preload, in this process): each block's loop-based forward equals a plain
vectorised reference of its family's recipe (every expert on every token, then gather), output and
gradients, in float64 (routing in fp32, as upstream); and the float32 run agrees with the float64 one.
Written independently of the fixtures, so a slip in either shows up here before it can blur a
patched-vs-unpatched comparison."""

import pytest
import torch
import torch.nn.functional as F

import moepatch_testlib as lib
import probe_block
from conftest import FAMILIES

# family -> routing recipe of the reference
SIGMOID = {"bailing_moe_v2", "deepseek_v3", "glm4_moe"}


def expert_weights(block):
    """[(gate [I,H], up [I,H], down [H,I]) per expert]."""
    ex = block.experts
    if hasattr(ex, "gate_up_proj"):
        I = ex.gate_up_proj.shape[1] // 2
        w, d = ex.gate_up_proj, ex.down_proj
        return [(w[e, :I], w[e, I:], d[e]) for e in range(w.shape[0])]
    if hasattr(ex[0], "w1"):
        return [(m.w1.weight, m.w3.weight, m.w2.weight) for m in ex]
    return [(m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight) for m in ex]


def swiglu(x, g, u, d):
    return F.linear(F.silu(F.linear(x, g)) * F.linear(x, u), d)


def route(block, family, x, cfg):
    E = len(expert_weights(block))
    K = cfg.num_experts_per_tok
    if family == "minimax_m2":  # logits in the weight dtype; bias on the block; no groups, eps, scale
        s = torch.sigmoid((x @ block.gate.weight.t()).float())
        idx = (s + block.e_score_correction_bias).sort(dim=-1, descending=True).indices[:, :K]
        w = s.gather(1, idx)
        return idx, w / w.sum(-1, keepdim=True)
    if family in SIGMOID:
        logits = x.float() @ block.gate.weight.float().t()  # these routers always work in fp32
        s = torch.sigmoid(logits)
        bias = block.gate.expert_bias if family == "bailing_moe_v2" else block.gate.e_score_correction_bias
        c = s + bias
        G, kg = cfg.n_group, cfg.topk_group
        gs = c.view(-1, G, E // G).sort(dim=-1, descending=True).values[..., :2].sum(-1)
        keep = torch.zeros_like(gs, dtype=torch.bool)
        keep.scatter_(1, gs.sort(dim=-1, descending=True).indices[:, :kg], True)
        c = torch.where(keep.repeat_interleave(E // G, dim=1), c, torch.full_like(c, float("-inf")))
        idx = c.sort(dim=-1, descending=True).indices[:, :K]
        w = s.gather(1, idx)
        norm = (K > 1) if family == "bailing_moe_v2" else cfg.norm_topk_prob
        if norm:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return idx, w * cfg.routed_scaling_factor
    p = torch.softmax((x @ block.gate.weight.t()).float(), -1)  # fp32 softmax, whatever the input dtype
    idx = p.sort(dim=-1, descending=True).indices[:, :K]
    w = p.gather(1, idx)
    if family == "mixtral" or cfg.norm_topk_prob:
        w = w / w.sum(-1, keepdim=True)
    return idx, w


def reference(block, family, x, cfg):
    flat = x.reshape(-1, x.shape[-1])
    idx, w = route(block, family, flat, cfg)
    every = torch.stack([swiglu(flat, *gud) for gud in expert_weights(block)])  # [E, T, H]
    picked = every[idx, torch.arange(flat.shape[0])[:, None]]  # [T, K, H]
    y = (picked * w.to(picked.dtype)[..., None]).sum(1)
    if hasattr(block, "shared_experts"):
        m = block.shared_experts
        y = y + swiglu(flat, m.gate_proj.weight, m.up_proj.weight, m.down_proj.weight)
    if hasattr(block, "shared_expert"):
        m = block.shared_expert
        y = y + torch.sigmoid(block.shared_expert_gate(flat)) * swiglu(flat, m.gate_proj.weight, m.up_proj.weight,
                                                                        m.down_proj.weight)
    return y.view(x.shape), idx


def build(fid, dtype):
    family, case = FAMILIES[fid]
    module = lib.load_fixture(case["fixture"], "fixtures_selftest_%s" % fid.replace("-", "_"))
    cfg = module.tiny_config(**case.get("config", {}))
    torch.manual_seed(0)
    block = getattr(module, module.BLOCK_CLASS)(cfg)
    probe_block.init_tensors(block, cfg.hidden_size, 0)
    block.train(True)
    return family, cfg, block.to(dtype)


def first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("fid", sorted(FAMILIES))
def test_fixture_matches_the_vectorised_reference_in_float64(fid):
    family, cfg, block = build(fid, torch.float64)
    x = torch.randn(2, 6, cfg.hidden_size, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y = first(block(xa))
    dy = torch.randn(y.shape, dtype=torch.float64)
    (y * dy).sum().backward()
    params = [p for p in block.parameters() if p.requires_grad]
    got = [xa.grad] + [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in params]
    block.zero_grad()
    y_ref, _ = reference(block, family, xb, cfg)
    (y_ref * dy).sum().backward()
    want = [xb.grad] + [p.grad for p in params]
    # the routers work in fp32 (as upstream), and the order of the K slots may differ (sorted=False):
    # agreement is to fp32 rounding of the routing weights, far below any real slip
    assert lib.rel_err(y, y_ref) < 1e-6
    for g, r in zip(got, want):
        assert lib.rel_err(g, r) < 1e-6


@pytest.mark.parametrize("fid", sorted(FAMILIES))
def test_fixture_float32_agrees_with_float64(fid):
    _, cfg, b32 = build(fid, torch.float32)
    _, _, b64 = build(fid, torch.float64)
    x = torch.randn(2, 6, cfg.hidden_size, generator=torch.Generator().manual_seed(2))
    assert lib.rel_err(first(b32(x)), first(b64(x.double()))) < lib.tol("MOE_TOL_F32")


def test_bailing_returns_logits_and_topk_idx_shaped_per_token():
    family, cfg, block = build("bailing_moe_v2", torch.float32)
    y, (logits, idx) = block(torch.randn(2, 5, cfg.hidden_size))
    assert y.shape == (2, 5, 16) and logits.shape == (2, 5, 8) and idx.shape == (2, 5, 2)
    assert logits.dtype == torch.float32


def test_bailing_inference_path_equals_training_path():
    _, cfg, block = build("bailing_moe_v2", torch.float64)
    x = torch.randn(2, 6, cfg.hidden_size, dtype=torch.float64)
    y_train = block(x)[0]
    block.eval()
    # moe_infer multiplies in the weights' dtype (fp32), the training path in the input's (fp64)
    assert lib.rel_err(block(x)[0], y_train) < 1e-6


def test_bailing_expert_bias_variants_are_buffer_and_frozen_parameter():
    m = lib.load_fixture("bailing/modeling_bailing_moe_v2.py", "fixtures_selftest_bailing_variants")
    as_buffer = m.BailingMoeV2Gate(m.tiny_config())
    as_param = m.BailingMoeV2Gate(m.tiny_config(expert_bias_as_parameter=True))
    assert "expert_bias" in dict(as_buffer.named_buffers())
    assert isinstance(as_param.expert_bias, torch.nn.Parameter) and not as_param.expert_bias.requires_grad


def test_selection_bias_changes_the_choice_but_not_the_weights_formula():
    family, cfg, block = build("deepseek_v3-tf5", torch.float64)
    x = torch.randn(12, cfg.hidden_size, dtype=torch.float64)
    idx0, _ = route(block, family, x, cfg)
    with torch.no_grad():
        block.gate.e_score_correction_bias[0] = 5.0
    idx1, w1 = route(block, family, x, cfg)
    assert (idx1 == 0).any(dim=1).all() and not (idx0 == 0).any(dim=1).all()
    s = torch.sigmoid(x.float() @ block.gate.weight.float().t()).gather(1, idx1)
    assert torch.allclose(w1, s / (s.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor)
