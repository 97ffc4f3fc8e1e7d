"""The contract of a cluster backend: one suite, run against every backend.

A backend's test class inherits ``ClusterConformance`` and gives the fixture
``url`` (a fresh cluster for each test), and, when it is shared (several processes
see its state), ``depose`` (end a leader's lease behind its back, as a partition or
a long stall would) and ``restart`` (stop and start its servers). The suite covers:
members (a record plus a HELLO; a graceful leave at once; a crash when its lease
ends), slots, compare-and-set on the job store and its round trips, watches (also
after the servers restart), the election (one leads, a standby takes over, tokens
grow), fencing of a deposed leader, and leader discovery.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from elastic.membership.base import Member, MembershipEvent, MemberTable
from elastic.membership.cluster import ClusterBackend, Election, LeaderRecord, open_backend

TTL = 2.0
RECORD = {"device": "cpu", "host": "test"}


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def events_until(
    table: MemberTable, want: Callable[[MembershipEvent], bool], timeout: float
) -> tuple[MembershipEvent, float]:
    """The first event ``want`` takes, and how long it took to come."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        for event in table.poll(time.monotonic()):
            if want(event):
                return event, time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"no such membership event within {timeout}s")


def leader_record(name: str) -> LeaderRecord:
    return LeaderRecord(name, f"tcp://{name}:5555", f"tcp://{name}:5556", time.time())


