"""CI check of the benchmark report: ``python -m bench --quick`` runs and writes well-formed
results.

Never asserts on a time or a speed-up: only on the structure of the JSON, CSV and PNG files, on the
baselines being present, and on the naive baseline computing the right numbers.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import naive  # noqa: E402
from bench.common import make_offsets  # noqa: E402


def test_naive_baseline_is_correct():
    """The naive baseline computes what mtlsam_fast computes (so the speed-ups compare like with
    like)."""
    torch.manual_seed(0)
    G = torch.randn(5, 1000, dtype=torch.float64)
    bounds = make_offsets(1000, 5)
    assert (
        bounds[0] == 0 and bounds[-1] == 1000 and all(a < b for a, b in itertools.pairwise(bounds))
    )
    vecs = naive.split(G, bounds)
    assert torch.allclose(torch.as_tensor(naive.gram(vecs)), G @ G.T, rtol=1e-10, atol=1e-10)
    w = torch.softmax(torch.randn(5, dtype=torch.float64), 0)
    d = torch.cat(naive.combine(w.tolist(), vecs))
    assert torch.allclose(d, w @ G, rtol=1e-10, atol=1e-10)
    # Sener & Koltun's host loop reaches the exact min-norm point to its own tolerance
    from mtlsam_fast.ops import kkt_residual

    sol = torch.as_tensor(naive.mgda_weights(vecs))
    assert abs(float(sol.sum()) - 1) < 1e-8 and float(sol.min()) >= 0
    assert float(kkt_residual(G @ G.T, sol)) < 1e-3


def test_quick_report_structure(tmp_path: Path):
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "speed-up" in proc.stdout and "roofline" in proc.stdout

    doc = json.loads((out / "ops.json").read_text())
    meta = doc["meta"]
    for key in (
        "device",
        "device_name",
        "cpu_model",
        "torch",
        "triton",
        "mtlsam_fast_commit",
        "available_backends",
    ):
        assert key in meta, key
    assert meta["device"] == "cpu" and "torch" in meta["available_backends"]
    roof = doc["roofline"]
    assert roof["read_gbps"] > 0 and roof["copy_gbps"] > 0
    rows = doc["results"]
    assert rows
    ops_seen = {r["op"] for r in rows}
    for op in (
        "gram",
        "diff_gram",
        "segment_norms",
        "combine",
        "perturb",
        "restore",
        "gaussian_noise",
        "noise_stats",
        "solve_qp",
        "weighting:mgda",
    ):
        assert op in ops_seen, op
    ok = [r for r in rows if r["error"] is None]
    for r in ok:
        assert math.isfinite(r["median_s"]) and r["median_s"] > 0
        assert r["p25_s"] <= r["median_s"] <= r["p75_s"] and r["reps"] >= 1
    gram_torch = [
        r for r in ok if r["op"] == "gram" and r["impl"] == "torch" and r["kind"] == "backend"
    ]
    assert gram_torch
    for r in gram_torch:
        assert r["gbps"] > 0 and r["pct_roof"] > 0
        assert "torch.mm" in r["ratios"] and "naive" in r["ratios"]
    qp = [r for r in ok if r["op"] == "solve_qp" and r["kind"] == "backend"]
    assert qp and all(r["kkt"] is not None and "naive-fw" in r["ratios"] for r in qp)
    assert doc["headline"] and all("speedup_vs" in h for h in doc["headline"])

    with open(out / "ops.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(rows)
    assert {"op", "impl", "kind", "dtype", "K", "P", "median_s", "gbps", "pct_roof"} <= set(
        table[0]
    )
    assert any(c.startswith("speedup_vs_") for c in table[0])

    for png in ("ops.png", "qp.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert (out / "summary.md").read_text().count("|") > 10
    assert json.loads((out / "machine.json").read_text())["torch"] == torch.__version__


def test_qp_native_tool_builds_and_solves(tmp_path):
    """bench/qp_native.sh (the QP timed without Python, for A/B tests of solver changes) builds
    against csrc/ with the extension's flags and returns simplex weights; K = 17 takes the solver's
    tails (K % 4, K % 16). No timing is checked."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        pytest.skip("no C++ compiler")
    out = tmp_path / "w.bin"
    res = subprocess.run(
        [
            "bash",
            str(ROOT / "bench" / "qp_native.sh"),
            "--K",
            "17",
            "--batch",
            "3",
            "--reps",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-2000:]
    assert "family=rank K=17 batch=3:" in res.stdout and "us/problem" in res.stdout
    w = torch.frombuffer(bytearray(out.read_bytes()), dtype=torch.float32).reshape(3, 17)
    assert (w >= 0).all() and torch.allclose(w.sum(-1), torch.ones(3), atol=1e-6)


def test_dispatch_overhead_times_the_kernel_the_op_ends_in(capsys):
    """bench/dispatch_overhead.py compares an op call with a bare binding call: both must compute
    the same thing (else the difference is not the dispatch cost), and the script must run."""
    from mtlsam_fast import _ext

    if _ext.get() is None:
        pytest.skip("mtlsam_fast._C is not built")
    from bench import dispatch_overhead

    for name, (auto, cpu, direct) in dispatch_overhead.cases().items():
        if name in ("diff_gram", "perturb"):  # in place: the results depend on the call count
            continue
        expected = direct()
        if isinstance(expected, tuple):  # solve_qp's binding: (weights, step counts or None)
            expected = expected[0]
        assert torch.equal(auto(), expected), name
        assert torch.equal(cpu(), expected), name
    assert dispatch_overhead.main(["--rounds", "1", "--window", "0.001"]) == 0
    printed = capsys.readouterr().out
    for name in dispatch_overhead.cases():
        assert printed.count(f"\n{name} ") == 1, name


def test_integrations_report_structure(tmp_path: Path):
    """``python -m bench integrations`` (the README's timing table) runs and writes its tables."""
    out = tmp_path / "bench"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "bench", "integrations", "--K", "2", "--weights-K", "4"]
    cmd += ["--rounds", "1", "--steps", "1", "--width", "16", "--batch", "8"]
    cmd += ["--methods", "UPGrad,MGDA,EW", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "integrations.json").read_text())
    assert set(doc["torchjd"]["2"]) == {"UPGrad", "MGDA"} and set(doc["libmtl"]) == {"MGDA", "EW"}
    for row in [*doc["torchjd"]["2"].values(), *doc["libmtl"].values()]:
        assert all(v["median_s"] > 0 for v in row.values())
    assert all(r["min_cos_ours"] >= 0 for r in doc["conflicts"]["upgrad"])  # exact: no conflict
    table = (out / "integrations.md").read_text()
    assert "| UPGrad |" in table and "| EW |" in table


