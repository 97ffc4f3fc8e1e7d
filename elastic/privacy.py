"""The privacy mechanism a plugin implements (``PrivacyMechanism``): what a job's
``[privacy]`` table turns on, around the job's rule and in each worker.

Plugins import it from ``elastic.api``. A mechanism has two halves. On the
coordinator it wraps the job's rule (``wrap``): the wrapper sees every update
before the rule does and decides what the rule receives (a clipped, noised mean;
the unmasked sum of masked inputs...). On each worker it runs on the update's change
before the update is packed (``protect``), told what to do by the settings the
coordinator sends with every WORK (``worker_settings``). The core knows no concrete
mechanism: ``[privacy] mechanism = "NAME"`` picks one by name, as ``rule`` does.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Protocol

import torch

from elastic.jobspec import JobSpec
from elastic.rules import Aggregator

__all__ = ["PrivacyMechanism", "Channel"]


class Channel(Protocol):
    """A worker's line to the job's rule during one round (EXCHANGE messages): what
    an interactive mechanism's ``protect`` talks through.

    Attributes:
        me: this worker's id.
        round_id: the job's id and the round's number, unique to this round.
    """

    me: str
    round_id: str

    def send(self, stage: str, data: dict[str, Any]) -> None:
        """Say ``data`` at ``stage`` to the coordinator's side (msgpack-able)."""

    def receive(self, stage: str, timeout: float) -> dict[str, Any]:
        """What the coordinator's side says at ``stage``; ``ElasticError`` when
        nothing comes within ``timeout`` seconds or the work is cancelled."""
        ...

    def answer(self, stage: str, handler: Callable[[Mapping[str, Any]], dict[str, Any]]) -> None:
        """Answer what comes at ``stage`` later in this round with ``handler`` (after
        ``protect`` has returned: it runs on the worker's receiving thread)."""


class PrivacyMechanism(ABC):
    """Protects the clients' data from what the coordinator (or whoever reads the
    model) learns. One object per job, on the coordinator.

    Class attributes:
        name: the name ``[privacy] mechanism`` uses to pick this mechanism.
    """

    name: ClassVar[str]
    # Whether ``protect`` talks with the coordinator (through its ``channel``):
    # such a mechanism needs real workers, not ``elastic simulate``.
    interactive: ClassVar[bool] = False

    def __init__(self, params: Mapping[str, Any], spec: JobSpec) -> None:
        """Validate ``params`` (the ``[privacy]`` table, ``mechanism`` removed)
        against the job; raise ``JobSpecError`` naming the key and the fix. The
        spec gives what accounting needs: clients, rounds, sampling."""
        self.params = dict(params)
        self.spec = spec

    @abstractmethod
    def wrap(self, rule: Aggregator) -> Aggregator:
        """The rule the coordinator runs in place of ``rule``: an ``Aggregator``
        (an ``AsyncAggregator`` for an asynchronous rule) that hands ``rule`` what
        the mechanism lets through. Raise ``JobSpecError`` for a rule it cannot
        protect. The wrapper's ``figures`` are the job's privacy figures and its
        ``exhausted`` ends the job when the budget is spent."""

    def worker_settings(self) -> dict[str, Any]:
        """What every WORK tells the workers' ``protect`` (msgpack-able), with
        ``mechanism`` set to this one's name by the caller; {}: workers do nothing."""
        return {}

    @classmethod
    def protect(
        cls,
        settings: Mapping[str, Any],
        change: dict[str, torch.Tensor],
        channel: Channel | None = None,
    ) -> dict[str, Any]:
        """On the worker: change ``change`` in place before it is packed, and say
        what the coordinator may want to know of it (the UPDATE's ``privacy``
        meta: short names, plain values; the coordinator bounds what it trusts).

        A mechanism whose rule has a ``wire_form`` replaces the entries of
        ``change`` with that form's tensors (new tensor objects, possibly over the
        same memory: they are sent as they are, never turned back into weights).
        It may withhold what the data would
        say beyond the update: ``num_samples`` and ``loss`` in the answer are sent
        in their place.

        Args:
            settings: what ``worker_settings`` gave, as received.
            change: the update as a change: trained minus received weights (local
                training), the delta, or the gradient; float tensors by name.
            channel: the line to the coordinator's side this round (interactive
                mechanisms; None in ``elastic simulate``).
        """
        return {}
