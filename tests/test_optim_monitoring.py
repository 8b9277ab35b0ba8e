"""Step records (``opt.last_step``, mtlsam_fast/optim/monitor.py): the Gram, norms, cosines and
weights of every aggregation against an independent computation from the gradients, for each
optimizer; GradScaler units; copies the next step does not overwrite; skipped steps; no host sync;
the running mean and the host numbers for logging."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

import mtlsam_fast
from mtlsam_fast import weighting
from mtlsam_fast.optim.monitor import RunningMean, scalars

K = 3
TOL = {torch.float32: dict(rtol=2e-4, atol=1e-6), torch.float64: dict(rtol=1e-9, atol=1e-12)}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Trunk(nn.Module):
    """K losses from one shared trunk (no heads: every gradient is a shared-parameter one)."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, K)).to(dtype)

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        out = self.net(x)
        return [((out[:, k] - y[:, k]) ** 2).mean() for k in range(K)]


def make(dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    model = Trunk(dtype)
    g = torch.Generator().manual_seed(seed + 1)
    data = (torch.randn(12, 4, generator=g).to(dtype), torch.randn(12, K, generator=g).to(dtype))
    return model, data


def grads_at(model: Trunk, data, delta: torch.Tensor | None = None) -> torch.Tensor:
    """[K, P] task gradients at the model's weights (+ ``delta``, flat), on a copy."""
    m = copy.deepcopy(model)
    params = list(m.parameters())
    if delta is not None:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(
                torch.nn.utils.parameters_to_vector(params) + delta, params
            )
    rows = []
    for loss in m.losses(*data):
        gs = torch.autograd.grad(loss, params, retain_graph=True)
        rows.append(torch.cat([g.reshape(-1) for g in gs]))
    return torch.stack(rows)


def expected(G: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gram, norms and cosines of the rows of G, computed directly."""
    gram = G @ G.T
    norms = G.norm(dim=1)
    cos = torch.nn.functional.cosine_similarity(G[:, None, :], G[None, :, :], dim=2)
    return gram, norms, cos


def direction(model: Trunk) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in model.parameters()])


def check(rec, G, dtype):
    gram, norms, cos = expected(G)
    tol = TOL[dtype]
    torch.testing.assert_close(rec.gram.to(dtype), gram, **tol)
    torch.testing.assert_close(rec.norms.to(dtype), norms, **tol)
    torch.testing.assert_close(rec.cosines.to(dtype), cos, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("method", ["mgda", "upgrad"])
def test_mtl_optimizer_record(method, dtype):
    model, data = make(dtype)
    G = grads_at(model, data)
    opt = mtlsam_fast.MTLOptimizer(model.parameters(), num_tasks=K, weighting=method, lr=0.1)
    opt.step(lambda: model.losses(*data))
    rec = opt.last_step
    assert list(rec) == ["loss"]
    assert rec.step == 0 and not bool(rec.skipped)
    check(rec["loss"], G, dtype)
    w = rec["loss"].weights
    assert w.shape == (K,) and not rec["loss"].returns_direction
    torch.testing.assert_close((w.to(dtype) @ G), direction(model), **TOL[dtype])
    if method == "upgrad":  # the weighting's own answer on the recorded Gram
        torch.testing.assert_close(w, weighting.get("upgrad")(rec["loss"].gram), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fmtl_records_the_loss_and_the_flat_set(dtype):
    model, data = make(dtype, seed=1)
    rho = 0.1
    G = grads_at(model, data)
    # F_i = grad L_i(theta + rho g_i / |g_i|) - g_i   (Algorithm 1 of arXiv 2211.13723)
    F = torch.stack([grads_at(model, data, rho * G[i] / G[i].norm())[i] - G[i] for i in range(K)])
    opt = mtlsam_fast.FMTL(model.parameters(), num_tasks=K, weighting="mgda", rho=rho, lr=0.1)
    opt.step(lambda: model.losses(*data))
    rec = opt.last_step
    assert list(rec) == ["loss", "flat"]
    check(rec["loss"], G, dtype)
    check(rec["flat"], F, dtype)
    d = rec["loss"].weights.to(dtype) @ G + rec["flat"].weights.to(dtype) @ F
    torch.testing.assert_close(d, direction(model), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_samo_records_the_perturbed_set(dtype):
    """alpha = 1 (global perturbation only): every task is perturbed by rho g0 / |g0|, g0 the
    gradient of the mean loss, so the perturbed gradients have a closed form."""
    model, data = make(dtype, seed=2)
    rho = 0.1
    g0 = grads_at(model, data).mean(0)
    Gp = grads_at(model, data, rho * g0 / g0.norm())
    opt = mtlsam_fast.SAMO(
        model.parameters(), num_tasks=K, weighting="mgda", rho=rho, alpha=1.0, lr=0.1
    )
    opt.step(lambda: model.losses(*data))
    rec = opt.last_step
    assert list(rec) == ["perturbed"]
    check(rec["perturbed"], Gp, dtype)
    torch.testing.assert_close(
        rec["perturbed"].weights.to(dtype) @ Gp, direction(model), **TOL[dtype]
    )


def test_direction_weighting_records_no_weights():
    """GradDrop returns a direction: the record has no weights and says why."""
    model, data = make()
    G = grads_at(model, data)
    opt = mtlsam_fast.MTLOptimizer(model.parameters(), num_tasks=K, weighting="graddrop", lr=0.1)
    opt.step(lambda: model.losses(*data))
    rec = opt.last_step["loss"]
    assert rec.weights is None and rec.returns_direction and rec.reads_grads
    check(rec, G, torch.float32)
    assert "loss/weights" not in opt.last_step.tensors()


def test_grad_scaler_record_is_in_true_units():
    model, data = make()
    G = grads_at(model, data)
    opt = mtlsam_fast.MTLOptimizer(model.parameters(), num_tasks=K, weighting="mgda", lr=0.1)
    opt.step(
        lambda: model.losses(*data), grad_scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12)
    )
    check(opt.last_step["loss"], G, torch.float32)


def test_records_are_not_overwritten_by_the_next_step():
    model, data = make()
    opt = mtlsam_fast.FMTL(model.parameters(), num_tasks=K, weighting="mgda", lr=0.1)
    opt.step(lambda: model.losses(*data))
    first = opt.last_step
    kept = {k: v.clone() for k, v in first.tensors().items()}
    opt.step(lambda: model.losses(*data))
    assert opt.last_step is not first and opt.last_step.step == 1
    for k, v in first.tensors().items():
        assert torch.equal(v, kept[k]), k
    assert not torch.equal(opt.last_step["loss"].gram, first["loss"].gram)


def test_skipped_step_is_marked_and_left_out_of_the_running_mean():
    model, data = make()
    opt = mtlsam_fast.MTLOptimizer(model.parameters(), num_tasks=K, weighting="upgrad", lr=0.01)
    mean = RunningMean()
    kept = []
    for t in range(4):

        def closure():
            losses = model.losses(*data)
            if t == 2:
                losses[0] = losses[0] * float("nan")
            return losses

        opt.step(closure)
        rec = opt.last_step
        assert bool(rec.skipped) == (t == 2)
        mean.update(rec)
        if t != 2:
            kept.append(rec.tensors())
    assert mean.updates == 4
    out = mean.compute()
    for name in ("loss/weights", "loss/norms", "loss/cosines"):
        torch.testing.assert_close(out[name], sum(k[name] for k in kept) / 3)
    mean.reset()
    assert mean.compute() == {} and mean.updates == 0


def test_scalars_for_logging():
    model, data = make()
    opt = mtlsam_fast.FMTL(
        model.parameters(), num_tasks=K, weighting="mgda", lr=0.1, max_grad_norm=1e-3
    )
    opt.step(lambda: model.losses(*data))
    rec = opt.last_step
    s = scalars(rec.tensors())
    assert s["loss/weights/2"] == pytest.approx(float(rec["loss"].weights[2]))
    assert s["flat/cosines/0_2"] == pytest.approx(float(rec["flat"].cosines[0, 2]))
    assert "flat/cosines/2_0" not in s and "flat/cosines/1_1" not in s
    assert s["grad_norm/shared"] == pytest.approx(float(rec.grad_norms["shared"]))
    assert len(s) == 2 * (K + K + K * (K - 1) // 2) + 1


def test_monitoring_off():
    model, data = make()
    opt = mtlsam_fast.MTLOptimizer(model.parameters(), num_tasks=K, weighting="mgda", lr=0.1)
    opt.monitoring = False
    opt.step(lambda: model.losses(*data))
    assert opt.last_step is None and opt.monitoring is False
    opt.monitoring = True
    opt.step(lambda: model.losses(*data))
    assert opt.last_step is not None and opt.last_step.step == 1
    with pytest.raises(TypeError, match="monitoring"):
        opt.monitoring = 1  # type: ignore[assignment]


@pytest.mark.parametrize("name", ["mtl", "fmtl", "samo"])
def test_no_host_sync_in_the_step_or_the_record(monkeypatch, name):
    """Monitoring, clipping and a hook convert no tensor to a Python value: the step and reading
    the record's tensors (norms, cosines, the running mean) stay on the device."""
    model, data = make()
    cls = {"mtl": mtlsam_fast.MTLOptimizer, "fmtl": mtlsam_fast.FMTL, "samo": mtlsam_fast.SAMO}
    opt = cls[name](
        model.parameters(),
        num_tasks=K,
        weighting="mgda",
        lr=0.1,
        max_grad_norm=0.5,
        base_optimizer=torch.optim.Adam,
    )
    opt.register_direction_hook(lambda o, d, skipped: d.mul_(torch.where(skipped, 1.0, 0.9)))
    mean = RunningMean()
    opt.step(lambda: model.losses(*data))  # the base optimizer creates its state
    calls = []
    for conv in ("item", "__bool__", "tolist", "__float__", "__int__", "cpu", "numpy"):
        orig = getattr(torch.Tensor, conv)

        def spy(self, *a, _orig=orig, _name=conv, **k):
            caller = sys._getframe(1).f_code.co_filename
            if "mtlsam_fast" in caller and "optim" in caller:
                calls.append((_name, caller))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, conv, spy)
    opt.step(lambda: model.losses(*data))
    rec = opt.last_step
    for agg in rec.aggregations.values():
        agg.norms, agg.cosines  # noqa: B018 - computed on access
    mean.update(rec)
    mean.compute()
    monkeypatch.undo()
    assert calls == []
