"""libmoepatch glue: compiled on the first `modeling_*` module a process executes (the bootstrap
keeps every other Python process at the cost of its small hook). It wraps the constructors of the
module's nn.Module classes, sends each constructed block through detection, and gives accepted blocks
an instance-level forward that runs the fused kernels through one torch.autograd.Function.

Design choice: torch is taken from sys.modules (the modeling module imported it), never imported here.
"""

import itertools
import operator
import sys

_mp = sys.modules["_moepatch"]
_opts = _mp.options
_LEVELS = {"warn": 0, "info": 1, "debug": 2}
_level = _LEVELS.get(_opts.get("log", "warn"), 0)
_allow = {m.strip() for m in _opts.get("models", "").split(",") if m.strip()}
_RECIPES = ("softmax_topk", "sigmoid_group")
_DTYPES = {"torch.float32": 0, "torch.bfloat16": 1, "torch.float16": 2}
# One tolerance table for MOEPATCH_CHECK (fused vs the block's own forward, both rounded to the
# dtype, hence twice the per-side bf16/fp16 tolerance of tests/c/tolerance.h).
_CHECK_TOL = {0: 1e-5, 1: 2e-2, 2: 2e-2}

# a ModuleList's per-expert lookups, as C-level callables (_Plan._modulelist)
_MODULES, _PARAMS = operator.attrgetter("_modules"), operator.attrgetter("_parameters")
_WEIGHT = operator.itemgetter("weight")
_DICT, _DTYPE, _DEVICE = (operator.attrgetter(a) for a in ("__dict__", "dtype", "device"))
_GRAD, _BASE = operator.attrgetter("grad"), operator.attrgetter("_base")
_DATA_PTR, _CONTIGUOUS = operator.methodcaller("data_ptr"), operator.methodcaller("is_contiguous")
_grad_state = []  # (attrgetter of what makes a weight's gradient observable, the value that means none)

_warned = set()
_pending = []  # (family, recipe, None) for patched blocks, (family, None, reason) for refusals
_depth = [0]


def _log(level, msg):
    if level <= _level:
        sys.stderr.write("moepatch: " + msg + "\n")
        sys.stderr.flush()


def _log_once(key, level, msg):
    if key not in _warned:
        _warned.add(key)
        _log(level, msg)


def after_fork_in_child():
    _warned.clear()
    _Plan.cache.clear()


# ---- aux-free balancing / telemetry (preload/auxfree.py): _bal is None unless MOEPATCH_AUXFREE or
# MOEPATCH_TELEMETRY is set; the lines marked "auxfree" below are its only hooks in this file.
def _load_balancer():
    if not (_opts.get("auxfree") or _opts.get("telemetry")):
        return None
    try:
        ns = {"__name__": "_moepatch.auxfree", "__builtins__": __builtins__}
        exec(compile(_mp.auxfree_source(), "<moepatch auxfree>", "exec"), ns)
        return ns["Balancer"](_opts, _log, _log_once)
    except Exception as e:  # the fused path still works without it
        _log(0, "aux-free balancing / telemetry not available: %r" % (e,))
        return None


_bal = _load_balancer()


# ---------------------------------------------------------------- detection and patching

def _looks_like_moe(block):
    """Cheap filter before detection: a router child plus experts, either as an `experts` child or
    as a number of experts on the block or its router (JetMoE-style blocks hold their experts in
    other parameters); detection then patches or refuses with a reason, so the log names every
    MoE block it did not patch."""
    d = block.__dict__.get("_modules", {})
    router = d.get("gate") or d.get("router")
    if router is None:
        return False
    if "experts" in d:
        return True
    for owner in (block, router):
        n = owner.__dict__.get("num_experts")
        if isinstance(n, int) and n > 1:
            return True
    return False


def _examine(block):
    if _bal is not None:  # auxfree
        _bal.note_config(block)
    if not _looks_like_moe(block):
        return
    spec = _mp.detect(block)
    if isinstance(spec, str):
        _pending.append((_family_hint(block), None, spec))
        _log(2, "refused %s: %s" % (type(block).__name__, spec))
        return
    if _allow and spec["family"] not in _allow:
        _log(1, "%s: family %s not in MOEPATCH_MODELS" % (type(block).__name__, spec["family"]))
        return
    _patch(block, spec)
    _pending.append((spec["family"], _RECIPES[spec["recipe"]], None))


def _family_hint(block):
    cfg = getattr(block, "config", None)
    return getattr(cfg, "model_type", None) or type(block).__module__.rsplit(".", 1)[-1]


def _summary():
    patched, refused = {}, {}
    for family, recipe, reason in _pending:
        if reason is None:
            patched[(family, recipe)] = patched.get((family, recipe), 0) + 1
        else:
            refused[(family, reason)] = refused.get((family, reason), 0) + 1
    del _pending[:]
    total = sum(patched.values()) + sum(refused.values())
    parts = ", ".join("%s: %d (%s)" % (f, n, r) for (f, r), n in sorted(patched.items()))
    _log(0, "patched %d/%d MoE blocks%s; backend %s"
         % (sum(patched.values()), total, " [" + parts + "]" if parts else "",
            _opts.get("backend", "auto")))
    for (family, reason), n in sorted(refused.items()):
        _log(0, "kept the original forward of %d %s block(s): %s" % (n, family, reason))


class _State:
    """Per-block state the glue keeps on `block._moepatch`."""

    def __init__(self, block, spec):
        self.spec = spec
        self.orig = type(block).forward.__get__(block)
        self.calls = 0
        self.direct_calls = 0  # fused calls whose expert grads skip autograd (_direct_grads)
        self.fast_router_calls = 0  # fused calls whose fp32 logits came from _router_fn
        self.own_router_calls = 0  # fused no-grad calls whose fp32 logits the kernels made
        self.disabled = None  # a reason string once the block fell back for good
        self.kinds = _module_kinds(block, spec)


