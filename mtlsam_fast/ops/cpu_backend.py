"""The ``"cpu"`` backend: C++/OpenMP kernels of the compiled extension ``mtlsam_fast._C``.

Same functions and semantics as :mod:`.torch_backend` (the oracle). The kernels take fp32, bf16
and fp16 buffers (fp32 accumulation; Gram / norm partials in fp64, combined in a fixed order, so
results do not depend on the thread count) with 64-bit offsets. Inputs the kernels do not handle
fall back to the torch backend: float64 buffers, buffers without a unit column stride,
``solve_qp`` with more than ``_C.QP_MAX_K`` (32768) variables, a ``backup`` whose dtype differs
from ``theta``; and, for every op, inputs that require grad (the kernels are not differentiable;
the reference is). Each hand-off goes through ``_registry.fallback``, so ``ops.dispatch_log()``
shows it with its reason. ``solve_qp(..., norm_coef=...)`` (CAGrad's norm objective) runs in the
kernel.

While ``torch.compile`` traces, the kernels are called as the custom ops of :mod:`._library`
(``torch.ops.mtlsam_fast.*``), so the compiled graph calls them (``TRACEABLE``).
"""

from __future__ import annotations

import sys

import torch

from .. import _ext
from . import _registry
from . import qp as _qp
from ._contract import compose_min_norm_aggregate, compose_perturb_noise_stats
from ._library import TRACED
from .threads import single_threaded

Tensor = torch.Tensor

TRACEABLE = True  # the kernels are torch custom ops while dynamo traces (_library)

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
    """The kernels: ``mtlsam_fast._C`` (eager), or its custom ops while dynamo traces."""
    return TRACED if torch.compiler.is_compiling() else _ext.get()


def _ref(op: str, t: Tensor, reason: str):
    """The torch reference, running ``op`` instead of this backend (on ``t``'s device)."""
    return _registry.fallback(op, t.device.type, reason)


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
    if not _kernel_dtype(G):
        return _ref("gram", G, f"{str(G.dtype)[6:]} buffer").gram(G)
    if not _rows_ok(G):
        return _ref("gram", G, "rows without a unit column stride").gram(G)
    return single_threaded(lambda: _C().gram(G), G.device, G.numel())


def diff_gram(A: Tensor, B: Tensor) -> Tensor:
    if not _kernel_dtype(A):
        return _ref("diff_gram", A, f"{str(A.dtype)[6:]} buffer").diff_gram(A, B)
    if not _rows_ok(A):
        return _ref("diff_gram", A, "rows without a unit column stride").diff_gram(A, B)
    if not _rows_ok(B):
        B = B.contiguous()
    return single_threaded(lambda: _C().diff_gram(A, B), A.device, A.numel())


def segment_norms(x: Tensor, offsets: Tensor, weight: Tensor | None = None) -> Tensor:
    if not _kernel_dtype(x, weight):
        return _ref("segment_norms", x, "float64 input").segment_norms(x, offsets, weight)
    if x.dim() == 1:
        x = _vec(x)
    elif not _rows_ok(x):
        x = x.contiguous()
    return _C().segment_norms(x, _vec(offsets), None if weight is None else _vec(weight))


def combine(w: Tensor, G: Tensor, w2: Tensor | None, H: Tensor | None, out: Tensor) -> Tensor:
    if not _kernel_dtype(G, H, out):
        return _ref("combine", G, "float64 input").combine(w, G, w2, H, out)
    if H is not None and H.dtype != G.dtype:
        return _ref("combine", G, f"H is {H.dtype}, G is {G.dtype}").combine(w, G, w2, H, out)
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
    if not _kernel_dtype(theta, direction):
        reason = "float64 input"
    elif backup.dtype != theta.dtype:
        reason = f"backup is {backup.dtype}, theta is {theta.dtype}"
    elif not theta.is_contiguous():
        reason = "a strided theta"
    else:
        reason = None
    if reason is not None:
        return _ref("perturb", theta, reason).perturb(
            theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset
        )
    scale32, noise32 = _f32(scale), _f32(noise_scale)
    _C().perturb(
        theta,
        _vec(backup),
        None if direction is None else _vec(direction),
        scale32,
        _vec(offsets),
        bool(adaptive),
        noise32,
        seed,
        noise_offset,
    )
    return theta


def gaussian_noise(seed: int, offset: int, numel: int, device: torch.device) -> Tensor:
    """The noise stream computed in the kernel -- vector Philox rounds (bit-exact words) and Cephes
    log / cos polynomials, a few ulp from the torch oracle's Box-Muller -- so it is exactly the
    noise that ``perturb`` and ``noise_stats`` of this backend add and reduce (as on CUDA)."""
    out = torch.empty(numel, dtype=torch.float32, device=device)
    _C().gaussian_noise(seed, offset, out)
    return out


def noise_stats(seed: int, offset: int, ref: Tensor, offsets: Tensor) -> Tensor:
    if not _kernel_dtype(ref):
        return _ref("noise_stats", ref, "float64 input").noise_stats(seed, offset, ref, offsets)
    return _C().noise_stats(seed, offset, _vec(ref), _vec(offsets))


def perturb_noise_stats(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    noise_scale: Tensor,
    seed: int,
    noise_offset: int,
    ref: Tensor,
) -> Tensor:
    """One pass over the noise for ``perturb`` (noise only) and ``noise_stats`` on CPU tensors the
    kernel takes; otherwise this backend's two ops (the same results)."""
    ns = _f32(noise_scale)
    assert ns is not None  # noise_scale is a tensor
    if (
        theta.is_cuda
        or not _kernel_dtype(theta, ref)
        or backup.dtype != theta.dtype
        or not theta.is_contiguous()
    ):
        return compose_perturb_noise_stats(
            _self, theta, backup, offsets, noise_scale, seed, noise_offset, ref
        )
    return _C().perturb_noise_stats(
        theta, _vec(backup), _vec(offsets), ns, seed, noise_offset, _vec(ref)
    )


def philox_words(
    seed: int, offset: int, n: int, device: torch.device | str = _DEVICE_TYPE
) -> tuple[Tensor, Tensor]:
    """The Philox4x32-10 words ``(r0, r1)`` (as int64) of counters ``offset .. offset + n - 1``."""
    words = _ext.get().philox_words(  # type: ignore[union-attr]
        int(seed) & _M64, int(offset) & _M64, int(n), torch.empty(0, device=device)
    )
    words = words.to(torch.int64) & 0xFFFFFFFF
    return words[:, 0], words[:, 1]


def solve_qp(
    gram: Tensor, q, lower, constraint: str, norm_coef, max_iter: int, tol: float
) -> Tensor:
    if 1 <= gram.shape[-1] <= _ext.get().QP_MAX_K:  # type: ignore[union-attr]
        return _solve_qp_kernel(gram, q, lower, constraint, max_iter, tol, norm_coef=norm_coef)[0]
    reason = f"K = {gram.shape[-1]} outside the kernel's 1 ... QP_MAX_K"
    return _ref("solve_qp", gram, reason).solve_qp(
        gram, q, lower, constraint, norm_coef, max_iter, tol
    )


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


def min_norm_aggregate(
    G: Tensor, out: Tensor, subtract: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """No fused kernel on the CPU: this backend's gram, solve_qp and combine."""
    return compose_min_norm_aggregate(_self, G, out, subtract, max_iter, tol)


_self = sys.modules[__name__]  # this module, as the backend the compositions call

DEFAULT_MAX_ITER = _qp.DEFAULT_MAX_ITER
DEFAULT_TOL = _qp.DEFAULT_TOL
