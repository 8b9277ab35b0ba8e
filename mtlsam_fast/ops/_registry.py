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
    mod = _module(_check_name(name)) if name != "auto" else None
    if name == "auto":
        return None
    if mod is None:
        return _import_errors[name]
    return mod.unavailable_reason(device_type)


def available_backends(device: str | torch.device | None = None) -> list[str]:
    """Backends that work on this machine for ``device`` (default: every device type present)."""
    if device is None:
        types = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    else:
        types = [torch.device(device).type]
    return [n for n in BACKEND_MODULES if any(unavailable_reason(n, t) is None for t in types)]


def resolve(backend: str | None, device: torch.device, op: str) -> ModuleType:
    """The backend module that runs ``op`` for tensors on ``device``."""
    name = get_backend() if backend is None else _check_name(backend)
    if name == "auto":
        compiling = torch.compiler.is_compiling()
        for candidate in AUTO_ORDER.get(device.type, ("torch",)):
            if compiling and candidate not in _modules:
                continue  # never import while dynamo traces
            mod = _modules[candidate] if compiling else _module(candidate)
            if (mod is not None and mod.unavailable_reason(device.type) is None and hasattr(mod, op)
                    and (not compiling or getattr(mod, "TRACEABLE", False))):
                return mod
        return _modules["torch"]  # type: ignore[return-value]
    reason = unavailable_reason(name, device.type)
    if reason is not None:
        avail = ", ".join(available_backends(device)) or "none"
        raise RuntimeError(
            f"backend {name!r} is not available for {device.type} tensors ({reason}); "
            f"available here: {avail}"
        )
    mod = _module(name)
    if not hasattr(mod, op):
        raise NotImplementedError(f"backend {name!r} does not implement op {op!r}")
    return mod  # type: ignore[return-value]
