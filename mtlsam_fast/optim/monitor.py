"""What a step decided, and the last word before the base optimizer steps: monitoring records,
gradient-norm clipping and direction hooks of :class:`~mtlsam_fast.optim.MTLOptimizer`,
:class:`~mtlsam_fast.optim.FMTL` and :class:`~mtlsam_fast.optim.SAMO` (docs/optimizer-features.md).

Everything here stays on the device: a record holds device tensors (no ``.item()``, no copy to the
host; the fused MGDA path stays fused), clipping computes its coefficient on the device, and a hook
is told whether the step will be skipped by a device flag instead of not being called. Reading a
record's values on the host (:func:`scalars`) is the one host sync, done when the caller logs.

Aggregations, named by the rows they combine: ``"loss"`` the clean task
gradients ``g_i`` (``MTLOptimizer``; F-MTL's first weighting, the "loss" set of Phan et al. 2022,
arXiv 2211.13723), ``"flat"`` F-MTL's flat gradients ``F_i`` (its second weighting), ``"perturbed"``
SAMO's gradients at the perturbed points (arXiv 2507.07883).
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.hooks import RemovableHandle

Tensor = torch.Tensor

#: ``hook(optimizer, direction, skipped)``: see :meth:`MTLBase.register_direction_hook`
DirectionHook = Callable[[Any, Tensor, Tensor], None]

#: added to the norm in the clip coefficient, as :func:`torch.nn.utils.clip_grad_norm_` does
CLIP_EPS = 1e-6


def max_norm_or_none(name: str, value: Any) -> float | None:
    """``None`` (no clipping) or a finite number > 0 (a gradient-norm bound)."""
    if value is None:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value <= 0
    ):
        raise ValueError(f"{name} must be None (no clipping) or a finite number > 0, got {value!r}")
    return float(value)


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AggregationRecord:
    """One aggregation of a step: the Gram of the K rows it combined and the weighting's answer.

    Every tensor is the record's own (a fresh tensor or a copy: the next step allocates new ones
    and never writes into these), on the optimizer's device, fp32 (fp64 for fp64 gradients), in
    true units (a GradScaler's scale divided out).
    """

    name: str  #: ``"loss"``, ``"flat"`` or ``"perturbed"`` (module docstring)
    gram: Tensor  #: [K, K] Gram matrix of the rows (``G G^T``; F-MTL's flat set: of ``F``)
    #: [K] task weights (the direction is ``weights^T G``), or ``None`` when the weighting returns
    #: the direction itself (``returns_direction``: GradDrop, MoCo, trimmed mean)
    weights: Tensor | None
    returns_direction: bool  #: the weighting returned a direction, not weights
    reads_grads: (
        bool  #: the weighting read the gradients themselves (``needs_grads``), not only the Gram
    )

    @property
    def norms(self) -> Tensor:
        """[K] the rows' L2 norms, ``sqrt(diag(gram))``."""
        return self.gram.diagonal().clamp_min(0).sqrt()

    @property
    def cosines(self) -> Tensor:
        """[K, K] cosine similarities ``gram_ij / (|g_i| |g_j|)``; 0 where a row is zero."""
        n = self.norms
        outer = n[:, None] * n[None, :]
        ok = outer > 0
        return torch.where(ok, self.gram / torch.where(ok, outer, torch.ones_like(outer)), 0.0)


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """What one step decided: its aggregations by name (``record["loss"]``), whether it was
    skipped, and the pre-clipping norms of the gradients it clipped."""

    step: int  #: the step's index (0 for the first step of the optimizer)
    skipped: Tensor  #: 0-d bool on the device: the step was skipped (inf/NaN, found-inf)
    aggregations: dict[str, AggregationRecord]
    #: ``"shared"`` / ``"head<k>"`` -> 0-d norm before clipping (what ``clip_grad_norm_``
    #: returns), for each gradient that has a ``max_grad_norm``
    grad_norms: dict[str, Tensor]

    def __getitem__(self, name: str) -> AggregationRecord:
        return self.aggregations[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.aggregations)

    def tensors(self) -> dict[str, Tensor]:
        """Flat name -> device tensor: ``"<aggregation>/weights"`` (absent for a direction),
        ``"<aggregation>/norms"``, ``"<aggregation>/cosines"``, ``"grad_norm/<which>"``."""
        out: dict[str, Tensor] = {}
        for name, rec in self.aggregations.items():
            if rec.weights is not None:
                out[f"{name}/weights"] = rec.weights
            out[f"{name}/norms"] = rec.norms
            out[f"{name}/cosines"] = rec.cosines
        for which, n in self.grad_norms.items():
            out[f"grad_norm/{which}"] = n
        return out


def scalars(tensors: dict[str, Tensor]) -> dict[str, float]:
    """Host numbers for logging: ``"loss/weights/0"``, ``"loss/cosines/0_1"`` (upper triangle,
    ``i < j``), ``"grad_norm/shared"``; one copy to the host for all of them."""
    keys: list[str] = []
    parts: list[Tensor] = []
    for name, t in tensors.items():
        if name.endswith("/cosines"):
            n = t.shape[0]
            pairs = [(a, b) for a in range(n) for b in range(a + 1, n)]
            keys += [f"{name}/{a}_{b}" for a, b in pairs]
            upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=t.device), 1)
            parts.append(t[upper])  # row-major: the order of ``pairs``
        elif t.dim() == 0:
            keys.append(name)
            parts.append(t.reshape(1))
        else:
            keys += [f"{name}/{k}" for k in range(t.numel())]
            parts.append(t.reshape(-1))
    if not parts:
        return {}
    values = torch.cat([p.to(torch.float64) for p in parts]).tolist()
    return dict(zip(keys, values))


