"""The benchmark report: a sweep of every op x backend x dtype x K x P against baselines and peers.

``python -m bench [--quick] [--out DIR] [--device cpu|cuda] [--ops ...] [--backends ...]``

For every configuration it measures, in the same process and run:

* each available backend of :mod:`mtlsam_fast.ops` (whatever ``available_backends(device)``
  reports at run time; a backend that lacks an op is listed as skipped);
* baselines: ``torch.mm`` (or the closest plain-torch one-liner), the faithful naive
  implementation (:mod:`bench.naive`), and peers when installed (:mod:`bench.peers`);
* the device roofline: read bandwidth of ``G.sum()`` and copy bandwidth of ``dst.copy_(src)``.

It prints a table (median time, inter-quartile spread, achieved GB/s, % of the roofline, speed-up
against each baseline) and writes ``ops.json``, ``ops.csv``, ``ops.png``, ``qp.png`` and
``summary.md`` into ``--out``. Absolute times are never asserted anywhere.
"""

from __future__ import annotations

import argparse
import csv
import inspect
import itertools
import json
import math
import os
import re
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

import mtlsam_fast
from mtlsam_fast import ops
from mtlsam_fast.ops import kkt_residual

from . import naive, peers
from .common import DTYPES, REPO_ROOT, machine_info, make_offsets, measure, measure_roofline

P_OPS = (
    "gram",
    "diff_gram",
    "segment_norms",
    "combine",
    "perturb",
    "restore",
    "gaussian_noise",
    "noise_stats",
)
K_OPS = ("solve_qp", "weighting")
ALL_OPS = P_OPS + K_OPS
#: ops whose result does not depend on K (measured once per P, reported with K = 1)
NO_K = ("perturb", "restore", "gaussian_noise", "noise_stats")

PRESETS = {
    "quick": dict(
        Ks=[4, 16],
        Ps=[1 << 18, 1 << 21],
        dtypes=["fp32", "bf16"],
        qp_Ks=[4, 16, 64],
        budget_s=0.03,
        roof_mib=128,
        max_call_s=2.0,
    ),
    "default": dict(
        Ks=[4, 16],
        Ps=[1 << 20, 1 << 22, 1 << 24],
        dtypes=["fp32", "bf16"],
        qp_Ks=[2, 4, 8, 16, 32, 64],
        budget_s=0.2,
        roof_mib=512,
        max_call_s=10.0,
    ),
}


@dataclass
class Case:
    impl: str
    kind: str  # "backend" | "baseline" | "peer"
    fn: Callable[[], object]
    note: str = ""
    result: Callable[[object], torch.Tensor | None] | None = None  # for QP rows: output -> weights


@dataclass
class Row:
    op: str
    impl: str
    kind: str
    dtype: str
    K: int
    P: int
    S: int
    median_s: float = math.nan
    p25_s: float = math.nan
    p75_s: float = math.nan
    min_s: float = math.nan
    reps: int = 0
    bytes: int = 0
    gbps: float | None = None
    roof: str | None = None
    roof_gbps: float | None = None
    pct_roof: float | None = None
    kkt: float | None = None
    note: str = ""
    error: str | None = None
    ratios: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------------------- cases


def _has_backend_kw(fn: Callable) -> bool:
    return "backend" in inspect.signature(fn).parameters


def _op_bytes(op: str, K: int, P: int, s: int) -> tuple[int, int]:
    """(bytes read, bytes written) of an ideal single-pass implementation."""
    return {
        "gram": (K * P * s, 0),
        "diff_gram": (2 * K * P * s, K * P * s),
        "segment_norms": (K * P * s, 0),
        "combine": (K * P * s, P * s),
        "perturb": (2 * P * s, P * s),
        "restore": (P * s, P * s),
        "gaussian_noise": (0, P * 4),
        "noise_stats": (P * s, 0),
    }[op]


