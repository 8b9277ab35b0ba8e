"""``mtlsam-fast demo``: every weighting on real per-task gradients of a small multi-task model.

One batch of MultiDigits with 40 % label noise on the right task, a :class:`MultiTaskNet`, the two
task gradients of the shared trunk captured zero-copy into one ``[K, P]`` buffer
(:class:`~mtlsam_fast.buffers.GradBuffer`), their Gram matrix (:func:`mtlsam_fast.ops.gram`), and
then each registered weighting: its weights, the cosine of the combined direction ``d = wᵀG`` with
each task gradient, and the median time of one call. A smoke test that needs no optimizer.
"""

from __future__ import annotations

import statistics
import time

import torch

from . import ops, weighting
from .buffers import GradBuffer
from .data import multidigits
from .models import MultiTaskNet
from .train import task_losses


def run_demo(
    *,
    batch_size: int = 256,
    repeats: int = 20,
    backend: str | None = None,
    seed: int = 0,
    out=print,
) -> int:
    torch.manual_seed(seed)
    data = multidigits(n_train=batch_size, n_test=1, seed=seed, noise_rate=0.4)
    model = MultiTaskNet(data.image_shape, data.num_classes)
    x, y = data.images(data.x_train), data.y_train
    losses = task_losses(model(x), y)
    buf = GradBuffer(model.shared_parameters(), data.num_tasks)
    for k, loss in enumerate(losses):
        with buf.capture(k):
            loss.backward(retain_graph=k + 1 < len(losses))
    G = buf.G
    gram = ops.gram(G, backend=backend)
    L = torch.stack([loss.detach() for loss in losses])
    norms = gram.diagonal().sqrt()
    cos = (gram[0, 1] / (norms[0] * norms[1])).item()
    out(
        f"{data.num_tasks} tasks, P = {G.shape[1]} shared parameters, batch {batch_size}; "
        f"losses {', '.join(f'{v:.3f}' for v in L.tolist())}; "
        f"‖g_k‖ {', '.join(f'{v:.3f}' for v in norms.tolist())}; "
        f"cos(g_1, g_2) = {cos:+.3f}"
    )
    out(f"{'weighting':<11} {'weights':<24} {'cos(d, g_k)':<20} {'time/call':>10}")
    failures = 0
    for name in weighting.names():
        try:
            w = weighting.get(name)
        except (ImportError, AttributeError) as e:
            out(f"{name:<11} not available ({type(e).__name__}: {e})")
            continue
        try:
            w.check_num_tasks(G.shape[0])
        except ValueError as e:
            out(f"{name:<11} not defined here: {e}")
            continue
        args = (gram, L) if w.needs_losses else (gram,)
        kwargs = {"grads": G} if w.needs_grads else {}
        try:
            result = w(*args, **kwargs)
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                w(*args, **kwargs)
                times.append(time.perf_counter() - t0)
        except Exception as e:  # report and go on: the demo is a smoke test of every weighting
            failures += 1
            out(f"{name:<11} FAILED: {type(e).__name__}: {e}")
            continue
        if not result.isfinite().all():
            d = None
        else:
            d = result if w.returns_direction else ops.combine(result, G, backend=backend)
        if d is None:
            cosd = "non-finite result"
        else:
            cosd = ", ".join(
                f"{(G[k] @ d / (G[k].norm() * d.norm() + 1e-30)).item():+.3f}"
                for k in range(G.shape[0])
            )
        if w.returns_direction:
            wtxt = "(a direction)"
        else:
            wtxt = ", ".join(f"{v:.4f}" for v in result.tolist())
        out(f"{name:<11} {wtxt:<24} {cosd:<20} {1e6 * statistics.median(times):>8.1f} µs")
    return 1 if failures else 0
