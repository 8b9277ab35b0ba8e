"""mtlsam_fast: fast sharpness-aware multi-task optimization (F-MTL, SAMO) and gradient aggregation.

Importing the package is cheap: Triton and the compiled extension load only when a backend that
needs them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from . import ops, weighting
from .buffers import FlatLayout, GradBuffer, Segment, flatten_parameters
from .ops import available_backends, get_backend, set_backend

__version__ = "0.1.0"

__all__ = [
    "FMTL",
    "SAMO",
    "FlatLayout",
    "GradBuffer",
    "MTLOptimizer",
    "Segment",
    "available_backends",
    "flatten_parameters",
    "get_backend",
    "ops",
    "set_backend",
    "weighting",
]

_LAZY = {
    "FMTL": "mtlsam_fast.optim",
    "SAMO": "mtlsam_fast.optim",
    "MTLOptimizer": "mtlsam_fast.optim",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mtlsam_fast' has no attribute {name!r}")
