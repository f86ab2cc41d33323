"""ResilientConnection against real servers: lost COMMITs, failovers, passthrough, bad input.

Every test runs with psycopg, with psycopg's AsyncResilientConnection (the
"psycopg-async" flavour, see resilient_helpers.connect) and with pyodbc + psqlODBC.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pyodbc
import pytest
from resilient_helpers import (
    DRIVERS,
    PSYCOPG_FLAVOURS,
    Recorder,
    Unit,
    connect,
    conninfo,
    exe,
    rows,
)

import symfo_failover as sf
from symfo_failover.harness import FaultProxy, LocalCluster

pytestmark = pytest.mark.server

FAST = sf.RetryPolicy(deadline=30)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def proxy(cluster: LocalCluster) -> Iterator[FaultProxy]:
    with FaultProxy(cluster.host, cluster.port) as px:
        yield px


# --- 2. lost COMMIT replies -----------------------------------------------------------


def test_commit_reply_lost_after_the_server_committed(
    driver: str, cluster: LocalCluster, proxy: FaultProxy
) -> None:
    rec = Recorder()
    with connect(conninfo(driver, cluster, proxy.host, proxy.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        proxy.arm_commit_drop()
        unit = Unit("committed")
        assert rc.run(unit) == "done committed"
    assert unit.runs == 1, "a unit that committed must not run again"
    assert rows(cluster, "ledger", "committed") == 1
    [resolved] = rec.of(sf.CommitResolved)
    assert (resolved.status, resolved.outcome) == ("committed", "returned")
    assert proxy.stats.commits_dropped == 1
    assert not rec.of(sf.UnitReplayed)


def test_commit_never_reached_the_server(
    driver: str, cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """The COMMIT is withheld and the old session ends on the server: it ran again."""
    rec = Recorder()

    def end_old_session(event: sf.Event) -> None:
        # Before the library reconnects: the held server side goes away, the server
        # rolls the transaction back. The new session finds it aborted.
        assert proxy.release_held() == 1
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            for _ in range(200):
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE state LIKE 'idle in%'"
                ).fetchone()
                if row is not None and row[0] == 0:
                    return
                time.sleep(0.01)
        raise AssertionError("the old session did not end")

    rec.on[sf.FailureDetected] = end_old_session
    with connect(conninfo(driver, cluster, proxy.host, proxy.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        proxy.arm_commit_hold()
        unit = Unit("aborted")
        assert rc.run(unit) == "done aborted"
    assert unit.runs == 2
    assert rows(cluster, "ledger", "aborted") == 1
    [resolved] = rec.of(sf.CommitResolved)
    assert (resolved.status, resolved.outcome) == ("aborted", "replayed")
    assert not resolved.terminated_old_session
    assert len(rec.of(sf.UnitReplayed)) == 1


def test_commit_held_while_the_old_session_lives_on(
    driver: str, cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """A network break: the old session is idle in its transaction, holding its xid and
    its locks. It must be ended before the answer is trusted, and stay ended."""
    rec = Recorder()
    with connect(conninfo(driver, cluster, proxy.host, proxy.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        proxy.arm_commit_hold()
        unit = Unit("held")
        assert rc.run(unit) == "done held"
        # The withheld COMMIT arrives late: the old session is gone, nothing happens.
        proxy.release_held()
        time.sleep(0.1)
    assert unit.runs == 2
    assert rows(cluster, "ledger", "held") == 1
    [resolved] = rec.of(sf.CommitResolved)
    assert (resolved.status, resolved.outcome) == ("aborted", "replayed")
    assert resolved.terminated_old_session
    [reconnected] = rec.of(sf.Reconnected)
    assert reconnected.ended_old_session
    assert not reconnected.failover


def test_commit_outcome_unknown_when_the_server_cannot_say(
    driver: str, cluster: LocalCluster, proxy: FaultProxy
) -> None:
    """A locked-down server where the application's role may not call pg_xact_status."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE ROLE app LOGIN")
        conn.execute("GRANT ALL ON ledger, counter TO app")
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_xact_status(xid8) FROM PUBLIC")
    rec = Recorder()
    info = conninfo(driver, cluster, proxy.host, proxy.port, user="app")
    with connect(info, driver=driver, policy=FAST, on_event=rec) as rc:
        proxy.arm_commit_drop()
        unit = Unit("unknown")
        with pytest.raises(sf.CommitOutcomeUnknown) as raised:
            rc.run(unit)
    err = raised.value
    assert isinstance(err, psycopg.OperationalError if driver != "pyodbc"
                      else pyodbc.OperationalError)
    assert err.xid is not None
    assert err.xid in str(err)
    assert not sf.classify(err).retryable
    assert unit.runs == 1, "an unknown outcome is never run again"
    assert rows(cluster, "ledger", "unknown") == 1  # it did commit; the library did not guess
    assert rec.of(sf.CommitResolved)[0].outcome == "raised"


