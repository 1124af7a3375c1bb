"""The fp32-logits router's backward on tensor cores (MOEPATCH_FAST_ROUTER, preload/glue.py:
_router_fn, _split3, _router_grads32, MoERouterFn). On the CPU the glue's _mm32 is torch's fp32 matmul
of the same bf16 values, so these tests check the algebra: the three-part split of an fp32 tensor, the
logits (torch's own), and dx and dw against float64 at fp32 accuracy. The GPU families tests
(tests/gpu) run the real path in every fp32-logits family's bf16 cases, and
tests/gpu/test_gpu_router.py the tensor-core GEMMs themselves."""

import pytest

torch = pytest.importorskip("torch")

from moepatch_testlib import glue_namespace as glue, rel_err as rel  # noqa: E402

FP32_TOL = 1e-5


def test_split3_holds_fp32_to_its_last_bit():
    g = glue()
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(64, 96, generator=gen) * torch.logspace(-30, 30, 96)  # every exponent range
    parts = g["_split3"](torch, t)
    assert parts.dtype == torch.bfloat16 and parts.shape == (64, 288)
    hi, mid, lo = (p.double() for p in parts.split(96, dim=1))
    diff = ((hi + mid + lo) - t.double()).abs()
    # below one fp32 ulp: nothing of t is lost, where the third part is a normal bf16 (|t| > 2^-100);
    # under that, lo rounds to bf16's subnormal spacing (2^-133), as fp32's own ulp does there
    normal = t.double().abs() > 2 ** -100
    assert normal.float().mean().item() > 0.9  # the relative check below is most of the cases
    assert (diff[normal] / t.double().abs()[normal]).max().item() < 2 ** -24
    assert diff.max().item() <= 2 ** -134
    # two parts do not hold it: the third is needed (a split that dropped lo would pass nothing)
    assert (((hi + mid) - t.double()).abs() / t.double().abs()).max().item() > 2 ** -20


@pytest.mark.parametrize("T, H, E", [(1, 8, 4), (33, 64, 16), (257, 128, 40)])
def test_router_fn_matches_float64(T, H, E):
    g = glue()
    fn = g["_make_router_fn"](torch)
    gen = torch.Generator().manual_seed(T)
    x = torch.randn(T, H, generator=gen).to(torch.bfloat16).requires_grad_()
    w = (torch.randn(E, H, generator=gen) * H ** -0.5).to(torch.bfloat16).requires_grad_()
    dl = torch.randn(T, E, generator=gen) * 1e-3  # fp32 values bf16 cannot hold
    logits = fn.apply(x, w)
    logits.backward(dl)
    x64, w64, dl64 = x.detach().double(), w.detach().double(), dl.double()
    assert torch.equal(logits, torch.nn.functional.linear(x.detach().float(), w.detach().float()))
    assert rel(logits, x64 @ w64.t()) < FP32_TOL
    # the fp32 results before autograd's rounding to bf16: compare what torch's own path gives
    xr, wr = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    torch.nn.functional.linear(xr.float(), wr.float()).backward(dl)
    assert x.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    for got, ref, exact in ((x.grad, xr.grad, dl64 @ w64), (w.grad, wr.grad, dl64.t() @ x64)):
        # both rounded to bf16 from fp32 results ~1e-7 apart: equal but for rare last-bit ties
        assert rel(got, exact) < 1e-2 and rel(got, exact) <= rel(ref, exact) * 1.01 + 1e-6
        assert (got != ref).float().mean().item() < 0.01


def test_router_fn_fp32_results_before_rounding():
    """dx and dw in fp32 (the Function's values before .to(bf16)): the split must keep fp32 accuracy,
    which a single bf16 part of dlogits (2^-9) would miss by far."""
    g = glue()
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(300, 64, generator=gen).to(torch.bfloat16)
    w = torch.randn(24, 64, generator=gen).to(torch.bfloat16)
    dl = torch.randn(300, 24, generator=gen)
    dx, dw = g["_router_grads32"](torch, x, w, dl, True, True)
    assert g["_router_grads32"](torch, x, w, dl, False, False) == (None, None)
    x64, w64, dl64 = x.double(), w.double(), dl.double()
    assert rel(dx, dl64 @ w64) < FP32_TOL and rel(dw, dl64.t() @ x64) < FP32_TOL
    one = g["_mm32"](torch, dl.to(torch.bfloat16), w)
    assert rel(one, dl64 @ w64) > 10 * FP32_TOL  # the test can tell a one-part split


def test_router_fn_cpu_never_fast():
    g = glue()
    x, w = torch.zeros(2, 4, dtype=torch.bfloat16), torch.zeros(3, 4, dtype=torch.bfloat16)
    assert g["_router_fn"](torch, x, w) is None
