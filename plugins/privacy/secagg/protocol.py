"""One SecAgg+ round, both sides, as plain state machines: messages in, messages out
(dicts of bytes and strings, msgpack-able), no sockets. ``ClientRound`` is one
client's part, ``ServerRound`` the coordinator's.

1. **keys**: each client makes two X25519 pairs (c: to encrypt shares, s: to agree
   masks), a self-mask seed b, and sends both public keys and a commitment to b.
2. **shares**: the coordinator gives each client its neighbours' keys (the SecAgg+
   graph), the threshold t and everyone's x. The client splits its s private key
   and b, t of k, among its neighbours, each share encrypted (AES-GCM) under a key
   only it and that neighbour can derive; the coordinator routes what it cannot read.
3. **masked input**: each client sends ``x + PRG(b) + sum_v ±PRG(s_uv)`` in
   Z_(2^32), over its neighbours v that took part in step 2 (+ when u < v): the
   pairwise masks cancel in the sum; the self-mask hides x even from a coordinator
   that later learns a dropped client's pairwise masks.
4. **unmasking**: the coordinator names who sent an input (survivors) and who did not
   (dropped). Each remaining client reveals, for each neighbour, a share of b if it
   survived, of its s key if it dropped, never both. With t shares the coordinator
   rebuilds each survivor's b (checked against its commitment) and each dropped
   client's s key (checked against its public key), and takes those masks out: the
   sum of the survivors' inputs is all it learns.

A share that does not fit the others is found and its revealer named; below t good
shares the round cannot be unmasked and says which secret lacked them.
"""

from __future__ import annotations

import bisect
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import msgpack
import numpy as np
from cryptography.exceptions import InvalidTag
from elastic_plugins.privacy.secagg import keys, shamir
from elastic_plugins.privacy.secagg.graph import neighbours

__all__ = ["ClientRound", "ServerRound", "ProtocolFailure", "Unmasked"]


class ProtocolFailure(Exception):
    """The round cannot go on: the reason names who or what."""


def _info(round_id: bytes, what: bytes) -> bytes:
    return b"elastic-secagg/" + what + b"/" + round_id


def _sign(me: str, other: str) -> int:
    return 1 if me < other else -1


# ---------------------------------------------------------------- client ---


