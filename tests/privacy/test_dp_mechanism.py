"""The ``dp`` mechanism's parts, by hand: clipping and the noise scale on a captured
aggregate, the asynchronous buffer, adaptive clipping, the worker's step, and the
job specs it refuses."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from elastic_plugins.privacy.clipping import delta_noise_multiplier, l2_norm
from elastic_plugins.privacy.dp import DifferentialPrivacy

from elastic.errors import JobSpecError
from elastic.jobspec import parse_job_spec
from elastic.plugins import Plugins
from elastic.rules import Aggregator, Update
from elastic.wire.tensors import WireTensor

PLUGINS = Plugins()


def spec(privacy: dict[str, Any], rule: str = "fedavg", **job: Any):
    return parse_job_spec(
        {
            "job": {
                "id": "dp",
                "task": "linreg",
                "rule": rule,
                "rounds": 10,
                "clients": 100,
                "clients_per_round": 5,
                **job,
            },
            "privacy": privacy,
        }
    )


def protected(privacy: dict[str, Any], rule: str = "fedavg", **job: Any) -> Aggregator:
    s = spec(privacy, rule, **job)
    wrapped, _ = PLUGINS.protected(s, PLUGINS.rule(s.rule)(s.rule_params))
    return wrapped


class Wide(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(1000, 100)  # 100 100 weights: enough to measure a std


def weights(model: torch.nn.Module, change: dict[str, torch.Tensor], worker: str) -> Update:
    state = model.state_dict()
    return Update(
        worker,
        0,
        1000,  # a sample count no private rule may weigh by
        0.5,
        "weights",
        {n: WireTensor.from_tensor(state[n] + change[n]) for n in state},
    )


def direction(model: torch.nn.Module, norm: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    raw = {n: torch.randn(t.shape, generator=generator) for n, t in model.state_dict().items()}
    scale = norm / l2_norm(raw.values())
    return {n: t * scale for n, t in raw.items()}


def round_of(rule: Aggregator, model: torch.nn.Module, updates: list[Update]) -> dict:
    """The model's change over one round of ``updates``: the captured aggregate."""
    before = {n: t.clone() for n, t in model.state_dict().items()}
    rule.begin_round()
    for u in updates:
        rule.accumulate(u)
    rule.finalize()
    return {n: t - before[n] for n, t in model.state_dict().items()}


def test_the_aggregate_is_the_clipped_sum_over_the_clients_asked() -> None:
    model = Wide()
    rule = protected({"clip": 1.0, "noise_multiplier": 1e-9})
    rule.setup(model)
    big = [direction(model, 10.0, seed) for seed in range(3)]  # clipped to 1
    small = [direction(model, 0.5, seed) for seed in range(3, 5)]  # left as they are
    updates = [weights(model, c, f"w{i}") for i, c in enumerate(big + small)]
    got = round_of(rule, model, updates)
    expected = {
        n: (sum(c[n] / 10.0 for c in big) + sum(c[n] for c in small)) / 5 for n in got
    }  # m = clients_per_round = 5: the fixed denominator, not the updates' count
    for n in got:
        torch.testing.assert_close(got[n], expected[n], atol=1e-5, rtol=1e-4)
    assert rule.figures()["clip_norm"] == 1.0


def test_each_virtual_client_of_one_worker_is_clipped_on_its_own() -> None:
    model = Wide()
    rule = protected({"clip": 1.0, "noise_multiplier": 1e-9})
    rule.setup(model)
    changes = [direction(model, 4.0, seed) for seed in range(5)]
    got = round_of(rule, model, [weights(model, c, "one-worker") for c in changes])
    for n in got:
        torch.testing.assert_close(
            got[n], sum(c[n] / 4.0 for c in changes) / 5, atol=1e-5, rtol=1e-4
        )


def test_fewer_answers_are_not_scaled_up() -> None:
    model = Wide()
    rule = protected({"clip": 1.0, "noise_multiplier": 1e-9})
    rule.setup(model)
    change = direction(model, 1.0, 0)
    got = round_of(rule, model, [weights(model, change, "w0")])
    assert l2_norm(got.values()) == pytest.approx(1.0 / 5, rel=1e-4)


