"""Gradient accumulation inside one step: ``opt.step(closure, micro_batches=M)`` calls
``closure(m)`` for each micro-batch at every point where the algorithm evaluates the losses, and
the step equals the step over the union of the M (equal) micro-batches. Also the closure-less
``step()`` that torch.distributed.checkpoint uses to create a fresh optimizer's state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import mtlsam_fast
from mtlsam_fast import weighting

K = 3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4), nn.Tanh())
        self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 3), nn.Linear(4, 2)])

    def losses(self, x, ys):
        z = self.trunk(x)
        out = [h(z) for h in self.heads]
        return [
            nn.functional.mse_loss(out[0], ys[0]),
            nn.functional.cross_entropy(out[1], ys[1]),
            nn.functional.cross_entropy(out[2], ys[2]),
        ]


def data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 5, dtype=torch.float64, generator=g)
    return x, [
        torch.randn(n, 1, dtype=torch.float64, generator=g),
        torch.randint(0, 3, (n,), generator=g),
        torch.randint(0, 2, (n,), generator=g),
    ]


def build(method: str, base=torch.optim.SGD, **kw):
    torch.manual_seed(0)
    net = Net().double()
    cls = {"mtl": mtlsam_fast.MTLOptimizer, "fmtl": mtlsam_fast.FMTL, "samo": mtlsam_fast.SAMO}[
        method
    ]
    extra = {} if method == "mtl" else {"rho": 0.05}
    opt = cls(
        list(net.trunk.parameters()),
        [list(h.parameters()) for h in net.heads],
        base,
        weighting.get("pcgrad", seed=4),
        lr=0.1,
        backend="torch",
        **extra,
        **kw,
    )
    return net, opt


def flat(net):
    return torch.cat([p.detach().flatten() for p in net.parameters()])


#: closure calls per step and micro-batch: 1 forward (plain), 1 + K (F-MTL), 1 + 3K (SAMO)
CALLS = {"mtl": 1, "fmtl": 1 + K, "samo": 1 + 3 * K}


@pytest.mark.parametrize("method", ["mtl", "fmtl", "samo"])
def test_step_over_micro_batches_equals_the_step_over_their_union(method):
    M, n = 3, 4
    net, opt = build(method)
    ref, ref_opt = build(method)
    seen = []
    for step in range(3):
        x, ys = data(M * n, step)

        def closure(m, x=x, ys=ys):
            seen.append(m)
            sl = slice(m * n, (m + 1) * n)
            return net.losses(x[sl], [y[sl] for y in ys])

        out = opt.step(closure, micro_batches=M)
        expected = ref_opt.step(lambda x=x, ys=ys: ref.losses(x, ys))
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=0)
        a, b = flat(net), flat(ref)
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()
    assert seen == list(range(M)) * CALLS[method] * 3


def test_one_micro_batch_is_the_plain_step_bitwise():
    net, opt = build("fmtl")
    ref, ref_opt = build("fmtl")
    x, ys = data(6, 0)
    opt.step(lambda m: net.losses(x, ys), micro_batches=1)
    ref_opt.step(lambda: ref.losses(x, ys))
    assert torch.equal(flat(net), flat(ref))


@pytest.mark.parametrize("bad", [0, -1, True, 1.5, "2"])
def test_bad_micro_batch_counts_raise_before_any_change(bad):
    net, opt = build("samo")
    before = flat(net)
    x, ys = data(6, 0)
    with pytest.raises(ValueError, match="micro_batches"):
        opt.step(lambda m: net.losses(x, ys), micro_batches=bad)
    assert torch.equal(flat(net), before) and opt._step_count == 0


@pytest.mark.parametrize("method", ["mtl", "fmtl", "samo"])
def test_step_without_closure_only_creates_a_fresh_state(method):
    """What torch.distributed.checkpoint's ``_init_optim_state`` does to a fresh optimizer: zero
    gradients, every lr set to 0, ``step(closure=None)``. The base optimizer's state appears, the
    weights stay bitwise, and the next real step is the one a never-initialized optimizer takes
    (SGD's momentum buffer starts from the first gradient either way)."""
    net, opt = build(method, momentum=0.9)
    ref, ref_opt = build(method, momentum=0.9)
    before = flat(net)
    for p in net.parameters():
        p.grad = torch.zeros_like(p)
    lrs = [g["lr"] for g in opt.param_groups]
    for g in opt.param_groups:
        g["lr"] = 0.0
    out = opt.step()
    assert out.shape == (K,) and torch.isnan(out).all()
    assert opt.state and torch.equal(flat(net), before) and opt._step_count == 0
    for g, lr in zip(opt.param_groups, lrs):
        g["lr"] = lr
    opt.zero_grad()
    x, ys = data(6, 0)
    opt.step(lambda: net.losses(x, ys))
    ref_opt.step(lambda: ref.losses(x, ys))
    assert torch.equal(flat(net), flat(ref))
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()  # the state exists now: a closure-less step is a mistake


def test_step_without_closure_at_a_nonzero_lr_raises():
    net, opt = build("fmtl")
    before = flat(net)
    with pytest.raises(TypeError, match="needs a closure"):
        opt.step()
    assert torch.equal(flat(net), before) and not opt.state
