"""FaultProxy on real sessions: pass-through, cuts, delays, and COMMITs whose reply is lost.

The protocol logic without sockets is in ``tests/unit/test_proxy_framing.py``; what the
faults cost in time is measured by ``benchmarks/bench_harness.py``, not asserted here.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import psycopg
import pyodbc
import pytest

from symfo_failover import Kind, classify
from symfo_failover import _driver_pyodbc as odbc_adapter
from symfo_failover.harness import LocalServer
from symfo_failover.harness._proxy import FaultProxy, _Pipe

pytestmark = pytest.mark.server

_tables = itertools.count()
#: Runs far longer than any test: an error while the server still runs it is the fault's.
LONG_SLEEP = "SELECT pg_sleep(60)"


@pytest.fixture(scope="module")
def srv() -> Iterator[LocalServer]:
    with LocalServer() as server:
        server.start()
        yield server


@pytest.fixture
def proxy(srv: LocalServer) -> Iterator[FaultProxy]:
    with FaultProxy("127.0.0.1", srv.port) as px:
        yield px


@pytest.fixture
def admin(srv: LocalServer) -> Iterator[psycopg.Connection[Any]]:
    """A direct session to the server, past the proxy."""
    with psycopg.connect(srv.conninfo(), autocommit=True) as conn:
        yield conn


@pytest.fixture
def table(admin: psycopg.Connection[Any]) -> str:
    """A fresh table without any unique constraint: a doubled row would show."""
    name = f"proxy_t{os.getpid()}_{next(_tables)}"
    admin.execute(f"CREATE TABLE {name} (v int)")
    return name


# Client sessions a test opened, closed after it even when an assertion failed early (a
# session left to the garbage collector would warn inside whichever test runs next).
_opened: list[Any] = []


@pytest.fixture(autouse=True)
def _close_opened_sessions() -> Iterator[None]:
    yield
    while _opened:
        with contextlib.suppress(Exception):
            _opened.pop().close()


def _via(srv: LocalServer, proxy: FaultProxy, **kwargs: Any) -> psycopg.Connection[Any]:
    conn = psycopg.connect(srv.conninfo(port=str(proxy.port), connect_timeout="5"), **kwargs)
    _opened.append(conn)
    return conn


def _odbc_via(proxy: FaultProxy) -> pyodbc.Connection:
    conn = pyodbc.connect(
        f"Driver={{PostgreSQL Unicode}};Server=127.0.0.1;Port={proxy.port};"
        "Database=postgres;Uid=postgres;Pwd=;",
        autocommit=False,
        timeout=5,
    )
    _opened.append(conn)
    return conn


def _wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def _count(admin: psycopg.Connection[Any], table: str, value: int) -> int:
    row = admin.execute(f"SELECT count(*) FROM {table} WHERE v = %s", (value,)).fetchone()
    assert row is not None
    return int(row[0])


def _fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


def _assert_psycopg_lost(exc: BaseException, conn: psycopg.Connection[Any]) -> None:
    assert isinstance(exc, psycopg.OperationalError)
    assert exc.sqlstate is None
    assert classify(exc, connection=conn).kind is Kind.CONNECTION_LOST


def _assert_odbc_lost(exc: BaseException, conn: pyodbc.Connection) -> None:
    assert isinstance(exc, pyodbc.Error)
    assert odbc_adapter.sqlstate_of(exc) == "08S01"
    assert classify(exc, connection=conn).kind is Kind.CONNECTION_LOST


@dataclass(frozen=True, eq=False)
class _Step:
    """One thing a proxy pipe did (``push``: a chunk came in; ``write``: it went out), or
    a ``mark`` the test thread put in between."""

    what: str
    direction: str  # "up": to the server; "down": to the client
    size: int
    queued: bool = False  # push: held back rather than written at once
    latency: float | None = None  # push: the proxy's latency setting then
    due: float | None = None  # push, when queued: when the proxy will write it (loop time)
    earliest: float | None = None  # push: the loop's time before the push, plus the latency


@pytest.fixture
def wire(monkeypatch: pytest.MonkeyPatch) -> list[_Step]:
    """Everything the proxy's pipes do, in the order they do it.

    Recorded in the proxy's event loop thread (the test thread only adds marks), from the
    proxy's own state: whether a chunk was queued, and the time it was queued for.
    """
    steps: list[_Step] = []
    push, write = _Pipe.push, _Pipe._write

    def recorded_push(self: _Pipe, data: bytes) -> None:
        core = self._core
        earliest = core.loop.time() + core.latency
        queued_before = len(self._queue)
        push(self, data)
        queued = len(self._queue) > queued_before
        due = self._queue[-1][0] if queued else None
        direction = "up" if self._upstream else "down"
        steps.append(_Step("push", direction, len(data), queued, core.latency, due, earliest))

    def recorded_write(self: _Pipe, data: bytes) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            steps.append(_Step("write", "up" if self._upstream else "down", len(data)))
        write(self, data)

    monkeypatch.setattr(_Pipe, "push", recorded_push)
    monkeypatch.setattr(_Pipe, "_write", recorded_write)
    return steps


# --- pass-through ----------------------------------------------------------------------------


def test_passes_queries_copy_and_a_large_result(
    srv: LocalServer, proxy: FaultProxy, table: str
) -> None:
    with _via(srv, proxy, autocommit=True) as conn:
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)
        with conn.cursor() as cur:
            with cur.copy(f"COPY {table} (v) FROM STDIN") as copy:
                for i in range(20000):
                    copy.write_row((i,))
            assert conn.execute(f"SELECT count(*), sum(v) FROM {table}").fetchone() == (
                20000,
                sum(range(20000)),
            )
            with cur.copy(f"COPY (SELECT v FROM {table} ORDER BY v) TO STDOUT") as copy:
                out = b"".join(bytes(chunk) for chunk in copy)
        assert out == b"".join(b"%d\n" % i for i in range(20000))
        rows = conn.execute("SELECT repeat('x', 1000) || i FROM generate_series(1, 5000) i")
        values = [r[0] for r in rows]
    assert values == ["x" * 1000 + str(i) for i in range(1, 5001)]
    stats = proxy.stats
    assert stats.bytes_down > 5_000_000
    assert stats.bytes_up > 100_000
    assert stats.connections_accepted == 1


def test_odbc_passes_through(proxy: FaultProxy) -> None:
    conn = _odbc_via(proxy)
    try:
        assert conn.cursor().execute("SELECT ? + 1", 41).fetchone()[0] == 42
    finally:
        conn.close()


# --- cut -------------------------------------------------------------------------------------


def test_cut_idle_session(srv: LocalServer, proxy: FaultProxy) -> None:
    conn = _via(srv, proxy, autocommit=True)
    odbc = _odbc_via(proxy)
    assert proxy.cut() == 2
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("SELECT 1")
    _assert_psycopg_lost(info.value, conn)
    with pytest.raises(pyodbc.Error) as odbc_info:
        odbc.cursor().execute("SELECT 1")
    _assert_odbc_lost(odbc_info.value, odbc)
    odbc.close()
    conn.close()
    # New connections still work.
    with _via(srv, proxy) as again:
        assert again.execute("SELECT 1").fetchone() == (1,)


def _cut_once_running(
    proxy: FaultProxy, admin: psycopg.Connection[Any], pid: int, steps: list[str]
) -> threading.Thread:
    """Cut every session once the server shows ``pid`` running its pg_sleep."""

    def cut() -> None:
        assert _wait_until(lambda: _running_sleep(admin, pid), timeout=10)
        steps.append("cut")
        steps.append(f"cut {proxy.cut()}")

    thread = threading.Thread(target=cut)
    thread.start()
    return thread


def _running_sleep(admin: psycopg.Connection[Any], pid: int) -> bool:
    activity = _activity(admin, pid)
    return activity is not None and activity[0] == "active" and "pg_sleep" in activity[2]


def test_cut_during_a_running_query(
    srv: LocalServer, proxy: FaultProxy, admin: psycopg.Connection[Any]
) -> None:
    # The query would run a minute: an error while the server still runs it can only
    # come from the cut.
    conn = _via(srv, proxy, autocommit=True)
    pid = conn.info.backend_pid
    steps: list[str] = []
    cutter = _cut_once_running(proxy, admin, pid, steps)
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute(LONG_SLEEP)
    steps.append("error")
    assert _running_sleep(admin, pid), "the query ended before the client saw the error"
    cutter.join()
    assert steps[0] == "cut"
    assert sorted(steps[1:]) == ["cut 1", "error"]  # cut() may return after the error
    _assert_psycopg_lost(info.value, conn)
    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))

    odbc = _odbc_via(proxy)
    odbc_pid = odbc.cursor().execute("SELECT pg_backend_pid()").fetchone()[0]
    steps.clear()
    cutter = _cut_once_running(proxy, admin, odbc_pid, steps)
    with pytest.raises(pyodbc.Error) as odbc_info:
        odbc.cursor().execute(LONG_SLEEP)
    steps.append("error")
    assert _running_sleep(admin, odbc_pid), "the query ended before the client saw the error"
    cutter.join()
    assert steps[0] == "cut"
    assert sorted(steps[1:]) == ["cut 1", "error"]
    _assert_odbc_lost(odbc_info.value, odbc)
    odbc.close()
    admin.execute("SELECT pg_terminate_backend(%s)", (odbc_pid,))


# --- latency and pause -------------------------------------------------------------------------


def _pushes(steps: list[_Step], direction: str) -> list[_Step]:
    return [s for s in steps if s.what == "push" and s.direction == direction]


def _writes(steps: list[_Step], direction: str) -> list[_Step]:
    return [s for s in steps if s.what == "write" and s.direction == direction]


def _query_steps(
    conn: psycopg.Connection[Any], wire: list[_Step], sql: str
) -> tuple[list[Any], list[_Step]]:
    """Run ``sql``; its rows, and what the proxy's pipes did for it between two marks."""
    start = len(wire)
    wire.append(_Step("mark", "", 0))
    rows = conn.execute(sql).fetchall()
    wire.append(_Step("mark", "", 0))
    return rows, wire[start:]