def test_the_noise_has_standard_deviation_z_c_over_m() -> None:
    model = Wide()
    z, clip, m = 2.0, 0.5, 5
    rule = protected({"clip": clip, "noise_multiplier": z})
    rule.setup(model)
    zero = {n: torch.zeros_like(t) for n, t in model.state_dict().items()}
    noise = torch.cat(
        [t.flatten() for t in round_of(rule, model, [weights(model, zero, "w")]).values()]
    )
    expected = z * clip / m
    n = noise.numel()
    # the sample std of n normals is within 4 standard errors (std / sqrt(2n)) of std
    assert abs(float(noise.std()) - expected) < 4 * expected / math.sqrt(2 * n)
    assert abs(float(noise.mean())) < 4 * expected / math.sqrt(n)
    # and it is Gaussian: the share within one std is 68.27%
    inside = float((noise.abs() <= expected).float().mean())
    assert abs(inside - 0.6827) < 4 * math.sqrt(0.6827 * 0.3173 / n)
    # and fresh each round: not a seeded stream a reader could replay
    again = torch.cat(
        [t.flatten() for t in round_of(rule, model, [weights(model, zero, "w")]).values()]
    )
    assert not torch.allclose(noise, again)


def test_an_async_buffer_shares_one_clip_per_worker_and_weighs_by_staleness() -> None:
    model = Wide()
    s = parse_job_spec(
        {
            "job": {"id": "a", "task": "linreg", "rule": "async", "rounds": 5},
            "rule": {"buffer": 3, "staleness": "polynomial", "staleness_a": 1.0},
            "privacy": {"clip": 1.0, "noise_multiplier": 1e-9, "delta": 1e-3},
        }
    )
    rule, _ = PLUGINS.protected(s, PLUGINS.rule("async")(s.rule_params))
    rule.setup(model)
    rule.begin_round()
    state = model.state_dict()
    before = {n: t.clone() for n, t in state.items()}
    a, b = direction(model, 1.0, 1), direction(model, 1.0, 2)

    def delta(change: dict, worker: str, staleness: int) -> Update:
        return Update(
            worker,
            0,
            7,
            0.1,
            "delta",
            {n: WireTensor.from_tensor(t) for n, t in change.items()},
            staleness,
        )

    rule.accumulate(delta(a, "w0", 0))
    rule.accumulate(delta(b, "w0", 0))  # the same worker again: its clip is spent
    assert not rule.ready()
    rule.accumulate(delta(b, "w1", 1))  # one version old: s(1) = 1/2
    assert rule.ready()
    rule.finalize()
    for n, t in model.state_dict().items():
        torch.testing.assert_close(t - before[n], (a[n] + 0.5 * b[n]) / 3, atol=1e-6, rtol=1e-4)


def test_adaptive_clipping_follows_the_median_norm() -> None:
    model = Wide()
    rule = protected(
        {
            "clip": 1.0,
            "noise_multiplier": 0.1,
            "adaptive": True,
            "target_quantile": 0.5,
            "clip_lr": 0.2,
            "count_stddev": 0.1,
        }
    )
    rule.setup(model)
    clips = []
    for r in range(15):
        updates = [weights(model, direction(model, 0.1, 10 * r + i), f"w{i}") for i in range(5)]
        round_of(rule, model, updates)
        clips.append(rule.figures()["clip_norm"])
    # every norm is below the clip: C shrinks by about exp(-0.2 (1 - 0.5)) a round
    assert clips[0] == pytest.approx(math.exp(-0.1), rel=0.05)
    assert 0.1 < clips[-1] < 0.35 and all(b < a for a, b in zip(clips, clips[1:], strict=False))
    assert 0.7 < rule.figures()["unclipped_share"] <= 1.3
    # the count took its share of the budget: the sum's noise grew to keep z overall
    assert delta_noise_multiplier(0.1, 0.1) == pytest.approx((0.1**-2 - 0.2**-2) ** -0.5)


def test_the_worker_clips_and_in_local_mode_noises_and_withholds() -> None:
    change = {"w": torch.full((100,), 1.0)}  # norm 10
    said = DifferentialPrivacy.protect({"clip": 2.0}, change)
    assert said == {"below_clip": False} and l2_norm(change.values()) == pytest.approx(2.0)
    small = {"w": torch.full((4,), 0.25)}
    assert DifferentialPrivacy.protect({"clip": 2.0}, small) == {"below_clip": True}
    assert torch.equal(small["w"], torch.full((4,), 0.25))
    noisy = {"w": torch.zeros(100_000)}
    said = DifferentialPrivacy.protect({"clip": 1.0, "noise_std": 0.3}, noisy)
    assert said == {"num_samples": 1, "loss": 0.0}
    assert float(noisy["w"].std()) == pytest.approx(0.3, rel=0.02)
    with pytest.raises(ValueError, match="need clip > 0"):
        DifferentialPrivacy.protect({"clip": "1"}, {"w": torch.zeros(2)})


