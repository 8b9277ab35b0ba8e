"""torch.optim conventions: hyperparameters in param groups (schedulable, validated), torch's
``{"state", "param_groups"}`` state_dict with our state inside it (old format still loads,
mismatches refused before anything changes), GradScaler through its public methods."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlsam_fast
from mtlsam_fast.optim.base import STATE_KEY

K = 2


class Net(nn.Module):
    def __init__(self, width: int = 6, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, width), nn.Tanh(), nn.Linear(width, 5))
        self.heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 3)])
        self.to(dtype)


def make(seed: int = 0, **kw):
    torch.manual_seed(seed)
    net = Net(**kw)
    g = torch.Generator().manual_seed(7)
    x, y, c = (
        torch.randn(12, 4, generator=g),
        torch.randn(12, generator=g),
        torch.randint(0, 3, (12,), generator=g),
    )
    dtype = next(net.parameters()).dtype

    def closure():
        f = net.trunk(x.to(dtype))
        return [
            nn.functional.mse_loss(net.heads[0](f).squeeze(1), y.to(dtype)),
            nn.functional.cross_entropy(net.heads[1](f), c),
        ]

    return net, closure


BUILD = {
    "mtl": lambda net, **kw: mtlsam_fast.MTLOptimizer(
        net.trunk.parameters(), [h.parameters() for h in net.heads], **kw
    ),
    "fmtl": lambda net, **kw: mtlsam_fast.FMTL(
        net.trunk.parameters(), [h.parameters() for h in net.heads], **{"rho": 0.1, **kw}
    ),
    "samo": lambda net, **kw: mtlsam_fast.SAMO(
        net.trunk.parameters(), [h.parameters() for h in net.heads], **{"rho": 0.1, "seed": 1, **kw}
    ),
}


def weights(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------ hyperparameters
def test_hyperparameters_are_in_every_param_group():
    net, _ = make()
    opt = BUILD["samo"](net, rho=0.2, rho_head=0.05, alpha=0.3, zo_eps=1e-2, lr=0.1)
    assert [g["rho"] for g in opt.param_groups] == [0.2, 0.05, 0.05]
    for g in opt.param_groups:
        assert (g["alpha"], g["zo_eps"], g["layerwise"], g["lr"]) == (0.3, 1e-2, True, 0.1)
    assert opt.base_optimizer.param_groups is opt.param_groups
    fmtl = BUILD["fmtl"](make()[0], rho=0.3, adaptive=True)
    assert [(g["rho"], g["adaptive"]) for g in fmtl.param_groups] == [(0.3, True)] * 3


@pytest.mark.parametrize("method", ["fmtl", "samo"])
def test_changing_a_group_value_is_the_same_as_building_with_it(method):
    """A schedule of rho (and of SAMO's alpha) written into the groups between steps drives the
    step exactly as the constructor argument would."""
    a_net, a_closure = make()
    b_net, b_closure = make()
    extra = {"alpha": 0.25} if method == "samo" else {}
    a = BUILD[method](a_net, rho=0.02, rho_head=0.01, lr=0.05, **extra)
    b = BUILD[method](b_net, rho=0.5, lr=0.05)
    for g in b.param_groups:
        g["rho"] = 0.01
        g.update(extra)
    b.param_groups[0]["rho"] = 0.02
    for _ in range(3):
        a.step(a_closure)
        b.step(b_closure)
    assert_bitwise(weights(a_net), weights(b_net))


def test_rho_zero_in_the_groups_makes_fmtl_plain_aggregation():
    net_f, closure_f = make()
    net_m, closure_m = make()
    fmtl = BUILD["fmtl"](net_f, weighting="mgda", lr=0.05)
    plain = BUILD["mtl"](net_m, weighting="mgda", lr=0.05)
    fmtl.step(closure_f)
    plain.step(closure_m)
    assert not torch.equal(weights(net_f)[0], weights(net_m)[0])  # rho = 0.1 perturbed
    net_f, closure_f = make()
    net_m, closure_m = make()
    fmtl = BUILD["fmtl"](net_f, weighting="mgda", lr=0.05)
    plain = BUILD["mtl"](net_m, weighting="mgda", lr=0.05)
    for g in fmtl.param_groups:
        g["rho"] = 0.0
    for _ in range(2):
        fmtl.step(closure_f)
        plain.step(closure_m)
    assert_bitwise(weights(net_f), weights(net_m))


@pytest.mark.parametrize(
    "method, key, value, exc",
    [
        ("fmtl", "rho", -1.0, ValueError),
        ("fmtl", "rho", float("nan"), ValueError),
        ("fmtl", "adaptive", 1, TypeError),
        ("samo", "alpha", 1.5, ValueError),
        ("samo", "zo_eps", 0.0, ValueError),
        ("samo", "zo_eps", float("inf"), ValueError),
        ("samo", "layerwise", "yes", TypeError),
    ],
)
@pytest.mark.parametrize("group", [0, 2])
def test_an_invalid_group_value_raises_at_the_step_before_anything_changes(
    method, key, value, exc, group
):
    net, closure = make()
    opt = BUILD[method](net, base_optimizer=torch.optim.Adam, lr=0.05)
    opt.step(closure)
    before, state = weights(net), copy.deepcopy(opt.state_dict())
    opt.param_groups[group][key] = value
    with pytest.raises(exc, match=rf"param_groups\[{group}\]\['{key}'\]"):
        opt.step(closure)
    assert_bitwise(weights(net), before)
    opt.param_groups[group][key] = state["param_groups"][group][key]
    assert str(opt.state_dict()) == str(state)


def test_a_missing_group_value_is_named():
    net, closure = make()
    opt = BUILD["fmtl"](net)
    del opt.param_groups[1]["rho"]
    with pytest.raises(KeyError, match=r"param_groups\[1\]\['rho'\] is missing"):
        opt.step(closure)


@pytest.mark.parametrize(
    "kw, exc, match",
    [
        ({"rho": -0.1}, ValueError, "^rho must be"),
        ({"rho_head": float("inf")}, ValueError, "^rho_head must be"),
        ({"adaptive": "no"}, TypeError, "^adaptive must be True or False"),
    ],
)
def test_constructor_arguments_are_named_as_written(kw, exc, match):
    net, _ = make()
    with pytest.raises(exc, match=match):
        BUILD["fmtl"](net, **kw)


def test_add_param_group_is_refused_after_construction():
    net, _ = make()
    opt = BUILD["fmtl"](net)
    with pytest.raises(NotImplementedError, match="build a new optimizer"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})
    assert len(opt.param_groups) == 3


# ------------------------------------------------------------------------ state_dict
@pytest.mark.parametrize("method", list(BUILD))
def test_state_dict_has_torch_layout_with_our_state_inside(method):
    net, closure = make()
    opt = BUILD[method](net, base_optimizer=torch.optim.Adam, weighting="gradvac", lr=1e-2)
    opt.step(closure)
    sd = opt.state_dict()
    assert set(sd) == {"state", "param_groups"}
    ours = sd["param_groups"][0][STATE_KEY]
    assert ours["num_tasks"] == K and ours["step_count"] == 1
    assert ours["optimizer"] == type(opt).__name__ and ours["base_optimizer"] == "Adam"
    assert ours["weighting"]["class"] == "GradVac" and ours["weighting"]["state"]
    assert all(STATE_KEY not in g for g in sd["param_groups"][1:])
    assert all(STATE_KEY not in g for g in opt.param_groups)  # only in the saved copy
    # Same keys per parameter as a plain torch optimizer over the same parameters.
    plain = torch.optim.Adam([p for g in opt.param_groups for p in g["params"]], lr=1e-2)
    assert set(sd["state"]) == set(range(sum(len(g["params"]) for g in opt.param_groups)))
    del plain


def _format1(opt) -> dict:
    """The state_dict layout of the previous release, built from an optimizer's current state."""
    sd = opt.state_dict()
    ours = sd["param_groups"][0].pop(STATE_KEY)
    for g in sd["param_groups"]:
        for name in opt.HYPERPARAMETERS:
            del g[name]
    extra = {"seed": ours["seed"]} if "seed" in ours else {}
    return {
        "base_optimizer": sd,
        "weighting": ours["weighting"]["state"],
        "step_count": ours["step_count"],
        "extra": extra,
    }


@pytest.mark.parametrize("method", list(BUILD))
@pytest.mark.parametrize("fmt", ["current", "format1"])
def test_resume_from_a_state_dict_is_bitwise(method, fmt):
    net, closure = make()
    init = copy.deepcopy(net.state_dict())
    opt = BUILD[method](net, base_optimizer=torch.optim.Adam, weighting="gradvac", lr=1e-2)
    for _ in range(2):
        opt.step(closure)
    sd = copy.deepcopy(opt.state_dict() if fmt == "current" else _format1(opt))
    mid = copy.deepcopy(net.state_dict())
    for _ in range(2):
        opt.step(closure)
    straight = weights(net)

    net2, closure2 = make(seed=5)
    net2.load_state_dict(init)
    opt2 = BUILD[method](net2, base_optimizer=torch.optim.Adam, weighting="gradvac", lr=1e-2)
    net2.load_state_dict(mid)
    opt2.load_state_dict(sd)
    for _ in range(2):
        opt2.step(closure2)
    assert_bitwise(weights(net2), straight)


def _mismatches():
    def other_k(net):
        return mtlsam_fast.FMTL(
            net.trunk.parameters(),
            num_tasks=3,
            rho=0.1,
            base_optimizer=torch.optim.Adam,
            weighting="gradvac",
        )

    return {
        "other-K": (other_k, "num_tasks"),
        "other-base-optimizer": (
            lambda net: BUILD["fmtl"](net, base_optimizer=torch.optim.SGD, weighting="gradvac"),
            "base_optimizer",
        ),
        "other-weighting": (
            lambda net: BUILD["fmtl"](net, base_optimizer=torch.optim.Adam, weighting="pcgrad"),
            "weighting",
        ),
        "other-optimizer": (
            lambda net: BUILD["samo"](net, base_optimizer=torch.optim.Adam, weighting="gradvac"),
            "optimizer",
        ),
    }


@pytest.mark.parametrize("case", list(_mismatches()))
def test_a_state_dict_of_another_setup_is_refused_before_anything_changes(case):
    src_net, closure = make()
    src = BUILD["fmtl"](src_net, base_optimizer=torch.optim.Adam, weighting="gradvac", lr=1e-2)
    src.step(closure)
    sd = src.state_dict()
    build, what = _mismatches()[case]
    net, closure2 = make(seed=3)
    opt = build(net)
    opt.step(closure2 if case != "other-K" else lambda: [*closure2(), closure2()[0]])
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=what):
        opt.load_state_dict(sd)
    assert str(opt.state_dict()) == str(before)


