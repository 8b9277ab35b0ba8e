"""The ``"cuda"`` backend of ``mtlsam_fast._C`` against the torch oracle (needs a CUDA device).

Also: no host synchronization (``torch.cuda.set_sync_debug_mode("error")``), CUDA-graph capture and
replay, and the fused two-launch aggregation path (``cuda_backend.FusedAggregator``).
"""

from __future__ import annotations

import pytest
import torch

from mtlsam_fast import _ext, ops
from mtlsam_fast.ops import philox, qp
from mtlsam_fast.ops import torch_backend as ref

pytestmark = pytest.mark.gpu

C = _ext.get()
if torch.cuda.is_available() and (C is None or not C.has_cuda()):
    pytest.skip(f"mtlsam_fast._C has no CUDA kernels ({_ext.error()})", allow_module_level=True)

KS = [1, 2, 3, 8, 17, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DEV = "cuda"


def _buffer(K, P, dtype, view):
    if not view:
        return torch.randn(K, P, device=DEV).to(dtype)
    big = torch.randn(K + 1, P + 7, device=DEV).to(dtype)
    return big[1:, 5 : 5 + P]  # misaligned rows: the scalar (non-128-bit) path


def _close(a, b, rtol):
    scale = b.abs().max().clamp_min(1e-30)
    assert torch.isfinite(a).all()
    assert (a.double() - b.double()).abs().max() <= rtol * scale


def _offsets(sizes):
    return torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()], dtype=torch.int64, device=DEV)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("view", [False, True])