def test_local_mode_averages_the_noised_updates_as_they_are() -> None:
    model = Wide()
    rule = protected({"mode": "local", "clip": 1.0, "noise_multiplier": 1.0})
    rule.setup(model)
    changes = [direction(model, 3.0, seed) for seed in range(2)]  # (noise makes norms big)
    got = round_of(rule, model, [weights(model, c, f"w{i}") for i, c in enumerate(changes)])
    for n in got:
        torch.testing.assert_close(
            got[n], (changes[0][n] + changes[1][n]) / 2, atol=1e-5, rtol=1e-4
        )


@pytest.mark.parametrize(
    "privacy, job, rule, match",
    [
        ({"noise_multiplier": 1.0}, {}, "fedavg", "noise needs clipping: set clip"),
        ({"clip": 1.0}, {}, "fedavg", "give noise_multiplier"),
        ({"clip": 1.0, "noise_multiplier": 0.0}, {}, "fedavg", "noise_multiplier must be"),
        (
            {"clip": 1.0, "noise_multiplier": 1.0, "delta": 0.01},
            {},
            "fedavg",
            r"delta = 0.01 must be in \(0, 1/100\)",
        ),
        ({"clip": 1.0, "noise_multiplier": 1.0}, {}, "median", "does not average"),
        (
            {"clip": 1.0, "noise_multiplier": 1.0, "accountant": "pld"},
            {},
            "fedavg",
            "Poisson sampling only",
        ),
        (
            {"clip": 1.0, "noise_multiplier": 1.0, "adaptive": True, "count_stddev": 0.2},
            {},
            "fedavg",
            "raise count_stddev above 0.5",
        ),
        (
            {"clip": 1.0, "noise_multiplier": 1.0, "mode": "local", "adaptive": True},
            {},
            "fedavg",
            "adaptive clipping needs",
        ),
        (
            {"clip": 1.0, "noise_multiplier": 1.0, "mode": "local", "clip_on": "coordinator"},
            {},
            "fedavg",
            "drop clip_on",
        ),
        (
            {"clip": 1.0, "noise_multiplier": 1.0, "max_epsilon": 0.1},
            {},
            "fedavg",
            "one round alone spends",
        ),
        (
            {"clip": 1.0, "target_epsilon": 5.0, "max_epsilon": 3.0},
            {},
            "fedavg",
            "above max_epsilon",
        ),
        (
            {"clip": 1.0, "noise_multiplier": 1.0},
            {"client_sampling": "cycle"},
            "fedavg",
            "no accountant can amplify",
        ),
        (
            {"clip": 1.0, "noise_multiplier": 1.0, "mechanism": "dpp"},
            {},
            "fedavg",
            "unknown privacy mechanism 'dpp'",
        ),
        ({"clip": 1.0, "noise_multiplier": 1.0, "clipp": 2}, {}, "fedavg", "clipp"),
    ],
)
def test_settings_that_protect_nothing_are_refused_with_the_fix(
    privacy: dict, job: dict, rule: str, match: str
) -> None:
    from elastic.errors import ElasticError

    with pytest.raises(ElasticError, match=match):
        protected(privacy, rule, **job)


def test_every_round_must_be_checkpointed() -> None:
    data = {
        "job": {"id": "c", "task": "linreg", "rule": "fedavg", "rounds": 5},
        "checkpoint": {"every": 5},
        "privacy": {"clip": 1.0, "noise_multiplier": 1.0, "delta": 1e-3},
    }
    s = parse_job_spec(data)
    with pytest.raises(JobSpecError, match="every round must be checkpointed"):
        PLUGINS.protected(s, PLUGINS.rule("fedavg")({}))


def test_a_target_epsilon_is_met_by_the_calibrated_noise() -> None:
    rule = protected({"clip": 1.0, "target_epsilon": 2.0}, client_sampling="poisson")
    dp = rule.dp  # type: ignore[attr-defined]
    for _ in range(10):  # the job's rounds
        dp.accountant.add(dp.z, 5, 100)
    assert 1.98 < dp.accountant.epsilon() <= 2.0


def test_a_server_optimizer_steps_along_the_noised_mean() -> None:
    """FedAdam behind DP: its one update is the clipped mean, its step Adam's."""
    model = Wide()
    rule = protected({"clip": 1.0, "noise_multiplier": 1e-9}, rule="fedadam")
    rule.setup(model)
    change = direction(model, 0.5, 3)
    got = round_of(rule, model, [weights(model, change, f"w{i}") for i in range(5)])
    # Adam's first step with tau 1e-3: each coordinate moves by about server_lr (0.1)
    # times (1 - beta1) m / (sqrt(v) + tau), in the direction of the mean change
    moved = torch.cat([t.flatten() for t in got.values()])
    mean = torch.cat([change[n].flatten() for n in got])
    assert torch.isfinite(moved).all() and float((moved * mean).sum()) > 0
    assert rule.rule.state_dict()["m"]  # type: ignore[attr-defined]
