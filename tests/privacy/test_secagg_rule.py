"""The ``secagg`` mechanism's coordinator half driven by hand, as the round engine
drives it: the rule gets the mean of the survivors' changes; a client whose share is
bad is named, and left out of the next rounds; what cannot be unmasked is said; job
specs it cannot protect are refused."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch
from elastic_plugins.privacy.secagg import shamir
from elastic_plugins.privacy.secagg.protocol import ClientRound
from elastic_plugins.privacy.secagg.quantise import flat_uint32, levels_for, quantise

from elastic.errors import ConfigError, ElasticError
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.rules import Aggregator, Update
from elastic.simulation import simulate
from elastic.wire.tensors import WireTensor

PLUGINS = Plugins()


def spec(privacy: dict[str, Any] | None = None, rule: str = "fedavg", **job: Any):
    return parse_job_spec(
        {
            "job": {"id": "s", "task": "linreg", "rule": rule, "min_workers": 3, **job},
            "rule": {"weighting": "uniform"} if rule == "fedavg" else {},
            "privacy": {"mechanism": "secagg", "clip": 1.0, **(privacy or {})},
        }
    )


def secure(**job: Any) -> Aggregator:
    s = spec(**job)
    rule, _ = PLUGINS.protected(s, PLUGINS.rule(s.rule)(s.rule_params))
    return rule


def one_round(
    rule: Aggregator,
    model: torch.nn.Module,
    number: int,
    changes: dict[str, dict[str, torch.Tensor]],
    drop_after_input: frozenset[str] = frozenset(),
    tamper: str | None = None,
) -> bool | str:
    """Every step of a round, as the engine and the workers would take them."""
    workers = sorted(changes)
    rule.begin_round()
    rule.round_started(number, workers)
    rule.poll(0.0, workers)
    clients = {w: ClientRound(w, f"s/{number}".encode()) for w in workers}
    said = []
    for w in workers:
        try:
            said += rule.exchange(w, "keys", clients[w].advertise())
        except ValueError:
            pass  # (left out: it hears nothing more)
    rosters = {w: d for w, stage, d in said if stage == "roster" and "skip" not in d}
    said = []
    for w, roster in rosters.items():
        said += rule.exchange(w, "shares", clients[w].share(roster))
    inboxes = {w: d for w, stage, d in said if stage == "inbox"}
    levels = levels_for(len(rule.server.clients))  # type: ignore[attr-defined]
    for w, inbox in inboxes.items():
        clients[w].receive(inbox)
        rule.accumulate(Update(w, 0, 1, 0.0, "weights", masked(clients[w], changes[w], levels)))
    asked = rule.closing(sorted(inboxes))
    if isinstance(asked, str):
        return asked
    for w, _, request in asked:
        if w in drop_after_input:
            continue
        revealed = clients[w].reveal(request)
        if w == tamper:
            for owner, raw in revealed["b"].items():
                share = shamir.Share.from_bytes(raw)
                revealed["b"][owner] = shamir.Share(
                    share.x, ((share.values[0] + 1) % shamir.PRIME, *share.values[1:])
                ).to_bytes()
        rule.exchange(w, "unmask", revealed)
    verdict = rule.settled(give_up=bool(drop_after_input))
    if verdict is True:
        rule.finalize()
    return verdict


def masked(
    client: ClientRound, change: dict[str, torch.Tensor], levels: int
) -> dict[str, WireTensor]:
    """A worker's update: its change quantised and masked as one vector over the
    tensors in the order of their names, each sent as int32 of its own shape."""
    names = sorted(change)
    vector = client.mask(flat_uint32(quantise([change[k] for k in names], 1.0, levels, bytes(32))))
    out, at = {}, 0
    for k in names:
        n = change[k].numel()
        out[k] = WireTensor.from_tensor(
            torch.from_numpy(vector[at : at + n].view(np.int32)).reshape(change[k].shape)
        )
        at += n
    return out


def model_and_changes(
    workers: list[str],
) -> tuple[torch.nn.Module, dict[str, dict[str, torch.Tensor]]]:
    model = torch.nn.Linear(10, 1)
    generator = torch.Generator().manual_seed(0)
    return model, {
        w: {
            k: torch.rand(p.shape, generator=generator) - 0.5 for k, p in model.state_dict().items()
        }
        for w in workers
    }


def flat(change: dict[str, torch.Tensor]) -> torch.Tensor:
    """A change as one vector in the model's state-dict order (weight, then bias)."""
    return torch.cat([change["weight"].flatten(), change["bias"].flatten()])


