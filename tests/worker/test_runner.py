"""The worker's runner and its buffers, on CPU; the same on CUDA where there is one."""

from __future__ import annotations

import gc
import time

import pytest
import torch
import zmq
from elastic_plugins.tasks.linreg import LinReg

from elastic.errors import ConfigError
from elastic.plugins import Plugins
from elastic.training import update_kind, update_template
from elastic.wire import Message, MsgType, WireTensor, decode, encode
from elastic.wire.buffers import BufferPool
from elastic.wire.shm import SegmentReader, SegmentWriter
from elastic.wire.transport import send_message
from elastic.worker.devices import resolve_device
from elastic.worker.runner import TaskRunner
from tests.conftest import wait_until_free

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def work(mode: str, model: torch.nn.Module, round_: int = 1) -> Message:
    msg = Message(
        MsgType.WORK,
        job="j",
        round=round_,
        version=round_ - 1,
        key=f"w/j/{round_}",
        meta={
            "mode": mode,
            "task": "linreg",
            "task_params": {"samples": 40, "features": 3},
            "train": {
                "local_epochs": 1,
                "batch_size": 0,
                "lr": 0.1,
                "optimizer": "sgd",
                "momentum": 0.0,
                "weight_decay": 0.0,
            },
            "shard": [0, 2],
            "seed": 0,
        },
        tensors={k: WireTensor.from_tensor(v) for k, v in model.state_dict().items()},
    )
    return decode([bytes(f) for f in encode(msg)], check_finite=False)  # as a worker receives it


