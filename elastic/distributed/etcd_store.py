"""A c10d ``Store`` on the etcd v3 API.

What torch's rendezvous handler, its agent and ``init_process_group`` need of a
store, kept in etcd rather than in a TCPStore that one process hosts (and takes
with it when it dies). Keys are stored as given below a prefix; values are bytes.
A read that must wait for a key watches it from the revision it was read at, so
nothing written in between is missed and nothing polls.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import Any

import torch.distributed as dist

from elastic.distributed.etcd_access import RunLease
from elastic.distributed.etcd_rendezvous import etcd_call

__all__ = ["EtcdV3Store"]

RPC_RETRY = 30.0  # seconds an unanswered etcd call is retried across endpoints


def _bytes(value: str | bytes | bytearray) -> bytes:
    return value.encode() if isinstance(value, str) else bytes(value)


class EtcdV3Store(dist.Store):
    """A c10d store whose keys live in etcd under ``prefix``.

    Args:
        client: a connected etcd v3 client.
        prefix: the key prefix, ending in ``/``; every key of this store is below it.
        lease: the lease keys are written under (cleans up a run left behind).
        timeout: how long ``get`` and ``wait`` wait for a key (c10d's default: 300 s).
    """

    def __init__(
        self, client: Any, prefix: str, lease: RunLease, timeout: timedelta | None = None
    ) -> None:
        super().__init__()  # the pybind trampoline needs it
        if not prefix.endswith("/"):
            raise ValueError(f"a store prefix ends in '/', got {prefix!r}")
        self.client, self.prefix, self.lease = client, prefix, lease
        self.set_timeout(timeout or timedelta(seconds=300))

    def _timeout(self) -> timedelta:
        return self.timeout  # type: ignore[attr-defined,no-any-return]  # c10d's, unstubbed

    def _key(self, key: str | bytes) -> bytes:
        return self.prefix.encode() + _bytes(key)

    def _call(self, what: str, call: Any) -> Any:
        return etcd_call(self.client, what, self.lease.writing(call), RPC_RETRY)

    def set(self, key: str, value: str | bytes) -> None:
        """Write ``value`` at ``key``."""
        self._call(
            "writing a store key",
            lambda: self.client.put(self._key(key), _bytes(value), lease=self.lease.id()),
        )

    def get(self, key: str) -> bytes:
        """The value at ``key``, waiting up to the store's timeout for it to appear."""
        return self._wait_for([key], self._timeout())[0]

    def multi_get(self, keys: list[str]) -> list[bytes]:
        """The values at ``keys``, waiting for them all."""
        return self._wait_for(keys, self._timeout())

    def multi_set(self, keys: list[str], values: list[str | bytes]) -> None:
        """Write several keys in one transaction."""
        pairs = [(self._key(k), _bytes(v)) for k, v in zip(keys, values, strict=True)]

        def write() -> Any:
            tx, lease = self.client.transactions, self.lease.id()
            puts = [tx.put(key, value, lease=lease) for key, value in pairs]
            return self.client.transaction(compare=[], success=puts, failure=[])

        self._call("writing store keys", write)

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the integer at ``key`` (0 when absent); the new value."""
        full, tx = self._key(key), self.client.transactions
        while True:
            value, meta = self._call("reading a counter", lambda: self.client.get(full))
            new = amount + (0 if meta is None else int(value))
            seen = tx.version(full) == 0 if meta is None else tx.mod(full) == meta.mod_revision

            def write(seen: Any = seen, new: int = new) -> Any:
                put = tx.put(full, str(new).encode(), lease=self.lease.id())
                return self.client.transaction(compare=[seen], success=[put], failure=[])

            written, _ = self._call("adding to a counter", write)
            if written:
                return new

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        """Write ``desired`` if ``key`` holds ``expected`` (or is absent and ``expected``
        is empty); the value ``key`` holds afterwards (``expected`` when it is absent)."""
        full, tx = self._key(key), self.client.transactions
        expected, desired = _bytes(expected), _bytes(desired)
        compare = [tx.version(full) == 0] if not expected else [tx.value(full) == expected]

        def write() -> Any:
            put = tx.put(full, desired, lease=self.lease.id())
            return self.client.transaction(compare=compare, success=[put], failure=[tx.get(full)])

        written, responses = self._call("comparing and setting a store key", write)
        if written:
            return desired
        return responses[0][0][0] if responses and responses[0] else expected

    def check(self, keys: list[str]) -> bool:
        """Whether every key exists now (no waiting)."""
        return all(self._read(key)[0] is not None for key in keys)

    def wait(self, keys: list[str], timeout: timedelta | None = None) -> None:
        """Wait until every key exists; ``DistStoreError`` after ``timeout``."""
        self._wait_for(keys, self._timeout() if timeout is None else timeout)

    def delete_key(self, key: str) -> bool:
        """Delete ``key``; whether it existed."""
        return bool(self._call("deleting a store key", lambda: self.client.delete(self._key(key))))

    def num_keys(self) -> int:
        """How many keys the store holds."""
        response = self._call(
            "counting store keys",
            lambda: self.client.get_prefix_response(self.prefix, keys_only=True, count_only=True),
        )
        return int(response.count)

    def _read(self, key: str) -> tuple[bytes | None, int]:
        """The value at ``key`` (None when absent) and the revision it was read at."""
        response = self._call(
            "reading a store key", lambda: self.client.get_response(self._key(key))
        )
        value = response.kvs[0].value if response.count else None
        return value, response.header.revision

    def _wait_for(self, keys: list[str], timeout: timedelta) -> list[bytes]:
        from pyetcd.exceptions import WatchTimedOut  # noqa: PLC0415

        deadline = time.monotonic() + timeout.total_seconds()
        values: list[bytes] = []
        for key in keys:
            while True:
                value, revision = self._read(key)
                if value is not None:
                    values.append(value)
                    break
                left = deadline - time.monotonic()
                if left <= 0:
                    raise dist.DistStoreError(
                        f"Timed out after {timeout.total_seconds():.0f}s waiting for store key "
                        f"{key!r} in etcd under {self.prefix}"
                    )
                try:  # any change to the key since our read (or a broken watch) reads again
                    self.client.watch_once_response(
                        self._key(key), timeout=left, start_revision=revision + 1
                    )
                except WatchTimedOut:
                    pass
        return values
