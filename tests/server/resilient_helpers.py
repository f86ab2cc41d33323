"""What the resilient-connection tests share: statements on either driver, the cluster's
connection strings, an event recorder whose hook failures are never lost, and the async
flavour (the same tests against `AsyncResilientConnection`, see `connect`)."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import inspect
import threading
import traceback
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, ClassVar, TypeAlias, TypeVar

import psycopg
import pytest

import symfo_failover as sf
from symfo_failover.harness import LocalCluster, LocalServer

#: libpq's key names, as psqlODBC spells them.
_ODBC_KEYS = {"dbname": "Database", "user": "Uid", "password": "Pwd", "host": "Server",
              "port": "Port"}


def conninfo(
    driver: str, cluster: LocalCluster | LocalServer, host: str | None = None,
    port: int | None = None, **libpq: str,
) -> str:
    """A libpq (psycopg, sync or async) or ODBC (pyodbc) connection string to ``cluster``;
    ``host``, ``port`` and the other keys are given with libpq's names for either driver."""
    if host is not None:
        libpq["host"] = host
    if port is not None:
        libpq["port"] = str(port)
    if driver in PSYCOPG_FLAVOURS:
        return cluster.conninfo(**libpq)
    return cluster.odbc_connection_string(**{_ODBC_KEYS[k]: v for k, v in libpq.items()})


def exe(raw: Any, sql: str, *params: Any) -> Any:
    """Run one statement on a raw psycopg (sync, or async blocking) or pyodbc connection
    (``%s`` placeholders)."""
    if isinstance(raw, PSYCOPG_SESSIONS):
        return raw.execute(sql, params or None)
    return raw.execute(sql.replace("%s", "?"), *params)


