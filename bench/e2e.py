"""End-to-end: one optimizer step of F-MTL, SAMO and MGDA, mtlsam_fast against the naive style.

``python -m bench e2e [--quick] [--models resnet18,transformer] [--tasks K] [--out DIR]``

Models are built by hand (no torchvision): a CIFAR-style ResNet-18 trunk (11.2 M parameters) with
K linear heads, and a small transformer encoder with K heads. For every (model, method,
implementation) it reports the total step time, the optimizer-side overhead (the step minus its
forward and backward passes), and peak memory against an analytical model of the optimizer's
buffers.

How the forward/backward share is measured, for any implementation: the closure times every
forward it runs, and each backward pass through the trunk is timed from the moment its gradient
reaches the trunk's output (a tensor hook) to the moment the last trunk parameter receives its
gradient (post-accumulate-grad hooks). Overhead = step - sum(forward) - sum(backward): everything
the optimizer does itself (gradient capture and clones, norms, perturb/restore, Gram, QP, combine,
the base optimizer's update). The tiny heads' backward (before the gradient reaches the trunk)
counts as overhead. If no parameter hook fires (an optimizer using ``torch.autograd.grad``), each
backward is charged the median single-task backward time calibrated on the same model in the same
run.

The naive baseline (:func:`naive_step`) runs the same passes as the method requires (one clean
forward, K backward with ``retain_graph``, ...), so the difference is the optimizer side only:
per-parameter gradient clones, per-pair ``.item()`` dot products with Sener & Koltun's host
min-norm loop, per-parameter clone / restore and norms (:mod:`bench.naive`). The original MGDA code
re-runs a forward per task and one more for the scaled loss; we do not charge the naive side for it.

Peak memory is measured above a baseline taken after the model and inputs exist and before the
optimizer is built (so buffers allocated at construction count too): on CPU the process's peak
resident set during the step (``VmHWM`` after a reset via ``/proc/self/clear_refs``, baseline RSS
after ``malloc_trim``); on CUDA ``torch.cuda.max_memory_allocated``. Both include activations and
``.grad``; the plain forward+backward peak above the same baseline is reported alongside.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import re
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import naive
from .common import REPO_ROOT, machine_info, sync

Tensor = torch.Tensor


# --------------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.short is None else self.short(x)))


class ResNet18Trunk(nn.Module):
    """ResNet-18 (He et al. 2016), CIFAR stem (3x3 conv, no max-pool): 11.17 M parameters,
    512 features."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU()
        )
        layers, cin = [], 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        self.layers = nn.Sequential(*layers)
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return F.adaptive_avg_pool2d(self.layers(self.stem(x)), 1).flatten(1)


class TransformerTrunk(nn.Module):
    """A small pre-LN transformer encoder over token ids, mean-pooled."""

    def __init__(
        self,
        vocab: int = 1000,
        d: int = 256,
        layers: int = 4,
        heads: int = 4,
        ff: int = 1024,
        seq: int = 64,
    ):
        super().__init__()
        self.emb = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.zeros(seq, d))
        layer = nn.TransformerEncoderLayer(
            d, heads, ff, dropout=0.0, batch_first=True, norm_first=True
        )
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d)
        self.out_dim = d

    def forward(self, x: Tensor) -> Tensor:
        h = self.emb(x) + self.pos[: x.shape[1]]
        return self.norm(self.enc(h)).mean(1)


def build(model: str, K: int, batch: int, device: torch.device, seed: int = 0):
    """(trunk, heads, inputs, labels) for ``model`` with K classification tasks of 10 classes."""
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    if model == "resnet18":
        trunk = ResNet18Trunk()
        x = torch.randn(batch, 3, 32, 32, generator=g)
    elif model == "transformer":
        trunk = TransformerTrunk()
        x = torch.randint(0, 1000, (batch, 64), generator=g)
    else:
        raise ValueError(f"unknown model {model!r}")
    heads = nn.ModuleList(nn.Linear(trunk.out_dim, 10) for _ in range(K))
    ys = [torch.randint(0, 10, (batch,), generator=g).to(device) for _ in range(K)]
    return trunk.to(device), heads.to(device), x.to(device), ys


