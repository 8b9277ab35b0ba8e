"""LibMTL adapter: our weightings as LibMTL weighting classes (its ``AbsWeighting`` interface).

LibMTL's ``Trainer`` takes a weighting class, mixes it into the model (``class MTLmodel(
architecture, weighting)``) and calls ``model.backward(losses, **weight_args)`` once per step;
the method computes the gradients and returns the task weights. The switch is the import line::

    from LibMTL.weighting import MGDA                    # LibMTL's
    from mtlsam_fast.integrations.libmtl import MGDA     # ours: same name, same weight_args

    trainer = Trainer(..., weighting=MGDA, ...)

Every class of :data:`METHODS` is a subclass of LibMTL's ``AbsWeighting`` named as in LibMTL
(every weighting of 1.1.5, and its repository's newer methods that we have: ``Nash_MTL``,
``Aligned_MTL``, ``DB_MTL``, ``FairGrad``, ``UPGrad``, ``FAMO``, ``MoCo``, ``ExcessMTL``;
``DualProj`` is ours only). Its ``backward``:

* backpropagates each task's loss into the shared parameters only, capturing the K gradients
  zero-copy in one flat ``[K, P]`` device buffer (:class:`mtlsam_fast.buffers.GradBuffer`) --
  LibMTL's ``_compute_grad`` instead copies each shared parameter's gradient into a vector it
  allocates on the host and moves back to the device, K times a step;
* computes the Gram, the weights and ``w^T G`` with our kernels and our weighting, on the device
  (``GradDrop``, ``MoCo``: our weighting's direction), and makes the shared parameters'
  ``.grad`` views of that combined gradient;
* gives the task-specific parameters (everything in the model that is not shared: the decoders,
  IMTL's loss scale) the gradient of ``sum_i c_i L_i`` in one more backward pass, ``c_i = 1`` for
  LibMTL's gradient-based methods (each head its own task's gradient, as their K backward passes
  give it) and ``c_i = w_i`` for its loss-weighting ones (``RLW``, ``Nash_MTL``, ``FairGrad``,
  ``ExcessMTL``, which backpropagate ``sum_i w_i L_i``); methods whose weights need no gradient
  (``EW``, ``RLW`` and the loss-based ``UW``, ``DWA``, ``GLS``, ``FAMO``) do that single
  backward pass only;
* returns the weights as a NumPy array, as LibMTL's trainer records them (its loss meter reads
  ``loss.item()`` at every step anyway). These are the weights of the task gradients in the
  update (``w^T G``), also where LibMTL returns an inner variable (MGDA with a gradient
  normalization returns the normalized problem's solution; CAGrad its dual variable); None for
  ``GradDrop`` and ``MoCo``, whose update is a direction.

``rep_grad=True`` (gradients of the shared representation) goes through LibMTL's own
``_get_grads`` / ``_backward_new_grads`` with our weights, for every method but the
loss-weighting ones (LibMTL refuses it there too; its ``EW`` accepts it but then leaves the
encoder without a gradient, ours trains it) and the direction ones (``GradDrop``, ``MoCo``:
ours work on the shared parameters' gradients). ``weight_args`` are read with LibMTL's key names
and its defaults; unknown keys raise. The weighting is built at the first ``backward`` and the same
``weight_args`` are expected afterwards. :meth:`weighting_state_dict` /
:meth:`load_weighting_state_dict` save and restore its state (random streams, EMAs).

F-MTL and SAMO cannot be LibMTL weightings: they evaluate the losses again at perturbed weights
(1 + K or 1 + 3K forward passes a step) and own the optimizer step, while LibMTL's
``backward(losses)`` only sees the losses of the one forward pass its trainer ran, and the batch,
the loss functions and the step stay in ``Trainer.train``. Use our optimizers with LibMTL's model
and losses in your own loop (``docs/integrations.md``).

Loading: LibMTL's newest release (1.1.5) fails at ``import LibMTL`` with current torchvision
(``LibMTL/model/resnet.py`` imports ``torchvision.models.utils``, which torchvision removed).
The adapter needs only ``AbsWeighting`` (``LibMTL/weighting/abstract_weighting.py``, which
imports torch and NumPy only), so it loads that file under its own module name without running
``LibMTL/__init__.py``; when LibMTL itself is imported afterwards, its weightings subclass the
same ``AbsWeighting``. If LibMTL is already imported, its module is used as it is.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from .. import ops
from ..buffers import GradBuffer
from ._common import (
    Periodic,
    Plan,
    draw_seed,
    dual_cone_regularization,
    method,
    scaled_by_k,
)

Tensor = torch.Tensor

_ABSTRACT = "LibMTL.weighting.abstract_weighting"


def _abstract_weighting_module() -> ModuleType:
    """LibMTL's ``abstract_weighting`` module, loaded without ``LibMTL/__init__.py``."""
    if _ABSTRACT in sys.modules:
        return sys.modules[_ABSTRACT]
    spec = importlib.util.find_spec("LibMTL")  # locates the package, runs none of it
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next(
        (
            Path(p) / "weighting" / "abstract_weighting.py"
            for p in locations
            if (Path(p) / "weighting" / "abstract_weighting.py").is_file()
        ),
        None,
    )
    if path is None:
        raise ImportError(
            "mtlsam_fast.integrations.libmtl needs LibMTL (its weighting/abstract_weighting.py "
            'was not found): pip install "mtlsam_fast[libmtl]"'
        )
    module_spec = importlib.util.spec_from_file_location(_ABSTRACT, path)
    assert module_spec is not None and module_spec.loader is not None  # a .py file path
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_ABSTRACT] = module
    try:
        module_spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_ABSTRACT]
        raise
    return module


