"""The plugin hooks. These docstrings are the plugin reference.

A plugin is a module (or object) with functions marked ``@hookimpl`` whose names
match the specs below, registered under the entry-point group ``elastic``::

    # pyproject.toml of your distribution
    [project.entry-points.elastic]
    my_rule = "my_package.my_rule"

    # my_package/my_rule.py
    from elastic.hookspecs import hookimpl

    @hookimpl
    def elastic_aggregators():
        return [MyRule]  # its ``name`` class attribute is what a job spec says

An implementation may accept any subset of a spec's arguments. Component hooks
(``elastic_aggregators``…) are read once when plugins load; classes are checked
then, so a broken plugin fails at start, naming its distribution. Event hooks are
notifications: they run in the coordinator's event loop, so they must return
quickly; an exception in one is logged with the plugin's name and does not stop the
daemon or the other observers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:
    from elastic.rules import Update

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "elastic"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------- components -----


@hookspec
def elastic_aggregators() -> list[type]:
    """Contribute aggregation rules.

    Returns:
        Subclasses of ``elastic.api.Aggregator``. Each one's ``name`` class
        attribute is the name a job spec uses (``rule = "NAME"``); a name given by
        two distributions is an error.
    """


@hookspec
def elastic_tasks() -> list[type]:
    """Contribute training tasks.

    Returns:
        Subclasses of ``elastic.api.Task``. Each one's ``name`` class attribute is
        the name a job spec uses (``task = "NAME"``).
    """


@hookspec
def elastic_codecs() -> list[type]:
    """Contribute compression codecs.

    Returns:
        Subclasses of ``elastic.api.Codec``. Each one's ``name`` class attribute is
        the stage name a job spec uses in its codec chain (``"NAME:ARG"``).
    """


@hookspec
def elastic_privacy_mechanisms() -> list[type]:
    """Contribute privacy mechanisms (differential privacy, secure aggregation...).

    Returns:
        Subclasses of ``elastic.api.PrivacyMechanism``. Each one's ``name`` class
        attribute is what a job spec's ``[privacy] mechanism`` says.
    """


@hookspec
def elastic_cluster_backends() -> list[type]:
    """Contribute cluster backends: where members, the leader and jobs are kept.

    Returns:
        Subclasses of ``elastic.api.ClusterBackend``. Each one's ``name`` class
        attribute is the URL scheme that picks it (``--membership NAME://…``). The
        suite in ``tests/membership/conformance.py`` says what one must do.
    """


# ---------------------------------------------------------- daemon lifecycle -----


@hookspec
def elastic_coordinator_started(address: str, jobs: list[str]) -> None:
    """The coordinator is bound and serving.

    Args:
        address: the ZeroMQ endpoint workers connect to (``tcp://host:port``).
        jobs: ids of the jobs it holds.
    """


@hookspec
def elastic_coordinator_stopping(reason: str) -> None:
    """The coordinator is about to stop (signal, or all jobs done with ``--exit-when-done``).

    Args:
        reason: why it stops, in words.
    """


# ---------------------------------------------------------------- membership -----


@hookspec
def elastic_worker_joined(worker_id: str, device: str, host: str, slot: int) -> None:
    """A worker joined (or re-joined after the coordinator lost it).

    Args:
        worker_id: the worker's id.
        device: where it trains (``cpu``, ``cuda:0``…).
        host: the host name it reported.
        slot: its stable slot number, which picks its data shard.
    """


@hookspec
def elastic_worker_left(worker_id: str, reason: str) -> None:
    """A worker left: a graceful goodbye, or it went silent past its heartbeat timeout.

    Args:
        worker_id: the worker's id.
        reason: why, in words (``bye``, ``no heartbeat for 3.1s``…).
    """


# -------------------------------------------------------------------- rounds -----


@hookspec
def elastic_job_waiting(job_id: str, members: int, needed: int) -> None:
    """A job cannot start its next round: fewer members than its ``min_workers``.

    Args:
        job_id: the job.
        members: how many workers are members now.
        needed: the job's ``min_workers``.
    """


@hookspec
def elastic_round_started(job_id: str, round: int, version: int, participants: list[str]) -> None:
    """A round started: the model at ``version`` went out to ``participants``.

    Args:
        job_id: the job.
        round: the round number (1-based; a re-run round keeps its number).
        version: the model version sent.
        participants: worker ids asked to contribute.
    """


@hookspec
def elastic_round_completed(job_id: str, round: int, version: int, metrics: dict[str, Any]) -> None:
    """A round was committed: the model is now at ``version`` and checkpointed
    (when the job's checkpoint policy says so).

    Args:
        job_id: the job.
        round: the round just committed.
        version: the new model version.
        metrics: figures of the round: ``loss`` (mean training loss), ``updates``,
            ``members``, ``seconds``, ``bytes_sent``, ``bytes_received``, and the
            evaluation figures when the job evaluated this round (``eval_loss``,
            ``accuracy``…).
    """


@hookspec
def elastic_round_abandoned(job_id: str, round: int, reason: str) -> None:
    """A round ended without enough updates to commit; it will be run again.

    Args:
        job_id: the job.
        round: the round number, which the re-run keeps.
        reason: why, in words.
    """


@hookspec
def elastic_job_finished(job_id: str, state: str, metrics: dict[str, Any]) -> None:
    """A job reached a final state.

    Args:
        job_id: the job.
        state: ``finished`` (all rounds done), ``budget_spent`` (the privacy
            budget allowed no further round), ``cancelled`` or ``failed``.
        metrics: the final evaluation figures and totals.
    """


# ------------------------------------------------------------------- updates -----


@hookspec(firstresult=True)
def elastic_validate_update(job_id: str, worker_id: str, update: Update) -> str | None:
    """Veto an update before it is folded in: return the reason, or None to let it pass.

    Called on the coordinator's event loop for every update that passed the built-in
    checks (shapes, finiteness, staleness, the job's limits); the first plugin that
    gives a reason refuses it with a NACK (``vetoed: <reason>``) and a metric, and
    the validators after it are not asked. A validator that raises refuses the
    update too (``vetoed: validator NAME failed: ...``). Return quickly.

    Args:
        job_id: the job.
        worker_id: who sent it.
        update: the update as the rule would receive it (tensors are zero-copy views).
    """


@hookspec
def elastic_update_rejected(job_id: str, worker_id: str, reason: str, detail: str) -> None:
    """The coordinator refused a message or an update and answered with a NACK.

    Args:
        job_id: the job it named (may be empty for a malformed message).
        worker_id: who sent it (the connection's identity).
        reason: a short code (``late``, ``duplicate``, ``non_finite``…).
        detail: the human-readable explanation sent back.
    """


# --------------------------------------------------------------- checkpoints -----


@hookspec
def elastic_checkpoint_saved(job_id: str, round: int, path: str, seconds: float) -> None:
    """A checkpoint was written atomically (write, fsync, rename).

    Args:
        job_id: the job.
        round: the round it holds.
        path: where it is.
        seconds: how long writing it took.
    """
