"""The round engine, driven directly: members, updates and time are ours to set."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zmq

from elastic.coordinator.context import EngineContext
from elastic.coordinator.job import Job, JobState
from elastic.coordinator.rounds import RoundEngine
from elastic.coordinator.uploads import Part, UploadStream
from elastic.errors import CheckpointError, JobSpecError
from elastic.jobspec import parse_job_spec
from elastic.membership.base import Member
from elastic.plugins import Plugins
from elastic.training import update_template
from elastic.wire.frames import decode, encode
from elastic.wire.header import Message, MsgType
from elastic.wire.tensors import WireTensor
from elastic.wire.transport import send_message
from tests.conftest import wait_until_free


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Events(list):
    def __call__(self, hook: str, **kwargs) -> None:
        self.append((hook, kwargs))

    def names(self) -> list[str]:
        return [h for h, _ in self]


def make(
    tmp_path: Path, task: dict | None = None, compression: dict | None = None, **job
) -> tuple[RoundEngine, Events, Clock]:
    spec = parse_job_spec(
        {
            "job": {
                "id": "j",
                "task": "linreg",
                "rule": "fedavg",
                "rounds": 3,
                "min_workers": 2,
                "round_timeout": 10,
                **job,
            },
            "task": {"samples": 60, **(task or {})},
            "compression": compression or {},
        }
    )
    events, clock = Events(), Clock()
    return (
        RoundEngine(Job(spec, Plugins(), tmp_path), EngineContext(notify=events, clock=clock)),
        events,
        clock,
    )


def members(*ids: str) -> list[Member]:
    return [Member(id=i, slot=n) for n, i in enumerate(ids)]


def update_for(
    engine: RoundEngine, work: Message, worker: str, value: float = 1.0, **overrides
) -> Message:
    template = update_template(engine.job.model, "train")
    fields = dict(
        job=work.job,
        round=work.round,
        version=work.version,
        sender=worker,
        key=f"{worker}/{work.job}/{work.round}",
    )
    fields.update(overrides)
    return Message(
        MsgType.UPDATE,
        meta={"num_samples": 10, "loss": 0.5, "kind": "weights", "train_seconds": 0.01},
        tensors={
            k: WireTensor.from_tensor(v.detach() + value) for k, v in template.items()
        },  # delta = value
        **fields,
    )


def test_waits_for_min_workers_then_sends_the_model(tmp_path: Path) -> None:
    engine, events, _ = make(tmp_path)
    assert engine.tick(members("a")) == []
    assert engine.job.state is JobState.WAITING and "elastic_job_waiting" in events.names()
    out = engine.tick(members("a", "b"))
    assert sorted(o.worker for o in out) == ["a", "b"]
    work = out[0].message
    assert (work.type, work.round, work.version, work.meta["shard"]) == (MsgType.WORK, 1, 0, [0, 2])
    assert set(work.tensors) == set(engine.job.model.state_dict())


def test_round_commits_when_all_answered(tmp_path: Path) -> None:
    engine, events, _ = make(tmp_path)
    out = engine.tick(members("a", "b"))
    w0 = engine.job.model.weight.detach().clone()
    assert engine.on_update("a", update_for(engine, out[0].message, "a", 1.0)).type is MsgType.ACK
    assert engine.job.round == 0
    assert engine.on_update("b", update_for(engine, out[1].message, "b", 3.0)).type is MsgType.ACK
    assert (engine.job.round, engine.job.version) == (1, 1)
    assert torch.allclose(engine.job.model.weight.detach(), w0 + 2.0)
    assert engine.job.store.paths()[-1][0] == 1
    assert "eval_loss" in engine.job.history[-1]
    assert ["elastic_round_started", "elastic_checkpoint_saved", "elastic_round_completed"] == [
        n for n in events.names() if n.startswith("elastic_round") or n.startswith("elastic_check")
    ]


@pytest.mark.parametrize("reader_keeps_up", [True, False])
def test_work_is_sent_from_the_model_and_queued_frames_never_change(
    tmp_path: Path, reader_keeps_up: bool, inproc_pair: tuple[zmq.Socket, zmq.Socket]
) -> None:
    """WORK frames alias the model's memory (no copy per round). If a send is still
    queued when the round commits, the model moves to a copy and the queued frames
    still carry the version they were sent with."""
    # frames under pyzmq's copy threshold (64 KiB) are copied at send, so use bigger ones
    engine, _, _ = make(tmp_path, task={"features": 40_000, "samples": 4}, min_workers=1)
    tx, rx = inproc_pair
    out = engine.tick(members("a"))[0]
    weight = engine.job.model.weight
    before, where = weight.detach().clone(), weight.data_ptr()
    assert out.message.tensors["weight"].chunks[0].data_ptr() == where  # no snapshot copy
    assert out.buffers is not None
    out.buffers.attach(send_message(tx, out.message, track=True))
    out.buffers.release()
    if reader_keeps_up:  # read (and copy, as TCP would) before the round commits
        sent = decode(rx.recv_multipart()).tensors["weight"].to_tensor().clone()
        assert wait_until_free(out.buffers)
    assert engine.on_update("a", update_for(engine, out.message, "a", 1.0)).type is MsgType.ACK
    assert torch.allclose(weight.detach(), before + 1.0)  # the Parameter object got the new weights
    assert (weight.data_ptr() == where) is reader_keeps_up  # moved only when it had to
    if not reader_keeps_up:
        sent = decode(rx.recv_multipart(copy=False)).tensors["weight"].to_tensor()
    assert torch.equal(sent, before)


@pytest.mark.parametrize(
    "overrides, reason",
    [
        ({"version": 7}, "stale_version"),
        ({"key": "a/j/99"}, "bad_key"),
        ({"round": 5}, "unknown_round"),
    ],
)
def test_bad_updates_get_a_nack_with_the_reason(
    tmp_path: Path, overrides: dict, reason: str
) -> None:
    engine, events, _ = make(tmp_path)
    work = engine.tick(members("a", "b"))[0].message
    reply = engine.on_update("a", update_for(engine, work, "a", **overrides))
    assert (reply.type, reply.meta["reason"]) == (MsgType.NACK, reason)
    assert events[-1][0] == "elastic_update_rejected"


def test_duplicates_late_and_outsiders_are_refused(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, min_workers=1, max_workers=1)
    work = engine.tick(members("a", "b"))[0].message
    outsider = "b" if work.key.startswith("a/") else "a"
    insider = "a" if outsider == "b" else "b"
    assert (
        engine.on_update(outsider, update_for(engine, work, outsider)).meta["reason"]
        == "not_participant"
    )
    first = update_for(engine, work, insider)
    assert (
        engine.on_update(insider, first).type is MsgType.ACK
    )  # commits round 1 (only participant)
    assert engine.on_update(insider, update_for(engine, work, insider)).meta["reason"] == "late"
    engine.tick(members("a", "b"))
    assert engine.job.version == 1  # applied once


def test_shape_and_kind_mismatch(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path)
    work = engine.tick(members("a", "b"))[0].message
    bad = update_for(engine, work, "a")
    bad.tensors["weight"] = WireTensor.from_tensor(torch.zeros(3))
    assert engine.on_update("a", bad).meta["reason"] == "shape_mismatch"
    bad = update_for(engine, work, "a")
    bad.meta["kind"] = "gradient"
    assert engine.on_update("a", bad).meta["reason"] == "wrong_kind"


def test_a_worker_that_leaves_does_not_stall_the_round(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path)
    out = engine.tick(members("a", "b", "c"))
    engine.on_update("a", update_for(engine, out[0].message, "a"))
    engine.on_update("b", update_for(engine, out[1].message, "b"))
    assert engine.job.round == 0
    engine.on_member_left("c")
    assert engine.job.round == 1 and engine.job.history[-1]["updates"] == 2


def test_deadline_commits_with_enough_updates_and_reruns_without(tmp_path: Path) -> None:
    engine, events, clock = make(tmp_path)
    out = engine.tick(members("a", "b", "c"))
    engine.on_update("a", update_for(engine, out[0].message, "a"))
    clock.now = 11
    engine.tick(members("a", "b", "c"))
    assert engine.job.round == 0 and events.names()[-1] == "elastic_round_abandoned"
    out = engine.tick(members("a", "b", "c"))  # the same round again, same version
    assert (out[0].message.round, out[0].message.version) == (1, 0)
    engine.on_update("a", update_for(engine, out[0].message, "a"))
    engine.on_update("b", update_for(engine, out[1].message, "b"))
    clock.now = 30
    engine.tick(members("a", "b", "c"))
    assert engine.job.round == 1
    late = engine.on_update("c", update_for(engine, out[2].message, "c"))
    assert late.meta["reason"] == "late" and "closed" in late.meta["detail"]


def test_job_finishes_saves_the_model_and_resumes(tmp_path: Path) -> None:
    engine, events, _ = make(tmp_path)
    for _ in range(3):
        out = engine.tick(members("a", "b"))
        for o in out:
            engine.on_update(o.worker, update_for(engine, o.message, o.worker, 0.1))
    engine.tick(members("a", "b"))
    assert engine.job.state is JobState.FINISHED and "elastic_job_finished" in events.names()
    assert (tmp_path / "j" / "final.safetensors").exists()
    assert [h["round"] for h in engine.job.history] == [1, 2, 3]
    again, _, _ = make(tmp_path)
    assert again.job.state is JobState.FINISHED and again.job.round == 3
    assert torch.equal(again.job.model.weight, engine.job.model.weight)
    assert again.tick(members("a", "b")) == []


def test_resume_mid_job_and_refuse_a_foreign_checkpoint(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path)
    out = engine.tick(members("a", "b"))
    for o in out:
        engine.on_update(o.worker, update_for(engine, o.message, o.worker))
    resumed, _, _ = make(tmp_path)
    assert (resumed.job.round, resumed.job.version, resumed.job.resumed_from) == (1, 1, 1)
    assert resumed.tick(members("a", "b"))[0].message.round == 2
    spec = parse_job_spec({"job": {"id": "j", "task": "digits", "rule": "fedavg"}})
    with pytest.raises(CheckpointError, match="belong to a job with task 'linreg'"):
        Job(spec, Plugins(), tmp_path)


def test_fraction_and_max_workers_pick_participants(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, fraction=0.5, min_workers=2)
    out = engine.tick(members(*"abcdefgh"))
    assert len(out) == 4  # ceil(0.5 * 8)
    picked_round1 = {o.worker for o in out}
    capped, _, _ = make(tmp_path / "cap", max_workers=3)
    assert len(capped.tick(members(*"abcdefgh"))) == 3
    floor, _, _ = make(tmp_path / "floor", fraction=0.1, min_workers=2)
    assert len(floor.tick(members(*"abcdefgh"))) == 2  # never below min_workers
    for o in out:
        engine.on_update(o.worker, update_for(engine, o.message, o.worker))
    picked_round2 = {o.worker for o in engine.tick(members(*"abcdefgh"))}
    assert (
        len(picked_round2) == 4 and picked_round2 != picked_round1
    )  # rotates across rounds (seeded)


def test_a_worker_that_cannot_work_is_not_waited_for(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path)
    out = engine.tick(members("a", "b", "c"))
    engine.on_update("a", update_for(engine, out[0].message, "a"))
    engine.on_update("b", update_for(engine, out[1].message, "b"))
    engine.on_worker_failed("c", 1, "work_failed: unknown task")
    assert engine.job.round == 1 and engine.job.history[-1]["updates"] == 2


class Fence:
    """Answers the engine's leadership questions from a script of verdicts."""

    def __init__(self, *verdicts: bool | None) -> None:
        self.verdicts = list(verdicts)

    def __call__(self) -> bool | None:
        return self.verdicts.pop(0) if len(self.verdicts) > 1 else self.verdicts[0]


