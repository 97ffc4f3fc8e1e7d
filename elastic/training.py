"""The training loops the runtime owns, so that tasks only say what to train.

Workers use ``local_train`` (rules whose ``worker_mode`` is ``"train"``) and
``batch_gradient`` (``"gradient"``); the coordinator uses ``evaluate``.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from elastic.errors import Cancelled
from elastic.jobspec import TrainParams
from elastic.precision import autocast, grad_scaler
from elastic.tasks import Task, TrainResult

__all__ = [
    "TrainResult",
    "local_train",
    "batch_gradient",
    "evaluate",
    "dataset_tensors",
    "update_template",
    "update_kind",
    "move_to_fresh_memory",
]


def dataset_tensors(
    dataset: Dataset, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (inputs, targets) of an in-memory dataset moved to ``device``, else None."""
    if isinstance(dataset, TensorDataset) and len(dataset.tensors) == 2:
        x, y = dataset.tensors
        return x.to(device), y.to(device)
    return None


def _batches(
    dataset: Dataset, batch_size: int, device: torch.device, generator: torch.Generator | None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    n = len(dataset)  # type: ignore[arg-type]
    size = batch_size or n
    tensors = dataset_tensors(dataset, device)
    if tensors is not None:  # fast path: slice in-memory tensors, no per-sample collate
        x, y = tensors
        order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
        order = order.to(device)
        for start in range(0, n, size):
            idx = order[start : start + size]
            yield x[idx], y[idx]
        return
    loader = DataLoader(
        dataset, batch_size=size, shuffle=generator is not None, generator=generator
    )
    for inputs, targets in loader:
        yield inputs.to(device), targets.to(device)


def _optimizer(model: torch.nn.Module, params: TrainParams) -> torch.optim.Optimizer:
    if params.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=params.lr, weight_decay=params.weight_decay)
    return torch.optim.SGD(
        model.parameters(), lr=params.lr, momentum=params.momentum, weight_decay=params.weight_decay
    )


