#!/usr/bin/env bash
# The main job, end to end: an embedded coordinator plus 4 local worker processes
# train FedAvg on non-IID shards of the digits data, with a progress bar and the
# final evaluation. The final model and figures land in runs/.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh examples
exec .venv/bin/elastic run examples/digits-fedavg.toml --local-workers 4 --summary runs/digits-fedavg-summary.json "$@"