def commit_one_round(engine: RoundEngine) -> None:
    for o in engine.tick(members("a")):
        engine.on_update(o.worker, update_for(engine, o.message, o.worker))


@pytest.mark.parametrize("verdict, fenced", [(False, True), (None, False)])
def test_a_fenced_engine_commits_nothing(
    tmp_path: Path, verdict: bool | None, fenced: bool
) -> None:
    engine, events, _ = make(tmp_path, min_workers=1)
    engine.ctx.fence = Fence(verdict)
    before = engine.job.model.weight.detach().clone()
    commit_one_round(engine)
    assert (engine.job.round, engine.job.version, engine.job.store.paths()) == (0, 0, [])
    assert torch.equal(engine.job.model.weight.detach(), before)
    assert events.names()[-1] == "elastic_round_abandoned" and engine.fenced is fenced
    assert (engine.tick(members("a")) == []) is fenced  # another leader: no more rounds here


def test_leadership_lost_between_commit_and_publish(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, min_workers=1)
    engine.ctx.fence = Fence(True, False)  # the round may commit; the checkpoint may not publish
    commit_one_round(engine)
    assert engine.fenced and engine.job.store.paths() == []
    assert not list(engine.job.dir.glob(".*tmp*"))  # the unpublished file is gone too


def test_a_stall_after_the_fence_publishes_no_checkpoint(tmp_path: Path) -> None:
    """etcd says we lead, then the process stalls past its lease before the rename:
    the lease clock, asked after the etcd call, keeps the file from replacing the
    new leader's checkpoint of the same round."""
    engine, events, _ = make(tmp_path, min_workers=1)
    fence = Fence(True, True, False)  # the commit's check, the checkpoint's, then etcd again
    engine.ctx.fence = fence
    engine.ctx.holds = lambda: len(fence.verdicts) >= 2  # the stall: right after etcd's second yes
    commit_one_round(engine)
    assert engine.job.store.paths() == [] and not list(engine.job.dir.glob(".*tmp*"))
    assert engine.fenced and "elastic_round_completed" not in events.names()


