"""CAGrad: conflict-averse gradient descent.

Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
NeurIPS 2021 (https://arxiv.org/abs/2110.14048); official code https://github.com/Cranial-XIX/CAGrad.
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops import qp
from .base import Tensor, Weighting, check_choice, check_nonnegative, check_qp_options, out_dtype

RESCALES = (0, 1, 2)


class CAGrad(Weighting):
    """The update ``d = g0 + sqrt(phi) / ||g_w|| g_w`` with ``phi = c^2 ||g0||^2``, as K weights.

    ``g0`` is the mean gradient and ``w`` solves the paper's dual on the simplex,

        min_w  w^T b + sqrt(phi) ||g_w||,   b_i = <g_i, g0>,   g_w = sum_i w_i g_i,

    exactly (not by SLSQP as in the official code), with the shared solver's norm variant
    (:func:`mtlsam_fast.ops.solve_qp` with ``norm_coef``), which also handles the non-smooth
    optimum ``g_w = 0``. The weights are ``1/K + sqrt(phi) / ||g_w|| * w``; when ``g_w`` vanishes
    (``||g_w||^2`` below the Gram's rounding level) the correction is dropped and ``d = g0`` (the
    official code's ``1e-8`` guard does the same at exactly ``g_w = 0``). ``rescale`` follows the
    official code: 0 none, 1 divide by ``1 + c^2``, 2 divide by ``1 + c``. ``c = 0`` is linear
    scalarization. A single task gets weight 1 (docs/ARCHITECTURE.md §7; the formula would give
    ``(1 + c)`` before rescaling, a mere step-size change, since one task has nothing to conflict
    with).
    """

    name = "cagrad"

    def __init__(
        self,
        c: float = 0.4,
        rescale: int = 1,
        *,
        max_iter: int = qp.DEFAULT_MAX_ITER,
        tol: float = qp.DEFAULT_TOL,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        check_nonnegative(c=c)
        self.c = float(c)
        self.rescale = check_choice("rescale", rescale, RESCALES)
        self.max_iter, self.tol = check_qp_options(max_iter, tol)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        if K == 1:  # static shape, no sync
            return torch.ones(1, dtype=out_dtype(gram), device=gram.device)
        G = gram.to(torch.float64)
        G = 0.5 * (G + G.T)
        b = G.mean(1)  # <g_i, g0>
        g0_norm = G.mean().clamp_min(0.0).sqrt()
        coef = self.c * g0_norm  # sqrt(phi)
        w = ops.solve_qp(
            G, b, norm_coef=coef, max_iter=self.max_iter, tol=self.tol, backend=self.backend
        )
        w = w.to(torch.float64)
        gw2 = (w @ G @ w).clamp_min(0.0)
        # rounding level of ||g_w||^2 given the Gram's precision
        noise = torch.finfo(gram.dtype).eps * (w * G.diagonal().clamp_min(0.0).sqrt()).sum() ** 2
        nonzero = gw2 > noise
        lmbda = torch.where(
            nonzero,
            coef / torch.where(nonzero, gw2, torch.ones_like(gw2)).sqrt(),
            torch.zeros_like(gw2),
        )
        weights = 1.0 / K + lmbda * w
        if self.rescale == 1:
            weights = weights / (1.0 + self.c**2)
        elif self.rescale == 2:
            weights = weights / (1.0 + self.c)
        return weights.to(out_dtype(gram))
