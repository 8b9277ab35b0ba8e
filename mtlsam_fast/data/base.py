"""The in-memory multi-task dataset every builder returns, and the shared image-pair composer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

Tensor = torch.Tensor

#: label value of an example that has no label for a task (ignored by the loss and the metrics)
UNLABELED = -1


class DataError(ValueError):
    """A data set cannot be built: a bad option or a malformed file (a user error, not a bug)."""


class MissingDataError(FileNotFoundError, DataError):
    """A data file is not on disk; the message names the file and the directory looked in."""

    def __init__(self, what: str, filename: str, directory: str, hint: str = ""):
        msg = f"{what}: file {filename!r} not found in directory {directory!r}"
        super().__init__(msg + (f". {hint}" if hint else ""))
        self.missing_file = filename  # not ``filename``: OSError would reformat the message
        self.directory = directory


@dataclass
class MultiTaskData:
    """Images shared by K classification tasks.

    ``x_*`` are ``uint8 [N, C, H, W]`` (normalized per batch by :meth:`images`); ``y_*`` are
    ``int64 [N, K]`` class indices, :data:`UNLABELED` (-1) where an example has no label for a task.
    """

    name: str
    task_names: list[str]
    num_classes: list[int]
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        K = len(self.task_names)
        for split in ("train", "test"):
            x, y = getattr(self, f"x_{split}"), getattr(self, f"y_{split}")
            if x.dtype != torch.uint8 or x.dim() != 4:
                raise DataError(
                    f"{self.name}: x_{split} must be uint8 [N, C, H, W], "
                    f"got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != (x.shape[0], K):
                raise DataError(
                    f"{self.name}: y_{split} must be int64 [{x.shape[0]}, {K}], "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
            if x.shape[0] == 0:
                raise DataError(f"{self.name}: the {split} split is empty")
        pixels = self.x_train.float() / 255.0
        self.mean = pixels.mean(dim=(0, 2, 3))
        self.std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)

    @property
    def num_tasks(self) -> int:
        return len(self.task_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def images(self, x: Tensor) -> Tensor:
        """uint8 images -> float32, standardized with the training split's channel mean and std."""
        x = x.float().div_(255.0)
        return (x - self.mean.view(1, -1, 1, 1)) / self.std.view(1, -1, 1, 1)

    def labelled_counts(self) -> list[int]:
        return [int((self.y_train[:, k] != UNLABELED).sum()) for k in range(self.num_tasks)]

    def summary(self) -> str:
        c, h, w = self.image_shape
        parts = [
            f"{self.name}: {len(self.x_train)} train / {len(self.x_test)} test images {c}x{h}x{w}, "
            f"{self.num_tasks} tasks"
        ]
        counts = self.labelled_counts()
        if any(n < len(self.x_train) for n in counts):
            parts.append(
                "labelled train examples per task: "
                + ", ".join(f"{t}={n}" for t, n in zip(self.task_names, counts))
            )
        if self.info.get("noise_rate"):
            parts.append(
                f"label noise {self.info['noise_rate']:.0%} on task {self.info['noise_task']!r}"
            )
        return "; ".join(parts)


