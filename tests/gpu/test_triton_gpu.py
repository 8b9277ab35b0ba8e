"""The Triton backend on a CUDA device: large P (>= 2**26, K*P > 2**31), sync-freedom, CUDA graphs.

Skipped without CUDA (``gpu`` marker). Nothing here imports Triton at module level, so collecting
this file on a CPU-only machine cannot fix Triton in compiled mode before ``tests/test_triton.py``
turns the interpreter on.

Run on a GPU machine:  ``python -m pytest -q tests/gpu/test_triton_gpu.py tests/test_triton.py``
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

P_LARGE = 1 << 26


def _backend():
    pytest.importorskip("triton")
    from mtlsam_fast.ops import triton_backend

    return triton_backend


def _gram_fp64(G: torch.Tensor, chunk: int = 1 << 22) -> torch.Tensor:
    out = torch.zeros(G.shape[0], G.shape[0], dtype=torch.float64, device=G.device)
    for s in range(0, G.shape[1], chunk):
        blk = G[:, s : s + chunk].double()
        out += blk @ blk.T
    return out


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


@pytest.mark.parametrize("K", [1, 2, 3, 8, 16, 17, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gram_large_p(K, dtype):
    from mtlsam_fast import ops

    _backend()
    P = P_LARGE + 13  # not a multiple of any block; K = 64 makes K * P > 2**31
    base = torch.randn(K, P + 5, device="cuda", dtype=dtype)
    G = base[:, 5:]  # a view with a storage offset
    out = ops.gram(G, backend="triton")
    assert torch.equal(out, out.T)
    assert torch.equal(out, ops.gram(G, backend="triton"))  # deterministic
    assert _rel_err(out, _gram_fp64(G)) < 1e-4
    del base


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_elementwise_ops_large_p(dtype):
    from mtlsam_fast import ops

    _backend()
    K, P = 4, P_LARGE + 7
    A = torch.randn(K, P, device="cuda", dtype=dtype)
    B = torch.randn(K, P, device="cuda", dtype=dtype)
    expected_a = A - B
    gram = ops.diff_gram(A, B, backend="triton")
    assert torch.equal(A, expected_a)
    assert _rel_err(gram, _gram_fp64(expected_a)) < 1e-4
    w = torch.rand(K, device="cuda")
    d = ops.combine(w, A, backend="triton")
    combine_tol = 1e-5 if dtype == torch.float32 else 1e-2  # d is stored in the buffer dtype
    assert _rel_err(d, ops.combine(w, A, dtype=torch.float32, backend="torch")) < combine_tol
    offsets = torch.tensor([0, 1000, 1001, P // 2, P], device="cuda")
    norms = ops.segment_norms(A, offsets, backend="triton")
    assert _rel_err(norms, ops.segment_norms(A, offsets, backend="torch")) < 1e-4
    theta, backup = torch.empty(P, device="cuda", dtype=dtype), A[0]
    scale = torch.rand(4, device="cuda")
    ops.perturb(
        theta,
        backup,
        offsets,
        A[1],
        scale,
        adaptive=True,
        noise_scale=scale,
        seed=5,
        noise_offset=2**33,
        backend="triton",
    )
    ref = torch.empty_like(theta)
    ops.perturb(
        ref,
        backup,
        offsets,
        A[1],
        scale,
        adaptive=True,
        noise_scale=scale,
        seed=5,
        noise_offset=2**33,
        backend="torch",
    )
    tol = 1e-5 if dtype == torch.float32 else 2.0**-7
    torch.testing.assert_close(theta.float(), ref.float(), rtol=tol, atol=1e-4)
    z = ops.gaussian_noise(5, 2**33, P, device="cuda", backend="triton")
    torch.testing.assert_close(
        z, ops.gaussian_noise(5, 2**33, P, device="cuda", backend="torch"), rtol=1e-5, atol=1e-5
    )
    st = ops.noise_stats(5, 2**33, backup, offsets, backend="triton")
    assert _rel_err(st, ops.noise_stats(5, 2**33, backup, offsets, backend="torch")) < 1e-4


def test_qp_64_problems_of_k64_meet_kkt_target():
    from mtlsam_fast import ops

    _backend()
    A = torch.randn(64, 64, 32, device="cuda", dtype=torch.float64)
    A = A * torch.logspace(-6, 6, 64, device="cuda", dtype=torch.float64)[None, :, None]
    gram = A @ A.transpose(1, 2)
    v = ops.solve_qp(gram, backend="triton")
    assert float(ops.kkt_residual(gram, v).max()) <= 1e-5
    g32 = gram.float()
    v32 = ops.solve_qp(g32, q=torch.randn(64, 64, device="cuda"), backend="triton")
    assert torch.isfinite(v32).all()


def _pipeline(tb, G, offsets, theta, backup, out, lr):
    from mtlsam_fast import ops

    gram = ops.gram(G, backend="triton")
    w = ops.solve_qp(gram, backend="triton")
    d = ops.combine(w, G, out=out, backend="triton")
    norms = ops.segment_norms(d, offsets, backend="triton")
    scale = 0.05 / norms.pow(2).sum().sqrt()
    ops.perturb(
        theta,
        backup,
        offsets,
        d,
        scale.reshape(1),
        noise_scale=scale.reshape(1),
        seed=3,
        backend="triton",
    )
    ops.noise_stats(3, 0, d, offsets, backend="triton")
    agg = tb.fused_aggregate(G, G, out=out, theta=theta, lr=lr)
    return gram, w, d, agg.weights


def test_no_host_sync():
    tb = _backend()
    P = 1 << 20
    G = torch.randn(8, P, device="cuda", dtype=torch.bfloat16)
    offsets = torch.tensor([0, 1000, P], device="cuda")
    theta, backup = torch.empty(P, device="cuda"), torch.randn(P, device="cuda")
    out, lr = (
        torch.empty(P, device="cuda", dtype=torch.bfloat16),
        torch.tensor([0.1], device="cuda"),
    )
    _pipeline(tb, G, offsets, theta, backup, out, lr)  # warm-up: compile + autotune (may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _pipeline(tb, G, offsets, theta, backup, out, lr)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_graph_capture_and_replay_matches_eager(dtype):
    tb = _backend()
    P = (1 << 22) + 3
    G = torch.randn(8, P, device="cuda", dtype=dtype)
    offsets = torch.tensor([0, 77, P], device="cuda")
    theta, backup = torch.empty(P, device="cuda"), torch.randn(P, device="cuda")
    out, lr = torch.empty(P, device="cuda", dtype=dtype), torch.tensor([0.1], device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up on the capture stream
            _pipeline(tb, G, offsets, theta, backup, out, lr)
    torch.cuda.current_stream().wait_stream(s)
    theta.copy_(backup)
    eager = [t.clone() for t in _pipeline(tb, G, offsets, theta, backup, out, lr)]
    eager_theta = theta.clone()
    graph = torch.cuda.CUDAGraph()
    theta.copy_(backup)
    with torch.cuda.graph(graph):
        captured = _pipeline(tb, G, offsets, theta, backup, out, lr)
    for _ in range(3):  # replays: the fused kernel's ticket counter must reset every time
        theta.copy_(backup)
        graph.replay()
        torch.cuda.synchronize()
        for a, b in zip(captured, eager):
            assert torch.equal(a, b)
        assert torch.equal(theta, eager_theta)
