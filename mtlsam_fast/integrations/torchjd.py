"""torchjd adapter: our weightings as torchjd ``Weighting`` and ``Aggregator`` classes.

The switch is the import line alone::

    from torchjd.aggregation import UPGrad, UPGradWeighting               # torchjd's
    from mtlsam_fast.integrations.torchjd import UPGrad, UPGradWeighting  # ours, same names

Every class of :data:`METHODS` comes in two forms, subclasses of torchjd's own bases:

* ``<Name>Weighting`` (a ``torchjd.aggregation.Weighting``): Gramian -> weights, for
  ``torchjd.autogram.Engine`` and ``GramianWeightedAggregator``; the weights are computed on the
  Gramian's device with no host sync and returned in its dtype;
* ``<Name>`` (a ``GramianWeightedAggregator``; ``Mean``, ``Sum``, ``Random``: a
  ``WeightedAggregator``, no Gramian needed): Jacobian matrix -> vector, for
  ``torchjd.autojac.jac_to_grad``. The Gramian and the combination of the rows run through our
  kernels (:func:`mtlsam_fast.ops.gram`, :func:`~mtlsam_fast.ops.combine`); ``MGDA`` called on a
  matrix directly (no hooks registered) takes the fused Gram -> QP -> combine path
  (:func:`~mtlsam_fast.ops.min_norm_aggregate`).

torchjd's constructor options are accepted with the same meaning, or validated and ignored where
our solver makes them moot; each row's ``notes`` (and ``docs/integrations.md``) say which. The
classes are not differentiable (torchjd's QP-based ones are not either).

:func:`jac_to_grad` is torchjd's ``jac_to_grad`` (same signature and semantics) that, for our
aggregators, never concatenates the Jacobians: the Gramian is the sum of the per-tensor Gramians,
the weights come from it, and each ``.grad`` is written by one combine of its own Jacobian.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

try:
    from torchjd import Stateful
    from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
    from torchjd.aggregation import Weighting as TorchjdWeighting
    from torchjd.autojac import jac_to_grad as torchjd_jac_to_grad
    from torchjd.linalg import Matrix, QuadprogProjector
except ImportError as error:  # without the extra
    raise ImportError(
        'mtlsam_fast.integrations.torchjd needs torchjd 0.18: pip install "mtlsam_fast[torchjd]"'
    ) from error

from .. import ops
from ..weighting.mgda import MGDA as _MGDA
from ._common import (
    Periodic,
    Plan,
    clip_direction,
    divided_by_k,
    draw_seed,
    dual_cone_regularization,
    method,
    nonnegative,
    positive_int,
    scaled_by_k,
)

Tensor = torch.Tensor


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`: a torchjd class and how its options map to our weighting.

    ``torchjd`` is the aggregator's name in ``torchjd.aggregation`` (the weighting is that name
    plus ``"Weighting"``); ``ours`` the registry name of the weighting that computes it
    (``mtlsam_fast.weighting.get``); ``plan`` takes torchjd's constructor arguments (its exact
    signature, plus keyword-only extensions such as ``seed``) and returns the :class:`Plan`;
    ``uses_gram=False`` for methods whose weights depend on K only (no Gramian is computed);
    ``stateful`` where torchjd's class is ``torchjd.Stateful`` (it then has ``reset()``);
    ``notes`` says which options are honoured and how ours differs.
    """

    torchjd: str
    ours: str
    plan: Callable[..., Plan]
    notes: str
    uses_gram: bool = True
    stateful: bool = False


# ------------------------------------------------------------------ options -> plans
def _dual_cone(
    projector: Any, norm_eps: float, reg_eps: float
) -> Callable[[Tensor], Tensor] | None:
    if projector is None:
        return dual_cone_regularization(norm_eps, reg_eps)
    if norm_eps or reg_eps:
        raise TypeError("give either projector or norm_eps / reg_eps, not both")
    if isinstance(projector, QuadprogProjector):
        return dual_cone_regularization(projector.norm_eps, projector.reg_eps)
    raise TypeError(
        "projector must be None (our exact device QP) or a torchjd QuadprogProjector (its "
        f"norm_eps / reg_eps are reproduced on the device), got {type(projector).__name__}"
    )


def _pref(pref_vector: Tensor | None) -> Tensor | None:
    if pref_vector is not None and (not isinstance(pref_vector, Tensor) or pref_vector.dim() != 1):
        raise ValueError(
            "Parameter `pref_vector` must be a vector (1D Tensor), got "
            f"{pref_vector if not isinstance(pref_vector, Tensor) else tuple(pref_vector.shape)}"
        )
    return pref_vector


