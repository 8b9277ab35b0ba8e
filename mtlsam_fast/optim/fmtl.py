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
from .running_stats import frozen_running_stats

#: ``FMTL(perturbation=...)``: ``"exact"`` (eps_i from the rank-averaged g_i) or ``"local"``
PERTURBATIONS = ("exact", "local")


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
        perturbation: distributed training only. ``"exact"`` (default): ``eps_i`` from the
            rank-averaged ``g_i`` -- the step equals the one-process step over the union of the
            ranks' batches; the first phase all-reduces the K rows (2 K P elements on the wire)
            before any perturbation can start. ``"local"``: every rank perturbs with its own
            ``g_i`` (and its own head gradients), as data-parallel SAM does with ``no_sync``
            (Foret et al. 2021, arXiv 2010.01412: one perturbation per accelerator). The loss
            weights still come from the averaged ``g_i``, which are only reduce-scattered (K P
            elements), and the perturbed gradients are averaged as usual: a cheaper step (2 K + 1
            instead of 3 K + 1 times P elements) that is no longer the one-process step (each
            rank's perturbed gradient is taken at its own perturbation). Replicated shared
            parameters only (with FSDP2 all ranks run the same gathered weights).
    Weightings that need the losses get the clean losses in both calls. A stateful weighting is
    called twice per step (loss set, then flat set), as in the paper.
    """

    HYPERPARAMETERS: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        **MTLBase.HYPERPARAMETERS,
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
        perturbation: str = "exact",
        **kwargs: Any,
    ):
        if perturbation not in PERTURBATIONS:
            raise ValueError(f"perturbation must be one of {PERTURBATIONS}, got {perturbation!r}")
        self.perturbation = perturbation
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

    def _check_distributed(self, sync: Any) -> None:
        if self.perturbation == "local" and sync.sharded_shared:
            raise ValueError(
                "perturbation='local' needs replicated shared parameters: with FSDP2 every rank "
                "runs its forward on the same all-gathered weights, so the perturbations cannot "
                "differ per rank; use perturbation='exact'"
            )

    def _options(self) -> dict[str, Any]:
        return {"perturbation": self.perturbation}

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
        #    distributed: eps_i needs the whole averaged g_i on every rank, or this rank's own
        #    g_i with local perturbations (the averaged rows go to the shards only)
        local = self.perturbation == "local" and self._sync is not None
        det = self._capture_task_gradients(closure, scale, rows="keep" if local else "full")

        gram = self._aggregate(
            inv_scale, det, sh.grad, name="loss"
        )  # d_loss = w_loss^T G, scaled like G

        if adaptive or local:  # ASAM's ||T g_i||; local: this rank's own ||g_i||
            weight = sh.backup.abs() if adaptive else None
            norms = sh.segment_norms(G, sh.whole, weight=weight, backend=be).reshape(K)
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
                with frozen_running_stats():  # the perturbed forwards and their backward passes
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
        self._aggregate(inv_scale, det, sh.grad, subtract=True, name="flat")

        self._finish(bad, grad_scaler)
        self._step_count += 1
        return det
