"""torchjd adapter: our weightings as torchjd ``Weighting``, ``Aggregator`` and ``Scalarizer``
classes.

The switch is the import line alone::

    from torchjd.aggregation import UPGrad, UPGradWeighting               # torchjd's
    from mtlsam_fast.integrations.torchjd import UPGrad, UPGradWeighting  # ours, same names
    from torchjd.scalarization import UW                                  # torchjd's
    from mtlsam_fast.integrations.torchjd import UW                       # ours

Every method of :data:`METHODS` (every method we and torchjd 0.18 both have) comes in the forms
torchjd has, subclasses of torchjd's own bases:

* ``<Name>Weighting`` (a ``torchjd.aggregation.Weighting``): Gramian -> weights, for
  ``torchjd.autogram.Engine`` and ``GramianWeightedAggregator``; the weights are computed on the
  Gramian's device with no host sync and returned in its dtype. ``SDMGradWeighting`` and
  ``MoDoWeighting`` take any K x K matrix (``J_1 J_2^T``), ``CRMOGMWeighting`` wraps another
  torchjd weighting, and ``ExcessMTLWeighting`` weights the Jacobian matrix itself, as torchjd's;
* ``<Name>`` (a ``GramianWeightedAggregator``; ``Mean``, ``Sum``, ``Random``: a
  ``WeightedAggregator``, no Gramian needed): Jacobian matrix -> vector, for
  ``torchjd.autojac.jac_to_grad``. The Gramian and the combination of the rows run through our
  kernels (:func:`mtlsam_fast.ops.gram`, :func:`~mtlsam_fast.ops.combine`); ``MGDA`` called on a
  matrix directly (no hooks registered) takes the fused Gram -> QP -> combine path
  (:func:`~mtlsam_fast.ops.min_norm_aggregate`). ``ExcessMTL`` (K x P state), ``GradDrop`` and
  ``TrimmedMean`` (their direction is not a combination of the rows) need the matrix itself and
  cannot be Gramian weightings, in torchjd as here;
* torchjd's loss scalarizations (``UW``, ``IMTLL``, ``DWA``, ``FAMO``, ``GeometricMean``,
  ``STCH``, ``COSMOS``, ``PBI``: ``torchjd.scalarization.Scalarizer`` subclasses): losses -> the
  scalarization's value, whose gradient with respect to the losses is our weighting's weights.

torchjd's constructor options are accepted with the same meaning, or validated and ignored where
our solver makes them moot; each row's ``notes`` (and ``docs/integrations.md``) say which. The
classes are not differentiable (torchjd's QP-based ones are not either).

:func:`jac_to_grad` is torchjd's ``jac_to_grad`` (same signature and semantics) that, for our
Gramian-based aggregators, never concatenates the Jacobians: the Gramian is the sum of the
per-tensor Gramians, the weights come from it, and each ``.grad`` is written by one combine of its
own Jacobian.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

try:
    from torchjd import Stateful
    from torchjd.aggregation import Aggregator, GramianWeightedAggregator, WeightedAggregator
    from torchjd.aggregation import Weighting as TorchjdWeighting
    from torchjd.autojac import jac_to_grad as torchjd_jac_to_grad
    from torchjd.linalg import Matrix, QuadprogProjector
    from torchjd.scalarization import Scalarizer
except ImportError as error:  # without the extra
    raise ImportError(
        'mtlsam_fast.integrations.torchjd needs torchjd 0.18: pip install "mtlsam_fast[torchjd]"'
    ) from error

from .. import ops
from ..weighting.base import Weighting as _OurWeighting
from ..weighting.base import check_number
from ..weighting.famo import EPS as _FAMO_EPS
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


#: what a row's weights are computed from (:attr:`Method.input`)
INPUTS = ("gramian", "tasks", "matrix", "wrapped", "losses")


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`: a torchjd class and how its options map to our weighting.

    ``torchjd`` is the method's name in torchjd (the aggregator's or scalarizer's; the weighting
    is that name plus ``"Weighting"``); ``ours`` the registry name of the weighting that computes
    it (``mtlsam_fast.weighting.get``); ``plan`` takes torchjd's constructor arguments (its exact
    signature, plus keyword-only extensions such as ``seed``) and returns the :class:`Plan`;
    ``notes`` says which options are honoured and how ours differs.

    ``input`` is what the weights are computed from: ``"gramian"`` (the Gramian; any K x K
    matrix for SDMGrad and MoDo), ``"tasks"`` (K alone: no Gramian is computed), ``"matrix"``
    (the Jacobian matrix itself: per-coordinate state or a direction, so no Gramian weighting
    exists), ``"wrapped"`` (another torchjd weighting's weights: CR-MOGM) or ``"losses"`` (a
    ``torchjd.scalarization.Scalarizer``). ``classes`` are the forms this adapter generates:
    ``"aggregator"``, ``"weighting"``, ``"scalarizer"`` (torchjd's, plus a Gramian weighting for
    NashMTL and ConFIG, whose torchjd forms are aggregators only). ``stateful`` where
    torchjd's class is ``torchjd.Stateful`` (it then has ``reset()``). ``value`` (scalarizers)
    is the scalarization's value from ``(our weighting, weights, losses)``; ``methods`` are the
    further methods torchjd's class has (``DWA.step``, ``FAMO.update``).
    """

    torchjd: str
    ours: str
    plan: Callable[..., Plan]
    notes: str
    input: str = "gramian"
    classes: tuple[str, ...] = ("aggregator", "weighting")
    stateful: bool = False
    value: Callable[[Any, Tensor, Tensor], Tensor] | None = None
    methods: dict[str, Any] = field(default_factory=dict)

    @property
    def uses_gram(self) -> bool:
        """Whether the weights are computed from the Gramian of the Jacobian."""
        return self.input == "gramian"


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


