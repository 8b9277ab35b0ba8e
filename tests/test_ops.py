"""The torch reference ops against fp64 brute force, and the ops layer's validation."""

from __future__ import annotations

import pytest
import torch
from conftest import TOLERANCES

import mtlsam_fast
from mtlsam_fast import ops

KS = [1, 2, 3, 8, 17, 64]
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


def buffer_view(K: int, P: int, dtype: torch.dtype, device) -> torch.Tensor:
    """A [K, P] view with a storage offset and a row stride != P (exercises views)."""
    base = torch.randn(K + 1, P + 7, dtype=torch.float64, device=device).to(dtype)
    return base[1:, 5 : 5 + P]


def close(actual, expected, dtype):
    rtol, atol = TOLERANCES[dtype]
    scale = expected.abs().max().clamp_min(1.0)
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=rtol, atol=atol * float(scale)
    )


def accumulation(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops accumulate in (docs/ARCHITECTURE.md §3.1): a result reduced from the
    16-bit inputs' exact values is held to fp32's tolerance, not to the inputs' (a Gram rounded
    to or accumulated in bf16 passes bf16's 1e-2)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def random_offsets(P: int, S: int, device) -> torch.Tensor:
    cuts = torch.sort(torch.randint(0, P + 1, (S - 1,))).values
    return torch.cat([torch.tensor([0]), cuts, torch.tensor([P])]).to(device)


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [1, 37, 1000])
def test_gram_matches_fp64(K, P, dtype, device):
    G = buffer_view(K, P, dtype, device)
    out = ops.gram(G, backend="torch")
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert out.shape == (K, K)
    assert torch.equal(out, out.T)
    Gd = G.double()
    close(out, Gd @ Gd.T, accumulation(dtype))
    if dtype in (torch.bfloat16, torch.float16) and P == 1000 and K > 1:
        with pytest.raises(AssertionError):  # the tolerance tells a 16-bit Gram apart
            close((G @ G.T).to(out.dtype), Gd @ Gd.T, accumulation(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_diff_gram_updates_a_in_place(dtype, device):
    A = buffer_view(5, 123, dtype, device)
    B = buffer_view(5, 123, dtype, device)
    expected_a = A - B
    ptr = A.data_ptr()
    out = ops.diff_gram(A, B, backend="torch")
    assert A.data_ptr() == ptr
    assert torch.equal(A, expected_a)
    Ad = expected_a.double()
    close(out, Ad @ Ad.T, accumulation(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [None, 3])
def test_segment_norms_matches_fp64(dtype, rows, device):
    P, S = 301, 7
    offsets = random_offsets(P, S, device)
    x = buffer_view(rows or 1, P, dtype, device)
    x = x[0] if rows is None else x
    weight = torch.randn(P, device=device).to(dtype)
    for w in (None, weight):
        out = ops.segment_norms(x, offsets, weight=w, backend="torch")
        xd = x.double() * (1.0 if w is None else w.double())
        expected = torch.stack(
            [xd[..., offsets[i] : offsets[i + 1]].pow(2).sum(-1).sqrt() for i in range(S)], -1
        )
        assert out.shape == expected.shape
        close(out, expected, accumulation(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("two_sets", [False, True])
def test_combine_matches_fp64(dtype, two_sets, device):
    K, P = 6, 513
    G = buffer_view(K, P, dtype, device)
    w = torch.rand(K, device=device)
    expected = w.double() @ G.double()
    kwargs = {}
    if two_sets:
        H = buffer_view(3, P, dtype, device)
        w2 = torch.rand(3, device=device)
        kwargs = {"w2": w2, "H": H}
        expected = expected + w2.double() @ H.double()
    out = ops.combine(w, G, **kwargs, dtype=torch.float32, backend="torch")
    assert out.dtype == torch.float32
    close(out, expected, torch.float32 if dtype == torch.float64 else dtype)
    buf = torch.empty(P, dtype=dtype, device=device)
    assert ops.combine(w, G, **kwargs, out=buf, backend="torch") is buf
    assert buf.dtype == dtype


@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_subtract_updates_out(dtype, device):
    K, P = 3, 1000
    G = buffer_view(K, P, dtype, device)
    w = torch.rand(
        K, device=device, dtype=torch.float64 if dtype == torch.float64 else torch.float32
    )
    out0 = torch.randn(P, device=device).to(dtype)
    out = out0.clone()
    assert ops.combine(w, G, out=out, subtract=True) is out
    close(out, out0.double() - w.double() @ G.double(), dtype)
    with pytest.raises(ValueError, match="subtract needs out"):
        ops.combine(w, G, subtract=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("adaptive", [False, True])
def test_perturb_and_restore(dtype, adaptive, device):
    P, S = 257, 5
    offsets = random_offsets(P, S, device)
    backup = torch.randn(P, device=device).to(dtype)
    theta = backup.clone()
    direction = torch.randn(P, device=device).to(dtype)
    scale = torch.rand(S, device=device)
    noise_scale = torch.rand(S, device=device)
    ops.perturb(
        theta,
        backup,
        offsets,
        direction,
        scale,
        adaptive=adaptive,
        noise_scale=noise_scale,
        seed=11,
        noise_offset=3,
        backend="torch",
    )
    lengths = offsets.diff()
    s = scale.double().repeat_interleave(lengths)
    ns = noise_scale.double().repeat_interleave(lengths)
    step = direction.double() * (backup.double() ** 2 if adaptive else 1.0)
    z = ops.gaussian_noise(11, 3, P, device=device, backend="torch").double()
    close(theta, backup.double() + s * step + ns * z, dtype)
    ops.restore(theta, backup)
    assert torch.equal(theta, backup)


def test_perturb_is_recomputed_from_backup(device):
    """Perturbing twice gives the same bits: theta is rebuilt from the backup every time."""
    P = 100
    offsets = torch.tensor([0, 40, 100], device=device)
    backup = torch.randn(P, device=device)
    d, s = torch.randn(P, device=device), torch.tensor(0.3, device=device)
    t1 = ops.perturb(backup.clone(), backup, offsets, d, s).clone()
    t2 = ops.perturb(t1, backup, offsets, d, s)
    assert torch.equal(t1, t2)


def test_gaussian_noise_is_counter_based(device):
    z = ops.gaussian_noise(5, 0, 4096, device=device)
    assert z.dtype == torch.float32
    assert torch.equal(ops.gaussian_noise(5, 1000, 96, device=device), z[1000:1096])
    assert not torch.equal(ops.gaussian_noise(6, 0, 4096, device=device), z)
    big = ops.gaussian_noise(5, (1 << 32) + 17, 64, device=device)  # 64-bit counters
    assert torch.isfinite(big).all() and not torch.equal(big, z[17:81])
    many = ops.gaussian_noise(1, 0, 1 << 18, device=device)
    assert abs(many.mean().item()) < 0.01 and abs(many.std().item() - 1) < 0.01


def test_noise_stats_matches_brute_force(device):
    P, S = 333, 6
    offsets = random_offsets(P, S, device)
    ref = torch.randn(P, device=device)
    stats = ops.noise_stats(9, 77, ref, offsets)
    z = ops.gaussian_noise(9, 77, P, device=device).double()
    expected = torch.stack(
        [
            torch.stack([z[offsets[i] : offsets[i + 1]].pow(2).sum() for i in range(S)]),
            torch.stack([(z * ref.double())[offsets[i] : offsets[i + 1]].sum() for i in range(S)]),
        ]
    )
    close(stats, expected, torch.float32)


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
    # only the Gram (and MGDA's fused path, which resolves as "gram") is chosen by shape
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
    assert seen[0] == ("gram", torch.bfloat16, 5) and ("gram", torch.bfloat16, 5) in seen[1:]


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_auto_and_torch_agree(backend):
    G = torch.randn(4, 99)
    torch.testing.assert_close(
        ops.gram(G, backend=backend), ops.gram(G, backend="torch"), rtol=1e-5, atol=1e-5
    )


def test_import_is_light():
    import subprocess
    import sys

    code = (
        "import sys, mtlsam_fast; print('triton' in sys.modules, 'mtlsam_fast._C' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 3, 17])
@pytest.mark.parametrize("subtract", [False, True])
def test_min_norm_aggregate_is_mgda_then_combine(K, dtype, subtract, backend, device):
    """gram -> simplex QP -> combine in one call (fused on the GPU backends), against fp64 math."""
    P = 301
    G = buffer_view(K, P, dtype, device)
    out0 = torch.randn(P, dtype=torch.float64, device=device).to(dtype)
    out = out0.clone()
    res = ops.min_norm_aggregate(G, out, subtract=subtract, backend=backend)
    g64 = G.double() @ G.double().T
    close(res.gram, g64, dtype)
    assert res.weights.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert res.weights.shape == (K,) and float(ops.kkt_residual(g64, res.weights.double())) <= 1e-5
    d = res.weights.double() @ G.double()
    expected = out0.double() - d if subtract else d
    close(out, expected.to(dtype), dtype)


def test_min_norm_aggregate_min_norm_point_and_nonfinite(device):
    # two opposite gradients plus a third: the min-norm point of {a, -a, b} is 0 (w = (1/2, 1/2, 0))
    a, b = torch.randn(50, device=device), torch.randn(50, device=device)
    G = torch.stack([a, -a, b])
    out = torch.empty(50, device=device)
    w = ops.min_norm_aggregate(G, out).weights
    torch.testing.assert_close(w.cpu(), torch.tensor([0.5, 0.5, 0.0]), atol=1e-5, rtol=0)
    assert float(out.abs().max()) <= 1e-5 * float(a.abs().max())
    G[2, 7] = float("nan")
    assert torch.isnan(ops.min_norm_aggregate(G, out).weights).all() and torch.isnan(out).any()


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


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("per_segment", [False, True])
def test_perturb_noise_stats_is_perturb_then_noise_stats(backend, dtype, per_segment, device):
    P, S = 70_001, 5  # pieces across the kernels' 32768-element chunks
    offsets = random_offsets(P, S, device)
    backup = torch.randn(P, device=device).to(dtype)
    ref = torch.randn(P, device=device).to(dtype)
    ns = torch.rand(S, device=device) if per_segment else torch.tensor(0.3, device=device)
    theta = torch.empty_like(backup)
    stats = ops.perturb_noise_stats(
        theta, backup, offsets, ns, ref, seed=4, noise_offset=2**33 + 1, backend=backend
    )
    expected_theta = ops.perturb(
        torch.empty_like(backup),
        backup,
        offsets,
        noise_scale=ns,
        seed=4,
        noise_offset=2**33 + 1,
        backend=backend,
    )
    assert torch.equal(theta, expected_theta)
    torch.testing.assert_close(
        stats, ops.noise_stats(4, 2**33 + 1, ref, offsets, backend=backend), rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="ref shape"):
        ops.perturb_noise_stats(theta, backup, offsets, ns, ref[1:], backend=backend)
