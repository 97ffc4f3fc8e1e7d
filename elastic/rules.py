"""The aggregation rule a plugin implements (``Aggregator``, ``AsyncAggregator``),
and the ``Update`` it folds.

Plugins import these from ``elastic.api``. The maths belongs in pure functions
(``elastic_plugins.averaging`` has the built-in ones); a rule class stays thin.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from elastic.wire.tensors import WireTensor

__all__ = [
    "Aggregator",
    "AsyncAggregator",
    "CollectiveRule",
    "Partial",
    "Said",
    "Update",
    "WorkerMode",
]

WorkerMode = Literal["train", "gradient", "delta", "collective"]
# A step of a rule's conversation with a participant: (worker, stage, data).
Said = tuple[str, str, dict[str, Any]]


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
        privacy: what the worker's privacy step says of the update (the job's
            privacy mechanism reads it, e.g. ``below_clip``); a claim, to be bounded.
    """

    worker: str
    base_version: int
    num_samples: int
    loss: float
    kind: str
    tensors: Mapping[str, WireTensor] = field(default_factory=dict)
    staleness: int = 0
    privacy: Mapping[str, Any] = field(default_factory=dict)


@dataclass
class Partial:
    """A rule's aggregate over some of a round's updates, to be merged with other
    partials of the same round into the one a flat round would make (hierarchical
    aggregation: an edge's contribution to its parent's round).

    Attributes:
        tensors: by state-dict name, the weighted mean of the updates folded (each
            element over the updates that reached it; 0 where none did).
        weights: by name, ``(start, stop, weight)`` ranges of the flattened tensor:
            the weight folded into those elements (one range per tensor unless
            updates came in parts and some stopped halfway). Empty: nothing folded.
    """

    tensors: Mapping[str, torch.Tensor]
    weights: Mapping[str, Sequence[tuple[int, int, float]]]


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
    # Whether the new model depends on the updates only through their (weighted) mean:
    # a privacy mechanism may then fold the updates itself and give the rule one
    # update, their clipped and noised mean, in their place (FedAvg, FedOpt, syncavg,
    # async; not a median or Krum, which need every update).
    averages: ClassVar[bool] = False

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

    # Whether a round's aggregate can be computed in pieces (``partial`` over some
    # updates, ``merge`` of the pieces) to the flat round's result: weighted means
    # can, a median or Krum cannot. A hierarchical job needs it.
    decomposable: ClassVar[bool] = False

    def partial(self) -> Partial:
        """This round's aggregate so far, as a piece for another instance of the
        rule to ``merge`` (called instead of ``finalize``; the model is left as it
        was). Decomposable rules only."""
        raise NotImplementedError(f"rule {self.name} cannot be computed in pieces")

    def merge(self, partial: Partial) -> None:
        """Fold a ``partial`` of this round (another instance's, over other
        updates) as ``accumulate`` folds an update: merging the partials of a
        split of the updates, then ``finalize``, must make the model that
        accumulating every update would. Decomposable rules only."""
        raise NotImplementedError(f"rule {self.name} cannot be computed in pieces")

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

    def figures(self) -> dict[str, float]:
        """Figures of the rule's own after a commit (the privacy spent, a clipping
        norm...): added to the round's metrics, hence to the status, the history,
        ``elastic job status``, the Prometheus metrics and the report. Numbers only."""
        return {}

    # ------------------------------------------------ conversations (optional) --
    # A rule may talk with a synchronous round's participants besides their updates
    # (a secure aggregation's keys and shares), through EXCHANGE messages. The round
    # engine delivers what they say and sends what the rule answers; a rule that
    # says nothing needs none of these.

    def wire_form(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]] | None:
        """The tensors an update travels as when they are not the model's (a masked
        vector): names, shapes and dtypes, checked exactly; None: the model's own."""
        return None

    def round_started(self, number: int, participants: Sequence[str]) -> list[Said]:
        """A round asked ``participants``; what to tell them at once."""
        return []

    def exchange(self, worker: str, stage: str, data: Mapping[str, Any]) -> list[Said]:
        """``worker`` said ``data`` at ``stage``; the answers. Raise ``ValueError``
        to refuse it (the worker gets a NACK naming the reason)."""
        raise ValueError(f"rule {self.name} holds no conversations")

    def poll(self, now: float, present: Collection[str]) -> list[Said]:
        """Time passed (the engine's clock) and ``present`` are the members: what to
        say now (a stage's deadline passed, someone left)."""
        return []

    def closing(self, answered: Sequence[str]) -> list[Said] | str:
        """The round's updates are in (``answered`` sent theirs): what to ask before
        ``finalize`` may run; [] when it may run now; a reason when the round cannot
        be committed (it is then abandoned)."""
        return []

    def settled(self, give_up: bool) -> bool | str:
        """After ``closing`` asked something: True when ``finalize`` may run, False
        to wait for more, a reason when the round cannot be committed (it is then
        abandoned). ``give_up``: the round's time is over; decide now."""
        return True

    def exhausted(self) -> str | None:
        """Why no further version may be made, if so (a privacy budget the next one
        would exceed): asked before each round or version. The job then ends in
        state ``budget_spent``, its final model written. None: go on."""
        return None


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
        buffer: how many updates make a version, when the rule says (``ready``).
    """

    worker_mode: ClassVar[WorkerMode] = "delta"
    max_staleness: int = 10
    buffer: int = 1  # updates folded into each version (what ``ready`` waits for)

    def staleness_weight(self, staleness: int) -> float:
        """The weight in [0, 1] the rule gives an update this many versions old
        (1: none lost); a privacy mechanism folding updates for the rule uses it."""
        return 1.0

    @abstractmethod
    def ready(self) -> bool:
        """Whether enough has been accumulated to make a new version now."""


class CollectiveRule(Aggregator):
    """A rule whose workers train together, their gradients all-reduced peer to peer
    (torch.distributed: gloo on CPU, NCCL on CUDA), with the coordinator off the data
    path (``elastic.coordinator.collective``).

    The coordinator runs the rendezvous: each set of members is a *generation* with
    its ranks; members that leave, crash or join end the generation, and the others
    go on in the next one in the same process, from the state of the lowest
    surviving rank. A job's ``rounds`` are its optimizer steps. Every
    ``checkpoint_every`` steps rank 0 sends the model, the optimizer's state and
    the position in the data: ``accumulate`` takes that ``Update`` (``kind``
    ``"checkpoint"``; model tensors by state-dict name, optimizer tensors under
    ``optimizer/``) and ``finalize`` writes it into the model, to be checkpointed.

    Subclasses say how workers train through ``settings``.
    """

    worker_mode: ClassVar[WorkerMode] = "collective"

    @abstractmethod
    def settings(self) -> dict[str, Any]:
        """What every worker of the job is told (msgpack-able): ``optimizer``
        (``sgd`` or ``adam``), ``lr``, ``momentum``, ``weight_decay``, ``timeout``
        (seconds a collective may wait on a peer), ``backend`` (``auto``, ``gloo``
        or ``nccl``) and ``checkpoint_every`` (steps)."""

    def setup(self, model: torch.nn.Module) -> None:
        self.model = model
        self.optimizer_state: dict[str, torch.Tensor] = {}
        self.optimizer_layout = ""  # the optimizer's state without tensors (msgpack, hex)
        self.position = {"step": 0, "epoch": 0, "offset": 0}  # where the data stands
        self._incoming: Update | None = None

    def begin_round(self) -> None:
        self._incoming = None

    def accumulate(self, update: Update) -> None:
        self._incoming = update

    def finalize(self) -> None:
        update = self._incoming
        assert update is not None
        state = self.model.state_dict()
        with torch.no_grad():
            for name, tensor in update.tensors.items():
                if name in state:
                    tensor.copy_to(state[name])
        self.optimizer_state = {
            name: t.to_tensor().clone()
            for name, t in update.tensors.items()
            if name.startswith("optimizer/")
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "optimizer": dict(self.optimizer_state),
            "layout": self.optimizer_layout,
            "position": dict(self.position),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer_state = dict(state.get("optimizer", {}))
        self.optimizer_layout = str(state.get("layout", ""))
        self.position = {k: int(v) for k, v in state.get("position", self.position).items()}
