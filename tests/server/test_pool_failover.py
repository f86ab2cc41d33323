"""FailoverPool and AsyncFailoverPool against a real two-node cluster (`LocalCluster`).

Every test runs with the sync pool and with the async one: the body is a coroutine,
run with ``asyncio.run``; the `Sync` flavour calls the sync pool from it (blocking),
the `Async` flavour awaits the async pool. Cluster operations run in a thread, so that
the async pool's workers keep running meanwhile.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import psycopg
import pytest
from psycopg import IsolationLevel

import symfo_failover as sf
from symfo_failover.harness import LocalCluster

pytestmark = [pytest.mark.server, pytest.mark.timeout(60)]

SIZE = 6
FLAVOURS = ["sync", "async"]
POLICY = sf.RetryPolicy(deadline=15)

CLIENTS = ("SELECT pid FROM pg_stat_activity WHERE backend_type = 'client backend' "
           "AND pid <> pg_backend_pid() ORDER BY pid")


# --- helpers ---------------------------------------------------------------------------


@pytest.fixture
def cl() -> Iterator[LocalCluster]:
    with LocalCluster() as cluster:
        cluster.start()
        yield cluster


def client_pids(cl: LocalCluster) -> list[int]:
    """The server's client backends, seen from a session of their own."""
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        return [r[0] for r in conn.execute(CLIENTS)]


def started(cl: LocalCluster) -> Any:
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        assert row is not None
        return row[0]


def terminate(cl: LocalCluster, pid: int) -> None:
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_terminate_backend(%s, 5000)", [pid]).fetchone()
        assert row == (True,)


def make_table(cl: LocalCluster) -> str:
    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE TABLE {name} (id text PRIMARY KEY)")
    return name


def table_rows(cl: LocalCluster, name: str) -> list[str]:
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        return [r[0] for r in conn.execute(f"SELECT id FROM {name} ORDER BY id")]


async def off(fn: Callable[..., Any], *args: Any) -> Any:
    """A blocking call (the cluster, a check on the side) off the event loop."""
    return await asyncio.to_thread(fn, *args)


async def poll(cond: Callable[[], Any], *, within: float = 10.0) -> Any:
    """``cond()`` until it is truthy or ``within`` seconds passed; its last value."""
    deadline = time.monotonic() + within
    while True:
        value = cond()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def apoll(cond: Callable[[], Awaitable[Any]], *, within: float = 10.0) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = await cond()
        if value or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


class Recorder:
    def __init__(self) -> None:
        self.events: list[sf.Event] = []
        self._lock = threading.Lock()

    def __call__(self, event: sf.Event) -> None:
        with self._lock:
            self.events.append(event)

    def of(self, kind: type[sf.Event]) -> list[Any]:
        with self._lock:
            return [e for e in self.events if isinstance(e, kind)]


#: A refused connect takes a millisecond: concurrent attempts would rarely overlap.
SLOW_CONNECT = 0.05