AbsWeighting: type = _abstract_weighting_module().AbsWeighting


@dataclass(frozen=True)
class Method:
    """One row of :data:`METHODS`: a LibMTL weighting and how it maps to ours.

    ``libmtl`` is the class name (what a ``Trainer`` is given); ``ours`` the registry name of the
    weighting that computes it; ``plan`` takes LibMTL's ``weight_args`` (keyword names as LibMTL
    reads them, LibMTL's defaults) and returns the :class:`Plan`; ``heads`` is ``"own"`` (each
    task-specific parameter gets its own task's gradient) or ``"weighted"`` (``w_i`` times it);
    ``losses`` maps ``(model, losses)`` to the losses whose gradients are taken (DB-MTL's
    logarithm, IMTL-L's learnable scale); ``init`` adds a method's parameters to the model
    (``init_param``); ``uses_gram=False`` where the weights need no gradient (the loss-based
    methods: one backward pass of ``sum_i w_i L_i``); ``before`` runs before the weights are
    computed, with the model and our weighting (DWA follows the trainer's ``epoch``);
    ``methods`` are further methods LibMTL's class has (FAMO's ``update_w``); ``notes`` says how
    ours differs from LibMTL's.
    """

    libmtl: str
    ours: str
    plan: Callable[..., Plan]
    notes: str
    heads: str = "own"
    losses: Callable[[Any, Tensor], Tensor] | None = None
    init: Callable[[Any], None] | None = None
    uses_gram: bool = True
    before: Callable[[Any, Any], None] | None = None
    methods: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------ weight_args -> plans
def _ew() -> Plan:
    return Plan(method("ls"), finish=scaled_by_k)  # LibMTL's EW sums the losses


def _mgda(mgda_gn: str = "none") -> Plan:
    return Plan(method("mgda", normalization=mgda_gn))


def _pcgrad() -> Plan:
    return Plan(method("pcgrad", reduction="sum", seed=draw_seed(None)))


