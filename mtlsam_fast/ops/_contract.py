"""The backend contract of :mod:`mtlsam_fast.ops` (docs/ARCHITECTURE.md §3).

:class:`Backend` lists the functions a backend module implements, by name and positional
parameters: the front end (``ops/__init__.py``) validates the arguments, then calls the backend's
function of the same name with them in this order. :func:`check_backend` compares a module with
the protocol when the registry loads it (``_registry``), so a backend missing an op, or taking other
parameters, is refused with an error naming what is wrong instead of failing on first use.

The two fused entry points (``perturb_noise_stats``, ``min_norm_aggregate``) are part of the
contract too; a backend without a fused kernel for an input returns the composition of its own ops
(:func:`compose_perturb_noise_stats`, :func:`compose_min_norm_aggregate`), which gives the same
numbers.
"""

from __future__ import annotations

import inspect
from types import ModuleType
from typing import Protocol

import torch

from .threads import single_threaded

Tensor = torch.Tensor


class Backend(Protocol):
    """The ops a backend module implements (module-level functions; arguments arrive validated).

    Semantics and numerics: docs/ARCHITECTURE.md §3.1; the torch backend is the reference."""

    def unavailable_reason(self, device_type: str) -> str | None:
        """Why the backend cannot run on ``device_type`` tensors (``None`` when it can)."""
        ...

    def gram(self, G: Tensor) -> Tensor: ...

    def diff_gram(self, A: Tensor, B: Tensor) -> Tensor: ...

    def segment_norms(self, x: Tensor, offsets: Tensor, weight: Tensor | None) -> Tensor: ...

    def combine(
        self, w: Tensor, G: Tensor, w2: Tensor | None, H: Tensor | None, out: Tensor
    ) -> Tensor: ...

    def perturb(
        self,
        theta: Tensor,
        backup: Tensor,
        direction: Tensor | None,
        scale: Tensor | None,
        offsets: Tensor,
        adaptive: bool,
        noise_scale: Tensor | None,
        seed: int,
        noise_offset: int,
    ) -> Tensor: ...

    def gaussian_noise(
        self, seed: int, offset: int, numel: int, device: torch.device
    ) -> Tensor: ...

    def noise_stats(self, seed: int, offset: int, ref: Tensor, offsets: Tensor) -> Tensor: ...

    def perturb_noise_stats(
        self,
        theta: Tensor,
        backup: Tensor,
        offsets: Tensor,
        noise_scale: Tensor,
        seed: int,
        noise_offset: int,
        ref: Tensor,
    ) -> Tensor: ...

    def solve_qp(
        self,
        gram: Tensor,
        q: Tensor | None,
        lower: Tensor | None,
        constraint: str,
        norm_coef: Tensor | None,
        max_iter: int,
        tol: float,
    ) -> Tensor: ...

    def min_norm_aggregate(
        self, G: Tensor, out: Tensor, subtract: bool, max_iter: int, tol: float
    ) -> tuple[Tensor, Tensor]: ...


def _parameters(fn) -> list[str] | None:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):  # not introspectable
        return None
    return [
        p.name
        for p in params
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"
    ]


#: op name -> its positional parameters, from :class:`Backend`.
OPS: dict[str, list[str]] = {
    name: _parameters(fn)  # type: ignore[misc]
    for name, fn in vars(Backend).items()
    if inspect.isfunction(fn) and not name.startswith("_")
}


def check_backend(name: str, module: ModuleType) -> None:
    """Raise ``TypeError`` unless ``module`` implements every op of :class:`Backend` as a callable
    taking the protocol's positional parameters (same names, same order)."""
    missing = [op for op in OPS if not callable(getattr(module, op, None))]
    wrong = []
    for op, expected in OPS.items():
        if op in missing:
            continue
        got = _parameters(getattr(module, op))
        if got is not None and got != expected:
            wrong.append(f"{op}({', '.join(got)}) instead of {op}({', '.join(expected)})")
    if missing or wrong:
        problems = ([f"missing ops: {', '.join(missing)}"] if missing else []) + (
            [f"wrong signatures: {'; '.join(wrong)}"] if wrong else []
        )
        raise TypeError(
            f"backend {name!r} ({module.__name__}) does not implement the op contract "
            f"(mtlsam_fast.ops._contract.Backend): {'; '.join(problems)}"
        )


def combine_subtract(backend: ModuleType, w: Tensor, G: Tensor, out: Tensor) -> Tensor:
    """``out <- out - w^T G`` as one combine of ``G`` and ``out`` (weights ``-w`` and 1) into a
    temporary, then a copy (the kernels never read and write the same buffer in one pass)."""
    one = torch.ones(1, dtype=w.dtype, device=w.device)
    d = backend.combine(-w, G, one, out.view(1, -1), torch.empty_like(out))
    return out.copy_(d)


def compose_perturb_noise_stats(
    backend: ModuleType,
    theta: Tensor,
    backup: Tensor,
    offsets: Tensor,
    noise_scale: Tensor,
    seed: int,
    noise_offset: int,
    ref: Tensor,
) -> Tensor:
    """``perturb_noise_stats`` as ``backend.perturb`` (noise only) then ``backend.noise_stats``."""
    backend.perturb(theta, backup, None, None, offsets, False, noise_scale, seed, noise_offset)
    return backend.noise_stats(seed, noise_offset, ref, offsets)


def compose_min_norm_aggregate(
    backend: ModuleType, G: Tensor, out: Tensor, subtract: bool, max_iter: int, tol: float
) -> tuple[Tensor, Tensor]:
    """``min_norm_aggregate`` as ``backend.gram`` -> ``backend.solve_qp`` (simplex, one thread on
    the CPU) -> ``backend.combine``; returns ``(weights, gram)``."""
    g = backend.gram(G)
    w = single_threaded(
        lambda: backend.solve_qp(g, None, None, "simplex", None, max_iter, tol), G.device
    )
    if subtract:
        combine_subtract(backend, w, G, out)
    else:
        backend.combine(w, G, None, None, out)
    return w, g
