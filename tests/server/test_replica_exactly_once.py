"""Exactly once across promotions: the bank on a streaming-replica cluster.

A `ReplicaCluster` (a primary and a ``pg_basebackup -R`` standby on loopback) behind
libpq's and psqlODBC's multi-host access point (``target_session_attrs=read-write``).
Workers of both drivers make transfers through ``run()`` with the commit ledger
installed, while the primary is SIGKILLed and the standby promoted, over and over (the
old primary rejoins as a standby each time).

- Synchronous replication: 0 lost, 0 doubled, 0 CommitOutcomeUnknown. The workers'
  sessions commit with ``remote_apply``, and every other promotion happens while the
  standby's replay is paused (`ReplicaCluster.lag`): every COMMIT is then in flight when
  the primary dies, and the promoted standby has it. For every lost COMMIT the ledger
  decided, the test also asks what ``pg_xact_status`` says (at the end, on the last
  primary) of the transaction id that COMMIT carried, and counts how often that answer
  is wrong (the id handed out again by a promoted server), and how often the
  transaction-id path would have had to raise CommitOutcomeUnknown (a "committed"
  answer from a server that is not the one the COMMIT went to).
- Asynchronous replication: the server itself can lose acknowledged units (the standby
  had not received them when it was promoted). To make that happen rather than wait for
  it (the research saw 4 in 14,104), every other promotion comes after the primary's
  WAL sender was frozen (SIGSTOP) while units kept committing: they are acknowledged,
  and the standby never gets them. The ledger never doubles a unit, and
  every acknowledged unit that was lost is seen as such: its token is not in the
  ledger, and only then is its row missing.

CI runs 20 promotions (sync) and 8 (async); ``SYMFO_SOAK=1`` runs 100 and 40.
"""

from __future__ import annotations

import collections
import contextlib
import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from test_exactly_once import ACCOUNTS, OPENING_BALANCE, capture_logs, explain

import symfo_failover as sf
from symfo_failover.harness import ReplicaCluster
from symfo_failover.harness._server import _alive

pytestmark = pytest.mark.server

SOAK = os.environ.get("SYMFO_SOAK") == "1"
SYNC_FAILOVERS = 100 if SOAK else 20
ASYNC_FAILOVERS = 40 if SOAK else 8
POLICY = sf.RetryPolicy(deadline=60)
WORKERS = (("psycopg", 0), ("psycopg", 1), ("pyodbc", 2), ("pyodbc", 3))


def _drivers() -> tuple[tuple[str, int], ...]:
    try:
        import pyodbc

        if "PostgreSQL Unicode" in pyodbc.drivers():
            return WORKERS
    except ImportError:
        pass
    return tuple(w for w in WORKERS if w[0] == "psycopg")


@dataclass
class Out:
    returned: dict[str, str | None] = field(default_factory=dict)  # transfer -> token
    raised: dict[str, BaseException] = field(default_factory=dict)
    #: For each lost COMMIT the ledger decided: (transfer, the xid that COMMIT carried,
    #: the ledger's answer).
    resolved: list[tuple[str, str | None, str]] = field(default_factory=list)
    via: collections.Counter[str] = field(default_factory=collections.Counter)
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    failovers_seen: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    trail: dict[str, list[sf.Event]] = field(default_factory=dict)
    local: threading.local = field(default_factory=threading.local)

    def committed(self) -> int:
        with self.lock:
            return len(self.returned)

    def on_event(self, event: sf.Event) -> None:
        local = self.local
        with self.lock:
            self.events[type(event).__name__] += 1
            key = getattr(local, "transfer", None)
            if key is not None:
                self.trail.setdefault(key, []).append(event)
            if isinstance(event, sf.CommitResolved):
                self.via[event.via] += 1
                self.resolved.append((key or "?", getattr(local, "xid", None), event.status))
            if isinstance(event, sf.Reconnected) and event.failover:
                self.failovers_seen += 1


