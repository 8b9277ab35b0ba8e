"""GradVac: gradient vaccine, adaptive similarity targets for task gradients.

Wang, Tsvetkov, Firat, Cao, "Gradient Vaccine: Investigating and Improving Multi-task Optimization
in Massively Multilingual Models", ICLR 2021 (https://arxiv.org/abs/2010.05874). There is no
official code; the reference is LibMTL's implementation (whole-model granularity).
"""

from __future__ import annotations

import torch

from .base import Tensor, check_number, out_dtype
from .rlw import RandomWeighting


class GradVac(RandomWeighting):
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
    STATE = ("target",)

    def __init__(self, beta: float = 0.5, seed: int = 0, *, backend: str | None = None):
        super().__init__(seed, backend=backend)
        self.beta = check_number("beta", beta, low=0.0, high=1.0)

    def __repr__(self) -> str:
        return f"GradVac(beta={self.beta}, seed={self.seed})"

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        return {"target": torch.zeros(K, K, dtype=torch.float64, device=device)}

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        state = self._ensure_state(K, dev)
        target = state["target"]
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
        state["target"].copy_(torch.where(torch.isfinite(gram).all(), target, state["target"]))
        w = C.sum(dim=0)
        return w.to(out_dtype(gram))
