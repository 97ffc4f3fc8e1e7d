"""One PNG per benchmark, written beside RESULTS.md (benchmarks/plots/NAME.png)."""

from __future__ import annotations

from pathlib import Path

PLOTS = Path(__file__).parent / "plots"


def _figure():  # type: ignore[no-untyped-def]
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_chart(
    name: str, title: str, values: dict[str, float], unit: str, log_x: bool = False
) -> Path:
    """Horizontal bars, one per measured path, labelled with their values."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 0.6 * len(values) + 1.4))
    labels = list(values)
    bars = ax.barh(labels, [values[k] for k in labels], color="#4477aa")
    ax.bar_label(bars, labels=[f"{values[k]:.3g} {unit}" for k in labels], padding=3)
    ax.invert_yaxis()
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(unit)
    ax.margins(x=0.2)
    return _save(fig, name)


def line_chart(
    name: str,
    title: str,
    x_label: str,
    y_label: str,
    series: dict[str, tuple[list[float], list[float]]],
    log_x: bool = False,
) -> Path:
    """One line per series of (x, y) points."""
    plt = _figure()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log")
    ax.set_title(title)
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, name)


def _save(fig, name: str) -> Path:  # type: ignore[no-untyped-def]
    PLOTS.mkdir(exist_ok=True)
    path = PLOTS / f"{name}.png"
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"plot: {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path
