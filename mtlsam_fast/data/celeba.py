"""CelebA (Liu et al. 2015): 40 binary face-attribute tasks, from the files on disk.

Expects, in ``data_dir``: ``list_attr_celeba.txt`` (the image count, the 40 attribute names, then
``<image> <40 values of 1/-1>`` per line), ``list_eval_partition.txt`` (``<image> <0|1|2>``:
train/val/test) and the folder ``img_align_celeba/`` of aligned JPEGs. Images are centre-cropped to
a square and resized to ``image_size``. The validation partition is not used. No download code.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from ..errors import import_extra
from .base import DataError, MissingDataError, MultiTaskData, apply_variants

ATTR_FILE = "list_attr_celeba.txt"
PARTITION_FILE = "list_eval_partition.txt"
IMAGE_DIR = "img_align_celeba"


def _require(path: str, what: str = "CelebA") -> str:
    if not os.path.exists(path):
        raise MissingDataError(what, os.path.basename(path), os.path.dirname(path) or ".")
    return path


def read_attributes(path: str) -> tuple[list[str], list[str], np.ndarray]:
    """(attribute names, image file names, labels int64 [N, A] in {0, 1})."""
    with open(_require(path), encoding="utf-8") as f:
        lines = [ln.split() for ln in f if ln.strip()]
    if len(lines) < 2:
        raise DataError(f"{path!r}: expected a count line and a header line of attribute names")
    header = lines[1]
    rows = lines[2:]
    try:
        count = int(lines[0][0])
    except ValueError:
        raise DataError(
            f"{path!r}: the first line must be the number of images, got {' '.join(lines[0])!r}"
        ) from None
    if count != len(rows):
        raise DataError(f"{path!r}: header says {count} images but {len(rows)} rows follow")
    names, values = [], []
    for i, row in enumerate(rows):
        if len(row) != len(header) + 1:
            raise DataError(
                f"{path!r}, row {i + 3}: expected a file name and {len(header)} values, "
                f"got {len(row)} fields"
            )
        names.append(row[0])
        values.append(row[1:])
    try:
        y = np.asarray(values, dtype=np.int64).reshape(len(rows), len(header))
    except ValueError:
        raise DataError(f"{path!r}: attribute values must be integers (1/-1)") from None
    if not np.isin(y, (-1, 0, 1)).all():
        raise DataError(f"{path!r}: attribute values must be 1 or -1 (or 0)")
    return header, names, (y > 0).astype(np.int64)


def read_partition(path: str) -> dict[str, int]:
    out = {}
    with open(_require(path), encoding="utf-8") as f:
        for i, ln in enumerate(f):
            parts = ln.split()
            if not parts:
                continue
            if len(parts) != 2 or parts[1] not in ("0", "1", "2"):
                raise DataError(
                    f"{path!r}, line {i + 1}: expected '<image> <0|1|2>', got {ln.strip()!r}"
                )
            out[parts[0]] = int(parts[1])
    return out


def load_image(path: str, size: int) -> np.ndarray:
    """uint8 [3, size, size]: centre square crop, then a bicubic resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as src:
            im = src.convert("RGB")
            w, h = im.size
            s = min(w, h)
            left, top = (w - s) // 2, (h - s) // 2
            # Image.BICUBIC is set at import time (so not in Pillow's types); it works on every
            # Pillow, Image.Resampling.BICUBIC only from 9.1 on
            im = im.crop((left, top, left + s, top + s)).resize((size, size), Image.BICUBIC)  # type: ignore[attr-defined]
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except FileNotFoundError:
        raise MissingDataError("CelebA", os.path.basename(path), os.path.dirname(path)) from None
    except (UnidentifiedImageError, OSError) as e:
        raise DataError(f"cannot read image {path!r}: {e}") from None


def celeba(
    data_dir: str,
    *,
    image_size: int = 64,
    n_train: int | None = None,
    n_test: int | None = None,
    seed: int = 0,
    noise_rate: float = 0.0,
    noise_task: int | str = 1,
    low_resource: int | None = None,
    low_resource_task: int | str = 1,
    progress: bool = False,
) -> MultiTaskData:
    """Load CelebA's train (partition 0) and test (partition 2) images with their 40 attributes.

    ``n_train`` / ``n_test`` keep the first that many images of each partition (for quick runs).
    """
    if not os.path.isdir(data_dir):
        raise MissingDataError("CelebA", ATTR_FILE, data_dir, "the directory does not exist")
    if image_size < 8:
        raise DataError(f"image size must be at least 8, got {image_size}")
    import_extra("PIL.Image", "Pillow", "CelebA")
    attrs, files, y = read_attributes(os.path.join(data_dir, ATTR_FILE))
    partition = read_partition(os.path.join(data_dir, PARTITION_FILE))
    image_dir = os.path.join(data_dir, IMAGE_DIR)
    if not os.path.isdir(image_dir):
        raise MissingDataError(
            "CelebA", IMAGE_DIR + "/", data_dir, "the folder of aligned images is missing"
        )
    missing = [f for f in files if f not in partition]
    if missing:
        raise DataError(
            f"{PARTITION_FILE}: no partition for {len(missing)} images listed in {ATTR_FILE} "
            f"(first: {missing[0]!r})"
        )
    split_idx = {}
    for split, code, n in (("train", 0, n_train), ("test", 2, n_test)):
        idx = [i for i, f in enumerate(files) if partition[f] == code]
        if n is not None:
            idx = idx[:n]
        if not idx:
            raise DataError(f"CelebA: no {split} images (partition {code}) in {PARTITION_FILE}")
        split_idx[split] = idx
    total = sum(len(v) for v in split_idx.values())
    bar = None
    if progress:
        tqdm = import_extra("tqdm", "tqdm", "the progress bar").tqdm
        bar = tqdm(total=total, desc="loading CelebA", unit="img", leave=False)
    xs = {}
    for split, idx in split_idx.items():
        x = np.empty((len(idx), 3, image_size, image_size), dtype=np.uint8)
        for j, i in enumerate(idx):
            x[j] = load_image(os.path.join(image_dir, files[i]), image_size)
            if bar is not None:
                bar.update()
        xs[split] = torch.from_numpy(x)
    if bar is not None:
        bar.close()
    y_train = torch.from_numpy(y[split_idx["train"]])
    info: dict = {"data_dir": os.path.abspath(data_dir), "image_size": image_size}
    rng = np.random.default_rng(seed)
    y_train = apply_variants(
        y_train,
        attrs,
        [2] * len(attrs),
        rng,
        info,
        noise_rate=noise_rate,
        noise_task=noise_task,
        low_resource=low_resource,
        low_resource_task=low_resource_task,
    )
    return MultiTaskData(
        "celeba",
        attrs,
        [2] * len(attrs),
        xs["train"],
        y_train,
        xs["test"],
        torch.from_numpy(y[split_idx["test"]]),
        info,
    )