def _assert_held_then_forwarded(steps: list[_Step], latency: float) -> None:
    """Each chunk of one request and its reply was queued with ``latency``, then written.

    ``steps`` runs from the client sending to the client having read the reply.
    """
    assert steps[0].what == steps[-1].what == "mark"
    for direction in ("up", "down"):
        pushes, writes = _pushes(steps, direction), _writes(steps, direction)
        assert pushes, f"nothing went {direction}"
        for push in pushes:
            assert push.queued, f"a chunk went {direction} at once"
            assert push.latency == latency
            assert push.due is not None
            assert push.earliest is not None
            assert push.due >= push.earliest  # scheduled no earlier than pushed + latency
        # Every chunk was written after it was queued, in the order queued, whole.
        assert [w.size for w in writes] == [p.size for p in pushes]
        for push, write in zip(pushes, writes, strict=True):
            assert steps.index(push) < steps.index(write)
    # The request was forwarded before the server answered; the client read the reply
    # only after the proxy had written the last of it.
    assert steps.index(_writes(steps, "up")[-1]) < steps.index(_pushes(steps, "down")[0])
    assert steps.index(_writes(steps, "down")[-1]) < len(steps) - 1


def test_latency_delays_both_directions_in_order(
    srv: LocalServer, proxy: FaultProxy, wire: list[_Step]
) -> None:
    with _via(srv, proxy, autocommit=True) as conn:
        rows, direct = _query_steps(conn, wire, "SELECT 1")
        assert rows == [(1,)]
        # No latency: each chunk is written while it is pushed, never queued.
        assert _pushes(direct, "up")
        assert _pushes(direct, "down")
        assert not any(s.queued for s in direct if s.what == "push")

        proxy.set_latency(0.2)
        rows, delayed = _query_steps(conn, wire, "SELECT 1")
        assert rows == [(1,)]
        _assert_held_then_forwarded(delayed, 0.2)

        # Several chunks each way, each delayed: they must still arrive in order.
        proxy.set_latency(0.02)
        rows, chunks = _query_steps(
            conn, wire, "SELECT repeat('y', 500) || i FROM generate_series(1, 3000) i"
        )
        assert [r[0] for r in rows] == ["y" * 500 + str(i) for i in range(1, 3001)]
        assert len(_pushes(chunks, "down")) > 1
        _assert_held_then_forwarded(chunks, 0.02)

        # Back to none: written at once again.
        proxy.set_latency(0)
        rows, undelayed = _query_steps(conn, wire, "SELECT 1")
        assert rows == [(1,)]
        assert _pushes(undelayed, "up")
        assert not any(s.queued for s in undelayed if s.what == "push")