def test_commit_outcome_unknown_when_the_server_never_returns(
    driver: str, cluster: LocalCluster, proxy: FaultProxy
) -> None:
    rec = Recorder()
    rec.on[sf.FailureDetected] = lambda event: cluster.stop_both("immediate")
    policy = sf.RetryPolicy(deadline=1.0)
    with connect(conninfo(driver, cluster, proxy.host, proxy.port), driver=driver,
                 policy=policy, on_event=rec) as rc:
        proxy.arm_commit_drop()
        with pytest.raises(sf.CommitOutcomeUnknown, match="unknown"):
            rc.run(Unit("lost"))
    assert rec.of(sf.GaveUp)


def test_read_only_units_need_no_transaction_id(
    driver: str, cluster: LocalCluster, proxy: FaultProxy
) -> None:
    rec = Recorder()
    with connect(conninfo(driver, cluster, proxy.host, proxy.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        rc.read_only = True

        def read(raw: Any) -> Any:
            return exe(raw, "SELECT (pg_current_xact_id_if_assigned() IS NULL)::text, "
                            "current_setting('transaction_read_only')").fetchone()

        proxy.arm_commit_drop()
        assert tuple(rc.run(read)) == ("true", "on")
    [resolved] = rec.of(sf.CommitResolved)
    assert (resolved.xid, resolved.status) == (None, "no transaction id")


# --- failovers, conflicts, session state ------------------------------------------------


@pytest.mark.parametrize("scenario", ["switchover", "crash", "node_down", "failover"])
def test_a_unit_survives_each_scenario_of_the_guide(
    driver: str, cluster: LocalCluster, scenario: str
) -> None:
    rec = Recorder()
    configured: list[object] = []
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST, on_event=rec, configure=configured.append) as rc:
        before = rc.session
        assert before is not None

        def fault(raw: Any) -> None:
            exe(raw, "SELECT 1")
            if scenario == "failover":
                cluster.failover(switch_delay=0.2, startup_delay=0.3)
            else:
                getattr(cluster, scenario)()
                if scenario in ("crash", "node_down"):
                    threading.Timer(0.3, cluster.start).start()

        unit = Unit(scenario)

        def unit_with_fault(raw: Any) -> str:
            if unit.runs == 0:
                fault(raw)
            return unit(raw)

        assert rc.run(unit_with_fault) == f"done {scenario}"
        after = rc.session
    assert unit.runs == 2
    assert rows(cluster, "ledger", scenario) == 1
    assert after is not None
    assert after.server_started != before.server_started
    [reconnected] = rec.of(sf.Reconnected)
    assert reconnected.failover, "a restart is a failover, not a blip"
    assert len(configured) == 2, "configure runs on every new session"
    assert rec.of(sf.FailureDetected)[0].phase == "unit"


def test_a_proxy_cut_is_a_blip_not_a_failover(
    driver: str, cluster: LocalCluster, proxy: FaultProxy
) -> None:
    rec = Recorder()
    with connect(conninfo(driver, cluster, proxy.host, proxy.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        unit = Unit("cut")

        def cut_once(raw: Any) -> str:
            if unit.runs == 0:
                exe(raw, "SELECT 1")
                proxy.cut()
            return unit(raw)

        rc.run(cut_once)
    [reconnected] = rec.of(sf.Reconnected)
    assert not reconnected.failover
    assert rows(cluster, "ledger", "cut") == 1


@pytest.mark.parametrize("code", ["40001", "40P01"])
def test_conflicts_run_again_on_the_same_session(
    driver: str, cluster: LocalCluster, code: str
) -> None:
    rec = Recorder()
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        pids: list[int] = []
        unit = Unit(code)

        def conflicting(raw: Any) -> str:
            pids.append(int(exe(raw, "SELECT pg_backend_pid()").fetchone()[0]))
            if len(pids) == 1:
                exe(raw, "INSERT INTO ledger VALUES ('partial', 0)")
                exe(raw, f"DO $$ BEGIN RAISE EXCEPTION 'conflict' USING ERRCODE = '{code}'; "
                         "END $$")
            return unit(raw)

        rc.run(conflicting)
    assert len(pids) == 2
    assert pids[0] == pids[1]
    assert rows(cluster, "ledger", "partial") == 0, "the first try was rolled back"
    assert rows(cluster, "ledger", code) == 1
    assert not rec.of(sf.Reconnected)
    assert [e.reason for e in rec.of(sf.UnitReplayed)] == ["transaction_conflict"]


def test_a_real_deadlock_is_run_again(driver: str, cluster: LocalCluster) -> None:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE acct (id int PRIMARY KEY, n int)")
        conn.execute("INSERT INTO acct VALUES (1, 0), (2, 0)")
    barrier = threading.Barrier(2, timeout=10)
    errors: list[BaseException] = []

    def worker(first: int, second: int) -> None:
        try:
            with connect(conninfo(driver, cluster, cluster.host, cluster.port),
                         driver=driver, policy=FAST) as rc:
                tries = 0

                def unit(raw: Any) -> None:
                    nonlocal tries
                    tries += 1
                    exe(raw, "UPDATE acct SET n = n + 1 WHERE id = %s", first)
                    if tries == 1:
                        barrier.wait()
                    exe(raw, "UPDATE acct SET n = n + 1 WHERE id = %s", second)

                rc.run(unit)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=a) for a in ((1, 2), (2, 1))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert not errors, errors
    with psycopg.connect(cluster.conninfo()) as conn:
        assert conn.execute("SELECT sum(n) FROM acct").fetchone() == (4,)


def test_a_lost_prepared_statement_runs_again_once_on_a_new_session(
    driver: str, cluster: LocalCluster
) -> None:
    rec = Recorder()
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        rc.autocommit = True
        rc.execute("PREPARE one AS SELECT 1")
        assert rc.run(lambda raw: exe(raw, "EXECUTE one").fetchone()[0]) == 1
        cluster.switchover()
        runs = 0

        def use_it(raw: Any) -> Any:
            nonlocal runs
            runs += 1
            return exe(raw, "EXECUTE one").fetchone()

        with pytest.raises((psycopg.Error, pyodbc.Error)) as raised:
            rc.run(use_it)
    assert sf.classify(raised.value).sqlstate == "26000"
    assert not isinstance(raised.value, sf.FailoverError)
    assert runs == 2, "run again once on the new session, then raised"


def test_session_state_is_restored_on_a_new_session(driver: str, cluster: LocalCluster) -> None:
    settings: list[Any] = []

    def configure(raw: Any) -> None:
        exe(raw, "SET application_name = 'billing'")

    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST, configure=configure) as rc:
        rc.isolation_level = "serializable"

        def show(raw: Any) -> tuple[str, str, str]:
            row = exe(raw, "SELECT current_setting('transaction_isolation'), "
                           "current_setting('transaction_read_only'), "
                           "current_setting('application_name')").fetchone()
            return (row[0], row[1], row[2])

        settings.append(rc.run(show))
        cluster.switchover()
        settings.append(rc.run(show))
        rc.read_only = True
        settings.append(rc.run(show))
        # Passthrough statements see the tracked state too.
        rc.read_only = False
        cluster.switchover()
        if driver == "pyodbc":
            with pytest.raises(pyodbc.Error) as lost:
                rc.execute("SELECT 1")
            assert lost.value.failure.kind is sf.Kind.CONNECTION_LOST  # type: ignore[attr-defined]
        else:  # psycopg: the idle session the server closed is replaced before sending
            rc.execute("SELECT 1")
            rc.rollback()
        row = rc.execute("SHOW transaction_isolation").fetchone()
        rc.rollback()
    assert settings == [
        ("serializable", "off", "billing"),
        ("serializable", "off", "billing"),
        ("serializable", "on", "billing"),
    ]
    assert row[0] == "serializable"


# --- the DB-API passthrough ---------------------------------------------------------------


def test_passthrough_keeps_driver_types_and_never_runs_a_statement_again(
    driver: str, cluster: LocalCluster
) -> None:
    rec = Recorder()
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST, on_event=rec, autocommit=True) as rc:
        assert rc.autocommit is True
        rc.execute("CREATE TABLE uniq (id int PRIMARY KEY)")
        rc.execute("INSERT INTO uniq VALUES (1)")
        dup = psycopg.errors.UniqueViolation if driver != "pyodbc" else pyodbc.IntegrityError
        with pytest.raises(dup) as raised:
            rc.execute("INSERT INTO uniq VALUES (1)")
        assert raised.value.failure.sqlstate == "23505"  # type: ignore[attr-defined]
        # Inside run() the application's errors keep their types as well.
        with pytest.raises(dup):
            rc.run(lambda raw: exe(raw, "INSERT INTO uniq VALUES (1)"))

        old = rc.connection
        cluster.switchover()
        if driver == "pyodbc":
            # ODBC shows no socket: the closed session is found by sending on it.
            with pytest.raises(pyodbc.Error) as raised:
                rc.execute("INSERT INTO uniq VALUES (2)")
            assert raised.value.failure.kind is sf.Kind.CONNECTION_LOST  # type: ignore[attr-defined]
            # Not run again by the library: the row is not there.
            assert rc.execute("SELECT count(*) FROM uniq WHERE id = 2").fetchone()[0] == 0
        else:
            # libpq has read the server's goodbye on the idle session: the statement was
            # never sent on it, and goes to a new session instead, once.
            rc.execute("INSERT INTO uniq VALUES (2)")
            assert rc.execute("SELECT count(*) FROM uniq WHERE id = 2").fetchone()[0] == 1
        assert rc.connection is not old
        cur = rc.cursor()
        cur.execute("SELECT 1")
        assert cur.fetchone()[0] == 1
        rc.commit()
        rc.rollback()
    assert rc.closed
    with pytest.raises((psycopg.OperationalError, pyodbc.ProgrammingError)):
        rc.execute("SELECT 1")


