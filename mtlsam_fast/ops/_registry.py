"""Backend registry and selection for :mod:`mtlsam_fast.ops`.

A backend is a module exposing the op functions of :mod:`mtlsam_fast.ops` (same names and
signatures, without ``backend=``) plus ``unavailable_reason(device_type) -> str | None``. A backend
whose functions ``torch.compile`` can trace sets ``TRACEABLE = True``; while a function is being
compiled, ``"auto"`` only picks such backends (an opaque extension call would break the graph).
Backend modules are imported lazily, so ``import mtlsam_fast`` never imports Triton or the
compiled extension.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

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


def auto_order(
    device_type: str, op: str, dtype: torch.dtype | None = None, K: int | None = None
) -> tuple[str, ...]:
    """The backends ``"auto"`` tries for ``op`` on ``device_type``, for a buffer of ``dtype`` with
    ``K`` rows."""
    order = AUTO_ORDER.get(device_type, ("torch",))
    from_k = (
        _TRITON_GRAM_FROM_K.get(dtype)
        if device_type == "cuda" and op == "gram" and dtype is not None
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
            _modules[name] = importlib.import_module(BACKEND_MODULES[name])
        except ImportError as e:  # optional dependency or extension missing
            _modules[name] = None
            _import_errors[name] = f"{type(e).__name__}: {e}"
    return _modules[name]


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


def resolve(
    backend: str | None,
    device: torch.device,
    op: str,
    dtype: torch.dtype | None = None,
    K: int | None = None,
) -> ModuleType:
    """The backend module that runs ``op`` for tensors on ``device`` (``"auto"`` also weighs the
    buffer's ``dtype`` and row count ``K`` where given: :func:`auto_order`).

    Every op call goes through here: a backend already imported costs a name check, a dict lookup
    and the backend's own availability check."""
    name = get_backend() if backend is None else backend
    device_type = device.type
    if name == "auto":
        compiling = torch.compiler.is_compiling()
        for candidate in auto_order(device_type, op, dtype, K):
            if compiling and candidate not in _modules:
                continue  # never import while dynamo traces
            mod = _modules[candidate] if compiling else _module(candidate)
            if (
                mod is not None
                and mod.unavailable_reason(device_type) is None
                and hasattr(mod, op)
                and (not compiling or getattr(mod, "TRACEABLE", False))
            ):
                return mod
        return _modules["torch"]  # type: ignore[return-value]
    reason = unavailable_reason(name, device_type)
    if reason is not None:
        avail = ", ".join(available_backends(device)) or "none"
        raise RuntimeError(
            f"backend {name!r} is not available for {device_type} tensors ({reason}); "
            f"available here: {avail}"
        )
    mod = _modules[name]  # imported by unavailable_reason
    if not hasattr(mod, op):
        raise NotImplementedError(f"backend {name!r} does not implement op {op!r}")
    return mod  # type: ignore[return-value]
