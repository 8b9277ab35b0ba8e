"""DWA: dynamic weight average, from the rate at which each loss falls per epoch.

Liu, Johns & Davison, "End-to-End Multi-Task Learning with Attention", CVPR 2019
(https://arxiv.org/abs/1803.10704); official code https://github.com/lorenmt/mtan.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Tensor, Weighting, check_number, out_dtype


class DWA(Weighting):
    """DWA weights ``K softmax(r / T)`` with ``r_i = Lbar_i(t-1) / Lbar_i(t-2)``, the ratio of task
    ``i``'s average loss over the last two epochs; 1 for every task during the first two epochs.

    Epochs are the caller's: call :meth:`end_epoch` once at the end of each (as torchjd's
    ``DWA.step``; with an optimizer, ``opt.weighting.end_epoch()``). Every call adds its losses to
    the running epoch sums (with :class:`~mtlsam_fast.optim.FMTL`, twice per step: the average is
    the same). ``temperature`` is ``T`` (the paper's 2). A previous average of 0 (a task at zero
    loss) gives the ratio 1 instead of a division by zero. State: the epoch sums and count, the last
    two averages, the number of finished epochs (device tensors; :meth:`end_epoch` never syncs).
    """

    name = "dwa"
    needs_losses = True
    STATE = ("loss_sum", "count", "history", "epochs")

    def __init__(self, temperature: float = 2.0, *, backend: str | None = None):
        super().__init__(backend=backend)
        self.temperature = check_number("temperature", temperature, low=0.0, low_open=True)

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
        return {
            "loss_sum": torch.zeros(K, **f64),
            "count": torch.zeros((), **f64),
            "history": torch.zeros(2, K, **f64),
            "epochs": torch.zeros((), **f64),
        }

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        K = gram.shape[0]
        state = self._ensure_state(K, gram.device)
        older, newer = state["history"][0], state["history"][1]
        r = torch.where(older != 0, newer / torch.where(older != 0, older, 1.0), 1.0)
        w = torch.where(
            state["epochs"] >= 2, K * torch.softmax(r / self.temperature, 0), torch.ones_like(r)
        )
        L = losses.to(torch.float64)
        ok = torch.isfinite(gram).all() & torch.isfinite(L).all()
        state["loss_sum"].copy_(torch.where(ok, state["loss_sum"] + L, state["loss_sum"]))
        state["count"].copy_(torch.where(ok, state["count"] + 1, state["count"]))
        return w.to(out_dtype(gram))

    def end_epoch(self) -> None:
        """Close the epoch: its average loss becomes the newest of the two kept (no-op before the
        first call, or when no call happened since the last :meth:`end_epoch`)."""
        if self._state is None:
            return
        s = self._state
        seen = s["count"] > 0
        avg = s["loss_sum"] / torch.where(seen, s["count"], 1.0)
        rolled = torch.stack([s["history"][1], avg])
        s["history"].copy_(torch.where(seen, rolled, s["history"]))
        s["epochs"].copy_(torch.where(seen, s["epochs"] + 1, s["epochs"]))
        s["loss_sum"].zero_()
        s["count"].zero_()