def _module_kinds(block, spec):
    """Types of the modules the fused path reads weights from, as detection saw them. PEFT (LoRA)
    or a quantizer that replaces one of them after patching would otherwise make the fused path
    read base weights and silently drop the adapters; every call compares these types."""
    router, experts = getattr(block, spec["router"]), getattr(block, spec["experts"])
    kinds = {"router": type(router), "experts": type(experts)}
    if spec["layout"] == 0:
        first = experts[0]
        kinds["proj"] = tuple(type(getattr(first, n)) for n in (spec["gate"], spec["up"], spec["down"]))
    if spec["shared"]:
        mlp = getattr(block, spec["shared_name"])
        kinds["shared"] = tuple(type(m) for m in (mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj))
        if spec["shared"] == 2:
            kinds["shared_gate"] = type(getattr(block, spec["shared_gate_name"]))
    return kinds


def _qualname(cls):
    return "%s.%s" % (cls.__module__, cls.__qualname__)


def _same_kind(name, module, expected):
    if type(module) is not expected:
        raise _Refuse("%s was replaced after patching (%s, was %s): LoRA or quantized layers are "
                      "not supported by the fused path yet"
                      % (name, _qualname(type(module)), _qualname(expected)))


def _patch(block, spec):
    block.__dict__["_moepatch"] = _State(block, spec)
    block.__dict__["forward"] = _fused_forward.__get__(block)
    if _bal is not None:  # auxfree
        _bal.attach(block, spec)


def _unpatch(block, reason):
    st = block.__dict__.get("_moepatch")
    if st is not None:
        st.disabled = reason
    block.__dict__.pop("forward", None)


def patch(block):
    """Patch one block by hand (benchmarks, tests). True when detection accepted it."""
    spec = _mp.detect(block)
    if isinstance(spec, str):
        return False
    _patch(block, spec)
    return True


def unpatch(block):
    """Give one block its own forward back."""
    _unpatch(block, "unpatched by request")


# The routed experts' GEMM engine on CUDA (moe_problem.engine: 0 cuBLAS, 1 the Hopper engine, 2 the same
# engine's warp-specialized schedule by name, now also its default), from MOEPATCH_GEMM. auto is the
# Hopper engine: cuBLAS's grouped GEMMs need the expert counts on the host, two syncs per layer that
# leave a training step waiting on the GPU
# (measured on an H200: Ring-mini-arch step 0.157 s on the engine vs 0.317 s on cuBLAS, Qwen3-30B-A3B-
# arch 0.087 s vs 0.184 s), even where cuBLAS's GEMMs alone are faster (3-D weights at T = 16384). The
# kernels fall back to cuBLAS themselves off sm_90 or on shapes the engine does not tile.
_GEMM = {"auto": 1, "cublas": 0, "sm90": 1, "sm90-ws": 2}
_engine = [None]  # set_engine's override; None: MOEPATCH_GEMM decides


def set_engine(on):
    """Override MOEPATCH_GEMM for later calls: True or 1 the Hopper engine, 2 its warp-specialized
    schedule, False or 0 cuBLAS; None gives the choice back to MOEPATCH_GEMM."""
    _engine[0] = None if on is None else (2 if on == 2 else (1 if on else 0))


def _engine_for():
    if _engine[0] is not None:
        return _engine[0]
    return _GEMM[_opts.get("gemm", "auto")]


# ---------------------------------------------------------------- binding: tensors -> pointers

class _Refuse(Exception):
    pass


class _KernelError(Exception):
    pass


def _run(op, backend, cfg, io):
    try:
        return _mp.run(op, backend, cfg, io)
    except RuntimeError as e:
        raise _KernelError(str(e)) from None


def _mats2(t, es, rs, cs, offset=0):
    return (0, t.data_ptr() + offset * t.element_size(), es, rs, cs)


def _mlp_tuple(n, H, I, mats):
    return (n, H, I) + tuple(mats)


