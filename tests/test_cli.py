"""The ``mtlsam-fast`` CLI: tiny train runs, JSON results, checkpoint/resume, compare, demo, bad
input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from _cli import TINY, run

import mtlsam_fast
from mtlsam_fast import train as T


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


def test_train_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "res.json"
    code, stdout, err = run(
        ["train", *TINY, "--method", "fmtl-mgda", "--steps", "4", "--output", str(out)], capsys
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["format"] == T.RESULT_FORMAT and res["method"] == "fmtl-mgda" and res["steps"] == 4
    assert set(res["test"]["tasks"]) == {"left", "right"}
    for v in res["test"]["tasks"].values():
        assert 0.0 <= v["accuracy"] <= 100.0 and v["loss"] > 0
    assert res["baseline"]["kind"] == "ls" and res["delta_m"] is not None
    acc, base = T.accuracies(res["test"]), list(res["baseline"]["accuracy"].values())
    assert res["delta_m"] == pytest.approx(100 * sum((a - b) / b for a, b in zip(acc, base)) / 2)
    assert "left" in stdout and "Δm%" in stdout and str(out) in stdout
    assert listing(tmp_path) == ["res.json"]  # no temporary files left


@pytest.mark.parametrize("method", ["ls", "samo-mgda", "fmtl-ls"])
def test_train_methods_and_seed_reproducible(tmp_path, capsys, method):
    results = []
    for name in ("a.json", "b.json"):
        code, _, err = run(
            [
                "train",
                *TINY,
                "--method",
                method,
                "--steps",
                "3",
                "--seed",
                "5",
                "--baseline",
                "none",
                "--noise-rate",
                "0.3",
                "--output",
                str(tmp_path / name),
            ],
            capsys,
        )
        assert code == 0, err
        results.append(json.loads((tmp_path / name).read_text()))
    assert results[0]["test"] == results[1]["test"]
    assert results[0]["baseline"] is None and results[0]["delta_m"] is None


def test_train_given_baseline_and_low_resource(tmp_path, capsys):
    out = tmp_path / "r.json"
    code, _, err = run(
        [
            "train",
            *TINY,
            "--method",
            "mgda",
            "--steps",
            "3",
            "--low-resource",
            "20",
            "--baseline",
            "50,40",
            "--output",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["dataset"]["labelled_train"] == [256, 20]
    acc = T.accuracies(res["test"])
    assert res["delta_m"] == pytest.approx(100 * ((acc[0] - 50) / 50 + (acc[1] - 40) / 40) / 2)
    # a previous result file as the baseline
    code, _, err = run(
        [
            "train",
            *TINY,
            "--method",
            "ls",
            "--steps",
            "2",
            "--baseline",
            str(out),
            "--output",
            str(tmp_path / "r2.json"),
        ],
        capsys,
    )
    assert code == 0, err
    r2 = json.loads((tmp_path / "r2.json").read_text())
    assert r2["baseline"]["accuracy"] == {t: v["accuracy"] for t, v in res["test"]["tasks"].items()}


def _state(path):
    return T.load_checkpoint(str(path))


@pytest.mark.parametrize("method", ["fmtl-mgda", "samo-ls"])
def test_resume_continues_identically(tmp_path, capsys, method):
    common = ["train", *TINY, "--method", method, "--baseline", "none", "--eval-every", "3"]
    code, _, err = run(
        [
            *common,
            "--steps",
            "6",
            "--checkpoint",
            str(tmp_path / "full.pt"),
            "--output",
            str(tmp_path / "full.json"),
        ],
        capsys,
    )
    assert code == 0, err
    code, _, err = run(
        [*common, "--steps", "3", "--checkpoint", str(tmp_path / "half.pt"), "--output", "none"],
        capsys,
    )
    assert code == 0, err
    assert _state(tmp_path / "half.pt")["step"] == 3
    # (the same thread count: CPU reductions are only bitwise reproducible with the same threads)
    code, _, err = run(
        [
            "train",
            "--resume",
            str(tmp_path / "half.pt"),
            "--steps",
            "6",
            "--quiet",
            "--threads",
            "1",
            "--checkpoint",
            str(tmp_path / "resumed.pt"),
            "--baseline",
            "none",
            "--output",
            str(tmp_path / "resumed.json"),
        ],
        capsys,
    )
    assert code == 0, err
    full, resumed = _state(tmp_path / "full.pt"), _state(tmp_path / "resumed.pt")
    assert resumed["step"] == 6
    for k, v in full["model"].items():
        assert torch.equal(v, resumed["model"][k]), k
    a = json.loads((tmp_path / "full.json").read_text())
    b = json.loads((tmp_path / "resumed.json").read_text())
    assert a["test"] == b["test"]
    assert [h["train_loss"] for h in a["history"]] == [h["train_loss"] for h in b["history"]]


def test_checkpoint_every(tmp_path, capsys):
    ck = tmp_path / "c.pt"
    code, _, err = run(
        [
            "train",
            *TINY,
            "--method",
            "ls",
            "--steps",
            "5",
            "--checkpoint",
            str(ck),
            "--checkpoint-every",
            "2",
            "--baseline",
            "none",
            "--output",
            "none",
        ],
        capsys,
    )
    assert code == 0, err
    assert _state(ck)["step"] == 5
    assert listing(tmp_path) == ["c.pt"]


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--method", "fmtl-nope"], "unknown weighting 'nope'"),
        (["train", "--method", "xyz-mgda"], "unknown method 'xyz-mgda'"),
        (["train", "--weighting", "bogus"], "unknown weighting 'bogus'"),
        (["train", "--optimizer", "adamw"], "unknown optimizer 'adamw'"),
        (["train", "--dataset", "imagenet"], "unknown dataset 'imagenet'"),
        (["train", "--backend", "tpu"], "unknown backend 'tpu'"),
        (["train", "--dataset", "multimnist"], "--data-dir"),
        (
            ["train", "--dataset", "multimnist", "--data-dir", "/nonexistent/mnist"],
            "/nonexistent/mnist",
        ),
        (["train", "--method", "samo-mgda", "--adaptive"], "SAMO does not support adaptive"),
        (["train", "--baseline", "nothing-like-this"], "--baseline"),
        (["train", "--baseline", "1,2,3"], "3 values"),
        (["train", "--resume", "/nonexistent/ck.pt"], "not found"),
        (["compare", "--methods", "mgda,warp"], "unknown weighting 'warp'"),
        (["compare", "--seeds", "a,b"], "--seeds"),
    ],
)
def test_bad_input_clear_message(tmp_path, capsys, argv, needle):
    out = tmp_path / "out.json"
    extra = (
        ["--output", str(out)]
        if argv[0] == "train"
        else ["--output", str(out), "--plot", str(tmp_path / "p.png")]
    )
    code, _, err = run([*argv, *extra, "--quiet", "--steps", "1"], capsys)
    assert code == 2
    assert needle in err and "error:" in err
    assert "Traceback" not in err
    assert listing(tmp_path) == []  # nothing written


def test_bad_option_value_is_argparse_error(capsys):
    code, _, err = run(["train", "--steps", "0"], capsys)
    assert code == 2 and "positive integer" in err and "Traceback" not in err
    code, _, err = run(["nosuchcommand"], capsys)
    assert code == 2 and "invalid choice" in err


def test_missing_idx_file_message(tmp_path, capsys):
    from tests.test_data import make_mnist_dir

    root, _ = make_mnist_dir(tmp_path / "mnist", n_train=8, n_test=4)
    os.remove(os.path.join(root, "train-images-idx3-ubyte"))
    code, _, err = run(
        [
            "train",
            "--dataset",
            "multimnist",
            "--data-dir",
            root,
            "--steps",
            "1",
            "--quiet",
            "--output",
            str(tmp_path / "o.json"),
        ],
        capsys,
    )
    assert code == 2 and "train-images-idx3-ubyte" in err and root in err and "Traceback" not in err
    assert not (tmp_path / "o.json").exists()


def test_multimnist_and_celeba_train(tmp_path, capsys):
    from tests.test_data import make_celeba, make_mnist_dir

    root, _ = make_mnist_dir(tmp_path / "mnist", n_train=64, n_test=16)
    code, _, err = run(
        [
            "train",
            "--dataset",
            "multimnist",
            "--data-dir",
            root,
            "--steps",
            "2",
            "--batch-size",
            "16",
            "--width",
            "4",
            "--threads",
            "1",
            "--quiet",
            "--baseline",
            "none",
            "--output",
            str(tmp_path / "m.json"),
        ],
        capsys,
    )
    assert code == 0, err
    croot, _ = make_celeba(tmp_path / "celeba", n=12)
    code, stdout, err = run(
        [
            "train",
            "--dataset",
            "celeba",
            "--data-dir",
            croot,
            "--image-size",
            "16",
            "--steps",
            "2",
            "--batch-size",
            "4",
            "--width",
            "4",
            "--threads",
            "1",
            "--quiet",
            "--method",
            "fmtl-ls",
            "--baseline",
            "none",
            "--output",
            str(tmp_path / "c.json"),
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads((tmp_path / "c.json").read_text())
    assert len(res["test"]["tasks"]) == 3 and "mean error" in stdout


@pytest.mark.parametrize("garbage", [b"", b"not a checkpoint at all", b"PK\x03\x04truncated-zip"])
def test_corrupt_checkpoint(tmp_path, capsys, garbage):
    ck = tmp_path / "bad.pt"
    ck.write_bytes(garbage)
    code, _, err = run(
        ["train", "--resume", str(ck), "--quiet", "--output", str(tmp_path / "o.json")], capsys
    )
    assert code == 2 and "cannot read checkpoint" in err and "Traceback" not in err
    assert listing(tmp_path) == ["bad.pt"]
    # a bare torch file (the unsealed format 1, or another program's) is refused, named as such
    torch.save({"hello": 1}, ck)
    code, _, err = run(["train", "--resume", str(ck), "--quiet"], capsys)
    assert code == 2 and "bare torch.save file" in err
    # a sealed torch file that is not a training checkpoint
    ck.write_bytes(T.checkpoint_bytes({"hello": 1}))
    code, _, err = run(["train", "--resume", str(ck), "--quiet"], capsys)
    assert code == 2 and "not an mtlsam-fast training checkpoint" in err


def test_resume_with_different_config_refused(tmp_path, capsys):
    ck = tmp_path / "c.pt"
    assert (
        run(
            [
                "train",
                *TINY,
                "--method",
                "ls",
                "--steps",
                "2",
                "--checkpoint",
                str(ck),
                "--baseline",
                "none",
                "--output",
                "none",
            ],
            capsys,
        )[0]
        == 0
    )
    code, _, err = run(
        ["train", "--resume", str(ck), "--lr", "0.5", "--quiet", "--output", "none"], capsys
    )
    # the command line's own check, before anything is loaded, names what may change
    assert code == 2 and "different configuration" in err and "lr=0.5" in err
    assert "only --steps, --epochs and --eval-every may change" in err
    code, _, err = run(
        ["train", "--resume", str(ck), "--steps", "3", "--quiet", "-o", "none"], capsys
    )
    assert code == 0, err  # a resumable change


def test_interrupted_training_leaves_no_partial_checkpoint(tmp_path, monkeypatch):
    """A crash inside torch.save (mid-write) keeps the previous checkpoint intact and no temp
    file."""
    ck = tmp_path / "c.pt"
    cfg = T.TrainConfig(
        n_train=128, n_test=32, batch_size=32, width=4, optimizer="plain", weighting="ls", steps=4
    )
    T.train(cfg, checkpoint=str(ck), checkpoint_every=2)
    before = ck.read_bytes()
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        f.write(b"half")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        T.train(
            T.TrainConfig(**{**cfg.to_dict(), "steps": 6}), checkpoint=str(ck), checkpoint_every=2
        )
    monkeypatch.setattr(torch, "save", real_save)
    assert ck.read_bytes() == before and listing(tmp_path) == ["c.pt"]


def test_compare_table_json_png(tmp_path, capsys):
    out = tmp_path / "cmp.json"
    code, stdout, err = run(
        [
            "compare",
            *TINY,
            "--methods",
            "ls,fmtl-ls,samo-ls",
            "--seeds",
            "0,1",
            "--steps",
            "2",
            "--noise-rate",
            "0.2",
            "--output",
            str(out),
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["methods"] == ["ls", "fmtl-ls", "samo-ls"] and res["seeds"] == [0, 1]
    assert res["baseline"]["method"] == "ls"
    for m in res["methods"]:
        s = res["summary"][m]
        assert len(res["runs"][m]) == 2 and set(s["tasks"]) == {"left", "right"}
        assert s["delta_m"] is not None
    assert res["summary"]["ls"]["delta_m"]["mean"] == pytest.approx(0.0, abs=1e-9)
    png = tmp_path / "cmp.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "fmtl-ls" in stdout and "±" in stdout
    assert listing(tmp_path) == ["cmp.json", "cmp.png"]


def test_compare_trains_the_ls_baseline_when_not_listed(tmp_path, capsys):
    out = tmp_path / "c.json"
    code, _, err = run(
        [
            "compare",
            *TINY,
            "--methods",
            "fmtl-ls",
            "--seeds",
            "3",
            "--steps",
            "1",
            "--output",
            str(out),
            "--plot",
            str(tmp_path / "c.png"),
        ],
        capsys,
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    assert res["methods"] == ["ls", "fmtl-ls"] and res["baseline"]["method"] == "ls"
    assert res["runs"]["fmtl-ls"][0]["config"]["seed"] == 3


def test_demo_runs(capsys):
    code, stdout, err = run(["demo", "--batch-size", "64", "--repeats", "2"], capsys)
    assert code == 0, stdout + err
    for name in ("ls", "mgda"):
        assert any(line.startswith(name + " ") for line in stdout.splitlines())


def test_backend_option(tmp_path, capsys):
    code, _, err = run(
        [
            "train",
            *TINY,
            "--method",
            "mgda",
            "--steps",
            "1",
            "--backend",
            "torch",
            "--baseline",
            "none",
            "--output",
            str(tmp_path / "o.json"),
        ],
        capsys,
    )
    assert code == 0, err
    assert json.loads((tmp_path / "o.json").read_text())["environment"]["backend"] == "torch"
    assert mtlsam_fast.get_backend() == "auto"  # the process-wide default is restored after the run


def test_module_help_subprocess():
    root = os.path.dirname(os.path.dirname(os.path.abspath(mtlsam_fast.__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(
        [sys.executable, "-m", "mtlsam_fast", "train", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    for opt in (
        "--method",
        "--noise-rate",
        "--low-resource",
        "--checkpoint",
        "--resume",
        "--seed",
        "--backend",
    ):
        assert opt in proc.stdout
