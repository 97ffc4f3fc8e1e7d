"""The shared-memory path: real segments in /dev/shm, written and read as the daemons do."""

from __future__ import annotations

import gc
import os
import time
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic.errors import ProtocolError
from elastic.wire import shm
from elastic.wire.frames import decode, encode_parts
from elastic.wire.header import Message, MsgType, pack
from elastic.wire.shared import SharedReader, SharedTensors
from elastic.wire.shm import Probe, SegmentReader, SegmentWriter, is_local, sweep
from elastic.wire.tensors import WireTensor

pytestmark = pytest.mark.skipif(not shm.shm_available(), reason="no writable /dev/shm")

META = {"num_samples": 4, "loss": 0.5, "kind": "gradient", "train_seconds": 0.1}


def update(**tensors: torch.Tensor) -> Message:
    return Message(
        MsgType.UPDATE,
        job="j",
        round=1,
        sender="w",
        key="w/j/1",
        meta=META,
        tensors={k: WireTensor.from_tensor(v) for k, v in tensors.items()},
    )


def send(writer: SegmentWriter, msg: Message) -> list[Any]:
    """What the transport puts on the socket for ``msg`` through ``writer``."""
    specs, buffers = encode_parts(msg, 1 << 62)
    placement = writer.put(buffers)
    assert placement is not None
    return [pack(msg, specs, placement)]


def segment_exists(name: str) -> bool:
    return os.path.exists(os.path.join(shm.SHM_DIR, name))


def test_frames_arrive_intact_and_are_read_in_place() -> None:
    writer, reader = SegmentWriter(), SegmentReader()
    w, b = torch.randn(600, 1000), torch.arange(7, dtype=torch.float32)
    got = decode(send(writer, update(w=w, b=b)), shm=reader)
    assert torch.equal(got.tensors["w"].to_tensor(), w) and torch.equal(
        got.tensors["b"].to_tensor(), b
    )
    assert (
        got.tensors["w"].chunks[0].untyped_storage().nbytes() == w.numel() * 4
    )  # a view, not a copy
    writer.close()


def test_the_writer_waits_for_the_reader_and_falls_back_to_the_socket() -> None:
    writer, reader = SegmentWriter(), SegmentReader()
    first = torch.randn(400_000)
    held = decode(send(writer, update(w=first)), shm=reader)
    specs, buffers = encode_parts(update(w=torch.zeros(400_000)), 1 << 62)
    assert writer.put(buffers) is None  # the reader still views the last message
    assert writer.busy == 1
    assert torch.equal(held.tensors["w"].to_tensor(), first)  # and its bytes are untouched
    del held
    gc.collect()
    again = decode(send(writer, update(w=-first)), shm=reader)
    assert torch.equal(again.tensors["w"].to_tensor(), -first)
    assert writer.sent == 2
    writer.close()


def test_a_segment_held_too_long_is_left_to_its_reader_and_replaced() -> None:
    writer, reader = SegmentWriter(), SegmentReader()
    first = torch.randn(400_000)
    held = decode(
        send(writer, update(w=first)), shm=reader
    )  # e.g. a message whose reader went quiet
    old = writer.name
    specs, buffers = encode_parts(update(w=torch.zeros(400_000)), 1 << 62)
    assert [writer.put(buffers) for _ in range(shm.REPLACE_AFTER_BUSY - 1)] == [None] * (
        shm.REPLACE_AFTER_BUSY - 1
    )
    second = torch.randn(400_000)
    got = decode(send(writer, update(w=second)), shm=reader)  # the next one: a new segment
    assert writer.name != old
    assert torch.equal(got.tensors["w"].to_tensor(), second)
    assert torch.equal(held.tensors["w"].to_tensor(), first)  # the old views are untouched
    writer.close()


def test_the_segment_is_unlinked_once_mapped_and_grows_by_replacement() -> None:
    writer, reader = SegmentWriter(), SegmentReader()
    decode(send(writer, update(w=torch.ones(300_000))), shm=reader)
    first = writer.name
    assert segment_exists(first)  # not mapped yet when it was written... (the reader has it now)
    decode(send(writer, update(w=torch.ones(300_000))), shm=reader)
    assert writer.name == first and not segment_exists(first)  # mapped: the name went
    big = torch.randn(2_000_000)
    got = decode(send(writer, update(w=big)), shm=reader)
    assert writer.name != first and reader.name == writer.name
    assert torch.equal(got.tensors["w"].to_tensor(), big)
    writer.close()
    assert not segment_exists(writer.name)


def test_small_messages_stay_on_the_socket() -> None:
    writer = SegmentWriter()
    specs, buffers = encode_parts(update(w=torch.ones(10)), 1 << 62)
    assert writer.put(buffers) is None and writer.sent == 0 and writer.busy == 0
    writer.close()


def ours() -> set[str]:
    """This process's segments (other test processes may be making theirs)."""
    return {n for n in os.listdir(shm.SHM_DIR) if n.startswith(f"elastic-{os.getpid()}-")}


