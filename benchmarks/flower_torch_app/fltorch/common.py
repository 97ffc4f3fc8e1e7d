"""What the server and the clients share: the prepared file (the model, its initial
weights, every client's data, the test set), read once per process."""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch


@lru_cache(maxsize=1)
def prepared(path: str) -> dict[str, Any]:
    return torch.load(path, weights_only=False)


def build_model(data: dict[str, Any]) -> torch.nn.Module:
    """The model the benchmark describes, with elastic's initial weights."""
    kind, options = data["model"]
    if kind == "mlp":
        model = torch.nn.Sequential(
            torch.nn.Linear(options["inputs"], options["hidden"]),
            torch.nn.ReLU(),
            torch.nn.Linear(options["hidden"], options["classes"]),
        )
    else:  # elastic's ResNet, from its own file (pure torch)
        spec = importlib.util.spec_from_file_location("resnet", Path(options["file"]))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        model = module.ResNet(**options["args"])
    model.load_state_dict(data["init"])
    return model
