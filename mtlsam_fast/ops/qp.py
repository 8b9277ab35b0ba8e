"""The batched small QP shared by MGDA, UPGrad, DualProj and CAGrad (torch reference solver).

Each problem ``b`` of a batch is

    minimize   1/2 v^T Gamma v + q^T v        (or, with norm_coef r:  q^T v + r sqrt(v^T Gamma v))
    subject to v in the simplex  (v >= 0, sum v = 1)        -- constraint="simplex"
           or  v >= lower                                   -- constraint="lower"

with ``Gamma`` a K x K Gram matrix (PSD, possibly rank-deficient or badly scaled). The optional
norm objective (``norm_coef`` = r >= 0, simplex only) is CAGrad's inner problem (Liu et al., 2021);
it is non-smooth where ``Gamma v = 0`` (e.g. two opposite gradients), and that point can be the
optimum, so it is solved by its own method (:func:`_barrier_norm`: the second-order-cone barrier,
eliminated in closed form, path-following with a fixed-grid line search), not by smoothing.

Algorithm: a primal-dual interior-point method with Mehrotra's predictor-corrector (Mehrotra
1992; Nocedal & Wright, *Numerical Optimization*, 16.6) on the Jacobi-scaled problem
``u = v * sqrt(diag Gamma)``, so that scaling a task's gradient by 1e-6 or 1e6 does not change the
conditioning the solver sees. The Newton matrix ``Gamma + diag(z/x)`` is positive definite in the
interior, so singular Gram matrices (identical or zero gradients) need no special case. It runs in
float64 with batched Cholesky factorizations (``cholesky_ex``: no error check, no host sync) for a
fixed iteration budget; problems that have converged are frozen by a mask. On CPU tensors the loop
also exits early once every problem has converged (reading a CPU tensor does not synchronize a
device); under ``torch.compile`` or on accelerators it always runs the full budget.

The norm variant runs a different, equally batched and sync-free method (:func:`_barrier_norm`).
A problem whose factorization fails (precision exhausted) is frozen at its last iterate.

Non-finite input propagates: such a problem returns NaN weights (the optimizers' found-inf flag).

This module is the oracle. The C++/CUDA backends (``csrc/qp_core.h``) solve the same Jacobi-scaled
problem with an exact primal active-set method first and a port of this interior point as its
fallback; the Triton kernel ports this interior point.
"""

from __future__ import annotations

import torch

Tensor = torch.Tensor

