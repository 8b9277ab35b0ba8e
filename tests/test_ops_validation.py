"""Bad input to an op raises a clear ``TypeError`` / ``ValueError`` before any kernel runs and
before anything is written, on every backend (docs/ARCHITECTURE.md §3.1). Segment offsets out of
range, negative or decreasing (which the C++ kernels would read and write out of bounds with),
overlapping outputs, wrong sizes, dtypes and devices, seeds and stream offsets outside 64 bits,
nonsensical QP budgets."""

from __future__ import annotations

import pytest
import torch
from conftest import HAS_CUDA

from mtlsam_fast import ops

P, K = 10, 3
BACKENDS = ["auto", *ops.available_backends("cpu")]


def _inputs():
    gen = torch.Generator().manual_seed(0)
    return {
        "G": torch.randn(K, P, generator=gen),
        "theta": torch.randn(P, generator=gen),
        "backup": torch.randn(P, generator=gen),
        "d": torch.randn(P, generator=gen),
        "out": torch.randn(P, generator=gen),
        "w": torch.rand(K, generator=gen),
        "offsets": torch.tensor([0, 4, P]),
        "scale": torch.tensor([0.1, 0.2]),
        "gram": torch.eye(K),
    }


def _perturb(x, backend, **kw):
    args = {"direction": x["d"], "scale": x["scale"], **kw}
    offsets = args.pop("offsets", x["offsets"])
    theta = args.pop("theta", x["theta"])
    return ops.perturb(theta, x["backup"], offsets, backend=backend, **args)


