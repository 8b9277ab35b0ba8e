"""GradDrop: gradient sign dropout, a random per-coordinate choice of the dominant sign.

Chen, Ngiam, Huang, Luong, Kretzschmar, Chai & Anguelov, "Just Pick a Sign: Optimizing Deep
Multitask Models with Gradient Sign Dropout", NeurIPS 2020 (https://arxiv.org/abs/2010.06808),
Algorithm 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from .. import ops
from .base import (
    Inputs,
    Tensor,
    VectorOption,
    Weighting,
    check_int,
    check_state_keys,
)
from .rlw import check_seed


class GradDrop(Weighting):
    """GradDrop on the shared parameters: per coordinate, the sign purity
    ``P = 1/2 (1 + sum_i g_i / sum_i |g_i|)``, a uniform ``U``, and the masks
    ``M_i = [f(P) > U] [g_i > 0] + [f(P) < U] [g_i < 0]``; the direction is
    ``sum_i (l_i + (1 - l_i) M_i) g_i`` (lines 10-15 of Algorithm 1).

    A returned direction, not weights (``returns_direction``): each coordinate keeps only the
    gradients of one sign. ``leak`` ``l`` (a number or one per task, in [0, 1]; default 0) lets a
    task's gradient leak through unmasked; ``f`` is a monotonically increasing function applied to
    ``P`` (default the identity), as in torchjd. Coordinates where every gradient is 0 give 0.

    Differences: the paper (and LibMTL, which requires representation gradients) applies GradDrop
    to the gradients at a layer's activations, summed over the batch after multiplying by the sign
    of the activations; the optimizers hold the gradients of the shared parameters, where torchjd
    applies it too. ``U`` is ``Phi(z)`` (``Phi`` the normal CDF) of the library's counter-based
    Gaussian noise (:func:`mtlsam_fast.ops.gaussian_noise`, fast fused backends), keyed by
    ``seed`` and a host-side draw counter: the counter is part of ``state_dict``, but it advances on
    a skipped step too and is a constant of a captured CUDA graph or a compiled function (which
    would replay one draw).
    """

    name = "graddrop"
    needs_grads = True
    returns_direction = True
    leak = VectorOption(low=0.0, high=1.0)

    def __init__(
        self,
        leak: float | Tensor | None = None,
        f: Callable[[Tensor], Tensor] | None = None,
        seed: int = 0,
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.leak = (
            [leak] if isinstance(leak, (int, float)) and not isinstance(leak, bool) else leak
        )
        if f is not None and not callable(f):
            raise ValueError(f"f must be a callable (a monotone function of P) or None, got {f!r}")
        self.f = f
        self.seed = check_seed(seed)
        self._draws = 0

    def compute(self, x: Inputs) -> Tensor:
        G = x.grads
        assert G is not None  # needs_grads: __call__ checked it
        K, P = G.shape
        acc = torch.float64 if G.dtype == torch.float64 else torch.float32
        if self.leak is None:
            leak = torch.zeros(K, dtype=acc, device=G.device)
        else:
            one = self.leak.shape[0] == 1  # a number: the same leak for every task
            leak = self._option_on("leak", self.leak, 1 if one else K, G.device).to(acc)
            leak = leak.expand(K)
        total = torch.zeros(P, dtype=acc, device=G.device)
        mass = torch.zeros(P, dtype=acc, device=G.device)
        for i in range(K):
            g = G[i].to(acc)
            total += g
            mass += g.abs()
        purity = 0.5 * (1 + torch.where(mass > 0, total / torch.where(mass > 0, mass, 1.0), 0.0))
        fp = purity if self.f is None else self.f(purity)
        z = ops.gaussian_noise(
            self.seed, self._draws * P, P, device=G.device, backend=self.backend
        ).to(acc)
        self._draws += 1
        u = 0.5 * (1 + torch.erf(z / math.sqrt(2.0)))
        keep_pos, keep_neg = fp > u, fp < u
        out = torch.zeros(P, dtype=acc, device=G.device)
        for i in range(K):
            g = G[i].to(acc)
            mask = (keep_pos & (g > 0)) | (keep_neg & (g < 0))
            out += (leak[i] + (1 - leak[i]) * mask.to(acc)) * g
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "draws": self._draws}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"seed", "draws"})
        seed = check_seed(state["seed"])
        draws = check_int("draws", state["draws"], low=0)
        self.seed, self._draws = seed, draws
