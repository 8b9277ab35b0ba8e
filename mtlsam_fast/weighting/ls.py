"""Linear scalarization: the mean of the task gradients (equal weights 1/K)."""

from __future__ import annotations

import torch

from .base import Tensor, Weighting, out_dtype


class LinearScalarization(Weighting):
    """Equal weights ``1/K``; the baseline every multi-task method is compared with."""

    name = "ls"

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        K = gram.shape[0]
        return torch.full((K,), 1.0 / K, dtype=out_dtype(gram), device=gram.device)
