"""Normalization layers' running statistics: updated by the clean forward of a step only.

F-MTL and SAMO run the model again at perturbed weights (and gradient checkpointing runs parts of
it again inside the backward passes); in training mode every such forward would move a BatchNorm's
``running_mean``/``running_var``/``num_batches_tracked`` once more. :func:`frozen_running_stats`
puts them back bitwise after each of those extra forwards, so a step updates them exactly as one
plain forward of the model does (docs/optimizer-composition.md, "Parameters and composition").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch.nn.modules.batchnorm import _NormBase

Tensor = torch.Tensor


def _tracking(module: torch.nn.Module) -> bool:
    return isinstance(module, _NormBase) and module.training and module.track_running_stats


def _compiled_inner(module: torch.nn.Module) -> torch.nn.Module | None:
    """The original module of a ``torch.compile(module)`` wrapper (whose submodules' forwards run
    inside the compiled graph, where no module hook fires), else ``None``."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else None


class _Blocks:
    """The state of :func:`frozen_running_stats` (one per process): the buffers saved by the
    outermost open block (``None`` when no block is open) and the one global pre-hook."""

    saved: dict[int, list[tuple[Tensor, Tensor]]] | None = None
    handle: Any = None
    #: a compiled module was met: the hook stays registered, so the compiled graphs (which guard
    #: on the global hooks' ids) are not compiled again for every block
    keep_hook = False


def _save(module: torch.nn.Module) -> None:
    saved = _Blocks.saved
    if saved is None or id(module) in saved or not _tracking(module):
        return
    bufs = [
        b
        for b in (module.running_mean, module.running_var, module.num_batches_tracked)
        if isinstance(b, Tensor)
    ]
    saved[id(module)] = [(b, b.clone()) for b in bufs]


def _pre_hook(module: torch.nn.Module, args: Any) -> None:
    if torch.compiler.is_compiling():
        return  # traced into a compiled graph: the compiled module's own call saved its layers
    if _Blocks.saved is None:
        return
    inner = _compiled_inner(module)
    if inner is None:
        _save(module)
    else:
        _Blocks.keep_hook = True
        for m in inner.modules():
            _save(m)


@contextlib.contextmanager
def frozen_running_stats() -> Iterator[None]:
    """Within the block, no normalization layer's running statistics change.

    A global module forward pre-hook meets every module that runs in the block. Each normalization
    layer with running statistics (``_NormBase``: BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants,
    InstanceNorm with ``track_running_stats=True``) in training mode has its buffers saved the first
    time it runs, and copied back on exit. The forward itself is unchanged (same batch statistics,
    same autograd graph, so gradient checkpointing's recomputation sees the same tensors), and the
    buffers come back bitwise. A ``torch.compile(model)`` wrapper is met as one module: the layers
    of the model it wraps are saved when it runs, since no hook runs inside the compiled graph; once
    one was met the hook stays registered (a compiled graph guards on the global hooks, and a new
    hook each block would compile the model again each time). A closure compiled as a whole calls
    no module hook at all: compile the model instead.

    Blocks nest: an inner block joins the outermost one, which restores on its exit. A forward
    whose backward is still to come must sit in the same block as that backward (autograd saved
    the buffers, and restoring them bumps their version): the optimizers open one block around
    each perturbed forward and its backward.
    """
    if _Blocks.saved is not None:
        yield
        return
    saved: dict[int, list[tuple[Tensor, Tensor]]] = {}
    _Blocks.saved = saved
    if _Blocks.handle is None:
        _Blocks.handle = torch.nn.modules.module.register_module_forward_pre_hook(_pre_hook)
    try:
        yield
    finally:
        _Blocks.saved = None
        if not _Blocks.keep_hook:
            _Blocks.handle.remove()
            _Blocks.handle = None
        with torch.no_grad():
            for pairs in saved.values():
                for buf, copy in pairs:
                    buf.copy_(copy)