def _upgrad(
    pref_vector: Tensor | None = None,
    projector: Any = None,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> Plan:
    return Plan(
        method("upgrad", pref_vector=_pref(pref_vector)),
        prepare=_dual_cone(projector, norm_eps, reg_eps),
    )


def _dualproj(
    pref_vector: Tensor | None = None,
    projector: Any = None,
    *,
    norm_eps: float = 0.0,
    reg_eps: float = 0.0,
) -> Plan:
    return Plan(
        method("dualproj", pref_vector=_pref(pref_vector)),
        prepare=_dual_cone(projector, norm_eps, reg_eps),
    )


def _mgda(epsilon: float = 0.001, max_iters: int = 100) -> Plan:
    if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not epsilon > 0:
        raise ValueError(f"epsilon must be positive, but got {epsilon}.")
    positive_int("max_iters", max_iters)
    return Plan(method("mgda"))


def _cagrad(c: float, norm_eps: float = 0.0001) -> Plan:
    nonnegative("norm_eps", norm_eps)
    weighting = method("cagrad", c=c, rescale=0)  # validates c

    def finish(weights: Tensor, gram: Tensor) -> Tensor:
        # one task: torchjd keeps the formula's 1 + c, our CAGrad returns weight 1 (a step size)
        return weights * (1.0 + float(c)) if weights.shape[0] == 1 else weights

    return Plan(weighting, finish=finish)


def _imtlg() -> Plan:
    return Plan(method("imtl"))


def _pcgrad(*, seed: int | None = None) -> Plan:
    return Plan(method("pcgrad", reduction="sum", seed=draw_seed(seed)))


def _gradvac(beta: float = 0.5, eps: float = 1e-8, *, seed: int | None = None) -> Plan:
    nonnegative("eps", eps)
    return Plan(method("gradvac", beta=beta, seed=draw_seed(seed)))


def _aligned_mtl(pref_vector: Tensor | None = None, scale_mode: str = "min") -> Plan:
    if pref_vector is None:  # torchjd's default preference is the mean, ours the sum
        return Plan(method("alignedmtl", scale_mode=scale_mode), finish=divided_by_k)
    return Plan(method("alignedmtl", scale_mode=scale_mode, pref_vector=_pref(pref_vector)))


def _fairgrad(alpha: float, max_iters: int | None = None) -> Plan:
    if max_iters is not None:
        positive_int("max_iters", max_iters)
    if alpha == 0:  # alpha-fairness with alpha = 0 is the uniform weighting (as in torchjd)
        return Plan(method("ls"))
    return Plan(method("fairgrad", alpha=alpha, normalize=False))


def _nash_mtl(
    n_tasks: int, max_norm: float = 1.0, update_weights_every: int = 1, optim_niter: int = 20
) -> Plan:
    positive_int("n_tasks", n_tasks)
    max_norm = nonnegative("max_norm", max_norm)
    positive_int("optim_niter", optim_niter)
    return Plan(
        Periodic(method("nashmtl", normalize=False), update_weights_every),
        prepare=_expect_tasks(n_tasks),
        finish=clip_direction(max_norm) if max_norm > 0 else None,
    )


def _expect_tasks(n_tasks: int) -> Callable[[Tensor], Tensor]:
    """Refuse a Gramian of another size than ``n_tasks`` (torchjd's NashMTL is built for K),
    before anything changes."""

    def prepare(gram: Tensor) -> Tensor:
        if gram.shape[0] != n_tasks:
            raise ValueError(f"NashMTL was built with n_tasks={n_tasks}, got {gram.shape[0]} tasks")
        return gram

    return prepare


def _mean() -> Plan:
    return Plan(method("ls"))


def _sum() -> Plan:
    return Plan(method("ls"), finish=scaled_by_k)


def _random(*, seed: int | None = None) -> Plan:
    return Plan(method("rlw", seed=draw_seed(seed)))


#: torchjd class name -> row. Every method of ours that torchjd also has.
METHODS: dict[str, Method] = {
    m.torchjd: m
    for m in [
        Method(
            "UPGrad",
            "upgrad",
            _upgrad,
            "pref_vector: same meaning. projector=None (default): the exact projection, solved on "
            "the device (torchjd's default QuadprogProjector adds norm_eps = reg_eps = 1e-4 and "
            "can return a direction that conflicts with a small task gradient); a "
            "QuadprogProjector or norm_eps / reg_eps: torchjd's regularized problem, solved "
            "exactly on the device.",
        ),
        Method(
            "DualProj",
            "dualproj",
            _dualproj,
            "As UPGrad: pref_vector honoured, projector / norm_eps / reg_eps reproduce torchjd's "
            "regularization, exact projection by default.",
        ),
        Method(
            "MGDA",
            "mgda",
            _mgda,
            "epsilon, max_iters: validated as torchjd does, not used: the min-norm QP is solved "
            "to its KKT conditions instead of Frank-Wolfe stopped at a step below epsilon.",
        ),
        Method(
            "CAGrad",
            "cagrad",
            _cagrad,
            "c: same meaning (no rescale, as torchjd; one task gets 1 + c, as torchjd). "
            "norm_eps: validated, not used: where "
            "torchjd returns zero weights because ||g_w|| < norm_eps ||J||_F (near a "
            "Pareto-stationary point), ours drops the correction only when g_w vanishes to "
            "rounding, as the paper's code does (d = g0 there).",
        ),
        Method(
            "IMTLG",
            "imtl",
            _imtlg,
            "No options. Equal to torchjd's for linearly independent gradients; for linearly "
            "dependent ones torchjd uses the pseudo-inverse, ours a regularized inverse (large "
            "finite weights whose direction shrinks towards zero).",
        ),
        Method(
            "PCGrad",
            "pcgrad",
            _pcgrad,
            "Projected gradients summed, as torchjd. The random task orders come from a seeded "
            "device stream; seed (keyword-only, ours) defaults to a draw from torch's generator "
            "at construction, so torch.manual_seed still makes runs reproducible.",
        ),
        Method(
            "GradVac",
            "gradvac",
            _gradvac,
            "beta: same meaning. eps: validated, not used: cosines use exact safe divisions (0 "
            "for a zero gradient) instead of adding eps to the denominators, so the weights are "
            "scale invariant. Random orders and seed as PCGrad. reset() clears the EMA.",
            stateful=True,
        ),
        Method(
            "AlignedMTL",
            "alignedmtl",
            _aligned_mtl,
            "pref_vector, scale_mode: same meaning. An all-zero Gramian gives zero weights "
            "(torchjd: the preference vector; the direction is zero either way).",
        ),
        Method(
            "FairGrad",
            "fairgrad",
            _fairgrad,
            "alpha: same meaning (alpha = 0: uniform weights). max_iters: validated, not used: "
            "the equation is solved by a fixed-budget damped Newton method on the device, not "
            "scipy's least_squares on the host.",
        ),
        Method(
            "NashMTL",
            "nashmtl",
            _nash_mtl,
            "n_tasks (checked at every call), max_norm (clips ||J^T w||), update_weights_every: "
            "same meaning. optim_niter: validated, not used: Gamma w = 1 / w is solved exactly "
            "(torchjd's 20 sequential convex steps stop at a residual of 1e-3 or stall). Also a "
            "Gramian weighting here (NashMTLWeighting), so it works with autogram.",
            stateful=True,
        ),
        Method("Mean", "ls", _mean, "No options.", uses_gram=False),
        Method("Sum", "ls", _sum, "No options (K times Mean).", uses_gram=False),
        Method(
            "Random",
            "rlw",
            _random,
            "softmax of standard normals, drawn from a seeded device stream (seed as PCGrad).",
            uses_gram=False,
        ),
    ]
}


# ------------------------------------------------------------------ the classes
def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _Weighting(TorchjdWeighting):
    """Base of the generated ``<Name>Weighting`` classes."""

    row: ClassVar[Method]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._plan = self.row.plan(*args, **kwargs)
        bound = inspect.signature(self.row.plan).bind(*args, **kwargs)
        bound.apply_defaults()
        self._arguments = dict(bound.arguments)
        self._initial_state = copy.deepcopy(self._plan.weighting.state_dict())

    def forward(self, stat: Tensor, /) -> Tensor:
        with torch.no_grad():
            if self.row.uses_gram:
                gram = stat
            else:  # the weights depend on K only: a Gramian would be wasted work
                if not isinstance(stat, Tensor) or stat.dim() < 1 or not stat.is_floating_point():
                    raise ValueError("expected a floating-point matrix or Gramian")
                gram = stat.new_zeros(stat.shape[0], stat.shape[0])
            return self._plan.weights(gram).to(stat.dtype)

    def reset(self) -> None:
        """Back to the state right after construction (the random stream goes on, as torchjd's
        global generator does)."""
        state = copy.deepcopy(self._initial_state)
        if "stream" in state:
            state["stream"] = self._plan.weighting.state_dict()["stream"]
        self._plan.weighting.load_state_dict(state)

    def get_extra_state(self) -> dict[str, Any]:
        """Our weighting's state (random stream, EMA, Nash-MTL's schedule): part of
        ``state_dict()``, so a checkpoint resumes it."""
        return {"method": self.row.torchjd, "state": self._plan.weighting.state_dict()}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        if not isinstance(state, dict) or state.get("method") != self.row.torchjd:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"state of {got!r} cannot be loaded into {self.row.torchjd}")
        self._plan.weighting.load_state_dict(state["state"])

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._arguments.items())
        return f"{type(self).__name__}({args})"

    def __str__(self) -> str:
        return type(self).__name__


