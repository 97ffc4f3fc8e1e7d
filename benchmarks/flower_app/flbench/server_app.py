"""Flower's own FedAvg strategy over ``nodes`` SuperNodes; writes the time at the end
of every round (Flower calls ``evaluate_fn`` before round 1 and after each round)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    params, tensors, nodes = int(cfg["params"]), int(cfg["tensors"]), int(cfg["nodes"])
    rng = np.random.default_rng(0)  # random values: Flower deduplicates identical pieces
    sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
    arrays = ArrayRecord([rng.standard_normal(n, dtype=np.float32) for n in sizes])
    marks: list[float] = []

    def mark(server_round: int, arrays: ArrayRecord) -> None:
        marks.append(time.time())

    strategy = FedAvg(
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=nodes,
        min_available_nodes=nodes,
        min_evaluate_nodes=0,
    )
    strategy.start(
        grid=grid, initial_arrays=arrays, num_rounds=int(cfg["rounds"]), evaluate_fn=mark
    )
    Path(str(cfg["out-file"])).write_text(json.dumps(marks))
