"""The torch reference backend: the oracle every other backend is tested against.

Plain PyTorch, any device, no host synchronization. Inputs are validated by
:mod:`mtlsam_fast.ops` before they reach this module.
"""

from __future__ import annotations

import sys

import torch

from . import qp
from ._contract import compose_min_norm_aggregate, compose_perturb_noise_stats
from .philox import gaussian_from_counter

Tensor = torch.Tensor

TRACEABLE = True  # plain torch ops: torch.compile traces them

_CHUNK = 1 << 22  # columns per chunk when a buffer must be upcast (bounds temporary memory)
_SUM_BLOCK = 1024  # columns per first-level partial sum of _segment_sum


def unavailable_reason(device_type: str) -> str | None:
    return None


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def gram(G: Tensor) -> Tensor:
    acc = _acc_dtype(G)
    P = G.shape[1]
    if G.dtype == acc or P <= _CHUNK:
        Gf = G.to(acc)
        out = Gf @ Gf.T
    else:
        out = torch.zeros(G.shape[0], G.shape[0], dtype=acc, device=G.device)
        for start in range(0, P, _CHUNK):
            blk = G[:, start : start + _CHUNK].to(acc)
            out += blk @ blk.T
    return 0.5 * (out + out.T)


def diff_gram(A: Tensor, B: Tensor) -> Tensor:
    A.sub_(B)
    return gram(A)