def expected(mode: str, model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from elastic.api import Shard

    task = LinReg({"samples": 40, "features": 3})
    data = task.train_dataset(Shard(0, 2, 0), None)
    x, y = data.tensors
    m = task.build_model(0)
    m.load_state_dict(model.state_dict())
    loss = task.loss(m, x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    if mode == "gradient":
        return grads
    weights = model.state_dict()
    if mode == "delta":
        return {n: -0.1 * g for n, g in grads.items()}  # trained minus received
    return {n: weights[n] - 0.1 * g for n, g in grads.items()}  # one full-batch SGD step


@pytest.mark.parametrize("mode", ["train", "gradient", "delta"])
def test_runner_update_on_cpu(mode: str) -> None:
    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    result = runner.run(work(mode, model))
    msg = result.message
    assert msg.type is MsgType.UPDATE, msg.meta
    assert (msg.round, msg.version, msg.key, msg.meta["kind"], msg.meta["num_samples"]) == (
        1,
        0,
        "w/j/1",
        update_kind(mode),
        20,
    )
    for name, want in expected(mode, model).items():
        assert torch.allclose(msg.tensors[name].to_tensor(), want, atol=1e-6), name


@pytest.mark.parametrize("reader_keeps_up", [True, False])
def test_update_is_sent_from_the_model_and_never_changes_while_queued(
    reader_keeps_up: bool, inproc_pair: tuple[zmq.Socket, zmq.Socket]
) -> None:
    """On CPU the update's frames are the trained parameters themselves. If they are
    still queued when the next WORK comes, the model moves to new memory first."""
    params = {"samples": 4, "features": 40_000}  # frames over pyzmq's 64 KiB copy threshold
    model = LinReg(params).build_model(3)
    runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    tx, rx = inproc_pair
    first = work("train", model)
    first.meta["task_params"] = params
    result = runner.run(first)
    trained = runner.jobs["j"].model.weight
    where = trained.data_ptr()
    assert result.message.tensors["weight"].chunks[0].data_ptr() == where  # no copy
    assert result.buffers is not None
    result.buffers.release_after(send_message(tx, result.message, track=True))
    sent = result.message.tensors["weight"].to_tensor().clone()
    if reader_keeps_up:
        received = decode(rx.recv_multipart()).tensors["weight"].to_tensor().clone()
        assert wait_until_free(result.buffers)
    second = work("train", model, round_=2)
    second.meta["task_params"] = params
    runner.run(second)  # loads round 2's model into the worker's model
    assert (trained.data_ptr() == where) is reader_keeps_up  # moved only when it had to
    if not reader_keeps_up:
        received = decode(rx.recv_multipart(copy=False)).tensors["weight"].to_tensor()
    assert torch.equal(received, sent)


@pytest.mark.parametrize("reader_keeps_up", [True, False])
def test_on_the_coordinator_s_host_the_update_leaves_from_the_segment(
    reader_keeps_up: bool, inproc_pair: tuple[zmq.Socket, zmq.Socket]
) -> None:
    """With a shared-memory lane the weights live in its segment and the update
    leaves with no copy; if the coordinator still views it when the next WORK comes,
    the model moves out first and the bytes it views never change."""
    params = {"samples": 4, "features": 400_000}  # 1.6 MB: over the shared path's 1 MiB
    model = LinReg(params).build_model(3)
    runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    lane, reader = SegmentWriter(), SegmentReader()
    runner.placer = lane.place
    tx, rx = inproc_pair
    first = work("train", model)
    first.meta["task_params"] = params
    result = runner.run(first)
    assert result.buffers is not None
    result.buffers.release_after(send_message(tx, result.message, track=True, lane=lane))
    assert lane.in_place == 1  # sent from where the weights live
    sent = result.message.tensors["weight"].to_tensor().clone()
    received = decode(rx.recv_multipart(), shm=reader).tensors["weight"]
    where = runner.jobs["j"].model.weight.data_ptr()
    if reader_keeps_up:
        received = received.to_tensor().clone()  # and the views go
        gc.collect()
    second = work("train", model, round_=2)
    second.meta["task_params"] = params
    runner.run(second)
    assert (
        runner.jobs["j"].model.weight.data_ptr() == where
    ) is reader_keeps_up  # moved only when it had to
    got = received if reader_keeps_up else received.to_tensor()
    assert torch.equal(got, sent)
    lane.close()


@pytest.mark.parametrize("mode", ["gradient", "train"])
@pytest.mark.parametrize("reader_keeps_up", [True, False])
def test_a_cast_update_is_the_chains_own_and_leaves_from_the_segment(
    mode: str,
    reader_keeps_up: bool,
    inproc_pair: tuple[zmq.Socket, zmq.Socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """fp16 is cast a block at a time into parts in the segment: what the coordinator
    expands is what the chain's way gives, nothing is copied to send it, and parts it
    still views are never written over."""
    from elastic.compression.chain import expand

    monkeypatch.setattr(
        "elastic.worker.packing.WIDEN_BLOCK", 200_000
    )  # three blocks, the last one short
    params = {"samples": 4, "features": 600_000}  # 1.2 MB in fp16: over the shared path's 1 MiB
    model = LinReg(params).build_model(3)
    template = {
        k: (tuple(t.shape), t.dtype)
        for k, t in update_template(model, mode if mode == "gradient" else "train").items()
    }

    def job(round_: int) -> Message:
        w = work(mode, model, round_=round_)
        w.meta["task_params"] = params
        w.meta["codecs"] = ["fp16"]
        return w

    plain = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    plain.placer = None
    runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    lane, reader = SegmentWriter(), SegmentReader()
    runner.placer = lane.place
    tx, rx = inproc_pair
    views: list[dict[str, WireTensor]] = []
    copies: list[dict[str, torch.Tensor]] = []
    for round_ in (1, 2):
        with torch.no_grad():
            model.weight.mul_(-2.0)  # another update each round
        result = runner.run(job(round_))
        assert result.buffers is not None
        result.buffers.release_after(send_message(tx, result.message, track=True, lane=lane))
        got = expand(decode(rx.recv_multipart(), shm=reader), Plugins().codecs, template)
        want = expand(
            decode([bytes(f) for f in encode(plain.run(job(round_)).message)]),
            Plugins().codecs,
            template,
        )
        assert all(wt.chunks[0].dtype == torch.float16 for wt in got.values())  # folded as received
        for name in want:
            assert torch.equal(got[name].to_tensor(), want[name].to_tensor()), name
        copies.append({k: wt.to_tensor().clone() for k, wt in got.items()})
        if reader_keeps_up:
            del got
            gc.collect()
        else:  # the coordinator still views round 1's parts when round 2 is cast
            views.append(got)
    assert lane.in_place == (2 if reader_keeps_up else 1)  # sent from where they were cast
    for seen, copy in zip(views, copies, strict=False):
        assert all(torch.equal(seen[k].to_tensor(), copy[k]) for k in copy)  # never written over
    lane.close()


def test_runner_reports_bad_work_as_a_nack() -> None:
    model = torch.nn.Linear(5, 1)  # not the task's model
    result = TaskRunner(Plugins(), torch.device("cpu"), None, "w").run(work("train", model))
    assert (
        result.message.type is MsgType.NACK and "received [1, 5]" in result.message.meta["detail"]
    )
    w = work("train", LinReg({}).build_model(0))
    w.meta["task"] = "nope"
    result = TaskRunner(Plugins(), torch.device("cpu"), None, "w").run(w)
    assert (
        result.message.meta["reason"] == "task_unavailable"  # it sits the job out
        and "unknown task 'nope'" in result.message.meta["detail"]
    )


def test_pool_never_reuses_memory_zmq_still_holds() -> None:
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.LINGER, 0)
    push.connect("inproc://pool-test")  # nobody receives yet: the message stays queued
    pool = BufferPool()
    like = {"w": torch.zeros(1 << 16)}
    first = pool.copy_of({"w": torch.ones(1 << 16)})
    first.attach(push.send(memoryview(first.tensors["w"].numpy()), copy=False, track=True))
    first.release()
    second = pool.acquire(like)
    assert second is not first  # the first is still referenced by a queued frame
    second.release()
    pull = ctx.socket(zmq.PULL)
    pull.bind("inproc://pool-test")
    assert torch.equal(
        torch.frombuffer(bytearray(pull.recv()), dtype=torch.float32), torch.ones(1 << 16)
    )
    deadline = time.monotonic() + 5
    while first.trackers and not first.trackers[0].done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.acquire(like) in (first, second)  # free again: reused, not allocated
    assert len(pool._sets) == 2
    push.close()
    pull.close()


def test_resolve_device() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ConfigError, match="not a device"):
        resolve_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="CUDA is not available"):
            resolve_device("cuda:0")


@cuda
@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["train", "gradient", "delta"])
def test_runner_on_cuda_matches_cpu(mode: str) -> None:
    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    cpu = TaskRunner(Plugins(), torch.device("cpu"), None, "w").run(work(mode, model)).message
    runner = TaskRunner(Plugins(), torch.device("cuda:0"), None, "w")
    gpu = runner.run(work(mode, model))
    assert gpu.message.type is MsgType.UPDATE
    assert runner.staging.pinned and all(t.is_pinned() for t in gpu.buffers.tensors.values())
    for name in update_template(model, "gradient" if mode == "gradient" else "train"):
        assert torch.allclose(
            gpu.message.tensors[name].to_tensor(), cpu.tensors[name].to_tensor(), atol=1e-5
        )