# --------------------------------------------------------------------------------- instrumentation


class Probe:
    """A closure over the model that times its forwards and counts backward passes through the
    trunk."""

    def __init__(
        self,
        trunk: nn.Module,
        heads: nn.ModuleList,
        x: Tensor,
        ys: list[Tensor],
        device: torch.device,
    ):
        self.trunk, self.heads, self.x, self.ys, self.device = trunk, heads, x, ys, device
        self.reset()

    def reset(self) -> None:
        self.fwd_s = 0.0
        self.bwd_s = 0.0
        self.n_fwd_grad = 0
        self.n_fwd_nograd = 0
        self.n_bwd = 0
        self._open: float | None = None
        self._last_param: float | None = None

    def watch(self, params: list[Tensor]) -> None:
        """Time each backward pass through the trunk directly: from the gradient reaching the
        trunk's output (a tensor hook) to the last trunk parameter receiving its gradient
        (post-accumulate hooks)."""
        for p in params:
            p.register_post_accumulate_grad_hook(self._on_param)

    def _on_param(self, p: Tensor) -> None:
        self._last_param = time.perf_counter()

    def close(self) -> None:
        """Account the backward pass in flight (called before each forward and at the end of a
        step)."""
        if (
            self._open is not None
            and self._last_param is not None
            and self._last_param > self._open
        ):
            self.bwd_s += self._last_param - self._open
        self._open = None

    def _on_backward(self, grad: Tensor) -> None:
        self.close()
        self.n_bwd += 1
        self._open = time.perf_counter()

    def __call__(self) -> list[Tensor]:
        """The K task losses at the current parameters."""
        self.close()
        sync(self.device)
        t = time.perf_counter()
        feat = self.trunk(self.x)
        losses = [F.cross_entropy(h(feat), y) for h, y in zip(self.heads, self.ys)]
        sync(self.device)
        self.fwd_s += time.perf_counter() - t
        if feat.requires_grad:
            self.n_fwd_grad += 1
            feat.register_hook(self._on_backward)
        else:
            self.n_fwd_nograd += 1
        return losses


def calibrate(probe: Probe, reps: int) -> dict:
    """Median forward (with / without grad) and single-task backward times of this model."""
    fg, fn, bw = [], [], []
    params = list(probe.trunk.parameters()) + list(probe.heads.parameters())
    for _ in range(reps + 1):
        for p in params:
            p.grad = None
        sync(probe.device)
        t = time.perf_counter()
        losses = probe()
        sync(probe.device)
        fg.append(time.perf_counter() - t)
        t = time.perf_counter()
        losses[0].backward()
        sync(probe.device)
        bw.append(time.perf_counter() - t)
        with torch.no_grad():
            t = time.perf_counter()
            probe()
            sync(probe.device)
            fn.append(time.perf_counter() - t)
    for p in params:
        p.grad = None
    probe.reset()
    return {
        "fwd_grad_s": statistics.median(fg[1:]),
        "fwd_nograd_s": statistics.median(fn[1:]),
        "bwd_s": statistics.median(bw[1:]),
    }


def _rss_kib() -> tuple[int, int]:
    s = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", s).group(1)), int(
        re.search(r"VmRSS:\s+(\d+)", s).group(1)
    )


