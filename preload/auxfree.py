"""libmoepatch aux-loss-free load balancing and expert-load telemetry (MOEPATCH_AUXFREE,
MOEPATCH_TELEMETRY): compiled by the glue only when one of them is set.

Each patched block gets a per-expert selection bias: the fused routing picks the top-K of
(scores + bias) while the mixture weights stay unbiased (kernels/moe.h, both recipes). A block
with a native bias (Bailing `expert_bias`, DeepSeek-V3 `e_score_correction_bias` on the router;
HY-V3, MiniMax-M2 `e_score_correction_bias` on the block) has that tensor updated in place; any
other block gets a buffer `moepatch_expert_bias` [E], so the bias lands in state_dict and
checkpoints either way. The fused forward writes per-expert slot counts; they are
summed on the device over the micro-batches of one optimizer step, summed over the
torch.distributed sync group, and after every optimizer step:
    ema  = m * ema + (1 - m) * load          (the first step: ema = load), load = counts / sum
    bias = clamp(centre(bias + rate * (1/E - ema)), -cap, cap)
Only blocks that ran a counted forward (training mode, grad enabled) since the previous step
change; the first WARMUP steps measure the loads but leave the bias alone.

Design choice: every per-step computation stays on the device (torch.where instead of Python
branches on tensor values), so training never waits for the GPU here; the host reads values only
for a telemetry record, every MOEPATCH_TELEMETRY_EVERY steps.
"""

import atexit
import json
import math
import os
import struct
import sys
import types
import weakref
import zlib

BUFFER = "moepatch_expert_bias"


class _Track:
    """The balancer's state for one patched block."""

    def __init__(self, index, block, spec):
        self.index = index
        self.kind = type(block).__name__
        self.ref = weakref.ref(block)
        self.E = spec["E"]
        self.router = spec["router"]
        self.native = spec["bias"]  # the native bias attribute, "" when the family has none
        self.on_block = bool(spec.get("bias_on_block"))  # ... of the block, else of the router
        self.acc = None  # int64 [E]: slots per expert since the last optimizer step
        self.ema = None  # float32 [E]
        self.seen = None  # bool []: ema holds a measurement

    def bias(self, block):
        """The block's selection bias tensor (native or ours), or None."""
        if self.native:
            owner = block if self.on_block else getattr(block, self.router)
            return getattr(owner, self.native, None)
        return block._buffers.get(BUFFER)


