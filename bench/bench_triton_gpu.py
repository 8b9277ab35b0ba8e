#!/usr/bin/env python
"""One-command GPU benchmark of the Triton backend and CUDA extension (H100/H200; any CUDA GPU).

    python bench/bench_triton_gpu.py           # full run, writes runs/bench/triton_<gpu>.json
    python bench/bench_triton_gpu.py --smoke   # tiny sizes; also runs on the CPU
                                               # under TRITON_INTERPRET=1

For each op it prints time, achieved GB/s (bytes that must move: every input read once, every
output written once), the percentage of the *measured* device-to-device copy bandwidth (the
roofline: ``dst.copy_(src)`` of a large buffer, read + write), and ratios against baselines:
``torch.mm(G, G.T)`` and the torch reference backend. Gram, difference + Gram and the batched QP
(64 problems of K = 64, target < 100 us on an H100) are also timed on the CUDA extension's backend
(``[cuda]`` rows) when it is built. No timing gates anything.

Pin a configuration for reproducible numbers with ``MTLSAM_TRITON_PIN`` (see
``triton_kernels/_config.py``); otherwise the first call per shape autotunes (excluded from timing).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mtlsam_fast import ops  # noqa: E402
from mtlsam_fast.ops import triton_backend  # noqa: E402
from mtlsam_fast.triton_kernels import _config  # noqa: E402

DEV = torch.device("cuda" if HAS_CUDA else "cpu")


def timeit(fn, reps: int) -> float:
    """Median seconds per call (CUDA events on a GPU, wall clock otherwise);
    one warm-up call first."""
    if not HAS_CUDA:  # the interpreter: one call, to show the script works
        t = time.perf_counter()
        fn()
        return time.perf_counter() - t
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    times.sort()
    return times[len(times) // 2]


def copy_bandwidth(nbytes: int, reps: int) -> float:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=DEV).uniform_()
    dst = torch.empty_like(src)
    t = timeit(lambda: dst.copy_(src), reps)
    return 2 * src.numel() * 4 / t


def row(results, name, t, nbytes, copy_bw, **extra):
    gbps = nbytes / t / 1e9
    rec = {
        "op": name,
        "time_us": t * 1e6,
        "GB/s": gbps,
        "pct_copy_bw": 100 * nbytes / t / copy_bw,
        **extra,
    }
    results.append(rec)
    ratios = "  ".join(f"{k}={v:.2f}x" for k, v in extra.items() if k.startswith("vs_"))
    others = "  ".join(f"{k}={v}" for k, v in extra.items() if not k.startswith("vs_"))
    print(
        f"{name:44s} {t * 1e6:11.1f} us {gbps:9.1f} GB/s {rec['pct_copy_bw']:6.1f} % of copy  "
        f"{ratios} {others}",
        flush=True,
    )


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--smoke", action="store_true", help="tiny sizes (CPU interpreter or quick GPU check)"
    )
    ap.add_argument("--log2p", type=int, default=26, help="P = 2**log2p columns (default 26)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="JSON results path (default runs/bench/triton_<gpu>.json, untracked)",
    )
    args = ap.parse_args(argv)

    smoke = args.smoke
    P = 300 if smoke else 1 << args.log2p
    reps = 1 if smoke else args.reps
    Ks = [3] if smoke else [1, 2, 4, 8, 16, 32, 64]
    dtypes = [torch.float32] if smoke else [torch.float32, torch.bfloat16]
    device_name = (
        torch.cuda.get_device_name()
        if HAS_CUDA
        else f"CPU (Triton interpreter), {platform.processor()}"
    )
    print(f"device: {device_name}   P = {P}   torch {torch.__version__}", flush=True)
    backends = ["triton"] + (["cuda"] if HAS_CUDA and "cuda" in ops.available_backends(DEV) else [])
    tag = {"triton": "", "cuda": " [cuda]"}
    copy_bw = copy_bandwidth(1 << (16 if smoke else 31), reps)
    print(f"measured copy bandwidth: {copy_bw / 1e9:.1f} GB/s (read + write)", flush=True)
    results: list[dict] = []

    for dtype in dtypes:
        esz = torch.finfo(dtype).bits // 8
        for K in Ks:
            if (
                not smoke
                and K * P * esz * 2 > 0.8 * torch.cuda.get_device_properties(0).total_memory
            ):
                continue
            G = torch.randn(K, P, device=DEV, dtype=dtype)
            nbytes = K * P * esz
            t_mm = timeit(lambda G=G: torch.mm(G, G.T), reps)
            t_ref = timeit(lambda G=G: ops.gram(G, backend="torch"), reps)
            for be in backends:
                t = timeit(lambda G=G: ops.gram(G, backend=be), reps)
                row(
                    results,
                    f"gram K={K} {str(dtype)[6:]}{tag[be]}",
                    t,
                    nbytes,
                    copy_bw,
                    vs_torch_mm=t_mm / t,
                    vs_torch_backend=t_ref / t,
                )
            if K in (3, 8, 16):
                B = torch.randn_like(G)
                for be in backends:
                    t = timeit(lambda G=G: ops.diff_gram(G, B, backend=be), reps)
                    row(
                        results,
                        f"diff_gram K={K} {str(dtype)[6:]}{tag[be]}",
                        t,
                        3 * nbytes,
                        copy_bw,
                    )
                w = torch.rand(K, device=DEV)
                out = torch.empty(P, device=DEV, dtype=dtype)
                t = timeit(lambda G=G: ops.combine(w, G, out=out, backend="triton"), reps)
                t_ref = timeit(lambda G=G: ops.combine(w, G, out=out, backend="torch"), reps)
                row(
                    results,
                    f"combine K={K} {str(dtype)[6:]}",
                    t,
                    nbytes + P * esz,
                    copy_bw,
                    vs_torch_backend=t_ref / t,
                )
                theta = torch.zeros(P, device=DEV, dtype=dtype)
                t = timeit(
                    lambda G=G, theta=theta: triton_backend.fused_aggregate(
                        G, out=out, theta=theta, lr=w[:1]
                    ),
                    reps,
                )
                row(
                    results,
                    f"fused_aggregate K={K} {str(dtype)[6:]}",
                    t,
                    2 * nbytes + 3 * P * esz,
                    copy_bw,
                )
            del G

        x = torch.randn(P, device=DEV, dtype=dtype)
        S = 4 if smoke else 200
        offsets = torch.linspace(0, P, S + 1, device=DEV).long()
        t = timeit(lambda x=x: ops.segment_norms(x, offsets, backend="triton"), reps)
        t_ref = timeit(lambda x=x: ops.segment_norms(x, offsets, backend="torch"), reps)
        row(
            results,
            f"segment_norms S={S} {str(dtype)[6:]}",
            t,
            P * esz,
            copy_bw,
            vs_torch_backend=t_ref / t,
        )
        theta, backup, d = torch.zeros_like(x), torch.randn_like(x), torch.randn_like(x)
        scale = torch.rand(S, device=DEV)
        t = timeit(
            lambda theta=theta, backup=backup, d=d: ops.perturb(
                theta, backup, offsets, d, scale, backend="triton"
            ),
            reps,
        )
        t_ref = timeit(
            lambda theta=theta, backup=backup, d=d: ops.perturb(
                theta, backup, offsets, d, scale, backend="torch"
            ),
            reps,
        )
        row(
            results,
            f"perturb (SAM) {str(dtype)[6:]}",
            t,
            3 * P * esz,
            copy_bw,
            vs_torch_backend=t_ref / t,
        )
        t = timeit(
            lambda theta=theta, backup=backup: ops.perturb(
                theta, backup, offsets, noise_scale=scale, seed=1, backend="triton"
            ),
            reps,
        )
        t_ref = timeit(
            lambda theta=theta, backup=backup: ops.perturb(
                theta, backup, offsets, noise_scale=scale, seed=1, backend="torch"
            ),
            reps,
        )
        row(
            results,
            f"perturb (noise) {str(dtype)[6:]}",
            t,
            2 * P * esz,
            copy_bw,
            vs_torch_backend=t_ref / t,
        )
        del x, theta, backup, d

    t = timeit(
        lambda: ops.noise_stats(
            1, 0, torch.ones(P, device=DEV), torch.tensor([0, P], device=DEV), backend="triton"
        ),
        reps,
    )
    row(results, "noise_stats fp32", t, 4 * P, copy_bw)

    B, K = (2, 3) if smoke else (64, 64)
    A = torch.randn(B, K, K // 2, device=DEV)
    gram = A @ A.transpose(1, 2)
    t_ref = timeit(lambda: ops.solve_qp(gram, backend="torch"), max(1, reps // 4))
    for be in backends:
        t = timeit(lambda: ops.solve_qp(gram, backend=be), reps)
        kkt = float(ops.kkt_residual(gram, ops.solve_qp(gram, backend=be)).max())
        name = f"qp B={B} K={K}{tag[be]}"
        results.append(
            {"op": name, "time_us": t * 1e6, "vs_torch_backend": t_ref / t, "kkt_max": kkt}
        )
        print(
            f"{name + ' (simplex, rank-deficient)':44s} {t * 1e6:11.1f} us   "
            f"vs_torch_backend={t_ref / t:.2f}x  max KKT residual={kkt:.1e}",
            flush=True,
        )

    if not smoke or args.out is not None:
        out = (
            args.out
            or ROOT
            / "runs"
            / "bench"
            / f"triton_{device_name.replace(' ', '_').replace('/', '_')}.json"
        )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(
            json.dumps(
                {
                    "device": device_name,
                    "P": P,
                    "copy_GBps": copy_bw / 1e9,
                    "torch": torch.__version__,
                    "tuned": {str(k): v for k, v in _config.tuned_configs().items()},
                    "results": results,
                },
                indent=1,
            )
        )
        print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