def test_rollback_on_a_lost_session_is_quiet(driver: str, cluster: LocalCluster) -> None:
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST) as rc:
        rc.execute("SELECT 1")  # opens a transaction: its loss must be seen, not hidden
        cluster.switchover()
        with pytest.raises((psycopg.OperationalError, pyodbc.Error)) as lost:
            rc.execute("SELECT 1")
        assert lost.value.failure.kind is sf.Kind.CONNECTION_LOST  # type: ignore[attr-defined]
        rc.rollback()
        assert rc.execute("SELECT 2").fetchone()[0] == 2


def test_an_idle_session_the_server_closed_is_replaced_before_a_statement_is_sent(
    driver: str, cluster: LocalCluster
) -> None:
    """The first statement after a switchover on an idle autocommit session, or on one
    whose transaction was ended, goes to a new session (psycopg: the socket says the
    server closed it); inside an open passthrough transaction the loss is raised."""
    if driver == "pyodbc":
        pytest.skip("ODBC shows no socket to look at: the loss is seen on use")
    rec = Recorder()
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST, on_event=rec) as rc:
        first = rc.execute("SELECT pg_backend_pid()").fetchone()[0]
        rc.commit()
        cluster.switchover()
        assert rc.execute("SELECT pg_backend_pid()").fetchone()[0] != first
        rc.commit()
        assert not [e for e in rec.events if isinstance(e, sf.FailureDetected)]
        rc.execute("SELECT 1")
        cluster.switchover()
        with pytest.raises(psycopg.OperationalError) as lost:
            rc.execute("SELECT 2")
        assert lost.value.failure.kind is sf.Kind.CONNECTION_LOST  # type: ignore[attr-defined]