#: (category, case, call(inputs, backend), exception, message pattern)
CASES = [
    # segment offsets: bounds and order (the C++ kernels index with them)
    (
        "offsets",
        "last > P",
        lambda x, b: _perturb(x, b, offsets=torch.tensor([0, 4, 11])),
        ValueError,
        "from 0 to P = 10",
    ),
    (
        "offsets",
        "last < P",
        lambda x, b: _perturb(x, b, offsets=torch.tensor([0, 4, 9])),
        ValueError,
        "from 0 to P",
    ),
    (
        "offsets",
        "first != 0",
        lambda x, b: _perturb(x, b, offsets=torch.tensor([1, 4, 10])),
        ValueError,
        "from 0 to P",
    ),
    (
        "offsets",
        "negative",
        lambda x, b: _perturb(x, b, offsets=torch.tensor([0, -3, 10])),
        ValueError,
        "non-decreasing",
    ),
    (
        "offsets",
        "decreasing",
        lambda x, b: ops.segment_norms(x["theta"], torch.tensor([0, 8, 4, 10]), backend=b),
        ValueError,
        r"offsets\[1\] = 8 > offsets\[2\] = 4",
    ),
    (
        "offsets",
        "beyond int32",
        lambda x, b: ops.segment_norms(x["theta"], torch.tensor([0, 2**40, 10]), backend=b),
        ValueError,
        "non-decreasing",
    ),
    (
        "offsets",
        "near int64 max",
        lambda x, b: ops.noise_stats(0, 0, x["theta"], torch.tensor([0, 2**63 - 1]), backend=b),
        ValueError,
        "from 0 to P",
    ),
    (
        "offsets",
        "int32",
        lambda x, b: _perturb(x, b, offsets=torch.tensor([0, 4, 10], dtype=torch.int32)),
        TypeError,
        "int64",
    ),
    (
        "offsets",
        "2-D",
        lambda x, b: _perturb(x, b, offsets=torch.tensor([[0, 4, 10]])),
        TypeError,
        "1-D int64",
    ),
    (
        "offsets",
        "one boundary",
        lambda x, b: ops.segment_norms(x["theta"], torch.tensor([0]), backend=b),
        ValueError,
        "two boundaries",
    ),
    (
        "offsets",
        "float",
        lambda x, b: ops.segment_norms(x["theta"], torch.tensor([0.0, 10.0]), backend=b),
        TypeError,
        "int64",
    ),
    # shapes, strides, sizes, dtypes, devices
    (
        "layout",
        "theta overlaps itself",
        lambda x, b: _perturb(x, b, theta=torch.zeros(1).expand(P)),
        ValueError,
        "overlap",
    ),
    (
        "layout",
        "out overlaps itself",
        lambda x, b: ops.combine(x["w"], x["G"], out=torch.zeros(1).expand(P), backend=b),
        ValueError,
        "overlap",
    ),
    (
        "layout",
        "A rows overlap",
        lambda x, b: ops.diff_gram(torch.zeros(20).as_strided((K, P), (2, 1)), x["G"], backend=b),
        ValueError,
        "overlap",
    ),
    (
        "layout",
        "mgda out overlaps",
        lambda x, b: ops.min_norm_aggregate(x["G"], torch.zeros(1).expand(P), backend=b),
        ValueError,
        "overlap",
    ),
    (
        "layout",
        "scale of S + 1",
        lambda x, b: _perturb(x, b, scale=torch.ones(3)),
        ValueError,
        r"one per segment \(S = 2\)",
    ),
    (
        "layout",
        "noise_scale 2-D",
        lambda x, b: ops.perturb(
            x["theta"], x["backup"], x["offsets"], noise_scale=torch.ones(2, 1), backend=b
        ),
        ValueError,
        "one per segment",
    ),
    (
        "layout",
        "scale int",
        lambda x, b: _perturb(x, b, scale=torch.tensor([1, 2])),
        TypeError,
        "floating-point",
    ),
    (
        "layout",
        "scale a float",
        lambda x, b: _perturb(x, b, scale=0.5),
        TypeError,
        "must be a tensor",
    ),
    (
        "layout",
        "weights int",
        lambda x, b: ops.combine(torch.ones(K, dtype=torch.int64), x["G"], backend=b),
        TypeError,
        "floating-point",
    ),
    (
        "layout",
        "weights of K + 1",
        lambda x, b: ops.combine(torch.ones(K + 1), x["G"], backend=b),
        ValueError,
        "K=3",
    ),
    (
        "layout",
        "out of P + 1",
        lambda x, b: ops.combine(x["w"], x["G"], out=torch.zeros(P + 1), backend=b),
        ValueError,
        r"out must have shape \(10,\)",
    ),
    (
        "layout",
        "out int",
        lambda x, b: ops.combine(x["w"], x["G"], out=torch.zeros(P, dtype=torch.int32), backend=b),
        TypeError,
        "unsupported dtype",
    ),
    (
        "layout",
        "combine dtype int",
        lambda x, b: ops.combine(x["w"], x["G"], dtype=torch.int32, backend=b),
        TypeError,
        "floating-point dtype",
    ),
    (
        "layout",
        "direction of P - 1",
        lambda x, b: _perturb(x, b, direction=torch.zeros(P - 1)),
        ValueError,
        "direction shape",
    ),
    (
        "layout",
        "weight of P + 1",
        lambda x, b: ops.segment_norms(
            x["theta"], x["offsets"], weight=torch.ones(P + 1), backend=b
        ),
        ValueError,
        "weight has 11",
    ),
    (
        "layout",
        "ref of P - 1",
        lambda x, b: ops.perturb_noise_stats(
            x["theta"], x["backup"], x["offsets"], x["scale"], torch.zeros(P - 1), backend=b
        ),
        ValueError,
        "ref shape",
    ),
    ("layout", "G 3-D", lambda x, b: ops.gram(x["G"][None], backend=b), ValueError, "2 dimensions"),
    (
        "layout",
        "restore across devices",
        lambda x, b: ops.restore(x["theta"], torch.zeros(P, device="meta")),
        ValueError,
        "different devices",
    ),
    (
        "layout",
        "restore int",
        lambda x, b: ops.restore(x["theta"].int(), x["backup"].int()),
        TypeError,
        "unsupported dtype",
    ),
    (
        "layout",
        "offsets on another device",
        lambda x, b: _perturb(x, b, offsets=torch.tensor([0, 4, 10], device="meta")),
        ValueError,
        "different devices",
    ),
    # seeds and stream offsets: 64-bit counters
    (
        "counters",
        "negative seed",
        lambda x, b: ops.gaussian_noise(-1, 0, 4, backend=b),
        ValueError,
        r"seed must lie in \[0, 2\*\*64\)",
    ),
    (
        "counters",
        "seed 2**64",
        lambda x, b: ops.gaussian_noise(2**64, 0, 4, backend=b),
        ValueError,
        "seed must lie",
    ),
    (
        "counters",
        "negative offset",
        lambda x, b: ops.noise_stats(0, -1, x["theta"], x["offsets"], backend=b),
        ValueError,
        "offset must lie",
    ),
    (
        "counters",
        "negative noise_offset",
        lambda x, b: _perturb(x, b, noise_scale=x["scale"], noise_offset=-5),
        ValueError,
        "noise_offset must lie",
    ),
    (
        "counters",
        "stream wraps 2**64",
        lambda x, b: _perturb(x, b, noise_scale=x["scale"], noise_offset=2**64 - 5),
        ValueError,
        "must not wrap",
    ),
    (
        "counters",
        "negative numel",
        lambda x, b: ops.gaussian_noise(0, 0, -1, backend=b),
        ValueError,
        "non-negative",
    ),
    (
        "counters",
        "float seed",
        lambda x, b: ops.gaussian_noise(1.5, 0, 4, backend=b),
        TypeError,
        "seed must be an int",
    ),
    (
        "counters",
        "bool seed",
        lambda x, b: _perturb(x, b, noise_scale=x["scale"], seed=True),
        TypeError,
        "got bool",
    ),
    (
        "counters",
        "tensor offset",
        lambda x, b: ops.gaussian_noise(0, torch.tensor(0.5), 4, backend=b),
        TypeError,
        "offset must be an int",
    ),
    # QP budget and inputs
    (
        "qp",
        "max_iter 0",
        lambda x, b: ops.solve_qp(x["gram"], max_iter=0, backend=b),
        ValueError,
        "max_iter must lie",
    ),
    (
        "qp",
        "max_iter negative",
        lambda x, b: ops.solve_qp(x["gram"], max_iter=-5, backend=b),
        ValueError,
        "max_iter must lie",
    ),
    (
        "qp",
        "max_iter 2**31",
        lambda x, b: ops.solve_qp(x["gram"], max_iter=2**31, backend=b),
        ValueError,
        "max_iter must lie",
    ),
    (
        "qp",
        "max_iter float",
        lambda x, b: ops.solve_qp(x["gram"], max_iter=10.5, backend=b),
        TypeError,
        "max_iter must be an int",
    ),
    (
        "qp",
        "tol NaN",
        lambda x, b: ops.solve_qp(x["gram"], tol=float("nan"), backend=b),
        ValueError,
        "tol must be a finite",
    ),
    (
        "qp",
        "tol negative",
        lambda x, b: ops.solve_qp(x["gram"], tol=-1e-9, backend=b),
        ValueError,
        "tol must be a finite",
    ),
    (
        "qp",
        "tol inf",
        lambda x, b: ops.solve_qp(x["gram"], tol=float("inf"), backend=b),
        ValueError,
        "tol must be a finite",
    ),
    (
        "qp",
        "tol 0",
        lambda x, b: ops.solve_qp(x["gram"], tol=0.0, backend=b),
        ValueError,
        "tol must be a finite",
    ),
    (
        "qp",
        "tol a string",
        lambda x, b: ops.solve_qp(x["gram"], tol="1e-9", backend=b),
        TypeError,
        "tol must be a number",
    ),
    (
        "qp",
        "mgda max_iter 0",
        lambda x, b: ops.min_norm_aggregate(x["G"], x["out"], max_iter=0, backend=b),
        ValueError,
        "max_iter must lie",
    ),
    (
        "qp",
        "q int",
        lambda x, b: ops.solve_qp(x["gram"], torch.zeros(K, dtype=torch.int64), backend=b),
        TypeError,
        "q must be a floating-point",
    ),
    (
        "qp",
        "norm_coef a float",
        lambda x, b: ops.solve_qp(x["gram"], norm_coef=0.5, backend=b),
        TypeError,
        "norm_coef must be a tensor",
    ),
    # flags
    (
        "flags",
        "adaptive a string",
        lambda x, b: _perturb(x, b, adaptive="yes"),
        TypeError,
        "adaptive must be a bool",
    ),
    (
        "flags",
        "subtract an int",
        lambda x, b: ops.combine(x["w"], x["G"], out=x["out"], subtract=1, backend=b),
        TypeError,
        "subtract must be a bool",
    ),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    ("category", "case", "call", "error", "match"), CASES, ids=[f"{c}-{n}" for c, n, *_ in CASES]
)
def test_bad_input_raises_before_anything_changes(backend, category, case, call, error, match):
    x = _inputs()
    before = {k: v.clone() for k, v in x.items()}
    with pytest.raises(error, match=match):
        call(x, backend)
    for k, v in x.items():
        assert torch.equal(v, before[k]), f"{k} changed before the error"