DEFAULT_MAX_ITER = 60
DEFAULT_TOL = 1e-9
_FRACTION_TO_BOUNDARY = 0.995
_SQRT_EPS = 1e-16  # smooths sqrt(v^T Gamma v) at 0 in kkt_residual (relative to max Gamma_ii)
_MU_SHRINK = 100.0  # barrier parameter reduction of the norm variant once centred
_CENTRED = 2.0  # Newton decrement below which the norm variant counts as centred (with line search)
_W2_ERR = 2.0**-52  # relative rounding of x^T H x, per term
_LS_STEPS = 8  # line-search grid of the norm variant: alpha_max * 2^-j, j < _LS_STEPS


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

    ``gram``: [..., K, K]; ``q``, ``lower``: [..., K] or None (zeros); ``norm_coef``: [...] (or one
    value for the whole batch) or None; a negative or non-finite ``norm_coef`` gives NaN weights.
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
    q_ref = q0.abs().amax(-1, keepdim=True)  # a zero Gram leaves the linear term to set the scale
    ref = torch.where(ref > 0, ref, torch.where(q_ref > 0, q_ref, torch.ones_like(ref)))
    diag_rel = diag / ref
    d = torch.where(diag_rel > 1e-300, diag_rel, torch.ones_like(diag_rel)).rsqrt()  # [B, K]
    H = H0 / ref.unsqueeze(-1) * d[:, :, None] * d[:, None, :]
    c = q0 / ref * d
    if simplex:
        lo = lo_v = torch.zeros_like(c)
        a = d / d.amax(-1, keepdim=True)  # scaled equality a^T u = beta
        beta = 1.0 / d.amax(-1)
    else:
        lo_v = torch.zeros_like(c) if lower is None else lower.to(dt).reshape(B, K)
        lo = lo_v / d
        c = c + (H @ lo.unsqueeze(-1)).squeeze(-1)  # shift u = x + lo, x >= 0
    r = None
    if norm_coef is not None:
        coef = norm_coefficients(norm_coef, batch_shape, constraint, H0.device)
        r = coef.to(dt).reshape(B, 1) / ref.sqrt()  # r sqrt(v'Gv) = ref (r/sqrt(ref)) sqrt(u'Hu)
        finite = (
            finite & torch.isfinite(r).squeeze(-1) & (r >= 0).squeeze(-1)
        )  # negative r: not convex -> NaN

    eye = torch.eye(K, dtype=dt, device=H.device)
    check_early = H.device.type == "cpu" and not torch.compiler.is_compiling()
    if r is not None:
        x = torch.ones(B, K, dtype=dt, device=H.device) * (beta / a.sum(-1))[:, None]
        x = _barrier_norm(H, c, r, a, beta, x, eye, max_iter, tol, check_early)
        return _finish(x, lo, lo_v, d, simplex, finite, batch_shape, K, out_dtype)
    # The interior point is invariant to the scaling u = v / d given the image of its start, so the
    # start and the stopping rule are set in the units of v (the problem over Gamma / ref): the
    # centre v = 1/K of the simplex with z = 1 in v-units (z_u = d z_v), i.e. the same x_i z_i = 1/K
    # for every variable ("lower": x = z = 1). Starting at v proportional to d instead leaves the
    # variables of tiny Gamma_ii many orders of magnitude from a linear term's optimum:
    # the iteration cycles there and stops far from the optimum (docs/ARCHITECTURE.md §4).
    x = beta[:, None] / (K * a) if simplex else torch.ones(B, K, dtype=dt, device=H.device)
    z = d.clone() if simplex else torch.ones_like(x)
    y = torch.zeros(B, 1, dtype=dt, device=H.device)
    done = torch.zeros(B, 1, dtype=torch.bool, device=H.device)

    for it in range(max_iter):
        Hx = (H @ x.unsqueeze(-1)).squeeze(-1)
        g, hess = Hx + c, H
        r_d = g - z - (a * y if simplex else 0.0)
        r_p = (beta - (a * x).sum(-1)).unsqueeze(-1) if simplex else None
        mu = (x * z).mean(-1, keepdim=True)
        # converged when the residuals are small against the problem's own magnitude, in v-units:
        # the gradient's terms |g_i| + |c_i| and the multiplier y of sum v = 1 (2 f* for a min-norm
        # problem, however tiny the Gram matrix); the duality gap K mu is then below tol^2 K scale
        scale = ((g.abs() + c.abs()) / d).amax(-1, keepdim=True)
        if simplex:
            scale = torch.maximum(scale, y.abs() * beta.unsqueeze(-1))  # y_v = y_u / max d
        scale = scale.clamp_min(1e-300)
        conv = ((r_d / d).abs().amax(-1, keepdim=True) <= tol * scale) & (mu <= tol * tol * scale)
        if simplex:
            assert r_p is not None  # computed above when simplex
            conv &= r_p.abs() <= tol * beta.unsqueeze(-1)
        done = done | conv
        if check_early and it % 4 == 3 and bool(done.all()):
            break
        M = hess + torch.diag_embed(z / x) + eye * 1e-14
        L, info = torch.linalg.cholesky_ex(M)

        # newton reads the current iteration's loop variables: it only runs below, within the
        # iteration that defines it
        def newton(rc: Tensor) -> tuple[Tensor, Tensor, Tensor]:
            rhs = -r_d + rc / x  # noqa: B023 - runs in this iteration
            if simplex:
                assert r_p is not None  # noqa: B023 - runs in this iteration; set when simplex
                sol = torch.cholesky_solve(torch.stack([rhs, a], -1), L)  # noqa: B023 - runs in this iteration
                p, m = sol[..., 0], sol[..., 1]
                dy = (r_p - (a * p).sum(-1, keepdim=True)) / (a * m).sum(-1, keepdim=True)  # noqa: B023 - runs in this iteration
                dx = p + m * dy
            else:
                dx = torch.cholesky_solve(rhs.unsqueeze(-1), L).squeeze(-1)  # noqa: B023 - runs in this iteration
                dy = torch.zeros_like(y)  # noqa: B023 - runs in this iteration
            dz = (rc - z * dx) / x  # noqa: B023 - runs in this iteration
            return dx, dy, dz

        dx_a, _, dz_a = newton(-x * z)
        alpha_a = torch.minimum(_max_step(x, dx_a), _max_step(z, dz_a))
        mu_aff = ((x + alpha_a * dx_a) * (z + alpha_a * dz_a)).mean(-1, keepdim=True)
        sigma = (mu_aff / mu.clamp_min(1e-300)).clamp(0.0, 1.0) ** 3
        dx, dy, dz = newton(-x * z - dx_a * dz_a + sigma * mu)
        alpha = torch.minimum(_max_step(x, dx), _max_step(z, dz))
        # past what fp64 resolves (a tol tighter than reachable), the factorization can fail or the
        # step turn non-finite: freeze such a problem at its last iterate instead of spoiling it
        ok = (
            (info == 0).unsqueeze(-1)
            & torch.isfinite(dx).all(-1, keepdim=True)
            & torch.isfinite(dz).all(-1, keepdim=True)
        )
        done = done | ~ok
        keep = done
        x = torch.where(keep, x, x + alpha * dx)
        y = torch.where(keep, y, y + alpha * dy)
        z = torch.where(keep, z, z + alpha * dz)

    if not simplex:
        # a variable with a zero row in Gamma (a zero gradient) and cost >= 0 is optimal at its
        # bound (with cost 0: anywhere above it; the bound is the defined, minimal answer)
        x = torch.where((diag_rel <= 1e-300) & (c >= 0), torch.zeros_like(x), x)
    return _finish(x, lo, lo_v, d, simplex, finite, batch_shape, K, out_dtype)


