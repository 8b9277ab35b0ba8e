"""``mtlsam-fast``: train, compare and demo commands (also ``python -m mtlsam_fast``).

    mtlsam-fast train                               # F-MGDA on the built-in MultiDigits, Δm% vs LS
    mtlsam-fast train --method samo-mgda --noise-rate 0.4 --seed 1 --output run.json
    mtlsam-fast train --dataset multimnist --data-dir ~/data/mnist --checkpoint ck.pt
    mtlsam-fast train --resume ck.pt                # continues the run stored in ck.pt
    mtlsam-fast compare --methods ls,fmtl-ls,mgda,fmtl-mgda,samo-mgda --seeds 0,1,2 --noise-rate 0.4
    mtlsam-fast demo                                # every weighting on real per-task gradients

Exit status: 0 done; 2 a user error (a bad or inapplicable option, a missing or corrupted file, an
output that cannot be written safely, a run that diverged, a missing ``[cli]`` dependency), printed
as one line on stderr before anything was written; 128 + N when stopped by signal N (130 for
Ctrl-C, 143 for SIGTERM), after writing the checkpoint when the run has one; 1 is a bug. Every
output is checked before the work starts and written atomically (:mod:`mtlsam_fast.files`). The
user documentation is ``docs/cli.md``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import signal
import statistics
import sys
import time
import typing
from collections.abc import Callable, Sequence
from typing import Any

from . import files, launch, weighting
from . import train as T
from .data import DataError
from .errors import UsageError, import_extra
from .signals import StopSignals

EXIT_USAGE = 2
EXIT_BROKEN_PIPE = 128 + 13
COMPARE_FORMAT = "mtlsam_fast.compare/1"


# --------------------------------------------------------------------------------------------
# arguments


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (the full usage is in ``--help``)."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _key_value(s: str) -> tuple[str, Any]:
    if "=" not in s or not s.split("=", 1)[0].strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    try:
        value = json.loads(v)
    except json.JSONDecodeError:
        value = v
    return k.strip(), value


def _add_config_args(p: argparse.ArgumentParser, *, single_run: bool) -> None:
    """The training configuration options; ``single_run`` adds
    --method/--optimizer/--weighting/--seed."""
    d = T.TrainConfig()
    g = p.add_argument_group("data")
    g.add_argument(
        "--dataset",
        help=f"multidigits (built in), multimnist, multifashion, multifashion+mnist, celeba "
        f"(default: {d.dataset})",
    )
    g.add_argument("--data-dir", help="directory of the data files (IDX files; CelebA's folder)")
    g.add_argument("--data-dir2", help="Fashion-MNIST directory for multifashion+mnist")
    g.add_argument(
        "--n-train",
        type=_positive_int,
        help="number of training images, at least 2 (default: the data set's; MultiDigits 10000)",
    )
    g.add_argument(
        "--n-test", type=_positive_int, help="number of test images (MultiDigits default 2000)"
    )
    g.add_argument(
        "--image-size",
        type=_positive_int,
        help=f"CelebA image side, at least 8 (default: {d.image_size})",
    )
    g.add_argument(
        "--data-seed",
        type=int,
        help=f"seed of the data construction, 0 to 2**64-1 (default: {d.data_seed})",
    )
    g.add_argument(
        "--noise-rate",
        type=float,
        help="fraction in [0, 1] of wrong training labels on the noise task (default: 0)",
    )
    g.add_argument(
        "--noise-task",
        help="task with noisy labels, 1-based number or name (default: 2; needs --noise-rate)",
    )
    g.add_argument(
        "--low-resource",
        type=_positive_int,
        metavar="N",
        help="keep only N training labels of the low-resource task",
    )
    g.add_argument(
        "--low-resource-task",
        help="the low-resource task, 1-based number or name (default: 2; needs --low-resource)",
    )

    g = p.add_argument_group("optimization")
    if single_run:
        g.add_argument(
            "--method",
            help=f"WEIGHTING (plain aggregation), fmtl-WEIGHTING or samo-WEIGHTING "
            f"(default: {d.method})",
        )
        g.add_argument("--optimizer", help="plain | fmtl | samo (alternative to --method)")
        g.add_argument("--weighting", help="weighting name (alternative to --method)")
    g.add_argument(
        "--weighting-option",
        type=_key_value,
        action="append",
        metavar="KEY=VALUE",
        help="option for the weighting constructor (repeatable; VALUE is read as JSON), e.g. "
        'normalization="l2"',
    )
    g.add_argument(
        "--rho", type=float, help=f"F-MTL/SAMO perturbation radius, >= 0 (default: {d.rho})"
    )
    g.add_argument(
        "--rho-head", type=float, help="F-MTL/SAMO perturbation radius of the heads (default: rho)"
    )
    g.add_argument(
        "--adaptive",
        action="store_const",
        const=True,
        help="F-MTL: ASAM-style adaptive perturbation (scaled by |weights|)",
    )
    g.add_argument(
        "--alpha", type=float, help=f"SAMO: global/local mix in [0, 1] (default: {d.alpha})"
    )
    g.add_argument(
        "--zo-eps", type=float, help=f"SAMO: zeroth-order step, > 0 (default: {d.zo_eps})"
    )
    g.add_argument("--base-optimizer", help=f"adam | adamw | sgd (default: {d.base_optimizer})")
    g.add_argument("--lr", type=float, help=f"learning rate, > 0 (default: {d.lr})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum in [0, 1) (default: {d.momentum})")
    g.add_argument("--weight-decay", type=float, help="weight decay, >= 0 (default: 0)")
    g.add_argument(
        "--batch-size",
        type=_positive_int,
        help=f"training batch size, at least 2 for BatchNorm (default: {d.batch_size})",
    )
    g.add_argument("--epochs", type=float, help=f"training epochs, > 0 (default: {d.epochs:g})")
    g.add_argument("--steps", type=_positive_int, help="training steps (overrides --epochs)")
    g.add_argument(
        "--eval-every", type=_positive_int, help="evaluate every N steps (default: every epoch)"
    )
    g.add_argument(
        "--width", type=_positive_int, help=f"channels of the first conv layer (default: {d.width})"
    )

    g = p.add_argument_group("run")
    if single_run:
        g.add_argument(
            "--seed",
            type=int,
            help=f"training seed, 0 to 2**64-1: initialization, batches, SAMO noise "
            f"(default: {d.seed})",
        )
    g.add_argument("--backend", help=f"auto | torch | cpu | triton | cuda (default: {d.backend})")
    g.add_argument("--device", help="auto | cpu | cuda (default: auto)")
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads for torch, at most the CPUs available (default: 1; these models are "
        "too small for intra-op parallelism to pay, and more threads than free cores slow it "
        "down many times; raise it for CelebA)",
    )
    g.add_argument(
        "--quiet",
        "-q",
        action="store_true",
        help="no progress on stderr (by default a progress bar on a terminal, log lines otherwise)",
    )
    g.add_argument(
        "--overwrite",
        action="store_true",
        help="replace output files that already exist (without it, an existing output is "
        "refused unless it holds an earlier result of this same run)",
    )


_CONFIG_FIELDS = [
    f
    for f in T.TrainConfig.__dataclass_fields__
    if f not in ("optimizer", "weighting", "weighting_options")
]


def _explicit(args: argparse.Namespace) -> dict[str, Any]:
    """Configuration values given on the command line."""
    out = {f: getattr(args, f) for f in _CONFIG_FIELDS if getattr(args, f, None) is not None}
    if getattr(args, "weighting_option", None):
        out["weighting_options"] = dict(args.weighting_option)
    method = getattr(args, "method", None)
    opt, w = getattr(args, "optimizer", None), getattr(args, "weighting", None)
    if method is not None:
        if opt is not None or w is not None:
            raise UsageError("give either --method or --optimizer/--weighting, not both")
        out["optimizer"], out["weighting"] = T.parse_method(method)
    else:
        if opt is not None:
            if opt not in T.OPTIMIZERS:
                raise UsageError(f"unknown optimizer {opt!r}; available: {', '.join(T.OPTIMIZERS)}")
            out["optimizer"] = opt
        if w is not None:
            T.check_weighting(w)
            out["weighting"] = w
    return out


#: option -> (does it act on this configuration?, what it is): an option that acts on none of
#: the runs is refused instead of being silently ignored
_APPLIES: dict[str, tuple[Callable[[T.TrainConfig], bool], str]] = {
    "rho": (lambda c: c.optimizer != "plain", "the F-MTL/SAMO perturbation radius"),
    "rho_head": (lambda c: c.optimizer != "plain", "the F-MTL/SAMO perturbation radius"),
    "adaptive": (lambda c: c.optimizer == "fmtl", "F-MTL's adaptive perturbation"),
    "alpha": (lambda c: c.optimizer == "samo", "SAMO's global/local mix"),
    "zo_eps": (lambda c: c.optimizer == "samo", "SAMO's zeroth-order step"),
    "momentum": (lambda c: c.base_optimizer == "sgd", "SGD's momentum"),
    "image_size": (lambda c: c.dataset == "celeba", "CelebA's image side"),
    "data_dir": (lambda c: c.dataset != "multidigits", "the folder of file-based data sets"),
    "data_dir2": (lambda c: c.dataset == "multifashion+mnist", "the Fashion-MNIST folder"),
    "noise_task": (lambda c: c.noise_rate > 0, "the task of --noise-rate"),
    "low_resource_task": (lambda c: c.low_resource is not None, "the task of --low-resource"),
}


def _check_applicable(explicit: dict[str, Any], cfgs: Sequence[T.TrainConfig]) -> None:
    for name, (applies, what) in _APPLIES.items():
        if name in explicit and not any(applies(c) for c in cfgs):
            where = cfgs[0].method if len(cfgs) == 1 else "any of the methods"
            raise UsageError(
                f"--{name.replace('_', '-')} has no effect on {where} (it is {what}); drop it"
            )


def _threads(n: int) -> int:
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    available = available or os.cpu_count() or 1
    if n > available:
        raise UsageError(
            f"--threads {n}: this process may use {available} CPU(s); more threads than CPUs "
            "only slow torch down"
        )
    return n


def _seeds(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds: expected comma-separated integers, got {text!r}") from None
    if not seeds:
        raise UsageError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise UsageError("--seeds: a seed is listed twice")
    bad = [s for s in seeds if not 0 <= s <= T.MAX_SEED]
    if bad:
        raise UsageError(f"--seeds: seeds must be integers in [0, 2**64 - 1], got {bad[0]}")
    return seeds


def _progress_mode(args: argparse.Namespace) -> str:
    if args.quiet:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


def _log(args: argparse.Namespace) -> Callable[[str], None]:
    return (lambda s: None) if args.quiet else _warn


def _warn(s: str) -> None:
    print(s, file=sys.stderr, flush=True)


def _require_extras(cfgs: Sequence[T.TrainConfig], mode: str, *, plot: str | None) -> None:
    """Import the ``[cli]`` packages this command will need, before any work starts."""
    datasets = {c.dataset for c in cfgs}
    if "multidigits" in datasets:
        import_extra("sklearn.datasets", "scikit-learn", "MultiDigits")
    if "celeba" in datasets:
        import_extra("PIL.Image", "Pillow", "CelebA")
    if mode == "bar":
        import_extra("tqdm", "tqdm", "the progress bar")
    if plot:
        import_extra("matplotlib", "matplotlib", plot)


# --------------------------------------------------------------------------------------------
# outputs


def _run_stem(cfg: T.TrainConfig) -> str:
    """The data part of default file names: ``multidigits[-noise0.4][-lowres300]``."""
    parts = [cfg.dataset.replace("+", "_")]
    if cfg.noise_rate:
        parts.append(f"noise{cfg.noise_rate:g}")
    if cfg.low_resource is not None:
        parts.append(f"lowres{cfg.low_resource}")
    return "-".join(parts)


def _default_output(cfg: T.TrainConfig) -> str:
    return os.path.join("runs", f"{_run_stem(cfg)}-{cfg.method}-seed{cfg.seed}.json")


def _default_compare_output(cfg: T.TrainConfig, methods: list[str], seeds: list[int]) -> str:
    """``runs/compare-DATA-M1+M2+...-seedsA-B.json``: named after its methods and seeds."""
    name = f"compare-{_run_stem(cfg)}-{'+'.join(methods)}-seeds{'-'.join(map(str, seeds))}"
    if len(name) > 150:  # stay well below the file systems' 255-byte names
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"compare-{_run_stem(cfg)}-{len(methods)}methods-{len(seeds)}seeds-{digest}"
    return os.path.join("runs", name + ".json")


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _same_run(path: str, cfg: T.TrainConfig) -> bool:
    """``path`` is a result JSON of this configuration (up to the training length)."""
    res = _read_json(path)
    if not isinstance(res, dict) or res.get("format") != T.RESULT_FORMAT:
        return False
    saved, now = res.get("config"), cfg.to_dict()
    return isinstance(saved, dict) and all(
        saved.get(k) == v for k, v in now.items() if k not in T.RESUMABLE_CHANGES
    )


# --------------------------------------------------------------------------------------------
# baselines


@dataclasses.dataclass
class Baseline:
    """A parsed ``--baseline``: ``kind`` none | ls | single | given | file | method."""

    kind: str
    spec: str
    values: list[float] | None = None  # given | file: per-task accuracies
    tasks: list[str] | None = None  # file: their task names

    @classmethod
    def parse(cls, spec: str) -> Baseline:
        if spec in ("none", "ls", "single"):
            return cls(spec, spec)
        try:
            nums = [float(v) for v in spec.split(",")]
        except ValueError:
            nums = None
        if nums is not None:
            return cls("given", spec, _accuracies(nums, "--baseline"))
        if not os.path.isfile(spec):
            raise UsageError(
                "--baseline: expected none, ls, single, comma-separated accuracies or a result "
                f"JSON file; {spec!r} is none of these (file not found)"
            )
        res = _read_json(spec)
        try:
            acc = {t: v["accuracy"] for t, v in res["test"]["tasks"].items()}
        except (KeyError, TypeError, AttributeError):
            raise UsageError(f"baseline file {spec!r} is not an mtlsam-fast result JSON") from None
        return cls("file", spec, _accuracies(list(acc.values()), spec), list(acc))

    def check_tasks(self, task_names: list[str]) -> None:
        if self.tasks is not None and sorted(self.tasks) != sorted(task_names):
            raise UsageError(
                f"baseline file {self.spec!r} has tasks {sorted(self.tasks)}, this run has "
                f"{sorted(task_names)}"
            )
        if self.values is not None and len(self.values) != len(task_names):
            raise UsageError(
                f"--baseline gives {len(self.values)} values but the data set has "
                f"{len(task_names)} tasks"
            )

    def fixed(self, task_names: list[str]) -> list[float]:
        """The accuracies of a given or file baseline, in ``task_names``' order."""
        assert self.values is not None
        if self.tasks is None:
            return list(self.values)
        by_task = dict(zip(self.tasks, self.values))
        return [by_task[t] for t in task_names]