class ClientRound:
    """One client's side of one round (``round_id``: unique to the job's round)."""

    def __init__(self, me: str, round_id: bytes) -> None:
        self.me = me
        self.round_id = round_id
        self.c = keys.KeyPair()
        self.s = keys.KeyPair()
        self.b = keys.new_seed()
        self.peers: dict[str, tuple[bytes, bytes]] = {}  # neighbour -> (c_pk, s_pk)
        self.held: dict[str, tuple[bytes, bytes]] = {}  # sender -> (its s share, its b share)
        self.revealed: set[str] = set()

    def advertise(self) -> dict:
        """Step 1: the public keys and the commitment to b."""
        return {"c_pk": self.c.public, "s_pk": self.s.public, "b_commit": keys.commitment(self.b)}

    def share(self, roster: Mapping) -> dict:
        """Step 2: given ``roster`` ({threshold, x: {client: x}, keys: {neighbour:
        [c_pk, s_pk]}}), the encrypted shares for each neighbour."""
        try:
            threshold = int(roster["threshold"])
            xs = {str(c): int(x) for c, x in roster["x"].items()}
            self.peers = {str(v): (bytes(k[0]), bytes(k[1])) for v, k in roster["keys"].items()}
        except (KeyError, TypeError, ValueError, IndexError) as exc:
            raise ProtocolFailure(f"a malformed roster: {exc}") from None
        if self.me in self.peers or not self.peers or any(v not in xs for v in self.peers):
            raise ProtocolFailure("the roster's neighbours must be others, each with an x")
        holders = [xs[v] for v in self.peers]
        s_shares = shamir.split(self.s.private_bytes(), holders, threshold)
        b_shares = shamir.split(self.b, holders, threshold)
        out = {}
        for (v, (c_pk, _)), s_share, b_share in zip(
            self.peers.items(), s_shares, b_shares, strict=True
        ):
            key = keys.agree(self.c, c_pk, _info(self.round_id, b"share"))
            plain = msgpack.packb([self.me, v, s_share.to_bytes(), b_share.to_bytes()])
            out[v] = keys.seal(key, plain, _info(self.round_id, f"{self.me}>{v}".encode()))
        return {"shares": out}

    def receive(self, inbox: Mapping) -> None:
        """The shares neighbours sent this client ({shares: {sender: sealed}});
        they are the neighbours it masks with. One that does not open is refused."""
        for sender, sealed in dict(inbox.get("shares", {})).items():
            sender = str(sender)
            if sender not in self.peers:
                raise ProtocolFailure(f"shares from {sender}, who is not a neighbour")
            key = keys.agree(self.c, self.peers[sender][0], _info(self.round_id, b"share"))
            try:
                plain = keys.unseal(
                    key, bytes(sealed), _info(self.round_id, f"{sender}>{self.me}".encode())
                )
                frm, to, s_share, b_share = msgpack.unpackb(plain)
            except (InvalidTag, ValueError, TypeError, msgpack.UnpackException) as exc:
                raise ProtocolFailure(
                    f"the shares from {sender} do not open: {type(exc).__name__}"
                ) from None
            if (frm, to) != (sender, self.me):
                raise ProtocolFailure(f"the shares from {sender} were addressed to another")
            self.held[sender] = (bytes(s_share), bytes(b_share))

    def masks(self) -> list[tuple[bytes, int]]:
        """Step 3's masks, (seed, sign): the self-mask and one per neighbour whose
        shares came (it reached step 2), + when this client's id is the smaller."""
        return [(self.b, 1)] + [
            (keys.agree(self.s, self.peers[v][1], _info(self.round_id, b"mask")), _sign(self.me, v))
            for v in self.held
        ]

    def mask(self, values: np.ndarray) -> np.ndarray:
        """Step 3: ``values`` (uint32) masked in place and returned."""
        keys.add_masks(values, self.masks())
        return values

    def reveal(self, request: Mapping) -> dict:
        """Step 4: for each neighbour, its b share if it survived, its s share if it
        dropped; a client named in both lists (or twice) is refused."""
        survivors = {str(c) for c in request.get("survivors", [])}
        dropped = {str(c) for c in request.get("dropped", [])}
        if survivors & dropped or self.me not in survivors:
            raise ProtocolFailure(
                "an unmasking request must name each client once, this one among the survivors"
            )
        b_out, s_out = {}, {}
        for sender, (s_share, b_share) in self.held.items():
            if sender in survivors:
                b_out[sender] = b_share
            elif sender in dropped:
                s_out[sender] = s_share
        if self.revealed & (set(b_out) | set(s_out)):
            raise ProtocolFailure("this round's shares were revealed already")
        self.revealed |= set(b_out) | set(s_out)
        return {"b": b_out, "s": s_out}


# ---------------------------------------------------------------- server ---


@dataclass
class Unmasked:
    """The round's result: the sum of the survivors' inputs (uint32, exact mod 2^32)."""

    total: np.ndarray
    survivors: list[str]
    dropped: list[str]
    excluded: dict[str, str] = field(default_factory=dict)  # client -> why (a bad share)


