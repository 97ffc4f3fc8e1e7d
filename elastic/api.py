"""Everything a plugin author needs, from one module.

A plugin contributes classes by name through a hook (``elastic.hookspecs``; mark
implementations with ``hookimpl``); a job spec then picks them by that name::

    from elastic.api import Aggregator, Update, check_params, hookimpl

    class Median(Aggregator):
        name = "median"          # the key in the registry and in job specs
        ...

    @hookimpl
    def elastic_aggregators():
        return [Median]

A job may also name a class by import path, with no plugin to install: ``task =
"my_tasks:MyTask"`` or ``"./my_task.py:MyTask"`` (``elastic.references``).

What to subclass: ``Aggregator`` or ``AsyncAggregator`` (a rule), ``Task`` (a model,
its data and loss; its own training loop if it overrides ``train``, given a
``TrainContext`` and returning a ``TrainResult``), ``Codec`` (a compression stage),
``ClusterBackend`` (where members, the leader and jobs are kept; with its
``MemberTable``, ``Election``, ``JobStore`` and ``Registration``),
``PrivacyMechanism`` (what a job's ``[privacy]`` turns on: around its rule on the
coordinator, on each worker's update; it reads the ``JobSpec``). What they
receive: ``Update`` (with ``WireTensor`` views), ``Shard``, ``Member``.
Constructors validate their parameters with ``check_params`` and raise
``JobSpecError`` naming the key and the fix, so a bad job is refused when it is
submitted, not halfway through a run. ``update_template`` gives the tensors a rule
updates in place; ``partition`` splits a task's samples among its shards by a
scheme (``iid``, ``dirichlet:ALPHA``, ...: ``elastic.partitions``).

The names below are defined in the modules that use them (``elastic.rules``,
``elastic.tasks``, ``elastic.compression``, ...); import them from here, which
stays stable when those move.
"""

from __future__ import annotations

from elastic.compression.codec import Codec
from elastic.errors import ElasticError, JobSpecError, PluginError
from elastic.hookspecs import hookimpl
from elastic.jobspec import JobSpec
from elastic.membership.base import Member, MembershipEvent, MemberTable
from elastic.membership.cluster import (
    ClusterBackend,
    Election,
    JobStore,
    LeaderRecord,
    Registration,
)
from elastic.partitions import check_partition, partition
from elastic.privacy import Channel, PrivacyMechanism
from elastic.rules import (
    Aggregator,
    AsyncAggregator,
    CollectiveRule,
    Partial,
    Said,
    Update,
    WorkerMode,
)
from elastic.tasks import Shard, Task, TrainContext, TrainResult, task_of
from elastic.training import update_template
from elastic.typecheck import check_params
from elastic.wire.tensors import WireTensor

__all__ = [
    "Aggregator",
    "AsyncAggregator",
    "CollectiveRule",
    "Channel",
    "Codec",
    "JobSpec",
    "JobSpecError",
    "ClusterBackend",
    "Election",
    "ElasticError",
    "JobStore",
    "LeaderRecord",
    "Member",
    "MemberTable",
    "MembershipEvent",
    "Registration",
    "Said",
    "Partial",
    "PluginError",
    "PrivacyMechanism",
    "Shard",
    "Task",
    "TrainContext",
    "TrainResult",
    "Update",
    "WireTensor",
    "WorkerMode",
    "check_params",
    "check_partition",
    "hookimpl",
    "partition",
    "task_of",
    "update_template",
]
