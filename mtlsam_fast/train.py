"""The multi-task training and evaluation loop behind ``mtlsam-fast train`` and ``compare``.

One run: build the data (:mod:`mtlsam_fast.data`), a :class:`~mtlsam_fast.models.MultiTaskNet`, an
optimizer (F-MTL, SAMO or plain gradient aggregation, any weighting), train for a number of steps
with ``losses = opt.step(closure)``, evaluate per-task test accuracy, and return a JSON-ready
result. Checkpoints hold the model, the optimizer (base optimizer and weighting state included), the
batch sampler and the RNG state, so a resumed run continues exactly where it stopped; they are
sealed with a SHA-256 (:mod:`mtlsam_fast.files`) and checked field by field when read, so a
corrupted or edited checkpoint is refused instead of resuming with damaged state. Every file is
written atomically (:func:`mtlsam_fast.files.atomic_write`): an interrupted or failed run never
leaves a partial result or checkpoint behind. A run whose losses stay non-finite, or whose weights
stop being finite, stops with :class:`DivergedError` instead of reporting a NaN model as a result,
and never overwrites a good checkpoint with a broken one.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import platform
import sys
import time
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import data as datasets
from . import files, launch, weighting
from .data import UNLABELED, MultiTaskData
from .errors import UsageError, import_extra
from .models import MultiTaskNet

RESULT_FORMAT = "mtlsam_fast.result/1"
#: format 2: sealed with a SHA-256 (format 1 was a bare ``torch.save`` file)
CHECKPOINT_FORMAT = "mtlsam_fast.checkpoint/2"
#: consecutive steps with non-finite task losses after which a run counts as diverged
DIVERGENCE_PATIENCE = 10
#: largest seed (the training and data seeds are unsigned 64-bit)
MAX_SEED = 2**64 - 1
OPTIMIZERS = ("plain", "fmtl", "samo")
BASE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
#: method-name prefixes -> optimizer kind (``fmtl-mgda``, ``f-mgda``, ``samo-mgda``; no prefix:
#: plain)
_PREFIXES = {"fmtl": "fmtl", "f": "fmtl", "samo": "samo", "plain": "plain"}
#: configuration fields a resumed run may change (the training length and the evaluation interval)
RESUMABLE_CHANGES = ("steps", "epochs", "eval_every")


class DivergedError(UsageError):
    """The run diverged (non-finite losses or weights): no result is written, and the last
    checkpoint is kept as it was."""


class TrainingStopped(Exception):
    """:func:`train` stopped early because ``should_stop()`` said so (a signal in the CLI), after
    writing its checkpoint (``checkpoint`` is None when the run had none)."""

    def __init__(self, step: int, steps: int, checkpoint: str | None):
        super().__init__(f"stopped at step {step} of {steps}")
        self.step, self.steps, self.checkpoint = step, steps, checkpoint


# --------------------------------------------------------------------------------------------
# configuration


@dataclasses.dataclass
class TrainConfig:
    """Everything that defines a run (stored in results and checkpoints)."""

    dataset: str = "multidigits"
    data_dir: str | None = None
    data_dir2: str | None = None
    n_train: int | None = None  # None: the data set's default (MultiDigits: 10000)
    n_test: int | None = None  # None: the data set's default (MultiDigits: 2000)
    image_size: int = 64  # CelebA only
    data_seed: int = 0
    noise_rate: float = 0.0
    noise_task: str = "2"
    low_resource: int | None = None
    low_resource_task: str = "2"
    optimizer: str = "fmtl"  # plain | fmtl | samo
    weighting: str = "mgda"
    weighting_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    rho: float = 0.05
    rho_head: float | None = None
    adaptive: bool = False
    alpha: float = 0.5  # SAMO
    zo_eps: float = 1e-3  # SAMO
    base_optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9  # SGD only
    weight_decay: float = 0.0
    batch_size: int = 128
    epochs: float = 5.0
    steps: int | None = None  # overrides epochs
    eval_every: int | None = None  # None: once per epoch
    width: int = 16
    seed: int = 0
    backend: str = "auto"
    device: str = "auto"

    @property
    def method(self) -> str:
        return method_name(self.optimizer, self.weighting)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any) -> TrainConfig:
        """A configuration from a stored dictionary (a checkpoint's, a result's): every key known
        and every value of its field's type, else a :class:`UsageError` naming the field."""
        if not isinstance(d, dict):
            raise UsageError(f"a configuration must be a dictionary, got {type(d).__name__}")
        hints = typing.get_type_hints(cls)
        unknown = set(d) - set(hints)
        if unknown:
            raise UsageError(f"unknown configuration keys {sorted(unknown)}")
        values = {}
        for name, value in d.items():
            hint = hints[name]
            union = typing.get_origin(hint) in (typing.Union, types.UnionType)
            allowed = tuple(
                typing.get_origin(t) or t for t in (typing.get_args(hint) if union else (hint,))
            )
            ok = (value is None and type(None) in allowed) or (
                value is not None
                and (isinstance(value, bool) == (bool in allowed))
                and isinstance(value, allowed)
            )
            if float in allowed and isinstance(value, int) and not isinstance(value, bool):
                value, ok = float(value), True
            if not ok:
                names = " or ".join("None" if t is type(None) else t.__name__ for t in allowed)
                raise UsageError(f"configuration field {name!r} must be {names}, got {value!r}")
            values[name] = value
        if not all(isinstance(k, str) for k in values.get("weighting_options", {})):
            raise UsageError("configuration field 'weighting_options' must have string keys")
        return cls(**values)