def test_gram_and_diff_gram(dtype, K, view):
    G = _buffer(K, 100_003, dtype, view)
    out = ops.gram(G, backend="cuda")
    assert torch.equal(out, out.T)
    _close(out, G.double() @ G.double().T, 2e-6)
    assert torch.equal(out, ops.gram(G, backend="cuda"))  # deterministic
    A, B = _buffer(K, 100_003, dtype, view), _buffer(K, 100_003, dtype, False)
    A_ref = A.clone()
    got = ops.diff_gram(A, B, backend="cuda")
    ref.diff_gram(A_ref, B)  # A_ref <- A - B, rounded like torch.sub_
    assert torch.equal(A, A_ref)
    # against fp64, as the Gram above: cuBLAS's fp32 sum (the torch backend) is itself ~2e-6 off
    _close(got, A_ref.double() @ A_ref.double().T, 2e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_segment_norms_combine_perturb(dtype):
    sizes = [7, 0, 40_000, 1, 5000, 0, 129]
    offsets = _offsets(sizes)
    P = sum(sizes)
    w = torch.rand(P, device=DEV)
    for x in (torch.randn(P, device=DEV).to(dtype), _buffer(3, P, dtype, view=True)):
        for weight in (None, w):
            torch.testing.assert_close(
                ops.segment_norms(x, offsets, weight=weight, backend="cuda"),
                ref.segment_norms(x, offsets, weight),
                rtol=5e-5,
                atol=1e-6,
            )
    G = _buffer(5, P, dtype, view=False)
    wk = torch.rand(5, device=DEV)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(
        ops.combine(wk, G, backend="cuda"),
        ref.combine(wk, G, None, None, torch.empty(P, dtype=dtype, device=DEV)),
        rtol=tol,
        atol=tol * 5,
    )
    backup = torch.randn(P, device=DEV).to(dtype)
    d = torch.randn(P, device=DEV).to(dtype)
    S = len(sizes)
    for adaptive in (False, True):
        theta = torch.empty_like(backup)
        scale, ns = torch.rand(S, device=DEV), torch.tensor(0.01, device=DEV)
        ops.perturb(
            theta,
            backup,
            offsets,
            d,
            scale,
            adaptive=adaptive,
            noise_scale=ns,
            seed=3,
            noise_offset=11,
            backend="cuda",
        )
        expect = ref.perturb(
            torch.empty_like(backup), backup, d, scale, offsets, adaptive, ns, 3, 11
        )
        ptol = {torch.float32: 1e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}[dtype]
        torch.testing.assert_close(theta, expect, rtol=ptol, atol=1e-5)
        ops.restore(theta, backup)
        assert torch.equal(theta, backup)


def test_philox_noise_and_stats():
    from mtlsam_fast.ops import cuda_backend

    for seed, off in [(0, 0), (2**63 + 5, 2**32 - 7)]:
        r0, r1 = cuda_backend.philox_words(seed, off, 1000)
        e0, e1 = philox.philox4x32(seed, torch.arange(off, off + 1000, device=DEV))
        assert torch.equal(r0, e0) and torch.equal(r1, e1)
    z = ops.gaussian_noise(9, 123, 100_001, device=DEV, backend="cuda")
    torch.testing.assert_close(
        z, ref.gaussian_noise(9, 123, 100_001, torch.device(DEV)), rtol=1e-5, atol=2e-6
    )
    offsets = _offsets([1000, 0, 40_000, 9_001])
    r = torch.randn(50_001, device=DEV)
    torch.testing.assert_close(
        ops.noise_stats(9, 5, r, offsets, backend="cuda"),
        ref.noise_stats(9, 5, r, offsets),
        rtol=1e-4,
        atol=1e-3,
    )


def _grams(K, B=6):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(B, K, max(1, K // 2), generator=gen, dtype=torch.float64)
    g = A @ A.transpose(-1, -2)
    s = torch.logspace(-6, 6, K, dtype=torch.float64)
    g[1] = g[1] * s[:, None] * s[None, :]
    g[2] = g[2] * 1e-12
    g[3] = 0.0
    g[4] = 1.0
    return g.float().to(DEV)


@pytest.mark.parametrize("K", [*KS, 73, 74, 100])
def test_qp_one_team_per_problem(K):
    """One warp per problem up to K = 64, one CTA above; the workspace in shared memory up to K = 73
    (97 KB, opt-in above 48 KB), in global memory from K = 74."""
    g = _grams(K)
    v = ops.solve_qp(g, backend="cuda")
    assert qp.kkt_residual(g, v).max() <= 1e-5
    lo = torch.rand(6, K, device=DEV) * 0.1
    v2 = ops.solve_qp(g, None, lo, constraint="lower", backend="cuda")
    assert qp.kkt_residual(g, v2, None, lo, constraint="lower").max() <= 1e-5
    # the same solver core as the CPU build: same optimal value (singular problems have many optima)
    vc = ops.solve_qp(g.cpu(), backend="cpu").double()
    gd = g.cpu().double()
    obj = lambda w: 0.5 * torch.einsum("bi,bij,bj->b", w, gd, w)  # noqa: E731
    scale = gd.diagonal(dim1=-2, dim2=-1).amax(-1).clamp_min(1e-300)
    assert ((obj(v.cpu().double()) - obj(vc)).abs() / scale).max() <= 1e-6


def test_qp_from_two_host_threads():
    """Host threads solving different K at once: the opt-in shared-memory limit one launch sets must
    never fall below what another thread's launch of the same kernel needs (the warp kernel at
    K = 55 needs 57 KB, at K = 64 76 KB: both above the 48 KB default)."""
    import threading

    grams = {K: _grams(K) for K in (55, 64)}
    errors: list[BaseException] = []

    def solve(K: int) -> None:
        try:
            for _ in range(200):
                ops.solve_qp(grams[K], backend="cuda")
            torch.cuda.synchronize()
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=solve, args=(K,)) for K in (55, 64, 55, 64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors[0]
    for g in grams.values():
        assert qp.kkt_residual(g, ops.solve_qp(g, backend="cuda")).max() <= 1e-5


def test_no_host_sync():
    K, P = 8, 1 << 16
    G = torch.randn(K, P, device=DEV)
    offsets = _offsets([P // 2, P - P // 2])
    theta, backup = torch.empty(P, device=DEV), torch.randn(P, device=DEV)
    scale = torch.tensor([0.1, 0.2], device=DEV)
    from mtlsam_fast.ops import cuda_backend

    agg = cuda_backend.FusedAggregator(K, P, DEV)
    out = torch.empty(P, device=DEV)
    rho = torch.tensor([0.05], device=DEV)
    ops.segment_norms(G, offsets, backend="cuda")  # a new offsets tensor: its one host read
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        g = ops.gram(G, backend="cuda")
        v = ops.solve_qp(g, backend="cuda")
        ops.combine(v, G, out=out, backend="cuda")
        ops.segment_norms(G, offsets, backend="cuda")
        ops.perturb(theta, backup, offsets, out, scale, noise_scale=scale, seed=1, backend="cuda")
        ops.noise_stats(1, 0, backup, offsets, backend="cuda")
        ops.diff_gram(G, G * 0.5, backend="cuda")
        agg(G, out, mode="perturb", scale=rho, backup=backup)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 3, 8, 17])
def test_fused_aggregation_matches_unfused(dtype, K):
    from mtlsam_fast.ops import cuda_backend

    P = 200_003
    G = torch.randn(K, P, device=DEV).to(dtype)
    agg = cuda_backend.FusedAggregator(K, P, DEV)
    out = torch.empty(P, device=DEV, dtype=dtype)
    for _ in range(3):  # the ticket resets itself
        w, dnorm = agg(G, out, mode="direction")
    gram = ops.gram(G, backend="torch")
    torch.testing.assert_close(agg.gram, gram, rtol=2e-6, atol=2e-6 * gram.abs().max().item())
    v = qp.solve_qp(gram)
    assert qp.kkt_residual(gram, w).item() <= 1e-5
    d = ref.combine(w, G, None, None, torch.empty(P, device=DEV))
    tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}[dtype]
    torch.testing.assert_close(out.float(), d, rtol=tol, atol=tol)
    torch.testing.assert_close(dnorm, d.norm(), rtol=1e-4, atol=1e-6)
    assert 0.5 * (v @ gram @ v) >= 0.5 * (w @ gram @ w) - 1e-6 * gram.abs().max()
    backup = torch.randn(P, device=DEV).to(dtype)
    rho = torch.tensor([0.05], device=DEV)
    agg(G, out, mode="perturb", scale=rho, backup=backup)
    torch.testing.assert_close(
        out.float(), backup.float() + 0.05 * d / d.norm(), rtol=tol, atol=tol
    )
    p = backup.clone()
    agg(G, p, mode="update", scale=rho)
    torch.testing.assert_close(p.float(), backup.float() - 0.05 * d, rtol=tol, atol=tol)


def test_cuda_graph_capture_and_replay():
    from mtlsam_fast.ops import cuda_backend

    K, P = 8, 1 << 18
    G = torch.randn(K, P, device=DEV)
    backup = torch.randn(P, device=DEV)
    out = torch.empty(P, device=DEV)
    offsets = _offsets([P // 3, P - P // 3])
    norms = torch.empty(K, 2, device=DEV)
    gram = torch.empty(K, K, device=DEV)
    rho = torch.tensor([0.05], device=DEV)
    agg = cuda_backend.FusedAggregator(K, P, DEV)

    def step():
        gram.copy_(ops.gram(G, backend="cuda"))
        norms.copy_(ops.segment_norms(G, offsets, backend="cuda"))
        agg(G, out, mode="perturb", scale=rho, backup=backup)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up (allocations, attributes) before capture
            step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for scale in (1.0, 2.0):
        G.mul_(scale)
        graph.replay()
        torch.cuda.synchronize()
        _close(
            gram, G.double() @ G.double().T, 2e-6
        )  # fp64 truth (cuBLAS's fp32 sum is ~1e-5 off here)
        torch.testing.assert_close(norms, ref.segment_norms(G, offsets), rtol=1e-5, atol=1e-5)
        w = qp.solve_qp(ref.gram(G))
        d = ref.combine(w, G, None, None, torch.empty(P, device=DEV))
        torch.testing.assert_close(out, backup + 0.05 * d / d.norm(), rtol=1e-4, atol=1e-5)
