#!/usr/bin/env bash
# The main job: drill a local two-node cluster through every scenario of the vendor
# guide, with psycopg and pyodbc, through a ResilientConnection and a FailoverPool, and
# check that no acknowledged write was lost or doubled. Exit status 0 only if every
# invariant held. Arguments go to `symfo-failover drill` (e.g. --quick, --rounds 3,
# --html drill.html, --json).
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${SYMFO_VENV:-$ROOT/.venv}
exec "$VENV/bin/symfo-failover" drill "$@"