def _accuracies(values: list[Any], what: str) -> list[float]:
    ok = all(
        isinstance(v, (int, float))
        and not isinstance(v, bool)
        and math.isfinite(v)
        and 0 < v <= 100
        for v in values
    )
    if not values or not ok:
        raise UsageError(f"{what}: baseline accuracies must be numbers in (0, 100], got {values}")
    return [float(v) for v in values]


def _ls_config(cfg: T.TrainConfig) -> T.TrainConfig:
    """The LS baseline of a run: plain aggregation, ls weighting, everything else the same."""
    return T.TrainConfig(
        **{**cfg.to_dict(), "optimizer": "plain", "weighting": "ls", "weighting_options": {}}
    )


def _train_baseline(
    spec: Baseline, cfg: T.TrainConfig, data, resume: dict | None, args
) -> dict[str, Any] | None:
    """The ls or single-task baseline of a run, trained before it (or taken from the checkpoint
    being resumed when it holds this very baseline): ``{"kind", "config", "accuracy"}``; None when
    there is nothing to train (no baseline, a fixed one, or an LS run that is its own baseline)."""
    if spec.kind not in ("ls", "single") or (
        spec.kind == "ls" and cfg.optimizer == "plain" and cfg.weighting == "ls"
    ):
        return None
    base = _ls_config(cfg)
    known = (resume or {}).get("extra", {}).get("baseline")
    if (
        isinstance(known, dict)
        and known.get("kind") == spec.kind
        and known.get("config") == base.to_dict()
    ):
        _log(args)(f"the {spec.kind} baseline of this run is stored in the checkpoint: reused")
        return known
    mode, log = _progress_mode(args), _log(args)
    if spec.kind == "ls":
        log("training the LS baseline (plain aggregation, ls weighting, same data and seed)")
        res = T.train(base, data, progress=mode, desc="baseline ls", log=log)
        accs = T.accuracies(res["test"])
    else:
        accs = []
        for k, name in enumerate(data.task_names):
            log(f"training the single-task baseline for task {name!r}")
            res = T.train(
                base, T.single_task_data(data, k), progress=mode, desc=f"single {name}", log=log
            )
            accs.append(T.accuracies(res["test"])[0])
    return {"kind": spec.kind, "config": base.to_dict(), "accuracy": accs}


