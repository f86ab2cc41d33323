#!/usr/bin/env bash
# Every test tier: lint, types, unit tests and the real-server tests.
# Usage: scripts/test.sh [pytest arguments]    (SYMFO_SOAK=1 adds the long soaks)
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${SYMFO_VENV:-$ROOT/.venv}
cd "$ROOT"

echo "== ruff"
"$VENV/bin/ruff" check symfo_failover tests tools benchmarks
echo "== mypy --strict (package)"
"$VENV/bin/mypy"
echo "== pytest"
status=0
"$VENV/bin/pytest" "$@" || status=$?
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: that is a failure here" >&2
  exit 1
fi
exit "$status"
