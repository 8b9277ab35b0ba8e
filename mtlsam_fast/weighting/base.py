"""The weighting interface: what a multi-task method sees at one aggregation -> K task weights.

One call, :meth:`Weighting.__call__`, takes an :class:`Inputs` record's fields:

* ``gram`` -- the K x K Gram matrix of the (true, unscaled) task gradients: always given;
* ``losses`` -- the K task losses, for methods with ``needs_losses`` (loss-based weightings such as
  UW, DWA, FAMO are a function of the losses and their own state only);
* ``grads`` -- the K x P task gradients themselves, for methods with ``needs_grads`` (GradDrop,
  MoCo, ExcessMTL, trimmed mean); ``grads * inv_scale`` are the true gradients (``inv_scale`` is
  ``1 / scale`` under a GradScaler, else omitted).

It returns K weights, the update direction being ``d = weights^T G``; methods with
``returns_direction`` (GradDrop, MoCo, trimmed mean: their direction is not a combination of the
current rows) return ``d`` itself, a ``[P]`` tensor in the units of ``grads``.

State: a stateful weighting keeps every tensor it carries between calls in one dict (its
:attr:`Weighting.STATE` names), created at the first call by ``_fresh_state`` and updated in place,
so a CUDA graph replay updates it too. :meth:`snapshot` / :meth:`restore_where` let the optimizers
undo a skipped step on the device (no host sync); ``state_dict`` / ``load_state_dict`` round-trip it
bitwise.

Weightings run on the Gram's device, never read a tensor value on the host and use fixed
iteration budgets, so a whole aggregation step can be captured in a CUDA graph or traced by
``torch.compile(fullgraph=True)``. On the CPU their K x K work runs on one intra-op thread
(:func:`mtlsam_fast.ops.threads.single_threaded`): multi-threaded small ops stall for
milliseconds when other processes (data-loader workers) hold the cores. Methods that read the
gradients run on torch's thread count, unless the gradients are small (fewer than
:data:`~mtlsam_fast.ops.threads.GRAIN` elements).

Every weighting takes the common options (:data:`COMMON_OPTIONS`: ``backend``, the ops backend of
its QP / Gram calls); an unknown option raises a ``ValueError`` naming it and listing the valid
ones.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, NamedTuple

import torch

from ..ops import _registry
from ..ops.threads import single_threaded

Tensor = torch.Tensor

#: options every weighting accepts
COMMON_OPTIONS = ("backend",)


class Inputs(NamedTuple):
    """What a weighting sees at one aggregation (see the module docstring)."""

    gram: Tensor  #: [K, K] Gram of the true task gradients
    losses: Tensor | None  #: [K] task losses (when ``needs_losses``)
    grads: Tensor | None  #: [K, P] task gradients times the loss scale (when ``needs_grads``)
    inv_scale: Tensor | None  #: 0-d: ``grads * inv_scale`` are the true gradients (None: 1)


# ------------------------------------------------------------------------------ option checks
def check_gram(gram: Tensor) -> int:
    """Validate a Gram matrix from metadata only; returns K."""
    if not isinstance(gram, torch.Tensor):
        raise TypeError(f"gram must be a torch.Tensor, got {type(gram).__name__}")
    if gram.dim() != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(
            f"gram must be a non-empty square K x K matrix, got shape {tuple(gram.shape)}"
        )
    if not gram.is_floating_point():
        raise TypeError(f"gram must be floating point, got {gram.dtype}")
    return gram.shape[0]


def check_number(
    name: str,
    value: Any,
    *,
    low: float = -math.inf,
    high: float = math.inf,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """A finite real number in the interval ``[low, high]`` (ends excluded when open)."""
    ok = (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
        and (value < high if high_open else value <= high)
    )
    if not ok:
        lo = "(" if low_open else "["
        hi = ")" if high_open else "]"
        raise ValueError(f"{name} must be a finite number in {lo}{low}, {high}{hi}, got {value!r}")
    return float(value)


def check_nonnegative(**options: float) -> None:
    """Each option is a finite number >= 0."""
    for name, value in options.items():
        check_number(name, value, low=0.0)


def check_int(name: str, value: Any, *, low: int = 1) -> int:
    """An int >= ``low`` (not a bool, not a float)."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> Any:
    if isinstance(value, bool) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {value!r}")
    return value


