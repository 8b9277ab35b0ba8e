"""Peers' own methods against ours through the adapters: one training step, same model, same run.

``python -m bench integrations [--K 3,16] [--rounds 7] [--steps 3] [--threads 1] [--methods M,..]
[--out DIR] [--name STEM]``

* torchjd (``mtlsam_fast.integrations.torchjd``): a step is the forward pass, ``mtl_backward``,
  ``jac_to_grad`` and an SGD step. Three implementations: ``torchjd`` (its aggregator and its
  ``jac_to_grad``), ``ours`` (our aggregator through torchjd's ``jac_to_grad``: the one-line
  import switch) and ``ours+jac`` (ours with our ``jac_to_grad``, which never concatenates the
  Jacobians).
* LibMTL 1.1.5 (``mtlsam_fast.integrations.libmtl``): a step is what its ``Trainer`` does per
  batch -- forward pass, task losses, ``zero_grad``, ``model.backward(losses, **weight_args)``,
  SGD step -- with LibMTL's weighting class and with ours (same name). K = 3 only: LibMTL's CAGrad
  objective is written for three tasks. LibMTL runs with the two shims of
  :mod:`bench.peers` (``torchvision.models.utils``, in-place ``zero_grad``).
* torchjd's scalarizers: a step is the forward pass, ``scalarizer(losses).backward()`` and an SGD
  step (FAMO: and its ``update`` on the same batch), with torchjd's scalarizer and ours.
* ``weights``: the weighting alone on a K x K Gramian (torchjd's ``<Name>Weighting`` and ours),
  where the solvers' cost shows without the model around it.
* ``conflicts``: UPGrad on badly scaled Jacobians (row norms over 7 decades), torchjd's default
  (``reg_eps = 1e-4``) and ours (exact): the smallest cosine between a task gradient and the
  update, negative where the update conflicts with that task.

Every implementation trains its own copy of the same model on the same batches; they take turns
within every round (``--steps`` steps each), so a slow phase of a shared machine hits all of them.
Reported: the median over rounds of the time per step, with the quartiles in the JSON. Writes
``STEM.json`` and ``STEM.md`` (the tables; ``--name``, default ``integrations``) to ``--out``;
``--render DIR`` re-writes the tables from ``DIR/STEM.json`` without measuring.
"""

from __future__ import annotations

import argparse
import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .common import CPU_OUT, Timing, machine_info

Tensor = torch.Tensor

