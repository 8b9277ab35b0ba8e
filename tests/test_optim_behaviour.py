"""Rules of every perturbed pass and of the optimizer protocol: bitwise restore, BatchNorm
statistics, checkpoint/resume, GradScaler overflow, LR schedulers, autocast, bad input."""

from __future__ import annotations

import copy
import io
import sys

import pytest
import torch
from torch import nn

import mtlsam_fast

METHODS = {
    "fmtl": lambda net, **kw: mtlsam_fast.FMTL(
        net.trunk.parameters(), heads_of(net), rho=0.2, **kw
    ),
    "asam": lambda net, **kw: mtlsam_fast.FMTL(
        net.trunk.parameters(), heads_of(net), rho=0.2, adaptive=True, **kw
    ),
    "samo": lambda net, **kw: mtlsam_fast.SAMO(
        net.trunk.parameters(), heads_of(net), rho=0.2, alpha=0.5, seed=3, **kw
    ),
    "mtl": lambda net, **kw: mtlsam_fast.MTLOptimizer(net.trunk.parameters(), heads_of(net), **kw),
}
#: closure calls per step with K = 2
CALLS = {"fmtl": 3, "asam": 3, "samo": 7, "mtl": 1}


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net(nn.Module):
    def __init__(self, dtype=torch.float32, momentum=0.1):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(5, 10), nn.BatchNorm1d(10, momentum=momentum), nn.ReLU(), nn.Linear(10, 6)
        )
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 3)])
        self.to(dtype)

    def losses(self, x, y_reg, y_cls):
        f = self.trunk(x)
        return [
            nn.functional.mse_loss(self.heads[0](f).squeeze(1), y_reg),
            nn.functional.cross_entropy(self.heads[1](f), y_cls),
        ]


def heads_of(net):
    return [h.parameters() for h in net.heads]


