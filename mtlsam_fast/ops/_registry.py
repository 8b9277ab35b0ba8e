"""Backend registry and selection for :mod:`mtlsam_fast.ops`.

A backend is a module implementing the op contract (:class:`._contract.Backend`: the op functions
of :mod:`mtlsam_fast.ops` with their validated arguments, plus ``unavailable_reason``), checked
when the registry loads it. A backend whose functions ``torch.compile`` can trace sets
``TRACEABLE = True``; while a function is being compiled, ``"auto"`` only picks such backends.
Backend modules are imported lazily, so ``import mtlsam_fast`` never imports Triton or the
compiled extension.

Which backend ran is observable: :func:`dispatch_log` records every dispatch (and every hand-off
of a compiled backend to the reference, with its reason) and, at ``DEBUG`` level, the logger
``mtlsam_fast.ops`` reports the same while :func:`log_dispatches` is on.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
from collections.abc import Iterator
from types import ModuleType
from typing import NamedTuple

import torch

from ._contract import check_backend

#: backend name -> module implementing it.
BACKEND_MODULES: dict[str, str] = {
    "torch": "mtlsam_fast.ops.torch_backend",
    "triton": "mtlsam_fast.ops.triton_backend",
    "cpu": "mtlsam_fast.ops.cpu_backend",
    "cuda": "mtlsam_fast.ops.cuda_backend",
}

#: preference order of ``"auto"`` per device type (first available wins).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "cuda": ("cuda", "triton", "torch"),
    "cpu": ("cpu", "torch"),
}

#: Measured exceptions to AUTO_ORDER on CUDA: from how many rows K the Gram of a buffer of this
#: dtype goes to Triton first. On an H100 at P = 2**26
#: (bench/results/NVIDIA_H100_80GB_HBM3/triton.log) the Triton tensor-core Gram reads bf16 at
#: 86-98 % of the copy bandwidth for K = 16-64, the CUDA kernel's shared-memory tiles at 6-11 %
#: (8-17x slower); up to K = 8 the CUDA kernel is the faster one (39-79 % against 7-55 %). In fp32
#: the CUDA kernel is faster up to K = 32 (1.3-3.8x) and Triton's exact-fp32 dot at K = 64 (1.28x).
#: MGDA's fused path (``min_norm_aggregate``, resolved as "gram") follows its Gram; the other ops
#: keep AUTO_ORDER (diff_gram: CUDA faster or level at every measured K).
_TRITON_GRAM_FROM_K: dict[torch.dtype, int] = {
    torch.bfloat16: 9,
    torch.float16: 9,
    torch.float32: 33,
}


_GRAM_LIKE = ("gram", "min_norm_aggregate")


def auto_order(
    device_type: str, op: str, dtype: torch.dtype | None = None, K: int | None = None
) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``op`` on ``device_type``, for a buffer of ``dtype`` with
    ``K`` rows."""
    order = AUTO_ORDER.get(device_type, ("torch",))
    from_k = (
        _TRITON_GRAM_FROM_K.get(dtype)
        if device_type == "cuda" and op in _GRAM_LIKE and dtype is not None
        else None
    )
    if from_k is not None and K is not None and from_k <= K:
        return ("triton", *(b for b in order if b != "triton"))
    return order


BACKEND_NAMES = ("auto", *BACKEND_MODULES)

_default_backend: str | None = None  # None: read MTLSAM_BACKEND, else "auto"
_modules: dict[str, ModuleType | None] = {}
_import_errors: dict[str, str] = {}


def _check_name(name: str) -> str:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"unknown backend {name!r}; known backends: {', '.join(BACKEND_NAMES)}")
    return name


def set_backend(name: str | None) -> None:
    """Set the process-wide default backend (``None`` restores ``MTLSAM_BACKEND`` / ``"auto"``)."""
    global _default_backend
    _default_backend = None if name is None else _check_name(name)


def get_backend() -> str:
    """The default backend name: ``set_backend`` value, else ``MTLSAM_BACKEND``, else ``"auto"``."""
    if _default_backend is not None:
        return _default_backend
    env = os.environ.get("MTLSAM_BACKEND", "").strip()
    if env:
        try:
            return _check_name(env)
        except ValueError as e:
            raise ValueError(f"MTLSAM_BACKEND: {e}") from None
    return "auto"


