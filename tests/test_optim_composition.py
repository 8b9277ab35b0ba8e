"""Composition with the torch features users combine with the optimizers: gradient checkpointing,
``torch.compile``, closures that call ``zero_grad()`` or ``backward()``, a model whose parameters
were replaced (``load_state_dict(..., assign=True)``). Each trains exactly as the plain run does,
or raises before anything changes (docs/optimizer-composition.md, "Parameters and composition")."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import mtlsam_fast

K = 2
OPTIMIZERS = {
    "mtl": lambda net, **kw: mtlsam_fast.MTLOptimizer(
        net.trunk_parameters(), [h.parameters() for h in net.heads], **kw
    ),
    "fmtl": lambda net, **kw: mtlsam_fast.FMTL(
        net.trunk_parameters(), [h.parameters() for h in net.heads], rho=0.1, **kw
    ),
    "samo": lambda net, **kw: mtlsam_fast.SAMO(
        net.trunk_parameters(), [h.parameters() for h in net.heads], rho=0.1, seed=3, **kw
    ),
}


class Net(nn.Module):
    """A stem, a block (optionally with BatchNorm, optionally checkpointed), two heads."""

    def __init__(self, batchnorm: bool = True, checkpointed: bool | None = None):
        super().__init__()
        self.checkpointed = checkpointed  # None: plain; else use_reentrant
        self.stem = nn.Linear(4, 6)
        self.block = nn.Sequential(
            nn.BatchNorm1d(6) if batchnorm else nn.Identity(), nn.Tanh(), nn.Linear(6, 5)
        )
        self.heads = nn.ModuleList([nn.Linear(5, 1), nn.Linear(5, 1)])

    def trunk_parameters(self):
        return [*self.stem.parameters(), *self.block.parameters()]

    def forward(self, x):
        h = self.stem(x)
        if self.checkpointed is None:
            f = self.block(h)
        else:
            f = checkpoint(self.block, h, use_reentrant=self.checkpointed)
        return torch.cat([head(f) for head in self.heads], 1)


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(10, 4, generator=g), torch.randn(10, K, generator=g)


def losses_of(model, x, y):
    out = model(x)
    return [nn.functional.mse_loss(out[:, k], y[:, k]) for k in range(K)]


def weights(net):
    return [p.detach().clone() for p in net.parameters()]


def assert_bitwise(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def assert_stats_of_one_plain_forward(net, initial, x):
    """The running statistics equal those of one plain training-mode forward from ``initial``."""
    ref = copy.deepcopy(initial)
    ref.checkpointed = None
    ref(x)
    bn, bn_ref = net.block[0], ref.block[0]
    assert int(bn.num_batches_tracked) == 1
    assert torch.equal(bn.running_mean, bn_ref.running_mean)
    assert torch.equal(bn.running_var, bn_ref.running_var)


# ------------------------------------------------------------------------ gradient checkpointing
@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")  # SAMO's no-grad probes
@pytest.mark.parametrize("batchnorm", [True, False], ids=["bn", "no-bn"])
@pytest.mark.parametrize("reentrant", [False, True], ids=["non-reentrant", "reentrant"])
@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_gradient_checkpointing_trains_as_the_plain_run(method, reentrant, batchnorm):
    x, y = data()
    torch.manual_seed(0)
    plain = Net(batchnorm)
    initial = copy.deepcopy(plain)
    net = copy.deepcopy(plain)
    net.checkpointed = reentrant
    opts = [OPTIMIZERS[method](m, lr=0.1) for m in (net, plain)]
    for step in range(3):
        for opt, model in zip(opts, (net, plain)):
            opt.step(lambda model=model: losses_of(model, x, y))
        if step == 0 and batchnorm:  # once per step, not once per (re)computed forward
            assert_stats_of_one_plain_forward(net, initial, x)
    assert_bitwise(weights(net), weights(plain))
    assert_bitwise(list(net.buffers()), list(plain.buffers()))


# ------------------------------------------------------------------------ torch.compile
@pytest.mark.parametrize("method", ["fmtl", "samo"])
def test_a_compiled_model_trains_as_eager_updates_batchnorm_once_and_compiles_once(method):
    from torch._dynamo.utils import counters

    x, y = data()
    torch.manual_seed(0)
    eager = Net()
    initial = copy.deepcopy(eager)
    net = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(net, backend="aot_eager")  # dynamo + AOT autograd, no codegen (CI)
    opts = [OPTIMIZERS[method](m, lr=0.1) for m in (net, eager)]
    graphs = []
    for step in range(4):
        opts[0].step(lambda: losses_of(compiled, x, y))
        opts[1].step(lambda: losses_of(eager, x, y))
        if step == 0:
            assert_stats_of_one_plain_forward(net, initial, x)
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[1] == graphs[-1], f"compiled again after the first steps: {graphs}"
    assert graphs[-1] <= 3  # grad on, the hook registered, SAMO's no-grad probes
    assert_bitwise(weights(net), weights(eager))
    assert_bitwise(list(net.buffers()), list(eager.buffers()))


# ------------------------------------------------------------------------ closures
@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_a_closure_that_zeroes_the_gradients_trains_as_one_that_does_not(method):
    x, y = data()
    torch.manual_seed(0)
    plain = Net()
    net = copy.deepcopy(plain)
    opt, ref = OPTIMIZERS[method](net, lr=0.1), OPTIMIZERS[method](plain, lr=0.1)

    def zeroing():
        opt.zero_grad()
        net.zero_grad(set_to_none=False)  # would zero the step's buffers in place
        return losses_of(net, x, y)

    for _ in range(2):
        opt.step(zeroing)
        ref.step(lambda: losses_of(plain, x, y))
    assert_bitwise(weights(net), weights(plain))


@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_a_closure_that_runs_backward_is_refused_before_anything_changes(method):
    x, y = data()
    torch.manual_seed(0)
    net = Net(batchnorm=False)
    opt = OPTIMIZERS[method](net, base_optimizer=torch.optim.Adam, lr=0.1)
    opt.step(lambda: losses_of(net, x, y))

    def backward_itself():
        opt.zero_grad()
        losses = losses_of(net, x, y)
        sum(losses).backward()
        return losses

    before, state = weights(net), copy.deepcopy(opt.state_dict())
    with pytest.raises(RuntimeError, match=r"called backward\(\)"):
        opt.step(backward_itself)
    assert_bitwise(weights(net), before)
    assert str(opt.state_dict()) == str(state)
    opt.step(lambda: losses_of(net, x, y))  # and the optimizer still works
    assert not torch.equal(net.stem.weight, before[0])


# ------------------------------------------------------------------------ replaced parameters
@pytest.mark.parametrize("method", list(OPTIMIZERS))
def test_a_model_loaded_with_assign_after_building_is_refused(method):
    x, y = data()
    torch.manual_seed(0)
    net = Net(batchnorm=False)
    opt = OPTIMIZERS[method](net, lr=0.1)
    held = [p for g in opt.param_groups for p in g["params"]]
    held_before = [p.detach().clone() for p in held]
    net.load_state_dict(Net(batchnorm=False).state_dict(), assign=True)  # new Parameter objects
    before = weights(net)
    with pytest.raises(RuntimeError, match=r"assign=True"):
        opt.step(lambda: losses_of(net, x, y))
    assert_bitwise(weights(net), before)
    assert_bitwise([p.detach() for p in held], held_before)


def test_a_replaced_head_is_named_and_a_resume_checks_again():
    x, y = data()
    torch.manual_seed(0)
    net = Net(batchnorm=False)
    opt = OPTIMIZERS["fmtl"](net, lr=0.1)
    opt.step(lambda: losses_of(net, x, y))
    saved = copy.deepcopy(opt.state_dict())
    net.heads[1] = nn.Linear(5, 1)
    opt.step(lambda: losses_of(net, x, y))  # checked on the first step only ...
    opt.load_state_dict(saved)  # ... and again after a resume
    with pytest.raises(RuntimeError, match=r"no parameter of task_params\[1\] received"):
        opt.step(lambda: losses_of(net, x, y))