def p_op_cases(
    op: str,
    K: int,
    P: int,
    dtype: torch.dtype,
    device: torch.device,
    backends: list[str],
    bounds: list[int],
    with_naive: bool,
) -> list[Case]:
    """Inputs for one (op, K, P, dtype) and every implementation that runs on them."""
    g = torch.Generator(device=device).manual_seed(0)
    offsets = torch.tensor(bounds, dtype=torch.int64, device=device)
    cases: list[Case] = []

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=torch.float32).to(dtype)

    def backend_cases(call: Callable[[str | None], object], fn: Callable) -> None:
        if _has_backend_kw(fn):
            for b in backends:
                cases.append(Case(b, "backend", (lambda b=b: call(b))))
        else:  # an op without dispatch (restore): one implementation
            cases.append(Case("ops", "backend", lambda: call(None)))

    if op == "gram":
        G = rand(K, P)
        backend_cases(lambda b: ops.gram(G, backend=b), ops.gram)
        cases.append(
            Case(
                "torch.mm",
                "baseline",
                lambda: torch.mm(G, G.T),
                note="output in the input dtype (no fp32 accumulation guarantee for 16-bit)",
            )
        )
        if with_naive:
            vecs = naive.split(G, bounds)
            cases.append(Case("naive", "baseline", lambda: naive.gram(vecs)))
    elif op == "diff_gram":
        A, B = rand(K, P), rand(K, P) * 1e-3  # A drifts by -B per call: stays finite over many reps
        backend_cases(lambda b: ops.diff_gram(A, B, backend=b), ops.diff_gram)
        cases.append(Case("torch.mm", "baseline", lambda: torch.mm(A.sub_(B), A.T)))
        if with_naive:
            va, vb = naive.split(A, bounds), naive.split(B, bounds)
            cases.append(Case("naive", "baseline", lambda: naive.diff_gram(va, vb)))
    elif op == "segment_norms":
        G = rand(K, P)
        backend_cases(lambda b: ops.segment_norms(G, offsets, backend=b), ops.segment_norms)
        pairs = list(itertools.pairwise(bounds))
        cases.append(
            Case(
                "torch.norm-loop",
                "baseline",
                lambda: torch.stack([G[:, a:c].norm(dim=1) for a, c in pairs], 1),
                note="per-parameter torch.norm, stacked on the device (SAM's _grad_norm style)",
            )
        )
        if with_naive:
            vecs = naive.split(G, bounds)
            cases.append(Case("naive", "baseline", lambda: naive.segment_norms(vecs)))
    elif op == "combine":
        G = rand(K, P)
        w = torch.softmax(torch.randn(K, generator=g, device=device), 0)
        out = torch.empty(P, dtype=dtype, device=device)
        backend_cases(lambda b: ops.combine(w, G, out=out, backend=b), ops.combine)
        w_mm = w.to(dtype)[None]
        cases.append(Case("torch.mm", "baseline", lambda: torch.mm(w_mm, G)))
        if with_naive:
            vecs = naive.split(G, bounds)
            w_host = w.tolist()
            cases.append(Case("naive", "baseline", lambda: naive.combine(w_host, vecs)))
    elif op == "perturb":
        backup, direction = rand(P), rand(P)
        theta = backup.clone()
        scale = torch.rand(len(bounds) - 1, generator=g, device=device) * 0.05
        backend_cases(
            lambda b: ops.perturb(theta, backup, offsets, direction, scale, backend=b), ops.perturb
        )
        if with_naive:
            pv, dv = naive.split_flat(theta, bounds), naive.split_flat(direction, bounds)
            cases.append(
                Case(
                    "naive",
                    "baseline",
                    lambda: naive.perturb(pv, dv),
                    note="SAM: host grad norm, per-parameter clone + add_",
                )
            )
    elif op == "restore":
        backup = rand(P)
        theta = backup.clone()
        backend_cases(lambda b: ops.restore(theta, backup), ops.restore)
        if with_naive:
            pv, ov = naive.split_flat(theta, bounds), naive.split_flat(backup, bounds)
            cases.append(
                Case("naive", "baseline", lambda: naive.restore(pv, ov), note="per-parameter copy_")
            )
    elif op == "gaussian_noise":
        backend_cases(
            lambda b: ops.gaussian_noise(1234, 0, P, device=device, backend=b), ops.gaussian_noise
        )
        cases.append(
            Case(
                "torch.randn",
                "baseline",
                lambda: torch.randn(P, generator=g, device=device),
                note="stateful generator, not counter-based",
            )
        )
    elif op == "noise_stats":
        ref = rand(P)
        backend_cases(lambda b: ops.noise_stats(1234, 0, ref, offsets, backend=b), ops.noise_stats)
        if with_naive:
            rv = naive.split_flat(ref, bounds)
            gen = torch.Generator(device=device).manual_seed(1)
            cases.append(
                Case(
                    "naive",
                    "baseline",
                    lambda: naive.noise_stats(rv, gen),
                    note="torch.randn per parameter, host scalars",
                )
            )
    else:
        raise ValueError(op)
    return cases