def test_no_round_starts_while_the_lease_clock_has_run_out(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, min_workers=1)
    engine.ctx.holds = lambda: False  # woke from a stall within a loop pass: etcd not asked yet
    assert engine.tick(members("a")) == [] and engine.current is None
    engine.ctx.holds = lambda: True
    assert len(engine.tick(members("a"))) == 1


def test_syncavg_shards_follow_the_members_by_generation(tmp_path: Path) -> None:
    spec = parse_job_spec(
        {
            "job": {"id": "s", "task": "linreg", "rule": "syncavg", "rounds": 5, "min_workers": 2},
            "task": {"samples": 60},
        }
    )
    events = Events()
    engine = RoundEngine(
        Job(spec, Plugins(), tmp_path), EngineContext(notify=events, clock=Clock())
    )
    out = engine.tick(members("a", "b", "c"))
    assert [(o.worker, o.message.meta["shard"]) for o in out] == [
        ("a", [0, 3]),
        ("b", [1, 3]),
        ("c", [2, 3]),
    ]
    engine.on_member_left("b")  # its third of the data would be missing: re-run
    assert engine.current is None and events.names()[-1] == "elastic_round_abandoned"
    out = engine.tick(members("a", "c"))
    assert [(o.worker, o.message.meta["shard"]) for o in out] == [("a", [0, 2]), ("c", [1, 2])]
    assert (out[0].message.round, engine.generation) == (1, 2)


