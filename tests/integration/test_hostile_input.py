"""Garbage and mutated frames hit a live coordinator; a real worker's job still finishes."""

from __future__ import annotations

import os
import random
import socket
import time
from pathlib import Path

import msgpack
import pytest
import torch
import zmq

from elastic.wire import Message, MsgType, WireTensor, decode, encode

from .conftest import Cluster, write_job

pytestmark = pytest.mark.slow


def hostile_messages() -> list[tuple[str, list[bytes]]]:
    good = encode(
        Message(
            MsgType.UPDATE,
            job="lin",
            round=1,
            version=0,
            sender="evil",
            key="evil/lin/1",
            meta={"num_samples": 5, "loss": 0.1, "kind": "delta", "train_seconds": 0.1},
            tensors={
                "weight": WireTensor.from_tensor(torch.ones(1, 4)),
                "bias": WireTensor.from_tensor(torch.ones(1)),
            },
        )
    )
    good = [bytes(f) for f in good]
    header = msgpack.unpackb(good[0])
    nan = torch.ones(1, 4)
    nan[0, 2] = float("nan")
    nan_update = [
        bytes(f)
        for f in encode(
            Message(
                MsgType.UPDATE,
                job="lin",
                round=1,
                version=0,
                sender="evil",
                key="evil/lin/1",
                meta=header["meta"],
                tensors={
                    "weight": WireTensor.from_tensor(nan),
                    "bias": WireTensor.from_tensor(torch.ones(1)),
                },
            )
        )
    ]
    rng = random.Random(1)
    cases = [
        ("random bytes", [rng.randbytes(64)]),
        ("empty header", [b""]),
        ("wrong version", [msgpack.packb({**header, "p": 9}), *good[1:]]),
        ("unknown type", [msgpack.packb({**header, "t": "PWN"}), *good[1:]]),
        (
            "missing field",
            [msgpack.packb({k: v for k, v in header.items() if k != "meta"}), *good[1:]],
        ),
        ("length mismatch", [good[0], good[1][:-4], good[2]]),
        (
            "shape mismatch",
            [
                msgpack.packb(
                    {
                        **header,
                        "tensors": [
                            {**header["tensors"][0], "shape": [2, 4]},
                            header["tensors"][1],
                        ],
                    }
                ),
                *good[1:],
            ],
        ),
        ("frame count", [good[0], good[1]]),
        (
            "oversized claim",
            [
                msgpack.packb(
                    {
                        **header,
                        "tensors": [{**header["tensors"][0], "shape": [2**30, 4], "nbytes": 2**34}],
                    }
                ),
                *good[1:],
            ],
        ),
        ("nan update", nan_update),
        ("not a member", good),
        ("sender spoof", [msgpack.packb({**header, "sender": "w0"}), *good[1:]]),
        (
            "work to coordinator",
            [
                msgpack.packb(
                    {
                        **header,
                        "t": "WORK",
                        "meta": {
                            "mode": "train",
                            "task": "linreg",
                            "task_params": {},
                            "train": {},
                            "shard": [0, 1],
                            "seed": 0,
                        },
                    }
                ),
                *good[1:],
            ],
        ),
    ]
    for i in range(15):  # byte flips in the header of a valid update
        h = bytearray(good[0])
        h[rng.randrange(len(h))] ^= rng.randrange(1, 256)
        cases.append((f"flip {i}", [bytes(h), *good[1:]]))
    return cases


def test_garbage_gets_nacks_and_the_job_finishes(cluster: Cluster, tmp_path: Path) -> None:
    job = write_job(
        tmp_path / "lin.toml",
        """
[job]
id = "lin"
task = "linreg"
rule = "fedavg"
rounds = 30
min_workers = 1
eval_every = 5
[task]
features = 4
[train]
lr = 0.05
""",
    )
    cluster.coordinator(job)
    cluster.worker("w0")
    cluster.wait_status("lin", lambda s: s["round"] >= 1, 60, "the first round")

    ctx = zmq.Context.instance()
    answered, silent = 0, []
    for name, frames in hostile_messages():
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.ROUTING_ID, b"evil")
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(cluster.address)
        sock.send_multipart(frames)
        if sock.poll(3000):
            reply = decode(sock.recv_multipart())
            assert reply.type is MsgType.NACK, name
            assert reply.meta["reason"] and reply.meta["detail"], name
            answered += 1
        else:
            silent.append(name)
        sock.close()
    assert answered >= len(hostile_messages()) - 3, silent  # a few flips may be dropped unanswered

    # a frame far above the per-frame limit: libzmq drops that connection, nothing else
    big = ctx.socket(zmq.DEALER)
    big.setsockopt(zmq.LINGER, 0)
    big.connect(cluster.address)
    big.send_multipart([b"x" * (64 << 20)])
    big.close()
    # raw TCP garbage: not even ZMTP
    with socket.create_connection(("127.0.0.1", cluster.port)) as raw:
        raw.sendall(os.urandom(4096))
        time.sleep(0.2)

    done = cluster.wait_status(
        "lin", lambda s: s["state"] == "finished", 90, "the job to finish despite the garbage"
    )
    assert [h["round"] for h in done["history"]] == list(range(1, 31))
    assert torch.isfinite(torch.tensor(done["history"][-1]["eval_loss"]))
    log = (tmp_path / "coordinator.log").read_text()
    for reason in (
        "malformed_header",
        "bad_version",
        "unknown_type",
        "non_finite",
        "sender_mismatch",
        "unexpected_type",
    ):
        assert f"reason={reason}" in log, reason
