"""What must hold after any chaos run of a round-based job, read from what the
coordinators left behind: the job's status, its checkpoints and the coordinators'
logs (at debug level, which names every folded update).

Each check returns the violations it found, as sentences; an empty list is a pass.
"""

from __future__ import annotations

import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

_FIELD = re.compile(r"(\w+)=([^\s']+)")


def _fields(line: str) -> dict[str, str]:
    return dict(_FIELD.findall(line.split(" msg=", 1)[-1]))


def check_history(status: dict[str, Any]) -> list[str]:
    """The job finished; rounds run 1..R, each once; versions strictly increase."""
    problems = []
    if status.get("state") != "finished":
        problems.append(
            f"the job did not finish: state {status.get('state')!r} at round {status.get('round')}"
        )
    history = status.get("history", [])
    rounds = [h["round"] for h in history]
    if rounds != list(range(1, len(rounds) + 1)):
        problems.append(f"rounds are not 1..{len(rounds)} each once: {rounds}")
    versions = [h["version"] for h in history]
    bad = [(a, b) for a, b in zip(versions, versions[1:], strict=False) if b <= a]
    if bad:
        problems.append(f"model versions do not strictly increase: {bad[:5]}")
    return problems


def _finite(model: dict[str, torch.Tensor]) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in model.values() if t.is_floating_point())


def check_checkpoints(job_dir: Path, status: dict[str, Any]) -> list[str]:
    """Every committed version is in a checkpoint (the job checkpoints every round)
    that agrees with the final history up to it; no checkpoint and no final model
    holds a NaN or an infinity."""
    problems = []
    history = status.get("history", [])
    for entry in history:
        path = job_dir / f"ckpt-{entry['round']:08d}.pt"
        if not path.exists():
            problems.append(
                f"round {entry['round']} (version {entry['version']}) was committed but has no "
                f"checkpoint {path.name}"
            )
            continue
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        if (ckpt["round"], ckpt["version"]) != (entry["round"], entry["version"]):
            problems.append(
                f"{path.name} holds round {ckpt['round']} version {ckpt['version']}, the history "
                f"says version {entry['version']}"
            )
        seen = [(h["round"], h["version"], h.get("updates")) for h in ckpt["history"]]
        final = [(h["round"], h["version"], h.get("updates")) for h in history[: entry["round"]]]
        if seen != final:
            problems.append(
                f"{path.name} disagrees with the final history: {seen[-3:]} against {final[-3:]}"
            )
        if not _finite(ckpt["model"]):
            problems.append(f"{path.name} holds a model with NaN or infinite values")
    final_model = job_dir / "final.safetensors"
    if status.get("state") == "finished":
        if not final_model.exists():
            problems.append(f"the job finished but {final_model.name} is missing")
        elif not _finite(safetensors.torch.load_file(final_model)):
            problems.append("the final model holds NaN or infinite values")
    return problems


def check_logs(logs: list[Path], job: str, status: dict[str, Any]) -> list[str]:
    """No update is applied twice, and no round is committed twice with different content.

    Reads every coordinator's log (every incarnation of it, appended). A commit must
    count exactly the updates folded for it: in a round-based job those of the
    round's last run, from distinct workers; in an asynchronous one those folded
    since the previous commit. No update key is folded into two commits, anywhere.
    Each round number is committed as one version only, and the final history
    counts what its commit folded.
    """
    problems = []
    commits: dict[int, list[tuple[str, int, int]]] = defaultdict(
        list
    )  # round -> (log, version, updates)
    applied: dict[str, str] = {}  # update key -> the commit it went into
    for log in logs:
        by_round: dict[int, list[tuple[str, str]]] = {}  # round-based rules
        pending: list[tuple[str, str]] = []  # asynchronous rules: folded since the last commit
        for line in log.read_text(errors="replace").splitlines():
            if "leading cluster=" in line or "standing by cluster=" in line:
                by_round, pending = {}, []  # a new term starts from the newest checkpoint
                continue
            if f"job={job} " not in line:
                continue
            f = _fields(line)
            if "round started" in line:
                by_round[int(f["round"])] = []  # a re-run starts from nothing
            elif "updates dropped" in line:
                pending = []
            elif "update folded" in line:
                if "round" in f:
                    by_round.setdefault(int(f["round"]), []).append((f["worker"], f["key"]))
                else:
                    pending.append((f["worker"], f["key"]))
            elif "round committed" in line:
                number, version, updates = int(f["round"]), int(f["version"]), int(f["updates"])
                round_based = number in by_round
                got = by_round.pop(number) if round_based else pending
                pending = []
                keys = [k for _, k in got]
                workers = [w for w, _ in got]
                if len(set(keys)) != len(keys) or (
                    round_based and len(set(workers)) != len(workers)
                ):
                    problems.append(f"{log.name}: round {number} folded an update twice: {got}")
                twice = [k for k in keys if k in applied]
                if twice:
                    problems.append(
                        f"{log.name}: round {number} applied updates already applied in "
                        f"{applied[twice[0]]}: {twice}"
                    )
                applied.update({k: f"{log.name} round {number}" for k in keys})
                if len(got) != updates:
                    problems.append(
                        f"{log.name}: round {number} committed {updates} updates but folded "
                        f"{len(got)}"
                    )
                commits[number].append((log.name, version, updates))
    for number, seen in sorted(commits.items()):
        if len({v for _, v, _ in seen}) > 1:
            problems.append(f"round {number} was committed as different versions: {seen}")
    for entry in status.get("history", []):
        seen = commits.get(entry["round"], [])
        if not seen:
            problems.append(
                f"round {entry['round']} is in the history but no coordinator logged its commit"
            )
        elif all(u != entry.get("updates") for _, _, u in seen):
            problems.append(
                f"round {entry['round']}: the history counts {entry.get('updates')} updates, the "
                f"commit log {seen}"
            )
    return problems


def check_run(state_dir: Path, job: str, status: dict[str, Any], logs: list[Path]) -> list[str]:
    """Every invariant, on one finished run."""
    return (
        check_history(status)
        + check_checkpoints(state_dir / job, status)
        + check_logs(logs, job, status)
    )
