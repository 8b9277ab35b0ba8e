"""Distributed training on ``torch.distributed``: data-parallel replicas and FSDP2-sharded
parameters, with every reduction exact.

With R ranks whose closures return the mean losses of equal local batches, one step equals the
one-process step over the union of the batches (up to floating-point summation order): the
optimizer averages what the one-process step would have computed over the union -- the per-task
gradients, the losses, SAMO's zeroth-order differences -- and derives everything else (Gram,
weights, perturbations, the update direction) from the averaged values, identically on every
rank. Weights, seeded weightings and SAMO's noise are bitwise identical on all ranks.

Each parameter group (the shared trunk, each task's head) is one of

* **replicated** -- plain tensors, every rank holds all of them (data parallel). The optimizer
  reduces the task gradient rows itself, one asynchronous collective per row started as soon as
  that task's backward pass is done, so it overlaps with the next task's backward. A row that the
  step needs whole on every rank (F-MTL's first phase: ``eps_i`` is computed from ``g_i``) is
  all-reduced; otherwise (the rows only feed the Gram and the direction) each row is
  reduce-scattered into this rank's column shard, the Gram is the sum of the shards' partial Grams
  (one all-reduce of K x K), the direction is computed on the shard and all-gathered: (K + 1) P
  elements on the wire instead of 2 K P for K all-reduces. The ``P mod R`` columns past the last
  full shard, the losses and the heads' gradients are averaged by one batched all-reduce.
* **sharded** -- ``torch.distributed.fsdp.fully_shard`` parameters (DTensors, ``Shard(0)`` on a
  1-D mesh). FSDP2 all-gathers the parameters for each forward and reduce-scatters (averages) each
  backward's gradients; the optimizer captures the reduced local shard of every task's gradient
  zero-copy (each ``.grad`` is a DTensor view into the ``[K, P_local]`` buffer), computes the Gram
  as local partial Grams plus one all-reduce of K x K, and applies perturbations and updates to
  the local shards (through a flat ``[P_local]`` copy of them). No rank ever holds a full
  parameter or gradient row outside FSDP's own all-gathers. SAMO's noise is drawn at the global
  flat position of every local element, so it equals the one-process stream.

:func:`connect` decides whether an optimizer synchronizes; :class:`Synchronizer` holds the group
and the collectives; :class:`ShardedFlatParams` is the sharded counterpart of the optimizers' flat
parameter buffers. The optimizers call these at a few points only (see ``optim/base.py``).
"""

from __future__ import annotations

import contextlib
import hashlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from . import ops
from .buffers import FlatLayout, Segment

Tensor = torch.Tensor

#: What a rank's optimizer construction is compared on (in this order); a fixed list, so that the
#: agreement check is one fixed-size collective even when the ranks disagree.
AGREEMENT_FIELDS = (
    "error",
    "optimizer",
    "num_tasks",
    "shared_params",
    "task_params",
    "grad_dtype",
    "base_optimizer",
    "param_groups",
    "weighting",
    "weighting_state",
    "backend",
    "options",
)


def _dist() -> Any:
    """``torch.distributed`` (imported on first use)."""
    import torch.distributed as dist

    return dist


def is_dtensor(t: Any) -> bool:
    """Whether ``t`` is a DTensor (without importing ``torch.distributed.tensor`` when nothing
    did: no DTensor can exist then)."""
    mod = sys.modules.get("torch.distributed.tensor")
    return mod is not None and isinstance(t, mod.DTensor)


def local_tensor(t: Tensor) -> Tensor:
    """This rank's local tensor of a DTensor (a view of its storage), ``t`` itself otherwise."""
    return t._local_tensor if is_dtensor(t) else t  # type: ignore[attr-defined]


def _is_initialized() -> bool:
    return torch.distributed.is_available() and _dist().is_initialized()


