"""Aux-loss-free balancing experiment (CPU): a small MoE language model trained on synthetic, skewed
data, once with MOEPATCH_AUXFREE=0 and once with MOEPATCH_AUXFREE=1, both under LD_PRELOAD.

    python3 tests/bench/auxfree_balance.py [--lib build/libmoepatch.so] [--steps 300] [--rate R]

The model: embedding -> 2 x (RMSNorm -> Qwen3-MoE block of tests/fixtures/tf5, E=8, K=2) with
residuals -> LM head. The data: tokens from a Zipf distribution (a few tokens dominate) and a
next-token rule to learn; the router starts with a shared direction that favours expert 0, so
without balancing a few experts take most tokens. The load is measured independently of the
balancer: the block inputs of the last 50 steps are routed again here (top-K of softmax + the
block's bias, as the fused path selects). Prints, per run: max/mean expert load per layer (1.0 is
perfect balance, E/K = 4 is everything on K experts) and the final loss (mean of the last 20 steps).
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
FIXTURE = os.path.join(ROOT, "tests", "fixtures", "tf5", "modeling_qwen3_moe.py")
V, H, E, K, LAYERS = 64, 32, 8, 2, 2


def child(steps, seed, freeze_router):
    import torch
    from torch import nn

    spec = importlib.util.spec_from_file_location("bench_tf5.modeling_qwen3_moe", FIXTURE)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)  # under LD_PRELOAD its MoE block class is patched from here on

    class Norm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(H))

        def forward(self, x):
            return self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            cfg = mod.tiny_config(hidden_size=H, moe_intermediate_size=32, num_experts=E,
                                  num_experts_per_tok=K)
            self.emb = nn.Embedding(V, H)
            self.norms = nn.ModuleList([Norm() for _ in range(LAYERS)])
            self.moes = nn.ModuleList([mod.Qwen3MoeSparseMoeBlock(cfg) for _ in range(LAYERS)])
            self.head = nn.Linear(H, V, bias=False)

        def forward(self, ids):
            h = self.emb(ids)
            for norm, moe in zip(self.norms, self.moes):
                h = h + moe(norm(h))
            return self.head(h)

    torch.manual_seed(seed)
    model = LM()
    with torch.no_grad():
        for moe in model.moes:
            moe.experts.gate_up_proj.normal_(0, H ** -0.5)
            moe.experts.down_proj.normal_(0, 32 ** -0.5)
            moe.gate.weight.normal_(0, H ** -0.5)
            moe.gate.weight[0] += 0.6  # a direction every normalised token shares -> expert 0
            moe.gate.weight[1] += 0.3
            moe.gate.weight.requires_grad_(not freeze_router)
    patched = all("forward" in m.__dict__ for m in model.moes)
    seen = [[] for _ in range(LAYERS)]
    for i, moe in enumerate(model.moes):
        moe.register_forward_pre_hook(lambda m, inp, i=i: seen[i].append(inp[0].detach().reshape(-1, H)))

    g = torch.Generator().manual_seed(seed + 1)
    zipf = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 1.2
    rule = torch.randperm(V, generator=g)  # next token = rule[token] most of the time
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(steps):
        ids = torch.multinomial(zipf, 16 * 33, replacement=True, generator=g).view(16, 33)
        follow = torch.rand(16, 32, generator=g) < 0.8
        ids[:, 1:] = torch.where(follow, rule[ids[:, :-1]], ids[:, 1:])
        logits = model(ids[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, V), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        for s in seen:
            del s[:-50]
    loads = []
    with torch.no_grad():
        for moe, xs in zip(model.moes, seen):
            x = torch.cat(xs)
            probs = torch.softmax(nn.functional.linear(x, moe.gate.weight).float(), dim=-1)
            bias = moe._buffers.get("moepatch_expert_bias")
            sel = probs + bias if bias is not None else probs
            counts = torch.bincount(torch.topk(sel, K, dim=-1)[1].reshape(-1), minlength=E).double()
            loads.append({"max_over_mean": (counts.max() / counts.mean()).item(),
                          "fractions": [round(v, 4) for v in (counts / counts.sum()).tolist()],
                          "bias": [round(v, 4) for v in bias.tolist()] if bias is not None else None})
    return {"patched": patched, "final_loss": sum(losses[-20:]) / 20, "first_loss": losses[0],
            "loads": loads}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lib", default=os.path.join(ROOT, "build", "libmoepatch.so"))
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rate", help="MOEPATCH_AUXFREE_RATE of the aux-free run (default: the library's)")
    ap.add_argument("--freeze-router", action="store_true",
                    help="control run: router weights fixed, so only the bias moves the choice")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.steps, args.seed, args.freeze_router)))
        return
    results = {}
    for name, auxfree in (("baseline", "0"), ("aux-free", "1")):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MOEPATCH")}
        env.update(LD_PRELOAD=os.path.abspath(args.lib), MOEPATCH_AUXFREE=auxfree, OMP_NUM_THREADS="1")
        if args.rate:
            env["MOEPATCH_AUXFREE_RATE"] = args.rate
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", "--steps",
                              str(args.steps), "--seed", str(args.seed)]
                             + (["--freeze-router"] if args.freeze_router else []),
                             env=env, check=True, stdout=subprocess.PIPE, text=True).stdout
        results[name] = json.loads(out.strip().splitlines()[-1])
    print("steps %d, E=%d, K=%d, %d layers%s; load = max/mean slots per expert over the last 50 steps"
          % (args.steps, E, K, LAYERS, ", router frozen" if args.freeze_router else ""))
    print("%-9s | %-7s | %s | final loss (first)" % ("run", "patched",
                                                     " | ".join("layer %d load" % i for i in range(LAYERS))))
    for name, r in results.items():
        print("%-9s | %-7s | %s | %.4f (%.4f)" % (name, r["patched"],
                                                 " | ".join("%12.3f" % l["max_over_mean"] for l in r["loads"]),
                                                 r["final_loss"], r["first_loss"]))
    for name, r in results.items():
        for i, l in enumerate(r["loads"]):
            print("%s layer %d fractions %s bias %s" % (name, i, l["fractions"], l["bias"]))


if __name__ == "__main__":
    main()
