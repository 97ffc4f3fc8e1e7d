"""torchrun's side of ``vs_torchrun.py``: plain DDP (gloo) on the benchmark MLP.

Every rank appends ``step wall_time pid world`` to ``OUT/steps-<rank>.log`` after each
step; rank 0 checkpoints every ``--checkpoint-every`` steps (torchrun restarts every
worker on a membership change: this is what they resume from) and writes
``OUT/done.json`` (the median step after two warm-up steps) at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.mlp import build, rows  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, default=4608)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    model = build(args.hidden)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr)
    checkpoint, step = args.out / "checkpoint.pt", 0
    if checkpoint.exists():
        saved = torch.load(checkpoint, weights_only=True)
        model.load_state_dict(saved["model"])
        optimizer.load_state_dict(saved["optimizer"])
        step = saved["step"]
    ddp = DistributedDataParallel(model)
    x, y = rows(4096, 1)
    log = (args.out / f"steps-{rank}.log").open("a")
    durations = []
    while step < args.steps:
        began = time.perf_counter()
        start = (step * world + rank) * args.batch % (len(y) - args.batch)
        loss = torch.nn.functional.mse_loss(
            ddp(x[start : start + args.batch]), y[start : start + args.batch]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        step += 1
        durations.append(time.perf_counter() - began)
        log.write(f"{step} {time.time():.4f} {os.getpid()} {world}\n")
        log.flush()
        if rank == 0 and args.checkpoint_every and step % args.checkpoint_every == 0:
            partial = checkpoint.with_suffix(".tmp")
            torch.save(
                {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step},
                partial,
            )
            os.replace(partial, checkpoint)
    if rank == 0:
        done = {"step_seconds": statistics.median(durations[2:] or durations), "steps": step}
        (args.out / "done.json").write_text(json.dumps(done))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
