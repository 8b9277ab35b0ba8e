"""What the adapters share: a peer's method options turned into one of our weightings (a
:class:`Plan`), and the few transformations that peers put around the same method.

Nothing here imports a peer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .. import weighting as _weighting
from ..weighting.base import Weighting
from ..weighting.rlw import check_state_keys

Tensor = torch.Tensor


@dataclass(frozen=True)
class Plan:
    """How one peer method runs here, built by a table row from the peer's own options.

    ``weighting`` computes the weights from the Gram (on its device, no host sync). ``prepare``
    maps the Gram before the weighting sees it (torchjd's normalization and regularization of the
    dual-cone QP); ``finish`` maps ``(weights, gram)`` to the weights the peer returns (a scale:
    torchjd's ``Sum`` is K times ``Mean``; torchjd's ``NashMTL`` clips the direction's norm).
    ``max_grad_norm > 0`` clips the norm of the combined shared gradient instead of the weights
    (LibMTL's ``Nash_MTL`` clips the shared gradient only, after the heads got the raw weights).
    """

    weighting: Weighting
    prepare: Callable[[Tensor], Tensor] | None = None
    finish: Callable[[Tensor, Tensor], Tensor] | None = None
    max_grad_norm: float = 0.0

    def weights(
        self, gram: Tensor, losses: Tensor | None = None, grads: Tensor | None = None
    ) -> Tensor:
        """The peer's weights for ``gram`` (``losses``: the K losses, ``grads``: the K x P
        gradients whose Gram it is, for weightings that read them; a weighting with
        ``returns_direction`` returns the direction instead)."""
        g = gram if self.prepare is None else self.prepare(gram)
        w = self.weighting(
            g,
            losses if self.weighting.needs_losses else None,
            grads=grads if self.weighting.needs_grads else None,
        )
        return w if self.finish is None else self.finish(w, gram)


def method(name: str, **options: Any) -> Weighting:
    """Our weighting ``name`` (registry name) built with ``options``."""
    return _weighting.get(name, **options)


def draw_seed(seed: int | None) -> int:
    """``seed``, or one drawn from torch's default generator when None.

    The peers draw their random task orders and weights from a global generator at every call
    (``torch.randperm``, ``torch.randn``, Python's ``random``); ours come from a seeded
    device-side stream. Drawing the stream's seed from torch's generator once, at construction,
    keeps the peers' contract: ``torch.manual_seed(s)`` before building the method makes a run
    reproducible, and two instances draw different numbers.
    """
    if seed is None:
        return int(torch.randint(0, 2**62, ()))
    return seed


def nonnegative(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def dual_cone_regularization(norm_eps: float, reg_eps: float) -> Callable[[Tensor], Tensor] | None:
    """torchjd's preparation of the dual-cone QP (``QuadprogProjector``), or None when both are 0.

    The Gram is divided by its trace (the squared Frobenius norm of the Jacobian; all zeros when
    the trace is below ``norm_eps``), then ``reg_eps`` is added to its diagonal. Dividing by the
    trace does not move the QP's solution, so with ``reg_eps = 0`` and ``norm_eps = 0`` the
    projection is the exact one and no preparation is needed. A positive ``reg_eps`` changes the
    problem: a task whose gradient is small next to the others' is projected as if it were
    ``reg_eps`` larger, so the result may conflict with it (``<g_i, d> < 0``).
    """
    norm_eps = nonnegative("norm_eps", norm_eps)
    reg_eps = nonnegative("reg_eps", reg_eps)
    if norm_eps == 0 and reg_eps == 0:
        return None

    def prepare(gram: Tensor) -> Tensor:
        trace = gram.diagonal().sum()
        small = trace < norm_eps
        safe = torch.where(small, torch.ones_like(trace), trace)
        normalized = torch.where(small, torch.zeros_like(gram), gram / safe)
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return normalized + reg_eps * eye

    return prepare


def scaled_by_k(weights: Tensor, gram: Tensor) -> Tensor:
    """``K`` times the weights (a sum where our method returns a mean)."""
    return weights * weights.shape[0]


def divided_by_k(weights: Tensor, gram: Tensor) -> Tensor:
    """The weights divided by ``K`` (a mean where our method returns a sum)."""
    return weights / weights.shape[0]


def clip_direction(max_norm: float) -> Callable[[Tensor, Tensor], Tensor]:
    """Scale the weights so that ``||w^T G|| <= max_norm`` (from the Gram:
    ``||w^T G||^2 = w^T Gamma w``), on the device."""

    def finish(weights: Tensor, gram: Tensor) -> Tensor:
        w = weights.to(torch.float64)
        norm = (w @ gram.to(torch.float64) @ w).clamp_min(0).sqrt()
        factor = torch.where(
            norm > max_norm, max_norm / torch.where(norm > 0, norm, 1.0), torch.ones_like(norm)
        )
        return (w * factor).to(weights.dtype)

    return finish


class Periodic(Weighting):
    """``inner``'s weights recomputed every ``every`` calls and reused in between.

    The official Nash-MTL code's ``update_weights_every`` (kept by torchjd and LibMTL): calls
    ``0, every, 2 every, ...`` solve, the others return the last weights. The call counter is a
    host integer (no device sync); ``state_dict`` holds it, the last weights and ``inner``'s state.
    """

    def __init__(self, inner: Weighting, every: int):
        self.inner = inner
        self.every = positive_int("update_weights_every", every)
        self._calls = 0
        self._last: Tensor | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.inner.name

    @property
    def needs_losses(self) -> bool:  # type: ignore[override]
        return self.inner.needs_losses

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        if self._last is None or self._calls % self.every == 0:
            self._last = self.inner(gram, losses)
        elif self._last.shape[0] != gram.shape[0]:
            raise ValueError(
                f"{self.name}: the weights reused from the last update have "
                f"{self._last.shape[0]} tasks, the gram has {gram.shape[0]}"
            )
        self._calls += 1
        return self._last

    def state_dict(self) -> dict[str, Any]:
        last = None if self._last is None else self._last.clone()
        return {"inner": self.inner.state_dict(), "calls": self._calls, "last": last}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {"inner", "calls", "last"})
        calls, last = state["calls"], state["last"]
        if isinstance(calls, bool) or not isinstance(calls, int) or calls < 0:
            raise ValueError(f"{self.name} state: 'calls' must be an integer >= 0, got {calls!r}")
        if last is not None and (not isinstance(last, torch.Tensor) or last.dim() != 1):
            raise ValueError(f"{self.name} state: 'last' must be None or a [K] tensor")
        self.inner.load_state_dict(state["inner"])
        self._calls = calls
        self._last = None if last is None else last.clone()

    def __repr__(self) -> str:
        return f"Periodic({self.inner!r}, every={self.every})"
