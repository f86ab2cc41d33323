"""OdbcFailoverPool against real servers (psqlODBC): checkout, run(), a failover noticed
once, a terminated backend that is not a failover, size limits, close, no leaks."""

from __future__ import annotations

import threading
import time
from typing import Any

import psycopg
import pyodbc
import pytest
from resilient_helpers import Recorder, Unit, conninfo, rows

import symfo_failover as sf
from symfo_failover._odbc_pool import PoolTimeout
from symfo_failover.harness import LocalCluster

pytestmark = [pytest.mark.server, pytest.mark.odbc]

FAST = sf.RetryPolicy(deadline=30)
START = "SELECT pg_postmaster_start_time()::text"


def pool_of(cluster: LocalCluster, **kwargs: Any) -> sf.OdbcFailoverPool:
    kwargs.setdefault("policy", FAST)
    return sf.OdbcFailoverPool(conninfo("pyodbc", cluster), **kwargs)


def client_backends(cluster: LocalCluster) -> list[int]:
    """The pids of the client sessions on the server, other than the one asking."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        found = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
            "AND pid <> pg_backend_pid()").fetchall()
    return sorted(int(r[0]) for r in found)


def settle(cluster: LocalCluster, count: int) -> list[int]:
    """The client backends once there are ``count`` of them (a session ends on the
    server a moment after the client closed it); what there is after 20 s otherwise."""
    deadline = time.monotonic() + 20
    while True:
        pids = client_backends(cluster)
        if len(pids) == count or time.monotonic() > deadline:
            return pids
        time.sleep(0.05)


def counter(cluster: LocalCluster) -> int:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT n FROM counter").fetchone()
        assert row is not None
        return int(row[0])


def one(raw: Any, sql: str, *params: Any) -> Any:
    return raw.execute(sql, *params).fetchone()[0]


# --- the steady state ---------------------------------------------------------------


def test_checkout_commits_rolls_back_and_gives_back(
    cluster: LocalCluster, capfd: pytest.CaptureFixture[str]
) -> None:
    rec = Recorder()
    with pool_of(cluster, min_size=2, max_size=3, on_event=rec) as pool:
        pool.wait()
        pooled = settle(cluster, 2)
        with pool.connection() as raw:
            assert raw.autocommit is False
            raw.execute("INSERT INTO ledger VALUES (?, 1)", "kept")
            pid = one(raw, "SELECT pg_backend_pid()")
        assert pid in pooled
        assert rows(cluster, "ledger", "kept") == 1, "a block that ends is committed"
        def undone() -> None:
            with pool.connection() as raw:
                raw.execute("INSERT INTO ledger VALUES (?, 1)", "undone")
                assert one(raw, "SELECT pg_backend_pid()") == pid, "the idle one is reused"
                raise ZeroDivisionError

        with pytest.raises(ZeroDivisionError):
            undone()
        assert rows(cluster, "ledger", "undone") == 0, "a block that raises is rolled back"
        unit = Unit("by run")
        assert pool.run(unit) == "done by run"
        assert unit.runs == 1
        assert rows(cluster, "ledger", "by run") == 1
        with pool.connection() as raw:
            assert raw.autocommit is False, "run() gives the connection back as it was"
        assert settle(cluster, 2) == pooled, "no connection was made or lost"
        stats = pool.failover_stats()
        assert (stats.failovers, stats.connections_replaced, stats.requests_met_dead) == (0, 0, 0)
        assert stats.server_started is not None
    assert not rec.of(sf.PoolFailover)
    assert not rec.of(sf.PoolConnectionReplaced)
    out, err = capfd.readouterr()
    assert (out, err) == ("", ""), "the pool prints nothing"


def test_configure_runs_on_each_new_connection(cluster: LocalCluster) -> None:
    configured: list[int] = []

    def configure(raw: Any) -> None:
        configured.append(one(raw, "SELECT pg_backend_pid()"))
        raw.execute("SET application_name = 'configured'")

    with pool_of(cluster, min_size=2, configure=configure) as pool:
        pool.wait()
        with pool.connection() as raw:
            assert one(raw, "SELECT current_setting('application_name')") == "configured"
        assert pool.run(lambda c: one(c, "SELECT current_setting('application_name')")) \
            == "configured"
    assert len(configured) == 2


# --- a failover, noticed once ---------------------------------------------------------


def test_run_replays_across_a_switchover_exactly_once(cluster: LocalCluster) -> None:
    rec = Recorder()
    with pool_of(cluster, min_size=2, on_event=rec) as pool:
        pool.wait()
        before = pool.run(lambda c: one(c, START))
        cluster.switchover()
        unit = Unit("across")
        assert pool.run(unit) == "done across"
        assert pool.run(lambda c: one(c, START)) != before
    assert rows(cluster, "ledger", "across") == 1
    assert counter(cluster) == 1, "committed exactly once"
    assert unit.runs == 1, "the first try failed at BEGIN, before the unit"
    assert len(rec.of(sf.UnitReplayed)) == 1
    assert len(rec.of(sf.PoolFailover)) == 1


def test_a_switchover_is_noticed_once_and_every_connection_replaced(
    cluster: LocalCluster
) -> None:
    rec = Recorder()
    with pool_of(cluster, min_size=4, max_size=4, on_event=rec) as pool:
        pool.wait()
        assert len(settle(cluster, 4)) == 4
        with pool.connection() as raw:
            old_start = one(raw, START)
        def meets_the_failover() -> None:
            with pool.connection() as held:
                cluster.switchover()
                held.execute("SELECT 1").fetchone()

        with pytest.raises(pyodbc.Error):
            meets_the_failover()
        new_starts = set()
        for _ in range(12):
            with pool.connection() as raw:
                new_starts.add(one(raw, START))
        pool.wait()
        stats = pool.failover_stats()
        assert new_starts == {stats.server_started}
        assert old_start not in new_starts, "nothing to the old server after the failover"
        assert stats.failovers == 1
        assert stats.connections_replaced == 4, "the one that met it and the 3 idle ones"
        assert stats.requests_met_dead == 1, "only the request holding the connection"
        [failover] = rec.of(sf.PoolFailover)
        assert (failover.reason, failover.closed_idle) == ("new server", 3)
        assert failover.previous_server_started == old_start
        replaced = [e.reason for e in rec.of(sf.PoolConnectionReplaced)]
        assert sorted(replaced) == ["old server"] * 3 + ["returned broken"]
        assert len(settle(cluster, 4)) == 4, "the pool is full again"


def test_a_failover_with_the_server_down_for_a_while(cluster: LocalCluster) -> None:
    rec = Recorder()
    with pool_of(cluster, min_size=3, on_event=rec) as pool:
        pool.wait()
        cluster.failover(switch_delay=0.5)
        units = [Unit(f"u{i}") for i in range(5)]
        for unit in units:
            pool.run(unit)
        pool.wait()
        stats = pool.failover_stats()
    assert stats.failovers == 1
    assert counter(cluster) == 5
    assert all(rows(cluster, "ledger", u.entry) == 1 for u in units)
    assert len(rec.of(sf.PoolFailover)) == 1
    assert len(rec.of(sf.PoolRefilled)) == 1


# --- one dead backend is not a failover -----------------------------------------------


def terminate(cluster: LocalCluster, pid: int) -> None:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))


def test_a_terminated_backend_costs_that_connection_only(cluster: LocalCluster) -> None:
    rec = Recorder()
    with pool_of(cluster, min_size=3, max_size=3, on_event=rec) as pool:
        pool.wait()
        pooled = settle(cluster, 3)
        with pool.connection() as raw:
            victim = one(raw, "SELECT pg_backend_pid()")
            start = one(raw, START)
        terminate(cluster, victim)
        with pytest.raises(pyodbc.Error), pool.connection() as raw:  # the same one (LIFO)
            raw.execute("SELECT 1").fetchone()
        for _ in range(6):
            with pool.connection() as raw:
                assert one(raw, START) == start
        stats = pool.failover_stats()
        assert (stats.failovers, stats.connections_replaced, stats.requests_met_dead) == (0, 1, 1)
        now = settle(cluster, 3)
        assert len(set(now) & set(pooled)) == 2, "the other two were kept"
        # The same through run(): the unit goes on on another connection.
        with pool.connection() as raw:
            victim = one(raw, "SELECT pg_backend_pid()")
        terminate(cluster, victim)
        unit = Unit("after terminate")
        pool.run(unit)
        stats = pool.failover_stats()
        assert (stats.failovers, stats.connections_replaced, stats.requests_met_dead) == (0, 2, 2)
    assert rows(cluster, "ledger", "after terminate") == 1
    assert not rec.of(sf.PoolFailover)
    assert [e.reason for e in rec.of(sf.PoolConnectionReplaced)] == ["returned broken"] * 2


# --- limits, threads, close -----------------------------------------------------------


def test_max_size_holds_under_8_threads(cluster: LocalCluster) -> None:
    lock = threading.Lock()
    inside = [0]
    most = [0]
    errors: list[BaseException] = []

    def unit(raw: Any) -> None:
        with lock:
            inside[0] += 1
            most[0] = max(most[0], inside[0])
        try:
            raw.execute("UPDATE counter SET n = n + 1")
            raw.execute("SELECT pg_sleep(0.01)")
        finally:
            with lock:
                inside[0] -= 1

    with pool_of(cluster, min_size=1, max_size=3) as pool:

        def worker() -> None:
            try:
                for i in range(5):
                    if i % 2:
                        pool.run(unit)
                    else:
                        with pool.connection() as raw:
                            unit(raw)
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=worker) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(client_backends(cluster)) <= 3
    assert not errors
    assert 1 <= most[0] <= 3
    assert counter(cluster) == 40


def test_a_request_that_gets_no_connection_in_time(cluster: LocalCluster) -> None:
    with pool_of(cluster, min_size=0, max_size=1) as pool, pool.connection():
        with pytest.raises(PoolTimeout) as caught, pool.connection(timeout=0.2):
            pass  # pragma: no cover - never reached
        assert isinstance(caught.value, pyodbc.OperationalError)
        assert "max_size" in str(caught.value)
        assert caught.value.failure.retryable is False


def test_close_with_connections_checked_out_leaks_nothing(cluster: LocalCluster) -> None:
    pool = pool_of(cluster, min_size=3, max_size=4)
    pool.wait()
    with pool.connection() as held:
        pool.close()
        assert len(settle(cluster, 1)) == 1, "the idle ones were closed at once"
        assert one(held, "SELECT 1") == 1, "the one in use works until it comes back"
    assert settle(cluster, 0) == [], "and is closed when it comes back"
    pool.close()  # idempotent
    with pytest.raises(pyodbc.ProgrammingError, match="closed"), pool.connection():
        pass  # pragma: no cover - never reached
    with pytest.raises(pyodbc.ProgrammingError, match="closed"):
        pool.run(lambda c: None)


def test_no_backend_left_after_a_failover_and_close(cluster: LocalCluster) -> None:
    with pool_of(cluster, min_size=2, max_size=4) as pool:
        pool.wait()
        cluster.switchover()
        for i in range(4):
            pool.run(Unit(f"x{i}"))
        pool.wait()
    assert settle(cluster, 0) == []
    assert counter(cluster) == 4


def test_nested_run_is_refused(cluster: LocalCluster) -> None:
    with pool_of(cluster, min_size=1) as pool:
        with pytest.raises(sf.UnitContractError) as caught:
            pool.run(lambda c: pool.run(lambda d: None))
        assert caught.value.rule == "nested-run"
        assert pool.run(lambda c: one(c, "SELECT 2")) == 2
