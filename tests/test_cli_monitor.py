"""``mtlsam-fast train`` records the optimizer's decisions: the result's ``"monitor"`` series
(weights, per-task gradient norms, cosines per aggregation), kept across a resume, and
``--plot-weights`` (checked before training like every output)."""

from __future__ import annotations

import json

import pytest
from _cli import TINY as CLI_TINY
from _cli import run

from mtlsam_fast import train as T

TINY = [*CLI_TINY, "--baseline", "none"]


@pytest.mark.parametrize(
    "method,aggregations",
    [("fmtl-mgda", ["loss", "flat"]), ("samo-mgda", ["perturbed"]), ("upgrad", ["loss"])],
)
def test_result_records_the_series_and_the_plot(tmp_path, capsys, method, aggregations):
    out, png = tmp_path / "res.json", tmp_path / "plots" / "w.png"
    code, stdout, err = run(
        [
            "train",
            *TINY,
            "--method",
            method,
            "--steps",
            "5",
            "-o",
            str(out),
            "--plot-weights",
            str(png),
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    mon = res["monitor"]
    assert mon["every"] == 1 and mon["steps"] == [1, 2, 3, 4, 5] and mon["pairs"] == [[0, 1]]
    assert mon["skipped"] == [False] * 5
    assert list(mon["aggregations"]) == aggregations
    for series in mon["aggregations"].values():
        assert len(series["weights"]) == len(series["norms"]) == len(series["cosines"]) == 5
        assert all(len(w) == 2 and len(n) == 2 and len(c) == 1 for w, n, c in zip(*series.values()))
        assert all(n > 0 for row in series["norms"] for n in row)
        assert all(-1 <= c[0] <= 1 for c in series["cosines"])
        if method.endswith("mgda"):  # MGDA's weights lie on the simplex
            assert all(sum(w) == pytest.approx(1, abs=1e-5) for w in series["weights"])
    assert res["weights_plot"] == "plots/w.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    assert f"weights plot written to {png}" in stdout


def test_series_interval_keeps_the_result_compact():
    series = T.MonitorSeries(steps=10 * T.MONITOR_POINTS + 1, num_tasks=3)
    assert series.every == 11 and series.pairs == [[0, 1], [0, 2], [1, 2]]
    assert T.MonitorSeries(steps=T.MONITOR_POINTS, num_tasks=2).every == 1


def test_resumed_run_continues_the_series(tmp_path, capsys):
    full, part, ckpt = tmp_path / "full.json", tmp_path / "part.json", tmp_path / "c.ckpt"
    base = ["train", *TINY, "--method", "fmtl-mgda"]
    assert run([*base, "--steps", "6", "-o", str(full)], capsys)[0] == 0
    assert run([*base, "--steps", "3", "-o", str(part), "--checkpoint", str(ckpt)], capsys)[0] == 0
    code, _, err = run(
        ["train", *TINY[:-2], "--resume", str(ckpt), "--steps", "6", "-o", str(part)], capsys
    )
    assert code == 0, err
    a, b = json.loads(full.read_text())["monitor"], json.loads(part.read_text())["monitor"]
    assert b["steps"] == [1, 2, 3, 4, 5, 6]
    assert a == b  # a resumed run is bitwise the uninterrupted one, so are its records


def test_plot_path_is_checked_before_training(tmp_path, capsys):
    out, png = tmp_path / "res.json", tmp_path / "w.png"
    png.write_bytes(b"not mine")
    code, _, err = run(
        ["train", *TINY, "--steps", "2", "-o", str(out), "--plot-weights", str(png)], capsys
    )
    assert code == 2 and "--plot-weights" in err and "already exists" in err
    assert not out.exists() and png.read_bytes() == b"not mine"
    code, _, err = run(
        ["train", *TINY, "--steps", "2", "-o", str(out), "--plot-weights", str(out)], capsys
    )
    assert code == 2 and "same file" in err and not out.exists()


def test_rerun_replaces_its_own_plot(tmp_path, capsys):
    out, png = tmp_path / "res.json", tmp_path / "w.png"
    argv = ["train", *TINY, "--steps", "2", "-o", str(out), "--plot-weights", str(png)]
    assert run(argv, capsys)[0] == 0
    code, _, err = run(argv, capsys)
    assert code == 0, err
    assert "--plot-weights" in err and "earlier result of this same run" in err


def test_plot_weights_refuses_a_direction_weighting_before_training(tmp_path, capsys):
    out, png = tmp_path / "res.json", tmp_path / "w.png"
    code, _, err = run(
        [
            "train",
            *TINY,
            "--method",
            "graddrop",
            "--steps",
            "2",
            "-o",
            str(out),
            "--plot-weights",
            str(png),
        ],
        capsys,
    )
    assert code == 2 and "returns an update direction" in err and not out.exists()


def test_compare_keeps_its_runs_without_the_series(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    argv = ["compare", *TINY[:-2], "--methods", "ls,mgda", "--seeds", "0", "--steps", "2"]
    code, _, err = run([*argv, "-o", str(out)], capsys)
    assert code == 0, err
    runs = json.loads(out.read_text())["runs"]
    assert all("monitor" not in r and "history" not in r for rs in runs.values() for r in rs)
