"""PCD: priority-constrained descent, the first task primary and the others guaranteed progress.

"Not All Objectives Are Born Equal: Priority-Constrained Descent for Hierarchical Multi-Objective
Optimization", TMLR 2026 (https://openreview.net/forum?id=HT01yGHLEt); reference implementation
https://github.com/DaraVaram/priority-constrained-descent; torchjd 0.18's ``PCD``.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import qp
from .base import Tensor, Weighting, check_number, check_qp_options, check_vector, out_dtype

#: a constraint holds when violated by at most this times the largest diagonal entry of the
#: normalized Gram (torchjd's ``tol`` is 1e-9; the interior point stops at a relative KKT residual
#: of 1e-9, hence the margin)
FEASIBILITY_TOL = 1e-6


class PCD(Weighting):
    """Priority-constrained descent: ``d~ = argmin_d 1/2 ||d - g~_1||^2`` subject to
    ``<g~_j, d> >= tau_j ||g~_j||^2`` for every secondary task ``j >= 2``, rescaled to ``||g_1||``.

    ``g~_i = s_i g_i`` are normalized gradients, ``s_i = 1 / sqrt(v_i + eps)`` with ``v_i`` the
    bias-corrected EMA (decay ``beta``) of ``||g_i||^2`` over the calls (state). ``tau`` is the
    guaranteed fraction of each secondary task's normalized first-order progress (a number or one
    per secondary task, in [0, 1]). The first task (row 0 of the Gram) is the primary one: the
    method is not permutation equivariant.

    Solved through its dual on the Gram: ``d~ = g~_1 + sum_j mu_j g~_j`` with ``mu >= 0`` minimizing
    ``1/2 mu^T Gs mu - b^T mu``, ``Gs`` the secondary block of the normalized Gram and ``b_j = tau_j
    Gs_jj - <g~_j, g~_1>`` -- a bound-constrained QP for the shared solver
    (:func:`mtlsam_fast.ops.solve_qp`, ``lower=0``; ``max_iter``/``tol``). torchjd solves the same
    QP on the host with a dual active-set method (exact too; it synchronizes with the device). When
    the constraints cannot hold together (e.g. two opposite secondary gradients) the dual is
    unbounded; that is detected from the solution's constraint violation and, as in torchjd, the
    constraints are dropped (``d = g_1``). ``g_1 = 0``, or ``d~ = 0`` up to the Gram's rounding,
    gives ``d = 0``. With linearly dependent secondary gradients the multipliers are not unique
    (the direction is): they can differ from torchjd's while ``d`` agrees.
    """

    name = "pcd"
    STATE = ("sq_norm_ema", "n_steps")

    def __init__(
        self,
        tau: float | Tensor = 0.02,
        beta: float = 0.999,
        eps: float = 1e-8,
        *,
        max_iter: int = qp.DEFAULT_MAX_ITER,
        tol: float = qp.DEFAULT_TOL,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        if isinstance(tau, (int, float)) and not isinstance(tau, bool):
            self.tau: float | Tensor = check_number("tau", tau, low=0.0, high=1.0)
        else:
            vec = check_vector("tau", tau, low=0.0, high=1.0)
            assert vec is not None
            self.tau = vec
        self.beta = check_number("beta", beta, low=0.0, high=1.0, high_open=True)
        self.eps = check_number("eps", eps, low=0.0)
        self.max_iter, self.tol = check_qp_options(max_iter, tol)

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        return {
            "sq_norm_ema": torch.zeros(K, dtype=torch.float64, device=device),
            "n_steps": torch.zeros((), dtype=torch.float64, device=device),
        }

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        state = self._ensure_state(K, dev)
        G = gram.to(torch.float64)
        G = 0.5 * (G + G.T)
        finite = torch.isfinite(G).all()
        sq = G.diagonal().clamp(min=0)
        ema = self.beta * state["sq_norm_ema"] + (1 - self.beta) * sq
        n = state["n_steps"] + 1
        state["sq_norm_ema"].copy_(torch.where(finite, ema, state["sq_norm_ema"]))
        state["n_steps"].copy_(torch.where(finite, n, state["n_steps"]))
        denom = (ema / (1 - self.beta**n) + self.eps).sqrt()
        s = torch.where(denom > 0, 1.0 / torch.where(denom > 0, denom, 1.0), 0.0)
        Gn = G * s[:, None] * s[None, :]
        e1 = (torch.arange(K, device=dev) == 0).to(torch.float64)
        w = e1
        if K > 1:  # static: a single task has no constraint
            if isinstance(self.tau, Tensor):
                tau = self._option_on("tau", self.tau, K - 1, dev)
            else:
                tau = torch.full((K - 1,), self.tau, dtype=torch.float64, device=dev)
            Gs = Gn[1:, 1:]
            b = tau * Gs.diagonal() - Gn[1:, 0]
            mu = ops.solve_qp(
                Gs,
                -b,
                torch.zeros_like(b),
                constraint="lower",
                max_iter=self.max_iter,
                tol=self.tol,
                backend=self.backend,
            ).to(torch.float64)
            slack = Gs @ mu - b
            feasible = (slack >= -FEASIBILITY_TOL * Gn.diagonal().max()).all()
            feasible = feasible & torch.isfinite(mu).all()
            w = torch.where(feasible, torch.cat([e1[:1], mu.clamp(min=0)]), e1)
        # rescale d~ to ||g_1||, unless it vanishes up to the Gram's rounding
        dsq = w @ Gn @ w
        magnitude = (w.abs() @ Gn.diagonal().sqrt()) ** 2
        precision = 10 * torch.finfo(gram.dtype).eps
        nonzero = (dsq > precision * magnitude) & (sq[0] > 0)
        scale = torch.where(nonzero, (sq[0] / torch.where(nonzero, dsq, 1.0)).sqrt(), 0.0)
        return (w * s * scale).to(out_dtype(gram))

    def check_num_tasks(self, K: int) -> None:
        if isinstance(self.tau, Tensor) and self.tau.shape[0] != K - 1:
            raise ValueError(
                f"tau has {self.tau.shape[0]} entries but there are {K - 1} secondary tasks (K={K})"
            )
