"""SAMO's perturbation against its definition: ε_i = ρ v_i / ||v_i|| with v_i = α g0 + β z_i,
so every perturbed forward runs at distance exactly ρ from the step's start (and the two probes of
task i sit at start ± μ z_i), whatever the gradient and the noise (the paper cited in
mtlsam_fast/optim/samo.py). The optimizer evaluates ||v_i|| from its fused statistics as
α²||g0||² + 2αβ g0·z + β²||z||²; this checks it against the points themselves."""

from __future__ import annotations

import pytest
import torch

import mtlsam_fast


@pytest.mark.parametrize("layerwise", [False, True])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_samo_perturbed_points_lie_at_distance_rho(alpha, layerwise):
    g = torch.Generator().manual_seed(0)
    a = torch.nn.Parameter(torch.randn(7, generator=g))
    b = torch.nn.Parameter(torch.randn(3, 2, generator=g))
    targets = torch.randn(2, 13, generator=g)
    points: list[tuple[bool, torch.Tensor]] = []

    def closure():
        x = torch.cat([a.reshape(-1), b.reshape(-1)])
        points.append((torch.is_grad_enabled(), x.detach().clone()))
        return [(x[:10] - targets[k, :10]).square().sum() + x[10:].sum() * (k + 1)
                for k in range(2)]  # fmt: skip

    rho = 0.05
    opt = mtlsam_fast.SAMO(
        [a, b], num_tasks=2, base_optimizer=torch.optim.SGD, weighting="ls", lr=0.1,
        rho=rho, alpha=alpha, zo_eps=0.01, layerwise=layerwise,
    )  # fmt: skip
    opt.step(closure)
    start = points[0][1]
    perturbed = [x for grad, x in points[1:] if grad]
    probes = [x for grad, x in points[1:] if not grad]
    assert len(perturbed) == 2 and len(probes) == 4
    for x in perturbed:
        torch.testing.assert_close((x - start).norm(), torch.tensor(rho), rtol=1e-4, atol=0)
    if alpha == 1.0:  # no noise term (beta = 0): plain SAM along the mean loss's gradient g0
        x0 = start.clone().requires_grad_(True)
        mean = (
            sum(
                (x0[:10] - targets[k, :10]).square().sum() + x0[10:].sum() * (k + 1)
                for k in range(2)
            )
            / 2
        )
        (g0,) = torch.autograd.grad(mean, x0)
        for x in perturbed:
            torch.testing.assert_close(x - start, rho * g0 / g0.norm(), rtol=1e-4, atol=1e-7)
    # the probes of task i are start ± μ z_i: symmetric about the start
    for plus, minus in zip(probes[0::2], probes[1::2]):
        torch.testing.assert_close(plus - start, start - minus, rtol=1e-4, atol=1e-6)
