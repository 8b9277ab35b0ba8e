"""The fused two-launch aggregation path of docs/ARCHITECTURE.md §6.

Launch 1 (``_gram_qp_kernel``): the persistent Gram pass of :mod:`.gram` over ``G`` (and, for
F-MTL, over a second buffer ``H`` of the same shape); every program stores its symmetrized
partial in a cached workspace, then takes a ticket from a device counter (``atomic_add``,
acquire-release, after a CTA barrier). The program that draws the last ticket sums all partials in
program order (deterministic), writes the Gram matrix, solves the min-norm (MGDA) simplex QP with
:func:`.qp.qp_core` in the same program, writes the weights, and resets the counter to 0, so the
next call, or the next replay of a captured CUDA graph, starts clean.

Launch 2 (``_apply_kernel``): ``d = w^T G (+ w2^T H)`` accumulated in fp32, then, in the same
pass, ``out <- d`` (e.g. the flat ``.grad`` the base optimizer reads, in the parameter dtype)
and/or ``theta <- theta - lr * d`` (``lr`` a device scalar: a fused SGD step).

The weights and the Gram matrix never leave the device between the two launches; nothing
synchronizes with the host; after one eager warm-up call (which allocates the workspaces and
compiles), a call allocates only its small outputs, so the whole aggregation can be captured
in a CUDA graph.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import _config, _workspace
from .elementwise import combine_block
from .gram import _block_p, _mode, gram_partial_block
from .qp import MAX_K, qp_core, qp_num_warps


@triton.jit
def _reduce_tile(WS, nparts, KP: tl.constexpr):
    rk = tl.arange(0, KP)
    acc = tl.zeros((KP, KP), dtype=tl.float32)
    for j in range(nparts):
        acc += tl.load(
            WS + tl.cast(j, tl.int64) * (KP * KP) + rk[:, None] * KP + rk[None, :],
            cache_modifier=".cg",
        )
    return acc


@triton.jit
def _finish(WS, nparts, GOUT, WOUT, K, max_iter, tol, KP: tl.constexpr):
    rk = tl.arange(0, KP)
    km = rk < K
    gram = _reduce_tile(WS, nparts, KP)
    tl.store(GOUT + rk[:, None] * K + rk[None, :], gram, mask=km[:, None] & km[None, :])
    zero = tl.zeros((KP,), dtype=tl.float64)
    v = qp_core(gram.to(tl.float64), zero, zero, 0.0, K, max_iter, tol, KP, True, False)
    tl.store(WOUT + rk, v.to(WOUT.dtype.element_ty), mask=km)


@triton.jit
def _gram_qp_kernel(
    G,
    sgk,
    sgp,
    H,
    shk,
    shp,
    P,
    K,
    nblocks,
    WS,
    WS2,
    TICKET,
    GOUT,
    WOUT,
    GOUT2,
    WOUT2,
    max_iter,
    tol,
    KP: tl.constexpr,
    BLOCK_P: tl.constexpr,
    MODE: tl.constexpr,
    HAS_H: tl.constexpr,
):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    rk = tl.arange(0, KP)
    tile = rk[:, None] * KP + rk[None, :]
    acc = gram_partial_block(
        G, G, sgk, sgp, sgk, sgp, P, K, pid, nprog, nblocks, KP, BLOCK_P, MODE, False
    )
    tl.store(WS + tl.cast(pid, tl.int64) * (KP * KP) + tile, acc)
    if HAS_H:
        acc2 = gram_partial_block(
            H, H, shk, shp, shk, shp, P, K, pid, nprog, nblocks, KP, BLOCK_P, MODE, False
        )
        tl.store(WS2 + tl.cast(pid, tl.int64) * (KP * KP) + tile, acc2)
    tl.debug_barrier()
    ticket = tl.atomic_add(TICKET, 1, sem="acq_rel")
    if ticket == nprog - 1:
        _finish(WS, nprog, GOUT, WOUT, K, max_iter, tol, KP)
        if HAS_H:
            _finish(WS2, nprog, GOUT2, WOUT2, K, max_iter, tol, KP)
        tl.atomic_xchg(TICKET, 0, sem="acq_rel")


@triton.jit
def _apply_kernel(
    W1,
    G,
    K,
    sgk,
    sgp,
    W2,
    H,
    shk,
    shp,
    OUT,
    so,
    TH,
    sth,
    LR,
    P,
    HAS_H: tl.constexpr,
    WRITE: tl.constexpr,
    UPDATE: tl.constexpr,
    BLOCK_P: tl.constexpr,
    KC: tl.constexpr,
):
    p = tl.cast(tl.program_id(0), tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    d = tl.zeros((BLOCK_P,), dtype=tl.float32)
    d = combine_block(d, W1, G, K, sgk, sgp, p, pmask, KC)
    if HAS_H:
        d = combine_block(d, W2, H, K, shk, shp, p, pmask, KC)
    if WRITE:
        tl.store(OUT + p * so, d.to(OUT.dtype.element_ty), mask=pmask)
    if UPDATE:
        lr = tl.load(LR).to(tl.float32)
        th = tl.load(TH + p * sth, mask=pmask, other=0.0).to(tl.float32)
        tl.store(TH + p * sth, (th - lr * d).to(TH.dtype.element_ty), mask=pmask)


class Aggregate(NamedTuple):
    """Result of :func:`fused_aggregate` (all on the device)."""

    weights: torch.Tensor  #: [K] fp32 min-norm weights of G's rows
    gram: torch.Tensor  #: [K, K] fp32 Gram of G
    weights2: torch.Tensor | None  #: [K] weights of H's rows (when H is given)
    gram2: torch.Tensor | None  #: [K, K] Gram of H (when H is given)
    direction: torch.Tensor | None  #: ``out`` (when given)


def _torch_path(G, H, out, theta, lr, max_iter, tol) -> Aggregate:
    from mtlsam_fast.ops import qp as _ref
    from mtlsam_fast.ops import torch_backend as tb

    def solve(M):
        g = tb.gram(M)
        return _ref.solve_qp(g, max_iter=max_iter, tol=tol).to(torch.float32), g.to(torch.float32)

    w, g = solve(G)
    w2, g2 = solve(H) if H is not None else (None, None)
    if out is not None or theta is not None:
        d = torch.empty(
            G.shape[1],
            dtype=torch.float32 if G.dtype != torch.float64 else torch.float64,
            device=G.device,
        )
        tb.combine(w.to(d.dtype), G, None if H is None else w2.to(d.dtype), H, d)
        if out is not None:
            out.copy_(d)
        if theta is not None:
            theta.copy_(theta.to(d.dtype) - lr.to(d.dtype) * d)
    return Aggregate(w, g, w2, g2, out)


def fused_aggregate(
    G: torch.Tensor,
    H: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    theta: torch.Tensor | None = None,
    lr: torch.Tensor | None = None,
    max_iter: int = 60,
    tol: float = 1e-9,
) -> Aggregate:
    """MGDA-style aggregation of the rows of ``G`` (and, separately, of ``H``) in two launches.

    Contract:

    * ``G`` (and ``H``, same shape, dtype and device) is a ``[K, P]`` fp32/bf16/fp16 buffer (any
      strides); ``K <= 64``. fp64 buffers or larger K take the (equivalent, unfused) torch path.
    * Launch 1 computes ``gram = G G^T`` (fp32 accumulation, deterministic) and ``weights`` = the
      min-norm point of the convex hull of the rows: ``argmin_{v in simplex} v^T gram v`` (same
      solver and KKT target as ``ops.solve_qp``); likewise ``gram2``/``weights2`` for ``H``.
    * Launch 2 computes ``d = weights^T G (+ weights2^T H)`` in fp32 and, in the same pass,
      writes ``out <- d`` when ``out`` ([P], any float dtype, e.g. the shared parameters' flat
      ``.grad``) is given, and/or ``theta <- theta - lr * d`` when ``theta`` ([P]) and ``lr``
      (a 1-element device tensor) are given. With neither, launch 2 is skipped.
    * Non-finite gradients give NaN weights (and a NaN direction): the found-inf signal.
    * No host synchronization. After one eager warm-up call with the same shapes, the call is
      CUDA-graph capturable (cached workspaces, a self-resetting ticket counter, no tuning).
      Calls must not run concurrently on different streams (they share the workspace).
    """
    K, P = G.shape
    if H is not None and (H.shape != G.shape or H.device != G.device or H.dtype != G.dtype):
        raise ValueError(
            f"H must match G: {tuple(H.shape)} {H.dtype} on {H.device} vs "
            f"{tuple(G.shape)} {G.dtype} on {G.device}"
        )
    if (theta is None) != (lr is None):
        raise ValueError("theta and lr must be given together")
    for name, t in (("out", out), ("theta", theta)):
        if t is not None and (t.dim() != 1 or t.shape[0] != P or t.device != G.device):
            raise ValueError(f"{name} must be a [{P}] tensor on {G.device}")
    if G.dtype == torch.float64 or (H is not None and H.dtype == torch.float64) or K > MAX_K:
        return _torch_path(G, H, out, theta, lr, max_iter, tol)

    dev = G.device
    mode, kp = _mode(G.dtype, K)
    cfg = _config.choose(
        "gram",
        ("fused", G.dtype, K, _config.bucket(P)),
        dev,
        lambda c: None,
        candidates=[_config.CANDIDATES["gram"][0]],
    )
    bp = _block_p(cfg, mode, kp)
    nblocks = triton.cdiv(max(P, 1), bp)
    # the last program reduces every partial alone: fewer, fatter programs for big tiles
    waves = cfg["waves"] if kp <= 16 else max(1, cfg["waves"] // 4)
    nprog = max(1, min(nblocks, waves * _config.sm_count(dev)))
    ws = _workspace.get(dev, "fused_partials", (nprog, kp, kp))
    ws2 = _workspace.get(dev, "fused_partials2", (nprog, kp, kp)) if H is not None else ws
    ticket = _workspace.get(dev, "fused_ticket", (1,), torch.int32, zero=True)
    gram = torch.empty(K, K, dtype=torch.float32, device=dev)
    w = torch.empty(K, dtype=torch.float32, device=dev)
    gram2 = torch.empty(K, K, dtype=torch.float32, device=dev) if H is not None else None
    w2 = torch.empty(K, dtype=torch.float32, device=dev) if H is not None else None
    Ht = H if H is not None else G
    # the last program also runs the fp64 QP: give big tiles the warps it needs (see
    # qp.qp_candidates)
    nw = max(cfg["num_warps"], qp_num_warps(kp))
    extra = {} if _config.INTERPRET else {"num_warps": nw, "num_stages": cfg.get("num_stages", 3)}
    _gram_qp_kernel[(nprog,)](
        G,
        G.stride(0),
        G.stride(1),
        Ht,
        Ht.stride(0),
        Ht.stride(1),
        P,
        K,
        nblocks,
        ws,
        ws2,
        ticket,
        gram,
        w,
        gram if gram2 is None else gram2,
        w if w2 is None else w2,
        int(max_iter),
        float(tol),
        KP=kp,
        BLOCK_P=bp,
        MODE=mode,
        HAS_H=H is not None,
        **extra,
    )

    if out is not None or theta is not None:
        ccfg = _config.choose(
            "combine",
            ("fused", G.dtype, K, _config.bucket(P)),
            dev,
            lambda c: None,
            candidates=[_config.CANDIDATES["combine"][0]],
        )
        kc = min(ccfg["KC"], triton.next_power_of_2(K))
        extra = {} if _config.INTERPRET else {"num_warps": ccfg["num_warps"]}
        o = out if out is not None else G
        th = theta if theta is not None else G
        _apply_kernel[(triton.cdiv(max(P, 1), ccfg["BLOCK_P"]),)](
            w,
            G,
            K,
            G.stride(0),
            G.stride(1),
            w if w2 is None else w2,
            Ht,
            Ht.stride(0),
            Ht.stride(1),
            o,
            o.stride(-1),
            th,
            th.stride(-1),
            lr if lr is not None else w,
            P,
            HAS_H=H is not None,
            WRITE=out is not None,
            UPDATE=theta is not None,
            BLOCK_P=ccfg["BLOCK_P"],
            KC=kc,
            **extra,
        )
    return Aggregate(w, gram, w2, gram2, out)