def test_reusable_scratch_is_reused_until_the_shape_changes() -> None:
    from elastic.wire.buffers import reusable

    cache: dict[str, torch.Tensor] = {}
    a = reusable(cache, "w", torch.zeros(3, 4))
    assert reusable(cache, "w", torch.ones(3, 4)) is a
    b = reusable(cache, "w", torch.zeros(5))
    assert b is not a and b.shape == (5,)
    assert reusable(cache, "w", torch.zeros(5, dtype=torch.float64)).dtype == torch.float64


def test_pool_never_hands_out_a_set_of_another_shape() -> None:
    pool = BufferPool()
    small = pool.acquire({"w": torch.zeros(4)})
    small.release()
    big = pool.acquire({"w": torch.zeros(8)})
    assert big is not small and big.tensors["w"].shape == (8,)


@pytest.mark.parametrize("mode", ["train", "gradient"])
def test_model_comes_down_as_a_delta_against_the_reference(mode: str) -> None:
    """Whole first, then a delta against the version the worker holds; a delta
    against a version it does not hold is refused with need_full_model. Taking a
    gradient, the parameters hold the reference themselves (no copy a round)."""
    from elastic.compression.chain import CodecChain

    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    first = work(mode, model)
    first.meta["downlink"] = True
    assert runner.run(first).message.type is MsgType.UPDATE
    assert runner.jobs["j"].reference_version == 0
    moved = {k: v.detach() + 0.25 for k, v in update_template(model, "train").items()}
    parts, encodings = (
        CodecChain(Plugins().codecs, ["zstd"])
        .compressor()
        .compress({k: moved[k] - v.detach() for k, v in update_template(model, "train").items()})
    )
    delta = Message(
        MsgType.WORK,
        job="j",
        round=2,
        version=1,
        key="w/j/2",
        meta=dict(first.meta, delta_from=0),
        tensors={k: WireTensor.from_tensor(v) for k, v in parts.items()},
        encodings=encodings,
    )
    delta = decode([bytes(f) for f in encode(delta)], check_finite=False)
    update = runner.run(delta).message
    assert update.type is MsgType.UPDATE
    ctx = runner.jobs["j"]
    assert ctx.reference_version == 1
    for name, want in moved.items():
        torch.testing.assert_close(ctx.reference[name], want)
    params = dict(ctx.model.named_parameters())
    assert all(
        (ctx.reference[n].data_ptr() == p.data_ptr()) is (mode == "gradient")
        for n, p in params.items()
    )
    if mode == "gradient":  # the same gradient as from the moved model sent whole
        at_moved = LinReg({"samples": 40, "features": 3}).build_model(3)
        at_moved.load_state_dict(moved, strict=False)
        whole = (
            TaskRunner(Plugins(), torch.device("cpu"), None, "w")
            .run(work(mode, at_moved, round_=2))
            .message
        )
        for name in params:
            torch.testing.assert_close(
                update.tensors[name].to_tensor(), whole.tensors[name].to_tensor()
            )
    stale = decode(
        [
            bytes(f)
            for f in encode(
                Message(
                    MsgType.WORK,
                    job="j",
                    round=3,
                    version=2,
                    key="w/j/3",
                    meta=dict(first.meta, delta_from=0),
                )
            )
        ],
        check_finite=False,
    )
    nack = runner.run(stale).message
    assert nack.type is MsgType.NACK and nack.meta["reason"] == "need_full_model"


