"""What monitoring and clipping cost per optimizer step (mtlsam_fast/optim/monitor.py).

``python bench/features_overhead.py [--width 256] [--tasks 3] [--rounds 40] [--threads 1]
[--device cpu]``

For each optimizer (MTLOptimizer, FMTL, SAMO) x weighting (MGDA's fused path, UPGrad), four
optimizers over identical copies of one model -- ``off`` (``opt.monitoring = False``, no clipping),
``monitor`` (the default: ``opt.last_step`` recorded), ``clip`` (``max_grad_norm`` and
``max_grad_norm_head`` set, monitoring off), ``both``, and ``off-again`` (a second ``off``: the
A/A control, whose ratio shows how much two identical optimizers differ) -- step in turn, the
order rotated every round, so machine noise hits every variant alike. Reported: the median step
time of each variant and its ratio to ``off``. Nothing is read on the host inside the timed step
(on CUDA the timer synchronizes after it).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

import mtlsam_fast

VARIANTS = {
    "off": dict(monitoring=False, clip=False),
    "off-again": dict(monitoring=False, clip=False),  # A/A control: the noise between instances
    "monitor": dict(monitoring=True, clip=False),
    "clip": dict(monitoring=False, clip=True),
    "both": dict(monitoring=True, clip=True),
}
OPTIMIZERS = {
    "MTLOptimizer": lambda shared, heads, **kw: mtlsam_fast.MTLOptimizer(shared, heads, **kw),
    "FMTL": lambda shared, heads, **kw: mtlsam_fast.FMTL(shared, heads, rho=0.05, **kw),
    "SAMO": lambda shared, heads, **kw: mtlsam_fast.SAMO(shared, heads, rho=0.05, **kw),
}


class Net(nn.Module):
    def __init__(self, width: int, tasks: int):
        super().__init__()
        self.trunk = nn.Sequential(
            nn.Linear(64, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU()
        )
        self.heads = nn.ModuleList([nn.Linear(width, 1) for _ in range(tasks)])

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        f = self.trunk(x)
        return [nn.functional.mse_loss(h(f).squeeze(1), y[:, k]) for k, h in enumerate(self.heads)]


def measure(args: argparse.Namespace, name: str, weighting: str) -> dict[str, float]:
    dev = torch.device(args.device)
    torch.manual_seed(0)
    net = Net(args.width, args.tasks).to(dev)
    x = torch.randn(args.batch, 64, device=dev)
    y = torch.randn(args.batch, args.tasks, device=dev)
    runs = {}
    for variant, how in VARIANTS.items():
        model = copy.deepcopy(net)
        clip = dict(max_grad_norm=1.0, max_grad_norm_head=1.0) if how["clip"] else {}
        opt = OPTIMIZERS[name](
            model.trunk.parameters(),
            [h.parameters() for h in model.heads],
            weighting=weighting,
            lr=1e-3,
            **clip,
        )
        opt.monitoring = how["monitoring"]
        runs[variant] = (model, opt)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(args.rounds + 2):  # two warm-up rounds
        for variant in order[r % len(order) :] + order[: r % len(order)]:
            model, opt = runs[variant]
            t0 = time.perf_counter()
            opt.step(lambda m=model: m.losses(x, y))
            if dev.type == "cuda":
                torch.cuda.synchronize()
            if r >= 2:
                times[variant].append(time.perf_counter() - t0)
    return {v: statistics.median(t) for v, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256, help="trunk width (P ~ width^2)")
    p.add_argument("--tasks", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=40, help="timed steps per variant")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    P = sum(q.numel() for q in Net(args.width, args.tasks).trunk.parameters())
    print(
        f"P = {P} shared parameters, K = {args.tasks}, batch {args.batch}, device {args.device}, "
        f"{torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print(f"{'optimizer':<13} {'weighting':<9} " + " ".join(f"{v:>16}" for v in VARIANTS))
    for name in OPTIMIZERS:
        for weighting in ("mgda", "upgrad"):
            t = measure(args, name, weighting)
            cells = [f"{1e3 * t[v]:7.3f} ms {t[v] / t['off']:5.3f}" for v in VARIANTS]
            print(f"{name:<13} {weighting:<9} " + " ".join(f"{c:>16}" for c in cells))


if __name__ == "__main__":
    main()