def _gradvac(
    beta: float | None = None, GradVac_beta: float | None = None, GradVac_group_type: int = 0
) -> Plan:
    if beta is not None and GradVac_beta is not None:
        raise ValueError("give beta (LibMTL 1.1.5) or GradVac_beta (newer LibMTL), not both")
    if GradVac_group_type != 0:
        raise ValueError(
            "GradVac_group_type must be 0 (whole model): the per-layer variants need one Gram "
            "per parameter group"
        )
    b = (
        0.5
        if beta is None and GradVac_beta is None
        else (beta if beta is not None else GradVac_beta)
    )
    return Plan(method("gradvac", beta=b, seed=draw_seed(None)))


def _imtl() -> Plan:
    return Plan(method("imtl"))


def _imtl_init(model: Any) -> None:
    """IMTL-L's learnable loss scales ``s`` (LibMTL's ``loss_scale``, initialized to 0)."""
    model.loss_scale = torch.nn.Parameter(torch.zeros(model.task_num, device=model.device))


def _imtl_losses(model: Any, losses: Tensor) -> Tensor:
    """IMTL-L: ``exp(s) L - s`` (Liu et al., ICLR 2021, eq. 6), as LibMTL's IMTL."""
    scale = getattr(model, "loss_scale", None)
    if not isinstance(scale, torch.nn.Parameter):
        raise RuntimeError(
            "IMTL: the model has no loss_scale parameter; call model.init_param() after building "
            "it (LibMTL's Trainer does)"
        )
    return scale.exp() * losses - scale


def _cagrad(calpha: float = 0.5, rescale: int = 1) -> Plan:
    return Plan(method("cagrad", c=calpha, rescale=rescale))


def _rlw(dist: str = "Normal") -> Plan:
    if dist != "Normal":
        raise ValueError(
            f"RLW: dist={dist!r} is not supported; ours draws the paper's default, softmax of "
            "standard normals (dist='Normal')"
        )
    return Plan(method("rlw", seed=draw_seed(None)))


def _nash_mtl(update_weights_every: int = 1, optim_niter: int = 20, max_norm: float = 1.0) -> Plan:
    if isinstance(optim_niter, bool) or not isinstance(optim_niter, int) or optim_niter < 1:
        raise ValueError(f"optim_niter must be a positive integer, got {optim_niter!r}")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not max_norm >= 0:
        raise ValueError(f"max_norm must be a number >= 0, got {max_norm!r}")
    return Plan(
        Periodic(method("nashmtl", normalize=False), update_weights_every),
        max_grad_norm=float(max_norm),
    )


def _aligned_mtl() -> Plan:
    return Plan(method("alignedmtl"))


def _db_mtl(DB_beta: float = 0.9, DB_beta_sigma: float = 0.0) -> Plan:
    return Plan(method("dbmtl", beta=DB_beta, beta_sigma=DB_beta_sigma))


def _log_losses(model: Any, losses: Tensor) -> Tensor:
    """DB-MTL's loss-scale balancing: the gradients of ``log(L_i + 1e-8)``."""
    return torch.log(losses + 1e-8)


def _fairgrad(FairGrad_alpha: float = 1.0) -> Plan:
    return Plan(method("fairgrad", alpha=FairGrad_alpha, normalize=False))


def _upgrad(UPGrad_norm_eps: float = 0.0, UPGrad_reg_eps: float = 0.0) -> Plan:
    return Plan(method("upgrad"), prepare=dual_cone_regularization(UPGrad_norm_eps, UPGrad_reg_eps))


def _dualproj() -> Plan:
    return Plan(method("dualproj"))


def _gradnorm(alpha: float = 1.5) -> Plan:
    return Plan(method("gradnorm", alpha=alpha))


def _uw() -> Plan:
    return Plan(method("uw", init=-0.5))  # LibMTL's initial log-variance


def _dwa(T: float = 2.0) -> Plan:
    return Plan(method("dwa", temperature=T))


