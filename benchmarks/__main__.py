"""Every benchmark, one after another (the soak is separate: ``make soak``).

    python -m benchmarks                 # all of them
    python -m benchmarks vs_gloo codecs  # some

Each prints its figures as ratios against a baseline measured in the same run and
writes its plot to benchmarks/plots/NAME.png.
"""

from __future__ import annotations

import subprocess
import sys
import time

ALL = [
    "transport",
    "aggregation",
    "memory",
    "vs_gloo",
    "vs_flower",
    "scale",
    "membership",
    "async_vs_sync",
    "fed_rules",
    "codecs",
    "curve",
    "privacy",
    "secagg",
    "secagg_masking",
]


def main() -> int:
    names = sys.argv[1:] or ALL
    unknown = [n for n in names if n not in ALL]
    if unknown:
        print(
            f"unknown benchmark(s): {', '.join(unknown)}; choose from {', '.join(ALL)}",
            file=sys.stderr,
        )
        return 2
    failed = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        started = time.monotonic()
        if subprocess.run([sys.executable, "-m", f"benchmarks.{name}"]).returncode != 0:
            failed.append(name)
        print(f"({name}: {time.monotonic() - started:.0f} s)", flush=True)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