class _Plan:
    """Weight tensors and their pointer description for one call; pointer arrays are cached."""

    cache = {}

    def __init__(self, block, st, x, amp=None, cast=None):
        torch = sys.modules["torch"]
        self.torch = torch
        spec, kinds = st.spec, st.kinds
        self.spec = spec
        E, I, H = spec["E"], spec["I"], spec["H"]
        self.router = getattr(block, spec["router"])
        experts = getattr(block, spec["experts"])
        _same_kind(spec["router"], self.router, kinds["router"])
        _same_kind(spec["experts"], experts, kinds["experts"])
        if spec["layout"] == 0:
            self.weights = self._modulelist(experts, spec, kinds["proj"])
        else:
            self.weights = [getattr(experts, spec["gate"]), getattr(experts, spec["down"])]
        self.shared = []
        self.shared_gate = None
        if spec["shared"]:
            mlp = getattr(block, spec["shared_name"])
            for m, kind in zip((mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj), kinds["shared"]):
                _same_kind(spec["shared_name"], m, kind)
            self.shared = [mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight]
            if spec["shared"] == 2:
                sg = getattr(block, spec["shared_gate_name"])
                _same_kind(spec["shared_gate_name"], sg, kinds["shared_gate"])
                self.shared_gate = sg.weight
        params = self.weights + self.shared + ([self.shared_gate] if self.shared_gate is not None else [])
        # cast (fp32 weights under autocast): the parameters stay fp32, the kernels see cast copies
        self.cast = cast
        dtype = torch.float32 if cast is not None else x.dtype
        # the router's logits come from torch (_router_logits), so under autocast, or when the
        # family computes them in fp32, the router weight may keep its own dtype (axolotl keeps
        # `.gate` modules in fp32)
        router_free = amp is not None or spec["logits_fp32"]
        rw = self.router.weight
        self._check_params(params, dtype, x.device)
        self._check_params([rw], rw.dtype if router_free else dtype, x.device)
        if str(dtype) not in _DTYPES:
            raise _Refuse("dtype %s is not supported" % dtype)
        self.dtype_code = _DTYPES[str(x.dtype)]
        self.cuda = x.device.type == "cuda"
        if not self.cuda and x.device.type != "cpu":
            raise _Refuse("device %s is not supported" % x.device.type)
        want = _opts.get("backend", "auto")
        if want != "auto" and want != ("cuda" if self.cuda else "cpu"):
            raise _Refuse("MOEPATCH_BACKEND=%s but the tensors are on %s" % (want, x.device.type))
        s = spec
        self.cfg = (self.dtype_code, s["recipe"], s["E"], s["K"], s["n_group"], s["topk_group"],
                    s["norm"], s["norm_eps"], s["scale"], s["mask_value"])  # the C cfg tuple
        self.keep = []  # pointer arrays that must outlive the kernel call
        self.counts = None  # auxfree: int64 [E] slot counts the forward writes, or None
        self.E, self.I, self.H = E, I, H
        self.direct = spec["layout"] == 0 and _direct_grads(torch, self.weights)
        self.fast_router = False  # set by _router_logits
        self.router_w = None  # the router weight when the forward makes the logits (_own_router)
        self.infer = False  # set by _fused: no backward can follow this call

    def inputs(self):
        """The routed experts' weights as autograd inputs: all of them, or (direct grads) only the
        first, whose AccumulateGrad node tells the backward whether this pass accumulates."""
        return self.weights[:1] if self.direct else self.weights

    @staticmethod
    def _check_params(params, dtype, device):
        """Every weight unpartitioned, in dtype, on device: C-level loops over the E×3 (+ shared)
        tensors (set of dtypes and devices), the per-tensor loop only to name what is wrong."""
        ds = any(map(operator.contains, map(_DICT, params), itertools.repeat("ds_id")))
        if not ds and set(map(_DTYPE, params)) == {dtype} and set(map(_DEVICE, params)) == {device}:
            return
        for p in params:
            if "ds_id" in p.__dict__:  # partitioned after the block was built (deepspeed.initialize)
                raise _Refuse("weights are partitioned by DeepSpeed ZeRO-3; ZeRO-3 is not supported")
            if p.dtype != dtype:
                raise _Refuse("input dtype %s differs from weight dtype %s" % (dtype, p.dtype))
            if p.device != device:
                raise _Refuse("weights on %s, input on %s" % (p.device, device))

    def _modulelist(self, experts, spec, kinds):
        """The E×3 weights, read through the modules' own dicts with C-level loops (map, itemgetter):
        nn.Module.__getattr__ would cost about 1 ms per call for 256 experts, and this runs before
        every fused forward. Anything unexpected (a wrapped projection, a weight that is not a
        registered parameter) takes the slow loop, which names the module or reads the attribute."""
        mods = list(map(_MODULES, experts._modules.values()))
        out = []
        for name, kind in zip((spec["gate"], spec["up"], spec["down"]), kinds):
            try:
                ms = list(map(operator.itemgetter(name), mods))
                ws = list(map(_WEIGHT, map(_PARAMS, ms)))
            except KeyError:
                ms = ws = None
            # types, not `None in ws`: that compares every tensor with None through Tensor.__eq__
            if ms is None or set(map(type, ms)) != {kind} or type(None) in set(map(type, ws)):
                return self._modulelist_slow(experts, spec, kinds)
            out += ws
        return out

    def _modulelist_slow(self, experts, spec, kinds):
        names = (spec["gate"], spec["up"], spec["down"])
        lists = ([], [], [])
        for i, e in enumerate(experts._modules.values()):
            for name, kind, out in zip(names, kinds, lists):
                m = e._modules.get(name)
                if type(m) is not kind:
                    _same_kind("%s[%d].%s" % (spec["experts"], i, name), m, kind)
                w = m._parameters.get("weight")
                out.append(w if w is not None else m.weight)
        return lists[0] + lists[1] + lists[2]

    def _ptr_array(self, tensors, device):
        """The data pointers of per-expert weights as an int64 array on their device, cached: weights
        keep their storage from call to call, and the pointers are the key, so a moved weight
        (FSDP, .to(), a checkpoint load) gets a new array — that is the re-validation. The strides
        are checked when an array is built."""
        torch = self.torch
        ptrs = tuple(map(torch.Tensor.data_ptr, tensors))
        key = (device, tensors[0].stride(), ptrs)
        arr = _Plan.cache.get(key)
        if arr is None:
            first = tensors[0].stride()
            if any(t.stride() != first for t in tensors):
                raise _Refuse("experts have different strides")
            arr = torch.tensor(ptrs, dtype=torch.int64)
            if device.type == "cuda":
                arr = arr.to(device)
            if len(_Plan.cache) > 1024:
                _Plan.cache.clear()
            _Plan.cache[key] = arr
        return arr

    def experts_mlp(self, tensors, device):
        """The routed experts (or their grads) as the C tuple (n, H, I, gate, up, down)."""
        s, E, I, H = self.spec, self.E, self.I, self.H
        if s["layout"] == 0:
            mats = []
            for j in range(3):
                group = tensors[j * E:(j + 1) * E]
                first = group[0]
                arr = self._ptr_array(group, device)
                self.keep.append(arr)
                mats.append((arr.data_ptr(), 0, 0, first.stride(0), first.stride(1)))
            return _mlp_tuple(E, H, I, mats)
        gu, dn = tensors
        es, s1, s2 = gu.stride()
        des, d1, d2 = dn.stride()
        if s["layout"] == 1:  # [E, 2I, H], [E, H, I]
            mats = [_mats2(gu, es, s1, s2), _mats2(gu, es, s1, s2, I * s1), _mats2(dn, des, d1, d2)]
        else:  # [E, H, 2I], [E, I, H]
            mats = [_mats2(gu, es, s2, s1), _mats2(gu, es, s2, s1, I * s2), _mats2(dn, des, d2, d1)]
        return _mlp_tuple(E, H, I, mats)

    def expert_grads(self, device):
        """Gradient buffers of the routed experts, in the compute dtype: (the C tuple, one tensor
        per weight, the buffers). For a ModuleList the E×3 gradients are views of one buffer
        addressed by base + e·stride, so no pointer array is built or uploaded."""
        torch, s = self.torch, self.spec
        dtype = self.cast if self.cast is not None else self.weights[0].dtype
        if s["layout"] != 0:
            grads = [torch.empty(t.shape, dtype=dtype, device=device) for t in self.weights]
            return self.experts_mlp(grads, device), grads, grads
        mats, grads, flat = self._flat(dtype, device, views=not self.direct)
        return mats, grads, [flat]

    def param_grads(self, grads, bufs):
        """The routed experts' grads as the parameters' dtype wants them (cast mode: fp32, one
        conversion per buffer, then the same views)."""
        if self.cast is None:
            return grads
        if self.spec["layout"] != 0:
            return [g.float() for g in grads]
        return self._views(self.grad_flat(bufs))

    def grad_flat(self, bufs):
        """A ModuleList's [3, E, I·H] gradient buffer in the parameters' dtype (cast mode: fp32)."""
        return bufs[0] if self.cast is None else bufs[0].float()

    def split(self, weights):
        """The Function's weight inputs as (the routed experts' E×3 or 2 tensors, the rest)."""
        n = len(self.inputs())
        return (self.weights if self.direct else list(weights[:n])), list(weights[n:])

    def compute_weights(self, weights, device):
        """The weights as the kernels read them: (experts C tuple, shared expert tensors).
        Cast mode: copies in the compute dtype, a ModuleList's E×3 into one buffer addressed by
        base + e·stride (no pointer arrays); made in forward and again in backward, rather than kept
        (autocast keeps its copies alive until backward: this holds one layer's at a time)."""
        routed, rest = self.split(weights)
        if self.cast is None:
            return self.experts_mlp(routed, device), rest
        torch, dt = self.torch, self.cast
        rest = [t.to(dt) for t in rest]
        if self.spec["layout"] != 0:
            copies = [t.to(dt) for t in routed]
            self.keep.extend(copies)
            return self.experts_mlp(copies, device), rest
        mats, views, flat = self._flat(dt, device)
        if hasattr(torch, "_foreach_copy_"):
            torch._foreach_copy_(views, routed)
        else:
            for v, t in zip(views, routed):
                v.copy_(t)
        self.keep.append(flat)
        return mats, rest

    def _flat(self, dtype, device, views=True):
        """One [3, E, I·H] buffer for a ModuleList's gate, up and down weights (or their grads): the
        C tuple addressing it, its E×3 views shaped like the parameters (None: not wanted; making
        them costs ~1 ms of host time), the buffer."""
        torch, E, I, H = self.torch, self.E, self.I, self.H
        flat = torch.empty((3, E, I * H), dtype=dtype, device=device)
        mats = [(0, flat[0].data_ptr(), I * H, H, 1), (0, flat[1].data_ptr(), I * H, H, 1),
                (0, flat[2].data_ptr(), I * H, I, 1)]
        return _mlp_tuple(E, H, I, mats), self._views(flat) if views else None, flat

    def _views(self, flat):
        """A [3, E, I·H] buffer's E×3 views, shaped like the gate, up and down parameters."""
        E, I, H = self.E, self.I, self.H
        return (list(flat[0].view(E, I, H).unbind(0)) + list(flat[1].view(E, I, H).unbind(0))
                + list(flat[2].view(E, H, I).unbind(0)))

    def shared_mlp(self, tensors):
        g, u, d = tensors
        Is = g.shape[0]
        return _mlp_tuple(1, self.H, Is, [(0, t.data_ptr(), 0, t.stride(0), t.stride(1)) for t in (g, u, d)])


