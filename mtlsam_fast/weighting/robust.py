"""Byzantine-robust aggregation: Krum and the coordinate-wise trimmed mean.

* Krum: Blanchard, El Mhamdi, Guerraoui & Stainer, "Machine Learning with Adversaries: Byzantine
  Tolerant Gradient Descent", NeurIPS 2017
  (https://papers.nips.cc/paper/2017/hash/f4b9ec30ad9f68f89b29639786cb62ef-Abstract.html).
* Trimmed mean: Yin, Chen, Ramchandran & Bartlett, "Byzantine-Robust Distributed Learning:
  Towards Optimal Statistical Rates", ICML 2018 (https://arxiv.org/abs/1803.01498).

Both treat the K task gradients as K votes of which up to ``f`` may be adversarial.
"""

from __future__ import annotations

import torch

from .base import Inputs, Tensor, Weighting, check_choice, check_int, out_dtype

DISTANCES = ("squared", "euclidean")
#: columns sorted at once by the trimmed mean (bounds its K x chunk temporary)
TRIM_CHUNK = 1 << 18


class Krum(Weighting):
    """(Multi-)Krum: the ``n_selected`` gradients with the lowest scores, weight ``1/n_selected``
    each; the score of ``g_i`` is the sum of its distances to its ``K - n_byzantine - 2`` nearest
    other gradients.

    Distances come from the Gram: ``||g_i - g_j||^2 = Gamma_ii + Gamma_jj - 2 Gamma_ij``. The paper
    sums squared distances (``distance="squared"``, default); torchjd sums their square roots
    (``"euclidean"``, which reproduces it). Ties go to the lower task index. Needs ``K >=
    n_byzantine + 3`` (and ``>= n_selected``), checked when an optimizer is built.
    """

    name = "krum"

    def __init__(
        self,
        n_byzantine: int = 0,
        n_selected: int = 1,
        distance: str = "squared",
        *,
        backend: str | None = None,
    ):
        super().__init__(backend=backend)
        self.n_byzantine = check_int("n_byzantine", n_byzantine, low=0)
        self.n_selected = check_int("n_selected", n_selected)
        self.distance = check_choice("distance", distance, DISTANCES)

    def check_num_tasks(self, K: int) -> None:
        need = max(self.n_byzantine + 3, self.n_selected)
        if need > K:
            raise ValueError(
                f"Krum with n_byzantine={self.n_byzantine}, n_selected={self.n_selected} needs "
                f"at least {need} tasks, got K={K}"
            )

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        g = gram.to(torch.float64)
        sq = g.diagonal()
        dist = (sq[:, None] + sq[None, :] - 2 * g).clamp(min=0)
        if self.distance == "euclidean":
            dist = dist.sqrt()
        eye = torch.eye(K, dtype=torch.bool, device=gram.device)
        dist = torch.where(eye, float("inf"), dist)  # a gradient is not its own neighbour
        nearest = torch.sort(dist, dim=1).values[:, : K - self.n_byzantine - 2]
        scores = nearest.sum(dim=1)
        chosen = torch.argsort(scores, stable=True)[: self.n_selected]
        w = torch.zeros(K, dtype=torch.float64, device=gram.device)
        w = w.index_fill(0, chosen, 1.0 / self.n_selected)
        return w.to(out_dtype(gram))


class TrimmedMean(Weighting):
    """Coordinate-wise trimmed mean: per coordinate, the mean of the task gradients after removing
    the ``trim_number`` largest and ``trim_number`` smallest values (a direction: the kept tasks
    differ per coordinate, ``returns_direction``). ``trim_number = 0`` is the mean. Needs
    ``K >= 2 trim_number + 1``. Sorted in chunks of columns (one ``K x 2^18`` temporary).
    """

    name = "trimmedmean"
    needs_grads = True
    returns_direction = True

    def __init__(self, trim_number: int = 0, *, backend: str | None = None):
        super().__init__(backend=backend)
        self.trim_number = check_int("trim_number", trim_number, low=0)

    def check_num_tasks(self, K: int) -> None:
        if 2 * self.trim_number + 1 > K:
            raise ValueError(
                f"TrimmedMean with trim_number={self.trim_number} needs at least "
                f"{2 * self.trim_number + 1} tasks, got K={K}"
            )

    def compute(self, x: Inputs) -> Tensor:
        G = x.grads
        assert G is not None  # needs_grads: __call__ checked it
        K, P = G.shape
        t = self.trim_number
        acc = torch.float64 if G.dtype == torch.float64 else torch.float32
        out = torch.empty(P, dtype=acc, device=G.device)
        for start in range(0, P, TRIM_CHUNK):
            block = G[:, start : start + TRIM_CHUNK].to(acc)
            kept = torch.sort(block, dim=0).values[t : K - t]
            out[start : start + TRIM_CHUNK] = kept.mean(dim=0)
        return out
