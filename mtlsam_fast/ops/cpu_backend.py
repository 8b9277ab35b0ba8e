"""The ``"cpu"`` backend: C++/OpenMP kernels of the compiled extension ``mtlsam_fast._C``.

Same functions and semantics as :mod:`.torch_backend` (the oracle). The kernels take fp32, bf16
and fp16 buffers (fp32 accumulation; Gram / norm partials in fp64, combined in a fixed order, so
results do not depend on the thread count) with 64-bit offsets. Inputs the kernels do not handle
fall back to the torch backend: float64 buffers, buffers without a unit column stride,
``solve_qp`` with more than ``_C.QP_MAX_K`` (32768) variables, a ``backup`` whose dtype differs
from ``theta``. ``solve_qp(..., norm_coef=...)`` (CAGrad's norm objective) runs in the kernel.
"""

from __future__ import annotations

import torch

from .. import _ext
from . import qp as _qp
from . import torch_backend as _ref
from .threads import single_threaded

Tensor = torch.Tensor

_DEVICE_TYPE = "cpu"
_M64 = (1 << 64) - 1
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def unavailable_reason(device_type: str) -> str | None:
    if device_type != _DEVICE_TYPE:
        return f"the {_DEVICE_TYPE!r} backend runs on {_DEVICE_TYPE} tensors only"
    if _ext.get() is None:
        return _ext.error()
    return _extra_reason()


def _extra_reason() -> str | None:
    return None


def _C():
    return _ext.get()


def _rows_ok(t: Tensor) -> bool:
    """A [K, P] buffer the kernels can read in place: unit column stride, non-overlapping rows."""
    if t.is_contiguous():  # the common case, and the cheapest test
        return True
    K, P = t.shape
    return (P <= 1 or t.stride(1) == 1) and (K <= 1 or t.stride(0) >= P)


def _kernel_dtype(*ts: Tensor | None) -> bool:
    return all(t is None or t.dtype in _KERNEL_DTYPES for t in ts)


def _f32(t: Tensor | None) -> Tensor | None:
    """A scalar or weight vector as the kernels take it: 1-D contiguous fp32 (``t`` itself when it
    is one already: the no-op torch calls cost a microsecond each, on every op call)."""
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        t = torch.tensor(float(t))
    if t.dtype == torch.float32:
        if t.dim() == 1 and t.is_contiguous():
            return t
        if t.dim() == 0:
            return t.view(1)
    return t.reshape(-1).to(torch.float32).contiguous()


def _vec(t: Tensor) -> Tensor:
    return t if t.is_contiguous() else t.contiguous()


def gram(G: Tensor) -> Tensor:
    if not _kernel_dtype(G) or not _rows_ok(G):
        return _ref.gram(G)
    return single_threaded(lambda: _C().gram(G), G.device, G.numel())


def diff_gram(A: Tensor, B: Tensor) -> Tensor:
    if not _kernel_dtype(A) or not _rows_ok(A):
        return _ref.diff_gram(A, B)
    if not _rows_ok(B):
        B = B.contiguous()
    return single_threaded(lambda: _C().diff_gram(A, B), A.device, A.numel())


def segment_norms(x: Tensor, offsets: Tensor, weight: Tensor | None = None) -> Tensor:
    if not _kernel_dtype(x, weight):
        return _ref.segment_norms(x, offsets, weight)
    if x.dim() == 1:
        x = _vec(x)
    elif not _rows_ok(x):
        x = x.contiguous()
    return _C().segment_norms(x, _vec(offsets), None if weight is None else _vec(weight))


def combine(w: Tensor, G: Tensor, w2: Tensor | None, H: Tensor | None, out: Tensor) -> Tensor:
    if not _kernel_dtype(G, H, out) or (H is not None and H.dtype != G.dtype):
        return _ref.combine(w, G, w2, H, out)
    if not _rows_ok(G):
        G = G.contiguous()
    if H is not None and not _rows_ok(H):
        H = H.contiguous()
    target = (
        out if out.is_contiguous() else torch.empty_like(out, memory_format=torch.contiguous_format)
    )
    single_threaded(lambda: _C().combine(_f32(w), G, _f32(w2), H, target), G.device, G.numel())
    return out if target is out else out.copy_(target)


def perturb(
    theta: Tensor,
    backup: Tensor,
    direction: Tensor | None,
    scale: Tensor | None,
    offsets: Tensor,
    adaptive: bool,
    noise_scale: Tensor | None,
    seed: int,
    noise_offset: int,
) -> Tensor:
    scale32, noise32 = _f32(scale), _f32(noise_scale)
    segments = offsets.numel() - 1
    if (
        not _kernel_dtype(theta, direction)
        or backup.dtype != theta.dtype
        or not theta.is_contiguous()
        or (scale32 is not None and scale32.numel() not in (1, segments))
        or (noise32 is not None and noise32.numel() not in (1, segments))
    ):
        return _ref.perturb(
            theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset
        )
    return _C().perturb(
        theta,
        _vec(backup),
        None if direction is None else _vec(direction),
        scale32,
        _vec(offsets),
        bool(adaptive),
        noise32,
        int(seed) & _M64,
        int(noise_offset) & _M64,
    )