# ---------------------------------------------------------------- direct expert gradients

def _direct_grads(torch, weights):
    """Whether a ModuleList's E×3 expert gradients skip autograd (MOEPATCH_DIRECT_GRADS): as
    Function inputs each weight costs the engine an edge in forward and an AccumulateGrad node in
    backward, ~5 ms of host time per layer at E = 256, longer than the layer's GPU time
    (tests/bench/RESULTS.md); written by the backward itself they cost one foreach add. Only where
    nothing can tell the difference: grad mode on, every weight a plain leaf that wants a gradient,
    no tensor or post-accumulate hooks, no torch.distributed (DDP, FSDP and DeepSpeed hook the
    AccumulateGrad nodes from C++, where they cannot be seen). Checked on every call: hooks come
    and go."""
    if not _opts.get("direct_grads", True) or not torch.is_grad_enabled():
        return False
    dist = getattr(torch, "distributed", None)
    if dist is not None and dist.is_available() and dist.is_initialized():
        return False
    if not _grad_state:
        names = ["requires_grad", "is_leaf", "_backward_hooks"]
        if hasattr(weights[0], "_post_accumulate_grad_hooks"):  # torch >= 2.1
            names.append("_post_accumulate_grad_hooks")
        _grad_state.extend((operator.attrgetter(*names), (True, True) + (None,) * (len(names) - 2)))
    getter, plain = _grad_state
    # == per weight, not a set: a weight's hooks are a dict (unhashable); an emptied one counts.
    # A weight shared by two experts gets both gradients from autograd, one .grad write here.
    return all(map(plain.__eq__, map(getter, weights))) and len(set(map(id, weights))) == len(weights)


def _accumulates(torch, ctx, first):
    """Whether this backward pass accumulates into the experts' .grad: the first weight's
    AccumulateGrad node runs in it (a plain .backward(), or backward(inputs=...) naming it), not
    torch.autograd.grad nor backward(inputs=...) without it. autograd.grad naming that weight
    raises in the query (torch does not answer it for a leaf it captures): it does not accumulate."""
    for fn, _ in ctx.next_functions:
        if fn is not None and getattr(fn, "variable", None) is first:
            try:
                return bool(torch._C._will_engine_execute_node(fn))
            except RuntimeError:
                return False
    return False


def _write_grads(torch, plan, flat):
    """What AccumulateGrad does, for the experts' weights but the first (autograd's): flat is the
    backward's [3, E, I·H] gradient buffer in their dtype. A weight without .grad takes its view of
    it (as AccumulateGrad takes a fresh gradient); existing grads get it added in place: where they
    are the views an earlier backward handed out (gradient accumulation), one add over the buffer,
    else one foreach add. Hooks registered between forward and backward (those seen in forward
    keep autograd) run as the engine runs them on a leaf: tensor hooks on the gradient in order,
    each result replacing it, post-accumulate hooks on the weight after."""
    params = plan.weights[1:]
    getter, plain = _grad_state
    late = [i for i, st in enumerate(map(getter, params)) if st != plain]
    cur = list(map(_GRAD, params))
    kinds = set(map(type, cur))
    if not late and type(None) not in kinds and _handed_out(cur, flat):
        n = flat[0, 0].numel()  # the first weight's part: autograd accumulates it
        cur[0]._base.view(-1)[n:].add_(flat.view(-1)[n:])
        return
    grads = plan._views(flat)[1:]
    post = []
    if late:
        params, grads, cur, post = _late_hooks(params, grads, cur, late)
        kinds = set(map(type, cur))
    if kinds <= {type(None)}:
        list(map(setattr, params, itertools.repeat("grad"), grads))
    else:
        old, new = [], []
        for p, c, g in zip(params, cur, grads):
            if c is None:
                p.grad = g
            else:
                old.append(c)
                new.append(g)
        torch._foreach_add_(old, new)
    for p in post:
        for hook in list(p._post_accumulate_grad_hooks.values()):
            if hook(p) is not None:  # as the engine says it
                raise RuntimeError("Tensor post accumulate grad hooks should return None.")