class PeakMemory:
    """Peak memory growth during a block: CUDA allocator stats, or the process's peak RSS on CPU."""

    def __init__(self, device: torch.device, base: int | None = None):
        self.device = device
        self.fixed_base = (
            base  # measure the peak above this level (bytes) instead of the level at entry
        )
        self.bytes: int | None = None
        self.method = ""

    @staticmethod
    def level(device: torch.device) -> int | None:
        """Current memory in use (bytes): CUDA allocated, or the resident set after malloc_trim."""
        if device.type == "cuda":
            sync(device)
            return torch.cuda.memory_allocated(device)
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            return _rss_kib()[1] * 1024
        except OSError:
            return None

    def __enter__(self):
        if self.device.type == "cuda":
            sync(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            self.method = "torch.cuda.max_memory_allocated growth"
        else:
            try:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
                Path("/proc/self/clear_refs").write_text("5")
                self.base = _rss_kib()[1]
                self.method = "peak RSS growth (VmHWM after clear_refs reset)"
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            sync(self.device)
            peak = torch.cuda.max_memory_allocated(self.device)
            base = self.base
        elif self.base is not None:
            peak = _rss_kib()[0] * 1024
            base = self.base * 1024
        else:
            return False
        self.bytes = peak - (self.fixed_base if self.fixed_base is not None else base)
        return False


# --------------------------------------------------------------------------------- naive steps


def _clone_grads(params: list[Tensor]) -> list[Tensor]:
    return [p.grad.data.clone() if p.grad is not None else torch.zeros_like(p) for p in params]


def _zero(params) -> None:
    for p in params:
        p.grad = None


def naive_step(
    method: str,
    probe: Probe,
    shared: list[Tensor],
    heads: list[list[Tensor]],
    base: torch.optim.Optimizer,
    rho: float = 0.05,
    alpha: float = 0.5,
    mu: float = 1e-3,
) -> list[float]:
    """One step of ``method`` in the style of the papers' official code (see the module
    docstring)."""
    K = len(heads)
    every = shared + [p for h in heads for p in h]
    gen = torch.Generator(device=shared[0].device).manual_seed(0)

    def per_task_grads(losses):
        g, gh = [], []
        for t in range(K):
            _zero(every)
            losses[t].backward(retain_graph=t < K - 1)
            g.append(_clone_grads(shared))
            gh.append(_clone_grads(heads[t]))
        return g, gh

    def perturbed_grad(t: int, direction: list[Tensor], head_dir: list[Tensor]):
        # SAM first step per parameter: host norm, clone, add_; head by its own normalized gradient
        olds = naive.perturb(shared, direction, rho)
        olds_h = naive.perturb(heads[t], head_dir, rho)
        _zero(every)
        losses = probe()
        losses[t].backward()
        s, sh = _clone_grads(shared), _clone_grads(heads[t])
        naive.restore(shared, olds)
        naive.restore(heads[t], olds_h)
        return s, sh

    if method == "mgda":
        losses = probe()
        g, gh = per_task_grads(losses)
        w = naive.mgda_weights(g)
        d = naive.combine(w, g)
        head_grads = gh
    elif method == "fmtl":
        losses = probe()
        g, gh = per_task_grads(losses)
        s_all, head_grads = [], []
        for t in range(K):
            s, sh = perturbed_grad(t, g[t], gh[t])
            s_all.append(s)
            head_grads.append(sh)
        flat = [[si - gi for si, gi in zip(s_all[t], g[t])] for t in range(K)]
        w_loss = naive.mgda_weights(g)
        w_flat = naive.mgda_weights(flat)
        d = [a + b for a, b in zip(naive.combine(w_loss, g), naive.combine(w_flat, flat))]
    elif method == "samo":
        losses = probe()
        _zero(every)
        (sum(losses) / K).backward()
        g0 = _clone_grads(shared)
        g0h = [_clone_grads(h) for h in heads]
        g0_norms = [x.norm().item() for x in g0]
        G, head_grads = [], []
        for t in range(K):
            z = [
                torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) for p in shared
            ]
            olds = [p.data.clone() for p in shared]
            with torch.no_grad():
                for p, zi in zip(shared, z):
                    p.add_(zi, alpha=mu)
                lp = probe()[t].item()
                for p, o, zi in zip(shared, olds, z):
                    p.copy_(o).sub_(zi, alpha=mu)
                lm = probe()[t].item()
                for p, o in zip(shared, olds):
                    p.copy_(o)
            coef = (lp - lm) / (2 * mu)
            ghat = [coef * zi for zi in z]
            ghat = [
                gh_ * (n0 / max(gh_.norm().item(), 1e-12)) for gh_, n0 in zip(ghat, g0_norms)
            ]  # layerwise
            v = [alpha * a + (1 - alpha) * b for a, b in zip(g0, ghat)]
            s, sh = perturbed_grad(t, v, g0h[t])
            G.append(s)
            head_grads.append(sh)
        w = naive.mgda_weights(G)
        d = naive.combine(w, G)
    else:
        raise ValueError(method)
    for p, dp in zip(shared, d):
        p.grad = dp
    for h, hg in zip(heads, head_grads):
        for p, gp in zip(h, hg):
            p.grad = gp
    base.step()
    return [float(l.detach()) for l in losses]


