"""Optimizer-side overhead of one F-MTL / SAMO / aggregation step on a ResNet-18-sized model.

``python bench/e2e_overhead.py [--batch 16] [--tasks 2] [--steps 3] [--weighting mgda]
[--threads N]``

The model is a CIFAR-style ResNet-18 (11.2 M shared parameters, built by hand: no torchvision) with
K linear heads on 32x32 inputs. Each step is split, by direct instrumentation, into

* forward: the time spent inside the closure (every call, clean, perturbed or zeroth-order);
* backward: the time spent inside ``torch.autograd.backward`` (every call the optimizer makes);
* base: the time inside the base optimizer's ``step`` (SGD with momentum here);
* machinery: the rest -- backups, gradient capture, Gram, weighting, combine, perturb/restore,
  norms, found-inf check, the guarded-step snapshot/rollback.

"Overhead" is everything but forward/backward (= base + machinery), as a fraction of the step.
CPU timings are synchronous, so the split is exact up to timer resolution. Times are medians over
``--steps`` steps after one warm-up step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

import mtlsam_fast


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.c1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.b1 = nn.BatchNorm2d(cout)
        self.c2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.b2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = torch.relu(self.b1(self.c1(x)))
        return torch.relu(self.b2(self.c2(out)) + self.short(x))


def resnet18_trunk() -> nn.Module:
    layers = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()]
    cin = 64
    for cout, stride in [(64, 1), (128, 2), (256, 2), (512, 2)]:
        layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
        cin = cout
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers)


class Timer:
    def __init__(self):
        self.t = 0.0

    def wrap(self, fn):
        def inner(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t += time.perf_counter() - t0

        return inner


def measure(method: str, args) -> dict:
    torch.manual_seed(0)
    trunk = resnet18_trunk()
    heads = nn.ModuleList([nn.Linear(512, 10) for _ in range(args.tasks)])
    x = torch.randn(args.batch, 3, 32, 32)
    ys = [torch.randint(0, 10, (args.batch,)) for _ in range(args.tasks)]
    P = sum(p.numel() for p in trunk.parameters())
    common = dict(
        task_params=[h.parameters() for h in heads],
        base_optimizer=torch.optim.SGD,
        weighting=args.weighting,
        lr=0.01,
        momentum=0.9,
    )
    if method == "fmtl":
        opt = mtlsam_fast.FMTL(trunk.parameters(), rho=0.05, **common)
    elif method == "samo":
        opt = mtlsam_fast.SAMO(trunk.parameters(), rho=0.05, alpha=0.5, **common)
    else:
        opt = mtlsam_fast.MTLOptimizer(trunk.parameters(), **common)

    fwd, bwd, base = Timer(), Timer(), Timer()

    def closure():
        f = trunk(x)
        return [nn.functional.cross_entropy(h(f), y) for h, y in zip(heads, ys)]

    timed_closure = fwd.wrap(closure)
    orig_backward = torch.autograd.backward
    torch.autograd.backward = bwd.wrap(orig_backward)
    opt.base_optimizer.step = base.wrap(opt.base_optimizer.step)
    rows = []
    try:
        for i in range(args.steps + 1):
            fwd.t = bwd.t = base.t = 0.0
            t0 = time.perf_counter()
            opt.step(timed_closure)
            total = time.perf_counter() - t0
            if i:  # step 0 is the warm-up
                rows.append((total, fwd.t, bwd.t, base.t))
    finally:
        torch.autograd.backward = orig_backward
    med = [statistics.median(r[j] for r in rows) for j in range(4)]
    total, f, b, bs = med
    machinery = total - f - b - bs
    return {
        "method": method,
        "P": P,
        "step_s": total,
        "fwd_s": f,
        "bwd_s": b,
        "base_s": bs,
        "machinery_s": machinery,
        "overhead_frac": (machinery + bs) / total,
        "machinery_frac": machinery / total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--tasks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--weighting", default="mgda")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--methods", default="mtl,fmtl,samo")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}, "
        f"K={args.tasks}, weighting={args.weighting}, backend={mtlsam_fast.get_backend()}, "
        f"median of {args.steps} steps"
    )
    res = {m: measure(m, args) for m in args.methods.split(",")}
    P = next(iter(res.values()))["P"]
    print(f"shared parameters P = {P:,}")
    print(
        f"{'method':8} {'step s':>8} {'fwd s':>8} {'bwd s':>8} {'base s':>8} {'mach. s':>8} "
        f"{'overhead':>9} {'machinery':>9}"
    )
    for r in res.values():
        print(
            f"{r['method']:8} {r['step_s']:8.3f} {r['fwd_s']:8.3f} {r['bwd_s']:8.3f} "
            f"{r['base_s']:8.3f} {r['machinery_s']:8.3f} {100 * r['overhead_frac']:8.1f}% "
            f"{100 * r['machinery_frac']:8.1f}%"
        )
    if "samo" in res and "fmtl" in res:
        print(
            f"SAMO / F-MTL wall time per step: {res['samo']['step_s'] / res['fmtl']['step_s']:.2f}"
        )
    if "mtl" in res:
        for m in ("fmtl", "samo"):
            if m in res:
                print(
                    f"{m} / aggregation (mtl) wall time per step: "
                    f"{res[m]['step_s'] / res['mtl']['step_s']:.2f}"
                )


if __name__ == "__main__":
    main()