def test_pause_resume_and_cancel(tmp_path: Path) -> None:
    engine, events, _ = make(tmp_path, min_workers=1, rounds=10)
    commit_one_round(engine)
    out = engine.tick(members("a"))  # round 2 runs...
    engine.set_desired("paused")  # ...and still commits; no round 3 starts
    engine.on_update("a", update_for(engine, out[0].message, "a"))
    assert (
        engine.tick(members("a")) == []
        and engine.job.state is JobState.PAUSED
        and engine.job.round == 2
    )
    engine.set_desired("running")
    out = engine.tick(members("a"))
    assert out and out[0].message.round == 3
    engine.set_desired("cancelled")  # drops round 3; the checkpoints of rounds 1-2 stay
    assert engine.job.state is JobState.CANCELLED and engine.job.done and engine.current is None
    assert engine.tick(members("a")) == [] and [r for r, _ in engine.job.store.paths()] == [1, 2]
    assert events.names()[-1] == "elastic_job_finished"


def test_finish_makes_the_round_running_the_last_and_writes_the_final_model(tmp_path: Path) -> None:
    engine, events, _ = make(tmp_path, min_workers=1, rounds=100)
    commit_one_round(engine)
    out = engine.tick(members("a"))  # round 2 runs...
    engine.set_desired("finished")  # ...and is the last
    assert engine.job.state is JobState.RUNNING and engine.current is not None
    engine.on_update("a", update_for(engine, out[0].message, "a"))
    assert engine.job.state is JobState.FINISHED and (engine.job.round, engine.job.version) == (
        2,
        2,
    )
    assert (engine.job.dir / "final.safetensors").exists() and events.names()[
        -1
    ] == "elastic_job_finished"
    assert engine.tick(members("a")) == [] and [r for r, _ in engine.job.store.paths()] == [1, 2]
    assert "eval_loss" in engine.job.final_metrics and engine.job.final_metrics["rounds"] == 2


def test_finish_with_nothing_running_finishes_at_once(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, min_workers=1, rounds=100)
    commit_one_round(engine)
    engine.set_desired("paused")
    assert engine.tick(members("a")) == [] and engine.job.state is JobState.PAUSED
    engine.set_desired("finished")
    assert (
        engine.tick(members("a")) == []
        and engine.job.state is JobState.FINISHED
        and engine.job.round == 1
    )
    assert (
        engine.job.final_metrics["rounds"] == 1 and (engine.job.dir / "final.safetensors").exists()
    )
    engine.set_desired("running")  # a finished job stays finished
    assert engine.job.state is JobState.FINISHED and engine.tick(members("a")) == []


def test_a_syncavg_worker_that_fails_its_work_sits_out(tmp_path: Path) -> None:
    spec = parse_job_spec(
        {
            "job": {"id": "s", "task": "linreg", "rule": "syncavg", "rounds": 5, "min_workers": 2},
            "task": {"samples": 60},
        }
    )
    clock = Clock()
    engine = RoundEngine(
        Job(spec, Plugins(), tmp_path), EngineContext(notify=Events(), clock=clock)
    )
    out = engine.tick(members("a", "b", "c"))
    engine.on_worker_failed(
        "b", out[0].message.round, "work_failed: bad data"
    )  # the step is re-run...
    assert [o.worker for o in engine.tick(members("a", "b", "c"))] == ["a", "c"]  # ...without it
    engine.on_member_left("b")  # it left; when it joins again it gets another chance
    clock.now += spec.round_timeout + 1
    assert engine.tick(members("a", "b", "c")) == []  # the deadline closes the a+c round
    assert [o.worker for o in engine.tick(members("a", "b", "c"))] == ["a", "b", "c"]


