"""The CLI's side of the control API: find the coordinator, ask, wait for the answer."""

from __future__ import annotations

import os
import uuid
from typing import TYPE_CHECKING, Any

import zmq

from elastic.errors import ConfigError, ControlError, MembershipUnavailable, Unreachable
from elastic.membership.cluster import open_backend
from elastic.wire.header import Message, MsgType
from elastic.wire.transport import dealer_socket, decode_plain, recv_frames, send_message

if TYPE_CHECKING:
    from elastic.wire.tensors import WireTensor

__all__ = ["ControlClient", "control_endpoint", "DEFAULT_CONTROL"]

DEFAULT_CONTROL = "tcp://127.0.0.1:5556"


def control_endpoint(coordinator: str | None, membership: str | None) -> str:
    """``--coordinator``, else the leader's control endpoint as the cluster names it,
    else ``$ELASTIC_CONTROL``, else the default beside a local coordinator."""
    if coordinator:
        return coordinator
    if membership:
        backend = open_backend(membership)
        leader = backend.leader()
        if leader is None or not leader.control:
            raise Unreachable(
                f"no coordinator leads the cluster in {backend}; start one, or wait for the "
                "election"
            )
        return leader.control
    return os.environ.get("ELASTIC_CONTROL", DEFAULT_CONTROL)


class ControlClient:
    def __init__(
        self,
        endpoint: str,
        timeout: float = 10.0,
        curve_key: str | None = None,
        coordinator_key: str | None = None,
    ) -> None:
        self.endpoint, self.timeout = endpoint, timeout
        self.secure = None
        if curve_key or coordinator_key:
            if not (curve_key and coordinator_key):
                raise ConfigError(
                    "CURVE needs both --curve-key (your secret key) and --coordinator-key (the "
                    "coordinator's public key)"
                )
            from elastic.security import client_security  # noqa: PLC0415

            self.secure = client_security(curve_key, coordinator_key)

    def call(self, op: str, **args: Any) -> tuple[dict[str, Any], dict[str, WireTensor]]:
        """(data, tensors) of a successful reply; ``ControlError`` with the
        coordinator's code and words, or ``Unreachable`` when nobody answers."""
        ctx: zmq.Context = zmq.Context.instance()
        sock = dealer_socket(ctx, f"cli-{uuid.uuid4().hex[:12]}", self.endpoint, secure=self.secure)
        key = uuid.uuid4().hex
        try:
            send_message(sock, Message(MsgType.REQUEST, key=key, meta={"op": op, "args": args}))
            while sock.poll(int(self.timeout * 1000)):
                reply = decode_plain(recv_frames(sock, routed=False)[1])
                if reply.type is MsgType.REPLY and reply.key in (key, ""):
                    if not reply.meta["ok"]:
                        raise ControlError(reply.meta["code"], reply.meta["error"])
                    return reply.meta["data"], reply.tensors
            hint = (
                "" if self.secure else "; if it uses CURVE, give --curve-key and --coordinator-key"
            )
            raise Unreachable(
                f"no coordinator reachable at {self.endpoint} (no answer in {self.timeout:.0f}s); "
                f"start one there, or give --coordinator or --membership{hint}"
            )
        except MembershipUnavailable as exc:
            raise Unreachable(str(exc)) from None
        finally:
            sock.close(linger=0)