def transfer(raw: Any, out: Out, transfer_id: str, src: int, dst: int, amount: int) -> str:
    """The bank's transfer; it also stores the transaction id it ran in (the truth for
    judging what pg_xact_status says of that id later)."""
    if isinstance(raw, psycopg.Connection):
        def one(sql: str, *params: Any) -> Any:
            return raw.execute(sql, params).fetchone() if sql.startswith("SELECT") \
                else raw.execute(sql, params)
    else:
        def one(sql: str, *params: Any) -> Any:
            cur = raw.execute(sql.replace("%s", "?"), *params)
            return cur.fetchone() if sql.startswith("SELECT") else cur
    xid = str(one("SELECT pg_current_xact_id()::text")[0])
    out.local.xid = xid
    one("UPDATE accounts SET balance = balance - %s WHERE id = %s", amount, src)
    one("UPDATE accounts SET balance = balance + %s WHERE id = %s", amount, dst)
    one("INSERT INTO ledger VALUES (%s, %s, %s, %s, %s)", transfer_id, src, dst, amount, xid)
    return transfer_id


def remote_apply(raw: Any) -> None:
    """Each session's COMMIT waits until the standby has applied it."""
    raw.execute("SET synchronous_commit = remote_apply")


def worker(conninfo: str, driver: str, seed: int, stop: threading.Event, out: Out,
           configure: Any = None) -> None:
    rng = random.Random(seed)
    try:
        rc = sf.connect(conninfo, driver=driver, policy=POLICY, on_event=out.on_event,
                        configure=configure)
    except BaseException as exc:  # recorded; the test fails on it
        out.raised[f"connect-{seed}"] = exc
        return
    with rc:
        while not stop.is_set():
            transfer_id = f"{driver}-{uuid.uuid4()}"
            src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
            out.local.transfer = transfer_id
            try:
                got = rc.run(transfer, out, transfer_id, src, dst, rng.randint(1, 50))
            except Exception as exc:
                with out.lock:
                    out.raised[transfer_id] = exc
                continue
            with out.lock:
                out.returned[got] = rc.last_token


@pytest.fixture
def replica_bank(request: pytest.FixtureRequest) -> Iterator[ReplicaCluster]:
    synchronous = bool(request.param)
    with ReplicaCluster(synchronous=synchronous) as cluster:
        cluster.start()
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE accounts (id int PRIMARY KEY, balance bigint NOT NULL)")
            conn.execute("INSERT INTO accounts SELECT g, %s FROM generate_series(1, %s) g",
                         (OPENING_BALANCE, ACCOUNTS))
            # No unique constraint: a transfer stored twice shows as two rows.
            conn.execute("CREATE TABLE ledger (transfer_id text, src int, dst int, "
                         "amount int, xid text)")
        sf.install_ledger(cluster.conninfo())
        cluster.wait_synced()
        yield cluster