@pytest.mark.parametrize("mode", ["gradient", "train"])
def test_a_work_naming_the_shared_reference_is_done_on_the_model_read_from_it(mode: str) -> None:
    from elastic.wire.shared import SharedTensors

    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    floats = {k: v.detach() for k, v in update_template(model, "train").items()}
    shared = SharedTensors(floats)
    try:
        with shared.changing(4):
            for name, t in shared.tensors.items():
                t.copy_(floats[name])

        def job(version: int, described: object) -> Message:
            w = work(
                mode, LinReg({"samples": 40, "features": 3}).build_model(9), round_=version + 1
            )  # its tensors are not the model
            w.tensors = {}  # the model's weights are not in the message at all
            w.meta.update({"downlink": True, "shared": described})
            return w

        runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
        msg = runner.run(job(4, shared.describe())).message
        assert msg.type is MsgType.UPDATE
        want = expected(mode, model)
        for name, wt in msg.tensors.items():
            assert torch.allclose(wt.to_tensor(), want[name], atol=1e-6), name
        stale = runner.run(job(5, shared.describe())).message  # the segment stands for version 4
        assert stale.type is MsgType.NACK and stale.meta["reason"] == "need_full_model"
        gone = runner.run(
            job(4, {"seg": "elastic-1-0000000000000000", "at": shared.describe()["at"]})
        ).message
        assert gone.type is MsgType.NACK and gone.meta["reason"] == "no_shared_reference"
    finally:
        shared.close()


