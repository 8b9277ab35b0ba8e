"""The CLI tells the truth (issues 22 and 24): every flag reaches what it configures, the
reported accuracy is what an independent computation gives, progress without a terminal, every
flag documented, compare outputs named after their methods, no baseline trained twice."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import run

import mtlsam_fast
from mtlsam_fast import cli, data
from mtlsam_fast import train as T
from mtlsam_fast.models import MultiTaskNet

ROOT = Path(mtlsam_fast.__file__).resolve().parent.parent
TINY = ["--n-train", "64", "--n-test", "40", "--batch-size", "16", "--width", "4", "--quiet"]


# ---------------------------------------------------------------------------- flags -> config

#: every configuration flag with a value that differs from its default, and the field it sets
FLAG_VALUES: dict[str, tuple[list[str], str, object]] = {
    "--dataset": (["--dataset", "celeba"], "dataset", "celeba"),
    "--data-dir": (["--data-dir", "/d"], "data_dir", "/d"),
    "--data-dir2": (["--data-dir2", "/e"], "data_dir2", "/e"),
    "--n-train": (["--n-train", "77"], "n_train", 77),
    "--n-test": (["--n-test", "33"], "n_test", 33),
    "--image-size": (["--image-size", "24"], "image_size", 24),
    "--data-seed": (["--data-seed", "9"], "data_seed", 9),
    "--noise-rate": (["--noise-rate", "0.25"], "noise_rate", 0.25),
    "--noise-task": (["--noise-task", "left"], "noise_task", "left"),
    "--low-resource": (["--low-resource", "12"], "low_resource", 12),
    "--low-resource-task": (["--low-resource-task", "1"], "low_resource_task", "1"),
    "--method": (["--method", "samo-cagrad"], "weighting", "cagrad"),
    "--optimizer": (["--optimizer", "plain"], "optimizer", "plain"),
    "--weighting": (["--weighting", "pcgrad"], "weighting", "pcgrad"),
    "--weighting-option": (
        ["--weighting-option", 'normalization="l2"'],
        "weighting_options",
        {"normalization": "l2"},
    ),
    "--rho": (["--rho", "0.2"], "rho", 0.2),
    "--rho-head": (["--rho-head", "0.01"], "rho_head", 0.01),
    "--adaptive": (["--adaptive"], "adaptive", True),
    "--alpha": (["--alpha", "0.8"], "alpha", 0.8),
    "--zo-eps": (["--zo-eps", "0.02"], "zo_eps", 0.02),
    "--base-optimizer": (["--base-optimizer", "sgd"], "base_optimizer", "sgd"),
    "--lr": (["--lr", "0.03"], "lr", 0.03),
    "--momentum": (["--momentum", "0.5"], "momentum", 0.5),
    "--weight-decay": (["--weight-decay", "0.001"], "weight_decay", 0.001),
    "--batch-size": (["--batch-size", "24"], "batch_size", 24),
    "--epochs": (["--epochs", "2.5"], "epochs", 2.5),
    "--steps": (["--steps", "7"], "steps", 7),
    "--eval-every": (["--eval-every", "3"], "eval_every", 3),
    "--width": (["--width", "6"], "width", 6),
    "--seed": (["--seed", "11"], "seed", 11),
    "--backend": (["--backend", "torch"], "backend", "torch"),
    "--device": (["--device", "cpu"], "device", "cpu"),
}
#: flags that configure the command, not the run's configuration
COMMAND_FLAGS = {
    "--help",
    "--threads",
    "--quiet",
    "--overwrite",
    "--baseline",
    "--output",
    "--checkpoint",
    "--checkpoint-every",
    "--resume",
    "--methods",
    "--seeds",
    "--plot",
    "--plot-weights",  # tests/test_cli_monitor.py
    "--nproc",  # tests/test_distributed.py runs the CLI under --nproc 2
}


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_configuration_flag_sets_its_field():
    for command in ("train", "compare"):
        p = _subparsers()[command]
        flags = {
            a.option_strings[-1] if a.option_strings[0] == "-h" else a.option_strings[0]
            for a in p._actions
        }
        flags = {"--help" if f == "--help" else f for f in flags}
        untested = flags - set(FLAG_VALUES) - COMMAND_FLAGS
        assert not untested, f"{command}: flags without a wiring test: {sorted(untested)}"
        default = T.TrainConfig().to_dict()
        for flag, (argv, field, value) in FLAG_VALUES.items():
            if flag not in flags:
                continue
            explicit = cli._explicit(p.parse_args(argv))
            assert explicit[field] == value, flag
            assert T.TrainConfig(**explicit).to_dict()[field] != default[field], flag
            # and nothing else: one flag sets one field (--method: optimizer and weighting)
            others = {k for k in explicit if k != field} - {"optimizer", "weighting"}
            assert not others, (flag, others)


# ---------------------------------------------------------------------------- config -> optimizer


def _optimizer(**fields):
    cfg = T.TrainConfig(**fields)
    model = MultiTaskNet((1, 12, 12), [10, 10], width=4)
    return T.build_optimizer(cfg, model)


def test_each_field_reaches_the_optimizer():
    from mtlsam_fast.optim import FMTL, SAMO, MTLOptimizer

    o = _optimizer()  # defaults: F-MTL, MGDA, Adam
    assert type(o) is FMTL and type(o.base_optimizer) is torch.optim.Adam
    assert type(o.weighting).__name__ == "MGDA"
    g0 = o.param_groups[0]
    assert (g0["lr"], g0["rho"], g0["adaptive"], g0["weight_decay"]) == (1e-3, 0.05, False, 0.0)
    o = _optimizer(rho=0.3, rho_head=0.02, adaptive=True, lr=0.2, weight_decay=0.01)
    assert o.param_groups[0]["rho"] == 0.3 and o.param_groups[0]["adaptive"] is True
    assert all(g["rho"] == 0.02 for g in o.param_groups[1:]) and len(o.param_groups) == 3
    assert all(g["lr"] == 0.2 and g["weight_decay"] == 0.01 for g in o.param_groups)
    o = _optimizer(optimizer="samo", alpha=0.7, zo_eps=0.004, rho=0.1, seed=123)
    assert type(o) is SAMO and o.seed == 123
    g0 = o.param_groups[0]
    assert (g0["alpha"], g0["zo_eps"], g0["rho"]) == (0.7, 0.004, 0.1)
    o = _optimizer(optimizer="plain", weighting="ls", base_optimizer="sgd", momentum=0.3)
    assert type(o) is MTLOptimizer and type(o.base_optimizer) is torch.optim.SGD
    assert o.param_groups[0]["momentum"] == 0.3
    assert type(o.weighting).__name__ == "LinearScalarization"
    assert type(_optimizer(base_optimizer="adamw").base_optimizer) is torch.optim.AdamW
    o = _optimizer(weighting="mgda", weighting_options={"normalization": "loss+"})
    assert o.weighting.normalization == "loss+"
    o = _optimizer(weighting="cagrad", weighting_options={"c": 0.25})
    assert o.weighting.c == 0.25


def _final_model(tmp_path: Path, capsys, *extra) -> dict[str, torch.Tensor]:
    ck = tmp_path / f"ck{len(os.listdir(tmp_path))}.pt"
    argv = ["train", *TINY, "--steps", "2", "--baseline", "none", "-o", "none"]
    code, _, err = run([*argv, "--checkpoint", ck, *extra], capsys)
    assert code == 0, err
    return T.load_checkpoint(str(ck))["model"]


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a
    )


def test_each_flag_changes_the_trained_model(tmp_path, capsys):
    """End to end: a flag that does not reach the training leaves the trained weights as they
    are; each of these must change them (and the evaluation interval must not)."""
    ref = _final_model(tmp_path, capsys)
    samo = _final_model(tmp_path, capsys, "--method", "samo-mgda")
    sgd = _final_model(tmp_path, capsys, "--base-optimizer", "sgd")
    cases = {
        ("--rho", "0.5"): ref,
        ("--rho-head", "0.5"): ref,
        ("--adaptive",): ref,
        ("--lr", "0.01"): ref,
        ("--weight-decay", "0.5"): ref,
        ("--base-optimizer", "adamw", "--weight-decay", "0.5"): ref,
        ("--weighting-option", 'normalization="l2"'): ref,
        ("--seed", "1"): ref,
        ("--batch-size", "8"): ref,
        ("--data-seed", "1"): ref,
        ("--noise-rate", "0.5"): ref,
        ("--method", "fmtl-ls"): ref,
        ("--method", "mgda"): ref,
        ("--method", "samo-mgda", "--alpha", "0.1"): samo,
        ("--method", "samo-mgda", "--zo-eps", "0.5"): samo,
        ("--method", "samo-mgda", "--rho", "0.5"): samo,
        ("--base-optimizer", "sgd", "--momentum", "0.1"): sgd,
    }
    for extra, base in cases.items():
        assert not _same(_final_model(tmp_path, capsys, *extra), base), extra
    assert _same(_final_model(tmp_path, capsys, "--eval-every", "1"), ref)


def test_backend_and_threads_are_in_force_during_training(tmp_path, capsys, monkeypatch):
    seen = []
    real_step = mtlsam_fast.MTLOptimizer.step

    def spy(self, *a, **k):
        seen.append((mtlsam_fast.get_backend(), torch.get_num_threads()))
        return real_step(self, *a, **k)

    monkeypatch.setattr(mtlsam_fast.MTLOptimizer, "step", spy)
    argv = ["train", *TINY, "--method", "mgda", "--steps", "2", "--baseline", "none", "-o"]
    code, _, err = run([*argv, "none", "--backend", "torch", "--threads", "1"], capsys)
    assert code == 0, err
    assert seen == [("torch", 1), ("torch", 1)]
    assert mtlsam_fast.get_backend() == "auto"


def test_plain_ls_sgd_step_matches_an_independent_computation(tmp_path, capsys):
    """One step of --method ls --base-optimizer sgd over the whole training set, computed here with
    plain torch (no mtlsam_fast optimizer): the trunk moves by -lr times the gradient of the mean
    task loss (LS: weights 1/K), each head by -lr times the gradient of its own task's loss."""
    n = 32
    ck1 = tmp_path / "c1.pt"
    argv = ["train", "--n-train", str(n), "--n-test", "8", "--batch-size", str(n), "--width", "4"]
    argv += ["--method", "ls", "--base-optimizer", "sgd", "--momentum", "0", "--lr", "0.05"]
    argv += ["--baseline", "none", "-o", "none", "-q", "--eval-every", "1000"]
    assert run([*argv, "--steps", "1", "--checkpoint", ck1], capsys)[0] == 0
    # the initial weights: the same seed, no step
    torch.manual_seed(0)
    model = MultiTaskNet((1, 12, 12), [10, 10], width=4)
    d = data.multidigits(n_train=n, n_test=8, seed=0)
    x = (d.x_train.float() / 255.0 - d.mean.view(1, -1, 1, 1)) / d.std.view(1, -1, 1, 1)
    ce = torch.nn.functional.cross_entropy
    losses = [ce(lg, d.y_train[:, k]) for k, lg in enumerate(model(x))]
    trunk = list(model.trunk.parameters())
    heads = [list(h.parameters()) for h in model.heads]
    grads = torch.autograd.grad(sum(losses) / 2, trunk, retain_graph=True)
    for k, loss in enumerate(losses):
        grads += torch.autograd.grad(loss, heads[k], retain_graph=True)
    new = [p.detach() - 0.05 * g for p, g in zip(trunk + heads[0] + heads[1], grads)]
    names = [n for n, _ in model.named_parameters()]
    assert len(names) == len(new)
    expected = dict(zip(names, new))
    got = T.load_checkpoint(str(ck1))["model"]
    for name, value in expected.items():
        torch.testing.assert_close(got[name], value, rtol=1e-5, atol=1e-6, msg=name)


