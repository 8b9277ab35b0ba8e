"""Results are never lost (issue 19, category 5): outputs checked before training, sealed
checkpoints refused when corrupted or tampered with, no stray temporary file whatever the signal,
a second writer warned or refused, out-of-range flags refused in one line, a diverged run never
written as a result."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _cli import run

import mtlsam_fast
from mtlsam_fast import cli, files
from mtlsam_fast import train as T
from mtlsam_fast.cli import main
from mtlsam_fast.signals import Interrupted, StopSignals

ROOT = Path(mtlsam_fast.__file__).resolve().parent.parent
TINY = ["--n-train", "64", "--n-test", "32", "--batch-size", "16", "--width", "4", "--quiet"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def listing(path) -> list[str]:
    return sorted(os.listdir(path))


def one_line_error(code: int, err: str) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err


@pytest.fixture
def no_training(monkeypatch):
    """Any training fails the test: the command had to refuse before it."""

    def refuse(*a, **k):
        raise AssertionError("trained although the command should have been refused first")

    monkeypatch.setattr(T, "train", refuse)


@pytest.fixture(scope="module")
def checkpoint_file(tmp_path_factory) -> Path:
    """A 2-step F-MTL checkpoint (sealed, as the CLI writes it)."""
    folder = tmp_path_factory.mktemp("ck")
    code = main(
        [
            "train",
            *TINY,
            "--steps",
            "2",
            "--baseline",
            "none",
            "--output",
            "none",
            "--checkpoint",
            str(folder / "ck.pt"),
        ]
    )
    assert code == 0
    return folder / "ck.pt"


# ---------------------------------------------------------------------------- sealed files


def test_seal_refuses_every_flipped_byte_truncation_and_extension(checkpoint_file):
    data = checkpoint_file.read_bytes()
    assert data.startswith(files.SEAL_MAGIC) and b"\n" in data[:160]
    payload = files.unseal(data, "checkpoint", "ck")
    assert torch.load(io.BytesIO(payload), weights_only=True)["step"] == 2
    header = data.index(b"\n") + 1
    positions = sorted({*range(header + 1), *range(header, len(data), 1009), len(data) - 1})
    for i in positions:
        for bit in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= bit
            with pytest.raises(files.CorruptFileError):
                files.unseal(bytes(bad), "checkpoint", "ck")
    for cut in (0, 10, header - 1, header, header + 1, len(data) // 2, len(data) - 1):
        with pytest.raises(files.CorruptFileError):
            files.unseal(data[:cut], "checkpoint", "ck")
    with pytest.raises(files.CorruptFileError, match="holds"):
        files.unseal(data + b"\0", "checkpoint", "ck")
    with pytest.raises(files.CorruptFileError, match="not a checkpoint file"):
        files.unseal(files.seal(b"x", "other"), "checkpoint", "ck")


def test_corrupted_checkpoint_is_refused_by_resume(checkpoint_file, tmp_path, capsys):
    ck = tmp_path / "ck.pt"
    data = bytearray(checkpoint_file.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit deep inside the tensors
    ck.write_bytes(bytes(data))
    code, _, err = run(["train", "--resume", ck, "--steps", "4", "--quiet"], capsys)
    one_line_error(code, err)
    assert "checksum mismatch" in err
    assert ck.read_bytes() == bytes(data) and listing(tmp_path) == ["ck.pt"]


def _sampler(state):
    return state["sampler"]


TAMPERED = {
    "step is a string": lambda s: s.update(step="2"),
    "step is negative": lambda s: s.update(step=-1),
    "step is a bool": lambda s: s.update(step=True),
    "model is a list": lambda s: s.update(model=list(s["model"].values())),
    "model holds a NaN": lambda s: (
        next(v for v in s["model"].values() if v.is_floating_point())
        .view(-1)
        .__setitem__(0, float("nan"))
    ),
    "model tensor of another shape": lambda s: s["model"].update(
        {next(iter(s["model"])): torch.zeros(3)}
    ),
    "model tensor of another dtype": lambda s: s["model"].update(
        {k: v.double() for k, v in list(s["model"].items())[:1]}
    ),
    "optimizer state holds an inf": lambda s: (
        next(
            t
            for st in s["optimizer"]["state"].values()
            for t in st.values()
            if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel() > 1
        )
        .view(-1)
        .__setitem__(0, float("inf"))
    ),
    "optimizer state of another K": lambda s: s["optimizer"]["param_groups"][0][
        "mtlsam_fast"
    ].update(num_tasks=5),
    "config lr is a string": lambda s: s["config"].update(lr="0.001"),
    "config has an unknown key": lambda s: s["config"].update(colour="blue"),
    "config lr out of range": lambda s: s["config"].update(lr=-1.0),
    "sampler perm is not a permutation": lambda s: _sampler(s).update(
        perm=torch.zeros_like(_sampler(s)["perm"])
    ),
    "sampler perm of another length": lambda s: _sampler(s).update(perm=torch.arange(5)),
    "sampler position out of range": lambda s: _sampler(s).update(pos=10**6),
    "sampler generator state truncated": lambda s: _sampler(s).update(gen=_sampler(s)["gen"][:10]),
    "rng state of floats": lambda s: s.update(rng=s["rng"].float()),
    "history is a dict": lambda s: s.update(history={}),
    "train time is NaN": lambda s: s.update(train_time=float("nan")),
    "extra entry missing": lambda s: s.pop("extra"),
    "format of another version": lambda s: s.update(format="mtlsam_fast.checkpoint/1"),
}


@pytest.mark.parametrize("change", list(TAMPERED), ids=list(TAMPERED))
def test_tampered_checkpoint_is_refused(checkpoint_file, tmp_path, capsys, change):
    """A checkpoint re-sealed after an edit (valid checksum, wrong content) is refused before
    anything is trained or written."""
    state = torch.load(
        io.BytesIO(files.unseal(checkpoint_file.read_bytes(), "checkpoint", "ck")),
        weights_only=True,
    )
    TAMPERED[change](state)
    ck = tmp_path / "ck.pt"
    ck.write_bytes(T.checkpoint_bytes(state))
    before = ck.read_bytes()
    code, _, err = run(
        ["train", "--resume", ck, "--steps", "4", "--quiet", "-o", tmp_path / "r.json"], capsys
    )
    one_line_error(code, err)
    assert ck.read_bytes() == before and listing(tmp_path) == ["ck.pt"]


# ---------------------------------------------------------------------------- outputs


def _bad_output_cases(tmp: Path) -> dict[str, list]:
    (tmp / "a_dir").mkdir()
    (tmp / "a_file").write_text("x")
    (tmp / "base.json").write_text("{}")
    return {
        "output is a directory": ["train", "-o", tmp / "a_dir"],
        "output ends with a slash": ["train", "-o", str(tmp / "new") + "/"],
        "output under a file": ["train", "-o", tmp / "a_file" / "r.json"],
        "output folder cannot hold files": ["train", "-o", "/proc/mtlsam/r.json"],
        "output is a device": ["train", "-o", "/dev/null"],
        "checkpoint is a directory": ["train", "-o", "none", "--checkpoint", tmp / "a_dir"],
        "checkpoint under a file": ["train", "-o", "none", "--checkpoint", tmp / "a_file" / "c"],
        "checkpoint cannot be written": ["train", "-o", "none", "--checkpoint", "/proc/c.pt"],
        "output and checkpoint collide": ["train", "-o", tmp / "x", "--checkpoint", tmp / "x"],
        "compare output is a directory": ["compare", "-o", tmp / "a_dir"],
        "compare plot is a directory": ["compare", "-o", tmp / "c.json", "--plot", tmp / "a_dir"],
        "compare plot cannot be written": ["compare", "-o", tmp / "c.json", "--plot", "/proc/p"],
        "compare output and plot collide": ["compare", "-o", tmp / "c", "--plot", tmp / "c"],
        "existing output of another run": ["train", "-o", tmp / "a_file"],
        "existing compare plot": ["compare", "-o", tmp / "c.json", "--plot", tmp / "a_file"],
    }


def test_every_output_is_checked_before_training(tmp_path, capsys, no_training):
    for name, argv in _bad_output_cases(tmp_path).items():
        code, _, err = run([*argv, *TINY, "--steps", "1"], capsys)
        assert code == 2, (name, err)
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, (name, err)
        assert listing(tmp_path) == ["a_dir", "a_file", "base.json"], name
        assert listing(tmp_path / "a_dir") == [] and (tmp_path / "a_file").read_text() == "x"


def test_inputs_are_never_outputs(checkpoint_file, tmp_path, capsys, no_training):
    ck = tmp_path / "ck.pt"
    ck.write_bytes(checkpoint_file.read_bytes())
    code, _, err = run(["train", "--resume", ck, "--checkpoint", tmp_path / "c2", "-o", ck], capsys)
    one_line_error(code, err)
    assert "--resume" in err
    res = tmp_path / "res.json"
    res.write_text(json.dumps({"test": {"tasks": {"left": {"accuracy": 50.0}}}}))
    code, _, err = run(["train", *TINY, "--baseline", res, "-o", res], capsys)
    one_line_error(code, err)
    assert "--baseline" in err and ck.read_bytes() == checkpoint_file.read_bytes()


def test_folders_made_for_outputs_are_removed_when_the_run_fails(tmp_path, capsys):
    out = tmp_path / "new" / "deeper" / "r.json"
    code, _, err = run(
        ["train", *TINY, "--dataset", "multimnist", "--data-dir", tmp_path / "none", "-o", out],
        capsys,
    )
    assert code == 2 and "not found" in err
    assert listing(tmp_path) == []


def test_existing_outputs(tmp_path, capsys):
    out, ck = tmp_path / "r.json", tmp_path / "c.pt"
    argv = ["train", *TINY, "--method", "ls", "--steps", "2", "--baseline", "none", "-o", out]
    assert run([*argv, "--checkpoint", ck], capsys)[0] == 0
    # the same run again: its earlier result is replaced, with a note
    code, _, err = run(argv, capsys)
    assert code == 0 and "same run" in err and "replaced" in err
    first = out.read_bytes()
    # another configuration on the same output: refused, the file kept
    code, _, err = run([*argv, "--lr", "0.01"], capsys)
    one_line_error(code, err)
    assert "--overwrite" in err and out.read_bytes() == first
    code, _, err = run([*argv, "--lr", "0.01", "--overwrite"], capsys)
    assert code == 0 and json.loads(out.read_text())["config"]["lr"] == 0.01
    # an existing checkpoint of a fresh run: refused with the hint to resume it
    before = ck.read_bytes()
    code, _, err = run([*argv, "--checkpoint", ck, "-o", "none"], capsys)
    one_line_error(code, err)
    assert f"--resume {ck}" in err and ck.read_bytes() == before
    # --overwrite starts over on purpose (and its result replaces the lr=0.01 one)
    assert run([*argv, "--overwrite", "--checkpoint", ck], capsys)[0] == 0
    assert ck.read_bytes() != before and json.loads(out.read_text())["config"]["lr"] == 0.001
    # resuming writes on to the same checkpoint, and replaces the same run's result
    code, _, err = run(["train", "--resume", ck, "--steps", "3", "-q", "-o", out], capsys)
    assert code == 0, err
    assert T.load_checkpoint(str(ck))["step"] == 3 and json.loads(out.read_text())["steps"] == 3
    assert listing(tmp_path) == ["c.pt", "r.json"]


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "r.json"
    plan = files.OutputPlan()  # stands for another run holding the output
    plan.add(str(out), "--output")
    with plan:
        code, _, err = run(["train", *TINY, "--steps", "1", "-o", out], capsys)
    one_line_error(code, err)
    assert "another mtlsam-fast run" in err and str(os.getpid()) in err
    assert listing(tmp_path) == []
    assert run(["train", *TINY, "--steps", "1", "--baseline", "none", "-o", out], capsys)[0] == 0


def test_an_output_written_by_another_machine_meanwhile_is_kept(tmp_path, capsys, monkeypatch):
    """The lock covers this machine; a file written elsewhere during the run is not replaced: this
    run's result goes to a free sibling name, with a warning."""
    out = tmp_path / "r.json"
    real = T.train

    def train_and_meanwhile(*a, **k):
        out.write_text("the other run's result")
        return real(*a, **k)

    monkeypatch.setattr(T, "train", train_and_meanwhile)
    code, stdout, err = run(
        ["train", *TINY, "--steps", "1", "--baseline", "none", "-o", out], capsys
    )
    assert code == 0 and "another process" in err
    assert out.read_text() == "the other run's result"
    assert json.loads((tmp_path / "r-2.json").read_text())["steps"] == 1
    assert str(tmp_path / "r-2.json") in stdout


