"""Local "training": one SGD-like step on every parameter, the work elastic's
``synthetic`` task does per round; the update goes through Flower's SecAgg+ mod."""

from __future__ import annotations

import numpy as np
from flwr.client import ClientApp, NumPyClient
from flwr.client.mod import secaggplus_mod
from flwr.common import Context


class StepClient(NumPyClient):
    def fit(self, parameters, config):  # type: ignore[no-untyped-def]
        step = np.float32(0.001)
        return [w - step for w in parameters], 8, {}


def client_fn(context: Context):  # type: ignore[no-untyped-def]
    return StepClient().to_client()


app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
