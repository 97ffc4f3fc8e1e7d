"""Flower's FedAvg under its SecAgg+ workflow over ``nodes`` SuperNodes; writes the
time at the end of every round (the strategy's ``evaluate_fn`` runs before round 1
and after each round)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from flwr.common import Context, ndarrays_to_parameters
from flwr.server import Grid, LegacyContext, ServerApp, ServerConfig
from flwr.server.strategy import FedAvg
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    params, tensors, nodes = int(cfg["params"]), int(cfg["tensors"]), int(cfg["nodes"])
    rng = np.random.default_rng(0)
    sizes = [params // tensors + (1 if i < params % tensors else 0) for i in range(tensors)]
    initial = [rng.standard_normal(n, dtype=np.float32) for n in sizes]
    marks: list[float] = []

    def mark(server_round, parameters, config):  # type: ignore[no-untyped-def]
        marks.append(time.time())
        return None

    strategy = FedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,
        min_fit_clients=nodes,
        min_available_clients=nodes,
        initial_parameters=ndarrays_to_parameters(initial),
        evaluate_fn=mark,
    )
    legacy = LegacyContext(
        context=context, config=ServerConfig(num_rounds=int(cfg["rounds"])), strategy=strategy
    )
    workflow = DefaultWorkflow(
        fit_workflow=SecAggPlusWorkflow(
            num_shares=int(cfg["num-shares"]),
            reconstruction_threshold=int(cfg["threshold"]),
            clipping_range=float(cfg["clipping-range"]),
        )
    )
    workflow(grid, legacy)
    Path(str(cfg["out-file"])).write_text(json.dumps(marks))
