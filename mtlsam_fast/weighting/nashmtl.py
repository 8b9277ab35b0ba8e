"""Nash-MTL: the Nash bargaining solution of the task gradients; also FairGrad's solver.

Navon, Shamsian, Achituve, Maron, Kawaguchi, Chechik, Fetaya, "Multi-Task Learning as a Bargaining
Game", ICML 2022 (https://arxiv.org/abs/2202.01017); official code https://github.com/AvivNavon/nash-mtl.

:func:`solve_power_equation` solves ``Gamma w = w^(-1/alpha)`` (``w > 0``), which is Nash-MTL for
``alpha = 1`` and FairGrad (:mod:`.fairgrad`) in general. It is the stationarity condition of the
strictly convex function

    f(w) = 1/2 w^T Gamma w - sum_i phi(w_i),   phi(w) = log w (alpha = 1),
                                                         phi(w) = w^p / p, p = 1 - 1/alpha (else),

so its root is the unique minimizer of ``f``. We minimize ``f`` in float64 with a fixed iteration
budget and no host sync, after two exact rescalings: the Gram is divided by its Frobenius norm (as
the official Nash-MTL code does), and the unknowns are Jacobi scaled, ``w = v / sqrt(Gamma_ii)``
(the problem in ``v`` has the cosine matrix, unit diagonal, so gradient norms spanning 1e-8..1 do
not hurt conditioning). Damped Newton: the Newton system (Jacobi-scaled Hessian, positive definite)
is solved by ``solve_ex``; the step is the largest of ``t_max * (1, 1/2, ..., 2^-15)`` meeting the
Armijo condition, where ``t_max`` is ``min(1, 0.99 x`` the step to the boundary ``v = 0)`` (all
candidates are evaluated in one batch and picked by a mask; 0 when none qualifies), and every
iterate is rescaled by the exactly optimal factor along its ray.

Singular ``Gamma``: ``eps = 1e-12 + K u`` relative Tikhonov regularization (``eps Gamma_ii``
added to the diagonal, ``u`` the unit roundoff of the Gram's dtype, which bounds the negative
eigenvalues its rounding can create: a float32 Gram of dependent gradients is indefinite by about
``K u``; a zero gradient borrows the mean diagonal) keeps ``f`` coercive and bounded below when
``Gamma`` is singular
along a non-negative direction (a zero gradient, or ``g_1 = -g_2``): the equation then has no
solution and the weights of those tasks grow to about ``eps^(-alpha / (alpha + 1))`` (1e6 for
Nash-MTL) instead of infinity -- finite, and for a zero gradient irrelevant to the direction. On
regular Grams the regularization moves the solution by a backward error of about ``eps / 2``. An
all-zero Gram is treated as the identity (weights 1).
"""

from __future__ import annotations

import torch

from .base import Tensor, Weighting, check_bool, check_int, check_number, out_dtype

DEFAULT_MAX_ITER = 40
DEFAULT_REG = 1e-12
_N_STEPS = 16
_ARMIJO = 1e-4


def check_solver_options(max_iter: int, reg: float) -> tuple[int, float]:
    """The Newton budget (an int >= 1) and the relative regularization (finite, > 0)."""
    return check_int("max_iter", max_iter), check_number("reg", reg, low=0.0, low_open=True)


