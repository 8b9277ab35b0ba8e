"""GradVac: gradient vaccine, adaptive similarity targets for task gradients.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021 (https://arxiv.org/abs/2010.05874). There is no
official code; the reference is LibMTL's implementation (whole-model granularity).
"""

from __future__ import annotations

from typing import Any

import torch

from .base import Tensor, Weighting, nan_if_nonfinite, out_dtype
from .rlw import PhiloxStream, check_state_keys


class GradVac(Weighting):
    """GradVac on the Gram matrix, with an EMA of pairwise cosine targets ``phi_hat`` (state).

    For every task ``i``, visiting the other tasks ``j`` in a random order: with
    ``phi = cos(g_i^PC, g_j)`` and target ``t = phi_hat[i, j]``, if ``phi < t`` add
    ``||g_i^PC|| (t sqrt(1 - phi^2) - phi sqrt(1 - t^2)) / (||g_j|| sqrt(1 - t^2)) g_j`` to
    ``g_i^PC`` (which raises the cosine to ``t``); then ``phi_hat[i, j] <- (1 - beta) t + beta phi``
    (the paper's Algorithm 1; ``phi_hat`` starts at 0 as in LibMTL, so the first step is PCGrad).
    ``g_i^PC = sum_k C[i, k] g_k`` is tracked by its coefficients, so every quantity comes from the
    Gram: ``<g_i^PC, g_j> = (C Gamma)[i, j]``, ``||g_i^PC||^2 = (C Gamma C^T)[i, i]``. The weights
    are ``1^T C`` (the projected gradients are summed, as in LibMTL). ``beta`` defaults to LibMTL's
    0.5.

    Deviations: whole-model granularity only (the paper's per-layer variants need per-segment
    Grams); cosines use exact safe divisions (0 for a zero vector) instead of LibMTL's ``+1e-8``,
    so the weights are scale invariant. Random orders come from a seeded device-side Philox stream
    (:class:`~mtlsam_fast.weighting.rlw.PhiloxStream`), one per task per call. ``state_dict``
    holds ``phi_hat`` (created at the first call, K x K) and the stream; a Gram holding NaN/Inf (a
    skipped step) leaves ``phi_hat`` unchanged.
    """

    name = "gradvac"

    def __init__(self, beta: float = 0.5, seed: int = 0):
        if not isinstance(beta, (int, float)) or isinstance(beta, bool) or not 0.0 <= beta <= 1.0:
            raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
        self.beta = float(beta)
        self._stream = PhiloxStream(seed)
        self._target: Tensor | None = None

    @property
    def seed(self) -> int:
        return self._stream.seed

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, seed={self.seed})"

    def init_state(self, num_tasks: int, device: torch.device) -> None:
        if self._target is not None and self._target.shape[0] != num_tasks:
            raise ValueError(
                f"GradVac state holds {self._target.shape[0]} tasks, the optimizer has "
                f"K={num_tasks}"
            )
        if self._target is None:
            self._target = torch.zeros(num_tasks, num_tasks, dtype=torch.float64, device=device)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        if self._target is not None and self._target.shape[0] != K:
            raise ValueError(f"GradVac state holds {self._target.shape[0]} tasks, gram has K={K}")
        if self._target is None:
            self._target = torch.zeros(K, K, dtype=torch.float64, device=dev)
        elif self._target.device != dev:
            self._target = self._target.to(dev)
        target = self._target
        g = gram.to(torch.float64)
        order = self._stream.task_orders(K, dev)
        rows = torch.arange(K, device=dev)
        gnorm = g.diagonal().clamp(min=0).sqrt()
        zero = torch.zeros(K, dtype=torch.float64, device=dev)
        one = torch.ones(K, dtype=torch.float64, device=dev)
        C = torch.eye(K, dtype=torch.float64, device=dev)
        for s in range(K - 1):
            j = order[:, s]
            onehot = (rows[None, :] == j[:, None]).to(torch.float64)
            CG = C @ g
            ip = (CG * onehot).sum(dim=1)  # <g_i^PC, g_{j_i}>
            pc_norm = (CG * C).sum(dim=1).clamp(min=0).sqrt()
            gj = gnorm[j]
            den = pc_norm * gj
            phi = torch.where(den > 0, ip / torch.where(den > 0, den, one), zero).clamp(-1.0, 1.0)
            t = (target * onehot).sum(dim=1)
            s_t = (1 - t * t).clamp(min=0).sqrt()
            num = pc_norm * (t * (1 - phi * phi).clamp(min=0).sqrt() - phi * s_t)
            den2 = gj * s_t
            ok = (phi < t) & (den2 > 0)
            coef = torch.where(ok, num / torch.where(ok, den2, one), zero)
            C = C + coef[:, None] * onehot
            target = target + onehot * (((1 - self.beta) * t + self.beta * phi) - t)[:, None]
        # a non-finite Gram (a skipped step) must not poison the EMA
        self._target.copy_(torch.where(torch.isfinite(gram).all(), target, self._target))
        w = C.sum(dim=0)
        return nan_if_nonfinite(w.to(out_dtype(gram)), gram)

    def state_dict(self) -> dict[str, Any]:
        target = None if self._target is None else self._target.clone()
        return {"stream": self._stream.state_dict(), "target": target}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"stream", "target"})
        target = state["target"]
        if target is not None and (
            not isinstance(target, torch.Tensor)
            or target.dim() != 2
            or target.shape[0] != target.shape[1]
        ):
            raise ValueError("GradVac state 'target' must be None or a K x K tensor")
        self._stream.load_state_dict(state["stream"])
        self._target = None if target is None else target.to(torch.float64).clone()