# ---------------------------------------------------------------------------- evaluation


class FixedLogits(torch.nn.Module):
    """Returns, for image i, the logits stored for it (its first pixel is its index)."""

    def __init__(self, logits: list[torch.Tensor]):
        super().__init__()
        self.logits = logits
        self.seen_training = []

    def forward(self, x):
        self.seen_training.append(self.training)
        idx = x[:, 0, 0, 0].round().long()
        return [lg[idx] for lg in self.logits]


def test_evaluate_scores_each_task_against_its_own_labels():
    rng = np.random.default_rng(0)
    n, classes = 53, [3, 5, 2]
    y = np.stack([rng.integers(0, c, n) for c in classes], 1)
    y[rng.random((n, 3)) < 0.2] = data.UNLABELED  # some examples lack some labels
    logits = [torch.from_numpy(rng.normal(size=(n, c))).float() for c in classes]
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    d = data.MultiTaskData(
        "fixed", ["a", "b", "c"], classes, x, torch.from_numpy(y), x, torch.from_numpy(y)
    )
    d.mean, d.std = torch.zeros(1), torch.ones(1) / 255.0  # images(x) == x: the index survives
    model = FixedLogits(logits)
    model.train()
    metrics = T.evaluate(model, d, torch.device("cpu"), batch_size=7)
    assert model.training and not any(model.seen_training)  # evaluated in eval mode, restored
    for k, (name, lg) in enumerate(zip(d.task_names, logits)):
        mask = y[:, k] != data.UNLABELED
        pred = lg.numpy().argmax(1)
        acc = 100.0 * (pred[mask] == y[mask, k]).mean()
        z = lg.numpy().astype(np.float64)[mask]
        logp = (
            z
            - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
            - z.max(1, keepdims=True)
        )
        loss = -logp[np.arange(mask.sum()), y[mask, k]].mean()
        assert metrics["tasks"][name]["accuracy"] == pytest.approx(acc, abs=1e-9), name
        assert metrics["tasks"][name]["loss"] == pytest.approx(loss, rel=1e-5), name
    mean = np.mean([metrics["tasks"][t]["accuracy"] for t in d.task_names])
    assert metrics["mean_accuracy"] == pytest.approx(mean) and metrics["mean_error"] == 100 - mean


