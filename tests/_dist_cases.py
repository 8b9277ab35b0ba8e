"""Cases run on every rank by ``tests/_dist_harness.py`` (called by ``tests/test_distributed.py``).

Each case builds the same model on every rank (same seed), gives rank ``r`` the ``r``-th slice of
a batch, steps the optimizer over ``torch.distributed`` and returns what the test compares: the
Gram matrices and weights every weighting call saw, the losses, the parameters (FSDP2 shards
gathered). Rank 0 also runs the one-process reference (``distributed=False``) over the union of
the slices. Everything is float64 on the torch (oracle) backend unless a case says otherwise.
"""

from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

import mtlsam_fast
from mtlsam_fast import weighting as W
from mtlsam_fast.weighting import Weighting

N_LOCAL = 6  # examples per rank and step
SEEDED = {"pcgrad": 3, "rlw": 5, "gradvac": 7}
#: The QP-based weightings stop at a KKT tolerance (1e-9 by default): two Grams that differ in the
#: last bits (the one-process Gram and the sum of the ranks' partial Grams) give weights that agree
#: to about that tolerance, not to the Gram's precision. The cases solve them tightly, so that what
#: is compared is the reduction, not the solver's stopping point.
TIGHT = {"mgda": 1e-13, "cagrad": 1e-13, "upgrad": 1e-13, "dualproj": 1e-13}