def test_a_gradient_is_taken_on_the_shared_reference_where_it_lies_and_never_writes_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Taking a gradient, the parameters view the coordinator's segment (copy on
    write): they follow its changes with no copy, a reference that changes under the
    gradient voids it, and a later delta added in place never reaches the segment."""
    from elastic.compression.chain import SEP
    from elastic.wire.shared import SharedTensors
    from elastic.worker import executors as runner_module

    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    floats = {k: v.detach().clone() for k, v in update_template(model, "train").items()}
    shared = SharedTensors(floats)

    def job(version: int, **meta: object) -> Message:
        w = work("gradient", model, round_=version + 1)
        w.tensors = {}
        w.meta.update({"downlink": True, **meta})
        return w

    def publish(version: int, scale: float) -> None:
        with shared.changing(version):
            for name, t in shared.tensors.items():
                t.copy_(floats[name] * scale)

    try:
        runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
        publish(1, 1.0)
        assert runner.run(job(1, shared=shared.describe())).message.type is MsgType.UPDATE
        params = dict(runner.jobs["j"].model.named_parameters())
        publish(2, 2.0)  # the worker's parameters follow, with no WORK and no copy
        assert all(torch.equal(params[k].detach(), floats[k] * 2.0) for k in floats)
        msg = runner.run(job(2, shared=shared.describe())).message
        for name, wt in msg.tensors.items():  # the gradient at the doubled weights
            assert torch.allclose(
                wt.to_tensor(), expected("gradient", _scaled(model, 2.0))[name], atol=1e-5
            ), name

        original = runner_module.batch_gradient

        def overtaken(*args, **kwargs):  # type: ignore[no-untyped-def]
            result = original(*args, **kwargs)
            publish(3, 3.0)  # the next round began meanwhile
            return result

        monkeypatch.setattr(runner_module, "batch_gradient", overtaken)
        late = runner.run(job(2, shared=shared.describe())).message
        assert (
            late.type is MsgType.NACK
            and "changed while the gradient was taken" in late.meta["detail"]
        )
        monkeypatch.setattr(runner_module, "batch_gradient", original)

        assert runner.run(job(3, shared=shared.describe())).message.type is MsgType.UPDATE
        delta = {
            f"{k}{SEP}x": WireTensor.from_tensor(torch.ones_like(v).half())
            for k, v in floats.items()
        }
        w = job(4, delta_from=3)
        w.tensors, w.encodings = (
            delta,
            {
                k: [
                    {
                        "s": "fp16",
                        "in": "",
                        "shape": list(v.shape),
                        "dtype": "float32",
                        "out": ["x"],
                    }
                ]
                for k, v in floats.items()
            },
        )
        assert runner.run(w).message.type is MsgType.UPDATE
        assert all(
            torch.equal(params[k].detach(), floats[k] * 3.0 + 1) for k in floats
        )  # the delta, added
        assert all(
            torch.equal(shared.tensors[k], floats[k] * 3.0) for k in floats
        )  # in memory of its own
        publish(5, 5.0)  # back on the shared path: a fresh view, no page left behind
        assert runner.run(job(5, shared=shared.describe())).message.type is MsgType.UPDATE
        params = dict(runner.jobs["j"].model.named_parameters())
        assert all(torch.equal(params[k].detach(), floats[k] * 5.0) for k in floats)
    finally:
        shared.close()


def _scaled(model: torch.nn.Module, factor: float) -> torch.nn.Module:
    m = LinReg({"samples": 40, "features": 3}).build_model(3)
    m.load_state_dict({k: v * factor for k, v in model.state_dict().items()})
    return m


def expected_for_shard(model: torch.nn.Module, index: int, count: int) -> dict[str, torch.Tensor]:
    from elastic.api import Shard

    task = LinReg({"samples": 40, "features": 3})
    x, y = task.train_dataset(Shard(index, count, 0), None).tensors
    m = task.build_model(0)
    m.load_state_dict(model.state_dict())
    task.loss(m, x, y).backward()
    return {n: model.state_dict()[n] - 0.1 * p.grad for n, p in m.named_parameters()}


def test_virtual_clients_each_train_from_the_model_sent_on_their_own_shard() -> None:
    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    msg = work("train", model)
    msg.meta |= {"shard": [1, 4], "clients": [[1, 1], [3, 1], [2, 1]]}
    runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    with pytest.raises(Exception, match="use results"):
        runner.run(msg)
    updates = [r.message for r in runner.results(msg)]
    assert [(u.key, u.meta["client"]) for u in updates] == [
        ("w/j/1/1", 1),
        ("w/j/1/3", 3),
        ("w/j/1/2", 2),
    ]
    for update in updates:  # each from the model sent, not from the client before's
        want = expected_for_shard(model, update.meta["client"], 4)
        for name, tensor in want.items():
            assert torch.allclose(update.tensors[name].to_tensor(), tensor, atol=1e-6), name
    assert updates[0].meta["num_samples"] == 10


@pytest.mark.parametrize(
    "clients, detail",
    [
        ([[9, 1]], "bad clients entry [9, 1]"),
        ([[1]], "bad clients entry [1]"),
        ([[1, 0]], "[1, 0]"),
    ],
)
def test_a_bad_clients_list_is_one_nack(clients: list, detail: str) -> None:
    msg = work("train", LinReg({"samples": 40, "features": 3}).build_model(3))
    msg.meta |= {"shard": [1, 4], "clients": clients}
    [result] = TaskRunner(Plugins(), torch.device("cpu"), None, "w").results(msg)
    assert result.message.type is MsgType.NACK and detail in result.message.meta["detail"]


def test_a_straggler_does_the_epochs_it_is_told() -> None:
    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    one, three = work("train", model), work("train", model)
    three.meta["epochs"] = 3
    runner = TaskRunner(Plugins(), torch.device("cpu"), None, "w")
    a = runner.run(one).message.tensors["weight"].to_tensor().clone()
    b = runner.run(three).message.tensors["weight"].to_tensor().clone()
    assert not torch.allclose(a, b)
    three.meta["epochs"] = 1
    assert torch.allclose(runner.run(three).message.tensors["weight"].to_tensor(), a)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_trains_and_sends_fp32(precision: str) -> None:
    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    msg = work("train", model)
    msg.meta["train"] = {**msg.meta["train"], "precision": precision}
    update = TaskRunner(Plugins(), torch.device("cpu"), None, "w").run(msg).message
    for name, want in expected("train", model).items():
        got = update.tensors[name].to_tensor()
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=0.05), name
        assert not torch.equal(got, model.state_dict()[name])


@cuda
def test_fp16_on_cuda_scales_its_gradients() -> None:
    model = LinReg({"samples": 40, "features": 3}).build_model(3)
    msg = work("train", model)
    msg.meta["train"] = {**msg.meta["train"], "precision": "fp16"}
    update = TaskRunner(Plugins(), torch.device("cuda"), None, "w").run(msg).message
    for name, want in expected("train", model).items():
        assert torch.allclose(update.tensors[name].to_tensor(), want, atol=0.01), name
