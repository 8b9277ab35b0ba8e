"""The kernels of ``mtlsam_fast._C`` as torch custom ops (``torch.ops.mtlsam_fast.*``), so that
``torch.compile(fullgraph=True)`` traces the ``cpu`` and ``cuda`` backends (docs/ARCHITECTURE.md
§3.3) instead of falling back to the torch reference.

How: ``torch.library.custom_op`` around the pybind11 functions, each with a fake (meta)
implementation that gives the output's shape and dtype, and the mutated arguments declared. Why in
Python rather than ``TORCH_LIBRARY`` in ``csrc/bindings.cpp``:

* eager calls keep the direct pybind11 call. A custom-op call goes through the dispatcher and back
  into Python: the Gram of a 4 x 64 buffer took 5.8 us as ``torch.ops.mtlsam_fast.gram`` against
  0.95 us as the pybind11 call (thread CPU time, best of 9 x 1000 calls, this project's 2-core CI
  machine), more than the whole front end costs; so the backends call these ops only while dynamo
  traces (:data:`TRACED`), and eager steps pay nothing;
* the fake implementations are written once, in Python, next to the shape rules they mirror, for
  CPU and CUDA alike; the extension's binary interface (pybind11, built once by ``setup.py``) does
  not change, so a checkout with an older build keeps working;
* the seeds are unsigned 64-bit, the schema's ``int`` is signed: the wrappers pass the same 64
  bits as a signed value and the implementations mask them back.

:data:`TRACED` has the calling conventions of ``mtlsam_fast._C`` (a mutated buffer is returned,
``solve_qp`` returns ``(weights, None)``), so a backend swaps one for the other. The fused CUDA
aggregation (two launches sharing a ticket) is not a custom op: while tracing, the ``cuda``
backend composes ``gram``, ``solve_qp`` and ``combine`` (the same numbers).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from .. import _ext
from ._validation import check_offset_values

Tensor = torch.Tensor

_M64 = (1 << 64) - 1


def _signed(u: int) -> int:
    """A uint64 as the int64 with the same bits (the schema's ``int``)."""
    return u - (1 << 64) if u >= 1 << 63 else u


def _C():
    ext = _ext.get()
    assert ext is not None  # the backends define these ops only when the extension loaded
    return ext


@torch.library.custom_op("mtlsam_fast::gram", mutates_args=())
def gram(G: Tensor) -> Tensor:
    return _C().gram(G)


@gram.register_fake
def _(G):
    return G.new_empty((G.shape[0], G.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mtlsam_fast::diff_gram", mutates_args=("A",))
def diff_gram(A: Tensor, B: Tensor) -> Tensor:
    return _C().diff_gram(A, B)


@diff_gram.register_fake
def _(A, B):
    return A.new_empty((A.shape[0], A.shape[0]), dtype=torch.float32)


@torch.library.custom_op("mtlsam_fast::segment_norms", mutates_args=())
def segment_norms(x: Tensor, offsets: Tensor, weight: Tensor | None) -> Tensor:
    check_offset_values(offsets, x.shape[-1])
    return _C().segment_norms(x, offsets, weight)


@segment_norms.register_fake
def _(x, offsets, weight):
    return x.new_empty((*x.shape[:-1], offsets.shape[0] - 1), dtype=torch.float32)


@torch.library.custom_op("mtlsam_fast::combine", mutates_args=("out",))
def combine(w: Tensor, G: Tensor, w2: Tensor | None, H: Tensor | None, out: Tensor) -> None:
    _C().combine(w, G, w2, H, out)


@combine.register_fake
def _(w, G, w2, H, out):
    return None


@torch.library.custom_op("mtlsam_fast::perturb", mutates_args=("theta",))
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
) -> None:
    check_offset_values(offsets, theta.numel())
    _C().perturb(
        theta,
        backup,
        direction,
        scale,
        offsets,
        adaptive,
        noise_scale,
        seed & _M64,
        noise_offset & _M64,
    )


@perturb.register_fake
def _(theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset):
    return None


@torch.library.custom_op("mtlsam_fast::gaussian_noise", mutates_args=("out",))
def gaussian_noise(seed: int, offset: int, out: Tensor) -> None:
    _C().gaussian_noise(seed & _M64, offset & _M64, out)


@gaussian_noise.register_fake
def _(seed, offset, out):
    return None


@torch.library.custom_op("mtlsam_fast::noise_stats", mutates_args=())
def noise_stats(seed: int, offset: int, ref: Tensor, offsets: Tensor) -> Tensor:
    check_offset_values(offsets, ref.numel())
    return _C().noise_stats(seed & _M64, offset & _M64, ref, offsets)


@noise_stats.register_fake
def _(seed, offset, ref, offsets):
    return ref.new_empty((2, offsets.shape[0] - 1), dtype=torch.float32)


@torch.library.custom_op("mtlsam_fast::perturb_noise_stats", mutates_args=("theta",))
def perturb_noise_stats(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    noise_scale: Tensor,
    seed: int,
    offset: int,
    ref: Tensor,
) -> Tensor:
    check_offset_values(offsets, theta.numel())
    return _C().perturb_noise_stats(
        theta, backup, offsets, noise_scale, seed & _M64, offset & _M64, ref
    )


@perturb_noise_stats.register_fake
def _(theta, backup, offsets, noise_scale, seed, offset, ref):
    return ref.new_empty((2, offsets.shape[0] - 1), dtype=torch.float32)


@torch.library.custom_op("mtlsam_fast::solve_qp", mutates_args=())
def solve_qp(
    gram: Tensor,
    q: Tensor | None,
    lower: Tensor | None,
    simplex: bool,
    max_iter: int,
    tol: float,
    norm_coef: Tensor | None = None,
) -> Tensor:
    return _C().solve_qp(gram, q, lower, simplex, max_iter, tol, False, norm_coef)[0]


@solve_qp.register_fake
def _(gram, q, lower, simplex, max_iter, tol, norm_coef=None):
    return gram.new_empty(gram.shape[:-1])


def _traced_perturb(
    theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset
):
    perturb(
        theta,
        backup,
        direction,
        scale,
        offsets,
        adaptive,
        noise_scale,
        _signed(seed),
        _signed(noise_offset),
    )
    return theta


def _traced_combine(w, G, w2, H, out):
    combine(w, G, w2, H, out)
    return out


def _traced_gaussian_noise(seed, offset, out):
    gaussian_noise(_signed(seed), _signed(offset), out)
    return out


#: the custom ops with ``mtlsam_fast._C``'s calling conventions (what the backends call while
#: dynamo traces)
TRACED = SimpleNamespace(
    gram=gram,
    diff_gram=diff_gram,
    segment_norms=segment_norms,
    combine=_traced_combine,
    perturb=_traced_perturb,
    gaussian_noise=_traced_gaussian_noise,
    noise_stats=lambda seed, offset, ref, offsets: noise_stats(
        _signed(seed), _signed(offset), ref, offsets
    ),
    perturb_noise_stats=lambda theta, backup, offsets, ns, seed, offset, ref: perturb_noise_stats(
        theta, backup, offsets, ns, _signed(seed), _signed(offset), ref
    ),
    solve_qp=lambda gram, q, lower, simplex, max_iter, tol, with_iters=False, norm_coef=None: (
        solve_qp(gram, q, lower, simplex, max_iter, tol, norm_coef),
        None,
    ),
)
