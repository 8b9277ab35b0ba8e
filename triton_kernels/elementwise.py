"""Streaming kernels over flat buffers: combine, segmented norms, perturb, Philox noise, noise
stats.

* ``combine``: one program per ``BLOCK_P`` columns, rows walked in chunks of ``KC`` (any K without
  register blow-up), fp32 accumulation, stored in the output's dtype.
* Segmented kernels (norms, perturb, noise stats) split P into uniform blocks whatever the segment
  sizes (balanced: one huge embedding and many tiny biases cost the same per byte). Program ``b``
  loads its block once, finds the segment of its first column by a branch-free binary search of
  the device ``offsets`` (``ceil(log2 S)`` scalar loads, no host sync) and walks the (usually one
  or two) segments that intersect the block. Reductions are deterministic without atomics: the
  block's partial for its first segment goes to ``HEAD[b]``; a segment that *starts* inside the
  block stores its partial to ``MID[s]`` (only one block can do that); a second small kernel
  (grid ``S``) adds, in block order, ``MID[s]`` (or ``HEAD`` of its first block) and ``HEAD`` of
  every block the segment continues into. Per-segment scales (SAM, SAMO layerwise) are expanded
  per element inside the block; ASAM's ``|theta|^2`` and the noise are fused into the same pass.
* Noise: element ``j`` of stream ``(seed, offset)`` is Philox4x32-10 of the 64-bit counter
  ``offset + j`` (``tl.philox``), then Box-Muller in fp32, exactly :mod:`mtlsam_fast.ops.philox`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config, _workspace


@triton.jit
def philox_normal(seed, idx):
    """fp32 standard normals for int64 counters ``idx`` (the spec of ``mtlsam_fast.ops.philox``)."""
    c0 = (idx & 0xFFFFFFFF).to(tl.uint32)
    c1 = ((idx >> 32) & 0xFFFFFFFF).to(tl.uint32)
    zero = c0 * 0
    r0, r1, _r2, _r3 = tl.philox(seed, c0, c1, zero, zero)
    u1 = ((r0 >> 8).to(tl.float32) + 0.5) * 5.9604644775390625e-08
    u2 = (r1 >> 8).to(tl.float32) * 5.9604644775390625e-08
    return tl.sqrt_rn(-2.0 * tl.log(u1)) * tl.cos(6.283185307179586 * u2)


# ----------------------------------------------------------------------------------------------
# combine
# ----------------------------------------------------------------------------------------------
@triton.jit
def combine_block(acc, Wt, X, K, sxk, sxp, p, pmask, KC: tl.constexpr):
    """acc += w^T X[:, p] over all K rows, in chunks of KC rows (fp32)."""
    rc = tl.arange(0, KC)
    for k0 in range(0, K, KC):
        k = k0 + rc
        km = k < K
        w = tl.load(Wt + k, mask=km, other=0.0).to(tl.float32)
        x = tl.load(
            X + k.to(tl.int64)[:, None] * sxk + p[None, :] * sxp,
            mask=km[:, None] & pmask[None, :],
            other=0.0,
        ).to(tl.float32)
        acc += tl.sum(w[:, None] * x, axis=0)
    return acc


@triton.jit
def _combine_kernel(
    W1,
    G,
    K,
    sgk,
    sgp,
    W2,
    H,
    K2,
    shk,
    shp,
    OUT,
    so,
    P,
    HAS_H: tl.constexpr,
    BLOCK_P: tl.constexpr,
    KC: tl.constexpr,
):
    pid = tl.program_id(0)
    p = tl.cast(pid, tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    acc = tl.zeros((BLOCK_P,), dtype=tl.float32)
    acc = combine_block(acc, W1, G, K, sgk, sgp, p, pmask, KC)
    if HAS_H:
        acc = combine_block(acc, W2, H, K2, shk, shp, p, pmask, KC)
    tl.store(OUT + p * so, acc.to(OUT.dtype.element_ty), mask=pmask)


def combine(w, G, w2, H, out):
    K, P = G.shape
    has_h = H is not None
    Ht, w2t = (H, w2) if has_h else (G, w)

    def run(cfg):
        kc = min(cfg["KC"], triton.next_power_of_2(max(K, Ht.shape[0])))
        extra = {} if _config.INTERPRET else {"num_warps": cfg["num_warps"]}
        _combine_kernel[(triton.cdiv(max(P, 1), cfg["BLOCK_P"]),)](
            w,
            G,
            K,
            G.stride(0),
            G.stride(1),
            w2t,
            Ht,
            Ht.shape[0],
            Ht.stride(0),
            Ht.stride(1),
            out,
            out.stride(0),
            P,
            HAS_H=has_h,
            BLOCK_P=cfg["BLOCK_P"],
            KC=kc,
            **extra,
        )

    cfg = _config.choose(
        "combine",
        (G.dtype, out.dtype, K, has_h, _config.bucket(P)),
        G.device,
        run,
        idempotent=not _config.shares_storage(out, G, H, w, w2),
    )
    run(cfg)
    return out


# ----------------------------------------------------------------------------------------------
# segmented kernels: uniform P-blocks mapped to segments
# ----------------------------------------------------------------------------------------------
def _nsteps(S: int) -> int:
    """Binary-search steps that locate a column among S segments (host-side, from the shape)."""
    return max(1, int(S).bit_length())


@triton.jit
def first_segment(OFF, S, p0, NSTEPS: tl.constexpr):
    """The segment s with offsets[s] <= p0 < offsets[s+1] (branch-free binary search, int32)."""
    lo = tl.cast(0, tl.int32)
    hi = tl.cast(S, tl.int32)
    for _ in tl.static_range(NSTEPS):
        mid = (lo + hi) // 2
        active = hi - lo > 1
        go_right = tl.load(OFF + mid) <= p0
        lo_new = tl.where(active & go_right, mid, lo)
        hi = tl.where(active & (go_right == 0), mid, hi)
        lo = lo_new
    return lo


@triton.jit
def _seg_sums(vals, p, OFF, s_lo, p0, pend, MID, mid_base):
    """Per-segment sums of ``vals`` over this block: the first segment's sum is returned (the
    block's *head* partial), every later segment (it starts inside the block) is stored to
    ``MID[mid_base + s]``."""
    head = tl.sum(tl.where(p < tl.load(OFF + s_lo + 1), vals, 0.0), axis=0)
    s = s_lo + 1
    seg_start = tl.load(OFF + s)
    while seg_start < pend:
        seg_end = tl.load(OFF + s + 1)
        v = tl.sum(tl.where((p >= seg_start) & (p < seg_end), vals, 0.0), axis=0)
        tl.store(MID + mid_base + s, v)
        s += 1
        seg_start = seg_end
    return head


@triton.jit
def _seg_norm_kernel(
    X,
    Wt,
    OFF,
    HEAD,
    MID,
    sxk,
    sxp,
    sw,
    P,
    S,
    nblocks,
    HAS_W: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NSTEPS: tl.constexpr,
):
    b = tl.program_id(0)
    row = tl.program_id(1)
    p0 = tl.cast(b, tl.int64) * BLOCK_P
    p = p0 + tl.arange(0, BLOCK_P)
    m = p < P
    x = tl.load(X + tl.cast(row, tl.int64) * sxk + p * sxp, mask=m, other=0.0).to(tl.float32)
    if HAS_W:
        x = x * tl.load(Wt + p * sw, mask=m, other=0.0).to(tl.float32)
    s_lo = first_segment(OFF, S, p0, NSTEPS)
    head = _seg_sums(
        x * x, p, OFF, s_lo, p0, tl.minimum(p0 + BLOCK_P, P), MID, tl.cast(row, tl.int64) * S
    )
    tl.store(HEAD + tl.cast(row, tl.int64) * nblocks + b, head)


@triton.jit
def _seg_finish_kernel(
    HEAD, MID, OFF, OUT, S, nblocks, BLOCK_P: tl.constexpr, RC: tl.constexpr, SQRT: tl.constexpr
):
    """OUT[c, s] = the segment's partial in its first block + the head partials of the blocks it
    continues into, summed in block order (deterministic)."""
    s = tl.program_id(0)
    c = tl.cast(tl.program_id(1), tl.int64)
    start = tl.load(OFF + s)
    end = tl.load(OFF + s + 1)
    b0 = start // BLOCK_P
    b1 = tl.maximum(end - 1, start) // BLOCK_P
    in_head = start == b0 * BLOCK_P
    first = tl.where(
        in_head,
        tl.load(HEAD + c * nblocks + b0, mask=in_head & (b0 < nblocks), other=0.0),
        tl.load(MID + c * S + s, mask=in_head == 0, other=0.0),
    )
    rc = tl.arange(0, RC)
    acc = tl.zeros((RC,), dtype=tl.float32)
    for j0 in range(b0 + 1, b1 + 1, RC):
        j = j0 + rc
        acc += tl.load(HEAD + c * nblocks + j, mask=j <= b1, other=0.0)
    total = tl.where(end > start, first + tl.sum(acc, axis=0), 0.0)
    if SQRT:
        total = tl.sqrt_rn(total)
    tl.store(OUT + c * S + s, total)


def _finish(head, mid, offsets, C: int, S: int, nblocks: int, bp: int, sqrt: bool, device):
    out = torch.empty(C, S, dtype=torch.float32, device=device)
    _seg_finish_kernel[(S, C)](
        head,
        mid,
        offsets,
        out,
        S,
        nblocks,
        BLOCK_P=bp,
        RC=64 if _config.INTERPRET else 256,
        SQRT=sqrt,
    )
    return out


def segment_norms(x, offsets, weight):
    X = x if x.dim() == 2 else x.unsqueeze(0)
    R, P = X.shape
    S = offsets.numel() - 1
    Wt = weight if weight is not None else X
    sw = weight.stride(0) if weight is not None else 0

    def run(cfg):
        bp = cfg["BLOCK_P"]
        nblocks = triton.cdiv(max(P, 1), bp)
        head = _workspace.get(x.device, "seg_head", (R, nblocks))
        mid = _workspace.get(x.device, "seg_mid", (R, S))
        extra = {} if _config.INTERPRET else {"num_warps": cfg["num_warps"]}
        _seg_norm_kernel[(nblocks, R)](
            X,
            Wt,
            offsets,
            head,
            mid,
            X.stride(0),
            X.stride(1),
            sw,
            P,
            S,
            nblocks,
            HAS_W=weight is not None,
            BLOCK_P=bp,
            NSTEPS=_nsteps(S),
            **extra,
        )
        return _finish(head, mid, offsets, R, S, nblocks, bp, True, x.device)

    out = run(
        _config.choose(
            "segment", ("norm", x.dtype, R, _config.bucket(S), _config.bucket(P)), x.device, run
        )
    )
    return out if x.dim() == 2 else out.squeeze(0)


@triton.jit
def _segment_values(VALS, sv, OFF, p, s_lo, pend, BLOCK_P: tl.constexpr):
    """Per-element values of a per-segment table (stride 0: one scalar for every segment)."""
    out = tl.zeros((BLOCK_P,), dtype=tl.float32) + tl.load(VALS + s_lo * sv).to(tl.float32)
    s = s_lo + 1
    seg_start = tl.load(OFF + s)
    while seg_start < pend:
        out = tl.where(p >= seg_start, tl.load(VALS + s * sv).to(tl.float32), out)
        s += 1
        seg_start = tl.load(OFF + s)
    return out


@triton.jit
def _perturb_kernel(
    TH,
    BK,
    DIR,
    SC,
    NS,
    OFF,
    sth,
    sbk,
    sdir,
    ssc,
    sns,
    P,
    S,
    seed,
    noise_offset,
    HAS_DIR: tl.constexpr,
    ADAPTIVE: tl.constexpr,
    HAS_NOISE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    NSTEPS: tl.constexpr,
):
    """theta <- backup + scale[s] * m(dir) + noise_scale[s] * z for one block of columns."""
    p0 = tl.cast(tl.program_id(0), tl.int64) * BLOCK_P
    p = p0 + tl.arange(0, BLOCK_P)
    m = p < P
    pend = tl.minimum(p0 + BLOCK_P, P)
    s_lo = first_segment(OFF, S, p0, NSTEPS)
    new = tl.load(BK + p * sbk, mask=m, other=0.0).to(tl.float32)
    if HAS_DIR:
        sc = _segment_values(SC, ssc, OFF, p, s_lo, pend, BLOCK_P)
        step = tl.load(DIR + p * sdir, mask=m, other=0.0).to(tl.float32) * sc
        if ADAPTIVE:
            step = step * new * new
        new = new + step
    if HAS_NOISE:
        ns = _segment_values(NS, sns, OFF, p, s_lo, pend, BLOCK_P)
        new = new + philox_normal(seed, noise_offset + p) * ns
    tl.store(TH + p * sth, new.to(TH.dtype.element_ty), mask=m)


def _seg_stride(t, S: int) -> int:
    """Stride of a per-segment value tensor: 0 for a scalar (broadcast), else its element stride."""
    if t is None or t.numel() == 1:
        return 0
    if t.dim() != 1 or t.numel() != S:
        raise ValueError(
            f"per-segment values must be a scalar or have {S} elements, got shape {tuple(t.shape)}"
        )
    return t.stride(0)


def perturb(theta, backup, direction, scale, offsets, adaptive, noise_scale, seed, noise_offset):
    P = theta.numel()
    S = offsets.numel() - 1
    has_dir, has_noise = direction is not None, noise_scale is not None
    ssc, sns = _seg_stride(scale, S), _seg_stride(noise_scale, S)
    dummy = backup
    if P == 0:
        return theta

    def run(cfg):
        extra = {} if _config.INTERPRET else {"num_warps": cfg["num_warps"]}
        _perturb_kernel[(triton.cdiv(P, cfg["BLOCK_P"]),)](
            theta,
            backup,
            direction if has_dir else dummy,
            scale if has_dir else dummy,
            noise_scale if has_noise else dummy,
            offsets,
            theta.stride(0),
            backup.stride(0),
            direction.stride(0) if has_dir else 0,
            ssc,
            sns,
            P,
            S,
            seed & ((1 << 64) - 1),
            noise_offset,
            HAS_DIR=has_dir,
            ADAPTIVE=bool(adaptive) and has_dir,
            HAS_NOISE=has_noise,
            BLOCK_P=cfg["BLOCK_P"],
            NSTEPS=_nsteps(S),
            **extra,
        )

    # idempotent (theta is recomputed from backup) unless theta aliases an input
    run(
        _config.choose(
            "segment",
            ("perturb", theta.dtype, has_dir, has_noise, _config.bucket(S), _config.bucket(P)),
            theta.device,
            run,
            idempotent=not _config.shares_storage(theta, backup, direction, scale, noise_scale),
        )
    )
    return theta


@triton.jit
def _noise_stats_kernel(
    REF,
    OFF,
    HEAD,
    MID,
    sref,
    P,
    S,
    nblocks,
    seed,
    noise_offset,
    BLOCK_P: tl.constexpr,
    NSTEPS: tl.constexpr,
):
    b = tl.program_id(0)
    p0 = tl.cast(b, tl.int64) * BLOCK_P
    p = p0 + tl.arange(0, BLOCK_P)
    m = p < P
    pend = tl.minimum(p0 + BLOCK_P, P)
    z = tl.where(m, philox_normal(seed, noise_offset + p), 0.0)
    r = tl.load(REF + p * sref, mask=m, other=0.0).to(tl.float32)
    s_lo = first_segment(OFF, S, p0, NSTEPS)
    h0 = _seg_sums(z * z, p, OFF, s_lo, p0, pend, MID, tl.cast(0, tl.int64))
    h1 = _seg_sums(z * r, p, OFF, s_lo, p0, pend, MID, tl.cast(S, tl.int64))
    tl.store(HEAD + b, h0)
    tl.store(HEAD + nblocks + b, h1)


def noise_stats(seed, offset, ref, offsets):
    P = ref.numel()
    S = offsets.numel() - 1

    def run(cfg):
        bp = cfg["BLOCK_P"]
        nblocks = triton.cdiv(max(P, 1), bp)
        head = _workspace.get(ref.device, "seg_head", (2, nblocks))
        mid = _workspace.get(ref.device, "seg_mid", (2, S))
        extra = {} if _config.INTERPRET else {"num_warps": cfg["num_warps"]}
        _noise_stats_kernel[(nblocks,)](
            ref,
            offsets,
            head,
            mid,
            ref.stride(0),
            P,
            S,
            nblocks,
            seed & ((1 << 64) - 1),
            offset,
            BLOCK_P=bp,
            NSTEPS=_nsteps(S),
            **extra,
        )
        return _finish(head, mid, offsets, 2, S, nblocks, bp, False, ref.device)

    return run(
        _config.choose(
            "segment",
            ("noise_stats", ref.dtype, _config.bucket(S), _config.bucket(P)),
            ref.device,
            run,
        )
    )


@triton.jit
def _noise_kernel(OUT, n, seed, noise_offset, BLOCK_P: tl.constexpr):
    p = tl.cast(tl.program_id(0), tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    m = p < n
    tl.store(OUT + p, philox_normal(seed, noise_offset + p), mask=m)


def gaussian_noise(seed, offset, numel, device):
    out = torch.empty(numel, dtype=torch.float32, device=device)
    if numel == 0:
        return out

    def run(cfg):
        extra = {} if _config.INTERPRET else {"num_warps": cfg["num_warps"]}
        _noise_kernel[(triton.cdiv(numel, cfg["BLOCK_P"]),)](
            out, numel, seed & ((1 << 64) - 1), offset, BLOCK_P=cfg["BLOCK_P"], **extra
        )

    run(_config.choose("noise", (_config.bucket(numel),), device, run))
    return out