def make(seed=0, dtype=torch.float32, **kw):
    torch.manual_seed(seed)
    net = Net(dtype, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    data = (
        torch.randn(16, 5, generator=g).to(dtype),
        torch.randn(16, generator=g).to(dtype),
        torch.randint(0, 3, (16,), generator=g),
    )
    return net, data


def snapshot(net):
    return [t.detach().clone() for t in net.state_dict().values()]


def params(net):
    """Parameters only (a skipped step's clean forward still updates BN statistics, as with
    GradScaler)."""
    return [p.detach().clone() for p in net.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and torch.equal(x, y)


class RecordingSGD(torch.optim.SGD):
    """Records the parameter values the base optimizer sees (they must be the unperturbed ones)."""

    def step(self, closure=None):
        self.seen = [p.detach().clone() for g in self.param_groups for p in g["params"]]
        return super().step(closure)


# ---------------------------------------------------------------------------- restore / BN
@pytest.mark.parametrize("method", list(METHODS))
def test_parameters_restored_bitwise_after_perturbed_passes(method):
    net, data = make()
    before = [
        p.detach().clone() for p in list(net.trunk.parameters()) + list(net.heads.parameters())
    ]
    seen_in_closure = []

    def closure():
        seen_in_closure.append(
            torch.cat([p.detach().reshape(-1).clone() for p in net.trunk.parameters()])
        )
        return net.losses(*data)

    opt = METHODS[method](net, base_optimizer=RecordingSGD, lr=0.1)
    opt.step(closure)
    assert len(seen_in_closure) == CALLS[method]
    assert_bitwise(opt.base_optimizer.seen, before)  # restored exactly before the update
    clean = seen_in_closure[0]
    assert torch.equal(clean, torch.cat([p.reshape(-1) for p in before[:6]]))
    if method != "mtl":  # the perturbed calls really saw other weights
        assert all(not torch.equal(s, clean) for s in seen_in_closure[1:])
    # and the update happened afterwards
    assert not torch.equal(next(net.trunk.parameters()).detach(), before[0])


@pytest.mark.parametrize("momentum", [0.1, None], ids=["ema", "cumulative"])
@pytest.mark.parametrize("method", list(METHODS))
def test_batchnorm_statistics_updated_by_clean_forward_only(method, momentum):
    net, data = make(momentum=momentum)
    ref = copy.deepcopy(net)
    ref.losses(*data)  # one clean forward in training mode
    opt = METHODS[method](net, lr=0.1)
    opt.step(lambda: net.losses(*data))
    bn, bn_ref = net.trunk[1], ref.trunk[1]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)
    assert bn.track_running_stats is True  # the temporary switch is undone


def test_other_running_stat_layers_restored_and_eval_mode_untouched():
    torch.manual_seed(0)
    trunk = nn.Sequential(
        nn.Conv1d(2, 4, 3),
        nn.InstanceNorm1d(4, track_running_stats=True, affine=True),
        nn.Flatten(),
    )
    head = nn.Linear(4 * 6, 1)
    x, y = torch.randn(8, 2, 8), torch.randn(8)
    ref = copy.deepcopy(trunk)
    ref(x)

    def closure():
        out = head(trunk(x)).squeeze(1)
        return [nn.functional.mse_loss(out, y), out.abs().mean()]

    opt = mtlsam_fast.FMTL(trunk.parameters(), [head.parameters(), []], rho=0.3, lr=0.1)
    opt.step(closure)
    assert_bitwise(list(trunk[1].buffers()), list(ref[1].buffers()))
    trunk.eval()
    frozen = [b.clone() for b in trunk.buffers()]
    opt.step(closure)
    assert_bitwise(list(trunk.buffers()), frozen)


def test_closure_error_in_perturbed_pass_restores_parameters_and_bn():
    net, data = make()
    before = [p.detach().clone() for p in net.parameters()]
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return net.losses(*data)

    opt = METHODS["fmtl"](net, lr=0.1)
    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert_bitwise([p.detach() for p in net.parameters()], before)
    assert net.trunk[1].track_running_stats is True


# ---------------------------------------------------------------------------- checkpoint / resume
@pytest.mark.parametrize("wname", ["mgda", "pcgrad", "gradvac", "rlw"])
@pytest.mark.parametrize("method", ["fmtl", "samo", "mtl"])
def test_checkpoint_resume_is_bitwise_identical(method, wname):
    def build(net):
        opt = METHODS[method](
            net, base_optimizer=torch.optim.Adam, weighting=wname, lr=1e-2, weight_decay=1e-3
        )
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
        return opt, sched

    net, data = make(4)
    init = copy.deepcopy(net.state_dict())
    opt, sched = build(net)
    for _ in range(5):
        opt.step(lambda: net.losses(*data))
        sched.step()
    straight = snapshot(net)

    net2, _ = make(4)
    net2.load_state_dict(init)
    opt2, sched2 = build(net2)
    for _ in range(2):
        opt2.step(lambda: net2.losses(*data))
        sched2.step()
    buf = io.BytesIO()
    torch.save(
        {"model": net2.state_dict(), "opt": opt2.state_dict(), "sched": sched2.state_dict()}, buf
    )
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)

    net3, _ = make(99)  # different init: everything must come from the checkpoint
    opt3, sched3 = build(net3)
    net3.load_state_dict(ckpt["model"])
    opt3.load_state_dict(ckpt["opt"])
    sched3.load_state_dict(ckpt["sched"])
    for _ in range(3):
        opt3.step(lambda: net3.losses(*data))
        sched3.step()
    assert_bitwise(snapshot(net3), straight)
    assert opt3.param_groups[0]["lr"] == opt.param_groups[0]["lr"] == 1e-2 * 0.5**2


def test_lr_scheduler_drives_the_base_optimizer():
    net, data = make()
    opt = METHODS["fmtl"](net, lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: 0.0 if e >= 1 else 1.0)
    opt.step(lambda: net.losses(*data))
    sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == 0.0
    before = [p.detach().clone() for p in net.parameters()]
    opt.step(lambda: net.losses(*data))
    assert_bitwise([p.detach() for p in net.parameters()], before)


# --------------------------------------------------------------------------- found-inf / GradScaler
def _state(net, opt):
    """Parameters and every optimizer-state tensor, cloned."""
    out = params(net)
    for p in net.parameters():
        for _k, v in sorted(opt.state[p].items()):
            out.append(torch.as_tensor(v).clone())
    return out


def _run(method, base, steps, poison_at=(), scaler=None):
    net, data = make(5)
    opt = METHODS[method](net, base_optimizer=base[0], **base[1])
    flags, states = [], []
    for t in range(steps):

        def closure():
            losses = net.losses(*data)
            if t in poison_at:
                losses[1] = losses[1] * torch.tensor(float("inf"))
            return losses

        opt.step(closure, grad_scaler=scaler)
        flags.append(float(opt.found_inf))
        states.append(_state(net, opt))
        if scaler is not None:
            scaler.update()
    return net, opt, flags, states