def test_no_room_in_dev_shm_turns_the_path_off_cleanly(monkeypatch: pytest.MonkeyPatch) -> None:
    before = ours()

    def full(fd: int, offset: int, length: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    writer = SegmentWriter()
    specs, buffers = encode_parts(update(w=torch.ones(500_000)), 1 << 62)
    assert writer.put(buffers) is None
    assert "No space left" in writer.disabled
    assert ours() == before  # nothing left behind


def hostile(reader: SegmentReader, placement: Any) -> str:
    msg = update(w=torch.ones(300_000))
    specs, _ = encode_parts(msg, 1 << 62)
    with pytest.raises(ProtocolError) as err:
        decode([pack(msg, specs, placement)], shm=reader)
    return err.value.reason


def test_hostile_placements_are_refused_with_a_reason() -> None:
    writer, reader = SegmentWriter(), SegmentReader()
    decode(send(writer, update(w=torch.ones(300_000))), shm=reader)
    good = {"seg": writer.name, "seq": 1, "sizes": [1_200_000]}
    for bad in (
        "a string",
        {"seg": "../../etc/passwd", "seq": 1, "sizes": [4]},
        {"seg": "elastic-1-0123456789abcdef", "seq": 1, "sizes": [4]},  # no such segment
        {**good, "seq": True},
        {**good, "seq": 7},  # not the message posted
        {**good, "sizes": [1 << 40]},  # beyond the segment
        {**good, "sizes": [-1]},
        {**good, "sizes": "many"},
    ):
        assert hostile(reader, bad) == "bad_shm", bad
    # the right placement but the wrong size for the header's tensor: the usual check
    assert hostile(reader, {**good, "sizes": [1000]}) == "length_mismatch"
    msg = update(w=torch.ones(300_000))
    specs, buffers = encode_parts(msg, 1 << 62)
    with pytest.raises(ProtocolError, match="not known to share this host"):
        decode([pack(msg, specs, good)], shm=None)
    with pytest.raises(ProtocolError, match="both in shared memory and on the socket"):
        decode([pack(msg, specs, good), *buffers], shm=reader)
    writer.close()


def test_a_segment_of_another_kind_is_refused(tmp_path: Any) -> None:
    name = f"elastic-{os.getpid()}-{'0' * 16}"
    path = os.path.join(shm.SHM_DIR, name)
    with open(path, "wb") as f:
        f.write(b"\0" * 4096)  # no segment header
    try:
        assert hostile(SegmentReader(), {"seg": name, "seq": 1, "sizes": [4]}) == "bad_shm"
    finally:
        os.unlink(path)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["seg", "seq", "sizes", "x"]),
        st.one_of(
            st.integers(-(2**63), 2**63 - 1),
            st.text(max_size=40),
            st.lists(st.integers(-(2**63), 2**63 - 1), max_size=4),
            st.booleans(),
            st.none(),
        ),
    )
)
def test_any_placement_is_a_protocol_error_or_nothing(placement: dict[str, Any]) -> None:
    msg = update(w=torch.ones(4))
    specs, _ = encode_parts(msg, 1 << 62)
    try:
        decode([pack(msg, specs, placement)], shm=SegmentReader())
    except ProtocolError:
        pass


def test_the_probe_says_whether_the_peer_shares_this_host() -> None:
    probe = Probe()
    assert is_local(probe.describe())
    assert not is_local({**probe.describe(), "token": "00" * 16})
    assert not is_local({**probe.describe(), "token": "not hex"})
    assert not is_local({"probe": "elastic-1-0123456789abcdef", "token": "00" * 16})
    writer = SegmentWriter()
    send(writer, update(w=torch.ones(300_000)))
    assert not is_local(
        {"probe": writer.name, "token": "00" * 16}
    )  # another's data segment is no probe
    writer.close()
    assert not is_local(None) and not is_local({"probe": 3}) and not is_local("x")
    probe.close()
    assert not is_local(probe.describe())


def test_sweep_removes_a_dead_writers_old_segments_only() -> None:
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    stale = os.path.join(shm.SHM_DIR, f"elastic-{dead}-{'a' * 16}")
    fresh = os.path.join(shm.SHM_DIR, f"elastic-{dead}-{'b' * 16}")
    mine = os.path.join(shm.SHM_DIR, f"elastic-{os.getpid()}-{'c' * 16}")
    for path in (stale, fresh, mine):
        open(path, "wb").close()
    old = time.time() - 3600
    os.utime(stale, (old, old))
    os.utime(mine, (old, old))
    try:
        assert sweep() >= 1
        assert not os.path.exists(stale) and os.path.exists(fresh) and os.path.exists(mine)
    finally:
        for path in (stale, fresh, mine):
            if os.path.exists(path):
                os.unlink(path)


