"""Shared benchmark machinery: timing (CPU wall clock / CUDA events), machine info, roofline.

Nothing here asserts on a time. A measurement is a list of per-call times; we report the median
and the inter-quartile spread, never the minimum alone.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
#: where the CPU benchmarks write by default: untracked (``.gitignore``), so a run never changes
#: the committed results by accident; refresh ``bench/results/cpu`` on purpose with ``--out``
CPU_OUT = REPO_ROOT / "runs" / "bench" / "cpu"

DTYPES = {
    "fp32": torch.float32,
    "fp64": torch.float64,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Timing:
    """Per-call times in seconds of one measured function."""

    times: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def quantile(self, q: float) -> float:
        xs = sorted(self.times)
        if len(xs) == 1:
            return xs[0]
        pos = q * (len(xs) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(xs) - 1)
        return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)

    @property
    def p25(self) -> float:
        return self.quantile(0.25)

    @property
    def p75(self) -> float:
        return self.quantile(0.75)

    @property
    def min(self) -> float:
        return min(self.times)

    @property
    def spread(self) -> float:
        """Inter-quartile range relative to the median (0.05 = +-5 % band width)."""
        m = self.median
        return (self.p75 - self.p25) / m if m > 0 else 0.0


def measure(
    fn: Callable[[], object],
    device: torch.device,
    *,
    budget_s: float = 0.3,
    min_reps: int = 3,
    max_reps: int = 200,
    warmup: int = 1,
    max_call_s: float = 30.0,
) -> Timing:
    """Time ``fn`` repeatedly on ``device``.

    CPU: ``time.perf_counter`` around each call. CUDA: a pair of CUDA events per call, one
    ``torch.cuda.synchronize`` before the loop and one after it (the events measure device time, so
    the host never waits inside the loop). The number of repetitions fits ``budget_s`` (at least
    ``min_reps``, at most ``max_reps``); a call slower than ``max_call_s`` is timed once only.
    """
    sync(device)
    t0 = time.perf_counter()
    for _ in range(max(warmup, 1)):
        fn()
    sync(device)
    est = (time.perf_counter() - t0) / max(warmup, 1)
    if est > max_call_s:
        return Timing([est])
    reps = int(min(max_reps, max(min_reps, budget_s / max(est, 1e-7))))
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        sync(device)
        for s, e in zip(starts, ends):
            s.record()
            fn()
            e.record()
        sync(device)
        return Timing([s.elapsed_time(e) / 1e3 for s, e in zip(starts, ends)])
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return Timing(times)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str:
    """The mtlsam_fast checkout's HEAD commit (read-only ``git rev-parse``), or ``"unknown"``."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _version(mod: str) -> str | None:
    try:
        from importlib.metadata import version

        __import__(mod)
        try:
            return version(mod)
        except Exception:
            return getattr(__import__(mod), "__version__", "installed")
    except Exception:
        return None


def machine_info(device: torch.device) -> dict:
    import mtlsam_fast

    info = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "torchjd": _version("torchjd"),
        "quadprog": _version("quadprog"),
        "mtlsam_fast": mtlsam_fast.__version__,
        "mtlsam_fast_commit": git_commit(),
        "available_backends": mtlsam_fast.available_backends(device),
        "timestamp_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        # other processes share this machine: timings taken under load are noisier and slower
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    return info


def measure_roofline(device: torch.device, nbytes: int, budget_s: float) -> dict:
    """Device bandwidth measured in this run: a read (``G.sum()``) and a copy (``dst.copy_(src)``).

    The buffer (``nbytes``) should be several times the last-level cache. Read GB/s counts the bytes
    read once; copy GB/s counts read + written bytes (2x the buffer).
    """
    n = max(nbytes // 4, 1 << 16)
    src = torch.rand(n, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    t_read = measure(lambda: src.sum(), device, budget_s=budget_s, min_reps=5)
    t_copy = measure(lambda: dst.copy_(src), device, budget_s=budget_s, min_reps=5)
    b = n * 4
    return {
        "buffer_bytes": b,
        "read_gbps": b / t_read.median / 1e9,
        "read_spread": t_read.spread,
        "copy_gbps": 2 * b / t_copy.median / 1e9,
        "copy_spread": t_copy.spread,
        "method": "read: G.sum() over an fp32 buffer; copy: dst.copy_(src), read+write bytes",
    }


def make_offsets(P: int, n_layers: int = 20) -> list[int]:
    """Segment boundaries that look like a network: per layer one big weight and two small vectors.

    ``n_layers`` weight tensors share ~P elements; each layer also gets a bias and a norm scale
    (64 elements each, or fewer when P is tiny), so the layout has ``3 * n_layers`` segments.
    """
    small = max(1, min(64, P // (16 * n_layers)))
    big_total = P - 2 * small * n_layers
    if big_total < n_layers:
        # tiny P: equal segments
        n = max(1, min(P, 3 * n_layers))
        bounds = [round(i * P / n) for i in range(n + 1)]
        return sorted(set(bounds))
    # weights grow geometrically across layers, like the channel counts of a CNN
    ws = [1.15**i for i in range(n_layers)]
    tot = sum(ws)
    bigs = [max(1, int(big_total * w / tot)) for w in ws]
    bigs[-1] += big_total - sum(bigs)
    bounds, off = [0], 0
    for b in bigs:
        for s in (b, small, small):
            off += s
            bounds.append(off)
    assert off == P, (off, P)
    return bounds


def write_cpu_rows(out: Path | None, name: str, args: Any, rows: list[dict]) -> Path:
    """``OUT/NAME.json`` (``OUT`` default :data:`CPU_OUT`): this machine, the run's arguments and
    its rows; returns the path."""
    folder = out or CPU_OUT
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"meta": machine_info(torch.device("cpu")), "config": vars(args), "rows": rows}
    path = folder / f"{name}.json"
    path.write_text(json.dumps(doc, indent=1, default=str))
    print(f"wrote {path}")
    return path
