"""A/B demo: a small Ring-style (Bailing MoE V2) model trains a few steps with MOEPATCH=0 and with the
patch, same seed, and the two loss curves are printed side by side.

    make demo                        # or: python3 examples/demo.py --lib $PWD/build/libmoepatch.so

The model file is loaded exactly the way transformers 5 loads `trust_remote_code` models
(spec_from_file_location + exec_module under a `transformers_modules.*` name), so the demo exercises
the same path a real Ring/Ling checkpoint takes. Runs on the GPU when there is one, else the CPU.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
MODEL_DIR = os.path.join(HERE, "..", "tests", "fixtures", "bailing")


def load_remote_code():
    """Load the model file as transformers does for trust_remote_code."""
    for name in ("configuration_bailing_moe_v2", "modeling_bailing_moe_v2"):
        full = "transformers_modules.demo_org.tiny_ring.0123abcd." + name
        spec = importlib.util.spec_from_file_location(full, os.path.join(MODEL_DIR, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return module


def child(args):
    import torch

    modeling = load_remote_code()
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = modeling.tiny_config(vocab_size=64, hidden_size=64, moe_intermediate_size=32, num_experts=16,
                               num_experts_per_tok=4, n_group=4, topk_group=2, num_hidden_layers=2)
    model = modeling.BailingMoeV2ForCausalLM(cfg).to(device)
    model.train()
    patched = sum(1 for m in model.modules() if getattr(m, "_moepatch", None) is not None)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(1)
    # A learnable synthetic language: each sequence counts up from a random start.
    starts = torch.randint(0, cfg.vocab_size, (args.batch, 1), generator=gen)
    ids = ((starts + torch.arange(args.seq)) % cfg.vocab_size).to(device)
    losses, t0 = [], time.perf_counter()
    for _ in range(args.steps):
        loss, _, _ = model(ids, labels=ids)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    elapsed = time.perf_counter() - t0
    print(json.dumps({"losses": losses, "seconds": elapsed, "patched_blocks": patched,
                      "tokens_per_s": args.steps * args.batch * args.seq / elapsed}))


def run(lib, enabled, args):
    env = dict(os.environ, LD_PRELOAD=lib, MOEPATCH="1" if enabled else "0")
    cmd = [sys.executable, os.path.abspath(__file__), "--child", "--steps", str(args.steps),
           "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True)
    sys.stderr.write(out.stderr)
    if out.returncode != 0:
        sys.exit("demo child failed (MOEPATCH=%d)" % enabled)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lib", default=os.path.join(HERE, "..", "build", "libmoepatch.so"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    lib = os.path.abspath(args.lib)
    off, on = run(lib, False, args), run(lib, True, args)
    print("step  loss MOEPATCH=0  loss patched")
    for i, (a, b) in enumerate(zip(off["losses"], on["losses"])):
        print("%4d  %14.6f  %12.6f" % (i, a, b))
    worst = max(abs(a - b) / abs(a) for a, b in zip(off["losses"], on["losses"]))
    print("patched blocks: %d (MOEPATCH=0: %d)" % (on["patched_blocks"], off["patched_blocks"]))
    print("tokens/s: %.0f unpatched, %.0f patched (%.2fx); worst relative loss difference %.2e"
          % (off["tokens_per_s"], on["tokens_per_s"], on["tokens_per_s"] / off["tokens_per_s"], worst))
    if on["patched_blocks"] == 0 or off["patched_blocks"] != 0 or worst > 1e-3:
        sys.exit("demo: unexpected result")


if __name__ == "__main__":
    main()
