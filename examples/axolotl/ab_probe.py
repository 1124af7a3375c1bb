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
        with open(self.path, "w"):
            pass

    def _write(self, rec):
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")

    @staticmethod
    def _cuda():
        import torch
        return torch if torch.cuda.is_available() else None

    def on_step_begin(self, args, state, control, **kwargs):
        self.t_begin = time.perf_counter()

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
    def add_callbacks_post_trainer(self, cfg, trainer):
        path = os.environ.get("MOEPATCH_AB_JSONL")
        if not path or int(os.environ.get("LOCAL_RANK", "0")) != 0:
            return []
        return [_ABProbeCallback(path)]
