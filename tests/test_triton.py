"""What only the Triton backend has: its interpreter mode, its workspaces, the fused two-launch
aggregation, the launch configuration, ahead-of-time compilation. Its ops against the oracle are
in ``test_ops_conformance.py`` (with every other backend).

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
