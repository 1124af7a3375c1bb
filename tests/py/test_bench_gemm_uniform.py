"""tests/bench/bench_gemm.py's uniform rows: each cuBLAS strided-batched anchor computes the grouped GEMM
that our call is given (same operands, same output shape), checked on the CPU against the per-expert
definition in float64; the GPU run then compares the two outputs and times them."""

import os
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "bench"))
import bench_gemm  # noqa: E402


def test_uniform_anchors_are_the_grouped_gemms():
    E, H, I, m = 4, 64, 32, 8
    plist, keep = bench_gemm.uniform_problems(torch, E, H, I, m, torch.Generator().manual_seed(0), "cpu")
    x, dy, a, dh, w_gu, w_dn, _ = keep

    def rows(t, e):
        return t[e * m:(e + 1) * m].double()

    want = {  # expert e's block of the output, as the grouped problem defines it
        "uniform fwd gate_up": lambda e: rows(x, e) @ w_gu[e].double().T,
        "uniform fwd down": lambda e: rows(a, e) @ w_dn[e].double().T,
        "uniform bwd dgrad down": lambda e: rows(dy, e) @ w_dn[e].double(),
        "uniform bwd dgrad gate_up": lambda e: rows(dh, e) @ w_gu[e].double(),
        "uniform bwd wgrad down": lambda e: rows(dy, e).T @ rows(a, e),
        "uniform bwd wgrad gate_up": lambda e: rows(dh, e).T @ rows(x, e),
    }
    assert sorted(want) == sorted(p[0] for p in plist)
    for name, flops, g, out, anchor in plist:
        got = anchor()
        assert got.numel() == out.numel() and out.view(got.shape).shape == got.shape, name
        assert g.E == E and g.varlen_k == (name.startswith("uniform bwd wgrad")), name
        for e in range(E):
            ref = want[name](e)
            err = ((got[e].double() - ref).abs().max() / ref.abs().max()).item()
            # a wrong operand or transpose is off by O(1); 5e-2, not the bf16 contract's 1e-2: the CPU
            # bf16 matmul of some torch builds (Debian's 1.13 on AVX2) accumulates in bf16, measured
            # 1.2 % here and 1.9 % on a 256-deep product
            assert err < 5e-2, (name, e, err)
        assert flops == 2.0 * E * m * H * I * (2 if "gate_up" in name else 1), name
