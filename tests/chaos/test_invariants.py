"""The chaos suite's checks catch what they are meant to catch, on made-up runs."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from tests.chaos.invariants import check_checkpoints, check_history, check_logs, check_run

JOB = "j"


def line(msg: str) -> str:
    return f"2026-11-23T19:00:00.000 level=info logger=elastic.rounds msg='{msg}'"


def good_run(tmp_path: Path, rounds: int = 3) -> tuple[dict[str, Any], Path]:
    """A finished 3-round job: status, a checkpoint per round, a final model and a log."""
    job_dir = tmp_path / JOB
    job_dir.mkdir()
    history = [{"round": n, "version": n, "updates": 2} for n in range(1, rounds + 1)]
    model = {"w": torch.ones(3), "b": torch.zeros(1)}
    for n in range(1, rounds + 1):
        torch.save(
            {"round": n, "version": n, "history": history[:n], "model": model},
            job_dir / f"ckpt-{n:08d}.pt",
        )
    safetensors.torch.save_file(model, job_dir / "final.safetensors")
    log = []
    for n in range(1, rounds + 1):
        log.append(line(f"round started job={JOB} round={n} version={n - 1} participants=2"))
        for w in ("a", "b"):
            log.append(
                line(
                    f"update folded job={JOB} worker={w} round={n} key={w}/{JOB}/{n} samples=10 "
                    "bytes=8"
                )
            )
        log.append(line(f"round committed job={JOB} round={n} version={n} updates=2 loss=0.5"))
    (tmp_path / "c1.log").write_text("\n".join(log) + "\n")
    return {"state": "finished", "round": rounds, "history": history}, tmp_path / "c1.log"


def test_a_clean_run_passes(tmp_path: Path) -> None:
    status, log = good_run(tmp_path)
    assert check_run(tmp_path, JOB, status, [log]) == []


def test_an_unfinished_job_and_repeated_versions_are_caught() -> None:
    status = {
        "state": "running",
        "round": 3,
        "history": [
            {"round": 1, "version": 1},
            {"round": 2, "version": 1},
            {"round": 2, "version": 2},
        ],
    }
    problems = check_history(status)
    assert any("did not finish" in p for p in problems)
    assert any("each once" in p for p in problems)
    assert any("strictly increase" in p for p in problems)


def test_a_missing_or_poisoned_checkpoint_is_caught(tmp_path: Path) -> None:
    status, _ = good_run(tmp_path)
    (tmp_path / JOB / "ckpt-00000002.pt").unlink()
    ckpt = torch.load(tmp_path / JOB / "ckpt-00000003.pt", weights_only=True)
    ckpt["model"]["w"][1] = float("nan")
    torch.save(ckpt, tmp_path / JOB / "ckpt-00000003.pt")
    problems = check_checkpoints(tmp_path / JOB, status)
    assert any("round 2" in p and "no checkpoint" in p for p in problems), problems
    assert any("ckpt-00000003.pt holds a model with NaN" in p for p in problems), problems


def test_a_checkpoint_from_another_timeline_is_caught(tmp_path: Path) -> None:
    status, _ = good_run(tmp_path)
    other = copy.deepcopy(status)
    other["history"][2]["updates"] = 1  # the final history counts another commit of round 3
    assert any("disagrees" in p for p in check_checkpoints(tmp_path / JOB, other))


def test_an_update_applied_twice_is_caught(tmp_path: Path) -> None:
    status, log = good_run(tmp_path)
    text = log.read_text().replace(
        line(f"round committed job={JOB} round=2 version=2 updates=2 loss=0.5"),
        line(f"update folded job={JOB} worker=a round=2 key=a/{JOB}/2 samples=10 bytes=8")
        + "\n"
        + line(f"round committed job={JOB} round=2 version=2 updates=3 loss=0.5"),
    )
    log.write_text(text)
    problems = check_logs([log], JOB, status)
    assert any("round 2 folded an update twice" in p for p in problems), problems


def test_a_round_committed_by_two_leaders_as_different_versions_is_caught(tmp_path: Path) -> None:
    status, log = good_run(tmp_path)
    split = tmp_path / "c2.log"
    split.write_text(
        line(f"round started job={JOB} round=3 version=1 participants=1")
        + "\n"
        + line(f"update folded job={JOB} worker=a round=3 key=a/{JOB}/3 samples=10 bytes=8")
        + "\n"
        + line(f"round committed job={JOB} round=3 version=2 updates=1 loss=0.5")
        + "\n"
    )
    problems = check_logs([log, split], JOB, status)
    assert any("round 3 was committed as different versions" in p for p in problems), problems


def test_a_commit_that_counts_updates_it_did_not_fold_is_caught(tmp_path: Path) -> None:
    status, log = good_run(tmp_path)
    lines = [x for x in log.read_text().splitlines() if "worker=b round=1 " not in x]
    log.write_text("\n".join(lines) + "\n")
    problems = check_logs([log], JOB, status)
    assert any("round 1 committed 2 updates but folded 1" in p for p in problems), problems


def test_an_asynchronous_update_applied_in_two_versions_is_caught(tmp_path: Path) -> None:
    status = {
        "state": "finished",
        "round": 2,
        "history": [
            {"round": 1, "version": 1, "updates": 2},
            {"round": 2, "version": 2, "updates": 2},
        ],
    }
    folded = [
        line(
            f"update folded job={JOB} worker={w} base_version=0 key={w}/{JOB}/{k} staleness=0 "
            "bytes=8"
        )
        for w, k in (("a", 7), ("b", 8))
    ]
    log = tmp_path / "c1.log"
    log.write_text(
        "\n".join(
            [
                *folded,
                line(f"round committed job={JOB} round=1 version=1 updates=2 loss=0.5"),
                folded[0],
                line(
                    f"update folded job={JOB} worker=b base_version=1 key=b/{JOB}/9 staleness=0 "
                    "bytes=8"
                ),
                line(f"round committed job={JOB} round=2 version=2 updates=2 loss=0.5"),
            ]
        )
        + "\n"
    )
    problems = check_logs([log], JOB, status)
    assert problems == [
        f"c1.log: round 2 applied updates already applied in c1.log round 1: ['a/{JOB}/7']"
    ], problems
    # The same worker twice in one asynchronous version is fine (it was quick): distinct keys.
    log.write_text(
        "\n".join(
            [
                *folded,
                line(f"round committed job={JOB} round=1 version=1 updates=2 loss=0.5"),
                line(
                    f"update folded job={JOB} worker=a base_version=1 key=a/{JOB}/10 staleness=0 "
                    "bytes=8"
                ),
                line(
                    f"update folded job={JOB} worker=a base_version=1 key=a/{JOB}/11 staleness=0 "
                    "bytes=8"
                ),
                line(f"round committed job={JOB} round=2 version=2 updates=2 loss=0.5"),
            ]
        )
        + "\n"
    )
    assert check_logs([log], JOB, status) == []
