"""Shared machinery of the multi-task optimizers: validation, flat parameters, gradient capture,
the closure protocol, BatchNorm protection, the guarded (found-inf) base-optimizer step, state.

Layout (memory): the shared parameters are moved into one flat buffer ``theta [P]`` (each
``p.data`` is a view); ``backup [P]`` holds the weights at the start of the step (perturbations
are written as ``theta <- backup + eps`` and undone by an exact copy); ``grad [P]`` backs the shared
parameters' ``.grad`` (the final update direction); ``G [K, P]`` holds the per-task gradients,
captured zero-copy by autograd. Each task's head (task-specific parameters) gets the same
treatment at its own (small) size.

Found-inf without a host sync: every step computes a device flag (non-finite gradients, Gram,
weights or norms). With ``torch.optim.Adam``/``AdamW(fused=True)`` the flag is handed to the fused
kernel, which skips natively (as under ``GradScaler.step``). Otherwise the base optimizer always
steps, and its effect is undone on the device when the flag is set: parameters are put back from
``backup`` with ``torch.where`` and every optimizer-state tensor from a snapshot taken just before
the step (state created by this very step is reset to zeros, the initial value of every built-in
``torch.optim`` state, so a skipped first step leaves a state equivalent to a fresh one). No
``.item()``, no Python branch on a tensor. The weighting's state (EMAs, learnt loss weights, random
streams) is snapshot at the start of the step and put back the same way.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, ClassVar

import torch

from .. import distributed as _distributed
from .. import ops
from .. import weighting as _weighting
from ..buffers import FlatLayout, GradBuffer, dense_stride, flatten_parameters
from ..ops import FLOAT_DTYPES
from ..weighting.mgda import MGDA as _MGDA
from .monitor import DirectionHook, StepFeatures, StepRecord, max_norm_or_none
from .running_stats import frozen_running_stats

Tensor = torch.Tensor
Closure = Callable[[], "Sequence[Tensor] | Tensor"]


# --------------------------------------------------------------------------------------------
# Flat parameter groups
# --------------------------------------------------------------------------------------------
class _FlatParams:
    """A list of parameters moved into one flat buffer, with a backup and a flat ``.grad``
    buffer. (FSDP2-sharded parameters get :class:`mtlsam_fast.distributed.ShardedFlatParams`,
    with the same interface.)"""

    sharded = False

    def __init__(self, params: list[Tensor], what: str):
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise TypeError(
                f"{what}: all parameters must share one dtype (one flat buffer), "
                f"got {sorted(map(str, dtypes))}"
            )
        self.params = params
        self.layout = FlatLayout(params)
        self.theta = flatten_parameters(params, self.layout)
        self.backup = torch.empty_like(self.theta)
        self.grad = torch.zeros_like(self.theta)
        self.grad_views = self.layout.views(self.grad)
        self.offsets = self.layout.offsets()  # per-parameter segments [S + 1]
        self.whole = torch.tensor(
            [0, self.layout.numel], dtype=torch.int64, device=self.theta.device
        )
        self._ptrs = [v.data_ptr() for v in self.layout.views(self.theta)]
        self.what = what

    @property
    def numel(self) -> int:
        return self.layout.numel

    @property
    def global_numel(self) -> int:
        """P, the parameters' total size (for sharded parameters: over all ranks)."""
        return self.layout.numel

    def check_intact(self) -> None:
        for i, (p, ptr) in enumerate(zip(self.params, self._ptrs)):
            if p.data_ptr() != ptr or p.device != self.theta.device:
                raise RuntimeError(
                    f"{self.what}[{i}] no longer lives in the optimizer's flat buffer "
                    "(was the model moved with .to()/.cuda() or a parameter's .data replaced after "
                    "the optimizer was built?); build the optimizer after moving the model, and "
                    "change weights in place (copy_)."
                )

    def attach_grads(self) -> None:
        for p, v in zip(self.params, self.grad_views):
            if p.grad is not v:
                p.grad = v

    def segment_norms(
        self, x: Tensor, offsets: Tensor, *, weight: Tensor | None = None, backend: str | None
    ) -> Tensor:
        """L2 norms of the segments ``offsets`` of ``x`` ([P] or [K, P]),
        :func:`mtlsam_fast.ops.segment_norms`."""
        return ops.segment_norms(x, offsets, weight=weight, backend=backend)

    def norm(self, x: Tensor, adaptive: bool, backend: str | None) -> Tensor:
        """Global L2 norm of ``x`` ([P]) or, with ``adaptive``, of ``|backup| * x``
        (ASAM's ||T x||)."""
        weight = self.backup.abs() if adaptive else None
        return self.segment_norms(x, self.whole, weight=weight, backend=backend).reshape(())

    def perturb(
        self,
        direction: Tensor | None = None,
        scale: Tensor | None = None,
        *,
        noise_scale: Tensor,
        seed: int,
        noise_offset: int,
        backend: str | None,
    ) -> None:
        """``theta <- backup + scale * direction + noise_scale[s] * z`` per parameter segment
        (:func:`mtlsam_fast.ops.perturb` with the noise stream ``(seed, noise_offset)``)."""
        ops.perturb(
            self.theta,
            self.backup,
            self.offsets,
            direction=direction,
            scale=scale,
            noise_scale=noise_scale,
            seed=seed,
            noise_offset=noise_offset,
            backend=backend,
        )

    def perturb_noise_stats(
        self, noise_scale: Tensor, ref: Tensor, *, seed: int, noise_offset: int, backend: str | None
    ) -> Tensor:
        """:func:`mtlsam_fast.ops.perturb_noise_stats` over the parameter segments."""
        return ops.perturb_noise_stats(
            self.theta,
            self.backup,
            self.offsets,
            noise_scale,
            ref,
            seed=seed,
            noise_offset=noise_offset,
            backend=backend,
        )

    def revert_where(self, skip: Tensor) -> None:
        """Put ``theta`` back from ``backup`` where the device flag ``skip`` is set."""
        torch.where(skip, self.backup, self.theta, out=self.theta)


def _safe_scale(rho: Tensor | float, norm: Tensor) -> Tensor:
    """``rho / norm``, 0 where the norm is 0 or not finite (no perturbation instead of NaN)."""
    ok = torch.isfinite(norm) & (norm > 0)
    return torch.where(
        ok, rho / torch.where(ok, norm, torch.ones_like(norm)), torch.zeros_like(norm)
    )


def nonnegative_float(name: str, value: Any) -> float:
    """A finite number >= 0 (a perturbation radius)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not math.isfinite(value)
        or value < 0
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def positive_float(name: str, value: Any) -> float:
    """A finite number > 0 (a finite-difference step)."""
    if nonnegative_float(name, value) == 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def unit_float(name: str, value: Any) -> float:
    """A number in [0, 1] (a mixing weight)."""
    if nonnegative_float(name, value) > 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def flag(name: str, value: Any) -> bool:
    """A bool (not a number or a string that happens to be truthy)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


#: Key of this library's own state (K, layout, weighting state, counters) inside
#: ``state_dict()["param_groups"][0]``: the layout stays torch's ``{"state", "param_groups"}``, and
#: tools that keep only those two entries (``torch.distributed.checkpoint``) keep it too.
STATE_KEY = "mtlsam_fast"
#: Version of the entry under :data:`STATE_KEY`. Format 1 (before hyperparameters moved into the
#: param groups) had the top-level keys ``base_optimizer``, ``weighting``, ``step_count`` and
#: ``extra``.
STATE_FORMAT = 2