TORCHJD_METHODS: dict[str, Callable[[int], dict[str, Any]]] = {
    "UPGrad": lambda K: {},
    "DualProj": lambda K: {},
    "MGDA": lambda K: {},
    "CAGrad": lambda K: {"c": 0.5},
    "IMTLG": lambda K: {},
    "AlignedMTL": lambda K: {},
    "PCGrad": lambda K: {},
    "GradVac": lambda K: {},
    "FairGrad": lambda K: {"alpha": 1.0},
    "NashMTL": lambda K: {"n_tasks": K},
    "Mean": lambda K: {},
    "Random": lambda K: {},
    "Krum": lambda K: {"n_byzantine": 0},
    "PCD": lambda K: {},
    "ConFIG": lambda K: {},
    "ExcessMTL": lambda K: {},
    "GradDrop": lambda K: {},
    "TrimmedMean": lambda K: {"trim_number": 1},
}
#: torchjd's methods that are a Gramian weighting only (no aggregator)
WEIGHTING_ONLY: dict[str, Callable[[int], dict[str, Any]]] = {
    "SDMGrad": lambda K: {},
    "MoDo": lambda K: {},
}
#: torchjd's loss scalarizers
SCALARIZERS: dict[str, Callable[[int], dict[str, Any]]] = {
    "UW": lambda K: {"shape": K},
    "IMTLL": lambda K: {"shape": K},
    "DWA": lambda K: {},
    "FAMO": lambda K: {"shape": K},
    "GeometricMean": lambda K: {},
    "STCH": lambda K: {"mu": 0.5},
    "COSMOS": lambda K: {"lambda_": 1.0, "weights": torch.full((K,), 1.0 / K)},
    "PBI": lambda K: {"theta": 5.0, "weights": torch.full((K,), 1.0 / K)},
}
LIBMTL_METHODS: dict[str, dict[str, Any]] = {
    "EW": {},
    "MGDA": {"mgda_gn": "none"},
    "PCGrad": {},
    "GradVac": {"beta": 0.5},
    "IMTL": {},
    "CAGrad": {"calpha": 0.5, "rescale": 1},
    "RLW": {"dist": "Normal"},
    "GradNorm": {"alpha": 1.5},
    "UW": {},
    "DWA": {"T": 2.0},
    "GLS": {},
}
#: the methods with a torchjd Gramian weighting
WEIGHT_METHODS = [
    "UPGrad",
    "DualProj",
    "MGDA",
    "CAGrad",
    "IMTLG",
    "AlignedMTL",
    "PCGrad",
    "GradVac",
    "FairGrad",
    "Mean",
    "Krum",
    "PCD",
    "SDMGrad",
    "MoDo",
]


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--K", default="3,16", help="task counts of the torchjd step (comma list)")
    ap.add_argument("--weights-K", default="16,64", help="task counts of the weights-only table")
    ap.add_argument("--width", type=int, default=512, help="hidden width of the shared MLP")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--steps", type=int, default=3, help="steps per implementation per round")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: default)")
    ap.add_argument("--methods", default=None, help="only these torchjd/LibMTL names (comma list)")
    ap.add_argument("--out", default=str(CPU_OUT), help="default runs/bench/cpu (untracked)")
    ap.add_argument(
        "--name", default="integrations", help="file stem of the results in --out (and --render)"
    )
    ap.add_argument(
        "--render", default=None, help="re-write DIR/integrations.md from DIR/integrations.json"
    )


# --------------------------------------------------------------------------- models, timing
def _trunk(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())


def _interleaved(fns: dict[str, Callable[[], None]], rounds: int, steps: int) -> dict[str, Timing]:
    """Per-step times of each function, the functions taking turns in every round."""
    import time

    for fn in fns.values():  # warm-up (solver set-up, first allocations)
        fn()
    out = {name: Timing() for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            out[name].times.append((time.perf_counter() - t0) / steps)
    return out


def _row(timings: dict[str, Timing], reference: str) -> dict[str, Any]:
    ref = timings[reference].median
    return {
        name: {
            "median_s": t.median,
            "p25_s": t.p25,
            "p75_s": t.p75,
            "speedup_vs_peer": ref / t.median,
        }
        for name, t in timings.items()
    }


# --------------------------------------------------------------------------- torchjd
def torchjd_steps(args: argparse.Namespace, K: int, methods: list[str]) -> dict[str, Any]:
    import torchjd.aggregation as tja
    from torchjd.autojac import jac_to_grad as torchjd_jac_to_grad
    from torchjd.autojac import mtl_backward

    from mtlsam_fast.integrations import torchjd as ours

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 64, generator=g)
    ys = torch.randn(K, args.batch, 1, generator=g)
    results: dict[str, Any] = {}
    for name in methods:
        options = TORCHJD_METHODS[name](K)

        def make(aggregator: Any, jac_to_grad: Callable) -> Callable[[], None]:
            torch.manual_seed(0)
            trunk = _trunk(args.width)
            heads = nn.ModuleList(nn.Linear(args.width, 1) for _ in range(K))
            opt = torch.optim.SGD([*trunk.parameters(), *heads.parameters()], lr=1e-3)

            def step() -> None:
                features = trunk(x)
                losses = [nn.functional.mse_loss(h(features), y) for h, y in zip(heads, ys)]
                mtl_backward(losses, features=features)
                jac_to_grad(trunk.parameters(), aggregator)
                opt.step()
                opt.zero_grad()

            return step

        fns = {
            "torchjd": make(getattr(tja, name)(**options), torchjd_jac_to_grad),
            "ours": make(getattr(ours, name)(**options), torchjd_jac_to_grad),
            "ours+jac": make(getattr(ours, name)(**options), ours.jac_to_grad),
        }
        results[name] = _row(_interleaved(fns, args.rounds, args.steps), "torchjd")
        print(f"torchjd K={K} {name}: " + _fmt(results[name]), flush=True)
    return results


