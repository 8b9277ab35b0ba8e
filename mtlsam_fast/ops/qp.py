"""The batched small QP shared by MGDA, UPGrad, DualProj and CAGrad (torch reference solver).

Each problem ``b`` of a batch is

    minimize   1/2 v^T Gamma v + q^T v        (or, with norm_coef r:  q^T v + r sqrt(v^T Gamma v))
    subject to v in the simplex  (v >= 0, sum v = 1)        -- constraint="simplex"
           or  v >= lower                                   -- constraint="lower"

with ``Gamma`` a K x K Gram matrix (PSD, possibly rank-deficient or badly scaled). The optional
norm objective (``norm_coef`` = r > 0, simplex only) is CAGrad's inner problem (Liu et al., 2021);
its square root is smoothed by a relative 1e-16 so that ``Gamma v = 0`` at the optimum stays
solvable.

Algorithm: a primal-dual interior-point method with Mehrotra's predictor-corrector (Mehrotra
1992; Nocedal & Wright, *Numerical Optimization*, 16.6) on the Jacobi-scaled problem
``u = v * sqrt(diag Gamma)``, so that scaling a task's gradient by 1e-6 or 1e6 does not change the
conditioning the solver sees. The Newton matrix ``Gamma + diag(z/x)`` is positive definite in the
interior, so singular Gram matrices (identical or zero gradients) need no special case. It runs in
float64 with batched Cholesky factorizations (``cholesky_ex``: no error check, no host sync) for a
fixed iteration budget; problems that have converged are frozen by a mask. On CPU tensors the loop
also exits early once every problem has converged (reading a CPU tensor does not synchronize a
device); under ``torch.compile`` or on accelerators it always runs the full budget.

Non-finite input propagates: such a problem returns NaN weights (the optimizers' found-inf flag).
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

DEFAULT_MAX_ITER = 60
DEFAULT_TOL = 1e-9
_FRACTION_TO_BOUNDARY = 0.995
_SQRT_EPS = 1e-16  # smooths sqrt(u^T H u) at 0 (H has unit diagonal)


def _max_step(x: Tensor, dx: Tensor) -> Tensor:
    """Largest alpha in (0, 1] with x + alpha dx >= 0, shrunk by the fraction-to-boundary rule."""
    ratio = torch.where(dx < 0, -x / dx, torch.full_like(x, float("inf")))
    alpha = ratio.amin(dim=-1, keepdim=True) * _FRACTION_TO_BOUNDARY
    return alpha.clamp(max=1.0)


def solve_qp(
    gram: Tensor,
    q: Tensor | None = None,
    lower: Tensor | None = None,
    *,
    constraint: str = "simplex",
    norm_coef: Tensor | None = None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float = DEFAULT_TOL,
) -> Tensor:
    """Solve the batch of QPs described in the module docstring; returns ``v`` shaped like ``q``.

    ``gram``: [..., K, K]; ``q``, ``lower``: [..., K] or None (zeros); ``norm_coef``: [...] or None.
    The result has ``gram``'s dtype (float32 for 16-bit input).
    """
    out_dtype = torch.float64 if gram.dtype == torch.float64 else torch.float32
    dt = torch.float64
    H0 = gram.to(dt)
    batch_shape, K = H0.shape[:-2], H0.shape[-1]
    H0 = H0.reshape(-1, K, K)
    B = H0.shape[0]
    H0 = 0.5 * (H0 + H0.transpose(-1, -2))
    q0 = torch.zeros(B, K, dtype=dt, device=H0.device) if q is None else q.to(dt).reshape(B, K)
    simplex = constraint == "simplex"
    finite = torch.isfinite(H0).flatten(1).all(1) & torch.isfinite(q0).all(1)
    H0 = torch.where(finite[:, None, None], H0, torch.zeros_like(H0))
    q0 = torch.where(finite[:, None], q0, torch.zeros_like(q0))

    # Scale to unit largest diagonal, then Jacobi-scale v = D u with D_ii = sqrt(ref / Gamma_ii)
    # (rows of zero keep D_ii = 1), so that H = D Gamma D / ref has unit diagonal and the
    # variables stay O(1) whatever the gradients' magnitudes.
    diag = H0.diagonal(dim1=-2, dim2=-1)
    ref = diag.amax(-1, keepdim=True)
    ref = torch.where(ref > 0, ref, torch.ones_like(ref))
    diag_rel = diag / ref
    d = torch.where(diag_rel > 1e-300, diag_rel, torch.ones_like(diag_rel)).rsqrt()  # [B, K]
    H = H0 / ref.unsqueeze(-1) * d[:, :, None] * d[:, None, :]
    c = q0 / ref * d
    if simplex:
        lo = torch.zeros_like(c)
        a = d / d.amax(-1, keepdim=True)  # scaled equality a^T u = beta
        beta = 1.0 / d.amax(-1)
    else:
        lo = torch.zeros_like(c) if lower is None else lower.to(dt).reshape(B, K) / d
        c = c + (H @ lo.unsqueeze(-1)).squeeze(-1)  # shift u = x + lo, x >= 0
    r = None
    if norm_coef is not None:
        if not simplex:
            raise ValueError("norm_coef is only supported with constraint='simplex'")
        r = norm_coef.to(dt).reshape(B, 1) / ref.sqrt()  # r sqrt(v'Gv) = ref * (r/sqrt(ref)) sqrt(u'Hu)

    eye = torch.eye(K, dtype=dt, device=H.device)
    x = torch.ones(B, K, dtype=dt, device=H.device)
    if simplex:
        x = x * (beta / a.sum(-1))[:, None]
    z = torch.ones_like(x)
    y = torch.zeros(B, 1, dtype=dt, device=H.device)
    c_scale = 1.0 + c.abs().amax(-1, keepdim=True)
    done = torch.zeros(B, 1, dtype=torch.bool, device=H.device)
    check_early = H.device.type == "cpu" and not torch.compiler.is_compiling()

    def grad_hess(x: Tensor) -> tuple[Tensor, Tensor]:
        Hx = (H @ x.unsqueeze(-1)).squeeze(-1)
        if r is None:
            return Hx + c, H
        s = torch.sqrt((x * Hx).sum(-1, keepdim=True) + _SQRT_EPS)
        g = c + r * Hx / s
        hess = r.unsqueeze(-1) * (H / s.unsqueeze(-1) - Hx.unsqueeze(-1) * Hx.unsqueeze(-2) / (s**3).unsqueeze(-1))
        return g, hess

    for it in range(max_iter):
        g, hess = grad_hess(x)
        r_d = g - z - (a * y if simplex else 0.0)
        r_p = (beta - (a * x).sum(-1)).unsqueeze(-1) if simplex else None
        mu = (x * z).mean(-1, keepdim=True)
        conv = (r_d.abs().amax(-1, keepdim=True) <= tol * c_scale) & (mu <= tol * tol)
        if simplex:
            conv &= r_p.abs() <= tol
        done = done | conv
        if check_early and it % 4 == 3 and bool(done.all()):
            break
        M = hess + torch.diag_embed(z / x) + eye * 1e-14
        L, _ = torch.linalg.cholesky_ex(M)

        def newton(rc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            rhs = -r_d + rc / x
            if simplex:
                sol = torch.cholesky_solve(torch.stack([rhs, a], -1), L)
                p, m = sol[..., 0], sol[..., 1]
                dy = (r_p - (a * p).sum(-1, keepdim=True)) / (a * m).sum(-1, keepdim=True)
                dx = p + m * dy
            else:
                dx = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)
                dy = torch.zeros_like(y)
            dz = (rc - z * dx) / x
            return dx, dy, dz

        dx_a, _, dz_a = newton(-x * z)
        alpha_a = torch.minimum(_max_step(x, dx_a), _max_step(z, dz_a))
        mu_aff = ((x + alpha_a * dx_a) * (z + alpha_a * dz_a)).mean(-1, keepdim=True)
        sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        dx, dy, dz = newton(-x * z - dx_a * dz_a + sigma * mu)
        alpha = torch.minimum(_max_step(x, dx), _max_step(z, dz))
        keep = done
        x = torch.where(keep, x, x + alpha * dx)
        y = torch.where(keep, y, y + alpha * dy)
        z = torch.where(keep, z, z + alpha * dz)

    v = (x + lo) * d
    if simplex:
        v = v.clamp_min(0.0)
        v = v / v.sum(-1, keepdim=True)
    else:
        v = torch.maximum(v, lo * d)
    v = torch.where(finite[:, None], v, torch.full_like(v, float("nan")))
    return v.reshape(*batch_shape, K).to(out_dtype)


def _project_simplex(x: Tensor) -> Tensor:
    """Euclidean projection of each row of ``x`` onto the probability simplex (sort-based)."""
    K = x.shape[-1]
    s, _ = torch.sort(x, dim=-1, descending=True)
    css = s.cumsum(-1) - 1.0
    idx = torch.arange(1, K + 1, dtype=x.dtype, device=x.device)
    cond = s - css / idx > 0
    rho = cond.to(x.dtype).cumsum(-1).argmax(-1, keepdim=True)  # last index where cond holds
    theta = css.gather(-1, rho) / (rho + 1).to(x.dtype)
    return (x - theta).clamp_min(0.0)


def kkt_residual(
    gram: Tensor,
    v: Tensor,
    q: Tensor | None = None,
    lower: Tensor | None = None,
    *,
    constraint: str = "simplex",
    norm_coef: Tensor | None = None,
) -> Tensor:
    """Relative KKT residual of ``v`` for the problems of :func:`solve_qp` (float64, per problem).

    The natural (projected-gradient) residual ``||v - Proj(v - grad f(v) / L)||_inf`` with step
    ``1/L``, ``L = max(max_i Gamma_ii, max |q|, r * sqrt(max Gamma_ii))``, divided by
    ``max(1, ||v||_inf)``. It is zero exactly at the optimum and invariant to scaling Gamma and q
    together; infeasible ``v`` is counted through the projection.
    """
    H = gram.to(torch.float64)
    v = v.to(torch.float64)
    Hv = (H @ v.unsqueeze(-1)).squeeze(-1)
    grad = (0.0 if q is None else q.to(torch.float64)) + (Hv if norm_coef is None else 0.0)
    dmax = H.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True)
    L = dmax if norm_coef is None else torch.zeros_like(dmax)
    if q is not None:
        L = torch.maximum(L, q.to(torch.float64).abs().amax(-1, keepdim=True))
    if norm_coef is not None:
        r = norm_coef.to(torch.float64).reshape(*v.shape[:-1], 1)
        s = torch.sqrt((v * Hv).sum(-1, keepdim=True) + _SQRT_EPS * dmax)
        grad = grad + r * Hv / s
        L = torch.maximum(L, r * dmax.sqrt())
    L = torch.where(L > 0, L, torch.ones_like(L))
    step = v - grad / L
    if constraint == "simplex":
        proj = _project_simplex(step)
    else:
        lo = torch.zeros_like(v) if lower is None else lower.to(torch.float64)
        proj = torch.maximum(step, lo)
    scale = v.abs().amax(-1).clamp_min(1.0)
    return (v - proj).abs().amax(-1) / scale
