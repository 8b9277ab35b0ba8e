"""The C++ (``"cpu"``) backend of ``mtlsam_fast._C`` against the torch oracle.

Also the build contract: in CI (``CI`` set) the extension must be importable, and when a CUDA
toolkit is present it must contain the CUDA kernels (``_C.has_cuda()``).
"""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mtlsam_fast import _ext, ops
from mtlsam_fast.ops import philox, qp
from mtlsam_fast.ops import torch_backend as ref

C = _ext.get()
needs_ext = pytest.mark.skipif(C is None, reason=f"mtlsam_fast._C not built: {_ext.error()}")

KS = [1, 2, 3, 8, 17, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# ---- build contract -----------------------------------------------------------------------------
def test_ci_build_contract():
    if not os.environ.get("CI"):
        pytest.skip("build contract is enforced in CI only (CI unset)")
    if os.environ.get("MTLSAM_NO_EXTENSION"):
        pytest.skip("MTLSAM_NO_EXTENSION set: pure-Python install requested")
    assert C is not None, f"CI must build mtlsam_fast._C: {_ext.error()}"
    if _ext.find_cuda_home() and torch.version.cuda and not os.environ.get("MTLSAM_NO_CUDA"):
        assert C.has_cuda(), (
            "a CUDA toolkit (nvcc) is present but the CUDA kernels were not compiled into _C"
        )


def test_find_cuda_home_skips_wrapper(monkeypatch):
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    home = _ext.find_cuda_home()
    if home is None:
        pytest.skip("no CUDA toolkit on this machine")
    assert os.path.isfile(os.path.join(home, "include", "cuda_runtime.h"))
    assert os.path.isfile(os.path.join(home, "bin", "nvcc"))


def test_plain_import_never_compiles(monkeypatch):
    monkeypatch.delenv("MTLSAM_JIT", raising=False)
    assert (_ext.load() is None) == (C is None)
    assert _ext.error() is None or C is None


@needs_ext
def test_auto_prefers_cpu_backend():
    from mtlsam_fast.ops import _registry, cpu_backend

    assert _registry.resolve("auto", torch.device("cpu"), "gram") is cpu_backend
    assert "cpu" in ops.available_backends("cpu")
    assert C.cpu_isa() in ("avx2", "generic")


# ---- helpers -------------------------------------------------------------------------------------
def _buffer(K, P, dtype, view):
    """[K, P] buffer; view=True: a slice with a column offset and a row stride > P."""
    if not view:
        return torch.randn(K, P).to(dtype)
    big = torch.randn(K + 1, P + 7).to(dtype)
    return big[1:, 5 : 5 + P]


def _close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-30)
    assert torch.isfinite(a).all()
    assert (a.double() - b.double()).abs().max() <= rtol * scale, ((a - b).abs().max(), scale)


# ---- Gram / diff_gram ----------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("view", [False, True])
def test_gram_matches_oracle(dtype, K, view):
    G = _buffer(K, 1001, dtype, view)
    out = ops.gram(G, backend="cpu")
    assert out.dtype == torch.float32 and out.shape == (K, K)
    assert torch.equal(out, out.T)
    _close(out, ref.gram(G), 2e-6)
    # exact fp64 brute force on the same (upcast) values
    _close(out, G.double() @ G.double().T, 2e-6)


@needs_ext
def test_gram_deterministic_across_thread_counts():
    G = torch.randn(5, 300_001)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.gram(G, backend="cpu")
        torch.set_num_threads(max(2, n))
        b = ops.gram(G, backend="cpu")
    finally:
        torch.set_num_threads(n)
    assert torch.equal(a, b)


@needs_ext
def test_gram_long_rows_accumulate_in_fp32_or_better():
    G = torch.full((2, 3_000_001), 0.1)
    out = ops.gram(G, backend="cpu")
    exact = 3_000_001 * (0.1 * 0.1)
    assert abs(out[0, 0].item() - exact) / exact < 1e-5


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", KS)
def test_diff_gram_matches_oracle(dtype, K):
    A = _buffer(K, 999, dtype, view=True)
    B = _buffer(K, 999, dtype, view=False)
    A_ref = A.clone()
    out = ops.diff_gram(A, B, backend="cpu")
    expect = ref.diff_gram(A_ref, B)
    assert torch.equal(A, A_ref)  # A <- A - B, rounded like torch
    _close(out, expect, 2e-6)


