"""A client's round: elastic's runtime loop, written again here (local epochs of
seeded shuffled batches with SGD, the seed elastic's worker uses for that client and
round), on that client's data; the training time measured inside the client."""

from __future__ import annotations

import time

import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fltorch.common import build_model, prepared

app = ClientApp()
torch.set_num_threads(1)  # as elastic's workers (--threads 1)


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = context.run_config
    data = prepared(str(cfg["data-file"]))
    client = int(context.node_config["partition-id"])
    model = build_model(data)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    round_ = int(msg.content["config"]["server-round"])
    x, y = data["x"][client], data["y"][client]
    started = time.perf_counter()
    seed = (int(cfg["seed"]) * 1_000_003 + round_) * 1009 + client
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=float(cfg["lr"]), momentum=float(cfg["momentum"])
    )
    model.train()
    size = int(cfg["batch-size"]) or len(x)
    for _ in range(int(cfg["local-epochs"])):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), size):
            batch = order[start : start + size]
            optimizer.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            loss.backward()
            optimizer.step()
    seconds = time.perf_counter() - started
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"num-examples": len(x), "train-seconds": seconds}),
        }
    )
    return Message(content=content, reply_to=msg)
