"""The multi-task training and evaluation loop behind ``mtlsam-fast train`` and ``compare``.

One run: build the data (:mod:`mtlsam_fast.data`), a :class:`~mtlsam_fast.models.MultiTaskNet`, an
optimizer (F-MTL, SAMO or plain gradient aggregation, any weighting), train for a number of steps
with ``losses = opt.step(closure)``, evaluate per-task test accuracy, and return a JSON-ready
result. Checkpoints hold the model, the optimizer (base optimizer and weighting state included), the
batch sampler and the RNG state, so a resumed run continues exactly where it stopped. Every file is
written to a temporary file in the destination directory and then renamed (``os.replace``), so an
interrupted or failed run never leaves a partial result or checkpoint behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from . import data as datasets
from . import launch, weighting
from .data import UNLABELED, MultiTaskData
from .models import MultiTaskNet

RESULT_FORMAT = "mtlsam_fast.result/1"
CHECKPOINT_FORMAT = "mtlsam_fast.checkpoint/1"
OPTIMIZERS = ("plain", "fmtl", "samo")
BASE_OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "sgd": torch.optim.SGD}
#: method-name prefixes -> optimizer kind (``fmtl-mgda``, ``f-mgda``, ``samo-mgda``; no prefix:
#: plain)
_PREFIXES = {"fmtl": "fmtl", "f": "fmtl", "samo": "samo", "plain": "plain"}
#: configuration fields a resumed run may change (the training length and the evaluation interval)
RESUMABLE_CHANGES = ("steps", "epochs", "eval_every")


class UsageError(Exception):
    """A user error (bad option, unreadable checkpoint): reported as a message, not a traceback."""


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
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise UsageError(f"unknown configuration keys {sorted(unknown)}")
        return cls(**d)


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
    for name in ("lr", "batch_size", "epochs"):
        if not getattr(cfg, name) > 0:
            raise UsageError(f"{name.replace('_', '-')} must be positive, got {getattr(cfg, name)}")
    for name in ("steps", "eval_every", "n_train", "n_test"):
        v = getattr(cfg, name)
        if v is not None and v < 1:
            raise UsageError(f"{name.replace('_', '-')} must be at least 1, got {v}")
    if cfg.rho < 0 or (cfg.rho_head is not None and cfg.rho_head < 0):
        raise UsageError("rho and rho-head must be non-negative")
    if not 0.0 <= cfg.alpha <= 1.0:
        raise UsageError(f"alpha must be in [0, 1], got {cfg.alpha}")
    if not 0.0 <= cfg.noise_rate <= 1.0:
        raise UsageError(f"noise rate must be in [0, 1], got {cfg.noise_rate}")
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
        self.gen.set_state(state["gen"])
        self.perm = state["perm"].clone()
        self.pos = int(state["pos"])


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
# atomic files


def atomic_write(path: str, write: Callable[[io.BufferedWriter], object]) -> None:
    """Write ``path`` through a temporary file in the same directory, then ``os.replace`` it."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
    except OSError as e:
        raise UsageError(f"cannot write {path!r}: {e.strerror or e}") from None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: str, obj: Any) -> None:
    text = json.dumps(obj, indent=2, allow_nan=True) + "\n"
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def save_checkpoint(path: str, state: dict[str, Any]) -> None:
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read and check a checkpoint written by :func:`train`; a :class:`UsageError` when unusable."""
    if not os.path.isfile(path):
        raise UsageError(f"checkpoint {path!r} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the user's input problem, not a bug
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(
            f"cannot read checkpoint {path!r}: not a valid mtlsam-fast checkpoint ({msg})"
        ) from None
    keys = (
        "format",
        "config",
        "step",
        "model",
        "optimizer",
        "sampler",
        "rng",
        "history",
        "train_time",
    )
    if (
        not isinstance(state, dict)
        or state.get("format") != CHECKPOINT_FORMAT
        or any(k not in state for k in keys)
    ):
        raise UsageError(
            f"checkpoint {path!r} is not an mtlsam-fast training checkpoint ({CHECKPOINT_FORMAT})"
        )
    return state


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


def train(
    cfg: TrainConfig,
    data: MultiTaskData | None = None,
    *,
    checkpoint: str | None = None,
    checkpoint_every: int | None = None,
    resume: dict[str, Any] | None = None,
    progress: bool = False,
    desc: str | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Train one model; returns the result dictionary (see :data:`RESULT_FORMAT`).

    ``resume``: a checkpoint from :func:`load_checkpoint` (its configuration must equal ``cfg``
    except for ``steps``/``epochs``). ``checkpoint``: path written every ``checkpoint_every`` steps
    (default: at every evaluation) and at the end.
    """
    import mtlsam_fast

    device = launch.setup(validate(cfg))  # under torchrun: this process's share of the run
    if cfg.batch_size % launch.world_size():
        raise UsageError(
            f"batch size {cfg.batch_size} does not split over {launch.world_size()} processes"
        )
    progress = progress and launch.rank() == 0
    log = log or (lambda s: None)
    if data is None:
        data = build_data(cfg, progress=progress)
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
    try:
        return _train(
            cfg, data, model, device, checkpoint, checkpoint_every, resume, progress, desc, log
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
    progress: bool,
    desc: str | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    import mtlsam_fast

    try:
        opt = build_optimizer(cfg, model)
    except (TypeError, ValueError, NotImplementedError) as e:
        raise UsageError(f"cannot build the {cfg.optimizer} optimizer: {e}") from None
    sampler = BatchSampler(data.y_train, cfg.batch_size, cfg.seed)
    steps = total_steps(cfg, sampler)
    eval_every = cfg.eval_every or sampler.steps_per_epoch
    history: list[dict[str, Any]] = []
    step, train_time, train_cpu = 0, 0.0, 0.0
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
        try:
            model.load_state_dict(resume["model"])
            opt.load_state_dict(resume["optimizer"])
            sampler.load_state_dict(resume["sampler"])
        except (KeyError, RuntimeError, ValueError, TypeError) as e:
            raise UsageError(f"checkpoint does not match this model/optimizer: {e}") from None
        torch.set_rng_state(resume["rng"])
        step, history, train_time = (
            int(resume["step"]),
            list(resume["history"]),
            float(resume["train_time"]),
        )
        train_cpu = float(resume.get("train_cpu", 0.0))
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
        }

    from tqdm import tqdm

    bar = tqdm(
        total=steps,
        initial=step,
        disable=not progress,
        desc=desc or cfg.method,
        unit="step",
        file=sys.stderr,
        dynamic_ncols=True,
        leave=True,
    )
    K = data.num_tasks
    running = torch.zeros(K, dtype=torch.float64)
    running_n = 0
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
            running += losses.detach().double().cpu()
            running_n += 1
            step += 1
            train_time += time.perf_counter() - t0
            train_cpu += time.process_time() - c0
            bar.update(1)
            if step % 10 == 0 or step == steps:
                bar.set_postfix(
                    _format_losses(data.task_names, (running / running_n).tolist()), refresh=False
                )
            if step % eval_every == 0 or step == steps:
                metrics = evaluate(model, data, device)
                history.append(
                    {
                        "step": step,
                        "train_loss": (running / max(running_n, 1)).tolist(),
                        "test_accuracy": accuracies(metrics),
                        "train_time": train_time,
                    }
                )
                running.zero_()
                running_n = 0
            due = step == steps or step % (checkpoint_every or eval_every) == 0
            if checkpoint and due and launch.rank() == 0:  # the replicas are identical
                save_checkpoint(checkpoint, ckpt_state())
    finally:
        bar.close()
    launch.check_replicas(model.parameters())
    metrics = evaluate(model, data, device)
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
        "train_time_s": train_time,
        "step_time_ms": 1000.0 * train_time / max(step, 1),
        "train_cpu_s": train_cpu,  # process CPU time: less sensitive than wall time to other load
        "step_cpu_ms": 1000.0 * train_cpu / max(step, 1),
        "test": metrics,
        "history": history,
        "environment": {
            "torch": torch.__version__,
            "mtlsam_fast": mtlsam_fast.__version__,
            "device": str(device),
            "backend": cfg.backend,
            "threads": torch.get_num_threads(),
            "processes": launch.world_size(),
        },
    }


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