def method_name(optimizer: str, weighting_name: str) -> str:
    return weighting_name if optimizer == "plain" else f"{optimizer}-{weighting_name}"


def parse_method(method: str) -> tuple[str, str]:
    """``"mgda"`` -> ("plain", "mgda"); ``"fmtl-mgda"`` / ``"f-mgda"`` -> ("fmtl", "mgda");
    ``"samo-mgda"`` -> ("samo", "mgda")."""
    m = method.strip().lower()
    kind, weighting_name = "plain", m
    if "-" in m:
        prefix, rest = m.split("-", 1)
        if prefix not in _PREFIXES:
            raise UsageError(
                f"unknown method {method!r}: expected WEIGHTING, fmtl-WEIGHTING or samo-WEIGHTING "
                f"(weightings: {', '.join(weighting.names())})"
            )
        kind, weighting_name = _PREFIXES[prefix], rest
    check_weighting(weighting_name, what=f"method {method!r}")
    return kind, weighting_name


def check_weighting(name: str, what: str = "weighting") -> None:
    if name not in weighting.names():
        raise UsageError(
            f"{what}: unknown weighting {name!r}; available: {', '.join(weighting.names())}"
        )


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"unknown device {name!r}; use auto, cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("device 'cuda' requested but no CUDA device is available")
    if dev.type not in ("cpu", "cuda"):
        raise UsageError(f"unsupported device {name!r}; use auto, cpu or cuda")
    return dev