def run(cluster: ReplicaCluster, failovers: int, *, paused_every: int = 0,
        unsent_every: int = 0) -> tuple[Out, dict[str, Any]]:
    """The bank through ``failovers`` promotions; with ``paused_every`` N, every N-th
    happens with the standby's replay paused (the sessions commit with remote_apply);
    with ``unsent_every`` N, every N-th after units committed that the standby never
    received (asynchronous replication only)."""
    out = Out()
    configure = remote_apply if paused_every else None
    stop = threading.Event()
    threads = []
    for driver, seed in _drivers():
        conninfo = (cluster.conninfo() if driver == "psycopg"
                    else cluster.odbc_connection_string())
        threads.append(threading.Thread(
            target=worker, args=(conninfo, driver, seed, stop, out, configure),
            name=f"replica-bank-{seed}", daemon=True))
    for t in threads:
        t.start()
    transitions = []
    started = time.monotonic()
    with capture_logs():
        try:
            for i in range(failovers):
                _wait_for_traffic(out, 4)
                if paused_every and i % paused_every == 0:
                    with cluster.lag():
                        time.sleep(0.05)  # the workers' COMMITs wait on the standby
                        transitions.append(cluster.failover(rejoin=True))
                elif unsent_every and i % unsent_every == 0:
                    transitions.append(_failover_with_unsent_wal(cluster, out))
                else:
                    transitions.append(cluster.failover(rejoin=True))
            _wait_for_traffic(out, 8)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
    assert not [t.name for t in threads if t.is_alive()], "workers did not finish"
    with psycopg.connect(cluster.conninfo()) as conn:
        books = {
            "total": conn.execute("SELECT sum(balance) FROM accounts").fetchone()[0],
            "rows": dict(conn.execute(
                "SELECT transfer_id, count(*) FROM ledger GROUP BY 1").fetchall()),
            "xids": {r[0] for r in conn.execute("SELECT xid FROM ledger").fetchall()},
            "tokens": {r[0].hex for r in conn.execute(
                "SELECT token FROM symfo_failover.ledger").fetchall()},
            "flows": conn.execute(
                "SELECT a.id, a.balance - %s - coalesce((SELECT sum(amount) FROM ledger "
                "WHERE dst = a.id), 0) + coalesce((SELECT sum(amount) FROM ledger "
                "WHERE src = a.id), 0) FROM accounts a", (OPENING_BALANCE,)).fetchall(),
            # What pg_xact_status says now of each id whose COMMIT's reply was lost.
            "xact_status": {x: conn.execute("SELECT pg_xact_status(%s::xid8)", (x,)
                                            ).fetchone()[0]
                            for _, x, _ in out.resolved if x is not None},
        }
    spent = time.monotonic() - started
    downs = sorted(t.accepting_at - t.down_at for t in transitions
                   if t.accepting_at is not None and t.down_at is not None)
    books["summary"] = (f"{len(transitions)} promotions in {spent:.1f} s (kill -> writable "
                        f"median {downs[len(downs) // 2] * 1000:.0f} ms); "
                        f"{len(out.returned)} transfers returned, {len(out.raised)} raised; "
                        f"lost COMMITs decided by {dict(out.via)}; failovers seen by the "
                        f"clients {out.failovers_seen}")
    return out, books


def _failover_with_unsent_wal(cluster: ReplicaCluster, out: Out) -> Any:
    """Freeze the primary's WAL sender, let units commit (acknowledged: replication is
    asynchronous), then fail over. The frozen sender is killed once the primary's
    postmaster is gone, so that it can never send what it held."""
    primary = cluster.primary
    assert primary is not None
    with psycopg.connect(cluster.node_conninfo(primary), autocommit=True) as conn:
        senders = [r[0] for r in conn.execute("SELECT pid FROM pg_stat_replication")]
    assert senders, "the standby streams"
    postmaster = cluster.server(primary).postmaster_pid
    for pid in senders:
        os.kill(pid, signal.SIGSTOP)
    _wait_for_traffic(out, 6)

    def kill_senders_after_the_postmaster() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and postmaster is not None and _alive(postmaster):
            time.sleep(0.001)
        for pid in senders:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    killer = threading.Thread(target=kill_senders_after_the_postmaster, daemon=True)
    killer.start()
    try:
        return cluster.failover(rejoin=True)
    finally:
        killer.join(15)



def _wait_for_traffic(out: Out, transfers: int, timeout: float = 10.0) -> None:
    target = out.committed() + transfers
    deadline = time.monotonic() + timeout
    while out.committed() < target and time.monotonic() < deadline:
        time.sleep(0.005)


def xid_path_errors(out: Out, books: dict[str, Any]) -> tuple[int, int, int]:
    """Of the lost COMMITs: how often ``pg_xact_status`` of the id they carried says
    something other than the truth (the transfer's row with that id is there or not),
    how often it says "committed" of a transaction that did not commit, and how often
    it says "committed" at all (after a promotion the transaction-id path cannot trust
    that answer and raises CommitOutcomeUnknown)."""
    wrong = committed_not_ours = committed = 0
    for _, xid, _ in out.resolved:
        if xid is None:
            continue
        truth = xid in books["xids"]
        said = books["xact_status"].get(xid)
        if (said == "committed") != truth:
            wrong += 1
        if said == "committed" and not truth:
            committed_not_ours += 1
        committed += said == "committed"
    return wrong, committed_not_ours, committed


