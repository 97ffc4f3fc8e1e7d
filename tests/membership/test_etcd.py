"""The etcd backend against a real etcd server (started per test on free ports)."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from elastic.errors import ConfigError, MembershipUnavailable
from elastic.membership.base import Member, MembershipEvent
from elastic.membership.etcd.client import Keys, connect, parse_etcd_url
from elastic.membership.etcd.members import EtcdMemberTable, EtcdRegistration
from tests.etcd_server import EtcdServer, free_port

RECORD = {"id": "w1", "host": "h", "pid": 1, "device": "cpu", "software": "test", "data": ""}


def test_parse_etcd_url() -> None:
    url = parse_etcd_url("etcd://127.0.0.1:2379,10.0.0.2:2380/prod")
    assert (url.servers, url.cluster) == ((("127.0.0.1", 2379), ("10.0.0.2", 2380)), "prod")
    url = parse_etcd_url("etcd://etcd/c")
    assert (url.servers, url.cluster) == ((("etcd", 2379),), "c")
    for bad in (
        "etcd://127.0.0.1:2379",
        "etcd://h:x/c",
        "http://h:2379/c",
        "etcd://h:2379/a/b",
        "etcd://h:0/c",
    ):
        with pytest.raises(ConfigError, match=r"etcd://\[USER@\]HOST:PORT"):
            parse_etcd_url(bad)


def test_unreachable_etcd_is_one_clear_error() -> None:
    ports = free_port(), free_port()
    started = time.monotonic()
    with pytest.raises(
        MembershipUnavailable,
        match=rf"etcd unreachable at 127.0.0.1:{ports[0]}, 127.0.0.1:{ports[1]} .*fix --membership",
    ):
        connect(f"etcd://127.0.0.1:{ports[0]},127.0.0.1:{ports[1]}/c", timeout=1.0)
    assert time.monotonic() - started < 5


def poll_until(
    backend: EtcdMemberTable, want: Callable[[MembershipEvent], bool], timeout: float
) -> tuple[MembershipEvent, float]:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        for event in backend.poll(time.monotonic()):
            if want(event):
                return event, time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"no such event within {timeout}s")


@pytest.fixture
def backend(etcd: EtcdServer):
    b = EtcdMemberTable(f"etcd://{etcd.url}/t")
    yield b
    b.close()


def test_member_needs_a_record_and_a_hello(etcd: EtcdServer, backend: EtcdMemberTable) -> None:
    backend.join(Member(id="w1"), time.monotonic())  # HELLO first: not a member yet
    assert backend.members() == [] and backend.poll(time.monotonic()) == []
    reg = EtcdRegistration(f"etcd://{etcd.url}/t", "w1", RECORD, ttl=2)
    try:
        event, _ = poll_until(backend, lambda e: e.kind == "joined", 5)
        assert event.member.id == "w1" and [m.id for m in backend.members()] == ["w1"]
    finally:
        reg.close()


def test_graceful_stop_revokes_at_once_and_a_crash_ends_with_the_lease(
    etcd: EtcdServer, backend: EtcdMemberTable
) -> None:
    url = f"etcd://{etcd.url}/t"
    graceful = EtcdRegistration(url, "w1", RECORD, ttl=10)
    crashing = EtcdRegistration(url, "w2", RECORD | {"id": "w2"}, ttl=2)
    for worker in ("w1", "w2"):
        backend.join(Member(id=worker), time.monotonic())
    poll_until(backend, lambda e: e.kind == "joined" and e.member.id == "w2", 5)
    graceful.close()
    event, took = poll_until(backend, lambda e: e.kind == "left", 5)
    assert event.member.id == "w1" and took < 1.0, took
    crashing._stop.set()  # its keep-alive dies, nothing revokes: like SIGKILL
    crashing._thread.join()
    event, took = poll_until(backend, lambda e: e.kind == "left", 10)
    assert event.member.id == "w2" and "lease ended" in event.reason and took < 2 + 2.5, took
    assert backend.members() == []
    assert not backend.heartbeat("w2", time.monotonic())  # it must say HELLO again
    crashing.client.close()


def test_members_present_before_the_coordinator_starts_are_seen(etcd: EtcdServer) -> None:
    reg = EtcdRegistration(f"etcd://{etcd.url}/t", "w1", RECORD, ttl=5)
    backend = EtcdMemberTable(f"etcd://{etcd.url}/t")
    try:
        backend.join(Member(id="w1"), time.monotonic())
        assert [e.kind for e in backend.poll(time.monotonic())] == ["joined"]
    finally:
        backend.close()
        reg.close()


def test_a_malformed_record_is_ignored(
    etcd: EtcdServer, backend: EtcdMemberTable, caplog: pytest.LogCaptureFixture
) -> None:
    client = connect(f"etcd://{etcd.url}/t")
    client.put(Keys("t").member("junk"), b"\xff not json")
    backend.join(Member(id="junk"), time.monotonic())
    deadline = time.monotonic() + 2
    while "malformed member record" not in caplog.text and time.monotonic() < deadline:
        backend.poll(time.monotonic())
        time.sleep(0.02)
    assert "malformed member record" in caplog.text and backend.members() == []
    client.close()


def test_retrying_rides_out_failures_then_names_the_problem() -> None:
    from elastic.membership.etcd.client import retrying

    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise TimeoutError("electing a raft leader")
        return "ok"

    assert retrying(object(), "registering", flaky, timeout=5) == "ok" and len(calls) == 3

    def down() -> None:
        raise TimeoutError

    with pytest.raises(
        MembershipUnavailable,
        match="etcd did not answer while registering .*check the etcd cluster",
    ):
        retrying(object(), "registering", down, timeout=0.3)


def test_a_goodbye_frees_the_slot_and_a_crash_keeps_it(
    etcd: EtcdServer, backend: EtcdMemberTable
) -> None:
    client, keys = connect(f"etcd://{etcd.url}/t"), Keys("t")
    try:
        for worker in ("w1", "w2"):
            backend.join(Member(id=worker), time.monotonic())
        assert client.get(keys.slots + "w1")[0] == b"0" and client.get(keys.slots + "w2")[0] == b"1"
        backend.leave("w1", "bye")
        backend.leave("w2", "unreachable")
        assert client.get(keys.slots + "w1")[0] is None  # gone for good: nothing to keep
        assert client.get(keys.slots + "w2")[0] == b"1"  # it comes back to its shard
        assert backend.join(Member(id="w2"), time.monotonic()).slot == 1
    finally:
        client.close()


def test_etcd_access_options(tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    from elastic.membership.cluster import ClusterBackend

    ca = tmp_path / "ca.pem"
    ca.write_text("x")
    plain = parse_etcd_url("etcd://h:2379/c")  # nothing asked: plain
    assert (plain.tls, plain.user, plain.password) == (False, "", "")
    access = parse_etcd_url(f"etcd://alice:pw%40x@h1:2379,h2:2379/c?ca={ca}")
    assert (access.user, access.password, access.ca, access.tls) == ("alice", "pw@x", str(ca), True)
    assert (access.servers, access.cluster) == ((("h1", 2379), ("h2", 2379)), "c")
    monkeypatch.setenv("ELASTIC_ETCD_PASSWORD", "from-env")
    assert parse_etcd_url("etcd://bob@h:2379/c").password == "from-env"
    monkeypatch.delenv("ELASTIC_ETCD_PASSWORD")
    for bad, words in [
        ("etcd://bob@h:2379/c", "has no password"),
        ("etcd://h:2379/c?ca=/nope", "does not exist"),
        (f"etcd://h:2379/c?cert={ca}&key={ca}", "need ca="),
        ("etcd://h:2379/c?tls=1", "unknown option"),
    ]:
        with pytest.raises(ConfigError, match=words):
            parse_etcd_url(bad)
    assert ClusterBackend.describe_url("etcd://alice:pw@h:2379/c") == "etcd://alice:***@h:2379/c"
