"""CAGrad's inner problem (``solve_qp(..., norm_coef=r)``) in the compiled solvers against the torch
reference, per dtype: ``qp_solve_norm_one`` of csrc/qp_core.h (the ``cpu`` backend; ``cuda`` runs
the same code with a warp per problem, compared here when a GPU is present)."""

from __future__ import annotations

import pytest
import torch

from mtlsam_fast import ops

KINDS = ["random", "scaled", "rankdef", "opposite", "identical"]


def compiled_backends(device: torch.device) -> list[str]:
    return [b for b in ("cpu", "cuda") if b in ops.available_backends(device)]


def cagrad_problems(K: int, dtype: torch.dtype, seed: int = 0):
    """CAGrad's inner problems of every kind: gram [n, K, K], b = Gamma 1 / K, r = 0.4 ||g0||."""
    gen = torch.Generator().manual_seed(seed + K)
    gs = []
    for kind in KINDS:
        P = 2 * K + 3
        if kind == "rankdef":
            g = torch.randn(K, max(1, K // 3), generator=gen, dtype=torch.float64) @ torch.randn(
                max(1, K // 3), P, generator=gen, dtype=torch.float64
            )
        elif kind == "identical":
            g = torch.randn(1, P, generator=gen, dtype=torch.float64).expand(K, P).clone()
        else:
            g = torch.randn(K, P, generator=gen, dtype=torch.float64)
        if kind == "scaled":  # gradient norms 1e-3 .. 1e3 (1e-1 .. 10: fp16's range)
            e = 1.0 if dtype in (torch.float16, torch.bfloat16) else 3.0
            g = g * torch.logspace(-e, e, K, dtype=torch.float64)[:, None]
        if kind == "opposite":
            g[K // 2 : 2 * (K // 2)] = -g[: K // 2]
        gs.append(g)
    G = torch.stack([g @ g.T for g in gs]).to(dtype)
    Gd = G.double()
    b = Gd.mean(-1)
    r = 0.4 * Gd.mean((-1, -2)).clamp_min(0.0).sqrt()
    kernel_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    return G, b.to(kernel_dtype), r.to(kernel_dtype)


def norm_objective(G: torch.Tensor, b: torch.Tensor, r: torch.Tensor, v: torch.Tensor):
    G, b, r, v = G.double(), b.double(), r.double(), v.double()
    quad = (v.unsqueeze(-2) @ G @ v.unsqueeze(-1)).squeeze(-1).squeeze(-1).clamp_min(0.0)
    return (b * v).sum(-1) + r * quad.sqrt()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("K", [2, 3, 8, 17, 64])
def test_norm_objective_matches_the_reference(device, dtype, K):
    G, b, r = cagrad_problems(K, dtype)
    G, b, r = G.to(device), b.to(device), r.to(device)
    ref = ops.solve_qp(G, b, norm_coef=r, backend="torch")
    f_ref = norm_objective(G, b, r, ref)
    dmax = G.double().diagonal(0, -2, -1).amax(-1)
    # (the floor: opposite gradients make b = r = 0, every point optimal, f = 0 up to rounding)
    unit = b.double().abs().amax(-1) + r.double() * dmax.sqrt() + 1e-9 * dmax
    for name in compiled_backends(device):
        v = ops.solve_qp(G, b, norm_coef=r, backend=name)
        assert v.dtype == ref.dtype and v.shape == ref.shape
        assert torch.isfinite(v).all() and (v >= 0).all()
        assert torch.allclose(v.double().sum(-1), torch.ones(len(KINDS), dtype=torch.float64))
        f = norm_objective(G, b, r, v)
        # the same optimum: the objective to 1e-7 of the problem scale (fp32 weights round at 6e-8;
        # on the kink Gamma v = 0 the reference itself resolves ~1e-8)
        assert ((f - f_ref).abs() <= 1e-7 * unit).all(), (name, f - f_ref, unit)
        smooth = torch.tensor([k in ("random", "scaled") for k in KINDS], device=device)
        # a unique, smooth optimum: the weights themselves agree
        tol = 1e-9 if dtype == torch.float64 else 2e-5
        assert torch.allclose(v[smooth].double(), ref[smooth].double(), atol=tol), (name, v, ref)


def test_norm_batched_one_coefficient_and_nonfinite(device):
    """A batch with one coefficient for all, a per-problem one, NaN / negative r: NaN rows only."""
    G, b, r = cagrad_problems(5, torch.float32, seed=3)
    G, b, r = G.to(device), b.to(device), r.to(device)
    bad = r.clone()
    bad[1] = -1.0
    bad[3] = float("nan")
    for name in compiled_backends(device):
        one = ops.solve_qp(G, b, norm_coef=r[0], backend=name)
        ref_one = ops.solve_qp(G, b, norm_coef=r[0], backend="torch")
        # (rows 0, 1: random and scaled gradients, a unique optimum)
        assert torch.allclose(one[:2], ref_one[:2], atol=2e-5, rtol=0), (name, one, ref_one)
        out = ops.solve_qp(G, b, norm_coef=bad, backend=name)
        nan_rows = torch.isnan(out).all(-1)
        assert nan_rows.tolist() == [False, True, False, True, False], (name, out)
        batched = ops.solve_qp(G.reshape(5, 1, 5, 5), b.reshape(5, 1, 5), norm_coef=r.reshape(5, 1))
        assert batched.shape == (5, 1, 5)
        with pytest.raises(ValueError, match="one coefficient per problem"):
            ops.solve_qp(G, b, norm_coef=r[:2], backend=name)
        with pytest.raises(ValueError, match="simplex"):
            ops.solve_qp(G, b, norm_coef=r, constraint="lower", backend=name)
