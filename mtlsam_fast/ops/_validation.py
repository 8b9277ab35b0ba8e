"""Argument checks of :mod:`mtlsam_fast.ops`: every op runs them before any backend sees its
arguments, so no kernel reads or writes out of bounds and no backend returns garbage for bad input
(docs/ARCHITECTURE.md §3.1). Each raises a ``TypeError`` (wrong kind) or ``ValueError`` (wrong
value) naming the argument.

Everything is checked from metadata except the segment boundaries' values, which need one host
read of the ``offsets`` tensor: :func:`check_offset_values` does it once per tensor and version
(``Tensor._version`` counts in-place writes) and remembers the result on the tensor, so an
optimizer's own layout (``FlatLayout.offsets``, cached) is read once, not per step.
"""

from __future__ import annotations

import itertools
import math
import operator

import torch

Tensor = torch.Tensor

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_U64 = 1 << 64
_INT32_MAX = (1 << 31) - 1
_CHECKED = "_mtlsam_offsets_checked"  # tensor attribute: (P, _version) of the last passed check


def check_buffer(name: str, t: object, ndim: int | tuple[int, ...] = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has unsupported dtype {t.dtype}; "
            "supported: float32, float64, bfloat16, float16"
        )


def check_writable(name: str, t: Tensor) -> None:
    """``t`` is written in place: no two of its elements may share memory (an ``expand``ed or
    ``as_strided`` view would make a parallel kernel race and the result depend on the order)."""
    if t.is_contiguous():  # the common case, and the cheapest test
        return
    dims = sorted((s, n) for s, n in zip(t.stride(), t.shape, strict=True) if n > 1)
    span = 1
    for stride, size in dims:
        if stride < span:
            raise ValueError(
                f"{name} is written in place but its elements overlap in memory (shape "
                f"{tuple(t.shape)}, strides {t.stride()}); pass a tensor with its own storage "
                "(e.g. .clone())"
            )
        span = stride * size


def check_same_device(**tensors: Tensor | None) -> torch.device:
    """The device the given tensors share (``None`` entries are skipped); at least one is given.

    Called by every op: one ``.device`` per tensor and no containers on the common path."""
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            desc = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
            raise ValueError(f"tensors are on different devices: {desc}")
    return device  # type: ignore[return-value]


def check_offsets(offsets: object, P: int) -> None:
    """``offsets``: a 1-D int64 tensor ``[S + 1]``, ``offsets[0] = 0``, ``offsets[-1] = P``,
    non-decreasing (values checked once per tensor version, :func:`check_offset_values`)."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1:
        raise TypeError(
            "offsets must be a 1-D int64 tensor of segment boundaries (FlatLayout.offsets(device))"
        )
    if offsets.numel() < 2:
        raise ValueError("offsets must hold at least two boundaries")
    if not torch.compiler.is_compiling() and getattr(offsets, _CHECKED, None) != (
        P,
        offsets._version,
    ):
        check_offset_values(offsets, P)


def check_offset_values(offsets: Tensor, P: int) -> None:
    """The values of ``offsets`` (one host read, skipped when this tensor version passed for this
    ``P`` before; skipped while dynamo traces: the compiled kernels' custom ops check at run time,
    ``mtlsam_fast.ops._library``)."""
    if torch.compiler.is_compiling() or getattr(offsets, _CHECKED, None) == (
        P,
        offsets._version,
    ):
        return
    if offsets.device.type == "meta":
        return  # no values (shape-only tracing)
    v = offsets.detach().cpu()
    first, last = int(v[0]), int(v[-1])
    if first != 0 or last != P:
        raise ValueError(
            f"offsets must run from 0 to P = {P} (the buffer's length), got {first} ... {last}"
        )
    steps = v.diff()
    if bool((steps < 0).any()):
        i = int(torch.nonzero(steps < 0)[0])
        raise ValueError(
            f"offsets must be non-decreasing: offsets[{i}] = {int(v[i])} > "
            f"offsets[{i + 1}] = {int(v[i + 1])}"
        )
    setattr(offsets, _CHECKED, (P, offsets._version))


def mark_offsets_checked(offsets: Tensor, bounds: list[int], P: int) -> Tensor:
    """Check the boundaries from their host copy ``bounds`` (the list ``offsets`` was made from),
    then mark ``offsets`` as checked: a layout built on the host (``FlatLayout.offsets``) is never
    read back from the device (no synchronization on CUDA, even on first use)."""
    if not bounds or bounds[0] != 0 or bounds[-1] != P:
        raise ValueError(f"offsets must run from 0 to P = {P}, got {bounds[:1]} ... {bounds[-1:]}")
    for i, (a, b) in enumerate(itertools.pairwise(bounds)):
        if a > b:
            raise ValueError(
                f"offsets must be non-decreasing: offsets[{i}] = {a} > offsets[{i + 1}] = {b}"
            )
    setattr(offsets, _CHECKED, (P, offsets._version))
    return offsets


def check_weights(name: str, w: object, K: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != K:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must be a 1-D tensor of K={K} weights, got {shape}")
    if w.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {w.dtype}")


def check_scale(name: str, t: object, S: int) -> None:
    """A per-segment (``[S]``) or scalar (one element) floating-point tensor."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor ([S] or one element), got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
    if t.numel() != 1 and (t.dim() != 1 or t.shape[0] != S):
        raise ValueError(
            f"{name} must hold one value or one per segment (S = {S}), got shape {tuple(t.shape)}"
        )


