"""DESIGN section 5's targets for the resilient connection, measured side by side in one run.

Run: .venv/bin/python benchmarks/bench_resilient.py [--only steady|recovery|partition]
         [--rounds N] [--units N] [--driver psycopg|pyodbc|both] [--tmpdir DIR]

- steady: a unit of work (one INSERT + COMMIT) through ``run()`` next to the same
  transaction written by hand on the raw driver, and passthrough statements next to the
  raw ones, on one server with fsync on. All variants take turns, one unit each in a
  fresh random order, so that the load of a shared machine falls on both sides alike.
  Where the raw side runs on the library's own session (``rc.connection``) the two share
  one server backend: on 2 cores two sessions doing the same work can differ by x2 (the
  control line, two raw sessions, shows how much), one session cannot.
- recovery: a thread runs units continuously with the default policy while the cluster
  fails; the figure is from the access point accepting again (``Transition.accepting_at``)
  to the first unit that returned from the new server (its start time differs).
- partition: a kernel partition (iptables) cuts a session, a unit starts into it; the
  figure is from the cut to the library's ``FailureDetected`` event, with the default
  detection settings and with short ones. Needs root and iptables, else skipped.

The figures are a report, not an assertion: PASS/MISS only compares them to the targets.
The harness puts data directories on /dev/shm (tmpfs, where fsync costs nothing) unless
TMPDIR is set: ``--tmpdir /var/tmp`` puts them on a disk. The steady-state header says
which file system the server's data is on.
"""

from __future__ import annotations

import argparse
import logging
import os
import random
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import structlog

import symfo_failover as sf
from symfo_failover.harness import (
    LocalCluster,
    LocalServer,
    Partition,
    Transition,
    partition_available,
)

try:
    import pyodbc
except ImportError:  # pragma: no cover - the ODBC lines are skipped
    pyodbc = None

INSERT_PG = "INSERT INTO t(v) VALUES (%s)"
INSERT_ODBC = "INSERT INTO t(v) VALUES (?)"
DEFAULT_ROUNDS = {"steady": 10, "recovery": 20, "partition": 2}

# --- small helpers ----------------------------------------------------------------------


def _p95(values: list[float]) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def _filesystem(path: str) -> str:
    """The file system type ``path`` is on (from /proc/self/mounts), for the header."""
    best, kind = "", "unknown"
    try:
        with open("/proc/self/mounts", encoding="utf-8") as f:
            for line in f:
                parts = line.split()
                mount = parts[1]
                inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best):
                    best, kind = mount, parts[2]
    except OSError:
        pass
    return kind


def _quiet_events() -> None:
    # Every event is also a structlog line; a recovery run makes hundreds. Keep errors.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.ERROR))


def _insert_pg(raw: Any, i: int) -> None:
    raw.execute(INSERT_PG, (i,))


def _insert_odbc(raw: Any, i: int) -> None:
    raw.execute(INSERT_ODBC, i)


# --- steady state -----------------------------------------------------------------------


@dataclass
class _Pair:
    """One comparison: the raw driver's way and the library's way of the same work."""

    name: str
    raw: Callable[[int], object]
    lib: Callable[[int], object]
    target: float | None  # the most the library may add (0.10 = 10%), None: no target
    times: dict[str, list[float]] = field(default_factory=lambda: {"raw": [], "lib": []})
    round_ratios: list[float] = field(default_factory=list)


