"""Data-parallel ``mtlsam-fast train``: under ``torchrun``, or started by ``--nproc N``.

``mtlsam-fast train --nproc N ...`` re-runs the same command in N local processes through
``torch.distributed.run --standalone`` (a free port on this host; gloo on the CPU, NCCL on GPUs,
one GPU per process). Under any launcher that sets ``WORLD_SIZE`` (``torchrun``, SLURM with
``torch.distributed.run``), :func:`setup` joins the process group; every process then trains the
same model on its slice of every global batch, and the optimizer averages the per-task gradients
over the processes, so the run is the one-process run with the same ``--batch-size`` (up to
floating-point order). BatchNorm layers become ``SyncBatchNorm`` on GPUs, so they normalize with
the global batch as in one process; on the CPU (where ``SyncBatchNorm`` does not run) each process
normalizes with its own slice. Process 0 alone prints, evaluates for the report and writes the
result and the checkpoints.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterable, Sequence

import torch


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0, then released): for
    starting a process group by hand (``init_method=f"tcp://127.0.0.1:{port}"``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched() -> bool:
    """Whether a launcher started this process as one of several (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def rank() -> int:
    """This process's rank (0 when not distributed; the launcher's ``RANK`` before
    :func:`setup`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0")) if launched() else 0


def world_size() -> int:
    """The number of processes (1 when not distributed; the launcher's ``WORLD_SIZE`` before
    :func:`setup`)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def setup(device: torch.device) -> torch.device:
    """Under a launcher: join the default process group once (NCCL for CUDA, gloo otherwise) and
    return this process's device (``cuda:LOCAL_RANK`` for CUDA); ``device`` unchanged otherwise."""
    if not launched():
        return device
    import torch.distributed as dist

    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return device


def local_batch(indices: torch.Tensor) -> torch.Tensor:
    """This process's share of a global batch: every ``world_size()``-th example from its rank."""
    return indices[rank() :: world_size()] if world_size() > 1 else indices


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is set on any rank (one all-reduce; ``flag`` itself when not
    distributed): so that every rank stops at the same step when one of them is signalled."""
    if world_size() == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def check_replicas(params: Iterable[torch.Tensor]) -> None:
    """Raise on every rank if the ranks' copies of ``params`` differ (a float64 sum and sum of
    squares per rank, compared by one all-gather): a replicated run must end with one model."""
    if world_size() == 1:
        return
    import torch.distributed as dist

    flat = [p.detach().double().flatten() for p in params]
    values = torch.cat(flat) if flat else torch.zeros(1, dtype=torch.float64)
    mine = torch.stack([values.sum(), values.square().sum()])
    if dist.get_backend() == "nccl":
        mine = mine.cuda()
    table = torch.empty(world_size() * 2, dtype=mine.dtype, device=mine.device)
    dist.all_gather_single(table, mine)
    rows = table.view(-1, 2).cpu()
    if not bool((rows == rows[0]).all()):
        raise RuntimeError(
            f"the ranks' model replicas differ after training (checksums {rows.tolist()})"
        )


def strip_nproc(argv: Sequence[str]) -> list[str]:
    """``argv`` without ``--nproc N`` / ``--nproc=N``."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            out.append(a)
    return out


def launch(nproc: int, argv: Sequence[str]) -> int:
    """Run ``mtlsam-fast`` with ``argv`` (minus ``--nproc``) in ``nproc`` local processes through
    ``torch.distributed.run --standalone``; returns the launcher's exit status."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nnodes=1",
        f"--nproc-per-node={nproc}",
        "-m",
        "mtlsam_fast",
        *strip_nproc(argv),
    ]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # what torchrun picks anyway, without its warning
    return subprocess.call(cmd, env=env)