def _krum(n_byzantine: int, n_selected: int = 1) -> Plan:
    return Plan(
        method("krum", n_byzantine=n_byzantine, n_selected=n_selected, distance="euclidean")
    )


def _pcd(tau: float | Tensor = 0.02, beta: float = 0.999, eps: float = 1e-8) -> Plan:
    return Plan(method("pcd", tau=tau, beta=beta, eps=eps))


def _config(pref_vector: Tensor | None = None) -> Plan:
    return Plan(method("config", pref_vector=_pref(pref_vector)))


def _excess_mtl(robust_step_size: float = 1.0, n_warmup_steps: int = 0) -> Plan:
    return Plan(
        method("excessmtl", robust_step_size=robust_step_size, n_warmup_steps=n_warmup_steps)
    )


def _identity(P: Tensor) -> Tensor:
    return P


def _graddrop(
    f: Callable[[Tensor], Tensor] = _identity,
    leak: Tensor | None = None,
    *,
    seed: int | None = None,
) -> Plan:
    return Plan(
        method("graddrop", leak=leak, f=None if f is _identity else f, seed=draw_seed(seed))
    )


def _trimmed_mean(trim_number: int) -> Plan:
    return Plan(method("trimmedmean", trim_number=trim_number))


def _sdmgrad(
    lr: float = 10.0,
    momentum: float = 0.5,
    n_iter: int = 20,
    lambda_: float = 0.3,
    pref_vector: Tensor | None = None,
) -> Plan:
    return Plan(
        method(
            "sdmgrad",
            lr=lr,
            momentum=momentum,
            n_iter=n_iter,
            lambda_=lambda_,
            pref_vector=_pref(pref_vector),
        )
    )


def _modo(gamma: float = 0.1, rho: float = 0.1) -> Plan:
    return Plan(method("modo", gamma=gamma, rho=rho))


class _Wrapped(_OurWeighting):
    """The weights of a torchjd ``Weighting`` module (ours or torchjd's own) on the statistic of
    the current call, for CR-MOGM to smooth. Its state is the module's (a submodule of the
    adapter, so in its ``state_dict``)."""

    name = "wrapped"

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module
        self.stat: Tensor | None = None

    def weights(self, gram: Tensor, losses: Tensor | None) -> Tensor:
        assert self.stat is not None  # set by the adapter's forward
        return self.module(self.stat)


