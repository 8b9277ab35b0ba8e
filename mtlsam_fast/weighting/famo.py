"""FAMO: fast adaptive multitask optimization, from the losses only.

Liu, Liu, Jin, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023
(https://arxiv.org/abs/2306.03792); official code https://github.com/Cranial-XIX/FAMO.
"""

from __future__ import annotations

import torch

from .base import Tensor, VectorOption, Weighting, out_dtype
from .learnable import Adam

#: FAMO's guard inside the logarithm (the official code's and torchjd's 1e-8)
EPS = 1e-8


class FAMO(Weighting):
    """FAMO weights ``c z_i / (L_i - b_i + eps)``, ``z = softmax(xi)``, ``c = 1 / sum_i z_i /
    (L_i - b_i + eps)``: the gradient weights of the paper's objective ``c sum_i z_i log(L_i - b_i
    + eps)`` (``c`` held constant), a convex combination that decreases every loss at about the
    same log rate.

    The logits ``xi`` learn from how much each log-loss fell over the last step:
    ``delta_i = log(L_i^before - b_i + eps) - log(L_i^after - b_i + eps)``, one Adam step
    (``lr``, ``weight_decay``: the paper's ``beta`` and ``gamma``, defaults 0.025 and 1e-3) on the
    gradient of ``z(xi)^T delta``, as in the official code.

    Difference from the official code (and torchjd, LibMTL): they recompute the losses of the same
    batch after the model step (one more forward per step) and pass them to ``update``. Here
    ``L^after`` is the next call's losses -- the next batch at the updated parameters -- so a call
    first takes the logit step from the previous call's losses to these, then weights these: no
    extra forward, and the same numbers as the official sequence ``forward(L_t), update(L_t+1)``.
    ``min_losses`` is ``b`` (default 0): the losses must stay above it, or the weights are NaN and
    the optimizers skip the step.
    """

    name = "famo"
    needs_losses = True
    STATE = ("logits", "exp_avg", "exp_avg_sq", "step", "prev_losses", "has_prev")
    min_losses = VectorOption()

    def __init__(
        self,
        lr: float = 0.025,
        weight_decay: float = 1e-3,
        min_losses: Tensor | None = None,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self._adam = Adam(lr, betas, eps, weight_decay)
        self.min_losses = min_losses

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        xi = torch.zeros(K, dtype=torch.float64, device=device)
        return {
            "logits": xi,
            **Adam.fresh(xi),
            "prev_losses": torch.zeros(K, dtype=torch.float64, device=device),
            "has_prev": torch.zeros((), dtype=torch.bool, device=device),
        }

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        K = gram.shape[0]
        state = self._ensure_state(K, gram.device)
        b = (
            torch.zeros((), dtype=torch.float64, device=gram.device)
            if self.min_losses is None
            else self._option_on("min_losses", self.min_losses, K, gram.device)
        )
        xi = state["logits"]
        L = losses.to(torch.float64)
        D = L - b + EPS
        above = (D > 0).all()  # the logarithm is defined
        ok = torch.isfinite(gram).all() & torch.isfinite(D).all() & above
        # the pending logit step: from the previous call's losses to these
        delta = torch.log(state["prev_losses"] - b + EPS) - torch.log(D)
        z = torch.softmax(xi, dim=0)
        grad = z * (delta - (z * delta).sum())  # d(z^T delta)/d(xi)
        self._adam.step(xi, torch.where(ok, grad, 0.0), state, ok & state["has_prev"])
        z = torch.softmax(xi, dim=0)
        w = z / D
        w = torch.where(above, w / w.sum(), float("nan"))
        state["prev_losses"].copy_(torch.where(ok, L, state["prev_losses"]))
        state["has_prev"].copy_(state["has_prev"] | ok)
        return w.to(out_dtype(gram))

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._adam.options().items())
        return f"FAMO({opts}, min_losses={self.min_losses!r})"