def norm_coefficients(
    norm_coef: Tensor | float, batch_shape: torch.Size, constraint: str, device: torch.device
) -> Tensor:
    """``norm_coef`` as one coefficient per problem, shaped ``batch_shape`` (a view when expanded
    from one value); ``ValueError`` unless the constraint is the simplex and it holds 1 or one per
    problem."""
    if constraint != "simplex":
        raise ValueError("norm_coef is only supported with constraint='simplex'")
    coef = torch.as_tensor(norm_coef, device=device)
    B = batch_shape.numel()
    if coef.numel() not in (1, B):
        raise ValueError(
            f"norm_coef must hold one coefficient per problem ({B}), got shape {tuple(coef.shape)}"
        )
    return coef.reshape(-1).expand(B).reshape(batch_shape)


def _finish(
    x: Tensor,
    lo: Tensor,
    lo_v: Tensor,
    d: Tensor,
    simplex: bool,
    finite: Tensor,
    batch_shape: torch.Size,
    K: int,
    out_dtype: torch.dtype,
) -> Tensor:
    """Undo the scaling, snap onto the feasible set, NaN for non-finite problems."""
    v = (x + lo) * d
    if simplex:
        v = v.clamp_min(0.0)
        v = v / v.sum(-1, keepdim=True)
    else:
        v = torch.maximum(v, lo_v)  # the bound itself, not lo / d * d (one rounding below it)
    v = torch.where(finite[:, None], v, torch.full_like(v, float("nan")))
    return v.reshape(*batch_shape, K).to(out_dtype)


