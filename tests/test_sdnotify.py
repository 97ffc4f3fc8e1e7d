"""The notify protocol never blocks a daemon on its supervisor."""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from elastic.sdnotify import Notifier


def test_a_supervisor_that_does_not_read_never_blocks_the_daemon(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    supervisor = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    supervisor.bind(str(path))  # bound, never read: its queue fills after a few datagrams
    notifier = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "1"})
    sent = threading.Event()

    def beat() -> None:
        for _ in range(200):
            notifier.watchdog()
            notifier.status(f"round {_}")
        notifier.stopping()
        sent.set()

    threading.Thread(target=beat, daemon=True).start()
    assert sent.wait(10), "a full notify queue blocked the daemon"
    supervisor.settimeout(0.1)
    assert supervisor.recv(4096) == b"WATCHDOG=1"  # what fit in the queue was delivered
    notifier.close()
    supervisor.close()


def test_abstract_socket_address() -> None:
    assert Notifier({"NOTIFY_SOCKET": "@elastic/x"}).address == "\0elastic/x"
    assert not Notifier({}).enabled
