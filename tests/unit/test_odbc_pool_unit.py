"""OdbcFailoverPool without a server: bad input, its timeout error, and its decisions
over a fake driver whose "server" is a start time that the test changes."""

from __future__ import annotations

import pickle
import threading
from typing import Any

import pyodbc
import pytest

import symfo_failover as sf
from symfo_failover._driver_pyodbc import PyodbcDriver
from symfo_failover._errors import flavoured
from symfo_failover._kind import Failure, Kind
from symfo_failover._odbc_pool import OdbcFailoverPool, PoolTimeout
from symfo_failover._target import SessionInfo, SessionState, Target

ODBC = "Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5432;Uid=u;Pwd=secret;"


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"connection_string": b"x"}, TypeError, "connection_string"),
    ({"connection_string": "no equals sign"}, ValueError, "invalid ODBC"),
    ({"connection_string": ODBC + "Protocol=7.4-1;"}, ValueError, "roll back"),
    ({"min_size": -1}, ValueError, "min_size"),
    ({"min_size": "2"}, TypeError, "min_size"),
    ({"min_size": True}, TypeError, "min_size"),
    ({"max_size": 0}, ValueError, "max_size"),
    ({"min_size": 3, "max_size": 2}, ValueError, "max_size"),
    ({"timeout": 0}, ValueError, "timeout"),
    ({"timeout": float("inf")}, ValueError, "timeout"),
    ({"timeout": "1"}, TypeError, "timeout"),
    ({"policy": 3}, TypeError, "RetryPolicy"),
    ({"configure": 3}, TypeError, "configure"),
    ({"on_event": 3}, TypeError, "on_event"),
    ({"name": 3}, TypeError, "name"),
])
def test_bad_input_is_refused_before_anything_runs(
    kwargs: dict[str, Any], error: type[Exception], text: str
) -> None:
    args = {"connection_string": ODBC, **kwargs}
    with pytest.raises(error, match=text) as caught:
        sf.OdbcFailoverPool(args.pop("connection_string"), **args)
    assert "secret" not in str(caught.value)


def test_a_coroutine_configure_is_refused() -> None:
    async def configure(raw: Any) -> None:  # pragma: no cover - never called
        return None

    with pytest.raises(TypeError):
        sf.OdbcFailoverPool(ODBC, configure=configure)


def test_pool_timeout_is_a_pyodbc_operational_error_and_pickles() -> None:
    failure = Failure(Kind.NOT_RETRYABLE, None, False, False, "x")
    cls = flavoured(PoolTimeout, pyodbc.OperationalError)
    error = cls("no connection", failure=failure, timeout=1.5)
    assert isinstance(error, pyodbc.OperationalError)
    again = pickle.loads(pickle.dumps(error))
    assert type(again) is cls
    assert (again.timeout, again.failure, str(again)) == (1.5, failure, "no connection")


# --- the decisions, over a fake driver --------------------------------------------------


class FakeServer:
    def __init__(self) -> None:
        self.started = "t0"
        self.up = True
        self.pids = iter(range(100, 10_000))
        self.connects = 0
        self.made: list[FakeRaw] = []
        self.lock = threading.Lock()


class FakeRaw:
    def __init__(self, server: FakeServer) -> None:
        self.server = server
        self.started = server.started
        self.pid = next(server.pids)
        self.autocommit = True
        self.closed = False
        self.dead = False

    def alive(self) -> None:
        if self.dead or self.started != self.server.started or not self.server.up:
            self.dead = True
            raise pyodbc.OperationalError("08S01", "[08S01] The connection has been lost")

    def execute(self, sql: str, *params: Any) -> FakeRaw:
        self.alive()
        return self

    def commit(self) -> None:
        self.alive()

    def rollback(self) -> None:
        self.alive()

    def close(self) -> None:
        self.closed = True


class FakeDriver(PyodbcDriver):
    server = FakeServer()

    def connect(self, target: Target) -> Any:
        with self.server.lock:
            self.server.connects += 1
        if not self.server.up:
            raise pyodbc.OperationalError("08001", "[08001] could not connect to server")
        raw = FakeRaw(self.server)
        self.server.made.append(raw)
        return raw

    def session_info(self, raw: Any) -> SessionInfo:
        raw.alive()
        return SessionInfo(raw.pid, raw.started, "b")

    def apply_state(self, raw: Any, state: SessionState) -> None:
        raw.autocommit = state.autocommit

    def is_broken(self, raw: Any) -> bool:
        return bool(raw.closed or raw.dead)


@pytest.fixture
def server() -> FakeServer:
    FakeDriver.server = FakeServer()
    return FakeDriver.server


class FakePool(OdbcFailoverPool):
    _driver_class = FakeDriver


def closed_raws() -> list[FakeRaw]:
    return [r for r in FakeDriver.server.made if r.closed]


def test_a_new_start_time_takes_the_whole_generation_out_once(server: FakeServer) -> None:
    events: list[sf.Event] = []
    policy = sf.RetryPolicy(first_delay=0, max_delay=0)
    with FakePool(ODBC, min_size=3, max_size=4, policy=policy, on_event=events.append) as pool:
        pool.wait()
        with pool.connection() as raw:
            first = raw
        server.started = "t1"
        with pytest.raises(pyodbc.OperationalError), pool.connection() as raw:
            raw.execute("SELECT 1")
        handed = []
        for _ in range(6):
            with pool.connection() as raw:
                handed.append(raw)
        pool.wait()
        stats = pool.failover_stats()
    assert first.started == "t0"
    assert {r.started for r in handed} == {"t1"}, "nothing of the old server handed out"
    assert (stats.failovers, stats.connections_replaced, stats.requests_met_dead) == (1, 3, 1)
    assert stats.server_started == "t1"
    assert len([e for e in events if isinstance(e, sf.PoolFailover)]) == 1
    assert all(r.closed for r in [first]), "the old ones are closed"


def test_a_dead_session_on_the_same_server_is_not_a_failover(server: FakeServer) -> None:
    with FakePool(ODBC, min_size=2, max_size=2) as pool:
        pool.wait()
        def meets_a_dead_session() -> FakeRaw:
            with pool.connection() as raw:
                raw.dead = True  # as pg_terminate_backend leaves it: no restart
                raw.execute("SELECT 1")
            raise AssertionError("not reached")  # pragma: no cover

        with pytest.raises(pyodbc.OperationalError):
            meets_a_dead_session()
        [raw] = closed_raws()
        with pool.connection() as other:
            assert other is not raw
        stats = pool.failover_stats()
    assert (stats.failovers, stats.connections_replaced, stats.requests_met_dead) == (0, 1, 1)
    assert raw.closed


def test_while_the_server_is_down_one_attempt_at_a_time(server: FakeServer) -> None:
    policy = sf.RetryPolicy(first_delay=0.001, max_delay=0.001, jitter=0)
    with FakePool(ODBC, min_size=2, max_size=4, policy=policy, timeout=5) as pool:
        pool.wait()
        server.up = False
        server.started = "t1"
        with pytest.raises(pyodbc.OperationalError), pool.connection() as raw:
            raw.execute("SELECT 1")
        server.up = True
        results: list[str] = []

        def request() -> None:
            with pool.connection() as raw:
                results.append(raw.started)

        threads = [threading.Thread(target=request) for _ in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        stats = pool.failover_stats()
    assert results == ["t1"] * 8
    assert stats.failovers == 1
    assert stats.connections_replaced == 2, "the one that met it and the idle one"