def rows(cluster: LocalCluster, table: str, entry: str, column: str = "id") -> int:
    """How many rows of ``table`` have ``column = entry`` (read on a session of its own)."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s",
                           (entry,)).fetchone()
        assert row is not None
        return int(row[0])


class Recorder:
    """An on_event hook that keeps the events and can act on one.

    The library swallows what a hook raises (an observer must not change what the
    application sees), so an assertion inside a hook could never fail a test. Every
    hook failure is kept here instead, and the `_hooks_did_not_fail` fixture of
    tests/server/conftest.py fails the test after it ran.
    """

    made: ClassVar[list[Recorder]] = []

    def __init__(self) -> None:
        self.events: list[sf.Event] = []
        self.on: dict[type[sf.Event], Callable[[sf.Event], None]] = {}
        self.failures: list[str] = []
        Recorder.made.append(self)

    def __call__(self, event: sf.Event) -> None:
        self.events.append(event)
        action = self.on.pop(type(event), None)
        if action is not None:
            try:
                action(event)
            except BaseException:
                self.failures.append(traceback.format_exc())
                raise

    def of(self, kind: type[sf.Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Unit:
    """A transfer that counts how often it ran."""

    def __init__(self, entry: str, amount: int = 1) -> None:
        self.entry, self.amount, self.runs = entry, amount, 0

    def __call__(self, raw: Any) -> str:
        self.runs += 1
        exe(raw, "INSERT INTO ledger VALUES (%s, %s)", self.entry, self.amount)
        exe(raw, "UPDATE counter SET n = n + 1")
        return f"done {self.entry}"


# --- the async flavour: the same tests against AsyncResilientConnection -----------------
#
# Every resilient-connection test runs with ``driver`` "psycopg" (ResilientConnection),
# "psycopg-async" (AsyncResilientConnection) and "pyodbc". The tests are written once, in
# blocking code; for "psycopg-async", `connect` returns a `BlockingResilientConnection`:
# the sync interface, each call awaiting the AsyncResilientConnection on an event loop
# in a thread of its own. A unit given to its run() is run by an ``async def`` unit,
# which calls it in a worker thread with a `BlockingConnection` over the lent
# ``psycopg.AsyncConnection``; everything the unit does there (statements, fetches, a
# nested run(), a passthrough call) is awaited by the unit's own task, as an ``async
# def`` unit would await it. Results and exceptions come back unchanged: the same
# objects.

ASYNC = "psycopg-async"
#: The ``driver`` values of the tests that run on either driver.
DRIVERS = ["psycopg", ASYNC, pytest.param("pyodbc", marks=pytest.mark.odbc)]
#: The ``driver`` values of the tests that need psycopg: the sync and the async connection.
PSYCOPG_FLAVOURS = ["psycopg", ASYNC]

_T = TypeVar("_T")
_local = threading.local()
_loop_lock = threading.Lock()
_loop_box: list[asyncio.AbstractEventLoop] = []


def _event_loop() -> asyncio.AbstractEventLoop:
    """The one event loop of the async flavour, running in a thread of its own."""
    with _loop_lock:
        if not _loop_box:
            loop = asyncio.new_event_loop()
            thread = threading.Thread(target=loop.run_forever, name="async-flavour-loop",
                                      daemon=True)
            thread.start()
            loop.call_soon_threadsafe(setattr, _local, "on_loop", True)

            def stop() -> None:
                loop.call_soon_threadsafe(loop.stop)
                thread.join(5)
                if not loop.is_running():
                    loop.close()

            atexit.register(stop)
            _loop_box.append(loop)
        return _loop_box[0]


def _block(make: Callable[[], Awaitable[_T]]) -> _T:
    """``await make()`` from blocking code: its result, or its exception (the same object).

    In a unit's (or configure's) worker thread the awaiting is done by the task running
    the unit (`_in_a_thread`); elsewhere by a task of its own.
    """
    loop = _event_loop()
    if getattr(_local, "on_loop", False):
        raise RuntimeError("a blocking call on the event loop's own thread would hang "
                           "(an event hook must not call the connection)")
    future: concurrent.futures.Future[_T] = concurrent.futures.Future()
    calls: asyncio.Queue[Any] | None = getattr(_local, "calls", None)
    if calls is not None:
        loop.call_soon_threadsafe(calls.put_nowait, (make, future))
    else:
        loop.call_soon_threadsafe(_start, loop, make, future)
    return future.result()


#: The tasks `_block` started, kept until done (the loop holds only weak references).
_tasks: set[asyncio.Task[None]] = set()


def _start(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[_T]],
           future: concurrent.futures.Future[_T]) -> None:
    task = loop.create_task(_settle(make, future))
    _tasks.add(task)
    task.add_done_callback(_tasks.discard)


async def _settle(make: Callable[[], Awaitable[_T]],
                  future: concurrent.futures.Future[_T]) -> None:
    try:
        result = await make()
    except BaseException as exc:
        future.set_exception(exc)
    else:
        future.set_result(result)


_DONE = object()


async def _in_a_thread(fn: Callable[[], _T]) -> _T:
    """Call the blocking ``fn()`` in a worker thread; what it awaits through `_block`
    is awaited here, by this task. A cancellation of this task while ``fn`` is busy
    outside the loop reaches ``fn`` at its next await, as in an ``async def`` function."""
    loop = asyncio.get_running_loop()
    calls: asyncio.Queue[Any] = asyncio.Queue()

    def body() -> None:
        _local.calls = calls
        try:
            outcome: tuple[bool, Any] = (True, fn())
        except BaseException as exc:
            outcome = (False, exc)
        finally:
            _local.calls = None
        loop.call_soon_threadsafe(calls.put_nowait, (_DONE, outcome))

    threading.Thread(target=body, name="async-flavour-unit", daemon=True).start()
    cancelled: BaseException | None = None
    while True:
        try:
            make, slot = await calls.get()
        except asyncio.CancelledError as exc:
            cancelled = exc
            continue
        if make is _DONE:
            ok, value = slot
            if ok:
                if cancelled is not None:
                    raise cancelled
                return value  # type: ignore[no-any-return]
            raise value
        if cancelled is not None:
            slot.set_exception(cancelled)
            cancelled = None
            continue
        try:
            slot.set_result(await make())
        except BaseException as exc:
            slot.set_exception(exc)


class BlockingCursor:
    """A ``psycopg.AsyncCursor`` used from blocking code."""

    def __init__(self, cursor: psycopg.AsyncCursor[Any]) -> None:
        self.async_cursor = cursor

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> BlockingCursor:
        _block(lambda: self.async_cursor.execute(query, params, **kwargs))
        return self

    def executemany(self, query: Any, params_seq: Any, **kwargs: Any) -> None:
        _block(lambda: self.async_cursor.executemany(query, params_seq, **kwargs))

    def fetchone(self) -> Any:
        return _block(self.async_cursor.fetchone)

    def fetchmany(self, size: int = 0) -> list[Any]:
        return _block(lambda: self.async_cursor.fetchmany(size))

    def fetchall(self) -> list[Any]:
        return _block(self.async_cursor.fetchall)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.fetchall())

    def close(self) -> None:
        _block(self.async_cursor.close)

    @property
    def connection(self) -> BlockingConnection:
        return BlockingConnection(self.async_cursor.connection)

    def __getattr__(self, name: str) -> Any:  # rowcount, description, statusmessage
        return _blocking(getattr(self.async_cursor, name))


class BlockingConnection:
    """A ``psycopg.AsyncConnection`` (the lent one, in a unit) used from blocking code."""

    def __init__(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self.async_connection = conn

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> BlockingCursor:
        return BlockingCursor(_block(lambda: self.async_connection.execute(
            query, params, **kwargs)))

    def cursor(self, *args: Any, **kwargs: Any) -> BlockingCursor:
        return BlockingCursor(self.async_connection.cursor(*args, **kwargs))

    def commit(self) -> None:
        _block(self.async_connection.commit)

    def rollback(self) -> None:
        _block(self.async_connection.rollback)

    def close(self) -> None:
        _block(self.async_connection.close)

    def call(self, fn: Callable[..., Awaitable[_T]], *args: Any) -> _T:
        """``await fn(async_connection, *args)``: e.g. a base class's method."""
        return _block(lambda: fn(self.async_connection, *args))

    @property
    def autocommit(self) -> bool:
        return self.async_connection.autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        _block(lambda: self.async_connection.set_autocommit(value))

    def transaction(self, *args: Any, **kwargs: Any) -> _BlockingContext:
        return _BlockingContext(self.async_connection.transaction(*args, **kwargs))

    def __enter__(self) -> BlockingConnection:
        _block(self.async_connection.__aenter__)
        return self

    def __exit__(self, *exc: Any) -> Any:
        return _block(lambda: self.async_connection.__aexit__(*exc))

    def __getattr__(self, name: str) -> Any:  # closed, broken, pgconn, info
        return _blocking(getattr(self.async_connection, name))


