"""The driver adapters on real sessions: SQLSTATEs, broken sessions, connect failures."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pyodbc
import pytest

from symfo_failover import Kind, classify
from symfo_failover import _driver_psycopg as pg_adapter
from symfo_failover import _driver_pyodbc as odbc_adapter
from symfo_failover.harness import LocalServer

pytestmark = pytest.mark.server

PASSWORD = "s3cret-passw0rd"


@pytest.fixture(scope="module")
def srv() -> Iterator[LocalServer]:
    with LocalServer() as server:
        server.start()
        yield server


@pytest.fixture(scope="module")
def password_server() -> Iterator[LocalServer]:
    with LocalServer(password=PASSWORD) as server:
        server.start()
        yield server


def _up(server: LocalServer) -> LocalServer:
    if not server.running:
        server.start()
    return server


def test_psycopg_broken_after_own_session_is_terminated(srv: LocalServer) -> None:
    conn = psycopg.connect(_up(srv).conninfo(), autocommit=True)
    pid = pg_adapter.backend_pid(conn)
    assert pid is not None
    assert not pg_adapter.is_broken(conn)
    with psycopg.connect(srv.conninfo(), autocommit=True) as admin:
        admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("SELECT 1")
    assert pg_adapter.is_broken(conn)
    assert pg_adapter.backend_pid(conn) is None
    assert classify(info.value, connection=conn).kind is Kind.CONNECTION_LOST
    # A later call on the dead session has no SQLSTATE; the session's state decides.
    with pytest.raises(psycopg.OperationalError) as later:
        conn.execute("SELECT 1")
    assert later.value.sqlstate is None
    assert classify(later.value, connection=conn).kind is Kind.CONNECTION_LOST


def test_psycopg_error_on_healthy_session_is_not_a_failover(srv: LocalServer) -> None:
    with psycopg.connect(_up(srv).conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.errors.UndefinedTable) as info:
            conn.execute("SELECT * FROM no_such_table")
        failure = classify(info.value, connection=conn)
        assert failure.kind is Kind.NOT_RETRYABLE
        assert failure.sqlstate == "42P01"
        assert not pg_adapter.is_broken(conn)


def test_psycopg_vanished_prepared_statement(srv: LocalServer) -> None:
    with psycopg.connect(_up(srv).conninfo(), autocommit=True) as conn:
        with pytest.raises(psycopg.Error) as info:
            conn.execute("EXECUTE statement_of_the_old_session")
        assert classify(info.value).kind is Kind.SESSION_STATE_LOST


def test_psycopg_serialization_failure_is_a_conflict(srv: LocalServer) -> None:
    ci = _up(srv).conninfo()
    with psycopg.connect(ci, autocommit=True) as setup:
        setup.execute("DROP TABLE IF EXISTS conflict_t")
        setup.execute("CREATE TABLE conflict_t (id int PRIMARY KEY, v int)")
        setup.execute("INSERT INTO conflict_t VALUES (1, 0)")
    with psycopg.connect(ci) as a, psycopg.connect(ci) as b:
        a.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        a.execute("SELECT v FROM conflict_t WHERE id = 1").fetchone()
        b.execute("UPDATE conflict_t SET v = 2 WHERE id = 1")
        b.commit()
        with pytest.raises(psycopg.errors.SerializationFailure) as info:
            a.execute("UPDATE conflict_t SET v = 3 WHERE id = 1")
        failure = classify(info.value, connection=a)
        assert failure.kind is Kind.TRANSACTION_CONFLICT
        assert not failure.reconnect


def test_psycopg_connect_refused_is_connect_failed(srv: LocalServer) -> None:
    _up(srv).stop("fast")
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(srv.conninfo(connect_timeout="3"))
    failure = classify(info.value)
    assert failure.kind is Kind.CONNECT_FAILED
    assert failure.retryable


def test_psycopg_wrong_or_missing_password_is_not_retryable(password_server: LocalServer) -> None:
    ci = _up(password_server).conninfo()
    wrong = ci.replace(PASSWORD, "wrong")
    assert wrong != ci
    missing = ci.replace(f"password={PASSWORD}", "")
    for conninfo in (wrong, missing):
        with pytest.raises(psycopg.OperationalError) as info:
            psycopg.connect(conninfo, connect_timeout=3)
        failure = classify(info.value)
        assert failure.kind is Kind.NOT_RETRYABLE, failure
        assert PASSWORD not in failure.message
    with psycopg.connect(ci) as ok:
        assert ok.execute("SELECT 1").fetchone() == (1,)


@pytest.mark.odbc
def test_pyodbc_dead_session_is_seen_without_a_round_trip(srv: LocalServer) -> None:
    conn = pyodbc.connect(_up(srv).odbc_connection_string(), autocommit=True, timeout=5)
    assert odbc_adapter.connection_dead(conn) is False
    assert not odbc_adapter.is_broken(conn)
    srv.stop("immediate")
    with pytest.raises(pyodbc.Error) as info:
        conn.cursor().execute("SELECT 1")
    assert classify(info.value, connection=conn).kind is Kind.CONNECTION_LOST
    assert odbc_adapter.is_broken(conn)
    conn.close()
    assert odbc_adapter.is_broken(conn)


@pytest.mark.odbc
def test_pyodbc_connect_failures(srv: LocalServer, password_server: LocalServer) -> None:
    _up(srv).stop("fast")
    with pytest.raises(pyodbc.Error) as refused:
        pyodbc.connect(srv.odbc_connection_string(), timeout=3)
    assert classify(refused.value).kind is Kind.CONNECT_FAILED
    assert classify(refused.value).sqlstate == "08001"

    cs = _up(password_server).odbc_connection_string()
    assert PASSWORD in cs
    with pytest.raises(pyodbc.Error) as wrong:
        pyodbc.connect(cs.replace(PASSWORD, "wrong"), timeout=3)
    # psqlODBC reports every failed connect as 08001, a wrong password included:
    # the error alone cannot tell it from a server that is down (docs/classification.md).
    failure = classify(wrong.value)
    assert failure.sqlstate == "08001"
    assert failure.kind is Kind.CONNECT_FAILED
    assert PASSWORD not in failure.message


@pytest.mark.odbc
def test_pyodbc_catch_all_on_a_session_that_died_in_a_transaction(srv: LocalServer) -> None:
    """psqlODBC sends a SAVEPOINT before each statement in a transaction; when the server
    is gone that fails with its catch-all HY000, not 08S01: the dead session decides."""
    conn = pyodbc.connect(_up(srv).odbc_connection_string(), autocommit=True, timeout=5)
    conn.execute("BEGIN")
    conn.execute("SELECT 1")
    srv.stop("fast")
    with pytest.raises(pyodbc.Error) as info:
        conn.execute("SELECT ?", 1)
    assert info.value.args[0] == "HY000"
    assert classify(info.value).kind is Kind.NOT_RETRYABLE  # the code alone says nothing
    failure = classify(info.value, connection=conn)
    assert failure.kind is Kind.CONNECTION_LOST
    assert failure.rule == "HY000 on a broken session"
    conn.close()
