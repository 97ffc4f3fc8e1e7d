"""``elastic report``: a job's run as pictures instead of logs.

Four panels from the job's status (its per-round history and its events): training
and evaluation loss per round; accuracy per round (and the privacy spent, ε, when
the job has differential privacy); members over time, with joins
(green) and leaves (red) marked; bytes sent and received per round. Written as a
PNG, or as one self-contained HTML page with the same figure and a summary table.
"""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path
from typing import Any

from elastic.errors import ConfigError

__all__ = ["render"]


def _figure(status: dict[str, Any]) -> bytes:
    try:
        import matplotlib  # noqa: PLC0415 - only this command needs it

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # noqa: PLC0415
    except ImportError:
        raise ConfigError(
            "elastic report needs matplotlib; pip install 'elastic[report]'"
        ) from None
    history: list[dict[str, Any]] = status.get("history", [])
    events: list[dict[str, Any]] = status.get("events", [])
    rounds = [h["round"] for h in history]
    fig, axes = plt.subplots(2, 2, figsize=(14, 9), dpi=100)
    fig.suptitle(
        f"job {status['job']}: {status['task']} / {status['rule']}, {status['state']} at round "
        f"{status['round']}/{status['rounds']}"
    )

    loss = axes[0][0]
    loss.plot(
        rounds,
        [h.get("loss") for h in history],
        label="clients' training loss (local)",
        color="tab:blue",
    )
    for key, label, color in (
        ("eval_loss", "evaluation loss", "tab:orange"),
        ("global_train_loss", "global model's training loss", "tab:green"),
    ):
        evaluated = [h for h in history if key in h]
        if evaluated:
            loss.plot(
                [h["round"] for h in evaluated],
                [h[key] for h in evaluated],
                label=label,
                color=color,
                marker=".",
            )
    loss.set(
        title="loss per round",
        xlabel="round",
        ylabel="loss",
        yscale="log" if history and min((h.get("loss") or 1) for h in history) > 0 else "linear",
    )
    loss.legend()

    accuracy = axes[0][1]
    scored = [h for h in history if "accuracy" in h]
    if scored:
        accuracy.plot(
            [h["round"] for h in scored],
            [h["accuracy"] for h in scored],
            color="tab:green",
            marker=".",
        )
        accuracy.set_ylim(0, 1)
    else:
        accuracy.text(
            0.5,
            0.5,
            "no accuracy (the task reports none,\nor eval_every = 0)",
            ha="center",
            va="center",
            transform=accuracy.transAxes,
        )
    accuracy.set(title="accuracy per round", xlabel="round", ylabel="accuracy")
    private = [h for h in history if "epsilon" in h]
    if private:  # the privacy spent, on the same rounds (differential privacy)
        spent = accuracy.twinx()
        spent.plot(
            [h["round"] for h in private],
            [h["epsilon"] for h in private],
            color="tab:purple",
            linestyle="--",
        )
        spent.set_ylabel(f"privacy spent: ε at δ = {private[-1].get('dp_delta', 0):g}")
        accuracy.set_title("accuracy and privacy spent per round")

    members = axes[1][0]
    start = status.get("started_at") or (
        history[0]["at"] if history and "at" in history[0] else 0.0
    )
    timed = [h for h in history if "at" in h]
    counts = [h["members"] for h in timed]
    changes = [e for e in events if e["event"] in ("joined", "left")]
    times, levels, level = [0.0], [0], 0
    for e in changes:  # membership as it changed, from the events themselves
        level += 1 if e["event"] == "joined" else -1
        times.append(e["at"] - start)
        levels.append(level)
    end = max([times[-1], *(h["at"] - start for h in timed)])
    top = max([*counts, *levels, 1]) + 1
    members.step([*times, end], [*levels, level], where="post", color="tab:purple", label="members")
    members.plot(
        [h["at"] - start for h in timed],
        counts,
        ".",
        color="tab:gray",
        markersize=3,
        label="members at each commit",
    )
    for kind, color, marker in (("joined", "tab:green", "^"), ("left", "tab:red", "v")):
        xs = [e["at"] - start for e in events if e["event"] == kind]
        for x in xs:
            members.axvline(x, color=color, alpha=0.6, linewidth=1.2, zorder=3)
        members.scatter(
            xs,
            [top - 0.3] * len(xs),
            color=color,
            marker=marker,
            zorder=4,
            label=f"{kind} ({len(xs)})",
        )
    for e in events:
        if e["event"] in ("paused", "resumed", "finishing", "cancelled"):
            members.axvline(e["at"] - start, color="black", linestyle=":", linewidth=1)
            members.annotate(
                e["event"], (e["at"] - start, 0.1), rotation=90, fontsize=8, va="bottom", ha="right"
            )
    members.set(
        title="members over time (joins and leaves marked)",
        xlabel="seconds since the job started",
        ylabel="members",
        ylim=(0, top),
    )
    members.yaxis.get_major_locator().set_params(integer=True)
    members.legend(loc="lower left")

    traffic = axes[1][1]
    width = 0.4
    traffic.bar(
        [r - width / 2 for r in rounds],
        [h.get("bytes_sent", 0) / 1e6 for h in history],
        width,
        label="sent (models)",
        color="tab:blue",
    )
    traffic.bar(
        [r + width / 2 for r in rounds],
        [h.get("bytes_received", 0) / 1e6 for h in history],
        width,
        label="received (updates)",
        color="tab:orange",
    )
    traffic.set(title="bytes per round", xlabel="round", ylabel="MB")
    traffic.legend()

    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def render(status: dict[str, Any], out: Path, fmt: str = "png") -> Path:
    """Write the report of ``status`` (as the coordinator reports it) to ``out``."""
    png = _figure(status)
    if fmt == "png":
        out.write_bytes(png)
        return out
    if fmt != "html":
        raise ConfigError(f"report format must be png or html, got {fmt!r}")
    last = status.get("last") or {}
    rows = [
        ("state", status["state"]),
        ("rounds", f"{status['round']}/{status['rounds']}"),
        ("version", status["version"]),
        ("final accuracy", last.get("accuracy", "-")),
        ("final loss", last.get("loss", "-")),
        *(
            [("privacy spent", f"ε = {last['epsilon']:.4g} at δ = {last.get('dp_delta', 0):g}")]
            if "epsilon" in last
            else []
        ),
        *(
            [("stopped", status["final"]["stopped"])]
            if "stopped" in status.get("final", {})
            else []
        ),
        ("wall seconds", status.get("wall_seconds")),
        ("updates", status["totals"].get("updates")),
        ("rejected", status["totals"].get("rejected")),
        ("bytes sent", status["totals"].get("bytes_sent")),
        ("bytes received", status["totals"].get("bytes_received")),
        (
            "joins / leaves",
            f"{sum(e['event'] == 'joined' for e in status.get('events', []))} / "
            f"{sum(e['event'] == 'left' for e in status.get('events', []))}",
        ),
    ]
    table = "\n".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    title = html.escape(f"elastic report: job {status['job']}")
    image = (
        '<img alt="loss, accuracy, members over time and bytes per round" '
        f'src="data:image/png;base64,{base64.b64encode(png).decode()}">'
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>body{{font-family:sans-serif;margin:2em}} table{{border-collapse:collapse}}
th,td{{text-align:left;padding:.2em 1em;border-bottom:1px solid #ddd}}</style>
</head><body>
<h1>{title}</h1>
<table>{table}</table>
{image}
</body></html>
"""
    out.write_text(page, encoding="utf-8")
    return out
