"""The backend contract (``mtlsam_fast.ops._contract.Backend``), checked at registration, and the
observability of the dispatch: which backend ran each op, and every hand-off to the reference."""

from __future__ import annotations

import logging
import types

import pytest
import torch

import mtlsam_fast
from mtlsam_fast import ops
from mtlsam_fast.ops import _contract, _registry
from mtlsam_fast.ops import torch_backend as ref


def _module_like(source: types.ModuleType, name: str, **overrides) -> types.ModuleType:
    """A backend module with ``source``'s ops, some replaced or (``None``) removed."""
    mod = types.ModuleType(name)
    for op in _contract.OPS:
        setattr(mod, op, getattr(source, op))
    for op, fn in overrides.items():
        if fn is None:
            delattr(mod, op)
        else:
            setattr(mod, op, fn)
    return mod


@pytest.fixture
def scratch_registry(monkeypatch):
    """register_backend's effects undone after the test."""
    monkeypatch.setattr(_registry, "BACKEND_MODULES", dict(_registry.BACKEND_MODULES))
    monkeypatch.setattr(_registry, "_modules", dict(_registry._modules))
    monkeypatch.setattr(_registry, "BACKEND_NAMES", _registry.BACKEND_NAMES)


def test_every_backend_of_this_machine_implements_the_contract():
    for name in _registry.BACKEND_MODULES:
        mod = _registry._module(name)  # checked when loaded; None if an import failed
        if mod is not None:
            _contract.check_backend(name, mod)
    assert set(_contract.OPS) - {"unavailable_reason"} <= set(ops.__all__)


def test_a_backend_missing_ops_is_refused(scratch_registry):
    bad = _module_like(ref, "half_done", noise_stats=None, min_norm_aggregate=None)
    with pytest.raises(TypeError, match=r"'half' .*missing ops: noise_stats, min_norm_aggregate"):
        ops.register_backend("half", bad)
    assert "half" not in _registry.BACKEND_NAMES


def test_a_backend_with_a_wrong_signature_is_refused(scratch_registry):
    bad = _module_like(ref, "swapped", combine=lambda w, G, out: out, gram=lambda X: X)
    with pytest.raises(TypeError) as info:
        ops.register_backend("swapped", bad)
    msg = str(info.value)
    assert "gram(X) instead of gram(G)" in msg
    assert "combine(w, G, out) instead of combine(w, G, w2, H, out)" in msg


def test_a_registered_backend_is_selectable_and_observed(scratch_registry):
    calls = []

    def gram(G):
        calls.append(G.shape)
        return ref.gram(G)

    ops.register_backend("mine", _module_like(ref, "mine", gram=gram))
    assert "mine" in mtlsam_fast.available_backends("cpu")
    G = torch.randn(3, 7)
    with ops.dispatch_log() as log:
        out = ops.gram(G, backend="mine")
    assert calls == [(3, 7)] and torch.equal(out, ref.gram(G))
    assert log == [ops.Dispatch("gram", "mine", "mine", None)]
    mtlsam_fast.set_backend("mine")
    assert ops.gram(G) is not None and len(calls) == 2
    with pytest.raises(ValueError, match="other than 'auto'"):
        ops.register_backend("auto", ref)


def test_the_dispatch_log_shows_the_choice_and_every_fallback(monkeypatch):
    if "cpu" not in ops.available_backends("cpu"):
        pytest.skip("no C++ backend")
    from mtlsam_fast import _ext

    G = torch.randn(5, 40)
    with ops.dispatch_log() as log:
        ops.gram(G)  # auto -> cpu
        ops.gram(G.double(), backend="cpu")  # the kernels take no fp64
        monkeypatch.setattr(_ext.get(), "QP_MAX_K", 4)  # as if K = 5 were above the limit
        ops.solve_qp(G @ G.T, backend="cpu")
    assert log[0] == ops.Dispatch("gram", "auto", "cpu", None)
    assert log[1:3] == [
        ops.Dispatch("gram", "cpu", "cpu", None),
        ops.Dispatch("gram", "cpu", "torch", "float64 buffer"),
    ]
    assert log[3] == ops.Dispatch("solve_qp", "cpu", "cpu", None)
    assert log[4].backend == "torch" and "K = 5 outside" in log[4].fallback
    assert len(log) == 5
    ops.gram(G)
    assert len(log) == 5  # recorded inside the block only


def test_dispatches_on_the_debug_log(caplog):
    ops.log_dispatches(True)
    try:
        with caplog.at_level(logging.DEBUG, logger="mtlsam_fast.ops"):
            ops.gram(torch.randn(2, 3), backend="torch")
    finally:
        ops.log_dispatches(False)
    assert "gram: torch -> torch" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="mtlsam_fast.ops"):
        ops.gram(torch.randn(2, 3), backend="torch")
    assert caplog.text == ""
