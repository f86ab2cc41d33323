"""The bank, on the pools: threads and tasks borrow connections and run transfers while
the cluster fails over at least 30 times, through every scenario of the harness.

16 threads share a `FailoverPool` (psycopg) or an `OdbcFailoverPool` (pyodbc) of 8
connections, 64 tasks an `AsyncFailoverPool` of 16, all through a fault proxy in front
of the cluster. Most requests are transfers through ``pool.run()`` (some misbehave);
one in five is a ``pool.connection()`` block. Checked:

- the bank's invariants (`test_exactly_once.check_books`): every transfer that
  returned is stored exactly once, the books balance, misbehaving units committed
  nothing;
- no connection leaks: after each fault the server's sessions of the pool come back
  to at most its size, and to none after ``close()``;
- the size limits hold (``get_stats()``, sampled throughout);
- after a failover has been noticed, no request is handed a connection made before
  it (a connection's generation is at least the pool's failover count at the time of
  the request).

``SYMFO_SOAK=1`` adds a soak of 500 failovers per driver on the threads' pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from test_async_exactly_once import misbehaving as amisbehaving
from test_async_exactly_once import transfer as atransfer
from test_exactly_once import (
    MISBEHAVIOURS,
    Injector,
    Results,
    capture_logs,
    check_books,
    misbehaving,
    open_bank,
    read_books,
    transfer,
)

import symfo_failover as sf
from symfo_failover.harness import FaultProxy, LocalCluster

pytestmark = pytest.mark.server

ACCOUNTS = 48
PASSWORD = "pool-bank-secret"
APP = "symfo-pool-bank"
POLICY = sf.RetryPolicy(deadline=60)
#: Faults that fail the cluster over (the others are the proxy's: lost and held
#: COMMIT replies, cuts).
CLUSTER_FAULTS = ("switchover", "node_down", "crash", "failover")
FAILOVERS = 30
MISBEHAVE_EVERY = 7


@pytest.fixture
def bank() -> Iterator[tuple[LocalCluster, FaultProxy]]:
    with open_bank(ACCOUNTS, PASSWORD) as opened:
        yield opened


class _Current:
    """`Results.current` for threads and tasks alike: the transfer of this context."""

    _var: contextvars.ContextVar[str | None] = contextvars.ContextVar("transfer", default=None)

    @property
    def transfer(self) -> str | None:
        return self._var.get()

    @transfer.setter
    def transfer(self, value: str | None) -> None:
        self._var.set(value)


@dataclass
class PoolResults(Results):
    #: Requests handed a connection made before a failover the pool had noticed.
    stale: list[str] = field(default_factory=list)
    #: ``connection()`` blocks: done, and failed (a fault under a checked-out connection).
    blocks: int = 0
    block_errors: int = 0
    #: The largest pool size and number of sessions seen.
    largest_pool: int = 0
    sessions_after_faults: list[int] = field(default_factory=list)
    pool_failovers: int = 0

    def __post_init__(self) -> None:
        self.current = _Current()  # type: ignore[assignment]

    def hook(self, event: sf.Event) -> None:
        self.on_event(event)
        if isinstance(event, sf.PoolFailover):
            with self.lock:
                self.pool_failovers += 1

    def check_generation(self, pool: Any, conn: Any, failovers_before: int,
                         what: str) -> None:
        # The generation is the pool's tag on the connection (white box): the pool's
        # `FailoverStats.generation` when the connection was made. A pyodbc connection
        # takes no attributes: the ODBC pool keeps it beside, by the connection's id.
        made_in = getattr(conn, "_symfo_gen", None)
        if isinstance(pool, sf.OdbcFailoverPool):
            with pool._cond:
                slot = pool._out.get(id(conn))
            made_in = None if slot is None else slot.generation
        if made_in is None or made_in < failovers_before:
            with self.lock:
                self.stale.append(f"{what}: made in generation {made_in}, "
                                  f"asked in generation {failovers_before}")


def pick(rng: random.Random, driver: str, out: PoolResults,
         pool: Any) -> tuple[str, Callable[..., Any]]:
    """A transfer id and its unit (one in MISBEHAVE_EVERY misbehaves)."""
    transfer_id = str(uuid.uuid4())
    if rng.randrange(MISBEHAVE_EVERY):
        return transfer_id, (atransfer if driver == "async" else transfer)
    hows = [h for h in MISBEHAVIOURS if driver != "pyodbc" or h != "swallow"]
    how = rng.choice(hows)
    transfer_id = f"bad-{how}-{transfer_id}"
    with out.lock:
        out.bad[transfer_id] = MISBEHAVIOURS[how]
    unit = amisbehaving(pool, how) if driver == "async" else misbehaving(pool, how)
    return transfer_id, unit


def sync_worker(pool: Any, driver: str, seed: int, stop: threading.Event,
                out: PoolResults) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        if rng.randrange(5) == 0:
            before = pool.failover_stats().generation
            try:
                with pool.connection() as conn:
                    out.check_generation(pool, conn, before, f"connection() of worker {seed}")
                    conn.execute("SELECT 1")
                    with out.lock:
                        out.blocks += 1
            except Exception:
                with out.lock:
                    out.block_errors += 1
            continue
        transfer_id, unit = pick(rng, driver, out, pool)
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        out.current.transfer = transfer_id
        try:
            got = pool.run(unit, transfer_id, src, dst, rng.randint(1, 50))
        except Exception as exc:
            with out.lock:
                out.raised[transfer_id] = exc
            continue
        assert got == transfer_id
        with out.lock:
            out.returned.append(transfer_id)


async def async_worker(pool: sf.AsyncFailoverPool[Any], seed: int, stop: threading.Event,
                       out: PoolResults) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        if rng.randrange(5) == 0:
            before = pool.failover_stats().generation
            try:
                async with pool.connection() as conn:
                    out.check_generation(pool, conn, before, f"connection() of task {seed}")
                    await conn.execute("SELECT 1")
                    out.blocks += 1
            except Exception:
                out.block_errors += 1
            continue
        transfer_id, unit = pick(rng, "async", out, pool)
        src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
        out.current.transfer = transfer_id
        try:
            got = await pool.run(unit, transfer_id, src, dst, rng.randint(1, 50))
        except Exception as exc:
            out.raised[transfer_id] = exc
            continue
        assert got == transfer_id
        out.returned.append(transfer_id)


def sessions(cluster: LocalCluster) -> int:
    """The server's sessions of the pool under test (by application_name)."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s",
                           (APP,)).fetchone()
    assert row is not None
    return int(row[0])