# --------------------------------------------------------------------------------------------
# train


def format_train(res: dict) -> str:
    """The summary ``train`` prints (the per-task table comes from the result alone)."""
    lines = [res["dataset"]["summary"]]
    env = res["environment"]
    lines.append(
        f"method {res['method']}: {res['steps']} steps, {res['train_time_s']:.1f} s training "
        f"({res['step_time_ms']:.1f} ms/step wall, {res['step_cpu_ms']:.1f} ms/step CPU), "
        f"device {env['device']}, backend {env['backend']}, seed {res['config']['seed']}"
    )
    if res.get("skipped_steps"):
        lines.append(
            f"{res['skipped_steps']} of {res['steps']} steps were skipped by the optimizer "
            "(non-finite gradients)"
        )
    tasks = res["test"]["tasks"]
    baseline = res.get("baseline")
    width = max(8, *(len(t) for t in tasks))
    header = f"{'task':<{width}}  {'test acc %':>10}  {'test loss':>9}"
    if baseline:
        header += f"  {'baseline %':>10}"
    lines.append(header)
    for t, v in tasks.items():
        line = f"{t:<{width}}  {v['accuracy']:>10.2f}  {v['loss']:>9.4f}"
        if baseline:
            line += f"  {baseline['accuracy'][t]:>10.2f}"
        lines.append(line)
    lines.append(
        f"{'mean':<{width}}  {res['test']['mean_accuracy']:>10.2f}  "
        f"(mean error {res['test']['mean_error']:.2f} %)"
    )
    if baseline and res.get("delta_m") is not None:
        lines.append(f"Δm% vs {baseline['kind']} baseline: {res['delta_m']:+.2f}")
    return "\n".join(lines)