BASES = {
    "adam": (torch.optim.Adam, dict(lr=1e-2, weight_decay=1e-2)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True)),
    "adamw-fused": (torch.optim.AdamW, dict(lr=1e-2, fused=True)),  # native found-inf path
}


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", ["fmtl", "samo", "mtl"])
def test_grad_scaler_overflow_skips_the_whole_step(method, base):
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    net, _, flags, states = _run(method, BASES[base], 3, poison_at=(1,), scaler=scaler)
    assert flags == [0.0, 1.0, 0.0]
    assert scaler.get_scale() == 2.0**9  # backed off once, from the optimizer's found-inf report
    # the skipped step left parameters and optimizer state (step counts, moments) untouched
    assert len(states[0]) > len(params(net))
    assert_bitwise(states[1], states[0])
    assert all(torch.isfinite(t).all() for t in states[2])
    if method != "samo":  # (SAMO's skipped step still consumes its noise stream, like any RNG)
        _, _, _, clean = _run(method, BASES[base], 2)
        assert_bitwise(states[2], clean[1])


@pytest.mark.parametrize("base", list(BASES))
def test_nonfinite_first_step_without_scaler_is_skipped(base):
    """No scaler: a NaN/inf step is still skipped; state created by it is equivalent to fresh
    state."""
    net, _, flags, _ = _run("fmtl", BASES[base], 3, poison_at=(0,))
    assert flags == [1.0, 0.0, 0.0]
    clean_net, _, _, _ = _run("fmtl", BASES[base], 2)
    assert_bitwise(params(net), params(clean_net))


def test_grad_scaler_scale_does_not_change_the_step():
    """Power-of-two scales are exact: a scaled run equals an unscaled one bitwise."""
    _, _, _, a = _run(
        "fmtl", BASES["adam"], 2, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16)
    )
    _, _, _, b = _run("fmtl", BASES["adam"], 2)
    assert_bitwise(a[1], b[1])


def test_step_does_not_sync_for_the_found_inf_flag(monkeypatch):
    """The flag stays on the device: the optimizer's code never converts a tensor to a Python
    value."""
    net, data = make()
    opt = METHODS["fmtl"](net, base_optimizer=torch.optim.Adam, lr=1e-2)
    opt.step(lambda: net.losses(*data))
    calls = []
    for name in ("item", "__bool__", "tolist", "__float__", "__int__"):
        orig = getattr(torch.Tensor, name)

        def spy(self, *a, _orig=orig, _name=name, **k):
            caller = sys._getframe(1).f_code.co_filename
            if (
                "mtlsam_fast" in caller and "optim" in caller
            ):  # the base optimizer's own code is its business
                calls.append((_name, caller))
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, spy)
    opt.step(lambda: net.losses(*data))
    monkeypatch.undo()
    assert calls == []


# ---------------------------------------------------------------------------- autocast
@pytest.mark.parametrize("method", ["fmtl", "samo"])
def test_bf16_autocast(method):
    net, data = make(6)
    before = [p.detach().clone() for p in net.parameters()]

    def closure():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return net.losses(*data)

    opt = METHODS[method](net, base_optimizer=RecordingSGD, lr=0.05)
    first = opt.step(closure)
    assert_bitwise(opt.base_optimizer.seen, before)
    for _ in range(8):
        last = opt.step(closure)
    assert torch.isfinite(last).all() and last.sum() < first.sum()
    assert float(opt.found_inf) == 0.0


# ---------------------------------------------------------------------------- bad input
def _untouched(net, fn, exc, match):
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(exc, match=match):
        fn()
    assert_bitwise([p.detach() for p in net.parameters()], before)


@pytest.mark.parametrize("method", ["fmtl", "samo", "mtl"])
@pytest.mark.parametrize(
    "bad, exc, match",
    [
        (lambda l: l[:1], ValueError, "returned 1 losses, expected one per task"),
        (lambda l: [*l, l[0]], ValueError, "returned 3 losses"),
        (lambda l: [l[0], l[1] * torch.ones(3)], ValueError, "loss 1 is not a scalar"),
        (lambda l: torch.stack(l).unsqueeze(0), ValueError, r"shape \(1, 2\)"),
        (lambda l: [l[0], l[1].detach()], ValueError, "loss 1 does not require grad"),
        (lambda l: [l[0], 3.0], TypeError, "loss 1 is a float"),
        (lambda l: None, TypeError, "closure must return"),
    ],
    ids=[
        "too-few",
        "too-many",
        "non-scalar",
        "bad-tensor-shape",
        "no-grad",
        "python-number",
        "none",
    ],
)
def test_bad_losses_raise_before_any_change(method, bad, exc, match):
    net, data = make()
    opt = METHODS[method](net, lr=0.1)
    _untouched(net, lambda: opt.step(lambda: bad(net.losses(*data))), exc, match)


