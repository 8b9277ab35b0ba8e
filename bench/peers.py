"""Peer implementations, each optional: torchjd's weightings and a quadprog-based exact QP solver.

None of these is required by the tests; a missing peer is reported as absent, never an error.
Install the torchjd peer with ``pip install "torchjd[quadprog_projector]"`` (it must not replace
the installed torch; check with ``pip install --dry-run`` first).
"""

from __future__ import annotations

from collections.abc import Callable

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
