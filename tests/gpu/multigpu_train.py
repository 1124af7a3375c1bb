"""Multi-GPU check (issue 5): a small Ring-style (Bailing V2) causal LM, loaded the way
`trust_remote_code` loads it, trained under LD_PRELOAD with torchrun on 1 or N GPUs.

    torchrun --nproc_per_node 2 tests/gpu/multigpu_train.py --mode ddp  --out ddp.json
    torchrun --nproc_per_node 2 tests/gpu/multigpu_train.py --mode fsdp --out fsdp.json
    torchrun --nproc_per_node 1 tests/gpu/multigpu_train.py --mode single --out single.json

Every rank sees the same global batch split in equal shards, so the DDP/FSDP loss equals the
single-GPU loss on the whole batch up to reduction order. Rank 0 writes the loss curve, the number of
patched blocks per rank, and whether every rank's blocks stayed on the fused path.
"""

import argparse
import importlib.util
import json
import os
import sys

import torch
import torch.distributed as dist

FIX = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures", "bailing")


def load_remote_code():
    module = None
    for name in ("configuration_bailing_moe_v2", "modeling_bailing_moe_v2"):
        full = "transformers_modules.multi_gpu.0abc." + name
        spec = importlib.util.spec_from_file_location(full, os.path.join(FIX, name + ".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        spec.loader.exec_module(module)
    return module


def blocks_of(model):
    return [m for m in model.modules() if "_moepatch" in m.__dict__]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("single", "ddp", "fsdp"), required=True)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    dev = torch.device("cuda", rank)
    mod = load_remote_code()
    torch.manual_seed(0)
    cfg = mod.tiny_config(vocab_size=128, hidden_size=128, moe_intermediate_size=64, num_experts=16,
                          num_experts_per_tok=4, n_group=4, topk_group=2, num_hidden_layers=2)
    model = mod.BailingMoeV2ForCausalLM(cfg).to(dev)
    patched = len(blocks_of(model))
    if args.mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[rank])
    elif args.mode == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    batch, seq = 8, 64
    losses = []
    for _ in range(args.steps):
        starts = torch.randint(0, cfg.vocab_size, (batch, 1), generator=gen)
        ids = (starts + torch.arange(seq)) % cfg.vocab_size
        shard = ids.chunk(world)[rank].to(dev)
        loss, _, _ = model(shard, labels=shard)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
    inner = model.module if args.mode == "ddp" else model
    fused = [b._moepatch.disabled is None and b._moepatch.calls > 0 for b in blocks_of(inner)]
    info = torch.tensor([patched, int(all(fused) and len(fused) == patched)], device=dev)
    gathered = [torch.zeros_like(info) for _ in range(world)]
    dist.all_gather(gathered, info)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"mode": args.mode, "world": world, "losses": losses,
                       "patched_per_rank": [int(g[0]) for g in gathered],
                       "fused_per_rank": [bool(g[1]) for g in gathered]}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
