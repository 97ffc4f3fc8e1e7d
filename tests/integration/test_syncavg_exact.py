"""syncavg across 3 real worker processes == single-process full-batch SGD on the union."""

from __future__ import annotations

from pathlib import Path

import pytest
import safetensors.torch
import torch
from elastic_plugins.tasks.linreg import LinReg

from elastic.api import Shard

from .conftest import Cluster, write_job

pytestmark = pytest.mark.slow

STEPS, LR, SEED = 20, 0.1, 5
TASK = {"samples": 300, "features": 8, "noise": 0.1, "data_seed": 2}


def reference() -> dict[str, torch.Tensor]:
    task = LinReg(TASK)
    model = task.build_model(SEED)
    shards = [task.train_dataset(Shard(i, 3, SEED), None) for i in range(3)]
    x = torch.cat([s.tensors[0] for s in shards])
    y = torch.cat([s.tensors[1] for s in shards])
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    for _ in range(STEPS):
        opt.zero_grad()
        task.loss(model, x, y).backward()
        opt.step()
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_syncavg_three_workers_equals_full_batch_sgd(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(tmp_path / "lin.toml", f"""
[job]
id = "lin"
task = "linreg"
rule = "syncavg"
rounds = {STEPS}
min_workers = 3
eval_every = 0
seed = {SEED}
[task]
samples = {TASK['samples']}
features = {TASK['features']}
noise = {TASK['noise']}
data_seed = {TASK['data_seed']}
[train]
batch_size = 0
[rule]
lr = {LR}
""")
    coordinator = cluster.coordinator(job, extra=("--exit-when-done",))
    for i in range(3):
        cluster.worker(f"w{i}")
    status = cluster.wait_status("lin", lambda s: s["state"] == "finished", 90, "syncavg job to finish")
    assert [h["round"] for h in status["history"]] == list(range(1, STEPS + 1))
    assert all(h["updates"] == 3 for h in status["history"])
    got = safetensors.torch.load_file(cluster.state / "lin" / "final.safetensors")
    want = reference()
    for name, tensor in want.items():
        assert torch.allclose(got[name], tensor, atol=1e-5, rtol=0), (name, (got[name] - tensor).abs().max())
    assert coordinator.wait(20) == 0  # --exit-when-done: a clean exit once the job is done
    log = (tmp_path / "coordinator.log").read_text()
    assert "coordinator stopping reason=all jobs done bytes_in=" in log and "rejected=none" in log
    # and it actually learned something: far from the initial weights
    assert (got["weight"] - LinReg(TASK).build_model(SEED).weight.detach()).abs().max() > 0.1