def test_a_state_dict_over_other_shapes_is_refused():
    src_net, closure = make(width=6)
    src = BUILD["fmtl"](src_net, base_optimizer=torch.optim.Adam, lr=1e-2)
    src.step(closure)
    net, closure2 = make(width=7)
    opt = BUILD["fmtl"](net, base_optimizer=torch.optim.Adam, lr=1e-2)
    opt.step(closure2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="shapes"):
        opt.load_state_dict(src.state_dict())
    assert str(opt.state_dict()) == str(before)


def test_a_bad_weighting_state_is_refused_before_the_base_state_is_replaced():
    src_net, closure = make()
    src = BUILD["fmtl"](src_net, base_optimizer=torch.optim.Adam, weighting="gradvac", lr=1e-2)
    src.step(closure)
    sd = src.state_dict()
    sd["param_groups"][0][STATE_KEY]["weighting"]["state"] = {"bogus": 1}
    net, closure2 = make(seed=3)
    opt = BUILD["fmtl"](net, base_optimizer=torch.optim.Adam, weighting="gradvac", lr=1e-2)
    opt.step(closure2)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises((ValueError, KeyError)):
        opt.load_state_dict(sd)
    assert str(opt.state_dict()) == str(before)


@pytest.mark.parametrize(
    "sd, match",
    [
        ([1, 2], "is a dict"),
        ({"foo": 1}, "expected the keys 'state' and 'param_groups'"),
        ("plain", "plain torch.optim state_dict"),
        ("future", "format 99"),
    ],
)
def test_not_our_state_dict_is_named(sd, match):
    net, closure = make()
    opt = BUILD["fmtl"](net, base_optimizer=torch.optim.Adam, lr=1e-2)
    opt.step(closure)
    if sd == "plain":
        sd = opt.base_optimizer.state_dict()
    elif sd == "future":
        sd = opt.state_dict()
        sd["param_groups"][0][STATE_KEY]["format"] = 99
    with pytest.raises((TypeError, ValueError), match=match):
        opt.load_state_dict(sd)


