"""Coordinator election and fenced writes against a real etcd server."""

from __future__ import annotations

import threading
import time

from elastic.membership.cluster import LeaderRecord
from elastic.membership.etcd.client import Keys, connect
from elastic.membership.etcd.election import EtcdElection
from tests.etcd_server import EtcdServer


def wait_until(check, timeout: float) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return False


def test_one_leads_the_other_stands_by_until_it_resigns(etcd: EtcdServer) -> None:
    url = f"etcd://{etcd.url}/el"
    first, second = EtcdElection(url, "c1", ttl=2), EtcdElection(url, "c2", ttl=2)
    try:
        assert first.campaign(LeaderRecord("x", "tcp://a:1"))
        stop = threading.Event()
        result: list[bool] = []
        standby = threading.Thread(
            target=lambda: result.append(second.campaign(LeaderRecord("x", "tcp://b:1"), stop=stop))
        )
        standby.start()
        time.sleep(0.5)
        assert not result and first.check() is True and second.check() is False
        first.resign()
        standby.join(5)
        assert result == [True] and second.check() is True
    finally:
        second.resign()


def test_publish_later_writes_in_the_background_and_only_while_leading(etcd: EtcdServer) -> None:
    url, path = f"etcd://{etcd.url}/el", "jobs/j/status"
    key = Keys("el").job("j", "status")
    client = connect(url)
    leader = EtcdElection(url, "c1", ttl=2)
    try:
        assert leader.campaign(LeaderRecord("x", "tcp://a:1"))
        for i in range(50):  # only the newest value needs to land
            leader.publish_later(path, f"v{i}")
        assert wait_until(lambda: client.get(key)[0] == b"v49", 5)
        client.delete(Keys("el").leader)  # someone else's doing: we no longer lead
        assert leader.check() is False and leader.lost.is_set()
        leader.publish_later(path, "stale")
        time.sleep(0.5)
        assert client.get(key)[0] == b"v49"  # fenced: a deposed leader writes nothing
    finally:
        leader.resign()
        client.close()


def test_a_deposed_leader_steps_down_and_can_lead_again(etcd: EtcdServer) -> None:
    url, keys = f"etcd://{etcd.url}/el", Keys("el")
    client = connect(url)
    leader = EtcdElection(url, "c1", ttl=2)
    try:
        assert leader.campaign(LeaderRecord("x", "tcp://a:1"))
        old = leader.token
        client.revoke_lease(leader.lease.id)  # as if etcd expired it while we were cut off
        assert wait_until(leader.lost.is_set, 3)  # the keep-alive notices
        leader.step_down()
        assert (
            leader.campaign(LeaderRecord("x", "tcp://a:1"))
            and leader.token > old
            and not leader.lost.is_set()
        )
        leader.publish_later("rendezvous/j/generation", "7")
        assert wait_until(lambda: client.get(keys.path("rendezvous/j/generation"))[0] == b"7", 5)
        leader.resign()  # the key goes at once: a standby need not wait out the TTL
        assert client.get(keys.leader)[0] is None
    finally:
        client.close()
