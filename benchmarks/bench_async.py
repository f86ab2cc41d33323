"""The async resilient connection next to hand-written async psycopg, and the sync one next
to raw psycopg, side by side in one run; and where a sync unit's extra time goes.

Run: .venv/bin/python benchmarks/bench_async.py [--only steady|profile] [--rounds N]
         [--units N] [--profile-units N] [--tmpdir DIR]

- steady: one server with fsync on. Every variant takes turns, one unit each in a fresh
  random order (``bench_resilient``'s method, in one event loop: the sync variants are
  plain calls between the awaits, so the load of a shared machine falls on every side
  alike):
  - async ``await rc.run(unit)`` (INSERT + COMMIT) against a hand-written
    ``psycopg.AsyncConnection`` transaction (``await conn.execute(INSERT);
    await conn.commit()``), the raw side on its own session and on the library's own
    session (``rc.connection``; on 2 cores two sessions doing the same work can differ by
    x2, one session cannot: the control lines show how much);
  - async passthrough ``await rc.execute("SELECT 1")`` (and an INSERT in autocommit)
    against the same statement on the raw ``AsyncConnection``;
  - the sync pairs of ``bench_resilient`` (``run()`` and passthrough next to raw
    psycopg), so that every ratio comes from the same run.
  Targets (DESIGN): a unit x1.05 (sync and async), a sync passthrough statement x1.02;
  the async passthrough is held to the sync one's x1.02 (DESIGN names no figure of its own).
- profile: where a sync ``run()`` unit's extra time goes, against the hand-written unit
  on the same session: each I/O operation of the library's core timed
  (``time.perf_counter_ns`` around the runner's operation table), the same unit with no
  I/O at all (the library's own Python per unit), the server's cost of reading the
  transaction id in BEGIN's round trip, and cProfile's list of the library's functions;
  then the same marked breakdown for an async unit.

The figures are a report, not an assertion: PASS/MISS only compares them to the targets.
The harness puts data directories on /dev/shm (tmpfs, where fsync costs nothing) unless
TMPDIR is set: ``--tmpdir /var/tmp`` puts them on a disk.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import importlib
import itertools
import os
import pstats
import random
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

import symfo_failover as sf
from symfo_failover import _core
from symfo_failover.harness import LocalServer

# bench_resilient's helpers (_Pair, its sync pairs, the table printer), loaded from
# beside this file whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
br: Any = importlib.import_module("bench_resilient")

INSERT_PG = br.INSERT_PG
UNIT_TARGET = 0.05  # DESIGN: a unit through run() at most x1.05, sync and async
PASSTHROUGH_TARGET = 0.02  # DESIGN: a sync passthrough statement at most x1.02


async def _ainsert(conn: psycopg.AsyncConnection[Any], i: int) -> None:
    await conn.execute(INSERT_PG, (i,))


def _async_pair(name: str, raw: Callable[[int], Any], lib: Callable[[int], Any],
                target: float | None) -> Any:
    pair = br._Pair(name, raw, lib, target)
    pair.is_async = True  # the interleave awaits what its two sides return
    return pair


async def _async_pairs(conninfo: str, closers: list[Callable[[], Any]]) -> list[Any]:
    raw_tx = await psycopg.AsyncConnection.connect(conninfo)  # autocommit off: by hand
    raw_a = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    raw_b = await psycopg.AsyncConnection.connect(conninfo, autocommit=True)
    rc_tx = await sf.connect_async(conninfo)
    rc_same = await sf.connect_async(conninfo)
    rc_ac = await sf.connect_async(conninfo, autocommit=True)
    closers += [raw_tx.close, raw_a.close, raw_b.close, rc_tx.close, rc_same.close,
                rc_ac.close]
    pg_ac = rc_ac.connection  # the library's own session, used raw
    assert pg_ac is not None

    async def raw_unit(i: int) -> None:
        await raw_tx.execute(INSERT_PG, (i,))
        await raw_tx.commit()

    async def raw_unit_same(i: int) -> None:
        # By hand on the session run() uses (run() switches autocommit back itself).
        conn = rc_same.connection
        assert conn is not None
        await conn.set_autocommit(False)
        await conn.execute(INSERT_PG, (i,))
        await conn.commit()

    return [
        _async_pair("async unit INSERT+COMMIT, raw own session", raw_unit,
                    lambda i: rc_tx.run(_ainsert, i), UNIT_TARGET),
        _async_pair("async unit INSERT+COMMIT, same session", raw_unit_same,
                    lambda i: rc_same.run(_ainsert, i), UNIT_TARGET),
        _async_pair("async passthrough SELECT 1", lambda i: pg_ac.execute("SELECT 1"),
                    lambda i: rc_ac.execute("SELECT 1"), PASSTHROUGH_TARGET),
        _async_pair("async passthrough INSERT, autocommit",
                    lambda i: pg_ac.execute(INSERT_PG, (i,)),
                    lambda i: rc_ac.execute(INSERT_PG, (i,)), PASSTHROUGH_TARGET),
        _async_pair("control: async SELECT 1, two raw sessions",
                    lambda i: raw_a.execute("SELECT 1"), lambda i: raw_b.execute("SELECT 1"),
                    None),
    ]


def _sync_pairs(conninfo: str, closers: list[Callable[[], Any]]) -> list[Any]:
    """bench_resilient's psycopg pairs, held to DESIGN's current targets."""
    pairs: list[Any] = br._psycopg_pairs(conninfo, closers)
    for pair in pairs:
        pair.name = "sync " + pair.name.removeprefix("psycopg ")
        if pair.target is not None:
            pair.target = UNIT_TARGET if " unit " in pair.name else PASSTHROUGH_TARGET
    return pairs


async def _interleave(pairs: list[Any], rounds: int, units: int, seed: int = 5) -> None:
    """bench_resilient's ``_interleave`` in an event loop: every variant runs one unit in
    turn, in a fresh random order each time; async sides are awaited, sync sides called."""
    shuffle = random.Random(seed).shuffle
    ops = [(pair, side, getattr(pair, "is_async", False))
           for pair in pairs for side in ("raw", "lib")]
    clock = time.perf_counter
    i = 0
    for r in range(-1, rounds):  # round -1 is not recorded: caches, prepared statements
        got: dict[tuple[str, str], list[float]] = {(p.name, s): [] for p, s, _ in ops}
        for _ in range(units if r >= 0 else max(20, units // 10)):
            i += 1
            shuffle(ops)
            for pair, side, is_async in ops:
                op = pair.raw if side == "raw" else pair.lib
                began = clock()
                if is_async:
                    await op(i)
                else:
                    op(i)
                got[pair.name, side].append(clock() - began)
        if r >= 0:
            br.record_round(pairs, got)


def _make_table(admin_conninfo: str) -> tuple[str, str]:
    with psycopg.connect(admin_conninfo, autocommit=True) as admin:
        admin.execute("CREATE TABLE IF NOT EXISTS t (id bigserial PRIMARY KEY, v int)")
        fsync = admin.execute("SHOW fsync").fetchone()
        sync = admin.execute("SHOW synchronous_commit").fetchone()
    return (fsync[0] if fsync else "?", sync[0] if sync else "?")


async def _steady(conninfo: str, rounds: int, units: int) -> None:
    closers: list[Callable[[], Any]] = []
    try:
        pairs = await _async_pairs(conninfo, closers)
        pairs += _sync_pairs(conninfo, closers)
        began = time.monotonic()
        await _interleave(pairs, rounds, units)
        br._print_steady(pairs)
        print(f"  (per unit, all rounds pooled; rounds: min-max of the per-round median "
              f"ratios; {time.monotonic() - began:.0f} s)")
    finally:
        for close in closers:
            result = close()
            if asyncio.iscoroutine(result):
                await result


def steady(srv: LocalServer, rounds: int, units: int) -> None:
    conninfo = srv.conninfo()
    fsync, sync = _make_table(conninfo)
    where = str(srv.data_dir.parent.parent)
    print(f"steady state: {rounds} rounds x {units} units per variant, one unit of each in "
          f"turn, in a random order, one event loop")
    print(f"  fsync={fsync}, synchronous_commit={sync}, data on {br._filesystem(where)} "
          f"({where})")
    asyncio.run(_steady(conninfo, rounds, units))


# --- profile: where a sync unit's extra time goes -----------------------------------------

_OP_NAMES = {getattr(_core, n): n.removeprefix("OP_").lower() for n in dir(_core)
             if n.startswith("OP_")}


def _insert(conn: psycopg.Connection[Any], i: int) -> None:
    conn.execute(INSERT_PG, (i,))


def _noop(conn: psycopg.Connection[Any], i: int) -> None:
    return None


def _us(ns: float) -> str:
    return f"{ns / 1e3:7.2f} us"


_GAPS = {
    # What runs between two marks of a timed unit (the runner, the core, the contract).
    "start..begin>": "run() to BEGIN: checks, lock, Call, retrying, run_attempt, UnitGuard",
    "start..autocommit>": "run() to the autocommit switch (same code as above)",
    "<autocommit..begin>": "after the switch, to BEGIN",
    "<begin..unit>": "after BEGIN: lend the connection, set the guard, to the unit",
    "unit>..body>": "_call_unit: the unit function called (async: its awaitable checked)",
    "<body..<unit": "the unit's return (sync: refuse_awaitable_result)",
    "<unit..commit>": "reclaim, check_unit_left (libpq's state), to COMMIT",
    # async: COMMIT runs in a task of its own, shielded from cancellation (inside "op commit")
    "<commit..end": "after COMMIT: the flows return, the lock is released",
}


def _breakdown(rc: Any, units: int) -> None:
    """The hand-written unit on ``rc.connection``, run(), and run() with its operations
    and the time between them marked, interleaved, all on the one session."""
    ns = time.perf_counter_ns
    plain_ops = rc._ops
    marks: list[tuple[str, int]] = []
    mark = marks.append

    def timed(k: int, f: Callable[..., Any]) -> Callable[..., Any]:
        name = _OP_NAMES[k]
        enter, leave = name + ">", "<" + name

        def op(*args: Any) -> Any:
            mark((enter, ns()))
            try:
                return f(*args)
            finally:
                mark((leave, ns()))
        return op

    timed_ops = [timed(k, f) for k, f in enumerate(plain_ops)]

    def insert_marked(conn: psycopg.Connection[Any], i: int) -> None:
        mark(("body>", ns()))
        conn.execute(INSERT_PG, (i,))
        mark(("<body", ns()))

    raw_parts: dict[str, list[int]] = {"autocommit = False": [], "execute() (BEGIN + INSERT)": [],
                                       "commit()": []}
    totals: dict[str, list[int]] = {"raw": [], "lib": [], "lib marked": []}
    spans: dict[str, list[int]] = {}

    def raw_unit(i: int) -> None:
        conn = rc.connection
        t0 = ns()
        conn.autocommit = False
        t1 = ns()
        conn.execute(INSERT_PG, (i,))
        t2 = ns()
        conn.commit()
        t3 = ns()
        if i >= 0:
            raw_parts["autocommit = False"].append(t1 - t0)
            raw_parts["execute() (BEGIN + INSERT)"].append(t2 - t1)
            raw_parts["commit()"].append(t3 - t2)

    def lib_marked(i: int) -> None:
        marks.clear()
        rc._ops = timed_ops
        mark(("start", ns()))
        try:
            rc.run(insert_marked, i)
        finally:
            mark(("end", ns()))
            rc._ops = plain_ops
        if i >= 0:
            for (a, ta), (b, tb) in itertools.pairwise(marks):
                spans.setdefault(f"{a}..{b}", []).append(tb - ta)

    variants: list[tuple[str, Callable[[int], None]]] = [
        ("raw", raw_unit), ("lib", lambda i: rc.run(_insert, i)), ("lib marked", lib_marked)]
    shuffle = random.Random(7).shuffle
    for i in range(-max(50, units // 10), units):  # negative i: warm-up, not recorded
        shuffle(variants)
        for name, fn in variants:
            t = ns()
            fn(i)
            if i >= 0:
                totals[name].append(ns() - t)

    _report(totals, raw_parts, spans, units)


def _report(totals: dict[str, list[int]], raw_parts: dict[str, list[int]],
            spans: dict[str, list[int]], units: int) -> None:
    med = statistics.median
    raw_t, lib_t = med(totals["raw"]), med(totals["lib"])
    print(f"  one session, {units} units of each, interleaved; medians per unit")
    print(f"    hand-written unit on rc.connection        {_us(raw_t)}")
    print(f"    run(insert)                               {_us(lib_t)}   "
          f"(+{(lib_t - raw_t) / 1e3:.2f} us, x{lib_t / raw_t:.3f})")
    print(f"    run(insert), marked                       {_us(med(totals['lib marked']))}")
    print("  the hand-written unit, in parts:")
    for name, values in raw_parts.items():
        print(f"    {name:41} {_us(med(values))}")
    print("  run(), marked: the operations (I/O) and the library's code between them")
    code = 0.0
    for span, values in spans.items():
        share = len(values) / units
        a, b = span.split("..")
        is_op = a.endswith(">") and b == "<" + a[:-1]
        if is_op:
            what = "op " + a[:-1] + (" (the unit's INSERT, guarded cursor)" if a == "body>"
                                     else "")
        else:
            what = _GAPS.get(span, span)
            code += med(values) * share
        print(f"    {what[:62]:62} {_us(med(values))}  ({share:.2f}/unit)")
    print(f"    the library's code between the operations, in all          {_us(code)}"
          f"  (marks included, about 0.1 us each)")


async def _abreakdown(rc: Any, units: int) -> None:
    """`_breakdown` for the async connection (its operations are coroutines)."""
    ns = time.perf_counter_ns
    plain_ops = rc._ops
    marks: list[tuple[str, int]] = []
    mark = marks.append

    def timed(k: int, f: Callable[..., Any]) -> Callable[..., Any]:
        name = _OP_NAMES[k]
        enter, leave = name + ">", "<" + name

        async def op(*args: Any) -> Any:
            mark((enter, ns()))
            try:
                return await f(*args)
            finally:
                mark((leave, ns()))
        return op

    timed_ops = [timed(k, f) for k, f in enumerate(plain_ops)]

    async def insert_marked(conn: psycopg.AsyncConnection[Any], i: int) -> None:
        mark(("body>", ns()))
        await conn.execute(INSERT_PG, (i,))
        mark(("<body", ns()))

    raw_parts: dict[str, list[int]] = {"await set_autocommit(False)": [],
                                       "await execute() (BEGIN + INSERT)": [],
                                       "await commit()": []}
    totals: dict[str, list[int]] = {"raw": [], "lib": [], "lib marked": []}
    spans: dict[str, list[int]] = {}

    async def raw_unit(i: int) -> None:
        conn = rc.connection
        t0 = ns()
        await conn.set_autocommit(False)
        t1 = ns()
        await conn.execute(INSERT_PG, (i,))
        t2 = ns()
        await conn.commit()
        t3 = ns()
        if i >= 0:
            raw_parts["await set_autocommit(False)"].append(t1 - t0)
            raw_parts["await execute() (BEGIN + INSERT)"].append(t2 - t1)
            raw_parts["await commit()"].append(t3 - t2)

    async def lib_marked(i: int) -> None:
        marks.clear()
        rc._ops = timed_ops
        mark(("start", ns()))
        try:
            await rc.run(insert_marked, i)
        finally:
            mark(("end", ns()))
            rc._ops = plain_ops
        if i >= 0:
            for (a, ta), (b, tb) in itertools.pairwise(marks):
                spans.setdefault(f"{a}..{b}", []).append(tb - ta)

    variants: list[tuple[str, Callable[[int], Any]]] = [
        ("raw", raw_unit), ("lib", lambda i: rc.run(_ainsert, i)), ("lib marked", lib_marked)]
    shuffle = random.Random(7).shuffle
    for i in range(-max(50, units // 10), units):
        shuffle(variants)
        for name, fn in variants:
            t = ns()
            await fn(i)
            if i >= 0:
                totals[name].append(ns() - t)
    _report(totals, raw_parts, spans, units)


def _no_io(rc: Any, units: int) -> None:
    """run() with every operation a no-op, on a session held in an open transaction:
    the library's own Python per unit, in a tight loop and right after a round trip
    on the same session (as in a real unit, the caches then hold the server's work)."""
    conn = rc.connection
    conn.autocommit = True  # as run() leaves it: no switch, no open-transaction check
    pg = conn.pgconn
    pg.exec_(b"BEGIN")  # unit_left() sees an open transaction, as after BEGIN
    plain_ops = list(rc._ops)
    fake = list(plain_ops)
    fake[_core.OP_BEGIN] = lambda raw, state: "1"
    fake[_core.OP_COMMIT] = lambda raw: None
    fake[_core.OP_AUTOCOMMIT] = lambda raw, value: None
    ns = time.perf_counter_ns
    got: dict[str, list[int]] = {"tight loop": [], "each after a round trip": []}
    rc._ops = fake
    try:
        for label, samples in got.items():
            for i in range(-500, units * 2):
                if label != "tight loop":
                    pg.exec_(b"SELECT 1")  # the server works, this process waits
                t = ns()
                rc.run(_noop, i)
                if i >= 0:
                    samples.append(ns() - t)
    finally:
        rc._ops = plain_ops
        pg.exec_(b"ROLLBACK")
    print("  run() with every operation a no-op (the library's own code per unit): "
          + ", ".join(f"{k} {_us(statistics.median(v)).strip()}" for k, v in got.items()))


def _xid_cost(rc: Any, units: int) -> None:
    """The server's cost of the transaction id read in BEGIN's round trip: the same three
    statements through libpq on the library's session, with and without it (the INSERT
    assigns an id anyway)."""
    ns = time.perf_counter_ns
    conn = rc.connection
    conn.autocommit = True
    pg = conn.pgconn
    insert = b"INSERT INTO t(v) VALUES (1)"
    with_id = b"BEGIN; SELECT pg_current_xact_id()::text"
    variants = {"BEGIN": b"BEGIN", "with id": with_id}
    whole: dict[str, list[int]] = {k: [] for k in variants}
    begin: dict[str, list[int]] = {k: [] for k in variants}
    order = list(variants)
    shuffle = random.Random(11).shuffle
    for i in range(-100, units):
        shuffle(order)
        for name in order:
            t = ns()
            pg.exec_(variants[name])
            t1 = ns()
            pg.exec_(insert)
            pg.exec_(b"COMMIT")
            if i >= 0:
                whole[name].append(ns() - t)
                begin[name].append(t1 - t)
    med = statistics.median
    a, b = med(whole["BEGIN"]), med(whole["with id"])
    print(f"  BEGIN + INSERT + COMMIT through libpq (same session): {_us(a).strip()}; with "
          f"the id read in BEGIN's round trip {_us(b).strip()} (+{(b - a) / 1e3:.2f} us; "
          f"BEGIN's round trip {_us(med(begin['BEGIN'])).strip()} -> "
          f"{_us(med(begin['with id'])).strip()})")


def _cprofile(rc: Any, units: int, top: int = 14) -> None:
    """cProfile of the same-session units: the library's functions by own time."""
    def raw_unit(i: int) -> None:
        conn = rc.connection
        conn.autocommit = False
        conn.execute(INSERT_PG, (i,))
        conn.commit()

    def profiled(fn: Callable[[int], None]) -> pstats.Stats:
        prof = cProfile.Profile()
        prof.enable()
        for i in range(units):
            fn(i)
        prof.disable()
        return pstats.Stats(prof)

    for i in range(100):
        raw_unit(i)
        rc.run(_insert, i)
    raw = profiled(raw_unit)
    lib = profiled(lambda i: rc.run(_insert, i))
    calls_raw = sum(v[1] for v in raw.stats.values())  # type: ignore[attr-defined]
    calls_lib = sum(v[1] for v in lib.stats.values())  # type: ignore[attr-defined]
    print(f"  cProfile, {units} units each (profiled: times inflated), function calls per "
          f"unit: hand-written {calls_raw / units:.0f}, run() {calls_lib / units:.0f}")
    rows = []
    for (path, line, func), (_cc, nc, tt, ct, _callers) in lib.stats.items():  # type: ignore[attr-defined]
        if "symfo_failover" in path and "harness" not in path:
            rows.append((tt, ct, nc, f"{Path(path).name}:{line} {func}"))
    rows.sort(reverse=True)
    print(f"    {'library function':52} {'own/unit':>9} {'cum/unit':>9} {'calls/unit':>10}")
    for tt, ct, nc, where in rows[:top]:
        print(f"    {where[:52]:52} {tt / units * 1e6:6.2f} us {ct / units * 1e6:6.2f} us "
              f"{nc / units:10.2f}")
    own = sum(r[0] for r in rows)
    print(f"    all library functions' own time: {own / units * 1e6:.2f} us per unit "
          f"(profiled)")


def profile(srv: LocalServer, units: int) -> None:
    conninfo = srv.conninfo()
    _make_table(conninfo)
    print("profile: a sync run() unit (INSERT + COMMIT) against the hand-written one, "
          "same session")
    rc = sf.connect(conninfo)
    try:
        _breakdown(rc, units)
        _no_io(rc, units)
        _xid_cost(rc, units)
        _cprofile(rc, min(units, 3000))
    finally:
        rc.close()

    async def async_part() -> None:
        arc = await sf.connect_async(conninfo)
        try:
            await _abreakdown(arc, units)
        finally:
            await arc.close()

    print("profile: an async run() unit against the hand-written async one, same session")
    asyncio.run(async_part())


# --- main -------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("steady", "profile"))
    parser.add_argument("--rounds", type=int, default=10,
                        help="steady state: rounds (default 10)")
    parser.add_argument("--units", type=int, default=1000,
                        help="steady state: units per variant per round (default 1000)")
    parser.add_argument("--profile-units", type=int, default=3000,
                        help="profile: units of each variant (default 3000)")
    parser.add_argument("--tmpdir", default=None,
                        help="where the server's data directory goes (the harness's default: "
                             "/dev/shm, where fsync costs nothing; e.g. /var/tmp for a disk)")
    args = parser.parse_args()
    if args.tmpdir:
        os.environ["TMPDIR"] = tempfile.tempdir = args.tmpdir
    br._quiet_events()
    print(f"psycopg {psycopg.__version__} (libpq {psycopg.pq.version()}), Python "
          f"{sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    with LocalServer(settings={"fsync": "on"}) as srv:
        srv.start()
        with psycopg.connect(srv.conninfo()) as c:
            print(f"  server {c.info.server_version // 10000}.{c.info.server_version % 10000}")
        for part in ("steady", "profile"):
            if args.only not in (None, part):
                continue
            began = time.monotonic()
            if part == "steady":
                steady(srv, args.rounds, args.units)
            else:
                profile(srv, args.profile_units)
            print(f"  ({part}: {time.monotonic() - began:.0f} s)")


if __name__ == "__main__":
    main()
