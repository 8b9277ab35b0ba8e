"""Operations on flat gradient buffers, dispatched to a backend.

Every op takes ``backend=None`` (the default from :func:`set_backend` / ``MTLSAM_BACKEND``, else
``"auto"``). Backends: ``"torch"`` (reference, always available), ``"triton"``, ``"cuda"``,
``"cpu"`` (C++). Inputs are validated here, from metadata only, so every backend sees the same
checked arguments and no op reads a tensor value on the host.

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
from ._registry import available_backends, get_backend, resolve, set_backend
from .threads import single_threaded

_registry._modules["torch"] = _torch_backend  # the reference is always loaded (and traceable)

Tensor = torch.Tensor

__all__ = [
    "MinNormAggregate",
    "available_backends",
    "combine",
    "diff_gram",
    "gaussian_noise",
    "get_backend",
    "gram",
    "kkt_residual",
    "min_norm_aggregate",
    "noise_stats",
    "perturb",
    "perturb_noise_stats",
    "restore",
    "segment_norms",
    "set_backend",
    "solve_qp",
]

FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _check_buffer(name: str, t: Tensor, ndim: int | tuple[int, ...] = 2) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    dims = (ndim,) if isinstance(ndim, int) else ndim
    if t.dim() not in dims:
        raise ValueError(
            f"{name} must have {' or '.join(map(str, dims))} dimensions, got shape {tuple(t.shape)}"
        )
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} has unsupported dtype {t.dtype}; "
            "supported: float32, float64, bfloat16, float16"
        )


def _check_same_device(**tensors: Tensor | None) -> torch.device:
    """The device the given tensors share (``None`` entries are skipped); at least one is given.

    Called by every op: one ``.device`` per tensor and no containers on the common path."""
    device = None
    for t in tensors.values():
        if t is None:
            continue
        if device is None:
            device = t.device
        elif t.device != device:
            desc = ", ".join(f"{k} on {v.device}" for k, v in tensors.items() if v is not None)
            raise ValueError(f"tensors are on different devices: {desc}")
    return device  # type: ignore[return-value]


def _check_offsets(offsets: Tensor, P: int) -> None:
    if not isinstance(offsets, torch.Tensor) or offsets.dtype != torch.int64 or offsets.dim() != 1:
        raise TypeError(
            "offsets must be a 1-D int64 tensor of segment boundaries (FlatLayout.offsets(device))"
        )
    if offsets.numel() < 2:
        raise ValueError("offsets must hold at least two boundaries")


def _check_weights(name: str, w: Tensor, K: int) -> None:
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != K:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"{name} must be a 1-D tensor of K={K} weights, got {shape}")


def gram(G: Tensor, *, backend: str | None = None) -> Tensor:
    """``G @ G.T`` accumulated in fp32 (fp64 for fp64 input): a symmetric ``[K, K]`` matrix."""
    _check_buffer("G", G)
    return resolve(backend, G.device, "gram", G.dtype, G.shape[0]).gram(G)


def diff_gram(A: Tensor, B: Tensor, *, backend: str | None = None) -> Tensor:
    """In place ``A <- A - B``, then return ``gram(A)`` (one pass over the bytes in fused
    backends)."""
    _check_buffer("A", A)
    _check_buffer("B", B)
    if A.shape != B.shape or A.dtype != B.dtype:
        raise ValueError(
            f"A and B must match: {tuple(A.shape)} {A.dtype} vs {tuple(B.shape)} {B.dtype}"
        )
    dev = _check_same_device(A=A, B=B)
    return resolve(backend, dev, "diff_gram").diff_gram(A, B)


def segment_norms(
    x: Tensor, offsets: Tensor, *, weight: Tensor | None = None, backend: str | None = None
) -> Tensor:
    """L2 norm of every segment of ``x`` ([P] -> [S], or each row of [K, P] -> [K, S]), fp32.

    With ``weight`` ([P]), the norms are of ``weight * x`` (ASAM's ``||T g||``, ``T = |theta|``).
    """
    _check_buffer("x", x, (1, 2))
    _check_offsets(offsets, x.shape[-1])
    if weight is not None:
        _check_buffer("weight", weight, 1)
        if weight.shape[0] != x.shape[-1]:
            raise ValueError(f"weight has {weight.shape[0]} elements, x rows have {x.shape[-1]}")
    dev = _check_same_device(x=x, offsets=offsets, weight=weight)
    return resolve(backend, dev, "segment_norms").segment_norms(x, offsets, weight)


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
    _check_buffer("G", G)
    _check_weights("w", w, G.shape[0])
    if (w2 is None) != (H is None):
        raise ValueError("w2 and H must be given together")
    if H is not None:
        _check_buffer("H", H)
        if H.shape[1] != G.shape[1]:
            raise ValueError(f"H has {H.shape[1]} columns, G has {G.shape[1]}")
        assert w2 is not None  # given together with H: checked above
        _check_weights("w2", w2, H.shape[0])
    if subtract and (out is None or H is not None):
        raise ValueError("subtract needs out and no second set (w2, H)")
    dev = _check_same_device(w=w, G=G, w2=w2, H=H, out=out)
    if subtract:
        assert out is not None  # subtract without out raised above
        if out.shape != (G.shape[1],):
            raise ValueError(f"out must have shape ({G.shape[1]},), got {tuple(out.shape)}")
        one = torch.ones(1, dtype=w.dtype, device=dev)
        d = resolve(backend, dev, "combine").combine(
            -w, G, one, out.view(1, -1), torch.empty_like(out)
        )
        return out.copy_(d)
    if out is None:
        out = torch.empty(G.shape[1], dtype=dtype or G.dtype, device=dev)
    elif out.shape != (G.shape[1],):
        raise ValueError(f"out must have shape ({G.shape[1]},), got {tuple(out.shape)}")
    return resolve(backend, dev, "combine").combine(w, G, w2, H, out)


def _check_perturb(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    direction: Tensor | None,
    scale: Tensor | None,
    noise_scale: Tensor | None,
) -> torch.device:
    _check_buffer("theta", theta, 1)
    _check_buffer("backup", backup, 1)
    if backup.shape != theta.shape:
        raise ValueError(f"backup shape {tuple(backup.shape)} != theta shape {tuple(theta.shape)}")
    _check_offsets(offsets, theta.numel())
    if (direction is None) != (scale is None):
        raise ValueError("direction and scale must be given together")
    if direction is not None:
        _check_buffer("direction", direction, 1)
        if direction.shape != theta.shape:
            raise ValueError(
                f"direction shape {tuple(direction.shape)} != theta shape {tuple(theta.shape)}"
            )
    return _check_same_device(
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
    dev = _check_perturb(theta, backup, offsets, direction, scale, noise_scale)
    return resolve(backend, dev, "perturb").perturb(
        theta,
        backup,
        direction,
        scale,
        offsets,
        adaptive,
        noise_scale,
        int(seed),
        int(noise_offset),
    )


def restore(theta: Tensor, backup: Tensor) -> Tensor:
    """Exact restore: ``theta`` becomes bitwise equal to ``backup`` (a copy, never a
    subtraction)."""
    if theta.shape != backup.shape or theta.dtype != backup.dtype:
        raise ValueError("theta and backup must have the same shape and dtype")
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
    if numel < 0 or offset < 0:
        raise ValueError("numel and offset must be non-negative")
    dev = torch.device(device)
    return resolve(backend, dev, "gaussian_noise").gaussian_noise(
        int(seed), int(offset), int(numel), dev
    )


def noise_stats(
    seed: int, offset: int, ref: Tensor, offsets: Tensor, *, backend: str | None = None
) -> Tensor:
    """Per segment, ``[sum z^2, sum ref * z]`` (shape [2, S]) for the noise stream
    ``(seed, offset)``.

    SAMO needs these to normalize its zeroth-order estimates without ever storing ``z``.
    """
    _check_buffer("ref", ref, 1)
    _check_offsets(offsets, ref.numel())
    dev = _check_same_device(ref=ref, offsets=offsets)
    return resolve(backend, dev, "noise_stats").noise_stats(int(seed), int(offset), ref, offsets)


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
    dev = _check_perturb(theta, backup, offsets, None, None, noise_scale)
    _check_buffer("ref", ref, 1)
    if ref.shape != theta.shape:
        raise ValueError(f"ref shape {tuple(ref.shape)} != theta shape {tuple(theta.shape)}")
    _check_same_device(ref=ref, theta=theta)
    mod = resolve(backend, dev, "perturb")
    fused = getattr(mod, "perturb_noise_stats", None)
    stats = (
        fused(theta, backup, offsets, noise_scale, int(seed), int(noise_offset), ref)
        if fused
        else None
    )
    if stats is not None:
        return stats
    mod.perturb(
        theta, backup, None, None, offsets, False, noise_scale, int(seed), int(noise_offset)
    )
    return resolve(backend, dev, "noise_stats").noise_stats(
        int(seed), int(noise_offset), ref, offsets
    )


def _check_qp(gram: Tensor, q: Tensor | None, lower: Tensor | None, constraint: str) -> None:
    if not isinstance(gram, torch.Tensor) or gram.dim() < 2 or gram.shape[-1] != gram.shape[-2]:
        shape = tuple(gram.shape) if isinstance(gram, torch.Tensor) else type(gram).__name__
        raise ValueError(f"gram must be a square [..., K, K] matrix, got {shape}")
    if gram.dtype not in FLOAT_DTYPES:
        raise TypeError(f"gram has unsupported dtype {gram.dtype}")
    if constraint not in ("simplex", "lower"):
        raise ValueError(f"constraint must be 'simplex' or 'lower', got {constraint!r}")
    for name, t in (("q", q), ("lower", lower)):
        if t is not None and tuple(t.shape) != tuple(gram.shape[:-1]):
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
    :mod:`.qp`. On the CPU it runs on one thread (:func:`.threads.single_threaded`)."""
    _check_qp(gram, q, lower, constraint)
    dev = _check_same_device(gram=gram, q=q, lower=lower, norm_coef=norm_coef)
    impl = resolve(backend, dev, "solve_qp")
    return single_threaded(
        lambda: impl.solve_qp(gram, q, lower, constraint, norm_coef, int(max_iter), float(tol)),
        dev,
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
    DESIGN.md section 6: weights and Gram never leave the device. The others compose
    :func:`gram`, :func:`solve_qp` and :func:`combine` (the same numbers). Non-finite entries in
    ``G`` give NaN weights and a NaN ``out`` (the found-inf signal). Scaling ``G`` by any positive
    factor leaves the weights unchanged.
    """
    _check_buffer("G", G)
    _check_buffer("out", out, 1)
    if out.shape[0] != G.shape[1]:
        raise ValueError(f"out must have shape ({G.shape[1]},), got {tuple(out.shape)}")
    dev = _check_same_device(G=G, out=out)
    mod = resolve(backend, dev, "gram", G.dtype, G.shape[0])
    fused = getattr(mod, "min_norm_aggregate", None)
    res = fused(G, out, bool(subtract), int(max_iter), float(tol)) if fused is not None else None
    if res is not None:
        return MinNormAggregate(*res)
    g = mod.gram(G)
    w = single_threaded(
        lambda: mod.solve_qp(g, None, None, "simplex", None, int(max_iter), float(tol)), dev
    )
    combine(w, G, out=out, subtract=subtract, backend=backend)
    return MinNormAggregate(w, g)
