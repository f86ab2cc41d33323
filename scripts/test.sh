#!/usr/bin/env bash
# Every test tier: lint, types, unit tests, the real-server tests and the container tier.
# Usage: scripts/test.sh [pytest arguments]
#   SYMFO_CONTAINERS=0  skip setting up Docker (the container tests then skip, with why)
#   SYMFO_SOAK=1        add the long soaks
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
SYMFO_SETUP_TESTS=1 bash "$ROOT/scripts/setup.sh"
VENV=${SYMFO_VENV:-$ROOT/.venv}
cd "$ROOT"

echo "== ruff"
"$VENV/bin/ruff" check symfo_failover tests tools benchmarks
echo "== mypy --strict (package)"
"$VENV/bin/mypy"

# The container tier needs a Docker engine and a PostgreSQL image, which cannot be
# pulled here: start an engine if none runs and build the image offline (once).
if [ "${SYMFO_CONTAINERS:-1}" != "0" ]; then
  echo "== docker engine and image for the container tier"
  if bash scripts/docker-engine.sh start && image=$(bash scripts/build-postgres-image.sh | tail -n 1); then
    export SYMFO_CONTAINER_IMAGE="$image"
    # Stops only an engine this script started, however the tests end; quietly, so that
    # pytest's summary stays the last line (its messages are shown if the stop fails).
    stop_log=$(mktemp)
    trap 'bash "$ROOT/scripts/docker-engine.sh" stop >"$stop_log" 2>&1 || cat "$stop_log" >&2; rm -f "$stop_log"' EXIT
  elif [ "${CI:-}" = "true" ]; then
    echo "CI: the container tier could not be set up (see above)" >&2
    exit 1
  else
    echo "(the container tests will be skipped; see the messages above)" >&2
  fi
fi

echo "== pytest"
status=0
"$VENV/bin/pytest" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
