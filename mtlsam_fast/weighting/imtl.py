"""IMTL-G: impartial multi-task learning, the gradient-balancing part.

Liu, Li, Kuang, Xue, Chen, Yang, Liao, Zhang, "Towards Impartial Multi-task Learning", ICLR 2021
(https://openreview.net/forum?id=IMPnRXEWpvr); reference implementation in LibMTL (``IMTL.py``).
"""

from __future__ import annotations

import torch

from .base import Tensor, Weighting, out_dtype

#: Tikhonov shift of the unit-diagonal cosine matrix, by input precision (fp64 / lower)
LAMBDA = {torch.float64: 1e-10}
LAMBDA_LOW = 1e-6
#: iterated-Tikhonov sweeps (each multiplies the regularization bias by lambda / (sigma + lambda))
REFINE = 3


class IMTL(Weighting):
    """IMTL-G: weights ``w`` with ``sum w = 1`` whose direction ``d = w^T G`` has equal projections
    ``<d, u_i>`` onto every unit gradient ``u_i = g_i / ||g_i||``.

    The paper's closed form (anchored at task 1): ``D = g_1 - g_i``, ``U = u_1 - u_i`` (rows
    ``i = 2..K``), ``alpha = g_1 U^T (D U^T)^{-1}``, ``w = [1 - sum alpha, alpha]``. On the Gram the
    same solution has a symmetric form: ``<u_i, d> = c`` for all ``i`` reads ``Gamma w = c n``
    (``n_i = ||g_i||``), so ``w = Gamma^{-1} n / (1^T Gamma^{-1} n)``; with the cosine matrix
    ``C = D^{-1} Gamma D^{-1}`` (``D = diag(n)``) this is ``w_i ~ (C^{-1} 1)_i / n_i``, normalized
    to sum 1. No anchor task, permutation equivariant, scale invariant; float64 inside.

    Robustness without a host sync: ``C y = 1`` is solved by LU (``lu_factor_ex``, never raises) of
    ``C + lambda I`` with 3 iterated-Tikhonov sweeps (``lambda`` = 1e-10 for a float64 Gram, 1e-6
    for lower precision, whose Gram is only that accurate): for a well-conditioned ``C`` this is the
    exact solution up to ``(lambda / sigma_min)^3``; identical gradients give ``1/K`` (up to the
    Gram's rounding in the singular direction times ``1/lambda``, ~1e-5). A task with a zero
    gradient has no unit vector: it gets weight 0 and the others are IMTL-G's weights among
    themselves (LibMTL divides by zero); an all-zero Gram gives ``1/K``. Exactly linearly dependent
    gradients (where the paper's inverse does not exist) give large but finite weights.
    """

    name = "imtl"

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        g = gram.to(torch.float64)
        g = 0.5 * (g + g.T)  # a low-precision Gram may be asymmetric in the last bit
        n = g.diagonal().clamp(min=0).sqrt()
        has = n > 0
        inv = torch.where(has, 1.0 / torch.where(has, n, torch.ones_like(n)), torch.zeros_like(n))
        eye = torch.eye(K, dtype=torch.float64, device=dev)
        both = has[:, None] & has[None, :]
        C = torch.where(
            both, g * inv[:, None] * inv[None, :], eye
        )  # a zero gradient: a dummy unit row
        lam = LAMBDA.get(gram.dtype, LAMBDA_LOW)
        LU, piv, _ = torch.linalg.lu_factor_ex(C + lam * eye)
        ones = torch.ones(K, 1, dtype=torch.float64, device=dev)
        y = torch.zeros_like(ones)
        for _ in range(REFINE):
            y = y + torch.linalg.lu_solve(LU, piv, ones - C @ y)
        v = y[:, 0] * inv
        total = v.sum()
        w = torch.where(
            total != 0,
            v / torch.where(total != 0, total, torch.ones_like(total)),
            torch.full_like(v, 1.0 / K),
        )
        return w.to(out_dtype(gram))