def test_reported_accuracy_equals_an_independent_evaluation_of_the_checkpoint(tmp_path, capsys):
    ck, out = tmp_path / "c.pt", tmp_path / "r.json"
    argv = ["train", "--n-train", "96", "--n-test", "150", "--batch-size", "16", "--width", "4"]
    argv += ["--method", "fmtl-ls", "--steps", "12", "--noise-rate", "0.3", "--data-seed", "2"]
    code, stdout, err = run(
        [*argv, "--baseline", "60,50", "-q", "--checkpoint", ck, "-o", out], capsys
    )
    assert code == 0, err
    res = json.loads(out.read_text())
    state = T.load_checkpoint(str(ck))
    model = MultiTaskNet((1, 12, 12), [10, 10], width=4)
    model.load_state_dict(state["model"])
    model.eval()  # running BatchNorm statistics, as a deployed model
    d = data.multidigits(n_train=96, n_test=150, seed=2, noise_rate=0.3)
    train_pixels = d.x_train.double() / 255.0
    mean = train_pixels.mean(dim=(0, 2, 3)).view(1, -1, 1, 1)
    std = train_pixels.std(dim=(0, 2, 3)).clamp_min(1e-3).view(1, -1, 1, 1)
    with torch.no_grad():
        logits = model(((d.x_test.double() / 255.0 - mean) / std).float())
    y = d.y_test.numpy()  # clean test labels (the noise is on the training labels only)
    acc = [100.0 * float((lg.argmax(1).numpy() == y[:, k]).mean()) for k, lg in enumerate(logits)]
    got = T.accuracies(res["test"])
    assert got == pytest.approx(acc, abs=1e-9)
    assert res["test"]["mean_accuracy"] == pytest.approx(sum(acc) / 2)
    dm = 100 * ((acc[0] - 60) / 60 + (acc[1] - 50) / 50) / 2
    assert res["delta_m"] == pytest.approx(dm)
    # the printed table is the JSON's numbers
    assert f"left  {acc[0]:>10.2f}" in stdout.replace("      ", "  ")
    assert f"{res['test']['mean_accuracy']:.2f}" in stdout and f"{dm:+.2f}" in stdout