class RunningMean:
    """Device-side means of step records between two reads, for logging every N steps.

    ``update(opt.last_step)`` after each step adds its tensors (:meth:`StepRecord.tensors`) to
    device sums, leaving out skipped steps (by the device flag, no host sync); :meth:`compute`
    returns the means since the last :meth:`reset` (NaN for a name no kept step has had).
    """

    def __init__(self) -> None:
        self._sums: dict[str, Tensor] = {}
        self._count: Tensor | None = None
        self.updates = 0  #: records given to :meth:`update` since the last reset

    def update(self, record: StepRecord) -> None:
        keep = ~record.skipped
        for name, t in record.tensors().items():
            value = torch.where(keep, t, torch.zeros((), dtype=t.dtype, device=t.device))
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        k = keep.to(torch.float64)
        self._count = k if self._count is None else self._count + k
        self.updates += 1

    def compute(self) -> dict[str, Tensor]:
        if self._count is None:
            return {}
        n = self._count
        return {name: s / n.to(s.dtype) for name, s in self._sums.items()}

    def reset(self) -> None:
        self._sums.clear()
        self._count = None
        self.updates = 0


# --------------------------------------------------------------------------------------------
# the optimizers' side
# --------------------------------------------------------------------------------------------
def clip_(grad: Tensor, max_norm: float, norm: Tensor) -> None:
    """``grad *= min(1, max_norm / (norm + 1e-6))`` in place, on the device: the coefficient of
    :func:`torch.nn.utils.clip_grad_norm_`, computed in ``norm``'s precision (fp32 or fp64)."""
    coef = (max_norm / (norm + CLIP_EPS)).clamp(max=1.0)
    grad.mul_(coef.to(grad.dtype))


class StepFeatures:
    """An optimizer's monitoring state and direction hooks (one per optimizer)."""

    def __init__(self) -> None:
        self.monitoring = True
        self.last: StepRecord | None = None
        self._pending: dict[str, AggregationRecord] = {}
        self.hooks: OrderedDict[int, DirectionHook] = OrderedDict()

    def register(self, hook: DirectionHook) -> RemovableHandle:
        if not callable(hook):
            raise TypeError(f"a direction hook must be callable, got {type(hook).__name__}")
        handle = RemovableHandle(self.hooks)
        self.hooks[handle.id] = hook
        return handle

    def record(
        self,
        name: str,
        gram: Tensor,
        result: Tensor,
        inv_scale: Tensor,
        *,
        returns_direction: bool,
        reads_grads: bool,
    ) -> None:
        """Keep one aggregation of the running step: ``gram`` of the scaled rows, ``result`` the
        weights (or the direction)."""
        if not self.monitoring:
            return
        true_gram = gram * (inv_scale * inv_scale).to(gram.dtype)  # a new tensor
        self._pending[name] = AggregationRecord(
            name=name,
            gram=true_gram,
            weights=None if returns_direction else result.detach().clone(),
            returns_direction=returns_direction,
            reads_grads=reads_grads,
        )

    def before_base_step(self, opt: Any, found: Tensor) -> Tensor:
        """After the direction is final and unscaled, before the base optimizer steps: run the
        hooks (re-checking the direction's finiteness if there are any), clip the shared
        direction and the heads by their groups' ``max_grad_norm``, complete the step's record.
        Returns the found-inf flag (``found``, or'd with a non-finite direction after hooks)."""
        direction = opt._shared.grad
        if self.hooks:
            skipped = found.reshape(()).clone()  # the hooks' own copy of the flag
            for hook in list(self.hooks.values()):
                hook(opt, direction, skipped)
            found = found | ~torch.isfinite(direction).all()
            if opt._sync is not None:  # a hook's inf/NaN on any rank skips the step everywhere
                found = opt._sync.any(found)
        grad_norms: dict[str, Tensor] = {}
        flats = [("shared", opt._shared, 0)]
        flats += [
            (f"head{k}", h, g)
            for k, (h, g) in enumerate(zip(opt._heads, opt._head_group))
            if h is not None and g is not None
        ]
        for which, flat, group in flats:
            max_norm = opt.param_groups[group]["max_grad_norm"]
            if max_norm is not None:
                norm = flat.norm(flat.grad, False, opt.backend)
                clip_(flat.grad, max_norm, norm)
                grad_norms[which] = norm
        if self.monitoring:
            self.last = StepRecord(
                step=opt._step_count,
                skipped=found.reshape(()).clone(),
                aggregations=dict(self._pending),
                grad_norms=grad_norms,
            )
        self._pending.clear()
        return found
