"""The op contract, once for every backend: each backend of ``ops.available_backends()`` x dtype
against fp64 brute force (docs/ARCHITECTURE.md §3), and which backend ran (``ops.dispatch_log``).

Each case runs on every backend this machine has: ``torch`` (the reference; on every device),
``cpu`` (C++), ``cuda`` and ``triton`` (CUDA tensors; Triton runs CPU tensors interpreted when
there is no GPU, ``TRITON_INTERPRET=1`` from conftest, so the sizes stay small). The bounds are
stated against the exact (fp64) result of the same input values, the same for every backend, and
no looser than the per-backend copies of these tests that this file replaced. A case in which a
compiled backend's kernels take the input must not be handed to the reference: every case
checks the dispatch log.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from conftest import DEVICES, HAS_CUDA

from mtlsam_fast import ops

KERNEL_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPES = [*KERNEL_DTYPES, torch.float64]
KS = [1, 2, 3, 8, 17, 64]
#: relative size of one unit in the last place of each dtype (a 16-bit store may truncate)
ULP = {
    torch.float32: 2.0**-23,
    torch.bfloat16: 2.0**-7,
    torch.float16: 2.0**-10,
    torch.float64: 2.0**-52,
}
#: relative error of accumulating in the op's accumulation dtype (fp32, fp64 for fp64 input)
ACC = {torch.float64: 1e-12}
ACC_DEFAULT = 2e-6


def _targets() -> list[tuple[str, str]]:
    out = []
    for name in ops.available_backends():
        if name == "torch":
            out += [("torch", d) for d in DEVICES]
        elif name == "triton":
            out.append(("triton", "cuda" if HAS_CUDA else "cpu"))
        else:
            out.append((name, name))  # the cpu backend on CPU tensors, cuda on CUDA tensors
    return out


TARGETS = _targets()


@pytest.fixture(params=TARGETS, ids=[f"{b}-{d}" for b, d in TARGETS])
def target(request) -> tuple[str, torch.device]:
    backend, device = request.param
    return backend, torch.device(device)


def interpreted(backend: str, device: torch.device) -> bool:
    """Triton on CPU tensors: programs run serially in numpy (small sizes only)."""
    return backend == "triton" and device.type == "cpu"


def chunked(backend: str, dtype: torch.dtype) -> bool:
    """The C++ kernels split P into 32768-element chunks: their cases cross chunk borders (fp64
    goes to the reference, whose Philox stream costs seconds at that size; Triton's blocks are
    small)."""
    return backend in ("cpu", "cuda") and dtype != torch.float64


def qp_batch(backend: str, device: torch.device, K: int) -> int:
    """Problems per QP case: all six families, fewer for interpreted Triton at larger K (serial fp64
    sweeps in numpy: K = 64 takes seconds per problem)."""
    if not interpreted(backend, device) or K < 8:
        return 6
    return 1 if K == 64 else 3


def acc(dtype: torch.dtype) -> float:
    return ACC.get(dtype, ACC_DEFAULT)


def perturb_bound(dtype: torch.dtype, size: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """A perturbation is a few fp32 (fp64) operations per element, no long sum: two units of the
    compute precision relative to the terms' magnitude, then the store's rounding."""
    compute = ULP[torch.float64 if dtype == torch.float64 else torch.float32]
    return 2 * compute * size + ULP[dtype] * exact.abs()


def view(K: int, P: int, dtype: torch.dtype, device, gen=None) -> torch.Tensor:
    """A [K, P] view with a storage offset and a row stride != P (exercises views)."""
    base = torch.randn(K + 1, P + 7, dtype=torch.float64, generator=gen).to(dtype).to(device)
    return base[1:, 5 : 5 + P]


def offsets_of(sizes, device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(sizes)], dtype=torch.int64, device=device)


def random_offsets(P: int, S: int, device, gen=None) -> torch.Tensor:
    cuts = torch.sort(torch.randint(0, P + 1, (S - 1,), generator=gen)).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([P])]).to(device)


def assert_within(actual: torch.Tensor, exact: torch.Tensor, bound, what: str) -> None:
    """``|actual - exact| <= bound`` elementwise (``exact`` in fp64; ``bound`` a tensor or a
    number); NaN anywhere fails."""
    err = (actual.double() - exact).abs()
    bound = torch.as_tensor(bound, dtype=torch.float64, device=err.device)
    ok = err <= bound
    if not bool(ok.all()):
        i = int((~ok).flatten().nonzero()[0])
        b = bound.expand_as(err).flatten()[i]
        raise AssertionError(
            f"{what}: error {float(err.flatten()[i]):.3e} > bound {float(b):.3e} at flat index {i}"
            f" (actual {float(actual.flatten()[i])!r}, exact {float(exact.flatten()[i])!r})"
        )


def assert_ran(log, backend: str, *, expect_fallback: bool = False) -> None:
    """Every dispatch in ``log`` ran on ``backend`` (or, ``expect_fallback``, some went to the
    reference)."""
    assert log, "no dispatch recorded"
    ran = {d.backend for d in log}
    if expect_fallback:
        assert "torch" in ran and all(d.fallback for d in log if d.backend != d.requested), log
    else:
        assert ran == {backend}, log


def kernel_takes(backend: str, dtype: torch.dtype, K: int = 1) -> bool:
    """Whether a compiled backend's kernels take this input (else they hand it to the reference:
    fp64 everywhere, K > 64 on the GPU backends)."""
    return backend == "torch" or (dtype != torch.float64 and K <= 64)


# --- Gram ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [1, 37, 1001])
def test_gram(target, K, P, dtype):
    backend, dev = target
    if interpreted(backend, dev) and P > 101:
        P = 101
    G = view(K, P, dtype, dev)
    with ops.dispatch_log() as log:
        out = ops.gram(G, backend=backend)
    assert_ran(log, backend, expect_fallback=not kernel_takes(backend, dtype, K))
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (K, K) and torch.equal(out, out.T)
    exact = G.double() @ G.double().T
    assert_within(out, exact, acc(dtype) * float(exact.abs().max()), f"gram K={K} P={P}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gram_bound_tells_a_16_bit_gram_apart(dtype):
    """The 16-bit bound is the accumulation dtype's, not the inputs': a Gram rounded to or
    accumulated in the 16-bit dtype fails it (so the conformance cases above would catch one)."""
    G = view(8, 1000, dtype, "cpu")
    exact = G.double() @ G.double().T
    bound = acc(dtype) * float(exact.abs().max())
    with pytest.raises(AssertionError):
        assert_within((G @ G.T).float(), exact, bound, "16-bit Gram")


def test_gram_of_a_column_strided_view(target):
    """Rows without a unit column stride: Triton reads them, the C++ kernels hand them to the
    reference; the same bound either way, and the same bits on a second call."""
    backend, dev = target
    G = torch.randn(211, 5, device=dev).T  # column stride 5
    with ops.dispatch_log() as log:
        out = ops.gram(G, backend=backend)
    assert_ran(log, backend, expect_fallback=backend in ("cpu", "cuda"))
    exact = G.double() @ G.double().T
    assert_within(out, exact, ACC_DEFAULT * float(exact.abs().max()), "strided gram")
    assert torch.equal(out, ops.gram(G, backend=backend))


@pytest.mark.parametrize("K", [1, 3, 17, 64])
@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_gram_updates_a_in_place(target, K, dtype):
    backend, dev = target
    A, B = view(K, 123, dtype, dev), view(K, 123, dtype, dev)
    expected_a = A - B  # rounded like torch.sub_
    ptr = A.data_ptr()
    with ops.dispatch_log() as log:
        out = ops.diff_gram(A, B, backend=backend)
    assert_ran(log, backend, expect_fallback=not kernel_takes(backend, dtype, K))
    assert A.data_ptr() == ptr
    if interpreted(backend, dev) and dtype == torch.bfloat16:
        # the interpreter's bf16 store may truncate: 1 ulp
        assert_within(A, expected_a.double(), ULP[dtype] * expected_a.double().abs(), "A - B")
    else:
        assert torch.equal(A, expected_a)
    exact = A.double() @ A.double().T
    assert_within(out, exact, acc(dtype) * float(exact.abs().max()), "diff_gram")


# --- segment norms ------------------------------------------------------------------------------


def _exact_norms(x, offsets, weight):
    v = x.double() * (1.0 if weight is None else weight.double())
    bounds = offsets.tolist()
    cols = [(v[..., a:b] ** 2).sum(-1) for a, b in itertools.pairwise(bounds)]
    return torch.stack(cols, -1).sqrt()


NORM_LAYOUTS = {
    "chunk-borders": [7, 0, 40_000, 1, 33_000, 0, 129],  # segments across 32768-element chunks
    "small": [1, 0, 69, 79, 1],  # an empty segment, one-element ones, odd sizes
    "one": [5],
}


@pytest.mark.parametrize("layout", list(NORM_LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [None, 1, 3])
@pytest.mark.parametrize("weight_dtype", [None, "same", torch.float32])
def test_segment_norms(target, layout, dtype, rows, weight_dtype):
    backend, dev = target
    if interpreted(backend, dev) and layout == "chunk-borders":
        pytest.skip("interpreted Triton: the small layouts (the GPU runs this one)")
    offsets = offsets_of(NORM_LAYOUTS[layout], dev)
    P = int(offsets[-1])
    x = view(rows or 1, P, dtype, dev)
    x = x[0] if rows is None else x
    wd = dtype if weight_dtype == "same" else weight_dtype
    weight = None if wd is None else torch.rand(P + 3).to(wd).to(dev)[3:]  # a view
    with ops.dispatch_log() as log:
        out = ops.segment_norms(x, offsets, weight=weight, backend=backend)
    fp64 = dtype == torch.float64 or wd == torch.float64
    assert_ran(log, backend, expect_fallback=backend != "torch" and fp64)
    exact = _exact_norms(x, offsets, weight)
    assert out.shape == exact.shape
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    bound = 2.5 * acc(dtype) * exact + (1e-6 if dtype != torch.float64 else 1e-12)
    assert_within(out, exact, bound, f"segment_norms {layout}")


@pytest.mark.parametrize("P,S", [(5, 7), (64, 1), (300, 9), (257, 40)])
def test_segmented_ops_on_random_layouts(target, P, S):
    """Blocks spanning many segments, empty segments, segments spanning many blocks."""
    backend, dev = target
    gen = torch.Generator().manual_seed(P * S)
    offsets = random_offsets(P, S, dev, gen)
    x = torch.randn(2, P, generator=gen).to(dev)
    exact = _exact_norms(x, offsets, None)
    got = ops.segment_norms(x, offsets, backend=backend)
    assert_within(got, exact, 2.5 * ACC_DEFAULT * exact + 1e-6, f"norms P={P} S={S}")
    scale = torch.rand(S, generator=gen).to(dev)
    theta = torch.empty(P, device=dev)
    ops.perturb(theta, x[0], offsets, x[1], scale, noise_scale=scale, seed=2, backend=backend)
    z = ops.gaussian_noise(2, 0, P, device=dev, backend=backend).double()
    s = scale.double().repeat_interleave(offsets.diff())
    exact_theta = x[0].double() + s * x[1].double() + s * z
    terms = x[0].double().abs() + (s * x[1].double()).abs() + (s * z).abs()
    bound = perturb_bound(torch.float32, terms, exact_theta)
    assert_within(theta, exact_theta, bound, f"perturb P={P} S={S}")


# --- combine ------------------------------------------------------------------------------------


def _combine_bound(w, G, w2, H, exact, out_dtype, compute_dtype):
    """fp32 (fp64) accumulation of the weighted sum, then one rounding to the output dtype."""
    size = w.double().abs() @ G.double().abs()
    if H is not None:
        size = size + w2.double().abs() @ H.double().abs()
    return acc(compute_dtype) * size + ULP[out_dtype] * exact.abs()


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine(target, K, dtype):
    backend, dev = target
    P = 97 if interpreted(backend, dev) else 1003
    G = view(K, P, dtype, dev)
    w = torch.rand(K, device=dev)
    with ops.dispatch_log() as log:
        out = ops.combine(w, G, backend=backend)
    assert_ran(log, backend, expect_fallback=not kernel_takes(backend, dtype))
    assert out.dtype == dtype and out.shape == (P,)
    exact = w.double() @ G.double()
    assert_within(out, exact, _combine_bound(w, G, None, None, exact, dtype, dtype), "combine")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
def test_combine_two_sets_into_a_strided_output(target, dtype, out_dtype):
    backend, dev = target
    P = 130
    G, H = view(3, P, dtype, dev), view(5, P, dtype, dev)
    w, w2 = torch.rand(3, device=dev), torch.rand(5, device=dev, dtype=torch.float64)
    base = torch.zeros(2 * P + 1, dtype=out_dtype, device=dev)
    out = base[1::2]  # a view with an offset and stride 2
    assert ops.combine(w, G, w2, H, out=out, backend=backend) is out
    exact = w.double() @ G.double() + w2 @ H.double()
    assert_within(out, exact, _combine_bound(w, G, w2, H, exact, out_dtype, dtype), "2 sets")
    assert torch.all(base[0::2] == 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_subtract_updates_out(target, dtype):
    backend, dev = target
    K, P = 3, 1000
    G = view(K, P, dtype, dev)
    wdt = torch.float64 if dtype == torch.float64 else torch.float32
    w = torch.rand(K, device=dev, dtype=wdt)
    out0 = torch.randn(P, device=dev).to(dtype)
    out = out0.clone()
    assert ops.combine(w, G, out=out, subtract=True, backend=backend) is out
    exact = out0.double() - w.double() @ G.double()
    size = out0.double().abs() + w.double().abs() @ G.double().abs()
    assert_within(out, exact, acc(dtype) * size + ULP[dtype] * exact.abs(), "subtract")
    with pytest.raises(ValueError, match="subtract needs out"):
        ops.combine(w, G, subtract=True, backend=backend)


# --- perturb / restore / noise ------------------------------------------------------------------


PERTURB_MODES = ["sam", "asam", "noise", "sam+noise", "scalar"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", PERTURB_MODES)
@pytest.mark.parametrize("direction_dtype", ["same", torch.bfloat16])
def test_perturb_and_restore(target, dtype, mode, direction_dtype):
    backend, dev = target
    sizes = [5, 40_000, 0, 17] if chunked(backend, dtype) else [5, 251, 0, 17]
    offsets = offsets_of(sizes, dev)
    P, S = sum(sizes), len(sizes)
    buf = torch.zeros(P + 9, dtype=dtype, device=dev)
    theta = buf[4 : 4 + P]  # a view with a storage offset
    backup = view(1, P, dtype, dev)[0]
    ddt = dtype if direction_dtype == "same" else direction_dtype
    direction = view(1, P, ddt, dev)[0]
    scale = torch.rand(S, device=dev) if mode != "scalar" else torch.tensor(0.3, device=dev)
    kwargs: dict = {}
    if mode in ("sam", "asam", "sam+noise", "scalar"):
        kwargs.update(direction=direction, scale=scale)
    if "noise" in mode:
        kwargs.update(noise_scale=torch.rand(S, device=dev), seed=77, noise_offset=2**32 + 3)
    adaptive = mode == "asam"
    with ops.dispatch_log() as log:
        got = ops.perturb(theta, backup, offsets, adaptive=adaptive, backend=backend, **kwargs)
    assert got is theta
    assert_ran(log, backend, expect_fallback=not kernel_takes(backend, dtype))
    lengths = offsets.diff()
    b = backup.double()
    exact, size = b.clone(), b.abs()
    if "direction" in kwargs:
        step = direction.double() * scale.double().expand(S).repeat_interleave(lengths)
        if adaptive:
            step = step * b * b
        exact, size = exact + step, size + step.abs()
    if "noise_scale" in kwargs:
        ran = log[-1].backend  # the noise of the backend that ran (fp64: the reference's)
        z = ops.gaussian_noise(77, 2**32 + 3, P, device=dev, backend=ran).double()
        noise = z * kwargs["noise_scale"].double().repeat_interleave(lengths)
        exact, size = exact + noise, size + noise.abs()
    bound = perturb_bound(dtype, size, exact)
    assert_within(theta, exact, bound, f"perturb {mode}")
    assert torch.all(buf[:4] == 0) and torch.all(buf[4 + P :] == 0)
    ops.restore(theta, backup)
    assert torch.equal(theta, backup)


def test_perturb_is_recomputed_from_backup(target):
    """Perturbing twice gives the same bits: theta is rebuilt from the backup every time."""
    backend, dev = target
    offsets = torch.tensor([0, 40, 100], device=dev)
    backup = torch.randn(100, device=dev)
    d, s = torch.randn(100, device=dev), torch.tensor(0.3, device=dev)
    t1 = ops.perturb(backup.clone(), backup, offsets, d, s, backend=backend).clone()
    t2 = ops.perturb(t1, backup, offsets, d, s, backend=backend)
    assert torch.equal(t1, t2)


@pytest.mark.parametrize(
    "seed,offset",
    [(0, 0), (123, 2**32 - 50), (2**40 + 3, 17), (2**63 + 5, 2**45), (1, 2**64 - 300)],
)
def test_gaussian_noise_is_the_counter_based_stream(target, seed, offset):
    backend, dev = target
    n = 300
    with ops.dispatch_log() as log:
        z = ops.gaussian_noise(seed, offset, n, device=dev, backend=backend)
    assert_ran(log, backend)
    assert z.dtype == torch.float32 and z.shape == (n,)
    spec = ops.gaussian_noise(seed, offset, n, device=dev, backend="torch")
    torch.testing.assert_close(z, spec, rtol=1e-5, atol=2e-6)  # log / cos: a few ulp
    # counter-based: a slice of the stream is the stream at the shifted offset
    assert torch.equal(
        ops.gaussian_noise(seed, offset + 100, 50, device=dev, backend=backend), z[100:150]
    )
    assert not torch.equal(ops.gaussian_noise(seed + 1, offset, n, device=dev, backend=backend), z)
    # the noise perturb adds is exactly this stream
    theta = torch.empty(n, device=dev)
    ops.perturb(
        theta,
        torch.zeros(n, device=dev),
        torch.tensor([0, n], device=dev),
        noise_scale=torch.tensor(1.0, device=dev),
        seed=seed,
        noise_offset=offset,
        backend=backend,
    )
    assert torch.equal(theta, z)


def test_gaussian_noise_statistics(target):
    backend, dev = target
    n = 1 << 14 if interpreted(backend, dev) else 1 << 18
    many = ops.gaussian_noise(1, 0, n, device=dev, backend=backend)
    tol = 4 / n**0.5  # four standard errors
    assert abs(float(many.mean())) < tol and abs(float(many.std()) - 1) < tol


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["chunk-borders", "small"])
def test_noise_stats(target, dtype, layout):
    backend, dev = target
    sizes = {"chunk-borders": [1000, 0, 35_000, 1], "small": [1, 63, 0, 135, 3]}[layout]
    if not chunked(backend, dtype) and layout == "chunk-borders":
        pytest.skip("the C++ backends' chunk borders")
    offsets = offsets_of(sizes, dev)
    P = sum(sizes)
    ref = view(1, P, dtype, dev)[0]
    with ops.dispatch_log() as log:
        stats = ops.noise_stats(9, 2**33 + 1, ref, offsets, backend=backend)
    assert_ran(log, backend, expect_fallback=not kernel_takes(backend, dtype))
    assert stats.shape == (2, len(sizes))
    z = ops.gaussian_noise(9, 2**33 + 1, P, device=dev, backend=log[-1].backend).double()
    prods = torch.stack([z * z, z * ref.double()])
    exact = torch.stack(
        [prods[:, a:b].sum(-1) for a, b in itertools.pairwise(offsets.tolist())], -1
    )
    size = torch.stack(
        [prods[:, a:b].abs().sum(-1) for a, b in itertools.pairwise(offsets.tolist())], -1
    )
    assert_within(stats, exact, 5 * acc(dtype) * size + 1e-6, "noise_stats")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("per_segment", [False, True])
def test_perturb_noise_stats_is_perturb_then_noise_stats(target, dtype, per_segment):
    backend, dev = target
    P, S = (70_001, 5) if chunked(backend, dtype) else (701, 5)
    offsets = random_offsets(P, S, dev)
    backup = torch.randn(P, device=dev).to(dtype)
    ref = torch.randn(P, device=dev).to(dtype)
    ns = torch.rand(S, device=dev) if per_segment else torch.tensor(0.3, device=dev)
    theta = torch.empty_like(backup)
    off = 2**33 + 1
    with ops.dispatch_log() as log:
        stats = ops.perturb_noise_stats(
            theta, backup, offsets, ns, ref, seed=4, noise_offset=off, backend=backend
        )
    assert_ran(log, backend, expect_fallback=not kernel_takes(backend, dtype))
    expected_theta = ops.perturb(
        torch.empty_like(backup),
        backup,
        offsets,
        noise_scale=ns,
        seed=4,
        noise_offset=off,
        backend=backend,
    )
    assert torch.equal(theta, expected_theta)
    assert torch.equal(stats, ops.noise_stats(4, off, ref, offsets, backend=backend))


# --- QP -----------------------------------------------------------------------------------------


def qp_families(K: int, B: int = 6, seed: int = 0) -> torch.Tensor:
    """fp64 Gram matrices: full rank, badly scaled (1e-12 ... 1e12), rank deficient and tiny, zero,
    identical gradients, rank deficient."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(6, K, max(1, K // 2), generator=gen, dtype=torch.float64)
    g = A @ A.transpose(-1, -2)
    full = torch.randn(K, 2 * K + 1, generator=gen, dtype=torch.float64)
    g[0] = full @ full.T
    s = torch.logspace(-6, 6, K, dtype=torch.float64)
    g[1] = g[1] * s[:, None] * s[None, :]
    g[2] = g[2] * 1e-12
    g[3] = 0.0
    g[4] = 1.0
    return g[:B]


