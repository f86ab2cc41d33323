"""The unit-of-work contract against a real server.

Every test runs with psycopg, with psycopg's AsyncResilientConnection (the
"psycopg-async" flavour, see resilient_helpers.connect) and with pyodbc, unless it is
about one of them only.

The invariant: run() returns if and only if everything the unit wrote committed, once.
A unit that breaks the contract gets a UnitContractError naming the rule, has nothing
committed, and is not run again. Each test asserts the rows in the table, how often the
unit ran, and what was raised.
"""

from __future__ import annotations

import contextlib
import logging
import pickle
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pyodbc
import pytest
from resilient_helpers import (
    DRIVERS,
    PSYCOPG_FLAVOURS,
    PSYCOPG_SESSIONS,
    BlockingConnection,
    BlockingResilientConnection,
    Recorder,
    Resilient,
    connect,
    conninfo,
    exe,
)

import symfo_failover as sf
from symfo_failover._probe import probe
from symfo_failover.harness import FaultProxy, LocalCluster, LocalServer

pytestmark = pytest.mark.server

FAST = sf.RetryPolicy(deadline=10)


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Table:
    """A table of its own on the shared server; ``rows()`` reads it on another session."""

    def __init__(self, server: LocalServer) -> None:
        self.server = server
        self.name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(server.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE TABLE {self.name} (id text PRIMARY KEY)")

    def rows(self) -> list[str]:
        with psycopg.connect(self.server.conninfo(), autocommit=True) as conn:
            return [r[0] for r in conn.execute(f"SELECT id FROM {self.name} ORDER BY id")]

    def insert(self, raw: Any, value: str) -> None:
        exe(raw, f"INSERT INTO {self.name} VALUES (%s)", value)


@pytest.fixture
def table(server: LocalServer) -> Table:
    return Table(server)


@pytest.fixture
def rc(driver: str, server: LocalServer) -> Iterator[Resilient]:
    info = conninfo(driver, server)
    with connect(info, driver=driver, policy=FAST) as conn:
        yield conn


class Counted:
    """Wraps a unit and counts its runs."""

    def __init__(self, fn: Callable[[Any], Any]) -> None:
        self.fn, self.runs = fn, 0

    def __call__(self, raw: Any) -> Any:
        self.runs += 1
        return self.fn(raw)


def broken(rc: Resilient, fn: Callable[[Any], Any], rule: str) -> Counted:
    """Run ``fn`` and check that it broke ``rule``: raised, once, with the driver's type."""
    unit = Counted(fn)
    with pytest.raises(sf.UnitContractError) as raised:
        rc.run(unit)
    err = raised.value
    assert err.rule == rule, str(err)
    assert unit.runs == 1, "a broken contract is not run again"
    driver_error = psycopg.ProgrammingError if rc.driver != "pyodbc" else pyodbc.ProgrammingError
    assert isinstance(err, driver_error)
    assert not sf.classify(err).retryable
    assert type(err).__module__ == "symfo_failover"
    # The connection goes on working after a broken unit.
    assert rc.run(lambda raw: exe(raw, "SELECT 41 + 1").fetchone()[0]) == 42
    return unit


# --- 1. nesting ---------------------------------------------------------------------------


def test_a_nested_run_is_refused_and_the_outer_work_is_not_committed(
    rc: Resilient, table: Table
) -> None:
    inner = Counted(lambda raw: table.insert(raw, "B"))

    def outer(raw: Any) -> None:
        table.insert(raw, "A")
        rc.run(inner)

    broken(rc, outer, "nested-run")
    assert inner.runs == 0, "refused before it did anything"
    assert table.rows() == []


def test_a_nested_run_whose_refusal_is_swallowed_still_commits_nothing(
    rc: Resilient, table: Table
) -> None:
    def outer(raw: Any) -> str:
        table.insert(raw, "A")
        with contextlib.suppress(sf.UnitContractError):
            rc.run(lambda r: table.insert(r, "B"))
        table.insert(raw, "C")
        return "ok"

    broken(rc, outer, "nested-run")
    assert table.rows() == []


# --- 2. ending the transaction inside a unit ----------------------------------------------


def _ends_then_writes(table: Table, end: Callable[[Any], None]) -> Callable[[Any], str]:
    def unit(raw: Any) -> str:
        table.insert(raw, "A")
        with contextlib.suppress(psycopg.Error, pyodbc.Error):
            end(raw)  # the unit swallows the refusal and writes on
        table.insert(raw, "B")
        return "ok"

    return unit


@pytest.mark.parametrize("end", [
    pytest.param(lambda raw: raw.commit(), id="commit"),
    pytest.param(lambda raw: raw.rollback(), id="rollback"),
    pytest.param(lambda raw: setattr(raw, "autocommit", True), id="autocommit-on"),
    pytest.param(lambda raw: setattr(raw, "autocommit", False), id="autocommit-off"),
    pytest.param(lambda raw: exe(raw, "COMMIT"), id="COMMIT"),
    pytest.param(lambda raw: exe(raw, "rollback work"), id="ROLLBACK"),
    pytest.param(lambda raw: exe(raw, "END"), id="END"),
    pytest.param(lambda raw: exe(raw, "SELECT 1; /* then */ COMMIT"), id="COMMIT-in-a-batch"),
    pytest.param(lambda raw: raw.cursor().execute("COMMIT"), id="cursor-COMMIT"),
])
def test_ending_the_transaction_inside_a_unit_is_refused_at_the_call(
    rc: Resilient, table: Table, end: Callable[[Any], None]
) -> None:
    broken(rc, _ends_then_writes(table, end), "ended-transaction")
    assert table.rows() == [], "nothing the unit wrote is committed"


def test_a_cursor_commit_is_refused_too(rc: Resilient, table: Table) -> None:
    def unit(raw: Any) -> None:
        cur = raw.cursor()
        cur.execute(f"INSERT INTO {table.name} VALUES ('A')")
        if rc.driver == "pyodbc":
            cur.commit()  # pyodbc's Cursor.commit() ends the connection's transaction
        else:
            cur.connection.commit()

    broken(rc, unit, "ended-transaction")
    assert table.rows() == []


@pytest.mark.parametrize("driver", PSYCOPG_FLAVOURS)
def test_with_connection_inside_a_unit_is_refused(
    driver: str, server: LocalServer, table: Table
) -> None:
    """psycopg's ``with conn:`` commits and closes at its end. (pyodbc's commits only
    outside autocommit mode, so inside a unit it does nothing.)"""
    def unit(raw: Any) -> None:
        with raw:
            table.insert(raw, "A")

    with connect(server.conninfo(), driver=driver, policy=FAST) as rc:
        broken(rc, unit, "ended-transaction")
    assert table.rows() == []


def test_a_unit_that_closes_its_connection_is_not_taken_for_a_failover(
    driver: str, server: LocalServer, table: Table
) -> None:
    rec = Recorder()
    info = conninfo(driver, server)
    with connect(info, driver=driver, policy=FAST, on_event=rec) as rc:
        unit = broken(rc, _ends_then_writes(table, lambda raw: raw.close()), "closed-connection")
    assert unit.runs == 1, "no retry storm"
    assert not rec.of(sf.FailureDetected), "a close is not a failover"
    assert not rec.of(sf.ReconnectAttempt)
    assert table.rows() == []


def test_a_close_that_gets_past_the_guard_is_still_not_a_failover(
    rc: Resilient, table: Table
) -> None:
    def unit(raw: Any) -> None:
        table.insert(raw, "A")
        if isinstance(raw, psycopg.Connection):
            psycopg.Connection.close(raw)  # the base class's method, around the guard
        elif isinstance(raw, BlockingConnection):
            raw.call(psycopg.AsyncConnection.close)  # the same, for the async connection
        else:
            raw.raw.close()
        table.insert(raw, "B")

    broken(rc, unit, "closed-connection")
    assert table.rows() == []


def test_savepoints_inside_a_unit_keep_working(rc: Resilient, table: Table) -> None:
    def unit(raw: Any) -> str:
        table.insert(raw, "A")
        exe(raw, "SAVEPOINT s1")
        table.insert(raw, "gone")
        exe(raw, "ROLLBACK TO SAVEPOINT s1")
        exe(raw, "RELEASE SAVEPOINT s1")
        # Not transaction control: CASE ... END, a PL/pgSQL block, quoted words.
        exe(raw, "SELECT CASE WHEN true THEN 'commit;' END")
        exe(raw, "DO $$ BEGIN PERFORM 1; END $$")
        if isinstance(raw, PSYCOPG_SESSIONS):
            try:
                with raw.transaction():  # psycopg's nested transaction: a savepoint
                    table.insert(raw, "A")  # a duplicate, rolled back to the savepoint
            except psycopg.errors.UniqueViolation:
                pass
            with raw.transaction():
                table.insert(raw, "B")
        else:
            table.insert(raw, "B")
        return "ok"

    unit_ = Counted(unit)
    assert rc.run(unit_) == "ok"
    assert unit_.runs == 1
    assert table.rows() == ["A", "B"]


def test_the_connection_itself_may_not_be_used_inside_its_unit(
    rc: Resilient, table: Table
) -> None:
    def unit(raw: Any) -> None:
        table.insert(raw, "A")
        rc.execute(f"INSERT INTO {table.name} VALUES ('B')")

    broken(rc, unit, "connection-in-unit")

    def sets_state(raw: Any) -> None:
        table.insert(raw, "A")
        rc.autocommit = True

    broken(rc, sets_state, "connection-in-unit")
    assert rc.autocommit is False
    assert table.rows() == []


@pytest.mark.odbc
def test_the_lent_odbc_connection_is_refused_after_its_unit(server: LocalServer) -> None:
    with sf.connect(server.odbc_connection_string(), driver="pyodbc", policy=FAST) as rc:
        kept: list[Any] = []

        def unit(raw: Any) -> Any:
            kept.append(raw)
            return raw.execute("SELECT 1, 2")

        cursor = rc.run(unit)
        assert tuple(cursor.fetchone()) == (1, 2), "results stay readable"
        with pytest.raises(sf.UnitContractError) as raised:
            kept[0].execute("SELECT 1")
        assert raised.value.rule == "used-after-unit"
        with pytest.raises(sf.UnitContractError):
            cursor.execute("SELECT 1")


# --- 3. a swallowed database error --------------------------------------------------------


def test_a_swallowed_error_is_never_a_false_success(
    rc: Resilient, table: Table
) -> None:
    """psycopg: the transaction failed, its COMMIT would be a ROLLBACK: raise, say why.
    pyodbc: psqlODBC's statement-level rollback undoes only the failed statement and
    the transaction goes on, so what the unit wrote commits and run() says so."""
    def unit(raw: Any) -> str:
        table.insert(raw, "A")
        with contextlib.suppress(psycopg.errors.UniqueViolation, pyodbc.IntegrityError):
            table.insert(raw, "A")  # a unique violation, caught by the unit
        return "ok"

    if rc.driver != "pyodbc":
        counted = broken(rc, unit, "swallowed-error")
        assert counted.runs == 1
        assert table.rows() == []
    else:
        counted = Counted(unit)
        assert rc.run(counted) == "ok"
        assert counted.runs == 1
        assert table.rows() == ["A"]


# --- bad input and messages that say what the server said ------------------------------


@pytest.fixture(scope="module")
def locked() -> Iterator[LocalCluster]:
    """A password-protected server with a role that may not log in."""
    with LocalCluster(password="right") as cluster:
        cluster.start()
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE ROLE nologin PASSWORD 'right' NOLOGIN")
        yield cluster


@pytest.mark.parametrize(("change", "sqlstate"), [
    ({"password": "wrong"}, "28P01"),
    ({"dbname": "nosuchdb"}, "3D000"),
    ({"user": "nologin"}, "28000"),
    ({"user": "nosuchrole"}, "28P01"),  # password auth does not tell a missing role
])
def test_a_refused_login_says_what_the_server_said(
    driver: str, locked: LocalCluster, change: dict[str, str], sqlstate: str
) -> None:
    rec = Recorder()
    with pytest.raises(psycopg.OperationalError if driver != "pyodbc" else pyodbc.Error
                       ) as raised:
        connect(conninfo(driver, locked, **change), driver=driver, on_event=rec)
    failure = raised.value.failure  # type: ignore[attr-defined]
    assert failure.sqlstate == sqlstate
    assert not failure.retryable
    assert f"refused this login with {sqlstate}" in failure.message
    assert ("authentication" in failure.message) == (sqlstate == "28P01")
    assert "password=" not in failure.message.replace("password=***", "")
    assert len(rec.of(sf.FailureDetected)) == 1
    assert rec.of(sf.FailureDetected)[0].failure.sqlstate == sqlstate


def test_a_port_where_nothing_listens_says_so_at_once(
    driver: str, server: LocalServer, caplog: pytest.LogCaptureFixture
) -> None:
    """One warning, before any waiting, naming the address and the deadline; the
    retries themselves are quiet."""
    port = server.port + 1 if server.port < 65535 else server.port - 1
    while probe(server.host, port).state != "refused":
        port -= 1
    info = conninfo(driver, server, port=str(port))
    caplog.set_level(logging.DEBUG, logger="symfo_failover")
    with pytest.raises(sf.RetriesExhausted):
        connect(info, driver=driver, policy=sf.RetryPolicy(deadline=0.5))
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
                and r.name == "symfo_failover"]
    names = [getattr(r, "symfo_event", None) for r in warnings]
    assert names[0] == "connect_waiting"
    assert names.count("connect_waiting") == 1
    assert f"{server.host}:{port}" in warnings[0].getMessage()
    assert "0.5 s" in warnings[0].getMessage()
    tries = [r for r in caplog.records if getattr(r, "symfo_event", None) == "failure_detected"]
    assert len(tries) > 2
    assert {r.levelno for r in tries[2:]} == {logging.DEBUG}, "the repeats are quiet"
    assert names[-1] == "gave_up"


