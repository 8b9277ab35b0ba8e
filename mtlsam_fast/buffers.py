"""Flat buffers over a list of parameters: the layout, per-task gradient capture, flat parameters.

The shared parameters are described by segments (offset, numel, shape) of one flat index space of
size P. Per-task gradients live in rows of ``G: [K, P]``. Capture is zero-copy: while task ``k`` is
captured, each parameter's ``.grad`` is a view into row ``k`` of ``G``, so autograd's in-place
accumulation writes straight into the buffer (no ``torch.cat``, no per-parameter copies). Each
segment holds its parameter in the parameter's memory order (``Segment.stride``), so a
``channels_last`` parameter, its ``.grad`` and its rows of ``G`` all stay ``channels_last``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import torch

from .ops import FLOAT_DTYPES
from .ops._validation import mark_offsets_checked

Tensor = torch.Tensor


@dataclass(frozen=True)
class Segment:
    """One parameter tensor's place in the flat index space.

    ``stride`` is the memory layout of the segment's views: ``None`` for row-major (contiguous), or
    the strides of a parameter that is dense in another order (``channels_last``, a transposed
    weight), whose elements then lie in the segment in memory order so its views keep that layout.
    """

    offset: int
    numel: int
    shape: torch.Size
    stride: tuple[int, ...] | None = None


def dense_stride(t: Tensor) -> tuple[int, ...] | None:
    """The strides of ``t`` if it is dense in a non-row-major order (``channels_last``, a
    transposed weight), else ``None`` (row-major; a non-dense tensor becomes row-major)."""
    stride = tuple(torch.empty_like(t, device="meta").stride())  # t's own if non-overlapping, dense
    row_major = tuple(torch.empty(t.shape, device="meta").stride())
    return None if stride == row_major else stride


def check_params(params: Iterable[Tensor], what: str = "parameters") -> list[Tensor]:
    """Validate a parameter list: tensors, floating dtypes, one device, no duplicates, not empty."""
    params = list(params)
    if not params:
        raise ValueError(f"{what}: empty parameter list")
    seen: set[int] = set()
    for i, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{what}[{i}] is a {type(p).__name__}, expected a torch.Tensor")
        if p.dtype not in FLOAT_DTYPES:
            raise TypeError(
                f"{what}[{i}] has dtype {p.dtype}; supported: float32, float64, bfloat16, float16"
            )
        if id(p) in seen:
            raise ValueError(f"{what}[{i}] appears more than once")
        seen.add(id(p))
    devices = {p.device for p in params}
    if len(devices) > 1:
        raise ValueError(f"{what} are on different devices: {sorted(map(str, devices))}")
    return params


class FlatLayout:
    """Segments of a list of parameters in one flat index space (64-bit offsets)."""

    def __init__(self, params: Iterable[Tensor]):
        params = check_params(params)
        segs, off = [], 0
        for p in params:
            segs.append(Segment(off, p.numel(), p.shape, dense_stride(p)))
            off += p.numel()
        self.segments: tuple[Segment, ...] = tuple(segs)
        self.numel: int = off
        self.device: torch.device = params[0].device
        self._offsets: dict[torch.device, Tensor] = {}

    def __len__(self) -> int:
        return len(self.segments)

    def offsets(self, device: torch.device | str | None = None) -> Tensor:
        """Segment boundaries as an int64 tensor ``[S + 1]`` on ``device`` (cached)."""
        device = torch.device(device) if device is not None else self.device
        if device not in self._offsets:
            bounds = [s.offset for s in self.segments] + [self.numel]
            t = torch.tensor(bounds, dtype=torch.int64, device=device)
            self._offsets[device] = mark_offsets_checked(t, bounds, self.numel)  # no device read
        return self._offsets[device]

    def views(self, flat: Tensor) -> list[Tensor]:
        """Per-parameter views of a flat ``[P]`` buffer, shaped and strided like the parameters
        (``Segment.stride``)."""
        if flat.dim() != 1 or flat.numel() != self.numel or (flat.numel() and flat.stride(0) != 1):
            raise ValueError(
                f"expected a contiguous flat buffer of {self.numel} elements, got shape "
                f"{tuple(flat.shape)}"
            )
        return [
            flat[s.offset : s.offset + s.numel].view(s.shape)
            if s.stride is None
            else flat[s.offset : s.offset + s.numel].as_strided(s.shape, s.stride)
            for s in self.segments
        ]

    def gather(
        self, tensors: Sequence[Tensor], out: Tensor | None = None, dtype: torch.dtype | None = None
    ) -> Tensor:
        """Copy per-parameter tensors into one flat buffer (a copy; capture avoids this)."""
        if out is None:
            out = torch.empty(self.numel, dtype=dtype or tensors[0].dtype, device=tensors[0].device)
        for view, t in zip(self.views(out), tensors, strict=True):
            view.copy_(t)
        return out


def flatten_parameters(params: Sequence[Tensor], layout: FlatLayout | None = None) -> Tensor:
    """Move ``params`` into one contiguous flat buffer and make each ``.data`` a view of it.

    Returns the flat buffer ``[P]``. Parameter identities (and so optimizer state keyed on them)
    are kept; their values are unchanged; a parameter dense in another memory order
    (``channels_last``) keeps its strides, a non-dense one becomes contiguous. All
    parameters must share one dtype (one buffer holds one dtype).
    """
    params = check_params(params)
    dtypes = {p.dtype for p in params}
    if len(dtypes) > 1:
        raise TypeError(
            "cannot flatten parameters of several dtypes into one buffer: "
            f"{sorted(map(str, dtypes))}"
        )
    layout = layout or FlatLayout(params)
    flat = torch.empty(layout.numel, dtype=params[0].dtype, device=params[0].device)
    with torch.no_grad():
        for view, p in zip(layout.views(flat), params, strict=True):
            view.copy_(p)
            p.data = view
    return flat


class GradBuffer:
    """Per-task gradients of a parameter list in one ``[K, P]`` buffer, captured without copies.

    ``dtype`` defaults to the parameters' dtype (fp32 for mixed dtypes). Parameters whose dtype
    differs from the buffer's cannot have a ``.grad`` view into it (autograd requires the grad's
    dtype to match); they are captured by one copy each after the backward and listed in
    ``copied``.
    """

    def __init__(
        self,
        params: Iterable[Tensor],
        num_tasks: int,
        *,
        dtype: torch.dtype | None = None,
        layout: FlatLayout | None = None,
    ):
        self.params = check_params(params)
        if not isinstance(num_tasks, int) or num_tasks < 1:
            raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
        if dtype is None:
            dtypes = {p.dtype for p in self.params}
            dtype = dtypes.pop() if len(dtypes) == 1 else torch.float32
        if dtype not in FLOAT_DTYPES:
            raise TypeError(f"unsupported buffer dtype {dtype}")
        self.layout = layout or FlatLayout(self.params)
        self.G = torch.zeros(
            num_tasks, self.layout.numel, dtype=dtype, device=self.params[0].device
        )
        self.copied: list[int] = [i for i, p in enumerate(self.params) if p.dtype != dtype]
        self._row_views = [self.layout.views(self.G[k]) for k in range(num_tasks)]

    @property
    def num_tasks(self) -> int:
        return self.G.shape[0]

    @contextlib.contextmanager
    def capture(self, k: int, *, accumulate: bool = False) -> Iterator[Tensor]:
        """Within the block, backward passes accumulate the parameters' gradients into row ``k``.

        The row is zeroed first unless ``accumulate``. Parameters that get no gradient keep a zero
        row. The parameters' previous ``.grad`` tensors are put back on exit. Rows hold each
        parameter in its memory order (``Segment.stride``), like :func:`flatten_parameters`; a
        non-dense parameter therefore gets a contiguous ``.grad`` view (autograd warns that the
        layout differs from the parameter's; flatten the parameters first to avoid it). Higher-order
        gradients (``create_graph=True``) are not captured in place: autograd replaces ``.grad``
        instead of accumulating into it.
        """
        if not 0 <= k < self.num_tasks:
            raise IndexError(f"task index {k} out of range for {self.num_tasks} tasks")
        row = self.G[k]
        if not accumulate:
            row.zero_()
        saved = [p.grad for p in self.params]
        copied = set(self.copied)
        views = self._row_views[k]
        for i, (p, view) in enumerate(zip(self.params, views)):
            p.grad = torch.zeros_like(p) if i in copied else view
        try:
            yield row
            for i in self.copied:
                # set to zeros_like(p) above; the backward accumulated into it
                views[i].add_(cast(Tensor, self.params[i].grad))
        finally:
            for p, g in zip(self.params, saved):
                p.grad = g
