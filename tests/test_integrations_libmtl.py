"""The LibMTL adapter (mtlsam_fast.integrations.libmtl) against LibMTL 1.1.5 itself.

Shims, all outside the weightings being compared (LibMTL's weighting code runs unchanged):

* ``torchvision.models.utils`` (:func:`bench.peers.import_libmtl`): LibMTL 1.1.5's
  ``LibMTL/model/resnet.py`` imports ``load_state_dict_from_url`` from it and torchvision removed
  the module (its one function is ``torch.hub.load_state_dict_from_url``); provided so that
  ``import LibMTL`` works. The adapter never needs it (``test_adapter_never_imports_libmtl``).
* ``zero_grad_share_params`` (:func:`bench.peers.libmtl_hps`): LibMTL 1.1.5 predates torch 2.0,
  whose ``Module.zero_grad()`` sets the gradients to None, after which LibMTL's ``_reset_grad``
  writes ``param.grad.data`` of None; the architecture zeroes in place, torch 1.x's default.
* ``Trainer``: LibMTL 1.1.5 hard-codes the device ``cuda:0`` and calls the Python 2
  ``iterator.next()``; the subclass here sets the CPU and calls ``next(iterator)``.
"""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's bench package

from bench.peers import import_libmtl, libmtl_hps
from mtlsam_fast import weighting
from mtlsam_fast.integrations import libmtl as ours
from mtlsam_fast.weighting.rlw import PhiloxStream

LibMTL = import_libmtl()
libmtl_weighting = LibMTL.weighting
Trainer = LibMTL.Trainer
CELoss = LibMTL.loss.CELoss
AccMetric = LibMTL.metrics.AccMetric
InPlaceHPS = libmtl_hps()

IN, HID, OUT, CLASSES = 6, 16, 8, 3


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(IN, HID), nn.Tanh(), nn.Linear(HID, OUT), nn.Tanh())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Small tensors: one intra-op thread (two threads on a busy 2-core machine spin-wait, up to
    60x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tasks(K: int) -> list[str]:
    return [f"t{i}" for i in range(K)]


def build(weighting_cls: type, K: int, *, rep_grad: bool = False, seed: int = 0) -> nn.Module:
    """A LibMTL model as its Trainer builds it: ``class MTLmodel(architecture, weighting)``."""
    torch.manual_seed(seed)
    decoders = nn.ModuleDict({t: nn.Linear(OUT, CLASSES) for t in tasks(K)})

    class MTLmodel(InPlaceHPS, weighting_cls):  # type: ignore[misc, valid-type]
        def __init__(self) -> None:
            super().__init__(tasks(K), Encoder, decoders, rep_grad, False, torch.device("cpu"))
            self.init_param()
            self.epoch = 0  # LibMTL's Trainer sets it at each epoch (DWA, GradNorm read it)

    return MTLmodel()


def batch(K: int, seed: int = 1, n: int = 24) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, IN, generator=g), [
        torch.randint(0, CLASSES, (n,), generator=g) for _ in range(K)
    ]


def losses_of(model: nn.Module, x: torch.Tensor, ys: list[torch.Tensor]) -> torch.Tensor:
    out = model(x)
    return torch.stack(
        [nn.functional.cross_entropy(out[t], y) for t, y in zip(model.task_name, ys)]
    )


def one_backward(weighting_cls, K, weight_args, *, rep_grad=False, steps=1):
    model = build(weighting_cls, K, rep_grad=rep_grad)
    for step in range(steps):
        x, ys = batch(K, seed=1 + step)
        model.zero_grad(set_to_none=False)
        w = model.backward(losses_of(model, x, ys), **weight_args)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return np.asarray(w), grads, model


def assert_same_grads(a: dict, b: dict, tol: float) -> None:
    assert set(a) == set(b)
    for name in a:
        scale = max(b[name].abs().max().item(), 1e-30)
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=tol * scale, msg=name)