def test_pause_holds_traffic_until_resume(
    srv: LocalServer, proxy: FaultProxy, wire: list[_Step]
) -> None:
    conn = _via(srv, proxy, autocommit=True)
    results: dict[str, Any] = {}

    def query() -> None:
        results["query"] = conn.execute("SELECT 42").fetchone()

    def connect() -> None:
        with _via(srv, proxy) as other:
            results["connect"] = other.execute("SELECT 7").fetchone()

    proxy.pause()
    start = len(wire)
    workers = [threading.Thread(target=query), threading.Thread(target=connect)]
    for worker in workers:
        worker.start()
    # Both clients' first bytes (the query; the new session's startup) reached the proxy.
    assert _wait_until(lambda: len(_pushes(wire[start:], "up")) >= 2)
    assert proxy.stats.connections_accepted == 2
    held = wire[start:]
    assert all(s.queued for s in _pushes(held, "up"))
    assert not _writes(held, "up")
    assert not _writes(held, "down")
    assert all(worker.is_alive() for worker in workers)
    assert results == {}
    proxy.resume()
    for worker in workers:
        worker.join(5)
    assert results == {"query": (42,), "connect": (7,)}
    # On resume the held chunks went out first, before anything else was forwarded.
    held_sizes = sorted(p.size for p in _pushes(held, "up"))
    resumed = sorted(w.size for w in _writes(wire[start:], "up")[: len(held_sizes)])
    assert resumed == held_sizes
    conn.close()


