"""DB-MTL's gradient-magnitude balancing.

Lin, Ye, Zhang, Kwok, "Dual-Balancing for Multi-Task Learning" (DB-MTL), 2023
(https://arxiv.org/abs/2308.12029); reference implementation in LibMTL (``DB_MTL.py``).
"""

from __future__ import annotations

import torch

from .base import Tensor, Weighting, check_number, out_dtype


class DBMTL(Weighting):
    """Weights ``max_j u_j / (u_i + eps)`` with ``u_i`` an EMA estimate of task ``i``'s gradient
    norm.

    The paper balances (1) loss scales, by back-propagating ``log(L_i + 1e-8)`` instead of
    ``L_i``, and (2) gradient magnitudes, by scaling every task's EMA gradient
    ``g_hat_i <- beta_t g_hat_i + (1 - beta_t) g_i`` (``beta_t = beta / t^sigma``, ``g_hat = 0`` at
    the start) to the largest norm: ``d = sum_i max_j ||g_hat_j|| / (||g_hat_i|| + 1e-8) g_hat_i``.

    Here only the current Gram is available, so:

    * the loss-scale part belongs to the caller: build the Gram from the gradients of the log
      losses ``log(L_i + 1e-8)`` (``needs_losses`` is False; the losses themselves are not used);
    * ``||g_hat_i||`` is approximated by ``u_i = sqrt(s_i)``, ``s_i`` the same EMA of the squared
      norms ``Gamma_ii`` (P-sized buffers are not kept). By Jensen ``||g_hat_i|| <= u_i``, with
      equality when a task's gradients keep their direction; the two agree exactly on the first
      step and whenever each task's gradient is stationary. The weights multiply the *current*
      gradients, whereas the paper combines the EMA gradients.

    ``beta`` (0.9) and ``beta_sigma`` (0) are LibMTL's defaults, ``eps`` (1e-8) its guard. State:
    ``s`` and the step count, device tensors (``state_dict`` round-trips them); a Gram holding
    NaN/Inf (a skipped step) leaves the state unchanged.
    """

    name = "dbmtl"
    STATE = ("sq_norm_ema", "step")

    def __init__(
        self,
        beta: float = 0.9,
        beta_sigma: float = 0.0,
        eps: float = 1e-8,
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.beta = check_number("beta", beta, low=0.0, high=1.0)
        self.beta_sigma = check_number("beta_sigma", beta_sigma, low=0.0)
        self.eps = check_number("eps", eps, low=0.0, low_open=True)

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        return {
            "sq_norm_ema": torch.zeros(K, dtype=torch.float64, device=device),
            "step": torch.zeros((), dtype=torch.float64, device=device),
        }

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        state = self._ensure_state(gram.shape[0], gram.device)
        ema, count = state["sq_norm_ema"], state["step"]
        finite = torch.isfinite(gram).all()
        step = count + 1
        beta_t = self.beta * step.pow(-self.beta_sigma)
        sq = gram.diagonal().to(torch.float64).clamp(min=0)
        new = sq + beta_t * (ema - sq)
        u = new.sqrt()
        w = u.max() / (u + self.eps)
        ema.copy_(torch.where(finite, new, ema))
        count.copy_(torch.where(finite, step, count))
        return w.to(out_dtype(gram))