def _objective(v, g):
    return 0.5 * torch.einsum("bi,bij,bj->b", v.double(), g.double(), v.double())


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_qp_simplex(target, K, dtype):
    backend, dev = target
    B = qp_batch(backend, dev, K)
    g = qp_families(K, B).to(dtype).to(dev)
    with ops.dispatch_log() as log:
        v = ops.solve_qp(g, backend=backend)
    assert_ran(log, backend)
    assert v.dtype == dtype and v.shape == (B, K) and torch.isfinite(v).all()
    assert (v >= 0).all() and torch.allclose(
        v.sum(-1).double(), torch.ones(B, dtype=torch.float64, device=dev), atol=1e-5
    )
    assert float(ops.kkt_residual(g, v).max()) <= 1e-5
    vr = ops.solve_qp(g, backend="torch")
    scale = g.double().diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    assert float(((_objective(v, g) - _objective(vr, g)) / scale).max()) <= 1e-6
    if K == 1:
        assert torch.all(v == 1)


@pytest.mark.parametrize("K", KS)
def test_qp_lower_bound(target, K):
    backend, dev = target
    B = qp_batch(backend, dev, K)
    g = qp_families(K, B, seed=1).float().to(dev)
    gen = torch.Generator().manual_seed(2)
    # bounded problems: q = 0 (UPGrad / DualProj) for the singular ones, an arbitrary q for the
    # full-rank problem 0 (an arbitrary q makes a singular problem unbounded below)
    q = torch.zeros(B, K)
    q[0] = torch.randn(K, generator=gen)
    lo = torch.rand(B, K, generator=gen) * 0.1
    q, lo = q.to(dev), lo.to(dev)
    v = ops.solve_qp(g, q, lo, constraint="lower", backend=backend)
    assert (v >= lo - 1e-7).all()
    assert float(ops.kkt_residual(g, v, q, lo, constraint="lower").max()) <= 1e-5
    # problem 0 is strictly convex: its optimum is unique, the reference's
    vr = ops.solve_qp(g[:1], q[:1], lo[:1], constraint="lower", backend="torch")
    torch.testing.assert_close(v[:1], vr, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("K", [3, 17])
def test_qp_badly_scaled_with_a_linear_term(target, K):
    backend, dev = target
    gen = torch.Generator().manual_seed(K)
    scales = torch.logspace(-6, 6, K, dtype=torch.float64)  # Gamma's diagonal spans 1e-12 ... 1e12
    A = torch.randn(2, K, K, generator=gen, dtype=torch.float64) * scales[:, None]
    gram = (A @ A.transpose(1, 2)).to(dev)
    q = torch.randn(2, K, generator=gen, dtype=torch.float64).to(dev)
    v = ops.solve_qp(gram, q, backend=backend)
    assert v.dtype == torch.float64
    assert float(ops.kkt_residual(gram, v, q).max()) <= 1e-5


def test_qp_norm_objective(target):
    """CAGrad's inner problem (``norm_coef``), solved by each backend's own QP solver (the C++ and
    CUDA kernels included), to the KKT target."""
    backend, dev = target
    gen = torch.Generator().manual_seed(5)
    A = torch.randn(2, 5, 5, generator=gen, dtype=torch.float64)
    gram = (A @ A.transpose(1, 2)).to(dev)
    q = torch.randn(2, 5, generator=gen, dtype=torch.float64).to(dev)
    r = torch.tensor([0.5, 2.0], dtype=torch.float64, device=dev)
    for dtype in (torch.float64, torch.float32):
        with ops.dispatch_log() as log:
            v = ops.solve_qp(gram.to(dtype), q.to(dtype), norm_coef=r.to(dtype), backend=backend)
        assert_ran(log, backend, expect_fallback=False)
        assert float(ops.kkt_residual(gram, v.double(), q, norm_coef=r).max()) <= 1e-5


def test_qp_defined_answers_and_batch_shapes(target):
    """K = 1 -> 1; zero and identical Grams: a point of the simplex; a non-finite entry: NaN for its
    problem only; the batch shape is kept; 16-bit input gives fp32."""
    backend, dev = target
    K = 4
    ident = torch.full((K, K), 3.0, device=dev)
    zero = torch.zeros(K, K, device=dev)
    bad_nan, bad_inf = torch.eye(K, device=dev), torch.eye(K, device=dev)
    bad_nan[1, 2] = float("nan")
    bad_inf[0, 0] = float("inf")
    v = ops.solve_qp(torch.stack([ident, zero, bad_nan, bad_inf]), backend=backend)
    assert torch.isfinite(v[:2]).all() and torch.isnan(v[2:]).all()
    torch.testing.assert_close(v[:2].sum(-1), torch.ones(2, device=dev))
    assert ops.solve_qp(torch.tensor([[3.0]], device=dev), backend=backend).item() == 1.0
    v64 = ops.solve_qp(torch.eye(4, dtype=torch.float64, device=dev), backend=backend)
    assert v64.dtype == torch.float64
    torch.testing.assert_close(v64, torch.full((4,), 0.25, dtype=torch.float64, device=dev))
    g = qp_families(3, B=4).float().reshape(2, 2, 3, 3).to(dev)
    assert ops.solve_qp(g, backend=backend).shape == (2, 2, 3)
    assert ops.solve_qp(g.to(torch.bfloat16), backend=backend).dtype == torch.float32


# --- MGDA in one call ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 3, 17])
@pytest.mark.parametrize("subtract", [False, True])
def test_min_norm_aggregate_is_mgda_then_combine(target, K, dtype, subtract):
    """gram -> simplex QP -> combine in one call (fused on the GPU backends), against fp64."""
    backend, dev = target
    P = 301
    G = view(K, P, dtype, dev)
    out0 = torch.randn(P, dtype=torch.float64).to(dtype).to(dev)
    out = out0.clone()
    with ops.dispatch_log() as log:
        res = ops.min_norm_aggregate(G, out, subtract=subtract, backend=backend)
    assert log[0].op == "min_norm_aggregate" and log[0].backend == backend, log
    g64 = G.double() @ G.double().T
    assert_within(res.gram, g64, acc(dtype) * float(g64.abs().max()), "gram")
    assert res.weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert res.weights.shape == (K,) and float(ops.kkt_residual(g64, res.weights.double())) <= 1e-5
    d = res.weights.double() @ G.double()
    exact = out0.double() - d if subtract else d
    size = res.weights.double().abs() @ G.double().abs() + (out0.double().abs() if subtract else 0)
    assert_within(out, exact, acc(dtype) * size + ULP[dtype] * exact.abs(), "direction")


def test_min_norm_aggregate_min_norm_point_and_nonfinite(target):
    backend, dev = target
    # two opposite gradients plus a third: the min-norm point of {a, -a, b} is 0 (w = (1/2, 1/2, 0))
    a, b = torch.randn(50, device=dev), torch.randn(50, device=dev)
    G = torch.stack([a, -a, b])
    out = torch.empty(50, device=dev)
    w = ops.min_norm_aggregate(G, out, backend=backend).weights
    torch.testing.assert_close(w.cpu(), torch.tensor([0.5, 0.5, 0.0]), atol=1e-5, rtol=0)
    assert float(out.abs().max()) <= 1e-5 * float(a.abs().max())
    G[2, 7] = float("nan")
    res = ops.min_norm_aggregate(G, out, backend=backend)
    assert torch.isnan(res.weights).all() and torch.isnan(out).any()