def torchjd_weights(args: argparse.Namespace, K: int, methods: list[str]) -> dict[str, Any]:
    import torchjd.aggregation as tja

    from mtlsam_fast.integrations import torchjd as ours

    g = torch.Generator().manual_seed(1)
    J = torch.randn(K, 4 * K, generator=g)
    gram = J @ J.T
    results: dict[str, Any] = {}
    for name in methods:
        options = {**TORCHJD_METHODS, **WEIGHTING_ONLY}[name](K)
        theirs = getattr(tja, f"{name}Weighting")(**options)
        mine = getattr(ours, f"{name}Weighting")(**options)
        fns = {"torchjd": lambda w=theirs: w(gram), "ours": lambda w=mine: w(gram)}
        results[name] = _row(_interleaved(fns, args.rounds, args.steps), "torchjd")
        print(f"weights K={K} {name}: " + _fmt(results[name]), flush=True)
    return results


def scalarizer_steps(args: argparse.Namespace, K: int, methods: list[str]) -> dict[str, Any]:
    """A step on the scalarized loss: forward, ``scalarizer(losses).backward()``, SGD step (and
    FAMO's ``update`` on the same batch, as torchjd's documentation does)."""
    import torchjd.scalarization as tjs

    from mtlsam_fast.integrations import torchjd as ours

    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 64, generator=g)
    ys = torch.randn(K, args.batch, 1, generator=g)
    results: dict[str, Any] = {}
    for name in methods:
        options = SCALARIZERS[name](K)

        def make(scalarizer: Any) -> Callable[[], None]:
            torch.manual_seed(0)
            trunk = _trunk(args.width)
            heads = nn.ModuleList(nn.Linear(args.width, 1) for _ in range(K))
            params = [*trunk.parameters(), *heads.parameters(), *scalarizer.parameters()]
            opt = torch.optim.SGD(params, lr=1e-3)

            def losses() -> Tensor:
                features = trunk(x)
                return torch.stack(
                    [nn.functional.mse_loss(h(features), y) for h, y in zip(heads, ys)]
                )

            def step() -> None:
                scalarizer(losses()).backward()
                opt.step()
                opt.zero_grad()
                if name == "FAMO":
                    with torch.no_grad():
                        scalarizer.update(losses())

            return step

        fns = {
            "torchjd": make(getattr(tjs, name)(**options)),
            "ours": make(getattr(ours, name)(**options)),
        }
        results[name] = _row(_interleaved(fns, args.rounds, args.steps), "torchjd")
        print(f"scalarizer K={K} {name}: " + _fmt(results[name]), flush=True)
    return results


def conflicts() -> dict[str, Any]:
    """Smallest cos(g_i, d) of UPGrad's update on badly scaled Jacobians."""
    import torchjd.aggregation as tja

    from mtlsam_fast.integrations import torchjd as ours

    rows = []
    for seed, (K, P) in enumerate([(4, 32), (8, 64), (16, 128)]):
        g = torch.Generator().manual_seed(seed)
        J = torch.randn(K, P, dtype=torch.float64, generator=g)
        J = J * torch.logspace(-4, 3, K, dtype=torch.float64)[torch.randperm(K, generator=g), None]
        entry: dict[str, Any] = {"K": K, "P": P, "row_norms": "1e-4 .. 1e3"}
        for label, agg in (("torchjd", tja.UPGrad()), ("ours", ours.UPGrad())):
            d = agg(J)
            entry[f"min_cos_{label}"] = ((J @ d) / (J.norm(dim=1) * d.norm())).min().item()
        rows.append(entry)
    return {"upgrad": rows}


