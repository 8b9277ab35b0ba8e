"""CPU kernels of mtlsam_fast._C vs. the machine's read bandwidth, torch.mm and quadprog.

One run measures, on the same buffers:

* the read bandwidth roofline: ``G.sum()`` over the K x P buffer (fp32 and bf16);
* ``gram`` (``cpu`` backend) in GB/s and % of that roofline, and ``torch.mm(G, G.T)`` (what the
  torch backend does; bf16 is upcast first);
* the fused ``diff_gram`` (reads A and B, writes A) and ``combine`` (reads G, writes one row);
* the batched QP for K = 64 (simplex; a rank-deficient, badly scaled family and a full-rank one)
  against quadprog (Goldfarb-Idnani, exact active set), one problem and a batch of 64, timed in
  turns within each round, and the KKT residual both reach.

Usage: ``python bench/bench_cpu_kernels.py [--mib 128] [--repeat 7] [--json out.json]``.
Numbers are wall-clock, best of several windows (same rule for every baseline); nothing here
gates CI.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from mtlsam_fast import _ext, ops
from mtlsam_fast.ops import qp as qp_ref
from mtlsam_fast.ops import torch_backend as ref


def median_time(fn, repeat: int, window: float = 0.05) -> float:
    """Seconds per call: the best of ``repeat`` windows of >= ``window`` s (each many calls).

    The best window, applied identically to the baselines and to our kernels, filters out the
    scheduler noise of a shared machine; a window of many calls averages timer granularity.
    """
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    n = max(1, int(window / max(time.perf_counter() - t0, 1e-9)))
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        times.append((time.perf_counter() - t0) / n)
    return min(times)


def bench_bandwidth(mib: int, repeat: int, rows: list[dict]) -> None:
    for dtype in (torch.float32, torch.bfloat16):
        esz = torch.tensor([], dtype=dtype).element_size()
        for K in (1, 2, 4, 8):
            P = mib * 2**20 // (K * esz) | 1  # odd P
            G = torch.randn(K, P).to(dtype)
            nbytes = G.numel() * esz
            t_sum = median_time(lambda G=G: G.sum(), repeat)
            bw = nbytes / t_sum / 1e9
            t_gram = median_time(lambda G=G: ops.gram(G, backend="cpu"), repeat)
            t_mm = median_time(lambda G=G: ref.gram(G), max(3, repeat // 2))
            row = {
                "op": "gram",
                "dtype": str(dtype).split(".")[-1],
                "K": K,
                "P": P,
                "MiB": nbytes / 2**20,
                "sum_GBps": bw,
                "GBps": nbytes / t_gram / 1e9,
                "ms": t_gram * 1e3,
                "torch_mm_GBps": nbytes / t_mm / 1e9,
            }
            row["pct_of_sum"] = 100 * row["GBps"] / bw
            row["x_torch_mm"] = t_mm / t_gram
            rows.append(row)
            print(
                f"gram      {row['dtype']:8s} K={K:2d} P={P:>10d}: {row['GBps']:6.2f} GB/s = "
                f"{row['pct_of_sum']:5.1f}% of G.sum() {bw:6.2f} GB/s | "
                f"torch.mm {row['torch_mm_GBps']:6.2f} GB/s ({row['x_torch_mm']:5.1f}x)"
            )
            if K == 8:
                A = G.clone()
                B = torch.randn(K, P).to(dtype) * 1e-3
                moved = 3 * nbytes  # read A, read B, write A
                t_diff = median_time(lambda: ops.diff_gram(A, B, backend="cpu"), repeat)
                t_ref = median_time(lambda: ref.diff_gram(A, B), max(3, repeat // 2))
                r = {
                    "op": "diff_gram",
                    "dtype": row["dtype"],
                    "K": K,
                    "P": P,
                    "sum_GBps": bw,
                    "GBps": moved / t_diff / 1e9,
                    "ms": t_diff * 1e3,
                    "x_torch": t_ref / t_diff,
                }
                r["pct_of_sum"] = 100 * r["GBps"] / bw
                rows.append(r)
                print(
                    f"diff_gram {r['dtype']:8s} K={K:2d}: {r['GBps']:6.2f} GB/s "
                    "(read A, B + write A) = "
                    f"{r['pct_of_sum']:5.1f}% of G.sum() | {r['x_torch']:5.1f}x torch sub_ + mm"
                )
                w = torch.rand(K)
                out = torch.empty(P, dtype=dtype)
                moved = nbytes + P * esz
                t_comb = median_time(lambda G=G: ops.combine(w, G, out=out, backend="cpu"), repeat)
                t_ref = median_time(
                    lambda G=G: ref.combine(w, G, None, None, out), max(3, repeat // 2)
                )
                r = {
                    "op": "combine",
                    "dtype": row["dtype"],
                    "K": K,
                    "P": P,
                    "sum_GBps": bw,
                    "GBps": moved / t_comb / 1e9,
                    "ms": t_comb * 1e3,
                    "x_torch": t_ref / t_comb,
                }
                r["pct_of_sum"] = 100 * r["GBps"] / bw
                rows.append(r)
                print(
                    f"combine   {r['dtype']:8s} K={K:2d}: {r['GBps']:6.2f} GB/s "
                    "(read G + write d)   = "
                    f"{r['pct_of_sum']:5.1f}% of G.sum() | {r['x_torch']:5.1f}x torch mv"
                )
                del A, B, out
            del G


def qp_family(family: str, K: int, batch: int) -> torch.Tensor:
    """fp32 Gram matrices of the QP benchmark: ``rank`` -- rank K/2, gradients scaled 1e-3 .. 1e3
    (Gamma 1e-6 .. 1e6: singular and badly scaled); ``full`` -- A A^T with A: K x 2K (full rank, as
    K independent task gradients in P >> K dimensions)."""
    gen = torch.Generator().manual_seed(0)
    if family == "rank":
        A = torch.randn(batch, K, K // 2, generator=gen, dtype=torch.float64)
        s = torch.logspace(-3, 3, K, dtype=torch.float64)
        return ((A @ A.transpose(-1, -2)) * s[:, None] * s[None, :]).float()
    A = torch.randn(batch, K, 2 * K, generator=gen, dtype=torch.float64)
    return (A @ A.transpose(-1, -2)).float()


def interleaved_times(fns: dict, rounds: int, window: float = 0.05) -> dict[str, float]:
    """Seconds per call of each function: the best of ``rounds`` windows, the functions' windows
    taken in turn within every round -- so that a slow phase of a shared machine hits all
    of them."""
    calls = {}
    for name, fn in fns.items():
        fn()  # warm-up
        t0 = time.perf_counter()
        fn()
        calls[name] = max(1, int(window / max(time.perf_counter() - t0, 1e-9)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / calls[name])
    return best


def bench_qp(repeat: int, rows: list[dict], K: int = 64, batch: int = 64) -> None:
    from mtlsam_fast.ops import cpu_backend

    try:
        import numpy as np
        import quadprog
    except ImportError:
        quadprog = None
    for family in ("rank", "full"):
        g32 = qp_family(family, K, batch)
        fns = {
            "one": lambda: ops.solve_qp(g32[:1], backend="cpu"),
            "batch": lambda: ops.solve_qp(g32, backend="cpu"),
        }
        if quadprog is not None:
            # quadprog needs a strictly positive definite matrix: the smallest ridge that makes the
            # factorization succeed on singular Gram matrices, i.e. what an exact reference must do.
            Cm = np.hstack([np.ones((K, 1)), np.eye(K)])
            b = np.hstack([1.0, np.zeros(K)])
            g64 = g32.double().numpy()

            def qp_one(i, g64=g64):
                Gi = g64[i]
                ridge = 1e-12 * np.trace(Gi) / K
                while True:
                    try:
                        return quadprog.solve_qp(Gi + ridge * np.eye(K), np.zeros(K), Cm, b, 1)[0]
                    except ValueError:
                        ridge *= 10

            fns["quadprog_one"] = lambda: qp_one(0)
            fns["quadprog_batch"] = lambda: [qp_one(i) for i in range(batch)]
        t = interleaved_times(fns, max(3, repeat))
        v, iters = cpu_backend._solve_qp_kernel(
            g32, None, None, "simplex", qp_ref.DEFAULT_MAX_ITER, qp_ref.DEFAULT_TOL, with_iters=True
        )
        kkt = qp_ref.kkt_residual(g32, v).max().item()
        t_torch = median_time(lambda: qp_ref.solve_qp(g32[:1]), max(3, repeat // 2))
        row = {
            "op": "qp",
            "family": family,
            "K": K,
            "batch": batch,
            "ms_one": t["one"] * 1e3,
            "ms_batch": t["batch"] * 1e3,
            "ms_per_problem_batched": t["batch"] * 1e3 / batch,
            "kkt_max": kkt,
            "iters_max": int(iters.max()),
            "ms_torch_reference_one": t_torch * 1e3,
        }
        if quadprog is not None:
            vq = torch.from_numpy(np.stack([qp_one(i) for i in range(batch)]))
            row.update(
                {
                    "ms_quadprog_one": t["quadprog_one"] * 1e3,
                    "ms_quadprog_batch": t["quadprog_batch"] * 1e3,
                    "kkt_quadprog_max": qp_ref.kkt_residual(g32, vq).max().item(),
                    "x_quadprog_one": t["quadprog_one"] / t["one"],
                    "x_quadprog_batch": t["quadprog_batch"] / t["batch"],
                }
            )
        rows.append(row)
        print(
            f"qp K={K} {family:4s}: one problem {row['ms_one']:.3f} ms, "
            f"batch of {batch} {row['ms_batch']:.2f} ms "
            f"({row['ms_per_problem_batched']:.3f} ms/problem), KKT max {kkt:.1e}, "
            f"<= {row['iters_max']} iterations; "
            f"torch reference {row['ms_torch_reference_one']:.2f} ms"
        )
        if quadprog is not None:
            print(
                f"   quadprog: one {row['ms_quadprog_one']:.3f} ms "
                f"({row['x_quadprog_one']:.2f}x ours), batch "
                f"{row['ms_quadprog_batch']:.2f} ms ({row['x_quadprog_batch']:.2f}x ours), "
                f"KKT max {row['kkt_quadprog_max']:.1e}"
            )
        else:
            print("   quadprog not installed: no exact-reference comparison")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=int, default=128, help="buffer size in MiB per measurement")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--skip-qp", action="store_true")
    args = p.parse_args(argv)
    C = _ext.get()
    if C is None:
        print(f"mtlsam_fast._C is not available: {_ext.error()}", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, kernels: {C.cpu_isa()}")
    rows: list[dict] = []
    bench_bandwidth(args.mib, args.repeat, rows)
    if not args.skip_qp:
        bench_qp(args.repeat, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
