"""The ops layer: validation, backend selection, sync-freedom. (Every backend's ops against fp64
brute force: ``test_ops_conformance.py``.)"""

from __future__ import annotations

import pytest
import torch

import mtlsam_fast
from mtlsam_fast import ops

# --- validation: clear errors from metadata, before anything changes -----------------------


def test_bad_shapes_and_dtypes_raise():
    with pytest.raises(ValueError, match="2 dimensions"):
        ops.gram(torch.zeros(3))
    with pytest.raises(TypeError, match="unsupported dtype"):
        ops.gram(torch.zeros(2, 3, dtype=torch.int64))
    A = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="must match"):
        ops.diff_gram(A, torch.zeros(2, 4))
    with pytest.raises(ValueError, match="K=2"):
        ops.combine(torch.ones(3), A)
    with pytest.raises(ValueError, match="together"):
        ops.combine(torch.ones(2), A, w2=torch.ones(2))
    with pytest.raises(ValueError, match="square"):
        ops.solve_qp(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="lower"):
        ops.solve_qp(torch.eye(2), lower=torch.zeros(3), constraint="lower")
    with pytest.raises(ValueError, match="constraint"):
        ops.solve_qp(torch.eye(2), constraint="box")
    theta = torch.zeros(4)
    with pytest.raises(ValueError, match="together"):
        ops.perturb(theta, theta.clone(), torch.tensor([0, 4]), direction=torch.ones(4))
    with pytest.raises(TypeError, match="offsets"):
        ops.segment_norms(theta, torch.tensor([0.0, 4.0]))


def test_mixed_devices_raise_before_work():
    A = torch.zeros(2, 3)
    B = torch.zeros(2, 3, device="meta")
    with pytest.raises(ValueError, match="different devices"):
        ops.diff_gram(A, B)
    assert torch.equal(A, torch.zeros(2, 3))


# --- backend selection -----------------------------------------------------------------------


def test_unknown_backend_lists_known_ones():
    with pytest.raises(ValueError, match=r"unknown backend 'fast'.*torch"):
        ops.gram(torch.zeros(2, 2), backend="fast")
    with pytest.raises(ValueError, match="unknown backend"):
        mtlsam_fast.set_backend("nope")


def test_unavailable_backend_names_what_is_available():
    if "cuda" in mtlsam_fast.available_backends("cpu"):
        pytest.skip("cuda backend accepts CPU tensors here")
    with pytest.raises(RuntimeError, match=r"not available.*available here: .*torch"):
        ops.gram(torch.zeros(2, 2), backend="cuda")


def test_default_backend_from_env_and_set_backend(monkeypatch):
    monkeypatch.setenv("MTLSAM_BACKEND", "torch")
    assert mtlsam_fast.get_backend() == "torch"
    mtlsam_fast.set_backend("auto")
    assert mtlsam_fast.get_backend() == "auto"
    mtlsam_fast.set_backend(None)
    assert mtlsam_fast.get_backend() == "torch"
    monkeypatch.setenv("MTLSAM_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MTLSAM_BACKEND"):
        ops.gram(torch.zeros(2, 2))


def test_available_backends_always_has_torch():
    assert "torch" in mtlsam_fast.available_backends()
    assert "torch" in mtlsam_fast.available_backends("cpu")


def _fake_backend(name: str, device_type: str):
    """A stand-in backend module: available on ``device_type`` only; its ops return its name."""
    import types

    mod = types.ModuleType(f"fake_{name}")
    mod.unavailable_reason = lambda t: None if t == device_type else "elsewhere"
    mod.gram = mod.min_norm_aggregate = mod.diff_gram = lambda *a: name
    return mod


