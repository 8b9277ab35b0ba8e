#!/usr/bin/env python
"""How often ``ops.solve_qp`` misses the exact optimum, per problem family and backend.

    python -m bench.qp_exactness                 # 1000 problems per family, torch and cpu
    TRITON_INTERPRET=1 python -m bench.qp_exactness --n 100 --backends triton  # Triton on CPU

Each family draws fp32 Gram matrices of per-task gradients (the kinds docs/ARCHITECTURE.md §4
promises: per-task gradient norms 1e-6 .. 1e6, i.e. Gram diagonals 1e-12 .. 1e12; rank-deficient;
a whole problem scaled by 1e-12 .. 1e12), with or without a linear term, and solves them in one
batched call per backend. The oracle is independent of every solver: the exact optimum by
enumeration of the supports in rational arithmetic (:class:`fractions.Fraction`) on the very fp32
values the solver received -- each support's KKT system solved exactly, the KKT point of least
objective kept. A problem fails when the relative KKT residual (``ops.kkt_residual``) exceeds the
1e-5 target or the objective exceeds the optimum by more than ``OBJ_TOL`` (relative to the
problem's scale, see :func:`objective_excess`). ``tests/test_qp_exact.py`` runs a bounded version.
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mtlsam_fast import ops

KKT_TARGET = 1e-5
#: objective excess allowed, relative to max(|f*|, f_range); f_range: see objective_excess
OBJ_TOL = 1e-6


@dataclass(frozen=True)
class Family:
    """A family of random problems: K tasks, per-task gradient norms 10^U(-s, s) (``spread``: the
    K norms 10^-s .. 10^s evenly in log, shuffled, as tests/test_qp.py's "scaled" kind, each
    times 10^U(-1/2, 1/2)), optional rank, a whole-problem scale 10^U(-g, g), a linear term or
    none, the constraint."""

    name: str
    K: int
    task_scale: float = 0.0  # log10 of the largest per-task gradient norm factor
    spread: bool = False
    rank: int | None = None
    global_scale: float = 0.0  # log10 of the largest scale of the whole problem (Gamma and q)
    linear: bool = True
    constraint: str = "simplex"


FAMILIES = [
    Family("k2_scaled_linear", 2, task_scale=6.0),
    Family("k2_spread_linear", 2, task_scale=6.0, spread=True),
    Family("k4_scaled_linear", 4, task_scale=6.0),
    Family("k4_spread_linear", 4, task_scale=6.0, spread=True),
    Family("k4_spread_mgda", 4, task_scale=6.0, spread=True, linear=False),
    Family("k5_rankdef_linear", 5, task_scale=3.0, rank=2),
    Family("k4_global_scale_linear", 4, task_scale=1.0, global_scale=12.0),
    Family("k4_lower_scaled_linear", 4, task_scale=3.0, constraint="lower"),
]


def draw(
    fam: Family, n: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``n`` problems of ``fam`` as fp32 tensors (gram [n, K, K], q [n, K] or None, lower)."""
    gen = np.random.default_rng(seed)
    K, P = fam.K, 2 * fam.K + 3
    if fam.rank is None:
        g = gen.standard_normal((n, K, P))
    else:
        g = gen.standard_normal((n, K, fam.rank)) @ gen.standard_normal((n, fam.rank, P))
    if fam.spread:
        log_norm = np.linspace(-fam.task_scale, fam.task_scale, K)[
            gen.permuted(np.tile(np.arange(K), (n, 1)), axis=1)
        ] + gen.uniform(-0.5, 0.5, (n, K))
    else:
        log_norm = gen.uniform(-fam.task_scale, fam.task_scale, (n, K))
    g = g * 10.0 ** log_norm[:, :, None]
    gram = g @ g.transpose(0, 2, 1)
    scale = 10.0 ** gen.uniform(-fam.global_scale, fam.global_scale, (n, 1))
    gram = gram * scale[:, :, None]
    q = None
    if fam.linear:  # as tests/test_qp.py: a linear term of the size of the largest diagonal
        q = gen.standard_normal((n, K)) * gram.diagonal(axis1=1, axis2=2).max(1, keepdims=True)
    lower = gen.uniform(0.0, 1.0 / K, (n, K)) if fam.constraint == "lower" else None
    as_t = lambda a: None if a is None else torch.from_numpy(a).float()  # noqa: E731
    return as_t(gram), as_t(q), as_t(lower)


def _solve_exact(A: list[list[Fraction]], b: list[Fraction]) -> list[Fraction] | None:
    """Gaussian elimination in rationals; None when A is singular."""
    n = len(b)
    M = [[*row[:], bi] for row, bi in zip(A, b, strict=True)]
    for col in range(n):
        piv = next((r for r in range(col, n) if M[r][col] != 0), None)
        if piv is None:
            return None
        M[col], M[piv] = M[piv], M[col]
        for r in range(col + 1, n):
            f = M[r][col] / M[col][col]
            if f:
                for c in range(col, n + 1):
                    M[r][c] -= f * M[col][c]
    x = [Fraction(0)] * n
    for r in range(n - 1, -1, -1):
        x[r] = (M[r][n] - sum(M[r][c] * x[c] for c in range(r + 1, n))) / M[r][r]
    return x


def _objective(G: list[list[Fraction]], q: list[Fraction], v: list[Fraction]) -> Fraction:
    K = len(v)
    return sum(
        (Fraction(1, 2) * v[i] * G[i][j] * v[j] for i in range(K) for j in range(K)), Fraction(0)
    ) + sum((q[i] * v[i] for i in range(K)), Fraction(0))


