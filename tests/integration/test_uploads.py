"""Big updates are offered and sent one window at a time: the coordinator never
holds more than the window (or one update) of them at once; sent in parts, it holds
parts, and the model comes out as from whole updates."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from .conftest import Cluster, big_job, wait_for, write_job

pytestmark = pytest.mark.slow
PARAMS = 1_000_000  # 4 MB updates: above OFFER_MIN_BYTES, so every one is offered first


def test_updates_come_in_one_at_a_time_with_a_zero_window(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "big.toml",
        f"""
[job]
id = "big"
task = "synthetic"
rule = "fedavg"
rounds = 5
min_workers = 4
max_workers = 4
eval_every = 0
[task]
params = {PARAMS}
[train]
lr = 0.001
""",
    )
    cluster.coordinator(job, extra=("--upload-window", "0", "--log-level", "debug"))
    for i in range(4):
        cluster.worker(f"w{i}")
    done = cluster.wait_status("big", lambda s: s["state"] == "finished", 120, "the job to finish")
    assert [h["updates"] for h in done["history"]] == [4] * 5
    log = (tmp_path / "coordinator.log").read_text()
    grants = [
        (w, int(b), int(f))
        for w, b, f in re.findall(
            r"upload granted worker=(\w+) key=\S+ bytes=(\d+) in_flight=(\d+)", log
        )
    ]
    assert len(grants) == 20, grants  # every update was offered and granted
    assert all(b >= PARAMS * 4 and f == b for _, b, f in grants), (
        grants
    )  # never more than one in flight


@pytest.mark.parametrize("rule", ["fedavg", "syncavg"])
def test_updates_in_parts_make_the_model_whole_updates_make(
    cluster: Cluster, tmp_path: Path, rule: str
) -> None:
    """Over the socket (no shared memory), 4 MB updates come in 1 MiB parts, each
    granted in turn; the final model is the one whole updates give."""
    models = {}
    for part in ("1048576", "0"):
        run = tmp_path / f"part-{part}"
        run.mkdir()
        cluster.state = run / "state"
        cluster.coordinator(
            big_job(run, rounds=3, rule=rule),
            name=f"coordinator-{part}",
            extra=("--upload-part", part, "--log-level", "debug", "--exit-when-done"),
        )
        workers = [cluster.worker(f"w{i}-{part}", "--no-shared-memory") for i in range(2)]
        done = cluster.wait_status(
            "big", lambda s: s["state"] == "finished", 120, "the job to finish"
        )
        assert [h["updates"] for h in done["history"]] == [2] * 3
        for w in workers:
            w.terminate()
            w.wait(10)
        log = (tmp_path / f"coordinator-{part}.log").read_text()
        grants = [int(b) for b in re.findall(r"upload granted worker=\S+ key=\S+ bytes=(\d+)", log)]
        if part == "0":
            assert grants == [PARAMS * 4] * 6, grants  # whole
        else:  # 4 parts of each of 6 updates: 3 of 1 MiB and the rest
            assert sorted(grants) == sorted([1 << 20] * 18 + [PARAMS * 4 - 3 * (1 << 20)] * 6), (
                grants
            )
            assert "update in parts given up" not in log
        models[part] = safetensors.torch.load_file(cluster.state / "big" / "final.safetensors")
    for name, whole in models["0"].items():
        # Two updates a round, summed in either order: equal up to rounding.
        torch.testing.assert_close(models["1048576"][name], whole, rtol=1e-6, atol=1e-7)


def test_a_negative_window_is_refused_at_start(cluster: Cluster, tmp_path: Path) -> None:
    bad = cluster.spawn("bad", "coordinator", "--bind", cluster.address, "--upload-window", "-1")
    assert bad.wait(30) == 2
    assert "upload_window must be >= 0" in (tmp_path / "bad.log").read_text()


def test_parts_out_of_turn_get_nacks_and_the_job_goes_on(cluster: Cluster, tmp_path: Path) -> None:
    """A peer that joins, is granted a part, and sends others (or none was granted):
    each gets a NACK naming the problem, and the real workers' job goes on."""
    import zmq

    from elastic.wire import Message, MsgType, WireTensor, decode, encode

    cluster.coordinator(
        big_job(tmp_path, rounds=100_000, rule="fedavg"), extra=("--upload-part", "1048576")
    )  # runs until the test ends
    workers = [cluster.worker(f"w{i}", "--no-shared-memory") for i in range(2)]
    cluster.wait_status("big", lambda s: s["round"] >= 1, 120, "the first round")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.ROUTING_ID, b"evil")
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(cluster.address)

    def ask(msg: Message) -> Message:
        msg.sender = "evil"
        sock.send_multipart([bytes(f) for f in encode(msg)])
        while True:
            assert sock.poll(10_000), f"no answer to {msg.type} {msg.meta}"
            reply = decode(sock.recv_multipart())
            if reply.type not in (
                MsgType.HEARTBEAT_ACK,
                MsgType.WORK,
            ):  # it is a member now: it may be given work
                return reply

    try:
        assert (
            ask(
                Message(
                    MsgType.HELLO, meta={"device": "cpu", "host": "evil", "software": "0", "pid": 1}
                )
            ).type
            is MsgType.WELCOME
        )
        key = "evil/big/1000000000"  # a round far ahead: never running
        grant = ask(
            Message(
                MsgType.OFFER,
                job="big",
                round=10**9,
                key=key,
                meta={"bytes": PARAMS * 4, "parts": True},
            )
        )
        assert grant.type is MsgType.GRANT and grant.meta["part"] == [0, 4]
        tensors = {
            name: WireTensor.from_tensor(torch.zeros(stop - start))
            for name, start, stop in grant.meta["segments"]
        }
        assert sum(t.nbytes for t in tensors.values()) == 1 << 20
        meta = {"num_samples": 5, "loss": 0.1, "kind": "weights", "train_seconds": 0.1}
        for part in (
            [2, 4],
            [0, 4],
            [0, "zero"],
        ):  # out of turn; then no stream any more; then garbage
            update = Message(
                MsgType.UPDATE,
                job="big",
                round=10**9,
                key=key,
                meta={**meta, "part": part},
                tensors=tensors,
            )
            nack = ask(update)
            assert (
                nack.type is MsgType.NACK
                and nack.meta["reason"] == "bad_part"
                and "expected" in nack.meta["detail"]
            ), nack.meta
        # Not even a list: the header's schema refuses it before any stream is looked at.
        nack = ask(
            Message(
                MsgType.UPDATE,
                job="big",
                round=10**9,
                key=key,
                meta={**meta, "part": "zero"},
                tensors=tensors,
            )
        )
        assert (nack.meta["reason"], nack.meta["detail"]) == (
            "bad_field",
            "UPDATE meta field 'part' must be list, got str",
        ), nack.meta
        assert (
            ask(
                Message(
                    MsgType.OFFER,
                    job="big",
                    round=10**9,
                    key=key,
                    meta={"bytes": PARAMS * 4, "parts": True},
                )
            ).type
            is MsgType.GRANT
        )
        part0 = Message(
            MsgType.UPDATE,
            job="big",
            round=10**9,
            key=key,
            meta={**meta, "part": [0, 4]},
            tensors=tensors,
        )
        assert ask(part0).meta["reason"] == "unknown_round"  # in turn, but for no round that runs
    finally:
        sock.close()
    reached = cluster.wait_status("big", lambda s: True, 10, "the status")["round"]
    going = cluster.wait_status(
        "big", lambda s: s["round"] >= reached + 3, 120, "three more rounds"
    )
    assert all(h["updates"] == 2 for h in going["history"])
    for w in workers:
        w.terminate()