# --- COMMIT faults -------------------------------------------------------------------------------


def test_commit_drop_psycopg(
    srv: LocalServer, proxy: FaultProxy, admin: psycopg.Connection[Any], table: str
) -> None:
    conn = _via(srv, proxy)
    conn.execute(f"INSERT INTO {table} VALUES (%s)", (1,))
    proxy.arm_commit_drop()
    with pytest.raises(psycopg.OperationalError) as info:
        conn.commit()  # psycopg sends a simple Query "COMMIT"
    _assert_psycopg_lost(info.value, conn)
    assert proxy.wait_commit_faults(5)
    assert _count(admin, table, 1) == 1  # the server committed, once
    stats = proxy.stats
    assert (stats.commits_seen, stats.commits_dropped) == (1, 1)
    conn.close()


def test_commit_drop_psycopg_pipeline(
    srv: LocalServer, proxy: FaultProxy, admin: psycopg.Connection[Any], table: str
) -> None:
    # In pipeline mode COMMIT goes as Parse/Bind/Describe/Execute/Sync, in one write
    # with the INSERT before it.
    conn = _via(srv, proxy)
    conn.execute("SELECT 1")
    proxy.arm_commit_drop()

    def insert_and_commit() -> None:
        with conn.pipeline():
            conn.execute(f"INSERT INTO {table} VALUES (%s)", (2,))
            conn.commit()

    with pytest.raises(psycopg.OperationalError) as info:
        insert_and_commit()
    assert classify(info.value, connection=conn).kind is Kind.CONNECTION_LOST
    assert proxy.wait_commit_faults(5)
    assert _count(admin, table, 2) == 1
    assert proxy.stats.commits_dropped == 1
    conn.close()