@pytest.mark.parametrize("replica_bank", [True], indirect=True, ids=["synchronous"])
def test_exactly_once_through_promotions_with_synchronous_replication(
    replica_bank: ReplicaCluster,
) -> None:
    out, books = run(replica_bank, SYNC_FAILOVERS, paused_every=2)
    wrong, not_ours, committed = xid_path_errors(out, books)
    print(f"\nsync: {books['summary']}; of {len(out.resolved)} lost COMMITs, "
          f"pg_xact_status was wrong for {wrong} ({not_ours} 'committed' that were not), "
          f"and the transaction-id path would have raised CommitOutcomeUnknown for "
          f"{committed} (a 'committed' after a promotion)")
    rows = books["rows"]
    assert not out.raised, explain(out, list(out.raised))  # 0 CommitOutcomeUnknown, 0 else
    doubled = {t: n for t, n in rows.items() if n != 1}
    assert not doubled, f"stored more than once: {doubled}"
    lost = [t for t in out.returned if t not in rows]
    assert not lost, f"acknowledged, then lost: {explain(out, lost)}"
    assert set(rows) == set(out.returned)
    assert books["total"] == ACCOUNTS * OPENING_BALANCE
    assert all(net == 0 for _, net in books["flows"])
    # Every acknowledged unit's token is in the ledger (none was made without it).
    assert all(tok is not None and tok in books["tokens"] for tok in out.returned.values())
    assert out.via["xid"] == 0
    assert out.failovers_seen >= SYNC_FAILOVERS
    # COMMITs in flight at the kill (replay paused, remote_apply): the promoted standby
    # has them, and the ledger said so.
    statuses = collections.Counter(status for _, _, status in out.resolved)
    assert statuses["committed"] > 0, statuses


@pytest.mark.parametrize("replica_bank", [False], indirect=True, ids=["asynchronous"])
def test_asynchronous_replication_can_lose_but_never_doubles(
    replica_bank: ReplicaCluster,
) -> None:
    out, books = run(replica_bank, ASYNC_FAILOVERS, unsent_every=2)
    rows, tokens = books["rows"], books["tokens"]
    lost = sorted(t for t in out.returned if t not in rows)
    seen_lost = sorted(t for t, tok in out.returned.items() if tok not in tokens)
    print(f"\nasync: {books['summary']}; acknowledged but lost by the server: "
          f"{len(lost)} of {len(out.returned)}")
    # The server lost acknowledged units (the standby never received them).
    assert lost, "no acknowledged unit was lost: the fault did not happen"
    # Never doubled, with or without replication losses.
    assert not {t: n for t, n in rows.items() if n != 1}
    # The ledger sees each lost acknowledged unit: its token is gone exactly when its
    # row is (the token was written in the unit's own transaction).
    assert seen_lost == lost
    # Nothing stored that was not asked for, and the books balance (a lost transfer is
    # lost whole).
    assert set(rows) <= set(out.returned) | set(out.raised)
    assert books["total"] == ACCOUNTS * OPENING_BALANCE
    assert all(net == 0 for _, net in books["flows"])
    # Only a COMMIT in flight with no server to ask may end unknown; with the ledger a
    # reachable server always decides.
    assert not [t for t, e in out.raised.items()
                if not isinstance(e, sf.CommitOutcomeUnknown)], explain(out, list(out.raised))
    assert out.via["xid"] == 0


# --- the library on a replica cluster ---------------------------------------------------------


@pytest.fixture
def replica() -> Iterator[ReplicaCluster]:
    with ReplicaCluster(synchronous=False) as cluster:
        cluster.start()
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE items (name text)")
        cluster.wait_synced()
        yield cluster


def test_the_probe_tells_a_standby_from_a_primary(replica: ReplicaCluster) -> None:
    from symfo_failover.harness import probe

    assert replica.primary is not None
    assert replica.standby is not None
    primary = replica.server(replica.primary)
    standby = replica.server(replica.standby)
    assert probe(primary.host, primary.port).standby is False
    assert probe(standby.host, standby.port).standby is True


