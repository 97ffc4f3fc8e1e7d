"""A real torchrun job on the etcd-v3 rendezvous: two agents on loopback, one killed
mid-training (with its worker, as when a machine dies); the survivor re-rendezvouses
and the job finishes once a replacement agent joins. torch finds the backend through
its entry-point group, as a user's torchrun does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.conftest import wait_for
from tests.processes import kill_machine

SCRIPT = Path(__file__).parents[2] / "examples" / "torchrun" / "train_ddp.py"
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("torchrun")]


def _agent(etcd_url: str, run: str, out: Path, name: str) -> subprocess.Popen:
    conf = "join_timeout=60,last_call_timeout=1,keep_alive_interval=1,keep_alive_max_attempt=2"
    log = (out.parent / f"{name}.log").open("wb")
    return subprocess.Popen(
        [
            sys.executable, "-m", "torch.distributed.run",
            "--rdzv-backend=etcd-v3", f"--rdzv-endpoint={etcd_url}", f"--rdzv-id={run}",
            f"--rdzv-conf={conf}", "--nnodes=2:3", "--nproc-per-node=1", "--max-restarts=5",
            "--monitor-interval=0.2", "--local-addr=127.0.0.1",
            str(SCRIPT), "--steps=40", "--step-seconds=0.1", f"--out={out}",
        ],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        env={**os.environ, "OMP_NUM_THREADS": "1", "LOGLEVEL": "INFO"},
    )  # fmt: skip


def _progress(out: Path) -> tuple[int, int]:
    try:
        step, world = (out / "progress").read_text().split()
        return int(step), int(world)
    except (FileNotFoundError, ValueError):
        return 0, 0


def test_torchrun_survives_a_killed_agent(etcd_server, tmp_path):
    run, out = uuid.uuid4().hex[:12], tmp_path / "out"
    first, second = (_agent(etcd_server.url, run, out, n) for n in ("a", "b"))
    agents = [first, second]
    try:
        wait_for(lambda: _progress(out) >= (10, 2), 60, "10 steps with 2 agents")
        kill_machine(second)
        killed_at = _progress(out)[0]
        replacement = _agent(etcd_server.url, run, out, "c")
        agents.append(replacement)
        assert first.wait(120) == 0, (tmp_path / "a.log").read_text()[-3000:]
        assert replacement.wait(30) == 0, (tmp_path / "c.log").read_text()[-3000:]
    finally:
        for agent in agents:
            if agent.poll() is None:
                kill_machine(agent)
    done = json.loads((out / "done.json").read_text())
    assert done["steps"] == 40 and done["world"] == 2
    assert done["restarts"] >= 1  # torchrun restarted the survivor's worker
    assert killed_at < 40
    log = (tmp_path / "a.log").read_text()
    assert "etcd-v3" in log
