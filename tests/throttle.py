"""Make a process N times slower, as if it ran on a slower machine.

A duty cycle of SIGSTOP and SIGCONT: out of every ``period`` seconds the process
runs for ``period / factor``. Unlike a CPU quota, the slowdown does not depend on
how many other processes share the cores, so "5x slower" means the same in a test
on 2 cores and on 16.
"""

from __future__ import annotations

import os
import signal
import threading

__all__ = ["Throttle"]


class Throttle:
    """``with Throttle(pid, 5):`` runs ``pid`` at a fifth of its speed."""

    def __init__(self, pid: int, factor: float, period: float = 0.1) -> None:
        if factor < 1:
            raise ValueError(f"factor must be >= 1, got {factor}")
        self.pid, self.factor, self.period = pid, factor, period
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._cycle, name=f"throttle-{pid}", daemon=True)

    def _cycle(self) -> None:
        running = self.period / self.factor
        try:
            while not self._stop.is_set():
                os.kill(self.pid, signal.SIGSTOP)
                self._stop.wait(self.period - running)
                os.kill(self.pid, signal.SIGCONT)
                self._stop.wait(running)
        except ProcessLookupError:  # it exited: nothing left to slow down
            pass

    def __enter__(self) -> Throttle:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        try:
            os.kill(self.pid, signal.SIGCONT)
        except ProcessLookupError:
            pass
