"""MGDA: the min-norm point of the convex hull of the task gradients.

Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018
(https://arxiv.org/abs/1810.04650); Désidéri, "Multiple-gradient descent algorithm", 2012.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import qp
from .base import Tensor, Weighting, check_choice, check_qp_options, out_dtype

NORMALIZATIONS = ("none", "l2", "loss", "loss+")


class MGDA(Weighting):
    """Exact min-norm weights: ``min ||sum_i v_i g_i / n_i||^2`` over the simplex.

    ``normalization`` picks ``n_i`` as in the paper's code: ``"none"`` (1), ``"l2"`` (``||g_i||``),
    ``"loss"`` (``L_i``), ``"loss+"`` (``L_i ||g_i||``). The returned weights are ``v_i / n_i``, so
    the direction ``d = weights^T G`` is the min-norm element of the normalized gradients' hull and
    ``<g_i, d> >= ||d||^2 n_i >= 0`` for every task (a common descent direction). The QP is solved
    exactly by the shared QP solver (:func:`mtlsam_fast.ops.solve_qp`), not to 1e-3.
    """

    name = "mgda"
    propagates_nonfinite = True  # the QP returns NaN weights for a non-finite Gram

    def __init__(
        self,
        normalization: str = "none",
        *,
        max_iter: int = qp.DEFAULT_MAX_ITER,
        tol: float = qp.DEFAULT_TOL,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.normalization = check_choice("normalization", normalization, NORMALIZATIONS)
        self.max_iter, self.tol = check_qp_options(max_iter, tol)

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return self.normalization in ("loss", "loss+")

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        dt = out_dtype(gram)
        g = gram.to(dt)
        if self.normalization == "none":  # n = 1: the QP alone (dividing by ones changes nothing)
            return ops.solve_qp(g, max_iter=self.max_iter, tol=self.tol, backend=self.backend)
        norms = g.diagonal().clamp_min(0).sqrt()
        if self.normalization == "l2":
            n = norms
        elif self.normalization == "loss":
            assert losses is not None  # needs_losses: __call__ checked them
            n = losses.to(dt)
        else:
            assert losses is not None  # needs_losses: __call__ checked them
            n = losses.to(dt) * norms
        n = torch.where(n > 0, n, torch.ones_like(n))
        v = ops.solve_qp(
            g / (n[:, None] * n[None, :]),
            max_iter=self.max_iter,
            tol=self.tol,
            backend=self.backend,
        )
        return (v / n).to(dt)
