"""Shared test fixtures: devices (CUDA when present), dtypes and tolerances, the ``gpu`` marker."""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    # Triton picks interpreted or compiled mode when first imported: without a GPU, run its
    # kernels on CPU tensors in the interpreter (set before any test module imports Triton).
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
FLOAT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]

#: (rtol, atol) for comparing a backend's result with the fp64 brute force, by input dtype.
TOLERANCES = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (1e-2, 1e-2),
    torch.float16: (2e-3, 2e-3),
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running (deselect with -m 'not slow')")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=DEVICES)
def device(request: pytest.FixtureRequest) -> torch.device:
    return torch.device(request.param)


@pytest.fixture(autouse=True)
def _seed_and_backend():
    torch.manual_seed(0)
    import mtlsam_fast

    mtlsam_fast.set_backend(None)
    yield
    mtlsam_fast.set_backend(None)
