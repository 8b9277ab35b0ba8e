"""Stopping a command by a signal without losing or half-writing anything.

Inside :class:`StopSignals`, SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` (a
``KeyboardInterrupt``), so every write in progress cleans up after itself (see
:func:`mtlsam_fast.files.atomic_write`) instead of the process dying in the middle of it. Inside
:meth:`StopSignals.deferred`, the first signal only asks the training loop to stop after its
current step, which then writes its checkpoint; a second one raises at once. SIGKILL cannot be
caught: what it interrupts is covered by the atomic writes themselves.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


class Interrupted(KeyboardInterrupt):
    """A SIGINT, SIGTERM or SIGHUP turned into an exception; ``signum`` is the signal."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopSignals:
    """The signal handlers of one command (installed from the main thread only; restored on
    exit)."""

    NAMES = ("SIGINT", "SIGTERM", "SIGHUP")

    def __init__(self) -> None:
        self.received: int | None = None
        self.deferring = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.deferring and self.received is None:
            self.received = signum
            print(
                f"{signal.Signals(signum).name}: stopping after this step to write the "
                "checkpoint (send it again to stop at once)",
                file=sys.stderr,
                flush=True,
            )
            return
        raise Interrupted(signum)

    def should_stop(self) -> bool:
        """A signal asked the training loop to stop."""
        return self.received is not None

    @contextlib.contextmanager
    def deferred(self, on: bool = True) -> Iterator[None]:
        """Within the block (when ``on``), the first signal is recorded instead of raised."""
        before, self.deferring = self.deferring, on
        try:
            yield
        finally:
            self.deferring = before
