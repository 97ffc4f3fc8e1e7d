"""What plugin authors subclass: ``Aggregator``, ``Task`` and ``Codec``, and the
dataclasses they receive.

A plugin contributes its classes by name through a hook (see ``elastic.hookspecs``);
a job spec then picks them by that name. Constructors validate their parameters and
raise ``JobSpecError`` with a message naming the key and the fix, so a bad job is
refused when it is submitted, not halfway through a run.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch.utils.data import Dataset

from elastic.errors import JobSpecError
from elastic.wire.messages import WireTensor

__all__ = ["Aggregator", "AsyncAggregator", "Task", "Codec", "Shard", "Update", "WorkerMode", "check_params"]

WorkerMode = Literal["train", "gradient", "delta"]


@dataclass(frozen=True)
class Shard:
    """Which part of a task's data a worker trains on: part ``index`` of ``count``.

    ``seed`` is the job's seed; a task splits its data the same way on every worker
    from it, so the parts are disjoint and together cover the data.
    """

    index: int
    count: int
    seed: int = 0


@dataclass
class Update:
    """One worker's contribution to a round, as the aggregator receives it.

    Attributes:
        worker: the sending worker's id.
        base_version: the model version the update was computed against.
        num_samples: how many samples it was computed on (its weight in averages).
        loss: the worker's mean training loss.
        kind: ``"weights"`` (the worker's trained weights; its delta is these minus
            the global model, which is still at ``base_version`` while the round
            runs), ``"gradient"``, or ``"delta"`` (trained weights minus the
            weights of ``base_version``: asynchronous rules).
        tensors: by state-dict name; zero-copy views over the received frames. Use
            ``WireTensor.add_to`` to fold one into an accumulator without a copy, or
            ``to_tensor()`` for the whole tensor.
        staleness: how many versions the model advanced since ``base_version``
            (always 0 for synchronous rules).
    """

    worker: str
    base_version: int
    num_samples: int
    loss: float
    kind: str
    tensors: Mapping[str, WireTensor] = field(default_factory=dict)
    staleness: int = 0


def check_params(owner: str, params: Mapping[str, Any], allowed: Mapping[str, type | tuple]) -> dict[str, Any]:
    """Check a plugin's parameters: no unknown keys, the right types. Returns a copy.

    Raises ``JobSpecError`` naming the key, what was expected and what is known.
    """
    out = dict(params)
    for key, value in out.items():
        if key not in allowed:
            known = ", ".join(sorted(allowed)) or "none"
            raise JobSpecError(f"{owner}: unknown parameter {key!r} (known: {known})")
        want = allowed[key]
        wants = want if isinstance(want, tuple) else (want,)
        ok = isinstance(value, wants) and not (isinstance(value, bool) and bool not in wants)
        if not ok and float in wants and isinstance(value, int) and not isinstance(value, bool):
            out[key] = float(value)
            ok = True
        if not ok:
            names = "/".join(t.__name__ for t in wants)
            raise JobSpecError(f"{owner}: parameter {key!r} must be {names}, got {value!r}")
    return out


class Aggregator(ABC):
    """A rule that folds worker updates into the next model version.

    The round engine calls, per round: ``begin_round()``, then ``accumulate(update)``
    once per accepted update *as it arrives*, then ``finalize()`` once, which must
    leave the new global weights in the model passed to ``setup``. Updates are not
    kept: a rule holds O(model) state, never O(workers x model).

    Class attributes:
        name: the name a job spec uses to pick this rule.
        worker_mode: what workers compute for it: ``"train"`` (local training; the
            update carries the trained weights), ``"gradient"`` (the gradient of
            the loss on one batch, with the model unchanged) or ``"delta"`` (local
            training; the update carries trained minus received weights).
    """

    name: ClassVar[str]
    worker_mode: ClassVar[WorkerMode] = "train"

    def __init__(self, params: Mapping[str, Any]) -> None:
        """Validate ``params`` (the job spec's ``[rule]`` table); raise ``JobSpecError``."""
        self.params = dict(params)

    @abstractmethod
    def setup(self, model: torch.nn.Module) -> None:
        """Take the job's global model (on CPU). Called once, before any round.

        Keep the model, or its ``Parameter`` and buffer objects
        (``elastic.training.update_template``), never ``state_dict()`` views: the
        engine sends the model from its own memory and, when a send is still
        queued as a round closes, moves the model's tensors to new memory (through
        ``.data``) before ``finalize``. Views would then point at the old memory.
        """

    @abstractmethod
    def begin_round(self) -> None:
        """Reset the running aggregate for a new round."""

    @abstractmethod
    def accumulate(self, update: Update) -> None:
        """Fold one update into the running aggregate."""

    @abstractmethod
    def finalize(self) -> None:
        """Write the new global weights into the model. Called only with >= 1 update."""

    # Whether ``accumulate_part`` is implemented: big updates may then be sent in parts.
    folds_parts: ClassVar[bool] = False

    def accumulate_part(self, update: Update, segments: Sequence[tuple[str, int, int]]) -> None:
        """Fold one part of an update; called only when ``folds_parts`` is True.

        A big update may be sent in parts, so that the coordinator never holds it
        whole (``elastic.wire.parts``). ``update.tensors`` then holds, for each
        ``(name, start, stop)`` in ``segments``, elements ``start:stop`` of the
        flattened tensor ``name``, as a 1-D tensor; the other fields are the whole
        update's. An update's parts come in order, each once, and every update of a
        round is cut at the same places. A worker may stop between parts (it left,
        or a part was refused): ``finalize`` must still make a sound model from what
        came. The built-in averaging rules weight each element by the updates that
        reached it, so a round where every update came whole, in parts or not, gives
        the same model.
        """
        raise NotImplementedError(f"{type(self).__name__} folds whole updates only")

    def state_dict(self) -> dict[str, Any]:
        """State to checkpoint (server optimizer, momentum...). Tensors, numbers, strings."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:  # noqa: B027 - optional hook
        """Restore what ``state_dict`` returned, after ``setup``."""


class AsyncAggregator(Aggregator):
    """A rule that folds updates in as they arrive, whatever version they started from.

    There are no rounds: the engine gives work (the current model) to every idle
    member, and each update comes back computed against the version its worker
    received. The engine refuses an update whose staleness (current version minus
    ``base_version``) exceeds ``max_staleness`` with a NACK, and sends that worker
    the current model; it never offers the same update twice. Otherwise it calls
    ``accumulate(update)`` with ``update.staleness`` set, then asks ``ready()``:
    when True it calls ``finalize()``, which writes the new model (one new version),
    and ``begin_round()`` to start the next buffer. Workers send ``"delta"`` updates
    (trained minus received weights), which stay meaningful after the model moved.

    Attributes:
        max_staleness: the bound on staleness; set it from the rule's parameters.
    """

    worker_mode: ClassVar[WorkerMode] = "delta"
    max_staleness: int = 10

    @abstractmethod
    def ready(self) -> bool:
        """Whether enough has been accumulated to make a new version now."""


class Task(ABC):
    """A training problem: the model, the data, the loss and the evaluation.

    The worker runtime owns the training loop (epochs, batches, optimizer), so a task
    only says *what* to train. It is built from the job spec's ``[task]`` table on the
    coordinator (to build and evaluate the global model) and on every worker.

    Class attributes:
        name: the name a job spec uses to pick this task.
    """

    name: ClassVar[str]

    def __init__(self, params: Mapping[str, Any]) -> None:
        """Validate ``params`` (the job spec's ``[task]`` table); raise ``JobSpecError``."""
        self.params = dict(params)

    @abstractmethod
    def build_model(self, seed: int) -> torch.nn.Module:
        """A freshly initialised model; the same ``seed`` must give the same weights."""

    @abstractmethod
    def train_dataset(self, shard: Shard, data_dir: Path | None) -> Dataset:
        """This worker's part of the training data; items are ``(inputs, targets)``.

        ``data_dir`` is the worker's ``--data`` directory, or None when it has none.
        """

    @abstractmethod
    def test_dataset(self, data_dir: Path | None) -> Dataset:
        """The held-out evaluation data (used by the coordinator)."""

    @abstractmethod
    def loss(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The mean loss of ``model`` on one batch (a scalar with a graph)."""

    def metrics(self, model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
        """Extra evaluation figures on one batch, as sums over its samples.

        The runtime adds them up over the test set and divides by its size. The
        default adds nothing; a classifier returns e.g. ``{"accuracy": correct}``.
        """
        return {}


class Codec(ABC):
    """A compression stage for update tensors, chosen by name in a job's codec chain
    (``[compression] update = ["topk:0.01", "fp16", "zstd"]``).

    Stages chain part by part: a tensor enters the first stage, each stage turns
    every part it ``accepts`` into named parts, and the next stage sees those (a
    part it does not accept passes through). The header records, per tensor, each
    stage applied with its argument and the shape and dtype it was given, so the
    coordinator decodes any chain with fresh instances and no other state.

    On a worker each tensor of each job gets its own instance, kept from round to
    round: state such as an error-feedback residual or warm-started factors lives on
    ``self``. ``decode`` must use no instance state. A codec computes on the tensor's
    device (CPU or CUDA) and must not move it, except a byte-level stage that has to
    work on host memory. Non-contiguous, empty and 0-d inputs must work.

    Class attributes:
        name: the name a chain uses to pick this codec (``"topk"`` in ``"topk:0.01"``).
        lossless: True when ``decode(encode(x))`` is ``x`` exactly.
        keeps_finite: True when ``decode`` of finite parts into float32 or float64
            can only give finite values (a cast to a wider type, finite values
            scattered into zeros). The coordinator already refuses parts with NaN
            or Inf; for a chain of such stages it skips checking the decoded tensor
            again. Leave it False when a product or a byte stage could overflow.
        cast_from: set (to a floating dtype) when ``decode`` is exactly its one part
            ``"x"``, of that dtype, cast to the tensor's wider dtype, and ``encode``
            works element by element (each element of ``"x"`` depends on that
            element of the input alone). Alone in a chain, such a stage is then not
            decoded at all: the part is folded as it came, widened element by element
            on the way (no decoded copy); and ``encode`` may be called on blocks of
            a tensor, written straight where they are sent from.
    """

    name: ClassVar[str]
    lossless: ClassVar[bool] = False
    keeps_finite: ClassVar[bool] = False
    cast_from: ClassVar[torch.dtype | None] = None

    def __init__(self, arg: str | None = None) -> None:
        """Parse the stage argument (``"topk:0.01"`` gives ``arg="0.01"``); raise
        ``JobSpecError`` naming the stage and the fix when it is not valid."""
        self.arg = arg

    def accepts(self, tensor: torch.Tensor) -> bool:
        """Whether this stage encodes ``tensor`` (default: floating-point tensors)."""
        return tensor.dtype.is_floating_point

    @abstractmethod
    def encode(self, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Encode one tensor into named parts (each sent as a tensor of its own)."""

    @abstractmethod
    def decode(self, parts: Mapping[str, torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Rebuild a tensor of ``shape`` and ``dtype`` from ``encode``'s parts.

        Parts come from the network: check what you rely on (names, sizes) and
        raise ``ValueError`` saying what is wrong; it becomes a NACK.
        """

    def encode_into(self, tensor: torch.Tensor, out: torch.Tensor) -> None:
        """For a ``cast_from`` codec: write ``encode(tensor)["x"]`` into ``out`` (flat,
        of ``cast_from``'s dtype, as many elements as ``tensor``), on blocks of a
        tensor as ``encode`` is. Override it to cast straight into ``out`` with no
        part in between; the default encodes and copies. ``ValueError`` when the
        codec gives parts other than ``x``."""
        parts = self.encode(tensor)
        if set(parts) != {"x"}:
            raise ValueError(f"codec {self.name} declares cast_from but returned parts {sorted(parts)}, not x")
        out.copy_(parts["x"].reshape(-1))

    def error_bound(self, tensor: torch.Tensor) -> float:
        """An upper bound on ``max |decode(encode(x)) - x|`` for one call on a fresh
        instance (no error feedback carried in), stated per codec and checked by the
        conformance tests. Default: 0 for lossless codecs, else ``max |x|``."""
        if self.lossless or tensor.numel() == 0:
            return 0.0
        return float(tensor.detach().abs().max())
