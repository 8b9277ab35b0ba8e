"""Normalization layers' running statistics: updated by the clean forward of a step only.

F-MTL and SAMO run the model again at perturbed weights (and gradient checkpointing runs parts of
it again inside the backward passes); in training mode every such forward would move a BatchNorm's
``running_mean``/``running_var``/``num_batches_tracked`` once more. :func:`frozen_running_stats`
keeps them through each of those extra forwards, so a step updates them exactly as one plain
forward of the model does (docs/optimizer-composition.md, "Parameters and composition").
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, ClassVar

import torch
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

Tensor = torch.Tensor


def _tracking(module: torch.nn.Module) -> bool:
    return isinstance(module, _NormBase) and module.training and module.track_running_stats


def _compiled_inner(module: torch.nn.Module) -> torch.nn.Module | None:
    """The original module of a ``torch.compile(module)`` wrapper (whose submodules' forwards run
    inside the compiled graph, where no module hook fires), else ``None``."""
    inner = getattr(module, "_orig_mod", None)
    return inner if isinstance(inner, torch.nn.Module) else None


class _Blocks:
    """The state of :func:`frozen_running_stats` (one per process): the outermost open block's
    mode, its saved buffers and switched-off layers (``saved`` is ``None`` when no block is open),
    and the one global pre-hook."""

    saved: dict[int, list[tuple[Tensor, Tensor]]] | None = None
    switched: ClassVar[list[_BatchNorm]] = []
    switch_off = True
    handle: Any = None
    #: a compiled module was met: the hook stays registered, so the compiled graphs (which guard
    #: on the global hooks' ids) are not compiled again for every block
    keep_hook = False


def _freeze(module: torch.nn.Module, *, switch_off: bool) -> None:
    saved = _Blocks.saved
    if saved is None or id(module) in saved or not _tracking(module):
        return
    if switch_off and isinstance(module, _BatchNorm):
        module.track_running_stats = False  # batch statistics as before, no buffer touched
        _Blocks.switched.append(module)
        saved[id(module)] = []
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
        _freeze(module, switch_off=_Blocks.switch_off)
    else:  # its layers run in the graph, which reads the module attributes as compiled: save
        _Blocks.keep_hook = True
        for m in inner.modules():
            _freeze(m, switch_off=False)


@contextlib.contextmanager
def frozen_running_stats(*, switch_off: bool = True) -> Iterator[None]:
    """Within the block, no normalization layer's running statistics change.

    A global module forward pre-hook meets every module that runs in the block. A BatchNorm layer
    (BatchNorm1d/2d/3d, SyncBatchNorm, lazy variants) in training mode with running statistics is
    switched off for the block (``track_running_stats = False``: it normalizes with the batch
    statistics exactly as before, and its buffers are not touched at all); the other layers with
    running statistics (``_NormBase``: InstanceNorm with ``track_running_stats=True``) have their
    buffers saved the first time they run and copied back bitwise on exit.

    ``switch_off=False`` saves and restores the BatchNorm layers too, for a block around a backward
    pass whose forward ran outside any block: gradient checkpointing recomputes parts of that
    forward inside the backward, and the recomputation must build the same graph as the forward
    did (a switched-off layer saves other tensors for its backward).

    A ``torch.compile(model)`` wrapper is met as one module: its layers run inside the compiled
    graph, where no hook fires, so they are saved and restored when the wrapper is called; once
    one was met the hook stays registered (a compiled graph guards on the global hooks, and a new
    hook each block would compile the model again each time). A closure compiled as a whole calls
    no module hook at all: compile the model instead.

    Blocks nest: an inner block joins the outermost one (and its mode), which undoes everything on
    its exit. A forward whose backward is still to come must sit in the same block as that
    backward (autograd saved the buffers it reads; restoring them would bump their version): the
    optimizers open one block around each perturbed forward and its backward.
    """
    if _Blocks.saved is not None:
        yield
        return
    saved: dict[int, list[tuple[Tensor, Tensor]]] = {}
    switched: list[_BatchNorm] = []
    _Blocks.saved, _Blocks.switched, _Blocks.switch_off = saved, switched, switch_off
    if _Blocks.handle is None:
        _Blocks.handle = torch.nn.modules.module.register_module_forward_pre_hook(_pre_hook)
    try:
        yield
    finally:
        _Blocks.saved, _Blocks.switched = None, []
        if not _Blocks.keep_hook:
            _Blocks.handle.remove()
            _Blocks.handle = None
        for m in switched:
            m.track_running_stats = True
        with torch.no_grad():
            for pairs in saved.values():
                for buf, copy in pairs:
                    buf.copy_(copy)