def _late_hooks(params, grads, cur, late):
    """The weights late (indices) got hooks or lost requires_grad after the forward: their tensor
    hooks applied to their gradients, in order, each result replacing it; a weight that no longer
    requires grad dropped (AccumulateGrad leaves it alone). Returns the weights, gradients and
    current grads that remain, and the weights whose post-accumulate hooks must run."""
    grads, post = list(grads), []
    for i in late:
        p = params[i]
        if not p.requires_grad:
            grads[i] = None
            continue
        for hook in list((p._backward_hooks or {}).values()):
            g = hook(grads[i])
            if g is not None:
                grads[i] = g
        if getattr(p, "_post_accumulate_grad_hooks", None):
            post.append(p)
    keep = [i for i, g in enumerate(grads) if g is not None]
    return [params[i] for i in keep], [grads[i] for i in keep], [cur[i] for i in keep], post


def _handed_out(cur, flat):
    """Whether the grads cur (of every expert weight but the first) are, in order, views of one
    buffer shaped and laid out like flat, at the places _views gives them: then adding flat to that
    buffer (past the first weight's part) is the elementwise add of each weight's gradient."""
    base = cur[0]._base
    if base is None or base.shape != flat.shape or base.dtype != flat.dtype or not base.is_contiguous():
        return False
    if not all(map(operator.is_, map(_BASE, cur), itertools.repeat(base))):
        return False
    step = cur[0].numel() * cur[0].element_size()
    start = base.data_ptr() + step
    return (list(map(_DATA_PTR, cur)) == list(range(start, start + step * len(cur), step))
            and all(map(_CONTIGUOUS, cur)))


# ---------------------------------------------------------------- the fused op

def _stream(torch, device):
    return torch._C._cuda_getCurrentRawStream(device.index if device.index is not None
                                              else torch.cuda.current_device())


def _as_dtype(t, dtype):
    """t in dtype (a copy only when it differs: cast mode), None stays None."""
    return t if t is None or t.dtype == dtype else t.to(dtype)


def _make_function(torch):
    class MoEFn(torch.autograd.Function):
        @staticmethod
        def forward(ctx, plan, x, logits, bias, shared_gate, *weights):
            T, H, K = x.shape[0], plan.H, plan.spec["K"]
            dev = x.device
            backend = 1 if plan.cuda else 0
            y = torch.empty((T, H), dtype=x.dtype, device=dev)
            idx = torch.empty((T, K), dtype=torch.int32, device=dev)
            w = torch.empty((T, K), dtype=torch.float32, device=dev)
            experts, shared = plan.compute_weights(weights, dev)
            io = {"T": T, "H": H, "x": x.data_ptr(), "x_rs": x.stride(0),
                  "logits": logits.data_ptr(), "logits_dtype": _DTYPES[str(logits.dtype)],
                  "y": y.data_ptr(), "idx": idx.data_ptr(), "w": w.data_ptr(),
                  "experts": experts}
            if bias is not None:
                io["bias"], io["bias_dtype"] = bias.data_ptr(), _DTYPES[str(bias.dtype)]
            # the families returning (logits, topk idx) get torch's int64 indices from the kernels
            idx64 = (torch.empty((T, K), dtype=torch.int64, device=dev) if plan.spec["ret"] == 2
                     else None)
            if idx64 is not None:
                io["idx64"] = idx64.data_ptr()
            if plan.router_w is not None:
                io["router_w"], io["router_w_rs"] = plan.router_w.data_ptr(), plan.router_w.stride(0)
                io["logits_out"] = logits.data_ptr()
            if plan.shared:
                io["shared"] = plan.shared_mlp(shared)
            sg = _as_dtype(shared_gate, x.dtype)
            if sg is not None:
                io["shared_gate"] = sg.data_ptr()
            if plan.counts is not None:  # auxfree
                io["counts"] = plan.counts.data_ptr()
            saved = counts = None
            if plan.cuda:
                io["stream"] = _stream(torch, dev)
                io["engine"] = ctx.engine = _engine_for()
                io["infer"] = int(plan.infer)
                counts = torch.empty(plan.E, dtype=torch.int64)
                io["counts_host"] = counts.data_ptr()
                saved = torch.empty(_run("saved", 1, plan.cfg, io), dtype=torch.uint8, device=dev)
                io["saved"] = saved.data_ptr()
                ws = torch.empty(_run("workspace_forward", 1, plan.cfg, io), dtype=torch.uint8,
                                 device=dev)
                io["workspace"], io["workspace_bytes"] = ws.data_ptr(), ws.numel()
            _run("forward", backend, plan.cfg, io)
            plan.keep = []  # cast copies: made again in backward
            ctx.plan, ctx.io_saved, ctx.counts = plan, saved, counts
            ctx.save_for_backward(x, logits, bias, shared_gate, idx, w, *weights)
            idx_out = idx if idx64 is None else idx64
            ctx.mark_non_differentiable(idx_out)
            # no zeros made for idx's gradient in backward (a [T, K] fill per call)
            ctx.set_materialize_grads(False)
            return y, idx_out

        @staticmethod
        def backward(ctx, dy, _didx):
            plan = ctx.plan
            x, logits, bias, shared_gate, idx, w, *weights = ctx.saved_tensors
            dev = x.device
            if dy is None:  # y's gradient is undefined (grads are not materialized)
                dy = torch.zeros((x.shape[0], plan.H), dtype=x.dtype, device=dev)
            dy = dy.contiguous()
            T = x.shape[0]
            if dy.dtype != x.dtype:  # cast mode under autocast: the output was cast to the input's
                dy = dy.to(x.dtype)
            dx = torch.empty_like(x)
            dlogits = torch.empty_like(logits)
            # described again, not reused from forward: FSDP re-gathers weights for backward
            experts, shared = plan.compute_weights(weights, dev)
            d_experts, d_routed, d_bufs = plan.expert_grads(dev)
            d_shared = [torch.empty(t.shape, dtype=x.dtype, device=dev) for t in shared]
            io = {"T": T, "H": plan.H, "x": x.data_ptr(), "x_rs": x.stride(0),
                  "logits": logits.data_ptr(), "idx": idx.data_ptr(), "w": w.data_ptr(),
                  "dy": dy.data_ptr(), "dx": dx.data_ptr(), "dlogits": dlogits.data_ptr(),
                  "experts": experts, "d_experts": d_experts}
            if bias is not None:
                io["bias"], io["bias_dtype"] = bias.data_ptr(), _DTYPES[str(bias.dtype)]
            if plan.shared:
                io["shared"] = plan.shared_mlp(shared)
                io["d_shared"] = plan.shared_mlp(d_shared)
            d_sg = None
            sg = _as_dtype(shared_gate, x.dtype)
            if sg is not None:
                d_sg = torch.empty(sg.shape, dtype=x.dtype, device=dev)
                io["shared_gate"], io["d_shared_gate"] = sg.data_ptr(), d_sg.data_ptr()
            if plan.cuda:
                io["stream"] = _stream(torch, dev)
                io["engine"] = ctx.engine  # the forward's choice: the saved state depends on it
                io["counts_host"] = ctx.counts.data_ptr()
                io["saved"] = ctx.io_saved.data_ptr()
                ws = torch.empty(_mp.run("workspace_backward", 1, plan.cfg, io), dtype=torch.uint8,
                                 device=dev)
                io["workspace"], io["workspace_bytes"] = ws.data_ptr(), ws.numel()
            _mp.run("backward", 1 if plan.cuda else 0, plan.cfg, io)
            plan.keep = []
            if plan.direct:
                flat = plan.grad_flat(d_bufs)
                # the parameter itself: a saved tensor comes back as another object under
                # non-reentrant checkpointing (its unpack hook recomputes it)
                if _accumulates(torch, ctx, plan.weights[0]):
                    _write_grads(torch, plan, flat)
                dweights = [flat[0, 0].view_as(weights[0])]
            else:
                dweights = plan.param_grads(d_routed, d_bufs)
            want = plan.split(weights)[1]  # the shared expert's parameters: their own dtype
            dweights += [g.to(t.dtype) for g, t in zip(d_shared, want)]
            if d_sg is not None:
                d_sg = d_sg.view_as(shared_gate).to(shared_gate.dtype)
            return (None, dx, dlogits, None, d_sg, *dweights)

    return MoEFn