# --------------------------------------------------------------------------------- analytical model


def analytical_bytes(method: str, impl: str, P: int, PH: int, K: int, itemsize: int = 4) -> dict:
    """Optimizer-side buffers (bytes) beyond parameters, their .grad and activations.

    mtlsam_fast (docs/ARCHITECTURE.md §2, §8): G [K, P]; F-MTL overwrites G's rows with the flat
    components after combining the loss gradients (K.P + a few P: backup, direction); SAMO keeps
    G, g0 and a backup (its noise is regenerated, never stored). Naive: K per-parameter gradient
    clones per gradient
    set, plus per-parameter clones for the perturbation (old_p) and the combination temporaries.
    """
    b = itemsize
    if impl == "mtlsam_fast":
        model = {"mgda": K * P + P, "fmtl": K * P + 3 * P, "samo": K * P + 3 * P}[method]
        desc = {
            "mgda": "G[K,P] + d[P]",
            "fmtl": "G[K,P] (flat overwrites it) + backup + d + scratch",
            "samo": "G[K,P] + g0 + backup (z regenerated)",
        }[method]
    else:
        model = {"mgda": K * P + 2 * P, "fmtl": 3 * K * P + 3 * P, "samo": K * P + 6 * P}[method]
        desc = {
            "mgda": "K grad clones + combine temporaries",
            "fmtl": "K clean + K perturbed clones + K flat diffs + old_p + temporaries",
            "samo": "K grad clones + g0 + z + old_p + ghat + v + temporaries",
        }[method]
    return {"bytes": model * b + 2 * PH * K * b, "model": desc}


# --------------------------------------------------------------------------------- runner


def mtlsam_optimizers() -> tuple[dict | None, str | None]:
    try:
        from mtlsam_fast.optim import FMTL, SAMO, MTLOptimizer
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    return {"fmtl": FMTL, "samo": SAMO, "mgda": MTLOptimizer}, None


def make_mtlsam(
    method: str, classes: dict, shared, heads, lr: float, rho: float, alpha: float, mu: float
):
    kw = dict(
        task_params=[list(h.parameters()) for h in heads],
        base_optimizer=torch.optim.SGD,
        weighting="mgda",
        lr=lr,
    )
    if method == "mgda":
        return classes["mgda"](shared, **kw)
    if method == "fmtl":
        return classes["fmtl"](shared, rho=rho, **kw)
    return classes["samo"](shared, rho=rho, alpha=alpha, zo_eps=mu, layerwise=True, seed=0, **kw)


