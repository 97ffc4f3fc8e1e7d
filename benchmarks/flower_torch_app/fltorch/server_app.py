"""Flower's own FedAvg over the clients; after every round the time, the global
model's test accuracy (when asked) and the slowest client's training time."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from flwr.app import ArrayRecord, Context, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fltorch.common import build_model, prepared

app = ServerApp()


def slowest(replies: list[RecordDict], weight_key: str) -> MetricRecord:
    seconds = [float(r["metrics"]["train-seconds"]) for r in replies]
    return MetricRecord({"train-seconds-max": max(seconds), "clients": len(seconds)})


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    data = prepared(str(cfg["data-file"]))
    model = build_model(data)
    nodes, per_round = int(cfg["nodes"]), int(cfg["per-round"])
    marks: list[float] = []
    accuracy: list[float] = []

    def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        marks.append(time.time())
        if int(cfg["evaluate"]) and server_round > 0:
            model.load_state_dict(arrays.to_torch_state_dict())
            model.eval()
            with torch.no_grad():
                hits = (model(data["x_test"]).argmax(dim=1) == data["y_test"]).sum()
            accuracy.append(float(hits) / len(data["y_test"]))
        return MetricRecord({})

    strategy = FedAvg(
        fraction_train=per_round / nodes,
        fraction_evaluate=0.0,
        min_train_nodes=per_round,
        min_available_nodes=nodes,
        min_evaluate_nodes=0,
        train_metrics_aggr_fn=slowest,
    )
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(model.state_dict()),
        num_rounds=int(cfg["rounds"]),
        evaluate_fn=evaluate,
    )
    train = [
        float(result.train_metrics_clientapp[r]["train-seconds-max"])
        for r in sorted(result.train_metrics_clientapp)
    ]
    Path(str(cfg["out-file"])).write_text(
        json.dumps({"marks": marks, "accuracy": accuracy, "train_seconds_max": train})
    )
