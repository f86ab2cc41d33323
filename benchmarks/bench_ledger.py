"""What the commit ledger costs a unit of work, side by side in one run, with commits that fsync.

Run: .venv/bin/python benchmarks/bench_ledger.py [--quick] [--rounds N] [--units N]
         [--driver psycopg|pyodbc|both] [--only direct|proxy|prune] [--proxy-rounds N]
         [--proxy-units N] [--latency S] [--prefill N] [--prune-rows N] [--explain]
         [--checkpoint-every-round] [--tmpdir DIR]

- direct: one unit (one small INSERT + COMMIT, the same statement everywhere) three ways:
  "by hand" on a plain driver connection (``execute(); commit()``), "xid path" through
  ``connect(..., ledger="off").run()`` (BEGIN reads the transaction id), and "ledger"
  through ``connect(..., ledger="auto").run()`` with the ledger installed (BEGIN inserts
  the unit's token). One connection per variant; every variant runs one unit in turn, in
  a fresh random order each time, over rounds (the research's method:
  ../shared/research/ledger.md, Q2). Per variant: the median time of a unit, and the
  median (and IQR) of the per-round ratios to "by hand" (a round's total time over the
  by-hand total, as the research computed it; the per-round ratio of medians next to
  it; for the ledger also the per-round ratio to the xid path). ``--explain`` adds
  hand-written units that send the library's BEGIN messages without the library (the
  id; the ledger insert; the same insert PREPAREd once per session; an insert into a
  ledger without its ``created`` column) and a second by-hand session (the control),
  to split the server's cost from the library's.
- proxy: the same through a ``FaultProxy`` with ``--latency`` (1 ms) each way, where
  round trips dominate: the ledger travels in BEGIN's message and adds none.
- prune: the ledger filled with old rows, batches of ``_ledger.prune_sql(3600, 5000)``
  timed: per deleted row, a full batch, an empty one (what a session pays when there
  is nothing to delete), and what that costs per unit at the measured unit rate.

The ledger is prefilled with ``--prefill`` recent rows (300k, as in the research) so
that its primary key is not tiny; nothing of them is old enough to be pruned during
the run, so its size stays steady across variants. Data directories go to ``--tmpdir``,
by default /var/tmp (a disk): on the harness's usual /dev/shm (tmpfs) fsync costs
nothing. The header reads the settings back from the server.

Figures, not assertions: PASS/MISS only compares the ledger's ratio to its target.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import os
import platform
import random
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import symfo_failover as sf
from symfo_failover import _ledger as lg
from symfo_failover.harness import FaultProxy, LocalServer

# bench_resilient's small helpers (the file system of a path, quiet logs), loaded from
# beside this file whatever the working directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
br: Any = importlib.import_module("bench_resilient")

try:
    import pyodbc
except ImportError:  # pragma: no cover - the ODBC lines are skipped
    pyodbc = None

INSERT_PG = "INSERT INTO t(v) VALUES (%s)"
INSERT_ODBC = "INSERT INTO t(v) VALUES (?)"
#: The research's measure of the ledger against a hand-written transaction, and the bound.
TARGET = 1.15
BARE = f"{lg.SCHEMA}.ledger_bare"  # --explain: the ledger without its created column
SETTINGS = {"fsync": "on", "synchronous_commit": "on",
            # As the research: no timed checkpoint inside the run (--checkpoint-every-round
            # puts one before every round instead).
            "checkpoint_timeout": "30min"}
SHOWN = ("server_version", "fsync", "synchronous_commit", "wal_sync_method",
         "full_page_writes", "checkpoint_timeout", "shared_buffers")

# --- small helpers ----------------------------------------------------------------------


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f}"


def _iqr(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q1, _, q3 = statistics.quantiles(values, n=4)
    return q1, q3


def _insert_pg(raw: Any, i: int) -> None:
    raw.execute(INSERT_PG, (i,))


def _insert_odbc(raw: Any, i: int) -> None:
    raw.execute(INSERT_ODBC, i)


def _ledger_rows(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute(f"SELECT count(*) FROM {lg.TABLE}").fetchone()
    return int(row[0]) if row else 0


# --- the variants -------------------------------------------------------------------------


@dataclass
class _Variant:
    name: str
    op: Callable[[int], object]
    base: str  # the "by hand" variant its ratios are to
    target: float | None = None
    xid: str | None = None  # the xid-path variant, for the ledger's ratio to it
    times: list[float] = field(default_factory=list)
    round_sums: list[float] = field(default_factory=list)
    round_medians: list[float] = field(default_factory=list)


class _Sessions:
    """The connections of one table, closed together; the library's prunes counted."""

    def __init__(self) -> None:
        self.closers: list[Callable[[], object]] = []
        self.pruned: list[sf.LedgerPruned] = []
        self.ledger_units = 0

    def on_event(self, event: sf.Event) -> None:
        # Events are rare (no event per unit): the hook costs a unit nothing.
        if isinstance(event, sf.LedgerPruned):
            self.pruned.append(event)

    def close(self) -> None:
        for close in reversed(self.closers):
            close()
        self.closers.clear()


