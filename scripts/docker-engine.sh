#!/usr/bin/env bash
# A Docker engine for the container tier of the harness.
#
# Usage: scripts/docker-engine.sh start|stop|status
#
#   start   install docker.io if dockerd is missing (apt-get, as root), and if no engine
#           answers `docker info`, start dockerd in the background (no bridge, no
#           iptables: the harness runs its containers with host networking) and wait
#           until it answers. An engine that already answers is used as it is.
#   stop    stop the dockerd that `start` started (only that one, by its pid file) and
#           wait for it to exit. An engine this script did not start is left alone.
#   status  say whether an engine answers and whether this script started it.
#
# All three are idempotent. State (pid file, log) goes to $SYMFO_DOCKERD_STATE,
# default /run/symfo-dockerd (root) or $ROOT/.state/dockerd.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "$(id -u)" -eq 0 ]; then
  STATE=${SYMFO_DOCKERD_STATE:-/run/symfo-dockerd}
else
  STATE=${SYMFO_DOCKERD_STATE:-$ROOT/.state/dockerd}
fi
PIDFILE=$STATE/dockerd.pid
LOG=$STATE/dockerd.log
START_TIMEOUT=${SYMFO_DOCKERD_START_TIMEOUT:-60}
STOP_TIMEOUT=${SYMFO_DOCKERD_STOP_TIMEOUT:-60}

say() { printf 'docker-engine: %s\n' "$*" >&2; }
die() { printf 'docker-engine: %s\n' "$*" >&2; exit 1; }

engine_answers() { command -v docker >/dev/null 2>&1 && timeout 10 docker info >/dev/null 2>&1; }

# The pid in our pid file, if that process is still a dockerd; else nothing.
our_pid() {
  [ -f "$PIDFILE" ] || return 1
  local pid
  pid=$(cat "$PIDFILE" 2>/dev/null || true)
  [[ "$pid" =~ ^[0-9]+$ ]] || return 1
  [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = dockerd ] || return 1
  printf '%s\n' "$pid"
}

need_root() {
  [ "$(id -u)" -eq 0 ] || die "$1 needs root (run this script as root or with sudo), or start a Docker engine yourself (docker info must answer)"
}

install_engine() {
  command -v dockerd >/dev/null 2>&1 && command -v docker >/dev/null 2>&1 && return 0
  need_root "installing docker.io"
  command -v apt-get >/dev/null 2>&1 \
    || die "dockerd is missing and this is not Debian/Ubuntu: install a Docker engine, then run again"
  say "installing docker.io (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  # The package must not start its own service: the engine is started below, with the
  # options this harness needs, and `stop` must know it. policy-rc.d says "not now".
  local policy=/usr/sbin/policy-rc.d added=
  if [ ! -e "$policy" ]; then
    printf '#!/bin/sh\nexit 101\n' >"$policy" && chmod 0755 "$policy" && added=1
  fi
  local status=0
  if ! apt-get install -y -qq docker.io >/dev/null 2>&1; then
    apt-get update -qq && apt-get install -y -qq docker.io >/dev/null || status=$?
  fi
  [ -z "$added" ] || rm -f "$policy"
  [ "$status" -eq 0 ] || die "apt-get install docker.io failed (status $status)"
  command -v dockerd >/dev/null 2>&1 || die "docker.io was installed but dockerd is still not on PATH"
}

start() {
  if engine_answers; then
    if pid=$(our_pid); then
      say "the engine answers (started by this script, pid $pid)"
    else
      say "an engine already answers; using it (not started by this script)"
    fi
    return 0
  fi
  install_engine
  if engine_answers; then
    say "an engine answers now; using it"
    return 0
  fi
  need_root "starting dockerd"
  mkdir -p "$STATE"
  if pid=$(our_pid); then
    # Ours, alive, yet not answering: still starting, or wedged. Wait for it below.
    say "dockerd (pid $pid) started earlier does not answer yet; waiting"
  else
    rm -f "$PIDFILE"
    local args=(--bridge=none --iptables=false)
    # --ip6tables exists from Docker 20.10 on; older engines refuse unknown flags.
    if dockerd --help 2>&1 | grep -q -- '--ip6tables'; then
      args+=(--ip6tables=false)
    fi
    say "starting dockerd ${args[*]} (log: $LOG)"
    : >"$LOG"
    # setsid: its own session, so that neither the caller's ^C nor a job runner's
    # process-group kill takes the engine down half-way through a run.
    setsid dockerd "${args[@]}" </dev/null >>"$LOG" 2>&1 &
    pid=$!
    echo "$pid" >"$PIDFILE"
  fi
  local deadline=$((SECONDS + START_TIMEOUT))
  until engine_answers; do
    if ! kill -0 "$pid" 2>/dev/null; then
      rm -f "$PIDFILE"
      die "dockerd exited during start; the end of $LOG:
$(tail -n 30 "$LOG" 2>/dev/null)"
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "dockerd (pid $pid) did not answer within ${START_TIMEOUT}s; it is left running (stop: $0 stop); the end of $LOG:
$(tail -n 30 "$LOG" 2>/dev/null)"
    fi
    sleep 0.2
  done
  say "the engine answers (dockerd pid $pid)"
}

stop() {
  local pid
  if ! pid=$(our_pid); then
    if [ -f "$PIDFILE" ]; then
      say "the dockerd this script started is gone; removing the stale pid file"
      rm -f "$PIDFILE"
    elif engine_answers; then
      say "an engine answers but this script did not start it: left alone"
    else
      say "no dockerd started by this script"
    fi
    return 0
  fi
  say "stopping dockerd (pid $pid)"
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while [ -d "/proc/$pid" ] && [ "$(cat "/proc/$pid/comm" 2>/dev/null || true)" = dockerd ]; do
    if [ "$SECONDS" -ge "$deadline" ]; then
      die "dockerd (pid $pid) did not exit within ${STOP_TIMEOUT}s after SIGTERM; the end of $LOG:
$(tail -n 20 "$LOG" 2>/dev/null)"
    fi
    sleep 0.2
  done
  rm -f "$PIDFILE"
  say "dockerd stopped"
}

status() {
  local answers=no ours=no pid=
  engine_answers && answers=yes
  if pid=$(our_pid); then ours="yes (pid $pid)"; fi
  printf 'engine answers: %s\nstarted by this script: %s\nstate dir: %s\n' "$answers" "$ours" "$STATE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) die "usage: $0 start|stop|status" ;;
esac
