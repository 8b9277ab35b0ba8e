"""F-MTL: task-based flat-region seeking, Algorithm 1 of

Phan, Tran, Nguyen, Ho, Le, Vo, Nguyen, Nguyen, Nguyen, Nguyen, "Improving Multi-task Learning via
Seeking Task-based Flat Regions", 2022 (https://arxiv.org/abs/2211.13723).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

from .. import ops
from .. import weighting as _weighting
from .base import Closure, MTLBase, Tensor, _safe_scale, flag, nonnegative_float


class FMTL(MTLBase):
    """F-MTL (sharpness-aware multi-task learning with per-task perturbations), SAM or ASAM.

    One step, with ``g_i`` the gradient of task ``i``'s loss over all shared parameters:

    1. clean forward; K backward passes capture ``g_i`` into row ``i`` of ``G [K, P]`` (and each
       head's gradient ``h_i``); loss weights ``w = W(Gram(G))``, ``d = w^T G`` is stored;
    2. for each task ``i``: shared ``theta + eps_i`` with ``eps_i = rho g_i / ||g_i||`` (ASAM:
       ``rho T^2 g_i / ||T g_i||``, ``T = |theta|``; norms over all shared parameters), head ``i``
       ``+ rho_head h_i / ||h_i||``; forward; backward of loss ``i`` seeded with ``-1`` accumulates
       into row ``i``, which becomes ``g_i - s_i = -flat_i`` in place (no second K x P buffer, no
       extra pass); parameters restored bitwise from the backup;
    3. flat weights ``w' = W(Gram(-F)) = W(Gram(F))``; shared direction ``d + w'^T F``; head ``i``
       gets its gradient at the perturbed point; the base optimizer steps (guarded by the found-inf
       flag).

    Cost per step: 1 + K forwards, 2K backwards (1 clean forward, K backward, K perturbed
    forward+backward). Extra shared-sized memory: ``G`` (K·P) + backup (P) + ``.grad`` (P) + one
    transient P (the combine) + the transient optimizer-state snapshot of the guarded step.

    Args (besides those of :class:`~mtlsam_fast.optim.base.MTLBase`), stored as hyperparameters
    in every param group (schedulable; each group's value applies to its own parameters):
        rho: perturbation radius (>= 0) of the shared parameters (group 0).
        rho_head: radius of the task-specific parameters (their groups' ``rho``; default ``rho``).
        adaptive: ASAM (scale-invariant) perturbations.

    Weightings that need the losses get the clean losses in both calls. A stateful weighting is
    called twice per step (loss set, then flat set), as in the paper.
    """

    HYPERPARAMETERS: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "rho": nonnegative_float,
        "adaptive": flag,
    }

    def __init__(
        self,
        shared_params: Iterable[Tensor],
        task_params: Sequence[Iterable[Tensor]] | None = None,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        weighting: str | _weighting.Weighting = "ls",
        rho: float = 0.05,
        rho_head: float | None = None,
        adaptive: bool = False,
        **kwargs: Any,
    ):
        heads = {} if rho_head is None else {"rho": rho_head}
        super().__init__(
            shared_params,
            task_params,
            base_optimizer,
            weighting,
            hyperparameters={"rho": rho, "adaptive": adaptive},
            head_hyperparameters=heads,
            **kwargs,
        )

    def step(  # type: ignore[override]
        self,
        closure: Closure | None = None,
        *,
        grad_scaler: Any = None,
        micro_batches: int | None = None,
    ) -> Tensor:
        """One F-MTL step; returns the K clean losses (detached, on the device)."""
        if closure is None:
            return self._step_without_closure()
        scale, inv_scale = self._begin(closure, grad_scaler, micro_batches)
        assert closure is not None  # _begin raised otherwise
        K, sh, G, be = self.num_tasks, self._shared, self._gbuf.G, self.backend
        rho, adaptive = self._hyper("rho"), self._hyper("adaptive")

        # 1. clean forward, K backward passes into the rows of G (heads: their own loss only);
        #    distributed: eps_i needs the whole averaged g_i on every rank
        det = self._capture_task_gradients(closure, scale, full_rows=True)

        gram = self._aggregate(inv_scale, det, sh.grad)  # d_loss = w_loss^T G, scaled like G

        if adaptive:
            norms = sh.segment_norms(G, sh.whole, weight=sh.backup.abs(), backend=be).reshape(K)
        else:
            norms = gram.diagonal().clamp_min(0).sqrt()
        bad = ~torch.isfinite(norms).all()
        scales = _safe_scale(rho, norms)
        head_scales, head_bad = self._head_scales()
        bad = bad | head_bad

        # 2. per task: perturb, forward, backward seeded with -scale into row i (g_i - s_i), restore
        neg = -scale
        for i in range(K):
            try:
                ops.perturb(
                    sh.theta,
                    sh.backup,
                    sh.whole,
                    direction=G[i],
                    scale=scales[i],
                    adaptive=adaptive,
                    backend=be,
                )
                self._perturb_head(i, head_scales[i])
                if (head := self._heads[i]) is not None:
                    head.grad.zero_()
                for m in self._micro:
                    lp = self._forward(closure, m, grad=True, perturbed=True)
                    with self._gbuf.capture(i, accumulate=True):
                        self._backward(lp[i], neg, i)
                    del lp
            finally:
                self._restore(i)
            if (head := self._heads[i]) is not None:
                head.grad.neg_()  # the head's perturbed-point gradient (exact sign flip)
            self._task_gradient_ready(i)

        # 3. flat weights on -F (same Gram, same weights as F):
        #    d_loss + w_flat^T F = d_loss - w_flat^T (-F)
        self._aggregate(inv_scale, det, sh.grad, subtract=True)

        self._finish(bad, grad_scaler)
        self._step_count += 1
        return det