# ---------------------------------------------------------------------------- range checks

OUT_OF_RANGE = [
    ["train", "--lr", "inf"],
    ["train", "--lr", "nan"],
    ["train", "--lr", "0"],
    ["train", "--lr", "-0.1"],
    ["train", "--epochs", "inf"],
    ["train", "--epochs", "nan"],
    ["train", "--epochs", "0"],
    ["train", "--rho", "nan"],
    ["train", "--rho", "inf"],
    ["train", "--rho", "-0.1"],
    ["train", "--rho-head", "-1"],
    ["train", "--method", "samo-mgda", "--alpha", "1.5"],
    ["train", "--method", "samo-mgda", "--alpha", "nan"],
    ["train", "--method", "samo-mgda", "--zo-eps", "0"],
    ["train", "--method", "samo-mgda", "--zo-eps", "inf"],
    ["train", "--base-optimizer", "sgd", "--momentum", "1"],
    ["train", "--base-optimizer", "sgd", "--momentum", "-0.5"],
    ["train", "--weight-decay", "-1"],
    ["train", "--weight-decay", "nan"],
    ["train", "--noise-rate", "1.5"],
    ["train", "--noise-rate", "nan"],
    ["train", "--batch-size", "1"],
    ["train", "--n-train", "1"],
    ["train", "--seed", "-1"],
    ["train", "--seed", str(2**64)],
    ["train", "--data-seed", "-3"],
    ["train", "--threads", "100000"],
    ["train", "--weighting-option", "=3"],
    ["train", "--weighting-option", "nonsense=1"],
    ["train", "--baseline", "0,50"],
    ["train", "--baseline", "nan,50"],
    ["train", "--baseline", "101,50"],
    ["train", "--baseline", "50"],
    ["train", "--noise-rate", "0.2", "--noise-task", "3"],
    ["train", "--steps", "0"],
    ["train", "--eval-every", "-1"],
    ["train", "--device", "tpu"],
    ["compare", "--seeds", "-1"],
    ["compare", "--seeds", "0,0"],
    ["compare", "--methods", "fmtl-ls,f-ls"],
    ["compare", "--methods", "ls", "--baseline", "single"],
    ["demo", "--batch-size", "1"],
    ["demo", "--seed", "-1"],
    # options that would be silently ignored
    ["train", "--alpha", "0.3"],
    ["train", "--method", "mgda", "--rho", "0.1"],
    ["train", "--method", "samo-mgda", "--adaptive"],
    ["train", "--momentum", "0.5"],
    ["train", "--image-size", "32"],
    ["train", "--data-dir", "/tmp"],
    ["train", "--noise-task", "1"],
    ["train", "--low-resource-task", "1"],
    ["compare", "--methods", "ls,mgda", "--zo-eps", "0.01"],
]


