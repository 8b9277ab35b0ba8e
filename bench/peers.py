"""Peer implementations, each optional: torchjd's weightings, a quadprog-based exact QP solver, and
what LibMTL 1.1.5 needs to run with current torch and torchvision.

A missing peer is reported as absent by the benchmarks, never an error (the adapters' tests,
which need the peers, install them: the ``test`` extra). Install the peers with
``pip install ".[bench]"`` (it must not replace the installed torch; check with
``pip install --dry-run`` first).
"""

from __future__ import annotations

import sys
import types
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

#: mtlsam_fast weighting name -> torchjd weighting class name (torchjd.aggregation)
TORCHJD_WEIGHTINGS = {
    "mgda": "MGDAWeighting",
    "upgrad": "UPGradWeighting",
    "dualproj": "DualProjWeighting",
    "cagrad": "CAGradWeighting",
    "imtl": "IMTLGWeighting",
    "alignedmtl": "AlignedMTLWeighting",
    "pcgrad": "PCGradWeighting",
    "ls": "MeanWeighting",
}
#: constructor arguments for torchjd weightings that need them
_TORCHJD_ARGS = {"CAGradWeighting": {"c": 0.5}}


def torchjd_version() -> str | None:
    try:
        from importlib.metadata import version

        import torchjd  # noqa: F401

        return version("torchjd")
    except Exception:
        return None


def torchjd_weighting(name: str) -> Callable[[Tensor], Tensor] | None:
    """torchjd's weighting for the mtlsam_fast method ``name`` with its default settings, or
    None."""
    cls_name = TORCHJD_WEIGHTINGS.get(name)
    if cls_name is None:
        return None
    try:
        import torchjd.aggregation as agg

        w = getattr(agg, cls_name)(**_TORCHJD_ARGS.get(cls_name, {}))
        w(torch.eye(2, dtype=torch.float64))  # fails here if an optional solver is missing
        return w
    except Exception:
        return None


def quadprog_available() -> bool:
    try:
        import quadprog  # noqa: F401

        return True
    except ImportError:
        return False


def quadprog_simplex(gram: Tensor, ridge: float = 1e-12) -> np.ndarray:
    """Exact ``min 1/2 v^T Gamma v`` over the simplex with quadprog (Goldfarb-Idnani, host, fp64).

    quadprog needs a positive definite matrix: ``ridge * trace/K`` is added to the diagonal.
    """
    import quadprog

    H = gram.double().cpu().numpy()
    K = H.shape[0]
    H = 0.5 * (H + H.T) + np.eye(K) * ridge * max(np.trace(H) / K, 1e-300)
    a = np.zeros(K)
    C = np.concatenate([np.ones((K, 1)), np.eye(K)], axis=1)  # sum v = 1 (equality), v >= 0
    b = np.concatenate([[1.0], np.zeros(K)])
    return quadprog.solve_qp(H, a, C, b, meq=1)[0]


def import_libmtl() -> Any:
    """``LibMTL`` imported, with the one module its newest release (1.1.5) needs from torchvision.

    ``LibMTL/model/resnet.py`` imports ``load_state_dict_from_url`` from
    ``torchvision.models.utils``, which torchvision removed; that function is
    ``torch.hub.load_state_dict_from_url``, provided here as that module when it is missing.
    (``mtlsam_fast.integrations.libmtl`` itself never imports LibMTL's package.)
    """
    if "torchvision.models.utils" not in sys.modules:
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url  # type: ignore[attr-defined]
        sys.modules["torchvision.models.utils"] = shim
    import LibMTL

    return LibMTL


def libmtl_hps() -> type:
    """LibMTL's ``HPS`` architecture, zeroing the shared gradients in place.

    LibMTL 1.1.5 predates torch 2.0, whose ``Module.zero_grad()`` sets the gradients to None; its
    gradient-based weightings then write ``param.grad.data`` of None (``_reset_grad``). Zeroing in
    place is torch 1.x's behaviour; LibMTL's weighting code runs unchanged.
    """
    from LibMTL.architecture import HPS

    class InPlaceHPS(HPS):
        def zero_grad_share_params(self) -> None:
            self.encoder.zero_grad(set_to_none=False)

    return InPlaceHPS
