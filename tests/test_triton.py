"""The Triton backend against the torch oracle, on the CPU through the Triton interpreter.

Without CUDA this module sets ``TRITON_INTERPRET=1`` before Triton is imported (programs then run
serially in numpy, so sizes stay small). With CUDA the same tests run compiled on the GPU.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton fixes interpreted vs compiled mode when it is imported; something imported it
        # first.
        pytest.skip(
            "triton was imported before TRITON_INTERPRET=1 could be set: run with "
            "TRITON_INTERPRET=1 in the environment (or set it in tests/conftest.py)",
            allow_module_level=True,
        )
    os.environ["TRITON_INTERPRET"] = "1"

pytest.importorskip("triton")

from mtlsam_fast import ops  # noqa: E402
from mtlsam_fast.ops import triton_backend  # noqa: E402
from mtlsam_fast.triton_kernels import _config, _workspace  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")
KS = [1, 2, 3, 8, 17, 64]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
#: one ulp of the stored dtype, relative (outputs written in 16-bit may differ by rounding)
ULP = {torch.float32: 2e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10, torch.float64: 1e-12}
ROOT = Path(__file__).resolve().parents[1]


def view(K: int, P: int, dtype: torch.dtype) -> torch.Tensor:
    """A [K, P] view with a storage offset and a row stride != P."""
    base = torch.randn(K + 1, P + 7, dtype=torch.float64, device=DEV).to(dtype)
    return base[1:, 5 : 5 + P]


def assert_close(actual, expected, rtol, what=""):
    a, e = actual.double(), expected.double()
    scale = max(float(e.abs().max()) if e.numel() else 1.0, 1.0)
    err = float((a - e).abs().max()) if e.numel() else 0.0
    assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:.1e} * {scale:.3e}"


def offsets_for(P: int, cuts: list[int]) -> torch.Tensor:
    return torch.tensor([0, *cuts, P], dtype=torch.int64, device=DEV)


# --- registry ---------------------------------------------------------------------------------


def test_backend_is_available_in_interpreter_mode_only(monkeypatch):
    import mtlsam_fast
    from mtlsam_fast.ops._registry import resolve

    # CPU tensors: only interpreted (TRITON_INTERPRET=1, set without a GPU)
    assert (triton_backend.unavailable_reason("cpu") is None) == _config.INTERPRET
    assert triton_backend.unavailable_reason("mps") is not None
    assert "triton" in mtlsam_fast.available_backends(DEV)
    # "auto" never picks triton for CPU tensors
    assert resolve("auto", torch.device("cpu"), "gram").__name__ != triton_backend.__name__
    monkeypatch.setattr(_config, "INTERPRET", False)  # as in a normal (compiled) process
    assert "TRITON_INTERPRET" in triton_backend.unavailable_reason("cpu")
    with pytest.raises(RuntimeError, match="not available"):
        ops.gram(torch.zeros(2, 3), backend="triton")


# --- Gram -------------------------------------------------------------------------------------


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("P", [1, 7, 101])
def test_gram_matches_oracle(K, P, dtype):
    G = view(K, P, dtype)
    out = ops.gram(G, backend="triton")
    assert out.dtype == torch.float32 and out.shape == (K, K)
    assert torch.equal(out, out.T)
    assert_close(out, ops.gram(G, backend="torch"), 1e-5, f"gram K={K} P={P} {dtype}")


def test_gram_column_strided_view_and_determinism():
    G = torch.randn(211, 5, device=DEV).T  # column stride 5
    a = ops.gram(G, backend="triton")
    b = ops.gram(G, backend="triton")
    assert torch.equal(a, b)
    assert_close(a, ops.gram(G, backend="torch"), 1e-5, "strided gram")


def test_gram_uses_several_programs_and_reuses_its_workspace():
    from mtlsam_fast.triton_kernels import gram as gk

    G = torch.randn(3, 1000, device=DEV)
    cfg = gk.gram_config(G)
    _, _, _, nprog = gk.launch_params(G, cfg)
    assert nprog > 1  # the deterministic second pass really reduces several partials
    ops.gram(G, backend="triton")
    n_ws = len(_workspace._cache)
    ops.gram(G, backend="triton")
    assert len(_workspace._cache) == n_ws


def test_gram_fp64_falls_back_to_fp64_accumulation():
    G = view(3, 50, torch.float64)
    out = ops.gram(G, backend="triton")
    assert out.dtype == torch.float64
    assert_close(out, G @ G.T, 1e-12, "fp64")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K", [1, 3, 17])
def test_diff_gram_updates_a_and_returns_its_gram(K, dtype):
    A, B = view(K, 77, dtype), view(K, 77, dtype)
    expected_a = A - B
    ptr = A.data_ptr()
    out = ops.diff_gram(A, B, backend="triton")
    assert A.data_ptr() == ptr
    if (
        _config.INTERPRET and dtype == torch.bfloat16
    ):  # the interpreter's bf16 store may truncate: 1 ulp
        torch.testing.assert_close(A, expected_a, rtol=ULP[dtype], atol=0)
    else:  # compiled: A - B in fp32 rounded to A's dtype, exactly torch.sub_
        assert torch.equal(A, expected_a)
    assert_close(out, ops.gram(A.clone(), backend="torch"), 1e-5, "diff_gram")


# --- segmented norms --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows", [None, 1, 3, 17])
@pytest.mark.parametrize("weighted", [False, True])
def test_segment_norms_match_oracle(dtype, rows, weighted):
    P = 150
    x = view(rows or 1, P, dtype)
    if rows is None:
        x = x[0]
    offsets = offsets_for(P, [1, 1, 70, 149])  # an empty segment, a 1-element one, odd sizes
    weight = torch.randn(P + 3, device=DEV).to(dtype)[3:] if weighted else None
    out = ops.segment_norms(x, offsets, weight=weight, backend="triton")
    ref = ops.segment_norms(x, offsets, weight=weight, backend="torch")
    assert out.shape == ref.shape and out.dtype == torch.float32
    assert_close(out, ref, 1e-5, "segment_norms")


def test_segmented_ops_on_random_layouts():
    """Blocks spanning many segments, empty segments, segments spanning many blocks."""
    gen = torch.Generator().manual_seed(3)
    for P, S in [(5, 7), (64, 1), (300, 9), (257, 40)]:
        cuts = torch.sort(torch.randint(0, P + 1, (S - 1,), generator=gen)).values.tolist()
        offsets = offsets_for(P, cuts)
        x = torch.randn(2, P, generator=gen).to(DEV)
        assert_close(
            ops.segment_norms(x, offsets, backend="triton"),
            ops.segment_norms(x, offsets, backend="torch"),
            1e-5,
            f"norms P={P} S={S}",
        )
        scale = torch.rand(S, generator=gen).to(DEV)
        a, b = torch.empty(P, device=DEV), torch.empty(P, device=DEV)
        ops.perturb(a, x[0], offsets, x[1], scale, noise_scale=scale, seed=2, backend="triton")
        ops.perturb(b, x[0], offsets, x[1], scale, noise_scale=scale, seed=2, backend="torch")
        assert_close(a, b, 1e-5, f"perturb P={P} S={S}")
        assert_close(
            ops.noise_stats(1, 3, x[0], offsets, backend="triton"),
            ops.noise_stats(1, 3, x[0], offsets, backend="torch"),
            1e-5,
            f"noise_stats P={P} S={S}",
        )


def test_segment_norms_single_small_segment():
    x = torch.randn(5, device=DEV)
    out = ops.segment_norms(x, offsets_for(5, []), backend="triton")
    assert_close(out, x.norm().reshape(1), 1e-6, "tiny")


# --- combine ----------------------------------------------------------------------------------


@pytest.mark.parametrize("K", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_combine_matches_oracle(K, dtype):
    P = 97
    G = view(K, P, dtype)
    w = torch.rand(K, device=DEV)
    out = ops.combine(w, G, backend="triton")
    ref = ops.combine(w, G, dtype=torch.float32, backend="torch")
    assert out.dtype == dtype
    assert_close(out, ref, 1e-5 + 2 * ULP[dtype], f"combine K={K} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_combine_two_sets_into_a_strided_output_of_another_dtype(dtype):
    P = 130
    G, H = view(3, P, dtype), view(5, P, dtype)
    w, w2 = torch.rand(3, device=DEV), torch.rand(5, device=DEV)
    base = torch.zeros(2 * P + 1, dtype=torch.float16, device=DEV)
    out = base[1::2]  # a view with an offset and stride 2
    ops.combine(w, G, w2, H, out=out, backend="triton")
    ref = ops.combine(w, G, w2, H, dtype=torch.float32, backend="torch")
    assert_close(out, ref, 1e-5 + 2 * ULP[torch.float16], "combine 2 sets")
    assert torch.all(base[0::2] == 0)


# --- noise ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "seed,offset", [(0, 0), (123, 2**32 - 50), (2**40 + 3, 17), (2**63 + 5, 2**45)]
)
def test_gaussian_noise_matches_the_spec(seed, offset):
    z = ops.gaussian_noise(seed, offset, 300, device=DEV, backend="triton")
    ref = ops.gaussian_noise(seed, offset, 300, device=DEV, backend="torch")
    assert z.dtype == torch.float32 and z.shape == (300,)
    torch.testing.assert_close(z, ref, rtol=1e-5, atol=1e-5)
    # counter-based: a slice of the stream is the stream of the shifted offset
    part = ops.gaussian_noise(seed, offset + 100, 50, device=DEV, backend="triton")
    assert torch.equal(part, z[100:150])


def test_noise_stats_match_oracle():
    P = 203
    ref_vec = view(1, P, torch.bfloat16)[0]
    offsets = offsets_for(P, [0, 64, 65, 200])
    out = ops.noise_stats(9, 2**33 + 1, ref_vec, offsets, backend="triton")
    exp = ops.noise_stats(9, 2**33 + 1, ref_vec, offsets, backend="torch")
    assert out.shape == (2, 5)
    assert_close(out, exp, 1e-5, "noise_stats")


# --- perturb ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["sam", "asam", "noise", "sam+noise", "scalar"])
def test_perturb_matches_oracle(dtype, mode):
    P = 157
    buf = torch.zeros(P + 9, dtype=dtype, device=DEV)
    theta = buf[4 : 4 + P]  # a view with a storage offset
    backup = view(1, P, dtype)[0]
    direction = view(1, P, dtype)[0]
    offsets = offsets_for(P, [3, 3, 90])
    S = offsets.numel() - 1
    scale = torch.rand(S, device=DEV) if mode != "scalar" else torch.tensor(0.3, device=DEV)
    kwargs = {}
    if mode in ("sam", "asam", "sam+noise", "scalar"):
        kwargs.update(direction=direction, scale=scale)
    if "noise" in mode:
        kwargs.update(noise_scale=torch.rand(S, device=DEV), seed=77, noise_offset=2**32 + 3)
    adaptive = mode == "asam"
    ops.perturb(theta, backup, offsets, adaptive=adaptive, backend="triton", **kwargs)
    expected = torch.empty_like(theta)
    ops.perturb(expected, backup, offsets, adaptive=adaptive, backend="torch", **kwargs)
    assert_close(theta, expected, 1e-5 + 2 * ULP[dtype], f"perturb {mode} {dtype}")
    assert torch.all(buf[:4] == 0) and torch.all(buf[4 + P :] == 0)
    ops.restore(theta, backup)
    assert torch.equal(theta, backup)


# --- QP ---------------------------------------------------------------------------------------


def _random_gram(B: int, K: int, rank: int, scales=None) -> torch.Tensor:
    A = torch.randn(B, K, rank, dtype=torch.float64)
    if scales is not None:
        A = A * scales[:, None]
    return (A @ A.transpose(1, 2)).to(DEV)


QP_CASES = [  # (K, batch): K = 64 is slow in the interpreter (serial fp64 sweeps)
    (1, 2),
    (2, 3),
    (3, 2),
    (8, 2),
    (17, 1),
    (64, 1),
]


@pytest.mark.parametrize("K,B", QP_CASES)
def test_qp_simplex_meets_the_kkt_target(K, B):
    gram = _random_gram(B, K, max(1, K // 2)).float()  # rank deficient
    v = ops.solve_qp(gram, backend="triton")
    assert v.shape == (B, K) and v.dtype == torch.float32
    assert torch.all(v >= 0)
    torch.testing.assert_close(v.sum(-1), torch.ones(B, device=DEV), rtol=0, atol=1e-6)
    assert float(ops.kkt_residual(gram, v).max()) <= 1e-5
    if K == 1:
        assert torch.all(v == 1)


@pytest.mark.parametrize("K", [3, 17])
def test_qp_badly_scaled_and_linear_term(K):
    scales = torch.logspace(-6, 6, K, dtype=torch.float64)  # Gamma diagonal spans 1e-12 ... 1e12
    gram = _random_gram(2, K, K, scales)
    q = torch.randn(2, K, dtype=torch.float64, device=DEV)
    v = ops.solve_qp(gram, q, backend="triton")
    assert v.dtype == torch.float64
    assert float(ops.kkt_residual(gram, v, q).max()) <= 1e-5


@pytest.mark.parametrize("K", [2, 8])
def test_qp_lower_bound_matches_reference(K):
    gram = _random_gram(2, K, K).float() + 0.1 * torch.eye(K, device=DEV)
    q = -torch.randn(2, K, device=DEV)
    lower = torch.rand(2, K, device=DEV) * 0.1
    v = ops.solve_qp(gram, q, lower, constraint="lower", backend="triton")
    assert torch.all(v >= lower)
    assert float(ops.kkt_residual(gram, v, q, lower, constraint="lower").max()) <= 1e-5
    ref = ops.solve_qp(gram, q, lower, constraint="lower", backend="torch")
    torch.testing.assert_close(v, ref, rtol=1e-4, atol=1e-5)  # strictly convex: unique optimum


def test_qp_norm_objective_cagrad():
    K = 5
    gram = _random_gram(2, K, K)
    q = torch.randn(2, K, dtype=torch.float64, device=DEV)
    r = torch.tensor([0.5, 2.0], dtype=torch.float64, device=DEV)
    v = ops.solve_qp(gram, q, norm_coef=r, backend="triton")
    assert float(ops.kkt_residual(gram, v, q, norm_coef=r).max()) <= 1e-5


def test_qp_edge_cases_identical_zero_and_nonfinite():
    K = 4
    ident = torch.ones(K, K, device=DEV) * 3.0  # identical gradients
    zero = torch.zeros(K, K, device=DEV)
    bad = torch.eye(K, device=DEV)
    bad[1, 2] = float("nan")
    batch = torch.stack([ident, zero, bad])
    v = ops.solve_qp(batch, backend="triton")
    assert torch.isfinite(v[:2]).all()
    torch.testing.assert_close(v[:2].sum(-1), torch.ones(2, device=DEV))
    assert torch.isnan(v[2]).all()


def test_qp_batch_shape_is_kept():
    gram = _random_gram(2, 3, 3).float().reshape(2, 1, 3, 3)
    v = ops.solve_qp(gram, backend="triton")
    assert v.shape == (2, 1, 3)
    assert float(ops.kkt_residual(gram, v).max()) <= 1e-5


# --- fused aggregation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "K,dtype", [(1, torch.float32), (3, torch.bfloat16), (17, torch.float32), (8, torch.float16)]
)
def test_fused_aggregate_matches_unfused(K, dtype):
    P = 141
    G, H = view(K, P, dtype), view(K, P, dtype)
    out = torch.empty(P, dtype=dtype, device=DEV)
    theta = torch.randn(P, device=DEV)
    theta0 = theta.clone()
    lr = torch.tensor([0.1], device=DEV)
    res = triton_backend.fused_aggregate(G, H, out=out, theta=theta, lr=lr)
    gram, gram2 = ops.gram(G, backend="torch"), ops.gram(H, backend="torch")
    assert_close(res.gram, gram, 1e-5, "fused gram")
    assert_close(res.gram2, gram2, 1e-5, "fused gram2")
    assert float(ops.kkt_residual(gram, res.weights)) <= 1e-5
    assert float(ops.kkt_residual(gram2, res.weights2)) <= 1e-5
    d = ops.combine(res.weights, G, res.weights2, H, dtype=torch.float32, backend="torch")
    assert_close(out, d, 1e-5 + 2 * ULP[dtype], "fused direction")
    assert_close(theta, theta0 - 0.1 * d, 1e-5, "fused update")
    # the ticket counter reset itself: a second call (like a graph replay) gives the same answer
    again = triton_backend.fused_aggregate(G, H)
    assert torch.equal(again.gram, res.gram) and torch.equal(again.weights, res.weights)
    assert again.direction is None


@pytest.mark.filterwarnings("ignore:invalid value encountered")
def test_fused_aggregate_nonfinite_gives_nan_weights():
    G = view(3, 40, torch.float32).clone()
    G[1, 5] = float("inf")
    res = triton_backend.fused_aggregate(G)
    assert torch.isnan(res.weights).all()


def test_fused_aggregate_validates_before_work():
    G = view(3, 40, torch.float32)
    with pytest.raises(ValueError, match="theta and lr"):
        triton_backend.fused_aggregate(G, theta=torch.zeros(40, device=DEV))
    with pytest.raises(ValueError, match="H must match"):
        triton_backend.fused_aggregate(G, view(3, 41, torch.float32))


@pytest.mark.parametrize("K,dtype", [(2, torch.float32), (8, torch.bfloat16)])
@pytest.mark.parametrize("subtract", [False, True])
def test_min_norm_aggregate_takes_the_fused_path(K, dtype, subtract, monkeypatch):
    import mtlsam_fast.triton_kernels.fused as fused

    calls = []
    real = fused.fused_aggregate
    monkeypatch.setattr(
        fused, "fused_aggregate", lambda *a, **kw: calls.append(kw) or real(*a, **kw)
    )
    G = view(K, 97, dtype)
    out0 = torch.randn(97, device=DEV)
    out = out0.clone()
    res = ops.min_norm_aggregate(G, out, subtract=subtract, backend="triton")
    assert len(calls) == 1 and (calls[0]["theta"] is not None) == subtract
    ref = ops.min_norm_aggregate(G, out0.clone(), backend="torch")
    assert_close(res.gram, ref.gram, 1e-5, "gram")
    assert float(ops.kkt_residual(ref.gram, res.weights)) <= 1e-5
    d = ops.combine(res.weights, G, dtype=torch.float32, backend="torch")
    assert_close(out, out0 - d if subtract else d, 1e-5, "direction")


def test_min_norm_aggregate_fp64_keeps_fp64_weights():
    G = view(3, 50, torch.float64)
    res = ops.min_norm_aggregate(
        G, torch.empty(50, dtype=torch.float64, device=DEV), backend="triton"
    )
    assert res.weights.dtype == torch.float64


# --- configuration ----------------------------------------------------------------------------


def test_pin_config_and_env_parsing(monkeypatch):
    monkeypatch.setenv("MTLSAM_TRITON_PIN", "gram:BLOCK_P=128,num_warps=4;combine:KC=4")
    assert _config.pinned("gram")["BLOCK_P"] == 128 and _config.pinned("combine")["KC"] == 4
    monkeypatch.setenv("MTLSAM_TRITON_PIN", "gram:BLOCK_P")
    with pytest.raises(ValueError, match="MTLSAM_TRITON_PIN"):
        _config.pinned("gram")
    monkeypatch.delenv("MTLSAM_TRITON_PIN")
    triton_backend.pin_config("qp", num_warps=2)
    try:
        assert _config.pinned("qp")["num_warps"] == 2
    finally:
        _config.unpin_config("qp")
    assert _config.pinned("qp") is None
    with pytest.raises(ValueError, match="unknown kernel family"):
        triton_backend.pin_config("nope", BLOCK_P=1)


# --- the kernels compile for Hopper (no GPU needed) -------------------------------------------


def test_kernels_compile_for_sm90():
    """Ahead-of-time compilation for sm_90 catches what the interpreter cannot (compiled-dialect
    typing, shared memory); it needs Triton's NVIDIA backend (ptxas ships with the wheel)."""
    import triton

    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    if not ptxas.exists():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "mtlsam_fast.triton_kernels.aot_check", "--quick"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.stdout.count("ok ") >= 10


# --- the GPU benchmark script runs (trivially small) ------------------------------------------


def test_gpu_benchmark_script_runs_small():
    env = dict(os.environ)
    if not HAS_CUDA:
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_triton_gpu.py"), "--smoke"],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gram" in proc.stdout and "GB/s" in proc.stdout and "qp" in proc.stdout
