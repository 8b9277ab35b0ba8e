"""DB-MTL's gradient-magnitude balancing.

Lin, Ye, Zhang, Kwok, "Dual-Balancing for Multi-Task Learning" (DB-MTL), 2023
(https://arxiv.org/abs/2308.12029); reference implementation in LibMTL (``DB_MTL.py``).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Tensor, Weighting, check_nonnegative, nan_if_nonfinite, out_dtype
from .rlw import check_state_keys


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

    def __init__(self, beta: float = 0.9, beta_sigma: float = 0.0, eps: float = 1e-8):
        check_nonnegative(beta=beta, beta_sigma=beta_sigma, eps=eps)
        if beta > 1:
            raise ValueError(f"beta must be in [0, 1], got {beta!r}")
        if not eps > 0:
            raise ValueError(f"eps must be positive, got {eps!r}")
        self.beta = float(beta)
        self.beta_sigma = float(beta_sigma)
        self.eps = float(eps)
        self._sq: Tensor | None = None
        self._step: Tensor | None = None

    def init_state(self, num_tasks: int, device: torch.device) -> None:
        if self._sq is not None and self._sq.shape[0] != num_tasks:
            raise ValueError(
                f"DBMTL state holds {self._sq.shape[0]} tasks, the optimizer has K={num_tasks}"
            )
        if self._sq is None or self._step is None:
            self._sq = torch.zeros(num_tasks, dtype=torch.float64, device=device)
            self._step = torch.zeros((), dtype=torch.float64, device=device)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        if self._sq is not None and self._sq.shape[0] != K:
            raise ValueError(f"DBMTL state holds {self._sq.shape[0]} tasks, gram has K={K}")
        if self._sq is None or self._step is None:
            self._sq = torch.zeros(K, dtype=torch.float64, device=dev)
            self._step = torch.zeros((), dtype=torch.float64, device=dev)
        elif self._sq.device != dev:
            self._sq = self._sq.to(dev)
            self._step = self._step.to(dev)
        finite = torch.isfinite(gram).all()
        step = self._step + 1
        beta_t = self.beta * step.pow(-self.beta_sigma)
        sq = gram.diagonal().to(torch.float64).clamp(min=0)
        new = sq + beta_t * (self._sq - sq)
        u = new.sqrt()
        w = u.max() / (u + self.eps)
        self._sq.copy_(torch.where(finite, new, self._sq))
        self._step.copy_(torch.where(finite, step, self._step))
        return nan_if_nonfinite(w.to(out_dtype(gram)), gram)

    def state_dict(self) -> dict[str, Any]:
        if self._sq is None or self._step is None:
            return {"sq_norm_ema": None, "step": None}
        return {"sq_norm_ema": self._sq.clone(), "step": self._step.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"sq_norm_ema", "step"})
        sq, step = state["sq_norm_ema"], state["step"]
        if (sq is None) != (step is None):
            raise ValueError(
                "DBMTL state: 'sq_norm_ema' and 'step' must both be set or both be None"
            )
        if sq is not None and (
            not isinstance(sq, torch.Tensor)
            or sq.dim() != 1
            or not isinstance(step, torch.Tensor)
            or step.dim() != 0
        ):
            raise ValueError(
                "DBMTL state: 'sq_norm_ema' must be a [K] tensor and 'step' a 0-d tensor"
            )
        self._sq = None if sq is None else sq.to(torch.float64).clone()
        self._step = None if step is None else step.to(torch.float64).clone()
