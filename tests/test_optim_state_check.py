"""``load_state_dict`` of a state that does not fit -- other weighting options, a corrupted
structure, wrong types or shapes inside -- raises before anything is replaced, the base optimizer's
state included. (Other shapes, K, base optimizer, weighting class, optimizer class and foreign
dicts: tests/test_optim_conventions.py.)"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlsam_fast
from mtlsam_fast.optim.base import STATE_KEY

K = 2


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 1)])


def build(cls=mtlsam_fast.FMTL, weighting="cagrad", options=None, seed=0, **kw):
    torch.manual_seed(seed)
    net = Net()
    extra = {"seed": 1} if cls is mtlsam_fast.SAMO else {}
    opt = cls(
        net.trunk.parameters(),
        [h.parameters() for h in net.heads],
        base_optimizer=kw.pop("base_optimizer", torch.optim.Adam),
        weighting=weighting,
        weighting_options=options or {"c": 0.4},
        rho=0.1,
        lr=1e-2,
        **extra,
        **kw,
    )
    g = torch.Generator().manual_seed(seed + 5)
    x, y = torch.randn(8, 4, generator=g), torch.randn(8, K, generator=g)

    def closure():
        f = net.trunk(x)
        return [nn.functional.mse_loss(h(f).squeeze(1), y[:, k]) for k, h in enumerate(net.heads)]

    return net, opt, closure


def trained_state(cls=mtlsam_fast.FMTL, **kw):
    _, opt, closure = build(cls, **kw)
    opt.step(closure)
    return opt.state_dict()


def group0(sd):
    return sd["param_groups"][0]


def mine(sd):
    return group0(sd)[STATE_KEY]


CORRUPTIONS = {
    "state-not-a-dict": (lambda sd: sd.update(state=[1, 2]), "'state' is a list"),
    "state-key-of-no-parameter": (
        lambda sd: sd["state"].update({99: sd["state"][0]}),
        "state entry 99 belongs to no parameter",
    ),
    "state-entry-not-a-dict": (
        lambda sd: sd["state"].update({0: torch.zeros(6, 4)}),
        r"state\[0\] must be a dict",
    ),
    "moment-of-another-shape": (
        lambda sd: sd["state"][1].update(exp_avg=torch.zeros(7)),
        r"state\[1\]\['exp_avg'\] has shape \(7,\), its parameter \(6,\)",
    ),
    "group-lists-other-parameters": (
        lambda sd: group0(sd).update(params=group0(sd)["params"][:-1]),
        r"param_groups\[0\]\['params'\] lists 3 parameters",
    ),
    "lr-a-string": (lambda sd: group0(sd).update(lr="0.01"), r"param_groups\[0\]\['lr'\]"),
    "betas-of-another-length": (
        lambda sd: sd["param_groups"][1].update(betas=(0.9,)),
        r"param_groups\[1\]\['betas'\]",
    ),
    "amsgrad-a-number": (lambda sd: group0(sd).update(amsgrad=1), r"\['amsgrad'\]"),
    "negative-step-count": (lambda sd: mine(sd).update(step_count=-1), "step_count is -1"),
    "step-count-a-float": (lambda sd: mine(sd).update(step_count=2.0), "step_count is 2.0"),
    "weighting-entry-not-a-dict": (
        lambda sd: mine(sd).update(weighting=[1]),
        r"\['weighting'\] must be a dict",
    ),
    "weighting-state-missing": (
        lambda sd: mine(sd)["weighting"].pop("state"),
        "with a 'state' dict",
    ),
    "our-entry-not-a-dict": (
        lambda sd: group0(sd).update({STATE_KEY: 2}),
        f"its '{STATE_KEY}' entry is not a dict",
    ),
    "param-groups-not-dicts": (
        lambda sd: sd.update(param_groups=[group0(sd), "x", 3]),
        "'param_groups' must be a list of dicts",
    ),
    "other-weighting-options": (
        lambda sd: mine(sd)["weighting"]["options"].update(c="0.5"),
        "the weighting's options are",
    ),
}


@pytest.mark.parametrize("fresh", [False, True], ids=["stepped", "fresh"])
@pytest.mark.parametrize("case", list(CORRUPTIONS))
def test_a_corrupted_state_is_refused_before_anything_is_replaced(case, fresh):
    corrupt, match = CORRUPTIONS[case]
    sd = trained_state()
    bad = copy.deepcopy(sd)
    corrupt(bad)
    net, opt, closure = build(seed=3)
    if not fresh:
        opt.step(closure)
    before = copy.deepcopy(opt.state_dict())
    weights = [p.detach().clone() for p in net.parameters()]
    with pytest.raises((ValueError, TypeError), match=match):
        opt.load_state_dict(bad)
    assert str(opt.state_dict()) == str(before)
    assert all(torch.equal(p, w) for p, w in zip(net.parameters(), weights))
    opt.load_state_dict(sd)  # the uncorrupted state loads, and the optimizer steps
    opt.step(closure)


def test_other_weighting_options_are_named_and_its_backend_is_not_an_option():
    sd = trained_state(weighting="cagrad", options={"c": 0.4})
    _, opt, _ = build(weighting="cagrad", options={"c": 0.5})
    with pytest.raises(ValueError, match=r"weighting's options are \{'c': '0.4'"):
        opt.load_state_dict(sd)
    _, opt, closure = build(weighting="cagrad", options={"c": 0.4, "backend": "torch"})
    opt.load_state_dict(sd)  # where it runs is not what it computes
    opt.step(closure)


@pytest.mark.parametrize("cls", [mtlsam_fast.SAMO])
def test_a_corrupted_samo_seed_is_refused(cls):
    sd = trained_state(cls)
    mine(sd)["seed"] = -3
    _, opt, _ = build(cls, seed=3)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match="seed is -3"):
        opt.load_state_dict(sd)
    assert str(opt.state_dict()) == str(before)


def test_the_implementation_flags_stay_this_optimizers():
    sd = trained_state(foreach=False)
    _, opt, closure = build(seed=3, foreach=True)
    opt.load_state_dict(sd)
    assert all(g["foreach"] is True for g in opt.param_groups)
    opt.step(closure)


def test_a_state_of_another_base_optimizers_options_still_steps():
    """Options of the same base optimizer are the state's (torch's rule): Adam's amsgrad saved
    True is loaded with its extra moment, and steps."""
    sd = trained_state(amsgrad=True)
    _, opt, closure = build(seed=3)
    opt.load_state_dict(sd)
    assert opt.param_groups[0]["amsgrad"] is True
    opt.step(closure)
    assert "max_exp_avg_sq" in opt.state[opt.param_groups[0]["params"][0]]
