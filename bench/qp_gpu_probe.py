#!/usr/bin/env python
"""The batched simplex QP on a GPU by problem size, rank and batch: where its time goes.

    python bench/qp_gpu_probe.py        # needs CUDA; prints one line per (K, rank, B, backend)

Gram matrices ``A A^T`` of ``A = randn(B, K, rank)`` (full rank gets ``1e-3 I``), solved by the
``cuda`` and ``triton`` backends; median of 20 calls timed with CUDA events around the Python call
(so small problems include the host's launch overhead), and the max KKT residual. No timing gates
anything.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_triton_gpu import timeit
from mtlsam_fast import ops


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    backends = [b for b in ("cuda", "triton") if b in ops.available_backends("cuda")]
    for K in (8, 16, 32, 64):
        for rank in (K, K // 2):
            for B in (1, 64):
                A = torch.randn(B, K, rank, device="cuda")
                g = A @ A.transpose(1, 2) + (1e-3 * torch.eye(K, device="cuda") if rank == K else 0)
                for be in backends:
                    us = timeit(lambda: ops.solve_qp(g, backend=be), 20) * 1e6
                    kkt = float(
                        ops.kkt_residual(g.double(), ops.solve_qp(g, backend=be).double()).max()
                    )
                    print(
                        f"K={K:2d} rank={rank:2d} B={B:2d} {be:6s} {us:9.1f} us  kkt {kkt:.1e}",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
