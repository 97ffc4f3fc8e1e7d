"""The example plugin package installs with pip and is found like any plugin."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from elastic.api import Update
from elastic.wire.tensors import WireTensor

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "plugin-clipped-mean"


@pytest.mark.slow
def test_pip_installed_plugin_is_listed_and_usable(tmp_path: Path) -> None:
    target = tmp_path / "site"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--no-deps",
        "--no-build-isolation",
        "--target",
        str(target),
        str(EXAMPLE),
    ]
    subprocess.run(pip, check=True, timeout=300, capture_output=True)
    env = dict(os.environ, PYTHONPATH=str(target))
    listing = subprocess.run(
        [sys.executable, "-m", "elastic", "plugins", "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert listing.returncode == 0, listing.stderr
    rows = json.loads(listing.stdout)
    assert {
        "kind": "aggregator",
        "name": "clipped_mean",
        "class": "elastic_clipped_mean.ClippedMean",
        "distribution": "elastic-clipped-mean 0.1.0",
    } in rows
    assert {
        "kind": "observer",
        "name": "clipped_mean",
        "class": "-",
        "distribution": "elastic-clipped-mean 0.1.0",
    } in rows
    spec = tmp_path / "job.toml"
    spec.write_text('[job]\ntask = "linreg"\nrule = "clipped_mean"\n[rule]\nmax_norm = 0.5\n')
    ok = subprocess.run(
        [sys.executable, "-m", "elastic", "validate", str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    # and it drives a job: a coordinator and two worker processes, all finding the plugin
    spec.write_text(
        '[job]\nid = "clip"\ntask = "linreg"\nrule = "clipped_mean"\nrounds = 8\nmin_workers = '
        "2\neval_every = 0\n[rule]\nmax_norm = 0.5\n"
    )
    state = tmp_path / "state"
    ran = subprocess.run(
        [
            sys.executable,
            "-m",
            "elastic",
            "run",
            str(spec),
            "--local-workers",
            "2",
            "--quiet",
            "--state-dir",
            str(state),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert ran.returncode == 0, ran.stderr
    status = json.loads((state / "clip" / "status.json").read_text())
    assert status["state"] == "finished" and [h["round"] for h in status["history"]] == list(
        range(1, 9)
    )
    assert all(
        h["updates"] == 2 and h["observed_by"] == "clipped_mean" for h in status["history"]
    )  # its observer hook ran
    spec.write_text('[job]\ntask = "linreg"\nrule = "clipped_mean"\n[rule]\nmax_norm = -1.0\n')
    bad = subprocess.run(
        [sys.executable, "-m", "elastic", "validate", str(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert bad.returncode == 2 and "max_norm must be > 0" in bad.stderr


def test_clipping_math(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE))
    from elastic_clipped_mean import ClippedMean

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    rule = ClippedMean({"max_norm": 1.0})
    rule.setup(model)
    rule.begin_round()
    rule.accumulate(
        Update(
            "a",
            0,
            1,
            0.0,
            "weights",
            {"weight": WireTensor.from_tensor(torch.tensor([[4.0, 5.0]]))},
        )
    )  # delta norm 5 -> 1
    rule.accumulate(
        Update(
            "b",
            0,
            1,
            0.0,
            "weights",
            {"weight": WireTensor.from_tensor(torch.tensor([[1.2, 1.0]]))},
        )
    )  # kept
    rule.finalize()
    assert torch.allclose(model.weight.detach(), torch.tensor([[1 + (0.6 + 0.2) / 2, 1 + 0.8 / 2]]))
    assert rule.clipped == 1