def _dwa_epochs(model: Any, dwa: Any) -> None:
    """Close our DWA's epochs as LibMTL's Trainer advances ``model.epoch`` (its DWA reads the
    trainer's per-epoch average losses; ours averages the same losses itself)."""
    epoch = getattr(model, "epoch", None)
    if isinstance(epoch, bool) or not isinstance(epoch, int):
        raise RuntimeError(
            "DWA needs the current epoch in model.epoch (LibMTL's Trainer sets it; set it "
            "yourself in your own loop)"
        )
    seen = model.__dict__.setdefault("_mtlsam_epoch", epoch)
    for _ in range(epoch - seen):
        dwa.end_epoch()
    model.__dict__["_mtlsam_epoch"] = max(seen, epoch)


def _gls() -> Plan:
    return Plan(method("gls"))


def _graddrop(leak: float = 0.0) -> Plan:
    return Plan(method("graddrop", leak=leak, seed=draw_seed(None)))


def _famo(FAMO_w_lr: float = 0.025, FAMO_w_gamma: float = 1e-3) -> Plan:
    return Plan(method("famo", lr=FAMO_w_lr, weight_decay=FAMO_w_gamma))


def _famo_update_w(self: Any, curr_losses: Tensor) -> None:
    """LibMTL's ``FAMO.update_w``: one step of the logits from the change of the losses since the
    last ``backward`` (``curr_losses``: the same batch's losses after the model step). Without
    it, the next ``backward``'s losses drive that step (no extra forward pass)."""
    plan = self._mtlsam_plan
    if plan is None:
        raise RuntimeError("FAMO.update_w must follow a backward")
    L = curr_losses.detach().reshape(-1).to(torch.float64)
    famo = plan.weighting
    famo(L.new_zeros(L.shape[0], L.shape[0]), L)  # the pending step: from the last losses to L
    state = famo.state_dict()
    state["has_prev"] = torch.zeros_like(state["has_prev"])  # the next backward takes no step
    famo.load_state_dict(state)


def _moco(
    MoCo_beta: float = 0.5,
    MoCo_beta_sigma: float = 0.5,
    MoCo_gamma: float = 0.1,
    MoCo_gamma_sigma: float = 0.5,
    MoCo_rho: float = 0.0,
) -> Plan:
    return Plan(
        method(
            "moco",
            beta=MoCo_beta,
            beta_sigma=MoCo_beta_sigma,
            gamma=MoCo_gamma,
            gamma_sigma=MoCo_gamma_sigma,
            rho=MoCo_rho,
            normalize=True,  # LibMTL's loss-scaled unit gradients
        )
    )


def _excess_mtl(robust_step_size: float = 1.0) -> Plan:
    # LibMTL's weights sum to K, ours to 1
    return Plan(method("excessmtl", robust_step_size=robust_step_size), finish=scaled_by_k)