def compose_pairs(
    left: np.ndarray,
    right: np.ndarray,
    rng: np.random.Generator,
    *,
    n: int,
    canvas: int,
    out_size: int | None = None,
) -> tuple[Tensor, np.ndarray, np.ndarray]:
    """MultiMNIST-style composition: two square images overlapped on a larger canvas.

    ``left``/``right`` are ``uint8 [M, s, s]`` pools. Each of the ``n`` composites takes a random
    image from each pool, puts the left one at a random offset in ``[0, (canvas-s)/2]`` (top-left)
    and the right one at ``[(canvas-s)/2, canvas-s]`` (bottom-right), both rows and columns, merges
    them with a pixel-wise maximum and optionally resizes the canvas to ``out_size`` (area
    averaging). Returns ``(images uint8 [n, 1, S, S], left_index [n], right_index [n])``.
    """
    s = left.shape[-1]
    if left.shape[1:] != (s, s) or right.shape[1:] != (s, s):
        raise DataError(
            "compose_pairs needs square images of one size, "
            f"got {left.shape[1:]} and {right.shape[1:]}"
        )
    shift = canvas - s
    if shift < 0:
        raise DataError(f"canvas {canvas} is smaller than the images ({s})")
    half = shift // 2
    li = rng.integers(0, len(left), size=n)
    ri = rng.integers(0, len(right), size=n)
    lo = rng.integers(0, half + 1, size=(n, 2))
    ro = rng.integers(half, shift + 1, size=(n, 2))
    out = np.zeros((n, canvas, canvas), dtype=np.uint8)
    for j in range(n):
        r, c = lo[j]
        out[j, r : r + s, c : c + s] = left[li[j]]
        r, c = ro[j]
        np.maximum(out[j, r : r + s, c : c + s], right[ri[j]], out=out[j, r : r + s, c : c + s])
    x = torch.from_numpy(out).unsqueeze(1)
    if out_size is not None and out_size != canvas:
        x = torch.nn.functional.interpolate(x.float(), size=(out_size, out_size), mode="area")
        x = x.round_().clamp_(0, 255).to(torch.uint8)
    return x, li, ri


def add_label_noise(
    y: Tensor, task: int, rate: float, num_classes: int, rng: np.random.Generator
) -> Tensor:
    """Replace exactly ``round(rate * n)`` labelled entries of column ``task`` by a different
    class."""
    if not 0.0 <= rate <= 1.0:
        raise DataError(f"noise rate must be in [0, 1], got {rate}")
    y = y.clone()
    labelled = np.flatnonzero((y[:, task] != UNLABELED).numpy())
    m = round(rate * len(labelled))
    if m == 0:
        return y
    idx = rng.choice(labelled, size=m, replace=False)
    shift = torch.from_numpy(rng.integers(1, num_classes, size=m))
    idx_t = torch.from_numpy(idx)
    y[idx_t, task] = (y[idx_t, task] + shift) % num_classes
    return y


def keep_labels(y: Tensor, task: int, n: int, rng: np.random.Generator) -> Tensor:
    """Keep ``n`` random labels of column ``task``; the rest become :data:`UNLABELED`."""
    N = y.shape[0]
    if not 1 <= n <= N:
        raise DataError(
            f"low-resource label count must be between 1 and {N} (the training set size), got {n}"
        )
    y = y.clone()
    keep = torch.zeros(N, dtype=torch.bool)
    keep[torch.from_numpy(rng.choice(N, size=n, replace=False))] = True
    y[~keep, task] = UNLABELED
    return y


def check_task(task: int | str, names: Sequence[str], what: str) -> int:
    """0-based index of a 1-based task number or a task name."""
    if isinstance(task, str):
        if task in names:
            return list(names).index(task)
        try:
            task = int(task)
        except ValueError:
            raise DataError(f"{what}: unknown task {task!r}; tasks: {', '.join(names)}") from None
    if not 1 <= task <= len(names):
        raise DataError(f"{what}: task number must be in 1..{len(names)}, got {task}")
    return task - 1


def apply_variants(
    y_train: Tensor,
    tasks: Sequence[str],
    classes: Sequence[int],
    rng: np.random.Generator,
    info: dict[str, Any],
    *,
    noise_rate: float = 0.0,
    noise_task: int | str = 2,
    low_resource: int | None = None,
    low_resource_task: int | str = 2,
) -> Tensor:
    """The F-MTL motivating variants on the training labels: label noise on one task (test labels
    stay clean) and/or one low-resource task. Records what it did in ``info``."""
    info.setdefault("noise_rate", 0.0)
    if noise_rate:
        k = check_task(noise_task, tasks, "noise task")
        info["clean_y_train"] = y_train
        y_train = add_label_noise(y_train, k, noise_rate, classes[k], rng)
        info.update(noise_rate=float(noise_rate), noise_task=tasks[k])
    if low_resource is not None:
        k = check_task(low_resource_task, tasks, "low-resource task")
        y_train = keep_labels(y_train, k, low_resource, rng)
        info.update(low_resource=int(low_resource), low_resource_task=tasks[k])
    return y_train
