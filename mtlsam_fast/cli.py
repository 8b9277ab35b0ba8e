"""``mtlsam-fast``: train, compare and demo commands (also ``python -m mtlsam_fast``).

    mtlsam-fast train                               # F-MGDA on the built-in MultiDigits, Δm% vs LS
    mtlsam-fast train --method samo-mgda --noise-rate 0.4 --seed 1 --output run.json
    mtlsam-fast train --dataset multimnist --data-dir ~/data/mnist --checkpoint ck.pt
    mtlsam-fast train --resume ck.pt                # continues the run stored in ck.pt
    mtlsam-fast compare --methods ls,fmtl-ls,mgda,fmtl-mgda,samo-mgda --seeds 0,1,2 --noise-rate 0.4
    mtlsam-fast demo                                # every weighting on real per-task gradients

User errors (unknown names, missing files, unreadable checkpoints) print one line on stderr and exit
with status 2; nothing partial is left on disk.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import sys
import time
from typing import Any

from . import launch
from . import train as T
from .data import DataError

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


# --------------------------------------------------------------------------------------------
# arguments


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _key_value(s: str) -> tuple[str, Any]:
    if "=" not in s:
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
        help="number of training images (default: the data set's; MultiDigits 10000)",
    )
    g.add_argument(
        "--n-test", type=_positive_int, help="number of test images (MultiDigits default 2000)"
    )
    g.add_argument(
        "--image-size", type=_positive_int, help=f"CelebA image side (default: {d.image_size})"
    )
    g.add_argument(
        "--data-seed", type=int, help=f"seed of the data construction (default: {d.data_seed})"
    )
    g.add_argument(
        "--noise-rate",
        type=float,
        help="fraction of noisy training labels on the noise task (default: 0)",
    )
    g.add_argument(
        "--noise-task", help="task with noisy labels, 1-based number or name (default: 2)"
    )
    g.add_argument(
        "--low-resource",
        type=_positive_int,
        metavar="N",
        help="keep only N training labels of the low-resource task",
    )
    g.add_argument(
        "--low-resource-task", help="the low-resource task, 1-based number or name (default: 2)"
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
        help='option for the weighting constructor (repeatable), e.g. normalization="l2"',
    )
    g.add_argument("--rho", type=float, help=f"perturbation radius (default: {d.rho})")
    g.add_argument("--rho-head", type=float, help="perturbation radius of the heads (default: rho)")
    g.add_argument(
        "--adaptive", action="store_const", const=True, help="ASAM-style adaptive perturbation"
    )
    g.add_argument("--alpha", type=float, help=f"SAMO: global/local mix (default: {d.alpha})")
    g.add_argument("--zo-eps", type=float, help=f"SAMO: zeroth-order step (default: {d.zo_eps})")
    g.add_argument("--base-optimizer", help=f"adam | adamw | sgd (default: {d.base_optimizer})")
    g.add_argument("--lr", type=float, help=f"learning rate (default: {d.lr})")
    g.add_argument("--momentum", type=float, help=f"SGD momentum (default: {d.momentum})")
    g.add_argument("--weight-decay", type=float, help="weight decay (default: 0)")
    g.add_argument("--batch-size", type=_positive_int, help=f"(default: {d.batch_size})")
    g.add_argument("--epochs", type=float, help=f"training epochs (default: {d.epochs:g})")
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
            help=f"training seed: initialization, batches, SAMO noise (default: {d.seed})",
        )
    g.add_argument("--backend", help=f"auto | torch | cpu | triton | cuda (default: {d.backend})")
    g.add_argument("--device", help="auto | cpu | cuda (default: auto)")
    g.add_argument(
        "--threads",
        type=_positive_int,
        default=1,
        help="CPU threads for torch (default: 1; these models are too small for intra-op "
        "parallelism to pay, and more threads than free cores slow it down many times; raise it "
        "for CelebA)",
    )
    g.add_argument("--quiet", "-q", action="store_true", help="no progress bars")


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
            raise T.UsageError("give either --method or --optimizer/--weighting, not both")
        out["optimizer"], out["weighting"] = T.parse_method(method)
    else:
        if opt is not None:
            if opt not in T.OPTIMIZERS:
                raise T.UsageError(
                    f"unknown optimizer {opt!r}; available: {', '.join(T.OPTIMIZERS)}"
                )
            out["optimizer"] = opt
        if w is not None:
            T.check_weighting(w)
            out["weighting"] = w
    return out


def _progress(args: argparse.Namespace) -> bool:
    return not args.quiet and sys.stderr.isatty()


def _log(args: argparse.Namespace):
    return (lambda s: None) if args.quiet else (lambda s: print(s, file=sys.stderr, flush=True))


# --------------------------------------------------------------------------------------------
# baselines


def _parse_numbers(s: str) -> list[float] | None:
    try:
        return [float(v) for v in s.split(",")]
    except ValueError:
        return None


def _baseline_from_file(path: str, tasks: list[str]) -> list[float]:
    try:
        with open(path, encoding="utf-8") as f:
            res = json.load(f)
        acc = {t: v["accuracy"] for t, v in res["test"]["tasks"].items()}
    except FileNotFoundError:
        raise T.UsageError(f"baseline file {path!r} not found") from None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise T.UsageError(
            f"baseline file {path!r} is not an mtlsam-fast result JSON ({type(e).__name__}: {e})"
        ) from None
    if sorted(acc) != sorted(tasks):
        raise T.UsageError(
            f"baseline file {path!r} has tasks {sorted(acc)}, this run has {sorted(tasks)}"
        )
    return [acc[t] for t in tasks]


def _check_baseline_spec(spec: str) -> None:
    if spec in ("none", "ls", "single") or _parse_numbers(spec) is not None:
        return
    if not os.path.isfile(spec):
        raise T.UsageError(
            "--baseline: expected none, ls, single, comma-separated accuracies or a result JSON "
            f"file; {spec!r} is none of these (file not found)"
        )


def _compute_baseline(
    spec: str, cfg: T.TrainConfig, data, result: dict | None, args
) -> tuple[str, list[float]] | None:
    """(label, per-task baseline accuracies) or None."""
    if spec == "none":
        return None
    nums = _parse_numbers(spec)
    if nums is not None:
        return "given", nums
    if spec == "ls":
        if result is not None and cfg.optimizer == "plain" and cfg.weighting == "ls":
            return "ls", T.accuracies(result["test"])
        base = T.TrainConfig(
            **{**cfg.to_dict(), "optimizer": "plain", "weighting": "ls", "weighting_options": {}}
        )
        _log(args)("training the LS baseline (plain aggregation, ls weighting, same data and seed)")
        res = T.train(base, data, progress=_progress(args), desc="baseline ls")
        return "ls", T.accuracies(res["test"])
    if spec == "single":
        base = T.TrainConfig(
            **{**cfg.to_dict(), "optimizer": "plain", "weighting": "ls", "weighting_options": {}}
        )
        accs = []
        for k, name in enumerate(data.task_names):
            _log(args)(f"training the single-task baseline for task {name!r}")
            res = T.train(
                base, T.single_task_data(data, k), progress=_progress(args), desc=f"single {name}"
            )
            accs.append(T.accuracies(res["test"])[0])
        return "single-task", accs
    return f"file {spec}", _baseline_from_file(spec, data.task_names)


# --------------------------------------------------------------------------------------------
# commands


def _default_output(cfg: T.TrainConfig) -> str:
    return os.path.join("runs", f"{cfg.dataset.replace('+', '_')}-{cfg.method}-seed{cfg.seed}.json")


def _print_result(res: dict, baseline: tuple[str, list[float]] | None) -> None:
    ds = res["dataset"]
    print(ds["summary"])
    env = res["environment"]
    print(
        f"method {res['method']}: {res['steps']} steps, {res['train_time_s']:.1f} s training "
        f"({res['step_time_ms']:.1f} ms/step wall, {res['step_cpu_ms']:.1f} ms/step CPU), "
        f"device {env['device']}, backend {env['backend']}, seed {res['config']['seed']}"
    )
    tasks = res["test"]["tasks"]
    width = max(8, *(len(t) for t in tasks))
    header = f"{'task':<{width}}  {'test acc %':>10}  {'test loss':>9}"
    if baseline:
        header += f"  {'baseline %':>10}"
    print(header)
    for i, (t, v) in enumerate(tasks.items()):
        line = f"{t:<{width}}  {v['accuracy']:>10.2f}  {v['loss']:>9.4f}"
        if baseline:
            line += f"  {baseline[1][i]:>10.2f}"
        print(line)
    print(
        f"{'mean':<{width}}  {res['test']['mean_accuracy']:>10.2f}  "
        f"(mean error {res['test']['mean_error']:.2f} %)"
    )
    if res.get("delta_m") is not None:
        assert baseline is not None  # cmd_train sets delta_m only when it computed a baseline
        print(f"Δm% vs {baseline[0]} baseline: {res['delta_m']:+.2f}")


def cmd_train(args: argparse.Namespace) -> int:
    if launch.launched() and args.nproc is not None and args.nproc != launch.world_size():
        raise T.UsageError(
            f"--nproc {args.nproc} but the launcher started {launch.world_size()} processes"
        )
    main_process = launch.rank() == 0  # the others train silently and write nothing
    if not main_process:
        args.quiet = True
    explicit = _explicit(args)
    resume = None
    if args.resume:
        resume = T.load_checkpoint(args.resume)
        cfg = T.TrainConfig.from_dict(dict(resume["config"]))
        cfg = T.TrainConfig(**{**cfg.to_dict(), **explicit})
    else:
        cfg = T.TrainConfig(**explicit)
    T.validate(cfg)
    _check_baseline_spec(args.baseline)
    nums = _parse_numbers(args.baseline)
    log = _log(args)
    data = T.build_data(cfg, progress=_progress(args))
    if nums is not None and len(nums) != data.num_tasks:
        raise T.UsageError(
            f"--baseline gives {len(nums)} values but {data.name} has {data.num_tasks} tasks"
        )
    log(data.summary())
    output = None if args.output == "none" else (args.output or _default_output(cfg))
    checkpoint = (
        args.checkpoint or args.resume
    )  # a resumed run keeps checkpointing to its file by default
    res = T.train(
        cfg,
        data,
        checkpoint=checkpoint,
        checkpoint_every=args.checkpoint_every,
        resume=resume,
        progress=_progress(args),
        log=log,
    )
    baseline = _compute_baseline(args.baseline, cfg, data, res, args)
    if baseline is not None:
        res["baseline"] = {"kind": baseline[0], "accuracy": dict(zip(data.task_names, baseline[1]))}
        res["delta_m"] = T.delta_m(T.accuracies(res["test"]), baseline[1])
    else:
        res["baseline"], res["delta_m"] = None, None
    if not main_process:
        return 0
    _print_result(res, baseline)
    if output:
        T.write_json(output, res)
        print(f"result written to {output}")
    if checkpoint:
        print(f"checkpoint written to {checkpoint}")
    return 0


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _plot(path: str, summary: dict, tasks: list[str], title: str) -> None:
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
    T.atomic_write(path, lambda f: f.write(buf.getvalue()))


def cmd_compare(args: argparse.Namespace) -> int:
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods:
        raise T.UsageError("--methods: give at least one method")
    if len(set(methods)) != len(methods):
        raise T.UsageError("--methods: a method is listed twice")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise T.UsageError(
            f"--seeds: expected comma-separated integers, got {args.seeds!r}"
        ) from None
    if not seeds:
        raise T.UsageError("--seeds: give at least one seed")
    explicit = _explicit(args)
    parsed = {m: T.parse_method(m) for m in methods}
    cfgs = {
        m: T.TrainConfig(**{**explicit, "optimizer": o, "weighting": w})
        for m, (o, w) in parsed.items()
    }
    for cfg in cfgs.values():
        T.validate(cfg)
    spec = args.baseline or "ls"
    if spec in methods:
        base_method = spec
    elif spec == "ls" and "ls" not in methods:
        base_method = "ls"
        cfgs = {
            "ls": T.TrainConfig(**{**explicit, "optimizer": "plain", "weighting": "ls"}),
            **cfgs,
        }
    else:
        base_method = None
        if spec != "none":
            if spec == "single":
                raise T.UsageError(
                    "compare: --baseline single is not supported; "
                    "use a method name, numbers or a file"
                )
            _check_baseline_spec(spec)
    first = next(iter(cfgs.values()))
    stem = f"compare-{first.dataset.replace('+', '_')}" + (
        f"-noise{first.noise_rate:g}" if first.noise_rate else ""
    )
    out_json = args.output or os.path.join("runs", stem + ".json")
    out_png = args.plot or os.path.splitext(out_json)[0] + ".png"
    log = _log(args)
    data = T.build_data(first, progress=_progress(args))
    log(data.summary())
    fixed = None
    if base_method is None and spec != "none":
        nums = _parse_numbers(spec)
        fixed = nums if nums is not None else _baseline_from_file(spec, data.task_names)
        if len(fixed) != data.num_tasks:
            raise T.UsageError(
                f"--baseline gives {len(fixed)} values but {data.name} has {data.num_tasks} tasks"
            )

    runs: dict[str, list[dict]] = {m: [] for m in cfgs}
    t0 = time.perf_counter()
    total = len(cfgs) * len(seeds)
    i = 0
    for m, cfg in cfgs.items():
        for seed in seeds:
            i += 1
            c = T.TrainConfig(**{**cfg.to_dict(), "seed": seed})
            res = T.train(c, data, progress=_progress(args), desc=f"[{i}/{total}] {m} seed {seed}")
            log(
                f"[{i}/{total}] {m} seed {seed}: "
                + ", ".join(f"{t} {v['accuracy']:.2f}" for t, v in res["test"]["tasks"].items())
                + f" ({res['train_time_s']:.1f} s)"
            )
            res.pop("history", None)
            runs[m].append(res)
    tasks = data.task_names
    if base_method is not None:
        base_runs = runs[base_method]
        base_acc = [
            statistics.fmean(T.accuracies(r["test"])[k] for r in base_runs)
            for k in range(len(tasks))
        ]
        base_label = f"{base_method} (mean over seeds)"
    elif fixed is not None:
        base_acc, base_label = fixed, f"given {spec}"
    else:
        base_acc, base_label = None, None
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
    # table
    print(data.summary())
    print(
        f"seeds {','.join(map(str, seeds))}; {runs[methods[0]][0]['steps']} steps each; "
        f"Δm% vs {base_label or 'no baseline'}; total {time.perf_counter() - t0:.0f} s"
    )
    cols = [*tasks[:6], "mean acc"]
    name_w = max(8, *(len(m) for m in summary))
    print(
        f"{'method':<{name_w}}  "
        + "  ".join(f"{c[:14]:>14}" for c in cols)
        + f"  {'Δm%':>14}  {'ms/step':>8}  {'cpu ms/step':>11}"
    )
    for m, s in summary.items():
        cells = [f"{s['tasks'][t]['mean']:6.2f} ± {s['tasks'][t]['std']:4.2f}" for t in tasks[:6]]
        cells.append(f"{s['mean_accuracy']['mean']:6.2f} ± {s['mean_accuracy']['std']:4.2f}")
        dm = s["delta_m"]
        cells.append(f"{dm['mean']:+6.2f} ± {dm['std']:4.2f}" if dm else f"{'-':>14}")
        print(
            f"{m:<{name_w}}  "
            + "  ".join(f"{c:>14}" for c in cells)
            + f"  {s['step_time_ms']:8.1f}  {s['step_cpu_ms']:11.1f}"
        )
    result = {
        "format": "mtlsam_fast.compare/1",
        "methods": list(cfgs),
        "seeds": seeds,
        "baseline": {"method": base_method, "spec": spec, "accuracy": base_acc},
        "tasks": tasks,
        "dataset": runs[methods[0]][0]["dataset"],
        "summary": summary,
        "runs": runs,
    }
    _plot(
        out_png,
        summary,
        tasks,
        f"{data.name}"
        + (
            f", {first.noise_rate:.0%} label noise on task {data.info.get('noise_task')}"
            if first.noise_rate
            else ""
        ),
    )
    T.write_json(out_json, result)
    print(f"results written to {out_json}; plot {out_png}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    if args.backend:
        T.check_backend(args.backend, T.resolve_device("cpu"))
    return run_demo(
        batch_size=args.batch_size, repeats=args.repeats, backend=args.backend, seed=args.seed
    )


# --------------------------------------------------------------------------------------------
# parser and entry point


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mtlsam-fast",
        description="Fast sharpness-aware multi-task optimization: "
        "train and compare F-MTL, SAMO and gradient-aggregation methods.",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    t = sub.add_parser(
        "train",
        help="train one multi-task model (default: F-MGDA on MultiDigits)",
        description="Train one multi-task model and report per-task test accuracy and Δm%.",
    )
    _add_config_args(t, single_run=True)
    t.add_argument(
        "--baseline",
        default="ls",
        help="Δm%% baseline: ls (train plain LS with the same settings), single (single-task "
        "models), none, comma-separated accuracies, or a result JSON (default: ls)",
    )
    t.add_argument(
        "--output",
        "-o",
        help="result JSON path, or 'none' (default: runs/DATASET-METHOD-seedN.json)",
    )
    t.add_argument(
        "--nproc",
        type=_positive_int,
        metavar="N",
        help="train data-parallel in N local processes (torch.distributed.run; gloo on CPU, one "
        "GPU each on CUDA); each takes 1/N of every batch. Under torchrun, leave it out",
    )
    t.add_argument("--checkpoint", metavar="PATH", help="write a resumable checkpoint here")
    t.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        metavar="N",
        help="checkpoint every N steps (default: at every evaluation, and at the end)",
    )
    t.add_argument(
        "--resume",
        metavar="PATH",
        help="resume the run stored in this checkpoint (its configuration is "
        "used; --steps/--epochs may extend it; checkpoints go on to PATH "
        "unless --checkpoint says otherwise)",
    )
    t.set_defaults(func=cmd_train)

    c = sub.add_parser(
        "compare",
        help="several methods over several seeds: mean ± std, Δm%%, PNG plot",
        description="Run several methods over several training seeds on the same data; print "
        "mean ± std per task and Δm%; save a JSON and a PNG plot.",
    )
    c.add_argument(
        "--methods",
        default="ls,fmtl-ls,mgda,fmtl-mgda,samo-mgda",
        help="comma-separated methods (default: ls,fmtl-ls,mgda,fmtl-mgda,samo-mgda)",
    )
    c.add_argument(
        "--seeds", default="0,1,2", help="comma-separated training seeds (default: 0,1,2)"
    )
    _add_config_args(c, single_run=False)
    c.add_argument(
        "--baseline",
        help="Δm%% baseline: a method of --methods (default: ls, trained if not listed), "
        "none, comma-separated accuracies, or a result JSON",
    )
    c.add_argument("--output", "-o", help="JSON path (default: runs/compare-DATASET[-noiseR].json)")
    c.add_argument("--plot", help="PNG path (default: the JSON path with .png)")
    c.set_defaults(func=cmd_compare)

    d = sub.add_parser(
        "demo", help="every weighting on real per-task gradients of a small model: weights, timings"
    )
    d.add_argument("--batch-size", type=_positive_int, default=256)
    d.add_argument(
        "--repeats", type=_positive_int, default=20, help="timed calls per weighting (default: 20)"
    )
    d.add_argument("--backend", help="ops backend (default: auto)")
    d.add_argument("--seed", type=int, default=0)
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

    threads = torch.get_num_threads()
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (T.UsageError, DataError) as e:
        print(f"mtlsam-fast {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print(f"mtlsam-fast {args.command}: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        torch.set_num_threads(threads)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