# --------------------------------------------------------------------------- LibMTL
def libmtl_steps(args: argparse.Namespace, methods: list[str]) -> dict[str, Any]:
    from . import peers

    LibMTL = peers.import_libmtl()
    architecture = peers.libmtl_hps()
    from mtlsam_fast.integrations import libmtl as ours

    K = 3
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 64, generator=g)
    ys = torch.randn(K, args.batch, 1, generator=g)
    task_names = [f"t{i}" for i in range(K)]
    width = args.width
    results: dict[str, Any] = {}
    for name in methods:
        weight_args = LIBMTL_METHODS[name]

        def make(weighting: type) -> Callable[[], None]:
            torch.manual_seed(0)
            decoders = nn.ModuleDict({t: nn.Linear(width, 1) for t in task_names})

            class Encoder(nn.Module):
                def __init__(self) -> None:
                    super().__init__()
                    self.net = _trunk(width)

                def forward(self, inputs: Tensor) -> Tensor:
                    return self.net(inputs)

            class MTLmodel(architecture, weighting):  # type: ignore[misc, valid-type]
                def __init__(self) -> None:
                    super().__init__(task_names, Encoder, decoders, False, False, x.device)
                    self.init_param()

            model = MTLmodel()
            # what LibMTL's Trainer sets: the epoch, and the epochs' average losses (DWA and
            # GradNorm read them; from epoch 2 on both weight by them)
            model.epoch = 2
            model.train_loss_buffer = np.ones((K, 3))
            opt = torch.optim.SGD(model.parameters(), lr=1e-3)

            def step() -> None:
                preds = model(x)
                losses = torch.stack(
                    [nn.functional.mse_loss(preds[t], y) for t, y in zip(task_names, ys)]
                )
                opt.zero_grad()
                model.backward(losses, **weight_args)
                opt.step()

            return step

        fns = {
            "LibMTL": make(getattr(LibMTL.weighting, name)),
            "ours": make(getattr(ours, name)),
        }
        results[name] = _row(_interleaved(fns, args.rounds, args.steps), "LibMTL")
        print(f"LibMTL K={K} {name}: " + _fmt(results[name]), flush=True)
    return results


# --------------------------------------------------------------------------- report
def _fmt(row: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v['median_s'] * 1e3:.2f} ms ({v['speedup_vs_peer']:.2f}x)" for k, v in row.items()
    )


def _ms(v: dict[str, Any]) -> str:
    ms = v["median_s"] * 1e3
    return f"{ms:.2f}" if ms >= 1 else f"{ms:.3f}"


