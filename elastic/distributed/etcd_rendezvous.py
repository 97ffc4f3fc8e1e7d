"""torch's ``RendezvousBackend`` on the etcd v3 API.

torch's own etcd backends speak the v2 API, which etcd 3.6 removed. This one keeps
the state of a rendezvous in one v3 key, base64 encoded (so a corrupt value is
detected), and its fencing token is that key's mod revision: ``set_state`` is one
transaction that writes only if the revision is still the caller's token (or, with
no token, only if the key does not exist), and otherwise reads the current state
back in the same transaction.
"""

from __future__ import annotations

import binascii
from base64 import b64decode, b64encode
from collections.abc import Callable
from typing import Any, TypeVar

from torch.distributed.elastic.rendezvous import RendezvousConnectionError, RendezvousStateError
from torch.distributed.elastic.rendezvous.dynamic_rendezvous import RendezvousBackend, Token

from elastic.distributed.etcd_access import RunLease
from elastic.errors import MembershipUnavailable
from elastic.membership.etcd.client import retrying

__all__ = ["EtcdV3RendezvousBackend", "etcd_call"]

T = TypeVar("T")
DEFAULT_TTL = 7200  # seconds a run's state outlives its last writer, as torch's v2 backend


def etcd_call(client: Any, what: str, call: Callable[[], T], timeout: float) -> T:
    """``call()`` retried across etcd endpoints for ``timeout`` seconds, then torch's
    ``RendezvousConnectionError`` (what torch's agent expects of a backend)."""
    try:
        return retrying(client, what, call, timeout)
    except MembershipUnavailable as exc:
        raise RendezvousConnectionError(f"The connection to etcd has failed: {exc}") from exc


class EtcdV3RendezvousBackend(RendezvousBackend):
    """The state of one rendezvous in etcd v3.

    Args:
        client: a connected etcd v3 client (``elastic.membership.etcd.client.connect``).
        key: the key that holds the state.
        lease: the lease the key is written under (its TTL cleans up a run left behind).
        timeout: seconds to keep retrying an unanswered call before
            ``RendezvousConnectionError``.
    """

    def __init__(self, client: Any, key: str, lease: RunLease, timeout: float = 30.0) -> None:
        if not key:
            raise ValueError("The rendezvous state needs a non-empty key.")
        self._client, self._key, self._lease, self._timeout = client, key, lease, timeout

    @property
    def name(self) -> str:
        """See base class."""
        return "etcd-v3"

    def get_state(self) -> tuple[bytes, Token] | None:
        """See base class."""
        read = lambda: self._client.get(self._key)  # noqa: E731
        value, meta = etcd_call(self._client, "reading the rendezvous", read, self._timeout)
        return None if meta is None else (self._decode(value), meta.mod_revision)

    def set_state(
        self, state: bytes, token: Token | None = None
    ) -> tuple[bytes, Token, bool] | None:
        """See base class."""
        if token is not None:
            try:
                token = int(token)
            except (TypeError, ValueError):  # not one of ours: it cannot be current
                current = self.get_state()
                return None if current is None else (*current, False)
        tx = self._client.transactions
        compare = [tx.version(self._key) == 0] if token is None else [tx.mod(self._key) == token]
        encoded = b64encode(state)

        def attempt() -> tuple[bool, list[Any]]:
            put = tx.put(self._key, encoded, lease=self._lease.id())
            read = tx.get(self._key)
            return self._client.transaction(compare=compare, success=[put], failure=[read])

        written, responses = etcd_call(
            self._client, "writing the rendezvous", self._lease.writing(attempt), self._timeout
        )
        if written:
            return state, responses[0].response_put.header.revision, True
        if not responses or not responses[0]:  # deleted meanwhile: there is no state
            return None
        value, meta = responses[0][0]
        return self._decode(value), meta.mod_revision, False

    def _decode(self, value: bytes) -> bytes:
        try:
            return b64decode(value, validate=True)
        except binascii.Error as exc:
            raise RendezvousStateError(
                f"The rendezvous state at {self._key} is corrupt (not base64); delete the key "
                "to start the rendezvous afresh."
            ) from exc