def _check_ledger_used(admin: psycopg.Connection[Any], ledger: Callable[[int], object],
                       xid: Callable[[int], object], label: str) -> None:
    """Once, outside the timing: a ledger unit adds a row, an xid-path unit does not."""
    before = _ledger_rows(admin)
    xid(0)
    after_xid = _ledger_rows(admin)
    ledger(0)
    after_ledger = _ledger_rows(admin)
    if after_xid != before or after_ledger != before + 1:
        raise AssertionError(f"{label}: ledger rows {before} -> {after_xid} after an xid-path "
                             f"unit -> {after_ledger} after a ledger unit (expected +0, +1)")


def _psycopg_variants(conninfo: str, s: _Sessions, explain: bool,
                      admin: psycopg.Connection[Any]) -> list[_Variant]:
    hand = psycopg.connect(conninfo)  # autocommit off: psycopg sends BEGIN first
    rc_xid = sf.connect(conninfo, ledger="off", on_event=s.on_event)
    rc_ledger = sf.connect(conninfo, ledger="auto", on_event=s.on_event)
    s.closers += [hand.close, rc_xid.close, rc_ledger.close]

    def by_hand(i: int) -> None:
        hand.execute(INSERT_PG, (i,))
        hand.commit()

    def ledger(i: int) -> None:
        s.ledger_units += 1
        rc_ledger.run(_insert_pg, i)

    def xid(i: int) -> None:
        rc_xid.run(_insert_pg, i)

    _check_ledger_used(admin, ledger, xid, "psycopg")
    base = "psycopg by hand"
    variants = [
        _Variant(base, by_hand, base),
        _Variant("psycopg xid path (ledger=off)", xid, base),
        _Variant("psycopg ledger (ledger=auto)", ledger, base, TARGET,
                 xid="psycopg xid path (ledger=off)"),
    ]
    if explain:
        variants += _explain_variants(conninfo, s, base)
    return variants


def _explain_variants(conninfo: str, s: _Sessions, base: str) -> list[_Variant]:
    """Hand-written units with the library's BEGIN messages (through libpq as the library
    sends them, COMMIT by psycopg's ``commit()`` as the library does): the server's and
    the protocol's part of each path, without the library's Python."""
    other = psycopg.connect(conninfo)
    begin_xid = psycopg.connect(conninfo)
    begin_ledger = psycopg.connect(conninfo)
    begin_bare = psycopg.connect(conninfo)
    begin_prepared = psycopg.connect(conninfo, autocommit=True)
    begin_prepared.execute(f"PREPARE ledger_insert(uuid) AS INSERT INTO {lg.TABLE} (token) "
                           "VALUES ($1)")
    begin_prepared.autocommit = False
    s.closers += [other.close, begin_xid.close, begin_ledger.close, begin_bare.close,
                  begin_prepared.close]

    def control(i: int) -> None:
        other.execute(INSERT_PG, (i,))
        other.commit()

    def with_begin(conn: psycopg.Connection[Any],
                   make: Callable[[], bytes]) -> Callable[[int], None]:
        pgconn = conn.pgconn

        def unit(i: int) -> None:
            result = pgconn.exec_(make())
            if result.status not in (psycopg.pq.ExecStatus.COMMAND_OK,
                                     psycopg.pq.ExecStatus.TUPLES_OK):
                raise RuntimeError((pgconn.error_message or b"").decode())
            conn.execute(INSERT_PG, (i,))  # psycopg sees the open transaction: no BEGIN
            conn.commit()
        return unit

    xid_sql = b"BEGIN; SELECT pg_current_xact_id()::text"

    def ledger_sql() -> bytes:
        s.ledger_units += 1  # a row in the ledger too
        return b"BEGIN; " + lg.insert_sql(lg.new_token()).encode()

    def prepared_sql() -> bytes:
        s.ledger_units += 1
        return f"BEGIN; EXECUTE ledger_insert('{lg.new_token()}')".encode()

    return [
        _Variant("control: by hand, another session", control, base),
        _Variant("by hand, BEGIN; xid (one message)", with_begin(begin_xid, lambda: xid_sql), base),
        _Variant("by hand, BEGIN; ledger INSERT", with_begin(begin_ledger, ledger_sql), base),
        _Variant("by hand, BEGIN; prepared ledger INSERT", with_begin(
            begin_prepared, prepared_sql), base),
        _Variant("by hand, BEGIN; ledger w/o created", with_begin(
            begin_bare, lambda: (f"BEGIN; INSERT INTO {BARE} (token) VALUES "
                                 f"('{lg.new_token()}')").encode()), base),
    ]