@pytest.mark.parametrize("driver", PSYCOPG_FLAVOURS)
def test_psycopg_names_the_error_that_was_swallowed(
    driver: str, server: LocalServer, table: Table
) -> None:
    with connect(server.conninfo(), driver=driver, policy=FAST) as rc:
        def unit(raw: Any) -> None:
            with contextlib.suppress(psycopg.errors.DivisionByZero):
                raw.execute("SELECT 1/0")

        with pytest.raises(sf.UnitContractError, match="division by zero") as raised:
            rc.run(unit)
    assert raised.value.rule == "swallowed-error"
    assert "nothing the unit wrote is committed" in str(raised.value)


def test_a_lost_session_the_unit_swallowed_is_run_again_not_committed(
    driver: str, server: LocalServer, table: Table
) -> None:
    """The session dies under the unit, which catches the error and returns: nothing
    was committed, so it is a lost session like any other, and the unit runs again."""
    rec = Recorder()
    info = conninfo(driver, server)
    with connect(info, driver=driver, policy=FAST, on_event=rec) as rc:
        def unit(raw: Any) -> str:
            table.insert(raw, f"run{counted.runs}")
            if counted.runs == 1:
                with contextlib.suppress(psycopg.Error, pyodbc.Error):
                    exe(raw, "SELECT pg_terminate_backend(pg_backend_pid())")
            return "ok"

        counted = Counted(unit)
        assert rc.run(counted) == "ok"
    assert counted.runs == 2
    assert table.rows() == ["run2"]
    assert [e.phase for e in rec.of(sf.FailureDetected)] == ["unit"]
    assert len(rec.of(sf.UnitReplayed)) == 1


