#!/usr/bin/env bash
# Installs what the tests need, lints, and runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh test
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/python -m pytest -q "$@"