class Connects:
    """In-flight connect attempts, with their times: (start, end, failed)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: list[tuple[float, float, bool]] = []

    def record(self, t0: float, failed: bool) -> None:
        with self.lock:
            self.spans.append((t0, time.monotonic(), failed))


def counting_sync(rec: Connects) -> type[psycopg.Connection[Any]]:
    class Counting(psycopg.Connection):  # type: ignore[type-arg]
        @classmethod
        def connect(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            t0 = time.monotonic()
            try:
                time.sleep(SLOW_CONNECT)  # overlapping attempts overlap for sure
                conn = super().connect(*args, **kwargs)
            except BaseException:
                rec.record(t0, True)
                raise
            rec.record(t0, False)
            return conn

    return Counting


def counting_async(rec: Connects) -> type[psycopg.AsyncConnection[Any]]:
    class Counting(psycopg.AsyncConnection):  # type: ignore[type-arg]
        @classmethod
        async def connect(cls, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
            t0 = time.monotonic()
            try:
                await asyncio.sleep(SLOW_CONNECT)
                conn = await super().connect(*args, **kwargs)
            except BaseException:
                rec.record(t0, True)
                raise
            rec.record(t0, False)
            return conn

    return Counting


class Sync:
    """The sync pool, driven from a coroutine (its calls block: that is fine here)."""

    name = "sync"

    def __init__(self, cl: LocalCluster, **kwargs: Any) -> None:
        kwargs.setdefault("min_size", SIZE)
        kwargs.setdefault("max_size", kwargs["min_size"])
        kwargs.setdefault("policy", POLICY)
        self.pool: Any = sf.FailoverPool(cl.conninfo(), open=False, **kwargs)

    async def open(self) -> None:
        self.pool.open(wait=True, timeout=10)

    async def close(self) -> None:
        self.pool.close()

    def stats(self) -> sf.FailoverStats:
        return self.pool.failover_stats()  # type: ignore[no-any-return]

    def size(self) -> int:
        return int(self.pool.get_stats()["pool_size"])

    def available(self) -> int:
        return int(self.pool.get_stats().get("pool_available", 0))

    def _query(self, sql: str, params: Any = None, timeout: float | None = None) -> Any:
        with self.pool.connection(timeout=timeout) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else None

    async def query(self, sql: str, params: Any = None, timeout: float | None = None) -> Any:
        return self._query(sql, params, timeout)

    def spawn_query(self, sql: str, timeout: float) -> asyncio.Task[Any]:
        return asyncio.create_task(asyncio.to_thread(self._query, sql, None, timeout))

    async def getconn(self) -> Any:
        return self.pool.getconn()

    async def putconn(self, conn: Any) -> None:
        self.pool.putconn(conn)

    async def execute(self, conn: Any, sql: str, params: Any = None) -> Any:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else None

    async def autocommit_of_next(self) -> bool:
        with self.pool.connection() as conn:
            return bool(conn.autocommit)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return self.pool.run(fn, *args)


class Async(Sync):
    name = "async"

    def __init__(self, cl: LocalCluster, **kwargs: Any) -> None:
        kwargs.setdefault("min_size", SIZE)
        kwargs.setdefault("max_size", kwargs["min_size"])
        kwargs.setdefault("policy", POLICY)
        self.pool = sf.AsyncFailoverPool(cl.conninfo(), open=False, **kwargs)

    async def open(self) -> None:
        await self.pool.open(wait=True, timeout=10)

    async def close(self) -> None:
        await self.pool.close()

    async def query(self, sql: str, params: Any = None, timeout: float | None = None) -> Any:
        async with self.pool.connection(timeout=timeout) as conn:
            cur = await conn.execute(sql, params)
            return await cur.fetchall() if cur.description else None

    def spawn_query(self, sql: str, timeout: float) -> asyncio.Task[Any]:
        return asyncio.create_task(self.query(sql, None, timeout))

    async def getconn(self) -> Any:
        return await self.pool.getconn()

    async def putconn(self, conn: Any) -> None:
        await self.pool.putconn(conn)

    async def execute(self, conn: Any, sql: str, params: Any = None) -> Any:
        cur = await conn.execute(sql, params)
        return await cur.fetchall() if cur.description else None

    async def autocommit_of_next(self) -> bool:
        async with self.pool.connection() as conn:
            return bool(conn.autocommit)

    async def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await self.pool.run(fn, *args)


def make(flavour: str, cl: LocalCluster, **kwargs: Any) -> Sync:
    return Async(cl, **kwargs) if flavour == "async" else Sync(cl, **kwargs)


def in_pool(flavour: str, cl: LocalCluster,
            body: Callable[[Sync], Awaitable[None]], **kwargs: Any) -> None:
    """Run ``body(pool)`` with an open pool of ``flavour``; the pool is closed after."""

    async def main() -> None:
        p = make(flavour, cl, **kwargs)
        try:
            await p.open()
            await body(p)
        finally:
            await p.close()

    asyncio.run(main())


async def every_request_meets_the_new_server(p: Sync, cl: LocalCluster, new: Any) -> None:
    for _ in range(20):
        rows = await p.query("SELECT pg_postmaster_start_time()")
        assert rows == [(new,)]


async def pool_full_of(p: Sync, cl: LocalCluster, new: Any) -> None:
    """All the pool's connections, checked out at once, are to the server ``new``."""
    conns = [await p.getconn() for _ in range(SIZE)]
    try:
        for conn in conns:
            assert await p.execute(conn, "SELECT pg_postmaster_start_time()") == [(new,)]
    finally:
        for conn in conns:
            await p.putconn(conn)


# --- 1, 2: an idle full pool through a failover -----------------------------------------