# --- bad input and giving up -------------------------------------------------------------


def test_wrong_password_fails_at_once(driver: str) -> None:
    rec = Recorder()
    with LocalCluster(password="right") as cl:
        cl.start()
        info = conninfo(driver, cl, password="wrong")
        with pytest.raises(psycopg.OperationalError if driver != "pyodbc"
                           else pyodbc.Error) as raised:
            connect(info, driver=driver, on_event=rec)
    assert not isinstance(raised.value, sf.RetriesExhausted)
    assert not raised.value.failure.retryable  # type: ignore[attr-defined]
    # No retry loop: one failure, never a wait for the policy's deadline.
    assert len(rec.of(sf.FailureDetected)) == 1
    assert not rec.of(sf.ReconnectAttempt)
    assert not rec.of(sf.GaveUp)


def test_a_missing_database_fails_at_once(driver: str, cluster: LocalCluster) -> None:
    """A trust server: it says the database is missing, and the message says only that."""
    rec = Recorder()
    info = conninfo(driver, cluster, dbname="nosuchdb")
    with pytest.raises(psycopg.OperationalError if driver != "pyodbc" else pyodbc.Error
                       ) as raised:
        connect(info, driver=driver, on_event=rec)
    failure = raised.value.failure  # type: ignore[attr-defined]
    assert failure.rule == "connect failed, server up"
    assert "3D000" in failure.message
    assert failure.sqlstate == "3D000"
    assert failure.condition == "invalid_catalog_name"
    assert "connection refused" not in failure.message.lower()
    assert "28P01" not in failure.message
    assert len(rec.of(sf.FailureDetected)) == 1


