from elastic.membership.base import Member
from elastic.membership.embedded import EmbeddedMemberTable


def test_join_heartbeat_expiry_and_events() -> None:
    m = EmbeddedMemberTable(heartbeat_timeout=3.0)
    assert m.join(Member(id="a"), now=0).slot == 0
    assert m.join(Member(id="b"), now=0).slot == 1
    assert [(e.kind, e.member.id) for e in m.poll(0)] == [("joined", "a"), ("joined", "b")]
    assert m.heartbeat("a", now=2.5) and not m.heartbeat("ghost", now=2.5)
    events = m.poll(3.5)  # b silent for 3.5 s > 3 s; a heard 1 s ago
    assert [(e.kind, e.member.id) for e in events] == [("left", "b")]
    assert "no heartbeat for 3.5s" in events[0].reason
    assert [x.id for x in m.members()] == ["a"]


def test_graceful_leave_and_rejoin_keeps_the_slot() -> None:
    m = EmbeddedMemberTable()
    for wid in "abc":
        m.join(Member(id=wid), now=0)
    m.leave("b", "bye")
    m.join(Member(id="d"), now=1)  # takes the lowest free slot: b's
    assert {x.id: x.slot for x in m.members()} == {"a": 0, "d": 1, "c": 2}
    m.leave("a", "bye")
    m.join(Member(id="a"), now=2)  # a comes back: its old slot is free again
    assert {x.id: x.slot for x in m.members()}["a"] == 0
    m.join(Member(id="b"), now=3)  # b's old slot is taken: the lowest free one
    assert {x.id: x.slot for x in m.members()}["b"] == 3
    assert [e.kind for e in m.poll(3)].count("left") == 2


def test_join_twice_is_a_refresh_not_a_new_member() -> None:
    m = EmbeddedMemberTable()
    m.join(Member(id="a"), now=0)
    m.poll(0)
    assert m.join(Member(id="a"), now=1).slot == 0
    assert m.poll(1) == [] and len(m.members()) == 1
