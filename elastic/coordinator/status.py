"""Publishing a job's status (``status.json``, and the job store's copy), throttled."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from elastic.coordinator.context import EngineContext
from elastic.coordinator.job import Job

__all__ = ["StatusPublisher", "STATUS_EVERY", "STATUS_SHARE"]

STATUS_EVERY = (
    0.05  # seconds between status writes while the job's state stays the same (at most 20 a second)
)
# ... and at least this many times what the last write took: the history makes the
# file grow with every version (16 MB at 100 000), and writing it must not become
# what the coordinator does (at most 1/STATUS_SHARE of its time).
STATUS_SHARE = 20


class StatusPublisher:
    """Writes the status at once when the job's state changed, else at most every
    ``STATUS_EVERY`` seconds (``flush`` writes what was held back). An asynchronous
    job commits thousands of versions a second; its status file must not be
    rewritten, nor the job store written, for each."""

    def __init__(self, job: Job, ctx: EngineContext, status: Callable[[], dict[str, Any]]) -> None:
        self.job = job
        self.ctx = ctx
        self.status = status  # the status to publish, with the work in progress
        self.at = float("-inf")  # when status.json was last written (monotonic)
        self.state = ""  # the job state it showed
        self.due = False  # something changed since
        self.interval = STATUS_EVERY  # the least time between two writes, from the last one's cost

    def write(self) -> None:
        now = time.monotonic()
        if str(self.job.state) == self.state and now - self.at < self.interval:
            self.due = True
            return
        self.at, self.state, self.due = now, str(self.job.state), False
        status = self.status()
        if not self.job.write_status(status, self.ctx.holds):
            self.due = True  # tried again by ``flush``
        if self.ctx.on_status is not None:
            self.ctx.on_status(status)
        self.interval = max(STATUS_EVERY, STATUS_SHARE * (time.monotonic() - now))

    def flush(self) -> None:
        """Write the status held back by ``write``, once its interval is over."""
        if self.due and time.monotonic() - self.at >= self.interval:
            self.write()
