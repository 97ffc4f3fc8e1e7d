"""Partitioners: every scheme splits into disjoint parts that cover every sample,
the same way from the same seed, with no part empty; and each is the skew it says."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from elastic.errors import JobSpecError
from elastic.partitions import check_partition, partition

SCHEMES = ["iid", "dirichlet:0.5", "dirichlet:5", "pathological:2", "quantity:1.0", "natural"]


@settings(max_examples=150, deadline=None)
@given(
    n=st.integers(1, 400),
    classes=st.integers(1, 10),
    parts=st.integers(1, 20),
    scheme=st.sampled_from(SCHEMES),
    seed=st.integers(0, 2**31),
)
def test_every_split_is_a_reproducible_partition(
    n: int, classes: int, parts: int, scheme: str, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    keys = rng.integers(0, 3 * parts, n)
    try:
        split = partition(labels, parts, scheme, seed, keys=keys)
    except JobSpecError as exc:  # only where no such split can exist
        message = str(exc)
        assert (
            n < parts
            or (scheme.startswith("pathological") and n < 2 * parts)
            or (scheme == "natural" and len(np.unique(keys)) < parts)
            or (scheme.startswith("dirichlet") and "raise alpha" in message)
        ), message
        return
    assert len(split) == parts and all(len(p) > 0 for p in split)
    joined = np.concatenate(split)
    assert np.array_equal(np.sort(joined), np.arange(n))  # disjoint and covering
    again = partition(labels, parts, scheme, seed, keys=keys)
    assert all(np.array_equal(a, b) for a, b in zip(split, again, strict=True))


def test_each_scheme_is_the_skew_it_names() -> None:
    labels = np.repeat(np.arange(10), 100)
    rng = np.random.default_rng(0)
    rng.shuffle(labels)
    classes = lambda parts: [len(np.unique(labels[p])) for p in parts]  # noqa: E731
    assert min(classes(partition(labels, 10, "iid", 1))) == 10
    assert max(classes(partition(labels, 10, "pathological:2", 1))) <= 4  # K runs, 2 at a seam
    sizes = [len(p) for p in partition(labels, 10, "quantity:1.5", 1)]
    assert max(sizes) > 3 * min(sizes)
    assert sizes != [len(p) for p in partition(labels, 10, "quantity:1.5", 2)]  # the seed
    dirichlet = partition(labels, 4, "dirichlet:0.1", 1)
    mixes = [np.bincount(labels[p], minlength=10) / len(p) for p in dirichlet]
    assert max(np.abs(m - 0.1).max() for m in mixes) > 0.3
    keys = np.arange(1000) // 100  # ten sites
    for part in partition(labels, 4, "natural", 1, keys=keys):
        sites = np.unique(keys[part])
        assert all((keys[part] == s).sum() == 100 for s in sites)  # a site stays whole


@pytest.mark.parametrize(
    ("scheme", "words"),
    [
        ("dirichlet", "needs a number after ':'"),
        ("dirichlet:-1", "finite and > 0"),
        ("pathological:1.5", "a whole number >= 1"),
        ("iid:3", "iid takes no argument"),
        ("zipf:2", "unknown partition 'zipf:2'; use one of iid, dirichlet:ALPHA"),
    ],
)
def test_a_bad_scheme_is_one_clear_error(scheme: str, words: str) -> None:
    with pytest.raises(JobSpecError, match="task t: ") as err:
        check_partition(scheme, "task t")
    assert words in str(err.value)


def test_what_cannot_be_split_says_why() -> None:
    labels = np.zeros(5, dtype=int)
    with pytest.raises(JobSpecError, match="5 samples cannot fill 8 parts"):
        partition(labels, 8, "iid", 0)
    with pytest.raises(JobSpecError, match="natural needs one"):
        partition(labels, 2, "natural", 0)
    with pytest.raises(JobSpecError, match="1 keys cannot fill 2 parts"):
        partition(labels, 2, "natural", 0, keys=np.zeros(5))
