"""The coordinator's core driven by hand: no socket, no thread, a clock of our own.

Join, a round, a worker that crashes mid-round, the commit, and what goes out, as
the daemon's shell and ``elastic simulate`` see it."""

from __future__ import annotations

from pathlib import Path

import torch

from elastic.config import CoordinatorConfig
from elastic.coordinator.control import ControlAPI
from elastic.coordinator.core import CoordinatorCore
from elastic.jobspec import parse_job_spec
from elastic.membership.cluster import LeaderRecord
from elastic.membership.embedded import EmbeddedBackend
from elastic.plugins import Plugins
from elastic.simulation import SimulatedClock
from elastic.training import update_template
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.shm import LocalPeers
from elastic.wire.tensors import WireTensor

SPEC = {
    "job": {
        "id": "lin",
        "task": "linreg",
        "rule": "fedavg",
        "rounds": 5,
        "min_workers": 1,
        "round_timeout": 30,
    },
    "task": {"features": 3, "samples": 40},
}


def make_core(tmp_path: Path) -> tuple[CoordinatorCore, SimulatedClock]:
    clock = SimulatedClock()
    backend = EmbeddedBackend("embedded://")
    config = CoordinatorConfig(
        state_dir=tmp_path, heartbeat_interval=1.0, heartbeat_timeout=3.0, shared_memory=False
    )
    core = CoordinatorCore(
        config, Plugins(), backend, backend.election("c", 10), LocalPeers(False), clock=clock
    )
    assert core.election.campaign(LeaderRecord("c", "inproc://c"))
    core.begin_term([parse_job_spec(SPEC)])
    return core, clock


def sent(core: CoordinatorCore) -> list[tuple[str, MsgType, dict]]:
    return [(out.worker, out.message.type, out.message.meta) for out in core.take()]


def hello(worker: str) -> Message:
    return Message(
        MsgType.HELLO, sender=worker, meta={"device": "cpu", "host": "h", "software": "t", "pid": 1}
    )


def update_for(work: Message, worker: str, shift: float) -> Message:
    """The worker's trained weights: what it was sent, plus ``shift``; as decoded off the wire."""
    weights = {
        name: WireTensor.from_tensor(wt.to_tensor() + shift)
        for name, wt in work.tensors.items()
        if wt.dtype.is_floating_point
    }
    msg = Message(
        MsgType.UPDATE,
        job=work.job,
        round=work.round,
        version=work.version,
        sender=worker,
        key=work.key,
        meta={"num_samples": 10, "loss": 0.5, "kind": "weights", "train_seconds": 0.01},
        tensors=weights,
    )
    return decode([bytes(f) for f in encode(msg)])


def test_a_join_a_round_a_crash_and_a_commit_with_no_socket(tmp_path: Path) -> None:
    core, clock = make_core(tmp_path)
    job = core.engines["lin"].job
    start = {k: v.detach().clone() for k, v in update_template(job.model, "train").items()}

    for worker in ("w0", "w1"):
        core.receive(worker, hello(worker))
    welcomes = sent(core)
    assert [(w, t, m["slot"]) for w, t, m in welcomes] == [
        ("w0", MsgType.WELCOME, 0),
        ("w1", MsgType.WELCOME, 1),
    ]

    core.tick()  # the members join, round 1 starts
    work = {out.worker: out.message for out in core.take()}
    assert set(work) == {"w0", "w1"} and all(
        m.type is MsgType.WORK and m.round == 1 for m in work.values()
    )
    assert core.engines["lin"].status()["in_progress"]["participants"] == ["w0", "w1"]

    core.receive("w0", update_for(work["w0"], "w0", 1.0))
    assert sent(core) == [("w0", MsgType.ACK, {})]
    assert job.round == 0  # w1 has not answered: the round waits

    # w1 crashes: silent past the heartbeat timeout, while w0 keeps beating.
    for _ in range(4):
        clock.now += 1.0
        core.receive("w0", Message(MsgType.HEARTBEAT, sender="w0", meta={"busy": False}))
        core.tick()
    out = sent(core)
    assert ("w0", MsgType.HEARTBEAT_ACK, {}) in out
    assert job.round == 1 and job.version == 1  # committed with w0's update alone
    moved = {k: v.detach() - start[k] for k, v in update_template(job.model, "train").items()}
    assert all(
        torch.allclose(change, torch.ones_like(change)) for change in moved.values()
    )  # w0's +1, averaged over one update
    assert [e["event"] for e in job.events if e.get("worker") == "w1"] == ["joined", "left"]
    assert [m.id for m in core.members()] == ["w0"]
    assert [(w, t) for w, t, _ in out if t is MsgType.WORK] == [
        ("w0", MsgType.WORK)
    ]  # round 2 asks only who is left
    assert core.engines["lin"].status()["in_progress"] == {
        "round": 2,
        "participants": ["w0"],
        "answered": [],
    }
    assert (tmp_path / "lin" / "status.json").exists()