_fn = [None]


def _has_hooks(torch, module):
    g = torch.nn.modules.module
    return bool(module._forward_hooks or module._forward_pre_hooks
                or getattr(g, "_global_forward_hooks", None)
                or getattr(g, "_global_forward_pre_hooks", None))


def _router_logits(torch, plan, x, block_bias):
    """The router logits [T, E]. When hooks watch the router (transformers 5 records router logits
    for the auxiliary loss with forward hooks on the gate), the router module itself is called so
    that they see what they expect; its logits are the first output (transformers 5) or the last
    floating [T, E] one (Bailing's gate returns (idx, weights, logits)). A router whose block holds
    the selection bias takes it as its second argument (HY-V3, MiniMax-M2: gate(x, bias))."""
    router = plan.router
    if _has_hooks(torch, router):
        out = router(x) if block_bias is None else router(x, block_bias)
        outs = out if isinstance(out, tuple) else (out,)
        want = (x.shape[0], plan.E)
        for t in (outs[0],) + tuple(reversed(outs)):
            if torch.is_tensor(t) and t.is_floating_point() and tuple(t.shape) == want:
                return t
        raise _Refuse("cannot find the router logits among the router's outputs")
    w = router.weight
    if plan.spec["logits_fp32"]:
        # the family asks for fp32 logits (x.float() @ W.float()); autocast would quietly run that
        # matmul in bf16 and round the logits the routing and the gate's gradient are made from
        with torch.autocast(x.device.type, enabled=False):
            fn = _router_fn(torch, x, w)
            plan.fast_router = fn is not None
            if fn is not None:
                return fn.apply(x, w)
            return torch.nn.functional.linear(x.float(), w.float())
    return torch.nn.functional.linear(x, w)


_OWN_ROUTER_MAX_T = 16  # decode sizes: above them torch's GEMM is the faster way


def _own_router(torch, plan, w, x, x_in, amp):
    """The router weight w (detached) when the CUDA forward makes the fp32 logits itself (moe_problem.router_w:
    one kernel in place of torch's casts of x and the weight and its fp32 GEMM, which at decode
    sizes cost more than the routed experts' weights take to read), else None. Only for no-grad
    calls of families whose gate is x.float() @ W.float()ᵀ with nobody watching the router, at
    decode sizes, under MOEPATCH_FAST_ROUTER. The sum order is not torch's: the logits match its
    to fp32 rounding (~1e-7 relative), so an expert choice can differ only where two scores tie
    to that precision."""
    if not (plan.infer and plan.cuda and plan.spec["logits_fp32"] and amp is None
            and _opts.get("fast_router", True) and x.shape[0] <= _OWN_ROUTER_MAX_T):
        return None
    ok = (isinstance(w, torch.Tensor) and w.dim() == 2 and tuple(w.shape) == (plan.E, plan.H)
          and w.dtype == x.dtype == x_in.dtype and x.dtype in (torch.bfloat16, torch.float16)
          and w.device == x.device and w.stride(1) == 1 and not _has_hooks(torch, plan.router))
    return w.detach() if ok else None


# ---------------------------------------------------------------- fp32 router, backward on tensor cores