def settle(cluster: LocalCluster, at_most: int, limit: float = 20.0) -> int:
    """Sessions of the pool, once they are ``at_most`` or fewer (or after ``limit`` s:
    sessions of a held or cut connection end when the server notices)."""
    deadline = time.monotonic() + limit
    while True:
        count = sessions(cluster)
        if count <= at_most or time.monotonic() > deadline:
            return count
        time.sleep(0.05)


class PoolInjector(Injector):
    """The bank's injector, until the cluster failed over ``FAILOVERS`` times; after
    each fault it counts the pool's sessions on the server."""

    def __init__(self, cluster: LocalCluster, proxy: FaultProxy, out: PoolResults,
                 size: int) -> None:
        super().__init__(cluster, proxy, out)
        self.size = size

    def run(self, faults: int) -> None:
        order: list[str] = []
        while sum(self.counts[k] for k in CLUSTER_FAULTS) < faults:
            if not order:
                order = list(self.kinds)
                self.rng.shuffle(order)
            self.wait_for_traffic()
            kind = order.pop()
            if self.kinds[kind]():
                self.counts[kind] += 1
                out = self.out
                assert isinstance(out, PoolResults)
                out.sessions_after_faults.append(settle(self.cluster, self.size))


@contextlib.contextmanager
def sampling(pool: Any, out: PoolResults) -> Iterator[None]:
    """Sample the pool's size from a thread of its own while the block runs."""
    stop = threading.Event()

    def sample() -> None:
        while not stop.wait(0.02):
            size = pool.get_stats()["pool_size"]
            with out.lock:
                out.largest_pool = max(out.largest_pool, size)

    sampler = threading.Thread(target=sample, name="pool-sampler", daemon=True)
    sampler.start()
    try:
        yield
    finally:
        stop.set()
        sampler.join(10)


def make_pool(driver: str, conninfo: str, size: int, out: PoolResults) -> Any:
    if driver == "psycopg":
        return sf.FailoverPool(conninfo, min_size=size, max_size=size, open=True,
                               policy=POLICY, on_event=out.hook, timeout=60)
    return sf.OdbcFailoverPool(conninfo, min_size=size, max_size=size, timeout=60,
                               policy=POLICY, on_event=out.hook)


def check(out: PoolResults, cluster: LocalCluster, injector: PoolInjector, size: int,
          logged: Any, unknown_bound: int, label: str, spent: float,
          failovers: int = FAILOVERS) -> None:
    books = read_books(cluster)
    print(f"\n{label}: {sum(injector.counts.values())} faults {dict(injector.counts)} in "
          f"{spent:.1f} s; {len(out.returned)} transfers returned, {len(out.raised)} raised "
          f"({len(out.bad)} misbehaving units refused); connection() blocks {out.blocks} "
          f"(failed {out.block_errors}); pool failovers noticed {out.pool_failovers}; "
          f"sessions after faults max {max(out.sessions_after_faults)}; "
          f"events {dict(out.events)}; commit resolutions {dict(out.resolutions)} "
          f"decided by {dict(out.via)}")
    assert sum(injector.counts[k] for k in CLUSTER_FAULTS) >= failovers
    check_books(out, books, logged, accounts=ACCOUNTS, password=PASSWORD,
                unknown_bound=unknown_bound)
    assert not out.stale, out.stale[:5]
    assert out.largest_pool <= size
    assert max(out.sessions_after_faults) <= size, out.sessions_after_faults
    assert out.blocks > 0
    # Each failover was noticed once by the pool: not once per connection, and not
    # for the proxy's faults (cuts, lost and held COMMIT replies), which the cluster
    # itself never noticed. (A fault can pass unnoticed while the pool is refilling.)
    failed_over = sum(injector.counts[k] for k in CLUSTER_FAULTS)
    assert failed_over // 2 < out.pool_failovers <= failed_over