def test_the_boundary_values_are_accepted():
    """The largest valid stream, a seed of 2**64 - 1, empty segments, max_iter = 1."""
    z = ops.gaussian_noise(2**64 - 1, 2**64 - 4, 4, backend="torch")
    assert torch.isfinite(z).all() and z.shape == (4,)
    x = _inputs()
    theta = x["theta"]
    ops.perturb(
        theta,
        x["backup"],
        torch.tensor([0, 0, P, P]),
        noise_scale=torch.tensor(0.1),
        seed=2**64 - 1,
        noise_offset=2**64 - P,
    )
    assert torch.isfinite(theta).all()
    assert ops.solve_qp(x["gram"], max_iter=1).shape == (K,)


def test_offsets_are_read_once_per_tensor_version(monkeypatch):
    """The boundaries are checked once per tensor and in-place version: an optimizer's cached
    layout costs one host read, and writing into the tensor afterwards is caught."""
    from mtlsam_fast.ops import _validation

    reads = []
    real = _validation.check_offset_values

    def counting(offsets, n):
        reads.append(n)
        return real(offsets, n)

    monkeypatch.setattr(_validation, "check_offset_values", counting)
    x = _inputs()
    offsets = torch.tensor([0, 4, P])
    for _ in range(5):
        ops.segment_norms(x["theta"], offsets)
        ops.perturb(x["theta"], x["backup"], offsets, x["d"], x["scale"])
    assert reads == [P]
    offsets[1] = 12  # an in-place write: the next call checks again
    with pytest.raises(ValueError, match="non-decreasing"):
        ops.segment_norms(x["theta"], offsets)
    assert reads == [P, P]
    other = x["G"]  # the same tensor for another P is checked for that P
    with pytest.raises(ValueError, match="from 0 to P = 3"):
        ops.segment_norms(other.T.contiguous(), torch.tensor([0, 4, P]))