class ServerRound:
    """The coordinator's side of one round over ``clients`` (step 1 onwards).

    ``threshold`` is t: shares needed to rebuild a secret (at most the degree k).
    The coordinator sees keys, sealed shares, masked inputs and the shares revealed
    in step 4: never a share it could open before then, never both secrets of one
    client. ``total``: a uint32 buffer of ``size`` to sum into, zeroed (kept by the
    caller across rounds, it is not allocated again).
    """

    def __init__(
        self,
        round_id: bytes,
        clients: Sequence[str],
        degree: int,
        threshold: int,
        seed: int,
        size: int,
        total: np.ndarray | None = None,
    ) -> None:
        if not 1 <= threshold <= degree <= len(clients) - 1:
            raise ProtocolFailure(
                f"need 1 <= threshold {threshold} <= degree {degree} <= clients - 1 = "
                f"{len(clients) - 1}"
            )
        self.round_id = round_id
        self.clients = list(clients)
        self.graph = neighbours(self.clients, degree, seed)
        self.threshold = threshold
        self.x = {c: i + 1 for i, c in enumerate(self.clients)}
        self.keys: dict[str, dict] = {}
        self.sent: dict[str, dict[str, bytes]] = {}  # step 2: sender -> {receiver: sealed}
        if total is None or total.shape != (size,) or total.dtype != np.uint32:
            total = np.zeros(size, dtype=np.uint32)
        else:
            total.fill(0)  # (a buffer the caller keeps across rounds)
        self.total = total
        self.inputs: set[str] = set()
        self.partial: dict[str, list[tuple[int, int]]] = {}  # inputs in pieces: the ranges folded
        self.folded: dict[str, int] = {}
        self.reveals: dict[str, dict] = {}

    # step 1
    def add_keys(self, client: str, data: Mapping) -> None:
        try:
            entry = {k: bytes(data[k]) for k in ("c_pk", "s_pk", "b_commit")}
        except (KeyError, TypeError) as exc:
            raise ProtocolFailure(f"{client}'s keys are malformed: {exc}") from None
        if any(len(v) != 32 for v in entry.values()):
            raise ProtocolFailure(f"{client}'s keys must be 32 bytes each")
        self.keys[client] = entry

    def rosters(self) -> dict[str, dict]:
        """After step 1: each keyed client's neighbours that sent keys; a client with
        fewer than t of them is left out. ``ProtocolFailure`` when all are."""
        out = {}
        for c in self.keys:
            peers = [v for v in self.graph[c] if v in self.keys]
            if len(peers) < self.threshold:
                continue  # (it cannot take part: too few of its neighbours can hold its shares)
            out[c] = {
                "threshold": self.threshold,
                "x": {v: self.x[v] for v in peers},
                "keys": {v: [self.keys[v]["c_pk"], self.keys[v]["s_pk"]] for v in peers},
            }
        if not out:
            raise ProtocolFailure(
                f"{len(self.keys)} clients sent keys: none has the {self.threshold} neighbours "
                "with keys its shares need"
            )
        return out

    # step 2
    def add_shares(self, client: str, data: Mapping) -> None:
        shares = data.get("shares", {})
        expected = {v for v in self.graph[client] if v in self.keys}
        if not isinstance(shares, Mapping) or set(map(str, shares)) != expected:
            raise ProtocolFailure(f"{client} must send one share to each neighbour with keys")
        self.sent[client] = {str(v): bytes(s) for v, s in shares.items()}

    def inboxes(self) -> dict[str, dict]:
        """After step 2: what each client that sent shares receives, from the
        neighbours that sent theirs."""
        return {
            c: {"shares": {u: self.sent[u][c] for u in self.sent if c in self.sent[u]}}
            for c in self.sent
        }

    # step 3
    def add_input(self, client: str, masked: np.ndarray, start: int = 0) -> None:
        """``client``'s masked input, or its elements from ``start`` on (an input in
        pieces, in any order, none overlapping another): it counts once every
        element came."""
        if client not in self.sent or client in self.inputs:
            raise ProtocolFailure(f"{client} may not send an input now")
        stop = start + masked.size
        pieces = self.partial.setdefault(client, [])
        at = bisect.bisect(pieces, (start, stop))
        if (
            masked.dtype != np.uint32
            or not 0 <= start < stop <= self.total.size
            or (at > 0 and pieces[at - 1][1] > start)
            or (at < len(pieces) and pieces[at][0] < stop)
        ):
            raise ProtocolFailure(
                f"{client}'s input must be {self.total.size} uint32 values, each sent once"
            )
        np.add(self.total[start:stop], masked, out=self.total[start:stop])
        pieces.insert(at, (start, stop))
        self.folded[client] = self.folded.get(client, 0) + masked.size
        if self.folded[client] == self.total.size:
            del self.partial[client], self.folded[client]
            self.inputs.add(client)

    def request(self) -> dict:
        """After step 3: who survived, who dropped (of the clients that shared)."""
        return {
            "survivors": sorted(self.inputs),
            "dropped": sorted(set(self.sent) - self.inputs - set(self.partial)),
        }

    # step 4
    def add_reveal(self, client: str, data: Mapping) -> None:
        if client not in self.inputs:
            raise ProtocolFailure(f"{client} sent no input: it has nothing to reveal")
        self.reveals[client] = {
            "b": {str(u): bytes(s) for u, s in dict(data.get("b", {})).items()},
            "s": {str(u): bytes(s) for u, s in dict(data.get("s", {})).items()},
        }

    def unmask(self) -> Unmasked:
        """The sum of the survivors' inputs: their self-masks and the dropped
        clients' pairwise masks taken out. ``ProtocolFailure`` below threshold."""
        if self.partial:
            raise ProtocolFailure(
                f"the input of {', '.join(sorted(self.partial))} came in part only: the sum "
                "holds a part of an input whose masks cannot be taken out"
            )
        survivors = sorted(self.inputs)
        dropped = sorted(set(self.sent) - self.inputs)
        excluded: dict[str, str] = {}
        masks: list[tuple[bytes, int]] = []  # taken out in one pass, at the end
        for u in survivors:
            b = self._rebuild(
                u, "b", lambda s, u=u: keys.commitment(s) == self.keys[u]["b_commit"], excluded
            )
            masks.append((b, -1))
        for u in dropped:
            s_key = self._rebuild(
                u,
                "s",
                lambda s, u=u: keys.private_from_bytes(s).public == self.keys[u]["s_pk"],
                excluded,
            )
            pair = keys.private_from_bytes(s_key)
            for v in survivors:
                if u in self.sent.get(v, {}) and v in self.sent.get(u, {}):  # v masked with u
                    seed = keys.agree(pair, self.keys[v]["s_pk"], _info(self.round_id, b"mask"))
                    masks.append((seed, -_sign(v, u)))
        keys.add_masks(self.total, masks)
        return Unmasked(self.total, survivors, dropped, excluded)

    def _rebuild(self, owner: str, which: str, check, excluded: dict[str, str]) -> bytes:
        shares, by_x = [], {}
        for revealer, revealed in self.reveals.items():
            if revealer in excluded or owner not in revealed[which]:
                continue
            try:
                share = shamir.Share.from_bytes(revealed[which][owner])
            except ValueError:
                excluded[revealer] = f"a malformed share of {owner}'s {which}"
                continue
            if share.x != self.x[revealer]:
                excluded[revealer] = f"a share of {owner}'s {which} at another client's x"
                continue
            shares.append(share)
            by_x[share.x] = revealer
        what = "self-mask seed" if which == "b" else "mask key"
        if len(shares) < self.threshold:
            raise ProtocolFailure(
                f"only {len(shares)} shares of {owner}'s {what} came, {self.threshold} are needed"
            )
        try:
            secret, bad = shamir.recover(shares, self.threshold, 32, check)
        except ValueError:
            raise ProtocolFailure(
                f"no {self.threshold} of the {len(shares)} shares of {owner}'s {which} agree"
            ) from None
        for x in bad:
            excluded[by_x[x]] = (
                f"a bad share of {owner}'s {'self-mask seed' if which == 'b' else 'mask key'}"
            )
        return secret
