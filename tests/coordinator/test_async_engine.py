"""The asynchronous engine, driven directly: members, updates and time are ours to set."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from elastic.coordinator.asynchronous import AsyncEngine
from elastic.coordinator.context import EngineContext
from elastic.coordinator.job import Job, JobState
from elastic.coordinator.status import STATUS_SHARE
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.training import update_template
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor
from tests.coordinator.test_rounds import Clock, Events, Fence, members


def make(tmp_path: Path, rule: dict | None = None, **job) -> tuple[AsyncEngine, Events, Clock]:
    spec = parse_job_spec(
        {
            "job": {
                "id": "a",
                "task": "linreg",
                "rule": "async",
                "rounds": 50,
                "min_workers": 2,
                "round_timeout": 10,
                "eval_every": 0,
                **job,
            },
            "task": {"samples": 60},
            "rule": {"max_staleness": 2, **(rule or {})},
        }
    )
    events, clock = Events(), Clock()
    return (
        AsyncEngine(Job(spec, Plugins(), tmp_path), EngineContext(notify=events, clock=clock)),
        events,
        clock,
    )


def answer(engine: AsyncEngine, work: Message, value: float = 0.5, **overrides) -> Message:
    worker = work.key.split("/")[0]
    fields = (
        dict(job=work.job, round=work.round, version=work.version, sender=worker, key=work.key)
        | overrides
    )
    tensors = {
        k: WireTensor.from_tensor(torch.full_like(v.detach(), value))
        for k, v in update_template(engine.job.model, "delta").items()
    }
    msg = Message(
        MsgType.UPDATE,
        meta={"num_samples": 10, "loss": 0.5, "kind": "delta", "train_seconds": 0.01},
        tensors=tensors,
        **fields,
    )
    return engine.on_update(worker, msg)


def by_worker(out: list) -> dict[str, Message]:
    return {o.worker: o.message for o in out}


def test_every_idle_member_gets_work_and_fresh_work_after_each_update(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path)
    assert engine.tick(members("a")) == [] and engine.job.state is JobState.WAITING
    work = by_worker(engine.tick(members("a", "b")))
    assert (
        sorted(work) == ["a", "b"] and work["a"].meta["mode"] == "delta" and work["a"].version == 0
    )
    assert engine.tick(members("a", "b")) == []  # both busy: nothing more to hand out
    w0 = engine.job.model.weight.detach().clone()
    assert answer(engine, work["a"]).type is MsgType.ACK
    assert engine.job.version == 1  # buffer 1: every update is a version
    torch.testing.assert_close(engine.job.model.weight.detach(), w0 + 0.5)
    again = by_worker(engine.tick(members("a", "b")))
    assert list(again) == ["a"] and again["a"].version == 1  # only a is idle; it pulls version 1
    assert answer(engine, work["b"]).type is MsgType.ACK  # b trained on version 0: staleness 1
    assert engine.job.history[-1]["staleness_max"] == 1
    assert engine.job.totals["staleness_histogram"] == {"0": 1, "1": 1}


def test_no_work_is_handed_out_while_the_lease_clock_has_run_out(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path)
    engine.ctx.holds = lambda: False  # woke from a stall within a loop pass: etcd not asked yet
    assert engine.tick(members("a", "b")) == [] and not engine.assigned
    engine.ctx.holds = lambda: True
    assert sorted(by_worker(engine.tick(members("a", "b")))) == ["a", "b"]


def test_too_stale_is_refused_and_the_worker_resyncs(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path)
    work = by_worker(engine.tick(members("fast", "slow")))
    slow = work["slow"]
    for _ in range(3):  # the model moves three versions past what slow holds
        assert answer(engine, work["fast"]).type is MsgType.ACK
        work = by_worker(engine.tick(members("fast", "slow")))
    version, weights = engine.job.version, engine.job.model.weight.detach().clone()
    nack = answer(engine, slow)
    assert (
        nack.type is MsgType.NACK
        and nack.meta["reason"] == "too_stale"
        and "staleness 3 > max_staleness 2" in nack.meta["detail"]
    )
    assert (engine.job.version, engine.job.totals["rejected_stale"]) == (version, 1)
    assert torch.equal(engine.job.model.weight.detach(), weights)  # nothing of it applied
    resync = by_worker(engine.tick(members("fast", "slow")))["slow"]
    assert resync.version == version  # it trains again on the current model


def test_an_update_is_applied_at_most_once(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, rule={"buffer": 2})
    work = by_worker(engine.tick(members("a", "b")))
    assert answer(engine, work["a"]).type is MsgType.ACK
    replay = answer(engine, work["a"])
    assert replay.type is MsgType.NACK and replay.meta["reason"] == "not_assigned"
    assert engine.job.version == 0 and engine.buffer.updates == 1  # still waiting for a second
    forged = answer(engine, work["b"], round=work["b"].round + 7)
    assert forged.meta["reason"] == "not_assigned"
    assert answer(engine, work["b"]).type is MsgType.ACK and engine.job.version == 1


def test_commits_wait_out_an_unconfirmed_leadership_without_losing_updates(tmp_path: Path) -> None:
    engine, events, clock = make(tmp_path)
    engine.ctx.fence = Fence(None, True)
    work = by_worker(engine.tick(members("a", "b")))
    assert answer(engine, work["a"]).type is MsgType.ACK
    assert engine.job.version == 0 and engine.buffer.updates == 1  # kept, not dropped
    clock.now += 2
    work = by_worker(engine.tick(members("a", "b")))
    assert engine.job.version == 1 and engine.job.history[-1]["updates"] == 1
    engine.ctx.fence = Fence(False)
    answer(engine, work["a"])
    assert engine.fenced and engine.job.version == 1 and engine.tick(members("a", "b")) == []


def test_deadline_leaving_failing_and_pausing(tmp_path: Path) -> None:
    engine, _, clock = make(tmp_path, min_workers=1)
    work = by_worker(engine.tick(members("a", "b", "c")))
    clock.now += 11  # a's assignment expires: it is sent the model again
    again = by_worker(engine.tick(members("a", "b", "c")))
    assert sorted(again) == ["a", "b", "c"] and again["a"].round != work["a"].round
    assert answer(engine, work["a"]).meta["reason"] == "not_assigned"  # the expired one
    engine.on_member_left("b")
    assert "b" not in engine.assigned
    engine.on_worker_failed("c", again["c"].round, "work_failed: boom")
    assert by_worker(engine.tick(members("a", "c"))) == {}  # a is busy, c sits out
    engine.set_desired("paused")
    assert answer(engine, again["a"]).type is MsgType.ACK  # work in progress still counts
    assert engine.tick(members("a")) == [] and engine.job.state is JobState.PAUSED
    engine.set_desired("running")
    assert list(by_worker(engine.tick(members("a")))) == ["a"]
    engine.set_desired("cancelled")
    assert engine.job.done and engine.assigned == {} and engine.tick(members("a")) == []


def test_the_job_finishes_after_its_versions_and_resumes_from_a_checkpoint(tmp_path: Path) -> None:
    engine, events, _ = make(tmp_path, rounds=4, min_workers=1)
    while not engine.job.done:
        for o in engine.tick(members("a")):
            answer(engine, o.message)
    assert [h["round"] for h in engine.job.history] == [
        1,
        2,
        3,
        4,
    ] and engine.job.state is JobState.FINISHED
    assert (engine.job.dir / "final.safetensors").exists() and events.names()[
        -1
    ] == "elastic_job_finished"
    resumed, _, _ = make(tmp_path, rounds=6, min_workers=1)
    assert resumed.job.version == 4 and resumed.job.totals["staleness_histogram"] == {"0": 4}
    assert resumed.histogram[0] == 4


def test_finish_makes_what_is_folded_the_last_version(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, rule={"buffer": 3}, min_workers=1)
    work = by_worker(engine.tick(members("a", "b")))
    assert answer(engine, work["a"]).type is MsgType.ACK and engine.buffer.updates == 1
    engine.set_desired("finished")
    assert engine.tick(members("a", "b")) == []  # the one folded update is the last version
    assert (
        engine.job.state is JobState.FINISHED
        and engine.job.version == 1
        and engine.job.history[-1]["updates"] == 1
    )
    assert (engine.job.dir / "final.safetensors").exists()
    assert answer(engine, work["b"]).meta["reason"] == "job_done"


def test_a_costly_status_is_written_less_often(tmp_path: Path) -> None:
    """The status grows with the history; writing it must not take over the loop."""
    engine, _, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    written = []

    def slow_write(status: dict, holds: object = None) -> bool:
        time.sleep(0.02)  # a big history: each write costs this much
        written.append(status["version"])
        return True

    engine.job.write_status = slow_write  # type: ignore[method-assign]
    engine.job.state = JobState.PAUSED  # a state change is written at once...
    engine.publisher.write()
    assert len(written) == 1 and engine.publisher.interval >= STATUS_SHARE * 0.02
    engine.job.state = JobState.RUNNING
    engine.publisher.write()  # ...and so is the next one
    assert len(written) == 2
    engine.publisher.write()  # the same state, right after a costly write: held back
    engine.publisher.flush()
    assert len(written) == 2 and engine.publisher.due
    engine.publisher.at -= engine.publisher.interval  # its interval is over
    engine.publisher.flush()
    assert len(written) == 3 and not engine.publisher.due