@pytest.mark.parametrize("argv", OUT_OF_RANGE, ids=[" ".join(a) for a in OUT_OF_RANGE])
def test_out_of_range_flags_exit_2_in_one_line(tmp_path, capsys, no_training, argv):
    extra = ["-o", tmp_path / "o.json"] if argv[0] != "demo" else []
    if argv[0] == "compare":
        extra += ["--plot", tmp_path / "o.png"]
    tiny = TINY if argv[0] != "demo" else []
    code, _, err = run([argv[0], *tiny, *argv[1:], *extra], capsys)
    one_line_error(code, err)
    assert listing(tmp_path) == []


def test_a_diverging_run_is_not_written_and_keeps_its_checkpoint(tmp_path, capsys):
    ck, out = tmp_path / "c.pt", tmp_path / "r.json"
    base = ["train", *TINY, "--method", "ls", "--baseline", "none", "--checkpoint", ck]
    assert run([*base, "--steps", "2", "-o", "none"], capsys)[0] == 0
    good = ck.read_bytes()
    for extra in (["--steps", "3"], ["--steps", "40"]):  # the end check; the patience
        code, _, err = run(
            [*base, *extra, "--lr", "1e30", "-o", out, "--overwrite", "--eval-every", "1"], capsys
        )
        one_line_error(code, err)
        assert "diverged" in err and "--lr" in err
        assert not out.exists()
        # non-finite weights never replace the checkpoint: it holds an earlier, finite step
        state = T.load_checkpoint(str(ck))
        diverged_at = int(err.split("diverged at step ")[1].split()[0])
        assert state["step"] < diverged_at and T.all_finite(state["model"])
    assert ck.read_bytes() != good  # (--overwrite started a new run)


