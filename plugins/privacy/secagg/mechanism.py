"""``secagg``: secure aggregation for the synchronous averaging rules.

```toml
[privacy]
mechanism = "secagg"
clip = 1.0            # each element of an update's change is clipped to [-clip, clip]
threshold = 0.5       # shares needed to rebuild a secret: more than this share of the neighbours
stage_timeout = 15    # seconds the key and share steps wait before going on without the silent
```

Each round every participant trains, then runs SecAgg+ with the coordinator
(``protocol.py``) over EXCHANGE messages: keys, encrypted shares, and its change
quantised into Z_(2^32) and masked, sent as the update (each tensor of the change
as int32 of its shape, in the memory the change had; in parts when big). The masks
run over the tensors in the order of their names, as one vector. The coordinator
adds the masked inputs as they come, asks the survivors for the shares that take
the masks out, and gives the rule the mean change of the survivors, as one update:
all it learns is the sum.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Collection, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from elastic_plugins.privacy.secagg.graph import degree_for
from elastic_plugins.privacy.secagg.keys import PRG, new_seed
from elastic_plugins.privacy.secagg.protocol import (
    ClientRound,
    ProtocolFailure,
    ServerRound,
    Unmasked,
)
from elastic_plugins.privacy.secagg.quantise import levels_for, mean_change, quantise

from elastic.api import (
    Aggregator,
    AsyncAggregator,
    Channel,
    ElasticError,
    JobSpec,
    JobSpecError,
    PrivacyMechanism,
    Said,
    Update,
    WireTensor,
    check_params,
    hookimpl,
    update_template,
)

__all__ = ["SecureAggregation", "SecureMean"]

log = logging.getLogger("elastic.secagg")


class SecureAggregation(PrivacyMechanism):
    """Secure aggregation, SecAgg+ (see the module).

    Parameters (``[privacy]``):
        clip: the clipping range of each element of a change (default 1.0).
        threshold: t as a share of each client's neighbours, in (0, 1) (default 0.5:
            t = floor(k / 2) + 1).
        stage_timeout: seconds the key and share steps wait for everyone (default a
            quarter of the round's timeout).
    """

    name = "secagg"
    interactive = True

    def __init__(self, params: Mapping[str, Any], spec: JobSpec) -> None:
        super().__init__(params, spec)
        p = check_params(
            "[privacy]", params, {"clip": float, "threshold": float, "stage_timeout": float}
        )
        self.clip = p.get("clip", 1.0)
        self.threshold = p.get("threshold", 0.5)
        self.stage_timeout = p.get("stage_timeout", spec.round_timeout / 4)
        if not (self.clip > 0 and math.isfinite(self.clip)):
            raise JobSpecError(f"[privacy] clip must be > 0, got {self.clip}")
        if not 0 < self.threshold < 1:
            raise JobSpecError(f"[privacy] threshold must be in (0, 1), got {self.threshold}")
        if self.stage_timeout <= 0:
            raise JobSpecError(f"[privacy] stage_timeout must be > 0, got {self.stage_timeout}")
        refused = [
            (what, fix)
            for what, fix, on in (
                (
                    "[compression] update",
                    "masked data does not compress: drop it",
                    spec.compression.update,
                ),
                ("[job] clients", "each worker is one client: drop clients", spec.clients),
                (
                    "[limits] max_norm",
                    "the coordinator never sees an update: use clip",
                    spec.limits.max_norm,
                ),
                (
                    "[job] min_workers below 3",
                    "a sum of two gives each its other: raise it to 3",
                    spec.min_workers < 3,
                ),
            )
            if on
        ]
        if refused:
            what, fix = refused[0]
            raise JobSpecError(f"[privacy] secure aggregation cannot take {what}; {fix}")

    def wrap(self, rule: Aggregator) -> Aggregator:
        if not rule.averages or isinstance(rule, AsyncAggregator):
            why = "folds updates asynchronously" if rule.averages else "needs every update"
            raise JobSpecError(
                f"[privacy] secure aggregation gives a rule the sum of a round's updates, and "
                f"rule {self.spec.rule} {why}; use fedavg, the fedopt family or syncavg"
            )
        cls = type(
            f"Secure{type(rule).__name__}",
            (SecureMean,),
            {"name": rule.name, "worker_mode": rule.worker_mode},
        )
        return cls(rule, self)

    def worker_settings(self) -> dict[str, Any]:
        return {"clip": self.clip, "timeout": self.spec.round_timeout, "prg": PRG}

    @classmethod
    def protect(
        cls,
        settings: Mapping[str, Any],
        change: dict[str, torch.Tensor],
        channel: Channel | None = None,
    ) -> dict[str, Any]:
        if channel is None:
            raise ValueError("secure aggregation needs a channel to the coordinator")
        clip, timeout = float(settings["clip"]), float(settings["timeout"])
        if settings.get("prg") != PRG:
            raise ValueError(
                f"the coordinator expands masks with {settings.get('prg')!r}, this worker "
                f"with {PRG!r}: run the same elastic version on both"
            )
        client = ClientRound(channel.me, channel.round_id.encode())
        channel.send("keys", client.advertise())
        roster = _unless_skipped(channel.receive("roster", timeout))
        channel.send("shares", client.share(roster))
        client.receive(_unless_skipped(channel.receive("inbox", timeout)))
        levels = levels_for(int(roster["clients"]))
        names = sorted(change)
        masked = quantise(
            [change[k] for k in names], clip, levels, new_seed(), client.masks(), in_place=True
        )
        change.update(zip(names, masked, strict=True))
        channel.answer("unmask", client.reveal)
        return {}


class SecureMean(Aggregator):
    """A synchronous averaging rule that sees only the sum of a round's updates."""

    name = "secure"  # (never registered: it wraps the job's rule, keeping its name)
    averages = True
    folds_parts = True

    def __init__(self, rule: Aggregator, mechanism: SecureAggregation) -> None:
        super().__init__(rule.params)
        self.rule = rule
        self.mechanism = mechanism
        self.excluded: dict[str, str] = {}  # named for a bad share: left out from then on
        self.server: ServerRound | None = None
        self.last: Unmasked | None = None

    def setup(self, model: torch.nn.Module) -> None:
        self.rule.setup(model)
        self.base = update_template(model, self.worker_mode)
        self.kind = "gradient" if self.worker_mode == "gradient" else "weights"
        self.offsets, at = {}, 0  # each tensor's place in the masked vector
        for name in sorted(self.base):
            self.offsets[name] = at
            at += self.base[name].numel()
        self.size = at
        self.total = np.zeros(0, dtype=np.uint32)  # (the sum's buffer, kept across rounds)

    def wire_form(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: (tuple(t.shape), torch.int32) for name, t in self.base.items()}

    # ---------------------------------------------------------- the round ---

    def begin_round(self) -> None:
        self.server = None
        self.failure: str | None = None
        self.present: set[str] = set()

    def round_started(self, number: int, participants: Sequence[str]) -> list[Said]:
        clients = [c for c in participants if c not in self.excluded]
        self.stage, self.stage_began = "keys", math.nan
        self.number = number
        degree = degree_for(len(clients))
        threshold = min(degree, math.floor(self.mechanism.threshold * degree) + 1)
        try:
            self.server = ServerRound(
                f"{self.mechanism.spec.id}/{number}".encode(),
                clients,
                degree,
                threshold,
                self.mechanism.spec.seed * 1_000_003 + number,
                self.size,
                self.total,
            )
            self.total = self.server.total
        except ProtocolFailure as exc:
            self.failure = f"secure aggregation cannot start: {exc}"
        return []

    def exchange(self, worker: str, stage: str, data: Mapping[str, Any]) -> list[Said]:
        server = self.server
        if worker in self.excluded and stage == "keys":  # (told at once: it stops waiting)
            return [(worker, "roster", {"skip": f"left out: {self.excluded[worker]}"})]
        if server is None or worker not in server.clients:
            raise ValueError(f"{worker} takes no part in this round's secure aggregation")
        try:
            if stage == "keys" and self.stage == "keys":
                server.add_keys(worker, data)
            elif stage == "shares" and self.stage == "shares":
                server.add_shares(worker, data)
            elif stage == "unmask" and self.stage == "unmask":
                server.add_reveal(worker, data)
                return []
            else:
                raise ProtocolFailure(
                    f"stage {stage!r} is not due (the round is at {self.stage!r})"
                )
        except ProtocolFailure as exc:
            raise ValueError(str(exc)) from None
        return self._advance(late=False)

    def poll(self, now: float, present: Collection[str]) -> list[Said]:
        self.present = set(present)
        if self.server is None or self.stage not in ("keys", "shares"):
            return []
        if math.isnan(self.stage_began):
            self.stage_began = now
        return self._advance(late=now - self.stage_began >= self.mechanism.stage_timeout)

    def _here(self, client: str) -> bool:
        return not self.present or client in self.present

    def _advance(self, late: bool) -> list[Said]:
        """The next step's messages once every client still here answered this one,
        or the stage's time is over: then the silent are told they are left out."""
        server = self.server
        assert server is not None
        if self.stage == "keys":
            answered, asked = server.keys, server.clients
        elif self.stage == "shares":
            answered, asked = server.sent, list(server.keys)
        else:
            return []
        if not late and any(self._here(c) and c not in answered for c in asked):
            return []
        skip = {"skip": f"too late for the {self.stage} step of round {self.number}"}
        said: list[Said] = [
            (c, "roster" if self.stage == "keys" else "inbox", skip)
            for c in server.clients
            if c not in answered
        ]
        self.stage_began = math.nan
        try:
            if self.stage == "keys":
                self.stage = "shares"
                rosters = server.rosters()
                n = len(server.clients)
                return said + [
                    (c, "roster", {**rosters[c], "clients": n})
                    if c in rosters
                    else (c, "roster", {"skip": "too few neighbours took part"})
                    for c in server.keys
                ]
            self.stage = "input"
            return said + [(c, "inbox", box) for c, box in server.inboxes().items()]
        except ProtocolFailure as exc:
            self.failure = f"secure aggregation stopped: {exc}"
            self.stage = "failed"
            return said + [(c, "roster", {"skip": self.failure}) for c in server.keys]

    def accumulate(self, update: Update) -> None:
        for name in self.offsets:
            self._input(update.worker, update.tensors[name], self.offsets[name])

    def accumulate_part(self, update: Update, segments: Sequence[tuple[str, int, int]]) -> None:
        for name, start, _ in segments:
            self._input(update.worker, update.tensors[name], self.offsets[name] + start)

    def _input(self, worker: str, masked: WireTensor, start: int) -> None:
        """Fold a masked tensor (or a part of one) into the sum from ``start`` on,
        frame by frame, with no copy."""
        if self.server is None:
            return
        try:
            at = start
            for chunk in masked.chunks:
                values = chunk.reshape(-1).numpy().view(np.uint32)
                self.server.add_input(worker, values, at)
                at += values.size
        except ProtocolFailure as exc:  # (a client out of turn: its input is not counted)
            log.warning(
                "secure input refused job=%s worker=%s: %s", self.mechanism.spec.id, worker, exc
            )

    def closing(self, answered: Sequence[str]) -> list[Said] | str:
        if self.failure:
            return self.failure
        server = self.server
        if server is None or not server.inputs:
            return "secure aggregation: no complete masked input came"
        self.stage = "unmask"
        request = server.request()
        return [(c, "unmask", request) for c in request["survivors"]]

    def settled(self, give_up: bool) -> bool | str:
        server = self.server
        assert server is not None
        due = {c for c in server.inputs if c in self.present or not self.present}
        if not give_up and not due <= set(server.reveals):
            return False
        try:
            self.last = server.unmask()
        except ProtocolFailure as exc:
            return f"secure aggregation: {exc}"
        for client, why in self.last.excluded.items():
            log.warning("client excluded job=%s worker=%s: %s", self.mechanism.spec.id, client, why)
            self.excluded[client] = why
        return True

    def finalize(self) -> None:
        result = self.last
        assert result is not None and self.server is not None
        mean = mean_change(
            result.total,
            len(result.survivors),
            self.mechanism.clip,
            levels_for(len(self.server.clients)),
        )
        tensors = {}
        for name, t in self.base.items():
            at = self.offsets[name]
            piece = mean[at : at + t.numel()].view(t.shape)
            if self.kind == "weights":
                piece.add_(t.detach().to(torch.float32))
            tensors[name] = WireTensor.from_tensor(piece.to(t.dtype))
        self.rule.begin_round()
        self.rule.accumulate(Update("secure-sum", 0, 1, 0.0, self.kind, tensors))
        self.rule.finalize()

    # ----------------------------------------------------------- the rest ---

    def figures(self) -> dict[str, float]:
        if self.last is None:
            return {}
        return {
            "secagg_survivors": len(self.last.survivors),
            "secagg_dropped": len(self.last.dropped),
            "secagg_excluded": len(self.excluded),
        }

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule.state_dict(), "excluded": dict(self.excluded)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if "excluded" not in state:
            self.rule.load_state_dict(state)
            return
        self.rule.load_state_dict(state.get("rule", {}))
        self.excluded = {str(k): str(v) for k, v in state["excluded"].items()}


def _unless_skipped(said: Mapping[str, Any]) -> Mapping[str, Any]:
    """What the coordinator said, unless it left this client out of the round."""
    if "skip" in said:
        raise ElasticError(f"left out of this round's secure aggregation: {said['skip']}")
    return said


@hookimpl
def elastic_privacy_mechanisms() -> list[type]:
    return [SecureAggregation]