def _resumed_config(resume: dict[str, Any], explicit: dict[str, Any]) -> T.TrainConfig:
    saved = T.TrainConfig.from_dict(resume["config"])
    changed = [
        k for k, v in explicit.items() if k not in T.RESUMABLE_CHANGES and getattr(saved, k) != v
    ]
    if changed:
        raise UsageError(
            "--resume continues the run stored in the checkpoint, which has a different "
            "configuration: "
            + ", ".join(f"{k}={explicit[k]!r} (checkpoint: {getattr(saved, k)!r})" for k in changed)
            + "; only --steps, --epochs and --eval-every may change"
        )
    return T.TrainConfig(**{**saved.to_dict(), **explicit})


def cmd_train(args: argparse.Namespace) -> int:
    if launch.launched() and args.nproc is not None and args.nproc != launch.world_size():
        raise T.UsageError(
            f"--nproc {args.nproc} but the launcher started {launch.world_size()} processes"
        )
    main_process = launch.rank() == 0  # the others train silently and write nothing
    if not main_process:
        args.quiet = True
    explicit = _explicit(args)
    resume = T.load_checkpoint(args.resume) if args.resume else None
    cfg = _resumed_config(resume, explicit) if resume is not None else T.TrainConfig(**explicit)
    T.validate(cfg)
    _check_applicable(explicit, [cfg])
    spec = Baseline.parse(args.baseline)
    mode, log = _progress_mode(args), _log(args)
    _require_extras([cfg], mode, plot="--plot-weights" if args.plot_weights else None)
    if (
        args.plot_weights
        and weighting.get(cfg.weighting, **cfg.weighting_options).returns_direction
    ):
        raise UsageError(
            f"--plot-weights: weighting {cfg.weighting!r} returns an update direction, not task "
            "weights, so there are no weights to plot (the result JSON still records the "
            "per-task gradient norms and cosines)"
        )

    checkpoint = args.checkpoint or args.resume  # a resumed run goes on writing its checkpoint
    resumed_in_place = bool(
        args.resume and checkpoint and os.path.realpath(checkpoint) == os.path.realpath(args.resume)
    )
    # Under a launcher every rank trains; rank 0 alone checks, locks and writes the outputs.
    plan = files.OutputPlan(
        overwrite=args.overwrite,
        inputs=[
            (None if resumed_in_place else args.resume, "--resume"),
            (spec.spec if spec.kind == "file" else None, "--baseline"),
        ],
        warn=_warn,
    )
    output = None
    if args.output != "none" and main_process:
        output = plan.add(
            args.output or _default_output(cfg), "--output", same_run=lambda p: _same_run(p, cfg)
        )
    weights_plot = None
    if args.plot_weights and main_process:

        def same_plot(path: str) -> bool:  # the plot of an earlier result of this same run
            res = _read_json(output) if output else None
            return (
                output is not None
                and _same_run(output, cfg)
                and isinstance(res, dict)
                and res.get("weights_plot") == _plot_entry(output, path)
            )

        weights_plot = plan.add(args.plot_weights, "--plot-weights", same_run=same_plot)
    if checkpoint and main_process:
        checkpoint = plan.add(
            checkpoint,
            "--checkpoint",
            same_run=lambda p: resumed_in_place,
            hint=f"to continue the run it holds: --resume {checkpoint}",
            note=False,
        )
    with plan:
        data = T.build_data(cfg, progress=mode == "bar")
        spec.check_tasks(data.task_names)
        base = _train_baseline(spec, cfg, data, resume, args)
        log(
            f"training {cfg.method} on {data.name}"
            + (f", resumed from step {resume['step']}" if resume else "")
        )
        with args.signals.deferred(checkpoint is not None):
            res = T.train(
                cfg,
                data,
                checkpoint=checkpoint,
                checkpoint_every=args.checkpoint_every,
                resume=resume,
                progress=mode,
                log=lambda s: None,
                should_stop=args.signals.should_stop,
                extra_state={"baseline": base} if base is not None else None,
            )
        if spec.kind == "none":
            base_acc, label = None, None
        elif spec.kind in ("given", "file"):
            base_acc = spec.fixed(data.task_names)
            label = "given" if spec.kind == "given" else f"file {spec.spec}"
        else:
            base_acc = base["accuracy"] if base is not None else T.accuracies(res["test"])
            label = "single-task" if spec.kind == "single" else "ls"
        if base_acc is not None:
            res["baseline"] = {"kind": label, "accuracy": dict(zip(data.task_names, base_acc))}
            res["delta_m"] = T.delta_m(T.accuracies(res["test"]), base_acc)
        else:
            res["baseline"], res["delta_m"] = None, None
        written_plot = None
        if weights_plot:
            written_plot = plan.write(
                weights_plot, _plot_weights(res["monitor"], data.task_names, cfg.method)
            )
            if output:
                res["weights_plot"] = _plot_entry(output, written_plot)
        written = plan.write(output, T.result_json(res)) if output else None
    if not main_process:
        return 0
    # printed after the files are written: a closed stdout cannot lose the result
    print(format_train(res))
    if written:
        print(f"result written to {written}")
    if written_plot:
        print(f"weights plot written to {written_plot}")
    if checkpoint:
        print(f"checkpoint written to {checkpoint}")
    return 0


