"""Per-call cost of the ops on tiny CPU inputs, where the Python layer is all there is to time.

``python bench/dispatch_overhead.py [--rounds 7] [--window 0.02]``

Each op is called three ways, in turns within every round (``bench_cpu_kernels.interleaved_times``:
a slow phase of a shared machine hits all of them): through ``mtlsam_fast.ops`` with the default
backend (``"auto"``: reads ``MTLSAM_BACKEND``, picks the backend), through ``ops`` with
``backend="cpu"``, and as the bare binding call into ``mtlsam_fast._C`` that the ``"cpu"`` backend
ends in. The difference between the first and the last is what every op call pays in validation and
dispatch before any kernel runs (K = 4, P = 64: the kernels themselves take well under a
microsecond). Best window of ``--rounds``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_cpu_kernels import interleaved_times
from mtlsam_fast import _ext, ops


def cases(K: int = 4, P: int = 64) -> dict[str, tuple[Callable[[], object], ...]]:
    """op -> (ops call with "auto", ops call with backend="cpu", the binding call it ends in)."""
    C = _ext.get()
    gen = torch.Generator().manual_seed(0)
    G = torch.randn(K, P, generator=gen)
    A, B = G.clone(), torch.zeros(K, P)
    gram = (G @ G.T).unsqueeze(0)
    w = torch.full((K,), 1.0 / K)
    out = torch.empty(P)
    theta, backup = torch.randn(P, generator=gen), torch.empty(P)
    offsets = torch.tensor([0, P // 2, P])
    scale = torch.tensor(0.01)
    scale1 = scale.reshape(1)
    return {
        "gram": (lambda: ops.gram(G), lambda: ops.gram(G, backend="cpu"), lambda: C.gram(G)),
        "diff_gram": (
            lambda: ops.diff_gram(A, B),
            lambda: ops.diff_gram(A, B, backend="cpu"),
            lambda: C.diff_gram(A, B),
        ),
        "combine": (
            lambda: ops.combine(w, G, out=out),
            lambda: ops.combine(w, G, out=out, backend="cpu"),
            lambda: C.combine(w, G, None, None, out),
        ),
        "segment_norms": (
            lambda: ops.segment_norms(theta, offsets),
            lambda: ops.segment_norms(theta, offsets, backend="cpu"),
            lambda: C.segment_norms(theta, offsets, None),
        ),
        "solve_qp": (
            lambda: ops.solve_qp(gram),
            lambda: ops.solve_qp(gram, backend="cpu"),
            lambda: C.solve_qp(
                gram, None, None, True, ops.qp.DEFAULT_MAX_ITER, ops.qp.DEFAULT_TOL, False
            ),
        ),
        "perturb": (
            lambda: ops.perturb(theta, backup, offsets, G[0], scale),
            lambda: ops.perturb(theta, backup, offsets, G[0], scale, backend="cpu"),
            lambda: C.perturb(theta, backup, G[0], scale1, offsets, False, None, 0, 0),
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument(
        "--window", type=float, default=0.02, help="seconds of calls per function and round"
    )
    args = p.parse_args(argv)
    if _ext.get() is None:
        print(f"mtlsam_fast._C is not available: {_ext.error()}", file=sys.stderr)
        return 1
    torch.set_num_threads(1)
    print(
        f"torch {torch.__version__}, Python {sys.version.split()[0]}, one thread; "
        "microseconds per call"
    )
    print(f"{'op':14s} {'auto':>7s} {'cpu':>7s} {'_C':>7s} {'auto - _C':>10s}")
    for name, fns in cases().items():
        t = interleaved_times(dict(zip(("auto", "cpu", "_C"), fns)), args.rounds, args.window)
        auto, cpu, direct = (t[k] * 1e6 for k in ("auto", "cpu", "_C"))
        print(f"{name:14s} {auto:7.2f} {cpu:7.2f} {direct:7.2f} {auto - direct:10.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
