"""Probe of the aux-free balancing tests (test_auxfree.py), run in a subprocess under LD_PRELOAD:

    python3 auxfree_probe.py '<json case>'

Builds one fixture block (or the tiny Bailing LM) the way probe_block.py does, runs the case's
scenario (a few optimizer steps of a plain training loop, no training-code change) and prints one
JSON object on its last stdout line: what the test asserts on (counts, biases, loads, state_dict
keys). The balancer is reached through the library's own module (_moepatch) only to read its
state or, in the "rule" scenario, to feed it counts chosen by hand.
"""

import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import probe_block  # noqa: E402

BIAS_NAMES = {"bailing_moe_v2": "gate.expert_bias", "deepseek_v3": "gate.e_score_correction_bias"}
LIB_BIAS = "moepatch_expert_bias"


def balancer():
    if "_moepatch" not in sys.modules:  # inert library
        return None
    glue = sys.modules["_moepatch"]._glue
    return glue[0]["_bal"] if glue else None


def build(case):
    module = probe_block.load_module(case)
    cfg = module.tiny_config(**case.get("config", {}))
    torch.manual_seed(case.get("seed", 0))
    cls = getattr(module, module.CAUSAL_LM_CLASS if case.get("kind") == "lm" else module.BLOCK_CLASS)
    model = cls(cfg)
    blocks = probe_block.moe_blocks(model, module.BLOCK_CLASS)
    probe_block.init_tensors(model, cfg.hidden_size, case.get("seed", 0))
    with torch.no_grad():  # start every selection bias at zero: the tests follow it from there
        for name, t in list(model.named_buffers()) + list(model.named_parameters()):
            if name.endswith(probe_block.BIAS_NAMES):
                t.zero_()
    return module, cfg, model, blocks


def first(out):
    return out[0] if isinstance(out, tuple) else out


def bias_of(block):
    for name, t in list(block.named_buffers()) + list(block.named_parameters()):
        if name.endswith(probe_block.BIAS_NAMES + (LIB_BIAS,)):
            return name, t
    return None, None


class _NoTrack:
    acc = ema = None


def track(block):
    return block.__dict__.get("_moepatch_auxfree") or _NoTrack


def batch(cfg, g, shape, skew=0.0):
    x = torch.randn(list(shape) + [cfg.hidden_size], generator=g)
    return x + skew  # a constant offset pushes every token towards the same experts


def train(case):
    """Steps of SGD, `micro` micro-batches each. Records per step, before the optimizer step, the
    library's accumulated slot counts and (Bailing, which returns topk_idx) a bincount of the
    returned indices, and after it every block's bias and load EMA."""
    module, cfg, model, blocks = build(case)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=case.get("lr", 0.05))
    g = torch.Generator().manual_seed(100 + case.get("rank", 0))
    steps, micro = case.get("steps", 3), case.get("micro", 1)
    rec = {"counts": [], "idx_counts": [], "bias": [], "ema": [], "nograd_counted": []}
    for _ in range(steps):
        opt.zero_grad()
        idx_counts = [torch.zeros(cfg.num_experts if hasattr(cfg, "num_experts") else cfg.n_routed_experts,
                                  dtype=torch.int64) for _ in blocks]
        for _ in range(micro):
            if case.get("kind") == "lm":
                ids = torch.randint(0, cfg.vocab_size, case.get("shape", [2, 6]), generator=g)
                model(ids, labels=ids)[0].backward()
                continue
            x = batch(cfg, g, case.get("shape", [2, 6]), case.get("skew", 0.0))
            out = model(x)
            y = first(out)
            if isinstance(out, tuple) and len(out) > 1 and isinstance(out[1], tuple):
                idx_counts[0] += torch.bincount(out[1][1].reshape(-1), minlength=len(idx_counts[0]))
            (y * y).mean().backward()
        if case.get("kind") != "lm":
            before = [track(b).acc.clone() if track(b).acc is not None else None for b in blocks]
            with torch.no_grad():  # not counted
                model(batch(cfg, g, case.get("shape", [2, 6])))
            model.eval()
            model(batch(cfg, g, case.get("shape", [2, 6])))  # eval, grad enabled: not counted either
            model.train()
            after = [track(b).acc for b in blocks]
            rec["nograd_counted"].append(any(a is not None and (b is None or not torch.equal(a, b))
                                             for a, b in zip(after, before)))
        rec["counts"].append([track(b).acc.tolist() if track(b).acc is not None else None for b in blocks])
        rec["idx_counts"].append([c.tolist() for c in idx_counts])
        opt.step()
        rec["bias"].append([bias_of(b)[1].detach().float().tolist() if bias_of(b)[1] is not None else None
                            for b in blocks])
        rec["ema"].append([track(b).ema.tolist() if track(b).ema is not None else None for b in blocks])
    rec["bias_names"] = [bias_of(b)[0] for b in blocks]
    rec["state_dict_keys"] = sorted(k for k in model.state_dict() if k.endswith(
        probe_block.BIAS_NAMES + (LIB_BIAS,)))
    rec["patched"] = [("forward" in b.__dict__) and not getattr(b._moepatch, "disabled", None)
                      for b in blocks]
    return model, blocks, rec