def test_commit_drop_pyodbc(proxy: FaultProxy, admin: psycopg.Connection[Any], table: str) -> None:
    conn = _odbc_via(proxy)
    conn.cursor().execute(f"INSERT INTO {table} VALUES (?)", 3)
    proxy.arm_commit_drop()
    with pytest.raises(pyodbc.Error) as info:
        conn.commit()  # psqlODBC sends a simple Query "COMMIT"
    _assert_odbc_lost(info.value, conn)
    assert proxy.wait_commit_faults(5)
    assert _count(admin, table, 3) == 1
    assert proxy.stats.commits_dropped == 1
    conn.close()


def _activity(admin: psycopg.Connection[Any], pid: int) -> tuple[Any, ...] | None:
    """(state, xid, last query) of a backend, or None when it is gone."""
    return admin.execute(
        "SELECT state, backend_xid::text, query FROM pg_stat_activity WHERE pid = %s", (pid,)
    ).fetchone()


def _xact_status(admin: psycopg.Connection[Any], xid: str) -> str | None:
    row = admin.execute("SELECT pg_xact_status(%s::xid8)", (xid,)).fetchone()
    assert row is not None
    return None if row[0] is None else str(row[0])


def _prepare_held_commit(conn: psycopg.Connection[Any], table: str, value: int) -> tuple[int, str]:
    conn.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
    row = conn.execute("SELECT pg_current_xact_id_if_assigned()::text").fetchone()
    assert row is not None
    assert row[0] is not None
    return conn.info.backend_pid, str(row[0])


def test_commit_hold_leaves_the_old_session_idle_in_transaction(
    srv: LocalServer, proxy: FaultProxy, admin: psycopg.Connection[Any], table: str
) -> None:
    conn = _via(srv, proxy)
    pid, xid = _prepare_held_commit(conn, table, 4)
    proxy.arm_commit_hold()
    with pytest.raises(psycopg.OperationalError) as info:
        conn.commit()
    _assert_psycopg_lost(info.value, conn)
    assert proxy.wait_commit_faults(5)

    assert _activity(admin, pid) == (
        "idle in transaction",
        xid,
        "SELECT pg_current_xact_id_if_assigned()::text",
    )
    assert _count(admin, table, 4) == 0
    assert _xact_status(admin, xid) == "in progress"
    assert proxy.stats.commits_held == 1
    assert proxy.stats.connections_open == 1  # the held server side

    admin.execute("SELECT pg_terminate_backend(%s)", (pid,))
    assert _wait_until(lambda: _activity(admin, pid) is None)
    assert _xact_status(admin, xid) == "aborted"
    assert _count(admin, table, 4) == 0
    # The server ended the held session itself: nothing is left to release.
    assert _wait_until(lambda: proxy.stats.connections_open == 0)
    assert proxy.release_held() == 0
    conn.close()


def test_commit_hold_of_a_prepared_commit_then_release(
    srv: LocalServer, proxy: FaultProxy, admin: psycopg.Connection[Any], table: str
) -> None:
    # A prepared COMMIT: Parse+Sync first (not a commit: let through), then
    # Bind/Describe/Execute/Sync (the commit: withheld).
    conn = _via(srv, proxy)
    pid, xid = _prepare_held_commit(conn, table, 5)
    proxy.arm_commit_hold()
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("COMMIT", prepare=True)
    _assert_psycopg_lost(info.value, conn)
    assert proxy.wait_commit_faults(5)
    # The Parse of COMMIT reached the server (it is the last query it saw); the Execute not.
    assert _activity(admin, pid) == ("idle in transaction", xid, "COMMIT")

    assert proxy.release_held() == 1
    assert proxy.stats.connections_open == 0
    assert _wait_until(lambda: _activity(admin, pid) is None)
    assert _xact_status(admin, xid) == "aborted"
    assert _count(admin, table, 5) == 0
    assert proxy.release_held() == 0
    conn.close()


