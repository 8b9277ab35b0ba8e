"""Fixed scalarizations of the task losses: GLS (geometric mean), STCH, COSMOS, PBI.

Each trains on a scalar ``S(L_1, ..., L_K)``; its gradient is ``sum_i dS/dL_i g_i``, so the task
weights are the partial derivatives ``dS/dL_i`` at the current losses, in closed form here (float64)
-- the same update as back-propagating ``S`` (as torchjd's scalarizers do), without the Gram.

* GLS: Chennupati, Sistu, Yogamani & Rawashdeh, "MultiNet++: Multi-Stream Feature Aggregation and
  Geometric Loss Strategy for Multi-Task Learning", CVPR Workshops 2019
  (https://arxiv.org/abs/1904.08492).
* STCH: Lin, Zhang, Chen, Zhang & Zhang, "Smooth Tchebycheff Scalarization for Multi-Objective
  Optimization", ICML 2024 (https://arxiv.org/abs/2402.19078).
* COSMOS: Ruchte & Grabocka, "Scalable Pareto Front Approximation for Deep Multi-Objective
  Learning", ICDM 2021 (https://arxiv.org/abs/2103.13392).
* PBI: Zhang & Li, "MOEA/D: A Multiobjective Evolutionary Algorithm Based on Decomposition", IEEE
  TEVC 2007 (https://doi.org/10.1109/TEVC.2007.892759).
"""

from __future__ import annotations

import torch

from .base import Tensor, VectorOption, Weighting, check_number, out_dtype


class _Scalarization(Weighting):
    needs_losses = True

    def _pref(self, vec: Tensor | None, K: int, device: torch.device) -> Tensor:
        """The preference vector (default uniform ``1/K``) on ``device``."""
        if vec is None:
            return torch.full((K,), 1.0 / K, dtype=torch.float64, device=device)
        return self._option_on("pref_vector", vec, K, device)

    def _shift(self, losses: Tensor, reference: Tensor | None) -> Tensor:
        L = losses.to(torch.float64)
        if reference is None:
            return L
        return L - self._option_on("reference", reference, L.shape[0], L.device)


class GLS(_Scalarization):
    """Geometric loss strategy: ``S = (prod_i L_i)^(1/K)``, weights ``S / (K L_i)``.

    Computed in log space (``exp(mean log L - log L_i) / K``), so products of many small or large
    losses neither underflow nor overflow. The losses must be positive (a zero or negative loss
    gives NaN weights: the optimizers skip the step). LibMTL's ``GLS`` trains on the same ``S``
    (its returned ``batch_weight``, ``L_i / (K prod L)``, is not the gradient weights).
    """

    name = "gls"

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        L = losses.to(torch.float64)
        logs = torch.log(torch.where(L > 0, L, float("nan")))
        w = torch.exp(logs.mean() - logs) / L.shape[0]
        return w.to(out_dtype(gram))


class STCH(_Scalarization):
    """Smooth Tchebycheff: ``S = mu log sum_i exp(lambda_i (L_i - z_i) / mu)``, a smooth
    ``max_i lambda_i (L_i - z_i)``; weights ``lambda_i softmax(lambda (L - z) / mu)_i``.

    ``mu`` > 0 (default 1; the paper evaluates 0.01 ... 1 and smaller is closer to the max),
    ``pref_vector`` the preference ``lambda`` (default ``1/K``; torchjd's ``weights``),
    ``reference`` the ideal point ``z`` (default 0). The softmax is shifted by its maximum, so a
    small ``mu`` never overflows. (LibMTL's ``STCH`` applies the official MTL code's variant:
    ``log(L / nadir)`` after warm-up epochs, times K.)
    """

    name = "stch"
    pref_vector = VectorOption(positive_sum=True)
    reference = VectorOption()

    def __init__(
        self,
        mu: float = 1.0,
        pref_vector: Tensor | None = None,
        reference: Tensor | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.mu = check_number("mu", mu, low=0.0, low_open=True)
        self.pref_vector = pref_vector
        self.reference = reference

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        K = gram.shape[0]
        lam = self._pref(self.pref_vector, K, gram.device)
        y = lam * self._shift(losses, self.reference) / self.mu
        return (lam * torch.softmax(y, dim=0)).to(out_dtype(gram))


class COSMOS(_Scalarization):
    """COSMOS: ``S = r^T L - lambda cos(r, L)``, weights
    ``r_i - lambda (r_i / (|r| |L|) - (r^T L) L_i / (|r| |L|^3))``.

    ``pref_vector`` is the preference ``r`` (default ``1/K``; torchjd's ``weights``; the paper
    samples it from a Dirichlet distribution at every step and also feeds it to the network, both
    the caller's business: assign ``w.pref_vector`` between steps), ``lambda_`` the cosine penalty
    (default 1; the paper uses 0.01 ... 8). At ``L = 0`` the cosine has no gradient and the weights
    are ``r`` (torch's ``cosine_similarity``, used by torchjd, clamps ``|L|`` at 1e-8 instead).
    """

    name = "cosmos"
    pref_vector = VectorOption(positive_sum=True)

    def __init__(
        self, lambda_: float = 1.0, pref_vector: Tensor | None = None, *, backend: str | None = None
    ):
        super().__init__(backend=backend)
        self.lambda_ = check_number("lambda_", lambda_, low=0.0)
        self.pref_vector = pref_vector

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        K = gram.shape[0]
        r = self._pref(self.pref_vector, K, gram.device)
        L = losses.to(torch.float64)
        nr, nl = r.norm(), L.norm()
        safe = torch.where(nl > 0, nl, 1.0)
        dcos = r / (nr * safe) - (r @ L) * L / (nr * safe**3)
        w = r - self.lambda_ * torch.where(nl > 0, dcos, 0.0)
        return w.to(out_dtype(gram))


class PBI(_Scalarization):
    """Penalty-based boundary intersection: with ``f = L - z`` and the unit preference direction
    ``u = w / |w|``, ``d1 = f^T u``, ``d2 = |f - d1 u|`` and ``S = d1 + theta d2``; weights
    ``u + theta p / |p|``, ``p = f - d1 u``.

    ``theta`` >= 0 (the paper's 5), ``pref_vector`` the direction ``w`` (default uniform;
    torchjd's ``weights``), ``reference`` the ideal point ``z`` (default 0). Where ``p = 0`` (the
    losses on the preference ray) ``d2`` is not differentiable and the weights are ``u`` (its
    minimal-norm subgradient); torchjd adds 1e-12 under the square root instead, which agrees
    whenever ``|p|`` is well above 1e-6.
    """

    name = "pbi"
    pref_vector = VectorOption(positive_sum=True)
    reference = VectorOption()

    def __init__(
        self,
        theta: float = 5.0,
        pref_vector: Tensor | None = None,
        reference: Tensor | None = None,
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.theta = check_number("theta", theta, low=0.0)
        self.pref_vector = pref_vector
        self.reference = reference

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert losses is not None  # needs_losses: __call__ checked them
        K = gram.shape[0]
        w = self._pref(self.pref_vector, K, gram.device)
        u = w / w.norm()
        f = self._shift(losses, self.reference)
        p = f - (f @ u) * u
        n = p.norm()
        off_ray = n > 16 * torch.finfo(torch.float64).eps * f.norm()  # above p's rounding
        out = u + self.theta * torch.where(off_ray, p / torch.where(off_ray, n, 1.0), 0.0)
        return out.to(out_dtype(gram))