# ------------------------------------------------------------------------ GradScaler
def test_grad_scaler_is_driven_through_its_public_methods(monkeypatch):
    """The scaler is used through is_enabled / scale / unscale_ only (no private state)."""
    used = []

    class Spy(torch.amp.GradScaler):
        def __getattribute__(self, name):
            if name.startswith("_") and not name.startswith("__"):
                import sys

                caller = sys._getframe(1).f_code.co_filename
                if "mtlsam_fast" in caller:
                    used.append(name)
            return super().__getattribute__(name)

    net, closure = make()
    opt = BUILD["fmtl"](net, lr=0.05)
    scaler = Spy("cpu", init_scale=2.0**8)
    opt.step(closure, grad_scaler=scaler)
    scaler.update()
    assert used == []
    assert not hasattr(type(opt), "_step_supports_amp_scaling")


def test_grad_scaler_with_float16_parameters_is_refused_before_anything_changes():
    net, closure = make(dtype=torch.float16)
    opt = BUILD["mtl"](net, lr=0.05)
    before = weights(net)
    with pytest.raises(ValueError, match="float16"):
        opt.step(closure, grad_scaler=torch.amp.GradScaler("cpu"))
    assert_bitwise(weights(net), before)


def test_grad_scaler_must_be_a_scaler():
    net, closure = make()
    opt = BUILD["mtl"](net, lr=0.05)
    with pytest.raises(TypeError, match="GradScaler"):
        opt.step(closure, grad_scaler=object())
