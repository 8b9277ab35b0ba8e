"""Gram matrix ``G @ G.T`` of a K x P buffer (K <= 64, P huge) and the fused difference + Gram.

Design (memory-bound for K <= ~16):

* Pass 1 (``_gram_partial_kernel``): a persistent grid of ``waves x #SMs`` programs (never more
  than the number of column blocks). Program ``i`` walks column blocks ``i, i + n, i + 2n, ...`` of
  ``BLOCK_P`` columns, loads the ``[KP, BLOCK_P]`` tile once (rows >= K masked, so padding costs no
  bandwidth; each thread issues contiguous vector loads along P), upcasts to fp32 right after the
  load and accumulates a ``KP x KP`` fp32 partial:
    - 16-bit inputs: ``tl.dot`` on tensor cores (bf16/fp16 products are exact in fp32), a fresh
      accumulator per tile added with Kahan compensation (see ``_accumulate``),
      KP = max(16, next_pow2(K));
    - fp32 inputs, K <= 8: exact fp32 broadcast products ``sum_p x_i x_j`` (no padding waste);
    - fp32 inputs, K > 8: ``tl.dot(..., input_precision="ieee")`` (exact fp32 FMA, no TF32).
  With ``DIFF`` the tile is ``A - B``, stored back to A in the same pass (A <- A - B, rounded to
  A's dtype exactly like ``torch.sub_``) before it enters the Gram: one read of A and B, one write.
  Each partial is symmetrized (``(S + S^T) / 2``, bitwise symmetric) and stored to a cached
  workspace ``[n_programs, KP, KP]``.
* Pass 2 (``_gram_reduce_kernel``): ``KP`` programs, program ``r`` sums row ``r`` of all partials
  in a fixed order (chunks of ``RCHUNK`` partials, fixed tree inside a chunk): deterministic, no
  atomics, and bitwise symmetric because every partial is.

All column offsets are int64 (``K * P`` may exceed 2**31); strides and storage offsets of views are
honoured (the row stride and the column stride are kernel arguments).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config, _workspace

RCHUNK = 16


@triton.jit
def _tile(G, B, row_off_g, row_off_b, p, sgp, sbp, m, DIFF: tl.constexpr):
    """Load one [KP, BLOCK_P] tile (optionally A - B, written back to A); returns it in fp32."""
    ptr = G + row_off_g[:, None] + p[None, :] * sgp
    x = tl.load(ptr, mask=m, other=0.0)
    if DIFF:
        b = tl.load(B + row_off_b[:, None] + p[None, :] * sbp, mask=m, other=0.0)
        xd = (x.to(tl.float32) - b.to(tl.float32)).to(x.dtype)
        tl.store(ptr, xd, mask=m)
        x = xd
    return x


@triton.jit
def _accumulate(acc, comp, x, MODE: tl.constexpr):
    """acc += x x^T. MODE 0: fp32 broadcast; 1: fp32 ieee dot; 2: 16-bit tensor-core dot.

    MODE 2 gives every tile a fresh MMA accumulator and adds it to ``acc`` with Kahan compensation
    (``comp``): Hopper's tensor cores do not round their fp32 accumulation to nearest, and one chain
    of MMAs over a program's ~10^4 column steps drifts low (the Gram of 2**26 bf16 columns came out
    2.7e-4 too small on an H100); a tile is BLOCK_P / 16 MMA steps (~1e-6 relative bias left)."""
    if MODE == 0:
        xf = x.to(tl.float32)
        acc += tl.sum(xf[:, None, :] * xf[None, :, :], axis=2)
    elif MODE == 1:
        xf = x.to(tl.float32)
        acc = tl.dot(xf, tl.trans(xf), acc, input_precision="ieee")
    else:
        y = tl.dot(x, tl.trans(x)) - comp
        t = acc + y
        comp = (t - acc) - y
        acc = t
    return acc, comp


@triton.jit
def gram_partial_block(
    G,
    B,
    sgk,
    sgp,
    sbk,
    sbp,
    P,
    K,
    pid,
    nprog,
    nblocks,
    KP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
    DIFF: tl.constexpr,
):
    """The symmetrized fp32 partial Gram of the column blocks owned by program ``pid``."""
    rk = tl.arange(0, KP)
    rp = tl.arange(0, BLOCK_P)
    kmask = rk < K
    row_off_g = rk.to(tl.int64) * sgk
    row_off_b = rk.to(tl.int64) * sbk
    acc = tl.zeros((KP, KP), dtype=tl.float32)
    comp = tl.zeros((KP, KP), dtype=tl.float32)
    for blk in range(pid, nblocks, nprog):
        p = tl.cast(blk, tl.int64) * BLOCK_P + rp
        m = kmask[:, None] & (p < P)[None, :]
        x = _tile(G, B, row_off_g, row_off_b, p, sgp, sbp, m, DIFF)
        acc, comp = _accumulate(acc, comp, x, MODE)
    return 0.5 * (acc + tl.trans(acc))


@triton.jit
def _gram_partial_kernel(
    G,
    B,
    WS,
    sgk,
    sgp,
    sbk,
    sbp,
    P,
    K,
    nblocks,
    KP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
    DIFF: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    acc = gram_partial_block(
        G, B, sgk, sgp, sbk, sbp, P, K, pid, nprog, nblocks, KP, BLOCK_P, MODE, DIFF
    )
    rk = tl.arange(0, KP)
    tl.store(WS + pid.to(tl.int64) * (KP * KP) + rk[:, None] * KP + rk[None, :], acc)


@triton.jit
def reduce_row(WS, nparts, r, KP: tl.constexpr, RC: tl.constexpr):
    """Row ``r`` of the sum of ``nparts`` partials ``[nparts, KP, KP]`` in a fixed order (fp32)."""
    rk = tl.arange(0, KP)
    rc = tl.arange(0, RC)
    acc = tl.zeros((KP,), dtype=tl.float32)
    for j0 in range(0, nparts, RC):
        j = j0 + rc
        ptr = WS + j[:, None].to(tl.int64) * (KP * KP) + r * KP + rk[None, :]
        blk = tl.load(ptr, mask=(j < nparts)[:, None], other=0.0, cache_modifier=".cg")
        acc += tl.sum(blk, axis=0)
    return acc


@triton.jit
def _gram_reduce_kernel(WS, OUT, nparts, K, KP: tl.constexpr, RC: tl.constexpr):
    r = tl.program_id(0)
    rk = tl.arange(0, KP)
    row = reduce_row(WS, nparts, r, KP, RC)
    tl.store(OUT + r * K + rk, row, mask=(rk < K) & (r < K))


def _mode(dtype: torch.dtype, K: int) -> tuple[int, int]:
    """(MODE, KP) for a K-row buffer of ``dtype``."""
    kp = triton.next_power_of_2(max(K, 1))
    if dtype in (torch.bfloat16, torch.float16):
        return (1 if _config.INTERPRET else 2), max(16, kp)
    if K <= 8:
        return 0, kp
    return 1, max(16, kp)


def _block_p(cfg: _config.Config, mode: int, kp: int) -> int:
    bp = cfg["BLOCK_P"]
    if mode == 0:  # the broadcast product holds KP*KP*BLOCK_P values per program
        bp = min(bp, max(16, 16384 // (kp * kp)))
    elif kp >= 64:  # 64-row tiles: keep the tile in registers
        bp = min(bp, 128)
    elif kp >= 32:
        bp = min(bp, 256)
    return bp


def launch_params(G: torch.Tensor, cfg: _config.Config) -> tuple[int, int, int, int]:
    """(MODE, KP, BLOCK_P, n_programs) for ``G`` under ``cfg``."""
    K, P = G.shape
    mode, kp = _mode(G.dtype, K)
    bp = _block_p(cfg, mode, kp)
    nblocks = triton.cdiv(max(P, 1), bp)
    nprog = max(1, min(nblocks, cfg["waves"] * _config.sm_count(G.device)))
    return mode, kp, bp, nprog


def _launch(
    G: torch.Tensor, B: torch.Tensor | None, out: torch.Tensor, cfg: _config.Config
) -> torch.Tensor:
    K, P = G.shape
    mode, kp, bp, nprog = launch_params(G, cfg)
    nblocks = triton.cdiv(max(P, 1), bp)
    ws = _workspace.get(G.device, "gram_partials", (nprog, kp, kp))
    Bt = G if B is None else B
    extra = (
        {}
        if _config.INTERPRET
        else {"num_warps": cfg["num_warps"], "num_stages": cfg.get("num_stages", 3)}
    )
    _gram_partial_kernel[(nprog,)](
        G,
        Bt,
        ws,
        G.stride(0),
        G.stride(1),
        Bt.stride(0),
        Bt.stride(1),
        P,
        K,
        nblocks,
        KP=kp,
        BLOCK_P=bp,
        MODE=mode,
        DIFF=B is not None,
        **extra,
    )
    _gram_reduce_kernel[(K,)](ws, out, nprog, K, KP=kp, RC=RCHUNK)
    return out


def gram_config(G: torch.Tensor) -> _config.Config:
    K, P = G.shape
    key = (G.dtype, K, _config.bucket(P))
    scratch = {}

    def run(cfg):
        if "out" not in scratch:
            scratch["out"] = torch.empty(K, K, dtype=torch.float32, device=G.device)
        _launch(G, None, scratch["out"], cfg)

    return _config.choose("gram", key, G.device, run)


def gram(G: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 ``G @ G.T`` (symmetric) of a [K, P] fp32/bf16/fp16 buffer (any strides)."""
    K = G.shape[0]
    if out is None:
        out = torch.empty(K, K, dtype=torch.float32, device=G.device)
    return _launch(G, None, out, gram_config(G))


def diff_gram(A: torch.Tensor, B: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``A <- A - B`` in place and its fp32 Gram, in one pass over A and B."""
    K = A.shape[0]
    if out is None:
        out = torch.empty(K, K, dtype=torch.float32, device=A.device)
    cfg = gram_config(A)  # tuned on the read-only Gram of A (the in-place pass is not idempotent)
    return _launch(A, B, out, cfg)
