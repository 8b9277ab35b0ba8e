"""SAMO: sharpness-aware multi-task optimization with joint global-local perturbations, from

"SAMO: A Lightweight Sharpness-Aware Approach for Multi-Task Optimization with Joint Global-Local
Perturbation", 2025 (https://arxiv.org/abs/2507.07883), as specified in docs/ARCHITECTURE.md §8.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

from .. import weighting as _weighting
from .base import (
    Closure,
    MTLBase,
    Tensor,
    _safe_scale,
    flag,
    nonnegative_float,
    positive_float,
    unit_float,
)
from .running_stats import frozen_running_stats


class SAMO(MTLBase):
    """SAMO: a global (mean-loss) gradient mixed with per-task zeroth-order local estimates.

    One step (``theta`` the shared parameters, ``d`` indexes parameter tensors when ``layerwise``):

    1. clean forward, one backward of the mean loss: ``g0`` (and each head's gradient);
    2. for each task ``i``: ``z_i ~ N(0, I)`` over the shared parameters, the counter-based stream
       ``ops.gaussian_noise(seed, offset_i)`` with ``offset_i = (step * K + i) * P`` -- regenerated
       by every op that needs it, never stored. Two forwards under ``torch.no_grad()`` at
       ``theta +- zo_eps z_i`` give ``c_i = [L_i(+) - L_i(-)] / (2 zo_eps)`` and
       ``ghat_i = c_i z_i``; layerwise ``ghat_i^d <- ||g0^d|| ghat_i^d / ||ghat_i^d||`` (with
       ``layerwise=False`` one normalization over all shared parameters; a zero estimate stays 0);
       ``v_i = alpha g0 + (1 - alpha) ghat_i``; ``eps_i = rho v_i / ||v_i||``, computed from
       per-layer sums (reduced by ``ops.perturb_noise_stats`` in the ``+ zo_eps`` probe's pass over
       the noise) and applied by one ``ops.perturb`` call; head ``i`` is perturbed by ``rho_head``
       times its normalized gradient; forward + backward of loss ``i`` captures ``G_i`` into row
       ``i``; parameters restored bitwise;
    3. ``w = W(Gram(G))``, shared direction ``w^T G``; head ``i`` gets its perturbed-point gradient.

    ``alpha = 1`` is SAM on the mean-loss gradient for every task (global only), ``alpha = 0`` local
    only. Cost per step: 1 + 3K forwards (2K of them without autograd), 1 + K backwards.
    Memory: ``G`` (K·P) + backup (P) + ``.grad`` (P, holds ``g0`` during the step).

    Args (besides those of :class:`~mtlsam_fast.optim.base.MTLBase`): ``rho`` (the shared
    parameters' radius), ``rho_head`` (the task-specific parameters', default ``rho``), ``alpha``
    in [0, 1], ``zo_eps`` (> 0, the zeroth-order step mu), ``layerwise``: hyperparameters in every
    param group (schedulable); ``rho`` applies per group, ``alpha``, ``zo_eps`` and ``layerwise``
    are read from the shared group (group 0). ``seed`` (int >= 0) selects the noise stream.
    ``adaptive=True`` (ASAM) is not supported for SAMO.
    """

    HYPERPARAMETERS: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        **MTLBase.HYPERPARAMETERS,
        "rho": nonnegative_float,
        "alpha": unit_float,
        "zo_eps": positive_float,
        "layerwise": flag,
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
        alpha: float = 0.5,
        zo_eps: float = 1e-3,
        layerwise: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ):
        if adaptive:
            raise NotImplementedError(
                "SAMO with adaptive=True (ASAM scaling of the zeroth-order noise) is not supported"
            )
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        self.seed = seed
        super().__init__(
            shared_params,
            task_params,
            base_optimizer,
            weighting,
            hyperparameters={"rho": rho, "alpha": alpha, "zo_eps": zo_eps, "layerwise": layerwise},
            head_hyperparameters={} if rho_head is None else {"rho": rho_head},
            **kwargs,
        )

    def noise_offset(self, task: int, step: int | None = None) -> int:
        """Offset of task ``task``'s noise stream at step ``step`` (default: the next step)."""
        step = self._step_count if step is None else step
        return (step * self.num_tasks + task) * self._shared.global_numel

    def _probe_loss(self, closure: Closure, task: int) -> Tensor:
        """Loss ``task`` at the current (perturbed) weights without autograd: the mean over the
        micro-batches."""
        return self._mean_losses(
            [
                self._forward(closure, m, grad=False, perturbed=True)[task].detach()
                for m in self._micro
            ]
        )

    def _extra_state(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        if "seed" in state:
            self.seed = int(state["seed"])

    def step(  # type: ignore[override]
        self,
        closure: Closure | None = None,
        *,
        grad_scaler: Any = None,
        micro_batches: int | None = None,
    ) -> Tensor:
        """One SAMO step; returns the K clean losses (detached, on the device)."""
        if closure is None:
            return self._step_without_closure()
        scale, inv_scale = self._begin(closure, grad_scaler, micro_batches)
        assert closure is not None  # _begin raised otherwise
        K, sh, be = self.num_tasks, self._shared, self.backend
        dev, off = self.device, sh.offsets
        acc = torch.float64 if sh.theta.dtype == torch.float64 else torch.float32

        # 1. clean forward, one backward of the mean loss: g0 into sh.grad, heads' gradients
        for h in self._heads:
            if h is not None:
                h.grad.zero_()
        sh.grad.zero_()
        per_micro = []
        for m in self._micro:
            losses = self._forward(closure, m, grad=True, perturbed=False)
            per_micro.append(torch.stack([l.detach() for l in losses]))
            mean = torch.stack(
                [l if l.dtype in (torch.float32, torch.float64) else l.float() for l in losses]
            ).mean()
            self._backward(mean, scale, None)
            del losses, mean
        det = self._mean_losses(per_micro)
        g0 = sh.grad
        sync = self._sync
        if sync is not None:  # distributed: the rank-averaged g0, heads' gradients and losses
            if not sh.sharded:
                sync.mean(g0)
            for h in self._heads:
                sync.head_ready(h)
            sync.losses_ready(det)
            sync.wait()
        n0 = sh.segment_norms(g0, off, backend=be).to(acc)  # [S], scaled like g0
        bad = ~torch.isfinite(n0).all()
        head_scales, head_bad = self._head_scales()
        bad = bad | head_bad
        rho, layerwise = self._hyper("rho"), self._hyper("layerwise")
        alpha = torch.tensor(self._hyper("alpha"), dtype=acc, device=dev)
        mu = torch.tensor(self._hyper("zo_eps"), dtype=acc, device=dev)

        for i in range(K):
            noff = self.noise_offset(i)
            try:
                # 2a. forward-only two-point estimate along z_i; the first probe also reduces z_i's
                # statistics (per segment sum z^2, sum g0 z) from the same generation of the noise
                with torch.no_grad():
                    stats = sh.perturb_noise_stats(
                        mu, g0, seed=self.seed, noise_offset=noff, backend=be
                    ).to(acc)
                    lp = self._probe_loss(closure, i).to(acc)
                    sh.perturb(noise_scale=-mu, seed=self.seed, noise_offset=noff, backend=be)
                    lm = self._probe_loss(closure, i).to(acc)
                if sync is not None:  # the union's losses: averaged over the ranks
                    lp, lm = sync.mean(torch.stack([lp, lm])).unbind()
                c = (lp - lm) / (2 * mu)
                bad = bad | ~torch.isfinite(c)
                # 2b. eps_i = rho v_i / ||v_i||,  v_i^d = alpha g0^d + beta_d z_i^d
                zz, gz = stats[0], stats[1]
                if layerwise:
                    zn = zz.sqrt()
                    beta = (
                        (1 - alpha)
                        * torch.sign(c)
                        * n0
                        / torch.where(zn > 0, zn, torch.ones_like(zn))
                    )
                else:
                    zn = zz.sum().sqrt()
                    gn = n0.square().sum().sqrt()
                    beta = (
                        (1 - alpha)
                        * torch.sign(c)
                        * gn
                        / torch.where(zn > 0, zn, torch.ones_like(zn))
                    ).expand_as(zz)
                vnorm = (
                    (alpha * alpha * n0.square() + 2 * alpha * beta * gz + beta.square() * zz)
                    .sum()
                    .clamp_min(0)
                    .sqrt()
                )
                k = _safe_scale(rho, vnorm)
                sh.perturb(
                    g0,
                    k * alpha,
                    noise_scale=k * beta,
                    seed=self.seed,
                    noise_offset=noff,
                    backend=be,
                )
                self._perturb_head(i, head_scales[i])
                # 2c. G_i at the perturbed point; head i's perturbed-point gradient
                if (head := self._heads[i]) is not None:
                    head.grad.zero_()
                with frozen_running_stats():  # the perturbed forwards and their backward passes
                    for m in self._micro:
                        lg = self._forward(closure, m, grad=True, perturbed=True)
                        with self._gbuf.capture(i, accumulate=m > 0):
                            self._backward(lg[i], scale, i)
                        del lg
            finally:
                self._restore(i)
            self._task_gradient_ready(i)

        # 3. aggregate the perturbed gradients
        self._aggregate(inv_scale, det, sh.grad, name="perturbed")
        self._finish(bad, grad_scaler)
        self._step_count += 1
        return det