class _BlockingContext:
    def __init__(self, context: Any) -> None:
        self.context = context

    def __enter__(self) -> Any:
        return _block(self.context.__aenter__)

    def __exit__(self, *exc: Any) -> Any:
        return _block(lambda: self.context.__aexit__(*exc))


def _blocking(value: Any) -> Any:
    """An attribute as blocking code uses it: a coroutine method is awaited when called."""
    if inspect.iscoroutinefunction(value):
        return lambda *args, **kwargs: _block(lambda: value(*args, **kwargs))
    return value


class BlockingResilientConnection:
    """`ResilientConnection`'s interface over an `AsyncResilientConnection`
    (``async_connection``): each call awaits the async one."""

    def __init__(self, conn: sf.AsyncResilientConnection[Any]) -> None:
        self.async_connection = conn

    @classmethod
    def open(cls, conninfo: str, *, configure: Callable[[Any], object] | None = None,
             **kwargs: Any) -> BlockingResilientConnection:
        aconfigure = None
        if configure is not None:
            def run_configure(raw: Any) -> Awaitable[object]:
                return _in_a_thread(lambda: configure(BlockingConnection(raw)))
            aconfigure = run_configure
        conn = _block(lambda: sf.connect_async(conninfo, configure=aconfigure, **kwargs))
        assert isinstance(conn, sf.AsyncResilientConnection)
        return cls(conn)

    def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """``await run(unit)``, the ``async def`` unit calling ``fn`` (see above)."""
        async def unit(raw: Any, *args: Any, **kwargs: Any) -> _T:
            assert isinstance(raw, psycopg.AsyncConnection)
            return await _in_a_thread(lambda: fn(BlockingConnection(raw), *args, **kwargs))

        return self.run_as_given(unit, *args, **kwargs)

    def run_as_given(self, fn: Any, /, *args: Any, **kwargs: Any) -> Any:
        """``await run(fn)`` with ``fn`` itself, not wrapped: for what the async run refuses."""
        return _block(lambda: self.async_connection.run(fn, *args, **kwargs))

    def cursor(self, *args: Any, **kwargs: Any) -> BlockingCursor:
        return BlockingCursor(_block(lambda: self.async_connection.cursor(*args, **kwargs)))

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> BlockingCursor:
        return BlockingCursor(_block(lambda: self.async_connection.execute(
            query, params, **kwargs)))

    def commit(self) -> None:
        _block(self.async_connection.commit)

    def rollback(self) -> None:
        _block(self.async_connection.rollback)

    def close(self) -> None:
        _block(self.async_connection.close)

    def __enter__(self) -> BlockingResilientConnection:
        return self

    def __exit__(self, *exc: Any) -> None:
        _block(lambda: self.async_connection.__aexit__(*exc))

    @property
    def connection(self) -> Any:
        return self.async_connection.connection

    @property
    def closed(self) -> bool:
        return self.async_connection.closed

    @property
    def driver(self) -> str:
        return self.async_connection.driver

    @property
    def session(self) -> sf.SessionInfo | None:
        return self.async_connection.session

    @property
    def autocommit(self) -> bool:
        return self.async_connection.autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        _block(lambda: self.async_connection.set_autocommit(value))

    @property
    def isolation_level(self) -> str | None:
        return self.async_connection.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: object) -> None:
        _block(lambda: self.async_connection.set_isolation_level(value))

    @property
    def read_only(self) -> bool | None:
        return self.async_connection.read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        _block(lambda: self.async_connection.set_read_only(value))


#: A resilient connection as the tests use it: the sync one, or the async one blocking.
Resilient: TypeAlias = "sf.ResilientConnection[Any] | BlockingResilientConnection"
#: The lent session of a psycopg unit, sync or async.
PSYCOPG_SESSIONS = (psycopg.Connection, BlockingConnection)


def connect(conninfo: str, *, driver: str = "psycopg", **kwargs: Any) -> Any:
    """`symfo_failover.connect`, or for ``driver="psycopg-async"`` `connect_async`
    behind a `BlockingResilientConnection`."""
    if driver == ASYNC:
        return BlockingResilientConnection.open(conninfo, **kwargs)
    return sf.connect(conninfo, driver=driver, **kwargs)
