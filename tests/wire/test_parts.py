"""Updates in parts: the grid covers every element once, a part is a view of the
update, and a malformed GRANT is refused with a reason."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from elastic.errors import ProtocolError
from elastic.wire.header import Message, MsgType
from elastic.wire.parts import check_grant, grid, nbytes, part_message
from elastic.wire.tensors import WireTensor

SIZES = st.lists(
    st.tuples(st.integers(0, 5000), st.sampled_from([1, 2, 4, 8])), min_size=1, max_size=12
)


@given(SIZES, st.integers(8, 20_000))
def test_the_grid_covers_every_element_once_in_order_and_parts_stay_within_size(
    sizes: list[tuple[int, int]], part_bytes: int
) -> None:
    tensors = [(f"t{i}", numel, itemsize) for i, (numel, itemsize) in enumerate(sizes)]
    itemsizes = {name: itemsize for name, _, itemsize in tensors}
    parts = grid(tensors, part_bytes)
    flat = [seg for part in parts for seg in part]
    at: dict[str, int] = {}
    for name, start, stop in flat:
        assert start == at.get(name, 0) and stop > start  # contiguous, in order, nothing empty
        at[name] = stop
    assert at == {name: numel for name, numel, _ in tensors if numel}
    assert all(0 < nbytes(part, itemsizes) <= part_bytes for part in parts)
    # Full parts but the last: nothing is cut smaller than it need be.
    assert all(nbytes(part, itemsizes) > part_bytes - 8 for part in parts[:-1])


def test_small_tensors_share_a_part_and_a_big_one_is_cut() -> None:
    assert grid([("a", 10, 4), ("b", 3000, 4), ("c", 2, 4)], 4096) == [
        [("a", 0, 10), ("b", 0, 1014)],
        [("b", 1014, 2038)],
        [("b", 2038, 3000), ("c", 0, 2)],
    ]


def test_a_part_views_the_update_and_keeps_its_fields() -> None:
    w = torch.arange(10, dtype=torch.float32)
    chunked = WireTensor(torch.float32, (2, 5), [w[:4], w[4:]])
    update = Message(
        MsgType.UPDATE,
        job="j",
        round=3,
        version=2,
        sender="w",
        key="w/j/3",
        meta={"num_samples": 5, "loss": 0.1, "kind": "weights", "train_seconds": 0.0},
        tensors={"w": chunked, "b": WireTensor.from_tensor(torch.ones(3))},
    )
    part = part_message(update, 1, 2, [("w", 2, 10), ("b", 0, 1)])
    assert (part.key, part.round, part.version, part.meta["part"], part.meta["num_samples"]) == (
        "w/j/3",
        3,
        2,
        [1, 2],
        5,
    )
    assert torch.equal(part.tensors["w"].to_tensor(), w[2:]) and part.tensors["w"].shape == (8,)
    assert part.tensors["w"].chunks[0].data_ptr() == w[2:].data_ptr()  # a view, no copy
    with pytest.raises(ProtocolError, match="not in this update"):
        part_message(update, 0, 2, [("w", 0, 11)])
    with pytest.raises(ProtocolError, match="not in this update"):
        part_message(update, 0, 2, [("nope", 0, 1)])


@pytest.mark.parametrize(
    "meta",
    [
        {"part": [2, 2], "segments": [["w", 0, 1]]},
        {"part": [0], "segments": [["w", 0, 1]]},
        {"part": [0, 2], "segments": []},
        {"part": [0, 2], "segments": [["w", 5, 5]]},
        {"part": [0, 2], "segments": [["w", 0, "1"]]},
        {"part": [0, 2]},
        {"part": "0/2", "segments": [["w", 0, 1]]},
    ],
)
def test_a_malformed_grant_is_refused(meta: dict) -> None:
    with pytest.raises(ProtocolError) as exc:
        check_grant(meta)
    assert exc.value.reason == "bad_part"


def test_a_grant_without_a_part_is_for_the_whole_update() -> None:
    assert check_grant({}) is None
    assert check_grant({"part": [1, 3], "segments": [["w", 0, 4]]}) == (1, 3, [("w", 0, 4)])