def test_commit_faults_fire_in_the_order_armed(
    srv: LocalServer, proxy: FaultProxy, admin: psycopg.Connection[Any], table: str
) -> None:
    proxy.arm_commit_drop()
    proxy.arm_commit_hold()
    assert not proxy.wait_commit_faults(0.05)
    for value in (6, 7):
        conn = _via(srv, proxy)
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (value,))
        with pytest.raises(psycopg.OperationalError):
            conn.commit()
        conn.close()
    assert proxy.wait_commit_faults(5)
    assert (_count(admin, table, 6), _count(admin, table, 7)) == (1, 0)
    # Nothing armed any more: a COMMIT just works.
    with _via(srv, proxy) as conn:
        conn.execute(f"INSERT INTO {table} VALUES (%s)", (8,))
    assert _count(admin, table, 8) == 1
    stats = proxy.stats
    assert (stats.commits_seen, stats.commits_dropped, stats.commits_held) == (3, 1, 1)
    assert proxy.release_held() == 1


# --- refusing, many connections, closing ----------------------------------------------------


def test_reject_new_connections(srv: LocalServer, proxy: FaultProxy) -> None:
    with _via(srv, proxy) as before:
        proxy.reject_new()
        with pytest.raises(psycopg.OperationalError) as info:
            _via(srv, proxy)
        assert classify(info.value).kind is Kind.CONNECT_FAILED
        # Connections made before are not touched.
        assert before.execute("SELECT 1").fetchone() == (1,)
    proxy.reject_new(False)
    with _via(srv, proxy) as after:
        assert after.execute("SELECT 1").fetchone() == (1,)
    stats = proxy.stats
    assert (stats.connections_accepted, stats.connections_rejected) == (2, 1)


def test_thousands_of_connections_leak_nothing(srv: LocalServer, proxy: FaultProxy) -> None:
    conninfo = srv.conninfo(port=str(proxy.port))
    fds, threads = _fd_count(), threading.active_count()

    def run(n: int) -> None:
        for _ in range(n):
            psycopg.connect(conninfo).close()

    run(1200)
    # Some concurrently, each session kept open for a query.
    workers = [threading.Thread(target=run, args=(200,)) for _ in range(4)]
    for worker in workers:
        worker.start()
    with _via(srv, proxy) as conn:
        for _ in range(200):
            conn.execute("SELECT 1")
    for worker in workers:
        worker.join()

    assert proxy.stats.connections_accepted == 2001
    assert _wait_until(lambda: proxy.stats.connections_open == 0)
    assert abs(_fd_count() - fds) <= 3
    assert threading.active_count() == threads


def _socket_fds() -> int:
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # an fd closed meanwhile
            count += os.readlink(f"/proc/self/fd/{fd}").startswith("socket:")
    return count


def test_close_with_open_connections_leaves_nothing(
    srv: LocalServer, admin: psycopg.Connection[Any], table: str
) -> None:
    sockets, threads = _socket_fds(), threading.active_count()
    proxy = FaultProxy("127.0.0.1", srv.port).start()
    try:
        assert threading.active_count() == threads + 1
        conninfo = srv.conninfo(port=str(proxy.port), application_name="proxy_close")
        conns = [psycopg.connect(conninfo) for _ in range(4)]
        # One more whose server side is held.
        held = psycopg.connect(conninfo)
        held.execute(f"INSERT INTO {table} VALUES (9)")
        proxy.arm_commit_hold()
        with pytest.raises(psycopg.OperationalError):
            held.commit()
        held.close()

        proxy.close()
        proxy.close()  # idempotent
        assert threading.active_count() == threads
        assert _socket_fds() == sockets + 4  # only the clients' own sockets
        assert proxy.stats.connections_open == 0
        for conn in conns:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("SELECT 1")
            conn.close()
        assert _socket_fds() == sockets
        # The server saw every session end, the held one included.
        query = "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'proxy_close'"
        assert _wait_until(lambda: admin.execute(query).fetchone() == (0,))
    finally:
        proxy.close()  # idempotent: only matters when an assertion above failed