def scenario_train(case):
    model, blocks, rec = train(case)
    if case.get("reload"):  # a strict load of a checkpoint saved without the library buffer
        sd = {k: v for k, v in model.state_dict().items() if not k.endswith(LIB_BIAS)}
        model.load_state_dict(sd, strict=True)
        rec["bias_after_reload"] = [bias_of(b)[1].tolist() for b in blocks]
    return rec


def scenario_rule(case):
    """Counts chosen by hand go straight into the balancer; one optimizer step after each."""
    _, cfg, model, blocks = build(case)
    bal = balancer()
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    rec = {"bias": [], "ema": []}
    for counts in case["counts"]:
        if counts is not None:
            bal.observe(blocks[0], torch.tensor(counts, dtype=torch.int64))
        opt.step()
        t = track(blocks[0])
        rec["bias"].append(bias_of(blocks[0])[1].tolist())
        rec["ema"].append(t.ema.tolist() if t.ema is not None else None)
    return rec


def scenario_select(case):
    """A fixed library bias: the fused routing must choose top-K of (softmax + bias) and weight the
    experts with the unbiased probabilities (checked against the block's own experts module)."""
    _, cfg, model, blocks = build(case)
    block = blocks[0]
    bias = torch.tensor(case["bias"], dtype=torch.float32)
    with torch.no_grad():
        getattr(block, LIB_BIAS).copy_(bias)
    x = batch(cfg, torch.Generator().manual_seed(5), [2, 6])
    model.train()
    y = first(model(x)).detach()
    flat = x.reshape(-1, cfg.hidden_size)
    with torch.no_grad():
        probs = torch.softmax(torch.nn.functional.linear(flat, block.gate.weight).float(), dim=-1)
        idx = torch.topk(probs + bias, cfg.num_experts_per_tok, dim=-1)[1]
        w = probs.gather(1, idx)
        w = w / w.sum(dim=-1, keepdim=True)
        ref = block.experts(flat, idx, w).reshape(y.shape)
    return {"rel_err": ((y - ref).norm() / ref.norm()).item(),
            "counts": track(block).acc.tolist(),
            "ref_counts": torch.bincount(idx.reshape(-1), minlength=cfg.num_experts).tolist(),
            "unbiased_counts": torch.bincount(torch.topk(probs, cfg.num_experts_per_tok, dim=-1)[1].reshape(-1),
                                              minlength=cfg.num_experts).tolist()}


def scenario_build(case):
    _, _, model, blocks = build(case)
    return {"n_blocks": len(blocks), "patched": ["forward" in b.__dict__ for b in blocks]}


def scenario_dist(case):
    torch.distributed.init_process_group("gloo", init_method="file://" + case["init_file"],
                                         rank=case["rank"], world_size=case["world"])
    try:
        return train(case)[2]
    finally:
        torch.distributed.destroy_process_group()


def main():
    case = json.loads(sys.argv[1])
    case.setdefault("out", os.path.join(os.getcwd(), "auxfree_probe.out"))  # remote loads copy beside it
    res = globals()["scenario_" + case.get("scenario", "train")](case)
    res["balancer"] = balancer() is not None
    sys.stdout.write(json.dumps(res) + "\n")


if __name__ == "__main__":
    main()