def test_a_worker_killed_while_sending_parts_leaves_them_folded_and_the_job_goes_on(
    cluster: Cluster, tmp_path: Path
) -> None:
    import signal

    # 4 KiB parts: a 4 MB update is ~1 000 of them, sent over a good fraction of a second.
    cluster.coordinator(
        big_job(tmp_path, rounds=6, min_workers=1, rule="fedavg"),
        extra=("--upload-part", "4096", "--log-level", "debug"),
    )
    workers = {w: cluster.worker(w, "--no-shared-memory") for w in ("w0", "w1")}
    log = tmp_path / "coordinator.log"
    wait_for(
        lambda: log.read_text().count("upload granted worker=w1 ") >= 20,
        120,
        "w1 to be sending its first update in parts",
    )
    workers["w1"].send_signal(signal.SIGKILL)
    done = cluster.wait_status(
        "big", lambda s: s["state"] == "finished", 120, "the job to finish without w1"
    )
    assert [h["round"] for h in done["history"]] == list(range(1, 7))
    text = log.read_text()
    assert "update in parts given up job=big worker=w1 " in text, text[-3000:]
    model = safetensors.torch.load_file(cluster.state / "big" / "final.safetensors")
    assert all(torch.isfinite(t).all() for t in model.values())
    workers["w0"].terminate()
