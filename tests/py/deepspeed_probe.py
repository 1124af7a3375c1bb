"""Probe for test_deepspeed.py, run in a subprocess (LD_PRELOAD or not, as the test sets it):

    python3 deepspeed_probe.py MODE OUT.pt      MODE: zero3_init | zero3_engine | zero2

One CPU process, gloo. Builds the Bailing fixture block (the Ring architecture: an nn.ModuleList of
experts, a shared expert), under deepspeed.zero.Init for zero3_init (partitioned while it is built, as
HF's from_pretrained does under ZeRO-3) or plainly for the others (zero3_engine: partitioned afterwards
by deepspeed.initialize), runs three training steps of DeepSpeed's engine (SGD) on fixed random inputs
and saves the losses and the final block output to OUT.pt. Whether it ran fused is in the log lines.
"""

import importlib.util
import os
import socket
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE = os.path.join(HERE, "..", "fixtures", "bailing", "modeling_bailing_moe_v2.py")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    mode, out = sys.argv[1], sys.argv[2]
    for k, v in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0",
                 "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        os.environ.setdefault(k, v)
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    spec = importlib.util.spec_from_file_location("modeling_bailing_moe_v2", FIXTURE)
    m = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = m
    spec.loader.exec_module(m)
    stage = 2 if mode == "zero2" else 3
    ds_cfg = {"train_micro_batch_size_per_gpu": 1, "zero_allow_untested_optimizer": True,
              "zero_optimization": {"stage": stage}, "optimizer": {"type": "SGD", "params": {"lr": 0.05}}}
    torch.manual_seed(0)
    cfg = m.tiny_config()
    if mode == "zero3_init":
        with deepspeed.zero.Init(config_dict_or_path=ds_cfg):
            block = m.BailingMoeV2SparseMoeBlock(cfg)
    else:
        block = m.BailingMoeV2SparseMoeBlock(cfg)
    engine, *_ = deepspeed.initialize(model=block, config=ds_cfg, model_parameters=block.parameters())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, 6, cfg.hidden_size, generator=g) for _ in range(3)]
    target = torch.randn(2, 6, cfg.hidden_size, generator=g)
    losses = []
    for x in xs:
        y = engine(x)[0]
        loss = ((y - target) ** 2).mean()
        engine.backward(loss)
        engine.step()
        losses.append(loss.item())
    with torch.no_grad():
        final = engine(xs[0])[0]
    torch.save({"losses": losses, "final": final.detach().clone()}, out)
    print("losses", losses, flush=True)


if __name__ == "__main__":
    main()
