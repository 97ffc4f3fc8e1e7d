"""Local "training": one SGD-like step on every parameter (an in-place scaled add),
the same small amount of work elastic's ``synthetic`` task does per round."""

from __future__ import annotations

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

app = ClientApp()


@app.train()
def train(msg: Message, context: Context) -> Message:
    step = np.float32(0.001)
    # Touches every parameter once, like the synthetic task's SGD step (the arrays
    # Flower hands over are read-only views of the message, hence a new array).
    weights = [w - step for w in msg.content["arrays"].to_numpy_ndarrays()]
    content = RecordDict(
        {"arrays": ArrayRecord(weights), "metrics": MetricRecord({"num-examples": 8})}
    )
    return Message(content=content, reply_to=msg)
