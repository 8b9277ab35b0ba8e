"""PCGrad: project each task gradient off the gradients it conflicts with.

Yu, Kumar, Gupta, Levine, Hausman, Finn, "Gradient Surgery for Multi-Task Learning", NeurIPS 2020
(https://arxiv.org/abs/2001.06782); official code https://github.com/tianheyu927/PCGrad.
"""

from __future__ import annotations

import torch

from .base import Tensor, check_choice, out_dtype
from .rlw import RandomWeighting

REDUCTIONS = ("sum", "mean")


class PCGrad(RandomWeighting):
    """PCGrad on the Gram matrix: ``weights = 1^T C`` with ``g_i^PC = sum_k C[i, k] g_k``.

    The paper's Algorithm 1: for every task ``i``, starting from ``g_i^PC = g_i``, visit the other
    tasks ``j != i`` in a uniformly random order and, if ``<g_i^PC, g_j> < 0``, set
    ``g_i^PC <- g_i^PC - <g_i^PC, g_j> / ||g_j||^2 g_j`` (projections onto the *original* ``g_j``).
    Every projected gradient stays a combination of the original rows, so only the coefficient
    matrix ``C`` (``C = I`` at the start) is tracked: ``<g_i^PC, g_j> = (C Gamma)[i, j]`` and a
    projection subtracts ``<g_i^PC, g_j> / Gamma_jj`` from ``C[i, j]``. All K rows advance together
    (K - 1 sequential steps, each a batched update; conflicts are masks, not branches). A task with
    a zero gradient (``Gamma_jj = 0``) projects nothing.

    ``reduction``: ``"sum"`` (default; the official code and LibMTL sum the projected gradients)
    or ``"mean"`` (the widely used PyTorch port, ``1/K`` times the sum). Random orders come from a
    seeded device-side Philox stream (:class:`~mtlsam_fast.weighting.rlw.PhiloxStream`), one
    independent order per task per call, as in the paper (the official TF code intends a single
    shuffle; LibMTL shuffles per task). Both codes also visit ``j = i``, which only matters once
    earlier projections made ``<g_i^PC, g_i> < 0``; we follow the paper (``j != i``).
    """

    name = "pcgrad"

    def __init__(self, reduction: str = "sum", seed: int = 0, *, backend: str | None = None):
        super().__init__(seed, backend=backend)
        self.reduction = check_choice("reduction", reduction, REDUCTIONS)

    def __repr__(self) -> str:
        return f"PCGrad(reduction={self.reduction!r}, seed={self.seed})"

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        dev = gram.device
        g = gram.to(torch.float64)
        order = self._stream.task_orders(K, dev)  # [K, K-1]
        rows = torch.arange(K, device=dev)
        diag = g.diagonal()
        C = torch.eye(K, dtype=torch.float64, device=dev)
        for s in range(K - 1):
            j = order[:, s]  # task visited by every row i at this step
            onehot = (rows[None, :] == j[:, None]).to(torch.float64)  # [i, k] = [k == j_i]
            ip = (C * g[:, j].T).sum(dim=1)  # <g_i^PC, g_{j_i}>
            gjj = diag[j]
            coef = torch.where(
                gjj > 0, ip / torch.where(gjj > 0, gjj, torch.ones_like(gjj)), torch.zeros_like(ip)
            )
            C = C - coef.clamp(max=0)[:, None] * onehot
        w = C.sum(dim=0)
        if self.reduction == "mean":
            w = w / K
        return w.to(out_dtype(gram))
