"""The Triton backend: fused kernels from :mod:`mtlsam_fast.triton_kernels` (source folder
``triton_kernels/``) behind the ops interface.

Runs on CUDA tensors, and on CPU tensors only under ``TRITON_INTERPRET=1`` (the CPU test mode;
never chosen by ``"auto"`` on the CPU). Inputs arrive validated by :mod:`mtlsam_fast.ops`.
fp64 buffers (and Gram matrices / QPs with K > 64) are delegated to the torch backend (fp64
accumulation is its contract; K <= 64 is the design range of the register-tile kernels). No function
here reads a tensor value on the host.

Beyond the ops of :mod:`mtlsam_fast.ops`, :func:`fused_aggregate` is the two-launch aggregation
path of docs/ARCHITECTURE.md §6 for the optimizers. Every hand-off to the reference goes through
``_registry.fallback`` (``ops.dispatch_log()`` shows it).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from . import _registry
from ._contract import compose_min_norm_aggregate, compose_perturb_noise_stats

Tensor = torch.Tensor

__all__ = [
    "combine",
    "diff_gram",
    "fused_aggregate",
    "gaussian_noise",
    "gram",
    "min_norm_aggregate",
    "noise_stats",
    "perturb",
    "perturb_noise_stats",
    "pin_config",
    "segment_norms",
    "solve_qp",
    "unavailable_reason",
]

#: the kernels keep a K x K tile in registers; larger K (outside the design range) uses torch.
MAX_K = 64


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _kernels():
    """``mtlsam_fast.triton_kernels`` (imported on first use, so importing this module never imports
    Triton: the registry can ask :func:`unavailable_reason` before ``TRITON_INTERPRET`` is
    settled)."""
    import mtlsam_fast.triton_kernels.elementwise
    import mtlsam_fast.triton_kernels.fused
    import mtlsam_fast.triton_kernels.gram
    import mtlsam_fast.triton_kernels.qp

    return mtlsam_fast.triton_kernels


_HAS_TRITON: list[bool] = []


def unavailable_reason(device_type: str) -> str | None:
    if not _HAS_TRITON:
        _HAS_TRITON.append(importlib.util.find_spec("triton") is not None)
    if not _HAS_TRITON[0]:
        return "triton is not installed"
    cfg = sys.modules.get("mtlsam_fast.triton_kernels._config")
    compiled_already = cfg is not None and not cfg.INTERPRET
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device"
    if device_type == "cpu":
        if not _interpreting():
            return "Triton runs CPU tensors only under TRITON_INTERPRET=1"
        if compiled_already:
            return (
                "TRITON_INTERPRET=1 was set after the Triton kernels were imported in compiled mode"
            )
        return None
    return f"Triton does not support {device_type} tensors"


def pin_config(family: str, **cfg: int) -> None:
    """Pin the launch configuration of a kernel family (see
    ``mtlsam_fast.triton_kernels._config``)."""
    _kernels()._config.pin_config(family, **cfg)


def _f64(*ts: Tensor | None) -> bool:
    return any(t is not None and t.dtype == torch.float64 for t in ts)


def _ref(op: str, why: str):
    return _registry.fallback(op, "triton", why)


def _gram_reason(G: Tensor) -> str | None:
    if _f64(G):
        return "float64 buffer"
    return f"K = {G.shape[0]} > {MAX_K}" if G.shape[0] > MAX_K else None


def gram(G: Tensor) -> Tensor:
    reason = _gram_reason(G)
    if reason is not None:
        return _ref("gram", reason).gram(G)
    return _kernels().gram.gram(G)


def diff_gram(A: Tensor, B: Tensor) -> Tensor:
    reason = _gram_reason(A)
    if reason is not None:
        return _ref("diff_gram", reason).diff_gram(A, B)
    return _kernels().gram.diff_gram(A, B)


def segment_norms(x: Tensor, offsets: Tensor, weight: Tensor | None) -> Tensor:
    if _f64(x):
        return _ref("segment_norms", "float64 input").segment_norms(x, offsets, weight)
    return _kernels().elementwise.segment_norms(x, offsets, weight)


def combine(w: Tensor, G: Tensor, w2: Tensor | None, H: Tensor | None, out: Tensor) -> Tensor:
    if _f64(G, H):
        return _ref("combine", "float64 input").combine(w, G, w2, H, out)
    return _kernels().elementwise.combine(w, G, w2, H, out)


def perturb(theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset):
    if _f64(theta):
        return _ref("perturb", "float64 input").perturb(
            theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset
        )
    return _kernels().elementwise.perturb(
        theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset
    )


def gaussian_noise(seed: int, offset: int, numel: int, device: torch.device) -> Tensor:
    return _kernels().elementwise.gaussian_noise(seed, offset, numel, device)


def noise_stats(seed: int, offset: int, ref: Tensor, offsets: Tensor) -> Tensor:
    if _f64(ref):
        return _ref("noise_stats", "float64 input").noise_stats(seed, offset, ref, offsets)
    return _kernels().elementwise.noise_stats(seed, offset, ref, offsets)


def perturb_noise_stats(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    noise_scale: Tensor,
    seed: int,
    noise_offset: int,
    ref: Tensor,
) -> Tensor:
    """No fused kernel: this backend's perturb, then its noise_stats."""
    return compose_perturb_noise_stats(
        _self, theta, backup, offsets, noise_scale, seed, noise_offset, ref
    )


def solve_qp(
    gram: Tensor, q, lower, constraint: str, norm_coef, max_iter: int, tol: float
) -> Tensor:
    return _kernels().qp.solve_qp(gram, q, lower, constraint, norm_coef, max_iter, tol)


def fused_aggregate(
    G: Tensor,
    H: Tensor | None = None,
    *,
    out: Tensor | None = None,
    theta: Tensor | None = None,
    lr: Tensor | None = None,
    max_iter: int = 60,
    tol: float = 1e-9,
):
    """The two-launch MGDA aggregation of docs/ARCHITECTURE.md §6; the full contract is in
    :func:`mtlsam_fast.triton_kernels.fused.fused_aggregate`. Returns ``Aggregate(weights, gram,
    weights2, gram2, direction)``: launch 1 = Gram partials -> last-program reduction -> QP,
    launch 2 = ``d = w^T G (+ w2^T H)`` -> ``out <- d`` and/or ``theta <- theta - lr * d``."""
    return _kernels().fused.fused_aggregate(
        G, H, out=out, theta=theta, lr=lr, max_iter=max_iter, tol=tol
    )


def min_norm_aggregate(
    G: Tensor, out: Tensor, subtract: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """``ops.min_norm_aggregate`` through :func:`fused_aggregate` (two launches); ``subtract`` is
    its fused update ``theta <- theta - lr * d`` with ``theta = out`` and ``lr = 1``. fp64 and
    K > 64: this backend's gram, solve_qp and combine (which keep fp64 weights)."""
    if G.dtype == torch.float64 or G.shape[0] > MAX_K:
        return compose_min_norm_aggregate(_self, G, out, subtract, max_iter, tol)
    if subtract:
        one = _kernels()._workspace.get(G.device, "unit_lr", (1,), torch.float32, fill=1.0)
        res = fused_aggregate(G, theta=out, lr=one, max_iter=max_iter, tol=tol)
    else:
        res = fused_aggregate(G, out=out, max_iter=max_iter, tol=tol)
    return res.weights, res.gram


_self = sys.modules[__name__]  # this module, as the backend the compositions call
