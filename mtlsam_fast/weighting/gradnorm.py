"""GradNorm: learnt loss weights that balance the tasks' gradient norms and training rates.

Chen, Badrinarayanan, Lee & Rabinovich, "GradNorm: Gradient Normalization for Adaptive Loss
Balancing in Deep Multitask Networks", ICML 2018 (https://arxiv.org/abs/1711.02257).
"""

from __future__ import annotations

import torch

from .base import Tensor, Weighting, check_number, out_dtype
from .learnable import Adam


def balance_gradient(w: Tensor, norms: Tensor, ratios: Tensor, alpha: float) -> Tensor:
    """``d L_grad / d w`` for ``L_grad = sum_i |w_i n_i - mean(w n) r_i^alpha|`` with the target
    held constant (the paper's Eq. 2): ``sign(w_i n_i - target_i) n_i``.

    ``n_i = ||g_i||`` are the tasks' gradient norms, ``r_i`` their relative inverse training rates.
    """
    gw = w * norms
    target = gw.mean() * ratios.pow(alpha)
    return torch.sign(gw - target) * norms


class GradNorm(Weighting):
    """GradNorm: loss weights ``w`` (``w_i = 1`` at the start) returned as they are, then one step
    on the gradient-norm balancing loss.

    With ``G_i = w_i ||g_i||``, ``Lt_i = L_i / L_i(0)`` (``L(0)`` the first call's losses) and
    ``r_i = Lt_i / mean(Lt)``, the paper's ``L_grad = sum_i |G_i - mean(G) r_i^alpha|`` (the target
    held constant) is decreased by an Adam step on ``w`` (``lr``; the paper uses a gradient
    optimizer on ``w`` next to the network's), after which ``w`` is clipped at 0 and renormalized to
    ``sum w = K`` (Algorithm 1). ``alpha`` is the restoring force (the paper's and LibMTL's 1.5).

    Differences: the norms are those of the gradients over all shared parameters (the paper uses
    the last shared layer; the Gram has the full ones; LibMTL also uses all shared parameters).
    LibMTL parametrizes ``w = K softmax(theta)`` and steps ``theta`` with the network's optimizer,
    from the first epoch's average losses as ``L(0)``; :func:`balance_gradient` is checked against
    its ``L_grad`` through that chain rule.
    """

    name = "gradnorm"
    needs_losses = True
    STATE = ("loss_weights", "exp_avg", "exp_avg_sq", "step", "initial_losses", "started")

    def __init__(
        self,
        alpha: float = 1.5,
        lr: float = 0.025,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.alpha = check_number("alpha", alpha, low=0.0)
        self._adam = Adam(lr, betas, eps)

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        w = torch.ones(K, dtype=torch.float64, device=device)
        return {
            "loss_weights": w,
            **Adam.fresh(w),
            "initial_losses": torch.zeros(K, dtype=torch.float64, device=device),
            "started": torch.zeros((), dtype=torch.bool, device=device),
        }

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        K = gram.shape[0]
        state = self._ensure_state(K, gram.device)
        w = state["loss_weights"]
        out = w.to(out_dtype(gram), copy=True)
        L = losses.to(torch.float64)
        ok = torch.isfinite(gram).all() & torch.isfinite(L).all()
        L0 = torch.where(state["started"], state["initial_losses"], L)
        rate = torch.where(L0 > 0, L / torch.where(L0 > 0, L0, 1.0), 1.0).clamp(min=0)
        mean_rate = rate.mean()
        ratios = torch.where(mean_rate > 0, rate / torch.where(mean_rate > 0, mean_rate, 1.0), 1.0)
        norms = gram.diagonal().to(torch.float64).clamp(min=0).sqrt()
        self._adam.step(w, balance_gradient(w, norms, ratios, self.alpha), state, ok)
        clipped = w.clamp(min=0)
        total = clipped.sum()
        renormed = torch.where(total > 0, K * clipped / torch.where(total > 0, total, 1.0), 1.0)
        w.copy_(torch.where(ok, renormed, w))
        state["initial_losses"].copy_(L0)
        state["started"].copy_(state["started"] | ok)
        return out

    def __repr__(self) -> str:
        opts = ", ".join(
            f"{k}={v!r}" for k, v in self._adam.options().items() if k != "weight_decay"
        )
        return f"GradNorm(alpha={self.alpha!r}, {opts})"