#: LibMTL class name -> row. Every weighting of ours, by LibMTL's name where LibMTL has one.
METHODS: dict[str, Method] = {
    m.libmtl: m
    for m in [
        Method("EW", "ls", _ew, "Weights 1 (LibMTL sums the losses).", uses_gram=False),
        Method(
            "MGDA",
            "mgda",
            _mgda,
            "mgda_gn: same meaning. The min-norm QP is solved exactly (LibMTL: Frank-Wolfe to "
            "1e-5, two-task steps clamped to [0.001, 0.999]); the loss normalizations read the "
            "losses on the device (LibMTL: loss.item()).",
        ),
        Method(
            "PCGrad",
            "pcgrad",
            _pcgrad,
            "Projected gradients summed, as LibMTL. Orders from a seeded device stream (seeded "
            "from torch's generator when the weighting is built); LibMTL's orders also visit the "
            "task itself, which can only matter for K >= 3.",
        ),
        Method(
            "GradVac",
            "gradvac",
            _gradvac,
            "beta (1.1.5) or GradVac_beta: same meaning; GradVac_group_type 0 only. The target "
            "EMA is updated at every pair, as in the paper (LibMTL updates it only when the "
            "correction fires, so from the second step on the two differ).",
        ),
        Method(
            "IMTL",
            "imtl",
            _imtl,
            "IMTL-L (learnable loss scale, LibMTL's loss_scale) + IMTL-G on the Gram, as LibMTL.",
            losses=_imtl_losses,
            init=_imtl_init,
        ),
        Method(
            "CAGrad",
            "cagrad",
            _cagrad,
            "calpha, rescale: same meaning. The dual is solved exactly on the device (LibMTL: "
            "scipy SLSQP on the host, and its objective only works for 3 tasks).",
        ),
        Method(
            "RLW",
            "rlw",
            _rlw,
            "dist='Normal' only (softmax of standard normals), from a seeded device stream.",
            heads="weighted",
            uses_gram=False,
        ),
        Method(
            "Nash_MTL",
            "nashmtl",
            _nash_mtl,
            "update_weights_every, max_norm (clips the shared gradient): same meaning. "
            "optim_niter: validated, not used (Gamma w = 1 / w solved exactly). Reuse steps "
            "still compute the task gradients (LibMTL's skip them).",
            heads="weighted",
        ),
        Method(
            "Aligned_MTL",
            "alignedmtl",
            _aligned_mtl,
            "No options (scale: the smallest eigenvalue), as LibMTL.",
        ),
        Method(
            "DB_MTL",
            "dbmtl",
            _db_mtl,
            "DB_beta, DB_beta_sigma: same meaning; gradients of log(L + 1e-8), as LibMTL. The EMA "
            "is kept for the squared gradient norms only and weights the current gradients "
            "(LibMTL keeps K x P EMA gradients and combines those): same direction on the first "
            "step, close while gradients keep their direction.",
            losses=_log_losses,
        ),
        Method(
            "FairGrad",
            "fairgrad",
            _fairgrad,
            "FairGrad_alpha: same meaning; solved on the device (LibMTL: scipy least_squares).",
            heads="weighted",
        ),
        Method(
            "UPGrad",
            "upgrad",
            _upgrad,
            "UPGrad_norm_eps, UPGrad_reg_eps: torchjd's regularization, reproduced on the device "
            "(default 0: the exact projection).",
        ),
        Method("DualProj", "dualproj", _dualproj, "Ours only (LibMTL has no DualProj)."),
        Method(
            "GradNorm",
            "gradnorm",
            _gradnorm,
            "alpha: same meaning. The paper's weights (Adam on w, clipped, renormalized to sum "
            "K) learnt from the first call on, L(0) the first call's losses (LibMTL: K "
            "softmax(theta) stepped by the network's optimizer, plain sums in epoch 0, L(0) "
            "that epoch's average).",
        ),
        Method(
            "UW",
            "uw",
            _uw,
            "No options; weights 1 / (2 exp(s)), s from -0.5 as LibMTL. s is stepped by the "
            "weighting's own Adam (lr 1e-3) at every backward, not by the trainer's optimizer.",
            heads="weighted",
            uses_gram=False,
        ),
        Method(
            "DWA",
            "dwa",
            _dwa,
            "T: same meaning. Follows the trainer's model.epoch; the per-epoch average losses "
            "are averaged by our weighting on the device (LibMTL: its train_loss_buffer).",
            heads="weighted",
            uses_gram=False,
            before=_dwa_epochs,
        ),
        Method(
            "GLS",
            "gls",
            _gls,
            "No options; the gradient of (prod L)^(1/K), as LibMTL. Returns those gradient "
            "weights (LibMTL returns L / (K prod L)).",
            heads="weighted",
            uses_gram=False,
        ),
        Method(
            "GradDrop",
            "graddrop",
            _graddrop,
            "leak: same meaning. On the shared parameters' gradients, rep_grad=False (LibMTL: "
            "on the representation's, rep_grad=True only); uniforms from our seeded stream. "
            "Returns None, as LibMTL.",
        ),
        Method(
            "FAMO",
            "famo",
            _famo,
            "FAMO_w_lr, FAMO_w_gamma: same meaning (LibMTL's repository); update_w(losses) "
            "after the step as there, or the next backward's losses drive the logit step.",
            heads="weighted",
            uses_gram=False,
            methods={"update_w": _famo_update_w},
        ),
        Method(
            "MoCo",
            "moco",
            _moco,
            "MoCo_beta, MoCo_beta_sigma, MoCo_gamma, MoCo_gamma_sigma, MoCo_rho: same meaning "
            "(LibMTL's repository), loss-scaled unit gradients tracked as there; the weights "
            "are projected onto the simplex as in the paper (LibMTL: a softmax). Returns None.",
        ),
        Method(
            "ExcessMTL",
            "excessmtl",
            _excess_mtl,
            "robust_step_size: same meaning (LibMTL's repository), weights summing to K as "
            "there. The first call already steps from its raw excess risks (as the paper's "
            "torchjd port; LibMTL keeps the weights at 1 on the first call).",
            heads="weighted",
        ),
    ]
}


