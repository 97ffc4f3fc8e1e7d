"""Compressed updates between real processes: the coordinator decodes any chain from
the header alone, and the job still learns."""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest
import torch
import zmq

from elastic.compression.chain import CodecChain
from elastic.plugins import Plugins
from elastic.wire import Message, MsgType, WireTensor, decode, encode
from tests.etcd_server import free_port

from .conftest import Cluster, wait_for, write_job
from .test_job_cli import elastic
from .test_metrics import scrape

pytestmark = pytest.mark.slow


def test_fedavg_with_quantised_compressed_updates(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "cz.toml",
        """
[job]
id = "cz"
task = "digits"
rule = "fedavg"
rounds = 15
min_workers = 3
partitions = 3
eval_every = 5
[train]
local_epochs = 2
lr = 0.05
momentum = 0.9
[compression]
update = ["qsgd:4", "zstd"]
""",
    )
    cluster.coordinator(job)
    for w in ("w0", "w1", "w2"):
        cluster.worker(w)
    done = cluster.wait_status(
        "cz", lambda s: s["state"] == "finished", 120, "the compressed job to finish"
    )
    assert [h["round"] for h in done["history"]] == list(range(1, 16)) and all(
        h["updates"] == 3 for h in done["history"]
    )
    assert done["final"]["accuracy"] >= 0.88, done["final"]
    model_bytes = done["history"][0]["bytes_sent"] / 3  # WORK goes out whole: one model per worker
    sent_up = done["totals"]["bytes_received"] / (15 * 3)
    assert sent_up < model_bytes / 6, (sent_up, model_bytes)  # 4-bit levels, then zstd
    assert math.isfinite(done["last"]["loss"])


def test_both_ways_with_a_worker_joining_late(cluster: Cluster, tmp_path: Path) -> None:
    """The model comes down as compressed deltas to workers that hold the last
    version; a worker that joins later gets it whole first, then deltas too."""
    job = write_job(
        tmp_path / "cz.toml",
        """
[job]
id = "cz"
task = "digits"
rule = "fedavg"
rounds = 25
min_workers = 2
partitions = 3
eval_every = 5
[train]
local_epochs = 4
lr = 0.05
momentum = 0.9
[compression]
update = ["topk:0.1", "fp16", "zstd"]
model = ["fp16", "zstd"]
""",
    )
    control = f"tcp://127.0.0.1:{free_port()}"
    cluster.coordinator(job, extra=("--control", control))
    for w in ("w0", "w1"):
        cluster.worker(w)
    cluster.wait_status("cz", lambda s: s["round"] >= 3, 60, "three rounds with two workers")
    # Paused while w2 starts (seconds of imports): the job must not end before it joins.
    assert elastic("job", "pause", "cz", "--coordinator", control).returncode == 0
    cluster.worker("w2")
    wait_for(  # joined, and its job built: it takes work from the next round
        lambda: "worker prepared worker=w2" in (tmp_path / "coordinator.log").read_text(),
        60,
        "w2 to join and prepare",
    )
    assert elastic("job", "resume", "cz", "--coordinator", control).returncode == 0
    done = cluster.wait_status("cz", lambda s: s["state"] == "finished", 120, "the job to finish")
    history = done["history"]
    whole = history[0]["bytes_sent"] / 2  # round 1: the whole model to each of two workers
    three = [h for h in history if h["participants"] == 3]
    assert three, "w2 never took part"
    assert any(h["bytes_sent"] > whole for h in three)  # w2's first WORK: the whole model
    assert all(h["bytes_sent"] < whole for h in history[-3:])  # later: three deltas < one model
    assert done["final"]["accuracy"] >= 0.88, done["final"]
    assert "need_full_model" not in (tmp_path / "coordinator.log").read_text()


def test_an_update_through_other_codecs_is_refused_and_counted(
    cluster: Cluster, tmp_path: Path
) -> None:
    """A member that compresses with codecs other than the job's chain (installed
    ones, or none at all) gets ``codec_mismatch``, counted in the metrics; the job
    goes on with the honest worker."""
    job = write_job(
        tmp_path / "lin.toml",
        """
[job]
id = "lin"
task = "linreg"
rule = "fedavg"
rounds = 200
min_workers = 1
round_timeout = 20
[task]
features = 4
[compression]
update = ["fp16"]
""",
    )
    port = free_port()
    cluster.coordinator(job, extra=("--metrics-port", str(port)))
    cluster.worker("w0")
    cluster.wait_status("lin", lambda s: s["round"] >= 2, 60, "two rounds with the honest worker")

    ctx = zmq.Context.instance()
    rogue = ctx.socket(zmq.DEALER)
    rogue.setsockopt(zmq.ROUTING_ID, b"rogue")
    rogue.setsockopt(zmq.LINGER, 0)
    rogue.connect(cluster.address)

    def send(msg: Message) -> None:
        msg.sender = "rogue"
        rogue.send_multipart(encode(msg))

    def receive(kind: MsgType, timeout: float = 30.0) -> Message:
        deadline = time.monotonic() + timeout
        while rogue.poll(max(1, int((deadline - time.monotonic()) * 1000))):
            msg = decode(rogue.recv_multipart(), check_finite=False)
            if msg.type is kind:
                return msg
            if time.monotonic() > deadline:
                break
        raise AssertionError(f"no {kind} for the rogue worker")

    send(Message(MsgType.HELLO, meta={"device": "cpu", "host": "rogue", "software": "0", "pid": 1}))
    receive(MsgType.WELCOME)
    chains = {"an installed codec, not the job's": ["zstd"], "no compression": []}
    for chain in chains.values():
        work = receive(MsgType.WORK)
        assert work.meta["codecs"] == ["fp16"]
        change = {k: torch.full(wt.shape, 0.01) for k, wt in work.tensors.items()}
        parts, encodings = CodecChain(Plugins().codecs, chain).compressor().compress(change)
        send(
            Message(
                MsgType.UPDATE,
                job="lin",
                round=work.round,
                version=work.version,
                key=work.key,
                meta={"num_samples": 10, "loss": 0.1, "kind": "weights", "train_seconds": 0.1},
                tensors={k: WireTensor.from_tensor(v) for k, v in parts.items()},
                encodings=encodings,
            )
        )
        nack = receive(MsgType.NACK)
        assert nack.meta["reason"] == "codec_mismatch", nack.meta
        send(Message(MsgType.BYE, key="bye"))  # leave, so the round need not wait for us
        receive(MsgType.ACK)
        send(
            Message(
                MsgType.HELLO, meta={"device": "cpu", "host": "rogue", "software": "0", "pid": 1}
            )
        )
        receive(MsgType.WELCOME)
    send(Message(MsgType.BYE, key="bye"))
    rogue.close()

    counted = wait_for(
        lambda: (
            scrape(port).get(("elastic_updates_rejected_total", (("reason", "codec_mismatch"),)), 0)
            >= 2
        ),
        30,
        "two codec_mismatch in the metrics",
    )
    assert counted
    before = cluster.status("lin")["round"]
    cluster.wait_status(
        "lin", lambda s: s["round"] >= before + 3, 60, "the job to go on without the rogue"
    )
    log = (tmp_path / "coordinator.log").read_text()
    assert (
        "reason=codec_mismatch detail=tensor" in log
        and "job takes the chain ['fp16']" in log
        and "tensor 'weight' skipped stage 'fp16'" in log
    )
