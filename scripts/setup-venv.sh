#!/usr/bin/env bash
# Creates .venv (if missing) and installs elastic with the given extras.
# torch is pinned so that a CPU build is used where one is on disk; set
# TORCH_SPEC to choose another (e.g. TORCH_SPEC="torch==2.13.0+cu124").
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-examples}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$python" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade "pip>=23.2"
.venv/bin/python -m pip install --quiet --disable-pip-version-check "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${extras}]"
