"""MultiMNIST / MultiFashion / MultiFashion+MNIST generated from the standard IDX files on disk.

Reads ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte`` and
``t10k-labels-idx1-ubyte`` (each optionally ``.gz``) from a directory — MNIST and Fashion-MNIST
use the same names. Composition follows MultiMNIST (Sener & Koltun 2018): two 28x28 images on a
36x36 canvas, one at the top-left and one at the bottom-right with random shifts, merged and resized
to 28x28. Training images pair training digits, test images pair test digits. No download code.
"""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import torch

from .base import DataError, MissingDataError, MultiTaskData, apply_variants, compose_pairs

FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

#: IDX type code -> numpy big-endian dtype
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (``.gz`` allowed): magic ``0 0 type ndim``, big-endian int32 dims, data."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"cannot read IDX file {path!r}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f"{path!r} is not an IDX file (bad magic number)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path!r}: truncated IDX header")
    dims = struct.unpack(f">{ndim}i", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - header != expected:
        raise DataError(
            f"{path!r}: IDX header says {dims} ({expected} bytes of data) but the file holds "
            f"{len(data) - header} bytes"
        )
    return (
        np.frombuffer(data, dtype=dtype, offset=header)
        .reshape(dims)
        .astype(dtype.newbyteorder("="))
    )


def find_file(directory: str, name: str, what: str) -> str:
    """``directory/name`` or ``directory/name.gz`` (also the ``name`` with ``-idx`` spelled
    ``.idx``)."""
    if not os.path.isdir(directory):
        raise MissingDataError(what, name, directory, "the directory does not exist")
    candidates = [name, name + ".gz"]
    dotted = name.replace("-idx", ".idx")
    candidates += [dotted, dotted + ".gz"]
    for c in candidates:
        p = os.path.join(directory, c)
        if os.path.isfile(p):
            return p
    raise MissingDataError(what, name, directory, f"looked for {', '.join(candidates)}")


def load_idx_split(
    directory: str, split: str, what: str = "MNIST"
) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N, 28, 28], labels int64 [N]) of ``split`` (train | test) from
    ``directory``."""
    images = read_idx(find_file(directory, FILES[f"{split}_images"], what))
    labels = read_idx(find_file(directory, FILES[f"{split}_labels"], what))
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DataError(
            f"{what} {split} images: expected a uint8 [N, H, W] IDX file, "
            f"got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or len(labels) != len(images):
        raise DataError(f"{what} {split}: {len(images)} images but labels of shape {labels.shape}")
    if images.shape[1] != images.shape[2]:
        raise DataError(f"{what} {split} images must be square, got {images.shape[1:]}")
    return images, labels.astype(np.int64)


def multimnist(
    data_dir: str,
    *,
    right_dir: str | None = None,
    name: str = "multimnist",
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    noise_rate: float = 0.0,
    noise_task: int | str = 2,
    low_resource: int | None = None,
    low_resource_task: int | str = 2,
) -> MultiTaskData:
    """Compose a two-task data set from IDX files in ``data_dir`` (left digit) and ``right_dir``
    (right digit; default ``data_dir``). Sizes default to the source splits' sizes."""
    what = name
    rng = np.random.default_rng(seed)
    splits = {}
    for split, n in (("train", n_train), ("test", n_test)):
        left_x, left_y = load_idx_split(data_dir, split, what)
        right_x, right_y = (
            (left_x, left_y) if right_dir is None else load_idx_split(right_dir, split, what)
        )
        if left_x.shape[1:] != right_x.shape[1:]:
            raise DataError(
                f"{what}: left and right images differ in size "
                f"({left_x.shape[1:]} vs {right_x.shape[1:]})"
            )
        size = left_x.shape[-1]
        n = len(left_x) if n is None else n
        if n < 1:
            raise DataError(f"{what}: the number of {split} images must be positive, got {n}")
        x, li, ri = compose_pairs(
            left_x, right_x, rng, n=n, canvas=size + max(2, round(size * 8 / 28)), out_size=size
        )
        splits[split] = (x, torch.from_numpy(np.stack([left_y[li], right_y[ri]], axis=1)))
    tasks = ["left", "right"]
    classes = [
        int(max(splits["train"][1][:, k].max(), splits["test"][1][:, k].max())) + 1
        for k in range(2)
    ]
    y_train = splits["train"][1]
    info: dict = {"seed": seed, "data_dir": os.path.abspath(data_dir)}
    if right_dir is not None:
        info["right_dir"] = os.path.abspath(right_dir)
    y_train = apply_variants(
        y_train,
        tasks,
        classes,
        rng,
        info,
        noise_rate=noise_rate,
        noise_task=noise_task,
        low_resource=low_resource,
        low_resource_task=low_resource_task,
    )
    return MultiTaskData(
        name,
        tasks,
        classes,
        splits["train"][0],
        y_train,
        splits["test"][0],
        splits["test"][1],
        info,
    )
