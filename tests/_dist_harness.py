"""Two worker processes on gloo that run test cases on request, with a hard timeout.

Starting processes dominates the cost of multi-process tests, so one pair serves many cases:
:class:`Workers` spawns ``world_size`` processes (``127.0.0.1``, a free port found by binding port
0), each joins a gloo process group and then runs, for every request, a function of
``tests/_dist_cases.py`` with the same arguments on every rank, sending back its result (or its
traceback). A case that does not answer within its timeout -- a hang -- kills the workers and
fails the test; the next request starts a fresh pair.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
import traceback
from typing import Any

from mtlsam_fast.launch import free_port


class CaseError(AssertionError):
    """A case raised on a rank: the message holds every failing rank's traceback."""


def _worker(rank: int, world_size: int, port: int, conn: Any) -> None:
    import datetime

    os.environ.setdefault("TRITON_INTERPRET", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    import _dist_cases

    while True:
        request = conn.recv()
        if request is None:
            break
        name, kwargs = request
        torch.manual_seed(0)
        try:
            conn.send(("ok", getattr(_dist_cases, name)(**kwargs)))
        except BaseException:  # reported to the test, which fails with it
            conn.send(("error", traceback.format_exc()))
    conn.close()
    os._exit(0)  # no teardown of the group: the other ranks leave at the same time


class Workers:
    """``world_size`` gloo workers; ``run(name, timeout, **kwargs)`` returns every rank's result."""

    def __init__(self, world_size: int = 2):
        self.world_size = world_size
        self._procs: list[Any] = []
        self._conns: list[Any] = []

    def _start(self) -> None:
        ctx = mp.get_context("spawn")
        port = free_port()
        for rank in range(self.world_size):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_worker, args=(rank, self.world_size, port, child), daemon=True)
            p.start()
            self._procs.append(p)
            self._conns.append(parent)

    def run(self, name: str, timeout: float = 120.0, **kwargs: Any) -> list[Any]:
        if not self._procs:
            self._start()
        for c in self._conns:
            c.send((name, kwargs))
        results: list[Any] = [None] * self.world_size
        errors: list[str] = []
        deadline = time.monotonic() + timeout
        for rank, c in enumerate(self._conns):
            # once a rank failed, the others may wait in a collective it never reached
            wait = 5.0 if errors else max(0.0, deadline - time.monotonic())
            if not c.poll(wait):
                errors.append(f"--- rank {rank} ---\nno answer (a hang?)")
                continue
            status, value = c.recv()
            if status == "error":
                errors.append(f"--- rank {rank} ---\n{value}")
            results[rank] = value
        if errors:
            self.stop(kill=True)
            raise CaseError(f"case {name!r} failed (timeout {timeout} s):\n" + "\n".join(errors))
        return results

    def stop(self, kill: bool = False) -> None:
        if not kill:  # every rank leaves its loop, then they exit together
            for c in self._conns:
                with contextlib.suppress(BrokenPipeError, OSError):
                    c.send(None)
        for p in self._procs:
            p.join(timeout=0 if kill else 10)
            if p.is_alive():
                p.kill()
                p.join()
        self._procs, self._conns = [], []
