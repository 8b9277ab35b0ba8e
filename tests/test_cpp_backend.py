"""What only the C++ (``"cpu"``) backend of ``mtlsam_fast._C`` has: thread-count determinism, the
QP kernel's own properties, the binding's checks, the generic (pre-AVX2) variant. Its ops against
the oracle are in ``test_ops_conformance.py`` (with every other backend).

Also the build contract: in CI (``CI`` set) the extension must be importable, and when a CUDA
toolkit is present it must contain the CUDA kernels (``_C.has_cuda()``).
"""

from __future__ import annotations

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


# ---- Gram / diff_gram ----------------------------------------------------------------------------
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


# ---- perturb / restore / noise -------------------------------------------------------------------
@needs_ext
@pytest.mark.parametrize("seed", [0, 1234567, 2**63 + 12345, -1])
@pytest.mark.parametrize("offset", [0, 2**32 - 3])
def test_philox_words_bit_exact(seed, offset):
    from mtlsam_fast.ops import cpu_backend

    r0, r1 = cpu_backend.philox_words(seed, offset, 64)
    counter = torch.arange(offset, offset + 64, dtype=torch.int64)
    e0, e1 = philox.philox4x32(seed & (2**64 - 1), counter)
    assert torch.equal(r0, e0) and torch.equal(r1, e1)


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
    this file's tests and the conformance suite's cases of the cpu backend run again against it
    (in a subprocess: the choice is made once per process)."""
    if os.environ.get("MTLSAM_CPU_ISA") == "generic":
        assert C.cpu_isa() == "generic"
        return
    env = dict(os.environ, MTLSAM_CPU_ISA="generic")
    proc = subprocess.run(
        [
            sys.executable,
            *("-m", "pytest", "-q", "-x", "-p", "no:cacheprovider"),
            *("-k", "test_cpp_backend or cpu-cpu"),
            __file__,
            str(Path(__file__).with_name("test_ops_conformance.py")),
        ],
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