def _gram(matrix: Tensor) -> Tensor:
    return ops.gram(matrix)


class _Aggregation:
    """What the generated aggregators add to torchjd's bases: our combine kernel, MGDA's fused
    path, ``reset``, torchjd-style representations."""

    row: ClassVar[Method]
    weighting: Any  # torchjd's WeightedAggregator sets it

    def _adapter_weighting(self) -> _Weighting:
        """The :class:`_Weighting` this aggregator was built on."""
        raise NotImplementedError

    @staticmethod
    def _combine(matrix: Tensor, weights: Tensor) -> Tensor:
        return ops.combine(weights, matrix)

    def _fused_mgda(self) -> _MGDA | None:
        """Our MGDA when the fused Gram -> QP -> combine path may replace the three steps: plain
        MGDA, and no hook that would expect to see the weights."""
        w = self._adapter_weighting()._plan.weighting
        if (
            isinstance(w, _MGDA)
            and w.normalization == "none"
            and not _has_hooks(self.weighting)
            and not _has_hooks(self._adapter_weighting())
        ):
            return w
        return None

    def reset(self) -> None:
        """Resets the internal state of the method (see the weighting's ``reset``)."""
        self._adapter_weighting().reset()

    def __repr__(self) -> str:
        return repr(self._adapter_weighting()).replace("Weighting(", "(", 1)

    def __str__(self) -> str:
        return self.row.torchjd


