"""The systemd notify protocol, spoken by the daemons themselves (no libsystemd).

Under ``Type=notify`` systemd passes ``NOTIFY_SOCKET`` (a Unix datagram socket; a
leading ``@`` is the abstract namespace) and, with ``WatchdogSec=``,
``WATCHDOG_USEC``/``WATCHDOG_PID``. The daemons say ``READY=1`` once serving,
``WATCHDOG=1`` from their main loop (so a hung loop gets them restarted),
``STATUS=...`` with what they are doing, and ``STOPPING=1`` when asked to stop.
Without ``NOTIFY_SOCKET`` every call is a no-op.

For supervisors that cannot listen (a container's health check), the same beat
touches ``$ELASTIC_HEALTH_FILE`` at most once a second when it is set: a file that
stops getting newer means a stuck main loop.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["Notifier"]

log = logging.getLogger("elastic.sdnotify")


class Notifier:
    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        address = env.get("NOTIFY_SOCKET", "")
        self.address = "\0" + address[1:] if address.startswith("@") else address
        self._sock: socket.socket | None = None
        if self.address:
            # Non-blocking: a supervisor that reads slowly (a queue holds 10 datagrams
            # by default, net.unix.max_dgram_qlen) must not stall the main loop, nor a
            # signal handler that says STOPPING=1. A beat that finds the queue full is dropped.
            self._sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        # Pet the watchdog twice per period, as sd_watchdog_enabled(3) advises.
        self.watchdog_every = int(usec) / 2e6 if usec.isdigit() and int(usec) > 0 and mine else 0.0
        self._last_pet = 0.0
        self._status = ""
        self.health_file = env.get("ELASTIC_HEALTH_FILE", "")
        self._last_touch = 0.0

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *fields: str) -> None:
        """Send ``KEY=VALUE`` lines in one datagram (errors are logged, never raised:
        a daemon must not stop, nor wait, because its supervisor went away or lags)."""
        if self._sock is None:
            return
        try:
            self._sock.sendto("\n".join(fields).encode(), self.address)
        except OSError as exc:
            log.debug("sd_notify failed address=%r error=%s", self.address, exc)

    def ready(self, status: str = "") -> None:
        self.send("READY=1", *([f"STATUS={status}"] if status else []))
        self._status = status

    def status(self, text: str) -> None:
        """``STATUS=text``, sent only when it changed."""
        if text != self._status:
            self._status = text
            self.send(f"STATUS={text}")

    def watchdog(self) -> None:
        """Call from the main loop: pets the watchdog (and touches the health file) when due."""
        now = time.monotonic()
        if self.watchdog_every and now - self._last_pet >= self.watchdog_every:
            self._last_pet = now
            self.send("WATCHDOG=1")
        if self.health_file and now - self._last_touch >= 1.0:
            self._last_touch = now
            try:
                os.utime(self.health_file)
            except FileNotFoundError:
                open(self.health_file, "ab").close()
            except OSError as exc:
                log.debug("cannot touch the health file path=%s error=%s", self.health_file, exc)

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
