"""Every event hook fires from a real coordinator, over real sockets.

The coordinator and workers run in threads of this process so a recording plugin
can watch them. A "ghost" member joins and heartbeats but never trains: its rounds
are abandoned at the deadline, then it goes silent and is removed.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import zmq

from elastic.config import CoordinatorConfig, WorkerConfig
from elastic.coordinator.daemon import Coordinator
from elastic.hookspecs import hookimpl
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.wire import Message, MsgType, encode
from elastic.worker.daemon import Worker

from .conftest import wait_for

EXPECTED_EVENTS = [
    "elastic_coordinator_started",
    "elastic_worker_joined",
    "elastic_job_waiting",
    "elastic_round_started",
    "elastic_round_abandoned",
    "elastic_update_rejected",
    "elastic_validate_update",
    "elastic_worker_left",
    "elastic_round_completed",
    "elastic_checkpoint_saved",
    "elastic_job_finished",
    "elastic_coordinator_stopping",
]


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict]] = []
        self.lock = threading.Lock()

    def _add(self, name: str, **kw) -> None:
        with self.lock:
            self.events.append((name, kw))

    def names(self) -> list[str]:
        with self.lock:
            return [n for n, _ in self.events]

    @hookimpl
    def elastic_coordinator_started(self, address, jobs):
        self._add("elastic_coordinator_started", address=address, jobs=jobs)

    @hookimpl
    def elastic_coordinator_stopping(self, reason):
        self._add("elastic_coordinator_stopping", reason=reason)

    @hookimpl
    def elastic_worker_joined(self, worker_id, device, host, slot):
        self._add("elastic_worker_joined", worker_id=worker_id, device=device, slot=slot)

    @hookimpl
    def elastic_worker_left(self, worker_id, reason):
        self._add("elastic_worker_left", worker_id=worker_id, reason=reason)

    @hookimpl
    def elastic_job_waiting(self, job_id, members, needed):
        self._add("elastic_job_waiting", members=members, needed=needed)

    @hookimpl
    def elastic_round_started(self, job_id, round, version, participants):
        self._add("elastic_round_started", round=round, participants=participants)

    @hookimpl
    def elastic_round_completed(self, job_id, round, version, metrics):
        self._add("elastic_round_completed", round=round, version=version, metrics=metrics)

    @hookimpl
    def elastic_round_abandoned(self, job_id, round, reason):
        self._add("elastic_round_abandoned", round=round, reason=reason)

    @hookimpl
    def elastic_job_finished(self, job_id, state, metrics):
        self._add("elastic_job_finished", state=state, metrics=metrics)

    @hookimpl
    def elastic_validate_update(self, job_id, worker_id, update):
        self._add("elastic_validate_update", worker_id=worker_id, kind=update.kind)
        return None  # no veto

    @hookimpl
    def elastic_update_rejected(self, job_id, worker_id, reason, detail):
        self._add("elastic_update_rejected", worker_id=worker_id, reason=reason)

    @hookimpl
    def elastic_checkpoint_saved(self, job_id, round, path):
        self._add("elastic_checkpoint_saved", round=round, path=path)


def start_worker(address: str, wid: str, plugins: Plugins) -> Worker:
    config = WorkerConfig(
        coordinator=address, id=wid, device="cpu", coordinator_timeout=5, insecure=True
    )
    config.validate()
    w = Worker(config, plugins)
    w.thread = threading.Thread(target=w.run, kwargs={"install_signals": False}, daemon=True)  # type: ignore[attr-defined]
    w.thread.start()  # type: ignore[attr-defined]
    return w


def test_every_event_hook_fires(tmp_path: Path) -> None:
    rec = Recorder()
    plugins = Plugins(extra=[rec])
    spec = parse_job_spec(
        {
            "job": {
                "id": "ev",
                "task": "linreg",
                "rule": "fedavg",
                "rounds": 3,
                "min_workers": 3,
                "round_timeout": 1.5,
            },
            "task": {"samples": 90},
        }
    )
    config = CoordinatorConfig(
        bind="tcp://127.0.0.1:0",
        state_dir=tmp_path,
        heartbeat_interval=0.2,
        heartbeat_timeout=1.0,
        exit_when_done=True,
        insecure=True,
    )
    config.validate()
    coord = Coordinator(config, plugins, [spec])
    ct = threading.Thread(target=coord.run, kwargs={"install_signals": False}, daemon=True)
    ct.start()
    workers = [
        start_worker(coord.endpoint, "a", Plugins()),
        start_worker(coord.endpoint, "b", Plugins()),
    ]

    ghost = zmq.Context.instance().socket(zmq.DEALER)
    ghost.setsockopt(zmq.ROUTING_ID, b"ghost")
    ghost.setsockopt(zmq.LINGER, 0)
    ghost.connect(coord.endpoint)

    def send(msg: Message) -> None:
        msg.sender = "ghost"
        ghost.send_multipart(encode(msg))

    try:
        wait_for(lambda: rec.names().count("elastic_worker_joined") == 2, 20, "two workers to join")
        send(
            Message(
                MsgType.HELLO, meta={"device": "cpu", "host": "nowhere", "software": "0", "pid": 0}
            )
        )
        deadline = time.monotonic() + 20
        while "elastic_round_abandoned" not in rec.names():  # keep the ghost alive, never train
            assert time.monotonic() < deadline, rec.names()
            send(Message(MsgType.HEARTBEAT, meta={"busy": True}))
            time.sleep(0.2)
        ghost.send_multipart([b"\x00 not msgpack"])
        wait_for(
            lambda: any(n == "elastic_worker_left" for n in rec.names()),
            10,
            "the silent ghost to be removed",
        )
        workers.append(start_worker(coord.endpoint, "c", Plugins()))
        ct.join(60)
        assert not ct.is_alive(), rec.names()
    finally:
        ghost.close()
        for w in workers:
            w.stop()
        for w in workers:  # let them finish: torch exiting under a running thread aborts
            w.thread.join(30)  # type: ignore[attr-defined]

    names = rec.names()
    assert set(names) == set(EXPECTED_EVENTS), set(EXPECTED_EVENTS) ^ set(names)
    ev = dict(rec.events[names.index("elastic_round_abandoned")][1])
    assert ev["round"] == 1 and "fewer than min_workers=3" in ev["reason"]
    left = dict(rec.events[names.index("elastic_worker_left")][1])
    assert left["worker_id"] == "ghost" and "no heartbeat" in left["reason"]
    rejected = [kw for n, kw in rec.events if n == "elastic_update_rejected"]
    assert any(r["worker_id"] == "ghost" and r["reason"] == "malformed_header" for r in rejected)
    completed = [kw["round"] for n, kw in rec.events if n == "elastic_round_completed"]
    assert completed == [1, 2, 3]
    assert (
        names.index("elastic_coordinator_started") == 0
        and names[-1] == "elastic_coordinator_stopping"
    )
    finished = dict(rec.events[names.index("elastic_job_finished")][1])
    assert finished["state"] == "finished" and "eval_loss" in finished["metrics"]