def check_vector(
    name: str,
    value: Any,
    *,
    nonnegative: bool = False,
    positive_sum: bool = False,
    low: float | None = None,
    high: float | None = None,
) -> Tensor | None:
    """None, or a finite 1-D float64 tensor (a copy, on the CPU) from a tensor or a sequence.

    ``nonnegative``: entries >= 0; ``positive_sum``: and not all zero (a preference direction);
    ``low``/``high``: entries in ``[low, high]``. Checked on the host at construction, once.
    """
    if value is None:
        return None
    try:
        t = torch.as_tensor(value).detach().to(device="cpu", dtype=torch.float64).clone()
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a 1-D sequence of numbers, got {value!r}") from None
    if t.dim() != 1 or t.numel() < 1:
        raise ValueError(f"{name} must be a non-empty 1-D vector, got shape {tuple(t.shape)}")
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} must be finite, got {t.tolist()}")
    if (nonnegative or positive_sum) and bool((t < 0).any()):
        raise ValueError(f"{name} must be non-negative, got {t.tolist()}")
    if positive_sum and not bool(t.sum() > 0):
        raise ValueError(f"{name} must have a positive entry, got {t.tolist()}")
    if (low is not None and bool((t < low).any())) or (high is not None and bool((t > high).any())):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {t.tolist()}")
    return t


class VectorOption:
    """A per-task vector option (a preference vector, a reference point): checked by
    :func:`check_vector` whenever it is set, at construction and after (torchjd and the COSMOS
    paper reassign preferences between steps)."""

    def __init__(self, **checks: Any):
        self.checks = checks
        self.name = ""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, objtype: type | None = None) -> Any:
        if obj is None:
            return self
        return obj.__dict__.get("_" + self.name)

    def __set__(self, obj: Any, value: Any) -> None:
        obj.__dict__["_" + self.name] = check_vector(self.name, value, **self.checks)


def check_backend(backend: Any) -> str | None:
    if backend is not None and backend not in _registry.BACKEND_NAMES:
        raise ValueError(
            f"backend must be None or one of {_registry.BACKEND_NAMES}, got {backend!r}"
        )
    return backend


def vector_for(
    name: str, vec: Tensor, K: int, device: torch.device, dtype: torch.dtype = torch.float64
) -> Tensor:
    """A per-task option vector ``vec`` checked against K, on ``device`` (a static check)."""
    if vec.shape[0] != K:
        raise ValueError(f"{name} has {vec.shape[0]} entries but there are K={K} tasks")
    return vec.to(device=device, dtype=dtype)


def check_state_keys(name: str, state: Any, expected: set[str]) -> None:
    if not isinstance(state, dict) or set(state) != expected:
        got = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"weighting {name!r} expects state keys {sorted(expected)}, got {got}")


def _coordinate_dtype(grad_dtype: torch.dtype) -> torch.dtype:
    """The dtype of per-coordinate state for gradients of ``grad_dtype``."""
    return torch.float64 if grad_dtype == torch.float64 else torch.float32


def _checked_init(init: Callable[..., None]) -> Callable[..., None]:
    """``init`` raising a ValueError that lists the valid options for an unknown keyword."""
    params = list(inspect.signature(init).parameters.values())[1:]
    valid = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]

    @functools.wraps(init)
    def checked(self: Weighting, *args: Any, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(valid))
        if unknown:
            raise ValueError(
                f"unknown option{'s' if len(unknown) > 1 else ''} "
                f"{', '.join(map(repr, unknown))} for weighting {type(self).name!r}; "
                f"valid options: {', '.join(valid)}"
            )
        init(self, *args, **kwargs)

    return checked


