"""Operations on flat gradient buffers, dispatched to a backend.

Every op takes ``backend=None`` (the default from :func:`set_backend` / ``MTLSAM_BACKEND``, else
``"auto"``). Backends: ``"torch"`` (reference, always available), ``"triton"``, ``"cuda"``,
``"cpu"`` (C++). Inputs are validated here (:mod:`._validation`), so every backend sees the same
checked arguments: from metadata, and the segment boundaries' values once per ``offsets`` tensor;
no op reads any other tensor value on the host. Which backend ran each call:
:func:`dispatch_log`.

Shapes: ``G``, ``A``, ``B``, ``H`` are ``[K, P]`` buffers (fp32/fp64/bf16/fp16); ``offsets`` is an
int64 tensor ``[S + 1]`` of segment boundaries (``FlatLayout.offsets(device)``), ``offsets[0] = 0``
and ``offsets[-1] = P``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from . import _registry
from . import qp as _qp
from . import torch_backend as _torch_backend
from ._contract import Backend, check_backend, combine_subtract
from ._registry import (
    Dispatch,
    available_backends,
    dispatch_log,
    get_backend,
    log_dispatches,
    register_backend,
    resolve,
    set_backend,
)
from ._validation import (
    FLOAT_DTYPES,
    check_buffer,
    check_counter,
    check_flag,
    check_numel,
    check_offsets,
    check_qp_budget,
    check_same_device,
    check_scale,
    check_weights,
    check_writable,
    needs_grad,
    refuse_grad,
)
from .threads import single_threaded

check_backend("torch", _torch_backend)
_registry._modules["torch"] = _torch_backend  # the reference is always loaded (and traceable)

Tensor = torch.Tensor

__all__ = [
    "Backend",
    "Dispatch",
    "MinNormAggregate",
    "available_backends",
    "combine",
    "diff_gram",
    "dispatch_log",
    "gaussian_noise",
    "get_backend",
    "gram",
    "kkt_residual",
    "log_dispatches",
    "min_norm_aggregate",
    "noise_stats",
    "perturb",
    "perturb_noise_stats",
    "register_backend",
    "restore",
    "segment_norms",
    "set_backend",
    "solve_qp",
]


def gram(G: Tensor, *, backend: str | None = None) -> Tensor:
    """``G @ G.T`` accumulated in fp32 (fp64 for fp64 input): a symmetric ``[K, K]`` matrix.
    Differentiable (on the reference, whichever backend was asked for)."""
    check_buffer("G", G)
    return resolve(backend, G.device, "gram", G.dtype, G.shape[0], grad=needs_grad(G)).gram(G)


def diff_gram(A: Tensor, B: Tensor, *, backend: str | None = None) -> Tensor:
    """In place ``A <- A - B``, then return ``gram(A)`` (one pass over the bytes in fused
    backends)."""
    check_buffer("A", A)
    check_buffer("B", B)
    if A.shape != B.shape or A.dtype != B.dtype:
        raise ValueError(
            f"A and B must match: {tuple(A.shape)} {A.dtype} vs {tuple(B.shape)} {B.dtype}"
        )
    check_writable("A", A)
    dev = check_same_device(A=A, B=B)
    return resolve(backend, dev, "diff_gram", grad=needs_grad(A, B)).diff_gram(A, B)


def segment_norms(
    x: Tensor, offsets: Tensor, *, weight: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """L2 norm of every segment of ``x`` ([P] -> [S], or each row of [K, P] -> [K, S]), fp32.

    With ``weight`` ([P]), the norms are of ``weight * x`` (ASAM's ``||T g||``, ``T = |theta|``).
    """
    check_buffer("x", x, (1, 2))
    check_offsets(offsets, x.shape[-1])
    if weight is not None:
        check_buffer("weight", weight, 1)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight has {weight.shape[0]} elements, x rows have {x.shape[-1]}")
    dev = check_same_device(x=x, offsets=offsets, weight=weight)
    mod = resolve(backend, dev, "segment_norms", grad=needs_grad(x, weight))
    return mod.segment_norms(x, offsets, weight)


def combine(
    w: Tensor,
    G: Tensor,
    w2: Tensor | None = None,
    H: Tensor | None = None,
    *,
    out: Tensor | None = None,
    dtype: torch.dtype | None = None,
    subtract: bool = False,
    backend: str | None = None,
) -> Tensor:
    """``out = w^T G (+ w2^T H)``, accumulated in fp32, written in ``dtype`` (default ``G.dtype``).

    With ``subtract`` (needs ``out``, no ``H``): ``out <- out - w^T G`` (F-MTL's flat-set update of
    its direction), computed as one combine of ``G`` and ``out`` into a temporary, then copied."""
    check_buffer("G", G)
    check_weights("w", w, G.shape[0])
    if (w2 is None) != (H is None):
        raise ValueError("w2 and H must be given together")
    if H is not None:
        check_buffer("H", H)
        if H.shape[1] != G.shape[1]:
            raise ValueError(f"H has {H.shape[1]} columns, G has {G.shape[1]}")
        check_weights("w2", w2, H.shape[0])
    check_flag("subtract", subtract)
    if subtract and (out is None or H is not None):
        raise ValueError("subtract needs out and no second set (w2, H)")
    if out is not None:
        check_buffer("out", out, 1)
        if out.shape[0] != G.shape[1]:
            raise ValueError(f"out must have shape ({G.shape[1]},), got {tuple(out.shape)}")
        check_writable("out", out)
    elif dtype is not None and dtype not in FLOAT_DTYPES:
        raise TypeError(f"dtype must be a floating-point dtype, got {dtype}")
    dev = check_same_device(w=w, G=G, w2=w2, H=H, out=out)
    mod = resolve(backend, dev, "combine", grad=needs_grad(w, G, w2, H, out))
    if subtract:
        assert out is not None  # subtract without out raised above
        return combine_subtract(mod, w, G, out)
    if out is None:
        out = torch.empty(G.shape[1], dtype=dtype or G.dtype, device=dev)
    return mod.combine(w, G, w2, H, out)


def _check_perturb(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    direction: Tensor | None,
    scale: Tensor | None,
    noise_scale: Tensor | None,
    adaptive: bool,
) -> torch.device:
    check_buffer("theta", theta, 1)
    check_buffer("backup", backup, 1)
    if backup.shape != theta.shape:
        raise ValueError(f"backup shape {tuple(backup.shape)} != theta shape {tuple(theta.shape)}")
    check_writable("theta", theta)
    check_offsets(offsets, theta.numel())
    S = offsets.numel() - 1
    if (direction is None) != (scale is None):
        raise ValueError("direction and scale must be given together")
    if direction is not None:
        check_buffer("direction", direction, 1)
        if direction.shape != theta.shape:
            raise ValueError(
                f"direction shape {tuple(direction.shape)} != theta shape {tuple(theta.shape)}"
            )
        check_scale("scale", scale, S)
    if noise_scale is not None:
        check_scale("noise_scale", noise_scale, S)
    check_flag("adaptive", adaptive)
    return check_same_device(
        theta=theta,
        backup=backup,
        direction=direction,
        scale=scale,
        noise_scale=noise_scale,
        offsets=offsets,
    )


def perturb(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    direction: Tensor | None = None,
    scale: Tensor | None = None,
    *,
    adaptive: bool = False,
    noise_scale: Tensor | None = None,
    seed: int = 0,
    noise_offset: int = 0,
    backend: str | None = None,
) -> Tensor:
    """Write ``theta <- backup + scale[s] * m(direction) + noise_scale[s] * z`` segment by segment.

    ``scale`` / ``noise_scale`` are per-segment ([S]) or scalar device tensors; ``m(d) = d`` (SAM)
    or ``backup**2 * d`` with ``adaptive=True`` (ASAM, T = |theta|); ``z`` is the counter-based
    noise stream :func:`gaussian_noise` ``(seed, noise_offset)``. ``theta`` is computed from
    ``backup`` every time, so repeated perturbations never accumulate rounding error.
    """
    dev = _check_perturb(theta, backup, offsets, direction, scale, noise_scale, adaptive)
    seed = check_counter("seed", seed)
    noise_offset = check_counter("noise_offset", noise_offset, theta.numel())
    grad = needs_grad(theta, backup, direction, scale, noise_scale)
    return resolve(backend, dev, "perturb", grad=grad).perturb(
        theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset
    )


def restore(theta: Tensor, backup: Tensor) -> Tensor:
    """Exact restore: ``theta`` becomes bitwise equal to ``backup`` (a copy, never a
    subtraction)."""
    check_buffer("theta", theta, 1)
    check_buffer("backup", backup, 1)
    if theta.shape != backup.shape or theta.dtype != backup.dtype:
        raise ValueError("theta and backup must have the same shape and dtype")
    check_writable("theta", theta)
    check_same_device(theta=theta, backup=backup)
    return theta.copy_(backup)


def gaussian_noise(
    seed: int,
    offset: int,
    numel: int,
    *,
    device: torch.device | str = "cpu",
    backend: str | None = None,
) -> Tensor:
    """``numel`` fp32 standard normals of the counter-based stream ``(seed, offset)`` (see
    ``philox``)."""
    numel = check_numel(numel)
    seed = check_counter("seed", seed)
    offset = check_counter("offset", offset, numel)
    dev = torch.device(device)
    return resolve(backend, dev, "gaussian_noise").gaussian_noise(seed, offset, numel, dev)


def noise_stats(
    seed: int, offset: int, ref: Tensor, offsets: Tensor, *, backend: str | None = None
) -> Tensor:
    """Per segment, ``[sum z^2, sum ref * z]`` (shape [2, S]) for the noise stream
    ``(seed, offset)``.

    SAMO needs these to normalize its zeroth-order estimates without ever storing ``z``.
    """
    check_buffer("ref", ref, 1)
    check_offsets(offsets, ref.numel())
    seed = check_counter("seed", seed)
    offset = check_counter("offset", offset, ref.numel())
    dev = check_same_device(ref=ref, offsets=offsets)
    mod = resolve(backend, dev, "noise_stats", grad=needs_grad(ref))
    return mod.noise_stats(seed, offset, ref, offsets)


def perturb_noise_stats(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    noise_scale: Tensor,
    ref: Tensor,
    *,
    seed: int = 0,
    noise_offset: int = 0,
    backend: str | None = None,
) -> Tensor:
    """``perturb(theta, backup, offsets, noise_scale=noise_scale, seed=seed,
    noise_offset=noise_offset)`` and ``noise_stats(seed, noise_offset, ref, offsets)`` (returned,
    ``[2, S]``) from one generation of the noise where the backend fuses them (``"cpu"``:
    fp32/bf16/fp16 buffers); the two ops otherwise (same results).
    SAMO's first zeroth-order probe needs both."""
    if not isinstance(noise_scale, torch.Tensor):
        raise TypeError(
            f"noise_scale must be a tensor ([S] or one element), got {type(noise_scale).__name__}"
        )
    dev = _check_perturb(theta, backup, offsets, None, None, noise_scale, False)
    check_buffer("ref", ref, 1)
    if ref.shape != theta.shape:
        raise ValueError(f"ref shape {tuple(ref.shape)} != theta shape {tuple(theta.shape)}")
    check_same_device(ref=ref, theta=theta)
    seed = check_counter("seed", seed)
    noise_offset = check_counter("noise_offset", noise_offset, theta.numel())
    mod = resolve(
        backend, dev, "perturb_noise_stats", grad=needs_grad(theta, backup, noise_scale, ref)
    )
    return mod.perturb_noise_stats(theta, backup, offsets, noise_scale, seed, noise_offset, ref)


def _check_qp(
    gram: Tensor,
    q: Tensor | None,
    lower: Tensor | None,
    constraint: str,
    norm_coef: Tensor | None,
) -> None:
    if not isinstance(gram, torch.Tensor) or gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"gram must be a square [..., K, K] matrix, got {shape}")
    if gram.dtype not in FLOAT_DTYPES:
        raise TypeError(f"gram has unsupported dtype {gram.dtype}")
    if constraint not in ("simplex", "lower"):
        raise ValueError(f"constraint must be 'simplex' or 'lower', got {constraint!r}")
    for name, t in (("q", q), ("lower", lower), ("norm_coef", norm_coef)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")
        if name != "norm_coef" and tuple(t.shape) != tuple(gram.shape[:-1]):
            raise ValueError(
                f"{name} must have shape {tuple(gram.shape[:-1])}, got {tuple(t.shape)}"
            )
    if lower is not None and constraint != "lower":
        raise ValueError("lower is only used with constraint='lower'")


def solve_qp(
    gram: Tensor,
    q: Tensor | None = None,
    lower: Tensor | None = None,
    *,
    constraint: str = "simplex",
    norm_coef: Tensor | None = None,
    max_iter: int = _qp.DEFAULT_MAX_ITER,
    tol: float = _qp.DEFAULT_TOL,
    backend: str | None = None,
) -> Tensor:
    """Batched ``min 1/2 v^T Gamma v + q^T v`` over the simplex or ``v >= lower``; see
    :mod:`.qp`. On the CPU it runs on one thread (:func:`.threads.single_threaded`). Not
    differentiable (inputs that require grad are refused)."""
    _check_qp(gram, q, lower, constraint, norm_coef)
    max_iter, tol = check_qp_budget(max_iter, tol)
    refuse_grad("solve_qp", gram=gram, q=q, lower=lower, norm_coef=norm_coef)
    dev = check_same_device(gram=gram, q=q, lower=lower, norm_coef=norm_coef)
    impl = resolve(backend, dev, "solve_qp")
    return single_threaded(
        lambda: impl.solve_qp(gram, q, lower, constraint, norm_coef, max_iter, tol), dev
    )


kkt_residual = _qp.kkt_residual


class MinNormAggregate(NamedTuple):
    """Result of :func:`min_norm_aggregate` (device tensors; fused backends may reuse them next
    call)."""

    weights: Tensor  #: [K] min-norm (MGDA) weights of G's rows, fp32 (fp64 for an fp64 G)
    gram: Tensor  #: [K, K] Gram matrix of G, same dtype


def min_norm_aggregate(
    G: Tensor,
    out: Tensor,
    *,
    subtract: bool = False,
    max_iter: int = _qp.DEFAULT_MAX_ITER,
    tol: float = _qp.DEFAULT_TOL,
    backend: str | None = None,
) -> MinNormAggregate:
    """MGDA in one call: ``gram = G G^T``, ``w = argmin_{v in simplex} v^T gram v`` (the min-norm
    point of the convex hull of G's rows, Sener & Koltun 2018), then ``out <- w^T G`` (or, with
    ``subtract``, ``out <- out - w^T G``), accumulated in fp32 and written in ``out``'s dtype.

    The backends with a fused path (``"triton"``, ``"cuda"``) do this in the two launches of
    docs/ARCHITECTURE.md §6: weights and Gram never leave the device. The others compose
    :func:`gram`, :func:`solve_qp` and :func:`combine` (the same numbers). Non-finite entries in
    ``G`` give NaN weights and a NaN ``out`` (the found-inf signal). Scaling ``G`` by any positive
    factor leaves the weights unchanged. Not differentiable (inputs that require grad are
    refused).
    """
    check_buffer("G", G)
    check_buffer("out", out, 1)
    if out.shape[0] != G.shape[1]:
        raise ValueError(f"out must have shape ({G.shape[1]},), got {tuple(out.shape)}")
    check_writable("out", out)
    check_flag("subtract", subtract)
    max_iter, tol = check_qp_budget(max_iter, tol)
    refuse_grad("min_norm_aggregate", G=G, out=out)
    dev = check_same_device(G=G, out=out)
    mod = resolve(backend, dev, "min_norm_aggregate", G.dtype, G.shape[0])
    return MinNormAggregate(*mod.min_norm_aggregate(G, out, subtract, max_iter, tol))
