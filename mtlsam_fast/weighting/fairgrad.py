"""FairGrad: alpha-fair resource allocation among the task gradients.

Ban, Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024
(https://arxiv.org/abs/2402.15638); official code https://github.com/OptMN-Lab/fairgrad.
"""

from __future__ import annotations

from .base import Tensor, Weighting, check_bool, check_number, out_dtype
from .nashmtl import DEFAULT_MAX_ITER, DEFAULT_REG, check_solver_options, solve_power_equation


class FairGrad(Weighting):
    """FairGrad weights: the solution ``w > 0`` of ``Gamma w = w^(-1/alpha)`` (elementwise).

    With ``d = w^T G`` the task improvements ``<g_i, d>`` equal ``w_i^(-1/alpha)``, the alpha-fair
    allocation (``alpha = 1``: proportional fairness, Nash-MTL's equation; ``alpha -> inf``:
    max-min fairness). The official code runs ``scipy.optimize.least_squares`` on the host; here
    the equation is solved exactly on the device as the minimizer of a strictly convex function,
    damped Newton with a fixed budget (see
    :func:`~mtlsam_fast.weighting.nashmtl.solve_power_equation`).

    ``normalize=True`` (default) solves with ``Gamma / ||Gamma||_F`` so that the weights are scale
    invariant and K = 1 gets weight 1 (the library's convention); that is the paper's solution times
    ``||Gamma||_F^(alpha / (alpha + 1))``, the same direction up to a positive factor.
    ``normalize=False`` returns the paper's ``w`` for the raw Gram (the official code's output).
    """

    name = "fairgrad"

    def __init__(
        self,
        alpha: float = 1.0,
        normalize: bool = True,
        *,
        max_iter: int = DEFAULT_MAX_ITER,
        reg: float = DEFAULT_REG,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.alpha = check_number("alpha", alpha, low=0.0, low_open=True)
        self.normalize = check_bool("normalize", normalize)
        self.max_iter, self.reg = check_solver_options(max_iter, reg)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        w = solve_power_equation(
            gram, self.alpha, normalize=self.normalize, max_iter=self.max_iter, reg=self.reg
        )
        return w.to(out_dtype(gram))