def exact_optimum(
    gram: np.ndarray, q: np.ndarray | None, lower: np.ndarray | None, constraint: str
) -> Fraction | None:
    """The least objective over the KKT points of every support, exactly (None: none found)."""
    K = gram.shape[0]
    G = [[Fraction(float(gram[i, j])) for j in range(K)] for i in range(K)]
    G = [[(G[i][j] + G[j][i]) / 2 for j in range(K)] for i in range(K)]  # the solver's sym(Gamma)
    qf = [Fraction(0)] * K if q is None else [Fraction(float(x)) for x in q]
    lo = [Fraction(0)] * K if lower is None else [Fraction(float(x)) for x in lower]
    best: Fraction | None = None
    for size in range(1, K + 1) if constraint == "simplex" else range(K + 1):
        for S in itertools.combinations(range(K), size):
            N = [i for i in range(K) if i not in S]
            s = len(S)
            if constraint == "simplex":  # [G_SS 1; 1^T 0] [v_S; -y] = [-q_S; 1]
                A = [[G[i][j] for j in S] + [Fraction(1)] for i in S] + [
                    [Fraction(1)] * s + [Fraction(0)]
                ]
                sol = _solve_exact(A, [-qf[i] for i in S] + [Fraction(1)])
                if sol is None:
                    continue
                v = [Fraction(0)] * K
                for p, i in enumerate(S):
                    v[i] = sol[p]
                y = -sol[s]
                if any(v[i] < 0 for i in S):
                    continue
            else:  # G_SS v_S = -q_S - G_SN lo_N, v_N = lo_N
                v = lo[:]
                if s:
                    sol = _solve_exact(
                        [[G[i][j] for j in S] for i in S],
                        [-qf[i] - sum((G[i][j] * lo[j] for j in N), Fraction(0)) for i in S],
                    )
                    if sol is None:
                        continue
                    for p, i in enumerate(S):
                        v[i] = sol[p]
                y = Fraction(0)
                if any(v[i] < lo[i] for i in S):
                    continue
            grad = [sum((G[i][j] * v[j] for j in range(K)), qf[i]) for i in range(K)]
            if any(grad[i] - y < 0 for i in N):
                continue
            f = _objective(G, qf, v)
            if best is None or f < best:
                best = f
    return best


def objective_excess(
    gram: np.ndarray, q: np.ndarray | None, v: np.ndarray, f_star: Fraction, simplex: bool
) -> float:
    """``(f(v) - f*) / max(|f*|, f_range)``, exactly, with ``f_range = 1e-12 max(max Gamma_ii,
    max |q|)`` (below it lies the rounding of v to fp32: a relative 6e-8 in each weight)."""
    K = gram.shape[0]
    G = [[Fraction(float(gram[i, j])) for j in range(K)] for i in range(K)]
    G = [[(G[i][j] + G[j][i]) / 2 for j in range(K)] for i in range(K)]
    qf = [Fraction(0)] * K if q is None else [Fraction(float(x)) for x in q]
    vf = [Fraction(float(x)) for x in v]
    if simplex:  # the weights rounded to fp32 miss sum v = 1 by ~6e-8, which a large linear term
        # would turn into an objective change: compare the point itself, normalized exactly
        vf = [x / sum(vf) for x in vf]
    f = _objective(G, qf, vf)
    scale_ref = max(float(np.abs(np.diag(gram)).max()), 0.0 if q is None else float(abs(q).max()))
    denom = max(abs(float(f_star)), 1e-12 * scale_ref, 1e-300)
    return float(f - f_star) / denom


def failures(fam: Family, n: int, seed: int, backend: str) -> tuple[int, int, float, float]:
    """(failed, total, worst KKT residual, worst relative objective excess) of ``backend``."""
    gram, q, lower = draw(fam, n, seed)
    v = ops.solve_qp(gram, q, lower, constraint=fam.constraint, backend=backend)
    kkt = ops.kkt_residual(gram, v, q, lower, constraint=fam.constraint)
    failed, worst_obj = 0, 0.0
    for b in range(n):
        qb = None if q is None else q[b].double().numpy()
        lb = None if lower is None else lower[b].double().numpy()
        gb = gram[b].double().numpy()
        f_star = exact_optimum(gb, qb, lb, fam.constraint)
        if f_star is None:  # no support certified (cannot happen for PD Gamma): counted as failed
            failed += 1
            continue
        vb = v[b].double().numpy()
        excess = (
            objective_excess(gb, qb, vb, f_star, fam.constraint == "simplex")
            if np.isfinite(vb).all()
            else math.inf
        )
        worst_obj = max(worst_obj, excess)
        failed += int(not (float(kkt[b]) <= KKT_TARGET and excess <= OBJ_TOL))
    return failed, n, float(kkt.max()), worst_obj


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=1000, help="problems per family (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the draws")
    p.add_argument("--backends", nargs="+", default=["torch", "cpu"], help="backends to measure")
    p.add_argument("--families", nargs="+", default=[f.name for f in FAMILIES])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'family':26s} {'backend':8s} {'failed':>12s} {'max KKT':>10s} {'max excess':>11s}")
    for i, fam in enumerate(FAMILIES):
        if fam.name not in args.families:
            continue
        for backend in args.backends:
            bad, n, kkt, obj = failures(fam, args.n, args.seed + 7919 * i, backend)
            print(f"{fam.name:26s} {backend:8s} {bad:5d} / {n:<5d} {kkt:10.2e} {obj:11.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