# ---- segment norms -------------------------------------------------------------------------------
def _offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64)


@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("weighted", [False, True])
def test_segment_norms(dtype, weighted):
    sizes = [7, 0, 40_000, 1, 33_000, 0, 129]  # empty segments, segments across chunk borders
    offsets = _offsets(sizes)
    P = sum(sizes)
    w = torch.rand(P) if weighted else None
    for x in (torch.randn(P).to(dtype), _buffer(3, P, dtype, view=True)):
        out = ops.segment_norms(x, offsets, weight=w, backend="cpu")
        expect = ref.segment_norms(x, offsets, w)
        assert out.shape == expect.shape and out.dtype == torch.float32
        # the oracle sums 40k fp32 squares serially (~1e-5 relative error); ours is closer to fp64
        torch.testing.assert_close(out, expect, rtol=5e-5, atol=1e-6)
        v = x.double() * (1.0 if w is None else w.double())
        exact = torch.stack(
            [(v[..., a:b] ** 2).sum(-1) for a, b in itertools.pairwise(offsets)], -1
        ).sqrt()
        torch.testing.assert_close(out.double(), exact, rtol=5e-6, atol=1e-6)


@needs_ext
def test_segment_norms_weight_dtype_mix():
    offsets = _offsets([10, 20])
    x = torch.randn(30).to(torch.bfloat16)
    w = torch.rand(30)  # fp32 weight with a bf16 buffer
    torch.testing.assert_close(
        ops.segment_norms(x, offsets, weight=w, backend="cpu"),
        ref.segment_norms(x, offsets, w),
        rtol=1e-5,
        atol=1e-6,
    )


# ---- combine -------------------------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", KS)
def test_combine(dtype, K):
    G = _buffer(K, 1003, dtype, view=True)
    w = torch.rand(K)
    out = ops.combine(w, G, backend="cpu")
    assert out.dtype == dtype
    expect = ref.combine(w, G, None, None, torch.empty(1003, dtype=dtype))
    rtol, atol = {
        torch.float32: (1e-5, 1e-5),
        torch.bfloat16: (1e-2, 1e-2),
        torch.float16: (2e-3, 2e-3),
    }[dtype]
    torch.testing.assert_close(out, expect, rtol=rtol, atol=atol * K)
    H = _buffer(2, 1003, dtype, view=False)
    w2 = torch.rand(2, dtype=torch.float64)  # any float weight dtype
    out32 = torch.empty(2006)[::2]  # non-contiguous fp32 output
    ops.combine(w, G, w2, H, out=out32, backend="cpu")
    expect32 = ref.combine(w, G, w2, H, torch.empty(1003))
    torch.testing.assert_close(out32, expect32, rtol=1e-5, atol=1e-5 * K)


# ---- perturb / restore / noise -------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("adaptive", [False, True])
@pytest.mark.parametrize("noise", [False, True])
@pytest.mark.parametrize("per_segment", [False, True])
def test_perturb_and_restore(dtype, adaptive, noise, per_segment):
    sizes = [5, 40_000, 0, 17]
    offsets = _offsets(sizes)
    P = sum(sizes)
    backup = torch.randn(P).to(dtype)
    theta = backup.clone()
    d = torch.randn(P).to(dtype)
    S = len(sizes)
    scale = torch.rand(S) if per_segment else torch.tensor(0.05)
    nscale = (
        (torch.rand(S) * 0.01)
        if (noise and per_segment)
        else (torch.tensor(0.01) if noise else None)
    )
    got = ops.perturb(
        theta,
        backup,
        offsets,
        d,
        scale,
        adaptive=adaptive,
        noise_scale=nscale,
        seed=123,
        noise_offset=7,
        backend="cpu",
    )
    assert got is theta
    expect = ref.perturb(backup.clone(), backup, d, scale, offsets, adaptive, nscale, 123, 7)
    tol = {torch.float32: (1e-6, 1e-6), torch.bfloat16: (8e-3, 1e-5), torch.float16: (1e-3, 1e-5)}[
        dtype
    ]
    torch.testing.assert_close(theta, expect, rtol=tol[0], atol=tol[1])
    assert not torch.equal(theta, backup)
    ops.restore(theta, backup)
    assert torch.equal(theta, backup)


