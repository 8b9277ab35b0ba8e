"""pytest-benchmark microbenchmarks: every op x available backend x dtype x K x P, plus baselines.

Run:  ``pytest bench/test_bench_ops.py`` (add ``--benchmark-disable`` for a one-shot smoke run,
``--benchmark-json out.json`` to save, ``--benchmark-group-by=group`` is the default grouping here).
Sizes are small by default; override with environment variables::

    export BENCH_THREADS=1 BENCH_DEVICE=cuda BENCH_K=4,16 BENCH_P=16384,262144
    export BENCH_DTYPES=fp32,bf16 BENCH_QP_K=4,16,64

Each benchmark group is one (op, dtype, K, P); inside it the mtlsam_fast backends sit next to the
baselines (``torch.mm``, ``naive``, ...) so pytest-benchmark's table shows the ratios directly.
Nothing here asserts on a time; each benchmark checks what it timed (finite results; the QP's
KKT residual on the backends, docs/ARCHITECTURE.md §4).
"""

from __future__ import annotations

import os

import pytest
import torch

import mtlsam_fast
from bench.common import DTYPES, make_offsets, sync
from bench.report import NO_K, P_OPS, make_gram, p_op_cases, qp_cases


def _ints(name: str, default: str) -> list[int]:
    return [int(float(x)) for x in os.environ.get(name, default).split(",") if x]


DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))
if os.environ.get("BENCH_THREADS"):
    torch.set_num_threads(
        int(os.environ["BENCH_THREADS"])
    )  # 1 on a shared (oversubscribed) machine
BACKENDS = (
    mtlsam_fast.available_backends(DEVICE)
    if DEVICE.type != "cuda" or torch.cuda.is_available()
    else []
)
KS = _ints("BENCH_K", "4,16")
PS = _ints("BENCH_P", "16384,262144")
QP_KS = _ints("BENCH_QP_K", "4,16,64")
DTYPE_NAMES = [d for d in os.environ.get("BENCH_DTYPES", "fp32,bf16").split(",") if d]
#: baselines per op (as named in bench.report); each appears next to the backends
BASELINES = {
    "gram": ["torch.mm", "naive"],
    "diff_gram": ["torch.mm", "naive"],
    "segment_norms": ["torch.norm-loop", "naive"],
    "combine": ["torch.mm", "naive"],
    "perturb": ["naive"],
    "restore": ["naive"],
    "gaussian_noise": ["torch.randn"],
    "noise_stats": ["naive"],
}


def _p_params():
    for op in P_OPS:
        impls = (["ops"] if op == "restore" else BACKENDS) + BASELINES[op]
        for d in DTYPE_NAMES:
            if op == "gaussian_noise" and d != "fp32":
                continue
            for K in [1] if op in NO_K else KS:
                for P in PS:
                    for impl in impls:
                        yield pytest.param(op, d, K, P, impl, id=f"{op}-{d}-K{K}-P{P}-{impl}")


_cache: dict = {}


def _cases(op, d, K, P):
    key = (op, d, K, P)
    if key not in _cache:
        _cache.clear()  # keep one configuration's buffers alive at a time
        _cache[key] = {
            c.impl: c
            for c in p_op_cases(op, K, P, DTYPES[d], DEVICE, BACKENDS, make_offsets(P), True)
        }
    return _cache[key]


def _run(benchmark, fn):
    if DEVICE.type == "cuda":

        def timed():
            fn()
            sync(DEVICE)

        return benchmark(timed)
    return benchmark(fn)


@pytest.mark.parametrize("op,dtype,K,P,impl", list(_p_params()))
def test_op(benchmark, op, dtype, K, P, impl):
    cases = _cases(op, dtype, K, P)
    if impl not in cases:
        pytest.skip(f"{impl} has no {op} case")
    benchmark.group = f"{op} {dtype} K={K} P={P}"
    benchmark.extra_info.update(
        {
            "op": op,
            "impl": impl,
            "kind": cases[impl].kind,
            "dtype": dtype,
            "K": K,
            "P": P,
            "device": str(DEVICE),
        }
    )
    try:
        out = _run(benchmark, cases[impl].fn)
    except NotImplementedError as e:
        pytest.skip(str(e))
    results = out if isinstance(out, (tuple, list)) else [out]
    assert all(torch.isfinite(r).all() for r in results if isinstance(r, torch.Tensor)), impl


@pytest.mark.parametrize("dtype", ["fp32", "fp64"])
@pytest.mark.parametrize("K", QP_KS)
@pytest.mark.parametrize("impl", [*BACKENDS, "naive-fw", "quadprog", "torchjd-mgda"])
def test_solve_qp(benchmark, impl, K, dtype):
    gram = make_gram(K, DTYPES[dtype], DEVICE)
    cases = {c.impl: c for c in qp_cases(K, gram, BACKENDS, True, True)}
    if impl not in cases:
        pytest.skip(f"{impl} is not installed")
    benchmark.group = f"solve_qp {dtype} K={K}"
    benchmark.extra_info.update(
        {"op": "solve_qp", "impl": impl, "dtype": dtype, "K": K, "device": str(DEVICE)}
    )
    v = cases[impl].result(_run(benchmark, cases[impl].fn))
    assert torch.isfinite(v).all() and abs(float(v.sum()) - 1) < 1e-4, impl
    if cases[impl].kind == "backend":  # the spec's target; the peers are timed, not certified
        assert float(mtlsam_fast.ops.kkt_residual(gram.double(), v.double())) <= 1e-5, impl
