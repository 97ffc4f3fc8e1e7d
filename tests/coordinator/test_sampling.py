"""Who works in a round: virtual clients sampled, spread over the workers, stragglers."""

from __future__ import annotations

from collections import Counter

import pytest

from elastic.coordinator.sampling import local_work, sample_clients, spread
from elastic.jobspec import parse_job_spec


def spec(job: dict | None = None, train: dict | None = None):
    return parse_job_spec({"job": {"task": "t", "rule": "r", **(job or {})}, "train": train or {}})


def test_random_sampling_is_seeded_without_repeats_and_reaches_every_client() -> None:
    s = spec({"clients": 1000, "clients_per_round": 20})
    rounds = [sample_clients(s, n) for n in range(1, 601)]
    for chosen in rounds:
        assert len(chosen) == len(set(chosen)) == 20 and chosen == sorted(chosen)
        assert all(0 <= c < 1000 for c in chosen)
    assert rounds[4] == sample_clients(s, 5)  # a re-run round asks the same clients
    assert rounds[0] != rounds[1]
    assert len({c for chosen in rounds for c in chosen}) == 1000
    assert (
        sample_clients(spec({"clients": 1000, "clients_per_round": 20, "seed": 1}), 1) != rounds[0]
    )


def test_cycle_sampling_asks_each_client_once_per_pass() -> None:
    s = spec({"clients": 105, "clients_per_round": 10, "client_sampling": "cycle"})
    first_pass = [sample_clients(s, n) for n in range(1, 12)]  # ceil(105 / 10) rounds
    assert all(len(c) == len(set(c)) == 10 for c in first_pass)
    counts = Counter(c for chosen in first_pass for c in chosen)
    assert set(counts) == set(range(105))
    assert sum(1 for v in counts.values() if v == 2) == 5  # the last round topped up
    assert sample_clients(s, 12) != first_pass[0]  # the next pass is shuffled anew


def test_fraction_rounds_up_and_per_round_wins() -> None:
    assert spec({"clients": 30, "fraction": 0.3}).sampled_clients == 9
    assert spec({"clients": 30, "fraction": 0.31}).sampled_clients == 10
    assert spec({"clients": 30, "fraction": 0.3, "clients_per_round": 4}).sampled_clients == 4
    assert spec().sampled_clients == 0


def test_spread_is_even_and_keeps_clients_at_home() -> None:
    workers = ["a", "b", "c"]
    clients = list(range(0, 60, 3)) + [1, 2]  # 20 clients whose home is "a", and two others
    load = spread(clients, workers)
    sizes = sorted(len(v) for v in load.values())
    assert sizes[-1] - sizes[0] <= 1 and sum(sizes) == 22
    assert sorted(c for v in load.values() for c in v) == sorted(clients)
    assert set(load["a"]) <= set(range(0, 60, 3))  # home clients first, up to its share
    balanced = spread(list(range(9)), workers)
    assert balanced == {"a": [0, 3, 6], "b": [1, 4, 7], "c": [2, 5, 8]}
    assert spread([1, 2], workers) == {"b": [1], "c": [2]}  # a worker with none is left out
    assert spread([1], []) == {}


def test_stragglers_do_less_or_are_dropped() -> None:
    s = spec(train={"local_epochs": 20, "stragglers": 0.5})
    ids = list(range(10))
    work = local_work(s, 3, ids)
    slow = {i: e for i, e in work.items() if e < 20}
    assert set(work) == set(ids)
    assert 4 <= len(slow) <= 5 and all(1 <= e <= 20 for e in work.values())  # (a draw may be 20)
    assert work == local_work(s, 3, ids)
    ranged = local_work(
        spec(train={"local_epochs": 5, "stragglers": 1.0, "straggler_epochs": [2, 3]}), 1, ids
    )
    assert set(ranged.values()) <= {2, 3}
    dropped = local_work(spec(train={"stragglers": 0.9, "drop_stragglers": True}), 1, ids, keep=2)
    assert len(dropped) == 2 and set(dropped.values()) == {1}
    assert local_work(spec(), 1, ids) == dict.fromkeys(ids, 1)


@pytest.mark.parametrize(
    "job, train, words",
    [
        ({"clients": 10, "partitions": 5}, {}, ["partitions = 5 but clients = 10"]),
        ({"clients": 10, "clients_per_round": 11}, {}, ["more than clients"]),
        ({"clients_per_round": 3}, {}, ["clients_per_round needs clients"]),
        ({"clients": 10, "clients_per_round": 2, "min_workers": 3}, {}, ["can never make"]),
        ({"client_sampling": "sometimes"}, {}, ['"cycle"']),
        ({}, {"straggler_epochs": [1, 2]}, ["stragglers = 0"]),
        ({}, {"stragglers": 0.5, "straggler_epochs": [1, 9], "local_epochs": 3}, ["goes above"]),
        ({}, {"straggler_epochs": [3, 1], "stragglers": 0.5}, ["[low, high]"]),
        ({}, {"precision": "fp8"}, ['"bf16"']),
    ],
)
def test_bad_client_settings_are_refused_with_the_fix(job: dict, train: dict, words: list) -> None:
    from elastic.errors import JobSpecError

    with pytest.raises(JobSpecError) as err:
        spec(job, train)
    for w in words:
        assert w in str(err.value)


def test_shards_follow_the_clients() -> None:
    s = spec({"clients": 300, "min_workers": 2})
    assert s.shard_count == 300 and s.sampled_clients == 300