# --------------------------------------------------------------------------- loading, table
def test_adapter_never_imports_libmtl() -> None:
    """In a fresh process: importing mtlsam_fast and the adapter imports neither LibMTL's
    package nor torchvision; LibMTL imported afterwards (shim given) subclasses the very
    AbsWeighting the adapter loaded."""
    code = textwrap.dedent(
        """
        import sys, types, torch
        import mtlsam_fast, mtlsam_fast.integrations
        peers = ("torchjd", "LibMTL", "lightning", "pytorch_lightning", "torchvision")
        assert not [m for m in sys.modules if m.split(".")[0] in peers], "mtlsam_fast"
        from mtlsam_fast.integrations import libmtl
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in peers)
        assert loaded == ["LibMTL.weighting.abstract_weighting"], loaded
        shim = types.ModuleType("torchvision.models.utils")
        shim.load_state_dict_from_url = torch.hub.load_state_dict_from_url
        sys.modules["torchvision.models.utils"] = shim
        import LibMTL.weighting as lw
        assert lw.AbsWeighting is libmtl.AbsWeighting
        assert issubclass(libmtl.MGDA, lw.AbsWeighting) and issubclass(lw.EW, libmtl.AbsWeighting)
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


def test_libmtl_imported_first_is_used_as_is() -> None:
    assert ours.AbsWeighting is libmtl_weighting.AbsWeighting
    assert sys.modules["LibMTL.weighting.abstract_weighting"].AbsWeighting is ours.AbsWeighting


#: LibMTL's repository's methods newer than 1.1.5 that we have, by its class names
IN_LIBMTL_REPOSITORY = {
    "Nash_MTL", "Aligned_MTL", "DB_MTL", "FairGrad", "UPGrad", "FAMO", "MoCo", "ExcessMTL",
}  # fmt: skip
#: our weightings without a row, and why
NOT_IN_LIBMTL = {
    "config": "not in LibMTL",
    "pcd": "not in LibMTL",
    "crmogm": "not in LibMTL",
    "krum": "not in LibMTL",
    "trimmedmean": "not in LibMTL",
    "cosmos": "not in LibMTL",
    "pbi": "not in LibMTL",
    "imtl_l": "LibMTL's IMTL is IMTL-L and IMTL-G together (the IMTL row)",
    "stch": "LibMTL's STCH is the official MTL variant (log(L / nadir) after warm-up epochs)",
    "sdmgrad": "LibMTL's SDMGrad takes the losses of three batches per backward",
    "modo": "LibMTL's MoDo takes the losses of three batches per backward",
}


def test_every_method_both_have_is_one_row() -> None:
    """Every weighting of LibMTL 1.1.5 and the newer ones of its repository that we have is a
    row (DualProj too, ours only); every weighting of ours is a row or listed with its reason."""
    in_libmtl_1_1_5 = set(libmtl_weighting.__all__) - {"AbsWeighting"}
    assert set(ours.METHODS) == in_libmtl_1_1_5 | IN_LIBMTL_REPOSITORY | {"DualProj"}
    assert {row.ours for row in ours.METHODS.values()} == set(weighting.names()) - set(
        NOT_IN_LIBMTL
    )
    for name in ours.METHODS:
        cls = getattr(ours, name)
        assert issubclass(cls, libmtl_weighting.AbsWeighting) and cls.__name__ == name
        assert (name in in_libmtl_1_1_5) == hasattr(libmtl_weighting, name)
        assert ours.METHODS[name].heads in ("own", "weighted")


def test_the_table_test_fails_without_a_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delitem(ours.METHODS, "GLS")
    with pytest.raises(AssertionError):
        test_every_method_both_have_is_one_row()


# --------------------------------------------------------------------------- against LibMTL
SAME = [
    ("EW", 3, {}, 0.0),
    ("MGDA", 2, {"mgda_gn": "none"}, 1e-6),  # two tasks: LibMTL's closed form is exact
    ("MGDA", 2, {"mgda_gn": "l2"}, 1e-6),
    ("MGDA", 2, {"mgda_gn": "loss"}, 1e-6),
    ("MGDA", 2, {"mgda_gn": "loss+"}, 1e-6),
    ("IMTL", 3, {}, 1e-5),  # LibMTL inverts D U^T in float32, ours solves in float64
    ("PCGrad", 2, {}, 1e-6),  # two tasks: one order
    ("GLS", 3, {}, 1e-6),  # the same scalarization, float32 against float64 weights
    ("UW", 3, {}, 1e-6),  # the first step: s = -0.5 in both
    ("GradNorm", 3, {"alpha": 1.5}, 1e-6),  # epoch 0: LibMTL sums the losses, ours starts at w = 1
    ("DWA", 3, {"T": 2.0}, 1e-6),  # the first two epochs: weights 1 in both
]


@pytest.mark.parametrize(("name", "K", "weight_args", "tol"), SAME, ids=lambda v: str(v))
def test_backward_equals_libmtls_own_method(name, K, weight_args, tol) -> None:
    w_theirs, theirs, _ = one_backward(getattr(libmtl_weighting, name), K, weight_args)
    w_mine, mine, _ = one_backward(getattr(ours, name), K, weight_args)
    if name in ("UW", "GradNorm"):  # LibMTL's learnt loss_scale is a model parameter; ours is
        theirs.pop("loss_scale", None)  # the weighting's, stepped by its own Adam
    assert_same_grads(mine, theirs, tol)
    if name in ("UW", "GradNorm", "DWA"):  # the same weights returned (LibMTL's GLS returns
        np.testing.assert_allclose(w_mine, w_theirs, rtol=1e-6)  # L / (K prod L), not those)


def task_gradients(model: nn.Module, losses: torch.Tensor) -> torch.Tensor:
    shared = list(model.get_share_params())
    rows = [torch.autograd.grad(l, shared, retain_graph=True) for l in losses]
    return torch.stack([torch.cat([g.flatten() for g in row]) for row in rows])


@pytest.mark.parametrize(("calpha", "rescale"), [(0.5, 1), (0.2, 2), (1.0, 0)])
def test_cagrad_solves_libmtls_problem_at_least_as_well(calpha: float, rescale: int) -> None:
    """LibMTL's CAGrad runs scipy's SLSQP (default ftol 1e-6, and an objective written for
    exactly 3 tasks), which leaves ~2e-3 in the direction where the dual is flat; ours solves
    the dual exactly: its objective is never above LibMTL's and the directions agree to 1e-2."""
    K, args = 3, {"calpha": calpha, "rescale": rescale}
    w_theirs, theirs, model = one_backward(libmtl_weighting.CAGrad, K, args)
    weights, mine, _ = one_backward(ours.CAGrad, K, args)
    assert_same_grads(mine, theirs, 1e-2)
    G = task_gradients(model, losses_of(model, *batch(K))).double()
    gram = G @ G.T
    effective = (
        torch.as_tensor(weights, dtype=torch.float64) * [1.0, 1 + calpha**2, 1 + calpha][rescale]
    )
    w_mine = (effective - 1 / K) / (effective.sum() - 1)  # weights = 1/K + lambda w

    def objective(w: torch.Tensor) -> float:
        g0 = gram.mean().sqrt()
        return (w @ gram.mean(1) + calpha * g0 * (w @ gram @ w).sqrt()).item()

    assert objective(w_mine) <= objective(torch.as_tensor(w_theirs, dtype=torch.float64)) + 1e-7


def test_mgda_three_tasks_exact_where_libmtl_approximates() -> None:
    K = 4
    _, theirs, _ = one_backward(libmtl_weighting.MGDA, K, {"mgda_gn": "none"})
    w, mine, _ = one_backward(ours.MGDA, K, {"mgda_gn": "none"})
    shared = [n for n in mine if n.startswith("encoder")]
    d_mine = torch.cat([mine[n].flatten() for n in shared])
    d_theirs = torch.cat([theirs[n].flatten() for n in shared])
    assert d_mine.norm() <= d_theirs.norm() * (1 + 1e-6)  # the min-norm point is ours
    assert abs(w.sum() - 1) < 1e-6 and (w >= 0).all()


@pytest.mark.parametrize("name", ["PCGrad", "GradVac"])
def test_random_orders_replayed_in_libmtl(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """LibMTL shuffles with Python's ``random``; replay our orders into its own code (PCGrad's
    list also holds the task itself: visited first, it projects nothing)."""
    K = 4
    args = {"beta": 0.5} if name == "GradVac" else {}
    _, mine, model = one_backward(getattr(ours, name), K, args)
    stream = PhiloxStream(0)  # the stream our call drew from, rewound to its start
    stream.load_state_dict(
        {
            **model.weighting_state_dict()["state"]["stream"],
            "offset": torch.zeros((), dtype=torch.int64),
        }
    )
    orders = iter(stream.task_orders(K, torch.device("cpu")).tolist())

    def replay(items: list) -> None:
        order = next(orders)
        items[:] = (
            [next(t for t in range(K) if t not in order), *order] if name == "PCGrad" else order
        )

    monkeypatch.setattr(random, "shuffle", replay)
    _, theirs, _ = one_backward(getattr(libmtl_weighting, name), K, args)
    assert_same_grads(mine, theirs, 1e-5)


def test_rep_grad_ew_trains_the_encoder() -> None:
    """With rep_grad the encoder gets the weighted representation gradients backpropagated: for
    EW that is the gradient of the summed losses (LibMTL's EW leaves the encoder without one)."""
    _, plain, _ = one_backward(ours.EW, 3, {})
    _, rep, _ = one_backward(ours.EW, 3, {}, rep_grad=True)
    assert_same_grads(rep, plain, 1e-5)


def test_rep_grad_uses_libmtls_representation_gradients() -> None:
    for name, args in (("MGDA", {"mgda_gn": "none"}), ("IMTL", {})):
        _, theirs, _ = one_backward(getattr(libmtl_weighting, name), 2, args, rep_grad=True)
        _, mine, _ = one_backward(getattr(ours, name), 2, args, rep_grad=True)
        assert_same_grads(mine, theirs, 1e-5)


# --------------------------------------------------------------------------- every row
def _reference(name: str, K: int, weight_args: dict) -> tuple[np.ndarray, dict]:
    """The expected gradients from first principles: per-task gradients by autograd.grad, our
    weighting on their Gram, w^T G for the shared parameters, and each head's own gradient
    (times w_i for LibMTL's loss-weighting methods)."""
    row = ours.METHODS[name]
    model = build(getattr(ours, name), K)
    x, ys = batch(K)
    losses = losses_of(model, x, ys)
    if row.losses is not None:
        losses = row.losses(model, losses)
    shared = list(model.get_share_params())
    G = torch.stack(
        [
            torch.cat([g.flatten() for g in torch.autograd.grad(l, shared, retain_graph=True)])
            for l in losses
        ]
    )
    plan = row.plan(**weight_args)  # the same draw from torch's generator as the adapter's
    gram = G @ G.T if row.uses_gram else G.new_zeros(K, K)
    w = plan.weights(gram, losses.detach(), grads=G)
    d = w if plan.weighting.returns_direction else w.to(G.dtype) @ G
    if plan.max_grad_norm:
        d = d * torch.clamp(plan.max_grad_norm / (d.norm() + 1e-6), max=1.0)
    expected, offset = {}, 0
    for n, p in model.named_parameters():
        if n.startswith("encoder"):
            expected[n] = d[offset : offset + p.numel()].view(p.shape)
            offset += p.numel()
    coef = w.detach() if row.heads == "weighted" or not row.uses_gram else torch.ones(K)
    others = [(n, p) for n, p in model.named_parameters() if not n.startswith("encoder")]
    grads = torch.autograd.grad((coef.to(losses.dtype) * losses).sum(), [p for _, p in others])
    expected.update({n: g for (n, _), g in zip(others, grads)})
    return (None if plan.weighting.returns_direction else w.numpy()), expected


ROWS = {
    "EW": {},
    "MGDA": {"mgda_gn": "l2"},
    "PCGrad": {},
    "GradVac": {"GradVac_beta": 0.3},
    "IMTL": {},
    "CAGrad": {"calpha": 0.4, "rescale": 0},
    "RLW": {},
    "Nash_MTL": {"update_weights_every": 1, "optim_niter": 20, "max_norm": 0.05},
    "Aligned_MTL": {},
    "DB_MTL": {"DB_beta": 0.5, "DB_beta_sigma": 0.5},
    "FairGrad": {"FairGrad_alpha": 2.0},
    "UPGrad": {"UPGrad_norm_eps": 1e-4, "UPGrad_reg_eps": 1e-4},
    "DualProj": {},
    "GradNorm": {"alpha": 1.2},
    "UW": {},
    "DWA": {"T": 1.5},
    "GLS": {},
    "GradDrop": {"leak": 0.2},
    "FAMO": {"FAMO_w_lr": 0.05, "FAMO_w_gamma": 1e-3},
    "MoCo": {"MoCo_beta": 0.4, "MoCo_gamma": 0.2, "MoCo_rho": 0.1},
    "ExcessMTL": {"robust_step_size": 0.5},
}


def test_rows_table_is_exercised() -> None:
    assert set(ROWS) == set(ours.METHODS)


@pytest.mark.parametrize("name", sorted(ROWS))
def test_backward_is_our_weighting_of_the_true_gradients(name: str) -> None:
    K = 3
    torch.manual_seed(0)
    w, grads, _ = one_backward(getattr(ours, name), K, ROWS[name])
    w_ref, expected = _reference(name, K, ROWS[name])
    if w_ref is None:  # a direction: no weights, as LibMTL's GradDrop
        assert w.shape == () and w.item() is None
    else:
        np.testing.assert_allclose(w, w_ref, rtol=1e-5, atol=1e-7)
    assert_same_grads(grads, expected, 1e-5)


def test_frozen_shared_parameters_are_left_alone() -> None:
    model = build(ours.MGDA, 2)
    frozen = model.encoder.net[0].bias
    frozen.requires_grad_(False)
    model.backward(losses_of(model, *batch(2)))
    assert frozen.grad is None and model.encoder.net[0].weight.grad is not None


def test_nash_mtl_clips_the_shared_gradient_only() -> None:
    _, grads, _ = one_backward(ours.Nash_MTL, 3, ROWS["Nash_MTL"])
    shared = torch.cat([g.flatten() for n, g in grads.items() if n.startswith("encoder")])
    assert shared.norm() <= 0.05 * (1 + 1e-5)


def test_no_host_copy_of_the_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """LibMTL's _grad2vec allocates on the host; ours never calls it (nor _compute_grad)."""

    def forbidden(*args, **kwargs):
        raise AssertionError("LibMTL's host gradient gathering was called")

    monkeypatch.setattr(ours.AbsWeighting, "_grad2vec", forbidden)
    monkeypatch.setattr(ours.AbsWeighting, "_compute_grad", forbidden)
    for name, args in ROWS.items():
        one_backward(getattr(ours, name), 3, args)


# --------------------------------------------------------------------------- LibMTL's Trainer
class CPUTrainer(Trainer):
    """LibMTL 1.1.5's Trainer on the CPU (see the module docstring)."""

    def _prepare_model(self, *args) -> None:
        self.device = torch.device("cpu")
        super()._prepare_model(*args)

    def _process_data(self, loader):
        try:
            data, label = next(loader[1])
        except StopIteration:
            loader[1] = iter(loader[0])
            data, label = next(loader[1])
        return data, label


class _Data(torch.utils.data.Dataset):
    def __init__(self, K: int):
        self.x, self.ys = batch(K, seed=3, n=48)
        self.K = K

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], {t: y[i] for t, y in zip(tasks(self.K), self.ys)}


def train_with(weighting_cls, K: int, weight_args: dict, epochs: int = 2) -> dict:
    torch.manual_seed(0)
    task_dict = {
        t: {"metrics": ["Acc"], "metrics_fn": AccMetric(), "loss_fn": CELoss(), "weight": [1]}
        for t in tasks(K)
    }
    decoders = nn.ModuleDict({t: nn.Linear(OUT, CLASSES) for t in tasks(K)})
    trainer = CPUTrainer(
        task_dict=task_dict,
        weighting=weighting_cls,
        architecture=InPlaceHPS,
        encoder_class=Encoder,
        decoders=decoders,
        rep_grad=False,
        multi_input=False,
        optim_param={"optim": "sgd", "lr": 0.5},
        scheduler_param={"scheduler": "step", "step_size": 1, "gamma": 0.5},
        weight_args=weight_args,
        arch_args={},
    )
    loader = torch.utils.data.DataLoader(_Data(K), batch_size=12)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    weights = trainer.train(loader, loader, epochs, return_weight=True)
    trained = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    assert all(not torch.equal(trained[n], initial[n]) for n in trained)  # every parameter moved
    return {"weights": weights, **trained}


@pytest.mark.parametrize(
    ("name", "K", "weight_args", "tol"),
    [("MGDA", 2, {"mgda_gn": "none"}, 1e-5), ("EW", 3, {}, 0.0), ("IMTL", 3, {}, 1e-4)],
)
def test_trainer_by_name_trains_like_libmtls_method(name, K, weight_args, tol, capsys) -> None:
    theirs = train_with(getattr(libmtl_weighting, name), K, weight_args)
    mine = train_with(getattr(ours, name), K, weight_args)
    capsys.readouterr()  # LibMTL prints its tables
    np.testing.assert_allclose(mine.pop("weights"), theirs.pop("weights"), rtol=1e-4, atol=1e-6)
    assert_same_grads(mine, theirs, tol)


@pytest.mark.parametrize(("name", "weight_args"), [("DWA", {"T": 2.0}), ("GLS", {})])
def test_trainer_loss_weightings_train_like_libmtls(name, weight_args, capsys) -> None:
    """Three epochs: DWA's weights from the epochs' average losses from the third on (ours
    averages the losses it is given, LibMTL reads its trainer's buffer: the same numbers in
    float32 against float64, 1e-5); GLS the same scalarization."""
    theirs = train_with(getattr(libmtl_weighting, name), 3, weight_args, epochs=3)
    mine = train_with(getattr(ours, name), 3, weight_args, epochs=3)
    capsys.readouterr()
    if name == "DWA":  # LibMTL's GLS records L / (K prod L), not the gradient weights
        np.testing.assert_allclose(mine.pop("weights"), theirs.pop("weights"), rtol=1e-5)
    mine.pop("weights", None), theirs.pop("weights", None)
    assert_same_grads(mine, theirs, 1e-4)


NEW_ROWS = ["GradNorm", "UW", "DWA", "GLS", "GradDrop", "FAMO", "MoCo", "ExcessMTL"]


@pytest.mark.parametrize("name", NEW_ROWS)
def test_trainer_trains_with_the_new_rows(name: str, capsys) -> None:
    """A short LibMTL Trainer run per method of issue 20: every parameter moves, nothing NaN."""
    trained = train_with(getattr(ours, name), 3, ROWS[name], epochs=2)
    capsys.readouterr()
    weights = trained.pop("weights")
    assert all(torch.isfinite(p).all() for p in trained.values())
    assert np.isfinite(weights).all()


def test_direction_methods_refuse_rep_grad() -> None:
    for name in ("GradDrop", "MoCo"):
        model = build(getattr(ours, name), 2, rep_grad=True)
        with pytest.raises(ValueError, match="rep_grad=False"):
            model.backward(losses_of(model, *batch(2)), **ROWS[name])


def test_dwa_needs_the_trainers_epoch() -> None:
    model = build(ours.DWA, 2)
    del model.epoch
    with pytest.raises(RuntimeError, match=r"model\.epoch"):
        model.backward(losses_of(model, *batch(2)), T=2.0)


def test_famo_update_w_equals_torchjds_famo() -> None:
    """LibMTL's repository's FAMO protocol (backward, optimizer step, update_w with the same
    batch's losses) against torchjd's FAMO (forward, step, update), the same algorithm: the
    weights of each step agree (float32 losses, float64 logits: 1e-6)."""
    from torchjd.scalarization import FAMO as TorchjdFAMO

    K = 3
    model = build(ours.FAMO, K)
    peer = TorchjdFAMO(K)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for step in range(4):
        x, ys = batch(K, seed=30 + step)
        losses = losses_of(model, x, ys)
        L = losses.detach().clone().requires_grad_(True)
        peer(L).backward()
        opt.zero_grad()
        w = model.backward(losses, FAMO_w_lr=0.025, FAMO_w_gamma=1e-3)
        np.testing.assert_allclose(w, L.grad.numpy(), rtol=1e-6)
        opt.step()
        with torch.no_grad():
            after = losses_of(model, x, ys)
        model.update_w(after)
        peer.update(after)


# --------------------------------------------------------------------------- weight_args, state
def test_weight_args_are_checked() -> None:
    model = build(ours.CAGrad, 3)
    x, ys = batch(3)
    with pytest.raises(TypeError, match="calph"):
        model.backward(losses_of(model, x, ys), calph=0.5)
    model.backward(losses_of(model, x, ys))  # LibMTL's defaults: calpha 0.5, rescale 1
    with pytest.raises(ValueError, match="weight_args changed"):
        model.backward(losses_of(model, x, ys), calpha=0.1)
    for name, args, match in [
        ("RLW", {"dist": "Uniform"}, "Normal"),
        ("GradVac", {"GradVac_group_type": 1}, "whole model"),
        ("GradVac", {"beta": 0.5, "GradVac_beta": 0.5}, "not both"),
        ("MGDA", {"mgda_gn": "l1"}, "normalization"),
        ("Nash_MTL", {"max_norm": -1.0}, "max_norm"),
    ]:
        model = build(getattr(ours, name), 3)
        with pytest.raises(ValueError, match=match):
            model.backward(losses_of(model, x, ys), **args)
    with pytest.raises(ValueError, match="rep_grad"):
        m = build(ours.RLW, 2, rep_grad=True)
        m.backward(losses_of(m, *batch(2)))


def test_weighting_state_round_trip() -> None:
    a, b = build(ours.GradVac, 3), build(ours.GradVac, 3)
    for step in range(2):
        x, ys = batch(3, seed=10 + step)
        a.zero_grad()
        a.backward(losses_of(a, x, ys), beta=0.5)
    b.load_state_dict(a.state_dict())
    b.load_weighting_state_dict(a.weighting_state_dict())
    x, ys = batch(3, seed=20)
    for m in (a, b):
        m.zero_grad()
        m.backward(losses_of(m, x, ys), beta=0.5)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p.grad, q.grad), n
    with pytest.raises(ValueError, match="cannot be loaded"):
        build(ours.PCGrad, 3).load_weighting_state_dict(a.weighting_state_dict())