#: group entries that choose how the base optimizer runs here (kept when a state is loaded)
_IMPLEMENTATION_FLAGS = ("foreach", "fused", "capturable", "differentiable")
#: torch's optimizers whose state tensors are scalars or shaped like their parameter
_SHAPED_STATE_OPTIMIZERS = (
    torch.optim.SGD,
    torch.optim.Adam,
    torch.optim.AdamW,
    torch.optim.Adamax,
    torch.optim.NAdam,
    torch.optim.RAdam,
    torch.optim.RMSprop,
    torch.optim.Adagrad,
    torch.optim.Adadelta,
    torch.optim.ASGD,
    torch.optim.Rprop,
)


def _weighting_options(w: _weighting.Weighting) -> dict[str, str]:
    """A weighting's construction options as reprs: its public attributes that are plain scalars
    (numbers, strings, flags, None; not its state, not a wrapped object), but its ``backend``
    (where it runs, not what it computes)."""
    return {
        k: repr(v)
        for k, v in vars(w).items()
        if not k.startswith("_")
        and k != "backend"
        and (v is None or isinstance(v, (bool, int, float, str)))
    }


def _check_group_values(index: int, group: dict[str, Any], current: dict[str, Any]) -> None:
    """A loaded param group's values have the types of this optimizer's (a number stays a number,
    a flag a flag, a pair of numbers a pair): a corrupted value raises here, not inside the base
    optimizer's next step."""

    def number(v: Any) -> bool:
        return (isinstance(v, (int, float)) and not isinstance(v, bool)) or (
            isinstance(v, torch.Tensor) and v.numel() == 1
        )

    for key, want in current.items():
        if key in ("params", STATE_KEY) or key not in group or want is None:
            continue
        got = group[key]
        if isinstance(want, bool):
            ok = isinstance(got, bool)
        elif number(want):
            ok = number(got)
        elif isinstance(want, (tuple, list)):
            ok = isinstance(got, (tuple, list)) and len(got) == len(want)
            ok = ok and all(number(g) == number(w) for g, w in zip(got, want))
        else:
            ok = True
        if not ok:
            raise ValueError(
                f"corrupted state_dict: param_groups[{index}][{key!r}] is {got!r}, "
                f"expected a value like {want!r}"
            )


