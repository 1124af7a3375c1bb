"""The fp32-logits router's backward on tensor cores (MOEPATCH_FAST_ROUTER) on a GPU: torch.mm's fp32
output of bf16 operands and the glue's three-part split of dlogits, against float64 and against torch's
own fp32 path (x.float() @ w.float(), what the families compute), at router shapes of the shipped
models and odd ones. In-process: the glue's functions run against a stand-in module (no kernels of
ours)."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA device: GPU tests skipped", allow_module_level=True)

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "py"))
from moepatch_testlib import glue_namespace, rel_err as rel  # noqa: E402

FP32_TOL = 1e-5
# (T, H, E): Ring-mini-2.0, DeepSeek-V3 width with 256 experts, GLM-4.5-Air-like, and odd sizes
SHAPES = [(4096, 2048, 256), (1024, 7168, 256), (2048, 4096, 128), (1, 64, 8), (333, 200, 24)]


def inputs(T, H, E, seed):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, generator=g, device="cuda").to(torch.bfloat16)
    w = (torch.randn(E, H, generator=g, device="cuda") * H ** -0.5).to(torch.bfloat16)
    dl = torch.randn(T, E, generator=g, device="cuda") * 1e-3
    return x, w, dl


@pytest.mark.parametrize("T, H, E", SHAPES)
def test_logits_are_torch_fp32_and_fp32_grads_near_float64(T, H, E):
    ns = glue_namespace()
    x, w, dl = inputs(T, H, E, seed=T + E)
    fn = ns["_router_fn"](torch, x, w)
    assert fn is not None, "the fast router is not taken on this GPU's torch"
    assert torch.equal(fn.apply(x, w), torch.nn.functional.linear(x.float(), w.float()))
    x64, w64, dl64 = x.double(), w.double(), dl.double()
    dx, dw = ns["_router_grads32"](torch, x, w, dl, True, True)
    for name, got, ref in (("dx", dx, dl64 @ w64), ("dw", dw, dl64.t() @ x64)):
        assert got.dtype == torch.float32, name
        # tensor-core sums truncate: ~1e-5 over thousands of rows, 100x below bf16's rounding
        err = rel(got, ref)
        print("%s T=%d H=%d E=%d: fp32 rel err %.2e" % (name, T, H, E, err))
        assert err < 1e-4, (name, err)


@pytest.mark.parametrize("T, H, E", SHAPES)
def test_bf16_grads_within_one_unit_of_torch_path(T, H, E):
    ns = glue_namespace()
    x, w, dl = inputs(T, H, E, seed=7 + T)
    fn = ns["_router_fn"](torch, x, w)
    xa, wa = x.clone().requires_grad_(), w.clone().requires_grad_()
    fn.apply(xa, wa).backward(dl)
    xb, wb = x.clone().requires_grad_(), w.clone().requires_grad_()
    torch.nn.functional.linear(xb.float(), wb.float()).backward(dl)
    x64, w64, dl64 = x.double(), w.double(), dl.double()
    for name, got, want, ref in (("dx", xa.grad, xb.grad, dl64 @ w64),
                                 ("dw", wa.grad, wb.grad, dl64.t() @ x64)):
        assert got.dtype == torch.bfloat16 and torch.isfinite(got).all(), name
        g, t = got.double(), want.double()
        differ = (got != want).double().mean().item()
        err, err_torch = rel(got, ref), rel(want, ref)
        print("%s T=%d H=%d E=%d: bf16 rel err %.3e (torch path %.3e), %.2f%% of elements differ"
              % (name, T, H, E, err, err_torch, 100 * differ))
        assert differ < 0.05 and err <= 1.05 * err_torch + 1e-6, (name, differ, err, err_torch)
        # both round fp32 sums ~1e-5 apart: one bf16 unit (2^-7 relative) apart at most, plus the
        # sums' own error where terms cancel (bounded by the sum of the terms' magnitudes)
        terms = dl64.abs() @ w64.abs() if name == "dx" else dl64.abs().t() @ x64.abs()
        assert ((g - t).abs() <= t.abs() * 2 ** -7 + 1e-4 * terms).all(), name


@pytest.mark.parametrize("opts, x_dtype, w_dtype", [
    ({"fast_router": False}, torch.bfloat16, torch.bfloat16),
    ({}, torch.float32, torch.bfloat16),  # fp32 activations (autocast over an fp32 residual stream)
    ({}, torch.bfloat16, torch.float32),  # an fp32 gate
    ({}, torch.float16, torch.float16),   # fp16: its range cannot hold the split's small parts
])
def test_router_fn_refused_where_it_does_not_apply(opts, x_dtype, w_dtype):
    x = torch.zeros(2, 4, dtype=x_dtype, device="cuda")
    w = torch.zeros(3, 4, dtype=w_dtype, device="cuda")
    assert glue_namespace(opts)["_router_fn"](torch, x, w) is None
