"""`FailoverPool` / `AsyncFailoverPool` keep psycopg_pool's documented contract.

The requirement: the failover pools take psycopg_pool 3.3's constructor arguments with
their meaning and defaults, and everything psycopg_pool documents (``connection()``,
``getconn()``/``putconn()``, ``get_stats()``/``pop_stats()``, ``check()``, ``drain()``,
``resize()``, ``wait()``, ``open()``/``close()``, the context manager) behaves as it
documents. What is tested here is that documentation (psycopg_pool's docstrings), not
psycopg_pool's internals: only public methods, properties, callbacks and the
``get_stats()`` counters are looked at.

Every test runs on the failover pools and, as a control that the test itself asks
only for documented behaviour, on psycopg_pool's own ``ConnectionPool`` /
``AsyncConnectionPool`` side by side. All bodies are coroutines run by
``asyncio.run()``; the sync pools are called from them directly (blocking the loop is
harmless here) and, where a second client is needed, from a thread.

Only outcomes and order are asserted, never durations; timeouts are only *given*.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import inspect
import socket
import sys
import threading
import uuid
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import psycopg_pool
import pytest
from psycopg_pool import PoolClosed, PoolTimeout, TooManyRequests
from test_exactly_once import capture_logs

import symfo_failover as sf
from symfo_failover.harness import LocalServer

pytestmark = [pytest.mark.server, pytest.mark.timeout(30)]

FAILOVER = {"sync": sf.FailoverPool, "async": sf.AsyncFailoverPool}
PLAIN = {"sync": psycopg_pool.ConnectionPool, "async": psycopg_pool.AsyncConnectionPool}
BASES = {"sync": psycopg.Connection, "async": psycopg.AsyncConnection}

# (pool class, flavour): every test runs on our two pools and psycopg_pool's two.
ALL = [
    pytest.param(sf.FailoverPool, "sync", id="FailoverPool"),
    pytest.param(sf.AsyncFailoverPool, "async", id="AsyncFailoverPool"),
    pytest.param(psycopg_pool.ConnectionPool, "sync", id="psycopg_pool.ConnectionPool"),
    pytest.param(psycopg_pool.AsyncConnectionPool, "async",
                 id="psycopg_pool.AsyncConnectionPool"),
]
OURS = ALL[:2]

PSYCOPG_POOL_DIR = Path(psycopg_pool.__file__).parent
OUR_EVENT_NAMES = ("pool_failover", "pool_connection_replaced", "pool_refilled",
                   "pool_connect_failed")


# --- helpers ------------------------------------------------------------------------------


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


async def aw(value: Any) -> Any:
    """``await`` what the async pool returns; a sync pool's value as it is."""
    return await value if inspect.isawaitable(value) else value


@contextlib.asynccontextmanager
async def entered(cm: Any) -> AsyncIterator[Any]:
    """``async with`` or ``with``, whichever ``cm`` is."""
    if hasattr(cm, "__aenter__"):
        async with cm as value:
            yield value
    else:
        with cm as value:
            yield value


async def one(conn: Any, sql: str, params: Any = None) -> Any:
    cur = await aw(conn.execute(sql, params))
    return await aw(cur.fetchone())


async def pid_of(conn: Any) -> int:
    return int((await one(conn, "SELECT pg_backend_pid()"))[0])