def local_train(
    task: Task,
    model: torch.nn.Module,
    dataset: Dataset,
    params: TrainParams,
    seed: int,
    device: torch.device,
    cancel: threading.Event | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``params.local_epochs`` epochs; the mean loss of the last epoch.

    With ``params.prox_mu`` = μ > 0 (FedProx, Li et al. 2020) every step also pulls
    toward the weights training started from, as if μ/2·‖w − w_start‖² were part of
    the task's loss: its gradient μ(w − w_start) is added after ``backward``, so any
    task gets it unchanged. The loss reported is the task's own.

    ``params.precision`` runs the forward pass under autocast (``elastic.precision``), fp16
    on CUDA with a gradient scaler. Raises ``Cancelled`` between batches once
    ``cancel`` is set (a daemon stopping).
    """
    model.train()
    optimizer = _optimizer(model, params)
    scaler = grad_scaler(device, params.precision)
    trained = [p for p in model.parameters() if p.requires_grad]
    anchors = [p.detach().clone() for p in trained] if params.prox_mu > 0 else []
    generator = torch.Generator().manual_seed(seed)
    n = len(dataset)  # type: ignore[arg-type]
    last = 0.0
    for _ in range(params.local_epochs):
        total, count = 0.0, 0
        for inputs, targets in _batches(dataset, params.batch_size, device, generator):
            if cancel is not None and cancel.is_set():
                raise Cancelled("training stopped: the worker is shutting down")
            optimizer.zero_grad(set_to_none=True)
            with autocast(device, params.precision):
                loss = task.loss(model, inputs, targets)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # the proximal term is added to true gradients
            else:
                loss.backward()
            for p, anchor in zip(trained, anchors, strict=False):  # FedProx's proximal term
                if p.grad is not None:
                    p.grad.add_(p.detach(), alpha=params.prox_mu).sub_(anchor, alpha=params.prox_mu)
            if scaler is not None:
                scaler.step(optimizer)  # skipped when a gradient overflowed
                scaler.update()
            else:
                optimizer.step()
            total += float(loss.detach()) * len(targets)
            count += len(targets)
        last = total / max(count, 1)
    return TrainResult(num_samples=n, loss=last)


def batch_gradient(
    task: Task,
    model: torch.nn.Module,
    dataset: Dataset,
    batch_size: int,
    step: int,
    seed: int,
    device: torch.device,
    precision: str = "fp32",
) -> TrainResult:
    """Leave in ``.grad`` the gradient of the mean loss on this step's batch.

    Batch ``step`` walks the shard in a per-epoch shuffled order (``batch_size`` 0:
    the whole shard, so every step sees every sample). ``precision``: the forward
    pass under autocast (no scaler: the gradient is sent as it is, unscaled).
    """
    model.train()
    model.zero_grad(set_to_none=False)
    n = len(dataset)  # type: ignore[arg-type]
    if batch_size == 0 or batch_size >= n:
        inputs, targets = next(_batches(dataset, 0, device, None))
    else:
        per_epoch = (n + batch_size - 1) // batch_size
        epoch, index = divmod(step, per_epoch)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        batches = _batches(dataset, batch_size, device, generator)
        for _ in range(index):
            next(batches)
        inputs, targets = next(batches)
    with autocast(device, precision):
        loss = task.loss(model, inputs, targets)
    loss.backward()
    return TrainResult(num_samples=len(targets), loss=float(loss.detach()))


@torch.no_grad()
def evaluate(
    task: Task,
    model: torch.nn.Module,
    dataset: Dataset,
    device: torch.device | str = "cpu",
    metrics: bool = True,
) -> dict[str, float]:
    """Mean loss (``eval_loss``) and (with ``metrics``) the task's metrics over ``dataset``."""
    device = torch.device(device)
    model.eval()
    sums: dict[str, float] = {}
    total_loss, n = 0.0, 0
    for inputs, targets in _batches(dataset, 4096, device, None):
        total_loss += float(task.loss(model, inputs, targets)) * len(targets)
        for key, value in (task.metrics(model, inputs, targets) if metrics else {}).items():
            sums[key] = sums.get(key, 0.0) + float(value)
        n += len(targets)
    out = {"eval_loss": total_loss / max(n, 1)}
    out.update({k: v / max(n, 1) for k, v in sums.items()})
    return out


def update_template(model: torch.nn.Module, mode: str) -> dict[str, torch.Tensor]:
    """The tensors an update carries for a rule's ``worker_mode``, by state-dict name.

    ``train`` and ``delta``: every floating-point parameter and buffer (sent as
    trained weights, or as trained minus received weights).
    ``gradient``: every parameter that requires a gradient.

    The values are the model's own ``Parameter`` and buffer objects, not
    ``state_dict()`` views, so they stay valid when ``move_to_fresh_memory`` moves
    the model: hold these (or the model), never views of them, across rounds.
    """
    if mode == "gradient":
        return {n: p for n, p in model.named_parameters() if p.requires_grad}
    named = dict(model.named_parameters(remove_duplicate=False)) | dict(
        model.named_buffers(remove_duplicate=False)
    )
    return {n: named[n] for n, t in model.state_dict().items() if t.is_floating_point()}


def update_kind(mode: str) -> str:
    """The ``kind`` of update a worker sends for a rule's ``worker_mode``."""
    return {"gradient": "gradient", "delta": "delta", "collective": "checkpoint"}.get(
        mode, "weights"
    )


@torch.no_grad()
def move_to_fresh_memory(model: torch.nn.Module) -> None:
    """Give every parameter and buffer new memory holding the same values.

    For when frames still queued in ZeroMQ alias the old memory, which must then not
    change: the tensors are rebound through ``.data``, so ``Parameter`` and buffer
    objects (and optimizers holding them) see the new memory; the old memory lives
    on, untouched, for as long as the queued frames need it.
    """
    for tensor in [*model.parameters(), *model.buffers()]:
        tensor.data = tensor.data.clone()
