"""``ops.min_norm_aggregate`` (the two-launch MGDA path of docs/ARCHITECTURE.md §6) on a CUDA
device, for every fused backend: oracle agreement, no host sync, CUDA-graph replay, and the
optimizers taking it."""

from __future__ import annotations

import pytest
import torch

import mtlsam_fast
from mtlsam_fast import ops

pytestmark = pytest.mark.gpu
DEV = "cuda"


def _fused_backends() -> list[str]:
    if not torch.cuda.is_available():
        return ["cuda", "triton"]  # collected, then skipped by the gpu marker
    return [b for b in ("cuda", "triton") if b in ops.available_backends(DEV)]


@pytest.fixture(params=_fused_backends())
def backend(request) -> str:
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [2, 8, 17, 27, 28, 64])  # the QP's workspace: shared memory up to 27
@pytest.mark.parametrize("subtract", [False, True])
def test_matches_the_oracle_at_large_p(backend, dtype, K, subtract):
    P = (1 << 22) + 3
    G = torch.randn(K, P, device=DEV).to(dtype)
    out0 = torch.randn(P, device=DEV)
    out = out0.clone()
    res = ops.min_norm_aggregate(G, out, subtract=subtract, backend=backend)
    exact = G.double() @ G.double().T
    # fp32 sums of 2**22 products: error relative to the diagonal scale sqrt(G_ii G_jj), not to the
    # (much smaller, cancelling) off-diagonal entry itself
    scale = exact.diagonal().sqrt()
    # (1e-5: bf16 tensor-core tiles keep ~1e-6 of truncation bias, see triton_kernels/gram.py)
    assert (
        float(((res.gram.double() - exact).abs() / (scale[:, None] * scale[None, :])).max()) <= 1e-5
    )
    assert float(ops.kkt_residual(exact, res.weights.double())) <= 1e-5
    d = res.weights.double() @ G.double()
    expected = out0.double() - d if subtract else d
    torch.testing.assert_close(
        out.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max())
    )


def test_no_host_sync_and_graph_replay(backend):
    K, P = 8, 1 << 20
    G = torch.randn(K, P, device=DEV)
    out = torch.empty(P, device=DEV)
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # warm-up: compilation, workspaces, cached aggregators
            ops.min_norm_aggregate(G, out, backend=backend)
        torch.cuda.set_sync_debug_mode("error")
        try:
            res = ops.min_norm_aggregate(G, out, backend=backend)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=s):
        res = ops.min_norm_aggregate(G, out, backend=backend)
    for scale in (1.0, -3.0):
        G.mul_(scale)
        graph.replay()
        torch.cuda.synchronize()
        ref = ops.min_norm_aggregate(G, torch.empty_like(out), backend="torch")
        assert float(ops.kkt_residual(ref.gram.double(), res.weights.double())) <= 1e-5
        torch.testing.assert_close(out, res.weights @ G, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls", ["MTLOptimizer", "FMTL"])
def test_optimizer_takes_the_fused_path(backend, cls, monkeypatch):
    mod = {"cuda": "mtlsam_fast.ops.cuda_backend", "triton": "mtlsam_fast.ops.triton_backend"}[
        backend
    ]
    import importlib

    bmod = importlib.import_module(mod)
    calls = []
    real = bmod.min_norm_aggregate
    monkeypatch.setattr(bmod, "min_norm_aggregate", lambda *a: calls.append(1) or real(*a))
    results = []
    for be in (backend, "torch"):
        torch.manual_seed(0)
        trunk = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU()).to(DEV)
        heads = torch.nn.ModuleList([torch.nn.Linear(64, 1) for _ in range(3)]).to(DEV)
        x, y = torch.randn(64, 32, device=DEV), torch.randn(3, 64, device=DEV)
        opt = getattr(mtlsam_fast, cls)(
            trunk.parameters(),
            [h.parameters() for h in heads],
            weighting="mgda",
            lr=0.1,
            backend=be,
        )

        def closure():
            f = trunk(x)
            return [
                torch.nn.functional.mse_loss(h(f).squeeze(1), y[i]) for i, h in enumerate(heads)
            ]

        for _ in range(3):
            opt.step(closure)
        results.append([p.detach().clone() for p in trunk.parameters()])
    assert calls  # the fused kernels ran
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
