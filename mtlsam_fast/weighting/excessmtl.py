"""ExcessMTL: robust task weights from estimated excess risks.

He, Zhou, Wang, Lin & Hong, "Robust Multi-Task Learning with Excess Risks", ICML 2024
(https://proceedings.mlr.press/v235/he24n.html); official code https://github.com/uiuctml/ExcessMTL.
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Inputs, Tensor, Weighting, check_int, check_number, out_dtype

#: the official code's guards (AdaGrad's epsilon and the baseline division)
EPS = 1e-7


class ExcessMTL(Weighting):
    """ExcessMTL weights: an exponentiated-gradient step ``w <- softmax(log w + eta e)`` on the
    simplex (Eq. 9), driven by each task's excess risk ``e_i ~ g_i^T H_i^{-1} g_i`` (Eqs. 6-7), with
    ``H_i = diag(sqrt(sum_s g_{i,s}^2 + 1e-7))`` AdaGrad's running diagonal estimate.

    Scale processing (Section 3.2): the excess risks are divided by a baseline, the first call's
    (``n_warmup_steps = 0``, as the official code and LibMTL) or the average over ``n_warmup_steps``
    warm-up calls, during which the weights stay ``1/K`` (the paper's Appendix C.1 collects 3
    epochs). ``robust_step_size`` is ``eta``. The weights start at ``1/K`` (the paper, torchjd; the
    official code and LibMTL start at 1, a constant factor) and multiply the current gradients.

    State: the running sums of squared gradients (K x P, float32 -- float64 for float64 gradients
    -- in true units, a GradScaler's scale divided out), the weights, the baseline and the counts.
    The optimizers' found-inf guard keeps a copy of the K x P sums during each step, and a call
    has about three K x P temporaries (as torchjd's).
    """

    name = "excessmtl"
    needs_grads = True
    STATE = ("sq_grad_sum", "weights", "baseline", "warmup_sum", "n_steps")
    PER_COORDINATE_STATE = True

    def __init__(
        self,
        robust_step_size: float = 1.0,
        n_warmup_steps: int = 0,
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.robust_step_size = check_number(
            "robust_step_size", robust_step_size, low=0.0, low_open=True
        )
        self.n_warmup_steps = check_int("n_warmup_steps", n_warmup_steps, low=0)
        self._dtype = torch.float32

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        assert numel is not None  # per-coordinate state
        f64: dict[str, Any] = {"dtype": torch.float64, "device": device}
        return {
            "sq_grad_sum": torch.zeros(K, numel, dtype=self._dtype, device=device),
            "weights": torch.full((K,), 1.0 / K, **f64),
            "baseline": torch.zeros(K, **f64),
            "warmup_sum": torch.zeros(K, **f64),
            "n_steps": torch.zeros((), **f64),
        }

    def compute(self, x: Inputs) -> Tensor:
        G = x.grads
        assert G is not None  # needs_grads: __call__ checked it
        state = self._coordinate_state(G)
        S = state["sq_grad_sum"]
        finite = torch.isfinite(x.gram).all()
        g = G.to(S.dtype)
        sq = (g if x.inv_scale is None else g * x.inv_scale.to(S.dtype)).square()
        S.add_(torch.where(finite, sq, 0.0))
        e = (sq / (S + EPS).sqrt()).sum(dim=1).to(torch.float64)
        n, w = state["n_steps"], state["weights"]
        first = n == self.n_warmup_steps  # the first call after the warm-up sets the baseline
        if self.n_warmup_steps > 0:
            warm = n < self.n_warmup_steps
            baseline = torch.where(first, state["warmup_sum"] / self.n_warmup_steps, 0.0)
            scaled = e / (torch.where(first, baseline, state["baseline"]) + EPS)
            state["warmup_sum"].copy_(
                torch.where(finite & warm, state["warmup_sum"] + e, state["warmup_sum"])
            )
            finite_after_warmup = finite & ~warm
        else:  # no warm-up: the first call's excess risks are the baseline, used raw
            baseline = e
            scaled = torch.where(first, e, e / (state["baseline"] + EPS))
            finite_after_warmup = finite
        stepped = torch.softmax(torch.log(w) + self.robust_step_size * scaled, dim=0)
        state["baseline"].copy_(torch.where(finite & first, baseline, state["baseline"]))
        w.copy_(torch.where(finite_after_warmup, stepped, w))
        n.copy_(torch.where(finite, n + 1, n))
        return w.to(out_dtype(x.gram), copy=True)
