"""MoCo: multi-objective gradient correction with tracked task gradients.

Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in Multi-objective
Learning: A Provably Convergent Approach", ICLR 2023 (https://openreview.net/forum?id=dLAYGdKTi2),
Algorithm 1; LibMTL's ``MoCo`` (from the authors' code).
"""

from __future__ import annotations

import torch

from .. import ops
from ..ops.qp import project_simplex
from .base import Inputs, Tensor, Weighting, check_bool, check_number


class MoCo(Weighting):
    """MoCo: tracked gradients ``y_i <- y_i - beta_t (y_i - g_i)``, then weights
    ``lambda <- Proj_simplex(lambda - gamma_t (Y Y^T + rho I) lambda)`` and the direction
    ``d = Y^T lambda`` (the tracked gradients', hence ``returns_direction``).

    ``beta_t = beta / t^beta_sigma`` and ``gamma_t = gamma / t^gamma_sigma`` at call ``t``;
    defaults: LibMTL's (0.5, 0.5, 0.1, 0.5, ``rho`` 0). ``y`` starts at 0 and ``lambda`` at
    ``1/K``. The paper's projection of ``y_i`` onto a ball of radius ``L_i`` (a Lipschitz bound) is
    omitted, as in LibMTL. ``normalize=True`` tracks LibMTL's ``g_i / (||g_i|| + 1e-8) * L_i``
    (unit gradients scaled by the loss; then the losses are needed) instead of ``g_i``. LibMTL
    replaces the projection onto the simplex by a softmax; this follows the paper.

    State: ``Y`` (K x P, float32, float64 for float64 gradients, true units: a GradScaler's scale
    is divided out), ``lambda`` and the call count. The optimizers' found-inf guard keeps a copy of
    ``Y`` during each step (another K x P). With :class:`~mtlsam_fast.optim.FMTL` both gradient
    sets of a step are tracked in turn.
    """

    name = "moco"
    needs_grads = True
    returns_direction = True
    STATE = ("tracked", "simplex_weights", "step")
    PER_COORDINATE_STATE = True

    def __init__(
        self,
        beta: float = 0.5,
        beta_sigma: float = 0.5,
        gamma: float = 0.1,
        gamma_sigma: float = 0.5,
        rho: float = 0.0,
        normalize: bool = False,
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.beta = check_number("beta", beta, low=0.0, high=1.0, low_open=True)
        self.beta_sigma = check_number("beta_sigma", beta_sigma, low=0.0)
        self.gamma = check_number("gamma", gamma, low=0.0, low_open=True)
        self.gamma_sigma = check_number("gamma_sigma", gamma_sigma, low=0.0)
        self.rho = check_number("rho", rho, low=0.0)
        self.normalize = check_bool("normalize", normalize)
        self._dtype = torch.float32

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return self.normalize

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        assert numel is not None  # per-coordinate state
        return {
            "tracked": torch.zeros(K, numel, dtype=self._dtype, device=device),
            "simplex_weights": torch.full((K,), 1.0 / K, dtype=torch.float64, device=device),
            "step": torch.zeros((), dtype=torch.float64, device=device),
        }

    def compute(self, x: Inputs) -> Tensor:
        G = x.grads
        assert G is not None  # needs_grads: __call__ checked it
        K = G.shape[0]
        dev = G.device
        state = self._coordinate_state(G)
        Y, lam, count = state["tracked"], state["simplex_weights"], state["step"]
        inv = (
            torch.ones((), dtype=torch.float64, device=dev)
            if x.inv_scale is None
            else x.inv_scale.to(torch.float64)
        )
        finite = torch.isfinite(x.gram).all()
        t = count + 1
        beta_t = torch.where(finite, self.beta * t.pow(-self.beta_sigma), 0.0).to(Y.dtype)
        if self.normalize:
            assert x.losses is not None  # needs_losses when normalize
            norms = x.gram.diagonal().to(torch.float64).clamp(min=0).sqrt()
            row_scale = x.losses.to(torch.float64) / (norms + 1e-8) * inv
        else:
            row_scale = inv.expand(K)
        row_scale = row_scale.to(Y.dtype)
        for i in range(K):
            h = G[i].to(Y.dtype) * row_scale[i]
            Y[i].copy_(torch.where(finite, Y[i] + beta_t * (h - Y[i]), Y[i]))
        YY = ops.gram(Y, backend=self.backend).to(torch.float64)
        gamma_t = self.gamma * t.pow(-self.gamma_sigma)
        new = project_simplex(lam - gamma_t * (YY @ lam + self.rho * lam))
        lam.copy_(torch.where(finite, new, lam))
        count.copy_(torch.where(finite, t, count))
        # in the units of grads: times the loss scale
        return ops.combine((lam / inv).to(Y.dtype), Y, backend=self.backend)