def _index(name: str, value: object) -> int:
    """``value`` as a Python int (ints and integer scalars such as ``numpy.int64``; not bools)."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None


def check_counter(name: str, value: object, numel: int = 0) -> int:
    """A seed or stream offset: an int in [0, 2**64) (with ``numel``, the stream's counters
    ``value .. value + numel - 1`` too: they are 64-bit and must not wrap)."""
    value = _index(name, value)
    if value < 0 or value >= _U64 or value + numel > _U64:
        limit = "2**64)" if numel == 0 else f"2**64 - {numel}] (the stream must not wrap)"
        raise ValueError(f"{name} must lie in [0, {limit}, got {value}")
    return value


def check_numel(numel: object) -> int:
    numel = _index("numel", numel)
    if numel < 0:
        raise ValueError(f"numel must be non-negative, got {numel}")
    return numel


def check_qp_budget(max_iter: object, tol: object) -> tuple[int, float]:
    """The QP's iteration budget (an int in [1, 2**31)) and tolerance (a finite number > 0)."""
    max_iter = _index("max_iter", max_iter)
    if not 1 <= max_iter <= _INT32_MAX:
        raise ValueError(f"max_iter must lie in [1, 2**31 - 1], got {max_iter}")
    if isinstance(tol, bool) or not isinstance(tol, int | float):
        raise TypeError(f"tol must be a number, got {type(tol).__name__}")
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a finite number > 0, got {tol}")
    return max_iter, float(tol)


def check_flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return value


def needs_grad(*ts: Tensor | None) -> bool:
    """Whether autograd records an op on these inputs (grad mode on, one of them requires grad)."""
    if not torch.is_grad_enabled():
        return False
    for t in ts:  # noqa: SIM110 (a loop, not any(generator): this runs on every op call)
        if t is not None and t.requires_grad:
            return True
    return False


def refuse_grad(op: str, **tensors: Tensor | None) -> None:
    """``op`` has no derivative (an iterative solver, an in-place write of a buffer that the
    reference's autograd cannot see through): refuse inputs that autograd would record."""
    if needs_grad(*tensors.values()):
        names = ", ".join(k for k, t in tensors.items() if t is not None and t.requires_grad)
        raise TypeError(
            f"{op} does not support autograd ({names} requires grad): call it under "
            "torch.no_grad() or pass .detach()ed tensors"
        )