def test_loss_tensor_of_shape_k_is_accepted():
    net, data = make()
    opt = METHODS["fmtl"](net, lr=0.1)
    out = opt.step(lambda: torch.stack(net.losses(*data)))
    assert out.shape == (2,) and not out.requires_grad


def test_step_without_closure_raises():
    net, _ = make()
    opt = METHODS["fmtl"](net, lr=0.1)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()


@pytest.mark.parametrize(
    "build, exc, match",
    [
        (lambda n: mtlsam_fast.FMTL([], heads_of(n)), ValueError, "shared_params is empty"),
        (
            lambda n: mtlsam_fast.FMTL(list(n.trunk.parameters()) * 2, heads_of(n)),
            ValueError,
            "listed twice",
        ),
        (
            lambda n: mtlsam_fast.FMTL(
                n.trunk.parameters(), [list(n.heads[0].parameters()) * 2, []]
            ),
            ValueError,
            "listed twice",
        ),
        (
            lambda n: mtlsam_fast.FMTL(
                n.trunk.parameters(), [n.heads[0].parameters(), n.heads[0].parameters()]
            ),
            ValueError,
            "listed twice",
        ),
        (
            lambda n: mtlsam_fast.FMTL(n.parameters(), heads_of(n)),
            ValueError,
            "both shared and task-specific",
        ),
        (
            lambda n: mtlsam_fast.FMTL(
                n.trunk.parameters(), [[nn.Parameter(torch.zeros(2, device="meta"))], []]
            ),
            ValueError,
            "different devices",
        ),
        (
            lambda n: mtlsam_fast.FMTL(n.trunk.parameters(), heads_of(n), rho=-0.1),
            ValueError,
            "rho must be",
        ),
        (
            lambda n: mtlsam_fast.FMTL(n.trunk.parameters(), heads_of(n), rho_head=-1),
            ValueError,
            "rho_head must be",
        ),
        (
            lambda n: mtlsam_fast.SAMO(n.trunk.parameters(), heads_of(n), rho=-1),
            ValueError,
            "rho must be",
        ),
        (
            lambda n: mtlsam_fast.SAMO(n.trunk.parameters(), heads_of(n), alpha=1.5),
            ValueError,
            "alpha",
        ),
        (
            lambda n: mtlsam_fast.SAMO(n.trunk.parameters(), heads_of(n), zo_eps=0),
            ValueError,
            "zo_eps",
        ),
        (
            lambda n: mtlsam_fast.SAMO(n.trunk.parameters(), heads_of(n), adaptive=True),
            NotImplementedError,
            "adaptive",
        ),
        (
            lambda n: mtlsam_fast.FMTL(
                n.trunk.parameters(), heads_of(n), torch.optim.SGD(n.parameters())
            ),
            TypeError,
            "must be a torch.optim.Optimizer class",
        ),
        (
            lambda n: mtlsam_fast.FMTL(n.trunk.parameters(), heads_of(n), weighting="nope"),
            ValueError,
            "unknown weighting",
        ),
        (lambda n: mtlsam_fast.MTLOptimizer(n.trunk.parameters()), ValueError, "num_tasks"),
        (
            lambda n: mtlsam_fast.MTLOptimizer(next(n.trunk.parameters()), num_tasks=2),
            TypeError,
            "not a tensor",
        ),
        (
            lambda n: mtlsam_fast.MTLOptimizer([torch.zeros(3)], num_tasks=2),
            ValueError,
            "none of its parameters requires grad",
        ),
        (
            lambda n: mtlsam_fast.MTLOptimizer([torch.zeros(3, dtype=torch.int64)], num_tasks=2),
            TypeError,
            "dtype",
        ),
        (
            lambda n: mtlsam_fast.MTLOptimizer(
                [n.trunk[0].weight, n.trunk[0].bias.double()], num_tasks=2
            ),
            ValueError,
            "not a leaf",
        ),
        (
            lambda n: mtlsam_fast.FMTL(
                n.trunk.parameters(),
                [[n.heads[0].weight, nn.Parameter(torch.zeros(2).double())], []],
            ),
            TypeError,
            r"task_params\[0\]: all parameters must share",
        ),
        (
            lambda n: mtlsam_fast.FMTL(n.trunk.parameters(), heads_of(n), torch.optim.SGD, lr=-1.0),
            ValueError,
            "Invalid learning rate",
        ),
    ],
    ids=[
        "empty-shared",
        "shared-twice",
        "head-twice",
        "two-heads-same",
        "shared-and-head",
        "mixed-devices",
        "rho<0",
        "rho_head<0",
        "samo-rho<0",
        "alpha",
        "zo_eps",
        "samo-asam",
        "optimizer-instance",
        "weighting",
        "no-tasks",
        "tensor-not-iterable",
        "no-grad-param",
        "int-param",
        "non-leaf",
        "head-mixed-dtypes",
        "base-optimizer-rejects-kwargs",
    ],
)
def test_bad_construction_raises_before_any_change(build, exc, match):
    net, _ = make()
    before = [(p.detach().clone(), p.data_ptr()) for p in net.parameters()]
    with pytest.raises(exc, match=match):
        build(net)
    for p, (v, ptr) in zip(net.parameters(), before):
        assert (
            torch.equal(p.detach(), v) and p.data_ptr() == ptr
        )  # not even moved into a flat buffer