def callback(flavour: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` as the pool's flavour wants its connection callbacks (a coroutine
    function for the async pools)."""
    if flavour == "sync":
        return fn

    async def acb(*args: Any) -> Any:
        return fn(*args)

    return acb


async def until(predicate: Callable[[], Any], what: str, timeout: float = 8.0) -> None:
    """Wait for an outcome (a failure says which one never came, not how long it took)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await aw(predicate()):
        if loop.time() > deadline:
            raise AssertionError(f"never happened: {what}")
        await asyncio.sleep(0.02)


def start_getconn(pool: Any, timeout: float) -> asyncio.Future[Any]:
    """A second client asking for a connection, concurrently."""
    if inspect.iscoroutinefunction(pool.getconn):
        return asyncio.ensure_future(pool.getconn(timeout=timeout))
    return asyncio.ensure_future(asyncio.to_thread(pool.getconn, timeout))


def terminate(server: LocalServer, pid: int) -> None:
    """End one backend from another session and wait until its process is gone."""
    with psycopg.connect(server.conninfo(), autocommit=True) as admin:
        assert admin.execute("SELECT pg_terminate_backend(%s)", [pid]).fetchone() == (True,)
        for _ in range(400):
            row = admin.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = %s",
                                [pid]).fetchone()
            # Gone from pg_stat_activity is not yet gone: the process (and so its
            # socket) ends a little later.
            if row == (0,) and pid not in server.backend_pids():
                return
            threading.Event().wait(0.02)
    raise AssertionError(f"backend {pid} did not end")


def dead_conninfo() -> str:
    """A conninfo to a loopback port where nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=1"


async def hold_all(pool: Any, n: int) -> list[Any]:
    """``n`` connections out of the pool at once."""
    return [await aw(pool.getconn(timeout=5)) for _ in range(n)]


async def put_all(pool: Any, conns: list[Any]) -> None:
    for conn in conns:
        await aw(pool.putconn(conn))


@pytest.fixture
def ci(server: LocalServer) -> str:
    return server.conninfo()


# --- the classes --------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_subclasses_of_psycopg_pool(flavour: str, ci: str) -> None:
    ours, plain = FAILOVER[flavour], PLAIN[flavour]
    assert issubclass(ours, plain)
    other = PLAIN["async" if flavour == "sync" else "sync"]
    assert not issubclass(ours, other)

    async def body() -> None:
        pool = ours(ci, min_size=1, open=False)
        try:
            assert isinstance(pool, plain)
            assert isinstance(pool, ours)
        finally:
            await aw(pool.close())

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_generic_subscription(cls: type[Any], flavour: str, ci: str) -> None:
    alias = cls[BASES[flavour][Any]]
    assert alias.__origin__ is cls

    async def body() -> None:
        async with entered(alias(ci, min_size=1, open=False)) as pool:
            assert type(pool) is cls
            async with entered(pool.connection()) as conn:
                assert isinstance(conn, BASES[flavour])

    run(body())


# --- connection parameters ----------------------------------------------------------------


@pytest.mark.parametrize(("cls", "flavour"), ALL)
@pytest.mark.parametrize("async_callable", [False, True], ids=["sync-callable",
                                                               "async-callable"])
def test_callable_conninfo_and_kwargs(cls: type[Any], flavour: str, async_callable: bool,
                                      ci: str) -> None:
    if async_callable and flavour == "sync":
        pytest.skip("only the async pools take coroutine functions")
    calls: list[str] = []

    def conninfo() -> str:
        calls.append("conninfo")
        return ci

    def kwargs() -> dict[str, Any]:
        calls.append("kwargs")
        return {"application_name": f"from-callable-{len(calls)}"}

    give_conninfo: Any = conninfo
    give_kwargs: Any = kwargs
    if async_callable:
        async def aconninfo() -> str:
            return conninfo()

        async def akwargs() -> dict[str, Any]:
            return kwargs()

        give_conninfo, give_kwargs = aconninfo, akwargs

    async def body() -> None:
        async with entered(cls(give_conninfo, kwargs=give_kwargs, min_size=2,
                               open=False)) as pool:
            await aw(pool.wait(timeout=5))
            conns = await hold_all(pool, 2)
            try:
                names = {(await one(c, "SHOW application_name"))[0] for c in conns}
            finally:
                await put_all(pool, conns)
        # Called again for each new connection: each has its own value.
        assert calls.count("conninfo") == 2
        assert calls.count("kwargs") == 2
        assert len(names) == 2
        assert all(n.startswith("from-callable-") for n in names)

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_kwargs_dict_reaches_the_connections(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, kwargs={"application_name": "contract-kw",
                                           "autocommit": True},
                               min_size=1, open=False)) as pool, entered(pool.connection()) as conn:
            assert (await one(conn, "SHOW application_name")) == ("contract-kw",)
            assert conn.autocommit is True

    run(body())


def _libpq_setting_of(conn: Any, key: str) -> str | None:
    return conn.info.get_parameters().get(key)


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_string_conninfo_parameters_are_kept(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(f"{ci} tcp_user_timeout=1234", min_size=1,
                               open=False)) as pool, entered(pool.connection()) as conn:
            assert _libpq_setting_of(conn, "tcp_user_timeout") == "1234"

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_callable_conninfo_parameters_are_kept(cls: type[Any], flavour: str,
                                               ci: str) -> None:
    """A callable conninfo means what the string it returns means."""
    async def body() -> None:
        async with entered(cls(lambda: f"{ci} tcp_user_timeout=1234", min_size=1,
                               open=False)) as pool, entered(pool.connection()) as conn:
            assert _libpq_setting_of(conn, "tcp_user_timeout") == "1234"

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_connection_class_connect_is_used(cls: type[Any], flavour: str, ci: str) -> None:
    made: list[type[Any]] = []
    if flavour == "sync":
        class MyConnection(psycopg.Connection[Any]):
            @classmethod
            def connect(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
                made.append(cls)
                return super().connect(*args, **kwargs)
    else:
        class MyConnection(psycopg.AsyncConnection[Any]):  # type: ignore[no-redef]
            @classmethod
            async def connect(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
                made.append(cls)
                return await super().connect(*args, **kwargs)

    async def body() -> None:
        async with entered(cls(ci, connection_class=MyConnection, min_size=2,
                               open=False)) as pool:
            await aw(pool.wait(timeout=5))
            conns = await hold_all(pool, 2)
            try:
                assert all(isinstance(c, MyConnection) for c in conns)
            finally:
                await put_all(pool, conns)
        assert len(made) == 2
        assert all(issubclass(k, MyConnection) for k in made)

    run(body())


# --- callbacks ----------------------------------------------------------------------------


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_configure_once_per_new_connection(cls: type[Any], flavour: str, ci: str) -> None:
    configured: list[Any] = []

    def configure(conn: Any) -> None:
        configured.append(conn)

    async def body() -> None:
        async with entered(cls(ci, configure=callback(flavour, configure), min_size=2,
                               open=False)) as pool:
            await aw(pool.wait(timeout=5))
            for _ in range(5):
                async with entered(pool.connection()) as conn:
                    assert any(conn is c for c in configured)
            assert len(configured) == 2
            assert configured[0] is not configured[1]

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_configure_settings_are_seen_by_clients(cls: type[Any], flavour: str,
                                                ci: str) -> None:
    if flavour == "sync":
        def configure(conn: Any) -> None:
            conn.execute("SET application_name = 'configured'")
            conn.commit()
    else:
        async def configure(conn: Any) -> None:
            await conn.execute("SET application_name = 'configured'")
            await conn.commit()

    async def body() -> None:
        pool = cls(ci, configure=configure, min_size=1, open=False)
        async with entered(pool), entered(pool.connection()) as conn:
            assert (await one(conn, "SHOW application_name")) == ("configured",)

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_reset_called_on_return(cls: type[Any], flavour: str, ci: str) -> None:
    order: list[tuple[str, Any]] = []
    returned = threading.Event()

    def reset(conn: Any) -> None:
        order.append(("reset", conn))
        returned.set()

    async def body() -> None:
        async with entered(cls(ci, reset=callback(flavour, reset), min_size=1,
                               open=False)) as pool:
            async with entered(pool.connection()) as conn:
                order.append(("used", conn))
                assert order == [("used", conn)]
            await until(returned.is_set, "reset called")
            assert [what for what, _ in order] == ["used", "reset"]
            assert order[1][1] is conn
            # and again on the next return, via putconn
            returned.clear()
            conn2 = await aw(pool.getconn(timeout=5))
            await aw(pool.putconn(conn2))
            await until(returned.is_set, "reset called on putconn")
            assert [what for what, _ in order] == ["used", "reset", "reset"]

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_check_callback_called_on_checkout(cls: type[Any], flavour: str, ci: str) -> None:
    checked: list[Any] = []

    def check(conn: Any) -> None:
        checked.append(conn)

    async def body() -> None:
        async with entered(cls(ci, check=callback(flavour, check), min_size=1,
                               open=False)) as pool:
            await aw(pool.wait(timeout=5))
            assert checked == []
            for n in range(1, 4):
                async with entered(pool.connection()) as conn:
                    assert len(checked) == n
                    assert checked[-1] is conn

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_check_callback_failure_is_not_given_to_the_client(cls: type[Any], flavour: str,
                                                           ci: str) -> None:
    """The client gets a connection only after a ``check`` that did not raise."""
    calls: list[tuple[Any, bool]] = []

    def check(conn: Any) -> None:
        ok = bool(calls)  # the first check fails
        calls.append((conn, ok))
        if not ok:
            raise psycopg.OperationalError("rejected by the check callback")

    async def body() -> None:
        async with entered(cls(ci, check=callback(flavour, check), min_size=1,
                               open=False)) as pool:
            await aw(pool.wait(timeout=5))
            async with entered(pool.connection(timeout=8)) as conn:
                assert [ok for _, ok in calls] == [False, True]
                assert calls[-1][0] is conn
                assert (await one(conn, "SELECT 1")) == (1,)

    run(body())


# --- connection(), getconn(), putconn() ---------------------------------------------------


@pytest.fixture
def table(server: LocalServer) -> Iterator[str]:
    name = f"contract_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.conninfo(), autocommit=True) as admin:
        admin.execute(f"CREATE TABLE {name} (v int)")
    yield name
    with psycopg.connect(server.conninfo(), autocommit=True) as admin:
        admin.execute(f"DROP TABLE {name}")


def _rows(server: LocalServer, table: str) -> list[tuple[int]]:
    with psycopg.connect(server.conninfo(), autocommit=True) as admin:
        return admin.execute(f"SELECT v FROM {table} ORDER BY v").fetchall()


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_connection_commits_on_success_rolls_back_on_error(
        cls: type[Any], flavour: str, server: LocalServer, table: str) -> None:
    class Boom(Exception):
        pass

    async def body() -> None:
        async with entered(cls(server.conninfo(), min_size=1, open=False)) as pool:
            async with entered(pool.connection()) as conn:
                await aw(conn.execute(f"INSERT INTO {table} VALUES (1)"))
            assert _rows(server, table) == [(1,)]
            with contextlib.suppress(Boom):
                async with entered(pool.connection()) as conn:
                    await aw(conn.execute(f"INSERT INTO {table} VALUES (2)"))
                    raise Boom
                raise AssertionError("the exception did not propagate")
            assert _rows(server, table) == [(1,)]
            # the connection went back usable, not in a transaction
            async with entered(pool.connection()) as conn:
                assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
                assert (await one(conn, "SELECT 1")) == (1,)

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_getconn_putconn(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=1, open=False)) as pool:
            await aw(pool.wait(timeout=5))
            assert pool.get_stats()["pool_available"] == 1
            conn = await aw(pool.getconn())
            assert isinstance(conn, BASES[flavour])
            assert (await one(conn, "SELECT 1")) == (1,)
            assert pool.get_stats()["pool_available"] == 0
            await aw(conn.commit())
            await aw(pool.putconn(conn))
            assert not conn.closed
            await until(lambda: pool.get_stats()["pool_available"] == 1, "returned")
            again = await aw(pool.getconn(timeout=5))
            assert not again.closed
            await aw(pool.putconn(again))

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_putconn_of_a_foreign_connection_raises(cls: type[Any], flavour: str,
                                                ci: str) -> None:
    async def body() -> None:
        async with (entered(cls(ci, min_size=1, open=False, name="mine")) as pool,
                    entered(cls(ci, min_size=1, open=False, name="other")) as other):
            stranger = await aw(BASES[flavour].connect(ci))
            try:
                with pytest.raises(ValueError, match="mine"):
                    await aw(pool.putconn(stranger))
            finally:
                await aw(stranger.close())
            theirs = await aw(other.getconn(timeout=5))
            try:
                with pytest.raises(ValueError, match="other"):
                    await aw(pool.putconn(theirs))
            finally:
                await aw(other.putconn(theirs))

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_timeout_raises_pool_timeout(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=1, timeout=0.3, open=False)) as pool:
            held = await aw(pool.getconn(timeout=5))
            try:
                with pytest.raises(PoolTimeout):
                    await aw(pool.getconn(timeout=0.2))
                with pytest.raises(PoolTimeout):  # the pool's own timeout
                    async with entered(pool.connection()):
                        pass
            finally:
                await aw(pool.putconn(held))
            async with entered(pool.connection()) as conn:
                assert (await one(conn, "SELECT 1")) == (1,)

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_max_waiting_raises_too_many_requests(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=1, max_waiting=1, open=False)) as pool:
            held = await aw(pool.getconn(timeout=5))
            waiter = start_getconn(pool, 8.0)
            try:
                await until(lambda: pool.get_stats()["requests_waiting"] == 1,
                            "one client queued")
                with pytest.raises(TooManyRequests):
                    await aw(pool.getconn(timeout=5))
                assert pool.get_stats()["requests_errors"] >= 1
            finally:
                await aw(pool.putconn(held))
                got = await waiter
            assert got is held or not got.closed  # the waiter was served
            await aw(pool.putconn(got))

    run(body())


# --- stats --------------------------------------------------------------------------------


async def _same_operations(pool: Any) -> dict[str, int]:
    await aw(pool.wait(timeout=5))
    for _ in range(2):
        async with entered(pool.connection()) as conn:
            await one(conn, "SELECT 1")
    held = await aw(pool.getconn(timeout=5))
    with pytest.raises(PoolTimeout):
        await aw(pool.getconn(timeout=0.2))
    await aw(pool.putconn(held))
    await until(lambda: pool.get_stats()["pool_available"] == 1, "returned")
    stats: dict[str, int] = pool.get_stats()
    return stats


@pytest.mark.parametrize("flavour", ["sync", "async"])
def test_get_stats_keys_same_as_psycopg_pool(flavour: str, ci: str) -> None:
    async def body() -> tuple[dict[str, int], dict[str, int]]:
        async with entered(FAILOVER[flavour](ci, min_size=1, open=False)) as ours:
            mine = await _same_operations(ours)
        async with entered(PLAIN[flavour](ci, min_size=1, open=False)) as plain:
            theirs = await _same_operations(plain)
        return mine, theirs

    mine, theirs = run(body())
    assert set(mine) == set(theirs)
    for key in ("pool_min", "pool_max", "pool_size", "pool_available", "requests_waiting",
                "requests_num", "requests_errors", "connections_num"):
        assert mine[key] == theirs[key], key


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_pop_stats_resets_counters(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=1, open=False)) as pool:
            for _ in range(3):
                async with entered(pool.connection()):
                    pass
            popped = pool.pop_stats()
            assert popped["requests_num"] == 3
            assert popped["connections_num"] >= 1
            after = pool.get_stats()
            assert after.get("requests_num", 0) == 0
            assert after.get("connections_num", 0) == 0
            # measures are not counters: still there
            assert after["pool_min"] == 1
            assert after["pool_max"] == 1
            assert after["pool_size"] == 1
            async with entered(pool.connection()):
                pass
            assert pool.get_stats()["requests_num"] == 1

    run(body())


# --- check(), drain(), resize(), wait() ---------------------------------------------------


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_check_replaces_a_broken_connection(cls: type[Any], flavour: str,
                                            server: LocalServer) -> None:
    async def body() -> None:
        async with entered(cls(server.conninfo(), min_size=2, open=False)) as pool:
            await aw(pool.wait(timeout=5))
            conns = await hold_all(pool, 2)
            pids = [await pid_of(c) for c in conns]
            for c in conns:
                await aw(c.commit())
            await put_all(pool, conns)
            terminate(server, pids[0])
            await aw(pool.check())
            await until(lambda: pool.get_stats()["pool_available"] == 2, "pool refilled")
            assert pool.get_stats()["connections_lost"] >= 1
            conns = await hold_all(pool, 2)
            try:
                now = {await pid_of(c) for c in conns}
            finally:
                for c in conns:
                    await aw(c.rollback())
                await put_all(pool, conns)
            assert pids[0] not in now
            assert pids[1] in now  # the working one was kept

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_drain_replaces_every_connection(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=3, open=False)) as pool:
            await aw(pool.wait(timeout=5))
            conns = await hold_all(pool, 3)
            before = {await pid_of(c) for c in conns}
            out = conns.pop()  # stays out of the pool across the drain
            for c in conns:
                await aw(c.commit())
            await put_all(pool, conns)
            await until(lambda: pool.get_stats()["pool_available"] == 2, "returned")
            await aw(pool.drain())
            assert not out.closed
            await aw(out.commit())
            await aw(pool.putconn(out))
            await until(lambda: out.closed, "the connection out at drain closed on return")
            await until(lambda: pool.get_stats()["pool_available"] == 3, "pool refilled")
            conns = await hold_all(pool, 3)
            try:
                after = {await pid_of(c) for c in conns}
            finally:
                for c in conns:
                    await aw(c.commit())
                await put_all(pool, conns)
            assert len(after) == 3
            assert not (before & after)

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_resize(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=1, max_size=2, open=False)) as pool:
            await aw(pool.wait(timeout=5))
            assert (pool.min_size, pool.max_size) == (1, 2)
            await aw(pool.resize(3, 5))
            assert (pool.min_size, pool.max_size) == (3, 5)
            stats = pool.get_stats()
            assert (stats["pool_min"], stats["pool_max"]) == (3, 5)
            await until(lambda: pool.get_stats()["pool_available"] == 3, "grown to 3")
            conns = await hold_all(pool, 3)
            await put_all(pool, conns)
            await aw(pool.resize(2))
            assert (pool.min_size, pool.max_size) == (2, 2)
            with pytest.raises(ValueError, match="max_size"):
                await aw(pool.resize(3, 2))

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_wait_fills_the_pool(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=3, open=False)) as pool:
            await aw(pool.wait(timeout=5))
            assert pool.get_stats()["pool_available"] == 3
            assert not pool.closed

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_wait_timeout_raises_and_closes_the_pool(cls: type[Any], flavour: str) -> None:
    async def body() -> None:
        pool = cls(dead_conninfo(), min_size=1, open=False, reconnect_timeout=0.5)
        async with entered(pool):
            with pytest.raises(PoolTimeout):
                await aw(pool.wait(timeout=0.5))
            assert pool.closed
            with pytest.raises(PoolClosed):
                await aw(pool.getconn(timeout=1))

    with capture_logs("symfo_failover"), capture_logs("psycopg.pool"):
        run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_open_wait_true(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        pool = cls(ci, min_size=2, open=False)
        try:
            await aw(pool.open(wait=True, timeout=5))
            assert pool.get_stats()["pool_available"] == 2
        finally:
            await aw(pool.close())

    run(body())


# --- open(), close(), context manager, properties ------------------------------------------


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_open_close_and_closed(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        pool = cls(ci, min_size=1, open=False)
        try:
            assert pool.closed
            with pytest.raises(PoolClosed):
                await aw(pool.getconn(timeout=1))
            await aw(pool.open())
            assert not pool.closed
            await aw(pool.open())  # safe again
            assert not pool.closed
            async with entered(pool.connection()) as conn:
                assert (await one(conn, "SELECT 1")) == (1,)
            out = await aw(pool.getconn(timeout=5))
        finally:
            await aw(pool.close())
        assert pool.closed
        await aw(pool.close())  # idempotent
        # "Currently used connections will not be closed until returned to the pool."
        assert not out.closed
        assert (await one(out, "SELECT 2")) == (2,)
        await aw(out.rollback())
        await aw(pool.putconn(out))
        assert out.closed
        with pytest.raises(PoolClosed):
            async with entered(pool.connection()):
                pass
        with pytest.raises(PoolClosed):
            await aw(pool.getconn(timeout=1))
        with pytest.raises(PoolClosed):  # cannot be re-opened
            await aw(pool.open())

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_close_fails_waiting_clients(cls: type[Any], flavour: str, ci: str) -> None:
    """"All the waiting and future clients will fail ... with a PoolClosed"."""
    async def body() -> None:
        pool = cls(ci, min_size=1, open=False)
        held = None
        try:
            await aw(pool.open())
            held = await aw(pool.getconn(timeout=5))
            waiter = start_getconn(pool, 8.0)
            await until(lambda: pool.get_stats()["requests_waiting"] == 1, "queued")
        finally:
            await aw(pool.close())
        with pytest.raises(PoolClosed):
            await waiter
        if held is not None:
            await aw(pool.putconn(held))
            assert held.closed

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_context_manager(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        pool = cls(ci, min_size=1, open=False)
        async with entered(pool) as entered_pool:
            assert entered_pool is pool
            assert not pool.closed
            async with entered(pool.connection()) as conn:
                assert (await one(conn, "SELECT 1")) == (1,)
        assert pool.closed
        assert conn.closed
        with pytest.raises(PoolClosed):
            await aw(pool.getconn(timeout=1))

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_name(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with (entered(cls(ci, name="contract-pool", min_size=1, open=False)) as named,
                    entered(cls(ci, min_size=1, open=False)) as first,
                    entered(cls(ci, min_size=1, open=False)) as second):
            assert named.name == "contract-pool"
            assert first.name.startswith("pool-")
            assert second.name.startswith("pool-")
            assert first.name != second.name
            assert int(first.name.split("-")[1]) < int(second.name.split("-")[1])

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_min_size_max_size(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=2, max_size=4, open=False)) as pool:
            assert (pool.min_size, pool.max_size) == (2, 4)
        async with entered(cls(ci, min_size=3, open=False)) as pool:
            assert (pool.min_size, pool.max_size) == (3, 3)  # max_size None: min_size
        async with entered(cls(ci, open=False)) as pool:
            assert (pool.min_size, pool.max_size) == (4, 4)  # the default
        with pytest.raises(ValueError, match="max_size"):
            cls(ci, min_size=3, max_size=2, open=False)
        with pytest.raises(ValueError, match="min_size"):
            cls(ci, min_size=-1, open=False)

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_grows_to_max_size_under_demand(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=1, max_size=3, open=False)) as pool:
            await aw(pool.wait(timeout=5))
            conns = await hold_all(pool, 3)
            try:
                assert len({id(c) for c in conns}) == 3
                assert pool.get_stats()["pool_size"] == 3
                with pytest.raises(PoolTimeout):
                    await aw(pool.getconn(timeout=0.3))
            finally:
                await put_all(pool, conns)

    run(body())


# --- max_lifetime, reconnect_failed --------------------------------------------------------


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_max_lifetime_expiry(cls: type[Any], flavour: str, ci: str) -> None:
    async def body() -> None:
        async with entered(cls(ci, min_size=1, max_lifetime=0.4, open=False)) as pool:
            await aw(pool.wait(timeout=5))
            async with entered(pool.connection()) as first:
                first_pid = await pid_of(first)
            seen = [first_pid]

            async def replaced() -> bool:
                async with entered(pool.connection()) as conn:
                    seen.append(await pid_of(conn))
                return seen[-1] != first_pid

            await until(replaced, "an expired connection replaced")
            await until(lambda: first.closed, "the expired connection closed")

    run(body())


@pytest.mark.parametrize(("cls", "flavour"), ALL)
@pytest.mark.parametrize("async_callback", [False, True], ids=["sync-cb", "async-cb"])
def test_reconnect_failed_called(cls: type[Any], flavour: str, async_callback: bool) -> None:
    if async_callback and flavour == "sync":
        pytest.skip("only the async pools take a coroutine function")
    called: list[Any] = []
    done = threading.Event()

    def failed(pool: Any) -> None:
        called.append(pool)
        done.set()

    cb: Any = failed
    if async_callback:
        async def afailed(pool: Any) -> None:
            failed(pool)

        cb = afailed

    async def body() -> None:
        async with entered(cls(dead_conninfo(), min_size=1, open=False,
                               reconnect_timeout=0.5, reconnect_failed=cb)) as pool:
            await until(done.is_set, "reconnect_failed called")
            assert called[0] is pool
            assert pool.get_stats()["connections_errors"] >= 1

    with capture_logs("symfo_failover"), capture_logs("psycopg.pool"):
        run(body())


# --- no warnings, our own logger ----------------------------------------------------------


async def _use_and_replace(pool: Any, server: LocalServer) -> None:
    await aw(pool.wait(timeout=5))
    # a dead idle connection
    async with entered(pool.connection()) as conn:
        pid = await pid_of(conn)
    terminate(server, pid)
    for _ in range(3):
        async with entered(pool.connection(timeout=8)) as conn:
            assert await pid_of(conn) != pid
    # a connection that dies while out of the pool, then goes back
    conn = await aw(pool.getconn(timeout=8))
    terminate(server, await pid_of(conn))
    with pytest.raises(psycopg.OperationalError):
        await one(conn, "SELECT 1")
    await aw(pool.putconn(conn))
    await until(lambda: pool.get_stats()["pool_available"] == pool.min_size, "refilled")
    await aw(pool.check())
    async with entered(pool.connection(timeout=8)) as conn:
        await one(conn, "SELECT 1")


@pytest.mark.parametrize(("cls", "flavour"), OURS)
def test_no_warnings_across_use_and_replacement(cls: type[Any], flavour: str,
                                                server: LocalServer) -> None:
    caught: list[str] = []
    unraisable: list[str] = []

    previous_hook = sys.unraisablehook

    def hook(u: Any) -> None:
        unraisable.append(repr(u.exc_value))

    async def body() -> None:
        async with entered(cls(server.conninfo(), min_size=2, open=False)) as pool:
            await _use_and_replace(pool, server)

    sys.unraisablehook = hook
    try:
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            run(body())
            gc.collect()
            caught = [f"{w.category.__name__}: {w.message}" for w in got]
    finally:
        sys.unraisablehook = previous_hook
    assert caught == []
    assert unraisable == []


@pytest.mark.parametrize(("cls", "flavour"), OURS)
def test_our_events_go_to_our_logger(cls: type[Any], flavour: str,
                                     server: LocalServer) -> None:
    events: list[Any] = []

    async def body() -> None:
        async with entered(cls(server.conninfo(), min_size=2, open=False,
                               name="logged-pool", on_event=events.append)) as pool:
            await _use_and_replace(pool, server)

    with capture_logs("symfo_failover") as ours, capture_logs("psycopg.pool") as theirs:
        run(body())
    replaced = [e for e in events if isinstance(e, sf.PoolConnectionReplaced)]
    assert replaced, events
    assert all(e.pool == "logged-pool" for e in replaced)
    our_lines = [r.getMessage() for r in ours.records]
    assert any("pool_connection_replaced" in line for line in our_lines), our_lines
    assert all(r.name.startswith("symfo_failover") for r in ours.records)
    # psycopg.pool holds psycopg_pool's own lines only
    assert theirs.records
    foreign = [r for r in theirs.records
               if not Path(r.pathname).resolve().is_relative_to(PSYCOPG_POOL_DIR.resolve())
               or any(n in r.getMessage() for n in OUR_EVENT_NAMES)]
    assert foreign == [], [(r.pathname, r.getMessage()) for r in foreign]


@pytest.mark.parametrize(("cls", "flavour"), ALL)
def test_reconnect_failed_called_for_each_attempt_that_gave_up(cls: type[Any],
                                                               flavour: str) -> None:
    """"Callback invoked if an attempt to create a new connection fails for more than
    reconnect_timeout seconds": min_size=2 on a dead server is two attempts."""
    calls: list[Any] = []

    async def body() -> None:
        async with entered(cls(dead_conninfo(), min_size=2, open=False,
                               reconnect_timeout=0.5,
                               reconnect_failed=calls.append)) as pool:
            await until(lambda: pool.get_stats()["pool_size"] == 0,
                        "every attempt gave up")
            await until(lambda: len(calls) >= 2, "reconnect_failed per attempt",
                        timeout=2.0)
            assert calls == [pool, pool]

    with capture_logs("symfo_failover"), capture_logs("psycopg.pool"):
        run(body())
