"""``torch.compile(fullgraph=True)`` traces the compiled backends: their kernels enter the graph as
the custom ops ``torch.ops.mtlsam_fast.*`` (``mtlsam_fast/ops/_library.py``) instead of the
reference's torch ops. Few, small cases: compiling is slow on a small CI machine."""

from __future__ import annotations

import pytest
import torch

import mtlsam_fast
from mtlsam_fast import _ext, ops

pytestmark = pytest.mark.skipif(_ext.get() is None, reason=f"no mtlsam_fast._C: {_ext.error()}")


def _step(backend: str | None, offsets: torch.Tensor):
    mgda = mtlsam_fast.weighting.get("mgda", backend=backend)

    def step(G, theta, backup):
        gram = ops.gram(G, backend=backend)
        weights = mgda(gram)
        d = ops.combine(weights, G, backend=backend)
        norms = ops.segment_norms(d, offsets, backend=backend)
        scale = 0.05 / norms.pow(2).sum().sqrt()
        ops.perturb(theta, backup, offsets, d, scale, noise_scale=scale, seed=3, backend=backend)
        return weights, theta

    return step


def _ops_in(graphs) -> set[str]:
    names = set()
    for gm in graphs:
        for node in gm.graph.nodes:
            if node.op == "call_function":
                names.add(str(node.target))
    return names


@pytest.mark.parametrize("backend", ["cpu", None])
def test_aggregation_pipeline_traces_the_cpu_kernels(backend):
    """gram -> MGDA (QP) -> combine -> norms -> perturb as one graph of the C++ kernels (explicitly
    and through "auto"), with the eager result."""
    torch._dynamo.reset()
    offsets = torch.tensor([0, 30, 64])
    step = _step(backend, offsets)
    G, backup = torch.randn(3, 64), torch.randn(64)
    ops.gram(G)  # "auto" picks only backends imported before tracing
    eager_w, eager_theta = step(G, backup.clone(), backup)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    w, theta = torch.compile(step, fullgraph=True, backend=capture)(G, backup.clone(), backup)
    found = _ops_in(graphs)
    for op in ("gram", "solve_qp", "combine", "segment_norms", "perturb"):
        assert f"mtlsam_fast.{op}" in " ".join(found), (op, sorted(found))
    torch.testing.assert_close(w, eager_w, rtol=0, atol=0)
    torch.testing.assert_close(theta, eager_theta, rtol=0, atol=0)


def test_custom_ops_functionalize_and_match_eager():
    """Through AOT autograd (functionalization of the in-place kernels, the fake implementations):
    the same numbers as eager, and the in-place outputs are written."""
    torch._dynamo.reset()
    offsets = torch.tensor([0, 10, 10, 40])
    step = _step("cpu", offsets)
    G, backup = torch.randn(4, 40, dtype=torch.bfloat16), torch.randn(40, dtype=torch.bfloat16)
    eager_w, eager_theta = step(G, backup.clone(), backup)
    theta = backup.clone()
    w, out = torch.compile(step, fullgraph=True, backend="aot_eager")(G, theta, backup)
    torch.testing.assert_close(w, eager_w, rtol=0, atol=0)
    assert torch.equal(out, eager_theta) and torch.equal(theta, eager_theta)


def test_compiled_kernels_still_check_the_offsets():
    """Dynamo cannot read the boundaries while tracing; the custom op checks them when it runs."""
    torch._dynamo.reset()

    def norms(x, offsets):
        return ops.segment_norms(x, offsets, backend="cpu")

    compiled = torch.compile(norms, fullgraph=True, backend="eager")
    x = torch.randn(20)
    torch.testing.assert_close(
        compiled(x, torch.tensor([0, 5, 20])), norms(x, torch.tensor([0, 5, 20]))
    )
    with pytest.raises(ValueError, match="non-decreasing"):
        compiled(x, torch.tensor([0, 15, 5, 20]))


@pytest.mark.gpu
def test_aggregation_pipeline_traces_the_cuda_kernels():
    """The same pipeline on CUDA tensors with the cuda backend (its fused MGDA pair is composed
    while tracing)."""
    if not _ext.has_cuda():
        pytest.skip("mtlsam_fast._C has no CUDA kernels")
    torch._dynamo.reset()
    offsets = torch.tensor([0, 30, 64], device="cuda")
    step = _step("cuda", offsets)
    G, backup = torch.randn(3, 64, device="cuda"), torch.randn(64, device="cuda")
    eager_w, eager_theta = step(G, backup.clone(), backup)
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    w, theta = torch.compile(step, fullgraph=True, backend=capture)(G, backup.clone(), backup)
    found = " ".join(_ops_in(graphs))
    for op in ("gram", "solve_qp", "combine", "segment_norms", "perturb"):
        assert f"mtlsam_fast.{op}" in found, (op, found)
    torch.testing.assert_close(w, eager_w, rtol=0, atol=0)
    torch.testing.assert_close(theta, eager_theta, rtol=0, atol=0)