# ------------------------------------------------------------------------------ the base class
class Weighting:
    """Base class. Subclasses implement :meth:`weights` (Gram and losses) or :meth:`compute`
    (anything in :class:`Inputs`); :meth:`__call__` validates first."""

    #: registry name (``mtlsam_fast.weighting.get(name)``)
    name: ClassVar[str] = ""
    #: whether the method needs the K task losses
    needs_losses: ClassVar[bool] = False
    #: whether the method needs the K x P task gradients themselves, not only their Gram
    needs_grads: ClassVar[bool] = False
    #: whether the result is the update direction ([P], units of ``grads``) instead of K weights
    returns_direction: ClassVar[bool] = False
    #: whether the method's own arithmetic already turns any non-finite input into all-NaN
    #: results (the shared QP does), so :meth:`__call__` skips its guard (checked by the tests)
    propagates_nonfinite: ClassVar[bool] = False
    #: names of the tensors a stateful weighting carries between calls (the first one's leading
    #: dimension is K)
    STATE: ClassVar[tuple[str, ...]] = ()
    #: whether that state has one entry per coordinate of the gradients (its size depends on P;
    #: the first STATE tensor is then K x P, kept in fp64 for fp64 gradients, fp32 otherwise)
    PER_COORDINATE_STATE: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "__init__" in cls.__dict__:
            cls.__init__ = _checked_init(cls.__dict__["__init__"])  # type: ignore[method-assign]

    def __init__(self, *, backend: str | None = None):
        self.backend = check_backend(backend)
        self._state: dict[str, Tensor] | None = None
        self._state_spec: tuple[int, torch.device, int | None] | None = None

    # ---------------------------------------------------------------- the call
    def __call__(
        self,
        gram: Tensor,
        losses: Tensor | None = None,
        *,
        grads: Tensor | None = None,
        inv_scale: Tensor | None = None,
    ) -> Tensor:
        K = check_gram(gram)
        self.check_num_tasks(K)
        if self.needs_losses or losses is not None:
            self._check_losses(losses, K, gram)
        if self.needs_grads or grads is not None:
            self._check_grads(grads, K, gram)
        x = Inputs(gram, losses, grads, inv_scale)
        # one thread for K x K work; methods that read the gradients keep torch's thread count for
        # their P-sized work unless it is small
        numel = grads.numel() if self.needs_grads and grads is not None else 0
        out = single_threaded(lambda: self.compute(x), gram.device, numel)
        if self.propagates_nonfinite:
            return out
        # NaN wherever an input is not finite: out + 0 * (the inputs' sum), the sum being NaN or
        # infinite exactly then (in float64: float32 inputs cannot overflow it); one add with
        # alpha=0 instead of isfinite().all() and a where, a third of their cost
        poison = gram.sum(dtype=torch.float64)
        if losses is not None and self.needs_losses:
            poison = poison + losses.sum(dtype=torch.float64)
        return torch.add(out, poison, alpha=0)

    def _check_losses(self, losses: Tensor | None, K: int, gram: Tensor) -> None:
        if losses is None:
            raise ValueError(
                f"weighting {self.name!r} needs the K task losses: call w(gram, losses)"
            )
        if not isinstance(losses, torch.Tensor) or losses.shape != (K,):
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses)
            raise ValueError(
                f"losses must be a tensor of shape ({K},) to match the {K}x{K} gram, got {shape}"
            )
        if not losses.is_floating_point():
            raise TypeError(f"losses must be floating point, got {losses.dtype}")
        if losses.device != gram.device:
            raise ValueError(f"losses are on {losses.device}, gram on {gram.device}")

    def _check_grads(self, grads: Tensor | None, K: int, gram: Tensor) -> None:
        if grads is None:
            raise ValueError(
                f"weighting {self.name!r} needs the K x P task gradients: call "
                "w(gram, grads=G) with G the [K, P] matrix whose Gram is gram"
            )
        if not isinstance(grads, torch.Tensor) or grads.dim() != 2 or grads.shape[0] != K:
            shape = tuple(grads.shape) if isinstance(grads, torch.Tensor) else type(grads)
            raise ValueError(f"grads must be a [{K}, P] tensor to match the gram, got {shape}")
        if not grads.is_floating_point():
            raise TypeError(f"grads must be floating point, got {grads.dtype}")
        if grads.device != gram.device:
            raise ValueError(f"grads are on {grads.device}, gram on {gram.device}")

    def _option_on(self, name: str, vec: Tensor, K: int, device: torch.device) -> Tensor:
        """:func:`vector_for`, copied to each device once per value (a host-to-device copy
        synchronizes)."""
        cache: dict[tuple[str, torch.device], tuple[Tensor, Tensor]] = self.__dict__.setdefault(
            "_on_device", {}
        )
        key = (name, device)
        if key not in cache or cache[key][0] is not vec or cache[key][1].shape[0] != K:
            cache[key] = (vec, vector_for(name, vec, K, device))
        return cache[key][1]

    def check_num_tasks(self, K: int) -> None:
        """Raise a ValueError when the method is not defined for K tasks (default: any K >= 1)."""

    def compute(self, x: Inputs) -> Tensor:
        """The result for validated inputs: K weights, or a [P] direction
        (``returns_direction``)."""
        return self.weights(x.gram, x.losses)

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        """K weights (fp32, or fp64 for an fp64 Gram) on ``gram.device``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- state
    def _fresh_state(self, K: int, device: torch.device, numel: int | None) -> dict[str, Tensor]:
        """The initial value of every :attr:`STATE` tensor for K tasks (``numel``: P, for
        per-coordinate state)."""
        raise NotImplementedError

    def _ensure_state(
        self, K: int, device: torch.device, numel: int | None = None
    ) -> dict[str, Tensor]:
        """The live state dict, created at the first call; raises if K (or P) changed."""
        if self._state is None or self._state_spec is None:
            self._state = self._fresh_state(K, device, numel)
            self._state_spec = (K, device, numel)
            return self._state
        k0, dev0, n0 = self._state_spec
        if (k0, n0) != (K, numel):
            what = f"K={K}" if k0 != K else f"P={numel}"
            raise ValueError(
                f"{type(self).__name__} state holds {k0} tasks"
                + (f" of {n0} coordinates" if n0 is not None else "")
                + f", this call has {what}; build a new weighting for another problem"
            )
        if dev0 != device:
            self._state = {k: v.to(device) for k, v in self._state.items()}
            self._state_spec = (K, device, numel)
        return self._state

    def init_state(
        self,
        num_tasks: int,
        device: torch.device,
        numel: int | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        """Create now the state the first call would create, for ``num_tasks`` tasks on
        ``device`` (``numel`` and ``dtype``: P and the gradients' dtype, for per-coordinate
        state), or check the existing state against them; a no-op without :attr:`STATE`. The
        optimizers call it when they are built, so that a fresh optimizer's ``state_dict()``
        already has the structure of a trained one: ``torch.distributed.checkpoint`` loads a
        checkpoint into the structure of the destination's state dict."""
        if not self.STATE:
            return
        if self.PER_COORDINATE_STATE and self._state is None and dtype is not None:
            self._dtype = _coordinate_dtype(dtype)
        self._ensure_state(num_tasks, device, numel if self.PER_COORDINATE_STATE else None)

    def _coordinate_state(self, grads: Tensor) -> dict[str, Tensor]:
        """The live per-coordinate state for the K x P gradients ``grads`` (created at the first
        call in their accumulation dtype, see :attr:`PER_COORDINATE_STATE`)."""
        K, P = grads.shape
        if self._state is None:
            self._dtype = _coordinate_dtype(grads.dtype)
        return self._ensure_state(K, grads.device, P)

    def _extra_state_tensors(self) -> dict[str, Tensor]:
        """Further live tensors updated in place (random streams); part of the snapshot."""
        return {}

    def snapshot(self) -> dict[str, Tensor] | None:
        """A copy of the state, for :meth:`restore_where` (None when stateless)."""
        live = {**(self._state or {}), **self._extra_state_tensors()}
        if not live and not self.STATE:
            return None
        return {k: v.clone() for k, v in live.items()}

    def restore_where(self, skip: Tensor, snapshot: dict[str, Tensor] | None) -> None:
        """Where the device flag ``skip`` is set, put the state back to ``snapshot`` (state created
        since the snapshot goes back to its fresh value): a skipped step leaves no trace."""
        if snapshot is None:
            return
        live = {**(self._state or {}), **self._extra_state_tensors()}
        fresh: dict[str, Tensor] = {}
        created = self._state is not None and any(k not in snapshot for k in self._state)
        if created and self._state_spec is not None:  # created since the snapshot
            fresh = self._fresh_state(*self._state_spec)
        for k, t in live.items():
            old = snapshot.get(k, fresh.get(k))
            if old is None:
                continue
            s = skip.reshape(()).to(t.device)
            t.copy_(torch.where(s, old.to(t.device), t))

    def state_dict(self) -> dict[str, Any]:
        """State needed to resume bitwise (EMA buffers, learnt parameters, random generators);
        empty when stateless. Stateful weightings: ``{name: tensor or None}`` per
        :attr:`STATE` entry (None before the first call)."""
        if not self.STATE:
            return {}
        return {k: None if self._state is None else self._state[k].clone() for k in self.STATE}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Load a :meth:`state_dict`; everything is checked before anything changes."""
        if not self.STATE:
            if state:
                raise ValueError(
                    f"weighting {self.name!r} is stateless but got state keys {sorted(state)}"
                )
            return
        self._state, self._state_spec = self._checked_state(state, set(self.STATE))

    def _checked_state(
        self, state: Any, expected: set[str]
    ) -> tuple[dict[str, Tensor] | None, tuple[int, torch.device, int | None] | None]:
        """Validate the STATE entries of a loaded state dict (all None, or tensors of the shapes a
        fresh state has); returns (state, spec) to assign."""
        check_state_keys(self.name, state, expected)
        values = {k: state[k] for k in self.STATE}
        if all(v is None for v in values.values()):
            return None, None
        if any(not isinstance(v, torch.Tensor) for v in values.values()):
            raise ValueError(
                f"weighting {self.name!r} state: {list(self.STATE)} must all be tensors or all "
                "be None"
            )
        K = values[self.STATE[0]].shape[0] if values[self.STATE[0]].dim() else 1
        numel = self._numel_from_state(values)
        dev = values[self.STATE[0]].device
        ref = self._fresh_state(K, dev, numel)
        for k, v in values.items():
            if v.shape != ref[k].shape:
                raise ValueError(
                    f"weighting {self.name!r} state {k!r} has shape {tuple(v.shape)}, expected "
                    f"{tuple(ref[k].shape)} for K={K}"
                )
        return {k: v.to(ref[k].dtype).clone() for k, v in values.items()}, (K, dev, numel)

    def _numel_from_state(self, values: dict[str, Tensor]) -> int | None:
        """P of a loaded per-coordinate state (None for K-sized state): the second dimension of
        the first :attr:`STATE` tensor, whose dtype the state keeps."""
        if not self.PER_COORDINATE_STATE:
            return None
        first = values[self.STATE[0]]
        self._dtype = first.dtype
        return first.shape[1]

    def __repr__(self) -> str:
        opts = {k: v for k, v in vars(self).items() if not k.startswith("_")}
        for klass in type(self).__mro__:
            for k, v in vars(klass).items():
                if isinstance(v, VectorOption):
                    opts.setdefault(k, getattr(self, k))
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in opts.items())})"


Weighting.__init__ = _checked_init(Weighting.__init__)  # type: ignore[method-assign]


def check_qp_options(max_iter: Any, tol: Any) -> tuple[int, float]:
    """The shared QP solver's budget (an int >= 1) and KKT tolerance (a finite number > 0)."""
    return check_int("max_iter", max_iter), check_number("tol", tol, low=0.0, low_open=True)


def out_dtype(gram: Tensor) -> torch.dtype:
    return torch.float64 if gram.dtype == torch.float64 else torch.float32