# ---------------------------------------------------------------------------- signals

#: a child that imports only mtlsam_fast.files and .signals (no torch: it starts in milliseconds),
#: then writes a file whose fsync blocks until the test signals it
_SLOW_WRITE = """
import os, sys, time, types
package = types.ModuleType("mtlsam_fast")
package.__path__ = [{package!r}]
sys.modules["mtlsam_fast"] = package
from mtlsam_fast import files, signals
if {named}:
    files._open_anonymous = lambda directory: None
def slow_fsync(fd):
    open({ready!r}, "w").close()
    time.sleep(60)
os.fsync = slow_fsync
with signals.StopSignals():  # the CLI's handlers (SIGKILL cannot be handled)
    files.atomic_write({target!r}, b"x" * 100000)
"""


@pytest.mark.parametrize("named", [False, True], ids=["anonymous", "named"])
@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP", "SIGKILL"])
def test_an_interrupted_write_leaves_no_stray_file(tmp_path, signame, named):
    """A write stopped by a signal while its data is on the way to the disk: the destination
    keeps its old contents and no temporary file is left. The one case the OS gives no chance to
    clean up (SIGKILL while a named temporary file is used, where O_TMPFILE is missing) leaves a
    file that the next write to the same destination removes."""
    target, ready = tmp_path / "out" / "r.json", tmp_path / "ready"
    target.parent.mkdir()
    target.write_text("old")
    script = _SLOW_WRITE.format(
        package=str(ROOT / "mtlsam_fast"), named=named, ready=str(ready), target=str(target)
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()
        time.sleep(0.005)
    proc.send_signal(getattr(signal, signame))
    proc.wait(180)  # (seconds on a quiet machine; minutes only under a load of 100+)
    assert proc.returncode != 0
    assert target.read_text() == "old"
    left = listing(target.parent)
    if named and signame == "SIGKILL":
        assert len(left) == 2 and left[0].startswith(".r.json.") and left[0].endswith(".tmp")
        files.atomic_write(str(target), b"new")  # the next write to it cleans up
        left = listing(target.parent)
    assert left == ["r.json"]


def _long_run(tmp_path: Path, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtlsam_fast",
            "train",
            *TINY[:-1],  # not --quiet: wait for the first progress line
            "--method",
            "ls",
            "--steps",
            "100000",
            "--eval-every",
            "5",
            "--baseline",
            "none",
            "--threads",
            "1",
            "-o",
            str(tmp_path / "r.json"),
            *map(str, extra),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )


def test_sigterm_stops_training_after_writing_the_checkpoint(tmp_path):
    """The real thing: a training process, a real SIGTERM."""
    ck = tmp_path / "c.pt"
    proc = _long_run(tmp_path, "--checkpoint", ck)
    assert proc.stderr is not None
    for line in proc.stderr:  # a progress line: training has started
        if "step 5/100000" in line:
            break
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert "stopped by SIGTERM" in err and f"--resume {ck}" in err and "Traceback" not in err
    stopped_at = int(err.split(" at step ")[1].split()[0])
    assert T.load_checkpoint(str(ck))["step"] == stopped_at >= 5
    assert listing(tmp_path) == ["c.pt"]  # no result, no temporary file


def _signal_at_first_evaluation(monkeypatch, signum: int, times: int = 1) -> None:
    real = T.evaluate

    def evaluate_then_signal(*a, **k):
        out = real(*a, **k)
        for _ in range(times):
            os.kill(os.getpid(), signum)
        return out

    monkeypatch.setattr(T, "evaluate", evaluate_then_signal)


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM", "SIGHUP"])
@pytest.mark.parametrize("with_checkpoint", [True, False], ids=["checkpoint", "no-checkpoint"])
def test_a_signal_stops_training_and_loses_nothing(
    tmp_path, capsys, monkeypatch, signame, with_checkpoint
):
    signum = getattr(signal, signame)
    _signal_at_first_evaluation(monkeypatch, signum)
    ck = tmp_path / "c.pt"
    argv = ["train", *TINY, "--method", "ls", "--steps", "50", "--eval-every", "3"]
    argv += ["--baseline", "none", "-o", tmp_path / "r.json"]
    code, _, err = run([*argv, *(["--checkpoint", ck] if with_checkpoint else [])], capsys)
    assert code == 128 + signum and "Traceback" not in err
    if with_checkpoint:  # stopped after the step, with its checkpoint
        assert f"stopped by {signame} at step 3 of 50" in err and f"--resume {ck}" in err
        assert T.load_checkpoint(str(ck))["step"] == 3
        assert listing(tmp_path) == ["c.pt"]
        # and it resumes
        monkeypatch.undo()
        code, _, err = run(["train", "--resume", ck, "-q", "-o", tmp_path / "r.json"], capsys)
        assert code == 0, err
        assert T.load_checkpoint(str(ck))["step"] == 50
    else:  # at once: nothing to save
        assert f"interrupted by {signame}" in err
        assert listing(tmp_path) == []


def test_a_second_signal_stops_at_once_without_a_new_checkpoint(tmp_path, capsys, monkeypatch):
    _signal_at_first_evaluation(monkeypatch, signal.SIGTERM, times=2)
    ck = tmp_path / "c.pt"
    argv = ["train", *TINY, "--method", "ls", "--steps", "50", "--eval-every", "3"]
    code, _, err = run([*argv, "--baseline", "none", "-o", "none", "--checkpoint", ck], capsys)
    assert code == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err
    assert T.load_checkpoint(str(ck))["step"] == 0  # the one written at the start
    assert listing(tmp_path) == ["c.pt"]


def test_the_signal_handler_defers_once():
    signals = StopSignals()
    with signals.deferred(True):
        signals._handle(signal.SIGTERM, None)
        assert signals.should_stop()
        with pytest.raises(Interrupted) as e:
            signals._handle(signal.SIGTERM, None)
    assert e.value.signum == signal.SIGTERM
    with pytest.raises(Interrupted):  # not deferred: at once
        StopSignals()._handle(signal.SIGINT, None)


def test_a_closed_stdout_loses_no_result(tmp_path):
    out = tmp_path / "r.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mtlsam_fast",
            "train",
            *TINY,
            "--steps",
            "2",
            "--baseline",
            "none",
            "--threads",
            "1",
            "-o",
            str(out),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    assert proc.stdout is not None
    proc.stdout.close()  # like `mtlsam-fast train | head -0`
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.wait(120)
    assert proc.returncode == cli.EXIT_BROKEN_PIPE, err
    assert "Traceback" not in err and json.loads(out.read_text())["steps"] == 2


# ---------------------------------------------------------------------------- the [cli] extra


@pytest.mark.parametrize(
    "module, argv",
    [
        ("sklearn", ["train", "--steps", "1"]),
        ("matplotlib", ["compare", "--steps", "1", "--plot", "{tmp}/p.png"]),
        ("PIL", ["train", "--dataset", "celeba", "--data-dir", "{tmp}", "--steps", "1"]),
        ("sklearn", ["demo"]),
    ],
)
def test_a_missing_cli_dependency_is_one_line(tmp_path, capsys, monkeypatch, module, argv):
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    extra = ["-o", tmp_path / "o.json", "-q"] if argv[0] != "demo" else []
    code, _, err = run([*argv, *extra], capsys)
    one_line_error(code, err)
    assert 'pip install "mtlsam_fast[cli]"' in err
    assert listing(tmp_path) == []


def test_a_missing_tqdm_matters_only_for_the_progress_bar(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "tqdm", None)
    argv = ["train", *TINY[:-1], "--steps", "1", "--baseline", "none", "-o", tmp_path / "o.json"]
    assert run(argv, capsys)[0] == 0  # not a terminal: log lines, no tqdm needed
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    code, _, err = run([*argv, "--overwrite"], capsys)
    one_line_error(code, err)
    assert "tqdm" in err and 'pip install "mtlsam_fast[cli]"' in err


def test_library_loaders_raise_an_import_error_naming_the_extra(monkeypatch):
    from mtlsam_fast import data
    from mtlsam_fast.errors import MissingExtraError

    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"mtlsam_fast\[cli\]") as e:
        data.multidigits(n_train=4, n_test=4)
    assert isinstance(e.value, MissingExtraError)


