"""Each sample once per epoch, whatever the world size does mid-epoch."""

from __future__ import annotations

import pytest
import torch

from elastic.distributed.sampling import Position, step_slice


def _epoch(size: int, worlds: list[int], batch: int, seed: int = 3) -> list[list[int]]:
    """The samples each step took, with the world size changing step by step."""
    at, taken = Position(), []
    for world in worlds:
        step = [step_slice(size, seed, at, world, r, batch) for r in range(world)]
        assert len({s.global_count for s in step}) == 1 and {s.after for s in step} == {
            step[0].after
        }
        taken.append(torch.cat([s.indices for s in step]).tolist())
        at = step[0].after
        if at.epoch:
            break
    return taken


def test_every_sample_once_per_epoch_as_the_world_changes():
    steps = _epoch(103, [3, 3, 2, 2, 4, 4, 4, 1, 5, 5, 5, 5, 5], batch=4)
    seen = [i for step in steps for i in step]
    assert sorted(seen) == list(range(103))


def test_ranks_split_a_step_evenly_and_disjointly():
    at = Position(step=7, epoch=1, offset=10)
    parts = [step_slice(50, 0, at, 4, r, 5) for r in range(4)]
    assert [len(p.indices) for p in parts] == [5, 5, 5, 5] and parts[0].global_count == 20
    assert len(set(torch.cat([p.indices for p in parts]).tolist())) == 20
    assert parts[0].after == Position(step=8, epoch=1, offset=30)


def test_the_epochs_last_step_takes_what_is_left_and_starts_the_next():
    last = [step_slice(10, 0, Position(3, 0, 8), 3, r, 4) for r in range(3)]
    assert [len(p.indices) for p in last] == [0, 1, 1] and last[0].global_count == 2
    assert last[0].after == Position(4, 1, 0)


def test_full_batch_takes_the_whole_dataset_every_step():
    at = Position()
    for _ in range(3):
        parts = [step_slice(30, 1, at, 2, r, 0) for r in range(2)]
        assert parts[0].global_count == 30
        assert sorted(torch.cat([p.indices for p in parts]).tolist()) == list(range(30))
        at = parts[0].after
    assert at == Position(3, 3, 0)


def test_each_epoch_has_its_own_order():
    first = step_slice(40, 9, Position(0, 0, 0), 1, 0, 10).indices
    second = step_slice(40, 9, Position(4, 1, 0), 1, 0, 10).indices
    assert not torch.equal(first, second)


@pytest.mark.parametrize(("world", "rank", "batch"), [(0, 0, 1), (2, 2, 1), (2, 0, -1)])
def test_bad_arguments_are_refused(world, rank, batch):
    with pytest.raises(ValueError):
        step_slice(10, 0, Position(), world, rank, batch)
