"""Learnt per-task log-scales of the losses: uncertainty weighting and IMTL-L.

* UW: Kendall, Gal & Cipolla, "Multi-Task Learning Using Uncertainty to Weigh Losses for Scene
  Geometry and Semantics", CVPR 2018 (https://arxiv.org/abs/1705.07115).
* IMTL-L: Liu, Li, Kuang, Xue, Chen, Yang, Liao & Zhang, "Towards Impartial Multi-task Learning",
  ICLR 2021 (https://openreview.net/forum?id=IMPnRXEWpvr), its loss-balance part.

Both train the network on a scalarization ``S(L, s) = sum_i a(s_i) L_i + b(s_i)`` and learn the K
parameters ``s`` jointly, by gradient descent on the same ``S``. The gradient weights of the task
losses are ``dS/dL_i = a(s_i)``, and ``dS/ds_i = a'(s_i) L_i + b'(s_i)`` drives ``s``. Each call
returns ``a(s)`` for the current ``s`` and then takes one Adam step on ``s``
(:mod:`~mtlsam_fast.weighting.learnable`): the paper's joint update, done by the weighting itself
so that ``s`` and its Adam moments are part of the optimizer's ``state_dict`` and of its found-inf
skip. (torchjd's ``UW``/``IMTLL`` and LibMTL's ``UW`` expose ``s`` as an ``nn.Parameter`` for the
user's own optimizer instead; with Adam and the same ``lr`` the two give the same numbers.)

With :class:`~mtlsam_fast.optim.FMTL` the weighting is called twice per step (loss and flat
sets), so ``s`` takes two Adam steps per training step.
"""

from __future__ import annotations

import torch

from .base import Tensor, Weighting, check_number, out_dtype
from .learnable import Adam


class _LogScale(Weighting):
    """``S = sum_i a(s_i) L_i + b(s_i)`` with learnt ``s`` (see the module docstring)."""

    needs_losses = True
    STATE = ("log_scale", "exp_avg", "exp_avg_sq", "step")

    def __init__(
        self,
        lr: float = 1e-3,
        init: float = 0.0,
        *,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.init = check_number("init", init)
        self._adam = Adam(lr, betas, eps, weight_decay)

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        s = torch.full((K,), self.init, dtype=torch.float64, device=device)
        return {"log_scale": s, **Adam.fresh(s)}

    def _scale_and_grad(self, s: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        """``a(s)`` and ``dS/ds``."""
        raise NotImplementedError

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        state = self._ensure_state(gram.shape[0], gram.device)
        s = state["log_scale"]
        L = losses.to(torch.float64)
        w, grad = self._scale_and_grad(s, L)
        w = w.to(out_dtype(gram))  # before the step: a copy of a(s_t)
        self._adam.step(s, grad, state, torch.isfinite(gram).all() & torch.isfinite(L).all())
        return w

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self._adam.options().items())
        return f"{type(self).__name__}(init={self.init!r}, {opts})"


class UW(_LogScale):
    """Uncertainty weighting: ``S = sum_i exp(-s_i) L_i / 2 + s_i / 2`` with ``s_i = log
    sigma_i^2``.

    The paper's regression likelihood (``1 / (2 sigma^2)``; its classification form drops the 1/2,
    a step-size change). Weights ``exp(-s_i) / 2``; ``dS/ds_i = (1 - exp(-s_i) L_i) / 2``, so ``s``
    moves towards ``log L_i``. ``init`` is ``s`` at the start: 0 as in torchjd (LibMTL uses -0.5);
    ``lr``, ``betas``, ``eps``, ``weight_decay``: Adam's for ``s``.
    """

    name = "uw"

    def _scale_and_grad(self, s: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        a = 0.5 * torch.exp(-s)
        return a, 0.5 - a * losses


class IMTLL(_LogScale):
    """IMTL-L: ``S = sum_i exp(s_i) L_i - s_i``.

    Weights ``exp(s_i)``; ``dS/ds_i = exp(s_i) L_i - 1``, so the scaled losses ``exp(s_i) L_i`` are
    driven to 1 (equal). ``init`` is ``s`` at the start (0: the plain sum of the losses); ``lr``,
    ``betas``, ``eps``, ``weight_decay``: Adam's for ``s``.
    """

    name = "imtl_l"

    def _scale_and_grad(self, s: Tensor, losses: Tensor) -> tuple[Tensor, Tensor]:
        a = torch.exp(s)
        return a, a * losses - 1.0