def check_backend(name: str, device: torch.device) -> None:
    from .ops import _registry

    if name not in _registry.BACKEND_NAMES:
        raise UsageError(
            f"unknown backend {name!r}; known backends: {', '.join(_registry.BACKEND_NAMES)}"
        )
    if name != "auto":
        reason = _registry.unavailable_reason(name, device.type)
        if reason is not None:
            avail = ", ".join(["auto", *_registry.available_backends(device)])
            raise UsageError(
                f"backend {name!r} is not available for {device.type} ({reason}); "
                f"available here: {avail}"
            )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_ranges(cfg: TrainConfig) -> None:
    """Every number of the configuration in its range (finite where it is a float)."""

    def number(name: str, lo: float, hi: float = math.inf, *, lo_open=False, hi_open=False):
        v = getattr(cfg, name)
        if v is None:
            return
        inside = math.isfinite(v) and (v > lo if lo_open else v >= lo)
        inside = inside and (v < hi if hi_open else v <= hi)
        if not inside:
            lo_s = f"{'(' if lo_open else '['}{lo:g}"
            hi_s = "inf)" if hi == math.inf else f"{hi:g}{')' if hi_open else ']'}"
            raise UsageError(f"{_flag(name)} must be a finite number in {lo_s}, {hi_s}, got {v}")

    number("lr", 0.0, lo_open=True)
    number("epochs", 0.0, lo_open=True)
    number("rho", 0.0)
    number("rho_head", 0.0)
    number("alpha", 0.0, 1.0)
    number("zo_eps", 0.0, lo_open=True)
    number("momentum", 0.0, 1.0, hi_open=True)
    number("weight_decay", 0.0)
    number("noise_rate", 0.0, 1.0)
    for name in ("steps", "eval_every", "n_test", "low_resource", "width", "image_size"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise UsageError(f"{_flag(name)} must be at least 1, got {v}")
    # BatchNorm normalizes over the batch: a batch of one has no variance (torch raises)
    for name in ("batch_size", "n_train"):
        v = getattr(cfg, name)
        if v is not None and v < 2:
            raise UsageError(
                f"{_flag(name)} must be at least 2 (the model's BatchNorm layers normalize over "
                f"the batch), got {v}"
            )
    for name in ("seed", "data_seed"):
        v = getattr(cfg, name)
        if not 0 <= v <= MAX_SEED:
            raise UsageError(f"{_flag(name)} must be an integer in [0, 2**64 - 1], got {v}")


def validate(cfg: TrainConfig) -> torch.device:
    """Check a configuration before anything is built or written; returns the device."""
    if cfg.optimizer not in OPTIMIZERS:
        raise UsageError(f"unknown optimizer {cfg.optimizer!r}; available: {', '.join(OPTIMIZERS)}")
    check_weighting(cfg.weighting)
    if cfg.dataset not in datasets.names():
        raise UsageError(
            f"unknown dataset {cfg.dataset!r}; available: {', '.join(datasets.names())}"
        )
    if cfg.base_optimizer not in BASE_OPTIMIZERS:
        raise UsageError(
            f"unknown base optimizer {cfg.base_optimizer!r}; "
            f"available: {', '.join(BASE_OPTIMIZERS)}"
        )
    _check_ranges(cfg)
    if cfg.adaptive and cfg.optimizer == "samo":
        raise UsageError("SAMO does not support adaptive (ASAM) perturbations; drop --adaptive")
    device = resolve_device(cfg.device)
    check_backend(cfg.backend, device)
    try:
        weighting.get(cfg.weighting, **cfg.weighting_options)
    except (TypeError, ValueError) as e:
        raise UsageError(f"weighting {cfg.weighting!r}: {e}") from None
    return device


# --------------------------------------------------------------------------------------------
# building blocks


def build_data(cfg: TrainConfig, progress: bool = False) -> MultiTaskData:
    opts: dict[str, Any] = {
        "seed": cfg.data_seed,
        "noise_rate": cfg.noise_rate,
        "noise_task": cfg.noise_task,
        "low_resource": cfg.low_resource,
        "low_resource_task": cfg.low_resource_task,
        "image_size": cfg.image_size,
        "progress": progress,
    }
    if cfg.n_train is not None:
        opts["n_train"] = cfg.n_train
    if cfg.n_test is not None:
        opts["n_test"] = cfg.n_test
    return datasets.load(cfg.dataset, data_dir=cfg.data_dir, data_dir2=cfg.data_dir2, **opts)


def build_model(cfg: TrainConfig, data: MultiTaskData) -> MultiTaskNet:
    return MultiTaskNet(data.image_shape, data.num_classes, width=cfg.width)


def build_optimizer(cfg: TrainConfig, model: MultiTaskNet):
    import mtlsam_fast

    base_kwargs: dict[str, Any] = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.base_optimizer == "sgd":
        base_kwargs["momentum"] = cfg.momentum
    w = weighting.get(cfg.weighting, **cfg.weighting_options)
    common = dict(
        task_params=model.task_parameters(),
        base_optimizer=BASE_OPTIMIZERS[cfg.base_optimizer],
        weighting=w,
        **base_kwargs,
    )
    shared = model.shared_parameters()
    if cfg.optimizer == "plain":
        return mtlsam_fast.MTLOptimizer(shared, **common)
    if cfg.optimizer == "fmtl":
        return mtlsam_fast.FMTL(
            shared, rho=cfg.rho, rho_head=cfg.rho_head, adaptive=cfg.adaptive, **common
        )
    return mtlsam_fast.SAMO(
        shared,
        rho=cfg.rho,
        rho_head=cfg.rho_head,
        adaptive=cfg.adaptive,
        alpha=cfg.alpha,
        zo_eps=cfg.zo_eps,
        seed=cfg.seed,
        **common,
    )


class BatchSampler:
    """Shuffled epochs of the training set from a seeded generator; resumable via ``state_dict``.

    Tasks with labels on fewer than half of the examples (the low-resource variant) get, every step,
    an extra ``batch_size // 4`` examples drawn from their labelled pool, so every batch carries a
    loss for every task.
    """

    def __init__(self, y: torch.Tensor, batch_size: int, seed: int):
        self.n = y.shape[0]
        self.batch_size = min(batch_size, self.n)
        self.gen = torch.Generator().manual_seed(seed)
        labelled = y != UNLABELED
        self.pools = [
            torch.nonzero(labelled[:, k]).flatten()
            for k in range(y.shape[1])
            if int(labelled[:, k].sum()) < self.n // 2
        ]
        self.extra = max(1, batch_size // 4)
        self.perm = torch.randperm(self.n, generator=self.gen)
        self.pos = 0

    @property
    def steps_per_epoch(self) -> int:
        return max(1, self.n // self.batch_size)

    def next(self) -> torch.Tensor:
        if self.pos + self.batch_size > self.n:  # drop the last incomplete batch (BatchNorm)
            self.perm = torch.randperm(self.n, generator=self.gen)
            self.pos = 0
        idx = [self.perm[self.pos : self.pos + self.batch_size]]
        self.pos += self.batch_size
        for pool in self.pools:
            take = min(self.extra, len(pool))
            idx.append(pool[torch.randperm(len(pool), generator=self.gen)[:take]])
        return torch.cat(idx) if len(idx) > 1 else idx[0]

    def state_dict(self) -> dict[str, Any]:
        return {"gen": self.gen.get_state(), "perm": self.perm.clone(), "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        perm, pos = state["perm"], state["pos"]
        if perm.dtype != torch.int64 or perm.shape != (self.n,):
            raise ValueError(f"the sampler's permutation must be int64 [{self.n}]")
        if not torch.equal(torch.sort(perm).values, torch.arange(self.n)):
            raise ValueError(f"the sampler's permutation is not a permutation of 0..{self.n - 1}")
        if isinstance(pos, bool) or not isinstance(pos, int) or not 0 <= pos <= self.n:
            raise ValueError(f"the sampler's position must be an integer in [0, {self.n}]")
        self.gen.set_state(state["gen"])
        self.perm = perm.clone()
        self.pos = pos


def task_losses(logits: Sequence[torch.Tensor], y: torch.Tensor) -> list[torch.Tensor]:
    """Per-task cross-entropy over the examples labelled for that task."""
    return [F.cross_entropy(lg, y[:, k], ignore_index=UNLABELED) for k, lg in enumerate(logits)]


@torch.no_grad()
def evaluate(
    model: MultiTaskNet, data: MultiTaskData, device: torch.device, batch_size: int = 1000
) -> dict[str, Any]:
    """Per-task test accuracy (%) and loss; the mean accuracy and mean error over tasks."""
    was_training = model.training
    model.eval()
    K = data.num_tasks
    correct = torch.zeros(K, dtype=torch.float64)
    loss_sum = torch.zeros(K, dtype=torch.float64)
    count = torch.zeros(K, dtype=torch.float64)
    for s in range(0, len(data.x_test), batch_size):
        x = data.images(data.x_test[s : s + batch_size]).to(device)
        y = data.y_test[s : s + batch_size].to(device)
        for k, lg in enumerate(model(x)):
            mask = y[:, k] != UNLABELED
            yk, lk = y[mask, k], lg[mask].float()
            correct[k] += (lk.argmax(1) == yk).sum().item()
            loss_sum[k] += F.cross_entropy(lk, yk, reduction="sum").item() if len(yk) else 0.0
            count[k] += len(yk)
    model.train(was_training)
    count = count.clamp_min(1)
    acc = (100.0 * correct / count).tolist()
    loss = (loss_sum / count).tolist()
    tasks = {t: {"accuracy": a, "loss": lo} for t, a, lo in zip(data.task_names, acc, loss)}
    mean_acc = sum(acc) / K
    return {"tasks": tasks, "mean_accuracy": mean_acc, "mean_error": 100.0 - mean_acc}


def accuracies(metrics: dict[str, Any]) -> list[float]:
    return [v["accuracy"] for v in metrics["tasks"].values()]


def delta_m(acc: Sequence[float], baseline: Sequence[float]) -> float:
    """Δm% = 100/K · Σ_k (M_k − B_k)/B_k for higher-is-better metrics (accuracy);
    Maninis et al. 2019."""
    if len(acc) != len(baseline):
        raise UsageError(f"baseline has {len(baseline)} values but the model has {len(acc)} tasks")
    if any(b <= 0 for b in baseline):
        raise UsageError("baseline metrics must be positive")
    return 100.0 * sum((m - b) / b for m, b in zip(acc, baseline)) / len(acc)


# --------------------------------------------------------------------------------------------
# results and checkpoints


def result_json(obj: Any) -> bytes:
    """The bytes of a result JSON file."""
    return (json.dumps(obj, indent=2, allow_nan=True) + "\n").encode("utf-8")


def write_json(path: str, obj: Any) -> None:
    files.atomic_write(path, result_json(obj))


def checkpoint_bytes(state: dict[str, Any]) -> bytes:
    """A checkpoint as written to disk: ``torch.save`` of ``state``, sealed with its SHA-256."""
    buf = io.BytesIO()
    torch.save(state, buf)
    return files.seal(buf.getvalue(), "checkpoint")


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    files.atomic_write(path, checkpoint_bytes(state))


#: checkpoint entry -> (type, description) checked by :func:`load_checkpoint`
_CHECKPOINT_FIELDS: dict[str, tuple[type | tuple[type, ...], str]] = {
    "format": (str, "a format string"),
    "config": (dict, "a dictionary"),
    "step": (int, "an integer"),
    "model": (dict, "a dictionary of tensors"),
    "optimizer": (dict, "a dictionary"),
    "sampler": (dict, "a dictionary"),
    "rng": (torch.Tensor, "a uint8 tensor"),
    "history": (list, "a list"),
    "train_time": ((int, float), "a number"),
    "train_cpu": ((int, float), "a number"),
    "extra": (dict, "a dictionary"),
}


def _tensors(obj: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def all_finite(obj: Any) -> bool:
    """True when every floating-point tensor inside ``obj`` is finite."""
    return all(bool(torch.isfinite(t).all()) for t in _tensors(obj) if t.is_floating_point())


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and check a checkpoint written by :func:`train`: its checksum, then the type and range
    of every entry; a :class:`UsageError` naming the problem when it cannot be resumed."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UsageError(f"checkpoint {path!r} not found") from None
    except IsADirectoryError:
        raise UsageError(f"checkpoint {path!r} is a directory, not a checkpoint file") from None
    except OSError as e:
        raise UsageError(f"cannot read checkpoint {path!r}: {e.strerror or e}") from None
    if data.startswith(b"PK\x03\x04"):
        raise UsageError(
            f"cannot read checkpoint {path!r}: a bare torch.save file (mtlsam_fast.checkpoint/1 "
            "or another program's), without the checksum this version needs to verify it"
        )
    try:
        payload = files.unseal(data, "checkpoint", f"checkpoint {path!r}")
    except files.CorruptFileError as e:
        raise UsageError(f"cannot read {e}; not a valid mtlsam-fast checkpoint") from None
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as e:  # a sealed file that torch cannot read: written by something else
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot read checkpoint {path!r}: not a valid mtlsam-fast checkpoint ({msg})"
        ) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UsageError(
            f"checkpoint {path!r} is not an mtlsam-fast training checkpoint ({CHECKPOINT_FORMAT})"
        )
    for key, (kind, what) in _CHECKPOINT_FIELDS.items():
        value = state.get(key)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise UsageError(
                f"checkpoint {path!r}: entry {key!r} must be {what}, got {type(value).__name__}"
            )
    bad = _checkpoint_problem(state)
    if bad:
        raise UsageError(f"checkpoint {path!r}: {bad}")
    return state


def _checkpoint_problem(state: dict[str, Any]) -> str | None:
    """What is wrong inside a checkpoint whose entries have the right types (None: nothing)."""
    try:
        TrainConfig.from_dict(state["config"])
    except UsageError as e:
        return str(e)
    if state["step"] < 0:
        return f"step must be >= 0, got {state['step']}"
    for key in ("train_time", "train_cpu"):
        if not (math.isfinite(state[key]) and state[key] >= 0):
            return f"{key} must be a finite number >= 0, got {state[key]}"
    if not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state["model"].items()
    ):
        return "the model state must map parameter names to tensors"
    if not all_finite(state["model"]) or not all_finite(state["optimizer"]):
        return "the model or optimizer state holds non-finite values"
    if state["rng"].dtype != torch.uint8 or state["rng"].dim() != 1:
        return "the RNG state must be a 1-D uint8 tensor"
    sampler = state["sampler"]
    if not (
        isinstance(sampler.get("gen"), torch.Tensor)
        and isinstance(sampler.get("perm"), torch.Tensor)
        and isinstance(sampler.get("pos"), int)
        and not isinstance(sampler.get("pos"), bool)
    ):
        return "the batch sampler state must hold 'gen' and 'perm' tensors and an integer 'pos'"
    if not all(isinstance(h, dict) for h in state["history"]):
        return "the history must be a list of dictionaries"
    return None


# --------------------------------------------------------------------------------------------
# the optimizer's decisions over training

#: the most points of a run's ``monitor`` series (its interval is chosen to stay below)
MONITOR_POINTS = 256


class MonitorSeries:
    """The optimizer's step records (``opt.last_step``, mtlsam_fast/optim/monitor.py) every
    ``every`` steps, as the result's ``"monitor"`` entry: ``steps``, ``skipped``, ``pairs`` (the
    task pairs ``[i, j]``, ``i < j``, of the cosines) and per aggregation (``"loss"``, ``"flat"``,
    ``"perturbed"``) the lists ``weights`` (``None`` when the weighting returns a direction),
    ``norms`` and ``cosines``, one row per recorded step (6 significant digits; ``None`` for a
    non-finite value, as on a skipped step)."""

    def __init__(self, steps: int, num_tasks: int):
        self.every = max(1, math.ceil(steps / MONITOR_POINTS))
        self.num_tasks = num_tasks
        self.pairs = [[i, j] for i in range(num_tasks) for j in range(i + 1, num_tasks)]
        self.steps: list[int] = []
        self.skipped: list[bool] = []
        self.aggregations: dict[str, dict[str, list[list[float | None]] | None]] = {}

    def load(self, d: Any) -> None:
        """Continue the series stored in a checkpoint (its interval is kept)."""
        ok = (
            isinstance(d, dict)
            and isinstance(d.get("every"), int)
            and not isinstance(d["every"], bool)
            and d["every"] > 0
            and d.get("pairs") == self.pairs
            and isinstance(d.get("steps"), list)
            and isinstance(d.get("skipped"), list)
            and isinstance(d.get("aggregations"), dict)
            and len(d["steps"]) == len(d["skipped"])
        )
        if not ok:
            raise UsageError(
                f"the checkpoint's monitor series is not one of this run's ({self.num_tasks} "
                "tasks): expected every, pairs, steps, skipped and aggregations"
            )
        self.every = d["every"]
        self.steps, self.skipped = list(d["steps"]), list(d["skipped"])
        self.aggregations = {k: dict(v) for k, v in d["aggregations"].items()}

    def due(self, step: int, steps: int) -> bool:
        """Record after step ``step`` (1-based) of ``steps``."""
        return step % self.every == 0 or step == steps

    def add(self, step: int, record: Any) -> None:
        """Append ``record`` (a ``StepRecord``) at step ``step``: one copy to the host."""
        i, j = torch.triu_indices(self.num_tasks, self.num_tasks, 1, device=record.skipped.device)
        parts, layout = [record.skipped.reshape(1).double()], []
        for name, agg in record.aggregations.items():
            fields = {"norms": agg.norms, "cosines": agg.cosines[i, j]}
            if agg.weights is not None:
                fields["weights"] = agg.weights
            for field, t in fields.items():
                layout.append((name, field, t.numel()))
                parts.append(t.reshape(-1).double())
        values = torch.cat(parts).tolist()
        self.steps.append(step)
        self.skipped.append(bool(values[0]))
        at = 1
        for name, field, n in layout:
            series = self.aggregations.setdefault(
                name, {"weights": None, "norms": [], "cosines": []}
            )
            row = [float(f"{v:.6g}") if math.isfinite(v) else None for v in values[at : at + n]]
            at += n
            if series[field] is None:
                series[field] = []
            series[field].append(row)  # type: ignore[union-attr]

    def to_dict(self) -> dict[str, Any]:
        return {
            "every": self.every,
            "pairs": self.pairs,
            "steps": self.steps,
            "skipped": self.skipped,
            "aggregations": self.aggregations,
        }


# --------------------------------------------------------------------------------------------
# the loop


def total_steps(cfg: TrainConfig, sampler: BatchSampler) -> int:
    return (
        cfg.steps
        if cfg.steps is not None
        else max(1, math.ceil(cfg.epochs * sampler.steps_per_epoch))
    )


def _format_losses(names: Sequence[str], losses: Sequence[float]) -> dict[str, str]:
    if len(losses) <= 4:
        return {n[:12]: f"{v:.3f}" for n, v in zip(names, losses)}
    return {"mean_loss": f"{sum(losses) / len(losses):.3f}", "max_loss": f"{max(losses):.3f}"}


#: ``progress`` modes of :func:`train`
PROGRESS_MODES = ("bar", "lines", "off")


class Progress:
    """Training progress on stderr: a tqdm bar (``"bar"``, for a terminal), or log lines
    (``"lines"``, for logs and pipes: one at each evaluation and one at least every ``interval``
    seconds, with the steps, steps/s and per-task training losses), or nothing (``"off"``)."""

    def __init__(
        self,
        mode: str,
        *,
        total: int,
        initial: int,
        desc: str,
        task_names: Sequence[str],
        interval: float = 30.0,
    ):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {mode!r}")
        self.mode, self.total, self.desc, self.names = mode, total, desc, list(task_names)
        self.interval = interval
        self.start_step, self.start_time = initial, time.perf_counter()
        self.last_line = self.start_time
        self.bar = None
        if mode == "bar":
            tqdm = import_extra("tqdm", "tqdm", "the progress bar").tqdm
            self.bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="step",
                file=sys.stderr,
                dynamic_ncols=True,
                leave=True,
            )

    def _line(self, step: int, losses: Sequence[float], accuracy: Sequence[float] | None) -> None:
        now = time.perf_counter()
        rate = (step - self.start_step) / max(now - self.start_time, 1e-9)
        text = f"{self.desc}: step {step}/{self.total} ({100 * step / self.total:.0f}%), "
        text += f"{rate:.1f} step/s, train loss " + " ".join(
            f"{k} {v}" for k, v in _format_losses(self.names, losses).items()
        )
        if accuracy is not None:
            text += ", test acc " + " ".join(
                f"{n[:12]} {a:.2f}" for n, a in zip(self.names, accuracy)
            )
        print(text, file=sys.stderr, flush=True)
        self.last_line = now

    def step(self, step: int, losses: Sequence[float]) -> None:
        """After each training step (``losses``: the running mean of the task losses)."""
        if self.bar is not None:
            self.bar.update(1)
            if step % 10 == 0 or step == self.total:
                self.bar.set_postfix(_format_losses(self.names, losses), refresh=False)
        elif self.mode == "lines" and time.perf_counter() - self.last_line >= self.interval:
            self._line(step, losses, None)

    def evaluated(self, step: int, losses: Sequence[float], accuracy: Sequence[float]) -> None:
        """After an evaluation of the test split."""
        if self.mode == "lines":
            self._line(step, losses, accuracy)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train(
    cfg: TrainConfig,
    data: MultiTaskData | None = None,
    *,
    checkpoint: str | None = None,
    checkpoint_every: int | None = None,
    resume: dict[str, Any] | None = None,
    progress: bool | str = False,
    desc: str | None = None,
    log: Callable[[str], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    extra_state: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train one model; returns the result dictionary (see :data:`RESULT_FORMAT`).

    ``resume``: a checkpoint from :func:`load_checkpoint` (its configuration must equal ``cfg``
    except for ``steps``/``epochs``). ``checkpoint``: path written at the start, every
    ``checkpoint_every`` steps (default: at every evaluation) and at the end. ``progress``: a mode
    of :class:`Progress` (True: ``"bar"``, False: ``"off"``). ``should_stop``: polled after every
    step; when it returns True the checkpoint is written and :class:`TrainingStopped` raised.
    ``extra_state``: stored in every checkpoint under ``"extra"`` (the CLI keeps the Δm baseline
    there). Raises :class:`DivergedError` when the task losses stay non-finite for
    :data:`DIVERGENCE_PATIENCE` steps or the weights stop being finite.
    """
    import mtlsam_fast

    device = launch.setup(validate(cfg))  # under torchrun: this process's share of the run
    if cfg.batch_size % launch.world_size():
        raise UsageError(
            f"batch size {cfg.batch_size} does not split over {launch.world_size()} processes"
        )
    if launch.rank() != 0:  # one progress display for the whole run
        progress = "off"
    log = log or (lambda s: None)
    if data is None:
        data = build_data(cfg, progress=progress is True or progress == "bar")
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, data).to(device)
    if launch.world_size() > 1 and device.type == "cuda":  # global-batch statistics
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    previous_backend = mtlsam_fast.get_backend()
    mtlsam_fast.set_backend(cfg.backend)
    # cuDNN's default convolution algorithms are not deterministic: a run, and a resumed run,
    # would not be reproducible bitwise on a GPU
    previous_cudnn = torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    mode = progress if isinstance(progress, str) else ("bar" if progress else "off")
    try:
        return _train(
            cfg,
            data,
            model,
            device,
            checkpoint,
            checkpoint_every,
            resume,
            mode,
            desc,
            log,
            should_stop or (lambda: False),
            dict(extra_state or {}),
        )
    finally:
        mtlsam_fast.set_backend(previous_backend)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous_cudnn


def _train(
    cfg: TrainConfig,
    data: MultiTaskData,
    model: MultiTaskNet,
    device: torch.device,
    checkpoint: str | None,
    checkpoint_every: int | None,
    resume: dict[str, Any] | None,
    progress: str,
    desc: str | None,
    log: Callable[[str], None],
    should_stop: Callable[[], bool],
    extra_state: dict[str, Any],
) -> dict[str, Any]:
    import mtlsam_fast

    try:
        opt = build_optimizer(cfg, model)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot build the {cfg.optimizer} optimizer: {e}") from None
    sampler = BatchSampler(data.y_train, cfg.batch_size, cfg.seed)
    if sampler.batch_size < 2:
        raise UsageError(
            f"{data.name} has {sampler.n} training example(s): the model's BatchNorm layers need "
            "batches of at least 2"
        )
    steps = total_steps(cfg, sampler)
    eval_every = cfg.eval_every or sampler.steps_per_epoch
    history: list[dict[str, Any]] = []
    monitor = MonitorSeries(steps, data.num_tasks)
    step, train_time, train_cpu, skipped = 0, 0.0, 0.0, 0
    if resume is not None:
        saved = dict(resume["config"])
        mismatch = [
            k for k, v in cfg.to_dict().items() if k not in RESUMABLE_CHANGES and saved.get(k) != v
        ]
        if mismatch:
            raise UsageError(
                "the checkpoint was written with a different configuration: "
                + ", ".join(f"{k}={saved.get(k)!r} (now {getattr(cfg, k)!r})" for k in mismatch)
            )
        own = model.state_dict()
        for name, value in resume["model"].items():
            if name in own and (value.dtype, value.shape) != (own[name].dtype, own[name].shape):
                raise UsageError(
                    f"checkpoint does not match this model: {name} is {value.dtype} "
                    f"{tuple(value.shape)}, the model's is {own[name].dtype} "
                    f"{tuple(own[name].shape)}"
                )
        try:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sampler.load_state_dict(resume["sampler"])
            torch.set_rng_state(resume["rng"])
        except (KeyError, RuntimeError, ValueError, TypeError, IndexError) as e:
            msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UsageError(f"checkpoint does not match this model/optimizer: {msg}") from None
        step, history, train_time = (
            int(resume["step"]),
            list(resume["history"]),
            float(resume["train_time"]),
        )
        train_cpu = float(resume["train_cpu"])
        skipped = int(resume["extra"].get("skipped_steps", 0))
        if "monitor" in resume["extra"]:  # absent from checkpoints of earlier versions
            monitor.load(resume["extra"]["monitor"])
        if step > steps:
            raise UsageError(f"checkpoint is at step {step}, beyond the requested {steps} steps")
        log(f"resumed from step {step}")

    def ckpt_state() -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": cfg.to_dict(),
            "step": step,
            "model": model.state_dict(),
            "optimizer": opt.state_dict(),
            "sampler": sampler.state_dict(),
            "rng": torch.get_rng_state(),
            "history": history,
            "train_time": train_time,
            "train_cpu": train_cpu,
            "extra": {**extra_state, "skipped_steps": skipped, "monitor": monitor.to_dict()},
        }

    def diverged(why: str) -> DivergedError:
        kept = f"; the checkpoint {checkpoint} is kept as it was" if checkpoint else ""
        return DivergedError(
            f"training diverged at step {step} of {steps}: {why} (lr {cfg.lr:g}; a smaller "
            f"--lr usually helps); no result was written{kept}"
        )

    def save() -> None:
        if not all_finite(model.state_dict()):  # never replace a good checkpoint by a broken one
            raise diverged("the model weights are not finite")
        assert checkpoint is not None
        if launch.rank() == 0:  # the replicas are identical: one writer
            save_checkpoint(checkpoint, ckpt_state())

    K = data.num_tasks
    running = torch.zeros(K, dtype=torch.float64)
    running_n = 0
    nonfinite_run = 0  # consecutive steps with non-finite losses
    if checkpoint and resume is None:
        save()  # the run is resumable (and its extra state kept) from the start
    bar = Progress(
        progress,
        total=steps,
        initial=step,
        desc=desc or cfg.method,
        task_names=data.task_names,
    )
    model.train()
    try:
        while step < steps:
            t0, c0 = time.perf_counter(), time.process_time()
            idx = launch.local_batch(sampler.next())
            xb = data.images(data.x_train[idx]).to(device, non_blocking=True)
            yb = data.y_train[idx].to(device, non_blocking=True)

            def closure() -> list[torch.Tensor]:
                return task_losses(model(xb), yb)  # noqa: B023 - only opt.step below calls it

            losses = opt.step(closure)
            losses = (
                torch.stack([torch.as_tensor(v) for v in losses])
                if isinstance(losses, (list, tuple))
                else losses
            )
            host_losses = losses.detach().double().cpu()
            found_inf = opt.found_inf
            skipped += int(found_inf is not None and bool(found_inf.item()))
            step += 1
            train_time += time.perf_counter() - t0
            train_cpu += time.process_time() - c0
            if monitor.due(step, steps) and opt.last_step is not None:
                monitor.add(step, opt.last_step)
            if bool(torch.isfinite(host_losses).all()):
                running += host_losses
                running_n += 1
                nonfinite_run = 0
            else:
                nonfinite_run += 1
                if nonfinite_run >= DIVERGENCE_PATIENCE:
                    raise diverged(f"the task losses were not finite for {nonfinite_run} steps")
            mean_losses = (running / max(running_n, 1)).tolist()
            bar.step(step, mean_losses)
            if step % eval_every == 0 or step == steps:
                metrics = evaluate(model, data, device)
                history.append(
                    {
                        "step": step,
                        "train_loss": mean_losses,
                        "test_accuracy": accuracies(metrics),
                        "train_time": train_time,
                    }
                )
                bar.evaluated(step, mean_losses, accuracies(metrics))
                running.zero_()
                running_n = 0
            stop = step < steps and launch.any_rank(should_stop())
            if checkpoint and (
                stop or step == steps or step % (checkpoint_every or eval_every) == 0
            ):
                save()
            if stop:
                raise TrainingStopped(step, steps, checkpoint)
    finally:
        bar.close()
    launch.check_replicas(model.parameters())
    metrics = evaluate(model, data, device)
    if not all(math.isfinite(v["loss"]) for v in metrics["tasks"].values()):
        raise diverged("the test losses are not finite")
    if skipped == step and step > 0:
        raise diverged(f"all {step} steps were skipped (non-finite gradients)")
    return {
        "format": RESULT_FORMAT,
        "method": cfg.method,
        "config": cfg.to_dict(),
        "dataset": {
            "name": data.name,
            "summary": data.summary(),
            "tasks": data.task_names,
            "num_classes": data.num_classes,
            "n_train": len(data.x_train),
            "n_test": len(data.x_test),
            "labelled_train": data.labelled_counts(),
        },
        "steps": step,
        "skipped_steps": skipped,  # steps the optimizer skipped (non-finite gradients)
        "train_time_s": train_time,
        "step_time_ms": 1000.0 * train_time / max(step, 1),
        "train_cpu_s": train_cpu,  # process CPU time: less sensitive than wall time to other load
        "step_cpu_ms": 1000.0 * train_cpu / max(step, 1),
        "test": metrics,
        "history": history,
        "monitor": monitor.to_dict(),
        "environment": {
            "torch": torch.__version__,
            "mtlsam_fast": mtlsam_fast.__version__,
            "device": str(device),
            "backend": cfg.backend,
            "threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "cpu_model": cpu_model(),
            "processes": launch.world_size(),
        },
    }


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; ``platform.processor()`` elsewhere): with the CPU
    capability, what decides the order of floating-point sums in torch's CPU kernels."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def single_task_data(data: MultiTaskData, k: int) -> MultiTaskData:
    """The same images with only task ``k`` (for single-task baselines)."""
    return MultiTaskData(
        data.name,
        [data.task_names[k]],
        [data.num_classes[k]],
        data.x_train,
        data.y_train[:, k : k + 1],
        data.x_test,
        data.y_test[:, k : k + 1],
        data.info,
    )