_router = []  # [the autograd Function], or [None] where torch.mm has no out_dtype; [] not asked yet


def _router_fn(torch, x, w):
    """The Function giving fp32 logits of bf16 x and w whose backward runs on tensor cores
    (MOEPATCH_FAST_ROUTER), or None: option off, not CUDA, not both bf16 (an fp32 gate, fp32
    activations under autocast), or a torch whose mm cannot return fp32 from bf16 (asked once, on a
    small product of each operand layout the backward uses; no value is read back, so no host
    sync)."""
    if not (_opts.get("fast_router", True) and x.is_cuda and x.dtype == w.dtype == torch.bfloat16):
        return None
    if not _router:
        try:
            a = torch.ones((8, 16), dtype=torch.bfloat16, device=x.device)
            ok = all(_mm32(torch, p, q).dtype == torch.float32 for p, q in ((a, a.t()), (a.t(), a)))
        except (RuntimeError, TypeError) as e:
            _log(1, "fp32 router's backward through torch's fp32 GEMMs: %s" % " ".join(str(e).split())[:120])
            ok = False
        if ok:
            _log(1, "fp32-logits routers: backward on bf16 tensor cores (MOEPATCH_FAST_ROUTER=0: torch's)")
        _router.append(_make_router_fn(torch) if ok else None)
    return _router[0]


def _mm32(torch, a, b):
    """a @ b for bf16 matrices, in fp32: each product exact (8 x 8 significant bits fit fp32's 24),
    the sums in fp32, i.e. the arithmetic of a.float() @ b.float(), on tensor cores (torch.mm's
    out_dtype, CUDA only; elsewhere that fp32 matmul itself, so that tests can run the rest)."""
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _split3(torch, t):
    """fp32 t as [hi | mid | lo] in bf16, side by side along the last dim: each part the rounded rest
    of the one before (each difference exact in fp32), so hi + mid + lo is t to ~2^-26 relative:
    three times 8 significant bits hold fp32's 24."""
    hi = t.to(torch.bfloat16)
    rest = t - hi  # fp32: the bf16 operand is promoted exactly
    mid = rest.to(torch.bfloat16)
    return torch.cat((hi, mid, (rest - mid).to(torch.bfloat16)), dim=-1)


def _make_router_fn(torch):
    class MoERouterFn(torch.autograd.Function):
        """logits = x.float() @ w.float().T of bf16 x [T, H], w [E, H], by torch's own fp32 GEMM: the
        routing sees the bits it always saw (a tensor-core sum of bf16 products is not as exact: its
        accumulation truncates, ~4e-6 relative at H = 2048 against 2e-7 for the fp32 GEMM). The
        backward's gradients end in bf16, so they come from tensor cores (_router_grads32), and the
        fp32 copy of x autograd would keep for them is never saved."""

        @staticmethod
        def forward(ctx, x, w):
            ctx.save_for_backward(x, w)
            return torch.nn.functional.linear(x.float(), w.float())

        @staticmethod
        def backward(ctx, dl):
            x, w = ctx.saved_tensors
            with torch.autocast(dl.device.type, enabled=False):
                dx, dw = _router_grads32(torch, x, w, dl, *ctx.needs_input_grad)
            return (None if dx is None else dx.to(x.dtype)), (None if dw is None else dw.to(w.dtype))

    return MoERouterFn


def _router_grads32(torch, x, w, dl, want_x, want_w):
    """fp32 dx = dl @ w and dw = dl.T @ x (None where not wanted) of bf16 x [T, H], w [E, H] and
    fp32 dl [T, E]: dl's three bf16 parts [T, 3E] against w stacked three times (one GEMM), and
    against x giving the three parts' dw side by side, summed. The products are exact; the tensor
    cores' sums truncate (dw, summed over T: ~1e-5 relative), far below the bf16 rounding after."""
    parts = _split3(torch, dl)
    dx = _mm32(torch, parts, torch.cat((w, w, w))) if want_x else None
    dw = _mm32(torch, parts.t(), x).view(3, w.shape[0], -1).sum(0) if want_w else None
    return dx, dw


def _autocast_query(torch):
    """(is enabled, dtype) functions of a device type: torch >= 2.4 takes the type, older torch has
    one pair per device (cuda and cpu only). Chosen once: this runs on every fused call."""
    if hasattr(torch, "get_autocast_dtype"):
        return torch.is_autocast_enabled, torch.get_autocast_dtype
    on = {"cuda": torch.is_autocast_enabled, "cpu": torch.is_autocast_cpu_enabled}
    dt = {"cuda": torch.get_autocast_gpu_dtype, "cpu": torch.get_autocast_cpu_dtype}
    return (lambda d: d in on and on[d]()), (lambda d: dt[d]())


_autocast_fns = []


def _autocast_dtype(torch, device_type):
    """The dtype autocast gives matmuls on this device type, None when autocast is off there."""
    if not _autocast_fns:
        _autocast_fns.extend(_autocast_query(torch))
    enabled, dtype = _autocast_fns
    return dtype(device_type) if enabled(device_type) else None


def _compute_input(torch, block, spec, x):
    """(the expert GEMMs' input, autocast's dtype or None, the dtype the weights are cast to or None).
    Under autocast the original block's linears and grouped GEMMs run in autocast's dtype whatever
    the input's (axolotl keeps the residual stream in fp32 next to bf16 weights), so the fused block
    takes x in that dtype. fp32 weights (plain AMP: fp32 master weights) are cast to it per call, as
    autocast casts them for the original's linears; any other mix is refused."""
    amp = _autocast_dtype(torch, x.device.type)
    if amp is None:
        return x, None, None
    w = getattr(block, spec["experts"])
    w = next(iter(w.parameters()), None)
    cast = None
    if w is not None and w.dtype != amp:
        if w.dtype != torch.float32 or amp not in (torch.bfloat16, torch.float16):
            raise _Refuse("autocast to %s over %s expert weights is not fused" % (amp, w.dtype))
        cast = amp
    return (x if x.dtype == amp else x.to(amp)), amp, cast


