"""Parameter lists handled as torch.optim handles them: frozen parameters skipped (and a later
change of ``requires_grad`` refused before anything changes), memory formats kept, clear errors for
lists that cannot be trained (docs/optimizer-composition.md, "Parameters and composition")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import mtlsam_fast

K = 2
OPTIMIZERS = {
    "mtl": lambda shared, heads, **kw: mtlsam_fast.MTLOptimizer(shared, heads, **kw),
    "fmtl": lambda shared, heads, **kw: mtlsam_fast.FMTL(shared, heads, rho=0.1, **kw),
    "samo": lambda shared, heads, **kw: mtlsam_fast.SAMO(shared, heads, rho=0.1, seed=3, **kw),
}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5))
        self.heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 1)])

    def losses(self, x, y):
        f = self.trunk(x)
        return [nn.functional.mse_loss(h(f).squeeze(1), y[:, k]) for k, h in enumerate(self.heads)]


def data(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(10, 4, generator=g), torch.randn(10, K, generator=g)


def snapshot(net: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for p in net.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ------------------------------------------------------------------------ frozen parameters
@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_frozen_parameters_are_skipped_and_the_rest_trains_as_without_them(method):
    x, y = data()
    torch.manual_seed(0)
    net = Net()
    ref = copy.deepcopy(net)
    for model in (net, ref):
        model.trunk[0].bias.requires_grad_(False)
        model.heads[1].weight.requires_grad_(False)
    frozen = [net.trunk[0].bias, net.heads[1].weight]
    frozen_before = [(p.detach().clone(), p.data_ptr()) for p in frozen]
    # all parameters listed (as torch.optim accepts them) ...
    opt = OPTIMIZERS[method](net.trunk.parameters(), [h.parameters() for h in net.heads], lr=0.1)
    # ... against only the trainable ones
    trainable = [[p for p in m.parameters() if p.requires_grad] for m in (ref.trunk, *ref.heads)]
    ref_opt = OPTIMIZERS[method](trainable[0], trainable[1:], lr=0.1)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 2, 1]
    for _ in range(2):
        opt.step(lambda: net.losses(x, y))
        ref_opt.step(lambda: ref.losses(x, y))
    assert_bitwise(snapshot(net), snapshot(ref))
    for p, (value, ptr) in zip(frozen, frozen_before):
        assert torch.equal(p, value) and p.data_ptr() == ptr and p.grad is None


@pytest.mark.parametrize("change", ["freeze", "unfreeze"])
@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_changing_requires_grad_after_building_raises_before_anything_changes(method, change):
    x, y = data()
    torch.manual_seed(0)
    net = Net()
    net.heads[0].bias.requires_grad_(False)
    opt = OPTIMIZERS[method](
        net.trunk.parameters(),
        [h.parameters() for h in net.heads],
        base_optimizer=torch.optim.Adam,
        lr=0.1,
    )
    opt.step(lambda: net.losses(x, y))
    param = net.trunk[2].weight if change == "freeze" else net.heads[0].bias
    name = r"shared_params\[2\]" if change == "freeze" else r"task_params\[0\]\[1\]"
    done = "frozen" if change == "freeze" else "unfrozen"
    param.requires_grad_(change == "unfreeze")
    weights, state = snapshot(net), copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=rf"{name} was {done} .*Build a new optimizer"):
        opt.step(lambda: net.losses(x, y))
    assert_bitwise(snapshot(net), weights)
    assert str(opt.state_dict()) == str(state)
    param.requires_grad_(change == "freeze")  # set back: the optimizer steps again
    opt.step(lambda: net.losses(x, y))
    assert not torch.equal(net.trunk[0].weight, weights[0])


@pytest.mark.parametrize(
    "lists, match",
    [
        (lambda n: ([n.trunk[0].weight.requires_grad_(False)], [[]] * K), "none of its parameters"),
        (lambda n: ([*n.trunk.parameters(), n.trunk[0].weight], [[]] * K), "listed twice"),
        (  # frozen ones too: torch.optim refuses a parameter listed twice, trainable or not
            lambda n: ([n.trunk[0].bias.requires_grad_(False), n.trunk[0].bias], [[]] * K),
            "listed twice",
        ),
        (
            lambda n: (
                n.trunk.parameters(),
                [[n.heads[0].weight, n.trunk[2].bias.requires_grad_(False)], []],
            ),
            "both shared and task-specific",
        ),
        (lambda n: (n.trunk.parameters(), []), "task_params is empty"),
        (lambda n: ([], [n.heads[0].parameters()]), "shared_params is empty"),
    ],
    ids=[
        "all-shared-frozen",
        "duplicate",
        "duplicate-frozen",
        "shared-and-head",
        "no-task",
        "empty",
    ],
)
def test_lists_that_cannot_be_trained_are_refused_before_anything_moves(lists, match):
    torch.manual_seed(0)
    net = Net()
    ptrs = [p.data_ptr() for p in net.parameters()]
    shared, heads = lists(net)
    with pytest.raises(ValueError, match=match):
        mtlsam_fast.FMTL(shared, heads, rho=0.1)
    assert [p.data_ptr() for p in net.parameters()] == ptrs


def test_a_frozen_head_leaves_its_task_without_a_param_group():
    torch.manual_seed(0)
    net = Net()
    net.heads[1].requires_grad_(False)
    opt = mtlsam_fast.FMTL(net.trunk.parameters(), [h.parameters() for h in net.heads], rho=0.1)
    assert opt.num_tasks == K and len(opt.param_groups) == 2
    x, y = data()
    head = snapshot(net.heads[1])
    opt.step(lambda: net.losses(x, y))
    assert_bitwise(snapshot(net.heads[1]), head)


# ------------------------------------------------------------------------ memory formats
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3), nn.Flatten()
        )
        self.heads = nn.ModuleList([nn.Linear(16, 1), nn.Linear(16, 1)])

    def losses(self, x, y):
        f = self.trunk(x)
        return [nn.functional.mse_loss(h(f).squeeze(1), y[:, k]) for k, h in enumerate(self.heads)]


def conv_layout(net: ConvNet) -> list[bool]:
    return [
        p.is_contiguous(memory_format=torch.channels_last)
        for p in net.trunk.parameters()
        if p.dim() == 4
    ]


@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_a_channels_last_model_keeps_its_format_and_trains_as_the_contiguous_one(method):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64), torch.randn(3, K)
    torch.manual_seed(0)
    ref = ConvNet().double()
    net = copy.deepcopy(ref).to(memory_format=torch.channels_last)
    assert conv_layout(net) == [True, True]
    opts = [
        OPTIMIZERS[method](m.trunk.parameters(), [h.parameters() for h in m.heads], lr=0.1)
        for m in (net, ref)
    ]
    assert conv_layout(net) == [True, True]  # building kept the format (views into the buffer)
    weight = net.trunk[0].weight
    theta = opts[0]._shared.theta
    assert theta.data_ptr() <= weight.data_ptr() < theta.data_ptr() + theta.nbytes
    xl = x.to(memory_format=torch.channels_last)
    for _ in range(2):
        opts[0].step(lambda: [l.double() for l in net.losses(xl, y.double())])
        opts[1].step(lambda: [l.double() for l in ref.losses(x, y.double())])
    assert conv_layout(net) == [True, True]
    assert weight.grad is not None
    assert weight.grad.is_contiguous(memory_format=torch.channels_last)
    if method == "samo":
        # the noise stream follows the flat buffer, which holds each tensor in its memory order:
        # another realization of the same distribution, so the two runs differ but both train
        assert not torch.equal(net.trunk[0].weight, ref.trunk[0].weight)
        return
    for a, b in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_dense_transposed_parameter_keeps_its_strides():
    torch.manual_seed(0)
    w = nn.Parameter(torch.randn(5, 3).t())  # dense, column-major
    head = nn.Parameter(torch.randn(5))
    opt = mtlsam_fast.MTLOptimizer([w], [[head], []], lr=0.1)
    assert w.stride() == (1, 3)
    x = torch.randn(4, 3)
    opt.step(lambda: [(x @ w @ head).square().mean(), (x @ w).sum()])
    assert w.stride() == (1, 3) and w.grad is not None and w.grad.stride() == (1, 3)


def test_converting_the_format_after_building_is_named():
    torch.manual_seed(0)
    net = ConvNet()
    opt = mtlsam_fast.FMTL(net.trunk.parameters(), [h.parameters() for h in net.heads], rho=0.1)
    net.to(memory_format=torch.channels_last)  # replaces every 4-D parameter's .data
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, K)
    with pytest.raises(RuntimeError, match="no longer lives in the optimizer's flat buffer"):
        opt.step(lambda: net.losses(x, y))