class Net(nn.Module):
    """A trunk of P = 59 parameters (odd: no even split over 2 ranks; FSDP2 shards 5 and 4 rows
    unevenly) and three heads; head 0's weight has one row (FSDP2 leaves rank 1 an empty
    shard)."""

    def __init__(self, batchnorm: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(6, 5)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(5))
        layers += [nn.Tanh(), nn.Linear(5, 4), nn.Tanh()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList([nn.Linear(4, 1), nn.Linear(4, 3), nn.Linear(4, 2)])

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        z = self.trunk(x)
        return [h(z) for h in self.heads]


def batch(step: int, n: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The union batch of one step (``n`` examples)."""
    g = torch.Generator().manual_seed(100 + step)
    x = torch.randn(n, 6, dtype=torch.float64, generator=g)
    ys = [
        torch.randn(n, 1, dtype=torch.float64, generator=g),
        torch.randint(0, 3, (n,), generator=g),
        torch.randint(0, 2, (n,), generator=g),
    ]
    return x, ys


def local(step: int, rank: int, world: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x, ys = batch(step, N_LOCAL * world)
    sl = slice(rank * N_LOCAL, (rank + 1) * N_LOCAL)
    return x[sl], [y[sl] for y in ys]


def losses(model: nn.Module, x: torch.Tensor, ys: list[torch.Tensor]) -> list[torch.Tensor]:
    out = model(x)
    return [
        nn.functional.mse_loss(out[0], ys[0]),
        nn.functional.cross_entropy(out[1], ys[1]),
        nn.functional.cross_entropy(out[2], ys[2]),
    ]


class Recorder(Weighting):
    """A weighting that records the Gram matrix and the weights of every call (state, snapshots
    and restores go to the wrapped weighting)."""

    name = "recorder"

    def __init__(self, inner: Weighting):
        super().__init__()
        self.inner = inner
        self.needs_losses = inner.needs_losses  # type: ignore[misc]
        self.needs_grads = inner.needs_grads  # type: ignore[misc]
        self.returns_direction = inner.returns_direction  # type: ignore[misc]
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def compute(self, x):
        w = self.inner(x.gram, x.losses, grads=x.grads, inv_scale=x.inv_scale)
        self.calls.append((x.gram.detach().clone(), w.detach().clone()))
        return w

    def init_state(self, *args, **kwargs):
        self.inner.init_state(*args, **kwargs)

    def snapshot(self):
        return self.inner.snapshot()

    def restore_where(self, skip, snapshot):
        self.inner.restore_where(skip, snapshot)

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state):
        self.inner.load_state_dict(state)

    def __repr__(self) -> str:
        return f"Recorder({self.inner!r})"


def make_weighting(name: str) -> Recorder:
    options: dict[str, Any] = {}
    if name in SEEDED:
        options["seed"] = SEEDED[name]
    if name in TIGHT:
        options.update(tol=TIGHT[name], max_iter=200)
    return Recorder(W.get(name, **options))


def shard(model: Net, root: bool = True) -> Net:
    """FSDP2 on the trunk's two linear layers and (``root``) the whole model, which takes the
    heads; without the root the heads stay plain, replicated tensors."""
    from torch.distributed.fsdp import fully_shard

    fully_shard(model.trunk[0])
    fully_shard(model.trunk[-2])
    if root:
        fully_shard(model)
    return model


def build(
    method: str,
    wname: str,
    *,
    sharded: bool = False,
    reference: bool = False,
    batchnorm: bool = False,
    base: str = "sgd",
    group: bool = False,
    **options: Any,
) -> tuple[Net, mtlsam_fast.MTLBase]:
    """The model (``sharded``: True, or ``"trunk"`` for the trunk only) and its optimizer
    (``group``: over an explicitly created process group of all ranks)."""
    torch.manual_seed(0)
    model = Net(batchnorm).double()
    if sharded:
        shard(model, root=sharded != "trunk")
    cls = {"mtl": mtlsam_fast.MTLOptimizer, "fmtl": mtlsam_fast.FMTL, "samo": mtlsam_fast.SAMO}[
        method
    ]
    kw: dict[str, Any] = {"backend": "torch"}
    if method != "mtl":
        kw["rho"] = 0.05
    if method == "samo":
        kw["seed"] = 11
    kw.update(options)
    if reference:
        kw["distributed"] = False
    elif group:
        kw["process_group"] = dist.new_group(list(range(dist.get_world_size())))
    base_cls, base_kw = {
        "sgd": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9}),
        "adam": (torch.optim.Adam, {"lr": 0.01}),
    }[base]
    opt = cls(
        list(model.trunk.parameters()),
        [list(h.parameters()) for h in model.heads],
        base_cls,
        make_weighting(wname),
        **base_kw,
        **kw,
    )
    return model, opt


def parameters(opt: mtlsam_fast.MTLBase) -> torch.Tensor:
    """All parameters, flat, in the optimizer's order (DTensors gathered: a collective)."""
    out = []
    for g in opt.param_groups:
        for p in g["params"]:
            t = p.full_tensor() if hasattr(p, "full_tensor") else p
            out.append(t.detach().flatten().clone())
    return torch.cat(out)


def run(model, opt, steps: int, rank: int, world: int, *, micro: int | None = None, union=False):
    """``steps`` steps; step ``s`` on this rank's slice of batch ``s`` (``union``: all of it)."""
    out = []
    for s in range(steps):
        x, ys = batch(s, N_LOCAL * world) if union else local(s, rank, world)
        if micro is None:
            out.append(opt.step(lambda x=x, ys=ys: losses(model, x, ys)).clone())
        else:
            n = x.shape[0] // micro

            def closure(m, x=x, ys=ys, n=n):
                sl = slice(m * n, (m + 1) * n)
                return losses(model, x[sl], [y[sl] for y in ys])

            out.append(opt.step(closure, micro_batches=micro).clone())
    return out


def record(model, opt, step_losses) -> dict[str, Any]:
    return {
        "params": parameters(opt),
        "calls": list(opt.weighting.calls),
        "losses": step_losses,
    }


def rank_world() -> tuple[int, int]:
    return dist.get_rank(), dist.get_world_size()


# ------------------------------------------------------------------------------------ cases
def exactness(
    method: str,
    weightings: list[str],
    sharded: bool = False,
    steps: int = 3,
    micro: int | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Per weighting: the distributed run and (rank 0) the one-process run over the union."""
    rank, world = rank_world()
    result = {}
    for wname in weightings:
        model, opt = build(method, wname, sharded=sharded, **options)
        mine = record(model, opt, run(model, opt, steps, rank, world, micro=micro))
        mine["sync"] = repr(opt.distributed)
        mine["bytes"] = dict(opt.distributed.last_step)
        # what this rank holds: the per-task rows and the flat buffers, against its shards
        local = sum(
            p.to_local().numel() if hasattr(p, "to_local") else p.numel()
            for p in opt.param_groups[0]["params"]
        )
        mine["buffers"] = {
            "G": tuple(opt._gbuf.G.shape),
            "flat": [t.numel() for t in (opt._shared.theta, opt._shared.backup, opt._shared.grad)],
            "local": local,
        }
        if rank == 0:
            ref_model, ref_opt = build(method, wname, reference=True, **options)
            ref_losses = run(ref_model, ref_opt, steps, 0, world, union=True)
            mine["ref"] = record(ref_model, ref_opt, ref_losses)
        result[wname] = mine
    return result


def nonfinite_on_one_rank(method: str, sharded: bool) -> dict[str, Any]:
    """Rank 1's closure makes step 1 non-finite; returns the parameters after each step and the
    found-inf flags, and (rank 0) the reference that skips step 1."""
    rank, world = rank_world()

    def steps(model, opt, nan: bool, union: bool):
        params, flags = [], []
        for s in range(3):
            x, ys = batch(s, N_LOCAL * world) if union else local(s, rank, world)

            def closure(x=x, ys=ys, s=s):
                ls = losses(model, x, ys)
                if s == 1 and nan:
                    # NaN in head 0's weight gradient only: under FSDP2 it lands in rank 0's
                    # shard (rank 1's shard of that one-row weight is empty), so only rank 0
                    # sees it
                    ls[0] = ls[0] + float("nan") * model.heads[0].weight.sum()
                return ls

            opt.step(closure)
            params.append(parameters(opt))
            flags.append(opt.found_inf.clone())
        return params, flags

    model, opt = build(method, "upgrad", sharded=sharded)
    params, flags = steps(model, opt, nan=rank == 1, union=False)
    out: dict[str, Any] = {"params": params, "flags": flags}
    if rank == 0:  # one process that skips step 1 the same way (SAMO's step counter advances)
        ref_model, ref_opt = build(method, "upgrad", reference=True)
        out["ref"] = steps(ref_model, ref_opt, nan=True, union=True)[0]
    return out


def mismatched_construction(kind: str) -> dict[str, Any]:
    """Rank 1 builds its optimizer differently (``kind``); returns each rank's error."""
    rank, _ = rank_world()
    torch.manual_seed(0)
    model = Net().double()
    trunk = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    kw: dict[str, Any] = {"rho": 0.05, "lr": 0.1}
    cls: type = mtlsam_fast.FMTL
    wname = "mgda"
    if rank == 1:
        if kind == "num_tasks":
            heads = heads[:2]
        elif kind == "layout":
            trunk = trunk[::-1]
        elif kind == "weighting":
            wname = "upgrad"
        elif kind == "weighting_option":
            wname = "pcgrad:9"
        elif kind == "hyperparameter":
            kw["rho"] = 0.1
        elif kind == "optimizer":
            cls, kw = mtlsam_fast.MTLOptimizer, {"lr": 0.1}
        elif kind == "local_error":
            kw["lr"] = -1.0  # torch.optim.SGD refuses it on this rank only
        elif kind == "seed":
            cls, kw = mtlsam_fast.SAMO, {"rho": 0.05, "lr": 0.1, "seed": 2}
        if kind != "seed" and cls is mtlsam_fast.SAMO:
            raise AssertionError
    if kind == "seed" and rank == 0:
        cls, kw = mtlsam_fast.SAMO, {"rho": 0.05, "lr": 0.1, "seed": 1}
    w = W.get("pcgrad", seed=9) if wname == "pcgrad:9" else W.get(wname)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        cls(trunk, heads, torch.optim.SGD, w, **kw)
    except Exception as e:
        unchanged = all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
        unmoved = all(p.grad is None for p in model.parameters())
        return {"error": type(e).__name__, "message": str(e), "unchanged": unchanged and unmoved}
    return {"error": None}


def checkpoint_resume(method: str, wname: str, sharded: bool, path: str) -> dict[str, Any]:
    """Four steps uninterrupted; against two steps, a checkpoint (torch.save of the replicated
    state on rank 0, or torch.distributed.checkpoint's sharded state dicts under FSDP2), a fresh
    model and optimizer that load it, and two more steps."""
    rank, world = rank_world()

    def steps(model, opt, first, count):
        for s in range(first, first + count):
            x, ys = local(s, rank, world)
            opt.step(lambda x=x, ys=ys: losses(model, x, ys))

    model, opt = build(method, wname, sharded=sharded, base="adam")
    steps(model, opt, 0, 4)
    straight = parameters(opt)
    straight_weighting = opt.weighting.state_dict()

    model, opt = build(method, wname, sharded=sharded, base="adam")
    steps(model, opt, 0, 2)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        msd, osd = get_state_dict(model, opt)
        dcp.save({"model": msd, "optim": osd}, checkpoint_id=path)
        model, opt = build(method, wname, sharded=sharded, base="adam")
        msd, osd = get_state_dict(model, opt)  # a fresh optimizer: DCP calls step(closure=None)
        state = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    else:
        file = os.path.join(path, "ckpt.pt")
        if rank == 0:
            torch.save({"model": model.state_dict(), "optim": opt.state_dict()}, file)
        dist.barrier()
        saved = torch.load(file, weights_only=True)
        model, opt = build(method, wname, sharded=sharded, base="adam")
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optim"])
    steps(model, opt, 2, 2)
    resumed = parameters(opt)
    return {
        "straight": straight,
        "resumed": resumed,
        "weighting": [straight_weighting, opt.weighting.state_dict()],
    }


def ddp_is_refused() -> dict[str, Any]:
    rank, world = rank_world()
    torch.manual_seed(0)
    model = Net().double()
    wrapped = nn.parallel.DistributedDataParallel(model)
    opt = mtlsam_fast.FMTL(
        list(model.trunk.parameters()), [list(h.parameters()) for h in model.heads], lr=0.1
    )
    before = parameters(opt)
    x, ys = local(0, rank, world)
    try:
        opt.step(lambda: losses(wrapped, x, ys))
    except TypeError as e:
        return {"message": str(e), "unchanged": torch.equal(before, parameters(opt))}
    return {"message": None}


def batchnorm_statistics(method: str) -> dict[str, Any]:
    """BatchNorm's running statistics after one step equal those of one clean forward of this
    rank's batch (the perturbed forwards leave them alone)."""
    rank, world = rank_world()
    model, opt = build(method, "mgda", batchnorm=True)
    probe = copy.deepcopy(model)
    x, ys = local(0, rank, world)
    probe.train()
    probe(x)
    model.train()
    opt.step(lambda: losses(model, x, ys))
    bn, pbn = model.trunk[1], probe.trunk[1]
    return {
        "equal": all(
            torch.equal(a, b)
            for a, b in [
                (bn.running_mean, pbn.running_mean),
                (bn.running_var, pbn.running_var),
                (bn.num_batches_tracked, pbn.num_batches_tracked),
            ]
        )
    }


def communication(method: str, tasks: int) -> dict[str, Any]:
    """The bytes the optimizer counted in its last step, and the sizes to check them against."""
    rank, world = rank_world()
    torch.manual_seed(0)
    model = Net().double()
    heads = [list(h.parameters()) for h in model.heads][:tasks]
    cls = {"mtl": mtlsam_fast.MTLOptimizer, "fmtl": mtlsam_fast.FMTL, "samo": mtlsam_fast.SAMO}[
        method
    ]
    kw = {} if method == "mtl" else {"rho": 0.05}
    opt = cls(list(model.trunk.parameters()), heads, torch.optim.SGD, "upgrad", lr=0.1, **kw)
    x, ys = local(0, rank, world)
    for _ in range(2):
        opt.step(lambda: losses(model, x, ys)[:tasks])
    return {
        "bytes": dict(opt.distributed.last_step),
        "P": sum(p.numel() for p in model.trunk.parameters()),
        "heads": [sum(p.numel() for p in h) for h in heads],
    }


def local_perturbation(rho: float = 0.05, lr: float = 0.1) -> dict[str, Any]:
    """One F-MTL step with ``perturbation="local"``, and (rank 0) a literal reference: each
    rank's eps_i from its own g_i (heads: their own h_i), loss weights from the averaged g_i,
    flat weights from the averaged (g_i - s_i), SGD on the direction."""
    rank, world = rank_world()
    model, opt = build("fmtl", "upgrad", perturbation="local", rho=rho)
    run(model, opt, 1, rank, world)
    out: dict[str, Any] = {
        "params": parameters(opt),
        "bytes": dict(opt.distributed.last_step),
        "heads": [sum(p.numel() for p in h.parameters()) for h in model.heads],
    }
    exact_model, exact_opt = build("fmtl", "upgrad", rho=rho)
    run(exact_model, exact_opt, 1, rank, world)
    out["exact_bytes"] = dict(exact_opt.distributed.last_step)
    if rank != 0:
        return out
    torch.manual_seed(0)
    ref = Net().double()
    trunk = list(ref.trunk.parameters())
    heads = [list(h.parameters()) for h in ref.heads]
    x, ys = batch(0, N_LOCAL * world)

    def grads(r: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        sl = slice(r * N_LOCAL, (r + 1) * N_LOCAL)
        loss = losses(ref, x[sl], [y[sl] for y in ys])[i]
        gs = torch.autograd.grad(loss, trunk + heads[i])
        flat = torch.cat([g.flatten() for g in gs])
        n = sum(p.numel() for p in trunk)
        return flat[:n], flat[n:]

    def shift(params: list[torch.Tensor], delta: torch.Tensor, sign: float) -> None:
        with torch.no_grad():
            off = 0
            for p in params:
                p.add_(sign * delta[off : off + p.numel()].view_as(p))
                off += p.numel()

    K = len(heads)
    g = [[grads(r, i) for i in range(K)] for r in range(world)]
    rows = []  # per rank: g_i - s_i; and the heads' perturbed-point gradients
    head_grads = []
    for r in range(world):
        rank_rows, rank_heads = [], []
        for i in range(K):
            gi, hi = g[r][i]
            eps, heps = rho * gi / gi.norm(), rho * hi / hi.norm()
            shift(trunk, eps, 1.0)
            shift(heads[i], heps, 1.0)
            si, hsi = grads(r, i)
            shift(trunk, eps, -1.0)
            shift(heads[i], heps, -1.0)
            rank_rows.append(gi - si)
            rank_heads.append(hsi)
        rows.append(torch.stack(rank_rows))
        head_grads.append(rank_heads)
    G = torch.stack([torch.stack([g[r][i][0] for i in range(K)]) for r in range(world)]).mean(0)
    M = torch.stack(rows).mean(0)
    w = make_weighting("upgrad")
    d = w(G @ G.T) @ G - w(M @ M.T) @ M
    shift(trunk, lr * d, -1.0)
    for i in range(K):
        shift(heads[i], lr * torch.stack([head_grads[r][i] for r in range(world)]).mean(0), -1.0)
    out["ref"] = torch.cat([p.detach().flatten() for p in trunk + [p for h in heads for p in h]])
    return out


def local_perturbation_refused_with_fsdp2() -> dict[str, Any]:
    torch.manual_seed(0)
    model = shard(Net().double())
    try:
        mtlsam_fast.FMTL(
            list(model.trunk.parameters()),
            [list(h.parameters()) for h in model.heads],
            perturbation="local",
        )
    except ValueError as e:
        return {"message": str(e)}
    return {"message": None}


def overlap() -> dict[str, Any]:
    """How many reductions are in flight when each of a step's backward passes starts: the rows
    of the earlier tasks (asynchronous collectives, started as each task's backward ended)."""
    rank, world = rank_world()
    model, opt = build("mtl", "upgrad")
    seen: list[int] = []
    x, ys = local(0, rank, world)

    def closure():
        z = model.trunk(x)
        z.register_hook(lambda g: seen.append(len(opt.distributed._pending)))
        out = [h(z) for h in model.heads]
        return [
            nn.functional.mse_loss(out[0], ys[0]),
            nn.functional.cross_entropy(out[1], ys[1]),
            nn.functional.cross_entropy(out[2], ys[2]),
        ]

    opt.step(closure)
    return {"in_flight": seen}


def unsupported_dtensor() -> dict[str, Any]:
    """A DTensor parameter that is not FSDP2's dim-0 shard (here: replicated) is refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    w = nn.Parameter(distribute_tensor(torch.randn(4, 3), mesh, [Replicate()]))
    out: dict[str, Any] = {"message": None, "opt_out": None}
    try:
        mtlsam_fast.MTLOptimizer([w], num_tasks=2, lr=0.1)
    except NotImplementedError as e:
        out["message"] = str(e)
    model = shard(Net().double())
    try:  # FSDP2 shards cannot opt out of synchronizing
        mtlsam_fast.MTLOptimizer(model.trunk.parameters(), num_tasks=2, distributed=False)
    except ValueError as e:
        out["opt_out"] = str(e)
    return out