class Balancer:
    def __init__(self, opts, log, log_once):
        self.torch = sys.modules["torch"]
        self.log, self.log_once = log, log_once
        self.auxfree = bool(opts.get("auxfree"))
        self.rate = float(opts.get("auxfree_rate", 0.01))
        self.momentum = float(opts.get("auxfree_momentum", 0.9))
        self.cap = float(opts.get("auxfree_cap", 2.0))
        self.warmup = int(opts.get("auxfree_warmup", 0))
        self.sync = int(opts.get("auxfree_sync", 0))
        self.path = opts.get("telemetry", "")
        self.every = int(opts.get("telemetry_every", 10))
        self.tracks = []
        self.step = 0
        self.dirty = False  # a counted forward ran since the last optimizer step
        self.group = None  # (torch.distributed group,) once chosen
        self.aux_noted = False
        self.started = False  # the telemetry file was truncated by this process
        self.failed = None
        self.owner = os.getpid()
        self._install_step_hook()
        if self.path:
            atexit.register(self._at_exit)

    # ------------------------------------------------------------ hooks the glue calls

    def attach(self, block, spec):
        """A block was patched: track it; give it our bias buffer when it has no native one."""
        if "_moepatch_auxfree" in block.__dict__:
            return
        tr = _Track(len(self.tracks), block, spec)
        block.__dict__["_moepatch_auxfree"] = tr
        self.tracks.append(tr)
        if self.auxfree and not tr.native and BUFFER not in block._buffers:
            block.register_buffer(BUFFER, self.torch.zeros(tr.E, dtype=self.torch.float32))
            block._register_load_state_dict_pre_hook(_keep_missing_bias, with_module=True)

    def note_config(self, module):
        """Any constructed module: say once what happens to the model's own auxiliary loss."""
        if not self.auxfree or self.aux_noted or not self.tracks:
            return
        cfg = module.__dict__.get("config")
        coef = getattr(cfg, "router_aux_loss_coef", None)
        out = getattr(cfg, "output_router_logits", None)
        if coef is None and out is None:
            return
        self.aux_noted = True
        if out and coef:
            self.log(0, "aux-free balancing is on and the model's own auxiliary load-balancing loss "
                     "is on too (output_router_logits=True, router_aux_loss_coef=%g): libmoepatch "
                     "leaves that loss as it is (it still adds to the loss; nothing is counted "
                     "twice); set output_router_logits=False to balance with the bias alone" % coef)
        else:
            self.log(1, "aux-free balancing is on; the model's auxiliary load-balancing loss is off "
                     "(output_router_logits=%s, router_aux_loss_coef=%s)" % (out, coef))

    def selection_bias(self, block, x, bias):
        """The bias the fused routing selects with: the native one, else our buffer."""
        if bias is not None or not self.auxfree:
            return bias
        tr = block.__dict__.get("_moepatch_auxfree")
        b = block._buffers.get(BUFFER) if tr is not None else None
        if b is None:
            return None
        if b.is_meta:  # built under a meta-device context and never loaded: start from zero
            b = self.torch.zeros(tr.E, dtype=self.torch.float32, device=x.device)
            block._buffers[BUFFER] = b
        return b.detach().to(x.device, self.torch.float32).contiguous()

    def counts_for(self, block, x):
        """A fresh counts tensor for a forward that counts (training, grad enabled), else None."""
        torch = self.torch
        if self.failed or not block.training or not torch.is_grad_enabled():
            return None
        task = getattr(torch._C, "_current_graph_task_id", None)
        if task is not None and task() != -1:  # activation-checkpoint recompute inside backward
            return None
        tr = block.__dict__.get("_moepatch_auxfree")
        if tr is None:
            return None
        return torch.zeros(tr.E, dtype=torch.int64, device=x.device)

    def observe(self, block, counts):
        """Add one forward's counts to the block's accumulator (on the device, no host sync)."""
        tr = block.__dict__["_moepatch_auxfree"]
        if tr.acc is None or tr.acc.device != counts.device:
            tr.acc = counts
        else:
            tr.acc.add_(counts)
        self.dirty = True

    # ------------------------------------------------------------ after each optimizer step

    def _install_step_hook(self):
        optim = self.torch.optim
        register = getattr(sys.modules.get("torch.optim.optimizer"),
                           "register_optimizer_step_post_hook", None)
        if register is not None:  # torch >= 2.0: one global hook
            register(lambda optimizer, args, kwargs: self.on_step())
            return
        # older torch: each optimizer instance gets a step that calls the original, then ours
        # (a bound method, so LR schedulers can still wrap it)
        init = optim.Optimizer.__init__
        if getattr(init, "__moepatch_wrapped__", False):
            return
        balancer = self

        def step(opt, *args, **kwargs):
            out = type(opt).step(opt, *args, **kwargs)
            balancer.on_step()
            return out

        def __init__(opt, *args, **kwargs):
            init(opt, *args, **kwargs)
            if "step" not in opt.__dict__:
                opt.step = types.MethodType(step, opt)

        __init__.__moepatch_wrapped__ = True
        __init__.__wrapped__ = init
        optim.Optimizer.__init__ = __init__

    def on_step(self):
        if self.failed:
            return
        try:
            self._step()
        except Exception as e:  # never break the training loop
            self.failed = repr(e)
            self.log(0, "aux-free balancing / telemetry stopped after an error: %s" % self.failed)

    def _dist(self):
        """(torch.distributed, group) while a process group is initialised, else None."""
        d = getattr(self.torch, "distributed", None)
        if d is None or not d.is_available() or not d.is_initialized():
            return None
        if self.group is None:
            world, rank, g = d.get_world_size(), d.get_rank(), self.sync
            mine = None
            if 0 < g < world and world % g:
                self.log(0, "MOEPATCH_AUXFREE_SYNC=%d does not divide the world size %d; loads are "
                         "summed over the world" % (g, world))
            elif 0 < g < world:
                for first in range(0, world, g):  # every rank creates every group, in order
                    grp = d.new_group(list(range(first, first + g)))
                    if first <= rank < first + g:
                        mine = grp
            self.group = (mine,)
        return d, self.group[0]

    def _step(self):
        torch = self.torch
        dist = self._dist()
        if not self.dirty and dist is None:
            return
        self.dirty = False
        self.step += 1
        live = [(tr, tr.ref()) for tr in self.tracks]
        live = [(tr, b) for tr, b in live if b is not None]
        if not live:
            return
        dev = next((tr.acc.device for tr, _ in live if tr.acc is not None), None)
        if dev is None:
            if dist is None:
                return
            nccl = dist[0].get_backend(dist[1]) == "nccl"
            dev = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")
        flat = torch.cat([tr.acc.to(dev) if tr.acc is not None
                          else torch.zeros(tr.E, dtype=torch.int64, device=dev) for tr, _ in live])
        for tr, _ in live:
            tr.acc = None
        if dist is not None:
            dist[0].all_reduce(flat, group=dist[1])
        update = self.auxfree and self.step > self.warmup
        off = 0
        with torch.no_grad():
            for tr, block in live:
                self._update(tr, block, flat[off:off + tr.E], update)
                off += tr.E
        if self.path and self.step % self.every == 0 and (dist is None or dist[0].get_rank() == 0):
            self._record(live)

    def _update(self, tr, block, counts, update):
        torch = self.torch
        dev = counts.device
        total = counts.sum()
        ran = total > 0
        load = counts.float() / total.clamp_min(1).float()
        if tr.ema is None:
            tr.ema = torch.zeros(tr.E, dtype=torch.float32, device=dev)
            tr.seen = torch.zeros((), dtype=torch.bool, device=dev)
        elif tr.ema.device != dev:
            tr.ema, tr.seen = tr.ema.to(dev), tr.seen.to(dev)
        m = self.momentum
        ema = torch.where(tr.seen, tr.ema * m + load * (1.0 - m), load)
        tr.ema = torch.where(ran, ema, tr.ema)
        tr.seen = tr.seen | ran
        if not update:
            return
        b = tr.bias(block)
        if b is None or b.is_meta:
            return
        old = b.detach().to(dev, torch.float32)
        new = old + self.rate * (1.0 / tr.E - tr.ema)
        new = (new - new.mean()).clamp(-self.cap, self.cap)
        b.copy_(torch.where(ran, new, old).to(b.device, b.dtype))

    # ------------------------------------------------------------ telemetry

    def _record(self, live):
        lines = []
        for tr, block in live:
            if tr.ema is None:
                continue
            b = tr.bias(block)
            bias = b.detach().float().tolist() if b is not None and not b.is_meta else [0.0] * tr.E
            lines.append(json.dumps({"step": self.step, "layer": tr.index, "block": tr.kind,
                                     "load": tr.ema.tolist(), "bias": bias}))
        if not lines:
            return
        with open(self.path, "a" if self.started else "w") as f:
            f.write("\n".join(lines) + "\n")
        self.started = True

    def _at_exit(self):
        """The heatmap of the last load EMA of every layer, next to the jsonl. Forked children
        (os._exit) never get here; other processes that did not start the balancer skip."""
        if os.getpid() != self.owner or not self.started:
            return
        try:
            rows = [(tr.E, tr.ema.tolist()) for tr in self.tracks if tr.ema is not None]
            if rows:
                write_heatmap(self.path + ".png", rows)
        except Exception as e:
            self.log(0, "telemetry heatmap not written: %r" % (e,))


