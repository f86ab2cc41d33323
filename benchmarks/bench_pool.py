"""`FailoverPool` next to psycopg_pool's own ``ConnectionPool``, side by side in one run.

Run: .venv/bin/python benchmarks/bench_pool.py [--only switchover|steady] [--rounds N]
         [--switchover-rounds N] [--requests N] [--ops N] [--tmpdir DIR]

Three kinds of pool take turns in every part: ``FailoverPool``, plain ``ConnectionPool``
and ``ConnectionPool(check=ConnectionPool.check_connection)`` (psycopg_pool's own answer
to dead idle connections: a round trip before each checkout).

- switchover: one `LocalCluster`; each round, each kind in turn (the order rotates from
  round to round) opens a full idle pool of 20 (min_size = max_size = 20), the cluster
  switches over (every idle connection is closed by the old server), and as soon as
  ``switchover()`` returns (the new node accepts) the benchmark issues sequential
  requests ``with pool.connection() as c: c.execute("select 1")``: an exception is a
  failed request, a request that took more than 10 ms waited. Then "full": the time
  from ``Transition.accepting_at`` until 20 ``getconn()`` held at once all succeed and
  each session's ``pg_postmaster_start_time()`` is the new server's (a probe that
  finds an old or dead connection gives everything back and tries again 5 ms later;
  a plain pool needs such uses to replace its dead connections at all). For
  ``FailoverPool`` also its own ``failover_stats().last_refill_seconds`` (from
  noticing the failover, at the first request, to a full pool).
  Targets: no failed request; the pool full within 1 s of the server accepting.
- steady: one `LocalServer`, single thread, pools of 4; every variant runs one
  checkout in turn, in a fresh random order (``bench_resilient``'s method), warm-up
  round not recorded; medians per checkout, ratios against the plain pool.
  Target: ``FailoverPool`` at most x1.03 the plain pool, and below check=check_connection.
  Informational: ``pool.run(lambda c: c.execute("SELECT 1").fetchone())`` next to the
  same transaction by hand, ``with pool.connection() as c: with c.transaction(): ...``.

The figures are a report, not an assertion: PASS/MISS only compares them to the targets.
The harness puts data directories on /dev/shm (tmpfs) unless TMPDIR is set
(``--tmpdir /var/tmp`` puts them on a disk).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
from psycopg_pool import ConnectionPool, PoolTimeout

import symfo_failover as sf
from symfo_failover.harness import LocalCluster, LocalServer

# bench_resilient's helpers (quiet events, file system, verdict, quantile), loaded from
# beside this file whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
br: Any = importlib.import_module("bench_resilient")

KINDS = ("failover", "plain", "check")
KIND_NAMES = {
    "failover": "FailoverPool",
    "plain": "ConnectionPool",
    "check": "ConnectionPool(check=check_connection)",
}
WAITED = 0.010  # a request that took longer than this waited
FULL_TARGET = 1.0  # seconds from accepting to a full pool
STEADY_TARGET = 0.03  # FailoverPool at most x1.03 the plain pool
START_TIME = "SELECT pg_postmaster_start_time()::text"


def _make_pool(kind: str, conninfo: str, size: int) -> ConnectionPool[Any]:
    common: dict[str, Any] = {"min_size": size, "max_size": size, "open": False}
    if kind == "failover":
        return sf.FailoverPool(conninfo, **common)
    if kind == "check":
        return ConnectionPool(conninfo, check=ConnectionPool.check_connection, **common)
    return ConnectionPool(conninfo, **common)


def _server_started(conninfo: str) -> str:
    with psycopg.connect(conninfo, autocommit=True) as c:
        row = c.execute(START_TIME).fetchone()
    assert row is not None
    return str(row[0])


# --- switchover: a full idle pool of 20 -------------------------------------------------


@dataclass
class _Outcome:
    kind: str
    failed: int = 0
    waited: int = 0
    slowest: float = 0.0  # the longest request, seconds
    full: float | None = None  # seconds from accepting_at to the probe's success
    refill: float | None = None  # FailoverPool's last_refill_seconds
    wait_ms: int = 0  # psycopg_pool's requests_wait_ms
    errors: list[str] = field(default_factory=list)
    extra: str = ""


def _probe_full(pool: ConnectionPool[Any], size: int, started: str,
                deadline: float) -> float | None:
    """When ``size`` connections held at once are all live to the server ``started``."""
    while time.monotonic() < deadline:
        held: list[Any] = []
        ok = True
        try:
            for _ in range(size):
                held.append(pool.getconn(timeout=max(0.01, deadline - time.monotonic())))
            for conn in held:
                try:
                    row = conn.execute(START_TIME).fetchone()
                except psycopg.Error:
                    ok = False
                    continue
                if row is None or str(row[0]) != started:
                    ok = False
            at = time.monotonic()
        except PoolTimeout:
            ok = False
        finally:
            for conn in held:
                pool.putconn(conn)
        if ok:
            return at
        time.sleep(0.005)
    return None


def _switchover_round(cl: LocalCluster, kind: str, size: int, requests: int,
                      request_timeout: float, full_timeout: float) -> _Outcome:
    out = _Outcome(kind)
    with _make_pool(kind, cl.conninfo(), size) as pool:
        pool.wait(timeout=30)
        before = _server_started(cl.conninfo())
        pool.pop_stats()
        tr = cl.switchover()
        assert tr.accepting_at is not None
        for i in range(requests):
            t = time.monotonic()
            try:
                with pool.connection(timeout=request_timeout) as c:
                    c.execute("select 1")
            except Exception as exc:  # a failed request: kept with when and what
                out.failed += 1
                out.errors.append(f"request {i}, {(t - tr.accepting_at) * 1e3:.1f} ms "
                                  f"after accepting: {type(exc).__name__}: "
                                  f"{str(exc).strip().splitlines()[0] if str(exc) else ''}")
            took = time.monotonic() - t
            out.slowest = max(out.slowest, took)
            if took > WAITED:
                out.waited += 1
        out.wait_ms = pool.get_stats().get("requests_wait_ms", 0)
        after = _server_started(cl.conninfo())
        assert after != before, "the switchover did not change the server"
        at = _probe_full(pool, size, after, tr.accepting_at + full_timeout)
        out.full = None if at is None else at - tr.accepting_at
        if isinstance(pool, sf.FailoverPool):
            st = pool.failover_stats()
            out.refill = st.last_refill_seconds
            out.extra = (f"failovers {st.failovers}, replaced {st.connections_replaced}, "
                         f"met dead {st.requests_met_dead}")
    return out


def _ms(seconds: float | None) -> str:
    return "never" if seconds is None else f"{seconds * 1e3:.0f} ms"


def switchover(rounds: int, size: int, requests: int, request_timeout: float,
               full_timeout: float) -> bool:
    print(f"switchover: {rounds} rounds x {len(KINDS)} kinds (order rotating), a full idle "
          f"pool of {size}, {requests} sequential requests right after the new node accepts "
          f"(each with timeout={request_timeout:g} s; full: given up {full_timeout:g} s "
          f"after accepting)")
    results: dict[str, list[_Outcome]] = {k: [] for k in KINDS}
    with LocalCluster() as cl:
        cl.start()
        for r in range(rounds):
            order = KINDS[r % len(KINDS):] + KINDS[:r % len(KINDS)]
            for kind in order:
                results[kind].append(_switchover_round(cl, kind, size, requests,
                                                       request_timeout, full_timeout))
    print(f"  {'pool':40} {'failed med/total':>16} {'waited>10ms med/total':>21} "
          f"{'slowest':>8} {'full after accepting med/max':>28}")
    all_ok = True
    for kind in KINDS:
        outs = results[kind]
        failed = [o.failed for o in outs]
        waited = [o.waited for o in outs]
        fulls = [o.full for o in outs]
        known = [f for f in fulls if f is not None]
        full_med = statistics.median(known) if len(known) == len(fulls) else None
        full_max = max(known) if len(known) == len(fulls) else None
        print(f"  {KIND_NAMES[kind]:40} {statistics.median(failed):7g} / {sum(failed):<6}  "
              f"{statistics.median(waited):10g} / {sum(waited):<8}  "
              f"{max(o.slowest for o in outs) * 1e3:5.0f} ms "
              f"{_ms(full_med):>13} / {_ms(full_max):<12}")
        if kind == "failover":
            refills = [o.refill for o in outs if o.refill is not None]
            if refills:
                print(f"  {'':40} own last_refill_seconds: median "
                      f"{statistics.median(refills) * 1e3:.0f} ms, max {max(refills) * 1e3:.0f} "
                      f"ms ({len(refills)}/{len(outs)} rounds)")
            ok_failed = sum(failed) == 0
            ok_full = full_max is not None and full_max <= FULL_TARGET
            print(f"  {'':40} targets: no failed request {br._verdict(ok_failed)}; full "
                  f"within {FULL_TARGET:g} s of accepting {br._verdict(ok_full)}")
            all_ok = ok_failed and ok_full
        print(f"  {'':40} psycopg_pool requests_wait_ms per round: "
              f"{', '.join(str(o.wait_ms) for o in outs)}")
    for kind in KINDS:
        for r, o in enumerate(results[kind]):
            if o.extra:
                print(f"  round {r} {KIND_NAMES[kind]}: {o.extra}")
            shown = o.errors if kind == "failover" else o.errors[:1]
            for e in shown:
                more = f" (+{len(o.errors) - 1} more)" if kind != "failover" and \
                    len(o.errors) > 1 else ""
                print(f"  round {r} {KIND_NAMES[kind]} failed: {e}{more}")
    return all_ok


# --- steady state: checkout and return ----------------------------------------------------


def _select(pool: ConnectionPool[Any]) -> Callable[[], None]:
    def op() -> None:
        with pool.connection() as c:
            c.execute("SELECT 1")
    return op


def _by_hand(pool: ConnectionPool[Any]) -> Callable[[], None]:
    def op() -> None:
        with pool.connection() as c, c.transaction():
            c.execute("SELECT 1").fetchone()
    return op


def _run(pool: Any) -> Callable[[], None]:
    def op() -> None:
        pool.run(lambda c: c.execute("SELECT 1").fetchone())
    return op


def steady(rounds: int, ops: int, size: int) -> bool:
    with LocalServer() as srv:
        srv.start()
        conninfo = srv.conninfo()
        where = str(srv.data_dir.parent.parent)
        print(f"steady: {rounds} rounds x {ops} checkouts per variant, one of each in turn "
              f"in a random order, single thread, pools of {size}, data on "
              f"{br._filesystem(where)}")
        with _make_pool("failover", conninfo, size) as fp, \
                _make_pool("plain", conninfo, size) as pp, \
                _make_pool("check", conninfo, size) as cp:
            for p in (fp, pp, cp):
                p.wait(timeout=30)
            variants: dict[str, Callable[[], None]] = {
                "plain": _select(pp),
                "check": _select(cp),
                "failover": _select(fp),
                "plain, transaction by hand": _by_hand(pp),
                "failover, transaction by hand": _by_hand(fp),
                "failover, run()": _run(fp),
            }
            times, per_round = _interleave(variants, rounds, ops)
    med = {k: statistics.median(v) for k, v in times.items()}

    def ratio_line(name: str, what: str, base: str, target: str = "") -> None:
        ratios = [r[name] / r[base] for r in per_round]
        print(f"  {what:52} {med[name] * 1e6:7.1f} us  x{med[name] / med[base]:.3f}  "
              f"{min(ratios):.3f}-{max(ratios):.3f}  {target}")

    print(f"  {'checkout + SELECT 1 + return':52} {'median':>10}  {'ratio':6}  "
          f"{'rounds':11}  target")
    print(f"  {'ConnectionPool (plain)':52} {med['plain'] * 1e6:7.1f} us  x1.000")
    ok_fp = med["failover"] <= (1 + STEADY_TARGET) * med["plain"]
    ok_below = med["failover"] < med["check"]
    ratio_line("check", "ConnectionPool(check=check_connection) / plain", "plain")
    ratio_line("failover", "FailoverPool / plain", "plain",
               f"<= x{1 + STEADY_TARGET:.2f} {br._verdict(ok_fp)}; below check "
               f"{br._verdict(ok_below)}")
    print("  informational, one transaction around SELECT 1:")
    ratio_line("plain, transaction by hand", "ConnectionPool, connection() + transaction()",
               "plain")
    ratio_line("failover, transaction by hand", "FailoverPool, connection() + transaction()",
               "plain, transaction by hand")
    ratio_line("failover, run()", "FailoverPool.run() / FailoverPool by hand",
               "failover, transaction by hand")
    print("  (ratios of medians over all rounds; rounds: min-max of per-round median "
          "ratios; the last two against the line above them, the one before against "
          "plain SELECT 1)")
    return ok_fp and ok_below


def _interleave(variants: dict[str, Callable[[], None]], rounds: int,
                ops: int, seed: int = 5) -> tuple[dict[str, list[float]],
                                                   list[dict[str, float]]]:
    """Every variant runs once in turn, in a fresh random order each time."""
    shuffle = random.Random(seed).shuffle
    order = list(variants.items())
    clock = time.perf_counter
    times: dict[str, list[float]] = {k: [] for k in variants}
    per_round: list[dict[str, float]] = []
    for r in range(-1, rounds):  # round -1: warm-up, not recorded
        got: dict[str, list[float]] = {k: [] for k in variants}
        for _ in range(ops if r >= 0 else max(200, ops // 5)):
            shuffle(order)
            for name, op in order:
                began = clock()
                op()
                got[name].append(clock() - began)
        if r >= 0:
            for k, v in got.items():
                times[k].extend(v)
            per_round.append({k: statistics.median(v) for k, v in got.items()})
    return times, per_round


# --- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("switchover", "steady"))
    parser.add_argument("--rounds", type=int, default=10,
                        help="steady: rounds (default 10)")
    parser.add_argument("--ops", type=int, default=2000,
                        help="steady: checkouts per variant per round (default 2000)")
    parser.add_argument("--switchover-rounds", type=int, default=5,
                        help="switchover: rounds, each kind once per round (default 5)")
    parser.add_argument("--requests", type=int, default=40,
                        help="switchover: sequential requests after it (default 40)")
    parser.add_argument("--request-timeout", type=float, default=2.0,
                        help="switchover: each request's pool.connection(timeout=) (default "
                             "2; psycopg_pool's own default of 30 makes the check pool's "
                             "rounds minutes long)")
    parser.add_argument("--full-timeout", type=float, default=30.0,
                        help="switchover: give up waiting for a full pool this many seconds "
                             "after accepting (default 30)")
    parser.add_argument("--tmpdir", default=None,
                        help="where the servers' data directories go (the harness's default: "
                             "/dev/shm; e.g. /var/tmp for a disk)")
    args = parser.parse_args()
    if args.tmpdir:
        os.environ["TMPDIR"] = tempfile.tempdir = args.tmpdir
    br._quiet_events()
    # psycopg_pool logs every broken connection it meets; the table says how many.
    logging.getLogger("psycopg.pool").setLevel(logging.CRITICAL)
    print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}), psycopg_pool "
          f"{psycopg_pool.__version__}, Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    for part in ("switchover", "steady"):
        if args.only not in (None, part):
            continue
        began = time.monotonic()
        if part == "switchover":
            switchover(args.switchover_rounds, 20, args.requests, args.request_timeout,
                       args.full_timeout)
        else:
            steady(args.rounds, args.ops, 4)
        print(f"  ({part}: {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
