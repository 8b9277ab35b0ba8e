"""Multi-task data sets as in-memory tensors: the built-in MultiDigits and loaders for files on
disk.

``load(name, ...)`` builds one by name (``names()`` lists them). Nothing is ever downloaded: the
file-based loaders raise :class:`MissingDataError` naming the missing file and the directory.

| name | tasks | source |
|---|---|---|
| ``multidigits`` | 2 x 10 classes | scikit-learn's bundled 8x8 digits, composed on a 12x12 canvas |
| ``multimnist`` | 2 x 10 classes | MNIST IDX files in ``data_dir`` |
| ``multifashion`` | 2 x 10 classes | Fashion-MNIST IDX files in ``data_dir`` |
| ``multifashion+mnist`` | 2 x 10 classes | MNIST in ``data_dir`` (left), Fashion-MNIST in ``data_dir2`` (right) |
| ``celeba`` | 40 x 2 classes | ``img_align_celeba/``, ``list_attr_celeba.txt``, ``list_eval_partition.txt`` |
"""  # noqa: E501 - the rows of a markdown table cannot wrap

from __future__ import annotations

from typing import Any

from .base import UNLABELED, DataError, MissingDataError, MultiTaskData, compose_pairs
from .celeba import celeba
from .digits import multidigits
from .mnist import multimnist, read_idx

_FILE_BASED = {"multimnist", "multifashion", "multifashion+mnist", "celeba"}
_NAMES = ("multidigits", "multimnist", "multifashion", "multifashion+mnist", "celeba")


def names() -> list[str]:
    return list(_NAMES)


def load(
    name: str, *, data_dir: str | None = None, data_dir2: str | None = None, **options: Any
) -> MultiTaskData:
    """Build data set ``name``. ``options`` go to the builder (``n_train``, ``n_test``, ``seed``,
    ``noise_rate``, ``noise_task``, ``low_resource``, ``low_resource_task``; ``image_size`` for
    CelebA)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in _NAMES:
        raise DataError(f"unknown dataset {name!r}; available: {', '.join(_NAMES)}")
    if key in _FILE_BASED and not data_dir:
        raise DataError(
            f"dataset {key!r} is read from files on disk: give their directory (--data-dir)"
        )
    if key == "multifashion+mnist" and not data_dir2:
        raise DataError(
            "dataset 'multifashion+mnist' needs the MNIST directory (--data-dir) and the "
            "Fashion-MNIST directory (--data-dir2)"
        )
    if key != "celeba":
        options.pop("image_size", None)
        options.pop("progress", None)
    if key == "multidigits":
        return multidigits(**options)
    assert data_dir is not None  # every other data set is file-based: checked above
    if key == "celeba":
        return celeba(data_dir, **options)
    right = data_dir2 if key == "multifashion+mnist" else None
    return multimnist(data_dir, right_dir=right, name=key, **options)


__all__ = [
    "UNLABELED",
    "DataError",
    "MissingDataError",
    "MultiTaskData",
    "celeba",
    "compose_pairs",
    "load",
    "multidigits",
    "multimnist",
    "names",
    "read_idx",
]