@pytest.mark.parametrize("driver", ["psycopg", pytest.param("pyodbc", marks=pytest.mark.odbc)])
def test_threads_on_a_pool_commit_exactly_once_through_30_failovers(
    driver: str, bank: tuple[LocalCluster, FaultProxy]
) -> None:
    threads_bank(driver, bank, FAILOVERS)


@pytest.mark.slow
@pytest.mark.timeout(3600)
@pytest.mark.parametrize("driver", ["psycopg", pytest.param("pyodbc", marks=pytest.mark.odbc)])
def test_pool_soak(driver: str, bank: tuple[LocalCluster, FaultProxy]) -> None:
    threads_bank(driver, bank, 500)


def threads_bank(driver: str, bank: tuple[LocalCluster, FaultProxy], failovers: int) -> None:
    cluster, proxy = bank
    threads_n, size = 16, 8
    if driver == "psycopg":
        conninfo = cluster.conninfo(host=proxy.host, port=str(proxy.port), application_name=APP)
    else:
        conninfo = cluster.odbc_connection_string(
            Server=proxy.host, Port=str(proxy.port), pqopt=f"application_name={APP}")
    out = PoolResults()
    stop = threading.Event()
    injector = PoolInjector(cluster, proxy, out, size)
    started = time.monotonic()
    with capture_logs() as logged:
        pool = make_pool(driver, conninfo, size, out)
        try:
            threads = [threading.Thread(target=sync_worker, args=(pool, driver, seed, stop, out),
                                        name=f"pool-bank-{seed}", daemon=True)
                       for seed in range(threads_n)]
            with sampling(pool, out):
                for t in threads:
                    t.start()
                try:
                    injector.run(failovers)
                    injector.wait_for_traffic(transfers=threads_n * 2)
                finally:
                    stop.set()
                    for t in threads:
                        t.join(120)
            hung = [t.name for t in threads if t.is_alive()]
            assert not hung, f"workers did not finish: {hung}"
        finally:
            pool.close()
    spent = time.monotonic() - started
    assert settle(cluster, 0) == 0, "sessions left after close()"
    check(out, cluster, injector, size, logged, unknown_bound=threads_n, label=driver,
          spent=spent, failovers=failovers)


def test_tasks_on_an_async_pool_commit_exactly_once_through_30_failovers(
    bank: tuple[LocalCluster, FaultProxy],
) -> None:
    cluster, proxy = bank
    tasks_n, size = 64, 16
    conninfo = cluster.conninfo(host=proxy.host, port=str(proxy.port), application_name=APP)
    out = PoolResults()
    injector = PoolInjector(cluster, proxy, out, size)

    async def main() -> None:
        stop = threading.Event()
        async with sf.AsyncFailoverPool(conninfo, min_size=size, max_size=size, open=False,
                                        policy=POLICY, on_event=out.hook, timeout=60) as pool:
            await pool.wait()
            tasks = [asyncio.create_task(async_worker(pool, seed, stop, out))
                     for seed in range(tasks_n)]
            with sampling(pool, out):
                injecting = asyncio.ensure_future(asyncio.to_thread(injector.run, FAILOVERS))
                try:
                    done, _ = await asyncio.wait([injecting, *tasks],
                                                 return_when=asyncio.FIRST_COMPLETED)
                    assert injecting in done, "a task ended before the faults did"
                    injecting.result()
                    await asyncio.to_thread(injector.wait_for_traffic, tasks_n)
                finally:
                    stop.set()
                    await asyncio.wait([injecting])
                    _, pending = await asyncio.wait(tasks, timeout=120)
                    for t in pending:
                        t.cancel()
            assert not pending, "tasks did not finish"
            died = [t.exception() for t in tasks if t.exception() is not None]
            assert not died, died[:3]

    started = time.monotonic()
    with capture_logs() as logged:
        asyncio.run(main())
    spent = time.monotonic() - started
    assert settle(cluster, 0) == 0, "sessions left after close()"
    check(out, cluster, injector, size, logged, unknown_bound=tasks_n, label="async",
          spent=spent)