# --------------------------------------------------------------------------------------------
# compare


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def compare_rows(result: dict) -> list[list[str]]:
    """The compare table of a compare result: a header row, then one row per method (mean ± std
    over seeds of each task's and the mean accuracy, Δm%, wall and CPU ms/step)."""
    tasks = result["tasks"][:6]
    rows = [["method", *tasks, "mean acc", "Δm%", "ms/step", "cpu ms/step"]]
    for m, s in result["summary"].items():
        cells = [m]
        cells += [f"{s['tasks'][t]['mean']:.2f} ± {s['tasks'][t]['std']:.2f}" for t in tasks]
        cells.append(f"{s['mean_accuracy']['mean']:.2f} ± {s['mean_accuracy']['std']:.2f}")
        dm = s["delta_m"]
        cells.append(f"{dm['mean']:+.2f} ± {dm['std']:.2f}" if dm else "-")
        cells += [f"{s['step_time_ms']:.1f}", f"{s['step_cpu_ms']:.1f}"]
        rows.append(cells)
    return rows


def format_compare(result: dict) -> str:
    """The text ``compare`` prints: the data set, the settings, then :func:`compare_rows`."""
    base = result["baseline"]
    label = (
        f"{base['method']} (mean over seeds)"
        if base["method"]
        else (f"given {base['spec']}" if base["accuracy"] else "no baseline")
    )
    first = next(iter(result["runs"].values()))[0]
    lines = [
        result["dataset"]["summary"],
        f"seeds {','.join(map(str, result['seeds']))}; {first['steps']} steps each; Δm% vs {label}",
    ]
    rows = compare_rows(result)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        lines.append(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))
            ).rstrip()
        )
    return "\n".join(lines)