def _hash64(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little", signed=True)


def canonical(obj: Any) -> str:
    """A deterministic text of ``obj`` (nested dicts, lists, numbers, tensors by value), the same
    on every rank for equal values."""
    if isinstance(obj, torch.Tensor):
        t = local_tensor(obj).detach().cpu()
        return f"tensor({t.dtype},{list(obj.shape)},{t.flatten().tolist()})"
    if isinstance(obj, dict):
        items = sorted((str(k), canonical(v)) for k, v in obj.items())
        return "{" + ",".join(f"{k}:{v}" for k, v in items) + "}"
    if isinstance(obj, (list, tuple)):
        return "[" + ",".join(canonical(v) for v in obj) + "]"
    if isinstance(obj, float):
        return repr(obj)
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    return repr(obj)


class MismatchError(ValueError):
    """The ranks built their optimizers differently (raised on every rank at construction)."""


# --------------------------------------------------------------------------------------------
# Deciding whether an optimizer synchronizes
# --------------------------------------------------------------------------------------------
def connect(process_group: Any, distributed: bool | None) -> Synchronizer | None:
    """The :class:`Synchronizer` an optimizer uses, or ``None`` (every process on its own).

    ``distributed=None`` (default): synchronize when ``torch.distributed`` is initialized (the
    group is ``process_group`` or the default group); ``True``: the same, but an uninitialized
    ``torch.distributed`` is an error; ``False``: never (each process steps on its own data; not
    possible with FSDP2-sharded parameters). A group of one rank synchronizes only if its
    parameters are sharded (DTensors) or ``distributed=True`` -- see :meth:`Synchronizer.needed`.
    """
    if distributed is not None and not isinstance(distributed, bool):
        raise TypeError(f"distributed must be None, True or False, got {distributed!r}")
    if distributed is False:
        if process_group is not None:
            raise ValueError("process_group was given with distributed=False; drop one of them")
        return None
    if not _is_initialized():
        if distributed or process_group is not None:
            raise RuntimeError(
                "torch.distributed is not initialized: call "
                "torch.distributed.init_process_group() first (torchrun sets up its environment), "
                "or build the optimizer with distributed=False"
            )
        return None
    dist = _dist()
    group = process_group if process_group is not None else dist.group.WORLD
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(
            f"process_group must be a torch.distributed.ProcessGroup, got {type(group).__name__}"
        )
    if dist.get_rank(group) < 0:
        raise ValueError("this process is not a member of process_group")
    return Synchronizer(group, explicit_group=process_group is not None, required=bool(distributed))


class _Ring:
    """Bytes one rank sends for each collective under the ring model (what NCCL and gloo's ring
    algorithms move): all-reduce ``2 (R-1)/R n``, reduce-scatter and all-gather ``(R-1)/R n``
    for ``n`` bytes of the full tensor."""

    @staticmethod
    def all_reduce(nbytes: int, R: int) -> float:
        return 2.0 * (R - 1) / R * nbytes

    @staticmethod
    def reduce_scatter(nbytes: int, R: int) -> float:
        return (R - 1) / R * nbytes

    all_gather = reduce_scatter


# --------------------------------------------------------------------------------------------
# Sharded (FSDP2) parameter groups
# --------------------------------------------------------------------------------------------
class ShardedLayout(FlatLayout):
    """The local shards of FSDP2 parameters in one flat index space: a
    :class:`~mtlsam_fast.buffers.FlatLayout` of the local shards whose :meth:`views` are DTensors
    shaped and sharded like the parameters (so they can be the parameters' ``.grad``)."""

    def __init__(self, params: Sequence[Tensor]):  # not FlatLayout's: local sizes
        self.params = list(params)
        segs, off = [], 0
        for p in self.params:
            loc = local_tensor(p)
            segs.append(Segment(off, loc.numel(), loc.shape))
            off += loc.numel()
        self.segments = tuple(segs)
        self.numel = off
        self.device = local_tensor(self.params[0]).device
        self._offsets = {}

    def local_views(self, flat: Tensor) -> list[Tensor]:
        """Plain views of ``flat`` shaped like the local shards."""
        return super().views(flat)

    def views(self, flat: Tensor) -> list[Tensor]:
        """DTensor views of ``flat`` ([P_local]), one per parameter, with its global shape and
        placements; writing into them writes into ``flat``."""
        from torch.distributed.tensor import DTensor

        params: list[Any] = self.params  # DTensors
        return [
            DTensor.from_local(
                v, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
            for p, v in zip(params, self.local_views(flat))
        ]


class ShardedFlatParams:
    """The local shards of a list of FSDP2 parameters as flat buffers: ``theta [P_local]`` (a copy
    of the shards: FSDP2 owns their storage), ``backup``, and the flat ``grad`` whose DTensor views
    are the parameters' ``.grad``. The same interface as the optimizers' flat buffers of plain
    parameters; reductions (``segment_norms``, ``norm``, SAMO's noise statistics) are global.

    ``theta`` is written by the ops and copied into the shards by :meth:`push` before every
    forward (:meth:`Synchronizer.forward_scope`) and after every restore; :meth:`pull` reads the
    shards back (at the start of a step, after the base optimizer stepped them).
    """

    sharded = True

    def __init__(self, params: list[Tensor], what: str, sync: Synchronizer):
        self.params = params
        self.what = what
        self.sync = sync
        self.layout = ShardedLayout(params)
        dtype = params[0].dtype
        self.theta = torch.empty(self.layout.numel, dtype=dtype, device=self.layout.device)
        self.pull()
        self.backup = self.theta.clone()
        self.grad = torch.zeros_like(self.theta)
        self.grad_views = self.layout.views(self.grad)
        self.offsets = self.layout.offsets()
        self.whole = torch.tensor(
            [0, self.layout.numel], dtype=torch.int64, device=self.layout.device
        )
        # global flat position of each parameter's local shard (FSDP2 shards dim 0 in
        # torch.chunk's pieces: rank r holds rows [r c, (r + 1) c), c = ceil(rows / R))
        R, r = sync.world_size, sync.rank
        self.global_starts: list[int] = []
        start = 0
        for p, seg in zip(params, self.layout.segments):
            n = seg.numel
            rows = p.shape[0]
            chunk = -(-rows // R)
            first = min(r * chunk, rows)
            row_numel = p.numel() // rows if rows else 0
            if n != max(0, min(chunk, rows - first)) * row_numel:
                raise NotImplementedError(
                    f"{what}: a parameter of shape {tuple(p.shape)} has {n} local elements on "
                    f"rank {r}; only FSDP2's dim-0 sharding (torch.chunk pieces) is supported"
                )
            self.global_starts.append(start + first * row_numel)
            start += p.numel()
        self._one_segment = [
            torch.tensor([0, seg.numel], dtype=torch.int64, device=self.layout.device)
            for seg in self.layout.segments
        ]

    @property
    def numel(self) -> int:
        """This rank's local size P_local."""
        return self.layout.numel

    @property
    def global_numel(self) -> int:
        """P, over all ranks."""
        return sum(p.numel() for p in self.params)

    def _locals(self) -> list[Tensor]:
        return [local_tensor(p) for p in self.params]

    @torch.no_grad()
    def pull(self) -> None:
        """``theta <- the shards``."""
        views = self.layout.local_views(self.theta)
        if views:
            torch._foreach_copy_(views, self._locals())

    @torch.no_grad()
    def push(self, source: Tensor | None = None) -> None:
        """``the shards <- theta`` (or ``source``, e.g. the backup)."""
        views = self.layout.local_views(self.theta if source is None else source)
        if views:
            torch._foreach_copy_(self._locals(), views)

    def check_intact(self) -> None:
        for i, (p, seg) in enumerate(zip(self.params, self.layout.segments)):
            if not is_dtensor(p) or local_tensor(p).shape != seg.shape:
                raise RuntimeError(
                    f"{self.what}[{i}] is no longer the FSDP2 shard the optimizer was built over "
                    "(was the model re-sharded or a parameter replaced?); build the optimizer "
                    "after fully_shard, and change weights in place"
                )

    def attach_grads(self) -> None:
        for p, v in zip(self.params, self.grad_views):
            if p.grad is not v:
                p.grad = v

    def segment_norms(
        self, x: Tensor, offsets: Tensor, *, weight: Tensor | None = None, backend: str | None
    ) -> Tensor:
        """Global L2 norms of the segments ``offsets`` of ``x`` (``[P_local]`` or
        ``[K, P_local]``): the local partial sums of squares, all-reduced."""
        local = ops.segment_norms(x, offsets, weight=weight, backend=backend)
        return self.sync.sum(local.square()).sqrt()

    def norm(self, x: Tensor, adaptive: bool, backend: str | None) -> Tensor:
        """Global L2 norm of ``x`` (with ``adaptive``: of ``|backup| * x``)."""
        weight = self.backup.abs() if adaptive else None
        return self.segment_norms(x, self.whole, weight=weight, backend=backend).reshape(())

    def _runs(self) -> Iterator[tuple[int, int, int, int]]:
        """(segment, local start, local end, global start) of every non-empty local shard."""
        for s, (seg, start) in enumerate(zip(self.layout.segments, self.global_starts)):
            if seg.numel:
                yield s, seg.offset, seg.offset + seg.numel, start

    def perturb(
        self,
        direction: Tensor | None = None,
        scale: Tensor | None = None,
        *,
        noise_scale: Tensor,
        seed: int,
        noise_offset: int,
        backend: str | None,
    ) -> None:
        """:func:`mtlsam_fast.ops.perturb` per segment with noise (``noise_scale`` per segment
        [S] or a scalar), each local shard drawing the stream at its global position."""
        for s, a, b, g in self._runs():
            ops.perturb(
                self.theta[a:b],
                self.backup[a:b],
                self._one_segment[s],
                direction=None if direction is None else direction[a:b],
                scale=scale,
                noise_scale=noise_scale if noise_scale.numel() == 1 else noise_scale[s : s + 1],
                seed=seed,
                noise_offset=noise_offset + g,
                backend=backend,
            )

    def perturb_noise_stats(
        self, noise_scale: Tensor, ref: Tensor, *, seed: int, noise_offset: int, backend: str | None
    ) -> Tensor:
        """:func:`mtlsam_fast.ops.perturb_noise_stats` per segment; the ``[2, S]`` statistics
        summed over the ranks."""
        acc = torch.float64 if ref.dtype == torch.float64 else torch.float32
        stats = torch.zeros(2, len(self.params), dtype=acc, device=self.theta.device)
        for s, a, b, g in self._runs():
            stats[:, s : s + 1] = ops.perturb_noise_stats(
                self.theta[a:b],
                self.backup[a:b],
                self._one_segment[s],
                noise_scale,
                ref[a:b],
                seed=seed,
                noise_offset=noise_offset + g,
                backend=backend,
            )
        return self.sync.sum(stats)

    def revert_where(self, skip: Tensor) -> None:
        """After the base optimizer stepped the shards: put them back from ``backup`` where
        ``skip`` (a device flag) is set."""
        self.pull()
        torch.where(skip, self.backup, self.theta, out=self.theta)
        self.push()


# --------------------------------------------------------------------------------------------
# The synchronizer
# --------------------------------------------------------------------------------------------
class Synchronizer:
    """The collectives of one multi-task optimizer over one process group.

    Built by :func:`connect`; the optimizer then calls, in order: :meth:`bind` (which groups are
    FSDP2-sharded; before anything is moved), :meth:`agree` (every rank built the same
    optimizer), :meth:`attach` (the flat buffers, after they exist), and at each step
    :meth:`forward_scope`, :meth:`gradient_ready` / :meth:`head_ready` / :meth:`losses_ready`
    after each backward, :meth:`gram` and :meth:`combine` for the aggregation, :meth:`any` for the
    found-inf flag. :attr:`last_step` holds the bytes this rank sent in the last step.
    """

    def __init__(self, group: Any, *, explicit_group: bool, required: bool):
        dist = _dist()
        self.group = group
        self.explicit_group = explicit_group
        self.required = required
        self.world_size: int = dist.get_world_size(group)
        self.rank: int = dist.get_rank(group)
        self.backend_name: str = str(dist.get_backend(group))
        self.sharded_shared = False
        self.sharded_heads: list[bool] = []
        self.min_local_numel = 0
        self._pending: list[Any] = []
        self._small: list[Tensor] = []
        # how G's rows were reduced last: "full", "shard", "keep" (gradient_ready) or "sharded"
        self._rows = "full"
        self._row_shards: Tensor | None = None
        self._direction_on_shard = False  # after a "keep" combine, until a "shard" one gathers
        self._tail: Tensor | None = None
        self._seen_forward = False
        self._local_numel = 0
        self._device: torch.device | None = None  # the parameters' (known after bind)
        #: bytes this rank sends per collective kind during the current / the last step
        self.step_bytes: dict[str, float] = {}
        self.last_step: dict[str, float] = {}

    def __repr__(self) -> str:
        return (
            f"Synchronizer(rank={self.rank}, world_size={self.world_size}, "
            f"backend={self.backend_name!r}, "
            f"shared={'sharded' if self.sharded_shared else 'replicated'})"
        )

    # ---------------------------------------------------------------- construction
    @property
    def sharded(self) -> bool:
        """Whether any parameter group is FSDP2-sharded."""
        return self.sharded_shared or any(self.sharded_heads)

    @property
    def collective_device(self) -> torch.device:
        """Where the construction's all-gather runs: for NCCL the parameters' GPU (or, before
        they are known, the current one), else the CPU."""
        if self.backend_name == "nccl":
            if self._device is not None and self._device.type == "cuda":
                return self._device
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def bind(self, shared: list[Tensor], heads: list[list[Tensor]]) -> None:
        """Record which parameter groups are FSDP2-sharded (all DTensors) and check their
        sharding; use the FSDP2 mesh's group when no ``process_group`` was given."""
        device = local_tensor(shared[0]).device
        self._device = device
        if self.backend_name == "nccl" and device.type != "cuda":
            raise ValueError(
                f"the process group's backend is NCCL but the parameters are on {device}; move "
                "the model to this rank's GPU (torch.cuda.set_device(local_rank)) or use gloo"
            )
        groups = [("shared_params", shared)] + [
            (f"task_params[{k}]", h) for k, h in enumerate(heads)
        ]
        kinds = [self._group_kind(what, ps) for what, ps in groups]
        self.sharded_shared = kinds[0]
        self.sharded_heads = kinds[1:]
        self._local_numel = sum(local_tensor(p).numel() for p in shared)

    def _group_kind(self, what: str, params: list[Tensor]) -> bool:
        flags = [is_dtensor(p) for p in params]
        if not any(flags):
            return False
        if not all(flags):
            raise ValueError(
                f"{what} mixes FSDP2-sharded (DTensor) and plain parameters; shard the whole "
                "group with fully_shard (or none of it)"
            )
        from torch.distributed.tensor import Shard

        dist = _dist()
        dtensors: list[Any] = params
        for i, p in enumerate(dtensors):
            mesh, placements = p.device_mesh, tuple(p.placements)
            if mesh.ndim != 1 or placements != (Shard(0),):
                raise NotImplementedError(
                    f"{what}[{i}] is a DTensor with placements {placements} on a {mesh.ndim}-D "
                    "mesh; supported: FSDP2's fully_shard on a 1-D mesh (Shard(0))"
                )
            mesh_group = mesh.get_group()
            if dist.get_process_group_ranks(mesh_group) != dist.get_process_group_ranks(self.group):
                if self.explicit_group:
                    raise ValueError(
                        f"{what}[{i}] is sharded over ranks "
                        f"{dist.get_process_group_ranks(mesh_group)} but process_group holds "
                        f"{dist.get_process_group_ranks(self.group)}; pass the FSDP2 mesh's group"
                    )
                self.group = mesh_group
                self.world_size = dist.get_world_size(mesh_group)
                self.rank = dist.get_rank(mesh_group)
        return True

    def needed(self) -> bool:
        """Whether this optimizer must synchronize: more than one rank, sharded parameters, or
        ``distributed=True``."""
        return self.world_size > 1 or self.required or self.sharded

    def agree(self, description: dict[str, str] | None, error: BaseException | None = None) -> None:
        """One all-gather of a hash per :data:`AGREEMENT_FIELDS` entry (and of this rank's local
        gradient-shard size): raises :class:`MismatchError` on every rank when the ranks built
        different optimizers, and re-raises ``error`` -- this rank's own construction error --
        after the collective, so the other ranks raise instead of waiting."""
        desc = dict(description or {})
        if error is not None:
            desc = {"error": f"{type(error).__name__}: {error}"}
        values = [_hash64(desc.get(f, "")) for f in AGREEMENT_FIELDS]
        values.append(self._local_numel)
        device = self.collective_device
        mine = torch.tensor(values, dtype=torch.int64, device=device)
        table = torch.empty(self.world_size * mine.numel(), dtype=torch.int64, device=device)
        _dist().all_gather_single(table, mine, group=self.group)
        rows = table.view(self.world_size, -1).cpu().tolist()
        if error is not None:
            raise error
        self.min_local_numel = min(r[-1] for r in rows)
        failed = [r for r, row in enumerate(rows) if row[0] != _hash64("")]
        if failed:
            raise MismatchError(
                f"rank(s) {failed} failed to build the optimizer (see the error on those ranks); "
                "no rank can step without them"
            )
        wrong = [
            (f, j) for j, f in enumerate(AGREEMENT_FIELDS) if len({row[j] for row in rows}) > 1
        ]
        if wrong:
            parts = []
            for f, j in wrong:
                by_value: dict[int, list[int]] = {}
                for r, row in enumerate(rows):
                    by_value.setdefault(row[j], []).append(r)
                groups = " vs ".join(f"ranks {v}" for v in by_value.values())
                mine_text = desc.get(f, "")
                if len(mine_text) > 200:
                    mine_text = mine_text[:200] + "..."
                parts.append(f"{f} ({groups}; rank {self.rank} has {mine_text})")
            raise MismatchError(
                "the ranks built different optimizers, so their steps cannot be synchronized: "
                + "; ".join(parts)
                + ". Build the model and the optimizer identically on every rank (same tasks, "
                "parameters, weighting and options)."
            )

    def attach(self, shared: Any, heads: Sequence[Any], num_tasks: int) -> None:
        """The flat buffers exist: the shared group's flat params and the heads' (or None)."""
        self._shared = shared
        self._heads = list(heads)
        self.num_tasks = num_tasks
        P, R = shared.numel, self.world_size
        self.chunk = 0 if self.sharded_shared else P // R
        self.split = self.chunk * R
        # reduce-scatter + sharded Gram + all-gather when it moves fewer bytes: (K + 1) P < 2 K P
        self.use_row_shards = not self.sharded_shared and num_tasks > 1 and self.chunk > 0

    # ---------------------------------------------------------------- collectives
    def _count(self, kind: str, full: Tensor | int) -> None:
        """Account one collective over ``full`` (the whole tensor, or its size in bytes)."""
        n = full if isinstance(full, int) else full.numel() * full.element_size()
        self.step_bytes[kind] = self.step_bytes.get(kind, 0.0) + getattr(_Ring, kind)(
            n, self.world_size
        )
        self.step_bytes["collectives"] = self.step_bytes.get("collectives", 0) + 1

    def _all_reduce(self, t: Tensor, op: str, *, async_op: bool = False) -> None:
        dist = _dist()
        self._count("all_reduce", t)
        work = dist.all_reduce(
            t, op=getattr(dist.ReduceOp, op), group=self.group, async_op=async_op
        )
        if async_op:
            self._pending.append(work)

    def mean(self, t: Tensor) -> Tensor:
        """``t`` averaged over the ranks (in place; returned)."""
        self._all_reduce(t, "AVG")
        return t

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over the ranks (in place; returned)."""
        self._all_reduce(t, "SUM")
        return t

    def any(self, flag: Tensor) -> Tensor:
        """A boolean device flag set on any rank (no host synchronization).

        Without sharded groups every rank computed its flag from the same averaged values (the
        direction, the heads' gradients, the norms and estimates derived from them), so the flags
        already agree and no collective is needed; with FSDP2 shards each rank checked its own
        shard, and the flags are reduced (MAX)."""
        if not self.sharded:
            return flag
        f = flag.to(torch.float32).reshape(1)
        self._all_reduce(f, "MAX")
        return f.reshape(flag.shape) > 0

    def _average_later(self, t: Tensor) -> None:
        """Queue a small tensor (losses, a head's gradient) for the next batched average."""
        self._small.append(t)

    def _flush_small(self) -> None:
        """Average the queued small tensors in one all-reduce per dtype (a collective's latency
        grows with R, its payload here is tiny)."""
        queued, self._small = self._small, []
        by_dtype: dict[torch.dtype, list[Tensor]] = {}
        for t in queued:
            by_dtype.setdefault(t.dtype, []).append(t)
        for ts in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in ts])
            self._all_reduce(flat, "AVG")
            for t, part in zip(ts, flat.split([t.numel() for t in ts])):
                t.copy_(part.view_as(t))

    def wait(self) -> None:
        """Complete this step's reductions: the asynchronous ones started so far (on the GPU the
        compute stream waits; the host does not) and the queued small ones."""
        pending, self._pending = self._pending, []
        for work in pending:
            work.wait()
        self._flush_small()

    # ---------------------------------------------------------------- step hooks
    def begin_step(self) -> None:
        self.wait()
        self.step_bytes = {}

    def end_step(self) -> None:
        self.last_step = dict(self.step_bytes)

    @contextlib.contextmanager
    def forward_scope(self) -> Iterator[None]:
        """Around each closure call: the sharded groups' ``theta`` is copied into the shards,
        and every FSDP2 module is resharded before its first forward in the call (an FSDP2 root
        stays unsharded after a forward without a backward, and would run the next forward on the
        weights it gathered before this optimizer perturbed or restored them). A model wrapped in
        ``DistributedDataParallel`` is refused: the optimizer reduces the gradients itself."""
        for flat in [self._shared, *self._heads]:
            if getattr(flat, "sharded", False):
                flat.push()
        sharded = self.sharded
        if not sharded and self._seen_forward:
            yield
            return
        self._seen_forward = True
        from torch.nn.parallel import DistributedDataParallel

        fsdp_module: Any = None
        if sharded:
            from torch.distributed.fsdp import FSDPModule

            fsdp_module = FSDPModule
        seen: set[int] = set()

        def pre_hook(module: torch.nn.Module, args: Any) -> None:
            if id(module) in seen:
                return
            seen.add(id(module))
            if isinstance(module, DistributedDataParallel):
                raise TypeError(
                    "the closure runs a model wrapped in DistributedDataParallel: the multi-task "
                    "optimizers reduce the per-task gradients themselves (DDP's single gradient "
                    "all-reduce would mix the tasks, and it refuses several backward passes per "
                    "forward). Call the unwrapped model (ddp_model.module) in the closure and "
                    "build the optimizer over its parameters; nothing else changes."
                )
            if fsdp_module is not None and isinstance(module, fsdp_module):
                module.reshard()

        handle = torch.nn.modules.module.register_module_forward_pre_hook(pre_hook)
        try:
            yield
        finally:
            handle.remove()

    def after_restore(self, flat: Any) -> None:
        """``flat``'s theta was restored from its backup: copy it into the shards."""
        if getattr(flat, "sharded", False):
            flat.push(flat.backup)

    def losses_ready(self, losses: Tensor) -> None:
        """Average the K local mean losses over the ranks (in place, with the next batch of small
        reductions: by :meth:`wait`)."""
        self._average_later(losses)

    def head_ready(self, flat: Any) -> None:
        """A replicated head's gradient is complete on this rank: average it with the next batch
        of small reductions."""
        if flat is not None and not getattr(flat, "sharded", False):
            self._average_later(flat.grad)

    def gradient_ready(self, i: int, row: Tensor, *, rows: str = "shard") -> None:
        """Row ``i`` of ``G`` is complete on this rank; start its reduction (asynchronous).

        Sharded trunk: nothing (FSDP2 reduced it in the backward). Replicated trunk, by
        ``rows``:

        * ``"full"`` -- the step needs the whole averaged row on every rank: all-reduced in place;
        * ``"shard"`` -- only the Gram and the direction need it: the first ``R * (P // R)``
          columns are reduce-scattered into this rank's shard (the last ``P mod R`` in
          :meth:`gram`), the direction all-gathered by :meth:`combine` -- or all-reduced where
          that moves no more bytes (K = 1, P < R);
        * ``"keep"`` -- the same shards, but ``row`` keeps this rank's own gradient (F-MTL's local
          perturbations) and :meth:`combine` leaves the direction on the shard for the next set's
          combine to gather.
        """
        if self.sharded_shared:
            self._rows = "sharded"
            return
        if rows not in ("full", "shard", "keep"):
            raise ValueError(f"rows must be 'full', 'shard' or 'keep', got {rows!r}")
        shards_pay = self.use_row_shards or self._direction_on_shard  # (its gather comes next)
        if rows == "full" or (rows == "shard" and not shards_pay):
            self._rows = "full"
            self._all_reduce(row, "AVG", async_op=True)
            return
        self._rows = rows
        if self._row_shards is None:
            self._row_shards = torch.empty(
                self.num_tasks, self.chunk, dtype=row.dtype, device=row.device
            )
        if self.split == 0:  # fewer columns than ranks: all of them are tail
            return
        dist = _dist()
        self._count("reduce_scatter", row[: self.split])
        work = dist.reduce_scatter_single(
            self._row_shards[i],
            row[: self.split],
            op=dist.ReduceOp.AVG,
            group=self.group,
            async_op=True,
        )
        self._pending.append(work)

    def gram(self, G: Tensor, backend: str | None) -> Tensor:
        """The Gram matrix of the rows of the rank-averaged ``G`` (identical on every rank).

        With row shards: the last ``P mod R`` columns (the tail) are averaged with the batched
        small reductions; rank 0 adds the tail's Gram to its partial Gram before the partial
        Grams are summed (one all-reduce of K x K)."""
        if self._rows not in ("shard", "keep"):
            self.wait()
            if self._rows == "full":
                return ops.gram(G, backend=backend)
            return self.sum(ops.gram(G, backend=backend))  # FSDP2: the local partial Grams
        assert self._row_shards is not None
        self._tail = G[:, self.split :].contiguous() if self.split < G.shape[1] else None
        if self._tail is not None:
            self._average_later(self._tail)
        self.wait()
        gram = ops.gram(self._row_shards, backend=backend)
        if self._tail is not None and self.rank == 0:
            gram = gram + ops.gram(self._tail, backend=backend)
        return self.sum(gram)

    def combine(
        self, w: Tensor, G: Tensor, out: Tensor, *, subtract: bool, backend: str | None
    ) -> None:
        """``out <- w^T G`` (``subtract``: ``out - w^T G``) for the rank-averaged ``G`` (after
        :meth:`gram`); with row shards, computed on this rank's columns and the tail, then
        all-gathered (``"keep"`` rows: not gathered yet, see :meth:`gradient_ready`)."""
        if self._rows not in ("shard", "keep"):
            ops.combine(w, G, out=out, subtract=subtract, backend=backend)
            return
        assert self._row_shards is not None
        lo, hi = self.rank * self.chunk, (self.rank + 1) * self.chunk
        ops.combine(w, self._row_shards, out=out[lo:hi], subtract=subtract, backend=backend)
        if self._tail is not None:
            ops.combine(w, self._tail, out=out[self.split :], subtract=subtract, backend=backend)
        self._direction_on_shard = self._rows == "keep"
        if self._rows == "shard" and self.split:
            self._count("all_gather", out[: self.split])
            _dist().all_gather_single(out[: self.split], out[lo:hi], group=self.group)

    def bytes_sent(self) -> float:
        """Bytes this rank sent in the last step (ring model)."""
        return sum(v for k, v in self.last_step.items() if k != "collectives")


def ring_bytes(kind: str, numel: int, element_size: int, world_size: int) -> float:
    """Bytes one rank sends for a collective over ``numel`` elements (the full tensor) under the
    ring model; ``kind``: ``all_reduce``, ``reduce_scatter`` or ``all_gather``."""
    return float(getattr(_Ring, kind)(numel * element_size, world_size))


def ring_latency_steps(kind: str, world_size: int) -> int:
    """Sequential message steps of a ring collective: ``2 (R-1)`` for an all-reduce, ``R-1``
    for a reduce-scatter or an all-gather."""
    return (2 if kind == "all_reduce" else 1) * (world_size - 1)


__all__ = [
    "AGREEMENT_FIELDS",
    "MismatchError",
    "ShardedFlatParams",
    "ShardedLayout",
    "Synchronizer",
    "canonical",
    "connect",
    "is_dtensor",
    "local_tensor",
    "ring_bytes",
    "ring_latency_steps",
]