def _peer_table(title: str, peer: str, rows: dict[str, Any]) -> list[str]:
    """A section of the report: per method the peer's median ms, ours and our speed-up."""
    lines = [f"## {title}", "", f"| method | {peer} | ours |", "|---|---:|---:|"]
    for name, row in rows.items():
        lines.append(
            f"| {name} | {_ms(row[peer])} | {_ms(row['ours'])} "
            f"({row['ours']['speedup_vs_peer']:.1f}x) |"
        )
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    meta = report["meta"]
    lines = [
        "# Peers' own implementations against ours through the adapters",
        "",
        f"`{report['command']}` -- {meta['cpu_model']}, {meta['torch_threads']} thread(s), "
        f"torch {meta['torch']}, torchjd {meta['torchjd']}, LibMTL {report['libmtl_version']}, "
        f"commit {meta['mtlsam_fast_commit'][:8]}, load average at start "
        f"{meta['loadavg_start'][0]:.1f}. Median ms per training step (speed-up against the "
        "peer's own); shared MLP "
        f"64-{report['width']}-{report['width']} ({report['shared_params']} parameters), batch "
        f"{report['batch']}.",
        "",
    ]
    for K, rows in report["torchjd"].items():
        lines += [
            f"## torchjd, K = {K}: forward, `mtl_backward`, `jac_to_grad`, SGD step",
            "",
            "| method | torchjd | ours (import switch) | ours + our `jac_to_grad` |",
            "|---|---:|---:|---:|",
        ]
        for name, row in rows.items():
            lines.append(
                f"| {name} | {_ms(row['torchjd'])} | {_ms(row['ours'])} "
                f"({row['ours']['speedup_vs_peer']:.1f}x) | {_ms(row['ours+jac'])} "
                f"({row['ours+jac']['speedup_vs_peer']:.1f}x) |"
            )
        lines.append("")
    for K, rows in report.get("scalarizers", {}).items():
        title = f"torchjd scalarizers, K = {K}: forward, `scalarizer(losses).backward()`, SGD step"
        lines += _peer_table(title, "torchjd", rows)
    if report.get("libmtl"):
        title = "LibMTL 1.1.5, K = 3: forward, losses, `zero_grad`, `model.backward`, SGD step"
        lines += _peer_table(title, "LibMTL", report["libmtl"])
    for K, rows in report["weights"].items():
        title = f"Weights alone from a {K} x {K} Gramian (torchjd's `<Name>Weighting` and ours)"
        lines += _peer_table(title, "torchjd", rows)
    lines += [
        "## UPGrad on badly scaled Jacobians: smallest cos(g_i, d) (negative: a conflict)",
        "",
        "| K x P | torchjd (reg_eps = 1e-4) | ours (exact) |",
        "|---|---:|---:|",
    ]
    for row in report["conflicts"]["upgrad"]:
        theirs, mine = row["min_cos_torchjd"], row["min_cos_ours"]
        lines.append(f"| {row['K']} x {row['P']} | {theirs:.2e} | {mine:.2e} |")
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    from importlib.metadata import version

    if args.render:
        out = Path(args.render)
        (out / f"{args.name}.md").write_text(
            markdown(json.loads((out / f"{args.name}.json").read_text()))
        )
        return 0
    warnings.filterwarnings("ignore", message="You are solving a parameterized problem")
    warnings.filterwarnings("ignore", message="Solution may be inaccurate")
    if args.threads:
        torch.set_num_threads(args.threads)
    only = set(args.methods.split(",")) if args.methods else None
    torchjd_names = [m for m in TORCHJD_METHODS if only is None or m in only]
    libmtl_names = [m for m in LIBMTL_METHODS if only is None or m in only]
    weight_names = [m for m in WEIGHT_METHODS if only is None or m in only]
    scalarizer_names = [m for m in SCALARIZERS if only is None or m in only]
    command = "python -m bench integrations " + " ".join(
        f"--{k.replace('_', '-')} {v}"
        for k, v in vars(args).items()
        if v is not None and k != "render"
    )
    report: dict[str, Any] = {
        "command": command,
        "meta": machine_info(torch.device("cpu")),
        "libmtl_version": version("LibMTL"),
        "width": args.width,
        "batch": args.batch,
        "shared_params": sum(p.numel() for p in _trunk(args.width).parameters()),
        "rounds": args.rounds,
        "steps_per_round": args.steps,
        "torchjd": {},
        "weights": {},
    }
    for K in (int(k) for k in args.K.split(",")):
        report["torchjd"][str(K)] = torchjd_steps(args, K, torchjd_names)
    report["scalarizers"] = {
        str(K): scalarizer_steps(args, K, scalarizer_names) for K in map(int, args.K.split(","))
    }
    report["libmtl"] = libmtl_steps(args, libmtl_names)
    for K in (int(k) for k in args.weights_K.split(",")):
        report["weights"][str(K)] = torchjd_weights(args, K, weight_names)
    report["conflicts"] = conflicts()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / f"{args.name}.md").write_text(markdown(report))
    print(markdown(report))
    return 0