def test_load_and_peers_subcommands(tmp_path: Path):
    """``python -m bench load`` and ``python -m bench peers`` run (tiny settings) and write their
    tables: every requested weighting and K, the ratios, the peer named where one is installed."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    runs = {
        "load": ["--K", "3,4", "--weightings", "upgrad,famo,graddrop", "--rounds", "1",
                 "--window", "0.002", "--max-load-s", "20"],
        "peers": ["--K", "3", "--weightings", "upgrad,uw,graddrop,moco", "--rounds", "1",
                  "--P", "64"],
    }  # fmt: skip
    for cmd, extra in runs.items():
        proc = subprocess.run(
            [sys.executable, "-m", "bench", cmd, *extra, "--out", str(tmp_path)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    load = json.loads((tmp_path / "load.json").read_text())["rows"]
    assert {(r["weighting"], r["K"]) for r in load} == {
        (n, K) for n in ("upgrad", "famo", "graddrop") for K in (3, 4)
    }
    for r in load:
        assert r["loaded_over_one"] > 0 and r["loaded_over_one_loaded"] > 0
    peers = {r["weighting"]: r for r in json.loads((tmp_path / "peers.json").read_text())["rows"]}
    assert set(peers) == {"upgrad", "uw", "graddrop", "moco"}
    assert peers["upgrad"]["peer"] == "torchjd UPGradWeighting" and peers["upgrad"]["peer_us"] > 0
    assert peers["uw"]["peer"].startswith("torchjd UW") and peers["moco"]["peer"] is None


@pytest.mark.parametrize("name", ["ops", "e2e", "integrations", "dist", "load", "peers"])
def test_every_subcommand_writes_to_an_untracked_folder_by_default(name: str):
    """A benchmark run never overwrites the committed results unless asked (``--out``): the
    default output is under ``runs/`` (git-ignored), or resolved there at run time (None)."""
    from bench.__main__ import SUBCOMMANDS, build_parser
    from bench.common import REPO_ROOT

    assert name in SUBCOMMANDS
    parser, rest, module = build_parser([] if name == "ops" else [name])
    out = parser.parse_args(rest).out
    if out is None:  # resolved by the module: its default_out or CPU_OUT, both under runs/
        src = Path(module.__file__).read_text()
        assert 'bench" / "results' not in src and 'bench/results/cpu")' not in src
    else:
        assert Path(out).resolve().is_relative_to(REPO_ROOT / "runs"), out
    assert (REPO_ROOT / ".gitignore").read_text().count("/runs/") == 1