def test_a_compressed_update_is_expanded_and_other_codecs_are_a_codec_mismatch(
    tmp_path: Path,
) -> None:
    from elastic.compression.chain import CodecChain

    engine, _, _ = make(tmp_path, compression={"update": ["topk:0.5", "zstd"]}, min_workers=1)
    out = engine.tick(members("a", "b"))
    assert out[0].message.meta["codecs"] == ["topk:0.5", "zstd"]
    template = update_template(engine.job.model, "train")

    def compressed(worker: str, work: Message, codec: str | None = None) -> Message:
        deltas = {k: torch.full_like(v.detach(), 0.5) for k, v in template.items()}
        parts, encodings = (
            CodecChain(Plugins().codecs, ["topk:0.5", "zstd"]).compressor().compress(deltas)
        )
        if codec:
            encodings["weight"][0]["s"] = codec
        msg = Message(
            MsgType.UPDATE,
            job=work.job,
            round=work.round,
            version=work.version,
            sender=worker,
            key=f"{worker}/{work.job}/{work.round}",
            meta={"num_samples": 10, "loss": 0.5, "kind": "weights", "train_seconds": 0.01},
            tensors={k: WireTensor.from_tensor(v) for k, v in parts.items()},
            encodings=encodings,
        )
        return decode([bytes(f) for f in encode(msg)])

    for codec in (
        "lz4:9",
        "qsgd:4",
        "topk:0.9",
    ):  # not installed; installed, not the job's; another argument
        nack = engine.on_update("a", compressed("a", out[0].message, codec=codec))
        assert (
            nack.type is MsgType.NACK
            and nack.meta["reason"] == "codec_mismatch"
            and codec in nack.meta["detail"]
        )
    w0 = engine.job.model.weight.detach().clone()
    engine.on_update("b", compressed("b", out[1].message))
    assert engine.job.round == 0  # a's refused update is no answer: the round waits for it
    engine.on_member_left("a")
    assert engine.job.round == 1
    changed = engine.job.model.weight.detach() - w0
    kept = torch.isclose(changed, torch.tensor(0.5))
    assert int(kept.sum()) == changed.numel() // 2 and bool(
        (changed[~kept] == 0).all()
    )  # topk 50 %: half the deltas, added


def test_job_limits_refuse_or_clip_and_a_plugin_can_veto(tmp_path: Path) -> None:
    def engine_with(limits: dict, ask=None) -> tuple[RoundEngine, list]:  # type: ignore[no-untyped-def]
        spec = parse_job_spec(
            {
                "job": {
                    "id": "j",
                    "task": "linreg",
                    "rule": "fedavg",
                    "rounds": 50,
                    "min_workers": 1,
                    "round_timeout": 10,
                },
                "task": {"samples": 60},
                "limits": limits,
            }
        )
        engine = RoundEngine(
            Job(spec, Plugins(), tmp_path / str(len(limits)) / str(ask is not None)),
            EngineContext(notify=Events(), clock=Clock(), ask=ask or (lambda *_a, **_k: None)),
        )
        return engine, engine.tick(members("a"))

    engine, out = engine_with({"max_norm": 1.0})
    nack = engine.on_update(
        "a", update_for(engine, out[0].message, "a", 5.0)
    )  # every weight +5: norm >> 1
    assert nack.meta["reason"] == "norm_too_large" and engine.job.round == 0
    assert engine.on_update("a", update_for(engine, out[0].message, "a", 0.01)).type is MsgType.ACK

    engine, out = engine_with({"max_norm": 1.0, "norm_action": "clip"})
    before = {k: v.detach().clone() for k, v in update_template(engine.job.model, "train").items()}
    assert engine.on_update("a", update_for(engine, out[0].message, "a", 5.0)).type is MsgType.ACK
    moved = (
        sum(
            float((v.detach() - before[k]).pow(2).sum())
            for k, v in update_template(engine.job.model, "train").items()
        )
        ** 0.5
    )
    assert abs(moved - 1.0) < 1e-4  # the change was scaled down to the bound

    engine, out = engine_with({"max_update_bytes": 8})
    assert (
        engine.on_update("a", update_for(engine, out[0].message, "a")).meta["reason"] == "too_large"
    )

    engine, out = engine_with({"max_updates_per_minute": 2})
    for _ in range(2):
        assert engine.on_update("a", update_for(engine, out[0].message, "a")).type is MsgType.ACK
        out = engine.tick(members("a"))
    assert (
        engine.on_update("a", update_for(engine, out[0].message, "a")).meta["reason"]
        == "rate_limited"
    )

    seen = []

    def veto(hook: str, **kwargs) -> tuple[str, str] | None:  # type: ignore[no-untyped-def]
        seen.append((hook, kwargs["worker_id"], kwargs["update"].kind))
        return ("no-mallory", "mallory is not trusted") if kwargs["worker_id"] == "a" else None

    engine, out = engine_with({}, ask=veto)
    nack = engine.on_update("a", update_for(engine, out[0].message, "a"))
    assert (nack.meta["reason"], nack.meta["detail"]) == (
        "vetoed",
        "no-mallory: mallory is not trusted",
    )
    assert seen == [("elastic_validate_update", "a", "weights")]