def _plot(summary: dict, tasks: list[str], title: str) -> bytes:
    """The compare plot as PNG bytes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = list(summary)
    has_dm = any(s["delta_m"] is not None for s in summary.values())
    fig, axes = plt.subplots(1, 2 if has_dm else 1, figsize=(11 if has_dm else 7, 4), squeeze=False)
    ax = axes[0, 0]
    n = len(tasks) + 1
    bw = 0.8 / len(methods)
    for i, m in enumerate(methods):
        s = summary[m]
        means = [s["tasks"][t]["mean"] for t in tasks] + [s["mean_accuracy"]["mean"]]
        stds = [s["tasks"][t]["std"] for t in tasks] + [s["mean_accuracy"]["std"]]
        ax.bar([j + i * bw for j in range(n)], means, bw, yerr=stds, capsize=3, label=m)
    ax.set_xticks([j + bw * (len(methods) - 1) / 2 for j in range(n)], [*tasks, "mean"])
    lo = min(
        summary[m]["tasks"][t]["mean"] - summary[m]["tasks"][t]["std"]
        for m in methods
        for t in tasks
    )
    ax.set_ylim(max(0.0, lo - 3.0), 100.0)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    if has_dm:
        ax = axes[0, 1]
        dm = [summary[m]["delta_m"] for m in methods]
        ax.bar(
            range(len(methods)),
            [d["mean"] if d else 0.0 for d in dm],
            yerr=[d["std"] if d else 0.0 for d in dm],
            capsize=3,
            color="tab:gray",
        )
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(methods)), methods, rotation=30, ha="right")
        ax.set_ylabel("Δm% (higher is better)")
        ax.set_title("Δm% vs baseline")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plot_weights(monitor: dict, tasks: list[str], title: str) -> bytes:
    """The task weights over training (the result's ``"monitor"`` series) as PNG bytes: one panel
    per aggregation (F-MTL: the loss set and the flat set), one line per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = {k: v for k, v in monitor["aggregations"].items() if v.get("weights") is not None}
    fig, axes = plt.subplots(
        1, max(1, len(panels)), figsize=(5.5 * max(1, len(panels)), 3.6), squeeze=False
    )
    steps = monitor["steps"]
    for ax, (name, series) in zip(axes[0], panels.items()):
        rows = series["weights"]
        for k, task in enumerate(tasks):
            values = [float("nan") if r[k] is None else r[k] for r in rows]
            ax.plot(steps, values, label=task, linewidth=1.2)
        ax.set_xlabel("step")
        ax.set_ylabel("task weight")
        ax.set_title(f"{title}: {name} weights")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def _plot_entry(json_path: str, png_path: str) -> str:
    """The plot's path as the compare JSON records it: relative to the JSON's folder."""
    return os.path.relpath(png_path, os.path.dirname(json_path))


def _same_compare(path: str, configs: dict[str, dict], seeds: list[int], plot: str) -> bool:
    """``path`` is a compare JSON of these methods, configurations, seeds and plot path."""
    res = _read_json(path)
    return (
        isinstance(res, dict)
        and res.get("format") == COMPARE_FORMAT
        and res.get("configs") == configs
        and res.get("seeds") == seeds
        and res.get("plot") == plot
    )


@dataclasses.dataclass
class ComparePlan:
    """What ``compare`` will run: the listed methods, the seeds, one configuration per method
    (the LS baseline first when it is trained without being listed) and the Δm baseline (a method
    of the plan, or a fixed :class:`Baseline`, or neither)."""

    methods: list[str]
    seeds: list[int]
    configs: dict[str, T.TrainConfig]
    base_method: str | None
    spec: Baseline | None


def compare_plan(args: argparse.Namespace) -> ComparePlan:
    """The runs of ``compare`` from its parsed arguments, every option checked."""
    listed = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not listed:
        raise UsageError("--methods: give at least one method")
    parsed = {T.method_name(*T.parse_method(m)): T.parse_method(m) for m in listed}
    if len(parsed) != len(listed):
        raise UsageError("--methods: a method is listed twice")
    methods = list(parsed)
    seeds = _seeds(args.seeds)
    explicit = _explicit(args)
    cfgs = {
        m: T.TrainConfig(**{**explicit, "optimizer": o, "weighting": w})
        for m, (o, w) in parsed.items()
    }
    for cfg in cfgs.values():
        T.validate(cfg)
    _check_applicable(explicit, list(cfgs.values()))
    raw = args.baseline or "ls"
    base_method, spec = None, None
    if raw == "single":
        raise UsageError(
            "compare: --baseline single is not supported; use a method name, numbers or a file"
        )
    try:
        named = T.method_name(*T.parse_method(raw))
    except UsageError:
        named = None
    if named in methods:
        base_method = named
    elif raw == "ls":
        base_method = "ls"
        cfgs = {"ls": _ls_config(next(iter(cfgs.values()))), **cfgs}
    else:
        spec = Baseline.parse(raw)
    return ComparePlan(methods, seeds, cfgs, base_method, spec)


def cmd_compare(args: argparse.Namespace) -> int:
    todo = compare_plan(args)
    methods, seeds, cfgs = todo.methods, todo.seeds, todo.configs
    base_method, spec, raw = todo.base_method, todo.spec, args.baseline or "ls"
    first = next(iter(cfgs.values()))
    mode, log = _progress_mode(args), _log(args)
    _require_extras(list(cfgs.values()), mode, plot="the compare plot")

    configs = {m: c.to_dict() for m, c in cfgs.items()}
    json_path = args.output or _default_compare_output(first, methods, seeds)
    png_path = args.plot or os.path.splitext(json_path)[0] + ".png"
    plan = files.OutputPlan(
        overwrite=args.overwrite,
        inputs=[(spec.spec if spec is not None and spec.kind == "file" else None, "--baseline")],
        warn=_warn,
    )

    def same(_: str) -> bool:  # the JSON (and so its plot) of an earlier run of this compare
        return _same_compare(out_json, configs, seeds, _plot_entry(out_json, out_png))

    out_json = plan.add(json_path, "--output", same_run=same)
    out_png = plan.add(png_path, "--plot", same_run=same)
    with plan:
        data = T.build_data(first, progress=mode == "bar")
        tasks = data.task_names
        if spec is not None:
            spec.check_tasks(tasks)
        runs: dict[str, list[dict]] = {m: [] for m in cfgs}
        t0 = time.perf_counter()
        total = len(cfgs) * len(seeds)
        i = 0
        for m, cfg in cfgs.items():
            for seed in seeds:
                i += 1
                c = T.TrainConfig(**{**cfg.to_dict(), "seed": seed})
                res = T.train(c, data, progress=mode, desc=f"[{i}/{total}] {m} seed {seed}")
                log(
                    f"[{i}/{total}] {m} seed {seed}: "
                    + ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in res["test"]["tasks"].items())
                    + f" ({res['train_time_s']:.1f} s)"
                )
                res.pop("history", None)
                res.pop("monitor", None)  # the per-step series belong to `train`'s results
                runs[m].append(res)
        if base_method is not None:
            base_acc = [
                statistics.fmean(T.accuracies(r["test"])[k] for r in runs[base_method])
                for k in range(len(tasks))
            ]
        elif spec is not None and spec.kind in ("given", "file"):
            base_acc = spec.fixed(tasks)
        else:
            base_acc = None
        summary: dict[str, Any] = {}
        for m, rs in runs.items():
            accs = [T.accuracies(r["test"]) for r in rs]
            dms = [T.delta_m(a, base_acc) for a in accs] if base_acc else None
            ms = {k: _mean_std([a[j] for a in accs]) for j, k in enumerate(tasks)}
            summary[m] = {
                "tasks": {k: {"mean": v[0], "std": v[1]} for k, v in ms.items()},
                "mean_accuracy": dict(
                    zip(("mean", "std"), _mean_std([r["test"]["mean_accuracy"] for r in rs]))
                ),
                "delta_m": dict(zip(("mean", "std"), _mean_std(dms))) if dms else None,
                "step_time_ms": statistics.fmean(r["step_time_ms"] for r in rs),
                "step_cpu_ms": statistics.fmean(r["step_cpu_ms"] for r in rs),
                "train_time_s": statistics.fmean(r["train_time_s"] for r in rs),
            }
        result = {
            "format": COMPARE_FORMAT,
            "methods": list(cfgs),
            "seeds": seeds,
            "configs": configs,
            "plot": _plot_entry(out_json, out_png),
            "baseline": {"method": base_method, "spec": raw, "accuracy": base_acc},
            "tasks": tasks,
            "dataset": runs[methods[0]][0]["dataset"],
            "summary": summary,
            "total_time_s": time.perf_counter() - t0,
            "runs": runs,
        }
        title = data.name + (
            f", {first.noise_rate:.0%} label noise on task {data.info.get('noise_task')}"
            if first.noise_rate
            else ""
        )
        written_json = plan.write(out_json, T.result_json(result))
        written_png = plan.write(out_png, _plot(summary, tasks, title))
    print(format_compare(result))
    print(f"total {result['total_time_s']:.0f} s; results written to {written_json}")
    print(f"plot written to {written_png}")
    return 0