def _crmogm(
    weighting: TorchjdWeighting, alpha: float = 0.9, initial_weights: Tensor | None = None
) -> Plan:
    if not isinstance(weighting, TorchjdWeighting):
        raise TypeError(
            f"weighting must be a torchjd Weighting (ours or torchjd's), got {type(weighting)}"
        )
    return Plan(
        method(
            "crmogm", weighting=_Wrapped(weighting), alpha=alpha, initial_weights=initial_weights
        )
    )


# ------------------------------------------------------------------ scalarizers
def _shape(shape: int | Sequence[int]) -> torch.Size:
    """torchjd's ``shape`` argument (``n`` is ``(n,)``), checked."""
    size = torch.Size([shape] if isinstance(shape, int) else shape)
    if any(isinstance(n, bool) or n < 1 for n in size):
        raise ValueError(f"shape must hold positive sizes, got {shape!r}")
    return size


def _uw(shape: int | Sequence[int], *, lr: float = 1e-3) -> Plan:
    _shape(shape)
    return Plan(method("uw", lr=lr))


def _imtl_l(shape: int | Sequence[int], *, lr: float = 1e-3) -> Plan:
    _shape(shape)
    return Plan(method("imtl_l", lr=lr))


def _dwa(temperature: float = 2.0) -> Plan:
    return Plan(method("dwa", temperature=temperature))


def _famo(
    shape: int | Sequence[int],
    min_losses: Tensor | None = None,
    lr: float = 0.025,
    weight_decay: float = 1e-3,
) -> Plan:
    size = _shape(shape)
    if min_losses is not None and min_losses.shape != size:
        raise ValueError(
            f"Parameter `min_losses` should have shape {tuple(size)} (matching the shape of the "
            f"logits). Found `min_losses.shape = {tuple(min_losses.shape)}`."
        )
    b = None if min_losses is None else min_losses.flatten()
    return Plan(method("famo", lr=lr, weight_decay=weight_decay, min_losses=b))


def _geometric_mean() -> Plan:
    return Plan(method("gls"))


def _flat(v: Tensor | None) -> Tensor | None:
    return None if v is None else v.flatten()


def _stch(mu: float, weights: Tensor | None = None, reference: Tensor | None = None) -> Plan:
    return Plan(method("stch", mu=mu, pref_vector=_flat(weights), reference=_flat(reference)))


def _cosmos(lambda_: float, weights: Tensor) -> Plan:
    return Plan(method("cosmos", lambda_=lambda_, pref_vector=_flat(weights)))


def _pbi(theta: float, weights: Tensor, reference: Tensor | None = None) -> Plan:
    return Plan(method("pbi", theta=theta, pref_vector=_flat(weights), reference=_flat(reference)))