class _GramianAggregator(_Aggregation, GramianWeightedAggregator):
    def __init__(self, gramian_weighting: _Weighting) -> None:
        super().__init__(gramian_weighting)
        self.weighting = gramian_weighting << _gram  # our Gram kernel instead of torch's matmul

    def _adapter_weighting(self) -> _Weighting:
        return self.gramian_weighting  # type: ignore[return-value]

    def forward(self, matrix: Matrix, /) -> Tensor:
        with torch.no_grad():
            mgda = self._fused_mgda()
            if mgda is None:
                return super().forward(matrix)
            out = matrix.new_empty(matrix.shape[1])
            ops.min_norm_aggregate(
                matrix, out, max_iter=mgda.max_iter, tol=mgda.tol, backend=mgda.backend
            )
            return out


class _MatrixAggregator(_Aggregation, WeightedAggregator):
    def __init__(self, weighting: _Weighting) -> None:
        super().__init__(weighting)

    def _adapter_weighting(self) -> _Weighting:
        return self.weighting

    def forward(self, matrix: Matrix, /) -> Tensor:
        with torch.no_grad():
            return super().forward(matrix)


def _signature(row: Method) -> inspect.Signature:
    return inspect.signature(row.plan).replace(return_annotation=inspect.Signature.empty)


def _weighting_class(row: Method) -> type[_Weighting]:
    bases: tuple[type, ...] = (_Weighting, Stateful) if row.stateful else (_Weighting,)
    name = f"{row.torchjd}Weighting"
    doc = (
        f"torchjd's ``{name}``, computed by mtlsam_fast's ``{row.ours}`` weighting "
        f"(``mtlsam_fast.weighting.get({row.ours!r})``) on the Gramian's device.\n\n"
        f"Options: {row.notes}"
    )
    namespace = {"row": row, "__doc__": doc, "__module__": __name__, "__qualname__": name}
    cls = type(name, bases, namespace)
    cls.__signature__ = _signature(row)  # type: ignore[attr-defined]
    return cls


def _aggregator_class(row: Method, weighting_cls: type[_Weighting]) -> type[_Aggregation]:
    base: type[_Aggregation] = _GramianAggregator if row.uses_gram else _MatrixAggregator
    bases: tuple[type, ...] = (base, Stateful) if row.stateful else (base,)

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, weighting_cls(*args, **kwargs))  # type: ignore[call-arg]

    doc = (
        f"torchjd's ``{row.torchjd}`` aggregator over mtlsam_fast's ``{row.ours}`` weighting "
        f"(its ``gramian_weighting`` is a :class:`{weighting_cls.__name__}`); Gram and combine "
        f"run through mtlsam_fast.ops.\n\nOptions: {row.notes}"
    )
    namespace = {
        "row": row,
        "__init__": __init__,
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": row.torchjd,
    }
    cls = type(row.torchjd, bases, namespace)
    cls.__signature__ = _signature(row)  # type: ignore[attr-defined]
    return cls


