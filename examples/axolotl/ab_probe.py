"""An axolotl plugin (config key `plugins: [ab_probe.ABProbePlugin]`, this folder on PYTHONPATH) that
records, for ab.sh, what the console log rounds away. It changes nothing in training: it only adds one
read-only TrainerCallback that appends JSON lines to $MOEPATCH_AB_JSONL (no file: no records):

  {"kind": "step", "step": N, "t_begin": ..., "t_end": ..., "max_allocated": bytes, "max_reserved": bytes}
      t_* are time.perf_counter() at on_step_begin / on_step_end; on_step_end first waits for the GPU
      (torch.cuda.synchronize) so that t_end is when the step's kernels are done. max_* are
      torch.cuda.max_memory_allocated / max_memory_reserved at the end of the step. axolotl's own log()
      resets the peak counters after every log, so each value is the peak since the previous step's log
      (the first one includes model loading); their maximum over the run is the run's peak.
  {"kind": "log", "step": N, "logs": {...}}   the Trainer's log dict at full precision (loss, grad_norm,
      axolotl's tokens/trainable and tokens/total counters, ...)
  {"kind": "end", "step": N, "t": ...}         on_train_end
  {"kind": "init", "trainable": N, "sha256": hex}  on_train_begin: a digest of the trainable parameters
      as training starts (LoRA: the adapter weights just created), so that ab_report.py can tell
      whether A and B started from the same point

The one thing it changes: before the model is loaded it seeds torch/numpy/random with the config's
`seed` (pre_model_load). axolotl 0.19 seeds only when the Trainer is built, after PEFT has created the
adapters, and torch's default generator starts from a non-deterministic seed, so without this the
LoRA A matrices (kaiming-uniform) differ from run to run and an A/B of a LoRA config compares two
different initialisations (measured on CPU: up to 2e-4 relative loss difference between two
MOEPATCH=0 runs after 4 steps). Both sides are seeded identically, so the comparison stays fair.

With MOEPATCH_AB_CAST_BACK=1 (ab.sh: CAST_BACK=1) it also does, after the model is loaded
(post_model_load), what axolotl itself does for flash-attention configs: modules with "norm" in their
name and the embedding / lm_head modules go back to the model's dtype. With eager or sdpa attention
axolotl leaves them in fp32 for full fine-tuning, so the residual stream, and every MoE block's input,
is fp32 next to bf16 weights under bf16 autocast, and the per-expert loop of Ring / DeepSeek remote code
then fails ("Index put requires the source and destination dtypes match": it writes bf16 expert outputs
into an empty_like(fp32 input) buffer). Both sides get the same cast, so it is an A/B of the
flash-attention dtype layout, the one most Ring users train with.

With MOEPATCH_AB_PROFILE=N it also profiles the host side of one whole optimizer step (from the
beginning of step N+1 to the beginning of step N+2: forward, backward, clipping, optimizer, the
Trainer's own bookkeeping and logging) with cProfile and writes the 40 functions with the most own time
to $MOEPATCH_AB_JSONL.prof.txt: where a step's time goes when it is bound by the host.

ab.sh adds this plugin to a copy of the config it runs; the example configs themselves do not need it.
"""

import json
import os
import time

from transformers import TrainerCallback

from axolotl.integrations.base import BasePlugin


class _ABProbeCallback(TrainerCallback):
    def __init__(self, path):
        self.path = path
        self.t_begin = None
        self.profile_at = int(os.environ.get("MOEPATCH_AB_PROFILE", "0") or 0)
        with open(self.path, "w"):
            pass

    def _write(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    @staticmethod
    def _cuda():
        import torch
        return torch if torch.cuda.is_available() else None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero:
            return
        # cheap even for full fine-tuning: per tensor its fp64 sum (no copy) and its first 64 values
        import hashlib
        import torch
        h, n = hashlib.sha256(), 0
        for name, p in model.named_parameters():
            if p.requires_grad:
                t = p.detach()
                t = t.to_local() if hasattr(t, "to_local") else t  # FSDP2 DTensor: this rank's shard
                n += 1
                h.update(name.encode())
                h.update(repr(t.sum(dtype=torch.float64).item()).encode())
                h.update(t.reshape(-1)[:64].float().cpu().numpy().tobytes())
        self._write({"kind": "init", "trainable": n, "sha256": h.hexdigest()})

    def on_step_begin(self, args, state, control, **kwargs):
        self._profile(state.global_step)
        self.t_begin = time.perf_counter()

    def _profile(self, step):
        at = self.profile_at
        if not at or step not in (at, at + 1):
            return
        import cProfile
        import pstats
        if step == at:
            self.prof = cProfile.Profile()
            self.prof.enable()
            return
        self.prof.disable()
        with open(self.path + ".prof.txt", "w") as f:
            pstats.Stats(self.prof, stream=f).sort_stats("tottime").print_stats(40)
            pstats.Stats(self.prof, stream=f).sort_stats("cumulative").print_stats(40)

    def on_step_end(self, args, state, control, **kwargs):
        torch = self._cuda()
        rec = {"kind": "step", "step": state.global_step, "t_begin": self.t_begin}
        if torch is not None:
            torch.cuda.synchronize()
            rec["max_allocated"] = torch.cuda.max_memory_allocated()
            rec["max_reserved"] = torch.cuda.max_memory_reserved()
        rec["t_end"] = time.perf_counter()
        self._write(rec)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            clean = {k: v for k, v in logs.items() if isinstance(v, (int, float, str, bool))}
            self._write({"kind": "log", "step": state.global_step, "logs": clean})

    def on_train_end(self, args, state, control, **kwargs):
        self._write({"kind": "end", "step": state.global_step, "t": time.perf_counter()})


class ABProbePlugin(BasePlugin):
    def pre_model_load(self, cfg):
        if cfg.seed is not None:
            from transformers import set_seed
            set_seed(int(cfg.seed))

    def post_model_load(self, cfg, model):
        if os.environ.get("MOEPATCH_AB_CAST_BACK") != "1":
            return
        dtype = cfg.torch_dtype
        embeddings = ("embed_tokens", "word_embeddings", "lm_head")
        n = 0
        for name, module in model.named_modules():
            if "norm" in name or (any(e in name for e in embeddings) and hasattr(module, "weight")):
                module.to(dtype)
                n += 1
        print("ab_probe: MOEPATCH_AB_CAST_BACK=1: %d norm / embedding modules cast to %s" % (n, dtype),
              flush=True)

    def add_callbacks_post_trainer(self, cfg, trainer):
        path = os.environ.get("MOEPATCH_AB_JSONL")
        if not path or int(os.environ.get("LOCAL_RANK", "0")) != 0:
            return []
        return [_ABProbeCallback(path)]