@pytest.mark.parametrize("driver", PSYCOPG_FLAVOURS)
@pytest.mark.parametrize("bad", ["port=notaport", "bogus_option=1"])
def test_an_invalid_connection_string_fails_at_once(driver: str, bad: str) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        connect(f"host=127.0.0.1 {bad}", driver=driver)


@pytest.mark.odbc
def test_an_unknown_odbc_driver_fails_at_once() -> None:
    with pytest.raises(pyodbc.Error) as raised:
        sf.connect("Driver={No Such Driver};Server=127.0.0.1;Port=1", driver="pyodbc")
    assert not raised.value.failure.retryable  # type: ignore[attr-defined]


def test_a_server_that_never_comes_back_gives_up_at_the_deadline(
    driver: str, cluster: LocalCluster
) -> None:
    rec = Recorder()
    # A fake clock that only the policy's waits move: the deadline is reached by the
    # policy's own arithmetic, never by how fast this machine is.
    now = [0.0]
    waits: list[float] = []

    def sleep(seconds: float) -> None:
        waits.append(seconds)
        now[0] += seconds

    policy = sf.RetryPolicy(deadline=1.0, clock=lambda: now[0], sleep=sleep,
                            random=lambda: 0.0)
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=policy, on_event=rec) as rc:
        cluster.stop_both()
        with pytest.raises(sf.RetriesExhausted) as raised:
            rc.run(Unit("never"))
    err = raised.value
    assert isinstance(err, psycopg.OperationalError if driver != "pyodbc"
                      else pyodbc.OperationalError)
    # Every wait but the last was the policy's backoff; the last try is at the deadline.
    assert err.attempts == len(waits) + 1
    assert waits[:4] == [0.02, 0.04, 0.08, 0.16]
    assert sum(waits) == pytest.approx(policy.deadline)
    assert err.elapsed == pytest.approx(policy.deadline)
    assert err.failure.kind is sf.Kind.CONNECT_FAILED
    assert "deadline 1.0 s" in str(err)
    assert str(cluster.port) in str(err)
    assert "password" not in str(err).lower()
    [gave_up] = rec.of(sf.GaveUp)
    assert gave_up.attempts == err.attempts
    # connect() itself gives up the same way.
    with pytest.raises(sf.RetriesExhausted):
        connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                policy=sf.RetryPolicy(deadline=1.0, clock=lambda: now[0], sleep=sleep))