def test_fmtl_with_a_libmtl_model_in_an_own_loop() -> None:
    """The supported way to use F-MTL / SAMO with LibMTL (docs/integrations.md): LibMTL's model
    and loss functions, our optimizer, a closure instead of LibMTL's Trainer loop."""
    from mtlsam_fast import FMTL

    K = 3
    model = build(libmtl_weighting.EW, K)
    opt = FMTL(
        model.get_share_params(),
        [model.decoders[t].parameters() for t in model.task_name],
        torch.optim.SGD,
        "mgda",
        rho=0.05,
        lr=0.5,
    )
    loss_fns = {t: CELoss() for t in model.task_name}
    x, ys = batch(K, seed=4, n=48)
    labels = dict(zip(model.task_name, ys))

    def closure() -> list[torch.Tensor]:
        preds = model(x)
        return [loss_fns[t].compute_loss(preds[t], labels[t]) for t in model.task_name]

    first = opt.step(closure)
    for _ in range(5):
        last = opt.step(closure)
    assert (last < first).all()


def test_docs_list_every_row() -> None:
    """docs/integrations.md has a line for every method of both adapters."""
    from mtlsam_fast.integrations import torchjd as torchjd_adapter

    text = (Path(__file__).resolve().parents[1] / "docs" / "integrations.md").read_text()
    for name in [*ours.METHODS, *torchjd_adapter.METHODS]:
        assert f"`{name}`" in text, name
