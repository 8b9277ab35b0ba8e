"""The update rule of the weightings that learn their own parameters (UW, IMTL-L, GradNorm, FAMO).

Their papers train these few parameters (log-variances, loss scales, logits) with a gradient
optimizer next to the network's. Here each such weighting owns that optimizer -- Adam (Kingma & Ba,
ICLR 2015) with ``torch.optim.Adam``'s semantics, L2 ``weight_decay`` added to the gradient -- and
keeps its moments and step count in its state, as device tensors updated in place: one call of the
weighting is one optimizer step, sync-free, part of ``state_dict`` and undone by the optimizers on
a skipped (found-inf) step.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Tensor, check_number


class Adam:
    """Adam's hyperparameters, and one in-place step on a parameter tensor and its state."""

    def __init__(
        self,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ):
        self.lr = check_number("lr", lr, low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair of numbers in [0, 1), got {betas!r}")
        self.betas = (
            check_number("betas[0]", betas[0], low=0.0, high=1.0, high_open=True),
            check_number("betas[1]", betas[1], low=0.0, high=1.0, high_open=True),
        )
        self.eps = check_number("eps", eps, low=0.0, low_open=True)
        self.weight_decay = check_number("weight_decay", weight_decay, low=0.0)

    def options(self) -> dict[str, Any]:
        return {
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    @staticmethod
    def fresh(param: Tensor) -> dict[str, Tensor]:
        """Zero moments and step count for ``param`` (torch.optim.Adam's initial state)."""
        return {
            "exp_avg": torch.zeros_like(param),
            "exp_avg_sq": torch.zeros_like(param),
            "step": torch.zeros((), dtype=param.dtype, device=param.device),
        }

    def step(self, param: Tensor, grad: Tensor, state: dict[str, Tensor], apply: Tensor) -> None:
        """``param`` (and its moments) after one Adam step on ``grad``, written in place where the
        0-d bool ``apply`` is set (elsewhere everything keeps its value)."""
        b1, b2 = self.betas
        m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
        g = grad + self.weight_decay * param if self.weight_decay else grad
        t1 = t + 1
        m1 = m + (1 - b1) * (g - m)
        v1 = b2 * v + (1 - b2) * g * g
        step_size = self.lr / (1 - b1**t1)
        denom = v1.sqrt() / (1 - b2**t1).sqrt() + self.eps
        p1 = param - step_size * m1 / denom
        for live, new in ((param, p1), (m, m1), (v, v1), (t, t1)):
            live.copy_(torch.where(apply, new, live))