def test_stray_temporaries_of_live_processes_are_left_alone(tmp_path):
    target = tmp_path / "r.json"
    mine = tmp_path / f".r.json.{files._host()}.{os.getpid()}.abcd1234.tmp"
    other_host = tmp_path / ".r.json.otherhost.1.abcd1234.tmp"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stray = tmp_path / f".r.json.{files._host()}.{dead.pid}.abcd1234.tmp"
    for p in (mine, other_host, stray):
        p.write_text("partial")
    files.atomic_write(str(target), b"{}")
    assert listing(tmp_path) == sorted(["r.json", mine.name, other_host.name])


@pytest.mark.parametrize(
    "field, value",
    [("alpha", 1.0), ("alpha", 0.0), ("noise_rate", 1.0), ("momentum", 0.0), ("rho", 0.0)],
)
def test_a_value_at_a_closed_bound_is_accepted(field, value):
    """The ends of a closed range are inside it (``--alpha 1.0`` is SAM's global-only SAMO)."""
    T.validate(T.TrainConfig(**{field: value}))


@pytest.mark.parametrize("field, value", [("alpha", 1.0 + 1e-12), ("momentum", 1.0)])
def test_a_value_past_a_bound_is_refused(field, value):
    """Just past a closed end, or at an open one, is refused naming the flag."""
    with pytest.raises(T.UsageError, match=f"--{field.replace('_', '-')} must be"):
        T.validate(T.TrainConfig(**{field: value}))


def test_a_stored_configuration_takes_an_int_for_a_float_field():
    """JSON writes 5.0 as 5 when a tool rewrites it: a float field takes an int (as a float), but
    not a bool, and an int field does not take a float."""
    cfg = T.TrainConfig.from_dict({"epochs": 5, "lr": 1})
    assert cfg.epochs == 5.0 and isinstance(cfg.epochs, float) and isinstance(cfg.lr, float)
    with pytest.raises(T.UsageError, match="'epochs' must be float"):
        T.TrainConfig.from_dict({"epochs": True})
    with pytest.raises(T.UsageError, match="'width' must be int"):
        T.TrainConfig.from_dict({"width": 8.0})