def test_the_rule_gets_the_mean_change_of_the_survivors() -> None:
    workers = [f"w{i}" for i in range(5)]
    model, changes = model_and_changes(workers)
    rule = secure()
    rule.setup(model)
    before = torch.cat([p.detach().flatten().clone() for p in model.state_dict().values()])
    assert one_round(rule, model, 1, changes, drop_after_input=frozenset({"w3"})) is True
    after = torch.cat([p.detach().flatten() for p in model.state_dict().values()])
    expected = sum(flat(c) for c in changes.values()) / 5  # w3 sent its input: a survivor
    assert torch.allclose(after - before, expected, atol=1e-6)
    assert rule.figures() == {"secagg_survivors": 5, "secagg_dropped": 0, "secagg_excluded": 0}


def test_a_client_with_a_bad_share_is_named_and_left_out_after() -> None:
    workers = [f"w{i}" for i in range(6)]
    model, changes = model_and_changes(workers)
    rule = secure()
    rule.setup(model)
    assert one_round(rule, model, 1, changes, tamper="w2") is True  # the sum is still right
    assert rule.excluded == {"w2": "a bad share of w0's self-mask seed"}  # type: ignore[attr-defined]
    before = torch.cat([p.detach().flatten().clone() for p in model.state_dict().values()])
    assert one_round(rule, model, 2, changes) is True
    after = torch.cat([p.detach().flatten() for p in model.state_dict().values()])
    others = [w for w in workers if w != "w2"]
    assert torch.allclose(after - before, sum(flat(changes[w]) for w in others) / 5, atol=1e-6)
    assert rule.state_dict()["excluded"] == {"w2": "a bad share of w0's self-mask seed"}


def test_too_few_reveals_abandon_the_round_with_the_reason() -> None:
    workers = [f"w{i}" for i in range(4)]
    model, changes = model_and_changes(workers)
    rule = secure()
    rule.setup(model)
    verdict = one_round(rule, model, 1, changes, drop_after_input=frozenset({"w0", "w1", "w2"}))
    assert isinstance(verdict, str) and "shares of" in verdict and "are needed" in verdict


@pytest.mark.parametrize(
    "job, rule, match",
    [
        ({"min_workers": 2}, "fedavg", "min_workers below 3"),
        ({"clients": 10}, "fedavg", r"\[job\] clients"),
        ({}, "async", "folds updates asynchronously"),
        ({}, "median", "needs every update"),
    ],
)
def test_what_it_cannot_protect_is_refused(job: dict, rule: str, match: str) -> None:
    with pytest.raises(ElasticError, match=match):
        secure(rule=rule, **job)


def test_compressed_updates_are_refused() -> None:
    data = {
        "job": {"id": "s", "task": "linreg", "rule": "fedavg", "min_workers": 3},
        "compression": {"update": ["fp16"]},
        "privacy": {"mechanism": "secagg"},
    }
    s = parse_job_spec(data)
    with pytest.raises(ElasticError, match="masked data does not compress"):
        PLUGINS.protected(s, PLUGINS.rule("fedavg")({}))


def test_simulate_refuses_it_with_the_command_that_runs_it(tmp_path) -> None:
    with pytest.raises(ConfigError, match="elastic run JOB.toml --local-workers 3"):
        simulate(spec(), 3, PLUGINS, tmp_path)