def test_what_the_core_refuses_it_answers_and_counts(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    stranger = Message(
        MsgType.UPDATE,
        job="lin",
        round=1,
        sender="x",
        key="x/lin/1",
        meta={"num_samples": 1, "loss": 0.0, "kind": "weights", "train_seconds": 0.0},
    )
    core.receive("x", stranger)
    core.reject(
        "y", "", "malformed_header", "not msgpack"
    )  # what the shell does with frames that do not decode
    core.receive("w0", hello("w0"))
    core.receive(
        "w0",
        Message(
            MsgType.WORK,
            sender="w0",
            meta={
                "mode": "train",
                "task": "t",
                "task_params": {},
                "train": {},
                "shard": [0, 1],
                "seed": 0,
            },
        ),
    )
    nacks = [(w, m["reason"]) for w, t, m in sent(core) if t is MsgType.NACK]
    assert nacks == [("x", "unknown_member"), ("y", "malformed_header"), ("w0", "unexpected_type")]
    assert core.rejected == {"unknown_member": 1, "malformed_header": 1, "unexpected_type": 1}


def test_the_control_api_asks_the_core(tmp_path: Path) -> None:
    core, _ = make_core(tmp_path)
    api = ControlAPI(core)
    reply = api.handle(Message(MsgType.REQUEST, meta={"op": "ls", "args": {}}))
    assert reply.meta["ok"] and [j["job"] for j in reply.meta["data"]["jobs"]] == ["lin"]
    spec = dict(SPEC, job={**SPEC["job"], "id": "lin2"})
    assert api.handle(Message(MsgType.REQUEST, meta={"op": "submit", "args": {"spec": spec}})).meta[
        "ok"
    ]
    again = api.handle(Message(MsgType.REQUEST, meta={"op": "submit", "args": {"spec": spec}}))
    assert (again.meta["ok"], again.meta["code"]) == (False, "conflict")
    paused = api.handle(Message(MsgType.REQUEST, meta={"op": "pause", "args": {"job": "lin2"}}))
    assert (
        paused.meta["data"]["desired"] == "paused"
        and core.board.jobs()["lin2"]["state"] == b"paused"
    )
    unknown = api.handle(Message(MsgType.REQUEST, meta={"op": "reboot", "args": {}}))
    assert (
        unknown.meta["code"] == "bad_request"
        and "known: cancel, export, finish, logs, ls, members" in unknown.meta["error"]
    )


def test_an_update_in_parts_is_tracked_once_by_the_core(tmp_path: Path) -> None:
    """The core keeps the one record of each update coming in parts: it grants them
    in turn, refuses one out of turn, and tells the engine when a stream that folded
    something stops (the round then waits for it no more)."""
    from elastic.wire.parts import part_message

    core, _ = make_core(tmp_path)
    core.config.upload_part = 8  # linreg's 4 floats: two parts
    for worker in ("w0", "w1"):
        core.receive(worker, hello(worker))
    core.tick()
    work = {out.worker: out.message for out in core.take() if out.message.type is MsgType.WORK}
    whole = update_for(work["w0"], "w0", 1.0)

    def offer() -> dict:
        core.receive(
            "w0",
            Message(
                MsgType.OFFER,
                job="lin",
                round=1,
                sender="w0",
                key=whole.key,
                meta={"bytes": whole.payload_bytes, "parts": True},
            ),
        )
        [(worker, kind, meta)] = sent(core)
        assert (worker, kind) == ("w0", MsgType.GRANT)
        return meta

    def part(index: int, segments: list) -> list[tuple[str, MsgType, dict]]:
        core.receive("w0", part_message(whole, index, 2, [tuple(s) for s in segments]))
        return sent(core)

    grant = offer()
    assert grant["part"] == [0, 2]
    [(_, kind, meta)] = part(1, grant["segments"])  # out of turn
    assert (
        kind is MsgType.NACK
        and meta["reason"] == "bad_part"
        and "expected part 0 of w0/lin/1" in meta["detail"]
    )
    assert (
        "w0" in core.engines["lin"].status()["in_progress"]["participants"]
    )  # nothing was folded: still asked

    grant = offer()
    [(_, kind, meta)] = part(0, grant["segments"])  # folded; the next part is granted
    assert kind is MsgType.GRANT and meta["part"] == [1, 2]
    [(_, kind, meta)] = part(0, grant["segments"])  # part 0 again: the stream ends
    assert kind is MsgType.NACK and meta["reason"] == "bad_part"
    assert core.engines["lin"].status()["in_progress"]["participants"] == [
        "w1"
    ]  # half folded: not waited for
    core.receive("w1", update_for(work["w1"], "w1", 3.0))
    assert sent(core) == [("w1", MsgType.ACK, {})] and core.engines["lin"].job.round == 1


def test_a_worker_streams_two_jobs_updates_at_once(tmp_path: Path) -> None:
    """A worker serving two jobs offers the second job's update while the first's is
    still coming in parts: both streams go on, each to its ACK."""
    from elastic.wire.parts import part_message

    core, _ = make_core(tmp_path)
    core.add_job(parse_job_spec({**SPEC, "job": {**SPEC["job"], "id": "lin2"}}))
    core.config.upload_part = 8  # linreg's 4 floats: two parts
    core.receive("w0", hello("w0"))
    core.tick()
    work = {out.message.job: out.message for out in core.take() if out.message.type is MsgType.WORK}
    assert sorted(work) == ["lin", "lin2"]
    updates = {job: update_for(w, "w0", 1.0) for job, w in work.items()}

    def offer(job: str) -> dict:
        whole = updates[job]
        core.receive(
            "w0",
            Message(
                MsgType.OFFER,
                job=job,
                round=1,
                sender="w0",
                key=whole.key,
                meta={"bytes": whole.payload_bytes, "parts": True},
            ),
        )
        [(_, kind, meta)] = sent(core)
        assert kind is MsgType.GRANT
        return meta

    def part(job: str, grant: dict) -> tuple[MsgType, dict]:
        index, count = grant["part"]
        core.receive(
            "w0", part_message(updates[job], index, count, [tuple(s) for s in grant["segments"]])
        )
        [(_, kind, meta)] = sent(core)
        return kind, meta

    kind, lin_next = part("lin", offer("lin"))
    assert kind is MsgType.GRANT and lin_next["part"] == [1, 2]
    kind, lin2_next = part("lin2", offer("lin2"))  # lin's stream stands
    assert kind is MsgType.GRANT and lin2_next["part"] == [1, 2]
    assert part("lin", lin_next) == (MsgType.ACK, {})
    assert part("lin2", lin2_next) == (MsgType.ACK, {})
    assert core.engines["lin"].job.round == 1 and core.engines["lin2"].job.round == 1
    assert not core.streams and not core.uploads.granted


def test_shards_without_a_worker_are_said_once(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    """Train-mode shards are their slots': with fewer workers than partitions some
    data is never trained on, and the coordinator says so (again only when the
    number of shards served changes)."""
    core, clock = make_core(tmp_path)
    core.add_job(parse_job_spec({**SPEC, "job": {**SPEC["job"], "id": "wide", "partitions": 4}}))
    core.receive("w0", hello("w0"))
    with caplog.at_level("WARNING", logger="elastic.rounds"):
        core.tick()
        core.take()
    said = [r.getMessage() for r in caplog.records if "shards without a worker" in r.getMessage()]
    assert said == [
        "shards without a worker job=wide shards=4 served=1: 3 of the 4 data shards "
        "(partitions) get no training; start 3 more workers, or lower partitions"
    ]


def test_a_worker_that_prepares_gets_work_once_it_says_it_is_ready(tmp_path: Path) -> None:
    from elastic.coordinator import core as core_module

    core, clock = make_core(tmp_path)
    msg = hello("w")
    msg.meta["prepares"] = True
    core.receive("w", msg)
    [(who, kind, meta)] = sent(core)
    assert kind is MsgType.WELCOME and meta["jobs"] == [
        {
            "job": "lin",
            "task": "linreg",
            "task_params": {"features": 3, "samples": 40},
            "seed": 0,
            "shard": [0, 1],
        }
    ]
    busy = Message(MsgType.HEARTBEAT, sender="w", meta={"busy": False, "preparing": True})
    for _ in range(3):
        clock.now += 0.5
        core.receive("w", busy)
        core.tick()
        assert [k for _, k, _ in sent(core)] == [MsgType.HEARTBEAT_ACK]  # no WORK yet
    ready = Message(MsgType.HEARTBEAT, sender="w", meta={"busy": False, "preparing": False})
    core.receive("w", ready)
    core.tick()
    assert MsgType.WORK in [k for _, k, _ in sent(core)]

    core.receive("v", Message(MsgType.HELLO, sender="v", meta={**msg.meta}))  # a build that hangs
    sent(core)
    clock.now += core_module.PREPARE_LIMIT + 1
    core.receive("v", busy)
    core.tick()
    assert "v" not in core.preparing  # given work anyway once the limit passed