@pytest.mark.odbc
@pytest.mark.parametrize("level", ["7.4-0", "7.4-1"])
def test_psqlodbc_rollback_levels_that_break_the_contract_are_refused(
    server: LocalServer, level: str
) -> None:
    with pytest.raises(pyodbc.ProgrammingError, match="statement-level"):
        sf.connect(server.odbc_connection_string(Protocol=level), driver="pyodbc")
    with sf.connect(server.odbc_connection_string(Protocol="7.4-2"), driver="pyodbc") as rc:
        assert rc.run(lambda raw: raw.execute("SELECT 1").fetchone()[0]) == 1


# --- 5. coroutine functions ---------------------------------------------------------------


def test_a_coroutine_function_is_refused_before_anything_runs(
    rc: Resilient, table: Table
) -> None:
    async def unit(raw: Any) -> None:  # pragma: no cover - never called
        table.insert(raw, "A")

    class AsyncCallable:
        async def __call__(self, raw: Any) -> None:  # pragma: no cover - never called
            table.insert(raw, "A")

    if isinstance(rc, BlockingResilientConnection):
        # The async run's counterpart: what it cannot await is refused before anything runs.
        def generator(raw: Any) -> Iterator[None]:  # pragma: no cover - never called
            yield table.insert(raw, "A")

        async def async_generator(raw: Any) -> Any:  # pragma: no cover - never called
            yield table.insert(raw, "A")

        for refused, match in ((generator, "generator function"),
                               (async_generator, "generator function"),
                               ("SELECT 1", "needs a function")):
            with pytest.raises(TypeError, match=match):
                rc.run_as_given(refused)
    else:
        for fn in (unit, AsyncCallable()):
            with pytest.raises(TypeError, match="coroutine function"):
                rc.run(fn)
    assert table.rows() == []
    assert rc.session is not None  # the session was not touched