@pytest.mark.gpu
def test_cuda_offsets_are_checked_once_without_a_sync_afterwards():
    x = torch.randn(P, device="cuda")
    offsets = torch.tensor([0, 4, P], device="cuda")
    ops.segment_norms(x, offsets)  # the one host read
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        ops.segment_norms(x, offsets)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with pytest.raises(ValueError, match="from 0 to P"):
        ops.segment_norms(x, torch.tensor([0, 4, P + 1], device="cuda"))


def test_seeds_are_not_silently_wrapped():
    """2**64 + s used to give the stream of s; a negative seed that of 2**64 + s."""
    with pytest.raises(ValueError):
        ops.gaussian_noise(2**64 + 5, 0, 4)
    assert not torch.equal(ops.gaussian_noise(5, 0, 4), ops.gaussian_noise(6, 0, 4))


if HAS_CUDA:  # the device checks above on CUDA tensors too

    @pytest.mark.gpu
    def test_bad_offsets_on_cuda_raise_on_every_backend():
        for backend in ops.available_backends("cuda"):
            theta = torch.zeros(P, device="cuda")
            with pytest.raises(ValueError, match="non-decreasing"):
                ops.perturb(
                    theta,
                    theta.clone(),
                    torch.tensor([0, 8, 4, P], device="cuda"),
                    noise_scale=torch.tensor(1.0, device="cuda"),
                    backend=backend,
                )


def test_an_optimizer_layout_is_never_read_back():
    """``FlatLayout.offsets`` checks its boundaries on the host when it builds the tensor: the ops
    never read it from the device (on CUDA: no synchronization, even on the first step)."""
    from mtlsam_fast.buffers import FlatLayout
    from mtlsam_fast.ops import _validation

    layout = FlatLayout([torch.zeros(3, 2), torch.zeros(4)])
    offsets = layout.offsets()
    reads = []
    real = _validation.check_offset_values
    _validation.check_offset_values = lambda o, n: reads.append(n) or real(o, n)
    try:
        ops.segment_norms(torch.randn(10), offsets)
    finally:
        _validation.check_offset_values = real
    assert reads == []