def _pyodbc_variants(odbc: str, s: _Sessions, admin: psycopg.Connection[Any]) -> list[_Variant]:
    hand = pyodbc.connect(odbc, autocommit=False)  # psqlODBC sends BEGIN with the INSERT
    rc_xid = sf.connect(odbc, driver="pyodbc", ledger="off", on_event=s.on_event)
    rc_ledger = sf.connect(odbc, driver="pyodbc", ledger="auto", on_event=s.on_event)
    s.closers += [hand.close, rc_xid.close, rc_ledger.close]

    def by_hand(i: int) -> None:
        hand.execute(INSERT_ODBC, i)
        hand.commit()

    def ledger(i: int) -> None:
        s.ledger_units += 1
        rc_ledger.run(_insert_odbc, i)

    def xid(i: int) -> None:
        rc_xid.run(_insert_odbc, i)

    _check_ledger_used(admin, ledger, xid, "pyodbc")
    base = "pyodbc by hand"
    return [
        _Variant(base, by_hand, base),
        _Variant("pyodbc xid path (ledger=off)", xid, base),
        _Variant("pyodbc ledger (ledger=auto)", ledger, base, None,
                 xid="pyodbc xid path (ledger=off)"),
    ]


# --- the interleaved run --------------------------------------------------------------------


