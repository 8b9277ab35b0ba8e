"""Flat layout, flat parameters and zero-copy per-task gradient capture."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mtlsam_fast import FlatLayout, GradBuffer, flatten_parameters


class TwoTaskNet(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 5)).to(dtype)
        # a non-contiguous shared parameter (transposed storage)
        self.extra = nn.Parameter(torch.randn(7, 5, dtype=dtype).t())
        self.unused = nn.Parameter(torch.randn(3, dtype=dtype))
        self.heads = nn.ModuleList([nn.Linear(5, 1).to(dtype), nn.Linear(5, 2).to(dtype)])

    def shared(self):
        return [*self.trunk.parameters(), self.extra, self.unused]

    def losses(self, x):
        h = self.trunk(x) + 0.1 * (x[:, :5] @ self.extra)[:, :5]  # extra: [5, 7], non-contiguous
        return [self.heads[0](h).pow(2).mean(), self.heads[1](h).sin().sum()]


def reference_rows(model, x):
    """Each task's gradient, laid out like the buffer: every parameter in its memory order
    (``extra`` is dense transposed, so its segment holds its elements column by column)."""
    layout = FlatLayout(model.shared())
    rows = []
    for loss in model.losses(x):
        grads = torch.autograd.grad(loss, model.shared(), allow_unused=True, retain_graph=True)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, model.shared())]
        rows.append(layout.gather(grads))
    return torch.stack(rows)


def test_layout_segments_and_offsets():
    params = [torch.zeros(2, 3), torch.zeros(5), torch.zeros(1, 1, 4)]
    layout = FlatLayout(params)
    assert layout.numel == 15 and len(layout) == 3
    assert [s.offset for s in layout.segments] == [0, 6, 11]
    assert layout.offsets().tolist() == [0, 6, 11, 15]
    assert layout.offsets().dtype == torch.int64
    flat = torch.arange(15.0)
    views = layout.views(flat)
    assert [v.shape for v in views] == [p.shape for p in params]
    assert views[1].data_ptr() == flat[6:].data_ptr()
    assert torch.equal(layout.gather(views), flat)


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_capture_rows_equal_autograd_grad_without_copies():
    torch.manual_seed(0)
    model = TwoTaskNet()
    x = torch.randn(4, 6)
    expected = reference_rows(model, x)
    buf = GradBuffer(model.shared(), num_tasks=2)
    assert buf.copied == []
    storage = (buf.G.data_ptr(), buf.G.data_ptr() + buf.G.numel() * buf.G.element_size())
    for k, loss in enumerate(model.losses(x)):
        with buf.capture(k) as row:
            loss.backward(retain_graph=True)
            for p, seg in zip(model.shared(), buf.layout.segments):
                # the grad autograd accumulated into IS the buffer row: no copy, no cat
                assert p.grad.data_ptr() == row[seg.offset :].data_ptr()
                assert storage[0] <= p.grad.data_ptr() < storage[1]
    torch.testing.assert_close(buf.G, expected, rtol=1e-6, atol=1e-6)
    assert torch.equal(buf.G[:, -3:], torch.zeros(2, 3))  # unused parameter: zero gradient


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_capture_restores_previous_grads_and_zeroes_rows():
    model = TwoTaskNet()
    params = model.shared()
    marker = [torch.full_like(p, 7.0) for p in params]
    for p, m in zip(params, marker):
        p.grad = m
    buf = GradBuffer(params, 2)
    buf.G.fill_(5.0)
    x = torch.randn(3, 6)
    with buf.capture(1):
        model.losses(x)[1].backward(retain_graph=True)
    assert all(p.grad is m for p, m in zip(params, marker))
    assert torch.equal(buf.G[0], torch.full_like(buf.G[0], 5.0))  # other rows untouched
    torch.testing.assert_close(buf.G[1], reference_rows(model, x)[1])


@pytest.mark.filterwarnings("ignore:grad and param do not obey the gradient layout contract")
def test_capture_accumulate_adds_into_the_row():
    model = TwoTaskNet()
    x = torch.randn(3, 6)
    buf = GradBuffer(model.shared(), 1)
    with buf.capture(0):
        model.losses(x)[0].backward()
    with buf.capture(0, accumulate=True):
        model.losses(x)[0].backward()
    torch.testing.assert_close(buf.G[0], 2 * reference_rows(model, x)[0])


def test_mixed_dtypes_are_captured_by_copy():
    torch.manual_seed(1)
    a = nn.Parameter(torch.randn(4, dtype=torch.float64))
    b = nn.Parameter(torch.randn(3, dtype=torch.float32))
    buf = GradBuffer([a, b], 2)
    assert buf.G.dtype == torch.float32 and buf.copied == [0]
    losses = [(a.float().sum() * b).pow(2).sum(), (a.float() ** 3).sum() + b.sum()]
    for k, loss in enumerate(losses):
        with buf.capture(k):
            loss.backward(retain_graph=True)
    for k, loss in enumerate(losses):
        ga, gb = torch.autograd.grad(loss, [a, b])
        torch.testing.assert_close(buf.G[k], torch.cat([ga.float(), gb]))


def test_buffer_dtype_bf16_halves_memory():
    p = nn.Parameter(torch.randn(10, dtype=torch.bfloat16))
    buf = GradBuffer([p], 3)
    assert buf.G.dtype == torch.bfloat16 and buf.G.shape == (3, 10)
    with buf.capture(2):
        (p.float() ** 2).sum().backward()
    torch.testing.assert_close(buf.G[2], (2 * p).detach())


def test_flatten_parameters_keeps_values_and_identity():
    model = TwoTaskNet()
    params = model.shared()
    before = [p.detach().clone() for p in params]
    ids = [id(p) for p in params]
    flat = flatten_parameters(params)
    assert flat.numel() == sum(p.numel() for p in params)
    assert [id(p) for p in params] == ids
    for p, b in zip(params, before):
        assert torch.equal(p, b)
    flat.add_(1.0)  # parameters are views of the flat buffer
    for p, b in zip(params, before):
        assert torch.equal(p.detach(), b + 1.0)
    opt = torch.optim.SGD(params, lr=0.1)  # still ordinary parameters
    model.losses(torch.randn(2, 6))[0].backward()
    opt.step()
    assert flat.data_ptr() == params[0].data_ptr()


@pytest.mark.parametrize(
    "params, error, match",
    [
        ([], ValueError, "empty"),
        (["not a tensor"], TypeError, "expected a torch.Tensor"),
        ([torch.zeros(2, dtype=torch.int32)], TypeError, "dtype"),
    ],
)
def test_bad_parameter_lists(params, error, match):
    with pytest.raises(error, match=match):
        GradBuffer(params, 2)


def test_duplicate_and_mixed_device_parameters_raise():
    p = nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="more than once"):
        FlatLayout([p, p])
    with pytest.raises(ValueError, match="different devices"):
        FlatLayout([p, nn.Parameter(torch.zeros(3, device="meta"))])
    with pytest.raises(TypeError, match="several dtypes"):
        flatten_parameters([p, nn.Parameter(torch.zeros(3, dtype=torch.float64))])
    with pytest.raises(ValueError, match="num_tasks"):
        GradBuffer([p], 0)
    buf = GradBuffer([p], 2)
    with pytest.raises(IndexError, match="out of range"), buf.capture(2):
        pass


def test_capture_on_device(device):
    lin = nn.Linear(4, 3).to(device)
    buf = GradBuffer(lin.parameters(), 2)
    x = torch.randn(5, 4, device=device)
    losses = [lin(x).sum(), lin(x).pow(2).sum()]
    for k, loss in enumerate(losses):
        with buf.capture(k):
            loss.backward(retain_graph=True)
    for k, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(lin.parameters()))
        torch.testing.assert_close(buf.G[k], torch.cat([g.reshape(-1) for g in grads]))
