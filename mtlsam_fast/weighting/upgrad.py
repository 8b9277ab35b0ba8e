"""UPGrad and DualProj: projections onto the dual cone of the task gradients.

Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", 2024
(https://arxiv.org/abs/2406.16232); reference implementation: torchjd
(https://github.com/TorchJD/torchjd), ``UPGrad`` and ``DualProj``.

The dual cone of ``{g_j}`` is ``{x : <g_j, x> >= 0 for all j}``. Projecting ``u^T G`` onto it is,
in the weights' space, the QP ``min 1/2 v^T Gamma v  s.t.  v >= u`` (its optimum ``v`` gives the
projection ``v^T G``, and ``Gamma v >= 0``: no task's loss increases to first order).
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import qp
from .base import Tensor, VectorOption, Weighting, check_qp_options, out_dtype


class _DualConeWeighting(Weighting):
    pref_vector = VectorOption(positive_sum=True)
    propagates_nonfinite = True  # the QP returns NaN for a non-finite Gram

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        *,
        max_iter: int = qp.DEFAULT_MAX_ITER,
        tol: float = qp.DEFAULT_TOL,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.pref_vector = pref_vector
        self.max_iter, self.tol = check_qp_options(max_iter, tol)

    def _pref(self, gram: Tensor) -> Tensor:
        K = gram.shape[0]
        if self.pref_vector is None:
            return torch.full((K,), 1.0 / K, dtype=torch.float64, device=gram.device)
        return self._option_on("pref_vector", self.pref_vector, K, gram.device)

    def _solve(self, gram: Tensor, lower: Tensor) -> Tensor:
        G = gram.to(torch.float64)
        G = 0.5 * (G + G.T)
        return ops.solve_qp(
            G.expand(*lower.shape[:-1], *G.shape),
            lower=lower,
            constraint="lower",
            max_iter=self.max_iter,
            tol=self.tol,
            backend=self.backend,
        )


class UPGrad(_DualConeWeighting):
    """Unconflicting projection of gradients: ``d = sum_i u_i Proj(g_i)``, ``Proj`` onto the dual
    cone.

    ``u`` is ``pref_vector`` (default ``1/K``: the average of the projected gradients). The K
    projections are K QPs ``min 1/2 v^T Gamma v  s.t.  v >= u_i e_i``, solved as one batched call of
    the shared QP solver (``ops.solve_qp``) to the KKT tolerance (no ``norm_eps``/``reg_eps``
    regularization is needed: the solver handles singular and badly scaled Gram matrices), and the
    weights are the sum of their solutions. ``<g_j, d> >= 0`` for every task; scaling all gradients
    scales ``d``; permuting the tasks permutes the weights.
    """

    name = "upgrad"

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        u = self._pref(gram)
        V = self._solve(gram, torch.diag(u))  # [K, K], row i: projection of u_i g_i
        return V.to(torch.float64).sum(0).to(out_dtype(gram))


class DualProj(_DualConeWeighting):
    """Projection of ``u^T G`` (default ``u = 1/K``: the mean gradient) onto the dual cone.

    One QP ``min 1/2 v^T Gamma v  s.t.  v >= u``; the weights are its solution ``v``.
    ``<g_j, d> >= 0`` for every task.
    """

    name = "dualproj"

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        v = self._solve(gram, self._pref(gram))
        return v.to(out_dtype(gram))
