"""Workspaces (partial sums, ticket counters) allocated once and cached per (device, name, shape).

A step that reuses a cached workspace allocates nothing, so it can be captured in a CUDA graph
after one eager warm-up call. Workspaces are not shared between concurrent streams: launches on
one device are assumed to be ordered on the stream that created them (the usual training loop).
"""

from __future__ import annotations

import torch

_cache: dict[tuple, torch.Tensor] = {}


def get(
    device: torch.device,
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype = torch.float32,
    zero: bool = False,
    fill: float | None = None,
) -> torch.Tensor:
    """A cached tensor; ``zero=True`` zero-fills it on creation only (ticket counters), ``fill``
    sets every element on creation only (constants)."""
    key = (device.type, device.index, name, tuple(shape), dtype)
    t = _cache.get(key)
    if t is None:
        t = (torch.zeros if zero else torch.empty)(shape, dtype=dtype, device=device)
        if fill is not None:
            t.fill_(fill)
        _cache[key] = t
    return t


def clear() -> None:
    _cache.clear()
