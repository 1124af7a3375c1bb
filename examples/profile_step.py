"""Where a training step's GPU time goes: loads a causal LM folder (make_models.py output, or any local
model), runs a few full steps (forward, backward, fused AdamW step) on random tokens in bf16, prints the
median step time and the top CUDA kernels / ops by time of one profiled step.

    LD_PRELOAD=build/libmoepatch.so python3 examples/profile_step.py /tmp/moe_models/ring_mini_arch \
        [--batch 2 --seq 2048 --steps 6 --top 25 --trace out.json]

Run it with MOEPATCH=0 for the other side. No autocast: the model runs in its own dtype (bf16), as a
flash-attention axolotl config trains it.
"""

import argparse
import sys
import time

import torch
from transformers import AutoModelForCausalLM


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--trace", help="write a chrome trace of the profiled step here")
    p.add_argument("--no-profile", action="store_true", help="only the step times")
    p.add_argument("--cprofile", action="store_true",
                   help="also the host side of one step by Python function (cProfile): the glue, the C "
                        "calls (_moepatch.run), autograd and the optimizer, each with its own time")
    p.add_argument("--gemm", choices=("auto", "cublas", "sm90", "sm90-ws"), default="auto",
                   help="the routed experts' GEMMs, as MOEPATCH_GEMM (default: the library's choice)")
    a = p.parse_args()
    mp = sys.modules.get("_moepatch")  # the glue, when libmoepatch is preloaded
    if a.gemm != "auto":
        if mp is None:
            p.error("--gemm needs libmoepatch preloaded")
        mp.set_engine({"cublas": 0, "sm90": 1, "sm90-ws": 2}[a.gemm])

    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.bfloat16, trust_remote_code=True).cuda()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    g = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (a.batch, a.seq), device="cuda", generator=g)

    def step():
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for _ in range(a.steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    print("step time median %.4f s (min %.4f, %d steps, %d tokens/step)%s"
          % (times[len(times) // 2], times[0], a.steps, a.batch * a.seq, ", gemm " + a.gemm))
    print("peak allocated %.2f GiB" % (torch.cuda.max_memory_allocated() / 2**30), flush=True)
    if a.no_profile:
        return

    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.top, max_name_column_width=70))
    print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=70))
    if a.trace:
        prof.export_chrome_trace(a.trace)
    if a.cprofile:
        import cProfile
        import pstats
        torch.cuda.synchronize()
        cp = cProfile.Profile()
        cp.enable()
        step()
        torch.cuda.synchronize()
        cp.disable()
        pstats.Stats(cp).sort_stats("tottime").print_stats(30)


if __name__ == "__main__":
    main()