SCENARIOS = {
    "switchover": lambda cl: cl.switchover(),
    "crash+start": lambda cl: (cl.crash(), cl.start()),
    "failover": lambda cl: cl.failover(),
    "node_down+start": lambda cl: (cl.node_down(), cl.start()),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_idle_full_pool_through_a_failover(cl: LocalCluster, flavour: str,
                                           scenario: str) -> None:
    async def body(p: Sync) -> None:
        before = await off(started, cl)
        assert await p.query("SELECT pg_postmaster_start_time()") == [(before,)]
        await off(SCENARIOS[scenario], cl)
        new = await off(started, cl)
        assert new != before
        await every_request_meets_the_new_server(p, cl, new)
        s = p.stats()
        assert s.failovers == 1
        assert s.requests_met_dead == 0
        assert s.server_started is not None
        assert s.connections_replaced >= SIZE
        await pool_full_of(p, cl, new)

    in_pool(flavour, cl, body)


# --- 3: one dead backend is not a failover ----------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_terminated_backend_costs_that_connection_only(cl: LocalCluster,
                                                           flavour: str) -> None:
    async def body(p: Sync) -> None:
        pids = await poll(lambda: len(client_pids(cl)) == SIZE and client_pids(cl))
        assert pids, "the pool did not fill"
        before = set(pids)
        victim = pids[2]
        await off(terminate, cl, victim)
        seen = set()
        for _ in range(3 * SIZE):  # round robin: every idle connection is checked out
            seen.add((await p.query("SELECT pg_backend_pid()"))[0][0])
        assert victim not in seen
        s = p.stats()
        assert s.failovers == 0
        assert s.connections_replaced == 1
        assert s.requests_met_dead == 0
        after = set(await poll(lambda: (len(client_pids(cl)) == SIZE
                                        and client_pids(cl))))
        assert victim not in after
        assert len(before - after) == 1  # the others are the very same backends
        assert len(after - before) == 1
        assert seen <= after

    in_pool(flavour, cl, body)


# --- 4: connections in use during a failover --------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_checked_out_connections_are_closed_when_returned(cl: LocalCluster,
                                                          flavour: str) -> None:
    async def body(p: Sync) -> None:
        held = [await p.getconn(), await p.getconn()]
        await off(cl.switchover)
        new = await off(started, cl)
        assert await p.query("SELECT pg_postmaster_start_time()") == [(new,)]
        for conn in held:
            await p.putconn(conn)
        assert all(conn.closed for conn in held)
        for _ in range(3):
            conns = [await p.getconn() for _ in range(SIZE)]
            try:
                assert not any(c is h for c in conns for h in held)
                for conn in conns:
                    assert await p.execute(conn, "SELECT pg_postmaster_start_time()") \
                        == [(new,)]
            finally:
                for conn in conns:
                    await p.putconn(conn)
            assert SIZE <= p.size() <= SIZE
        assert p.stats().failovers == 1

    in_pool(flavour, cl, body)


# --- 5: no backend leak ------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_no_backend_leak(cl: LocalCluster, flavour: str) -> None:
    async def main() -> None:
        p = make(flavour, cl)
        try:
            await p.open()
            for n in range(2):
                held = await p.getconn()
                await off(cl.switchover)
                await p.query("SELECT 1")
                await p.putconn(held)
                await poll(lambda: not p.stats().refilling)
                count = await poll(lambda: len(client_pids(cl)) == SIZE
                                   or len(client_pids(cl)))
                assert count is True, f"{count} client backends, not {SIZE}"
                assert p.stats().failovers == n + 1
                assert p.size() == SIZE
        finally:
            await p.close()
        left = await poll(lambda: not client_pids(cl) or len(client_pids(cl)), within=5)
        assert left is True, f"{left} client backends after close()"

    asyncio.run(main())


# --- 6: the server down for a while ------------------------------------------------------


def max_overlap(spans: list[tuple[float, float]]) -> int:
    points = sorted([(t0, 1) for t0, _ in spans] + [(t1, -1) for _, t1 in spans],
                    key=lambda p: (p[0], p[1]))
    best = now = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