@pytest.mark.parametrize(
    ("dtype", "K", "expected"),
    [
        (torch.bfloat16, 64, "triton"),
        (torch.float16, 9, "triton"),  # tensor cores, measured 8-17x
        (torch.bfloat16, 8, "cuda"),
        (torch.float16, 1, "cuda"),  # the CUDA kernel is faster here
        (torch.float32, 32, "cuda"),
        (torch.float32, 64, "triton"),  # measured 1.3x / 1.28x
        (torch.float64, 64, "cuda"),  # (the backends pass fp64 on to torch)
    ],
)
def test_auto_picks_the_gram_backend_by_dtype_and_rows(monkeypatch, dtype, K, expected):
    from mtlsam_fast.ops import _registry

    fakes = {n: _fake_backend(n, "cuda") for n in ("cuda", "triton")}
    monkeypatch.setattr(_registry, "_modules", {**_registry._modules, **fakes})
    dev = torch.device("cuda")
    assert _registry.resolve("auto", dev, "gram", dtype, K).gram() == expected
    assert _registry.resolve(None, dev, "gram", dtype, K).gram() == expected
    # only the Gram and MGDA's fused path (which follows its Gram) are chosen by shape
    assert _registry.resolve("auto", dev, "min_norm_aggregate", dtype, K).gram() == expected
    assert _registry.resolve("auto", dev, "diff_gram", dtype, K).diff_gram() == "cuda"
    # an explicit backend is never overridden; without Triton, "auto" falls back to the order
    assert _registry.resolve("cuda", dev, "gram", dtype, K).gram() == "cuda"
    monkeypatch.setitem(_registry._modules, "triton", None)
    monkeypatch.setitem(_registry._import_errors, "triton", "ImportError: no triton")
    assert _registry.resolve("auto", dev, "gram", dtype, K).gram() == "cuda"


def test_ops_pass_dtype_and_rows_to_the_choice(monkeypatch):
    from mtlsam_fast.ops import _registry

    seen = []
    real = _registry.auto_order

    def spy(device_type, op, dtype=None, K=None):
        seen.append((op, dtype, K))
        return real(device_type, op, dtype, K)

    monkeypatch.setattr(_registry, "auto_order", spy)
    G = torch.randn(5, 33, dtype=torch.bfloat16)
    ops.gram(G, backend="auto")
    ops.min_norm_aggregate(G, torch.empty(33, dtype=torch.bfloat16), backend="auto")
    assert seen == [("gram", torch.bfloat16, 5), ("min_norm_aggregate", torch.bfloat16, 5)]


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, mtlsam_fast; print('triton' in sys.modules, 'mtlsam_fast._C' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_min_norm_aggregate_validates_before_work():
    G, out = torch.randn(3, 10), torch.full((10,), 7.0)
    with pytest.raises(ValueError, match=r"out must have shape \(10,\)"):
        ops.min_norm_aggregate(G, torch.zeros(11))
    with pytest.raises(ValueError, match="2 dimensions"):
        ops.min_norm_aggregate(G[0], out)
    with pytest.raises(TypeError, match="unsupported dtype"):
        ops.min_norm_aggregate(G, out.int())
    assert torch.equal(out, torch.full((10,), 7.0))


# --- sync-freedom ----------------------------------------------------------------------------


def test_aggregation_pipeline_compiles_without_graph_breaks():
    """gram -> MGDA (QP) -> combine traces as one graph: no host reads of tensor values."""
    torch._dynamo.reset()
    w = mtlsam_fast.weighting.get("mgda")
    offsets = torch.tensor([0, 30, 64])

    def step(G, theta, backup):
        gram = ops.gram(G, backend="torch")
        weights = w(gram)
        d = ops.combine(weights, G, backend="torch")
        norms = ops.segment_norms(d, offsets, backend="torch")
        scale = 0.05 / norms.pow(2).sum().sqrt()
        return ops.perturb(theta, backup, offsets, d, scale, backend="torch")

    G, backup = torch.randn(3, 64), torch.randn(64)
    eager = step(G, backup.clone(), backup)
    compiled = torch.compile(step, fullgraph=True, backend="eager")(G, backup.clone(), backup)
    torch.testing.assert_close(compiled, eager)


@pytest.mark.gpu
def test_no_host_sync_on_cuda():
    G = torch.randn(4, 4096, device="cuda")
    offsets = torch.tensor([0, 1000, 4096], device="cuda")
    backup = torch.randn(4096, device="cuda")
    w = mtlsam_fast.weighting.get("mgda")
    ops.gram(G)  # warm-up (lazy init, library loading)
    ops.segment_norms(G[0], offsets)  # a new offsets tensor: its one host read
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        gram = ops.gram(G, backend="torch")
        weights = w(gram)
        d = ops.combine(weights, G, backend="torch")
        scale = 0.05 / ops.segment_norms(d, offsets, backend="torch").pow(2).sum().sqrt()
        ops.perturb(
            backup.clone(), backup, offsets, d, scale, noise_scale=scale, seed=1, backend="torch"
        )
    finally:
        torch.cuda.set_sync_debug_mode(0)
