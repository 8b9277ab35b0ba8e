"""Batched small QP on the device: one program per problem, fp64 inside, early exit in the kernel.

Problem ``b`` (as :mod:`mtlsam_fast.ops.qp`): minimize ``1/2 v^T Gamma v + q^T v`` (or, with
``norm_coef`` r, ``q^T v + r sqrt(v^T Gamma v)``, CAGrad's inner problem) over the simplex, or
subject to ``v >= lower``.

Algorithm (``qp_core``, a ``@triton.jit`` function reused by the fused aggregation kernel):
the same primal-dual interior-point method with Mehrotra's predictor-corrector as the torch
reference, on the same Jacobi-scaled problem (``u = v sqrt(diag Gamma / max diag)``, so gradients
scaled by 1e-12 ... 1e12 look alike to the solver), in float64 registers:

* the whole ``KP x KP`` problem lives in one program's registers (KP = next_pow2(K) <= 64; padded
  rows/columns are decoupled and masked out of every reduction);
* the Newton matrix ``M = Hess + diag(z/x) + 1e-14 I`` (positive definite in the interior) is
  inverted in place with the symmetric *sweep operator* (Goodnight 1979): K pivots, each one
  column extraction (a masked row-wise reduction; symmetry gives the row) and one rank-1 update
  of the tile, no pivoting needed for SPD matrices; after all pivots the tile holds ``-M^{-1}``. The
  predictor, the corrector and the simplex constraint's extra solve are then mat-vecs;
* the reference's start (the centre of the simplex) and stopping rule (the residuals in the
  units of v, against the problem's own magnitude); a ``while`` loop runs at most ``max_iter``
  iterations and exits as soon as the KKT conditions hold to ``tol``, checked in the kernel: no
  host round trip;
* non-finite ``Gamma`` or ``q`` gives NaN weights (the optimizers' found-inf flag).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _config

MAX_K = 64


@triton.jit
def _mv(A, v):
    """A @ v for a [KP, KP] tile and a [KP] vector."""
    return tl.sum(A * v[None, :], axis=1)


@triton.jit
def sweep_inverse(M, K, KP: tl.constexpr):
    """M^{-1} of an SPD tile (rows/columns >= K untouched: callers keep them decoupled).

    The sweep keeps the tile symmetric, so pivot k needs only its column (one masked row-wise
    reduction); the row is the same vector laid out along the other axis."""
    rk = tl.arange(0, KP)
    A = M
    for k in range(K):
        colsel = rk[None, :] == k
        rowsel = rk[:, None] == k
        c = tl.sum(tl.where(colsel, A, 0.0), axis=1)
        inv = 1.0 / tl.sum(tl.where(rk == k, c, 0.0), axis=0)
        t = c * inv
        upd = A - t[:, None] * c[None, :]
        upd = tl.where(colsel, t[:, None], upd)
        upd = tl.where(rowsel, t[None, :], upd)
        A = tl.where(rowsel & colsel, -inv, upd)
    return -A


@triton.jit
def _max_step(x, dx, km):
    ratio = tl.where(km & (dx < 0), -x / tl.where(dx < 0, dx, -1.0), float("inf"))
    return tl.minimum(tl.min(ratio, axis=0) * 0.995, 1.0)


@triton.jit
def _grad_hess(H, c, x, r, HAS_R: tl.constexpr):
    Hx = _mv(H, x)
    if HAS_R:
        s = tl.sqrt(tl.sum(x * Hx, axis=0) + 1e-16)
        g = c + r * Hx / s
        hess = r * (H / s - Hx[:, None] * Hx[None, :] / (s * s * s))
    else:
        g = Hx + c
        hess = H
    return g, hess


@triton.jit
def qp_core(
    H0,
    q0,
    lower,
    r_in,
    K,
    max_iter,
    tol,
    KP: tl.constexpr,
    SIMPLEX: tl.constexpr,
    HAS_R: tl.constexpr,
):
    """Solve one problem. ``H0`` [KP, KP], ``q0``/``lower`` [KP] fp64 (zero padded), ``r_in``
    fp64."""
    rk = tl.arange(0, KP)
    km = rk < K
    kmf = km.to(tl.float64)
    eye = rk[:, None] == rk[None, :]
    H0 = 0.5 * (H0 + tl.trans(H0))
    nbad = tl.sum(tl.sum((tl.abs(H0) < float("inf")) == 0, axis=1), axis=0) + tl.sum(
        (tl.abs(q0) < float("inf")) == 0, axis=0
    )
    finite = nbad == 0
    H0 = tl.where(finite, H0, 0.0)
    q0 = tl.where(finite, q0, 0.0)

    diag = tl.sum(tl.where(eye, H0, 0.0), axis=1)
    ref = tl.max(tl.where(km, diag, -float("inf")), axis=0)
    ref = tl.where(ref > 0, ref, 1.0)
    diag_rel = diag / ref
    d = 1.0 / tl.sqrt(tl.where(km & (diag_rel > 1e-300), diag_rel, 1.0))
    H = H0 / ref * d[:, None] * d[None, :]
    c = q0 / ref * d
    zero_v = tl.zeros((KP,), dtype=tl.float64)
    if SIMPLEX:
        dmax = tl.max(tl.where(km, d, 0.0), axis=0)
        a = tl.where(km, d / dmax, 0.0)
        beta = 1.0 / dmax
        lo = zero_v
        if HAS_R:
            x = tl.where(km, beta / tl.sum(a, axis=0), 1.0)
        else:  # the reference's start: v = 1/K with z = 1 in v-units (z_u = d)
            x = tl.where(km, beta / (tl.sum(kmf, axis=0) * tl.where(km, a, 1.0)), 1.0)
    else:
        a = zero_v
        beta = 0.0
        lo = tl.where(km, lower / d, 0.0)
        c = c + _mv(H, lo)
        x = zero_v + 1.0
    r = r_in / tl.sqrt(ref)
    z = zero_v + 1.0
    if SIMPLEX:
        if HAS_R:
            z = zero_v + 1.0
        else:
            z = tl.where(km, d, 1.0)  # z = 1 in v-units
    y = tl.sum(zero_v, axis=0)
    c_scale = 1.0 + tl.max(tl.abs(c), axis=0)
    nk = tl.sum(kmf, axis=0)

    it = 0
    go = 1
    while go > 0:
        g, hess = _grad_hess(H, c, x, r, HAS_R)
        r_d = tl.where(km, g - z - a * y, 0.0)
        mu = tl.sum(tl.where(km, x * z, 0.0), axis=0) / nk
        if HAS_R:  # the smoothed norm objective: residuals against 1 + max |c|
            r_p = beta - tl.sum(a * x, axis=0)
            conv = (tl.max(tl.abs(r_d), axis=0) <= tol * c_scale) & (mu <= tol * tol)
            conv = conv & (tl.abs(r_p) <= tol)
        else:  # the reference's rule, in v-units, against the problem's own magnitude
            scale = tl.max(tl.where(km, (tl.abs(g) + tl.abs(c)) / d, 0.0), axis=0)
            rd_v = tl.max(tl.abs(r_d) / d, axis=0)
            if SIMPLEX:
                r_p = beta - tl.sum(a * x, axis=0)
                scale = tl.maximum(tl.maximum(scale, tl.abs(y) * beta), 1e-300)
                conv = (rd_v <= tol * scale) & (mu <= tol * tol * scale)
                conv = conv & (tl.abs(r_p) <= tol * beta)
            else:
                r_p = 0.0
                scale = tl.maximum(scale, 1e-300)
                conv = (rd_v <= tol * scale) & (mu <= tol * tol * scale)
        if conv | (it >= max_iter):
            go = 0
        else:
            M = tl.where(km[:, None] & km[None, :], hess, 0.0) + tl.where(
                eye, tl.where(km, z / x, 1.0) + 1e-14, 0.0
            )
            Minv = sweep_inverse(M, K, KP)
            if SIMPLEX:
                m = tl.where(km, _mv(Minv, a), 0.0)
                am = tl.sum(a * m, axis=0)
            # predictor (affine scaling)
            rc = -x * z
            p = tl.where(km, _mv(Minv, tl.where(km, -r_d + rc / x, 0.0)), 0.0)
            if SIMPLEX:
                dy_a = (r_p - tl.sum(a * p, axis=0)) / am
                dx_a = p + m * dy_a
            else:
                dx_a = p
            dz_a = tl.where(km, (rc - z * dx_a) / x, 0.0)
            alpha_a = tl.minimum(_max_step(x, dx_a, km), _max_step(z, dz_a, km))
            mu_aff = (
                tl.sum(tl.where(km, (x + alpha_a * dx_a) * (z + alpha_a * dz_a), 0.0), axis=0) / nk
            )
            sigma = tl.minimum(tl.maximum(mu_aff / tl.maximum(mu, 1e-300), 0.0), 1.0)
            sigma = sigma * sigma * sigma
            # corrector
            rc = -x * z - dx_a * dz_a + sigma * mu
            p = tl.where(km, _mv(Minv, tl.where(km, -r_d + rc / x, 0.0)), 0.0)
            if SIMPLEX:
                dy = (r_p - tl.sum(a * p, axis=0)) / am
                dx = p + m * dy
            else:
                dy = 0.0
                dx = p
            dz = tl.where(km, (rc - z * dx) / x, 0.0)
            alpha = tl.minimum(_max_step(x, dx, km), _max_step(z, dz, km))
            x = tl.where(km, x + alpha * dx, 1.0)
            y = y + alpha * dy
            z = tl.where(km, z + alpha * dz, 1.0)
            it += 1

    v = (x + lo) * d
    if SIMPLEX:
        v = tl.where(km, tl.maximum(v, 0.0), 0.0)
        v = v / tl.sum(v, axis=0)
    else:
        v = tl.where(km, tl.maximum(v, lo * d), 0.0)
    return tl.where(finite, v, float("nan"))


@triton.jit
def _qp_kernel(
    GR,
    Q,
    LO,
    R,
    OUT,
    K,
    sgb,
    sgi,
    sgj,
    max_iter,
    tol,
    KP: tl.constexpr,
    SIMPLEX: tl.constexpr,
    HAS_Q: tl.constexpr,
    HAS_LO: tl.constexpr,
    HAS_R: tl.constexpr,
):
    b = tl.cast(tl.program_id(0), tl.int64)
    rk = tl.arange(0, KP)
    km = rk < K
    H0 = tl.load(
        GR + b * sgb + rk[:, None] * sgi + rk[None, :] * sgj,
        mask=km[:, None] & km[None, :],
        other=0.0,
    ).to(tl.float64)
    if HAS_Q:
        q0 = tl.load(Q + b * K + rk, mask=km, other=0.0).to(tl.float64)
    else:
        q0 = tl.zeros((KP,), dtype=tl.float64)
    if HAS_LO:
        lower = tl.load(LO + b * K + rk, mask=km, other=0.0).to(tl.float64)
    else:
        lower = tl.zeros((KP,), dtype=tl.float64)
    if HAS_R:
        r = tl.load(R + b).to(tl.float64)
    else:
        r = 0.0
    v = qp_core(H0, q0, lower, r, K, max_iter, tol, KP, SIMPLEX, HAS_R)
    tl.store(OUT + b * K + rk, v.to(OUT.dtype.element_ty), mask=km)


def qp_candidates(kp: int) -> list[dict]:
    """num_warps candidates by tile size: a 64 x 64 fp64 tile needs 16 warps to stay (almost) in
    registers (ptxas for sm_90: 128 registers and ~0.6 KB of spills per thread at 16 warps, 3.5 KB
    at 4 warps)."""
    if kp >= 64:
        return [{"num_warps": 16}, {"num_warps": 8}]
    if kp >= 32:
        return [{"num_warps": 8}, {"num_warps": 16}, {"num_warps": 4}]
    return [{"num_warps": 4}, {"num_warps": 8}, {"num_warps": 2}]


def qp_num_warps(kp: int) -> int:
    return qp_candidates(kp)[0]["num_warps"]


def solve_qp(gram, q, lower, constraint, norm_coef, max_iter, tol):
    """Batched solve (``[..., K, K]`` -> ``[..., K]``); K > 64 goes to the torch reference."""
    K = gram.shape[-1]
    simplex = constraint == "simplex"
    if norm_coef is not None and not simplex:
        raise ValueError("norm_coef is only supported with constraint='simplex'")
    if K > MAX_K:
        from mtlsam_fast.ops import qp as _ref

        return _ref.solve_qp(
            gram, q, lower, constraint=constraint, norm_coef=norm_coef, max_iter=max_iter, tol=tol
        )
    batch_shape = gram.shape[:-2]
    G3 = gram.reshape(-1, K, K)
    B = G3.shape[0]
    out_dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
    out = torch.empty(B, K, dtype=out_dtype, device=gram.device)
    if B == 0:
        return out.reshape(*batch_shape, K)
    qq = q.reshape(B, K).contiguous() if q is not None else out
    lo = lower.reshape(B, K).contiguous() if (lower is not None and not simplex) else out
    rr = norm_coef.reshape(B).contiguous() if norm_coef is not None else out
    kp = max(
        4, triton.next_power_of_2(K)
    )  # 2 x 2 tiles gave NaN / diverged weights compiled for an H100

    def run(cfg):
        extra = {} if _config.INTERPRET else {"num_warps": cfg["num_warps"]}
        _qp_kernel[(B,)](
            G3,
            qq,
            lo,
            rr,
            out,
            K,
            G3.stride(0),
            G3.stride(1),
            G3.stride(2),
            int(max_iter),
            float(tol),
            KP=kp,
            SIMPLEX=simplex,
            HAS_Q=q is not None,
            HAS_LO=lower is not None and not simplex,
            HAS_R=norm_coef is not None,
            **extra,
        )

    run(
        _config.choose(
            "qp", (kp, _config.bucket(B), simplex), gram.device, run, candidates=qp_candidates(kp)
        )
    )
    return out.reshape(*batch_shape, K)