def test_a_unit_that_returns_a_coroutine_is_refused_and_rolled_back(
    rc: Resilient, table: Table
) -> None:
    async def later() -> None:  # pragma: no cover - never awaited; closed by run()
        pass

    def unit(raw: Any) -> Any:
        table.insert(raw, "A")
        return later()

    counted = Counted(unit)
    if isinstance(rc, BlockingResilientConnection):
        # The async run's counterpart: a plain function that returns no awaitable is
        # refused and its transaction rolled back (the connection takes units again).
        counted = Counted(lambda raw: "not awaitable")
        with pytest.raises(TypeError, match="not an awaitable"):
            rc.run_as_given(counted)
        assert rc.run(lambda raw: exe(raw, "SELECT 41 + 1").fetchone()[0]) == 42
    else:
        # filterwarnings=error: a coroutine left un-awaited would fail the test at collection.
        with pytest.raises(TypeError, match="awaitable"):
            rc.run(counted)
    assert counted.runs == 1
    assert table.rows() == []


# --- 6. every public error pickles --------------------------------------------------------


def _round_trip(err: BaseException, driver: str) -> None:
    copy = pickle.loads(pickle.dumps(err))
    assert type(copy) is type(err)
    assert type(copy).__module__ == "symfo_failover"
    assert str(copy) == str(err)
    for attr in ("failure", "attempts", "elapsed", "target", "xid", "rule"):
        assert getattr(copy, attr, None) == getattr(err, attr, None), attr
    base = psycopg.Error if driver != "pyodbc" else pyodbc.Error
    assert isinstance(copy, base)
    # A fresh interpreter (another process: multiprocessing, Celery) reads it too.
    shown = subprocess.run(
        [sys.executable, "-c",
         "import pickle, sys; e = pickle.loads(sys.stdin.buffer.read()); "
         "print(type(e).__module__, type(e).__name__, type(e).__mro__[1].__name__, "
         "getattr(e, 'rule', None) or getattr(e, 'attempts', None) or e.xid)"],
        input=pickle.dumps(err), capture_output=True, check=True,
    ).stdout.decode().split()
    assert shown[:3] == ["symfo_failover", type(err).__name__, type(err).__mro__[1].__name__]
    assert shown[3] == str(getattr(err, "rule", None) or getattr(err, "attempts", None)
                           or getattr(err, "xid", None))


