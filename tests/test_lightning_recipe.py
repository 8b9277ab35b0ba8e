"""The Lightning recipe (examples/lightning_mtl.py): FMTL, SAMO and MTLOptimizer train with an LR
scheduler, and a run resumed from Lightning's own checkpoint is bitwise the uninterrupted one
(weights, BatchNorm statistics, optimizer state, weighting state), under ``bf16-mixed`` and
``32-true``."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def _load_recipe():
    spec = importlib.util.spec_from_file_location(
        "lightning_mtl", ROOT / "examples" / "lightning_mtl.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["lightning_mtl"] = module  # Lightning pickles the module's hyperparameters
    spec.loader.exec_module(module)
    return module


recipe = _load_recipe()
BATCHES = 2  # per epoch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread (two threads on a busy 2-core machine spin-wait, up to
    60x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return recipe.loaders(n_train=64 * BATCHES, n_test=64, batch_size=64)


def _module(data, optimizer: str, weighting: str):
    torch.manual_seed(0)
    _, _, d = data
    return recipe.MultiTaskModule(
        d.image_shape, d.num_classes, optimizer=optimizer, weighting=weighting, lr_step=1
    )


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@pytest.mark.parametrize(
    ("optimizer", "weighting", "precision"),
    [
        ("fmtl", "mgda", "bf16-mixed"),
        ("samo", "pcgrad", "bf16-mixed"),
        ("plain", "gradvac", "32-true"),
    ],
)
def test_trains_and_resumes_bitwise(data, optimizer, weighting, precision, tmp_path) -> None:
    train, test, _ = data
    straight = _module(data, optimizer, weighting)
    initial = _state(straight)
    dtypes = []
    straight.net.trunk[0].register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    run = recipe.trainer(2, precision, str(tmp_path / "a"))
    run.fit(straight, train, test)
    assert run.global_step == 2 * BATCHES  # one optimizer step per batch
    if precision == "bf16-mixed":
        assert torch.bfloat16 in dtypes  # the closure's forward ran under autocast
    opt = straight.optimizers().optimizer
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 * 0.5**2)  # StepLR, once per epoch
    assert not torch.equal(_state(straight)["net.trunk.0.weight"], initial["net.trunk.0.weight"])

    first = _module(data, optimizer, weighting)
    run = recipe.trainer(1, precision, str(tmp_path / "b"))
    run.fit(first, train)
    checkpoint = tmp_path / "epoch1.ckpt"
    run.save_checkpoint(checkpoint)
    resumed = _module(data, optimizer, weighting)
    run = recipe.trainer(2, precision, str(tmp_path / "c"))
    run.fit(resumed, train, ckpt_path=str(checkpoint))
    assert run.global_step == 2 * BATCHES
    expected, got = _state(straight), _state(resumed)
    assert expected.keys() == got.keys()
    for key in expected:  # parameters and BatchNorm running statistics
        assert torch.equal(expected[key], got[key]), key
    # the optimizer's state: momentum buffers, step counter, the weighting's stream / EMA
    _assert_same(
        straight.optimizers().optimizer.state_dict(), resumed.optimizers().optimizer.state_dict()
    )


def _assert_same(a, b, where: str = "state_dict") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_cli(tmp_path, capsys) -> None:
    assert (
        recipe.main(
            [
                "--optimizer",
                "plain",
                "--weighting",
                "upgrad",
                "--epochs",
                "1",
                "--n-train",
                "128",
                "--root",
                str(tmp_path),
            ]
        )
        == 0
    )
    assert "train/loss" in capsys.readouterr().out


def test_refuses_more_than_one_process(data, monkeypatch, tmp_path) -> None:
    """Under Lightning's DDP the replicas would diverge silently (our backward passes are not
    all-reduced): the recipe refuses a world size above 1 before training."""
    import lightning as L

    monkeypatch.setattr(L.Trainer, "world_size", property(lambda self: 2))
    module = _module(data, "fmtl", "mgda")
    with pytest.raises(RuntimeError, match="one process"):
        recipe.trainer(1, "32-true", str(tmp_path)).fit(module, data[0])
