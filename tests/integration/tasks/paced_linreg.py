"""``linreg`` whose every loss takes ``[task] step_seconds`` (as a bigger model's
step would): slow enough for a test to kill or add a worker at a chosen step."""

from __future__ import annotations

import time

from elastic_plugins.tasks.linreg import LinReg


class PacedLinReg(LinReg):
    name = "paced-linreg"

    def __init__(self, params: dict) -> None:
        params = dict(params)
        self.step_seconds = float(params.pop("step_seconds", 0.1))
        super().__init__(params)

    def loss(self, model, inputs, targets):
        time.sleep(self.step_seconds)
        return super().loss(model, inputs, targets)