def _fused(block, st, hidden_states):
    torch = sys.modules["torch"]
    spec = st.spec
    shape = hidden_states.shape
    if shape[-1] != spec["H"]:
        raise _Refuse("hidden size %d, expected %d" % (shape[-1], spec["H"]))
    x_in = hidden_states.reshape(-1, spec["H"])
    x, amp, cast = _compute_input(torch, block, spec, x_in)
    x = x.contiguous()
    plan = _Plan(block, st, x, amp, cast)
    native = None  # the selection bias tensor, on the block or on the router (spec["bias_on_block"])
    if spec["bias"]:
        native = getattr(block if spec["bias_on_block"] else plan.router, spec["bias"])
    bias = None
    if native is not None:
        bias = native.detach()
        # CUDA reads a bf16/fp16 bias as it is (moe_problem.bias_dtype: one cast kernel less a call)
        if not (plan.cuda and _bal is None and bias.dtype in (torch.bfloat16, torch.float16)
                and bias.is_contiguous()):
            bias = bias.float().contiguous()
    if _bal is not None:  # auxfree: the selection bias, and counts when this forward counts
        bias = _bal.selection_bias(block, x, bias)
        plan.counts = _bal.counts_for(block, x)
    if _fn[0] is None:
        _fn[0] = _make_function(torch)
    sg = plan.shared_gate
    rest = (bias, sg.reshape(-1) if sg is not None else None, *plan.inputs(), *plan.shared)
    # no backward can follow (generate, eval): the CUDA side may skip what only backward reads
    w_r = getattr(plan.router, "weight", None)
    plan.infer = not torch.is_grad_enabled() or not any(
        isinstance(a, torch.Tensor) and a.requires_grad for a in (x, w_r, *rest))
    plan.router_w = _own_router(torch, plan, w_r, x, x_in, amp)
    if plan.router_w is not None:  # the forward writes them (moe_problem.router_w)
        logits = torch.empty((x.shape[0], spec["E"]), dtype=torch.float32, device=x.device)
    else:
        # the router sees the block's own input: under autocast its linear casts it as the
        # original's does
        logits = _router_logits(torch, plan, x_in if amp is not None else x,
                                native if spec["bias_on_block"] else None)
        plan.infer = plan.infer and not logits.requires_grad
    # there it also reads bf16/fp16 logits as they are (the cast is one more kernel per call)
    narrow = plan.infer and plan.cuda and logits.dtype in (torch.bfloat16, torch.float16)
    y, idx = _fn[0].apply(plan, x, logits.contiguous() if narrow else logits.float().contiguous(),
                          *rest)
    st.direct_calls += plan.direct
    st.fast_router_calls += plan.fast_router
    st.own_router_calls += plan.router_w is not None
    if plan.counts is not None:  # auxfree
        _bal.observe(block, plan.counts)
    y = y.view(shape)
    if y.dtype != hidden_states.dtype:  # autocast: the original's output keeps the input's dtype
        y = y.to(hidden_states.dtype)
    ret = spec["ret"]
    if ret == 0:
        return y
    if ret == 1:
        return y, logits
    lead = tuple(shape[:-1])
    # idx is int64 here: the kernels write it so for these families (moe_problem.idx64)
    return y, (logits.view(*lead, spec["E"]), idx.view(*lead, spec["K"]))


def _first_tensor(out):
    return out[0] if isinstance(out, tuple) else out


def _check(block, st, hidden_states, out):
    torch = sys.modules["torch"]
    with torch.no_grad():
        ref = _first_tensor(st.orig(hidden_states))
    got = _first_tensor(out).detach()
    err = ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
    tol = _CHECK_TOL[_DTYPES.get(str(got.dtype), 0)]
    _log(1, "check %s call %d: rel err %.3g (tol %.0e)" % (type(block).__name__, st.calls, err, tol))
    if not err <= tol:
        reason = "MOEPATCH_CHECK: fused output differs from the original forward (rel err %.3g > %.0e)" % (err, tol)
        _unpatch(block, reason)
        _log(0, "%s: %s; this block falls back to its original forward" % (type(block).__name__, reason))
        return False
    return True


def _fused_forward(self, hidden_states, *args, **kwargs):
    st = self.__dict__.get("_moepatch")
    if st is None or st.disabled or args or kwargs:
        return type(self).forward(self, hidden_states, *args, **kwargs)
    if st.spec["jitter_attr"] and self.training and getattr(self, st.spec["jitter_attr"], 0) > 0:
        _log_once((id(self), "jitter"), 0, "%s: jitter noise in training is not supported; "
                  "original forward used for those calls" % type(self).__name__)
        return st.orig(hidden_states)
    try:
        out = _fused(self, st, hidden_states)
    except _Refuse as e:
        _log_once((id(self), str(e)), 0, "%s: %s; original forward used for those calls"
                  % (type(self).__name__, e))
        return st.orig(hidden_states)
    except _KernelError as e:
        _unpatch(self, str(e))
        _log(0, "%s: %s; this block falls back to its original forward" % (type(self).__name__, e))
        return st.orig(hidden_states)
    st.calls += 1
    if st.calls <= _opts.get("check", 0) and not _check(self, st, hidden_states, out):
        return st.orig(hidden_states)
    return out


# ---------------------------------------------------------------- module post-processing

def postprocess(module):
    torch = sys.modules.get("torch")
    if torch is None:
        return
    nn_module = torch.nn.Module
    for obj in list(vars(module).values()):
        if (isinstance(obj, type) and issubclass(obj, nn_module)
                and obj.__module__ == module.__name__
                and not getattr(obj.__init__, "__moepatch_wrapped__", False)):
            _wrap_init(obj)


def _wrap_init(cls):
    orig = cls.__init__

    def __init__(self, *args, **kwargs):
        _depth[0] += 1
        try:
            orig(self, *args, **kwargs)
        except BaseException:
            if _depth[0] == 1:  # that model was never built: its blocks must not count in the next summary
                del _pending[:]
            raise
        finally:
            _depth[0] -= 1
        if type(self) is cls:
            _examine(self)
        if _depth[0] == 0 and _pending:
            _summary()

    __init__.__moepatch_wrapped__ = True
    __init__.__wrapped__ = orig
    __init__.__doc__ = orig.__doc__
    cls.__init__ = __init__
