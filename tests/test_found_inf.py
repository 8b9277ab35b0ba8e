"""Each trigger of the optimizers' found-inf flag as the only trigger of a step.

The flag is set by non-finite final gradients (tests/test_optim_behaviour.py poisons a loss by
inf, which makes every gradient infinite), and also by a non-finite gradient norm, by SAMO's
zeroth-order estimate and by a non-finite loss read by a loss-based weighting. Here each of these
fires alone, with every gradient of the step finite, and the skipped step must leave the
parameters, the base optimizer's state and the weighting's state bitwise as they were; a control
run with the trigger just below its threshold must step (so the test fails if the flag is set for
another reason). docs/ARCHITECTURE.md §8.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

import mtlsam_fast

P, H = 8, 4
BASES: dict[str, tuple[type[torch.optim.Optimizer], dict[str, Any]]] = {
    "adam": (torch.optim.Adam, dict(lr=1e-2)),
    "sgd-momentum": (torch.optim.SGD, dict(lr=1e-2, momentum=0.9)),
    "adam-fused": (torch.optim.Adam, dict(lr=1e-2, fused=True)),  # the native skip
}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.theta = nn.Parameter(0.1 * torch.randn(P, generator=g))
        self.heads = nn.ParameterList(
            [nn.Parameter(1e-3 * torch.rand(H, generator=g)) for _ in range(2)]
        )
        self.theta0 = self.theta.detach().clone()
        self.targets = torch.randn(2, P, generator=g)


def flat_state(opt: Any, model: Model) -> list[torch.Tensor]:
    """Parameters, every base-optimizer state value and every weighting-state tensor, cloned."""
    out = [p.detach().clone() for p in model.parameters()]
    for p in model.parameters():
        for _, v in sorted(opt.base_optimizer.state[p].items()):
            out.append(torch.as_tensor(v).clone())

    def walk(x: Any) -> None:
        if isinstance(x, torch.Tensor):
            out.append(x.clone())
        elif isinstance(x, dict):
            for k in sorted(x, key=str):
                walk(x[k])
        elif isinstance(x, (list, tuple)):
            for v in x:
                walk(v)

    walk(opt.weighting.state_dict())
    return out


def assert_bitwise(a: list[torch.Tensor], b: list[torch.Tensor]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        assert torch.equal(x.view(-1).view(torch.uint8), y.view(-1).view(torch.uint8))


def make(method: str, base: str, weighting: str = "ls", **kw: Any):
    model = Model()
    cls = {"fmtl": mtlsam_fast.FMTL, "samo": mtlsam_fast.SAMO, "mtl": mtlsam_fast.MTLOptimizer}
    opt = cls[method](
        [model.theta],
        [[h] for h in model.heads],
        BASES[base][0],
        weighting,
        **BASES[base][1],
        **kw,
    )
    return model, opt


def quadratic(model: Model, k: int) -> torch.Tensor:
    return (model.theta - model.targets[k]).square().sum()


def run(opt: Any, model: Model, closure) -> tuple[list[torch.Tensor], list[torch.Tensor], float]:
    """One clean step (so the base state exists), then the step under test: (state before the
    step under test, state after, its flag)."""
    opt.step(lambda: [quadratic(model, k) + model.heads[k].sum() for k in range(2)])
    before = flat_state(opt, model)
    opt.step(closure)
    return before, flat_state(opt, model), float(opt.found_inf)


@pytest.mark.parametrize("base", list(BASES))
@pytest.mark.parametrize("method", ["fmtl", "samo"])
def test_a_head_gradient_norm_overflow_alone_skips_the_step(method, base):
    """Every entry of head 1's gradient is c (finite): its norm overflows fp32 for c = 3e38,
    however it accumulates, and no accumulation overflows for c = 1e18 (c² = 1e36). The shared
    gradients and the Gram stay small."""

    def closure_with(c: float):
        def closure():
            return [quadratic(model, 0) + model.heads[0].sum(), quadratic(model, 1)
                    + c * model.heads[1].sum()]  # fmt: skip

        return closure

    model, opt = make(method, base, rho=0.05)
    before, after, flag = run(opt, model, closure_with(3e38))
    assert flag == 1.0
    assert_bitwise(after, before)
    assert all(torch.isfinite(g).all() for g in (opt._shared.grad, *opt._heads[1].grad))

    model, opt = make(method, base, rho=0.05)
    before, after, flag = run(opt, model, closure_with(1e18))
    assert flag == 0.0
    assert not torch.equal(after[0], before[0])


def samo_closure(model: Model, steepness: float):
    """Loss exp(s · Σ(θ - θ0)) per task plus a quadratic: finite at θ0 (and within ρ of it), but
    at the probes θ0 ± μz one side overflows fp32's exp, so the two-point estimate is ±inf."""

    def closure():
        ramp = torch.exp(steepness * (model.theta - model.theta0).sum())
        return [ramp + quadratic(model, k) + model.heads[k].sum() for k in range(2)]

    return closure


@pytest.mark.parametrize("base", list(BASES))
def test_samo_infinite_zeroth_order_estimate_alone_skips_the_step(base):
    model, opt = make("samo", base, rho=1e-4, zo_eps=1.0, alpha=0.5)
    opt.step(lambda: [quadratic(model, k) + model.heads[k].sum() for k in range(2)])
    model.theta0 = model.theta.detach().clone()  # the ramp is centred on the current point
    before = flat_state(opt, model)
    opt.step(samo_closure(model, 100.0))
    assert float(opt.found_inf) == 1.0
    assert_bitwise(flat_state(opt, model), before)
    assert torch.isfinite(opt._shared.grad).all()  # the estimate was the only trigger

    # control: a gentle ramp keeps the estimate finite and the step goes through
    model, opt = make("samo", base, rho=1e-4, zo_eps=1.0, alpha=0.5)
    opt.step(lambda: [quadratic(model, k) + model.heads[k].sum() for k in range(2)])
    model.theta0 = model.theta.detach().clone()
    before = flat_state(opt, model)
    opt.step(samo_closure(model, 1.0))
    assert float(opt.found_inf) == 0.0
    assert not torch.equal(flat_state(opt, model)[0], before[0])


@pytest.mark.parametrize("weighting", ["dwa", "gls", "uw", "ls", "mgda"])
@pytest.mark.parametrize("base", ["adam", "sgd-momentum"])
@pytest.mark.parametrize("method", ["mtl", "fmtl", "samo"])
def test_an_infinite_loss_with_finite_gradients_skips_the_step(method, base, weighting):
    """Task 1's loss carries an infinite constant: its gradient is finite, but the step's clean
    losses are not, so the step is skipped (a weighting that reads the losses could not weigh it
    either; its state -- DWA's sums, UW's log-variances and Adam moments -- is kept too), also
    for the Gram-only weightings whose arithmetic never sees the losses."""
    model, opt = make(method, base, weighting)
    inf = torch.tensor(math.inf)

    def closure():
        return [quadratic(model, 0) + model.heads[0].sum(), quadratic(model, 1) + inf]

    before, after, flag = run(opt, model, closure)
    assert flag == 1.0
    assert_bitwise(after, before)
