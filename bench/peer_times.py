"""Each weighting against its peer, CPU time per call: ``python -m bench peers``.

For every method and K (default 8 and 40) the same inputs go to mtlsam_fast's weighting and to the
installed peer's (:func:`bench.peers.peer_call`: torchjd 0.18's weighting, aggregator or
scalarizer, LibMTL's GradNorm), on one thread, timed in interleaved windows (the best window of
``--rounds``, :func:`bench.bench_cpu_kernels.interleaved_times`). Inputs: float32 gradients
``[K, P]`` (``--P``, default 4096; correlated tasks, norms over two decades), their Gram for the
Gram methods, positive losses for the loss-based ones. Stateful methods run their updates at
every call on both sides. The peer cost of a scalarizer is its forward plus the autograd pass that
yields the weights (plus its Adam step for learnt parameters), what a torchjd user runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from . import peers
from .bench_cpu_kernels import interleaved_times
from .common import write_cpu_rows


def _inputs(K: int, P: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(K)
    shared = torch.randn(1, P, generator=g, dtype=torch.float64)
    G = 0.5 * shared + torch.randn(K, P, generator=g, dtype=torch.float64)
    G = G * torch.logspace(-1, 1, K, dtype=torch.float64)[:, None]
    return G.float(), (torch.rand(K, generator=g, dtype=torch.float64) + 0.5).float()


def main(args: argparse.Namespace) -> int:
    from mtlsam_fast import weighting

    torch.set_num_threads(1)
    rows = []
    for name in args.weightings or weighting.names():
        for K in args.K:
            G, losses = _inputs(K, args.P)
            gram = G @ G.T
            w = weighting.get(name)
            kw = {"grads": G} if w.needs_grads else {}
            a = (gram, losses) if w.needs_losses else (gram,)
            fns = {"ours": lambda w=w, a=a, kw=kw: w(*a, **kw)}
            peer = peers.peer_call(name, G, losses)
            if peer is not None:
                fns["peer"] = peer[1]
            t = interleaved_times(fns, args.rounds)
            rows.append(
                {
                    "weighting": name,
                    "K": K,
                    "ours_us": t["ours"] * 1e6,
                    "peer_us": t.get("peer", float("nan")) * 1e6,
                    "peer": peer[0] if peer else None,
                }
            )
            r = rows[-1]
            speedup = r["peer_us"] / r["ours_us"] if peer else float("nan")
            print(
                f"{name:12s} K={K:3d}  ours {r['ours_us']:10.1f} us   peer {r['peer_us']:10.1f} us"
                f"  x{speedup:7.2f}  {r['peer'] or 'no installed peer'}"
            )
    write_cpu_rows(args.out, "peers", args, rows)
    return 0


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--K", type=lambda s: [int(x) for x in s.split(",")], default=[8, 40])
    ap.add_argument("--P", type=int, default=4096, help="gradient length of the matrix methods")
    ap.add_argument("--weightings", type=lambda s: s.split(","), default=None)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved timing windows")
    ap.add_argument("--out", type=Path, default=None, help="default runs/bench/cpu (untracked)")