@needs_ext
def test_perturb_noise_only_and_dtype_mix():
    offsets = _offsets([100, 50])
    backup = torch.randn(150)
    theta = torch.empty(150)
    ops.perturb(theta, backup, offsets, noise_scale=torch.tensor([0.1, 0.2]), seed=5, backend="cpu")
    expect = ref.perturb(
        torch.empty(150), backup, None, None, offsets, False, torch.tensor([0.1, 0.2]), 5, 0
    )
    torch.testing.assert_close(theta, expect, rtol=1e-6, atol=1e-6)
    d16 = torch.randn(150).to(torch.bfloat16)  # bf16 direction into fp32 parameters
    ops.perturb(theta, backup, offsets, d16, torch.tensor(0.3), backend="cpu")
    torch.testing.assert_close(
        theta,
        ref.perturb(torch.empty(150), backup, d16, torch.tensor(0.3), offsets, False, None, 0, 0),
        rtol=1e-6,
        atol=1e-6,
    )


@needs_ext
@pytest.mark.parametrize("seed", [0, 1234567, 2**63 + 12345, -1])
@pytest.mark.parametrize("offset", [0, 2**32 - 3])
def test_philox_words_bit_exact(seed, offset):
    from mtlsam_fast.ops import cpu_backend

    r0, r1 = cpu_backend.philox_words(seed, offset, 64)
    counter = torch.arange(offset, offset + 64, dtype=torch.int64)
    e0, e1 = philox.philox4x32(seed & (2**64 - 1), counter)
    assert torch.equal(r0, e0) and torch.equal(r1, e1)


@needs_ext
def test_gaussian_noise_and_stats():
    z = ops.gaussian_noise(42, 2**32 - 10, 20_001, backend="cpu")
    zr = ref.gaussian_noise(42, 2**32 - 10, 20_001, torch.device("cpu"))
    torch.testing.assert_close(z, zr, rtol=1e-5, atol=2e-6)  # polynomial log/cos: a few ulp
    # the noise perturb adds is exactly this stream
    theta, backup = torch.empty(20_001), torch.zeros(20_001)
    ops.perturb(
        theta,
        backup,
        torch.tensor([0, 20_001]),
        noise_scale=torch.tensor(1.0),
        seed=42,
        noise_offset=2**32 - 10,
        backend="cpu",
    )
    assert torch.equal(theta, z)
    # slices of the stream are consistent
    torch.testing.assert_close(
        ops.gaussian_noise(42, 2**32 - 10 + 100, 10, backend="cpu"), z[100:110], rtol=0, atol=0
    )
    offsets = _offsets([1000, 0, 35_000, 1])  # a segment across the 32768-element chunks
    for dtype in DTYPES:
        r = torch.randn(36_001).to(dtype)
        got = ops.noise_stats(42, 99, r, offsets, backend="cpu")
        torch.testing.assert_close(got, ref.noise_stats(42, 99, r, offsets), rtol=1e-4, atol=1e-3)