def _build_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    for row in METHODS.values():
        weighting_cls = _weighting_class(row)
        classes[weighting_cls.__name__] = weighting_cls
        classes[row.torchjd] = _aggregator_class(row, weighting_cls)
    return classes


_CLASSES = _build_classes()
globals().update(_CLASSES)


# ------------------------------------------------------------------ jac_to_grad
def jac_to_grad(
    tensors: Iterable[Tensor],
    /,
    aggregator: Aggregator,
    *,
    retain_jac: bool = False,
    optimize_gramian_computation: bool = False,
) -> Tensor | None:
    """torchjd's ``torchjd.autojac.jac_to_grad``: aggregate the ``.jac`` fields of ``tensors``
    and accumulate the result into their ``.grad`` fields; returns the weights.

    With one of our aggregators (and no hook registered on it) the Jacobians are never
    concatenated into one matrix: the Gramian is the sum of the per-tensor Gramians
    (:func:`mtlsam_fast.ops.gram`), the weights come from the aggregator's ``gramian_weighting``
    and each ``.grad`` is written by one :func:`~mtlsam_fast.ops.combine` of its own Jacobian, in
    the tensor's dtype (plain MGDA over a single tensor takes the fused
    :func:`~mtlsam_fast.ops.min_norm_aggregate`). Mean, Sum and Random compute no Gramian.
    Any other aggregator goes to torchjd's own ``jac_to_grad``. ``optimize_gramian_computation``
    is accepted for that case (ours never concatenates).
    """
    if (
        not isinstance(aggregator, _Aggregation)
        or _has_hooks(aggregator)
        or _has_hooks(aggregator.weighting)
    ):
        options: dict[str, Any] = {"retain_jac": retain_jac}
        if optimize_gramian_computation:  # torchjd accepts it for Gramian-based aggregators only
            options["optimize_gramian_computation"] = True
        return torchjd_jac_to_grad(tensors, aggregator, **options)
    tensors_ = list(tensors)
    if not tensors_:
        raise ValueError("The `tensors` parameter cannot be empty.")
    for t in tensors_:
        if not hasattr(t, "jac"):
            raise ValueError(
                "Some `jac` fields were not populated. Did you use `autojac.backward` or "
                "`autojac.mtl_backward` before calling `jac_to_grad`?"
            )
        if not (t.requires_grad and (t.is_leaf or t.retains_grad)):
            raise ValueError(
                "Cannot populate the .grad field of a Tensor that does not satisfy: "
                "`tensor.requires_grad and (tensor.is_leaf or tensor.retains_grad)`."
            )
    jacobians: list[Tensor] = [t.jac for t in tensors_]  # type: ignore[attr-defined]
    K = jacobians[0].shape[0]
    if any(j.dim() < 1 or j.shape[0] != K for j in jacobians):
        raise ValueError(
            "All Jacobians in `tensors.jac` should have the same number of rows (first "
            f"dimension), got {[tuple(j.shape) for j in jacobians]}"
        )
    if not retain_jac:
        for t in tensors_:
            del t.jac  # type: ignore[attr-defined]
    matrices = [j.reshape(K, -1) for j in jacobians]
    with torch.no_grad():
        mgda = aggregator._fused_mgda()
        if mgda is not None and len(matrices) == 1:
            t = tensors_[0]
            out = torch.empty(matrices[0].shape[1], dtype=t.dtype, device=t.device)
            weights = ops.min_norm_aggregate(
                matrices[0], out, max_iter=mgda.max_iter, tol=mgda.tol, backend=mgda.backend
            ).weights
            _accumulate(t, out.view(t.shape))
            return weights
        if aggregator.row.uses_gram:
            gram = ops.gram(matrices[0])
            for m in matrices[1:]:
                gram = gram + ops.gram(m)
        else:
            gram = matrices[0]  # the weights depend on K only
        weights = aggregator._adapter_weighting()(gram)
        for t, m in zip(tensors_, matrices):
            _accumulate(t, ops.combine(weights, m, dtype=t.dtype).view(t.shape))
    return weights


def _accumulate(t: Tensor, grad: Tensor) -> None:
    if t.grad is None:
        t.grad = grad
    else:
        t.grad += grad


__all__ = ["METHODS", "Method", "jac_to_grad"]
__all__ += list(_CLASSES)  # the generated Weighting and Aggregator classes