def solve_power_equation(
    gram: Tensor,
    alpha: float = 1.0,
    *,
    normalize: bool = True,
    max_iter: int = DEFAULT_MAX_ITER,
    reg: float = DEFAULT_REG,
) -> Tensor:
    """``w > 0`` with ``Gamma w = w^(-1/alpha)`` (float64, on ``gram.device``); see the module
    docstring.

    ``normalize=True`` solves with ``Gamma / ||Gamma||_F``; the paper's solution for ``Gamma``
    itself is the same vector times ``||Gamma||_F^(-alpha / (alpha + 1))`` (``normalize=False``
    returns it).
    """
    K = gram.shape[0]
    dev = gram.device
    g = gram.to(torch.float64)
    g = 0.5 * (g + g.T)  # a low-precision Gram may be asymmetric in the last bit
    eye = torch.eye(K, dtype=torch.float64, device=dev)
    fro = torch.linalg.matrix_norm(g)
    nonzero = fro > 0
    fro1 = torch.where(nonzero, fro, torch.ones_like(fro))
    gn = torch.where(nonzero, g / fro1, eye)  # an all-zero Gram is treated as the identity
    # Jacobi scaling w = d * v with d_i = Gamma_ii^(-1/2): Gamma w = w^(-1/alpha) becomes
    # C v = c * v^(-1/alpha), C = D Gamma D (unit diagonal), c = d^(1 - 1/alpha).
    dg = gn.diagonal()
    pos = dg > 0
    fill = torch.where(pos, dg, torch.zeros_like(dg)).sum() / pos.sum().clamp(min=1)
    d = torch.where(pos, dg, fill).rsqrt()  # a zero gradient borrows the mean scale
    A = d[:, None] * gn * d[None, :] + (reg + K * torch.finfo(gram.dtype).eps / 2) * eye
    log_case = alpha == 1.0
    p = 1.0 - 1.0 / alpha
    expo = alpha / (alpha + 1.0)
    c = d.pow(p)

    def phi_sum(W: Tensor) -> Tensor:
        return (c * W.log()).sum(-1) if log_case else (c * W.pow(p) / p).sum(-1)

    def objective(W: Tensor) -> Tensor:  # W: [..., K]
        return 0.5 * ((W @ A) * W).sum(-1) - phi_sum(W)

    def rescale(v: Tensor) -> Tensor:
        # f(t v) = t^2 q / 2 - (log t sum c  or  t^p S / p) is minimized at
        # t = (S / q)^(1 / (2 - p))
        q = (v @ A @ v).clamp(min=1e-300)
        S = c.sum() if log_case else (c * v.pow(p)).sum()
        return v * (S / q).pow(1.0 / (2.0 - p))

    steps = 2.0 ** -torch.arange(_N_STEPS, dtype=torch.float64, device=dev)
    v = rescale(c.pow(expo))  # the exact solution for orthogonal gradients
    for _ in range(max_iter):
        grad = A @ v - c * v.pow(-1.0 / alpha)
        H = A + torch.diag(c * v.pow(-1.0 / alpha - 1.0) / alpha)
        s = H.diagonal().rsqrt()
        # LU (solve_ex) rather than cholesky_ex: MKL's single-matrix Cholesky is pathologically
        # slow on some multi-threaded CPUs (~20 ms for 8 x 8); both are sync-free
        sol, _ = torch.linalg.solve_ex(s[:, None] * H * s[None, :], (s * grad)[:, None])
        delta = -s * sol[:, 0]
        # fraction-to-boundary: the longest step keeping v > 0, shrunk by 0.99, capped at 1
        ratio = torch.where(
            delta < 0,
            -v / torch.where(delta < 0, delta, -torch.ones_like(delta)),
            torch.full_like(v, float("inf")),
        )
        t_max = (0.99 * ratio.amin()).clamp(max=1.0)
        ts = t_max * steps
        V = v[None, :] + ts[:, None] * delta[None, :]
        admissible = (V > 0).all(dim=1)
        F = objective(torch.where(V > 0, V, torch.ones_like(V)))
        f0 = objective(v)
        ok = admissible & (f0 + _ARMIJO * ts * (grad * delta).sum() + 1e-13 * f0.abs() >= F)
        first = torch.argmax(ok.to(torch.int8))  # the largest admissible step (index 0 if none)
        t = torch.where(ok.any(), ts.gather(0, first.reshape(1))[0], torch.zeros_like(ts[0]))
        v = rescale(v + t * delta)
    w = d * v
    if not normalize:
        w = w * fro1.pow(-expo)
    return w


class NashMTL(Weighting):
    """Nash-MTL weights: the solution ``alpha > 0`` of ``Gamma alpha = 1 / alpha``.

    This is the paper's characterization of the Nash bargaining solution.

    The update ``d = alpha^T G`` is the Nash bargaining solution: ``<g_i, d> = 1 / alpha_i`` for
    every task. Solved exactly on the device (see :func:`solve_power_equation`) rather than by the
    official code's 20 sequential convex (CVXPY) steps with a 1e-3 stopping rule.

    ``normalize=True`` (default) solves with ``Gamma / ||Gamma||_F``: the official code normalizes
    the Gram by its Frobenius norm before solving, the weights become scale invariant and K = 1
    gets weight 1. This is the paper's solution times ``||Gamma||_F^(1/2)``, the same direction up
    to a positive factor (the official training loop clips the update norm anyway).
    ``normalize=False`` returns the paper's ``alpha`` for the raw Gram. ``max_iter`` Newton steps
    (default 40), ``reg`` the relative regularization for singular Grams (default 1e-12).
    """

    name = "nashmtl"

    def __init__(
        self,
        normalize: bool = True,
        *,
        max_iter: int = DEFAULT_MAX_ITER,
        reg: float = DEFAULT_REG,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.normalize = check_bool("normalize", normalize)
        self.max_iter, self.reg = check_solver_options(max_iter, reg)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        w = solve_power_equation(
            gram, 1.0, normalize=self.normalize, max_iter=self.max_iter, reg=self.reg
        )
        return w.to(out_dtype(gram))
