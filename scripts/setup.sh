#!/usr/bin/env bash
# Prepare this machine for symfo_failover: system packages, the ja_JP.UTF-8 locale,
# and a virtual environment with the package and its test tools. Idempotent; sourced
# or run by scripts/test.sh and scripts/main.sh. SYMFO_SETUP_TESTS=1 (set by
# scripts/test.sh) adds what only the tests need: Chromium.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${SYMFO_VENV:-$ROOT/.venv}
PYTHON=${PYTHON:-python3}

say() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: %s\n' "$*" >&2; exit 1; }

have_pg_server() {
  [ -n "${SYMFO_PG_BINDIR:-}" ] && [ -x "$SYMFO_PG_BINDIR/postgres" ] && return 0
  command -v postgres >/dev/null 2>&1 && return 0
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/postgres" ]; then return 0; fi
  compgen -G '/usr/lib/postgresql/*/bin/postgres' >/dev/null
}
have_psqlodbc() { command -v odbcinst >/dev/null 2>&1 && odbcinst -q -d 2>/dev/null | grep -q '^\[PostgreSQL Unicode\]'; }
have_ja_locale() { locale -a 2>/dev/null | grep -qiE '^ja_JP\.utf-?8$'; }
have_venv() { "$PYTHON" -c 'import venv, ensurepip' >/dev/null 2>&1; }
# The kernel partition tests need iptables, and root to use it.
need_iptables() { [ "$(id -u)" -eq 0 ] && ! command -v iptables >/dev/null 2>&1; }
# The HTML report's test (tests/test_html_browser.py) renders it in headless Chromium
# (or in the browser SYMFO_CHROMIUM names).
have_chromium() {
  [ -n "${SYMFO_CHROMIUM:-}" ] && [ -x "$SYMFO_CHROMIUM" ] && return 0
  command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1
}

# --- Python itself
command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON found: install Python 3.10 or newer (Debian: apt-get install python3 python3-venv)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' \
  || die "$("$PYTHON" -V 2>&1) is too old: symfo_failover needs Python 3.10 or newer (set PYTHON=/path/to/python3.x)"

# --- system packages
packages=()
have_pg_server || packages+=(postgresql)
have_psqlodbc || packages+=(unixodbc odbc-postgresql)
have_ja_locale || packages+=(locales)
have_venv || packages+=(python3-venv)
need_iptables && packages+=(iptables)
[ "${SYMFO_SETUP_TESTS:-0}" = "1" ] && ! have_chromium && packages+=(chromium)

if [ ${#packages[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    die "missing system packages and this is not Debian/Ubuntu. Install the equivalents of: ${packages[*]}
       (a PostgreSQL server, unixODBC with the psqlODBC driver registered as 'PostgreSQL Unicode',
       the ja_JP.UTF-8 locale, Chromium for the HTML report's test), or point SYMFO_PG_BINDIR
       at PostgreSQL's bin directory, then run again."
  fi
  SUDO=()
  if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
      SUDO=(sudo -n)
    else
      die "missing system packages: ${packages[*]}. Run as root (or with passwordless sudo), or install them yourself:
       sudo apt-get update && sudo apt-get install -y ${packages[*]}
       sudo sed -i 's/^# *ja_JP.UTF-8 UTF-8/ja_JP.UTF-8 UTF-8/' /etc/locale.gen && sudo locale-gen"
    fi
  fi
  say "installing system packages: ${packages[*]}"
  # Do not let the postgresql package create and start a default cluster: the
  # tests run their own throwaway servers.
  if [[ " ${packages[*]} " == *" postgresql "* ]] && [ ! -e /etc/postgresql-common/createcluster.conf ]; then
    "${SUDO[@]}" mkdir -p /etc/postgresql-common
    echo "create_main_cluster = false" | "${SUDO[@]}" tee /etc/postgresql-common/createcluster.conf >/dev/null
  fi
  export DEBIAN_FRONTEND=noninteractive
  "${SUDO[@]}" apt-get update -qq
  "${SUDO[@]}" apt-get install -y -qq -o Dpkg::Options::=--force-confold "${packages[@]}" >/dev/null
fi

if ! have_ja_locale; then
  if [ "$(id -u)" -eq 0 ] || { command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; }; then
    S=(); [ "$(id -u)" -eq 0 ] || S=(sudo -n)
    say "generating the ja_JP.UTF-8 locale (for tests against a Japanese-speaking server)"
    "${S[@]}" sed -i 's/^# *ja_JP.UTF-8 UTF-8/ja_JP.UTF-8 UTF-8/' /etc/locale.gen
    grep -q '^ja_JP.UTF-8 UTF-8' /etc/locale.gen || echo 'ja_JP.UTF-8 UTF-8' | "${S[@]}" tee -a /etc/locale.gen >/dev/null
    "${S[@]}" locale-gen >/dev/null
  else
    say "the ja_JP.UTF-8 locale is missing; the Japanese-server tests will be skipped (generate it with locale-gen as root)"
  fi
fi

# --- the virtual environment
if [ ! -x "$VENV/bin/python" ]; then
  say "creating the virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.symfo-installed"
want=$(cat "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  say "installing symfo-failover and its test tools into $VENV"
  log="$VENV/pip-install.log"
  if ! { "$VENV/bin/python" -m pip install --disable-pip-version-check -U pip \
         && "$VENV/bin/python" -m pip install --disable-pip-version-check -e "$ROOT[dev]"; } >"$log" 2>&1; then
    tail -n 30 "$log" >&2
    die "installing the Python packages failed (whole log: $log)"
  fi
  echo "$want" >"$stamp"
fi