class MTLBase(torch.optim.Optimizer):
    """Common base of :class:`MTLOptimizer`, :class:`FMTL` and :class:`SAMO` (not used directly).

    Args:
        shared_params: the shared trunk's parameters (non-empty; one dtype; one device).
        task_params: one iterable of task-specific parameters per task (may be empty iterables);
            its length is K. If omitted, give ``num_tasks`` and there are no task-specific params.
        base_optimizer: a ``torch.optim.Optimizer`` *class*; ``**base_kwargs`` (``lr``,
            ``momentum``, ``weight_decay``, ...) are passed to it. Its ``param_groups`` are this
            optimizer's ``param_groups`` (group 0: shared; then one group per non-empty head), so LR
            schedulers work unchanged.
        weighting: a registry name (``mtlsam_fast.weighting.names()``) or a ``Weighting`` object.
        weighting_options: constructor options when ``weighting`` is a name.
        grad_dtype: dtype of the ``[K, P]`` gradient buffer (default: the shared parameters' dtype).
        backend: ops backend (default: the global one).
        process_group: the ``torch.distributed`` group to synchronize over (default: the default
            group, or an FSDP2 mesh's group).
        distributed: ``None`` (default: synchronize when ``torch.distributed`` is initialized or
            the parameters are FSDP2 shards), ``True`` (require it), ``False`` (never: each process
            steps on its own). See docs/distributed.md: a step over R ranks equals the one-process
            step over the union of their batches.
        max_grad_norm: clip the shared direction to this L2 norm before the base optimizer steps
            (``torch.nn.utils.clip_grad_norm_``'s coefficient, on the device); ``None``: off.
        max_grad_norm_head: the same for each head's gradient, each head on its own (default
            ``None``: off). Both are param-group hyperparameters (schedulable).

    Closure contract: ``closure()`` runs the forward pass at the current weights and returns the K
    task losses (a sequence of K scalar tensors or one ``[K]`` tensor). It must not call
    ``backward`` or ``zero_grad``: the optimizer does the backward passes itself (and calls the
    closure again at perturbed weights, sometimes under ``torch.no_grad()``). Task ``i``'s
    head receives the gradient of loss ``i`` only. Distributed, each rank's closure returns the
    mean losses of its own batch. With ``step(closure, micro_batches=M)`` the optimizer calls
    ``closure(m)`` for ``m = 0 .. M-1`` wherever it needs the losses, each returning the mean
    losses of micro-batch ``m``, and runs each micro-batch's backward passes right after its
    forward: with M equal micro-batches the step is the step over their union.

    Mixed precision: run the forward under ``torch.autocast`` inside the closure. With fp16 pass a
    ``torch.amp.GradScaler`` to :meth:`step` (``opt.step(closure, grad_scaler=scaler)``), then call
    ``scaler.update()`` yourself; do not call ``scaler.scale``/``scaler.step`` on this optimizer.
    The optimizer seeds each backward with the scale (``scaler.scale``), checks the final gradients
    and its own inf/NaN triggers on the device, and hands them to ``scaler.unscale_(opt)``, which
    unscales them and records the flag that ``scaler.update()`` reads.

    Hyperparameters (the subclasses' ``rho``, ``alpha``, ...) live in every param group, next to
    the base optimizer's ``lr``, so schedulers can change them between steps; they are validated in
    ``__init__`` and again at each step (an invalid value raises before anything changes).
    ``state_dict()`` has torch's layout ``{"state", "param_groups"}``; this optimizer's own state
    (K, the parameter layout, the weighting's state, the step counter) is the entry
    :data:`STATE_KEY` of ``param_groups[0]``.
    """

    #: hyperparameter name -> validator ``(where, value) -> value``; subclasses declare theirs
    #: (``{**MTLBase.HYPERPARAMETERS, ...}``: every optimizer has ``max_grad_norm``, monitor.py)
    HYPERPARAMETERS: ClassVar[dict[str, Callable[[str, Any], Any]]] = {
        "max_grad_norm": max_norm_or_none,
    }

    def __init__(
        self,
        shared_params: Iterable[Tensor],
        task_params: Sequence[Iterable[Tensor]] | None = None,
        base_optimizer: type[torch.optim.Optimizer] = torch.optim.SGD,
        weighting: str | _weighting.Weighting = "ls",
        *,
        num_tasks: int | None = None,
        weighting_options: dict[str, Any] | None = None,
        grad_dtype: torch.dtype | None = None,
        backend: str | None = None,
        hyperparameters: dict[str, Any] | None = None,
        head_hyperparameters: dict[str, Any] | None = None,
        process_group: Any = None,
        distributed: bool | None = None,
        max_grad_norm: float | None = None,
        max_grad_norm_head: float | None = None,
        **base_kwargs: Any,
    ):
        # gradient-norm clipping (monitor.py): hyperparameters of every optimizer
        hyperparameters = {**(hyperparameters or {}), "max_grad_norm": max_grad_norm}
        head_hyperparameters = {**(head_hyperparameters or {}), "max_grad_norm": max_grad_norm_head}
        sync = _distributed.connect(process_group, distributed)
        try:  # every check, before anything is moved
            shared, heads, groups, shared_hyper = self._prepare(
                shared_params,
                task_params,
                base_optimizer,
                weighting,
                num_tasks,
                weighting_options,
                grad_dtype,
                backend,
                hyperparameters,
                head_hyperparameters,
                base_kwargs,
            )
            if sync is not None:
                sync.bind(shared, heads)
                if sync.sharded_shared and self.weighting.needs_grads:
                    raise ValueError(
                        f"weighting {self.weighting.name!r} reads the task gradients themselves, "
                        "and with FSDP2-sharded shared parameters every rank holds only a shard "
                        "of them: use a weighting of the Gram, or keep the trunk replicated"
                    )
                self._check_distributed(sync)
                if not sync.needed():
                    sync = None
            if sync is not None:
                description = self._agreement(shared, heads, grad_dtype)
            if sync is None and any(
                _distributed.is_dtensor(p) for p in [*shared, *(p for h in heads for p in h)]
            ):
                raise ValueError(
                    "the parameters are FSDP2 shards (DTensors): they need the distributed "
                    "optimizer (initialize torch.distributed; do not pass distributed=False)"
                )
        except Exception as e:
            if sync is not None and sync.world_size > 1:
                sync.agree(None, error=e)  # the other ranks raise too, instead of waiting
            raise
        if sync is not None:
            sync.agree(description)
        self._sync = sync
        # Fused Adam/AdamW skip a step natively from a device found-inf flag (no snapshot needed);
        # not for DTensor parameters (the flag would have to be a DTensor too).
        self._native_found_inf = (
            type(self.base_optimizer) in (torch.optim.Adam, torch.optim.AdamW)
            and bool(self.base_optimizer.defaults.get("fused"))
            and not (sync is not None and sync.sharded)
        )

        # All validation is done: from here on parameters are moved into flat buffers (values kept).
        self._shared = self._flat(shared, "shared_params", sync is not None and sync.sharded_shared)
        self._heads: list[Any] = [
            self._flat(h, f"task_params[{k}]", sync is not None and sync.sharded_heads[k])
            if h
            else None
            for k, h in enumerate(heads)
        ]
        self._gbuf = GradBuffer(
            shared, self.num_tasks, dtype=grad_dtype, layout=self._shared.layout
        )
        self.device = self._shared.theta.device
        if sync is not None:
            sync.attach(self._shared, self._heads, self.num_tasks)
        self._micro_batches: int | None = None

        super().__init__(
            [{"params": list(g["params"])} for g in groups],
            {**self.base_optimizer.defaults, **shared_hyper},
        )
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._state_has_host_values = False
        self._step_count = 0  # host counter (SAMO's noise offsets); part of state_dict
        self._features = StepFeatures()  # monitoring records, direction hooks (monitor.py)
        self._built = True

    def _prepare(
        self,
        shared_params: Iterable[Tensor],
        task_params: Sequence[Iterable[Tensor]] | None,
        base_optimizer: type[torch.optim.Optimizer],
        weighting: str | _weighting.Weighting,
        num_tasks: int | None,
        weighting_options: dict[str, Any] | None,
        grad_dtype: torch.dtype | None,
        backend: str | None,
        hyperparameters: dict[str, Any] | None,
        head_hyperparameters: dict[str, Any] | None,
        base_kwargs: dict[str, Any],
    ) -> tuple[list[Tensor], list[list[Tensor]], list[dict[str, Any]], dict[str, Any]]:
        """Every check of the constructor and the base optimizer, before any parameter moves.
        Returns the shared and per-task parameter lists, the param groups and the shared group's
        hyperparameters."""
        shared, heads, self._listed = self._validate_params(shared_params, task_params, num_tasks)
        self._check_reached = True  # the first step checks the losses reach the parameters
        # a subclass's hyperparameters: values for the shared group, and where heads differ
        shared_hyper = dict(hyperparameters or {})
        head_hyper = {**shared_hyper, **(head_hyperparameters or {})}
        if set(shared_hyper) != set(self.HYPERPARAMETERS) or set(head_hyper) != set(shared_hyper):
            raise TypeError(
                f"{type(self).__name__} takes the hyperparameters {sorted(self.HYPERPARAMETERS)}, "
                f"got {sorted(shared_hyper)} (head groups: {sorted(head_hyper)})"
            )
        if not (
            isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)
        ):
            raise TypeError(
                "base_optimizer must be a torch.optim.Optimizer class (e.g. torch.optim.Adam), "
                f"got {base_optimizer!r}"
            )
        if issubclass(base_optimizer, MTLBase):
            raise TypeError("base_optimizer cannot itself be a multi-task optimizer")
        if grad_dtype is not None and grad_dtype not in FLOAT_DTYPES:
            raise TypeError(f"grad_dtype must be one of {FLOAT_DTYPES}, got {grad_dtype}")
        self.weighting = _weighting.get(weighting, **(weighting_options or {}))
        self.weighting.check_num_tasks(len(heads))
        self.num_tasks = len(heads)
        self.backend = backend
        # its state exists from the start (torch.distributed.checkpoint loads into that structure)
        self.weighting.init_state(
            self.num_tasks,
            _distributed.local_tensor(shared[0]).device,
            sum(_distributed.local_tensor(p).numel() for p in shared),
            grad_dtype or shared[0].dtype,
        )

        # constructor arguments are named as the user wrote them (head overrides: "<name>_head")
        for name, check in self.HYPERPARAMETERS.items():
            shared_hyper[name] = check(name, shared_hyper[name])
            head_hyper[name] = check(
                f"{name}_head" if name in (head_hyperparameters or {}) else name, head_hyper[name]
            )
        groups = [{"params": shared, **shared_hyper}]
        groups += [{"params": h, **head_hyper} for h in heads if h]
        # may reject its kwargs: nothing moved yet
        self.base_optimizer = base_optimizer(groups, **base_kwargs)
        #: head k -> index of its param group (None: no task-specific parameters)
        self._head_group: list[int | None] = []
        next_group = 1
        for h in heads:
            self._head_group.append(next_group if h else None)
            next_group += bool(h)
        return shared, heads, groups, shared_hyper

    def _flat(self, params: list[Tensor], what: str, sharded: bool) -> Any:
        if sharded:
            assert self._sync is not None  # sharded groups exist only with a synchronizer
            return _distributed.ShardedFlatParams(params, what, self._sync)
        return _FlatParams(params, what)

    def _agreement(
        self, shared: list[Tensor], heads: list[list[Tensor]], grad_dtype: torch.dtype | None
    ) -> dict[str, str]:
        """What the ranks must agree on (:data:`mtlsam_fast.distributed.AGREEMENT_FIELDS`)."""
        canonical = _distributed.canonical

        def described(ps: list[Tensor]) -> str:  # the memory layout too: G's rows are reduced
            return canonical(
                [
                    (
                        list(p.shape),
                        str(p.dtype),
                        _distributed.is_dtensor(p),
                        None if _distributed.is_dtensor(p) else dense_stride(p),
                    )
                    for p in ps
                ]
            )

        base = self.base_optimizer
        return {
            "optimizer": type(self).__name__,
            "num_tasks": str(self.num_tasks),
            "shared_params": described(shared),
            "task_params": canonical([described(h) for h in heads]),
            "grad_dtype": str(grad_dtype),
            "base_optimizer": canonical([type(base), base.defaults]),
            "param_groups": canonical(
                [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
            ),
            "weighting": canonical([type(self.weighting), repr(self.weighting)]),
            "weighting_state": canonical(self.weighting.state_dict()),
            "backend": str(self.backend or ops.get_backend()),
            "options": canonical(self._options()),
        }

    def _check_distributed(self, sync: _distributed.Synchronizer) -> None:
        """A subclass's checks of its options against the distributed setup (before anything
        moves)."""

    def _options(self) -> dict[str, Any]:
        """The construction options (besides hyperparameters) the ranks must agree on."""
        return self._extra_state()

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Refused once built: the shared and task-specific parameters are fixed at construction
        (they live in flat buffers, with one gradient row per task); build a new optimizer."""
        if getattr(self, "_built", False):
            raise NotImplementedError(
                f"{type(self).__name__}.add_param_group: the parameters of a multi-task optimizer "
                "are fixed when it is built (shared ones in one flat buffer, one group per head); "
                "build a new optimizer over the new parameter lists instead"
            )
        super().add_param_group(param_group)

    # ---------------------------------------------------------------- hyperparameters
    def _check_hyperparameters(self, index: int, group: dict[str, Any]) -> None:
        """Validate (and normalize in place) this optimizer's hyperparameters in one param group."""
        for name, check in self.HYPERPARAMETERS.items():
            where = f"param_groups[{index}][{name!r}]"
            if name not in group:
                raise KeyError(f"{where} is missing ({type(self).__name__} reads it at every step)")
            group[name] = check(where, group[name])

    def _hyper(self, name: str, task: int | None = None) -> Any:
        """Hyperparameter ``name`` of the shared group, or of head ``task``'s group (the shared
        group's value when that head has no parameters)."""
        index = 0 if task is None else self._head_group[task]
        return self.param_groups[0 if index is None else index][name]

    # ---------------------------------------------------------------- validation
    @staticmethod
    def _validate_params(
        shared_params: Iterable[Tensor],
        task_params: Sequence[Iterable[Tensor]] | None,
        num_tasks: int | None,
    ) -> tuple[list[Tensor], list[list[Tensor]], list[tuple[str, Tensor, bool]]]:
        """The trainable shared and per-task parameter lists, and every listed parameter as
        ``(name, tensor, requires_grad)``: parameters that do not require grad are left out of
        the lists, as torch.optim's optimizers leave them alone (:meth:`_check_trainable`)."""
        if isinstance(shared_params, torch.Tensor):
            raise TypeError(
                "shared_params must be an iterable of tensors (e.g. model.trunk.parameters()), "
                "not a tensor"
            )
        shared = list(shared_params)
        if not shared:
            raise ValueError(
                "shared_params is empty: a multi-task optimizer needs at least one shared parameter"
            )
        if task_params is None:
            if num_tasks is None:
                raise ValueError("give task_params (one iterable per task) or num_tasks")
            if isinstance(num_tasks, bool) or not isinstance(num_tasks, int) or num_tasks < 1:
                raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
            heads: list[list[Tensor]] = [[] for _ in range(num_tasks)]
        else:
            if isinstance(task_params, torch.Tensor) or not isinstance(task_params, Sequence):
                raise TypeError(
                    "task_params must be a list with one iterable of parameters per task"
                )
            heads = []
            for k, h in enumerate(task_params):
                if isinstance(h, torch.Tensor):
                    raise TypeError(
                        f"task_params[{k}] must be an iterable of tensors, not a tensor "
                        "(wrap it in a list)"
                    )
                heads.append(list(h))
            if not heads:
                raise ValueError("task_params is empty: there must be at least one task")
            if num_tasks is not None and num_tasks != len(heads):
                raise ValueError(f"num_tasks={num_tasks} but task_params lists {len(heads)} tasks")
        owner: dict[int, str] = {}
        devices: dict[str, str] = {}
        named = [(f"shared_params[{i}]", p) for i, p in enumerate(shared)]
        named += [
            (f"task_params[{k}][{j}]", p) for k, h in enumerate(heads) for j, p in enumerate(h)
        ]
        for name, p in named:
            if not isinstance(p, torch.Tensor):
                raise TypeError(
                    f"{name} is a {type(p).__name__}, expected a torch.Tensor (nn.Parameter)"
                )
            if id(p) in owner:
                prev = owner[id(p)]
                both = (
                    "both shared and task-specific"
                    if prev.startswith("shared") != name.startswith("shared")
                    else "listed twice"
                )
                raise ValueError(f"a parameter is {both}: {prev} and {name} are the same tensor")
            owner[id(p)] = name
            if p.dtype not in FLOAT_DTYPES:
                raise TypeError(
                    f"{name} has unsupported dtype {p.dtype}; "
                    "supported: float32, float64, bfloat16, float16"
                )
            if not p.requires_grad:
                continue  # frozen: skipped
            if not p.is_leaf:
                raise ValueError(
                    f"{name} is not a leaf tensor "
                    "(pass the model's parameters, not results of operations)"
                )
            devices.setdefault(str(p.device), name)
        if len(devices) > 1:
            desc = ", ".join(f"{name} on {dev}" for dev, name in devices.items())
            raise ValueError(
                f"parameters are on different devices ({desc}); move the model to one device first"
            )
        listed = [(name, p, p.requires_grad) for name, p in named]
        shared = [p for p in shared if p.requires_grad]
        heads = [[p for p in h if p.requires_grad] for h in heads]
        if not shared:
            raise ValueError(
                "shared_params: none of its parameters requires grad (frozen parameters are "
                "skipped); a multi-task optimizer needs at least one trainable shared parameter"
            )
        for what, group in [("shared_params", shared)] + [
            (f"task_params[{k}]", h) for k, h in enumerate(heads)
        ]:
            dtypes = {p.dtype for p in group}
            if len(dtypes) > 1:
                raise TypeError(
                    f"{what}: all parameters must share one dtype (one flat buffer each), "
                    f"got {sorted(map(str, dtypes))}"
                )
        return shared, heads, listed

    def _check_trainable(self) -> None:
        """Which listed parameters train is fixed when the optimizer is built (those that require
        grad then): a parameter frozen or unfrozen since raises, before the step changes
        anything."""
        for name, p, trainable in self._listed:
            if p.requires_grad != trainable:
                change = "unfrozen" if p.requires_grad else "frozen"
                raise RuntimeError(
                    f"{name} was {change} (requires_grad set to {p.requires_grad}) after "
                    f"{type(self).__name__} was built: the trainable parameters are fixed at "
                    "construction (they live in flat buffers, one gradient row per task). Build a "
                    "new optimizer after changing requires_grad, or set it back"
                )

    def _check_losses(self, losses: Any, *, need_grad: bool) -> list[Tensor]:
        K = self.num_tasks
        if isinstance(losses, torch.Tensor):
            if losses.dim() != 1 or losses.shape[0] != K:
                raise ValueError(
                    f"closure returned a tensor of shape {tuple(losses.shape)}; "
                    f"expected K={K} task losses "
                    f"(a [{K}] tensor or a sequence of {K} scalar tensors)"
                )
            items = list(losses.unbind(0))
        elif isinstance(losses, Sequence) and not isinstance(losses, str):
            items = list(losses)
            if len(items) != K:
                raise ValueError(
                    f"closure returned {len(items)} losses, expected one per task (K={K})"
                )
            for i, l in enumerate(items):
                if not isinstance(l, torch.Tensor):
                    raise TypeError(f"loss {i} is a {type(l).__name__}, expected a scalar tensor")
                if l.dim() != 0:
                    raise ValueError(
                        f"loss {i} is not a scalar: shape {tuple(l.shape)} "
                        "(reduce it, e.g. .mean())"
                    )
        else:
            raise TypeError(
                f"closure must return K={K} task losses (sequence or [K] tensor), "
                f"got {type(losses).__name__}"
            )
        for i, l in enumerate(items):
            if not l.is_floating_point():
                raise TypeError(f"loss {i} has dtype {l.dtype}; losses must be floating point")
            if l.device != self.device:
                raise ValueError(f"loss {i} is on {l.device}, the parameters on {self.device}")
            if need_grad and not l.requires_grad:
                raise ValueError(
                    f"loss {i} does not require grad (computed under torch.no_grad(), "
                    "from detached tensors, or from no trainable parameter?)"
                )
        return items

    # ---------------------------------------------------------------- step helpers
    def _begin(
        self, closure: Closure | None, grad_scaler: Any, micro_batches: int | None = None
    ) -> tuple[Tensor, Tensor]:
        """Checks, backups, grad views; returns (scale, inv_scale) as fp32 device scalars."""
        if closure is None or not callable(closure):
            raise TypeError(
                f"{type(self).__name__}.step needs a closure that returns the K task losses "
                "at the current weights"
            )
        if micro_batches is not None and (
            isinstance(micro_batches, bool)
            or not isinstance(micro_batches, int)
            or micro_batches < 1
        ):
            raise ValueError(f"micro_batches must be a positive int, got {micro_batches!r}")
        for i, group in enumerate(self.param_groups):  # a scheduler may have changed them
            self._check_hyperparameters(i, group)
        self._check_grad_scaler(grad_scaler)
        self._check_trainable()
        flats = [self._shared] + [h for h in self._heads if h is not None]
        for f in flats:
            f.check_intact()
        self._micro_batches = micro_batches
        if self._sync is not None:
            self._sync.begin_step()
        with torch.no_grad():
            for f in flats:
                if f.sharded:
                    f.pull()  # the base optimizer stepped the shards themselves
                f.backup.copy_(f.theta)
        for f in flats:
            f.attach_grads()
        # a skipped step must leave the weighting's state (EMAs, learnt weights, streams) as it is
        self._weighting_snapshot = self.weighting.snapshot()
        one = torch.ones((), dtype=torch.float32, device=self.device)
        if grad_scaler is None or not grad_scaler.is_enabled():
            return one, one
        scale = grad_scaler.scale(one)  # the scaler's current scale, on the device, no sync
        return scale, 1.0 / scale

    def _step_without_closure(self) -> Tensor:
        """``step(closure=None)``: only what ``torch.distributed.checkpoint`` does to an optimizer
        that has no state yet (``_init_optim_state``: zero gradients, every ``lr`` set to 0): the
        base optimizer steps once to create its state; the weights are put back bitwise. Returns
        K NaN losses (no forward ran). Any other call without a closure is an error."""
        name = type(self).__name__
        if self.state or any(float(g.get("lr", 0.0)) != 0.0 for g in self.param_groups):
            raise TypeError(
                f"{name}.step needs a closure that returns the K task losses at the current "
                "weights (step(closure=None) only initializes an empty state at lr=0, as "
                "torch.distributed.checkpoint's get/set_optimizer_state_dict do)"
            )
        flats = [self._shared] + [h for h in self._heads if h is not None]
        with torch.no_grad():
            for f in flats:
                if f.sharded:
                    f.pull()
                f.backup.copy_(f.theta)
            self.base_optimizer.step()
            for f in flats:
                f.revert_where(torch.ones((), dtype=torch.bool, device=self.device))
        return torch.full((self.num_tasks,), float("nan"), device=self.device)

    def _check_grad_scaler(self, grad_scaler: Any) -> None:
        if grad_scaler is None:
            return
        if not all(
            callable(getattr(grad_scaler, m, None)) for m in ("is_enabled", "scale", "unscale_")
        ):
            raise TypeError(
                f"grad_scaler must be a torch.amp.GradScaler, got {type(grad_scaler).__name__}"
            )
        sync = self._sync
        if grad_scaler.is_enabled() and sync is not None and sync.min_local_numel == 0:
            raise ValueError(
                "a rank holds no element of the FSDP2-sharded shared parameters, so its "
                "GradScaler could not see this step's found-inf; shard fewer ranks' worth of "
                "parameters or train in bfloat16 without a GradScaler"
            )
        if grad_scaler.is_enabled() and any(
            p.dtype == torch.float16 for g in self.param_groups for p in g["params"]
        ):
            raise ValueError(
                "GradScaler does not unscale float16 gradients (torch's rule): keep the parameters "
                "in float32 and run the forward under torch.autocast(dtype=torch.float16)"
            )

    @property
    def _micro(self) -> range:
        """The micro-batch indices of the current step (``range(1)`` without micro-batches)."""
        return range(self._micro_batches or 1)

    def _forward(
        self, closure: Closure, micro: int = 0, *, grad: bool, perturbed: bool
    ) -> list[Tensor]:
        """One closure call: ``closure()``, or ``closure(micro)`` when the step has
        ``micro_batches``.

        The parameters have no ``.grad`` during the call, so a ``zero_grad()`` in the closure
        (the optimizer's or the model's, either ``set_to_none``) touches none of the step's
        buffers; a closure that runs a backward pass itself is refused (its gradients would
        otherwise be lost, or counted twice)."""
        ctx = frozen_running_stats() if perturbed else contextlib.nullcontext()
        scope = self._sync.forward_scope() if self._sync is not None else contextlib.nullcontext()
        flats = [self._shared] + [h for h in self._heads if h is not None]
        for f in flats:
            for p in f.params:
                p.grad = None
        try:
            with scope, ctx, torch.set_grad_enabled(grad):
                losses = closure() if self._micro_batches is None else closure(micro)  # type: ignore[call-arg]
            given = next(
                (i for f in flats for i, p in enumerate(f.params) if p.grad is not None), None
            )
        finally:
            for f in flats:
                f.attach_grads()
        if given is not None:
            raise RuntimeError(
                f"the closure gave the parameters gradients (it called backward() or set .grad): "
                f"{type(self).__name__} runs the backward passes itself. Return the K task losses "
                "from the closure without calling backward() (calling zero_grad() there is fine)"
            )
        return self._check_losses(losses, need_grad=grad)

    def _mean_losses(self, per_micro: list[Tensor]) -> Tensor:
        """The mean over the micro-batches of their detached ``[K]`` losses: the step's clean
        losses (a non-finite one skips the step, see :meth:`_finish`)."""
        total = per_micro[0]
        for more in per_micro[1:]:
            total = total + more
        self._clean_losses = total if len(per_micro) == 1 else total / len(per_micro)
        return self._clean_losses

    def _backward(
        self, loss: Tensor, seed: Tensor, task: int | None, *, retain_graph: bool = False
    ) -> None:
        """Backward of ``loss`` seeded with ``seed`` into the shared params and head ``task`` (all
        heads if None). With M micro-batches the seed is ``seed / M``: the gradients of the M
        backward passes add up to the gradient of their mean loss.

        No ``inputs`` are named (reentrant gradient checkpointing refuses them, and with FSDP2
        autograd must reach the unsharded parameters it gathers): the other heads have no
        ``.grad`` during the pass, so whatever reaches them is dropped. Normalization layers run
        again by gradient checkpointing keep their running statistics
        (:func:`~mtlsam_fast.optim.running_stats.frozen_running_stats`). On the first step (and
        after :meth:`load_state_dict`) the pass checks that the losses reach the parameters."""
        others = [h for k, h in enumerate(self._heads) if h is not None and k != task]
        if task is None:
            others = []
        for h in others:
            for p in h.params:
                p.grad = None
        if loss.dtype not in (torch.float32, torch.float64):
            loss = (
                loss.float()
            )  # like GradScaler: seed a 16-bit loss's backward in fp32 (no overflow of the scale)
        seed = seed.to(loss.dtype)
        if self._micro_batches is not None and self._micro_batches > 1:
            seed = seed / self._micro_batches  # in the loss's precision (1/3 is inexact in fp32)
        watched = self._watch_reached(task) if self._check_reached else None
        try:
            # (inside a perturbed pass's block this joins it; alone, around a clean forward's
            # backward, checkpointing's recomputation must build the forward's graph: save mode)
            with frozen_running_stats(switch_off=False):
                torch.autograd.backward(loss, grad_tensors=seed, retain_graph=retain_graph)
        finally:
            for h in others:
                h.attach_grads()
            if watched is not None:
                for handle in watched[1]:
                    handle.remove()
        if watched is not None:
            self._raise_unreached(watched[0], task)

    def _watch_reached(self, task: int | None) -> tuple[set[int], list[Any]]:
        """Hooks that record which groups (-1: shared, k: head k) of a backward pass's targets
        receive a gradient (not for FSDP2 shards, whose gradients FSDP2 assigns)."""
        reached: set[int] = set()
        if self._sync is not None and self._sync.sharded:
            return reached, []
        groups = [(-1, self._shared)]
        groups += [
            (k, h)
            for k, h in enumerate(self._heads)
            if h is not None and (task is None or k == task)
        ]
        handles = []
        for key, flat in groups:
            for p in flat.params:
                handles.append(
                    p.register_post_accumulate_grad_hook(lambda _, key=key: reached.add(key))
                )
        return reached, handles

    def _raise_unreached(self, reached: set[int], task: int | None) -> None:
        """Refuse a step whose losses do not depend on a whole parameter group: the parameters
        the optimizer holds are no longer the model's (``model.load_state_dict(...,
        assign=True)`` or a rebuilt module after the optimizer was built)."""
        if self._sync is not None and self._sync.sharded:
            return
        missing = [] if -1 in reached else ["shared_params"]
        missing += [
            f"task_params[{k}]"
            for k, h in enumerate(self._heads)
            if h is not None and (task is None or k == task) and k not in reached
        ]
        if missing:
            loss = "the mean loss" if task is None else f"loss {task}"
            raise RuntimeError(
                f"no parameter of {', '.join(missing)} received a gradient from {loss}: the "
                f"parameters {type(self).__name__} holds are not the ones the closure's model "
                "uses (was model.load_state_dict(..., assign=True) called, or a module replaced, "
                "after the optimizer was built?). Build the optimizer after loading with "
                "assign=True, or load without assign (copies into the same parameters)"
            )

    def _task_gradient_ready(self, i: int, *, rows: str = "shard") -> None:
        """Row ``i`` of ``G`` and head ``i``'s gradient are complete on this rank (distributed:
        start their reduction, ``rows`` as in :meth:`mtlsam_fast.distributed.Synchronizer.
        gradient_ready`; with ``"keep"`` the head keeps its own gradient too)."""
        if self._sync is not None:
            if rows == "shard" and self.weighting.needs_grads:
                rows = "full"  # the weighting reads the whole averaged rows
            self._sync.gradient_ready(i, self._gbuf.G[i], rows=rows)
            if rows != "keep":
                self._sync.head_ready(self._heads[i])

    def _capture_task_gradients(
        self, closure: Closure, scale: Tensor, *, rows: str = "shard"
    ) -> Tensor:
        """Clean forward, then K backward passes: task i's shared gradient into row i of G and its
        head's gradient into the head buffer (per micro-batch, accumulated). Returns the K detached
        clean losses (distributed: averaged over the ranks)."""
        K, last = self.num_tasks, len(self._micro) - 1
        per_micro = []
        for m in self._micro:
            losses = self._forward(closure, m, grad=True, perturbed=False)
            per_micro.append(torch.stack([l.detach() for l in losses]))
            for i in range(K):
                if m == 0 and (h := self._heads[i]) is not None:
                    h.grad.zero_()
                with self._gbuf.capture(i, accumulate=m > 0):
                    self._backward(losses[i], scale, i, retain_graph=i < K - 1)
                if m == last:
                    self._task_gradient_ready(i, rows=rows)
            del losses
        det = self._mean_losses(per_micro)
        if self._sync is not None:
            self._sync.losses_ready(det)
        return det

    def _weights(self, gram: Tensor, inv_scale: Tensor, losses: Tensor) -> Tensor:
        """The weighting's result -- K task weights, or a ``[P]`` direction in the units of ``G``
        (``returns_direction``) -- from the Gram of the scaled gradients, unscaled first so every
        weighting sees true values; plus the losses and ``G`` itself for the methods that read
        them (:class:`~mtlsam_fast.weighting.base.Inputs`)."""
        wt = self.weighting
        g = gram * (inv_scale * inv_scale).to(gram.dtype)
        return wt(
            g,
            losses.to(g.dtype) if wt.needs_losses else None,
            grads=self._gbuf.G if wt.needs_grads else None,
            inv_scale=inv_scale,
        )

    def _aggregate(
        self,
        inv_scale: Tensor,
        losses: Tensor,
        out: Tensor,
        *,
        subtract: bool = False,
        name: str,
    ) -> Tensor:
        """``out <- w^T G`` (``subtract``: ``out <- out - w^T G``) with ``w`` the weighting of
        ``G``'s rows; returns ``Gram(G)`` (scaled like ``G``). The Gram and the weights are kept
        as the step record's aggregation ``name`` (``"loss"``, ``"flat"``, ``"perturbed"``:
        monitor.py).

        Plain MGDA (``normalization="none"``) takes :func:`mtlsam_fast.ops.min_norm_aggregate`: on
        the fused backends, Gram, QP and combine run in two launches and the weights never leave
        the device (its weights are invariant to the gradient scale, so no unscaling is needed).
        Every other weighting: ``ops.gram``, the weighting (:meth:`_weights`), then ``ops.combine``
        of its weights, or its direction copied into (subtracted from) ``out``.
        """
        G, be, wt, sync = self._gbuf.G, self.backend, self.weighting, self._sync
        if sync is not None:  # distributed: the Gram and direction of the rank-averaged rows
            gram = sync.gram(G, be)
            result = self._weights(gram, inv_scale, losses)
            if wt.returns_direction and subtract:  # from whole rows, the same on every rank
                out.sub_(result)
            elif wt.returns_direction:
                out.copy_(result)
            else:
                sync.combine(result, G, out, subtract=subtract, backend=be)
        elif type(wt) is _MGDA and wt.normalization == "none" and wt.backend in (None, be):
            fused = ops.min_norm_aggregate(
                G, out, subtract=subtract, max_iter=wt.max_iter, tol=wt.tol, backend=be
            )
            gram, result = fused.gram, fused.weights
        else:
            gram = ops.gram(G, backend=be)
            result = self._weights(gram, inv_scale, losses)
            if wt.returns_direction and subtract:
                out.sub_(result)
            elif wt.returns_direction:
                out.copy_(result)
            else:
                ops.combine(result, G, out=out, subtract=subtract, backend=be)
        self._features.record(
            name,
            gram,
            result,
            inv_scale,
            returns_direction=wt.returns_direction,
            reads_grads=wt.needs_grads,
        )
        return gram

    def _perturb_head(self, k: int, scale: Tensor) -> None:
        h, group = self._heads[k], self._head_group[k]
        if h is not None and group is not None:
            adaptive = self.param_groups[group].get("adaptive", False)
            ops.perturb(
                h.theta,
                h.backup,
                h.whole,
                direction=h.grad,
                scale=scale,
                adaptive=adaptive,
                backend=self.backend,
            )

    def _restore(self, k: int | None) -> None:
        flats = [self._shared]
        if k is not None and (h := self._heads[k]) is not None:
            flats.append(h)
        for f in flats:
            ops.restore(f.theta, f.backup)
            if self._sync is not None:
                self._sync.after_restore(f)

    def _head_scales(self) -> tuple[Tensor, Tensor]:
        """Per head: its group's ``rho`` / ||h_k|| (ASAM with its group's ``adaptive``: of
        ||T h_k||), as scalar tensors stacked, and a not-finite flag of the norms."""
        if self._sync is not None:
            self._sync.wait()  # the replicated heads' averaged gradients
        scales, bad = [], torch.zeros((), dtype=torch.bool, device=self.device)
        for h, index in zip(self._heads, self._head_group):
            if h is None or index is None:
                scales.append(torch.zeros((), device=self.device))
                continue
            group = self.param_groups[index]
            n = h.norm(h.grad, group.get("adaptive", False), self.backend)
            bad = bad | ~torch.isfinite(n)
            scales.append(_safe_scale(group["rho"], n))
        return torch.stack(scales), bad

    def _finish(self, bad: Tensor, grad_scaler: Any) -> None:
        """Set the found-inf flag (``bad``, a non-finite clean loss or a non-finite final
        gradient), unscale through the scaler, step the base optimizer guarded by the flag."""
        self._check_reached = False  # this step's backward passes reached every group
        if self._sync is not None:
            self._sync.wait()
        grads = [self._shared.grad] + [h.grad for h in self._heads if h is not None]
        nonfinite = torch.stack([~torch.isfinite(g).all() for g in grads])
        found = bad.reshape(()) | nonfinite.any() | ~torch.isfinite(self._clean_losses).all()
        if self._sync is not None:
            found = self._sync.any(found)  # a NaN on any rank skips the step on every rank
        if grad_scaler is not None and grad_scaler.is_enabled():
            # The scaler records inf/NaN in the gradients it unscales; one NaN stands for this
            # step's other triggers (norms, SAMO's estimates), so scaler.update() backs off too.
            # (FSDP2: every rank holds part of the shared parameters, see _check_grad_scaler)
            self._shared.grad[:1].masked_fill_(found.reshape(1), float("nan"))
            grad_scaler.unscale_(self)
        found = self._features.before_base_step(self, found)  # hooks, clipping, record
        self._found_inf = found.reshape(1).to(torch.float32)
        self.weighting.restore_where(found, self._weighting_snapshot)
        self._guarded_base_step(found)
        if self._sync is not None:
            self._sync.end_step()

    @torch.no_grad()
    def _guarded_base_step(self, skip: Tensor) -> None:
        if self._state_has_host_values:
            # A base optimizer that keeps host-side (non-tensor) state cannot be rolled back on the
            # device; this is the only path that reads the flag on the host.
            if bool(skip):
                return
            self.base_optimizer.step()
            return
        if self._native_found_inf:
            # torch's fused Adam/AdamW read these attributes (as set by GradScaler.step): the kernel
            # leaves parameters and moments alone when found_inf is 1, and the step count is
            # incremented then decremented by the flag, all on the device. (Attributes that
            # torch.optim.Optimizer's type does not declare, hence the untyped alias.)
            opt: Any = self.base_optimizer
            opt.grad_scale = None
            opt.found_inf = skip.reshape(()).to(torch.float32)
            try:
                self.base_optimizer.step()
            finally:
                del opt.grad_scale, opt.found_inf
            return
        # (optimizer state of DTensor parameters is a DTensor: its local shard is snapshotted)
        local = _distributed.local_tensor
        params = [p for g in self.base_optimizer.param_groups for p in g["params"]]
        snapshot: dict[tuple[int, str], Tensor] = {}
        host: dict[tuple[int, str], Any] = {}  # the state's other values, and which keys exist
        for p in params:
            for key, val in self.base_optimizer.state.get(p, {}).items():
                if isinstance(val, torch.Tensor):
                    snapshot[(id(p), key)] = local(val).clone()
                else:
                    host[(id(p), key)] = copy.deepcopy(val)
        self.base_optimizer.step()
        flats = [self._shared] + [h for h in self._heads if h is not None]
        for f in flats:
            f.revert_where(skip)
        for p in params:
            for key, val in self.base_optimizer.state.get(p, {}).items():
                if isinstance(val, torch.Tensor):
                    v = local(val)
                    old = snapshot.get((id(p), key))
                    if old is None:
                        old = torch.zeros((), dtype=v.dtype, device=v.device)
                    s = skip if v.device == skip.device else skip.to(v.device)
                    v.copy_(torch.where(s, old, v))
                elif isinstance(val, (int, float)) and not isinstance(val, bool):
                    self._state_has_host_values = True
        if self._state_has_host_values and bool(skip):
            # The step that first shows host-side state cannot be undone on the device: read the
            # flag on the host (as every later step does, above) and put the state back exactly.
            for p in params:
                state = self.base_optimizer.state.get(p, {})
                for key in list(state):
                    if (id(p), key) in host:
                        state[key] = host[(id(p), key)]
                    elif (id(p), key) not in snapshot:
                        del state[key]  # made by the skipped step

    # ---------------------------------------------------------------- public API
    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the parameters' ``.grad`` (the optimizer re-attaches its own buffers at each
        step)."""
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def distributed(self) -> _distributed.Synchronizer | None:
        """How this optimizer synchronizes (its process group, rank, the bytes it sent in the last
        step: :class:`mtlsam_fast.distributed.Synchronizer`), or ``None`` (one process)."""
        return self._sync

    @property
    def found_inf(self) -> Tensor | None:
        """The last step's device flag ([1], fp32): 1 when the step was skipped (inf/NaN)."""
        return getattr(self, "_found_inf", None)

    # ------------------------------------------------------------ monitoring, hooks (monitor.py)
    @property
    def last_step(self) -> StepRecord | None:
        """The last completed step's record (device tensors, no host sync): its aggregations by
        name -- ``record["loss"].weights``, ``.gram``, ``.norms``, ``.cosines`` -- and
        ``record.skipped``; ``None`` before the first step or with :attr:`monitoring` off."""
        return self._features.last if self._features.monitoring else None

    @property
    def monitoring(self) -> bool:
        """Record each step's aggregations in :attr:`last_step` (default True)."""
        return self._features.monitoring

    @monitoring.setter
    def monitoring(self, on: bool) -> None:
        self._features.monitoring = flag("monitoring", on)
        self._features.last = None

    def register_direction_hook(self, hook: DirectionHook) -> torch.utils.hooks.RemovableHandle:
        """Call ``hook(optimizer, direction, skipped)`` at every step between "direction
        computed" and "base optimizer steps": ``direction`` is the flat ``[P]`` shared direction
        (the shared parameters' ``.grad``, unscaled, before ``max_grad_norm`` clipping; with
        FSDP2-sharded shared parameters, this rank's shard), which the hook may modify in place;
        ``skipped`` is the step's found-inf flag (0-d bool, on the device): the hook runs on
        skipped steps too (no host sync), so a stateful hook guards its state with it
        (``torch.where``). A direction the hook leaves non-finite skips the step.
        Hooks run in registration order (distributed: register the same ones on every rank; the
        direction is checked across the ranks after them); returns a handle whose ``remove()``
        unregisters it."""
        return self._features.register(hook)

    def _extra_state(self) -> dict[str, Any]:
        """A subclass's own entries of the :data:`STATE_KEY` state (e.g. SAMO's seed)."""
        return {}

    def _load_extra_state(self, state: dict[str, Any]) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        """torch's layout, ``{"state": ..., "param_groups": [...]}`` (the base optimizer's, whose
        groups hold this optimizer's hyperparameters too), with this optimizer's own state -- K,
        the classes, the parameter shapes per group, the weighting's state, the step counter --
        under ``param_groups[0][STATE_KEY]``. A resumed run is bitwise identical."""
        sd = self.base_optimizer.state_dict()
        sd["param_groups"][0][STATE_KEY] = {
            "format": STATE_FORMAT,
            "optimizer": type(self).__name__,
            "base_optimizer": type(self.base_optimizer).__name__,
            "num_tasks": self.num_tasks,
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
            "weighting": {
                "class": type(self.weighting).__name__,
                "options": _weighting_options(self.weighting),
                "state": self.weighting.state_dict(),
            },
            "step_count": self._step_count,
            **self._extra_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a :meth:`state_dict` (or one of the format before hyperparameters moved into the
        param groups). Everything is checked first -- this optimizer's class, K, the base
        optimizer's and the weighting's classes, the weighting's options, the parameter shapes, the
        hyperparameters and the other group values' types, the structure of the base optimizer's
        state and the shapes of its tensors, the weighting's state, the counters -- so a mismatch
        or a corrupted state raises before anything is replaced. The base optimizer's
        implementation flags (``foreach``, ``fused``, ``capturable``, ``differentiable``) stay this
        optimizer's: they choose how it runs here, not what it computes."""
        sd = self._upgrade_state_dict(state_dict)
        groups = [dict(g) for g in sd["param_groups"]]
        mine = groups[0].pop(STATE_KEY)
        if not isinstance(mine.get("weighting"), dict) or not isinstance(
            mine["weighting"].get("state"), dict
        ):
            raise ValueError(
                f"corrupted state_dict: param_groups[0][{STATE_KEY!r}]['weighting'] must be a "
                "dict with a 'state' dict"
            )
        for key in ("step_count", *self._extra_state()):
            value = mine.get(key, 0)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"corrupted state_dict: {key} is {value!r}, expected an int >= 0")
        expected = {
            "optimizer": type(self).__name__,
            "base_optimizer": type(self.base_optimizer).__name__,
            "num_tasks": self.num_tasks,
            "shapes": [[list(p.shape) for p in g["params"]] for g in self.param_groups],
        }
        expected_weighting = type(self.weighting).__name__
        for key, want in expected.items():
            got = mine.get(key)
            if got is not None and got != want:
                raise ValueError(
                    f"state_dict does not match this optimizer: {key} is {got!r} "
                    f"in the state_dict, {want!r} here"
                )
        got_weighting = mine["weighting"].get("class")
        if got_weighting is not None and got_weighting != expected_weighting:
            raise ValueError(
                f"state_dict does not match this optimizer: the weighting is "
                f"{got_weighting!r} in the state_dict, {expected_weighting!r} here"
            )
        got_options = mine["weighting"].get("options")
        if got_options is not None and got_options != _weighting_options(self.weighting):
            raise ValueError(
                f"state_dict does not match this optimizer: the weighting's options are "
                f"{got_options!r} in the state_dict, {_weighting_options(self.weighting)!r} here"
            )
        if len(groups) != len(self.param_groups):
            raise ValueError(
                f"state_dict has {len(groups)} param groups, this optimizer "
                f"{len(self.param_groups)}"
            )
        for i, (group, current) in enumerate(zip(groups, self.param_groups)):
            # absent from state dicts of format 1: keep the current (constructor) values
            for name in self.HYPERPARAMETERS:
                group.setdefault(name, current[name])
            self._check_hyperparameters(i, group)
            _check_group_values(i, group, current)
            for flag_name in _IMPLEMENTATION_FLAGS:
                if flag_name in current:
                    group[flag_name] = current[flag_name]
        self._check_base_state(sd["state"], groups)
        copy.deepcopy(self.weighting).load_state_dict(mine["weighting"]["state"])  # raises first
        self.base_optimizer.load_state_dict({**sd, "param_groups": groups})
        self.param_groups = self.base_optimizer.param_groups  # load_state_dict rebinds the list
        self.state = self.base_optimizer.state
        self.weighting.load_state_dict(mine["weighting"]["state"])
        self._step_count = int(mine["step_count"])
        self._load_extra_state(mine)
        self._check_reached = True  # a resumed model may hold new parameters (assign=True)

    def _check_base_state(self, state: Any, groups: list[dict[str, Any]]) -> None:
        """The base optimizer's saved state fits these parameters: entries keyed by the groups'
        parameter indices, dicts of named values; for torch's built-in optimizers every tensor is
        a scalar (a step count) or shaped like its parameter (moments, buffers)."""
        if not isinstance(state, dict):
            raise ValueError(
                f"corrupted state_dict: 'state' is a {type(state).__name__}, not a dict"
            )
        params: dict[Any, Tensor] = {}
        for i, (group, current) in enumerate(zip(groups, self.param_groups)):
            ids = group.get("params")
            if not isinstance(ids, list) or len(ids) != len(current["params"]):
                raise ValueError(
                    f"state_dict's param_groups[{i}]['params'] lists "
                    f"{len(ids) if isinstance(ids, list) else ids!r} parameters, this optimizer's "
                    f"{len(current['params'])}"
                )
            params.update(zip(ids, current["params"]))
        builtin = type(self.base_optimizer) in _SHAPED_STATE_OPTIMIZERS
        for key, entry in state.items():
            if key not in params:
                raise ValueError(
                    f"corrupted state_dict: state entry {key!r} belongs to no parameter of the "
                    f"param groups"
                )
            if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
                raise ValueError(
                    f"corrupted state_dict: state[{key!r}] must be a dict of named values"
                )
            p = params[key]
            shapes = (p.shape, _distributed.local_tensor(p).shape)  # FSDP2: global or local
            for name, value in entry.items():
                shaped = builtin and isinstance(value, torch.Tensor) and value.dim() != 0
                if shaped and value.shape not in shapes:
                    raise ValueError(
                        f"state_dict does not match this optimizer: state[{key!r}][{name!r}] "
                        f"has shape {tuple(value.shape)}, its parameter {tuple(p.shape)}"
                    )

    def _upgrade_state_dict(self, sd: Any) -> dict[str, Any]:
        """``sd`` in the current format (format 1 is converted), or a clear error."""
        name = type(self).__name__
        if not isinstance(sd, dict):
            raise TypeError(f"a {name} state_dict is a dict, got {type(sd).__name__}")
        if {"base_optimizer", "weighting", "step_count"} <= set(sd):  # format 1
            base = sd["base_optimizer"]
            groups = [dict(g) for g in base["param_groups"]]
            groups[0][STATE_KEY] = {
                "format": 1,
                "weighting": {"state": sd["weighting"]},
                "step_count": sd["step_count"],
                **sd.get("extra", {}),
            }
            return {"state": base["state"], "param_groups": groups}
        if not {"state", "param_groups"} <= set(sd) or not sd["param_groups"]:
            raise ValueError(
                f"not a {name} state_dict: expected the keys 'state' and "
                f"'param_groups', got {sorted(sd)}"
            )
        if not isinstance(sd["param_groups"], list) or not all(
            isinstance(g, dict) for g in sd["param_groups"]
        ):
            raise ValueError(f"corrupted {name} state_dict: 'param_groups' must be a list of dicts")
        if STATE_KEY not in sd["param_groups"][0]:
            raise ValueError(
                f"not a {name} state_dict: param_groups[0] has no {STATE_KEY!r} entry (a plain "
                "torch.optim state_dict? load that into opt.base_optimizer instead)"
            )
        if not isinstance(sd["param_groups"][0][STATE_KEY], dict):
            raise ValueError(f"corrupted {name} state_dict: its {STATE_KEY!r} entry is not a dict")
        fmt = sd["param_groups"][0][STATE_KEY].get("format")
        if fmt != STATE_FORMAT:
            raise ValueError(
                f"{name} state_dict of format {fmt!r}; this version reads formats 1 "
                f"and {STATE_FORMAT}"
            )
        return sd

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(K={self.num_tasks}, P={self._shared.global_numel}, "
            f"weighting={self.weighting!r}, base_optimizer={self.base_optimizer!r})"
        )