# the scalarizations' values, from our weights (float64) and the losses (float64): the value
# torchjd's scalarizer returns, whose gradient with respect to the losses is the weights
def _uw_value(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    # weights = exp(-s) / 2: S = sum_i exp(-s_i) L_i / 2 + s_i / 2
    return (weights * L - 0.5 * torch.log(2 * weights)).sum()


def _imtl_l_value(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    # weights = exp(s): S = sum_i exp(s_i) L_i - s_i
    return (weights * L - torch.log(weights)).sum()


def _weighted_sum(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    return (weights * L).sum()


def _famo_value(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    # weights = c z / D: S = c sum_i z_i log D_i = sum_i weights_i D_i log D_i
    b = (
        0.0
        if w.min_losses is None
        else w._option_on("min_losses", w.min_losses, L.shape[0], L.device)
    )
    D = L - b + _FAMO_EPS
    return (weights * D * torch.log(D)).sum()


def _geometric_mean_value(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    return torch.exp(torch.log(L).mean())


def _preference(w: Any, L: Tensor) -> Tensor:
    if w.pref_vector is None:
        return torch.full_like(L, 1.0 / L.shape[0])
    return w._option_on("pref_vector", w.pref_vector, L.shape[0], L.device)


def _shifted(w: Any, L: Tensor) -> Tensor:
    if w.reference is None:
        return L
    return L - w._option_on("reference", w.reference, L.shape[0], L.device)


def _stch_value(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    y = _preference(w, L) * _shifted(w, L)
    top = y.max()
    return w.mu * torch.logsumexp((y - top) / w.mu, dim=0) + top


def _cosmos_value(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    r = _preference(w, L)
    return (r * L).sum() - w.lambda_ * torch.nn.functional.cosine_similarity(r, L, dim=0)


def _pbi_value(w: Any, weights: Tensor, L: Tensor) -> Tensor:
    u = _preference(w, L)
    u = u / u.norm()
    f = _shifted(w, L)
    d1 = f @ u
    return d1 + w.theta * (f - d1 * u).norm()


def _option(ours: str, check: Callable[[Any], Any] | None = None) -> property:
    """A torchjd attribute that may be reassigned between calls, kept as our weighting's option
    ``ours`` (checked again when set)."""

    def get(self: Any) -> Any:
        return getattr(self._plan.weighting, ours)

    def set_(self: Any, value: Any) -> None:
        if check is not None:
            value = check(value)
        setattr(self._plan.weighting, ours, value.flatten() if isinstance(value, Tensor) else value)

    return property(get, set_, doc=f"our weighting's ``{ours}`` (reassignable between calls)")


def _alpha(value: Any) -> float:
    return check_number("alpha", value, low=0.0, high=1.0)


def _dwa_step(self: Any) -> None:
    """Finalizes the current epoch's average loss and rolls the history forward (torchjd's
    ``DWA.step``; our weighting's ``end_epoch``). Call it once at the end of each epoch."""
    self._plan.weighting.end_epoch()


def _famo_update(self: Any, values: Tensor, /) -> None:
    """torchjd's ``FAMO.update``: one Adam step of the logits from the change of the losses since
    the last call (``values``: the same batch's losses after the model step). Without it, the
    next call takes that step from its own losses (the next batch), with no extra forward pass."""
    if not self._forwarded:
        raise ValueError("`update` must be called after the scalarizer is called on the losses.")
    w = self._plan.weighting
    L = self._losses(values)
    w(L.new_zeros(L.shape[0], L.shape[0]), L)  # the pending logit step: from the last losses to L
    state = w.state_dict()
    state["has_prev"] = torch.zeros_like(state["has_prev"])  # the next call takes no step
    w.load_state_dict(state)
    self._forwarded = False


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
        Method("Mean", "ls", _mean, "No options.", input="tasks"),
        Method("Sum", "ls", _sum, "No options (K times Mean).", input="tasks"),
        Method(
            "Random",
            "rlw",
            _random,
            "softmax of standard normals, drawn from a seeded device stream (seed as PCGrad).",
            input="tasks",
        ),
        Method(
            "Krum",
            "krum",
            _krum,
            "n_byzantine, n_selected: same meaning; distances from the Gramian summed as torchjd "
            "does (distance='euclidean' of ours; the paper sums squared distances). Ties go to "
            "the lower task index.",
        ),
        Method(
            "PCD",
            "pcd",
            _pcd,
            "tau (a number or one per secondary task), beta, eps: same meaning. The QP is solved "
            "on the device by the shared interior point (torchjd: an active-set method on the "
            "host, which synchronizes); same direction, the multipliers may differ for linearly "
            "dependent secondary gradients. reset() clears the moving average.",
            stateful=True,
        ),
        Method(
            "ConFIG",
            "config",
            _config,
            "pref_vector: same meaning. Computed from the Gramian (torchjd: pinv of the K x P "
            "unit-gradient matrix), so ours is a GramianWeightedAggregator and also has a "
            "ConFIGWeighting for autogram; the two differ only for nearly dependent gradients.",
        ),
        Method(
            "ExcessMTL",
            "excessmtl",
            _excess_mtl,
            "robust_step_size, n_warmup_steps: same meaning. A weighting of the Jacobian matrix, "
            "as torchjd's (its state holds K x P running sums of squared gradients): no Gramian "
            "weighting exists, and jac_to_grad hands it to torchjd's.",
            input="matrix",
            stateful=True,
        ),
        Method(
            "GradDrop",
            "graddrop",
            _graddrop,
            "f, leak: same meaning. The uniforms are Phi(z) of our seeded counter-based noise "
            "(seed as PCGrad), not torch.rand. An aggregator only, as torchjd's: its direction "
            "keeps one sign per coordinate, not a combination of the rows.",
            input="matrix",
            classes=("aggregator",),
        ),
        Method(
            "TrimmedMean",
            "trimmedmean",
            _trimmed_mean,
            "trim_number: same meaning. An aggregator only, as torchjd's: the kept rows differ "
            "per coordinate.",
            input="matrix",
            classes=("aggregator",),
        ),
        Method(
            "SDMGrad",
            "sdmgrad",
            _sdmgrad,
            "lr, momentum, n_iter, lambda_, pref_vector: same meaning. Any K x K matrix, e.g. "
            "J_1 J_2^T of two batches as torchjd's examples (not symmetrized). A weighting "
            "only, as torchjd's.",
            classes=("weighting",),
            stateful=True,
        ),
        Method(
            "MoDo",
            "modo",
            _modo,
            "gamma, rho: same meaning; any K x K matrix, as SDMGrad. A weighting only, as "
            "torchjd's.",
            classes=("weighting",),
            stateful=True,
        ),
        Method(
            "CRMOGM",
            "crmogm",
            _crmogm,
            "weighting (any torchjd Weighting, ours or torchjd's own, over a Gramian or a "
            "matrix), alpha, initial_weights: same meaning; alpha can be reassigned between "
            "calls. reset() also resets the wrapped weighting.",
            input="wrapped",
            classes=("weighting",),
            stateful=True,
            methods={"alpha": _option("alpha", _alpha)},
        ),
        Method(
            "UW",
            "uw",
            _uw,
            "shape: same meaning. The log-variances s are learnt by the weighting's own Adam "
            "(keyword-only lr, default 1e-3), one step per call, instead of an nn.Parameter "
            "for the user's optimizer (with torch.optim.Adam at the same lr the numbers agree).",
            input="losses",
            classes=("scalarizer",),
            stateful=True,
            value=_uw_value,
        ),
        Method(
            "IMTLL",
            "imtl_l",
            _imtl_l,
            "shape: same meaning; the scales are learnt by the weighting's own Adam, as UW.",
            input="losses",
            classes=("scalarizer",),
            stateful=True,
            value=_imtl_l_value,
        ),
        Method(
            "DWA",
            "dwa",
            _dwa,
            "temperature: same meaning; step() at the end of each epoch, as torchjd's.",
            input="losses",
            classes=("scalarizer",),
            stateful=True,
            value=_weighted_sum,
            methods={"step": _dwa_step},
        ),
        Method(
            "FAMO",
            "famo",
            _famo,
            "shape, min_losses, lr, weight_decay: same meaning; update(losses) after the model "
            "step, as torchjd's. Without update, the next call's losses drive the logit step "
            "(no extra forward pass).",
            input="losses",
            classes=("scalarizer",),
            stateful=True,
            value=_famo_value,
            methods={"update": _famo_update},
        ),
        Method(
            "GeometricMean",
            "gls",
            _geometric_mean,
            "No options. Non-positive losses give NaN (torchjd: a ValueError for negative "
            "ones, which reads the losses on the host).",
            input="losses",
            classes=("scalarizer",),
            value=_geometric_mean_value,
        ),
        Method(
            "STCH",
            "stch",
            _stch,
            "mu, weights, reference: same meaning (weights: our pref_vector); weights and "
            "reference can be reassigned between calls.",
            input="losses",
            classes=("scalarizer",),
            value=_stch_value,
            methods={"weights": _option("pref_vector"), "reference": _option("reference")},
        ),
        Method(
            "COSMOS",
            "cosmos",
            _cosmos,
            "lambda_, weights: same meaning; reassign weights between calls (a Dirichlet "
            "sample), as torchjd's documentation does.",
            input="losses",
            classes=("scalarizer",),
            value=_cosmos_value,
            methods={"weights": _option("pref_vector")},
        ),
        Method(
            "PBI",
            "pbi",
            _pbi,
            "theta, weights, reference: same meaning. On the preference ray the gradient is "
            "the exact subgradient u (torchjd adds 1e-12 under the square root).",
            input="losses",
            classes=("scalarizer",),
            value=_pbi_value,
            methods={"weights": _option("pref_vector"), "reference": _option("reference")},
        ),
    ]
}


# ------------------------------------------------------------------ the classes
def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks)


class _Adapted:
    """What every generated class has (mixed in before its torchjd base): the :class:`Plan`
    built from torchjd's arguments, ``reset``, the state in ``state_dict()``, torchjd-style
    representations."""

    row: ClassVar[Method]

    def _build(self, *args: Any, **kwargs: Any) -> None:
        self._plan = self.row.plan(*args, **kwargs)
        bound = inspect.signature(self.row.plan).bind(*args, **kwargs)
        bound.apply_defaults()
        self._arguments = dict(bound.arguments)
        self._initial_state = copy.deepcopy(self._plan.weighting.state_dict())
        for name, value in self._arguments.items():  # a wrapped torchjd module (CR-MOGM's)
            if isinstance(value, nn.Module):
                self.add_module(name, value)  # type: ignore[attr-defined]

    def reset(self) -> None:
        """Back to the state right after construction (the random stream goes on, as torchjd's
        global generator does); a wrapped stateful weighting is reset too."""
        state = copy.deepcopy(self._initial_state)
        if "stream" in state:
            state["stream"] = self._plan.weighting.state_dict()["stream"]
        self._plan.weighting.load_state_dict(state)
        for child in self.children():  # type: ignore[attr-defined]
            if isinstance(child, Stateful):
                child.reset()

    def get_extra_state(self) -> dict[str, Any]:
        """Our weighting's state (random stream, EMA, learnt parameters, ...): part of
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


class _Weighting(_Adapted, TorchjdWeighting):
    """Base of the generated ``<Name>Weighting`` classes (and of the inner module of the
    aggregators that torchjd has no weighting for)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._build(*args, **kwargs)

    def forward(self, stat: Tensor, /) -> Tensor:
        with torch.no_grad():
            kind = self.row.input
            if not isinstance(stat, Tensor) or stat.dim() != 2 or not stat.is_floating_point():
                what = tuple(stat.shape) if isinstance(stat, Tensor) else type(stat).__name__
                raise ValueError(f"expected a floating-point matrix or Gramian, got {what}")
            if kind == "gramian":
                return self._plan.weights(stat).to(stat.dtype)
            K = stat.shape[0]
            if kind == "matrix":  # the Jacobian itself (and its Gramian, for the checks)
                return self._plan.weights(ops.gram(stat), grads=stat).to(stat.dtype)
            if kind == "wrapped":
                crmogm: Any = self._plan.weighting
                wrapped = crmogm.weighting  # the _Wrapped module it smooths
                wrapped.stat = stat
                try:
                    return self._plan.weights(stat.new_zeros(K, K))
                finally:
                    wrapped.stat = None
            # "tasks": the weights depend on K only, a Gramian would be wasted work
            return self._plan.weights(stat.new_zeros(K, K)).to(stat.dtype)


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


class _DirectionAggregator(_Aggregation, Aggregator):
    """An aggregator whose result is not a combination of the rows (GradDrop, TrimmedMean):
    ``forward`` returns our weighting's direction. The weighting is the submodule ``method``."""

    def __init__(self, inner: _Weighting) -> None:
        super().__init__()
        self.method = inner

    def _adapter_weighting(self) -> _Weighting:
        return self.method

    def _fused_mgda(self) -> None:
        return None

    def forward(self, matrix: Matrix, /) -> Tensor:
        return self.method(matrix)


class _Scalarizer(_Adapted, Scalarizer):
    """Base of the generated scalarizers: ``forward(values)`` is the scalarization's value, whose
    gradient with respect to ``values`` is our weighting's weights (computed without the graph,
    on the losses' device, no host sync). Values of any shape are flattened into the K losses."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        self._build(*args, **kwargs)
        shape = self._arguments.get("shape")
        self._shape = None if shape is None else _shape(shape)
        self._forwarded = False

    def _losses(self, values: Tensor) -> Tensor:
        if not isinstance(values, Tensor) or not values.is_floating_point():
            raise ValueError(f"values must be a floating-point tensor, got {values!r}")
        if self._shape is not None and values.shape != self._shape:
            raise ValueError(
                f"Parameter `values` should have shape {tuple(self._shape)}. Found "
                f"`values.shape = {tuple(values.shape)}`."
            )
        return values.detach().flatten().to(torch.float64)

    def forward(self, values: Tensor, /) -> Tensor:
        L = self._losses(values)
        K = L.shape[0]
        with torch.no_grad():
            w = self._plan.weights(L.new_zeros(K, K), L)
            assert self.row.value is not None  # every scalarizer row has one
            value = self.row.value(self._plan.weighting, w, L)
        self._forwarded = True
        # the value of S, and its gradient w with respect to the values
        flat = values.flatten()
        return value.to(values.dtype) + (w.to(values.dtype) * (flat - flat.detach())).sum()


def _signature(row: Method) -> inspect.Signature:
    return inspect.signature(row.plan).replace(return_annotation=inspect.Signature.empty)


def _doc(row: Method, what: str) -> str:
    return (
        f"torchjd's ``{what}``, computed by mtlsam_fast's ``{row.ours}`` weighting "
        f"(``mtlsam_fast.weighting.get({row.ours!r})``) on the device of its input.\n\n"
        f"Options: {row.notes}"
    )


def _make_class(row: Method, name: str, base: type, namespace: dict[str, Any]) -> type:
    bases: tuple[type, ...] = (base, Stateful) if row.stateful else (base,)
    namespace = {
        "row": row,
        "__module__": __name__,
        "__qualname__": name,
        **row.methods,
        **namespace,
    }
    cls = type(name, bases, namespace)
    cls.__signature__ = _signature(row)  # type: ignore[attr-defined]
    return cls


def _aggregator_class(row: Method, weighting_cls: type[_Weighting]) -> type:
    if row.uses_gram:
        base: type[_Aggregation] = _GramianAggregator
    elif row.input == "matrix" and "weighting" not in row.classes:
        base = _DirectionAggregator  # a direction: torchjd has no weighting for it either
    else:
        base = _MatrixAggregator

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, weighting_cls(*args, **kwargs))  # type: ignore[call-arg]

    doc = _doc(row, row.torchjd) + "\n\nGramian and combination run through mtlsam_fast.ops."
    return _make_class(row, row.torchjd, base, {"__init__": __init__, "__doc__": doc})


def _build_classes() -> dict[str, type]:
    classes: dict[str, type] = {}
    for row in METHODS.values():
        if "scalarizer" in row.classes:
            classes[row.torchjd] = _make_class(
                row, row.torchjd, _Scalarizer, {"__doc__": _doc(row, row.torchjd)}
            )
            continue
        name = f"{row.torchjd}Weighting"
        weighting_cls = _make_class(row, name, _Weighting, {"__doc__": _doc(row, name)})
        if "weighting" in row.classes:
            classes[name] = weighting_cls
        if "aggregator" in row.classes:
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
        or aggregator.row.input == "matrix"  # needs the whole Jacobian matrix
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