def run_case(
    model: str, method: str, impl: str, args, device: torch.device, classes: dict | None
) -> dict:
    trunk, heads, x, ys = build(model, args.tasks, args.batch, device)
    trunk.train()
    shared = list(trunk.parameters())
    P = sum(p.numel() for p in shared)
    PH = sum(p.numel() for p in heads[0].parameters())
    probe = Probe(trunk, heads, x, ys, device)
    cal = calibrate(probe, args.calib)
    probe.watch(shared)
    # memory baseline: model, inputs and nothing else (optimizer buffers are part of what we
    # measure, whether they are allocated at construction or inside the step)
    for p in list(trunk.parameters()) + list(heads.parameters()):
        p.grad = None
    mem_base = PeakMemory.level(device)
    # plain forward + backward peak above the same baseline, before any optimizer exists
    with PeakMemory(device, mem_base) as pm_fb:
        losses = probe()
        sum(losses).backward()
    del losses
    for p in list(trunk.parameters()) + list(heads.parameters()):
        p.grad = None
    probe.reset()
    row = {
        "model": model,
        "method": method,
        "impl": impl,
        "K": args.tasks,
        "batch": args.batch,
        "P_shared": P,
        "device": str(device),
        **{f"calib_{k}": v for k, v in cal.items()},
    }
    if impl == "naive":
        every = shared + list(heads.parameters())
        base = torch.optim.SGD(every, lr=args.lr)
        head_lists = [list(h.parameters()) for h in heads]

        def step():
            return naive_step(
                method, probe, shared, head_lists, base, args.rho, args.alpha, args.mu
            )
    else:
        opt = make_mtlsam(method, classes, shared, heads, args.lr, args.rho, args.alpha, args.mu)

        def step():
            return opt.step(probe)

    step()  # warm-up (allocates buffers, first-call costs)
    sync(device)
    times, overheads, counts, peaks, fwd_s, bwd_s = [], [], None, [], [], []
    measured_bwd = False
    for _ in range(args.reps):
        probe.reset()
        with PeakMemory(device, mem_base) as pm:
            sync(device)
            t = time.perf_counter()
            step()
            sync(device)
            dt = time.perf_counter() - t
        probe.close()
        times.append(dt)
        measured_bwd = probe.bwd_s > 0 or probe.n_bwd == 0
        bwd = probe.bwd_s if measured_bwd else probe.n_bwd * cal["bwd_s"]
        fwd_s.append(probe.fwd_s)
        bwd_s.append(bwd)
        overheads.append(dt - probe.fwd_s - bwd)
        counts = (probe.n_fwd_grad, probe.n_fwd_nograd, probe.n_bwd)
        peaks.append(pm.bytes)
    ana = analytical_bytes(method, impl, P, PH, args.tasks)
    med = statistics.median(times)
    row.update(
        {
            "step_s": med,
            "step_min_s": min(times),
            "step_max_s": max(times),
            "reps": len(times),
            "fwd_s": statistics.median(fwd_s),
            "bwd_s": statistics.median(bwd_s),
            "bwd_timing": "measured (trunk-output hook to last parameter hook)"
            if measured_bwd
            else "calibrated",
            "overhead_s": statistics.median(overheads),
            "overhead_pct": 100 * statistics.median(overheads) / med,
            "n_fwd_grad": counts[0],
            "n_fwd_nograd": counts[1],
            "n_bwd": counts[2],
            "peak_step_bytes": max(b for b in peaks if b is not None)
            if any(b is not None for b in peaks)
            else None,
            "peak_fwd_bwd_bytes": pm_fb.bytes,
            "memory_method": pm_fb.method,
            "analytical_optimizer_bytes": ana["bytes"],
            "analytical_model": ana["model"],
        }
    )
    return row


def _mb(b) -> str:
    return "-" if b is None else f"{b / 2**20:.0f}"


def format_table(rows: list[dict]) -> str:
    hdr = (
        f"{'model':11s} {'method':6s} {'impl':11s} {'step':>9s} {'fwd':>8s} {'bwd':>8s} "
        f"{'overhead':>9s} {'ovh%':>5s} {'fwd/nograd/bwd':>15s} "
        f"{'peak MiB':>9s} {'fb MiB':>7s} {'model MiB':>9s}  vs naive"
    )
    lines = [hdr, "-" * len(hdr)]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['model']:11s} {r['method']:6s} {r['impl']:11s} {r['error']}")
            continue
        vs = (
            f"step {r['speedup_step']:.2f}x, overhead {r['speedup_overhead']:.2f}x"
            if "speedup_step" in r
            else ""
        )
        passes = str(r["n_fwd_grad"]) + "/" + str(r["n_fwd_nograd"]) + "/" + str(r["n_bwd"])
        lines.append(
            f"{r['model']:11s} {r['method']:6s} {r['impl']:11s} {r['step_s'] * 1e3:7.0f}ms "
            f"{r['fwd_s'] * 1e3:6.0f}ms {r['bwd_s'] * 1e3:6.0f}ms {r['overhead_s'] * 1e3:7.0f}ms "
            f"{r['overhead_pct']:5.1f} {passes:>15s} "
            f"{_mb(r['peak_step_bytes']):>9s} {_mb(r['peak_fwd_bwd_bytes']):>7s} "
            f"{_mb(r['analytical_optimizer_bytes']):>9s}  {vs}"
        )
    return "\n".join(lines)