def test_every_public_error_raised_for_real_pickles(driver: str) -> None:
    raised: list[BaseException] = []
    with LocalCluster() as cluster:
        cluster.start()
        with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (id text)")
            conn.execute("CREATE ROLE app LOGIN")
            conn.execute("GRANT ALL ON ledger TO app")
            conn.execute("REVOKE EXECUTE ON FUNCTION pg_xact_status(xid8) FROM PUBLIC")
        with FaultProxy(cluster.host, cluster.port) as proxy:
            info = conninfo(driver, cluster, host=proxy.host, port=str(proxy.port),
                               user="app")
            with connect(info, driver=driver, policy=FAST) as rc:
                with pytest.raises(sf.UnitContractError) as contract:
                    rc.run(lambda raw: rc.run(lambda inner: None))
                raised.append(contract.value)
                proxy.arm_commit_drop()
                with pytest.raises(sf.CommitOutcomeUnknown) as unknown:
                    rc.run(lambda raw: exe(raw, "INSERT INTO ledger VALUES ('x')"))
                raised.append(unknown.value)
                cluster.stop_both()
                rc_policy = sf.RetryPolicy(deadline=0.5)
                with pytest.raises(sf.RetriesExhausted) as exhausted:
                    connect(info, driver=driver, policy=rc_policy)
                raised.append(exhausted.value)
    assert [type(e).__name__ for e in raised] == [
        "UnitContractError", "CommitOutcomeUnknown", "RetriesExhausted"]
    for err in raised:
        _round_trip(err, driver)
