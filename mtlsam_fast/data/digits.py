"""MultiDigits: a MultiMNIST-style two-task benchmark built from scikit-learn's bundled digits.

scikit-learn ships 1,797 handwritten 8x8 digits (``sklearn.datasets.load_digits``, no download).
Each MultiDigits image overlaps two of them on a 12x12 canvas, one towards the top-left and one
towards the bottom-right (random offsets), like MultiMNIST (Sabour et al. 2017; Sener & Koltun
2018). Task ``left`` classifies the top-left digit, task ``right`` the bottom-right one.

No leakage: the source digits are split (stratified by class) into train and test pools first, and
the test images are composed from test-pool digits only. Everything is a function of ``seed``.
"""

from __future__ import annotations

import numpy as np
import torch

from ..errors import import_extra
from .base import DataError, MultiTaskData, apply_variants, compose_pairs

TASKS = ["left", "right"]
CANVAS = 12


def source_split(
    labels: np.ndarray, test_fraction: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified split of source indices into disjoint (train, test) pools."""
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"test fraction must be in (0, 1), got {test_fraction}")
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def multidigits(
    *,
    n_train: int = 10000,
    n_test: int = 2000,
    seed: int = 0,
    test_fraction: float = 0.3,
    noise_rate: float = 0.0,
    noise_task: int | str = 2,
    low_resource: int | None = None,
    low_resource_task: int | str = 2,
) -> MultiTaskData:
    """Build MultiDigits.

    ``noise_rate``: fraction of the training labels of ``noise_task`` (1-based number or name)
    replaced by a different random class (test labels stay clean). ``low_resource``: keep only this
    many training labels of ``low_resource_task``; the other examples are unlabelled for it.
    """
    load_digits = import_extra("sklearn.datasets", "scikit-learn", "MultiDigits").load_digits
    if n_train < 1 or n_test < 1:
        raise DataError(f"n_train and n_test must be positive, got {n_train} and {n_test}")
    digits = load_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(
        np.uint8
    )  # [1797, 8, 8], 0..16 -> 0..255
    labels = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    train_src, test_src = source_split(labels, test_fraction, rng)

    def build(src: np.ndarray, n: int) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        pool = images[src]
        x, li, ri = compose_pairs(pool, pool, rng, n=n, canvas=CANVAS)
        y = torch.from_numpy(np.stack([labels[src[li]], labels[src[ri]]], axis=1))
        return x, y, np.stack([src[li], src[ri]], axis=1)

    x_train, y_train, used_train = build(train_src, n_train)
    x_test, y_test, used_test = build(test_src, n_test)
    info: dict = {
        "seed": seed,
        "source_train": train_src,
        "source_test": test_src,
        "sources_used_train": used_train,
        "sources_used_test": used_test,
    }
    y_train = apply_variants(
        y_train,
        TASKS,
        [10, 10],
        rng,
        info,
        noise_rate=noise_rate,
        noise_task=noise_task,
        low_resource=low_resource,
        low_resource_task=low_resource_task,
    )
    return MultiTaskData(
        "multidigits", list(TASKS), [10, 10], x_train, y_train, x_test, y_test, info
    )
