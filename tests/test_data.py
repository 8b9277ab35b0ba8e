"""Data builders and loaders: MultiDigits (+ noisy / low-resource variants), IDX (MultiMNIST),
CelebA."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest
import torch

from mtlsam_fast import data
from mtlsam_fast.data import UNLABELED, DataError, MissingDataError
from mtlsam_fast.data.mnist import FILES


# ---------------------------------------------------------------------------- MultiDigits
@pytest.fixture(scope="module")
def digits():
    return data.multidigits(n_train=600, n_test=200, seed=3)


def test_multidigits_shapes(digits):
    assert digits.task_names == ["left", "right"] and digits.num_classes == [10, 10]
    assert digits.x_train.shape == (600, 1, 12, 12) and digits.x_train.dtype == torch.uint8
    assert digits.x_test.shape == (200, 1, 12, 12)
    assert digits.y_train.shape == (600, 2) and digits.y_train.dtype == torch.int64
    assert digits.y_train.min() >= 0 and digits.y_train.max() <= 9
    assert digits.x_train.max() == 255  # full 0..255 range after 0..16 -> uint8
    x = digits.images(digits.x_train)
    assert (
        x.dtype == torch.float32 and abs(float(x.mean())) < 1e-4 and abs(float(x.std()) - 1) < 1e-3
    )
    # both labels are balanced-ish over ten classes
    for k in range(2):
        assert len(torch.unique(digits.y_train[:, k])) == 10


def test_multidigits_deterministic(digits):
    again = data.multidigits(n_train=600, n_test=200, seed=3)
    assert torch.equal(digits.x_train, again.x_train) and torch.equal(digits.y_train, again.y_train)
    assert torch.equal(digits.x_test, again.x_test) and torch.equal(digits.y_test, again.y_test)
    other = data.multidigits(n_train=600, n_test=200, seed=4)
    assert not torch.equal(digits.x_train, other.x_train)


def test_multidigits_no_leakage(digits):
    from sklearn.datasets import load_digits

    info = digits.info
    train_src, test_src = set(info["source_train"].tolist()), set(info["source_test"].tolist())
    assert not train_src & test_src
    assert len(train_src) + len(test_src) == 1797
    assert set(info["sources_used_train"].ravel().tolist()) <= train_src
    assert set(info["sources_used_test"].ravel().tolist()) <= test_src
    # the labels are those of the source digits used
    target = load_digits().target
    assert np.array_equal(target[info["sources_used_train"]], digits.y_train.numpy())
    assert np.array_equal(target[info["sources_used_test"]], digits.y_test.numpy())


def test_multidigits_composition_contains_both_digits(digits):
    """Each composite is the pixel-wise max of its two source digits (placed somewhere on the
    canvas)."""
    from sklearn.datasets import load_digits

    imgs = np.rint(load_digits().images * (255 / 16)).astype(np.uint8)
    for j in range(5):
        li, ri = digits.info["sources_used_train"][j]
        x = digits.x_train[j, 0].numpy()
        found = [
            any(
                np.array_equal(
                    np.maximum(x[r : r + 8, c : c + 8], imgs[s]), x[r : r + 8, c : c + 8]
                )
                for r in range(5)
                for c in range(5)
            )
            for s in (li, ri)
        ]
        assert all(found)


@pytest.mark.parametrize("rate", [0.0, 0.2, 0.5])
def test_label_noise_rate(rate):
    d = data.multidigits(n_train=1000, n_test=50, seed=1, noise_rate=rate, noise_task=2)
    clean = data.multidigits(n_train=1000, n_test=50, seed=1)
    assert torch.equal(d.x_train, clean.x_train)  # noise touches labels only
    assert torch.equal(d.y_train[:, 0], clean.y_train[:, 0])  # the other task is clean
    assert torch.equal(d.y_test, clean.y_test)  # test labels stay clean
    flipped = (d.y_train[:, 1] != clean.y_train[:, 1]).sum().item()
    assert flipped == round(rate * 1000)
    assert d.y_train.min() >= 0 and d.y_train.max() <= 9


def test_label_noise_by_task_name():
    d = data.multidigits(n_train=400, n_test=50, seed=1, noise_rate=0.25, noise_task="left")
    assert d.info["noise_task"] == "left"
    assert (d.y_train[:, 0] != d.info["clean_y_train"][:, 0]).sum().item() == 100


def test_low_resource_count():
    d = data.multidigits(n_train=800, n_test=50, seed=2, low_resource=37)
    assert d.labelled_counts() == [800, 37]
    assert (
        (d.y_train[:, 1] == UNLABELED) | ((d.y_train[:, 1] >= 0) & (d.y_train[:, 1] <= 9))
    ).all()
    assert (d.y_test != UNLABELED).all()
    assert "right=37" in d.summary()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"noise_rate": 1.5}, "noise rate"),
        ({"low_resource": 0}, "low-resource"),
        ({"low_resource": 10, "low_resource_task": 3}, "task number"),
        ({"noise_rate": 0.1, "noise_task": "middle"}, "unknown task"),
    ],
)
def test_multidigits_bad_options(kwargs, match):
    with pytest.raises(DataError, match=match):
        data.multidigits(n_train=100, n_test=10, **kwargs)


def test_unknown_dataset_and_missing_dir():
    with pytest.raises(DataError, match="unknown dataset 'imagenet'"):
        data.load("imagenet")
    with pytest.raises(DataError, match="--data-dir"):
        data.load("multimnist")


# ---------------------------------------------------------------------------- IDX / MultiMNIST
def write_idx(path: str, arr: np.ndarray, gz: bool = False) -> None:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + struct.pack(f">{arr.ndim}i", *arr.shape)
    payload = header + arr.tobytes()
    if gz:
        with gzip.open(path + ".gz", "wb") as f:
            f.write(payload)
    else:
        with open(path, "wb") as f:
            f.write(payload)


def make_mnist_dir(root, n_train=40, n_test=20, size=28, gz=False, seed=0) -> tuple[str, dict]:
    rng = np.random.default_rng(seed)
    arrays = {
        "train_images": rng.integers(0, 256, (n_train, size, size)),
        "train_labels": rng.integers(0, 10, n_train),
        "test_images": rng.integers(0, 256, (n_test, size, size)),
        "test_labels": rng.integers(0, 10, n_test),
    }
    os.makedirs(root, exist_ok=True)
    for key, name in FILES.items():
        write_idx(os.path.join(root, name), arrays[key], gz=gz)
    return str(root), arrays


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_roundtrip(tmp_path, gz):
    arr = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    write_idx(str(tmp_path / "a-idx3-ubyte"), arr, gz=gz)
    out = data.read_idx(str(tmp_path / ("a-idx3-ubyte" + (".gz" if gz else ""))))
    assert out.shape == (2, 3, 5) and np.array_equal(out, arr)


def test_read_idx_rejects_bad_files(tmp_path):
    p = tmp_path / "bad"
    p.write_bytes(b"\x01\x02\x03\x04garbage")
    with pytest.raises(DataError, match="not an IDX file"):
        data.read_idx(str(p))
    p.write_bytes(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x00" * 3)
    with pytest.raises(DataError, match="10"):
        data.read_idx(str(p))


@pytest.mark.parametrize("gz", [False, True])
def test_multimnist_from_idx(tmp_path, gz):
    root, arrays = make_mnist_dir(tmp_path / "mnist", gz=gz)
    d = data.load("multimnist", data_dir=root, seed=0)
    assert d.x_train.shape == (40, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert d.y_train.shape == (40, 2) and d.num_classes == [10, 10]
    assert set(d.y_train.flatten().tolist()) <= set(arrays["train_labels"].tolist())
    assert set(d.y_test.flatten().tolist()) <= set(arrays["test_labels"].tolist())
    again = data.load("multimnist", data_dir=root, seed=0)
    assert torch.equal(d.x_train, again.x_train) and torch.equal(d.y_test, again.y_test)
    small = data.load(
        "multifashion", data_dir=root, n_train=7, n_test=3, noise_rate=0.5, low_resource=5
    )
    assert (
        small.name == "multifashion"
        and len(small.x_train) == 7
        and small.labelled_counts() == [7, 5]
    )


def test_multifashion_mnist_two_dirs(tmp_path):
    left, _ = make_mnist_dir(tmp_path / "mnist", seed=1)
    right, _ = make_mnist_dir(tmp_path / "fashion", seed=2)
    d = data.load("multifashion+mnist", data_dir=left, data_dir2=right, n_train=30, n_test=10)
    assert d.x_train.shape == (30, 1, 28, 28)
    with pytest.raises(DataError, match="--data-dir2"):
        data.load("multifashion+mnist", data_dir=left)


def test_multimnist_missing_file_message(tmp_path):
    root, _ = make_mnist_dir(tmp_path / "mnist")
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte"))
    with pytest.raises(MissingDataError) as e:
        data.load("multimnist", data_dir=root)
    msg = str(e.value)
    assert "t10k-labels-idx1-ubyte" in msg and root in msg
    with pytest.raises(MissingDataError, match="does not exist"):
        data.load("multimnist", data_dir=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------- CelebA
ATTRS = ["5_o_Clock_Shadow", "Arched_Eyebrows", "Smiling"]


def make_celeba(root, n=9, size=(20, 24)) -> tuple[str, np.ndarray]:
    from PIL import Image

    rng = np.random.default_rng(0)
    img_dir = os.path.join(root, "img_align_celeba")
    os.makedirs(img_dir)
    names = [f"{i + 1:06d}.jpg" for i in range(n)]
    for name in names:
        arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(os.path.join(img_dir, name), quality=95)
    values = rng.choice([-1, 1], size=(n, len(ATTRS)))
    with open(os.path.join(root, "list_attr_celeba.txt"), "w") as f:
        f.write(f"{n}\n" + " ".join(ATTRS) + "\n")
        for name, row in zip(names, values):
            f.write(name + "  " + " ".join(f"{v:2d}" for v in row) + "\n")
    parts = [0] * (n - 4) + [1, 2, 2, 2]  # last three are test
    with open(os.path.join(root, "list_eval_partition.txt"), "w") as f:
        for name, p in zip(names, parts):
            f.write(f"{name} {p}\n")
    return str(root), values


def test_celeba_loader(tmp_path):
    root, values = make_celeba(tmp_path / "celeba")
    d = data.load("celeba", data_dir=root, image_size=16)
    assert d.task_names == ATTRS and d.num_classes == [2, 2, 2]
    assert d.x_train.shape == (5, 3, 16, 16) and d.x_test.shape == (3, 3, 16, 16)
    assert torch.equal(d.y_train, torch.from_numpy((values[:5] > 0).astype(np.int64)))
    assert torch.equal(d.y_test, torch.from_numpy((values[6:] > 0).astype(np.int64)))
    sub = data.load("celeba", data_dir=root, image_size=8, n_train=2, n_test=1)
    assert sub.x_train.shape == (2, 3, 8, 8) and sub.x_test.shape == (1, 3, 8, 8)


@pytest.mark.parametrize(
    "missing", ["list_attr_celeba.txt", "list_eval_partition.txt", "img_align_celeba/000003.jpg"]
)
def test_celeba_missing_file_message(tmp_path, missing):
    root, _ = make_celeba(tmp_path / "celeba")
    os.remove(os.path.join(root, missing))
    with pytest.raises(MissingDataError) as e:
        data.load("celeba", data_dir=root, image_size=8)
    msg = str(e.value)
    assert os.path.basename(missing) in msg
    assert os.path.dirname(os.path.join(root, missing)) in msg


def test_celeba_malformed_attr_file(tmp_path):
    root, _ = make_celeba(tmp_path / "celeba")
    with open(os.path.join(root, "list_attr_celeba.txt"), "a") as f:
        f.write("extra.jpg 1 1\n")
    with pytest.raises(DataError, match=r"list_attr_celeba\.txt"):
        data.load("celeba", data_dir=root, image_size=8)