def test_run_refuses_to_start_inside_an_open_passthrough_transaction(
    driver: str, cluster: LocalCluster
) -> None:
    with connect(conninfo(driver, cluster, cluster.host, cluster.port), driver=driver,
                 policy=FAST) as rc:
        assert rc.autocommit is False
        rc.execute("INSERT INTO ledger VALUES ('passthrough', 1)")
        with pytest.raises(sf.UnitContractError, match="open passthrough transaction") as raised:
            rc.run(Unit("inside"))
        assert raised.value.rule == "open-transaction"
        rc.rollback()
        assert rc.run(Unit("after")) == "done after"
        # Units and passthrough transactions alternate freely once each is ended.
        rc.execute("INSERT INTO ledger VALUES ('passthrough', 2)")
        rc.commit()
        assert rc.run(Unit("again")) == "done again"
    assert rows(cluster, "ledger", "inside") == 0
    assert rows(cluster, "ledger", "passthrough") == 1
    assert rows(cluster, "ledger", "after") == rows(cluster, "ledger", "again") == 1


@pytest.mark.japanese
def test_a_japanese_speaking_cluster_changes_nothing(driver: str, ja_locale: str) -> None:
    """No decision reads message text: the same faults against a server that answers in
    Japanese give the same outcomes."""
    rec = Recorder()
    with LocalCluster(lc_messages=ja_locale) as cl:
        cl.start()
        with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (id text, amount int)")
            conn.execute("CREATE TABLE counter (n int)")
            conn.execute("INSERT INTO counter VALUES (0)")
            assert conn.execute("SHOW lc_messages").fetchone() == (ja_locale,)
        with FaultProxy(cl.host, cl.port) as px, connect(
            conninfo(driver, cl, px.host, px.port), driver=driver, policy=FAST, on_event=rec
        ) as rc:
            px.arm_commit_drop()
            assert rc.run(Unit("drop")) == "done drop"
            px.arm_commit_hold()
            assert rc.run(Unit("hold")) == "done hold"
            px.release_held()
            for scenario in ("switchover", "crash"):
                unit = Unit(scenario)

                def faulty(raw: Any, unit: Unit = unit, scenario: str = scenario) -> str:
                    if unit.runs == 0:
                        exe(raw, "SELECT 1")
                        getattr(cl, scenario)()
                        if scenario == "crash":
                            threading.Timer(0.2, cl.start).start()
                    return unit(raw)

                assert rc.run(faulty) == f"done {scenario}"
            with pytest.raises(psycopg.Error if driver != "pyodbc" else pyodbc.Error) as raised:
                rc.execute("SELECT 1/0")
            assert raised.value.failure.sqlstate == "22012"  # type: ignore[attr-defined]
        for entry in ("drop", "hold", "switchover", "crash"):
            assert rows(cl, "ledger", entry) == 1
    statuses = [e.status for e in rec.of(sf.CommitResolved)]
    assert statuses == ["committed", "aborted"]
    assert sum(e.failover for e in rec.of(sf.Reconnected)) == 2
