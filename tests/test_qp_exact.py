"""``solve_qp`` at the exact optimum, on every backend, against an oracle independent of them all.

The oracle (``bench/qp_exactness.py``) enumerates the supports in rational arithmetic on the fp32
values the solver receives; K = 2 also has its closed form here. The families include the badly
scaled problems with a linear term on which the interior point (torch reference, the C++/CUDA
fallback, Triton) used to stop far from the optimum (its start put the variables of tiny
``Gamma_ii`` twelve orders of magnitude away; docs/ARCHITECTURE.md §4). This is the bounded
version; ``python -m bench.qp_exactness`` runs 1000 problems per family.
"""

from __future__ import annotations

import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

from mtlsam_fast import ops

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import qp_exactness as oracle

#: the example of the bug: v = (0.938, 0.062) came back, objective 1.89e12 for 1.15e12
ISSUE_GRAM = [[6.2747e12, 1.7481], [1.7481, 1.4943e-11]]
ISSUE_Q = [-1.0479e12, 1.7892e12]


def closed_form_k2(G: np.ndarray, q: np.ndarray) -> Fraction:
    """First weight of ``min 1/2 v'Gv + q'v`` over the 2-simplex, exactly (G PSD)."""
    (a, b), (_, c) = [[Fraction(float(x)) for x in row] for row in G]
    q0, q1 = (Fraction(float(x)) for x in q)
    curv = a - 2 * b + c
    if curv <= 0:  # linear along the simplex: the better vertex
        return Fraction(1) if q0 + a / 2 <= q1 + c / 2 else Fraction(0)
    return min(max((c - b + q1 - q0) / curv, Fraction(0)), Fraction(1))


def backends() -> list[str]:
    return ops.available_backends(torch.device("cpu"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", backends())
def test_issue_example(backend, dtype):
    G = torch.tensor(ISSUE_GRAM, dtype=dtype)
    q = torch.tensor(ISSUE_Q, dtype=dtype)
    v = ops.solve_qp(G, q, backend=backend)
    t = float(closed_form_k2(G.double().numpy(), q.double().numpy()))
    assert abs(float(v[0]) - t) < 1e-6 and abs(float(v[1]) - (1 - t)) < 1e-6, (v, t)
    assert float(ops.kkt_residual(G, v, q)) < 1e-6


@pytest.mark.parametrize("backend", backends())
def test_k2_closed_form_over_scales(backend):
    """K = 2 with per-task gradient norms 10^-6 .. 10^6 and a linear term, many seeds."""
    fam = next(f for f in oracle.FAMILIES if f.name == "k2_spread_linear")
    n = 40 if backend == "triton" else 400  # (the interpreter runs one problem at a time)
    G, q, _ = oracle.draw(fam, n, seed=123)
    v = ops.solve_qp(G, q, backend=backend).double()
    for b in range(n):
        t = closed_form_k2(G[b].double().numpy(), q[b].double().numpy())
        assert abs(float(v[b, 0]) - float(t)) <= 1e-6, (b, v[b], float(t))


@pytest.mark.parametrize("backend", backends())
@pytest.mark.parametrize("family", [f.name for f in oracle.FAMILIES])
def test_families_against_the_exact_optimum(backend, family):
    fam = next(f for f in oracle.FAMILIES if f.name == family)
    n = 6 if backend == "triton" else 60
    failed, total, kkt, excess = oracle.failures(fam, n, seed=2024, backend=backend)
    assert failed == 0, (failed, total, kkt, excess)


def test_oracle_detects_a_wrong_point():
    """The check itself fails the old answer of the issue's example (and a near miss)."""
    G = np.array(ISSUE_GRAM, dtype=np.float32).astype(np.float64)
    q = np.array(ISSUE_Q, dtype=np.float32).astype(np.float64)
    f_star = oracle.exact_optimum(G, q, None, "simplex")
    assert f_star is not None
    t = float(closed_form_k2(G, q))
    assert abs(oracle.objective_excess(G, q, np.array([t, 1 - t]), f_star, True)) < 1e-12
    assert oracle.objective_excess(G, q, np.array([0.938, 0.062]), f_star, True) > 0.5
    assert oracle.objective_excess(G, q, np.array([t + 1e-3, 1 - t - 1e-3]), f_star, True) > 1e-6


def test_linear_term_batch_over_seeds():
    """tests/test_qp.py's batch with a linear term (it passed only with its fixed seed)."""
    from test_qp import KINDS, SIZES, gram_of, make_gradients

    for seed in range(30):
        gen = torch.Generator().manual_seed(seed)
        for K in SIZES:
            G = torch.stack([gram_of(make_gradients(k, K, seed)) for k in KINDS])
            scale = G.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).clamp_min(1e-30)
            q = torch.randn(len(KINDS), K, generator=gen) * scale
            for backend in ("torch", "cpu"):
                v = ops.solve_qp(G, q, backend=backend)
                res = ops.kkt_residual(G, v, q)
                assert float(res.max()) <= 1e-5, (seed, K, backend, res)
