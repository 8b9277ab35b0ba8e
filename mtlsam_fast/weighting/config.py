"""ConFIG: conflict-free updates from the pseudo-inverse of the unit task gradients.

Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural Networks",
ICLR 2025 (https://arxiv.org/abs/2408.11104), Eq. 2; official code https://github.com/tum-pbs/ConFIG.
"""

from __future__ import annotations

import torch

from .alignedmtl import DEFAULT_SWEEPS, SOLVERS, symmetric_eigh
from .base import (
    Tensor,
    VectorOption,
    Weighting,
    check_choice,
    check_int,
    check_number,
    out_dtype,
)


class ConFIG(Weighting):
    """ConFIG: ``d = (sum_i g_i^T u) u`` with ``u`` the unit vector along ``U^+ w``, ``U`` the
    matrix of unit gradients ``g_i / ||g_i||`` and ``w`` the preference (default all ones).

    On the Gram: ``U U^T = C`` is the cosine matrix, so ``U^+ w = U^T C^+ w = sum_i v_i g_i`` with
    ``v = D^-1 C^+ w`` (``D = diag ||g_i||``), and the weights are ``v (1^T Gamma v) / (v^T Gamma
    v)``. For linearly independent gradients ``U U^+ w = w``, so ``<g_i, u> = ||g_i|| w_i /
    ||U^+ w||``: every task improves, in proportion to its preference (conflict-free).

    ``C^+`` comes from the eigen-decomposition of ``C``
    (:func:`~mtlsam_fast.weighting.alignedmtl.symmetric_eigh`, ``solver``/``sweeps``), keeping the
    eigenvalues above ``rtol * lambda_max`` (default ``K`` times the Gram's machine epsilon, the
    level below which the Gram does not resolve them). torchjd and the official code take
    ``pinv`` of ``U`` itself, whose cut-off ``max(K, P) eps`` on the singular values is finer; the
    two agree unless some singular value of ``U`` lies between the two cut-offs (nearly dependent
    gradients). A zero gradient has no unit vector and gets weight 0; all-zero gradients give
    ``d = 0``.
    """

    name = "config"
    pref_vector = VectorOption(positive_sum=True)

    def __init__(
        self,
        pref_vector: Tensor | None = None,
        rtol: float | None = None,
        *,
        solver: str = "auto",
        sweeps: int = DEFAULT_SWEEPS,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.pref_vector = pref_vector
        self.rtol = None if rtol is None else check_number("rtol", rtol, low=0.0, high=1.0)
        self.solver = check_choice("solver", solver, SOLVERS)
        self.sweeps = check_int("sweeps", sweeps)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        g = gram.to(torch.float64)
        g = 0.5 * (g + g.T)
        n = g.diagonal().clamp(min=0).sqrt()
        has = n > 0
        inv = torch.where(has, 1.0 / torch.where(has, n, 1.0), 0.0)
        C = g * inv[:, None] * inv[None, :]
        lam, V = symmetric_eigh(C, self.solver, self.sweeps)
        rtol = self.rtol if self.rtol is not None else K * torch.finfo(gram.dtype).eps
        keep = lam > rtol * lam.max()
        inv_lam = torch.where(keep, 1.0 / torch.where(keep, lam, 1.0), 0.0)
        w = (
            torch.ones(K, dtype=torch.float64, device=dev)
            if self.pref_vector is None
            else self._option_on("pref_vector", self.pref_vector, K, dev)
        )
        v = (V @ (inv_lam * (V.T @ w))) * inv
        gv = g @ v
        q = v @ gv  # ||U^+ w||^2
        # rounding level of q given the Gram's precision
        noise = torch.finfo(gram.dtype).eps * (v.abs() * n).sum() ** 2
        nonzero = q > noise
        out = torch.where(nonzero, v * gv.sum() / torch.where(nonzero, q, 1.0), 0.0)
        return out.to(out_dtype(gram))