# ---------------------------------------------------------------------------- output


def test_progress_lines_without_a_terminal_and_the_summary_once(tmp_path, capsys):
    argv = ["train", "--n-train", "64", "--n-test", "32", "--batch-size", "16", "--width", "4"]
    code, stdout, err = run(
        [*argv, "--steps", "8", "--eval-every", "4", "-o", tmp_path / "r"], capsys
    )
    assert code == 0, err
    lines = [ln for ln in err.splitlines() if ": step " in ln]
    # the LS baseline's lines (it is trained first), then the run's: one per evaluation
    assert [ln.split(": step ")[0] for ln in lines] == ["baseline ls"] * 2 + ["fmtl-mgda"] * 2
    assert [ln.split(": step ")[1].split()[0] for ln in lines] == ["4/8", "8/8"] * 2
    for ln in lines:
        assert "step/s" in ln and "train loss left " in ln and "right " in ln
        assert "test acc left " in ln
    summary = "multidigits: 64 train / 32 test images"
    assert (stdout + err).count(summary) == 1
    code, stdout, err = run([*argv, "--steps", "2", "-q", "-o", tmp_path / "r2"], capsys)
    assert code == 0 and err == ""


def test_progress_lines_every_interval(capsys):
    p = T.Progress("lines", total=5, initial=0, desc="x", task_names=["a", "b"], interval=0.0)
    for s in range(1, 6):
        p.step(s, [0.5, 0.25])
    p.close()
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 5 and err[-1].startswith("x: step 5/5 (100%), ")
    assert err[-1].endswith("train loss a 0.500 b 0.250")
    with pytest.raises(ValueError, match="progress"):
        T.Progress("fancy", total=1, initial=0, desc="x", task_names=["a"])