def _keep_missing_bias(module, state_dict, prefix, *args):
    """Load-state-dict pre-hook of blocks with our buffer: a checkpoint saved without it (plain
    pretrained weights) keeps the current bias instead of failing a strict load."""
    b = module._buffers.get(BUFFER)
    if prefix + BUFFER not in state_dict and b is not None and not b.is_meta:
        state_dict[prefix + BUFFER] = b


# ---------------------------------------------------------------- PNG heatmap (zlib + struct)

def _colour(v):
    """Load relative to uniform (1 = balanced) -> RGB: blue under, white balanced, red over
    (log2 scale, saturating at 4x either way)."""
    t = max(-1.0, min(1.0, math.log2(v) / 2.0)) if v > 0 else -1.0
    fade = int(round(255 * (1.0 - abs(t))))
    return (255, fade, fade) if t > 0 else (fade, fade, 255)


def write_heatmap(path, rows, cell=None):
    """rows: [(E, [load fraction per expert])], one per layer, top to bottom."""
    width_e = max(e for e, _ in rows)
    cell = cell or max(2, min(24, 1024 // width_e))
    pixel_rows = []
    for E, loads in rows:
        line = bytearray()
        for j in range(width_e):
            rgb = _colour(loads[j] * E) if j < E else (128, 128, 128)
            line += bytes(rgb) * cell
        pixel_rows += [b"\x00" + bytes(line)] * cell
    w, h = width_e * cell, len(rows) * cell

    def chunk(tag, data):
        return (struct.pack(">I", len(data)) + tag + data
                + struct.pack(">I", zlib.crc32(tag + data) & 0xffffffff))

    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(b"".join(pixel_rows), 9)) + chunk(b"IEND", b""))
    with open(path, "wb") as f:
        f.write(png)