def restore(theta: Tensor, backup: Tensor) -> Tensor:
    return theta.copy_(backup)


def gaussian_noise(seed: int, offset: int, numel: int, device: torch.device) -> Tensor:
    """The noise stream computed in the kernel -- vector Philox rounds (bit-exact words) and Cephes
    log / cos polynomials, a few ulp from the torch oracle's Box-Muller -- so it is exactly the
    noise that ``perturb`` and ``noise_stats`` of this backend add and reduce (as on CUDA)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    return _C().gaussian_noise(int(seed) & _M64, int(offset) & _M64, out)


def noise_stats(seed: int, offset: int, ref: Tensor, offsets: Tensor) -> Tensor:
    if not _kernel_dtype(ref):
        return _ref.noise_stats(seed, offset, ref, offsets)
    return _C().noise_stats(int(seed) & _M64, int(offset) & _M64, _vec(ref), _vec(offsets))


def perturb_noise_stats(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    noise_scale: Tensor,
    seed: int,
    noise_offset: int,
    ref: Tensor,
) -> Tensor | None:
    """One pass over the noise for ``perturb`` (noise only) and ``noise_stats``; inputs the kernel
    does not take: ``None``, and ops runs the two ops."""
    ns = _f32(noise_scale)
    assert ns is not None  # noise_scale is a tensor
    if (
        not _kernel_dtype(theta, ref)
        or backup.dtype != theta.dtype
        or not theta.is_contiguous()
        or ns.numel() not in (1, offsets.numel() - 1)
    ):
        return None
    return _C().perturb_noise_stats(
        theta,
        _vec(backup),
        _vec(offsets),
        ns,
        int(seed) & _M64,
        int(noise_offset) & _M64,
        _vec(ref),
    )


def philox_words(
    seed: int, offset: int, n: int, device: torch.device | str = _DEVICE_TYPE
) -> tuple[Tensor, Tensor]:
    """The Philox4x32-10 words ``(r0, r1)`` (as int64) of counters ``offset .. offset + n - 1``."""
    words = _C().philox_words(
        int(seed) & _M64, int(offset) & _M64, int(n), torch.empty(0, device=device)
    )
    words = words.to(torch.int64) & 0xFFFFFFFF
    return words[:, 0], words[:, 1]


def _qp_kernel_ok(gram: Tensor) -> bool:
    return 1 <= gram.shape[-1] <= _C().QP_MAX_K


def solve_qp(
    gram: Tensor, q, lower, constraint: str, norm_coef, max_iter: int, tol: float
) -> Tensor:
    if not _qp_kernel_ok(gram):
        return _ref.solve_qp(gram, q, lower, constraint, norm_coef, max_iter, tol)
    return _solve_qp_kernel(gram, q, lower, constraint, max_iter, tol, norm_coef=norm_coef)[0]


def _as_kernel_input(t: Tensor, dt: torch.dtype) -> Tensor:
    """``t.to(dt).contiguous()``, skipping the no-op calls (each costs ~1 us; the K = 8 solve itself
    takes about 1 us). The batch shape goes to the kernel as it is."""
    if t.dtype != dt:
        t = t.to(dt)
    return t if t.is_contiguous() else t.contiguous()


def _solve_qp_kernel(
    gram: Tensor,
    q,
    lower,
    constraint: str,
    max_iter: int,
    tol: float,
    with_iters: bool = False,
    norm_coef=None,
) -> tuple[Tensor, Tensor | None]:
    """The kernel's weights ``[..., K]`` and, ``with_iters``, its step counts ``[...]`` (else
    None)."""
    dt = torch.float64 if gram.dtype == torch.float64 else torch.float32
    if norm_coef is not None:
        norm_coef = _as_kernel_input(
            _qp.norm_coefficients(norm_coef, gram.shape[:-2], constraint, gram.device), dt
        )
    return _C().solve_qp(
        _as_kernel_input(gram, dt),
        None if q is None else _as_kernel_input(q, dt),
        None if lower is None else _as_kernel_input(lower, dt),
        constraint == "simplex",
        int(max_iter),
        float(tol),
        with_iters,
        norm_coef,
    )


DEFAULT_MAX_ITER = _qp.DEFAULT_MAX_ITER
DEFAULT_TOL = _qp.DEFAULT_TOL