def _module(name: str) -> ModuleType | None:
    if name not in _modules:
        try:
            mod = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as e:  # optional dependency or extension missing
            _modules[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
        else:
            check_backend(name, mod)
            _modules[name] = mod
    return _modules[name]


def register_backend(name: str, module: ModuleType) -> None:
    """Add (or replace) backend ``name``, implemented by ``module``, after checking it against the
    op contract (:class:`._contract.Backend`; ``TypeError`` naming the missing ops or the wrong
    signatures). It is then selectable by name (``backend=name``, :func:`set_backend`);
    ``"auto"`` keeps :data:`AUTO_ORDER`."""
    global BACKEND_NAMES
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(
            f"a backend name must be a non-empty string other than 'auto', got {name!r}"
        )
    check_backend(name, module)
    BACKEND_MODULES[name] = module.__name__
    _modules[name] = module
    _import_errors.pop(name, None)
    BACKEND_NAMES = ("auto", *BACKEND_MODULES)


def unavailable_reason(name: str, device_type: str) -> str | None:
    """Why backend ``name`` cannot run on ``device_type`` (``None`` when it can)."""
    if name == "auto":
        return None
    mod = _module(_check_name(name))
    return _import_errors[name] if mod is None else mod.unavailable_reason(device_type)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that work on this machine for ``device`` (default: every device type present)."""
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [n for n in BACKEND_MODULES if any(unavailable_reason(n, t) is None for t in types)]


def _reason_while_tracing(name: str, device_type: str) -> str | None:
    """:func:`unavailable_reason` for backends already imported (dynamo traces it: plain Python on
    module state); ``"not imported"`` for the others (never import while dynamo traces)."""
    if name != "auto" and name not in _modules:
        return "not imported before torch.compile traced the call"
    return unavailable_reason(name, device_type)


def resolve(
    backend: str | None,
    device: torch.device,
    op: str,
    dtype: torch.dtype | None = None,
    K: int | None = None,
    *,
    grad: bool = False,
) -> ModuleType:
    """The backend module that runs ``op`` for tensors on ``device`` (``"auto"`` also weighs the
    buffer's ``dtype`` and row count ``K`` where given: :func:`auto_order`). With ``grad`` (an
    input requires grad), a compiled backend hands the op to the differentiable reference.

    Every op call goes through here: a backend already imported costs a name check, a dict lookup
    and the backend's own availability check."""
    name = get_backend() if backend is None else backend
    device_type = device.type
    compiling = torch.compiler.is_compiling()
    mod: ModuleType | None = None
    if name == "auto":
        for candidate in auto_order(device_type, op, dtype, K):
            if compiling:
                found = _modules.get(candidate)
                if (
                    found is not None
                    and getattr(found, "TRACEABLE", False)
                    and _reason_while_tracing(candidate, device_type) is None
                ):
                    mod = found
                    break
                continue
            found = _module(candidate)
            if found is not None and found.unavailable_reason(device_type) is None:
                mod = found
                break
        ran = "torch" if mod is None else candidate
        mod = mod or _modules["torch"]
    else:
        reason = (
            _reason_while_tracing(name, device_type)
            if compiling
            else unavailable_reason(name, device_type)
        )
        if reason is not None:
            avail = ", ".join(available_backends(device)) or "none"
            raise RuntimeError(
                f"backend {name!r} is not available for {device_type} tensors ({reason}); "
                f"available here: {avail}"
            )
        mod, ran = _modules[name], name  # imported by unavailable_reason
    if grad and ran != "torch":
        if _sinks:
            _note(
                Dispatch(op, name, "torch", f"{ran}: autograd needs the differentiable reference")
            )
        return _modules["torch"]  # type: ignore[return-value]
    if _sinks:
        _note(Dispatch(op, name, ran, None))
    return mod  # type: ignore[return-value]


# --- observing the dispatch ---------------------------------------------------------------------


class Dispatch(NamedTuple):
    """One op call: the backend asked for (``"auto"`` or a name), the backend that ran it, and why
    it was not the one chosen (a compiled backend's hand-off to the reference), else ``None``."""

    op: str
    requested: str
    backend: str
    fallback: str | None


_log = logging.getLogger("mtlsam_fast.ops")
#: active sinks: lists of :func:`dispatch_log` and the logger of :func:`log_dispatches`
_sinks: list[list[Dispatch] | logging.Logger] = []


def _note(record: Dispatch) -> None:
    if torch.compiler.is_compiling():
        return  # dispatch happens at trace time; the graph holds the ops that run
    for sink in _sinks:
        if isinstance(sink, list):
            sink.append(record)
        else:
            how = f" (fallback: {record.fallback})" if record.fallback else ""
            sink.debug("%s: %s -> %s%s", record.op, record.requested, record.backend, how)


def fallback(op: str, backend: str, reason: str) -> ModuleType:
    """The torch reference, for ``backend`` handing ``op`` to it (``reason``: which input its
    kernels do not take). Every fallback goes through here, so :func:`dispatch_log` sees it."""
    if _sinks:
        _note(Dispatch(op, backend, "torch", reason))
    return _modules["torch"]  # type: ignore[return-value]


@contextlib.contextmanager
def dispatch_log() -> Iterator[list[Dispatch]]:
    """Record the dispatches made inside the block: ``with dispatch_log() as log: ...`` gives one
    :class:`Dispatch` per op call, followed by one per hand-off to the reference (``backend`` is
    then ``"torch"`` and ``fallback`` says why). Not recorded while ``torch.compile`` traces (the
    compiled graph shows which ops it calls)."""
    log: list[Dispatch] = []
    _sinks.append(log)
    try:
        yield log
    finally:
        _sinks.remove(log)


def log_dispatches(enabled: bool = True) -> None:
    """Report every dispatch on the logger ``mtlsam_fast.ops`` at ``DEBUG`` level (on or off)."""
    if enabled and _log not in _sinks:
        _sinks.append(_log)
    elif not enabled and _log in _sinks:
        _sinks.remove(_log)
