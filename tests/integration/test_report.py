"""``elastic report``: a PNG (and an HTML page) of a run in which workers came and went."""

from __future__ import annotations

import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests.etcd_server import free_port

from .conftest import Cluster
from .test_failures import digits_job

pytestmark = pytest.mark.slow


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])  # IHDR: width, height


def test_report_of_a_run_with_joins_and_leaves(cluster: Cluster, tmp_path: Path) -> None:
    control = f"tcp://127.0.0.1:{free_port()}"
    cluster.coordinator(
        digits_job(tmp_path, rounds=100_000, min_workers=1, epochs=2), extra=("--control", control)
    )

    def job(*args: str) -> None:
        done = subprocess.run(
            [sys.executable, "-m", "elastic", "job", *args, "dg", "--coordinator", control],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr

    w0 = cluster.worker("w0")
    cluster.worker("w1")
    cluster.wait_status("dg", lambda s: s["round"] >= 5, 60, "five rounds")
    cluster.worker("w2")
    joined = cluster.wait_status(
        "dg", lambda s: s["last"].get("members") == 3, 60, "rounds with w2"
    )
    w0.send_signal(signal.SIGTERM)
    cluster.wait_status(
        "dg",
        lambda s: s["round"] > joined["round"] + 5 and s["last"].get("members") == 2,
        60,
        "rounds after w0 left",
    )
    job("pause")
    paused = cluster.wait_status("dg", lambda s: s["state"] == "paused", 30, "the pause")
    job("resume")
    cluster.wait_status(
        "dg", lambda s: s["round"] > paused["round"] + 5, 30, "rounds after resuming"
    )
    job("cancel")
    done = cluster.wait_status(
        "dg", lambda s: s["state"] == "cancelled", 30, "the job to be cancelled"
    )
    kinds = [e["event"] for e in done["events"]]
    assert (
        kinds.count("joined") == 3
        and kinds.count("left") == 1
        and ["paused", "resumed", "cancelled"]
        == [k for k in kinds if k in ("paused", "resumed", "cancelled")]
    )

    png = tmp_path / "report.png"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic",
            "report",
            "dg",
            "--out",
            str(png),
            "--coordinator",
            control,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    assert png_size(png) == (1400, 900) and png.stat().st_size > 30_000

    page = tmp_path / "report.html"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic",
            "report",
            "dg",
            "--out",
            str(page),
            "--state-dir",
            str(cluster.state),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert made.returncode == 0, made.stderr
    text = page.read_text()
    assert (
        '<img alt="loss, accuracy, members over time and bytes per round" '
        'src="data:image/png;base64,' in text
    )
    assert "<th>joins / leaves</th><td>3 / 1</td>" in text
