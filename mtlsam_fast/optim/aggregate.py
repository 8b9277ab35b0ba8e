"""Gradient aggregation without sharpness: the per-task gradients of the shared parameters are
combined by a weighting (MGDA, PCGrad, CAGrad, ...) into one update direction."""

from __future__ import annotations

from typing import Any

import torch

from .base import Closure, MTLBase, Tensor


class MTLOptimizer(MTLBase):
    """Multi-task gradient aggregation (the ``rho = 0`` baseline of :class:`FMTL`).

    One step: clean forward; K backward passes capture task ``i``'s shared gradient into row ``i``
    of ``G [K, P]`` (head ``i`` gets the gradient of loss ``i``); ``w = W(Gram(G))``; the shared
    parameters' gradient is ``w^T G``; the base optimizer steps (guarded by the found-inf flag).

    Cost per step: 1 forward, K backwards. Memory: ``G`` (K·P) + backup (P) + ``.grad`` (P).
    Constructor arguments: those of :class:`~mtlsam_fast.optim.base.MTLBase`.
    """

    def step(  # type: ignore[override]
        self,
        closure: Closure | None = None,
        *,
        grad_scaler: Any = None,
        micro_batches: int | None = None,
    ) -> Tensor:
        """One aggregation step; returns the K losses (detached, on the device)."""
        if closure is None:
            return self._step_without_closure()
        scale, inv_scale = self._begin(closure, grad_scaler, micro_batches)
        assert closure is not None  # _begin raised otherwise
        det = self._capture_task_gradients(closure, scale)
        self._aggregate(inv_scale, det, self._shared.grad, name="loss")
        self._finish(torch.zeros((), dtype=torch.bool, device=self.device), grad_scaler)
        self._step_count += 1
        return det