def _segment_sum(x: Tensor, offsets: Tensor) -> Tensor:
    """Sums of ``x`` (``[P]`` or ``[R, P]``) over the column segments ``offsets``, in fp64.

    On the CPU each segment is summed on its own (:func:`_segment_sum_local`), so a huge or
    non-finite segment cannot change the sums of the others. On other devices: accurate for
    segments of any length, deterministic and free of host synchronization, but formed from
    prefix sums over the whole buffer (below), so a segment after one whose sum is ~1e16 times
    larger loses its digits to cancellation and one after a non-finite segment is NaN (the CUDA
    and Triton kernels, the fast paths there, sum each segment on its own).
    (``torch.segment_reduce`` sums each segment sequentially in the input dtype, 4 % off for a
    2**25-column fp32 segment, and synchronizes on CUDA; fp64 ``index_add_`` is not deterministic
    on CUDA.) In blocks of ``_SUM_BLOCK`` columns, from fp64 prefix sums: a segment's sum is the
    difference of the block prefix sums at its two ends (exactly zero when both ends fall in one
    block) plus the difference of the in-block prefix sums; so no sum runs along a whole long
    segment, and a segment within one block is a difference of prefixes of at most that block.
    Columns go in chunks of ``_CHUNK`` to bound the temporaries.
    """
    if x.device.type == "cpu":
        return _segment_sum_local(x, offsets)
    rows = x.unsqueeze(0) if x.dim() == 1 else x
    R, P = rows.shape
    B = _SUM_BLOCK
    out = torch.zeros(R, offsets.numel() - 1, dtype=torch.float64, device=x.device)
    for lo in range(0, P, _CHUNK):
        hi = min(P, lo + _CHUNK)
        nb = (hi - lo + B - 1) // B + 1  # one zero block past the end: a prefix at the chunk's end
        blocks = torch.nn.functional.pad(rows[:, lo:hi].double(), (0, nb * B - (hi - lo))).view(
            R, nb, B
        )
        in_block = (blocks.cumsum(-1) - blocks).view(
            R, nb * B
        )  # exclusive prefix sums inside blocks
        before_block = torch.nn.functional.pad(blocks.sum(-1).cumsum(-1), (1, 0))  # [R, nb + 1]
        ends = offsets.clamp(lo, hi) - lo
        out += before_block[:, ends // B].diff(dim=-1) + in_block[:, ends].diff(dim=-1)
    return out[0] if x.dim() == 1 else out


def _segment_sum_local(x: Tensor, offsets: Tensor) -> Tensor:
    """:func:`_segment_sum` with each segment summed on its own: every column's segment from
    ``bucketize`` (the offsets run from 0 to P, checked by the front end), then a fp64
    ``index_add_``, which on the CPU adds in column order (deterministic)."""
    rows = x.unsqueeze(0) if x.dim() == 1 else x
    R, P = rows.shape
    out = torch.zeros(R, offsets.numel() - 1, dtype=torch.float64, device=x.device)
    for lo in range(0, P, _CHUNK):
        hi = min(P, lo + _CHUNK)
        cols = torch.arange(lo, hi, device=x.device, dtype=offsets.dtype)
        out.index_add_(1, torch.bucketize(cols, offsets[1:], right=True), rows[:, lo:hi].double())
    return out[0] if x.dim() == 1 else out


def segment_norms(x: Tensor, offsets: Tensor, weight: Tensor | None = None) -> Tensor:
    acc = _acc_dtype(x)
    v = x.to(acc)
    if weight is not None:
        v = v * weight.to(acc)
    squares = _segment_sum(v * v, offsets)
    # sqrt has an infinite derivative at 0: an empty or zero segment gets the zero subgradient
    # (as torch.linalg.norm), not NaN; NaN and inf still propagate
    zero = squares == 0
    return torch.where(zero, 0.0, torch.where(zero, 1.0, squares).sqrt()).to(acc)


def combine(w: Tensor, G: Tensor, w2: Tensor | None, H: Tensor | None, out: Tensor) -> Tensor:
    acc = _acc_dtype(G)
    d = w.to(acc) @ G.to(acc)
    if w2 is not None:
        assert H is not None  # given together with w2 (checked by ops.combine)
        d = d + w2.to(acc) @ H.to(acc)
    return out.copy_(d)


def _expand_segments(values: Tensor, offsets: Tensor, numel: int) -> Tensor:
    """Per-element values from per-segment ``values`` ([S] or a scalar)."""
    if values.numel() == 1:
        return values.reshape(()).expand(numel)
    return values.repeat_interleave(offsets.diff(), output_size=numel)


def gaussian_noise(seed: int, offset: int, numel: int, device: torch.device) -> Tensor:
    # the 64-bit counters offset + j as int64 with the same bits (offset may exceed 2**63 - 1)
    signed = offset - (1 << 64) if offset >= 1 << 63 else offset
    counter = torch.arange(numel, dtype=torch.int64, device=device)
    if signed >= 0 and signed + numel <= 1 << 63:
        counter += signed  # no int64 wrap-around
    else:
        counter = (counter + (signed >> 1)) + (signed - (signed >> 1))  # wraps like uint64
    return gaussian_from_counter(seed, counter)


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
    acc = torch.float64 if theta.dtype == torch.float64 else torch.float32
    P = theta.numel()
    new = backup.to(acc)
    if direction is not None:
        assert scale is not None  # given together with direction (checked by ops.perturb)
        step = direction.to(acc) * _expand_segments(scale.to(acc), offsets, P)
        if adaptive:
            step = step * new * new
        new = new + step
    if noise_scale is not None:
        z = gaussian_noise(seed, noise_offset, P, theta.device).to(acc)
        new = new + z * _expand_segments(noise_scale.to(acc), offsets, P)
    return theta.copy_(new)


def noise_stats(seed: int, offset: int, ref: Tensor, offsets: Tensor) -> Tensor:
    acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
    z = gaussian_noise(seed, offset, ref.numel(), ref.device).to(acc)
    return torch.stack([_segment_sum(z * z, offsets), _segment_sum(z * ref.to(acc), offsets)]).to(
        acc
    )


def perturb_noise_stats(
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    noise_scale: Tensor,
    seed: int,
    noise_offset: int,
    ref: Tensor,
) -> Tensor:
    return compose_perturb_noise_stats(
        _self, theta, backup, offsets, noise_scale, seed, noise_offset, ref
    )


def solve_qp(
    gram: Tensor, q, lower, constraint: str, norm_coef, max_iter: int, tol: float
) -> Tensor:
    return qp.solve_qp(
        gram, q, lower, constraint=constraint, norm_coef=norm_coef, max_iter=max_iter, tol=tol
    )


def min_norm_aggregate(
    G: Tensor, out: Tensor, subtract: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    return compose_min_norm_aggregate(_self, G, out, subtract, max_iter, tol)


_self = sys.modules[__name__]  # this module, as the backend the compositions call
