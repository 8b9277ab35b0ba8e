"""Gradient weightings: ``weights = w(gram[, losses][, grads=G])``, one module per method family.

``get(name, **options)`` builds one by name; ``names()`` lists them. Every weighting class is also
importable from this package (``from mtlsam_fast.weighting import MGDA``); modules load on first
use. The interface (inputs, outputs, state) is :mod:`mtlsam_fast.weighting.base`; the method
table with papers and the peers each is checked against is ``docs/weightings.md``.
"""

from __future__ import annotations

import importlib
from typing import Any

from .base import Inputs, Weighting, check_gram

#: registry name -> (module in this package, class name)
_REGISTRY: dict[str, tuple[str, str]] = {
    "ls": ("ls", "LinearScalarization"),
    "mgda": ("mgda", "MGDA"),
    "pcgrad": ("pcgrad", "PCGrad"),
    "cagrad": ("cagrad", "CAGrad"),
    "imtl": ("imtl", "IMTL"),
    "nashmtl": ("nashmtl", "NashMTL"),
    "fairgrad": ("fairgrad", "FairGrad"),
    "upgrad": ("upgrad", "UPGrad"),
    "dualproj": ("upgrad", "DualProj"),
    "alignedmtl": ("alignedmtl", "AlignedMTL"),
    "dbmtl": ("dbmtl", "DBMTL"),
    "gradvac": ("gradvac", "GradVac"),
    "rlw": ("rlw", "RLW"),
    "config": ("config", "ConFIG"),
    "excessmtl": ("excessmtl", "ExcessMTL"),
    "sdmgrad": ("simplex", "SDMGrad"),
    "modo": ("simplex", "MoDo"),
    "pcd": ("pcd", "PCD"),
    "crmogm": ("crmogm", "CRMOGM"),
    "graddrop": ("graddrop", "GradDrop"),
    "krum": ("robust", "Krum"),
    "trimmedmean": ("robust", "TrimmedMean"),
    "moco": ("moco", "MoCo"),
    "gradnorm": ("gradnorm", "GradNorm"),
    "uw": ("logscale", "UW"),
    "imtl_l": ("logscale", "IMTLL"),
    "dwa": ("dwa", "DWA"),
    "famo": ("famo", "FAMO"),
    "gls": ("scalarization", "GLS"),
    "stch": ("scalarization", "STCH"),
    "cosmos": ("scalarization", "COSMOS"),
    "pbi": ("scalarization", "PBI"),
}
_CLASS_TO_NAME = {cls: name for name, (_, cls) in _REGISTRY.items()}


def _load(name: str) -> type[Weighting]:
    module, cls = _REGISTRY[name]
    return getattr(importlib.import_module(f"{__name__}.{module}"), cls)


def names() -> list[str]:
    """Registered weighting names."""
    return list(_REGISTRY)


def get(name: str | Weighting, **options: Any) -> Weighting:
    """A weighting by registry name (options go to its constructor), or ``name`` itself if an
    instance."""
    if isinstance(name, Weighting):
        if options:
            raise ValueError("options cannot be applied to an existing weighting object")
        return name
    if not isinstance(name, str) or name.lower() not in _REGISTRY:
        raise ValueError(f"unknown weighting {name!r}; available: {', '.join(names())}")
    return _load(name.lower())(**options)


def __getattr__(attr: str) -> Any:
    if attr in _CLASS_TO_NAME:
        return _load(_CLASS_TO_NAME[attr])
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")


__all__ = ["Inputs", "Weighting", "check_gram", "get", "names"]
__all__ += list(_CLASS_TO_NAME)  # the weighting classes, loaded on first use by __getattr__
