"""The control API: what ``elastic job ...`` and ``elastic members`` ask a coordinator.

A ROUTER socket of its own (``--control``), apart from the data path so that it can
be secured apart. Requests and replies are protocol messages like any other
(``REQUEST``: ``op`` and ``args``; ``REPLY``: ``ok``, ``data`` or ``code`` and
``error``) and are decoded with the same validation. An export's reply carries the
model as tensor frames. A request that fails gets a reply saying why, with a code:
``no_such_job``, ``invalid_job``, ``bad_request``, ``conflict``, ``cluster_unavailable``,
``internal``; nothing a client sends can stop the coordinator.

Pause/resume/finish/cancel write the job's desired state in the job store (so the
next leader keeps it) and take effect here at once. The API sees the coordinator
through ``Jobs``, the narrow face of its core: the jobs, the members, and what an
operator may ask of them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from elastic.coordinator.engine import Engine
from elastic.errors import (
    ConfigError,
    ControlError,
    ElasticError,
    MembershipUnavailable,
    PluginError,
)
from elastic.jobspec import JobSpec, parse_job_spec
from elastic.membership.base import Member
from elastic.typecheck import coerce
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor

__all__ = ["ControlAPI", "DESIRED", "Jobs"]

log = logging.getLogger("elastic.control")
DESIRED = {"pause": "paused", "resume": "running", "finish": "finished", "cancel": "cancelled"}
MAX_LOG_ENTRIES = 1000


def _arg(args: dict[str, Any], name: str, kind: type, default: Any = None) -> Any:
    value = args.get(name, default)
    try:
        return coerce(value, kind)
    except TypeError:
        raise ControlError(
            "bad_request", f"argument {name!r} must be {kind.__name__}, got {value!r}"
        ) from None


class Jobs(Protocol):
    """What the control API needs of a coordinator (``CoordinatorCore`` is one)."""

    @property
    def engines(self) -> Mapping[str, Engine]: ...

    def submit(self, spec: JobSpec) -> bool: ...
    def desire(self, engine: Engine, state: str) -> None: ...
    def members(self) -> list[Member]: ...


Reply = tuple[dict[str, Any], dict[str, WireTensor]]


class ControlAPI:
    def __init__(self, jobs: Jobs) -> None:
        self.jobs = jobs
        # Each operation by its name on the wire: what `elastic job` sends.
        self.operations: dict[str, Callable[[dict[str, Any]], Reply]] = {
            "ls": self.op_ls,
            "status": self.op_status,
            "submit": self.op_submit,
            "pause": self.op_pause,
            "resume": self.op_resume,
            "finish": self.op_finish,
            "cancel": self.op_cancel,
            "export": self.op_export,
            "logs": self.op_logs,
            "report": self.op_report,
            "members": self.op_members,
        }

    def handle(self, msg: Message) -> Message:
        """The REPLY to one request (an error reply, never an exception)."""
        try:
            if msg.type is not MsgType.REQUEST:
                raise ControlError(
                    "bad_request", f"the control socket takes REQUEST messages, not {msg.type}"
                )
            op = msg.meta["op"]
            handler = self.operations.get(op)
            if handler is None:
                raise ControlError(
                    "bad_request",
                    f"unknown operation {op!r} (known: {', '.join(sorted(self.operations))})",
                )
            data, tensors = handler(msg.meta["args"])
            return Message(
                MsgType.REPLY,
                key=msg.key,
                meta={"ok": True, "data": data, "code": "", "error": ""},
                tensors=tensors,
            )
        except ControlError as exc:
            return self._error(msg, exc.code, str(exc))
        except (ConfigError, PluginError) as exc:  # a job spec that does not validate
            return self._error(msg, "invalid_job", str(exc))
        except MembershipUnavailable as exc:
            return self._error(msg, "cluster_unavailable", str(exc))
        except ElasticError as exc:
            return self._error(msg, "failed", str(exc))
        except Exception as exc:  # a bug here must not take the coordinator down
            log.exception("control request failed op=%r", msg.meta.get("op"))
            return self._error(msg, "internal", f"{type(exc).__name__}: {exc}")

    def _error(self, msg: Message, code: str, error: str) -> Message:
        log.info(
            "control request refused op=%s code=%s error=%s", msg.meta.get("op", "?"), code, error
        )
        return Message(
            MsgType.REPLY, key=msg.key, meta={"ok": False, "data": {}, "code": code, "error": error}
        )

    def _engine(self, args: dict[str, Any]) -> Engine:
        job_id = _arg(args, "job", str)
        engine = self.jobs.engines.get(job_id)
        if engine is None:
            known = ", ".join(sorted(self.jobs.engines)) or "none"
            raise ControlError("no_such_job", f"no job {job_id!r} here (jobs: {known})")
        return engine

    # ------------------------------------------------------------ operations --

    def op_ls(self, args: dict[str, Any]) -> Reply:
        jobs = [
            {
                "job": e.job.spec.id,
                "task": e.job.spec.task,
                "rule": e.job.spec.rule,
                "state": str(e.job.state),
                "round": e.job.round,
                "rounds": e.job.spec.rounds,
                "version": e.job.version,
                "members": e.members_now,
            }
            for e in self.jobs.engines.values()
        ]
        return {"jobs": jobs}, {}

    def op_status(self, args: dict[str, Any]) -> Reply:
        engine = self._engine(args)
        status = engine.status()
        status["recent"] = status.pop("history")[-5:]
        return status, {}

    def op_submit(self, args: dict[str, Any]) -> Reply:
        raw = _arg(args, "spec", dict)
        spec = parse_job_spec(
            raw,
            source=_arg(args, "source", str, "submitted spec"),
            default_id=_arg(args, "default_id", str, "job"),
        )
        if not self.jobs.submit(spec):
            raise ControlError(
                "conflict",
                f"job {spec.id!r} exists already; give the new one another id ([job] id = ...)",
            )
        log.info(
            "job submitted job=%s task=%s rule=%s rounds=%d",
            spec.id,
            spec.task,
            spec.rule,
            spec.rounds,
        )
        return {"job": spec.id}, {}

    def _desire(self, args: dict[str, Any], op: str) -> Reply:
        engine = self._engine(args)
        job = engine.job
        if job.done:
            raise ControlError("failed", f"job {job.spec.id} is {job.state}: nothing to {op}")
        state = DESIRED[op]
        self.jobs.desire(engine, state)
        return {
            "job": job.spec.id,
            "state": str(job.state),
            "round": job.round,
            "desired": state,
        }, {}

    def op_pause(self, args: dict[str, Any]) -> Reply:
        return self._desire(args, "pause")

    def op_resume(self, args: dict[str, Any]) -> Reply:
        return self._desire(args, "resume")

    def op_finish(self, args: dict[str, Any]) -> Reply:
        return self._desire(args, "finish")

    def op_cancel(self, args: dict[str, Any]) -> Reply:
        return self._desire(args, "cancel")

    def op_export(self, args: dict[str, Any]) -> Reply:
        job = self._engine(args).job
        tensors = {
            k: WireTensor.from_tensor(v.detach().clone()) for k, v in job.model.state_dict().items()
        }
        return {
            "job": job.spec.id,
            "round": job.round,
            "version": job.version,
            "state": str(job.state),
        }, tensors

    def op_logs(self, args: dict[str, Any]) -> Reply:
        job = self._engine(args).job
        since = _arg(args, "since", int, 0)  # the last round the caller has (rounds run 1, 2, ...)
        entries = [h for h in job.history if h["round"] > since][:MAX_LOG_ENTRIES]
        return {
            "job": job.spec.id,
            "state": str(job.state),
            "entries": entries,
            "next": entries[-1]["round"] if entries else max(since, 0),
        }, {}

    def op_report(self, args: dict[str, Any]) -> Reply:
        """Everything ``elastic report`` plots: the status with the full history and events."""
        return self._engine(args).status(), {}

    def op_members(self, args: dict[str, Any]) -> Reply:
        now = time.monotonic()
        members = [
            {
                "id": m.id,
                "host": m.host,
                "device": m.device,
                "slot": m.slot,
                "busy": m.busy,
                "joined_seconds_ago": round(now - m.joined_at, 1),
                "seen_seconds_ago": round(now - m.last_seen, 1),
            }
            for m in self.jobs.members()
        ]
        return {"members": members}, {}
