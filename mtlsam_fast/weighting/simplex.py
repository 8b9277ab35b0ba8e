"""Stochastic multi-objective methods that track their weights on the simplex: SDMGrad and MoDo.

* SDMGrad: Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
  Stochastic Algorithms", NeurIPS 2023 (https://arxiv.org/abs/2305.18409); official code
  https://github.com/OptMN-Lab/SDMGrad.
* MoDo: Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning:
  Optimization, Generalization and Conflict-Avoidance", NeurIPS 2023 / JMLR 2024
  (https://arxiv.org/abs/2305.20057); official code https://github.com/heshandevaka/Trade-Off-MOL.

Both papers estimate the matrix ``J_1 J_2^T`` from two independent mini-batches (double sampling,
for an unbiased stochastic gradient of the weights) and update the shared parameters with a third.
Inside the optimizers there is one batch per step, so the matrix is the Gram ``G G^T`` of that batch
(the single-sample variant). Called directly, both accept any K x K matrix, e.g. ``J_1 J_2^T`` (not
symmetrized). The weights stay on the simplex by the exact, sync-free Euclidean projection
(:func:`mtlsam_fast.ops.qp.project_simplex`).
"""

from __future__ import annotations

import torch

from ..ops.qp import project_simplex
from .base import Tensor, VectorOption, Weighting, check_int, check_number, out_dtype


class _SimplexTracking(Weighting):
    """State: the weights ``w`` on the simplex (``1/K`` at the start), warm-started across calls."""

    STATE = ("simplex_weights",)

    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        return {"simplex_weights": torch.full((K,), 1.0 / K, dtype=torch.float64, device=device)}

    def _commit(self, new: Tensor, gram: Tensor) -> None:
        live = self._ensure_state(gram.shape[0], gram.device)["simplex_weights"]
        live.copy_(torch.where(torch.isfinite(new).all(), new, live))


class SDMGrad(_SimplexTracking):
    """SDMGrad: the direction ``G (w + lambda w~) / (1 + lambda)``, ``w~`` the preference (default
    ``1/K``: the mean gradient), with ``w`` minimizing ``1/2 ||G (w + lambda w~)||^2`` over the
    simplex by ``n_iter`` steps of projected SGD with momentum (``lr``, ``momentum``), warm-started
    from the previous call's ``w``.

    As in the official code (and torchjd, LibMTL), the matrix is first divided by ``s^2 + 1e-8``,
    ``s`` the mean of the square roots of its non-negative diagonal entries (Section 6.1), which
    makes ``lr`` independent of the gradients' scale. Defaults: torchjd's (``lr`` 10, momentum 0.5,
    20 iterations, ``lambda_`` 0.3, the value of the paper's experiments); LibMTL uses ``lr`` 5.
    """

    name = "sdmgrad"
    pref_vector = VectorOption(positive_sum=True)

    def __init__(
        self,
        lambda_: float = 0.3,
        lr: float = 10.0,
        momentum: float = 0.5,
        n_iter: int = 20,
        pref_vector: Tensor | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.lambda_ = check_number("lambda_", lambda_, low=0.0)
        self.lr = check_number("lr", lr, low=0.0, low_open=True)
        self.momentum = check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.n_iter = check_int("n_iter", n_iter)
        self.pref_vector = pref_vector

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        w = self._ensure_state(K, dev)["simplex_weights"]
        w_pref = (
            torch.full((K,), 1.0 / K, dtype=torch.float64, device=dev)
            if self.pref_vector is None
            else self._option_on("pref_vector", self.pref_vector, K, dev)
        )
        A = gram.to(torch.float64)
        scale = A.diagonal().clamp(min=0).sqrt().mean()
        A = A / (scale * scale + 1e-8)
        velocity = torch.zeros_like(w)
        for _ in range(self.n_iter):
            velocity = self.momentum * velocity + A @ (w + self.lambda_ * w_pref)
            w = project_simplex(w - self.lr * velocity)
        self._commit(w, gram)
        return ((w + self.lambda_ * w_pref) / (1 + self.lambda_)).to(out_dtype(gram))


class MoDo(_SimplexTracking):
    """MoDo: weights ``w <- Proj_simplex(w - gamma (A w + rho w))``, one step per call from the
    previous call's ``w`` (``1/K`` at the start), returned as the task weights.

    ``gamma`` is the weights' step size and ``rho`` their L2 regularization; defaults: torchjd's
    (0.1, 0.1); LibMTL uses ``gamma`` 0.001.
    """

    name = "modo"

    def __init__(self, gamma: float = 0.1, rho: float = 0.1, *, backend: str | None = None):
        super().__init__(backend=backend)
        self.gamma = check_number("gamma", gamma, low=0.0, low_open=True)
        self.rho = check_number("rho", rho, low=0.0)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        w = self._ensure_state(gram.shape[0], gram.device)["simplex_weights"]
        A = gram.to(torch.float64)
        new = project_simplex(w - self.gamma * (A @ w + self.rho * w))
        self._commit(new, gram)
        return new.to(out_dtype(gram))
