"""The c10d store on etcd v3: each call against a real etcd, through torch's own
``PrefixStore`` (so from C++), and as the store of a real gloo process group."""

from __future__ import annotations

import multiprocessing
import threading
import time
import uuid
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from elastic.distributed.etcd_access import RunLease, connect_endpoint, run_prefix
from elastic.distributed.etcd_store import EtcdV3Store


def _store(endpoint: str, run: str, timeout: float = 5.0) -> EtcdV3Store:
    client, _ = connect_endpoint(endpoint, timeout=10)
    prefix = run_prefix("test", run) + "store/"
    return EtcdV3Store(client, prefix, RunLease(client, 60), timedelta(seconds=timeout))


@pytest.fixture
def store(etcd_server):
    return _store(etcd_server.url, uuid.uuid4().hex)


def test_set_get_check_delete_and_count(store):
    assert store.num_keys() == 0 and not store.check(["a"])
    store.set("a", "1")
    store.set("b", b"\x00\xff")
    assert store.get("a") == b"1" and store.get("b") == b"\x00\xff"
    assert store.check(["a", "b"]) and not store.check(["a", "c"])
    assert store.num_keys() == 2
    assert store.delete_key("a") and not store.delete_key("a")
    assert store.num_keys() == 1


def test_add_counts_from_zero_and_is_atomic_across_threads(store):
    assert store.add("n", 5) == 5
    assert store.add("n", -2) == 3

    def bump() -> None:
        for _ in range(10):
            store.add("n", 1)

    threads = [threading.Thread(target=bump) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert store.get("n") == b"43"


def test_compare_set_as_c10d_states_it(store):
    assert store.compare_set("k", "x", "y") == b"x"  # absent, expected given: not written
    assert not store.check(["k"])
    assert store.compare_set("k", "", "first") == b"first"  # absent, nothing expected
    assert store.compare_set("k", "wrong", "no") == b"first"
    assert store.compare_set("k", "first", "second") == b"second"
    assert store.get("k") == b"second"


def test_get_and_wait_block_until_a_key_is_written(store):
    def later() -> None:
        time.sleep(0.5)
        store.set("late", "here")

    threading.Thread(target=later).start()
    started = time.monotonic()
    assert store.get("late") == b"here"
    assert 0.4 < time.monotonic() - started < 4
    threading.Thread(target=lambda: (time.sleep(0.3), store.set("w2", "x"))).start()
    store.wait(["late", "w2"])


def test_waiting_for_an_absent_key_times_out_with_its_name(store):
    started = time.monotonic()
    with pytest.raises(dist.DistStoreError, match="'missing'"):
        store.wait(["missing"], timedelta(seconds=0.5))
    assert time.monotonic() - started < 3
    store.set_timeout(timedelta(seconds=0.3))
    with pytest.raises(dist.DistStoreError):
        store.get("missing")


def test_multi_set_and_multi_get(store):
    store.multi_set(["x", "y"], ["1", b"2"])
    assert store.multi_get(["x", "y"]) == [b"1", b"2"]


def test_torch_prefix_store_calls_it_from_cpp(store):
    prefixed = dist.PrefixStore("gen/3", store)
    prefixed.set("rank0", "addr")
    assert prefixed.get("rank0") == b"addr"
    assert prefixed.add("joined", 2) == 2
    assert prefixed.compare_set("c", "", "v") == b"v"
    prefixed.wait(["rank0"])
    assert prefixed.check(["rank0"]) and store.check(["gen/3/rank0"])
    assert prefixed.multi_get(["rank0", "c"]) == [b"addr", b"v"]


def _all_reduce(endpoint: str, run: str, rank: int, out: multiprocessing.Queue) -> None:
    store = _store(endpoint, run, timeout=30)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    tensor = torch.tensor([float(rank + 1)])
    dist.all_reduce(tensor)
    dist.barrier()
    out.put((rank, tensor.item()))
    dist.destroy_process_group()


def test_a_gloo_process_group_forms_on_it(etcd_server):
    run, ctx = uuid.uuid4().hex, multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_all_reduce, args=(etcd_server.url, run, r, out)) for r in (0, 1)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert results == {0: 3.0, 1: 3.0}
    assert all(p.exitcode == 0 for p in procs)
