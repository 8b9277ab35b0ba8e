"""Weightings on a busy CPU: ``python -m bench load``.

Small (K x K) work on torch's default thread count stalls when other processes hold the cores
(data-loader workers): every parallel region waits for descheduled threads. For every weighting
and K this measures, in one run, the median time per call

* on 1 intra-op thread, the machine otherwise idle;
* on torch's default thread count (one per core), idle;
* on the default thread count while ``--procs`` background processes (default: one per core)
  spin, each bounded by ``--max-load-s`` seconds even if this process dies;

with the 1-thread and default-thread calls interleaved in rounds, and reports the ratio of the
loaded time to the 1-thread time (the target: at most 2), and the loaded time to the 1-thread time
measured under the same load (which takes out whatever else the machine runs). The gradients are a
[K, P] float32 matrix (``--P``, default 512; correlated tasks, norms over two decades); methods that
read the losses get positive ones.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from pathlib import Path

import torch

from .common import write_cpu_rows


def _spin(deadline: float) -> None:
    x = 0
    while time.time() < deadline:
        x = (x * 1103515245 + 12345) & 0xFFFFFFFF


def _inputs(K: int, P: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + K)
    shared = torch.randn(1, P, generator=g, dtype=torch.float64)
    G = 0.5 * shared + torch.randn(K, P, generator=g, dtype=torch.float64)
    G = G * torch.logspace(-1, 1, K, dtype=torch.float64)[:, None]
    losses = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    return G.float(), losses.float()


def _caller(name: str, K: int, P: int):
    from mtlsam_fast import weighting

    w = weighting.get(name)
    G, losses = _inputs(K, P)
    gram = G @ G.T
    kwargs = {"grads": G} if getattr(w, "needs_grads", False) else {}
    args = (gram, losses) if w.needs_losses else (gram,)
    return lambda: w(*args, **kwargs)


def _median_call(fn, threads: int, window: float) -> float:
    torch.set_num_threads(threads)
    times, t_end = [], time.perf_counter() + window
    while time.perf_counter() < t_end or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _measure(fn, threads: list[int], rounds: int, window: float) -> list[float]:
    """Median seconds per call at each thread count, alternating counts in every round; the
    median over the rounds."""
    fn()
    per = [[_median_call(fn, t, window) for t in threads] for _ in range(rounds)]
    return [statistics.median(r[i] for r in per) for i in range(len(threads))]


def main(args: argparse.Namespace) -> int:
    from mtlsam_fast import weighting

    default = torch.get_num_threads()
    names = args.weightings or weighting.names()
    cases = []
    for name in names:
        for K in args.K:
            try:
                fn = _caller(name, K, args.P)
                fn()
            except ValueError as e:  # e.g. Krum needs n_byzantine + 3 tasks
                print(f"skip {name} K={K}: {e}")
                continue
            cases.append((name, K, fn))
    print(
        f"{len(cases)} cases; torch default threads {default}; {args.procs} background "
        f"processes; load average {os.getloadavg()[0]:.1f} at the start"
    )
    start_load = os.getloadavg()
    idle = {(n, K): _measure(fn, [1, default], args.rounds, args.window) for n, K, fn in cases}
    ctx = multiprocessing.get_context("spawn")
    deadline = time.time() + args.max_load_s
    procs = [ctx.Process(target=_spin, args=(deadline,), daemon=True) for _ in range(args.procs)]
    for p in procs:
        p.start()
    try:
        time.sleep(1.0)
        loaded = {
            (n, K): _measure(fn, [1, default], args.rounds, args.window) for n, K, fn in cases
        }
    finally:
        for p in procs:
            p.terminate()
            p.join()
        torch.set_num_threads(default)
    rows = []
    for n, K, _ in cases:
        one, dflt = idle[(n, K)]
        one_loaded, dflt_loaded = loaded[(n, K)]
        rows.append(
            {
                "weighting": n,
                "K": K,
                "one_thread_ms": one * 1e3,
                "default_idle_ms": dflt * 1e3,
                "default_loaded_ms": dflt_loaded * 1e3,
                "one_thread_loaded_ms": one_loaded * 1e3,
                "loaded_over_one": dflt_loaded / one,
                "loaded_over_one_loaded": dflt_loaded / one_loaded,
            }
        )
    lines = [
        f"| weighting | K | 1 thread (ms) | {default} threads idle (ms) | {default} threads "
        f"loaded (ms) | loaded / 1 thread | 1 thread loaded (ms) | loaded / 1 thread loaded |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['weighting']} | {r['K']} | {r['one_thread_ms']:.3f} | {r['default_idle_ms']:.3f} "
        f"| {r['default_loaded_ms']:.3f} | {r['loaded_over_one']:.2f} "
        f"| {r['one_thread_loaded_ms']:.3f} | {r['loaded_over_one_loaded']:.2f} |"
        for r in rows
    ]
    worst = max(rows, key=lambda r: r["loaded_over_one"])
    lines.append(
        f"\nworst: {worst['weighting']} K={worst['K']} at {worst['loaded_over_one']:.2f}x; "
        f"{sum(r['loaded_over_one'] > 2 for r in rows)} of {len(rows)} cases above 2x "
        f"({sum(r['loaded_over_one_loaded'] > 2 for r in rows)} against the 1-thread time under "
        f"the same load); load average {start_load[0]:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end"
    )
    print("\n".join(lines))
    write_cpu_rows(args.out, "load", args, rows)
    return 0


def _int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--K", type=_int_list, default=[3, 8, 40, 64], help="task counts")
    ap.add_argument("--weightings", type=lambda s: s.split(","), default=None)
    ap.add_argument("--procs", type=int, default=os.cpu_count() or 1, help="spinning processes")
    ap.add_argument("--P", type=int, default=512, help="gradient length")
    ap.add_argument("--rounds", type=int, default=5, help="alternations of the thread counts")
    ap.add_argument("--window", type=float, default=0.05, help="seconds per timing window")
    ap.add_argument("--max-load-s", type=float, default=900.0, help="bound on the load processes")
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench/cpu (untracked)")