# --------------------------------------------------------------------------------------------
# demo


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.batch_size < 2:
        raise UsageError("--batch-size must be at least 2 (the model's BatchNorm layers)")
    if not 0 <= args.seed <= T.MAX_SEED:
        raise UsageError(f"--seed must be an integer in [0, 2**64 - 1], got {args.seed}")
    _require_extras([T.TrainConfig()], "off", plot=None)
    if args.backend:
        T.check_backend(args.backend, T.resolve_device("cpu"))
    return run_demo(
        batch_size=args.batch_size, repeats=args.repeats, backend=args.backend, seed=args.seed
    )


# --------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="mtlsam-fast",
        description="Fast sharpness-aware multi-task optimization: "
        "train and compare F-MTL, SAMO and gradient-aggregation methods.",
    )
    sub = p.add_subparsers(
        dest="command",
        metavar="COMMAND",
        parser_class=_Parser,
        help="train, compare or demo (mtlsam-fast COMMAND --help for its options)",
    )
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train one multi-task model (default: F-MGDA on MultiDigits)",
        description="Train one multi-task model and report per-task test accuracy and Δm%%.",
    )
    _add_config_args(t, single_run=True)
    t.add_argument(
        "--baseline",
        default="ls",
        help="Δm%% baseline: ls (train plain LS with the same settings, before the run), single "
        "(single-task models), none, comma-separated accuracies in (0, 100], or a result JSON "
        "(default: ls)",
    )
    t.add_argument(
        "--output",
        "-o",
        help="result JSON path, or 'none' (default: runs/DATA-METHOD-seedN.json, DATA being the "
        "data set with its -noiseR / -lowresN variant)",
    )
    t.add_argument(
        "--plot-weights",
        metavar="PATH",
        help="also write a PNG plot of the task weights over training (one panel per "
        "aggregation: F-MTL's loss and flat sets, SAMO's perturbed set); checked before training "
        "like the other outputs",
    )
    t.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="write a resumable checkpoint here (at the start, every --checkpoint-every steps, "
        "at the end, and when stopped by a signal)",
    )
    t.add_argument(
        "--nproc",
        type=_positive_int,
        metavar="N",
        help="train data-parallel in N local processes (torch.distributed.run; gloo on CPU, one "
        "GPU each on CUDA); each takes 1/N of every batch. Under torchrun, leave it out",
    )
    t.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="N",
        help="checkpoint every N steps (default: at every evaluation, and at the end)",
    )
    t.add_argument(
        "--resume",
        metavar="PATH",
        help="resume the run stored in this checkpoint (its configuration is used; --steps, "
        "--epochs and --eval-every may change; checkpoints go on to PATH unless --checkpoint "
        "says otherwise; a Δm baseline stored in it is not trained again)",
    )
    t.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "compare",
        help="several methods over several seeds: mean ± std, Δm%%, PNG plot",
        description="Run several methods over several training seeds on the same data; print "
        "mean ± std per task and Δm%%; save a JSON and a PNG plot.",
    )
    c.add_argument(
        "--methods",
        default="ls,fmtl-ls,mgda,fmtl-mgda,samo-mgda",
        help="comma-separated methods (default: ls,fmtl-ls,mgda,fmtl-mgda,samo-mgda)",
    )
    c.add_argument(
        "--seeds",
        default="0,1,2",
        help="comma-separated training seeds, each 0 to 2**64-1 (default: 0,1,2)",
    )
    _add_config_args(c, single_run=False)
    c.add_argument(
        "--baseline",
        help="Δm%% baseline: a method of --methods (default: ls, trained if not listed), "
        "none, comma-separated accuracies in (0, 100], or a result JSON",
    )
    c.add_argument(
        "--output",
        "-o",
        help="JSON path (default: runs/compare-DATA-METHOD1+METHOD2+...-seedsA-B-C.json)",
    )
    c.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser(
        "demo",
        help="every weighting on real per-task gradients of a small model: weights, timings",
        description="Every weighting on the per-task gradients of one MultiDigits batch: its "
        "weights, the cosine of the combined direction with each task gradient, its time.",
    )
    d.add_argument(
        "--batch-size",
        type=_positive_int,
        default=256,
        help="examples in the batch, at least 2 (default: 256)",
    )
    d.add_argument(
        "--repeats", type=_positive_int, default=20, help="timed calls per weighting (default: 20)"
    )
    d.add_argument("--backend", help="ops backend: auto | torch | cpu | triton (default: auto)")
    d.add_argument(
        "--seed", type=int, default=0, help="seed of the data and the model (default: 0)"
    )
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help (0) or an argparse usage error (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc > 1 and not launch.launched():
        return launch.launch(nproc, sys.argv[1:] if argv is None else argv)
    import torch

    def error(msg: object) -> int:
        text = " ".join(str(msg).split())  # one line, whatever the message holds
        print(f"mtlsam-fast {args.command}: error: {text}", file=sys.stderr)
        return EXIT_USAGE

    threads = torch.get_num_threads()
    try:
        with StopSignals() as signals:
            args.signals = signals
            if getattr(args, "threads", None):
                torch.set_num_threads(_threads(args.threads))
            return args.func(args)
    except (UsageError, DataError) as e:
        return error(e)
    except MemoryError:
        return error("out of memory; use a smaller --n-train, --batch-size or --width")
    except T.TrainingStopped as e:
        signum = signals.received or signal.SIGINT
        where = (
            f"the checkpoint {e.checkpoint} holds it: continue with "
            f"mtlsam-fast train --resume {e.checkpoint}"
            if e.checkpoint
            else "no checkpoint (give --checkpoint to make a run resumable)"
        )
        print(
            f"mtlsam-fast {args.command}: stopped by {signal.Signals(signum).name} at step "
            f"{e.step} of {e.steps}; no result written; {where}",
            file=sys.stderr,
        )
        return 128 + signum
    except KeyboardInterrupt as e:
        signum = getattr(e, "signum", signal.SIGINT)
        print(
            f"mtlsam-fast {args.command}: interrupted by {signal.Signals(signum).name}; "
            "no result written",
            file=sys.stderr,
        )
        return 128 + signum
    except BrokenPipeError:  # stdout closed early (`| head`): the files are already written
        with contextlib.suppress(Exception):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