@pytest.mark.parametrize("driver", ["psycopg", pytest.param("pyodbc", marks=pytest.mark.odbc)])
def test_a_first_connect_while_only_the_standby_answers_waits_for_its_promotion(
    replica: ReplicaCluster, driver: str,
) -> None:
    conninfo = replica.conninfo() if driver == "psycopg" else replica.odbc_connection_string()
    assert replica.primary is not None
    assert replica.standby is not None
    replica.server(replica.primary).kill_postmaster()
    events: list[sf.Event] = []
    got: list[Any] = []

    def connect() -> None:
        try:
            got.append(sf.connect(conninfo, driver=driver, policy=POLICY,
                                  on_event=events.append))
        except BaseException as exc:  # recorded; asserted below
            got.append(exc)

    opener = threading.Thread(target=connect, daemon=True)
    opener.start()
    time.sleep(0.5)  # the connect meets only the standby for a while
    assert not got, f"connect() did not wait for a primary: {got}"
    replica.server(replica.standby).promote()
    opener.join(30)
    assert len(got) == 1, got
    assert isinstance(got[0], sf.ResilientConnection), got
    with got[0] as rc:
        assert rc.session is not None
        assert not rc.session.in_recovery
        rc.run(lambda raw: raw.execute("INSERT INTO items VALUES ('after promotion')"))
    failures = [e for e in events if isinstance(e, sf.FailureDetected)]
    assert failures
    assert all(e.failure.retryable for e in failures)


def test_a_read_write_unit_on_a_standby_is_a_wrong_server(replica: ReplicaCluster) -> None:
    # One host, the standby: a read-write unit reconnects (a wrong server, not the
    # application's error) until the policy runs out; a read-only unit runs there.
    assert replica.standby is not None
    conninfo = replica.node_conninfo(replica.standby)
    events: list[sf.Event] = []
    with sf.connect(conninfo, policy=sf.RetryPolicy(deadline=0.5), on_event=events.append
                    ) as rc:
        assert rc.session is not None
        assert rc.session.in_recovery
        with pytest.raises(sf.RetriesExhausted, match="in recovery"):
            rc.run(lambda raw: raw.execute("INSERT INTO items VALUES ('never')"))
        rc.read_only = True
        assert rc.run(lambda raw: raw.execute("SELECT count(*) FROM items").fetchone()[0]) == 0
    wrong = [e for e in events if isinstance(e, sf.FailureDetected)]
    assert wrong
    assert all(e.failure.sqlstate == "25006" for e in wrong)


@pytest.mark.parametrize("kind", ["psycopg_pool", pytest.param("odbc_pool",
                                                               marks=pytest.mark.odbc)])
def test_a_pool_on_a_multi_host_string_follows_the_promotion(replica: ReplicaCluster,
                                                             kind: str) -> None:
    if kind == "psycopg_pool":
        pool: Any = sf.FailoverPool(replica.conninfo(), min_size=2, open=True, policy=POLICY)
    else:
        pool = sf.OdbcFailoverPool(replica.odbc_connection_string(), min_size=2,
                                   policy=POLICY)
    insert = "INSERT INTO items VALUES (%s)" if kind == "psycopg_pool" else \
        "INSERT INTO items VALUES (?)"

    def add(raw: Any, name: str) -> None:
        raw.execute(insert, (name,) if kind == "psycopg_pool" else name)

    with pool:
        pool.run(add, "before")
        replica.failover(rejoin=False)
        for i in range(3):
            pool.run(add, f"after-{i}")
        assert pool.failover_stats().failovers >= 1
    with psycopg.connect(replica.conninfo()) as conn:
        names = sorted(r[0] for r in conn.execute("SELECT name FROM items"))
    # Asynchronous replication: "before" was acknowledged and is there once the standby
    # had it; everything after the promotion is there exactly once.
    assert [n for n in names if n.startswith("after")] == ["after-0", "after-1", "after-2"]