# ---- QP ------------------------------------------------------------------------------------------
def _grams(K, B=6, seed=0):
    """fp32 Gram matrices: full rank, rank-deficient, badly scaled (1e-12 .. 1e12), zero,
    identical."""
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(6, K, max(1, K // 2), generator=gen, dtype=torch.float64)
    g = A @ A.transpose(-1, -2)
    full = torch.randn(K, 2 * K + 1, generator=gen, dtype=torch.float64)
    g[0] = full @ full.T
    s = torch.logspace(-6, 6, K, dtype=torch.float64)
    g[1] = g[1] * s[:, None] * s[None, :]
    g[2] = g[2] * 1e-12
    g[3] = 0.0
    g[4] = 1.0  # identical gradients
    return g[:B].float()


@needs_ext
@pytest.mark.parametrize("K", KS)
def test_qp_simplex_kkt(K):
    g = _grams(K)
    v = ops.solve_qp(g, backend="cpu")
    assert v.dtype == torch.float32 and v.shape == (6, K)
    assert torch.isfinite(v).all()
    assert (v >= 0).all() and torch.allclose(v.sum(-1), torch.ones(6), atol=1e-5)
    assert qp.kkt_residual(g, v).max() <= 1e-5
    # same optimal value as the torch reference solver
    vr = qp.solve_qp(g)
    obj = lambda w: 0.5 * torch.einsum("bi,bij,bj->b", w.double(), g.double(), w.double())  # noqa: E731
    scale = g.double().diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    assert ((obj(v) - obj(vr)) / scale).max() <= 1e-6


@needs_ext
@pytest.mark.parametrize("K", KS)
def test_qp_lower_bound_kkt(K):
    g = _grams(K, seed=1)
    gen = torch.Generator().manual_seed(2)
    # bounded problems: q = 0 (UPGrad / DualProj) for the singular ones, arbitrary q for the
    # full-rank problem 0 (an arbitrary q makes a singular problem unbounded below)
    q = torch.zeros(6, K)
    q[0] = torch.randn(K, generator=gen)
    lo = torch.rand(6, K, generator=gen) * 0.1
    v = ops.solve_qp(g, q, lo, constraint="lower", backend="cpu")
    assert (v >= lo - 1e-7).all()
    assert qp.kkt_residual(g, v, q, lo, constraint="lower").max() <= 1e-5


@needs_ext
def test_qp_matches_quadprog_on_definite_problems():
    import numpy as np
    import quadprog

    g = _grams(8, B=1, seed=3)[0].double()
    v = ops.solve_qp(g, backend="cpu")
    K = 8
    Cm = np.hstack([np.ones((K, 1)), np.eye(K)])
    b = np.hstack([1.0, np.zeros(K)])
    exact = quadprog.solve_qp(g.numpy(), np.zeros(K), Cm, b, 1)[0]
    torch.testing.assert_close(v, torch.from_numpy(exact), rtol=1e-6, atol=1e-7)


@needs_ext
def test_qp_is_exact_where_the_kkt_measure_is_blind():
    """A min-norm problem whose optimum lies among small gradients while 1e5 times larger ones set
    kkt_residual's scale (max Gamma_ii): any weights on the small ones meet a relative KKT target of
    1e-9, so meeting it is not enough -- the solver must find the optimum. The large gradients
    g_j = 1e5 (u + m_j), m_j orthogonal to the small problem's min-norm point u, price at
    (1e5 - 1) |u|^2 > 0 and stay out: the optimum is (v_small, 0)."""
    gen = torch.Generator().manual_seed(7)
    K1, K2, d = 8, 24, 48
    small = torch.randn(K1, d, generator=gen, dtype=torch.float64)
    v_small = ops.solve_qp(small @ small.T, backend="cpu")
    assert (
        qp.kkt_residual(small @ small.T, v_small).item() <= 1e-9
    )  # well scaled: the KKT residual is tight
    u = v_small @ small
    m = torch.randn(K2, d, generator=gen, dtype=torch.float64)
    m = m - (m @ u)[:, None] * u / (u @ u)
    G = torch.cat([small, 1e5 * (u + m)])
    v = ops.solve_qp(G @ G.T, backend="cpu")
    torch.testing.assert_close(v[:K1], v_small, rtol=0, atol=1e-7)
    assert (v[K1:] == 0).all()
    assert (v @ G).square().sum() <= (u @ u) * (1 + 1e-9)


@needs_ext
@pytest.mark.parametrize("K", [8, 17, 64])
def test_qp_symmetrizes_and_checks_every_entry(K):
    """The scaling pass reads Gamma in 4 x 4 tiles with their mirrors (AVX2) or by pairs: Gamma and
    Gamma^T give bitwise the same weights, an antisymmetric part changes nothing beyond rounding,
    and a non-finite entry anywhere (diagonal or off-diagonal tiles, the K % 4 tail) makes its
    problem NaN."""
    g = _grams(K, B=2)  # full rank; badly scaled
    gen = torch.Generator().manual_seed(11)
    n = torch.randn(2, K, K, generator=gen)
    asym = g + 1e-3 * g.abs().amax(dim=(-2, -1), keepdim=True) * (n - n.mT)
    for dtype in (torch.float32, torch.float64):
        a = asym.to(dtype)
        v = ops.solve_qp(a, backend="cpu")
        assert torch.equal(v, ops.solve_qp(a.mT.contiguous(), backend="cpu"))
        assert qp.kkt_residual(0.5 * (a + a.mT), v).max() <= 1e-5
        vr = qp.solve_qp(a)
        obj = lambda w: torch.einsum("bi,bij,bj->b", w.double(), g.double(), w.double())  # noqa: E731
        scale = g.double().diagonal(dim1=-2, dim2=-1).amax(-1)
        assert ((obj(v) - obj(vr)) / scale).max() <= 1e-6
    for i, j in [
        (K - 1, 0),
        (0, K - 1),
        (5, 2),
        (K // 2, K // 2 - 1),
        (K - 1, K - 1),
        (K - 1, K - 2),
    ]:
        for value in (float("nan"), float("inf")):
            bad = g.clone()
            bad[1, i, j] = value
            v = ops.solve_qp(bad, backend="cpu")
            assert torch.isfinite(v[0]).all() and torch.isnan(v[1]).all(), (i, j, value)


@needs_ext
def test_qp_edge_cases():
    one = ops.solve_qp(torch.tensor([[3.0]]), backend="cpu")
    assert one.item() == 1.0
    bad = torch.eye(3).repeat(2, 1, 1)
    bad[1, 0, 1] = float("nan")
    v = ops.solve_qp(bad, backend="cpu")
    assert torch.isfinite(v[0]).all() and torch.isnan(v[1]).all()
    inf = torch.eye(2)
    inf[0, 0] = float("inf")
    assert torch.isnan(ops.solve_qp(inf, backend="cpu")).all()
    v64 = ops.solve_qp(torch.eye(4, dtype=torch.float64), backend="cpu")
    assert v64.dtype == torch.float64
    torch.testing.assert_close(v64, torch.full((4,), 0.25, dtype=torch.float64))
    # batch shape preserved; 16-bit input returns fp32
    g = _grams(3, B=4).reshape(2, 2, 3, 3).to(torch.bfloat16)
    assert ops.solve_qp(g, backend="cpu").shape == (2, 2, 3)


@needs_ext
def test_qp_kernel_batch_shapes_and_step_counts():
    """The binding takes [..., K, K] as it is; step counts only when asked (the benchmark reads
    them)."""
    g = _grams(5, B=6).reshape(2, 3, 5, 5).contiguous()
    lo = torch.rand(2, 3, 5) * 0.1
    v, iters = C.solve_qp(g, None, lo, False, 60, 1e-9, with_iters=True)
    assert v.shape == (2, 3, 5) and iters.shape == (2, 3) and iters.dtype == torch.int32
    assert (
        iters >= 0
    ).all() and iters.max() > 0  # (a zero Gram or an optimum at the bound: 0 steps)
    flat, flat_iters = C.solve_qp(
        g.reshape(6, 5, 5), None, lo.reshape(6, 5), False, 60, 1e-9, with_iters=True
    )
    assert torch.equal(flat.reshape(2, 3, 5), v) and torch.equal(flat_iters.reshape(2, 3), iters)
    assert C.solve_qp(g, None, lo, False, 60, 1e-9)[1] is None
    one, _ = C.solve_qp(g[1, 2], None, lo[1, 2], False, 60, 1e-9)
    assert one.shape == (5,) and torch.equal(one, v[1, 2])
    with pytest.raises(RuntimeError, match="batch shape"):
        C.solve_qp(g, None, lo.reshape(6, 5), False, 60, 1e-9)


@needs_ext
def test_qp_norm_coef_falls_back_to_reference():
    g = _grams(4, B=2)
    q = torch.randn(2, 4)
    r = torch.tensor([0.5, 0.5])
    got = ops.solve_qp(g, q, norm_coef=r, backend="cpu")
    torch.testing.assert_close(got, qp.solve_qp(g, q, norm_coef=r))


@needs_ext
def test_qp_above_the_kernel_limit_goes_to_the_reference(monkeypatch):
    """The solver's indices are 32-bit: the binding refuses K > QP_MAX_K before reading anything
    (the buffer below is never touched: no pages are committed), and the backend hands such
    problems to the torch reference instead."""
    limit = C.QP_MAX_K
    assert limit == 1 << 15
    big = torch.empty(limit + 1, limit + 1)
    with pytest.raises(RuntimeError, match=f"1 <= K <= {limit}, got {limit + 1}"):
        C.solve_qp(big, None, None, True, 60, 1e-6, False)
    del big
    g = _grams(5, B=2)
    monkeypatch.setattr(C, "QP_MAX_K", 4)  # as if K = 5 were above the limit
    calls = []
    reference = ref.solve_qp
    monkeypatch.setattr(ref, "solve_qp", lambda *a: calls.append(a) or reference(*a))
    got = ops.solve_qp(g, backend="cpu")
    assert len(calls) == 1 and torch.equal(got, qp.solve_qp(g))
    ops.solve_qp(g[:, :4, :4].contiguous(), backend="cpu")  # within the limit: the kernel
    assert len(calls) == 1


# ---- fallbacks and errors ------------------------------------------------------------------------
@needs_ext
def test_float64_falls_back_to_oracle():
    G = torch.randn(3, 101, dtype=torch.float64)
    assert ops.gram(G, backend="cpu").dtype == torch.float64
    torch.testing.assert_close(ops.gram(G, backend="cpu"), ref.gram(G))
    Gt = torch.randn(101, 3).T  # column stride != 1: torch path, same result
    torch.testing.assert_close(ops.gram(Gt, backend="cpu"), ref.gram(Gt), rtol=1e-5, atol=1e-4)


@needs_ext
def test_extension_rejects_bad_input():
    with pytest.raises(RuntimeError, match="unsupported dtype"):
        C.gram(torch.zeros(2, 3, dtype=torch.int32))
    with pytest.raises(RuntimeError, match="unit column stride"):
        C.gram(torch.zeros(3, 2).T)
    with pytest.raises(RuntimeError, match="must match"):
        C.diff_gram(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match="1 or S entries"):
        C.perturb(
            torch.zeros(4),
            torch.zeros(4),
            torch.zeros(4),
            torch.zeros(3),
            torch.tensor([0, 2, 4]),
            False,
            None,
            0,
            0,
        )
    with pytest.raises(RuntimeError, match=r"\[\.\.\., K, K\]"):
        C.solve_qp(torch.zeros(1, 2, 3), None, None, True, 10, 1e-9)
    with pytest.raises(RuntimeError, match="int64"):
        C.segment_norms(torch.zeros(4), torch.tensor([0, 4], dtype=torch.int32), None)
    with pytest.raises(RuntimeError, match="different devices"):
        C.diff_gram(torch.zeros(2, 3), torch.zeros(2, 3, device="meta"))
    with pytest.raises(RuntimeError, match="q / lower"):
        C.solve_qp(
            torch.zeros(2, 3, 3), torch.zeros(2, 3, dtype=torch.float64), None, True, 10, 1e-9
        )


@needs_ext
def test_ops_validation_applies_to_cpu_backend():
    with pytest.raises(ValueError):
        ops.combine(torch.ones(3), torch.zeros(2, 5), backend="cpu")
    with pytest.raises(ValueError):
        ops.diff_gram(torch.zeros(2, 5), torch.zeros(2, 6), backend="cpu")
    with pytest.raises(RuntimeError, match="not available"):
        ops.gram(torch.zeros(2, 3, device="meta"), backend="cpu")


def test_library_works_without_extension():
    """With no mtlsam_fast._C (MTLSAM_NO_EXTENSION=1 installs), everything runs on the torch
    backend."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['mtlsam_fast._C'] = None\n"
        "import torch, mtlsam_fast\n"
        "from mtlsam_fast import _ext, ops\n"
        "assert _ext.get() is None and 'not built' in _ext.error()\n"
        "assert 'cpu' not in mtlsam_fast.available_backends('cpu')\n"
        "G = torch.randn(3, 50)\n"
        "torch.testing.assert_close(ops.gram(G), G @ G.T)\n"
        "assert ops.solve_qp(ops.gram(G)).shape == (3,)\n"
        "try:\n"
        "    ops.gram(G, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    assert 'not available' in str(e)\n"
        "else:\n"
        "    raise AssertionError('backend cpu should be unavailable')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MTLSAM_JIT"}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---- the generic (pre-AVX2) variant --------------------------------------------------------------
@needs_ext
def test_generic_variant_passes_every_kernel_test():
    """Machines with AVX2 run the AVX2 variant; MTLSAM_CPU_ISA=generic forces the generic one, and
    this file's tests run again against it (in a subprocess: the choice is made once per
    process)."""
    if os.environ.get("MTLSAM_CPU_ISA") == "generic":
        assert C.cpu_isa() == "generic"
        return
    env = dict(os.environ, MTLSAM_CPU_ISA="generic")
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", __file__],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        cwd=Path(__file__).parents[1],
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def _qp_variant_cases():
    """QP inputs for the variant comparison: _grams' families (ties included: identical and zero
    gradients), a duplicated gradient, gradients in adjacent pairs; K = 1, 3, 5, 17, 64, simplex and
    lower bound."""
    cases = []
    for K in (1, 3, 5, 17, 64):
        g = _grams(K)
        gen = torch.Generator().manual_seed(K)
        A = torch.randn(K, 2 * K, generator=gen, dtype=torch.float64)
        A[-1] = A[0]  # a duplicated gradient: tied pricing keys
        pairs = A[torch.arange(K) // 2]  # every gradient twice, side by side: ties within a vector
        g = torch.cat([g, (A @ A.T).float()[None], (pairs @ pairs.T).float()[None]])
        lo = torch.rand(g.shape[:-1], generator=gen) * 0.1
        cases += [(g, None), (g, lo)]
    return cases


def _qp_variant_results():
    return [
        C.solve_qp(g, None, lo, lo is None, 60, 1e-9, with_iters=True)
        for g, lo in _qp_variant_cases()
    ]


@needs_ext
def test_qp_variants_take_the_same_steps(tmp_path):
    """The AVX2 variant's own QP code (the tiled scaling pass, the vector argmin of the pricing)
    walks the generic variant's path: the same step counts, the same weights up to rounding. (Not
    bitwise: GCC contracts a * b + c to FMAs in the AVX2 translation unit, which moves
    ill-conditioned faces -- identical gradients, say -- by ~1e-6.)"""
    if C.cpu_isa() != "avx2":
        pytest.skip("this machine runs the generic variant only")
    out = tmp_path / "generic.pt"
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[2]); import test_cpp_backend as t; "
        "assert t.C.cpu_isa() == 'generic'; torch.save(t._qp_variant_results(), sys.argv[1])"
    )
    env = dict(os.environ, MTLSAM_CPU_ISA="generic")
    subprocess.run(
        [sys.executable, "-c", code, str(out), str(Path(__file__).parent)],
        check=True,
        env=env,
        timeout=300,
    )
    for (v, steps), (vg, steps_g) in zip(_qp_variant_results(), torch.load(out), strict=True):
        assert torch.equal(steps, steps_g)
        torch.testing.assert_close(v, vg, rtol=0, atol=1e-5)