def test_a_sample_count_over_its_bound_is_clipped_or_refused(tmp_path: Path) -> None:
    """A sample count is an update's weight in FedAvg: a claim over what the worker
    holds times the job's epochs, or over the job's limit, is clipped (counted) or
    refused with the bound named."""

    def engine_with(limits: dict, epochs: int = 1) -> tuple[RoundEngine, list]:
        spec = parse_job_spec(
            {
                "job": {"id": "j", "task": "linreg", "rule": "fedavg", "min_workers": 2},
                "task": {"samples": 60},
                "train": {"local_epochs": epochs},
                "limits": limits,
            }
        )
        engine = RoundEngine(
            Job(spec, Plugins(), tmp_path / f"{len(limits)}-{epochs}"),
            EngineContext(notify=Events(), clock=Clock()),
        )
        return engine, engine.tick(members("a", "b"))

    def claim(engine: RoundEngine, work: Message, worker: str, value: float, **meta) -> Message:
        msg = update_for(engine, work, worker, value)
        msg.meta.update(meta)
        return engine.on_update(worker, msg)

    # b says it holds 10 samples and claims 10^12: clipped to 10, weighed as a is
    engine, out = engine_with({})
    before = {k: v.detach().clone() for k, v in update_template(engine.job.model, "train").items()}
    assert claim(engine, out[0].message, "a", 1.0, num_samples=10, data_size=10).type is MsgType.ACK
    ack = claim(engine, out[1].message, "b", 3.0, num_samples=10**12, data_size=10)
    assert ack.type is MsgType.ACK and engine.job.round == 1
    for k, v in update_template(engine.job.model, "train").items():
        assert torch.allclose(v.detach() - before[k], torch.full_like(v, 2.0))  # (1 + 3) / 2
    assert engine.job.totals["samples_clipped"] == 1

    # local epochs multiply what a worker holds
    engine, out = engine_with({}, epochs=3)
    assert claim(engine, out[0].message, "a", 1.0, num_samples=30, data_size=10).type is MsgType.ACK
    assert engine.job.totals["samples_clipped"] == 0

    # the job's limit bounds every claim, with or without data_size; refused, named
    engine, out = engine_with({"max_samples_per_update": 20, "samples_action": "reject"})
    nack = claim(engine, out[0].message, "a", 1.0, num_samples=21)
    assert nack.meta["reason"] == "too_many_samples"
    assert "max_samples_per_update" in nack.meta["detail"] and "21" in nack.meta["detail"]
    nack = claim(engine, out[1].message, "b", 1.0, num_samples=15, data_size=5)
    assert (
        nack.meta["reason"] == "too_many_samples"
        and "the 5 samples it holds" in nack.meta["detail"]
    )
    assert claim(engine, out[1].message, "b", 1.0, num_samples=5, data_size=5).type is MsgType.ACK
    assert engine.job.totals["rejected"] == 2


def test_bad_limits_are_one_clear_error() -> None:
    with pytest.raises(JobSpecError, match="norm_action = 'cut' is invalid"):
        parse_job_spec({"job": {"task": "t", "rule": "r"}, "limits": {"norm_action": "cut"}})
    with pytest.raises(JobSpecError, match="samples_action = 'drop' is invalid"):
        parse_job_spec({"job": {"task": "t", "rule": "r"}, "limits": {"samples_action": "drop"}})
    with pytest.raises(JobSpecError, match="max_samples_per_update = -1 is invalid"):
        parse_job_spec(
            {"job": {"task": "t", "rule": "r"}, "limits": {"max_samples_per_update": -1}}
        )


