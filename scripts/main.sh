#!/usr/bin/env bash
# The main job: reproduce the vendor guide's failover error tables on a local server,
# once with the server speaking English and once speaking Japanese.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$ROOT/scripts/setup.sh"
VENV=${SYMFO_VENV:-$ROOT/.venv}
"$VENV/bin/symfo-failover" conformance "$@"
if locale -a 2>/dev/null | grep -qiE '^ja_JP\.utf-?8$'; then
  echo
  "$VENV/bin/symfo-failover" conformance --lc-messages ja_JP.UTF-8 "$@"
fi