def test_placed_tensors_leave_with_no_copy_and_a_ticket_says_when_they_may_change() -> None:
    writer, reader = SegmentWriter(), SegmentReader()
    like = {"w": torch.empty(300, 1000), "b": torch.empty(10)}
    placed = writer.place(like, "job")
    assert placed is not None
    placed["w"].copy_(torch.randn(300, 1000))
    placed["b"].fill_(2.0)
    got = decode(send(writer, update(**placed)), shm=reader)
    assert writer.in_place == 1 and writer.ticket is not None
    assert torch.equal(got.tensors["w"].to_tensor(), placed["w"])
    assert not writer.ticket.done  # the reader views them: they must not change
    assert writer.place(like, "job") is None  # nor be handed out again
    del got
    gc.collect()
    assert writer.ticket.done
    again = writer.place(like, "job")
    assert again is not None and again["w"].data_ptr() == placed["w"].data_ptr()  # the same place
    writer.close()


def test_nothing_is_ever_copied_over_placed_tensors() -> None:
    writer, reader = SegmentWriter(), SegmentReader()
    like = {"w": torch.empty(400_000)}
    placed = writer.place(like, "job-a")
    assert placed is not None
    placed["w"].fill_(1.0)
    first = writer.name
    other = decode(
        send(writer, update(w=torch.full((400_000,), 7.0))), shm=reader
    )  # a message to copy in
    assert writer.name != first and writer.in_place == 0
    assert torch.equal(other.tensors["w"].to_tensor(), torch.full((400_000,), 7.0))
    assert bool((placed["w"] == 1.0).all())  # job a's tensors untouched
    del other
    gc.collect()
    b = writer.place(like, "job-b")
    assert b is not None
    b["w"].fill_(3.0)
    c = writer.place(like, "job-c")  # another owner: a segment of its own
    assert c is not None and c["w"].data_ptr() != b["w"].data_ptr()
    c["w"].fill_(5.0)
    assert bool((b["w"] == 3.0).all()) and bool((placed["w"] == 1.0).all())
    writer.close()


def reference_like() -> dict[str, torch.Tensor]:
    return {"w": torch.randn(300, 500), "b": torch.randn(7)}


def test_shared_tensors_are_read_by_any_number_of_readers_at_the_version_stamped() -> None:
    model = reference_like()
    shared = SharedTensors(model)
    try:
        with shared.changing(5):
            for name, t in shared.tensors.items():
                t.copy_(model[name])
        for _ in range(3):  # readers need no release: each copies out
            into = {k: torch.empty_like(v) for k, v in model.items()}
            assert SharedReader().copy_into(shared.describe(), into, 5) is None
            assert all(torch.equal(into[k], model[k]) for k in model)
        reader = SharedReader()
        assert "version 5, not 6" in (reader.copy_into(shared.describe(), dict(model), 6) or "")
        with shared.changing(6):  # a reader that comes while it changes takes nothing
            assert "being changed" in (reader.copy_into(shared.describe(), dict(model), 6) or "")
        assert (
            reader.copy_into(
                shared.describe(), {k: torch.empty_like(v) for k, v in model.items()}, 6
            )
            is None
        )
    finally:
        shared.close()
    assert not segment_exists(shared.name)


class ChangesWhileRead(dict):  # type: ignore[type-arg]
    """Targets whose copy is interleaved with the writer's next change."""

    def __init__(self, shared: SharedTensors, targets: dict[str, torch.Tensor]) -> None:
        super().__init__(targets)
        self.shared, self.calls = shared, 0

    def items(self):  # type: ignore[no-untyped-def]
        self.calls += 1
        for i, item in enumerate(super().items()):
            if self.calls == 2 and i == 1:  # the copy loop, half way
                with self.shared.changing(8):
                    self.shared.tensors["b"].add_(1)
            yield item


def test_a_reader_overtaken_by_a_change_keeps_nothing() -> None:
    model = reference_like()
    shared = SharedTensors(model)
    try:
        with shared.changing(7):
            pass
        targets = ChangesWhileRead(shared, {k: torch.empty_like(v) for k, v in model.items()})
        assert "changed while it was read" in (
            SharedReader().copy_into(shared.describe(), targets, 7) or ""
        )
    finally:
        shared.close()


def test_hostile_shared_descriptions_are_protocol_errors() -> None:
    model = reference_like()
    shared = SharedTensors(model)
    good = shared.describe()
    try:
        for described in (
            None,
            {"seg": good["seg"]},
            {"seg": good["seg"], "at": {"w": good["at"]["w"]}},  # a tensor missing
            {"seg": good["seg"], "at": {**good["at"], "b": 8}},  # inside the header
            {"seg": good["seg"], "at": {**good["at"], "b": True}},
            {"seg": good["seg"], "at": {**good["at"], "b": 1 << 40}},  # past the end
            {"seg": "../../etc/passwd", "at": good["at"]},
            {"seg": "elastic-1-0000000000000000", "at": good["at"]},  # no such segment
        ):
            with pytest.raises(ProtocolError):
                SharedReader().copy_into(described, dict(model), 0)
    finally:
        shared.close()