def test_a_long_jobs_history_stays_bounded_and_spans_the_whole_job(tmp_path: Path) -> None:
    from types import SimpleNamespace

    from elastic.coordinator.control import ControlAPI
    from elastic.coordinator.job import HISTORY_RECENT

    engine, _, _ = make(tmp_path)
    job = engine.job
    total = 10 * HISTORY_RECENT + 37  # an asynchronous job commits a version per buffer of updates
    for n in range(1, total + 1):
        job.record({"round": n, "version": n, "updates": 1})
        assert len(job.history) < 2 * HISTORY_RECENT
    rounds = [h["round"] for h in job.history]
    assert rounds[0] == 1 and rounds[-HISTORY_RECENT:] == list(
        range(total - HISTORY_RECENT + 1, total + 1)
    )
    assert all(
        a < b for a, b in zip(rounds, rounds[1:], strict=False)
    )  # older ones thinned, never reordered
    # `elastic job logs` pages by the last round it has, so thinning skips nothing it could still
    # get
    api = ControlAPI(SimpleNamespace(engines={"j": engine}))  # type: ignore[arg-type]
    since, seen = 0, []
    while True:
        data, _ = api.op_logs({"job": "j", "since": since})
        if not data["entries"]:
            break
        seen += [e["round"] for e in data["entries"]]
        since = data["next"]
    assert seen == rounds


def parts_for(
    engine: RoundEngine, work: Message, worker: str, value: float, part_bytes: int = 8
) -> list[tuple[Message, Part]]:
    """The update ``update_for`` makes, cut as the engine's grid says: each part, and
    what the core's record of the stream (``UploadStream``) tells the engine of it."""
    from elastic.wire.parts import part_message

    parts = engine.upload_parts(part_bytes)
    assert parts is not None and len(parts) > 1
    whole = update_for(engine, work, worker, value)
    stream = UploadStream(work.job, whole.key, parts, engine.itemsizes)
    out = []
    for i, segments in enumerate(parts):
        msg = part_message(whole, i, len(parts), segments)
        assert stream.expects(msg.key, msg.meta["part"])
        out.append((msg, stream.current()))
        stream.advance(msg.payload_bytes)
    return out


def test_updates_in_parts_commit_the_model_whole_updates_commit(tmp_path: Path) -> None:
    models, counted = [], []
    for in_parts in (False, True):
        engine, _, _ = make(tmp_path / str(in_parts), min_workers=2)
        out = engine.tick(members("a", "b"))
        for o, value in zip(out, (1.0, 3.0), strict=True):
            if not in_parts:
                assert (
                    engine.on_update(o.worker, update_for(engine, o.message, o.worker, value)).type
                    is MsgType.ACK
                )
                continue
            replies = [
                engine.on_update_part(o.worker, msg, part)
                for msg, part in parts_for(engine, o.message, o.worker, value)
            ]
            assert (
                replies[:-1] == [None] * (len(replies) - 1)
                and replies[-1] is not None
                and replies[-1].type is MsgType.ACK
            )
        assert engine.job.round == 1 and engine.job.history[-1]["updates"] == 2
        counted.append(
            (
                engine.job.totals["update_bytes_wire"],
                engine.job.totals["update_bytes_raw"],
                engine.job.history[-1]["bytes_received"],
            )
        )
        models.append({k: v.clone() for k, v in engine.job.model.state_dict().items()})
    for name, whole in models[0].items():
        assert torch.equal(models[1][name], whole), name
    assert counted[0] == counted[1] == (88, 88, 88)  # two updates of 11 float32, however they came


def test_an_update_broken_off_halfway_keeps_its_parts_and_the_round_goes_on(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, min_workers=1)
    before = {
        k: v.detach().clone().reshape(-1)
        for k, v in update_template(engine.job.model, "train").items()
    }
    out = {o.worker: o.message for o in engine.tick(members("a", "b"))}
    b_parts = parts_for(engine, out["b"], "b", 3.0)
    assert engine.on_update_part("b", *b_parts[0]) is None
    engine.abandon_parts("b", "b/j/999")  # another round's update: nothing to do with this one
    assert engine.current is not None and "b" in engine.current.participants
    engine.abandon_parts("b", b_parts[0][0].key)  # what the core says when b's part 1 never comes
    assert engine.current is not None and "b" not in engine.current.participants  # not waited for
    for msg, part in parts_for(engine, out["a"], "a", 1.0):
        reply = engine.on_update_part("a", msg, part)
    assert reply is not None and reply.type is MsgType.ACK and engine.job.round == 1
    assert b_parts[0][1].segments == [("weight", 0, 2)]
    after = {
        k: v.detach().reshape(-1) for k, v in update_template(engine.job.model, "train").items()
    }
    # a (10 samples, +1) and b's first part (10 samples, +3); a alone beyond it
    assert torch.allclose(after["weight"][:2], before["weight"][:2] + 2.0)
    assert torch.allclose(after["weight"][2:], before["weight"][2:] + 1.0)
    assert torch.allclose(after["bias"], before["bias"] + 1.0)


