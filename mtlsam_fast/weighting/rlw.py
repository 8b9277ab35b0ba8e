"""RLW: random loss weighting, plus the seeded device-side random stream of the random weightings.

Lin, Ye, Xu, Shi, Zhang, "Reasonable Effectiveness of Random Weighting: A Litmus Test for
Multi-Task Learning", TMLR 2022 (https://arxiv.org/abs/2111.10603).

Randomness (shared with PCGrad and GradVac): the counter-based Philox stream of
:mod:`mtlsam_fast.ops.philox` keyed by ``seed``, read at a device-side int64 counter ``offset``
that each call advances in place. A ``torch.Generator`` cannot be traced by
``torch.compile(fullgraph=True)`` (an opaque object), and its state is device specific; the counter
stream is plain tensor arithmetic, gives the same numbers on every device (up to the last ulp of
``log``/``cos`` for normals) and its state (``seed``, ``offset``) round-trips through
``state_dict`` bitwise.
"""

from __future__ import annotations

from typing import Any

import torch

from ..ops import philox
from .base import Tensor, Weighting, check_state_keys, out_dtype


def check_seed(seed: Any) -> int:
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    return seed


class PhiloxStream:
    """Seeded random numbers with a device-side counter: no host sync, no ``torch.Generator``.

    Element ``j`` of a draw of ``n`` numbers uses Philox counter ``offset + j``; the draw then adds
    ``n`` to ``offset`` in place (on the device, so CUDA-graph replays advance it too).
    """

    def __init__(self, seed: int):
        self.seed = check_seed(seed)
        self.offset = torch.zeros((), dtype=torch.int64)

    def counters(self, n: int, device: torch.device) -> Tensor:
        if self.offset.device != device:
            self.offset = self.offset.to(device)
        c = self.offset + torch.arange(n, dtype=torch.int64, device=device)
        self.offset.add_(n)
        return c

    def normal(self, n: int, device: torch.device) -> Tensor:
        """``n`` fp32 standard normals (``philox.gaussian_from_counter``)."""
        return philox.gaussian_from_counter(self.seed, self.counters(n, device))

    def words(self, n: int, device: torch.device) -> Tensor:
        """``n`` uniform 32-bit integers (first Philox output word), as int64."""
        return philox.philox4x32(self.seed, self.counters(n, device))[0]

    def task_orders(self, K: int, device: torch.device) -> Tensor:
        """[K, K-1] int64: row ``i`` is a uniformly random order of the tasks other than ``i``.

        Keys are ``K*K`` Philox words (row-major); the diagonal key is set above every word, and
        each row is sorted stably by key, so row ``i`` ends with ``i``, which is dropped.
        """
        keys = self.words(K * K, device).view(K, K)
        eye = torch.eye(K, dtype=torch.bool, device=device)
        keys = torch.where(eye, torch.full_like(keys, 2**33), keys)
        return torch.argsort(keys, dim=1, stable=True)[:, : K - 1]

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed, "offset": self.offset.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        seed = check_seed(state.get("seed"))
        offset = state.get("offset")
        if not isinstance(offset, torch.Tensor) or offset.dtype != torch.int64 or offset.dim() != 0:
            raise ValueError("random stream state needs 'offset', a 0-d int64 tensor")
        self.seed = seed
        self.offset = offset.clone()


class RandomWeighting(Weighting):
    """A weighting drawing from a seeded :class:`PhiloxStream` (its state: the stream)."""

    def __init__(self, seed: int = 0, *, backend: str | None = None):
        super().__init__(backend=backend)
        self._stream = PhiloxStream(seed)

    @property
    def seed(self) -> int:
        return self._stream.seed

    def _extra_state_tensors(self) -> dict[str, Tensor]:
        return {"stream.offset": self._stream.offset}

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "stream": self._stream.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_state_keys(self.name, state, {*self.STATE, "stream"})
        probe = PhiloxStream(0)
        probe.load_state_dict(state["stream"])  # raises before anything changes
        if self.STATE:
            self._state, self._state_spec = self._checked_state(state, {*self.STATE, "stream"})
        self._stream = probe


class RLW(RandomWeighting):
    """Random loss weighting: ``weights = softmax(z)``, ``z ~ N(0, I_K)`` drawn fresh every call.

    The paper's default distribution (standard normal + softmax, as in its official code). The Gram
    is only used for K, the device, the dtype and the non-finite check. ``seed`` picks the stream
    (see the module docstring); ``state_dict`` holds the seed and the stream counter.
    """

    name = "rlw"

    def __repr__(self) -> str:
        return f"RLW(seed={self.seed})"

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        z = self._stream.normal(K, gram.device).to(out_dtype(gram))
        return torch.softmax(z, dim=0)
