"""``allreduce``: collective data-parallel SGD with no restarts.

Workers form a torch.distributed group per generation (gloo on CPU, NCCL on CUDA)
and all-reduce their gradients peer to peer (in buckets, overlapped with the backward
pass, as torch's DDP does); the coordinator only runs the rendezvous and keeps checkpoints.
A job's ``rounds`` are optimizer steps; ``[train] batch_size`` is per rank (0: the
whole dataset every step, i.e. full-batch gradient descent).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from elastic.api import CollectiveRule, JobSpecError, check_params, hookimpl

__all__ = ["AllReduce"]


class AllReduce(CollectiveRule):
    """Data-parallel training with all-reduced gradients.

    Parameters (``[rule]``):
        optimizer: ``"sgd"`` (default) or ``"adam"``.
        lr: learning rate (default 0.1).
        momentum: SGD momentum (default 0.0).
        weight_decay: (default 0.0).
        checkpoint_every: steps between the checkpoints rank 0 sends (default 20).
        timeout: seconds a collective waits on a silent peer before the group is
            given up as broken (default 30).
        backend: ``"auto"`` (NCCL on CUDA workers, else gloo), ``"gloo"`` or ``"nccl"``.
    """

    name = "allreduce"

    def __init__(self, params: Mapping[str, Any]) -> None:
        p = check_params(
            "rule allreduce",
            params,
            {
                "optimizer": str,
                "lr": float,
                "momentum": float,
                "weight_decay": float,
                "checkpoint_every": int,
                "timeout": float,
                "backend": str,
            },
        )
        self._settings = {
            "optimizer": p.get("optimizer", "sgd"),
            "lr": p.get("lr", 0.1),
            "momentum": p.get("momentum", 0.0),
            "weight_decay": p.get("weight_decay", 0.0),
            "checkpoint_every": p.get("checkpoint_every", 20),
            "timeout": p.get("timeout", 30.0),
            "backend": p.get("backend", "auto"),
        }
        s = self._settings
        if s["optimizer"] not in ("sgd", "adam"):
            raise JobSpecError(
                f'rule allreduce: optimizer must be "sgd" or "adam", got {s["optimizer"]!r}'
            )
        if s["lr"] <= 0:
            raise JobSpecError(f"rule allreduce: lr must be > 0, got {s['lr']}")
        if not 0 <= s["momentum"] < 1:
            raise JobSpecError(f"rule allreduce: momentum must be in [0, 1), got {s['momentum']}")
        if s["checkpoint_every"] < 1:
            raise JobSpecError(
                f"rule allreduce: checkpoint_every must be >= 1 step, got {s['checkpoint_every']}"
            )
        if s["timeout"] < 1:
            raise JobSpecError(f"rule allreduce: timeout must be >= 1 s, got {s['timeout']}")
        if s["backend"] not in ("auto", "gloo", "nccl"):
            raise JobSpecError(
                f'rule allreduce: backend must be "auto", "gloo" or "nccl", got {s["backend"]!r}'
            )
        super().__init__(p)

    def settings(self) -> dict[str, Any]:
        return dict(self._settings)


@hookimpl
def elastic_aggregators() -> list[type]:
    return [AllReduce]