def _interleave(pairs: list[_Pair], rounds: int, units: int, seed: int = 5) -> None:
    """Every variant runs one unit in turn, in a fresh random order each time, so that
    each raw unit has its library twin next to it in time and no variant always follows
    the same one (on 2 cores what ran just before changes a round trip's time)."""
    shuffle = random.Random(seed).shuffle
    ops = [(pair, side) for pair in pairs for side in ("raw", "lib")]
    clock = time.perf_counter
    i = 0
    for r in range(-1, rounds):  # round -1 is not recorded: caches, prepared statements
        got: dict[tuple[str, str], list[float]] = {(p.name, side): [] for p, side in ops}
        for _ in range(units if r >= 0 else max(20, units // 10)):
            i += 1
            shuffle(ops)
            for pair, side in ops:
                op = pair.raw if side == "raw" else pair.lib
                began = clock()
                op(i)
                got[pair.name, side].append(clock() - began)
        if r >= 0:
            record_round(pairs, got)


def record_round(pairs: list[_Pair], got: dict[tuple[str, str], list[float]]) -> None:
    """Keep one round's timings (``got[name, side]``) and its median ratio per pair."""
    for pair in pairs:
        for side in ("raw", "lib"):
            pair.times[side].extend(got[pair.name, side])
        pair.round_ratios.append(
            statistics.median(got[pair.name, "lib"]) / statistics.median(got[pair.name, "raw"])
        )


def _q(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[round(q * (len(values) - 1))]


def _print_steady(pairs: list[_Pair]) -> None:
    print(f"  {'case':44} {'raw med':>9} {'lib med':>9} {'ratio':>6}  {'p10 ratio':>9}  "
          f"{'mean ratio':>10}  {'rounds':>9}   target")
    for p in pairs:
        raw, lib = p.times["raw"], p.times["lib"]
        med_raw, med_lib = statistics.median(raw), statistics.median(lib)
        r_med = med_lib / med_raw
        r_p10 = _q(lib, 0.10) / _q(raw, 0.10)
        r_mean = statistics.fmean(lib) / statistics.fmean(raw)
        spread = f"{min(p.round_ratios):.2f}-{max(p.round_ratios):.2f}"
        if p.target is None:
            target = "(none)"
        else:
            target = f"<= x{1 + p.target:.2f} {_verdict(r_med <= 1 + p.target)}"
        print(f"  {p.name:44} {med_raw * 1e6:6.1f} us {med_lib * 1e6:6.1f} us x{r_med:.3f}"
              f"  x{r_p10:8.3f}  x{r_mean:9.3f}  {spread:>9}   {target}")


def _psycopg_pairs(conninfo: str, closers: list[Callable[[], object]]) -> list[_Pair]:
    raw_tx = psycopg.connect(conninfo)  # a hand-written transaction: autocommit off
    raw_a = psycopg.connect(conninfo, autocommit=True)
    raw_b = psycopg.connect(conninfo, autocommit=True)
    rc_tx = sf.connect(conninfo)
    rc_same = sf.connect(conninfo)
    rc_ac = sf.connect(conninfo, autocommit=True)
    closers += [raw_tx.close, raw_a.close, raw_b.close, rc_tx.close, rc_same.close, rc_ac.close]
    pg_ac = rc_ac.connection  # the library's own session, used raw

    def raw_unit(i: int) -> None:
        raw_tx.execute(INSERT_PG, (i,))
        raw_tx.commit()

    def raw_unit_same(i: int) -> None:
        # By hand on the session run() uses (run() switches autocommit back itself).
        conn = rc_same.connection
        conn.autocommit = False
        conn.execute(INSERT_PG, (i,))
        conn.commit()

    return [
        _Pair("psycopg unit INSERT+COMMIT, raw own session", raw_unit,
              lambda i: rc_tx.run(_insert_pg, i), 0.10),
        _Pair("psycopg unit INSERT+COMMIT, same session", raw_unit_same,
              lambda i: rc_same.run(_insert_pg, i), 0.10),
        _Pair("psycopg passthrough SELECT 1", lambda i: pg_ac.execute("SELECT 1"),
              lambda i: rc_ac.execute("SELECT 1"), 0.03),
        _Pair("psycopg passthrough INSERT, autocommit", lambda i: pg_ac.execute(INSERT_PG, (i,)),
              lambda i: rc_ac.execute(INSERT_PG, (i,)), 0.03),
        _Pair("control: SELECT 1, two raw sessions", lambda i: raw_a.execute("SELECT 1"),
              lambda i: raw_b.execute("SELECT 1"), None),
    ]


def _pyodbc_pairs(odbc: str, closers: list[Callable[[], object]]) -> list[_Pair]:
    o_tx = pyodbc.connect(odbc, autocommit=False)
    orc_tx = sf.connect(odbc, driver="pyodbc")
    orc_ac = sf.connect(odbc, driver="pyodbc", autocommit=True)
    closers += [o_tx.close, orc_tx.close, orc_ac.close]
    o_ac = orc_ac.connection

    def raw_unit(i: int) -> None:
        o_tx.execute(INSERT_ODBC, i)
        o_tx.commit()

    return [
        _Pair("pyodbc unit INSERT+COMMIT, raw own session", raw_unit,
              lambda i: orc_tx.run(_insert_odbc, i), None),
        _Pair("pyodbc passthrough SELECT 1", lambda i: o_ac.execute("SELECT 1"),
              lambda i: orc_ac.execute("SELECT 1"), None),
    ]


def steady(rounds: int, units: int, drivers: list[str]) -> None:
    with LocalServer(settings={"fsync": "on"}) as srv:
        srv.start()
        conninfo = srv.conninfo()
        with psycopg.connect(conninfo, autocommit=True) as admin:
            admin.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v int)")
            fsync = admin.execute("SHOW fsync").fetchone()
            sync = admin.execute("SHOW synchronous_commit").fetchone()
        closers: list[Callable[[], object]] = []
        pairs: list[_Pair] = []
        try:
            if "psycopg" in drivers:
                pairs += _psycopg_pairs(conninfo, closers)
            if "pyodbc" in drivers:
                pairs += _pyodbc_pairs(srv.odbc_connection_string(), closers)
            where = str(srv.data_dir.parent.parent)
            print(f"steady state: {rounds} rounds x {units} units per variant, one unit of "
                  f"each in turn, in a random order")
            print(f"  fsync={fsync[0] if fsync else '?'}, synchronous_commit="
                  f"{sync[0] if sync else '?'}, data on {_filesystem(where)} ({where})")
            began = time.monotonic()
            _interleave(pairs, rounds, units)
            _print_steady(pairs)
            print(f"  (per unit, all rounds pooled; rounds: min-max of the per-round median "
                  f"ratios; {time.monotonic() - began:.0f} s)")
        finally:
            for close in closers:
                close()


# --- recovery ---------------------------------------------------------------------------


class _Worker(threading.Thread):
    """Runs units back to back; notes when each returned and from which server."""

    def __init__(self, rc: sf.ResilientConnection, unit: Callable[[Any, int], None]) -> None:
        super().__init__(daemon=True)
        self.rc = rc
        self.unit = unit
        self.done: list[tuple[float, str]] = []  # (time.monotonic(), server start time)
        self.errors: list[BaseException] = []
        self.halt = threading.Event()

    def run(self) -> None:
        i = 0
        while not self.halt.is_set():
            i += 1
            try:
                self.rc.run(self.unit, i)
            except Exception as exc:  # e.g. CommitOutcomeUnknown: noted, the loop goes on
                self.errors.append(exc)
                continue
            info = self.rc.session
            self.done.append((time.monotonic(), info.server_started if info else "?"))


def _wait_for(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.002)


def _recovery_round(worker: _Worker, fault: Callable[[], Transition]) -> float:
    """Seconds from accepting again to the first unit that returned from the new server."""
    n0 = len(worker.done)
    _wait_for(lambda: len(worker.done) >= n0 + 5, 30, "units before the fault")
    mark = len(worker.done)
    before = worker.done[mark - 1][1]
    t = fault()
    assert t.accepting_at is not None

    def first_new() -> float | None:
        for at, server in worker.done[mark:]:
            if server != before:
                return at
        return None

    _wait_for(lambda: first_new() is not None, 60, "the first unit after the fault")
    at = first_new()
    assert at is not None
    return at - t.accepting_at


def recovery(rounds: int, drivers: list[str]) -> None:
    median_target, p95_target = 0.100, 0.300
    print(f"recovery: first unit after the server accepts again, default RetryPolicy(), "
          f"{rounds} rounds each (targets: median <= {median_target * 1e3:.0f} ms, "
          f"p95 <= {p95_target * 1e3:.0f} ms)")
    print(f"  {'driver':8} {'scenario':30} {'median':>9} {'p95':>9} {'max':>9}   target  "
          f"units that raised")
    with LocalCluster() as cluster:
        cluster.start()
        with psycopg.connect(cluster.conninfo(), autocommit=True) as admin:
            admin.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v int)")

        def down_then_start() -> Transition:
            cluster.node_down()
            time.sleep(random.uniform(0.2, 1.0))
            return cluster.start()

        scenarios: list[tuple[str, Callable[[], Transition]]] = [
            ("node_down, 0.2-1.0 s, start", down_then_start),
            ("switchover", cluster.switchover),
            ("failover (no delays)", cluster.failover),
        ]
        for driver in drivers:
            if driver == "psycopg":
                rc = sf.connect(cluster.conninfo())
                unit: Callable[[Any, int], None] = _insert_pg
            else:
                rc = sf.connect(cluster.odbc_connection_string(), driver="pyodbc")
                unit = _insert_odbc
            worker = _Worker(rc, unit)
            worker.start()
            try:
                for name, fault in scenarios:
                    raised = len(worker.errors)
                    got = [_recovery_round(worker, fault) for _ in range(rounds)]
                    med, p95 = statistics.median(got), _p95(got)
                    ok = med <= median_target and p95 <= p95_target
                    print(f"  {driver:8} {name:30} {med * 1e3:6.1f} ms {p95 * 1e3:6.1f} ms "
                          f"{max(got) * 1e3:6.1f} ms   {_verdict(ok)}    "
                          f"{len(worker.errors) - raised}")
            finally:
                worker.halt.set()
                worker.join(90)
                if worker.is_alive():
                    print(f"  {driver}: the worker did not stop; its connection is left open")
                else:
                    rc.close()
            for kind in sorted({type(e).__name__ for e in worker.errors}):
                first = next(e for e in worker.errors if type(e).__name__ == kind)
                print(f"  {driver}: {kind}, e.g. {first}")


# --- partition --------------------------------------------------------------------------


@dataclass
class _Cut:
    declared_lost: float | None  # seconds from the cut to FailureDetected
    finished: float | None  # seconds from the heal to run() returning its result


def _partition_round(srv: LocalServer, driver: str, extra: dict[str, str]) -> _Cut:
    """One session, one unit started into the partition; heal at once once it is lost."""
    detected: list[float] = []
    noticed = threading.Event()

    def on_event(event: sf.Event) -> None:
        if isinstance(event, sf.FailureDetected) and not noticed.is_set():
            detected.append(time.monotonic())
            noticed.set()

    if driver == "psycopg":
        rc = sf.connect(srv.conninfo(), on_event=on_event, **extra)
    else:
        rc = sf.connect(srv.odbc_connection_string(**extra), driver="pyodbc", on_event=on_event)
    results: list[object] = []
    returned: list[float] = []

    def unit() -> None:
        try:
            results.append(rc.run(lambda raw: raw.execute("SELECT pg_sleep(0.5)").fetchone()))
        except Exception as exc:
            results.append(exc)
        returned.append(time.monotonic())

    worker = threading.Thread(target=unit, daemon=True)
    partition = Partition(srv.host, srv.port)
    healed_at = cut_at = 0.0
    try:
        rc.run(lambda raw: raw.execute("SELECT 1").fetchone())  # the session is up and idle
        try:
            partition.start()
            cut_at = time.monotonic()
            worker.start()
            noticed.wait(60)
        finally:
            partition.heal()  # the rule must never stay behind
            healed_at = time.monotonic()
        worker.join(60)
        if worker.is_alive() or not results or isinstance(results[0], BaseException):
            print(f"    run() after the heal: {results or 'still running after 60 s'}")
    finally:
        if not worker.is_alive():
            rc.close()
    ok = bool(results) and not isinstance(results[0], BaseException)
    return _Cut(detected[0] - cut_at if detected else None,
                returned[0] - healed_at if ok and returned else None)


def partition(rounds: int, drivers: list[str]) -> None:
    ok, why = partition_available()
    if not ok:
        print(f"partition: skipped ({why})")
        return
    print(f"partition: a unit started into a kernel partition (iptables DROP), from the cut "
          f"to FailureDetected; {rounds} rounds each, healed once detected")
    print(f"  {'driver':8} {'detection settings':46} {'median':>8} {'max':>8}   "
          f"{'target':12} run() after heal")
    short = {
        "psycopg": {"keepalives_idle": "1", "keepalives_interval": "1",
                    "keepalives_count": "1", "tcp_user_timeout": "2000"},
        "pyodbc": {"KeepaliveTime": "1", "KeepaliveInterval": "1",
                   "pqopt": "keepalives_count=1 tcp_user_timeout=2000"},
    }
    with LocalServer() as srv:
        srv.start()
        for driver in drivers:
            for label, extra, bound in (("default", {}, 15.0),
                                        ("idle 1, interval 1, count 1, user timeout 2 s",
                                         short[driver], 3.0)):
                cuts = [_partition_round(srv, driver, extra) for _ in range(rounds)]
                seen = [c.declared_lost for c in cuts if c.declared_lost is not None]
                done = [c.finished for c in cuts if c.finished is not None]
                after = (f"ok {len(done)}/{len(cuts)}, max {max(done):.2f} s" if done
                         else f"ok 0/{len(cuts)}")
                if len(seen) < len(cuts):
                    print(f"  {driver:8} {label:46} never declared lost within 60 s   MISS  "
                          f"{after}")
                    continue
                med, top = statistics.median(seen), max(seen)
                print(f"  {driver:8} {label:46} {med:6.2f} s {top:6.2f} s   "
                      f"{f'<= {bound:.0f} s {_verdict(top <= bound)}':12} {after}")


# --- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("steady", "recovery", "partition"))
    parser.add_argument("--rounds", type=int, default=None,
                        help="rounds of each part run (default: steady 10, recovery 20 per "
                             "scenario, partition 2 per setting)")
    parser.add_argument("--units", type=int, default=1000,
                        help="steady state: units per variant per round (default 1000)")
    parser.add_argument("--tmpdir", default=None,
                        help="where the servers' data directories go (the harness's default: "
                             "/dev/shm, where fsync costs nothing; e.g. /var/tmp for a disk)")
    parser.add_argument("--driver", choices=("psycopg", "pyodbc", "both"), default="both")
    parser.add_argument("--no-socket-look", action="store_true",
                        help="A/B: the psycopg passthrough without its look at an idle "
                             "session's socket before each statement (not a setting of "
                             "the library: it patches the adapter for this run)")
    args = parser.parse_args()
    if args.no_socket_look:
        from symfo_failover import _driver_psycopg

        _driver_psycopg._PsycopgFacts.gone = staticmethod(lambda raw: False)  # type: ignore[method-assign,assignment]
    if args.tmpdir:
        # Read by the harness when it makes its first server.
        os.environ["TMPDIR"] = tempfile.tempdir = args.tmpdir
    drivers = ["psycopg", "pyodbc"] if args.driver == "both" else [args.driver]
    if pyodbc is None and "pyodbc" in drivers:
        print("pyodbc is not installed: its lines are skipped")
        drivers.remove("pyodbc")
    _quiet_events()
    parts = [args.only] if args.only else ["steady", "recovery", "partition"]
    print(f"psycopg {psycopg.__version__}, pyodbc {pyodbc.version if pyodbc else '-'}, "
          f"{os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    for part in parts:
        rounds = args.rounds or DEFAULT_ROUNDS[part]
        began = time.monotonic()
        if part == "steady":
            steady(rounds, args.units, drivers)
        elif part == "recovery":
            recovery(rounds, drivers)
        else:
            partition(rounds, drivers)
        print(f"  ({part}: {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