# ------------------------------------------------------------------ backward
class _Scratch:
    """Per-model buffers of the adapter: the ``[K, P]`` task gradients and the combined one."""

    def __init__(self, shared: list[Tensor], K: int):
        self.buffer = GradBuffer(shared, K)
        self.key = self.key_of(shared, K)
        self.out = torch.empty(
            self.buffer.layout.numel, dtype=self.buffer.G.dtype, device=self.buffer.G.device
        )
        self.views = self.buffer.layout.views(self.out)

    @staticmethod
    def key_of(shared: list[Tensor], K: int) -> tuple:
        return (K, tuple((id(p), p.shape, p.dtype, p.device) for p in shared))


class _LibMTLWeighting:
    """What the generated classes add to ``AbsWeighting`` (mixed in before it)."""

    row: Method
    task_num: int
    rep_grad: bool

    _mtlsam_plan: Plan | None = None  # built by the first backward (it needs the weight_args)
    _mtlsam_args: dict[str, Any] | None = None
    _mtlsam_scratch: _Scratch | None = None

    def init_param(self) -> None:
        super().init_param()  # type: ignore[misc]
        if self.row.init is not None:
            self.row.init(self)

    def _plan_for(self, weight_args: dict[str, Any]) -> Plan:
        if self._mtlsam_plan is None:
            try:
                plan = self.row.plan(**weight_args)
            except TypeError as error:
                raise TypeError(
                    f"{self.row.libmtl} weight_args {weight_args!r}: {error}"
                ) from error
            self._mtlsam_plan, self._mtlsam_args = plan, dict(weight_args)
            return plan
        if weight_args != self._mtlsam_args:
            raise ValueError(
                f"{self.row.libmtl}: weight_args changed from {self._mtlsam_args!r} to "
                f"{weight_args!r}; the weighting is built once (build a new model to change them)"
            )
        return self._mtlsam_plan

    def backward(self, losses: Tensor | Sequence[Tensor], **weight_args: Any) -> np.ndarray | None:
        """Set the gradients of a step from the K task losses; returns the task weights (None
        for the methods whose update is a direction, not a combination of the gradients)."""
        K = self.task_num
        if not isinstance(losses, Tensor):
            losses = torch.stack(list(losses))
        if losses.shape != (K,):
            raise ValueError(f"expected the {K} task losses, got shape {tuple(losses.shape)}")
        if self.rep_grad and self.row.heads == "weighted":
            raise ValueError(
                f"{self.row.libmtl} does not support rep_grad=True (it weights the task-specific "
                "gradients too; LibMTL refuses it as well)"
            )
        plan = self._plan_for(weight_args)
        if self.rep_grad and plan.weighting.returns_direction:
            raise ValueError(
                f"{self.row.libmtl} works on the shared parameters' gradients here: use "
                "rep_grad=False (its direction is not a combination of representation gradients)"
            )
        if self.row.before is not None:
            self.row.before(self, plan.weighting)
        if self.row.losses is not None:
            losses = self.row.losses(self, losses)
        if self.rep_grad:  # LibMTL's own representation gradients, our weights
            per_grads, grads = self._get_grads(losses, mode="backward")  # type: ignore[attr-defined]
            gram = ops.gram(grads) if self.row.uses_gram else grads.new_zeros(K, K)
            w = plan.weights(gram, losses.detach())
            self._backward_new_grads(w, per_grads=per_grads)  # type: ignore[attr-defined]
        elif not self.row.uses_gram:
            w = plan.weights(losses.new_zeros(K, K).detach(), losses.detach())
            (w.detach().to(losses.dtype) * losses).sum().backward()
        else:
            w = self._shared_backward(plan, losses)
            if plan.weighting.returns_direction:
                return None  # no weights: as LibMTL's GradDrop
        return w.detach().cpu().numpy()

    def _shared_backward(self, plan: Plan, losses: Tensor) -> Tensor:
        shared = [p for p in self.get_share_params() if p.requires_grad]  # type: ignore[attr-defined]
        K = self.task_num
        scratch = self._mtlsam_scratch
        if scratch is None or scratch.key != _Scratch.key_of(shared, K):
            scratch = self._mtlsam_scratch = _Scratch(shared, K)
        G = scratch.buffer.G
        for i in range(K):
            with scratch.buffer.capture(i):
                torch.autograd.backward(losses[i], inputs=shared, retain_graph=True)
        w = plan.weights(ops.gram(G), losses.detach(), grads=G)
        if plan.weighting.returns_direction:  # GradDrop, MoCo: the direction itself
            scratch.out.copy_(w)
        else:
            ops.combine(w, G, out=scratch.out)
        for p, view in zip(shared, scratch.views):
            p.grad = view
        if plan.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(shared, plan.max_grad_norm)
        ids = {id(p) for p in shared}
        others = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]  # type: ignore[attr-defined]
        coef = (
            w.detach().to(losses.dtype) if self.row.heads == "weighted" else torch.ones_like(losses)
        )
        if others:
            torch.autograd.backward((coef * losses).sum(), inputs=others)
        return w

    def weighting_state_dict(self) -> dict[str, Any]:
        """The weighting's state (random stream, EMAs, Nash-MTL's schedule) and its
        ``weight_args``; empty before the first ``backward``."""
        if self._mtlsam_plan is None:
            return {}
        return {
            "method": self.row.libmtl,
            "weight_args": dict(self._mtlsam_args or {}),
            "state": self._mtlsam_plan.weighting.state_dict(),
        }

    def load_weighting_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`weighting_state_dict`; before the first ``backward`` it builds the
        weighting from the saved ``weight_args``. Everything is checked before anything changes."""
        if not state:
            return
        if not isinstance(state, dict) or state.get("method") != self.row.libmtl:
            got = state.get("method") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"weighting state of {got!r} cannot be loaded into {self.row.libmtl}")
        if self._mtlsam_plan is not None and state["weight_args"] != self._mtlsam_args:
            raise ValueError(
                f"weighting state saved with weight_args {state['weight_args']!r}, this model "
                f"uses {self._mtlsam_args!r}"
            )
        plan = self._mtlsam_plan or self.row.plan(**state["weight_args"])
        plan.weighting.load_state_dict(state["state"])
        self._mtlsam_plan, self._mtlsam_args = plan, dict(state["weight_args"])


def _weighting_class(row: Method) -> type:
    doc = (
        f"LibMTL's ``{row.libmtl}`` computed by mtlsam_fast's ``{row.ours}`` weighting "
        f"(``mtlsam_fast.weighting.get({row.ours!r})``); see :mod:`mtlsam_fast.integrations."
        f"libmtl`.\n\nweight_args: {row.notes}"
    )
    namespace = {
        "row": row,
        "__doc__": doc,
        "__module__": __name__,
        "__qualname__": row.libmtl,
        **row.methods,
    }
    return type(row.libmtl, (_LibMTLWeighting, AbsWeighting), namespace)


_CLASSES = {row.libmtl: _weighting_class(row) for row in METHODS.values()}
globals().update(_CLASSES)

__all__ = ["METHODS", "AbsWeighting", "Method"]
__all__ += list(_CLASSES)  # the generated weighting classes