def _all_parsers():
    from bench import __main__ as bench_main  # noqa: F401 - the bench CLI's parsers
    from bench import e2e, report

    yield "mtlsam-fast", cli.build_parser()
    for name, p in _subparsers().items():
        yield f"mtlsam-fast {name}", p
    for name, module in (("python -m bench", report), ("python -m bench e2e", e2e)):
        p = argparse.ArgumentParser(prog=name)
        module.add_arguments(p)
        yield name, p


def test_every_flag_of_every_command_has_a_help(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    for name, p in _all_parsers():
        for a in p._actions:
            assert a.help and a.help != argparse.SUPPRESS and len(a.help) > 5, (
                name,
                a.option_strings or a.dest,
            )


def test_compare_names_its_output_after_its_methods(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    argv = ["compare", *TINY, "--steps", "1", "--noise-rate", "0.2"]
    assert run([*argv, "--methods", "ls,fmtl-ls", "--seeds", "0,1"], capsys)[0] == 0
    assert run([*argv, "--methods", "mgda", "--seeds", "3"], capsys)[0] == 0
    assert sorted(os.listdir("runs")) == [
        "compare-multidigits-noise0.2-ls+fmtl-ls-seeds0-1.json",
        "compare-multidigits-noise0.2-ls+fmtl-ls-seeds0-1.png",
        "compare-multidigits-noise0.2-mgda-seeds3.json",
        "compare-multidigits-noise0.2-mgda-seeds3.png",
    ]
    # the same compare again replaces its own files (with a note); another one is refused
    code, _, err = run([*argv, "--methods", "mgda", "--seeds", "3"], capsys)
    assert code == 0 and "same run" in err
    code, _, err = run([*argv, "--methods", "mgda", "--seeds", "3", "--lr", "0.01"], capsys)
    assert code == 2 and "already exists" in err
    weightings = ("ls", "mgda", "pcgrad", "imtl", "cagrad", "nashmtl", "upgrad")
    many = [f"{o}{w}" for o in ("", "fmtl-", "samo-") for w in weightings]
    name = cli._default_compare_output(T.TrainConfig(), many, [0, 1, 2])
    assert len(os.path.basename(name)) < 100 and "-21methods-3seeds-" in name


def test_train_default_output_names_the_data_variant():
    cfg = T.TrainConfig(noise_rate=0.4, low_resource=300, optimizer="samo", seed=2)
    assert cli._default_output(cfg) == os.path.join(
        "runs", "multidigits-noise0.4-lowres300-samo-mgda-seed2.json"
    )


def _count_trainings(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = T.train

    def counting(cfg, *a, **k):
        calls.append(cfg.method)
        return real(cfg, *a, **k)

    monkeypatch.setattr(T, "train", counting)
    return calls


def test_resume_does_not_retrain_a_known_baseline(tmp_path, capsys, monkeypatch):
    ck, out = tmp_path / "c.pt", tmp_path / "r.json"
    calls = _count_trainings(monkeypatch)
    argv = ["train", *TINY, "--steps", "4", "--checkpoint", ck, "-o", out]
    assert run(argv, capsys)[0] == 0
    first = json.loads(out.read_text())
    assert calls == ["ls", "fmtl-mgda"]
    # resuming the finished run: nothing trained again, the same Δm
    code, _, err = run(["train", "--resume", ck, "-q", "-o", out], capsys)
    assert code == 0, err
    assert calls == ["ls", "fmtl-mgda", "fmtl-mgda"]
    again = json.loads(out.read_text())
    assert again["delta_m"] == first["delta_m"] and again["test"] == first["test"]
    # a longer run needs an LS baseline of the same length: trained once
    code, _, err = run(["train", "--resume", ck, "--steps", "6", "-q", "-o", out], capsys)
    assert code == 0, err
    assert calls[3:] == ["ls", "fmtl-mgda"]
    assert T.load_checkpoint(str(ck))["extra"]["baseline"]["config"]["steps"] == 6
    # an LS run is its own baseline
    calls.clear()
    code, _, err = run([*argv[:-4], "--method", "ls", "-o", tmp_path / "ls.json"], capsys)
    assert code == 0 and calls == ["ls"]


def test_the_baseline_goes_first_and_does_not_change_the_run(tmp_path, capsys):
    argv = ["train", *TINY, "--steps", "3"]
    assert run([*argv, "--baseline", "ls", "-o", tmp_path / "a.json"], capsys)[0] == 0
    assert run([*argv, "--baseline", "none", "-o", tmp_path / "b.json"], capsys)[0] == 0
    a, b = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert a["test"] == b["test"]
    for h in a["history"] + b["history"]:
        h.pop("train_time")
    assert a["history"] == b["history"]


def test_bench_writes_to_an_untracked_folder_by_default(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    from bench import e2e, report

    for out in (report.default_out(torch.device("cpu")), e2e.default_out(torch.device("cpu"))):
        assert out.is_relative_to(ROOT / "runs"), out
    assert "/runs/" in (ROOT / ".gitignore").read_text().split()
