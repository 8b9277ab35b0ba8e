"""Distributed step: the time of one optimizer step in 1 and in R processes on this machine (gloo,
the same total batch split over the processes), the bytes each step communicates, and the
ring-model projection of those bytes to 8, 64 and 512 GPUs.

``python -m bench dist [--model transformer] [--methods fmtl,mtl,samo] [--procs 1,2] [--batch 16]``

The process counts run interleaved (1, 2, 1, 2, ...: ``--rounds``), each in fresh processes; a
step's time is the median over rounds of each round's median. Each process builds the bench
model of :mod:`bench.e2e` (same seed) and steps on its slice of the same global batch; a step's
time is the slowest rank's (``perf_counter`` around ``opt.step``, the ranks lined up by a barrier
before it). With R processes on C cores each process gets C // R threads, the single process all
C (``--threads`` overrides). The bytes are what the optimizer counted
(``opt.distributed.last_step``: its own collectives; FSDP2's are not involved here), per rank,
under the ring model (an all-reduce of n bytes sends 2 (R-1)/R n, a reduce-scatter or all-gather
(R-1)/R n). :func:`collectives` is the same model on paper, for every optimizer and mode, next to
a naive implementation (K all-reduces of P for every set of K task gradients) and plain DDP (one
all-reduce of P).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from .common import CPU_OUT, machine_info


def collectives(
    method: str, mode: str, K: int, P: int, heads: list[int], R: int, itemsize: int = 4
) -> list[tuple[str, int]]:
    """The collectives of one step, as ``(kind, bytes of the full tensor)``.

    ``mode``: ``ours`` (what this library issues with replicated parameters: see
    ``mtlsam_fast/distributed.py``), ``local`` (F-MTL with ``perturbation="local"``), ``naive``
    (every task gradient all-reduced whole: K all-reduces of the trunk and the heads for every set
    of K gradients), ``ddp`` (plain DDP: one
    all-reduce of all gradients, the cost of a single-objective step), ``fsdp2`` (FSDP2's own
    parameter all-gathers, one per forward and one per backward of the resharded modules, and
    gradient reduce-scatters, one per backward; our K x K Gram and scalars come on top).
    ``heads``: each task head's parameter count. Every tensor has ``itemsize`` bytes per element
    (parameters, losses and Grams in one dtype). The small tensors of a set (losses, the heads'
    gradients, the last ``P mod R`` columns) go in one batched all-reduce; the found-inf flag
    needs none (every rank derives it from the same averaged values).
    """
    b, H = itemsize, sum(heads)
    sets = {"mtl": 1, "fmtl": 2, "samo": 1}[method]  # sets of K task gradients per step
    if mode == "ddp":
        return [("all_reduce", (P + H) * b)]
    if mode == "naive":
        out = [("all_reduce", (P + h) * b) for _ in range(sets) for h in heads]
        return out + ([("all_reduce", (P + H) * b)] if method == "samo" else [])  # g0
    if mode == "fsdp2":
        forwards, backwards = {"mtl": (1, K), "fmtl": (1 + K, 2 * K), "samo": (1 + 3 * K, 1 + K)}[
            method
        ]
        n = (P + H) * b
        return [("all_gather", n)] * (forwards + backwards) + [("reduce_scatter", n)] * backwards
    chunk = P // R
    split, tail = chunk * R, P - chunk * R
    shard_rows = K > 1 and chunk > 0

    def task_rows(small: int) -> list[tuple[str, int]]:
        """One set of K task gradients averaged; ``small``: the bytes batched with them."""
        if not shard_rows and mode != "local":  # (local: the direction waits on the shards)
            return [("all_reduce", P * b)] * K + [("all_reduce", small)]
        return (
            [("reduce_scatter", split * b)] * K
            + [("all_reduce", small + K * tail * b)]  # + the tail columns
            + [("all_reduce", K * K * b)]  # the partial Grams
            + [("all_gather", split * b)]  # the direction
        )

    if mode == "local":  # F-MTL's local perturbations: phase 1 shards only, no head averages
        phase1 = [("reduce_scatter", split * b)] * K if split else []
        phase1 += [("all_reduce", K * b + K * tail * b), ("all_reduce", K * K * b)]
        return phase1 + task_rows(H * b)
    if method == "mtl":
        return task_rows(K * b + H * b)  # + the losses and the heads' gradients
    if method == "fmtl":  # phase 1: eps_i needs the whole g_i on every rank
        phase1 = [("all_reduce", P * b)] * K + [("all_reduce", K * b + H * b)]
        return phase1 + task_rows(H * b)
    clean = [("all_reduce", P * b), ("all_reduce", K * b + H * b)]  # SAMO: g0; losses, heads
    return clean + [("all_reduce", 2 * b)] * K + task_rows(H * b)  # + L_i(+), L_i(-)


def ring_bytes(calls: list[tuple[str, int]], R: int) -> float:
    """Bytes one rank sends for ``calls`` under the ring model."""
    from mtlsam_fast.distributed import ring_bytes as one

    return sum(one(kind, n, 1, R) for kind, n in calls)


def ring_messages(calls: list[tuple[str, int]], R: int) -> int:
    """Sequential ring messages (the latency term's count) of ``calls``."""
    from mtlsam_fast.distributed import ring_latency_steps

    return sum(ring_latency_steps(kind, R) for kind, _ in calls)


NAMES = {"mtl": "MTLOptimizer", "fmtl": "FMTL", "samo": "SAMO"}
MODES = {
    "ours": "mtlsam_fast",
    "local": "mtlsam_fast, perturbation='local'",
    "naive": "naive (K all-reduces)",
    "ddp": "DDP (1 all-reduce)",
    "fsdp2": "FSDP2 (its all-gathers + reduce-scatters)",
}


def projection(P: int, heads: list[int], itemsize: int = 4, worlds=(8, 64, 512)) -> str:
    """A markdown table: per optimizer and implementation, the GB each rank sends per step and
    the sequential ring messages (``alpha`` terms), for R in ``worlds``."""
    K = len(heads)
    lines = [
        "| optimizer | implementation | "
        + " | ".join(f"R={R}: GB sent, messages" for R in worlds)
        + " |",
        "|" + "---|" * (2 + len(worlds)),
    ]
    for method in NAMES:
        for mode in MODES:
            if mode == "local" and method != "fmtl":
                continue
            cells = []
            for R in worlds:
                calls = collectives(method, mode, K, P, heads, R, itemsize)
                cells.append(f"{ring_bytes(calls, R) / 1e9:.3f}, {ring_messages(calls, R)}")
            lines.append(f"| {NAMES[method]} | {MODES[mode]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ workers


def _worker(rank: int, world: int, port: int, cfg: dict, conn: Any) -> None:
    import datetime

    import torch.distributed as dist

    import mtlsam_fast

    from . import e2e

    torch.set_num_threads(cfg["threads"])
    if world > 1:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://127.0.0.1:{port}",
            rank=rank,
            world_size=world,
            timeout=datetime.timedelta(seconds=300),
        )
    device = torch.device("cpu")
    out = {}
    for method in cfg["methods"]:
        trunk, heads, x, ys = e2e.build(cfg["model"], cfg["tasks"], cfg["batch"], device)
        x, ys = x[rank::world], [y[rank::world] for y in ys]
        cls = {"mtl": mtlsam_fast.MTLOptimizer, "fmtl": mtlsam_fast.FMTL, "samo": mtlsam_fast.SAMO}
        extra = {} if method == "mtl" else {"rho": 0.05}
        opt = cls[method](
            list(trunk.parameters()),
            [list(h.parameters()) for h in heads],
            torch.optim.SGD,
            cfg["weighting"],
            lr=0.01,
            **extra,
        )

        def closure(trunk=trunk, heads=heads, x=x, ys=ys):
            z = trunk(x)
            return [torch.nn.functional.cross_entropy(h(z), y) for h, y in zip(heads, ys)]

        times = []
        for s in range(cfg["warmup"] + cfg["steps"]):
            if world > 1:
                dist.barrier()
            t = time.perf_counter()
            opt.step(closure)
            elapsed = torch.tensor([time.perf_counter() - t], dtype=torch.float64)
            if world > 1:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if s >= cfg["warmup"]:
                times.append(float(elapsed))
        sync = opt.distributed
        out[method] = {
            "step_s": statistics.median(times),
            "times": times,
            "bytes": dict(sync.last_step) if sync is not None else {},
            "P": sum(p.numel() for p in trunk.parameters()),
            "heads": [sum(p.numel() for p in h.parameters()) for h in heads],
        }
    if world > 1:  # what this machine's gloo moves: an all-reduce of the trunk's P floats
        buf = torch.ones(out[cfg["methods"][0]]["P"])
        times = []
        for _ in range(3):
            dist.barrier()
            t = time.perf_counter()
            dist.all_reduce(buf)
            times.append(time.perf_counter() - t)
        out["_all_reduce_P_s"] = statistics.median(times)
    if rank == 0:
        conn.send(out)
    conn.close()
    os._exit(0)


def run(world: int, cfg: dict, timeout: float) -> dict:
    """Run the timing workers in ``world`` processes; rank 0's report."""
    from mtlsam_fast.launch import free_port

    ctx = mp.get_context("spawn")
    port = free_port()
    parent, child = ctx.Pipe()
    procs = [
        ctx.Process(target=_worker, args=(r, world, port, cfg, child), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    try:
        if not parent.poll(timeout):
            raise TimeoutError(f"{world} processes gave no result in {timeout} s")
        return parent.recv()
    finally:
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()


def _sent(result: dict) -> float:
    """The bytes a worker's optimizer counted in its last step."""
    return sum(v for k, v in result["bytes"].items() if k != "collectives")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", default="transformer", help="bench.e2e model (default transformer)")
    ap.add_argument("--methods", default="fmtl,mtl,samo")
    ap.add_argument("--weighting", default="mgda")
    ap.add_argument("--tasks", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16, help="global batch (split over processes)")
    ap.add_argument("--steps", type=int, default=5, help="measured steps (after 1 warm-up)")
    ap.add_argument("--procs", default="1,2", help="process counts (default 1,2)")
    ap.add_argument("--cores", type=int, default=None, help="cores to share (default: all)")
    ap.add_argument(
        "--threads", type=int, default=None, help="threads per process (default: cores // procs)"
    )
    ap.add_argument("--rounds", type=int, default=2, help="interleaved repetitions (default 2)")
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument(
        "--project-only", action="store_true", help="only the ring-model table (no timing)"
    )
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench/cpu (untracked)")


def main(args: argparse.Namespace) -> int:
    if args.project_only:
        from . import e2e

        trunk, heads, _, _ = e2e.build(args.model, args.tasks, 1, torch.device("cpu"))
        P = sum(p.numel() for p in trunk.parameters())
        sizes = [sum(p.numel() for p in h.parameters()) for h in heads]
        print(f"Projection (ring model, {args.model}: P = {P}, heads {sizes}, fp32):\n")
        print(projection(P, sizes))
        return 0
    cores = args.cores or os.cpu_count() or 1
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    procs = [int(p) for p in args.procs.split(",")]
    runs: dict[int, list[dict]] = {world: [] for world in procs}
    for round_ in range(args.rounds):  # interleaved: 1, 2, 1, 2, ... processes
        for world in procs:
            if args.batch % world:
                raise SystemExit(f"--batch {args.batch} does not split over {world} processes")
            cfg = {
                "model": args.model,
                "methods": methods,
                "weighting": args.weighting,
                "tasks": args.tasks,
                "batch": args.batch,
                "steps": args.steps,
                "warmup": 1,
                "threads": args.threads or max(1, cores // world),
            }
            print(
                f"  dist {args.model} round {round_ + 1}/{args.rounds}: {world} process(es) x "
                f"{cfg['threads']} thread(s) ..."
            )
            runs[world].append(run(world, cfg, args.timeout))
    results: dict[int, dict] = {}
    all_reduce_s: dict[int, float] = {}
    for world, rs in runs.items():  # the median over rounds of each round's median step
        results[world] = {
            m: {
                **rs[0][m],
                "step_s": statistics.median(r[m]["step_s"] for r in rs),
                "rounds_s": [r[m]["step_s"] for r in rs],
            }
            for m in methods
        }
        if world > 1:
            all_reduce_s[world] = statistics.median(r["_all_reduce_P_s"] for r in rs)
    first = results[procs[0]][methods[0]]
    P, heads, K = first["P"], first["heads"], args.tasks
    lines = [
        f"model {args.model}: P = {P} trunk parameters, heads {heads}, fp32, weighting "
        f"{args.weighting}, global batch {args.batch}, {cores} cores; step: median over "
        f"{args.rounds} interleaved rounds of each round's median of {args.steps} steps",
        "",
        "| optimizer | processes | step ms | speed-up | bytes sent per rank (counted / model) "
        "| naive (K all-reduces) | DDP (1 all-reduce) |",
        "|---|---|---|---|---|---|---|",
    ]
    for method in methods:
        base = results[procs[0]][method]["step_s"]
        for world in procs:
            r = results[world][method]
            sent = _sent(r)
            model, naive, ddp = (
                ring_bytes(collectives(method, mode, K, P, heads, world), world) if world > 1 else 0
                for mode in ("ours", "naive", "ddp")
            )
            lines.append(
                f"| {method} | {world} | {1e3 * r['step_s']:.1f} | {base / r['step_s']:.2f}x "
                f"| {sent / 1e6:.3f} / {model / 1e6:.3f} MB | {naive / 1e6:.3f} MB "
                f"| {ddp / 1e6:.3f} MB |"
            )
    for world, t in all_reduce_s.items():
        bw = 2 * (world - 1) / world * 4 * P / t
        lines.append(
            f"\n{world} processes: an all-reduce of the trunk's P fp32 takes {1e3 * t:.1f} ms "
            f"here ({bw / 1e9:.2f} GB/s sent per rank); at that rate a step's counted bytes "
            "take: "
            + ", ".join(f"{m} {1e3 * _sent(results[world][m]) / bw:.0f} ms" for m in methods)
        )
    lines += ["", f"Projection (ring model, P = {P}, heads {heads}, fp32):", ""]
    lines.append(projection(P, heads))
    table = "\n".join(lines)
    print()
    print(table)
    out = args.out or CPU_OUT
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": machine_info(torch.device("cpu")),
        "command": " ".join(["python -m bench dist", *sys.argv[2:]]),
        "config": {k: str(v) for k, v in vars(args).items()},
        "results": {str(k): v for k, v in results.items()},
        "all_reduce_P_s": {str(k): v for k, v in all_reduce_s.items()},
    }
    (out / "dist.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "dist.txt").write_text(table + "\n")
    print(f"\nwrote {out}/dist.json, dist.txt")
    return 0