@pytest.mark.parametrize("down", ["stop_both", "node_down"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_a_request_waiting_through_an_outage(cl: LocalCluster, flavour: str,
                                             down: str) -> None:
    rec = Connects()
    klass = counting_async(rec) if flavour == "async" else counting_sync(rec)

    async def body(p: Sync) -> None:
        await off(getattr(cl, down))
        waiting = p.spawn_query("SELECT pg_postmaster_start_time()", timeout=20)
        # While the server is down, the pool probes it: wait until it has failed a few
        # times (the waits are the policy's, 20 to 160 ms).
        failed = await poll(lambda: sum(f for *_, f in rec.spans) >= 8)
        assert failed, rec.spans
        assert not waiting.done()
        up_from = time.monotonic()
        await off(cl.start)
        new = await off(started, cl)
        rows = await asyncio.wait_for(waiting, 20)
        assert rows == [(new,)]
        with rec.lock:
            spans = list(rec.spans)
        first_failure_end = min(t1 for _, t1, f in spans if f)
        # Attempts that started once the pool knew the server was down, before it was
        # started again: one at a time.
        probing = [(t0, t1) for t0, t1, _ in spans if first_failure_end <= t0 < up_from]
        assert len(probing) >= 4
        assert max_overlap(probing) == 1, probing
        s = p.stats()
        assert s.failovers == 1
        await poll(lambda: p.size() == SIZE and not p.stats().refilling)
        await pool_full_of(p, cl, new)

    in_pool(flavour, cl, body, connection_class=klass)


# --- 7: run() ----------------------------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_run_across_a_switchover_commits_once(cl: LocalCluster, flavour: str) -> None:
    table = make_table(cl)
    ran: list[Any] = []
    key = uuid.uuid4().hex

    def unit(conn: psycopg.Connection[Any], uid: str) -> Any:
        conn.execute(f"INSERT INTO {table} VALUES (%s)", [uid])
        ran.append(uid)
        if len(ran) == 1:
            cl.switchover()
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        assert row is not None
        return row[0]

    async def aunit(conn: psycopg.AsyncConnection[Any], uid: str) -> Any:
        await conn.execute(f"INSERT INTO {table} VALUES (%s)", [uid])
        ran.append(uid)
        if len(ran) == 1:
            await off(cl.switchover)
        cur = await conn.execute("SELECT pg_postmaster_start_time()")
        row = await cur.fetchone()
        assert row is not None
        return row[0]

    async def body(p: Sync) -> None:
        result = await p.run(aunit if flavour == "async" else unit, key)
        new = await off(started, cl)
        assert result == new
        assert ran == [key, key]
        assert await off(table_rows, cl, table) == [key]
        s = p.stats()
        assert s.failovers == 1
        assert s.requests_met_dead == 1

    in_pool(flavour, cl, body)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_run_refuses_nested_run_and_commit(cl: LocalCluster, flavour: str) -> None:
    table = make_table(cl)
    calls: list[str] = []

    async def body(p: Sync) -> None:
        pool = p.pool

        def inner(conn: Any) -> None:
            calls.append("inner")

        async def ainner(conn: Any) -> None:
            calls.append("inner")

        def nested(conn: psycopg.Connection[Any]) -> None:
            calls.append("nested")
            conn.execute(f"INSERT INTO {table} VALUES ('nested')")
            pool.run(inner)

        async def anested(conn: psycopg.AsyncConnection[Any]) -> None:
            calls.append("nested")
            await conn.execute(f"INSERT INTO {table} VALUES ('nested')")
            await pool.run(ainner)

        def commits(conn: psycopg.Connection[Any]) -> None:
            calls.append("commits")
            conn.execute(f"INSERT INTO {table} VALUES ('commits')")
            conn.commit()

        async def acommits(conn: psycopg.AsyncConnection[Any]) -> None:
            calls.append("commits")
            await conn.execute(f"INSERT INTO {table} VALUES ('commits')")
            await conn.commit()

        def rolls_back(conn: psycopg.Connection[Any]) -> None:
            calls.append("rolls back")
            conn.rollback()

        async def arolls_back(conn: psycopg.AsyncConnection[Any]) -> None:
            calls.append("rolls back")
            await conn.rollback()

        a = flavour == "async"
        with pytest.raises(sf.UnitContractError):
            await p.run(anested if a else nested)
        with pytest.raises(sf.UnitContractError):
            await p.run(acommits if a else commits)
        with pytest.raises(sf.UnitContractError):
            await p.run(arolls_back if a else rolls_back)
        assert calls == ["nested", "commits", "rolls back"]
        assert await off(table_rows, cl, table) == []
        # The pool is fine after: every connection idle, not in autocommit.
        for _ in range(SIZE):
            assert await p.autocommit_of_next() is False
        assert p.stats().requests_met_dead == 0

    in_pool(flavour, cl, body)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_run_gives_the_connection_back_as_it_was(cl: LocalCluster, flavour: str) -> None:
    table = make_table(cl)

    def unit(conn: psycopg.Connection[Any]) -> bool:
        conn.execute(f"INSERT INTO {table} VALUES ('x')")
        return bool(conn.autocommit)

    async def aunit(conn: psycopg.AsyncConnection[Any]) -> bool:
        await conn.execute(f"INSERT INTO {table} VALUES ('x')")
        return bool(conn.autocommit)

    async def body(p: Sync) -> None:
        await p.run(aunit if flavour == "async" else unit)
        assert await p.autocommit_of_next() is False
        assert await off(table_rows, cl, table) == ["x"]
        # and a connection() block still has psycopg's transaction behaviour
        await p.query(f"INSERT INTO {table} VALUES ('y')")
        assert await off(table_rows, cl, table) == ["x", "y"]

    in_pool(flavour, cl, body, min_size=1)


async def serializable(conn: Any) -> None:
    if isinstance(conn, psycopg.AsyncConnection):
        await conn.set_isolation_level(IsolationLevel.SERIALIZABLE)
    else:
        conn.isolation_level = IsolationLevel.SERIALIZABLE


async def read_only(conn: Any) -> None:
    if isinstance(conn, psycopg.AsyncConnection):
        await conn.set_read_only(True)
    else:
        conn.read_only = True


def sync_configure(setting: Callable[[Any], Awaitable[None]]) -> Callable[[Any], None]:
    def configure(conn: Any) -> None:
        coro = setting(conn)
        try:
            coro.send(None)
        except StopIteration:
            return
        raise AssertionError("a sync setting awaited")

    return configure


@pytest.mark.parametrize("setting", ["serializable", "read_only"])
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_run_units_take_the_settings_configure_made(cl: LocalCluster, flavour: str,
                                                    setting: str) -> None:
    chosen = serializable if setting == "serializable" else read_only
    sql = "SELECT current_setting('transaction_isolation'), " \
          "current_setting('transaction_read_only')"

    def unit(conn: psycopg.Connection[Any]) -> Any:
        return conn.execute(sql).fetchone()

    async def aunit(conn: psycopg.AsyncConnection[Any]) -> Any:
        cur = await conn.execute(sql)
        return await cur.fetchone()

    async def body(p: Sync) -> None:
        for _ in range(3):
            got = await p.run(aunit if flavour == "async" else unit)
            if setting == "serializable":
                assert got == ("serializable", "off")
            else:
                assert got == ("read committed", "on")

    configure: Any = chosen if flavour == "async" else sync_configure(chosen)
    in_pool(flavour, cl, body, min_size=2, configure=configure)


# --- 8: connections given back in a transaction, or broken ------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_given_back_in_a_transaction_is_rolled_back(cl: LocalCluster,
                                                    flavour: str) -> None:
    table = make_table(cl)

    async def body(p: Sync) -> None:
        conn = await p.getconn()
        await p.execute(conn, f"INSERT INTO {table} VALUES ('left open')")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
        await p.putconn(conn)
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert not conn.closed
        assert await off(table_rows, cl, table) == []
        stats = p.pool.get_stats()
        assert stats.get("returns_bad", 0) == 0
        assert stats.get("connections_lost", 0) == 0
        s = p.stats()
        assert (s.failovers, s.connections_replaced, s.requests_met_dead) == (0, 0, 0)
        assert p.size() == SIZE

    in_pool(flavour, cl, body)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_given_back_broken_is_a_request_that_met_dead(cl: LocalCluster,
                                                      flavour: str) -> None:
    async def body(p: Sync) -> None:
        conn = await p.getconn()
        pid = (await p.execute(conn, "SELECT pg_backend_pid()"))[0][0]
        await p.execute(conn, "COMMIT")
        await off(terminate, cl, pid)
        with pytest.raises(psycopg.OperationalError):
            await p.execute(conn, "SELECT 1")
        await p.putconn(conn)
        s = p.stats()
        assert s.requests_met_dead == 1
        assert s.connections_replaced == 1
        assert s.failovers == 0
        assert p.pool.get_stats().get("returns_bad", 0) == 1
        count = await poll(lambda: len(client_pids(cl)) == SIZE)
        assert count
        for _ in range(SIZE):
            await p.query("SELECT 1")
        assert p.stats().requests_met_dead == 1
        assert p.stats().failovers == 0

    in_pool(flavour, cl, body)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_broken_inside_a_connection_block(cl: LocalCluster, flavour: str) -> None:
    async def body(p: Sync) -> None:
        async def use() -> None:
            if flavour == "async":
                async with p.pool.connection() as conn:
                    cur = await conn.execute("SELECT pg_backend_pid()")
                    row = await cur.fetchone()
                    await off(terminate, cl, row[0])
                    await conn.execute("SELECT 1")
            else:
                with p.pool.connection() as conn:
                    row = conn.execute("SELECT pg_backend_pid()").fetchone()
                    terminate(cl, row[0])
                    conn.execute("SELECT 1")

        with pytest.raises(psycopg.OperationalError):
            await use()
        s = p.stats()
        assert (s.failovers, s.connections_replaced, s.requests_met_dead) == (0, 1, 1)

    in_pool(flavour, cl, body)


# --- 9: events and log records -----------------------------------------------------------


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_one_failover_one_refill_event(cl: LocalCluster, flavour: str,
                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="symfo_failover")
    rec = Recorder()

    async def body(p: Sync) -> None:
        before = await off(started, cl)
        await off(cl.switchover)
        new = await off(started, cl)
        await every_request_meets_the_new_server(p, cl, new)
        done = await poll(lambda: not p.stats().refilling and p.available() == SIZE)
        assert done
        failovers = rec.of(sf.PoolFailover)
        refills = rec.of(sf.PoolRefilled)
        assert len(failovers) == 1, failovers
        assert len(refills) == 1, refills
        assert failovers[0].failovers == 1
        assert failovers[0].previous_server_started is not None
        assert str(before.year) in failovers[0].previous_server_started
        assert refills[0].connections == SIZE
        assert refills[0].seconds == p.stats().last_refill_seconds
        replaced = rec.of(sf.PoolConnectionReplaced)
        assert len(replaced) == p.stats().connections_replaced >= SIZE
        names = [getattr(r, "symfo_event", None) for r in caplog.records
                 if r.name == "symfo_failover"]
        assert names.count("pool_failover") == 1
        assert names.count("pool_refilled") == 1
        assert names.count("pool_connection_replaced") == len(replaced)

    in_pool(flavour, cl, body, on_event=rec)


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_an_interrupted_unit_commits_nothing_and_psycopg_pool_says_nothing(
    cl: LocalCluster, flavour: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Ctrl-C in a sync unit, a cancellation of an async one: nothing is committed, a
    `UnitInterrupted` says so, the session (in an unknown state) is replaced, and the
    pool keeps its size. psycopg_pool logs nothing about it (its "discarding closed
    connection" warning would reach stderr in an application without logging)."""
    table = make_table(cl)
    events: list[sf.Event] = []

    def unit(conn: psycopg.Connection[Any]) -> None:
        conn.execute(f"INSERT INTO {table} VALUES ('interrupted')")
        raise KeyboardInterrupt

    async def aunit(conn: psycopg.AsyncConnection[Any]) -> None:
        await conn.execute(f"INSERT INTO {table} VALUES ('interrupted')")
        await asyncio.sleep(30)

    async def body(p: Sync) -> None:
        with caplog.at_level(logging.DEBUG, logger="psycopg.pool"):
            if flavour == "async":
                task = asyncio.ensure_future(p.run(aunit))
                for _ in range(200):  # until the INSERT ran (bounded: 10 s)
                    await asyncio.sleep(0.05)
                    if await off(table_rows_uncommitted, cl, table):
                        break
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            else:
                with pytest.raises(KeyboardInterrupt):
                    await p.run(unit)
        interrupted = [e for e in events if isinstance(e, sf.UnitInterrupted)]
        assert [(e.phase, e.outcome) for e in interrupted] == [("unit", "rolled back")]
        assert await off(table_rows, cl, table) == []
        assert p.size() == SIZE
        assert await p.query("SELECT 1") == [(1,)]
        warned = [r.getMessage() for r in caplog.records
                  if r.name == "psycopg.pool" and r.levelno >= logging.WARNING]
        assert warned == []

    in_pool(flavour, cl, body, on_event=events.append)


def table_rows_uncommitted(cl: LocalCluster, table: str) -> bool:
    """Whether a session of the pool has an INSERT into ``table`` in progress (seen in
    pg_stat_activity as its last statement, in an open transaction)."""
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE state = 'idle in transaction' "
            "AND query LIKE %s", (f"INSERT INTO {table}%",)).fetchone()
    assert row is not None
    return bool(row[0])
