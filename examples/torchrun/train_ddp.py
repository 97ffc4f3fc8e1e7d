"""A DDP (gloo) training script for ``torchrun --rdzv-backend=etcd-v3``.

torchrun restarts every worker when membership changes, so the script resumes from
the checkpoint rank 0 writes after each step (atomically: write, then rename)::

    torchrun --rdzv-backend=etcd-v3 --rdzv-endpoint=127.0.0.1:2379 --rdzv-id=demo \\
        --nnodes=1:4 --nproc-per-node=1 --max-restarts=3 \\
        examples/torchrun/train_ddp.py --steps 200 --out /tmp/demo

When it finishes, rank 0 writes ``OUT/done.json``: the steps, the final world size
and how often torchrun restarted the workers.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-seconds", type=float, default=0.0, help="sleep per step")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    checkpoint, step = args.out / "checkpoint.pt", 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["step"]
    ddp = DistributedDataParallel(model)
    data = torch.Generator().manual_seed(rank)
    while step < args.steps:
        x = torch.randn(32, 16, generator=data)
        loss = ((ddp(x) - x.sum(1, keepdim=True)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        if rank == 0:
            partial = checkpoint.with_suffix(".tmp")
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                partial,
            )
            os.replace(partial, checkpoint)
            (args.out / "progress").write_text(f"{step} {world}\n")
        time.sleep(args.step_seconds)
    if rank == 0:
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        done = {"steps": step, "world": world, "restarts": restarts, "loss": loss.item()}
        (args.out / "done.json").write_text(json.dumps(done))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