def _interleave(variants: list[_Variant], rounds: int, units: int, seed: int,
                admin: psycopg.Connection[Any], checkpoint: bool) -> None:
    """Every variant runs one unit in turn, in a fresh random order each time (noise from
    the shared machine falls on all alike; no variant always follows the same one)."""
    shuffle = random.Random(seed).shuffle
    order = variants[:]
    clock = time.perf_counter
    i = 0
    for r in range(-1, rounds):  # round -1 is not recorded: caches, plans, first prunes
        if checkpoint:
            admin.execute("CHECKPOINT")
        got: dict[str, list[float]] = {v.name: [] for v in variants}
        for _ in range(units if r >= 0 else max(20, units // 5)):
            i += 1
            shuffle(order)
            for v in order:
                began = clock()
                v.op(i)
                got[v.name].append(clock() - began)
        if r < 0:
            continue
        for v in variants:
            v.times.extend(got[v.name])
            v.round_sums.append(sum(got[v.name]) / sum(got[v.base]))
            v.round_medians.append(statistics.median(got[v.name]) /
                                   statistics.median(got[v.base]))


def _print_table(variants: list[_Variant]) -> None:
    by_name = {v.name: v for v in variants}
    print(f"  {'variant':38} {'us/unit':>8} {'ratio':>7} {'IQR of ratio':>13} "
          f"{'ratio of medians':>16} {'vs xid path':>11}   target")
    for v in variants:
        ratio = statistics.median(v.round_sums)
        q1, q3 = _iqr(v.round_sums)
        of_medians = statistics.median(v.round_medians)
        vs_xid = ""
        if v.xid is not None:
            other = by_name[v.xid]
            vs_xid = "x" + format(statistics.median(
                a / b for a, b in zip(v.round_sums, other.round_sums, strict=True)), ".3f")
        target = ""
        if v.target is not None:
            target = f"<= x{v.target:.2f} {'PASS' if ratio <= v.target else 'MISS'}"
        print(f"  {v.name:38} {statistics.median(v.times) * 1e6:8.1f} x{ratio:6.3f} "
              f"{q1:6.3f}-{q3:.3f} {'x' + format(of_medians, '.3f'):>16} {vs_xid:>11}   "
              f"{target}")


def _table(title: str, conninfo: str, odbc: str | None, args: argparse.Namespace,
           rounds: int, units: int, admin: psycopg.Connection[Any], drivers: list[str],
           explain: bool) -> dict[str, float]:
    """One interleaved run of every variant; returns the median us per unit by name."""
    s = _Sessions()
    try:
        variants: list[_Variant] = []
        if "psycopg" in drivers:
            variants += _psycopg_variants(conninfo, s, explain, admin)
        if "pyodbc" in drivers and odbc is not None:
            variants += _pyodbc_variants(odbc, s, admin)
        rows0 = _ledger_rows(admin)
        s.ledger_units = 0
        print(f"{title}: {rounds} rounds x {units} units of each of {len(variants)} variants, "
              f"one connection each, one unit of each in turn in a random order")
        began = time.monotonic()
        _interleave(variants, rounds, units, args.seed, admin, args.checkpoint_every_round)
        took = time.monotonic() - began
        _print_table(variants)
        rows1 = _ledger_rows(admin)
        deleted = sum(e.deleted for e in s.pruned)
        print(f"  (us/unit: median of every unit; ratio: median of the per-round ratios of "
              f"total time to by hand, IQR of those; vs xid path: the same to the xid "
              f"path; {took:.0f} s)")
        print(f"  ledger rows {rows0} -> {rows1} (+{rows1 - rows0}; {s.ledger_units} units "
              f"with a ledger row run, {len(s.pruned)} prunes by the library in the run deleted "
              f"{deleted} rows)")
        if rows1 - rows0 != s.ledger_units - deleted:
            raise AssertionError("the ledger did not grow by one row per ledger unit")
        return {v.name: statistics.median(v.times) for v in variants}
    finally:
        s.close()


# --- the ledger's contents and the pruning ---------------------------------------------------


def _fill(admin: psycopg.Connection[Any], table: str, n: int, newest: float, span: float) -> None:
    """``n`` rows of tokens made by the library's `new_token` at times spread evenly over
    ``span`` seconds up to ``newest``, ``created`` the same time (in order, as a session
    makes them)."""
    with admin.cursor() as cur, cur.copy(f"COPY {table} (token, created) FROM STDIN") as copy:
        for k in range(n):
            at = newest - span + span * k / max(1, n - 1)
            copy.write_row((lg.new_token(now=at), dt.datetime.fromtimestamp(at, dt.timezone.utc)))


def _fill_old(admin: psycopg.Connection[Any], n: int) -> None:
    """``n`` tokens two hours old (``created = now() - interval '2 hours'``)."""
    base = time.time() - 7200 - n / 1000  # one a millisecond, the newest 2 hours old
    chunk = 50_000
    for start in range(0, n, chunk):
        tokens = [lg.new_token(now=base + k / 1000) for k in range(start, min(n, start + chunk))]
        admin.execute(f"INSERT INTO {lg.TABLE} (token, created) "
                      "SELECT t, now() - interval '2 hours' FROM unnest(%s::uuid[]) t", (tokens,))


def _wal(admin: psycopg.Connection[Any]) -> int:
    row = admin.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()
    return int(row[0]) if row else 0


def prune(admin: psycopg.Connection[Any], rows: int, unit_us: float | None,
          unit_label: str) -> None:
    retention, batch = lg.DEFAULT_RETENTION, lg.PRUNE_BATCH
    sql = lg.prune_sql(retention, batch)
    clock = time.perf_counter
    present = _ledger_rows(admin)

    def once() -> tuple[float, int]:
        began = clock()
        row = admin.execute(sql).fetchone()
        return clock() - began, int(row[0]) if row else 0

    empty = []
    for _ in range(21):
        took, deleted = once()
        if deleted:
            raise AssertionError(f"a prune of the recent rows deleted {deleted}")
        empty.append(took)
    _fill_old(admin, rows)
    admin.execute(f"VACUUM ANALYZE {lg.TABLE}")
    admin.execute("CHECKPOINT")
    batches: list[tuple[float, int]] = []
    wal0 = _wal(admin)
    while True:
        took, deleted = once()
        batches.append((took, deleted))
        if deleted < batch:
            break
    wal = _wal(admin) - wal0
    began = clock()
    admin.execute(f"VACUUM {lg.TABLE}")
    vacuum = clock() - began
    left = _ledger_rows(admin)
    removed = sum(n for _, n in batches)
    total = sum(t for t, _ in batches)
    full = [t for t, n in batches if n == batch]
    per_row = total / max(removed, 1)
    empty_s = statistics.median(empty)
    full_s = statistics.median(full) if full else float("nan")
    print(f"prune: {lg.TABLE} with {present} recent rows, then {rows} rows two hours old; "
          f"prune_sql({retention:.0f}, {batch}) in batches (autocommit, one session)")
    print(f"  deleted {removed} rows in {len(batches)} statements, {total * 1e3:.0f} ms: "
          f"{per_row * 1e6:.2f} us per deleted row, {wal / max(removed, 1):.0f} B of WAL "
          f"per row; {left} rows left (the recent ones)")
    print(f"  a full batch of {batch}: {full_s * 1e3:.1f} ms (median of {len(full)}); "
          f"an empty prune (nothing old): {empty_s * 1e3:.2f} ms (median of {len(empty)})")
    print(f"  VACUUM afterwards: {vacuum * 1e3:.0f} ms, {vacuum / max(removed, 1) * 1e6:.2f} "
          f"us per deleted row (autovacuum's work, not the session's)")
    if unit_us is None:
        return
    per_minute = 60e6 / unit_us
    once_full = full_s * 1e6 / per_minute
    once_empty = empty_s * 1e6 / per_minute
    print(f"  per unit, at {unit_us:.0f} us a unit ({unit_label}; {per_minute:,.0f} units a "
          f"minute on one session):")
    print(f"    a full batch once a minute / units a minute: {once_full:.3f} us "
          f"({once_full / unit_us:.3%} of a unit)")
    print(f"    an empty prune once a minute / units a minute: {once_empty:.4f} us "
          f"({once_empty / unit_us:.4%})")
    print(f"    every unit's row deleted once (steady state): {per_row * 1e6:.2f} us "
          f"({per_row * 1e6 / unit_us:.2%} of a unit)")
    capacity = batch / lg.PRUNE_AGAIN * 60
    if per_minute > batch:
        print(f"    (a session making more than {batch} units a minute prunes again every "
              f"{lg.PRUNE_AGAIN:.0f} s while batches come back full: at most "
              f"{capacity:,.0f} rows a minute, "
              f"{'enough for' if capacity >= per_minute else 'LESS than'} this rate)")


# --- main -----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true",
                        help="about 20 s: --rounds 15 --units 100 --proxy-rounds 4 "
                             "--proxy-units 30 --prune-rows 50000")
    parser.add_argument("--rounds", type=int, default=None, help="direct rounds (default 40)")
    parser.add_argument("--units", type=int, default=None,
                        help="direct: units per variant per round (default 150)")
    parser.add_argument("--proxy-rounds", type=int, default=None, help="default 10")
    parser.add_argument("--proxy-units", type=int, default=None, help="default 40")
    parser.add_argument("--latency", type=float, default=0.001,
                        help="the proxy's delay each way, seconds (default 0.001)")
    parser.add_argument("--prefill", type=int, default=300_000,
                        help="recent ledger rows before the run (default 300000)")
    parser.add_argument("--prune-rows", type=int, default=None,
                        help="old rows for the prune measurement (default 200000)")
    parser.add_argument("--driver", choices=("psycopg", "pyodbc", "both"), default="both")
    parser.add_argument("--only", choices=("direct", "proxy", "prune"), action="append",
                        help="only these parts (repeatable; default all)")
    parser.add_argument("--explain", action="store_true",
                        help="direct: also hand-written units with the library's BEGIN "
                             "messages, a ledger without created, a second by-hand session")
    parser.add_argument("--checkpoint-every-round", action="store_true",
                        help="a CHECKPOINT before every round (full-page writes show)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--tmpdir", default="/var/tmp",
                        help="where the server's data directory goes (default /var/tmp, a "
                             "disk; /dev/shm is tmpfs, where fsync costs nothing)")
    args = parser.parse_args()
    quick = {"rounds": 15, "units": 100, "proxy_rounds": 4, "proxy_units": 30,
             "prune_rows": 50_000}
    full = {"rounds": 40, "units": 150, "proxy_rounds": 10, "proxy_units": 40,
            "prune_rows": 200_000}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    parts = args.only or ["direct", "proxy", "prune"]
    # Read by the harness when it makes its first server.
    os.environ["TMPDIR"] = tempfile.tempdir = args.tmpdir
    drivers = ["psycopg", "pyodbc"] if args.driver == "both" else [args.driver]
    if "pyodbc" in drivers:
        why = None
        if pyodbc is None:
            why = "pyodbc is not installed"
        elif "PostgreSQL Unicode" not in pyodbc.drivers():
            why = "psqlODBC (PostgreSQL Unicode) is not registered with unixODBC"
        if why:
            print(f"{why}: the pyodbc lines are skipped")
            drivers.remove("pyodbc")
    br._quiet_events()
    load_start = _load()
    started = time.monotonic()
    command = shlex.join([".venv/bin/python", "benchmarks/bench_ledger.py", *sys.argv[1:]])
    with LocalServer(settings=SETTINGS) as srv:
        srv.start()
        conninfo = srv.conninfo()
        with psycopg.connect(conninfo, autocommit=True) as admin:
            shown = {name: admin.execute(f"SHOW {name}").fetchone()[0]  # type: ignore[index]
                     for name in SHOWN}
            where = str(srv.data_dir)
            print(f"PostgreSQL {shown['server_version']}, psycopg {psycopg.__version__} "
                  f"(libpq {psycopg.pq.version()}), pyodbc "
                  f"{pyodbc.version if pyodbc else '-'}, Python {platform.python_version()}")
            print(f"fsync={shown['fsync']}, synchronous_commit={shown['synchronous_commit']}, "
                  f"wal_sync_method={shown['wal_sync_method']}, full_page_writes="
                  f"{shown['full_page_writes']}, checkpoint_timeout="
                  f"{shown['checkpoint_timeout']}, shared_buffers={shown['shared_buffers']}; "
                  f"data on {br._filesystem(where)} ({where})")
            print(f"{os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), load "
                  f"average at start {load_start}")
            print(f"reproduce: {command}")
            admin.execute("CREATE TABLE t (id bigserial PRIMARY KEY, v int)")
            sf.install_ledger(conninfo)
            admin.execute(f"CREATE TABLE {BARE} (token uuid PRIMARY KEY)")
            t0 = time.monotonic()
            now = time.time()
            _fill(admin, lg.TABLE, args.prefill, now - 60, 1800)
            admin.execute(f"INSERT INTO {BARE} SELECT token FROM {lg.TABLE}")
            admin.execute("VACUUM ANALYZE")
            admin.execute("CHECKPOINT")
            print(f"ledger prefilled with {args.prefill} rows made over the last 30 min "
                  f"({time.monotonic() - t0:.1f} s)")
            odbc = srv.odbc_connection_string()
            medians: dict[str, float] = {}
            if "direct" in parts:
                medians = _table("direct", conninfo, odbc, args, args.rounds, args.units,
                                 admin, drivers, args.explain)
            if "proxy" in parts:
                with FaultProxy(srv.host, srv.port) as proxy:
                    via = srv.conninfo(host=proxy.host, port=str(proxy.port))
                    via_odbc = srv.odbc_connection_string(Server=proxy.host,
                                                          Port=str(proxy.port))
                    proxy.set_latency(args.latency)
                    _table(f"through a FaultProxy, {args.latency * 1e3:g} ms each way", via,
                           via_odbc, args, args.proxy_rounds, args.proxy_units, admin,
                           drivers, False)
            if "prune" in parts:
                label = "psycopg ledger (ledger=auto)"
                unit_us = medians[label] * 1e6 if label in medians else None
                prune(admin, args.prune_rows, unit_us, f"{label}, direct")
    print(f"load average at end {_load()}; {time.monotonic() - started:.0f} s in all")


if __name__ == "__main__":
    main()
