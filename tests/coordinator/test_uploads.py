"""The upload gate: big updates come in while they fit the window, one always goes."""

from __future__ import annotations

from elastic.coordinator.uploads import UploadGate

MB = 1 << 20


def peers(offers: list) -> list[str]:
    return [o.peer for o in offers]


def test_offers_are_granted_while_they_fit_first_come_first_served() -> None:
    gate = UploadGate(window_bytes=250 * MB)
    assert peers(gate.offer("a", "j", "a/j/1", 100 * MB, now=0)) == ["a"]
    assert peers(gate.offer("b", "j", "b/j/1", 100 * MB, now=0)) == ["b"]
    assert gate.offer("c", "j", "c/j/1", 100 * MB, now=0) == []  # 300 MB would not fit
    assert gate.offer("d", "j", "d/j/1", 10 * MB, now=0) == []  # behind c: no overtaking
    assert gate.in_flight == 200 * MB
    assert peers(gate.done("a", now=1)) == ["c", "d"]
    assert gate.in_flight == 210 * MB and gate.peak_bytes == 210 * MB


def test_an_update_bigger_than_the_window_goes_alone() -> None:
    gate = UploadGate(window_bytes=0)  # one at a time, whatever the size
    assert peers(gate.offer("a", "j", "k", 400 * MB, now=0)) == ["a"]
    assert gate.offer("b", "j", "k2", 1, now=0) == []
    assert peers(gate.done("a", now=0)) == ["b"]


def test_a_grant_ends_when_its_worker_leaves_or_lets_it_expire() -> None:
    gate = UploadGate(window_bytes=0, grant_timeout=30)
    gate.offer("frozen", "j", "k1", MB, now=0)
    gate.offer("b", "j", "k2", MB, now=0)
    gate.offer("c", "j", "k3", MB, now=0)
    assert gate.expire(now=29) == []
    assert peers(gate.expire(now=30)) == ["b"]  # frozen never sent: its grant lapsed
    assert peers(gate.done("b", now=31)) == ["c"]
    assert gate.done("frozen", now=32) == []  # leaving after its grant lapsed changes nothing
    gate.offer("d", "j", "k4", MB, now=33)
    assert peers(gate.done("c", now=34)) == ["d"]
    gate.offer("e", "j", "k5", MB, now=35)
    assert peers(gate.done("d", now=36)) == ["e"]


def test_a_new_offer_replaces_the_old_one_of_the_same_worker_and_job() -> None:
    gate = UploadGate(window_bytes=0)
    gate.offer("a", "j", "a/j/1", MB, now=0)
    gate.offer("b", "j", "b/j/1", MB, now=0)
    assert gate.offer("b", "j", "b/j/2", MB, now=0) == []  # still one offer from b, waiting
    assert len(gate.waiting) == 1
    assert peers(gate.offer("a", "j", "a/j/2", MB, now=0)) == [
        "b"
    ]  # a's grant is void; b was first in line
    assert gate.granted["b", "j"][0].key == "b/j/2"


def test_a_small_update_of_another_job_frees_nothing() -> None:
    """A worker serving two jobs sends one job's small update (never offered) while
    the other's big one is granted: the grant stays until its own update comes."""
    gate = UploadGate(window_bytes=0)
    assert peers(gate.offer("a", "big", "a/big/3", 4 * MB, now=0)) == ["a"]
    assert gate.offer("b", "big", "b/big/3", 4 * MB, now=0) == []
    assert gate.done("a", now=1, key="a/cz/7") == [] and gate.in_flight == 4 * MB
    assert peers(gate.done("a", now=2, key="a/big/3")) == ["b"]


def test_a_worker_offers_one_update_per_job() -> None:
    """A worker serving two jobs has an offer of each standing at once; its newer
    offer of one job replaces only that job's; leaving ends them all."""
    gate = UploadGate(window_bytes=10 * MB)
    assert peers(gate.offer("a", "x", "a/x/1", 4 * MB, now=0)) == ["a"]
    assert peers(gate.offer("a", "y", "a/y/1", 4 * MB, now=0)) == ["a"]
    assert gate.in_flight == 8 * MB
    assert gate.offer("b", "x", "b/x/1", 4 * MB, now=0) == []  # 12 MB would not fit
    assert peers(gate.offer("a", "y", "a/y/2", 1 * MB, now=0)) == ["b", "a"]  # y replaced
    assert {o.key for o, _ in gate.granted.values()} == {"a/x/1", "a/y/2", "b/x/1"}
    assert gate.done("a", now=1) == [] and gate.in_flight == 4 * MB
