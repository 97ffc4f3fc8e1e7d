"""The collective engine, driven by hand: who trains together, when a generation
gives way, what state goes down, and which reports it refuses."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from elastic.coordinator.collective import BROKEN_GRACE, CollectiveEngine
from elastic.coordinator.context import EngineContext
from elastic.coordinator.job import Job
from elastic.coordinator.uploads import Part
from elastic.distributed import packed
from elastic.errors import JobSpecError
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.wire.header import Message, MsgType
from elastic.wire.parts import part_message
from elastic.wire.tensors import WireTensor

from .test_rounds import Clock, members


def make(tmp_path: Path, **job) -> tuple[CollectiveEngine, Clock]:
    spec = parse_job_spec(
        {
            "job": {
                "id": "c",
                "task": "linreg",
                "rule": "allreduce",
                "rounds": 50,
                "min_workers": 2,
                **job,
            },
            "task": {"samples": 60},
            "rule": {"checkpoint_every": 5},
        }
    )
    clock = Clock()
    ctx = EngineContext(clock=clock, collective_store=lambda: "coordinator:1234")
    return CollectiveEngine(Job(spec, Plugins(), tmp_path), ctx), clock


def generation_of(out) -> dict[str, dict]:
    return {o.worker: o.message.meta["collective"] for o in out}


def report(
    engine, worker: str, generation: int, step: int, end: str, holds=True, frames=None, **extra
) -> Message:
    return Message(
        MsgType.UPDATE,
        job="c",
        round=step,
        sender=worker,
        key=f"{worker}/c/{generation}/{step}/{end}",
        meta={
            "num_samples": 60,
            "loss": 0.5,
            "kind": "checkpoint",
            "train_seconds": 1.0,
            "collective": {
                "generation": generation,
                "step": step,
                "epoch": step,
                "offset": 0,
                "end": end,
                "holds": holds,
                **extra,
            },
        },
        tensors=frames or {},
    )


def checkpoint(engine, worker, generation, step, scale=2.0, tensors=None, **extra) -> Message:
    state = tensors or {k: v.detach() * scale for k, v in engine.job.model.state_dict().items()}
    layout, flat = packed.pack(state, lambda n: torch.empty(n, dtype=torch.uint8))
    return report(
        engine,
        worker,
        generation,
        step,
        "checkpoint",
        frames={packed.NAME: WireTensor.from_tensor(flat)},
        layout="",
        **{"tensors": layout, **extra},
    )


def test_nothing_starts_below_min_workers_then_all_get_ranks_and_the_model(tmp_path):
    engine, _ = make(tmp_path)
    assert engine.tick(members("a")) == []
    out = engine.tick(members("a", "b"))
    gen = generation_of(out)
    assert {w: (g["generation"], g["rank"], g["world"]) for w, g in gen.items()} == {
        "a": (1, 0, 2),
        "b": (1, 1, 2),
    }
    assert all(g["store"] == "coordinator:1234" and g["steps"] == 50 for g in gen.values())
    assert all(o.message.tensors for o in out)  # nobody holds state: the model goes down
    assert gen["a"]["position"] == {"step": 0, "epoch": 0, "offset": 0}
    assert all(o.message.meta["shard"] == [0, 1] for o in out)  # the whole dataset, split per step
    assert engine.tick(members("a", "b")) == []  # nothing changed: the generation runs on


def test_a_joiner_starts_a_generation_with_survivors_first_and_no_model(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("b", "a"))
    engine.on_update("b", report(engine, "b", 1, 3, "progress"))
    out = engine.tick(members("c", "b", "a"))
    gen = generation_of(out)
    assert [w for w, g in sorted(gen.items(), key=lambda x: x[1]["rank"])] == ["b", "a", "c"]
    assert {g["generation"] for g in gen.values()} == {2}
    assert not any(o.message.tensors for o in out)  # b holds the state: it broadcasts it
    assert engine.job.round == 3  # rank 0's progress


def test_a_member_that_left_ends_the_generation(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b", "c"))
    engine.on_update("a", report(engine, "a", 1, 2, "progress"))
    engine.on_member_left("a")
    gen = generation_of(engine.tick(members("b", "c")))
    assert {w: g["rank"] for w, g in gen.items()} == {"b": 0, "c": 1}


def test_a_broken_generation_waits_briefly_for_every_rank_then_goes_on_without_the_silent(tmp_path):
    engine, clock = make(tmp_path)
    engine.tick(members("a", "b", "c"))
    engine.on_update("a", report(engine, "a", 1, 4, "broken", detail="Connection closed by peer"))
    engine.on_update("b", report(engine, "b", 1, 4, "broken"))
    assert engine.tick(members("a", "b", "c")) == []  # c may still report
    clock.now += BROKEN_GRACE + 0.01
    gen = generation_of(engine.tick(members("a", "b", "c")))
    assert sorted(gen) == ["a", "b"]  # c said nothing: left out for now
    engine.on_update("c", report(engine, "c", 1, 4, "broken"))  # it answers after all
    gen = generation_of(engine.tick(members("a", "b", "c")))
    assert sorted(gen) == ["a", "b", "c"] and gen["c"]["rank"] == 2


def test_every_rank_reporting_ends_the_wait_at_once(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    for w in ("a", "b"):
        engine.on_update(w, report(engine, w, 1, 4, "broken"))
    assert sorted(generation_of(engine.tick(members("a", "b")))) == ["a", "b"]


def test_when_nobody_holds_state_the_newest_checkpoint_goes_down(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    ack = engine.on_update("a", checkpoint(engine, "a", 1, 5))
    assert ack.type is MsgType.ACK and engine.committed == 5
    saved = {k: v.clone() for k, v in engine.job.model.state_dict().items()}
    for w in ("a", "b"):
        engine.on_member_left(w)
    assert engine.tick(members()) == []
    out = engine.tick(members("x", "y"))  # every worker died; new ones came
    assert all(o.message.tensors for o in out)
    for o in out:
        assert o.message.meta["collective"]["position"] == {"step": 5, "epoch": 5, "offset": 0}
        for name, value in saved.items():
            assert torch.equal(o.message.tensors[name].to_tensor(), value)
    assert engine.job.store.latest()["round"] == 5  # checkpointed atomically, as rounds are


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda m: m.meta["collective"].update(end="whatever"), "bad_report"),
        (lambda m: m.meta["collective"].update(generation=9), "bad_report"),
        (lambda m: m.meta["collective"].update(step=51), "bad_report"),
        (lambda m: m.meta["collective"].update(step=-1), "bad_report"),
        (lambda m: setattr(m, "key", "b/c/1/5/progress"), "bad_key"),
    ],
)
def test_reports_claiming_what_was_never_handed_out_are_refused(tmp_path, change, reason):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    msg = report(engine, "a", 1, 5, "progress")
    change(msg)
    answer = engine.on_update("a", msg)
    assert answer.type is MsgType.NACK and answer.meta["reason"] == reason


def test_bad_checkpoints_are_refused_and_leave_the_model_alone(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    before = {k: v.clone() for k, v in engine.job.model.state_dict().items()}
    nan = checkpoint(
        engine, "a", 1, 5, tensors=before | {"weight": before["weight"] * float("nan")}
    )
    huge = checkpoint(
        engine, "a", 1, 5, tensors=before | {"optimizer/0/momentum_buffer": torch.zeros(10_000)}
    )
    missing = checkpoint(engine, "a", 1, 5, tensors={"weight": before["weight"]})
    lying = checkpoint(engine, "a", 1, 5)
    lying.meta["collective"]["tensors"][0][2] = [1, 1]
    progress_with_tensors = checkpoint(engine, "a", 1, 5)
    progress_with_tensors.meta["collective"]["end"] = "progress"
    for msg, reason in (
        (nan, "not_finite"),
        (huge, "bad_checkpoint"),
        (missing, "bad_checkpoint"),
        (lying, "bad_checkpoint"),
        (progress_with_tensors, "bad_report"),
    ):
        answer = engine.on_update("a", msg)
        assert answer.meta["reason"] == reason, (reason, answer.meta)
    for name, value in before.items():
        assert torch.equal(engine.job.model.state_dict()[name], value)
    assert engine.job.version == 0


def test_a_checkpoint_comes_in_parts_and_commits_with_its_last(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    whole = checkpoint(engine, "a", 1, 5, scale=3.0)
    size = whole.tensors[packed.NAME].numel
    parts = engine.upload_parts(16, size)
    assert len(parts) > 2 and sum(stop - start for ((_, start, stop),) in parts) == size
    flat = whole.tensors[packed.NAME].to_tensor()
    answers = []
    before = 0
    for index, segments in enumerate(parts):
        (_, start, stop) = segments[0]
        msg = part_message(whole, index, len(parts), segments)
        answers.append(engine.on_update_part("a", msg, Part(index, len(parts), segments, before)))
        before += stop - start
        if index < len(parts) - 1:
            assert engine.job.version == 0  # nothing commits before the last part
    assert answers[:-1] == [None] * (len(parts) - 1) and answers[-1].type is MsgType.ACK
    assert engine.committed == 5
    for name, value in packed.unpack(whole.meta["collective"]["tensors"], flat).items():
        assert torch.equal(engine.job.model.state_dict()[name], value)


def test_a_checkpoint_given_up_halfway_commits_nothing(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    whole = checkpoint(engine, "a", 1, 5)
    parts = engine.upload_parts(16, whole.tensors[packed.NAME].numel)
    first = part_message(whole, 0, len(parts), parts[0])
    assert engine.on_update_part("a", first, Part(0, len(parts), parts[0], 0)) is None
    engine.abandon_parts("a", whole.key)
    late = part_message(whole, 1, len(parts), parts[1])
    answer = engine.on_update_part("a", late, Part(1, len(parts), parts[1], 16))
    assert answer.meta["reason"] == "bad_part" and engine.job.version == 0


def test_a_checkpoint_older_than_the_newest_is_not_committed(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    engine.on_update("a", checkpoint(engine, "a", 1, 10, scale=3.0))
    engine.on_update("a", checkpoint(engine, "a", 1, 5, scale=5.0))
    assert engine.committed == 10 and engine.job.version == 1


def test_the_done_checkpoint_finishes_the_job(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    msg = checkpoint(engine, "a", 1, 50)
    msg.meta["collective"]["end"] = "done"
    engine.on_update("a", msg)
    assert engine.job.done and (engine.job.dir / "final.safetensors").exists()
    assert engine.tick(members("a", "b")) == []


@pytest.mark.parametrize(
    "extra",
    [{"clients": 10}, {"train": {"local_epochs": 2}}, {"compression": {"update": ["fp16"]}}],
)
def test_what_a_collective_job_cannot_use_is_refused(tmp_path, extra):
    spec = {
        "job": {"id": "c", "task": "linreg", "rule": "allreduce", "rounds": 5},
        "task": {"samples": 60},
    }
    for table, values in extra.items():
        if table == "clients":
            spec["job"]["clients"] = values
        else:
            spec[table] = values
    with pytest.raises(JobSpecError, match="allreduce trains all workers together"):
        Job(parse_job_spec(spec), Plugins(), tmp_path)


def test_pause_stops_training_with_a_generation_of_no_steps_and_resume_goes_on(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    engine.on_update("a", report(engine, "a", 1, 7, "progress"))
    engine.set_desired("paused")
    held = generation_of(engine.tick(members("a", "b")))
    assert {g["steps"] for g in held.values()} == {0} and {
        g["generation"] for g in held.values()
    } == {2}
    assert engine.tick(members("a", "b")) == []  # nothing more while paused
    for w in ("a", "b"):
        engine.on_update(w, report(engine, w, 2, 9, "done"))
    engine.tick(members("a", "b"))
    assert engine.job.state.value == "paused"
    engine.set_desired("running")
    gen = generation_of(engine.tick(members("a", "b")))
    assert {g["steps"] for g in gen.values()} == {50} and {
        g["generation"] for g in gen.values()
    } == {3}


def test_finish_makes_the_state_at_the_agreed_step_the_final_model(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    engine.set_desired("finished")
    engine.tick(members("a", "b"))  # the holding generation
    done = checkpoint(engine, "a", 2, 12, scale=4.0)
    done.meta["collective"]["end"] = "done"
    assert engine.on_update("a", done).type is MsgType.ACK
    assert engine.job.done and engine.job.round == 12
    assert (engine.job.dir / "final.safetensors").exists()


def test_finish_right_after_a_checkpoint_ends_with_that_checkpoint(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    engine.on_update("a", checkpoint(engine, "a", 1, 10))
    engine.set_desired("finished")
    engine.tick(members("a", "b"))
    same = checkpoint(engine, "a", 2, 10)  # stopped where the last checkpoint was
    same.meta["collective"]["end"] = "done"
    engine.on_update("b", report(engine, "b", 2, 10, "done"))
    assert not engine.job.done  # rank 0's word ends it, not another's
    engine.on_update("a", same)
    assert engine.job.done and engine.job.version == 1


def test_cancel_stops_the_members_training_and_commits_nothing_more(tmp_path):
    engine, _ = make(tmp_path)
    engine.tick(members("a", "b"))
    engine.set_desired("cancelled")
    held = generation_of(engine.tick(members("a", "b")))
    assert {g["steps"] for g in held.values()} == {0}
    late = checkpoint(engine, "a", 2, 20)
    late.meta["collective"]["end"] = "done"
    engine.on_update("a", late)
    assert engine.job.state.value == "cancelled" and engine.job.version == 0
    assert engine.tick(members("a", "b")) == []