def test_a_part_that_is_not_the_granted_one_is_refused(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, min_workers=1)
    [o] = engine.tick(members("a"))
    (msg, part), (second, later) = parts_for(engine, o.message, "a", 1.0)[:2]
    wrong = Part(
        part.index, part.count, [(name, start, stop + 1) for name, start, stop in part.segments], 0
    )
    nack = engine.on_update_part("a", msg, wrong)
    assert nack is not None and nack.meta["reason"] == "bad_part" and engine.job.round == 0
    assert engine.on_update_part("a", msg, part) is None  # the granted one is folded
    kind = second.meta["kind"]
    second.meta["kind"] = "gradient"
    nack = engine.on_update_part("a", second, later)
    assert nack is not None and nack.meta["reason"] == "wrong_kind"
    assert (
        engine.current is None and engine.job.round == 0
    )  # half folded: given up; with nobody else, run again
    second.meta["kind"] = kind
    assert engine.upload_parts(0) is None


def client_update(engine: RoundEngine, work: Message, worker: str, client: int, **meta) -> Message:
    msg = update_for(engine, work, worker, 1.0, key=f"{worker}/{work.job}/{work.round}/{client}")
    msg.meta |= {"client": client, **meta}
    return msg


def test_virtual_clients_each_send_their_update_and_the_round_waits_for_all(
    tmp_path: Path,
) -> None:
    engine, _, _ = make(tmp_path, clients=40, clients_per_round=6)
    out = {o.worker: o.message for o in engine.tick(members("a", "b"))}
    asked = {w: [c for c, _ in m.meta["clients"]] for w, m in out.items()}
    assert sorted(len(v) for v in asked.values()) == [3, 3]
    assert all(m.meta["shard"] == [min(asked[w]), 40] for w, m in out.items())
    a0, a1, a2 = asked["a"]
    w0 = engine.job.model.weight.detach().clone()
    assert engine.on_update("a", client_update(engine, out["a"], "a", a0)).type is MsgType.ACK
    refusals = {
        "duplicate": client_update(engine, out["a"], "a", a0),
        "not_participant": client_update(engine, out["a"], "a", asked["b"][0]),
        "bad_key": client_update(engine, out["a"], "a", a1),
    }
    refusals["bad_key"].meta["client"] = a2  # its key names a1
    no_client = update_for(engine, out["a"], "a", 1.0)  # as if the job had none
    assert engine.on_update("a", no_client).meta["reason"] == "not_participant"
    for reason, msg in refusals.items():
        assert engine.on_update("a", msg).meta["reason"] == reason
    bad = client_update(engine, out["a"], "a", a1, metrics={"x" * 65: 1.0})
    assert engine.on_update("a", bad).meta["reason"] == "bad_metrics"
    # one client fails: its worker's others go on, and the round does not wait for it
    engine.on_worker_failed("a", 1, "work_failed: boom", key=f"a/j/1/{a1}")
    assert engine.on_update("a", client_update(engine, out["a"], "a", a2)).type is MsgType.ACK
    for c in asked["b"]:
        msg = client_update(engine, out["b"], "b", c, metrics={"acc": float(c)})
        assert engine.on_update("b", msg).type is MsgType.ACK
    record = engine.job.history[-1]
    assert record["updates"] == 5 and record["asked"] == 6
    assert record["clients"] == sorted([a0, a2, *asked["b"]])
    assert record["train_acc"] == pytest.approx(sum(asked["b"]) / 3)  # over those that sent it
    assert torch.allclose(engine.job.model.weight.detach(), w0 + 1.0)


def test_virtual_clients_need_a_rule_that_trains_locally(tmp_path: Path) -> None:
    with pytest.raises(JobSpecError, match="data-parallel gradient steps"):
        make(tmp_path, clients=10, rule="syncavg")
    with pytest.raises(JobSpecError, match="needs a synchronous rule"):
        make(tmp_path, clients=10, rule="async")


def test_stragglers_are_told_their_epochs_or_not_asked(tmp_path: Path) -> None:
    engine, _, _ = make(tmp_path, min_workers=1)
    engine.job.spec = parse_job_spec(
        {
            "job": {"id": "j", "task": "linreg", "rule": "fedavg", "min_workers": 1},
            "train": {"local_epochs": 8, "stragglers": 0.5, "straggler_epochs": [1, 3]},
        }
    )
    out = engine.tick(members("a", "b", "c", "d"))
    epochs = sorted(o.message.meta.get("epochs", 8) for o in out)
    assert len(out) == 4 and epochs[2:] == [8, 8] and all(1 <= e <= 3 for e in epochs[:2])
