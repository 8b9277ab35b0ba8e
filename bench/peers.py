"""Peer implementations, each optional: torchjd's weightings, aggregators and scalarizers, LibMTL's
GradNorm, a quadprog-based exact QP solver, and what LibMTL 1.1.5 needs to run with current torch
and torchvision.

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

#: mtlsam_fast name -> (input kind, torchjd class, its arguments) for :func:`peer_call`; the kinds:
#: "gram" weightings, "matrix" weightings or aggregators of G, "scalarizer" of the losses (the
#: weights are its gradient), "learnt" scalarizers whose parameters take a torch.optim.Adam step
PEER_CALLS: dict[str, tuple[str, str, dict]] = {
    "ls": ("gram", "MeanWeighting", {}),
    "mgda": ("gram", "MGDAWeighting", {}),
    "upgrad": ("gram", "UPGradWeighting", {}),
    "dualproj": ("gram", "DualProjWeighting", {}),
    "cagrad": ("gram", "CAGradWeighting", {"c": 0.4}),
    "imtl": ("gram", "IMTLGWeighting", {}),
    "alignedmtl": ("gram", "AlignedMTLWeighting", {}),
    "pcgrad": ("gram", "PCGradWeighting", {}),
    "fairgrad": ("gram", "FairGradWeighting", {"alpha": 1.0}),
    "gradvac": ("gram", "GradVacWeighting", {}),
    "rlw": ("gram", "RandomWeighting", {}),
    "nashmtl": ("matrix", "NashMTL", {}),
    "config": ("matrix", "ConFIG", {}),
    "excessmtl": ("matrix", "ExcessMTLWeighting", {}),
    "sdmgrad": ("gram", "SDMGradWeighting", {}),
    "modo": ("gram", "MoDoWeighting", {}),
    "pcd": ("gram", "PCDWeighting", {}),
    "krum": ("gram", "KrumWeighting", {"n_byzantine": 0}),
    "graddrop": ("matrix", "GradDrop", {}),
    "trimmedmean": ("matrix", "TrimmedMean", {"trim_number": 0}),
    "uw": ("learnt", "UW", {}),
    "imtl_l": ("learnt", "IMTLL", {}),
    "famo": ("learnt", "FAMO", {}),
    "dwa": ("scalarizer", "DWA", {}),
    "gls": ("scalarizer", "GeometricMean", {}),
    "stch": ("scalarizer", "STCH", {"mu": 1.0}),
    "cosmos": ("scalarizer", "COSMOS", {"lambda_": 1.0}),
    "pbi": ("scalarizer", "PBI", {"theta": 5.0}),
}


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


def peer_call(name: str, G: Tensor, losses: Tensor) -> tuple[str, Callable[[], object]] | None:
    """(description, one call) of the peer's method ``name`` on the gradients ``G`` (their Gram
    for Gram weightings) or the losses, with the settings of mtlsam_fast's defaults; None when no
    installed peer has it."""
    K = G.shape[0]
    if name == "crmogm":
        try:
            import torchjd.aggregation as agg
        except ImportError:
            return None
        w = agg.CRMOGMWeighting(agg.MGDAWeighting())
        gram = G @ G.T
        return "torchjd CRMOGMWeighting(MGDAWeighting())", lambda: w(gram)
    if name == "gradnorm":
        return _libmtl_gradnorm(G, losses)
    if name not in PEER_CALLS:
        return None
    kind, cls_name, kwargs = PEER_CALLS[name]
    try:
        import torchjd.aggregation as agg
        import torchjd.scalarization as scal
    except ImportError:
        return None
    if kind in ("gram", "matrix"):
        if cls_name == "NashMTL":
            kwargs = {**kwargs, "n_tasks": K}
        w = getattr(agg, cls_name)(**kwargs)
        x = G @ G.T if kind == "gram" else G
        try:
            w(x)  # fails here if an optional solver is missing
        except Exception:
            return None
        return f"torchjd {cls_name}", lambda: w(x)
    if cls_name in ("COSMOS", "PBI"):
        kwargs = {**kwargs, "weights": torch.full((K,), 1.0 / K, dtype=losses.dtype)}
    s = (
        getattr(scal, cls_name)(K, **kwargs)
        if kind == "learnt"
        else getattr(scal, cls_name)(**kwargs)
    )
    opt = (
        torch.optim.Adam(s.parameters(), lr=1e-3)
        if kind == "learnt" and cls_name != "FAMO"
        else None
    )

    def call() -> Tensor:
        L = losses.clone().requires_grad_(True)
        out = s(L)
        if opt is not None:  # the learnt parameters' step, as a torchjd user takes it
            opt.zero_grad()
            out.backward()
            opt.step()
            return L.grad
        (g,) = torch.autograd.grad(out, L)
        if cls_name == "FAMO":
            s.update(losses * 0.99)
        return g

    desc = f"torchjd {cls_name}: scalarize, autograd for the weights"
    return desc + (", Adam step" if opt is not None else ""), call


def _libmtl_gradnorm(G: Tensor, losses: Tensor) -> tuple[str, Callable[[], object]] | None:
    """LibMTL's GradNorm.backward on given gradients (its gradient collection stubbed out)."""
    try:
        GradNorm = import_libmtl().weighting.GradNorm
    except ImportError:
        return None
    K = G.shape[0]
    gn = GradNorm()
    gn.task_num, gn.device, gn.rep_grad, gn.epoch = K, "cpu", False, 1
    gn.train_loss_buffer = (losses.double() + 1).numpy()[:, None]
    gn.init_param()
    gn._get_grads = lambda losses, mode: G
    gn._backward_new_grads = lambda *a, **k: None
    return "LibMTL GradNorm.backward (gradients given)", lambda: gn.backward(losses, alpha=1.5)


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
