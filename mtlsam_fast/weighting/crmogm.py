"""CR-MOGM: an exponential moving average of another weighting's weights.

Zhou, Zhang, Li, Zhang & Wang, "On the Convergence of Stochastic Multi-Objective Gradient
Manipulation and Beyond", NeurIPS 2022
(https://proceedings.neurips.cc/paper_files/paper/2022/hash/f91bd64a3620aad8e70a27ad9cb3ca57-Abstract-Conference.html).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from .base import Inputs, Tensor, VectorOption, Weighting, check_number, check_state_keys


class CRMOGM(Weighting):
    """CR-MOGM: ``lambda_k = alpha lambda_{k-1} + (1 - alpha) lambdahat_k``, ``lambdahat_k`` the
    weights of the wrapped ``weighting`` (a name, with ``weighting_options``, or an object; default
    MGDA, which the paper analyses) at call ``k``.

    ``lambda_0`` is ``initial_weights`` if given, else ``lambdahat_1`` (so the first result is the
    wrapped weighting's). ``alpha`` in [0, 1]: 0 is the wrapped weighting itself, 1 freezes the
    weights; the paper's Corollary 1 schedules it towards 1 as the learning rate decays (assign
    ``w.alpha`` between steps). The wrapped weighting's inputs (losses, gradients) and state come
    along; a weighting that returns a direction cannot be smoothed.
    """

    name = "crmogm"
    STATE = ("smoothed", "started")
    initial_weights = VectorOption()

    def __init__(
        self,
        weighting: str | Weighting = "mgda",
        alpha: float = 0.9,
        initial_weights: Tensor | None = None,
        *,
        weighting_options: dict[str, Any] | None = None,
        backend: str | None = None,
    ):
        from . import get

        super().__init__(backend=backend)
        inner = get(weighting, **(weighting_options or {}))
        if inner.returns_direction:
            raise ValueError(
                f"CR-MOGM smooths weights; {inner.name!r} returns a direction, not weights"
            )
        self.weighting = inner
        self.alpha = check_number("alpha", alpha, low=0.0, high=1.0)
        self.initial_weights = initial_weights

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return self.weighting.needs_losses

    @property
    def needs_grads(self) -> bool:  # type: ignore[override]
        return self.weighting.needs_grads

    def check_num_tasks(self, K: int) -> None:
        self.weighting.check_num_tasks(K)
        if self.initial_weights is not None and self.initial_weights.shape[0] != K:
            raise ValueError(
                f"initial_weights has {self.initial_weights.shape[0]} entries, "
                f"there are K={K} tasks"
            )

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        return {
            "smoothed": torch.zeros(K, dtype=torch.float64, device=device),
            "started": torch.zeros((), dtype=torch.bool, device=device),
        }

    def compute(self, x: Inputs) -> Tensor:
        K = x.gram.shape[0]
        state = self._ensure_state(K, x.gram.device)
        lam_hat = self.weighting(x.gram, x.losses, grads=x.grads, inv_scale=x.inv_scale)
        hat = lam_hat.to(torch.float64)
        first = (
            hat
            if self.initial_weights is None
            else self._option_on("initial_weights", self.initial_weights, K, x.gram.device)
        )
        prev = torch.where(state["started"], state["smoothed"], first)
        lam = self.alpha * prev + (1 - self.alpha) * hat
        ok = torch.isfinite(hat).all()
        state["smoothed"].copy_(torch.where(ok, lam, state["smoothed"]))
        state["started"].copy_(state["started"] | ok)
        return lam.to(lam_hat.dtype)

    # the wrapped weighting's state travels with this one's
    def snapshot(self) -> Any:
        return {"own": super().snapshot(), "wrapped": self.weighting.snapshot()}

    def restore_where(self, skip: Tensor, snapshot: Any) -> None:
        super().restore_where(skip, snapshot["own"])
        self.weighting.restore_where(skip, snapshot["wrapped"])

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "wrapped": self.weighting.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {*self.STATE, "wrapped"})
        own = self._checked_state(state, {*self.STATE, "wrapped"})
        copy.deepcopy(self.weighting).load_state_dict(state["wrapped"])  # raises first
        self.weighting.load_state_dict(state["wrapped"])
        self._state, self._state_spec = own
