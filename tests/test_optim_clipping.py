"""Gradient-norm clipping (``max_grad_norm``, ``max_grad_norm_head``) against
``torch.nn.utils.clip_grad_norm_``, its validation and scheduling, and direction hooks: what they
see, in-place changes, removal, order with clipping, found-inf (skipped steps) and GradScaler."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import mtlsam_fast


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 10), nn.Tanh(), nn.Linear(10, 6))
        self.heads = nn.ModuleList([nn.Linear(6, 1), nn.Linear(6, 3)])
        self.to(dtype)

    def losses(self, x, y_reg, y_cls):
        f = self.trunk(x)
        return [
            nn.functional.mse_loss(self.heads[0](f).squeeze(1), y_reg),
            nn.functional.cross_entropy(self.heads[1](f), y_cls),
        ]


def make(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    net = Net(dtype)
    g = torch.Generator().manual_seed(seed + 100)
    data = (
        torch.randn(16, 5, generator=g).to(dtype),
        3 * torch.randn(16, generator=g).to(dtype),
        torch.randint(0, 3, (16,), generator=g),
    )
    return net, data


OPTIMIZERS = {
    "mtl": lambda net, **kw: mtlsam_fast.MTLOptimizer(
        net.trunk.parameters(), [h.parameters() for h in net.heads], **kw
    ),
    "fmtl": lambda net, **kw: mtlsam_fast.FMTL(
        net.trunk.parameters(), [h.parameters() for h in net.heads], rho=0.1, **kw
    ),
    "samo": lambda net, **kw: mtlsam_fast.SAMO(
        net.trunk.parameters(), [h.parameters() for h in net.heads], rho=0.1, seed=1, **kw
    ),
}
SGD = dict(base_optimizer=torch.optim.SGD, lr=0.1, momentum=0.9, weighting="mgda")


def flat_grad(params) -> torch.Tensor:
    return torch.cat([p.grad.reshape(-1) for p in params])


def params_of(net) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


# ------------------------------------------------------------------------------------- clipping
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("max_norm,max_head", [(1e-3, None), (0.05, 0.02), (1e3, 1e3)])
def test_clipping_equals_clip_grad_norm_(name, dtype, max_norm, max_head):
    """max_grad_norm gives the step a user gets by calling clip_grad_norm_ on the trunk's
    gradients (and on each head's) before the base optimizer steps; the record holds the norm
    that clip_grad_norm_ returns."""
    net, data = make(dtype=dtype)
    ref_net, _ = make(dtype=dtype)
    opt = OPTIMIZERS[name](net, max_grad_norm=max_norm, max_grad_norm_head=max_head, **SGD)
    ref = OPTIMIZERS[name](ref_net, **SGD)
    returned: list[torch.Tensor] = []

    def clip_as_users_do(o, direction, skipped):
        returned.append(nn.utils.clip_grad_norm_(ref_net.trunk.parameters(), max_norm))
        if max_head is not None:
            for h in ref_net.heads:
                nn.utils.clip_grad_norm_(h.parameters(), max_head)

    ref.register_direction_hook(clip_as_users_do)
    for _ in range(3):
        opt.step(lambda: net.losses(*data))
        ref.step(lambda: ref_net.losses(*data))
        rec = opt.last_step
        torch.testing.assert_close(
            rec.grad_norms["shared"], returned[-1].to(rec.grad_norms["shared"].dtype)
        )
        assert ("head0" in rec.grad_norms) == (max_head is not None)
        torch.testing.assert_close(flat_grad(net.parameters()), flat_grad(ref_net.parameters()))
        torch.testing.assert_close(params_of(net), params_of(ref_net))
    if max_norm < 1:  # the bound is active
        assert flat_grad(net.trunk.parameters()).norm() == pytest.approx(max_norm, rel=1e-4)


def test_clipping_is_off_by_default_and_a_hyperparameter_of_every_group():
    net, _ = make()
    opt = OPTIMIZERS["fmtl"](net, **SGD)
    assert [g["max_grad_norm"] for g in opt.param_groups] == [None, None, None]
    opt = OPTIMIZERS["fmtl"](net, max_grad_norm=1.0, max_grad_norm_head=0.5, **SGD)
    assert [g["max_grad_norm"] for g in opt.param_groups] == [1.0, 0.5, 0.5]
    state = opt.state_dict()
    assert state["param_groups"][0]["max_grad_norm"] == 1.0
    again = OPTIMIZERS["fmtl"](net, **SGD)
    again.load_state_dict(state)
    assert [g["max_grad_norm"] for g in again.param_groups] == [1.0, 0.5, 0.5]


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(max_grad_norm=0.0), "max_grad_norm"),
        (dict(max_grad_norm=-1.0), "max_grad_norm"),
        (dict(max_grad_norm=math.inf), "max_grad_norm"),
        (dict(max_grad_norm=True), "max_grad_norm"),
        (dict(max_grad_norm_head=math.nan), "max_grad_norm_head"),
        (dict(max_grad_norm_head="1"), "max_grad_norm_head"),
    ],
)
def test_bad_max_grad_norm_is_refused_at_construction(kwargs, name):
    net, _ = make()
    before = params_of(net)
    with pytest.raises(ValueError, match=f"^{name} must be None"):
        OPTIMIZERS["mtl"](net, **kwargs, **SGD)
    torch.testing.assert_close(params_of(net), before, rtol=0, atol=0)


def test_max_grad_norm_is_schedulable_and_checked_at_each_step():
    net, data = make()
    opt = OPTIMIZERS["mtl"](net, **SGD)
    opt.step(lambda: net.losses(*data))
    assert opt.last_step.grad_norms == {}
    opt.param_groups[0]["max_grad_norm"] = 1e-3
    opt.step(lambda: net.losses(*data))
    assert flat_grad(net.trunk.parameters()).norm() == pytest.approx(1e-3, rel=1e-4)
    opt.param_groups[1]["max_grad_norm"] = -2.0
    before = params_of(net)
    with pytest.raises(ValueError, match=r"param_groups\[1\]\['max_grad_norm'\] must be None"):
        opt.step(lambda: net.losses(*data))
    torch.testing.assert_close(params_of(net), before, rtol=0, atol=0)


def test_clipping_under_a_grad_scaler_equals_clipping_without():
    """Clipping runs after the scaler unscaled the gradients (as users call clip_grad_norm_ after
    scaler.unscale_): a power-of-two scale changes nothing."""
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**14)):
        net, data = make()
        opt = OPTIMIZERS["fmtl"](net, max_grad_norm=0.05, max_grad_norm_head=0.01, **SGD)
        for _ in range(2):
            opt.step(lambda: net.losses(*data), grad_scaler=scaler)
            if scaler is not None:
                scaler.update()
        runs.append(params_of(net))
    torch.testing.assert_close(runs[0], runs[1], rtol=0, atol=0)


# ------------------------------------------------------------------------------- direction hooks
@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_hook_sees_the_shared_direction_and_may_change_it(name):
    net, data = make()
    opt = OPTIMIZERS[name](net, **{**SGD, "momentum": 0.0})
    seen = []

    def zero(o, direction, skipped):
        assert o is opt and direction.shape == (sum(p.numel() for p in net.trunk.parameters()),)
        assert direction.data_ptr() == next(net.trunk.parameters()).grad.data_ptr()
        seen.append((direction.clone(), skipped.clone()))
        direction.zero_()

    handle = opt.register_direction_hook(zero)
    trunk = [p.detach().clone() for p in net.trunk.parameters()]
    heads = [p.detach().clone() for p in net.heads.parameters()]
    opt.step(lambda: net.losses(*data))
    assert len(seen) == 1 and seen[0][0].abs().sum() > 0 and not bool(seen[0][1])
    # the zeroed direction was the step's: the trunk did not move, the heads did
    torch.testing.assert_close([p.detach() for p in net.trunk.parameters()], trunk, rtol=0, atol=0)
    assert not torch.equal(next(net.heads.parameters()).detach(), heads[0])
    handle.remove()
    opt.step(lambda: net.losses(*data))
    assert len(seen) == 1
    assert not torch.equal(next(net.trunk.parameters()).detach(), trunk[0])


def test_hooks_run_in_order_before_clipping():
    net, data = make()
    opt = OPTIMIZERS["mtl"](net, max_grad_norm=0.5, **SGD)
    order = []
    opt.register_direction_hook(lambda o, d, s: (order.append("a"), d.mul_(1e6)))
    opt.register_direction_hook(lambda o, d, s: order.append("b"))
    opt.step(lambda: net.losses(*data))
    assert order == ["a", "b"]
    assert flat_grad(net.trunk.parameters()).norm() == pytest.approx(0.5, rel=1e-4)


def test_hook_runs_on_a_skipped_step_and_is_told_so():
    """A skipped step (inf/NaN) still calls the hook -- no host sync decides -- with
    ``skipped`` set; a stateful hook guards its state with it."""
    net, data = make()
    opt = OPTIMIZERS["fmtl"](net, **SGD)
    total = torch.zeros(sum(p.numel() for p in net.trunk.parameters()))
    flags = []

    def accumulate(o, direction, skipped):
        flags.append(bool(skipped))
        total.copy_(torch.where(skipped, total, total + direction))

    opt.register_direction_hook(accumulate)
    directions = []
    for t in range(3):

        def closure():
            losses = net.losses(*data)
            if t == 1:
                losses[1] = losses[1] * float("inf")
            return losses

        before = params_of(net)
        opt.step(closure)
        if t == 1:
            torch.testing.assert_close(params_of(net), before, rtol=0, atol=0)
        else:
            directions.append(flat_grad(net.trunk.parameters()).clone())
    assert flags == [False, True, False]
    assert float(opt.found_inf) == 0.0
    torch.testing.assert_close(total, directions[0] + directions[1])


def test_a_hook_that_leaves_the_direction_non_finite_skips_the_step():
    net, data = make()
    opt = OPTIMIZERS["mtl"](net, max_grad_norm=1.0, **SGD)
    opt.step(lambda: net.losses(*data))
    handle = opt.register_direction_hook(lambda o, d, s: d[3:4].fill_(float("nan")))
    before = params_of(net)
    opt.step(lambda: net.losses(*data))
    assert float(opt.found_inf) == 1.0 and bool(opt.last_step.skipped)
    torch.testing.assert_close(params_of(net), before, rtol=0, atol=0)
    handle.remove()
    opt.step(lambda: net.losses(*data))
    assert float(opt.found_inf) == 0.0


def test_hook_sees_the_unscaled_direction_under_a_grad_scaler():
    seen = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        net, data = make()
        opt = OPTIMIZERS["samo"](net, **SGD)
        opt.register_direction_hook(lambda o, d, s: seen.append(d.clone()))
        opt.step(lambda: net.losses(*data), grad_scaler=scaler)
    torch.testing.assert_close(seen[0], seen[1], rtol=0, atol=0)


def test_register_direction_hook_needs_a_callable():
    net, _ = make()
    opt = OPTIMIZERS["mtl"](net, **SGD)
    with pytest.raises(TypeError, match="callable"):
        opt.register_direction_hook(None)  # type: ignore[arg-type]
