"""Probe run in a subprocess by the integration tests (see moepatch_testlib.run_probe).

    python3 probe_block.py '<json case>'

Loads one fixture module the way the case says (by path, as transformers 5 loads remote code, by a plain
import, or already imported by sitecustomize), builds its block (or tiny causal LM) under a fixed seed,
re-initialises every floating tensor deterministically, feeds random inputs (never zeros), runs forward and
backward, and saves to case["out"] (torch.save): the first output, the other returned tensors, the input
gradient and the gradient of every parameter. The last stdout line is a JSON object with what the probe saw
of the patching (block._moepatch, an instance-level forward). This process never imports the glue: whether
it runs patched depends only on the environment the test gives it (LD_PRELOAD, MOEPATCH...).
"""

import builtins
import copy
import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import traceback

import torch

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "fixtures")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float64": torch.float64}
BIAS_NAMES = ("expert_bias", "e_score_correction_bias")


def load_module(case):
    path = os.path.abspath(os.path.join(FIXTURES, case["fixture"]))
    base = os.path.splitext(os.path.basename(path))[0]
    how = case.get("load", "path")
    if how == "preimported":
        return sys.modules[base]
    if how == "import":
        sys.path.insert(0, os.path.dirname(path))
        return importlib.import_module(base)
    if how == "remote":
        # transformers 5 (dynamic_module_utils): the files are copied into a package under the modules
        # cache, then loaded by spec_from_file_location + exec_module, which skips sys.meta_path.
        root = tempfile.mkdtemp(prefix="hf_modules_", dir=os.path.dirname(os.path.abspath(case["out"])))
        pkg = os.path.join(root, "transformers_modules", "my_org", "abc123hash")
        os.makedirs(pkg)
        for d in (os.path.join(root, "transformers_modules"), os.path.dirname(pkg), pkg):
            open(os.path.join(d, "__init__.py"), "w").close()
        for f in os.listdir(os.path.dirname(path)):
            if f.endswith(".py"):
                shutil.copy(os.path.join(os.path.dirname(path), f), pkg)
        sys.path.insert(0, root)
        name = "transformers_modules.my_org.abc123hash." + base
        path = os.path.join(pkg, base + ".py")
    else:
        name = case.get("module_name", base)
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def init_tensors(model, hidden_size, seed):
    """Deterministic values that make routing well spread: weights ~ N(0, 1/fan_in), router ×2,
    norms ≈ 1, selection biases in [0, 0.1) (positive, so masked-out scores stay below every kept one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in sorted(list(model.named_parameters()) + list(model.named_buffers())):
            if not t.dtype.is_floating_point or t.numel() == 0:
                continue
            if name.endswith(BIAS_NAMES):
                t.copy_(torch.rand(t.shape, generator=g) * 0.1)
            elif t.dim() == 1:
                t.copy_(1.0 + 0.1 * torch.randn(t.shape, generator=g))
            else:
                std = t.shape[-1] ** -0.5
                if name.endswith(("gate.weight", "router.weight")) and t.shape[-1] == hidden_size:
                    std *= 2.0
                t.copy_(torch.randn(t.shape, generator=g) * std)


def patch_state(module):
    st = getattr(module, "_moepatch", None)
    return {
        "state": st is not None,
        "instance_forward": "forward" in module.__dict__,
        "disabled": getattr(st, "disabled", None),
        "direct_calls": getattr(st, "direct_calls", None),
        "fast_router_calls": getattr(st, "fast_router_calls", None),
    }


def moe_blocks(model, block_cls):
    return [m for m in model.modules() if type(m).__name__ == block_cls]


def apply_post(module, model, blocks, post):
    for action, arg in post:
        if action == "set_class_attr":
            for k, v in arg.items():
                setattr(type(blocks[0]), k, v)
        elif action == "set_attr":
            for b in blocks:
                for k, v in arg.items():
                    setattr(b, k, v)
        elif action == "tie_expert":  # expert arg[1]'s projections become expert arg[0]'s
            src, dst = (getattr(blocks[0], "experts")[i] for i in arg)
            for name, mod in dst.named_children():
                setattr(dst, name, getattr(src, name))
        elif action == "wrap_lora":
            for b in blocks:
                module.wrap_lora(b)
        elif action == "set_tensor":  # {"gate.weight": [[...]]}: overwrite a parameter or buffer in place
            named = dict(list(model.named_parameters()) + list(model.named_buffers()))
            with torch.no_grad():
                for k, v in arg.items():
                    named[k].copy_(torch.tensor(v, dtype=named[k].dtype))
        else:
            raise ValueError(action)


def run_block(block, case, dtype, call, seed):
    """One forward (case["calls"] times) and backward; `call` is block.__call__ or the class forward.
    The input is drawn in the case's working dtype, then cast to `dtype` (the float64 reference sees the
    same bf16-rounded values)."""
    work = DTYPES[case.get("dtype", "float32")]
    if "input_dtype" in case and dtype != torch.float64:  # autocast cases: fp32 input, bf16 weights
        dtype = DTYPES[case["input_dtype"]]
    g = torch.Generator().manual_seed(seed + 1)
    H = block_hidden(block)
    shape = list(case.get("shape", [2, 6]))
    if case.get("noncontig"):
        # the left half of a wider tensor: rows 2H apart, not contiguous, still .view()-able
        leaf = torch.randn(shape + [2 * H], generator=g).to(work).to(dtype).requires_grad_(True)
        x = leaf[..., :H]
    else:
        leaf = torch.randn(shape + [H], generator=g).to(work).to(dtype).requires_grad_(True)
        x = leaf
    if case.get("grad_mode") == "hook_expert_early":
        hook_expert(block)
    if case.get("ddp"):
        # one-process DDP on gloo: its reducer hooks every parameter's AccumulateGrad node; a
        # gradient that skipped autograd would leave its bucket unreduced, and the second
        # iteration (again) raises
        import torch.distributed as dist
        dist.init_process_group("gloo", init_method="file://" + case["out"] + ".store", rank=0,
                                world_size=1)
        call = torch.nn.parallel.DistributedDataParallel(block)
    if case.get("checkpoint") is not None:
        # what gradient_checkpointing does to a layer: recompute the forward in backward
        import torch.utils.checkpoint as cp
        inner = call
        call = lambda x: cp.checkpoint(inner, x, use_reentrant=case["checkpoint"])  # noqa: E731
    outs = None
    for _ in range(case.get("calls", 1)):
        inp = x.clone() if case.get("clone_input") else x
        torch.manual_seed(seed + 2)  # same jitter draws in every mode
        outs = call(inp)
    if not isinstance(outs, tuple):
        outs = (outs,)
    y = outs[0]
    extras = flatten(outs[1:])
    g2 = torch.Generator().manual_seed(seed + 3)
    loss = (y.float() * torch.randn(y.shape, generator=g2)).sum()
    for t in extras:
        if t.dtype.is_floating_point:
            loss = loss + 0.1 * (t.float() * torch.randn(t.shape, generator=g2)).sum()
    for p in block.parameters():
        p.grad = None
    xg = None
    if y.numel():
        xg = backward(block, case, call, x, leaf, loss, seed)
    grads = {n: (p.grad.detach().clone() if p.grad is not None else None) for n, p in block.named_parameters()}
    if xg is None and leaf.grad is not None:
        xg = leaf.grad
    xg = xg[..., :H] if xg is not None else None
    return {"y": y.detach().clone(), "extras": [t.detach().clone() for t in extras],
            "x": x.detach().clone(), "x_grad": xg, "grads": grads}


def triple_grad(t):
    t.grad.mul_(3)


def expert_params(block, e):
    return [p for n, p in block.named_parameters() if n.startswith("experts.%d." % e)]


def hook_expert(block):
    for p in expert_params(block, 1):
        p.register_hook(lambda g: g * 2)


def backward(block, case, call, x, leaf, loss, seed):
    """The backward pass case["grad_mode"] names; returns the input's gradient where
    torch.autograd.grad gave it rather than leaf.grad.
      (none)             loss.backward()
      again              a second forward and backward (another loss) into the same .grad
      zero_again         the same after zeroing every .grad in place (zero_grad(set_to_none=False))
      clone_again        the same after replacing every .grad by a copy (grads that are not views
                         of one buffer); partial_again: after dropping every third .grad
      hook_expert        a tensor hook doubling the gradient of expert 1's weights (registered
                         after the forward; hook_expert_early: before it), then backward
      post_hook_expert   a post-accumulate hook (torch >= 2.1) tripling expert 1's .grad in place,
                         registered after the forward
      autograd_grad_x    torch.autograd.grad(loss, [x]): no .grad may change
      backward_inputs_x  loss.backward(inputs=[x]): only x.grad may change"""
    mode = case.get("grad_mode")
    if mode == "autograd_grad_x":
        return torch.autograd.grad(loss, [leaf])[0]
    if mode == "backward_inputs_x":
        loss.backward(inputs=[leaf])
        return None
    if mode == "hook_expert":
        hook_expert(block)
    if mode == "post_hook_expert":  # torch >= 2.1: what an optimizer-in-backward hook does to .grad
        for p in expert_params(block, 1):
            p.register_post_accumulate_grad_hook(triple_grad)
    loss.backward()
    if mode in ("again", "zero_again", "clone_again", "partial_again"):
        for i, p in enumerate(block.parameters()):
            if p.grad is None:
                continue
            if mode == "zero_again":
                p.grad.zero_()
            elif mode == "clone_again":
                p.grad = p.grad.clone()
            elif mode == "partial_again" and i % 3 == 1:
                p.grad = None
        torch.manual_seed(seed + 2)
        y = call(x)
        y = y[0] if isinstance(y, tuple) else y
        g = torch.Generator().manual_seed(seed + 4)
        (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    return None


def flatten(items):
    out = []
    for t in items:
        if isinstance(t, tuple):
            out.extend(flatten(t))
        elif isinstance(t, torch.Tensor):
            out.append(t)
    return out


def block_hidden(block):
    cfg = getattr(block, "config", None) or getattr(block, "_probe_config")
    return cfg.hidden_size


def run_lm(model, case, seed):
    cfg = model.config
    g = torch.Generator().manual_seed(seed + 1)
    B, S = case.get("shape", [2, 6])
    ids = torch.randint(0, cfg.vocab_size, (B, S), generator=g)
    loss, logits, _ = model(ids, labels=ids)
    for p in model.parameters():
        p.grad = None
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return {"y": logits.detach().clone(), "loss": loss.detach().clone(), "extras": [], "x_grad": None,
            "grads": grads}


def main():
    case = json.loads(sys.argv[1])
    seed = case.get("seed", 0)
    dtype = DTYPES[case.get("dtype", "float32")]
    module = load_module(case)
    cfg = module.tiny_config(**case.get("config", {}))
    torch.manual_seed(seed)
    kind = case.get("kind", "block")
    cls = getattr(module, module.CAUSAL_LM_CLASS if kind == "lm" else module.BLOCK_CLASS)
    model = cls(cfg)
    blocks = moe_blocks(model, module.BLOCK_CLASS)
    for b in blocks:
        b.__dict__.setdefault("_probe_config", cfg)
    at_build = [patch_state(b) for b in blocks]
    if not case.get("keep_init"):
        init_tensors(model, cfg.hidden_size, seed)
    apply_post(module, model, blocks, case.get("post", []))
    model.train(case.get("train", True))
    hooked = []
    if case.get("hook_router"):
        # what transformers 5's output recorders do to collect router logits for the aux loss
        def record(mod, args, out):
            hooked.append(flatten(out if isinstance(out, tuple) else (out,))[0].detach().clone())

        for b in blocks:
            (getattr(b, "gate", None) or getattr(b, "router")).register_forward_hook(record)

    def go():
        if kind == "lm":
            return run_lm(model, case, seed)
        res = run_block(model, case, dtype, model, seed)
        if case.get("reference64"):
            # the block's own forward in the working dtype, and in float64 on the same (rounded) weights
            try:
                res["orig"] = run_block(model, case, dtype, lambda x: type(model).forward(model, x), seed)
            except RuntimeError as e:  # autocast cases: some upstream loops cannot run them
                res["orig_error"] = str(e)
            ref = copy.deepcopy(model).double()
            # outside autocast: CPU autocast of older torch also casts float64 matmuls to bf16
            with torch.autocast("cpu", enabled=False):
                res["ref64"] = run_block(ref, case, torch.float64, lambda x: type(ref).forward(ref, x), seed)
        return res

    if dtype != torch.float32:
        model.to(dtype)
    info = {"module": module.__name__, "block_type": cls.__name__, "n_blocks": len(blocks),
            "at_build": at_build,
            "preimported_before_hook": getattr(builtins, "__moepatch_test_preimported__", None)}
    if case.get("fork"):
        out = case["out"]
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                res = go()
                res["child_after"] = [patch_state(b) for b in blocks]
                torch.save(res, out + ".child")
                code = 0
            except BaseException:
                traceback.print_exc()
            finally:
                os._exit(code)  # a forked worker never runs the parent's exit handlers
        _, status = os.waitpid(pid, 0)
        info["child_status"] = status
        res = torch.load(out + ".child")
        info["after"] = res.pop("child_after")
        info["forked"] = True
    else:
        if case.get("autocast"):
            # what the HF Trainer / accelerate do with bf16=True: the step runs under autocast
            with torch.autocast("cpu", dtype=DTYPES[case["autocast"]]):
                res = go()
        else:
            res = go()
        res["hooked"] = hooked
        info["after"] = [patch_state(b) for b in blocks]
    torch.save(res, case["out"])
    sys.stdout.write(json.dumps(info) + "\n")


if __name__ == "__main__":
    main()
