"""A user's own task, with no packaging: the README's example (a file beside the
job spec, with its own training loop) run by ``elastic run`` on two worker
processes; and a module on the daemons' import path: a worker that cannot load it
says so, naming the task and its host, and the job finishes with the others."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_references import TASK

from .conftest import Cluster, wait_for, write_job

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_elastic_run_trains_the_example_task_from_its_file_with_its_own_loop(
    tmp_path: Path,
) -> None:
    """The README's example, as a user runs it: ``examples/my-task.toml`` names
    ``./my_task.py:Circles`` (a loop of its own), from another directory."""
    summary = tmp_path / "summary.json"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic",
            "run",
            str(EXAMPLES / "my-task.toml"),
            "--local-workers",
            "2",
            "--quiet",
            "--summary",
            str(summary),
            "--state-dir",
            str(tmp_path / "state"),
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,  # not the job's directory: the path is the job file's
        timeout=180,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(summary.read_text())
    assert figures["state"] == "finished" and figures["rounds"] == 15
    assert figures["accuracy"] >= 0.9, figures  # the bar the README's example reaches
    history = json.loads((tmp_path / "state" / "my-task" / "status.json").read_text())["history"]
    assert all(r["updates"] == 2 for r in history)  # both workers loaded the file
    assert f"elastic report {tmp_path / 'state'} --out report.png" in run.stderr

    def report(out: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "elastic", "report", str(tmp_path / "state"), "--out", out],
            capture_output=True,
            text=True,
            cwd=tmp_path,
            timeout=120,
        )

    made = report("circles.html")  # the run's folder: no coordinator to ask
    assert made.returncode == 0, made.stderr
    assert "wrote the report of job my-task (15 rounds)" in made.stdout
    assert "data:image/png;base64," in (tmp_path / "circles.html").read_text()
    refused = report("circles.json")
    assert refused.returncode == 2 and not (tmp_path / "circles.json").exists()
    assert "cannot tell a format from '.json'; name a .png or .html file" in refused.stderr


def test_the_readme_shows_the_example_task_as_it_is() -> None:
    code = (EXAMPLES / "my_task.py").read_text()
    code = code[code.index("import torch") :].strip()
    assert code in (EXAMPLES.parent / "README.md").read_text()


def test_a_worker_without_the_module_sits_out_and_the_job_finishes(
    cluster: Cluster, tmp_path: Path
) -> None:
    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "team_tasks.py").write_text(TASK)
    has_it = {"PYTHONPATH": os.pathsep.join([str(modules), os.environ.get("PYTHONPATH", "")])}
    job = write_job(
        tmp_path / "team.toml",
        '[job]\nid = "team"\ntask = "team_tasks:Line"\nrule = "fedavg"\nrounds = 5\n'
        "min_workers = 2\neval_every = 0\n",
    )
    cluster.env = has_it  # the coordinator loads it too
    cluster.coordinator(job)
    cluster.env = {}
    cluster.worker("w2")  # its Python has no team_tasks; a member before the first round
    log = tmp_path / "coordinator.log"
    wait_for(lambda: "worker joined worker=w2" in log.read_text(), 30, "w2 to join")
    cluster.env = has_it
    for wid in ("w0", "w1"):
        cluster.worker(wid)
    status = cluster.wait_status("team", lambda s: s["state"] == "finished", 90, "the job to end")
    assert status["round"] == 5
    coordinator = log.read_text()
    said = (
        f"worker=w2 detail=task_unavailable: cannot load task 'team_tasks:Line' on "
        f"{socket.gethostname()}: no module 'team_tasks'"
    )
    assert said in coordinator, cluster.dump_logs()
    assert coordinator.count("worker could not do its work job=team worker=w2") == 1  # benched
    assert "worker sits out the next rounds job=team worker=w2" in coordinator
