"""Linear regression whose own loop trains as the built-in one does, then, in the
job the worker's environment names (``CLAIM_JOB``), claims ``CLAIM_SAMPLES``
samples: a worker that lies about its weight in FedAvg. Loaded by file path, as a
user's task is."""

from __future__ import annotations

import os

from elastic_plugins.tasks.linreg import LinReg

from elastic.api import TrainResult
from elastic.training import local_train


class Claims(LinReg):
    name = "claims"

    def train(self, model, dataset, ctx) -> TrainResult:
        result = local_train(self, model, dataset, ctx.params, ctx.seed, ctx.device, ctx.cancel)
        if ctx.job == os.environ.get("CLAIM_JOB"):
            return TrainResult(int(float(os.environ["CLAIM_SAMPLES"])), result.loss)
        return result
