"""Thread count of small (K x K) CPU work.

torch runs CPU ops on ``torch.get_num_threads()`` intra-op threads (one per core by default), and
LAPACK/BLAS calls and this library's C++ QP solver fan out even for 8 x 8 matrices. When other
processes hold the cores (data-loader workers, a second job), every such parallel region waits for
descheduled threads: a K = 3 weighting measured 10-100x slower than on one thread. Work whose size
is K x K (weightings, the QP) therefore runs on one thread, and so does a P-sized op of the C++
backend or of a weighting on fewer than :data:`GRAIN` elements; larger P-sized ops keep torch's
setting.

The grain: waiting for a descheduled thread costs a scheduler slice, milliseconds (measured with
``python -m bench load``'s spinning processes on a 2-core machine: a 2-thread C++ Gram of 2^15 to
2^21 elements took 12-86 ms instead of 0.006-0.5 ms); below about 2^20 elements (a millisecond of
single-thread work) the parallel speed-up an idle machine would give is worth less than that.
(torch's own grain for elementwise ops, 32768 elements, assumes idle cores.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")

#: elements below which a P-sized CPU op runs on one thread (see the module docstring)
GRAIN = 1 << 20


def single_threaded(fn: Callable[[], T], device: torch.device, numel: int = 0) -> T:
    """``fn()`` with one intra-op thread when ``device`` is the CPU and the op touches fewer than
    :data:`GRAIN` elements (``numel``; 0 for K x K work), torch's count put back afterwards (about
    0.3 us). Elsewhere, and while ``torch.compile`` traces, just ``fn()``.

    The setting is process-wide for its duration: P-sized CPU ops that another Python thread runs
    at the same moment also run on one thread.
    """
    if device.type != "cpu" or numel >= GRAIN or torch.compiler.is_compiling():
        return fn()
    n = torch.get_num_threads()
    if n == 1:
        return fn()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)