def default_out(device: torch.device) -> Path:
    """``runs/bench/<cpu|cuda>``: untracked, like the op sweep's (``report.default_out``)."""
    return REPO_ROOT / "runs" / "bench" / ("cpu" if device.type == "cpu" else "cuda")


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--quick", action="store_true", help="K=2, batch 4, 1 repetition")
    ap.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default runs/bench/<cpu|cuda>, untracked; the committed results "
        "are refreshed only on purpose: --out bench/results/<device>)",
    )
    ap.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default: cpu)")
    ap.add_argument(
        "--models",
        default="resnet18,transformer",
        help="comma list of models: resnet18, transformer (default: both)",
    )
    ap.add_argument(
        "--methods",
        default="mgda,fmtl,samo",
        help="comma list of methods: mgda, fmtl, samo (default: all three)",
    )
    ap.add_argument(
        "--impls",
        default="mtlsam_fast,naive",
        help="comma list of implementations: mtlsam_fast, naive (default: both)",
    )
    ap.add_argument("--tasks", type=int, default=None, help="K (default 4, quick 2)")
    ap.add_argument("--batch", type=int, default=None, help="batch size (default 8, quick 4)")
    ap.add_argument(
        "--reps", type=int, default=None, help="measured steps per case (default 3, quick 1)"
    )
    ap.add_argument(
        "--calib",
        type=int,
        default=None,
        help="calibration passes (fallback backward timing; default 2)",
    )
    ap.add_argument("--lr", type=float, default=0.01, help="SGD learning rate (default: 0.01)")
    ap.add_argument(
        "--rho", type=float, default=0.05, help="F-MTL/SAMO perturbation radius (default: 0.05)"
    )
    ap.add_argument("--alpha", type=float, default=0.5, help="SAMO global/local mix (default: 0.5)")
    ap.add_argument(
        "--mu", type=float, default=1e-3, help="SAMO zeroth-order step zo_eps (default: 1e-3)"
    )
    ap.add_argument(
        "--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)"
    )


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    args.tasks = args.tasks or (2 if args.quick else 4)
    args.batch = args.batch or (4 if args.quick else 8)
    args.reps = args.reps or (1 if args.quick else 3)
    args.calib = args.calib or 2
    from .report import _warn_if_oversubscribed

    _warn_if_oversubscribed()
    classes, why = mtlsam_optimizers()
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    if classes is None and "mtlsam_fast" in impls:
        print(
            f"NOTE: mtlsam_fast.optim is not importable yet ({why}); the mtlsam_fast rows are "
            "reported as unavailable and only the naive baseline runs. "
            "Re-run `python -m bench e2e` once the optimizers land."
        )
    meta = machine_info(device)
    rows = []
    for model in [m.strip() for m in args.models.split(",") if m.strip()]:
        for method in [m.strip() for m in args.methods.split(",") if m.strip()]:
            for impl in impls:
                base = {"model": model, "method": method, "impl": impl}
                if impl == "mtlsam_fast" and classes is None:
                    rows.append(
                        {**base, "error": f"unavailable: mtlsam_fast.optim not importable ({why})"}
                    )
                    continue
                print(f"  e2e {model} {method} {impl} ...", flush=True)
                try:
                    rows.append(run_case(model, method, impl, args, device, classes))
                except Exception as e:
                    traceback.print_exc()
                    rows.append({**base, "error": f"{type(e).__name__}: {e}"[:300]})
    for r in rows:
        if "error" in r or r["impl"] == "naive":
            continue
        nv = next(
            (
                n
                for n in rows
                if n["impl"] == "naive"
                and n["model"] == r["model"]
                and n["method"] == r["method"]
                and "error" not in n
            ),
            None,
        )
        if nv:
            r["speedup_step"] = nv["step_s"] / r["step_s"]
            r["speedup_overhead"] = (
                nv["overhead_s"] / r["overhead_s"] if r["overhead_s"] > 0 else math.inf
            )
    meta["loadavg_end"] = list(__import__("os").getloadavg())
    out = args.out or default_out(device)
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows)
    print()
    print(table)
    doc = {
        "meta": meta,
        "config": {k: v for k, v in vars(args).items() if k != "out"},
        "command": " ".join(["python -m bench e2e", *sys.argv[2:]]),
        "results": rows,
    }
    (out / "e2e.json").write_text(json.dumps(doc, indent=1, default=str))
    (out / "e2e.txt").write_text(table + "\n")
    print(f"\nwrote {out}/e2e.json, e2e.txt")
    return 0