class ClusterConformance:
    """Inherit, and give ``url``; shared backends also give ``depose`` and ``restart``."""

    @pytest.fixture
    def url(self) -> str:
        raise NotImplementedError("a backend's test class gives the fixture url")

    def depose(self, election: Election) -> None:
        raise NotImplementedError("a shared backend's test class says how its leader is deposed")

    def restart(self) -> None:
        raise NotImplementedError("a shared backend's test class says how its servers restart")

    @pytest.fixture
    def backend(self, url: str) -> ClusterBackend:
        return open_backend(url)

    @pytest.fixture
    def table(self, backend: ClusterBackend) -> Iterator[MemberTable]:
        table = backend.member_table(heartbeat_timeout=1.0)
        yield table
        table.close()

    @staticmethod
    def shared_only(backend: ClusterBackend) -> None:
        if not backend.shared:
            pytest.skip(
                f"the {backend.name} backend keeps its state in one process: no other can see, "
                "depose or restart it"
            )

    # ---------------------------------------------------------------- members --

    def test_a_member_needs_its_record_and_its_hello_and_leaves_at_once_with_a_goodbye(
        self, backend: ClusterBackend, table: MemberTable
    ) -> None:
        registration = backend.registration("w1", RECORD, TTL)
        assert (registration is None) == (
            not backend.shared
        )  # no registry: the worker is given its coordinator
        try:
            table.join(Member(id="w1", device="cpu"), time.monotonic())
            event, _ = events_until(table, lambda e: e.kind == "joined", 5)
            assert event.member.id == "w1" and [m.id for m in table.members()] == ["w1"]
            assert table.heartbeat("w1", time.monotonic()) and not table.heartbeat(
                "ghost", time.monotonic()
            )
            table.leave("w1", "bye")
            event, took = events_until(table, lambda e: e.kind == "left", 5)
            assert event.member.id == "w1" and took < 1.0 and table.members() == []
        finally:
            if registration is not None:
                registration.close()

    def test_a_hello_alone_is_not_a_member_of_a_shared_cluster(
        self, backend: ClusterBackend, table: MemberTable
    ) -> None:
        self.shared_only(backend)
        table.join(Member(id="w1"), time.monotonic())
        time.sleep(0.3)
        assert table.poll(time.monotonic()) == [] and table.members() == []
        registration = backend.registration("w1", RECORD, TTL)
        assert registration is not None
        try:
            events_until(table, lambda e: e.kind == "joined" and e.member.id == "w1", 5)
            registration.close()  # a graceful stop: the record goes at once
            event, took = events_until(table, lambda e: e.kind == "left", 5)
            assert event.member.id == "w1" and took < 1.5, took
        finally:
            registration.close()

    def test_a_crashed_worker_leaves_when_its_lease_ends(
        self, backend: ClusterBackend, table: MemberTable, url: str
    ) -> None:
        if not backend.shared:  # its lease is its heartbeats
            table.join(Member(id="w1"), time.monotonic())
            events_until(table, lambda e: e.kind == "joined", 5)
            event, took = events_until(table, lambda e: e.kind == "left", 5)
            assert "no heartbeat" in event.reason and 0.9 < took < 2.0, took
            return
        # A real process registers, and is SIGKILLed: nothing gives its lease back.
        code = (
            "import sys, time; from elastic.membership.cluster import open_backend; "
            f"open_backend(sys.argv[1]).registration('w1', {RECORD!r}, {TTL}); print('ready', "
            "flush=True); time.sleep(600)"
        )
        worker = subprocess.Popen(
            [sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True
        )
        try:
            assert worker.stdout is not None and worker.stdout.readline().strip() == "ready"
            table.join(Member(id="w1"), time.monotonic())
            events_until(table, lambda e: e.kind == "joined", 5)
            worker.kill()
            event, took = events_until(table, lambda e: e.kind == "left", TTL * 4)
            assert event.member.id == "w1" and took > TTL / 2, (
                took
            )  # not at once: when the lease ran out
            assert table.members() == [] and not table.heartbeat(
                "w1", time.monotonic()
            )  # it must HELLO again
        finally:
            worker.kill()
            worker.wait()

    def test_a_slot_is_kept_across_a_crash_and_freed_by_a_goodbye(
        self, backend: ClusterBackend
    ) -> None:
        """A worker that comes back gets its slot (so its data shard) again if it is
        free, also under the next leader; one that said goodbye is forgotten."""
        registrations = [backend.registration(w, RECORD, TTL) for w in ("a", "b", "c")]
        table = backend.member_table(heartbeat_timeout=60)
        try:
            assert [table.join(Member(id=w), time.monotonic()).slot for w in ("a", "b", "c")] == [
                0,
                1,
                2,
            ]
            table.leave("c", "no heartbeat for 61s")  # a crash
            table.leave("b", "bye")
            if backend.shared:  # the next leader's table
                table.close()
                table = backend.member_table(heartbeat_timeout=60)
            assert table.join(Member(id="a"), time.monotonic()).slot == 0
            assert (
                table.join(Member(id="c"), time.monotonic()).slot == 2
            )  # its own, though 1 is lower
            assert table.join(Member(id="b"), time.monotonic()).slot == 1  # the lowest free
            table.leave("b", "bye")
            table.leave("a", "bye")
            assert (
                table.join(Member(id="b"), time.monotonic()).slot == 0
            )  # b was forgotten: not its 1
        finally:
            table.close()
            for registration in registrations:
                if registration is not None:
                    registration.close()

    # -------------------------------------------------------------- job store --

    def test_the_job_store_publishes_once_and_round_trips(self, backend: ClusterBackend) -> None:
        election = backend.election("c1", TTL)
        assert election.campaign(leader_record("c1"))
        store = backend.job_store(election)
        try:
            spec = {
                "job": {"id": "j1", "task": "linreg", "rule": "fedavg"},
                "task": {"features": 3},
            }
            assert store.publish("j1", spec) is True
            assert (
                store.publish("j1", {"job": {"id": "j1", "task": "other"}}) is False
            )  # compare-and-set: the first stays
            assert store.publish("j2", spec) is True
            stored = store.jobs()
            assert (
                json.loads(stored["j1"]["spec"]) == spec
                and stored["j1"]["state"] == b"running"
                and set(stored) == {"j1", "j2"}
            )
            store.set_state("j1", "paused")
            assert store.jobs()["j1"]["state"] == b"paused"
            with pytest.raises(ValueError, match="desired state must be one of"):
                store.set_state("j1", "exploded")
            store.write_status("j1", {"state": "running", "round": 7, "history": [1, 2, 3]})
            if backend.shared:
                status = wait_until(
                    lambda: store.jobs()["j1"].get("status"), 5, "the status to be written"
                )
                assert json.loads(status) == {"state": "running", "round": 7}  # without its history
        finally:
            store.close()
            election.resign()

    def test_another_coordinator_sees_jobs_and_states_through_its_watch(
        self, backend: ClusterBackend
    ) -> None:
        self.shared_only(backend)
        leader, other = backend.election("c1", TTL), backend.election("c2", TTL)
        assert leader.campaign(leader_record("c1"))
        store, writer = backend.job_store(leader), backend.job_store(other)
        try:
            store.changes(time.monotonic())
            assert writer.publish("j9", {"job": {"id": "j9"}})
            writer.set_state("j9", "cancelled")
            seen: list[tuple[str, str, bytes]] = []
            wait_until(
                lambda: (
                    seen.extend(store.changes(time.monotonic()))
                    or ("j9", "state", b"cancelled") in seen
                ),
                5,
                "the state through the watch",
            )
            assert any(job == "j9" and part == "spec" for job, part, _ in seen)
        finally:
            store.close()
            writer.close()
            other.resign()
            leader.resign()

    # --------------------------------------------------------------- election --

    def test_one_leads_another_stands_by_and_takes_over_with_a_greater_token(
        self, backend: ClusterBackend
    ) -> None:
        first = backend.election("c1", TTL)
        assert first.campaign(leader_record("c1"))
        assert first.check() is True and first.holds() and first.token > 0
        if not backend.shared:
            first.resign()
            assert first.check() is False and not first.holds()
            return
        second = backend.election("c2", TTL)
        stop, won = threading.Event(), []
        standby = threading.Thread(
            target=lambda: won.append(second.campaign(leader_record("c2"), stop=stop))
        )
        standby.start()
        try:
            time.sleep(0.5)
            assert not won and first.check() is True
            leader = backend.leader()
            assert leader is not None and (leader.id, leader.address, leader.control) == (
                "c1",
                "tcp://c1:5555",
                "tcp://c1:5556",
            )
            token = first.token
            first.resign()  # a standby need not wait out the lease
            standby.join(5)
            assert won == [True] and second.check() is True and second.token > token
            leader = backend.leader()
            assert leader is not None and leader.id == "c2" and leader.control == "tcp://c2:5556"
        finally:
            stop.set()
            standby.join(5)
            second.resign()
            first.resign()

    def test_a_deposed_leader_is_fenced_and_can_lead_again(self, backend: ClusterBackend) -> None:
        self.shared_only(backend)
        leader = backend.election("c1", TTL)
        assert leader.campaign(leader_record("c1"))
        store = backend.job_store(leader)
        try:
            store.publish("j", {"job": {"id": "j"}})
            leader.publish_later("rendezvous/j/generation", "1")
            wait_until(
                lambda: self.read(backend, "rendezvous/j/generation") == b"1",
                5,
                "a fenced write while leading",
            )
            old = leader.token
            self.depose(leader)  # its lease ends behind its back
            rival = backend.election("c2", TTL)
            assert rival.campaign(leader_record("c2"))
            assert rival.token > old
            assert leader.check() is False and leader.lost.is_set()
            leader.publish_later("rendezvous/j/generation", "stale")
            time.sleep(0.5)
            assert (
                self.read(backend, "rendezvous/j/generation") == b"1"
            )  # fenced: the deposed leader wrote nothing
            rivals = rival.token
            rival.resign()
            leader.step_down()
            assert (
                leader.campaign(leader_record("c1"))
                and leader.token > rivals > old
                and not leader.lost.is_set()
            )
            leader.publish_later("rendezvous/j/generation", "2")
            wait_until(
                lambda: self.read(backend, "rendezvous/j/generation") == b"2",
                5,
                "a write of the new term",
            )
        finally:
            store.close()
            leader.resign()

    def test_a_registered_worker_follows_the_leader(self, backend: ClusterBackend) -> None:
        self.shared_only(backend)
        registration = backend.registration("w1", RECORD, TTL)
        assert registration is not None
        first, second = backend.election("c1", TTL), backend.election("c2", TTL)
        try:
            assert registration.leader() is None
            registration.leader_changed.clear()
            assert first.campaign(leader_record("c1"))
            wait_until(registration.leader_changed.is_set, 5, "word that the leader changed")
            assert (
                registration.leader() is not None
                and registration.leader().address == "tcp://c1:5555"
            )  # type: ignore[union-attr]
            registration.leader_changed.clear()
            first.resign()
            assert second.campaign(leader_record("c2"))
            wait_until(registration.leader_changed.is_set, 5, "word of the new leader")
            assert registration.leader().address == "tcp://c2:5555"  # type: ignore[union-attr]
        finally:
            registration.close()
            second.resign()
            first.resign()

    # ------------------------------------------------------------ reconnects --

    def test_watches_go_on_after_the_servers_restart(
        self, backend: ClusterBackend, table: MemberTable
    ) -> None:
        self.shared_only(backend)
        leader = backend.election("c1", 10)
        assert leader.campaign(leader_record("c1"))
        store = backend.job_store(leader)
        early = backend.registration("w1", RECORD, 10)
        try:
            table.join(Member(id="w1"), time.monotonic())
            events_until(table, lambda e: e.kind == "joined", 5)
            store.changes(time.monotonic())
            self.restart()
            late = backend.registration("w2", RECORD, 10)
            assert late is not None
            try:
                table.join(Member(id="w2"), time.monotonic())
                event, _ = events_until(table, lambda e: e.kind == "joined", 15)
                assert event.member.id == "w2"
                writer = backend.election("c2", 10)
                other = backend.job_store(writer)
                other.publish("after", {"job": {"id": "after"}})
                seen: list[tuple[str, str, bytes]] = []
                wait_until(
                    lambda: (
                        seen.extend(store.changes(time.monotonic()))
                        or ("after", "state", b"running") in seen
                    ),
                    15,
                    "a job stored after the restart",
                )
                other.close()
                writer.resign()
                assert "w1" in {
                    m.id for m in table.members()
                }  # a restart shorter than the lease loses no member
            finally:
                late.close()
        finally:
            if early is not None:
                early.close()
            store.close()
            leader.resign()

    # ----------------------------------------------------------------- helper --

    def read(self, backend: ClusterBackend, path: str) -> bytes | None:
        raise NotImplementedError("a shared backend's test class reads a path")