def _barrier_value(
    H: Tensor, c: Tensor, r: Tensor, r_safe: Tensor, mu: Tensor, x: Tensor, w2_err: Tensor
) -> Tensor:
    """``Phi_mu`` of :func:`_barrier_norm` at candidates ``x`` [B, J, K] (up to a constant in x)."""
    Hx = x @ H  # H symmetric
    w2 = (x * Hx).sum(-1).clamp_min(0.0) + w2_err
    rho = mu / r_safe
    t = rho + torch.sqrt(rho * rho + w2)
    norm_term = torch.where(r > 0, r * t - mu * torch.log(t), torch.zeros_like(t))
    return (c.unsqueeze(1) * x).sum(-1) + norm_term - mu * torch.log(x).sum(-1)


def _barrier_norm(
    H: Tensor,
    c: Tensor,
    r: Tensor,
    a: Tensor,
    beta: Tensor,
    x: Tensor,
    eye: Tensor,
    max_iter: int,
    tol: float,
    check_early: bool,
) -> Tensor:
    """``min c^T x + r sqrt(x^T H x)`` s.t. ``x >= 0, a^T x = beta``: path-following barrier method.

    The norm is the epigraph ``r t`` with ``t >= ||G x||``, a second-order cone, whose barrier
    ``-log(t^2 - w^2)`` (``w^2 = x^T H x``) is minimized over ``t`` in closed form: with
    ``rho = mu / r``, ``t = rho + sqrt(rho^2 + w^2)``. The reduced barrier function

        Phi_mu(x) = c^T x + r t(x) - mu log(t(x)^2 - w^2) - mu sum_i log x_i

    is smooth everywhere, also where ``G x = 0`` (the non-smooth point of the norm, reached e.g. by
    two opposite gradients): its smoothing width ``rho`` shrinks with ``mu``, the barrier's own
    scale, so Newton's model stays valid instead of overshooting the kink (the failure of a fixed
    1e-16 smoothing). ``Phi_mu / mu`` is self-concordant (partial minimization keeps it), so the
    damped Newton step ``1 / (1 + lambda)`` (``lambda`` the Newton decrement) is feasible and
    decreases ``Phi_mu``; each iteration takes the best of it and ``alpha_max * 2^-j``
    (``j < _LS_STEPS``), evaluated together (a fixed grid: no host sync, no data-dependent loop).
    Once ``lambda <= _CENTRED``, ``mu`` shrinks by ``_MU_SHRINK``; a problem freezes when ``mu``
    reaches ``tol^2`` relative (objective gap ``<= (K + 2) mu``) or when its factorization fails
    (fp64 exhausted next to a kink); the iterate is always strictly feasible. About 20-40
    iterations for K <= 64. Precision: smooth optima to ~1e-15 in the objective; an optimum on the
    kink to ~sqrt(eps) ~ 1e-8 relative, the resolution of ``||G v||`` computed through ``Gamma``
    (``w^2`` carries its rounding bound ``w2_err``, which keeps the Hessian PSD down there).
    """
    B, K = x.shape
    r = r.clamp_min(0.0)
    r_safe = torch.where(r > 0, r, torch.ones_like(r))
    obj_scale = 1.0 + c.abs().amax(-1, keepdim=True) + r
    mu = obj_scale * x.mean(-1, keepdim=True)
    mu_final = tol * tol * obj_scale * x.mean(-1, keepdim=True)
    done = torch.zeros(B, 1, dtype=torch.bool, device=x.device)
    grid = torch.pow(0.5, torch.arange(_LS_STEPS, dtype=x.dtype, device=x.device))
    absH = H.abs()
    for it in range(max_iter):
        Hx = (H @ x.unsqueeze(-1)).squeeze(-1)
        # w^2 plus a bound on its rounding error: next to the kink, x^T H x cancels down to the
        # error of H x, and an underestimated w^2 would make the Hessian below indefinite
        w2_err = _W2_ERR * K * (x * (absH @ x.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True)
        w2 = (x * Hx).sum(-1, keepdim=True).clamp_min(0.0) + w2_err
        rho = mu / r_safe
        h = torch.sqrt(rho * rho + w2)
        t = rho + h
        grad = c + r * Hx / t - mu / x
        hess = r.unsqueeze(-1) * (
            H / t.unsqueeze(-1) - Hx.unsqueeze(-1) * Hx.unsqueeze(-2) / (t * t * h).unsqueeze(-1)
        )
        r_p = beta.unsqueeze(-1) - (a * x).sum(-1, keepdim=True)
        # a a^T gamma is added (and gamma a r_p to the right side): it leaves the constrained step
        # unchanged but keeps M well conditioned when the curvature along a is only the barrier's.
        M = hess + torch.diag_embed(mu / (x * x))
        gamma = M.diagonal(dim1=-2, dim2=-1).amax(-1, keepdim=True).unsqueeze(-1)
        M = M + gamma * a.unsqueeze(-1) * a.unsqueeze(-2)
        L, info = torch.linalg.cholesky_ex(M)
        rhs = -grad + gamma.squeeze(-1) * a * r_p
        sol = torch.cholesky_solve(torch.stack([rhs, a], -1), L)
        p, m = sol[..., 0], sol[..., 1]
        dy = (r_p - (a * p).sum(-1, keepdim=True)) / (a * m).sum(-1, keepdim=True)
        dx = p + m * dy
        lam = torch.sqrt(
            (
                (dx * (hess @ dx.unsqueeze(-1)).squeeze(-1)).sum(-1, keepdim=True)
                + (mu * (dx / x) ** 2).sum(-1, keepdim=True)
            ).clamp_min(0.0)
            / mu
        )
        # line search over a fixed grid of steps (no host sync): the largest decrease of Phi_mu
        # among alpha_max * 2^-j and the damped step 1 / (1 + lambda), which always decreases it
        a_max = _max_step(x, dx)
        damped = torch.minimum(1.0 / (1.0 + lam), a_max)
        steps = torch.cat([a_max * grid, damped], -1)  # [B, J + 1]
        cand = x.unsqueeze(1) + steps.unsqueeze(-1) * dx.unsqueeze(1)  # [B, J + 1, K]
        phi = _barrier_value(H, c, r, r_safe, mu, cand, w2_err)
        phi = torch.where(torch.isfinite(phi), phi, torch.full_like(phi, float("inf")))
        alpha = steps.gather(-1, phi.argmin(-1, keepdim=True))
        # a failed factorization (mu so small that the barrier's curvature is lost against the
        # norm's in fp64) freezes the problem at its last, feasible iterate
        ok = (
            (info == 0).unsqueeze(-1)
            & torch.isfinite(dx).all(-1, keepdim=True)
            & torch.isfinite(lam)
        )
        done = done | ~ok
        x = torch.where(done, x, x + alpha * dx)
        centred = lam <= _CENTRED
        done = done | (centred & (mu <= mu_final))
        mu = torch.where(centred & ~done, torch.maximum(mu / _MU_SHRINK, mu_final), mu)
        if check_early and it % 4 == 3 and bool(done.all()):
            break
    return x


def project_simplex(x: Tensor) -> Tensor:
    """Euclidean projection of each row of ``x`` onto the probability simplex.

    The sort-based algorithm of Held, Wolfe & Crowder (1974) (see Duchi et al., ICML 2008): no
    data-dependent loop, so it runs on the device without a host sync."""
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
    together; infeasible ``v`` is counted through the projection. With ``norm_coef`` it uses the
    (smoothed) gradient, so it measures optimality only where ``Gamma v != 0``; at an optimum on
    the non-smooth point ``Gamma v = 0`` compare objective values instead.
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
        proj = project_simplex(step)
    else:
        lo = torch.zeros_like(v) if lower is None else lower.to(torch.float64)
        proj = torch.maximum(step, lo)
    scale = v.abs().amax(-1).clamp_min(1.0)
    return (v - proj).abs().amax(-1) / scale