def test_model_moved_after_construction_is_detected():
    net, data = make()
    opt = METHODS["fmtl"](net, lr=0.1)
    net.trunk[0].weight.data = net.trunk[0].weight.data.clone()
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer"):
        opt.step(lambda: net.losses(*data))


def test_task_without_head_and_tasks_given_by_count():
    torch.manual_seed(0)
    trunk = nn.Sequential(nn.Linear(4, 3))
    x = torch.randn(8, 4)
    opt = mtlsam_fast.FMTL(trunk.parameters(), num_tasks=3, rho=0.1, lr=0.1, weighting="mgda")
    out = opt.step(lambda: [trunk(x)[:, k].square().mean() for k in range(3)])
    assert out.shape == (3,) and float(opt.found_inf) == 0.0
    assert opt._gbuf.G.shape == (3, sum(p.numel() for p in trunk.parameters()))


# --- the fused aggregation path ----------------------------------------------------------------


@pytest.mark.parametrize("method", ["mtl", "fmtl", "asam", "samo"])
def test_plain_mgda_takes_the_fused_min_norm_path(method, monkeypatch):
    """With MGDA (no normalization), every aggregation goes through ops.min_norm_aggregate, i.e.
    the two-launch path of the fused backends (Triton here, interpreted on the CPU), and trains
    exactly like the unfused ops of the torch reference."""
    pytest.importorskip("triton")
    from mtlsam_fast.ops import triton_backend

    if "triton" not in mtlsam_fast.available_backends("cpu"):
        pytest.skip(
            "Triton runs CPU tensors only interpreted; on a GPU: "
            "tests/gpu/test_fused_aggregation_gpu.py"
        )
    calls = []
    real = triton_backend.min_norm_aggregate
    monkeypatch.setattr(
        triton_backend, "min_norm_aggregate", lambda *a: calls.append(a[2]) or real(*a)
    )
    results = {}
    for backend in ("triton", "torch"):
        net, data = make()
        opt = METHODS[method](net, weighting="mgda", lr=0.1, backend=backend)
        for _ in range(2):
            opt.step(lambda: net.losses(*data))
        results[backend] = params(net)
    aggregations = {"mtl": [False], "samo": [False]}.get(
        method, [False, True]
    )  # F-MTL: loss set, then flat set
    assert calls == 2 * aggregations
    for a, b in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_other_weightings_keep_the_unfused_path(monkeypatch):
    from mtlsam_fast import ops

    monkeypatch.setattr(ops, "min_norm_aggregate", lambda *a, **kw: pytest.fail("fused path taken"))
    for name, options in [("mgda", {"normalization": "l2"}), ("pcgrad", {}), ("ls", {})]:
        net, data = make()
        opt = METHODS["fmtl"](net, weighting=name, weighting_options=options, lr=0.1)
        opt.step(lambda: net.losses(*data))