def make_gram(K: int, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """A realistic multi-task Gram: correlated task gradients (shared component + noise), varied
    norms."""
    g = torch.Generator().manual_seed(seed + K)
    n = max(4 * K, 512)
    shared = torch.randn(1, n, generator=g, dtype=torch.float64)
    G = 0.5 * shared + torch.randn(K, n, generator=g, dtype=torch.float64)
    G = G * torch.logspace(-1, 1, K, dtype=torch.float64)[:, None]  # norms over two decades
    return (G @ G.T).to(dtype).to(device)


def qp_cases(
    K: int, gram: torch.Tensor, backends: list[str], with_naive: bool, with_peers: bool
) -> list[Case]:
    cases = [
        Case(b, "backend", (lambda b=b: ops.solve_qp(gram, backend=b)), result=lambda v: v)
        for b in backends
    ]
    if with_naive:
        cases.append(
            Case(
                "naive-fw",
                "baseline",
                lambda: naive.min_norm_from_gram(gram),
                note="Sener & Koltun MinNormSolver loop on host floats (dot products given)",
                result=lambda v: torch.as_tensor(v),
            )
        )
    if with_peers:
        if peers.quadprog_available():
            cases.append(
                Case(
                    "quadprog",
                    "peer",
                    lambda: peers.quadprog_simplex(gram),
                    note="Goldfarb-Idnani active set, host fp64",
                    result=lambda v: torch.as_tensor(v),
                )
            )
        w = peers.torchjd_weighting("mgda")
        if w is not None:
            cases.append(
                Case(
                    "torchjd-mgda",
                    "peer",
                    lambda: w(gram),
                    note="torchjd MGDAWeighting defaults",
                    result=lambda v: v,
                )
            )
    return cases


def weighting_cases(
    name: str, K: int, gram: torch.Tensor, backends: list[str], with_naive: bool, with_peers: bool
) -> list[Case]:
    from mtlsam_fast import weighting

    cases: list[Case] = []
    losses = torch.rand(K, dtype=gram.dtype, device=gram.device) + 0.5
    for b in backends:
        try:
            w = weighting.get(name)
        except Exception as e:
            cases.append(Case(b, "backend", _raiser(e)))
            continue

        def run(w=w, b=b):
            mtlsam_fast.set_backend(b)
            try:
                return w(gram, losses) if w.needs_losses else w(gram)
            finally:
                mtlsam_fast.set_backend(None)

        cases.append(Case(b, "backend", run))
    if with_naive and name == "mgda":
        cases.append(Case("naive-fw", "baseline", lambda: naive.min_norm_from_gram(gram)))
    if with_peers:
        pw = peers.torchjd_weighting(name)
        if pw is not None:
            cases.append(Case(f"torchjd-{name}", "peer", lambda: pw(gram), note="torchjd defaults"))
        if name == "mgda" and peers.quadprog_available():
            cases.append(Case("quadprog", "peer", lambda: peers.quadprog_simplex(gram)))
    return cases


def _raiser(e: Exception) -> Callable[[], None]:
    def f():
        raise e

    return f


# ----------------------------------------------------------------------------------------- sweep


@dataclass
class Settings:
    device: torch.device
    ops: list[str]
    backends: list[str]
    dtypes: list[str]
    Ks: list[int]
    Ps: list[int]
    qp_Ks: list[int]
    budget_s: float
    roof_mib: int
    max_call_s: float
    naive: bool = True
    peers: bool = True
    n_layers: int = 20
    weightings: list[str] | None = None
    quick: bool = False


def _fmt_err(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]


def _run_case(case: Case, row: Row, st: Settings) -> object:
    out_holder: list[object] = []

    def fn():
        r = case.fn()
        if not out_holder:
            out_holder.append(r)
        return r

    t = measure(fn, st.device, budget_s=st.budget_s, max_call_s=st.max_call_s)
    row.median_s, row.p25_s, row.p75_s, row.min_s, row.reps = (
        t.median,
        t.p25,
        t.p75,
        t.min,
        len(t.times),
    )
    return out_holder[0] if out_holder else None


def sweep(st: Settings, log=print) -> tuple[list[Row], dict]:
    roof = measure_roofline(st.device, st.roof_mib << 20, budget_s=max(st.budget_s * 4, 0.1))
    log(
        f"roofline on {st.device}: read {roof['read_gbps']:.1f} GB/s, "
        f"copy {roof['copy_gbps']:.1f} GB/s "
        f"(buffer {roof['buffer_bytes'] >> 20} MiB)"
    )
    rows: list[Row] = []
    too_slow: set[tuple] = set()

    samples = [dict(roof, op="start")]
    for op in [o for o in st.ops if o in P_OPS]:
        if len(samples) > 1 or op != st.ops[0]:
            # the machine may be shared: re-measure the roofline next to each op's measurements
            roof = measure_roofline(
                st.device, st.roof_mib << 20, budget_s=max(st.budget_s * 2, 0.05)
            )
            samples.append(dict(roof, op=op))
            log(
                f"roofline before {op}: read {roof['read_gbps']:.1f} GB/s, "
                f"copy {roof['copy_gbps']:.1f} GB/s"
            )
        for dname in st.dtypes:
            dtype = DTYPES[dname]
            if op == "gaussian_noise" and dtype != torch.float32:
                continue  # output is always fp32
            for K in [1] if op in NO_K else st.Ks:
                for P in st.Ps:
                    bounds = make_offsets(P, st.n_layers)
                    try:
                        cases = p_op_cases(
                            op, K, P, dtype, st.device, st.backends, bounds, st.naive
                        )
                    except Exception as e:
                        rows.append(
                            Row(
                                op,
                                "inputs",
                                "error",
                                dname,
                                K,
                                P,
                                len(bounds) - 1,
                                error=_fmt_err(e),
                            )
                        )
                        continue
                    rd, wr = _op_bytes(op, K, P, dtype.itemsize)
                    bw_kind = "read" if wr == 0 else "copy"
                    bw = roof[f"{bw_kind}_gbps"]
                    for case in cases:
                        row = Row(
                            op,
                            case.impl,
                            case.kind,
                            dname,
                            K,
                            P,
                            len(bounds) - 1,
                            bytes=rd + wr,
                            note=case.note,
                        )
                        key = (op, case.impl, dname, K)
                        if key in too_slow:
                            row.error = f"skipped: slower than {st.max_call_s}s at a smaller P"
                            rows.append(row)
                            continue
                        try:
                            _run_case(case, row, st)
                        except Exception as e:
                            row.error = _fmt_err(e)
                            rows.append(row)
                            continue
                        if row.median_s > st.max_call_s:
                            too_slow.add(key)
                        row.gbps = row.bytes / row.median_s / 1e9
                        row.roof = bw_kind
                        row.roof_gbps = bw
                        row.pct_roof = 100.0 * row.gbps / bw
                        rows.append(row)
                    del cases
                    log(f"  {op:15s} {dname} K={K:<3d} P={P:<9d} done")

    for op in [o for o in st.ops if o in K_OPS]:
        qp_dtypes = ["fp32", "fp64"]
        for dname in qp_dtypes:
            for K in st.qp_Ks:
                gram = make_gram(K, DTYPES[dname], st.device)
                if op == "solve_qp":
                    groups = [("solve_qp", qp_cases(K, gram, st.backends, st.naive, st.peers))]
                else:
                    from mtlsam_fast import weighting

                    names = st.weightings or weighting.names()
                    groups = [
                        (
                            f"weighting:{n}",
                            weighting_cases(n, K, gram, st.backends, st.naive, st.peers),
                        )
                        for n in names
                    ]
                for opname, cases in groups:
                    for case in cases:
                        row = Row(opname, case.impl, case.kind, dname, K, 0, 0, note=case.note)
                        try:
                            out = _run_case(case, row, st)
                            if case.result is not None and out is not None:
                                v = case.result(out).to(torch.float64).cpu()
                                row.kkt = float(kkt_residual(gram.double().cpu(), v))
                        except Exception as e:
                            row.error = _fmt_err(e)
                        rows.append(row)
                log(f"  {op:15s} {dname} K={K:<3d} done")
    add_ratios(rows)
    first = dict(samples[0])
    first["samples"] = samples
    return rows, first


def add_ratios(rows: list[Row]) -> None:
    """For every backend row: median(other) / median(this) for each baseline, peer and the torch
    backend."""
    groups: dict[tuple, list[Row]] = {}
    for r in rows:
        groups.setdefault((r.op, r.dtype, r.K, r.P), []).append(r)
    for grp in groups.values():
        ok = [r for r in grp if r.error is None and r.median_s == r.median_s]
        for r in ok:
            if r.kind != "backend":
                continue
            for o in ok:
                if o is r or (o.kind == "backend" and o.impl != "torch"):
                    continue
                r.ratios[o.impl] = o.median_s / r.median_s


# ----------------------------------------------------------------------------------------- output


def _fmt_time(s: float) -> str:
    if s != s:
        return "-"
    if s < 1e-3:
        return f"{s * 1e6:.1f}us"
    if s < 1:
        return f"{s * 1e3:.2f}ms"
    return f"{s:.2f}s"


def format_table(rows: list[Row]) -> str:
    lines = []
    hdr = (
        f"{'op':22s} {'dtype':5s} {'K':>3s} {'P':>9s} {'impl':16s} {'median':>9s} {'IQR%':>6s} "
        f"{'GB/s':>7s} {'%roof':>6s} {'kkt':>8s}  speed-up (x) vs"
    )
    lines.append(hdr)
    lines.append("-" * len(hdr))
    last = None
    for r in rows:
        key = (r.op, r.dtype, r.K, r.P)
        if last is not None and key[0] != last[0]:
            lines.append("")
        last = key
        if r.error:
            lines.append(f"{r.op:22s} {r.dtype:5s} {r.K:>3d} {r.P:>9d} {r.impl:16s} {r.error}")
            continue
        iqr = 100 * (r.p75_s - r.p25_s) / r.median_s if r.median_s else 0
        gb = f"{r.gbps:7.2f}" if r.gbps is not None else f"{'-':>7s}"
        pr = f"{r.pct_roof:6.1f}" if r.pct_roof is not None else f"{'-':>6s}"
        kk = f"{r.kkt:8.1e}" if r.kkt is not None else f"{'-':>8s}"
        rat = "  ".join(f"{k}={v:.3g}" for k, v in r.ratios.items())
        lines.append(
            f"{r.op:22s} {r.dtype:5s} {r.K:>3d} {r.P:>9d} {r.impl:16s} "
            f"{_fmt_time(r.median_s):>9s} {iqr:6.1f} {gb} {pr} {kk}  {rat}"
        )
    return "\n".join(lines)


def best_backend_rows(rows: list[Row]) -> dict[tuple, Row]:
    """Fastest backend per configuration (what ``backend="auto"`` should pick)."""
    best: dict[tuple, Row] = {}
    for r in rows:
        if r.kind != "backend" or r.error:
            continue
        k = (r.op, r.dtype, r.K, r.P)
        if k not in best or r.median_s < best[k].median_s:
            best[k] = r
    return best


def headline(rows: list[Row]) -> list[dict]:
    """Per op, fp32, the largest measured size: the fastest backend against each baseline/peer."""
    best = best_backend_rows(rows)
    out = []
    for op in dict.fromkeys(r.op for r in rows):
        cand = [(k, r) for k, r in best.items() if k[0] == op and k[1] == "fp32"]
        if not cand:
            continue
        (_, _, K, P), r = max(cand, key=lambda kr: (kr[0][3], kr[0][2]))
        out.append(
            {
                "op": op,
                "K": K,
                "P": P,
                "backend": r.impl,
                "median_s": r.median_s,
                "gbps": r.gbps,
                "pct_roof": r.pct_roof,
                "kkt": r.kkt,
                "speedup_vs": dict(r.ratios),
            }
        )
    return out


def _range(roof: dict, key: str) -> str:
    vals = [x[key] for x in roof.get("samples", [roof])]
    lo, hi = min(vals), max(vals)
    return f"{lo:.1f}" if hi - lo < 0.05 * hi else f"{lo:.1f}-{hi:.1f}"


#: baseline names grouped into the headline's columns
PLAIN_TORCH = ("torch.mm", "torch.norm-loop", "torch.randn")
NAIVE = ("naive", "naive-fw")


def headline_markdown(head: list[dict], meta: dict, roof: dict) -> str:
    lines = [
        f"Device: {meta['device_name']} ({meta['device']}, {meta['torch_threads']} torch threads), "
        f"torch {meta['torch']}, triton {meta['triton']}, torchjd {meta.get('torchjd')}, "
        f"mtlsam_fast {meta['mtlsam_fast_commit'][:10]}. "
        f"Roofline measured in the same run: read {_range(roof, 'read_gbps')} GB/s, "
        f"copy {_range(roof, 'copy_gbps')} GB/s "
        f"(re-measured before each op; 1-min load average {_load(meta)} "
        f"on {meta['cpu_count']} CPUs during the run). "
        "fp32, largest size of the sweep; "
        "speed-up = other median / fastest mtlsam_fast backend median "
        "(> 1: mtlsam_fast is faster).",
        "",
        "| op | K | P | backend | median | GB/s | % roofline | vs plain torch | vs naive "
        "| vs torch backend | vs peers |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for h in head:
        sv = h["speedup_vs"]
        gb = f"{h['gbps']:.2f}" if h["gbps"] is not None else "-"
        pr = f"{h['pct_roof']:.0f} %" if h["pct_roof"] is not None else "-"
        plain = ", ".join(f"{sv[b]:.3g}x ({b})" for b in PLAIN_TORCH if b in sv)
        nv = ", ".join(f"{sv[b]:.3g}x" for b in NAIVE if b in sv)
        tb = f"{sv['torch']:.3g}x" if "torch" in sv else ""
        peer = ", ".join(
            f"{sv[b]:.3g}x ({b})" for b in sv if b not in PLAIN_TORCH + NAIVE + ("torch",)
        )
        P = f"{h['P']:,}" if h["P"] else "-"
        lines.append(
            f"| {h['op']} | {h['K']} | {P} | {h['backend']} | {_fmt_time(h['median_s'])} | "
            f"{gb} | {pr} | "
            f"{plain} | {nv} | {tb} | {peer} |"
        )
    return "\n".join(lines) + "\n"


def _load(meta: dict) -> str:
    a = meta.get("loadavg_start") or ["?"]
    b = meta.get("loadavg_end") or a
    return (
        f"{a[0]:.1f}-{b[0]:.1f}"
        if isinstance(a[0], float) and isinstance(b[0], float)
        else str(a[0])
    )


def render(out: Path) -> int:
    """Re-render summary.md, ops.csv and the PNGs from a stored ops.json (no new measurement)."""
    doc = json.loads((out / "ops.json").read_text())
    rows = [Row(**r) for r in doc["results"]]
    (out / "summary.md").write_text(
        headline_markdown(doc["headline"], doc["meta"], doc["roofline"])
    )
    write_csv(rows, out / "ops.csv")
    plot(rows, doc["roofline"], doc["meta"], out)
    print((out / "summary.md").read_text())
    return 0


def write_csv(rows: list[Row], path: Path) -> None:
    base_names = sorted({k for r in rows for k in r.ratios})
    fields = [
        "op",
        "impl",
        "kind",
        "dtype",
        "K",
        "P",
        "S",
        "median_s",
        "p25_s",
        "p75_s",
        "min_s",
        "reps",
        "bytes",
        "gbps",
        "roof",
        "roof_gbps",
        "pct_roof",
        "kkt",
        "error",
        "note",
    ]
    with open(path, "w", newline="") as f:
        wr = csv.writer(f)
        wr.writerow(fields + [f"speedup_vs_{b}" for b in base_names])
        for r in rows:
            d = vars(r)
            wr.writerow([d[k] for k in fields] + [r.ratios.get(b, "") for b in base_names])


def plot(rows: list[Row], roof: dict, meta: dict, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    p_ops = [o for o in P_OPS if any(r.op == o and not r.error for r in rows)]
    if p_ops:
        fig, axes = plt.subplots(len(p_ops), 2, figsize=(11, 2.6 * len(p_ops)), squeeze=False)
        for i, op in enumerate(p_ops):
            ok = [r for r in rows if r.op == op and not r.error and r.dtype == "fp32"]
            if not ok:
                ok = [r for r in rows if r.op == op and not r.error]
            Kmax = max(r.K for r in ok)
            ok = [r for r in ok if Kmax == r.K]
            roof_kind = ok[0].roof
            for impl in dict.fromkeys(r.impl for r in ok):
                pts = sorted((r.P, r.gbps, r.pct_roof) for r in ok if r.impl == impl)
                style = "-o" if any(r.kind == "backend" for r in ok if r.impl == impl) else "--x"
                axes[i][0].plot([p[0] for p in pts], [p[1] for p in pts], style, label=impl)
                axes[i][1].plot([p[0] for p in pts], [p[2] for p in pts], style, label=impl)
            axes[i][0].axhline(
                statistics.median(r.roof_gbps for r in ok),
                color="k",
                lw=0.8,
                ls=":",
                label=f"{roof_kind} roofline",
            )
            axes[i][0].set(
                xscale="log", yscale="log", ylabel="GB/s", title=f"{op} ({ok[0].dtype}, K={Kmax})"
            )
            axes[i][1].axhline(100, color="k", lw=0.8, ls=":")
            axes[i][1].set(
                xscale="log",
                yscale="log",
                ylabel="% of roofline",
                title=f"{op}: ratio to the {roof_kind} roofline",
            )
            axes[i][0].legend(fontsize=7)
        for ax in axes[-1]:
            ax.set_xlabel("P (elements per task)")
        fig.suptitle(
            f"mtlsam_fast ops on {meta['device_name']} ({meta['device']}), torch {meta['torch']}, "
            f"commit {meta['mtlsam_fast_commit'][:10]}",
            fontsize=9,
        )
        fig.tight_layout(rect=(0, 0, 1, 0.985))
        p = out_dir / "ops.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    qp_rows = [r for r in rows if r.op == "solve_qp" and not r.error]
    if qp_rows:
        fig, axes = plt.subplots(1, 2, figsize=(11, 3.6))
        for dname, ls in (("fp32", "-o"), ("fp64", "--s")):
            sel = [r for r in qp_rows if r.dtype == dname]
            for impl in dict.fromkeys(r.impl for r in sel):
                pts = sorted((r.K, r.median_s, r.kkt) for r in sel if r.impl == impl)
                axes[0].plot(
                    [p[0] for p in pts], [p[1] * 1e3 for p in pts], ls, label=f"{impl} {dname}"
                )
                if all(p[2] is not None for p in pts):
                    axes[1].plot(
                        [p[0] for p in pts],
                        [max(p[2], 1e-17) for p in pts],
                        ls,
                        label=f"{impl} {dname}",
                    )
        axes[0].set(yscale="log", xlabel="K", ylabel="ms per solve", title="simplex QP (MGDA) time")
        axes[1].set(
            yscale="log", xlabel="K", ylabel="relative KKT residual", title="solution accuracy"
        )
        from matplotlib.ticker import ScalarFormatter

        for ax in axes:
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axes[0].legend(fontsize=7)
        fig.suptitle(f"{meta['device_name']} ({meta['device']}), torch {meta['torch']}", fontsize=9)
        fig.tight_layout()
        p = out_dir / "qp.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        paths.append(p)
    return paths


# ----------------------------------------------------------------------------------------- CLI


def _int_list(s: str) -> list[int]:
    return [int(float(x)) for x in s.split(",") if x]


def _str_list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def default_out(device: torch.device) -> Path:
    """``runs/bench/<device>``: untracked (``.gitignore``), so a run never changes the committed
    results in ``bench/results/`` by accident; refresh those on purpose with ``--out``."""
    if device.type == "cuda":
        name = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")
        return REPO_ROOT / "runs" / "bench" / f"cuda-{name}"
    return REPO_ROOT / "runs" / "bench" / "cpu"


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument(
        "--quick",
        action="store_true",
        help="small sweep for CI, one thread unless --threads says otherwise (about 1 minute on "
        "the 2-core development VM, under 2 minutes)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench/<device>, untracked; the committed results are "
        "refreshed only on purpose: --out bench/results/<device>)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i]")
    ap.add_argument(
        "--ops", type=_str_list, default=None, help=f"comma list from {','.join(ALL_OPS)}"
    )
    ap.add_argument(
        "--backends",
        type=_str_list,
        default=None,
        help="default: mtlsam_fast.available_backends(device)",
    )
    ap.add_argument(
        "--dtypes", type=_str_list, default=None, help="comma list from fp32,bf16,fp16,fp64"
    )
    ap.add_argument(
        "--K", type=_int_list, default=None, help="task counts for the P-sized ops, e.g. 4,16"
    )
    ap.add_argument("--P", type=_int_list, default=None, help="elements per task, e.g. 1e6,4e6")
    ap.add_argument(
        "--qp-K", type=_int_list, default=None, help="task counts for solve_qp / weightings"
    )
    ap.add_argument("--weightings", type=_str_list, default=None, help="default: all that import")
    ap.add_argument(
        "--budget", type=float, default=None, help="seconds of repetitions per measurement"
    )
    ap.add_argument(
        "--max-call",
        type=float,
        default=None,
        help="an impl slower than this per call is timed once and skipped at larger P",
    )
    ap.add_argument("--roof-mib", type=int, default=None, help="roofline buffer size in MiB")
    ap.add_argument("--no-naive", action="store_true", help="skip the naive baseline")
    ap.add_argument("--no-peers", action="store_true", help="skip peer libraries")
    ap.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads (default: torch's, 1 with --quick; use 1 on a shared machine)",
    )
    ap.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="DIR",
        help="only re-render summary.md, ops.csv and the PNGs from DIR/ops.json (no measurement)",
    )


def _warn_if_oversubscribed() -> None:
    """Multi-threaded CPU ops stall at their barriers when other processes hold the cores."""
    if not hasattr(os, "getloadavg"):
        return
    load, cpus, threads = os.getloadavg()[0], os.cpu_count() or 1, torch.get_num_threads()
    if threads > 1 and load >= cpus:
        print(
            f"WARNING: load average {load:.1f} on {cpus} CPUs with {threads} torch threads: "
            "parallel ops will wait for descheduled threads (tens of ms per call). "
            "Consider --threads 1 on a shared machine."
        )


def main(args: argparse.Namespace) -> int:
    if args.render is not None:
        return render(args.render)
    if args.threads or args.quick:
        # --quick: one thread, because on a busy 2-core machine multi-threaded small ops wait at
        # their barriers for descheduled threads (137 s instead of 61 s for the quick sweep)
        torch.set_num_threads(args.threads or 1)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    preset = PRESETS["quick" if args.quick else "default"]
    available = mtlsam_fast.available_backends(device)
    backends = args.backends or available
    if args.backends is None and device.type == "cpu" and "triton" in backends:
        # TRITON_INTERPRET=1 runs programs serially in Python: a correctness mode, not a speed one
        print(
            "note: skipping the triton backend on the CPU (interpreter mode); "
            "pass --backends to force it"
        )
        backends = [b for b in backends if b != "triton"]
    missing = [b for b in backends if b not in available]
    if missing:
        print(
            f"note: backends {missing} are not available on {device} "
            f"(available: {available}); skipped"
        )
        backends = [b for b in backends if b in available]
    ops_sel = args.ops or list(ALL_OPS)
    bad = [o for o in ops_sel if o not in ALL_OPS]
    if bad:
        print(f"error: unknown ops {bad}; choose from {ALL_OPS}", file=sys.stderr)
        return 2
    st = Settings(
        device=device,
        ops=ops_sel,
        backends=backends,
        dtypes=args.dtypes or preset["dtypes"],
        Ks=args.K or preset["Ks"],
        Ps=args.P or preset["Ps"],
        qp_Ks=args.qp_K or preset["qp_Ks"],
        budget_s=args.budget or preset["budget_s"],
        roof_mib=args.roof_mib or preset["roof_mib"],
        max_call_s=args.max_call or preset["max_call_s"],
        naive=not args.no_naive,
        peers=not args.no_peers,
        weightings=args.weightings,
        quick=args.quick,
    )
    for d in st.dtypes:
        if d not in DTYPES:
            print(f"error: unknown dtype {d}", file=sys.stderr)
            return 2
    out = args.out or default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    meta = machine_info(device)
    print(
        f"mtlsam_fast bench on {meta['device_name']} ({device}); backends {backends}; "
        f"torch {meta['torch']}, triton {meta['triton']}, torchjd {meta['torchjd']}, "
        f"commit {meta['mtlsam_fast_commit'][:10]}"
    )
    _warn_if_oversubscribed()
    t0 = time.perf_counter()
    rows, roof = sweep(st)
    elapsed = time.perf_counter() - t0
    meta["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print()
    print(format_table(rows))
    head = headline(rows)
    md = headline_markdown(head, meta, roof)
    config = {k: (str(v) if isinstance(v, torch.device) else v) for k, v in vars(st).items()}
    config["preset"] = "quick" if args.quick else "default"
    config["command"] = " ".join(["python -m bench", *sys.argv[1:]])
    doc = {
        "meta": meta,
        "roofline": roof,
        "config": config,
        "elapsed_s": elapsed,
        "headline": head,
        "results": [vars(r) for r in rows],
    }
    (out / "ops.json").write_text(json.dumps(doc, indent=1, default=str))
    write_csv(rows, out / "ops.csv")
    (out / "machine.json").write_text(json.dumps(meta, indent=1))
    (out / "summary.md").write_text(md)
    pngs = plot(rows, roof, meta, out)
    print()
    print(md)
    print(
        f"wrote {out}/ops.json, ops.csv, summary.md, machine.json, "
        + ", ".join(p.name for p in pngs)
        + f"  ({elapsed:.1f} s)"
    )
    return 0
