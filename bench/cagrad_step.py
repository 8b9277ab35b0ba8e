#!/usr/bin/env python
"""One F-MTL step with CAGrad against one with MGDA, on the CPU, interleaved.

    python -m bench.cagrad_step [--tasks 3] [--reps 30] [--threads 1]

The same small model (an MLP trunk of about 0.3 M parameters, K linear heads, batch 32) and data
for every method; each repetition runs one step of every case in turn, and the table gives the
median step time per case and its ratio to F-MGDA. The cases: ``mgda``, ``cagrad`` (weighting
backend picked as usual: its inner problem in the ``cpu`` backend's C++ solver when the extension
is built) and ``cagrad-torch`` (the inner problem in the torch reference, the way the ``cpu``
backend used to run it). Nothing here gates anything; timings on a shared machine are noisy.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import mtlsam_fast
from mtlsam_fast.weighting.cagrad import CAGrad


def make_case(weighting, K: int, seed: int = 0):
    """(optimizer, closure) for a fresh copy of the model."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU())
    heads = nn.ModuleList([nn.Linear(256, 10) for _ in range(K)])
    opt = mtlsam_fast.FMTL(
        trunk.parameters(), [h.parameters() for h in heads], weighting=weighting, rho=0.05, lr=1e-2
    )
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(32, 256, generator=gen)
    ys = [torch.randint(0, 10, (32,), generator=gen) for _ in range(K)]

    def closure():
        f = trunk(x)
        return [nn.functional.cross_entropy(h(f), y) for h, y in zip(heads, ys, strict=True)]

    return opt, closure


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tasks", type=int, default=3, help="K (default 3)")
    p.add_argument("--reps", type=int, default=30, help="timed steps per case (default 30)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = {
        "mgda": make_case("mgda", args.tasks),
        "cagrad": make_case("cagrad", args.tasks),
        "cagrad-torch": make_case(CAGrad(backend="torch"), args.tasks),
    }
    times: dict[str, list[float]] = {name: [] for name in cases}
    for rep in range(args.reps + 3):  # 3 warm-up rounds
        for name, (opt, closure) in cases.items():
            t0 = time.perf_counter()
            opt.step(closure)
            if rep >= 3:
                times[name].append(time.perf_counter() - t0)
    base = statistics.median(times["mgda"])
    print(f"K={args.tasks} threads={args.threads} reps={args.reps}")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"{name:14s} {med * 1e3:8.2f} ms   x{med / base:5.2f} of mgda")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
