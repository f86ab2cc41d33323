"""The async bank, and cancellation at any point of a unit.

1. The bank workload of test_exactly_once.py, on `connect_async`: 32 tasks in one event
   loop, each with its own AsyncResilientConnection through a fault proxy, make
   transfers while the faults of the sync bank (its `Injector`: node down, crash,
   switchover, failover, lost COMMIT replies, held COMMITs, cuts) are injected from a
   worker thread. At the end the books must balance and every transfer that run()
   returned must be in the ledger exactly once. A second, shorter run puts some
   transfers under a short ``asyncio.timeout`` while the faults go on.

2. Cancellation: ``asyncio.timeout()`` and ``task.cancel()`` land at random points of a
   unit (in its statements, during a slow COMMIT, after it ended) and at chosen ones
   (inside the unit, in a unit that swallows the cancellation, while the proxy holds
   the COMMIT, while the proxy holds the connect, while a lost COMMIT waits to be
   asked about, past the policy's deadline). What the `UnitInterrupted` event says is
   checked against the server (rows, and ``pg_xact_status`` of the unit's xid): a unit
   cancelled before its COMMIT was sent committed nothing, ``committed`` means one
   row, ``unknown`` at most one, and no unit is ever stored twice.

Only order, events and outcomes are asserted, never durations.

CI runs 100 faults; ``SYMFO_SOAK=1`` runs the soak (1000 faults).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import random
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from resilient_helpers import Recorder
from test_exactly_once import (
    MISBEHAVIOURS,
    Injector,
    capture_logs,
    check_books,
    explain,
    open_bank,
    read_books,
)

import symfo_failover as sf
from symfo_failover.harness import FaultProxy, LocalCluster, LocalServer

pytestmark = pytest.mark.server

needs_timeout = pytest.mark.skipif(sys.version_info < (3, 11),
                                   reason="asyncio.timeout() is Python 3.11+")

# --- the async bank ------------------------------------------------------------------------

TASKS = 32
#: More accounts than the sync bank: 32 tasks on 10 rows would spend their time in
#: deadlock_timeout. Deadlocks (40P01, retried) still happen.
ACCOUNTS = 48
#: One unit in this many misbehaves.
MISBEHAVE_EVERY = 7
PASSWORD = "async-bank-secret"
POLICY = sf.RetryPolicy(deadline=60)


@pytest.fixture
def bank() -> Iterator[tuple[LocalCluster, FaultProxy]]:
    with open_bank(ACCOUNTS, PASSWORD) as opened:
        yield opened


async def transfer(raw: psycopg.AsyncConnection[Any], transfer_id: str, src: int, dst: int,
                   amount: int) -> str:
    """One unit of work; the update order is random, so deadlocks (40P01) happen too."""
    await raw.execute("UPDATE accounts SET balance = balance - %s WHERE id = %s", (amount, src))
    await raw.execute("UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, dst))
    await raw.execute("INSERT INTO ledger VALUES (%s, %s, %s, %s)",
                      (transfer_id, src, dst, amount))
    return transfer_id


def misbehaving(rc: sf.AsyncResilientConnection[Any],
                how: str) -> Callable[..., Awaitable[str]]:
    """A transfer that breaks the contract after it wrote everything a transfer writes."""
    async def unit(raw: psycopg.AsyncConnection[Any], transfer_id: str, src: int, dst: int,
                   amount: int) -> str:
        await transfer(raw, transfer_id, src, dst, amount)
        try:
            if how == "nested":
                await rc.run(transfer, transfer_id + "-inner", dst, src, amount)
            elif how == "commit":
                await raw.commit()
            elif how == "sql_commit":
                await raw.execute("COMMIT")
            elif how == "rollback":
                await raw.rollback()
            elif how == "close":
                await raw.close()
            elif how == "swallow":
                await raw.execute("SELECT 1/0")
        except (sf.UnitContractError, psycopg.errors.DivisionByZero):
            pass  # the unit swallows the refusal (or its own error) and returns
        return transfer_id

    return unit


@dataclass
class Bank:
    """What the tasks saw. Written from the event loop's thread only; the injector's
    thread reads `committed`."""

    returned: list[str] = field(default_factory=list)
    raised: dict[str, BaseException] = field(default_factory=dict)
    #: run() returned something else than what the unit returned.
    wrong: dict[str, object] = field(default_factory=dict)
    events: collections.Counter[str] = field(default_factory=collections.Counter)
    resolutions: collections.Counter[str] = field(default_factory=collections.Counter)
    via: collections.Counter[str] = field(default_factory=collections.Counter)
    failovers: int = 0
    #: Misbehaving transfers: the rule each must be refused for.
    bad: dict[str, str] = field(default_factory=dict)
    #: Events in which the password showed (checked after the run: a hook's own
    #: assertion would be swallowed by the library).
    leaks: list[str] = field(default_factory=list)
    #: The events of each transfer, to explain a failure.
    trail: dict[str, list[sf.Event]] = field(default_factory=dict)
    #: One in this many transfers runs under an asyncio.timeout of up to 50 ms
    #: (0: none): the timeouts that fired, and the interruptions reported for each.
    cancel_every: int = 0
    cancelled: dict[str, list[sf.UnitInterrupted]] = field(default_factory=dict)
    #: Set once the last fault is over; then the tasks that still commit.
    faults_over: bool = False
    recovered: set[int] = field(default_factory=set)
    #: Tasks whose first connect_async() is done (or failed): faults start after all.
    connected: int = 0

    def committed(self) -> int:
        return len(self.returned)

    def hook(self, current: list[str | None]) -> Callable[[sf.Event], None]:
        """The on_event hook of one task's connection (``current``: its transfer now)."""
        def on_event(event: sf.Event) -> None:
            if PASSWORD in repr(event):
                self.leaks.append(repr(event))
            key = current[0]
            if key is not None:
                self.trail.setdefault(key, []).append(event)
            self.events[type(event).__name__] += 1
            if isinstance(event, sf.CommitResolved):
                self.resolutions[event.status] += 1
                self.via[event.via] += 1
            if isinstance(event, sf.Reconnected) and event.failover:
                self.failovers += 1

        return on_event


async def bank_task(conninfo: str, seed: int, stop: threading.Event, out: Bank) -> None:
    rng = random.Random(seed)
    current: list[str | None] = [None]
    try:
        rc = await sf.connect_async(conninfo, policy=POLICY, on_event=out.hook(current))
    except Exception as exc:  # recorded; the test fails on it
        out.raised[f"connect-{seed}"] = exc
        return
    finally:
        out.connected += 1
    try:
        while not stop.is_set():
            transfer_id = str(uuid.uuid4())
            src, dst = rng.sample(range(1, ACCOUNTS + 1), 2)
            unit: Callable[..., Awaitable[str]] = transfer
            if rng.randrange(MISBEHAVE_EVERY) == 0:
                how = rng.choice(list(MISBEHAVIOURS))
                transfer_id = f"bad-{how}-{transfer_id}"
                unit = misbehaving(rc, how)
                out.bad[transfer_id] = MISBEHAVIOURS[how]
            limit = None
            if out.cancel_every and unit is transfer and rng.randrange(out.cancel_every) == 0:
                transfer_id = f"cancel-{transfer_id}"
                limit = rng.uniform(0, 0.05)
            current[0] = transfer_id
            timeout = None if limit is None else asyncio.timeout(limit)
            try:
                async with timeout or contextlib.nullcontext():
                    got = await rc.run(unit, transfer_id, src, dst, rng.randint(1, 50))
            except Exception as exc:
                if timeout is not None and isinstance(exc, TimeoutError) and timeout.expired():
                    out.cancelled[transfer_id] = [
                        e for e in out.trail.get(transfer_id, [])
                        if isinstance(e, sf.UnitInterrupted)]
                else:
                    out.raised[transfer_id] = exc
                continue
            finally:
                current[0] = None
            if got != transfer_id:
                out.wrong[transfer_id] = got
            out.returned.append(transfer_id)
            if out.faults_over:
                out.recovered.add(seed)
    finally:
        await rc.close()


class BankInjector(Injector):
    """The sync bank's injector, given the async bank's record (it needs `committed()`)."""

    def __init__(self, cluster: LocalCluster, proxy: FaultProxy, out: Bank) -> None:
        super().__init__(cluster, proxy, out)  # type: ignore[arg-type]  # needs committed()


def inject(injector: Injector, faults: int, stop: threading.Event, limit: float) -> None:
    """`Injector.run`, bounded: it also ends when told to, or after ``limit`` seconds."""
    deadline = time.monotonic() + limit
    order: list[str] = []
    while (sum(injector.counts.values()) < faults and not stop.is_set()
           and time.monotonic() < deadline):
        if not order:
            order = list(injector.kinds)
            injector.rng.shuffle(order)
        injector.wait_for_traffic()
        kind = order.pop()
        if injector.kinds[kind]():
            injector.counts[kind] += 1


async def bank_run(conninfo: str, injector: Injector, out: Bank, faults: int,
                   limit: float) -> tuple[list[str], dict[str, BaseException]]:
    """Run the tasks and the injector; returns the tasks that hung and those that died."""
    stop = threading.Event()
    tasks = [asyncio.create_task(bank_task(conninfo, seed, stop, out), name=f"bank-{seed}")
             for seed in range(TASKS)]
    # The faults hit running connections: a first connect_async() that meets a crash
    # may fail at once by design (it cannot tell a crash mid-login from a bad login;
    # docs/resilient.md, "Bad input fails at once").
    while out.connected < TASKS and not any(t.done() for t in tasks):
        await asyncio.sleep(0.01)
    injecting = asyncio.ensure_future(
        asyncio.to_thread(inject, injector, faults, stop, limit))
    pending: set[asyncio.Task[None]] = set()
    try:
        # A task that ends before it is told to has failed: end the run at once.
        await asyncio.wait([injecting, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if injecting.done():
            injecting.result()
            out.faults_over = True
            # Every connection outlived the last fault: each commits again.
            end = time.monotonic() + 60
            while (len(out.recovered) < TASKS and time.monotonic() < end
                   and not any(t.done() for t in tasks)):
                await asyncio.sleep(0.05)
    finally:
        stop.set()
        await asyncio.wait([injecting])  # the thread ends after its current fault
        _, pending = await asyncio.wait(tasks, timeout=120)
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=30)
    died = {t.get_name(): t.exception() for t in tasks
            if t.done() and not t.cancelled() and t.exception() is not None}
    return sorted(t.get_name() for t in pending), {k: v for k, v in died.items() if v}


def run_bank(cluster: LocalCluster, proxy: FaultProxy, faults: int, limit: float,
             cancel_every: int = 0) -> None:
    conninfo = cluster.conninfo(host=proxy.host, port=str(proxy.port))
    out = Bank(cancel_every=cancel_every)
    injector = BankInjector(cluster, proxy, out)
    started = time.monotonic()
    with capture_logs() as logged:
        hung, died = asyncio.run(bank_run(conninfo, injector, out, faults, limit))
    spent = time.monotonic() - started
    books = read_books(cluster)
    in_ledger = books.in_ledger
    interruptions = [e for events in out.cancelled.values() for e in events]

    print(f"\nasync: {sum(injector.counts.values())} faults {dict(injector.counts)} in "
          f"{spent:.1f} s; {len(out.returned)} transfers returned, {len(out.raised)} raised "
          f"({len(out.bad)} misbehaving units refused), {len(out.cancelled)} timed out "
          f"{dict(collections.Counter((e.phase, e.outcome) for e in interruptions))}; "
          f"events {dict(out.events)}; commit resolutions {dict(out.resolutions)} "
          f"decided by {dict(out.via)}; "
          f"failovers seen {out.failovers}; tasks that committed after the last fault "
          f"{len(out.recovered)}/{TASKS}")

    assert not hung, f"tasks did not finish: {hung}"
    assert not died, f"tasks failed: {died}"
    unconnected = {k: v for k, v in out.raised.items() if k.startswith("connect-")}
    assert not unconnected, f"tasks could not connect: {unconnected}"
    assert sum(injector.counts.values()) >= faults, \
        f"only {dict(injector.counts)} faults within {limit} s"
    assert not out.wrong, f"run() returned what the unit did not: {out.wrong}"
    check_books(out, books, logged, accounts=ACCOUNTS, password=PASSWORD,
                # one restart can leave every task's in-flight COMMIT unknown at once
                unknown_bound=TASKS, also_asked=out.cancelled)
    # A call that timed out was reported interrupted once, and its outcome is the truth.
    untrue = [t for t, events in out.cancelled.items()
              if misreported(events, in_ledger.get(t, 0))]
    assert not untrue, f"timed out, misreported: {explain(out, untrue)}"
    # Every connection works after the last fault.
    assert len(out.recovered) == TASKS, \
        f"tasks that never committed after the last fault: {set(range(TASKS)) - out.recovered}"
    # Only the calls that timed out were reported interrupted.
    assert out.events["UnitInterrupted"] == len(out.cancelled)
    assert bool(out.cancelled) == bool(cancel_every)


#: What a call interrupted in each phase may say became of its unit. Faults or not:
#: in ``connect`` it may have been asking about a lost COMMIT (``unknown``).
ALLOWED_OUTCOMES = {"connect": {"not begun", "rolled back", "unknown"},
                    "unit": {"rolled back"},
                    "commit": {"committed", "rolled back", "unknown"}}


def misreported(events: list[sf.UnitInterrupted], rows: int) -> bool:
    """Whether the interruptions reported for one call are not one, or not the truth
    about the ``rows`` its unit stored."""
    if len(events) != 1:
        return True
    event = events[0]
    if event.outcome not in ALLOWED_OUTCOMES.get(event.phase, set()):
        return True
    if event.outcome == "committed":
        return rows != 1
    if event.outcome == "unknown":
        return rows > 1
    return rows != 0


def test_async_bank_commits_exactly_once_through_100_faults(
    bank: tuple[LocalCluster, FaultProxy]
) -> None:
    run_bank(*bank, faults=100, limit=200)


@needs_timeout
def test_async_bank_with_timeouts_through_faults(
    bank: tuple[LocalCluster, FaultProxy]
) -> None:
    """Some transfers run under a short asyncio.timeout, while the faults go on: each
    timeout that fired was reported once, and what it said became of the unit is what
    the ledger shows."""
    run_bank(*bank, faults=35, limit=100, cancel_every=10)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_async_bank_soak(bank: tuple[LocalCluster, FaultProxy]) -> None:
    run_bank(*bank, faults=1000, limit=3000)


# --- cancellation --------------------------------------------------------------------------

#: Bounds the shielded COMMIT (and every retry) of the cancellation tests.
CANCEL_POLICY = sf.RetryPolicy(deadline=20)
#: Cases of the random cancellation test.
CASES = 60
#: A bound on every wait of the cancellation tests (never a measurement).
WAIT = 30.0


@pytest.fixture
def proxied(fresh_server: LocalServer) -> Iterator[tuple[LocalServer, FaultProxy]]:
    with psycopg.connect(fresh_server.conninfo(), autocommit=True) as conn:
        # No unique constraints: a unit stored twice must show as two rows.
        conn.execute("CREATE TABLE done (uid text, xid text)")
        conn.execute("CREATE TABLE steps (uid text, n int)")
        conn.execute("CREATE TABLE probes (uid text)")
    with FaultProxy(fresh_server.host, fresh_server.port) as proxy:
        yield fresh_server, proxy


@dataclass
class Case:
    """One run() and the cancellation aimed at it."""

    uid: str
    #: ``random``: the cancellation comes after ``delay`` seconds, wherever the call
    #: is then; ``in_unit``: when the unit says it reached step ``signal_at``;
    #: ``commit_held``: while the proxy holds the COMMIT; ``connect_held``: while the
    #: proxy holds the new session's startup; ``late``: after the call ended;
    #: ``swallowing``: as ``in_unit``, and the unit catches the cancellation and returns.
    mode: str
    #: ``timeout`` (asyncio.timeout around run()) or ``cancel`` (task.cancel()).
    how: str
    steps: int
    nap: float
    delay: float | None = None
    signal_at: int = 0
    #: Set by the unit just before its COMMIT: a slow COMMIT (random cases).
    commit_latency: float = 0.0
    reached: asyncio.Event = field(default_factory=asyncio.Event)
    timeout: asyncio.Timeout | None = None
    #: What the unit saw: its session and its transaction id.
    raw: Any = None
    xid: str | None = None
    #: What became of the call: its result, or what it raised (None: returned).
    result: Any = None
    error: BaseException | None = None
    cancel_requested: bool = False
    events: list[sf.Event] = field(default_factory=list)
    #: COMMITs the proxy saw during the call.
    commits_sent: int = 0
    #: Whether run() had ended while the proxy still held its COMMIT / its connect.
    ended_while_held: bool | None = None
    #: The session the next run() used.
    next_raw: Any = None
    problems: list[str] = field(default_factory=list)

    @property
    def interrupted(self) -> list[sf.UnitInterrupted]:
        return [e for e in self.events if isinstance(e, sf.UnitInterrupted)]

    def __repr__(self) -> str:
        said = [{k: v for k, v in e.fields().items() if k != "target"} for e in self.events]
        return (f"<Case {self.uid} {self.mode}/{self.how} steps={self.steps} nap={self.nap} "
                f"delay={self.delay} signal_at={self.signal_at} "
                f"commit_latency={self.commit_latency} xid={self.xid} "
                f"error={self.error!r} commits_sent={self.commits_sent} events={said}>")


async def step_unit(conn: psycopg.AsyncConnection[Any], case: Case, proxy: FaultProxy) -> str:
    """Several statements with small sleeps between them, so that a cancellation lands at
    a different point each time; the last row says the unit ran to its end."""
    case.raw = conn
    cur = await conn.execute("SELECT pg_current_xact_id()::text")
    row = await cur.fetchone()
    assert row is not None
    case.xid = row[0]
    for n in range(case.steps):
        await conn.execute("INSERT INTO steps VALUES (%s, %s)", (case.uid, n))
        if case.mode in ("in_unit", "swallowing") and n == case.signal_at:
            case.reached.set()
            # The cancellation lands in here. (psycopg asks the server to cancel it; a
            # cancel request that overtakes the statement is lost, and psycopg then
            # waits for the statement to end: it is short.)
            try:
                await conn.execute("SELECT pg_sleep(0.3)")
            except asyncio.CancelledError:
                if case.mode == "swallowing":
                    return case.uid  # a unit that swallows its cancellation and returns
                raise
        await conn.execute("SELECT pg_sleep(%s)", (case.nap,))
    await conn.execute("INSERT INTO done VALUES (%s, %s)", (case.uid, case.xid))
    if case.mode == "commit_held":
        await asyncio.to_thread(proxy.pause)  # the COMMIT that follows waits in the proxy
    elif case.mode == "lost_commit":
        # The COMMIT's reply is lost (an armed fault); the library can make no new
        # session to ask about it until the test lets it.
        await asyncio.to_thread(proxy.reject_new, True)
    elif case.commit_latency:
        await asyncio.to_thread(proxy.set_latency, case.commit_latency)
    return case.uid


async def probe_unit(conn: psycopg.AsyncConnection[Any], uid: str, seen: list[Any]) -> str:
    seen.append(conn)
    await conn.execute("INSERT INTO probes VALUES (%s)", (uid,))
    return uid


async def _stat(proxy: FaultProxy, name: str) -> int:
    stats = await asyncio.to_thread(lambda: proxy.stats)
    return int(getattr(stats, name))


async def _until(check: Callable[[], Awaitable[bool]], task: asyncio.Task[Any]) -> bool:
    """Wait (bounded) until ``check()``; False if the call ended first or it never came."""
    end = time.monotonic() + WAIT
    while time.monotonic() < end and not task.done():
        if await check():
            return True
        await asyncio.sleep(0.002)
    return False


def _cancel(case: Case, task: asyncio.Task[Any]) -> None:
    """The cancellation, now: the timeout expires, or the task is cancelled."""
    if case.how == "timeout":
        assert case.timeout is not None
        case.timeout.reschedule(asyncio.get_running_loop().time())
    else:
        case.cancel_requested = task.cancel()


async def drive(rc: sf.AsyncResilientConnection[Any], proxy: FaultProxy, rec: Recorder,
                case: Case, latency: float, *, probe: bool = True) -> None:
    """Run ``case``: its run(), the cancellation aimed at it, then (``probe``) one plain
    run()."""
    first_event = len(rec.events)
    commits_before = await _stat(proxy, "commits_seen")
    accepted_before = await _stat(proxy, "connections_accepted")
    await asyncio.to_thread(proxy.set_latency, latency)

    async def call() -> Any:
        if case.how == "timeout":
            async with asyncio.timeout(case.delay) as timeout:
                case.timeout = timeout
                return await rc.run(step_unit, case, proxy)
        return await rc.run(step_unit, case, proxy)

    paused = False
    if case.mode == "connect_held":
        await asyncio.to_thread(proxy.pause)
        paused = True
    task = asyncio.create_task(call())
    try:
        await asyncio.sleep(0)  # the call starts (and makes its asyncio.timeout)
        if case.mode == "random":
            if case.how == "cancel":
                assert case.delay is not None
                await asyncio.wait([task], timeout=case.delay)
                case.cancel_requested = task.cancel()
        elif case.mode == "late":
            await asyncio.wait([task], timeout=WAIT)
            if case.how == "cancel":
                case.cancel_requested = task.cancel()  # too late: nothing to cancel
        elif case.mode in ("in_unit", "swallowing"):
            reached = asyncio.ensure_future(case.reached.wait())
            await asyncio.wait([reached, task], return_when=asyncio.FIRST_COMPLETED,
                               timeout=WAIT)
            reached.cancel()
            if not case.reached.is_set():
                case.problems.append("the unit never reached its signal")
            _cancel(case, task)
        elif case.mode in ("commit_held", "connect_held"):
            if case.mode == "commit_held":
                async def sent() -> bool:
                    return await _stat(proxy, "commits_seen") > commits_before
                paused = True  # the unit pauses the proxy before its COMMIT
                held = await _until(sent, task)
            else:
                async def accepted() -> bool:
                    return await _stat(proxy, "connections_accepted") > accepted_before
                held = await _until(accepted, task)
            if not held:
                case.problems.append(f"{case.mode}: the proxy never held anything")
            _cancel(case, task)
            if case.mode == "commit_held":
                # Turns of the loop: the cancellation reaches run(), which must wait for
                # the COMMIT the proxy holds.
                for _ in range(20):
                    await asyncio.sleep(0)
                await asyncio.sleep(0.05)
            else:
                # A cancelled connect needs nothing from the network to end.
                await asyncio.wait([task], timeout=WAIT)
            case.ended_while_held = task.done()
    finally:
        if paused:
            await asyncio.to_thread(proxy.resume)
        await asyncio.wait([task], timeout=2 * WAIT)
        await asyncio.to_thread(proxy.set_latency, 0)
    if not task.done():
        case.problems.append("run() did not end")
        task.cancel()
        await asyncio.wait([task], timeout=WAIT)
        return
    if task.cancelled():
        case.error = asyncio.CancelledError()
    elif task.exception() is not None:
        case.error = task.exception()
    else:
        case.result = task.result()
    case.events = rec.events[first_event:]
    case.commits_sent = await _stat(proxy, "commits_seen") - commits_before
    # The session after the call: kept only after a COMMIT that finished.
    committed = [e for e in case.interrupted if e.outcome == "committed"]
    if case.error is not None and case.raw is not None:
        if committed and (rc.connection is not case.raw or case.raw.closed):
            case.problems.append("outcome 'committed', yet the session was given up")
        if not committed and not case.raw.closed:
            case.problems.append(f"interrupted ({case.interrupted}), yet its session is open")
        if not committed and rc.connection is case.raw:
            case.problems.append("interrupted, yet its session is still in use")
    if not probe:
        return
    # The connection is usable afterwards.
    seen: list[Any] = []
    try:
        async with asyncio.timeout(WAIT):
            got = await rc.run(probe_unit, case.uid, seen)
    except Exception as exc:
        case.problems.append(f"the next run() failed: {exc!r}")
    else:
        if got != case.uid:
            case.problems.append(f"the next run() returned {got!r}")
        case.next_raw = seen[-1]


def check_case(case: Case, rows: int, steps: int, status: str | None) -> list[str]:
    """What is wrong with ``case``, given what the server has of it: ``rows`` rows in
    `done`, ``steps`` in `steps`, and its transaction's ``pg_xact_status``."""
    bad = list(case.problems)
    if rows > 1:
        bad.append(f"stored {rows} times")
    if steps != case.steps * min(rows, 1):
        bad.append(f"{steps} of {case.steps} steps stored with {rows} rows: not atomic")
    if case.xid is not None:
        if status == "in progress":
            bad.append("its transaction is still in progress after everything ended")
        if (status == "committed") != (rows == 1):
            bad.append(f"pg_xact_status {status!r} but {rows} rows")
    interrupted = case.interrupted
    if case.error is None:
        if case.result != case.uid:
            bad.append(f"returned {case.result!r}")
        if rows != 1:
            bad.append(f"returned, but {rows} rows")
        if interrupted:
            bad.append("returned, yet reported interrupted")
        if case.cancel_requested:
            bad.append("the task was cancelled, yet run() returned: cancellation swallowed")
        return bad
    # Every cancelled call raised, as asyncio says it must.
    expected = TimeoutError if case.how == "timeout" else asyncio.CancelledError
    if not isinstance(case.error, expected):
        bad.append(f"raised {case.error!r}, not {expected.__name__}")
    if case.how == "cancel" and not case.cancel_requested:
        bad.append("raised, but it was never cancelled")
    if len(interrupted) != 1:
        bad.append(f"{len(interrupted)} UnitInterrupted events, not one")
        return bad
    event = interrupted[0]
    allowed = {"connect": {"not begun", "rolled back"}, "unit": {"rolled back"},
               "commit": {"committed", "rolled back", "unknown"}}
    if event.outcome not in allowed.get(event.phase, set()):
        bad.append(f"phase {event.phase!r} with outcome {event.outcome!r}")
    if event.interruption != "CancelledError":
        bad.append(f"interruption {event.interruption!r}")
    if event.xid is not None and case.xid is not None and event.xid != case.xid:
        bad.append(f"the event's xid {event.xid} is not the unit's {case.xid}")
    if event.phase == "commit" and event.xid is None:
        bad.append("interrupted in COMMIT without its xid")
    # Cancelled before COMMIT was sent: nothing committed.
    if case.commits_sent == 0 and (rows or event.phase == "commit"):
        bad.append(f"no COMMIT was sent, yet phase {event.phase!r} and {rows} rows")
    if event.phase != "commit" and rows:
        bad.append(f"cancelled in {event.phase!r}, yet committed")
    if event.outcome in ("not begun", "rolled back") and rows:
        bad.append(f"outcome {event.outcome!r}, yet committed")
    if event.outcome == "committed" and rows != 1:
        bad.append(f"outcome 'committed', yet {rows} rows")
    # The cancellations aimed at a point landed there.
    want = {"in_unit": ("unit", "rolled back"), "swallowing": ("unit", "rolled back"),
            "commit_held": ("commit", "committed"),
            "connect_held": ("connect", "not begun"), "late": ("returned", "")}.get(case.mode)
    if want is not None and (event.phase, event.outcome) != want:
        bad.append(f"{case.mode}: phase/outcome {(event.phase, event.outcome)}, not {want}")
    if case.mode == "commit_held":
        if case.ended_while_held:
            bad.append("run() ended while its COMMIT was still held")
        if case.next_raw is not case.raw:
            bad.append("the next run() did not keep the session of the committed unit")
    if case.mode == "connect_held" and not case.ended_while_held:
        bad.append("a cancelled connect waited for the network")
    return bad


async def _settled(server: LocalServer) -> None:
    """Wait (bounded) until no other client session is left on the server."""
    end = time.monotonic() + WAIT
    async with await psycopg.AsyncConnection.connect(server.conninfo(),
                                                     autocommit=True) as conn:
        while time.monotonic() < end:
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend' "
                "AND pid <> pg_backend_pid()")
            row = await cur.fetchone()
            if row is not None and row[0] == 0:
                return
            await asyncio.sleep(0.02)


def verify(server: LocalServer, cases: list[Case]) -> dict[str, list[str]]:
    """Each case's problems, read against the server after everything ended."""
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        done = collections.Counter(u for (u,) in conn.execute("SELECT uid FROM done"))
        steps = collections.Counter(u for (u,) in conn.execute("SELECT uid FROM steps"))
        probes = collections.Counter(u for (u,) in conn.execute("SELECT uid FROM probes"))
        statuses: dict[str, str | None] = {}
        for case in cases:
            if case.xid is not None:
                row = conn.execute("SELECT pg_xact_status(%s::xid8)", (case.xid,)).fetchone()
                statuses[case.uid] = None if row is None else row[0]
    out = {}
    for case in cases:
        bad = check_case(case, done[case.uid], steps[case.uid], statuses.get(case.uid))
        if case.next_raw is not None and probes[case.uid] != 1:
            bad.append(f"the next run() returned, but {probes[case.uid]} probe rows")
        if bad:
            out[case.uid] = [*bad, repr(case)]
    strays = set(done) - {c.uid for c in cases}
    if strays:
        out["strays"] = [f"rows nobody wrote: {strays}"]
    return out


#: The chosen points, each with both kinds of cancellation, so many times each.
CHOSEN = ("in_unit", "swallowing", "commit_held", "connect_held", "late")
CHOSEN_EACH = 3


def plan(rng: random.Random, count: int) -> list[tuple[str, str]]:
    """``count`` (mode, how) pairs in a seeded order: every chosen point with both kinds
    of cancellation, the rest at random points."""
    chosen = [(m, h) for m in CHOSEN for h in ("timeout", "cancel")] * CHOSEN_EACH
    rest = [("random", ("timeout", "cancel")[i % 2]) for i in range(count - len(chosen))]
    out = chosen + rest
    rng.shuffle(out)
    return out


def make_case(rng: random.Random, n: int, mode: str, how: str) -> Case:
    steps = rng.randint(1, 5)
    case = Case(uid=f"c{n}-{uuid.uuid4().hex[:8]}", mode=mode, how=how, steps=steps,
                nap=rng.choice([0.0, 0.002, 0.005, 0.01]))
    if mode == "random":
        case.commit_latency = rng.choice([0.0, 0.0, 0.02, 0.05])
        # About as long as the unit takes, so that some calls end first.
        about = steps * (case.nap + 0.003) + 2 * case.commit_latency + 0.01
        case.delay = rng.uniform(0, 1.5 * about)
    elif mode in ("in_unit", "swallowing"):
        case.signal_at = rng.randrange(steps)
    return case


async def cancellations(server: LocalServer, proxy: FaultProxy, seed: int,
                        count: int) -> list[Case]:
    rec = Recorder()
    rng = random.Random(seed)
    conninfo = server.conninfo(host=proxy.host, port=str(proxy.port))
    rc = await sf.connect_async(conninfo, policy=CANCEL_POLICY, on_event=rec)
    cases: list[Case] = []
    try:
        for n, (mode, how) in enumerate(plan(rng, count)):
            case = make_case(rng, n, mode, how)
            if case.mode == "connect_held" and rc.connection is not None:
                # Only a call without a session connects: lose it first, to a
                # cancellation in the unit (checked as a case of its own).
                before = make_case(rng, n, "in_unit", how)
                before.uid += "-before"
                cases.append(before)
                await drive(rc, proxy, rec, before, latency=0.0, probe=False)
            cases.append(case)
            await drive(rc, proxy, rec, case, latency=rng.choice([0.0, 0.0, 0.001, 0.005]))
    finally:
        await rc.close()
    await _settled(server)
    return cases


@needs_timeout
def test_cancellation_at_random_points_commits_nothing_twice(
    proxied: tuple[LocalServer, FaultProxy]
) -> None:
    server, proxy = proxied
    cases = asyncio.run(cancellations(server, proxy, seed=2024, count=CASES))
    problems = verify(server, cases)
    landed = collections.Counter(
        (c.mode, c.interrupted[0].phase, c.interrupted[0].outcome) if c.interrupted
        else (c.mode, "returned", "") for c in cases)
    print(f"\n{len(cases)} cases: {dict(sorted(landed.items()))}")
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())
    # The random points were not all too late.
    assert any(c.error is not None for c in cases if c.mode == "random")


@needs_timeout
@pytest.mark.parametrize("how", ["timeout", "cancel"])
def test_cancellation_while_commit_is_held_commits_once(
    proxied: tuple[LocalServer, FaultProxy], how: str
) -> None:
    """The proxy holds the COMMIT; the call is cancelled; the COMMIT is let finish."""
    server, proxy = proxied

    async def main() -> tuple[Case, Case]:
        rec = Recorder()
        conninfo = server.conninfo(host=proxy.host, port=str(proxy.port))
        rc = await sf.connect_async(conninfo, policy=CANCEL_POLICY, on_event=rec)
        try:
            held = Case(uid=f"held-{how}", mode="commit_held", how=how, steps=3, nap=0.002)
            await drive(rc, proxy, rec, held, latency=0.0)
            after = Case(uid=f"after-{how}", mode="late", how=how, steps=2, nap=0.0)
            await drive(rc, proxy, rec, after, latency=0.0)
        finally:
            await rc.close()
        await _settled(server)
        return held, after

    held, after = asyncio.run(main())
    problems = verify(server, [held, after])
    assert not problems, "\n".join(f"{k}: {v}" for k, v in problems.items())
    expected_error = TimeoutError if how == "timeout" else asyncio.CancelledError
    assert isinstance(held.error, expected_error)
    [event] = held.interrupted
    assert (event.phase, event.outcome, event.xid) == ("commit", "committed", held.xid)
    assert held.ended_while_held is False
    assert after.error is None
    assert after.result == after.uid
    assert rows_of(server, held.uid) == 1


@needs_timeout
def test_cancellation_while_commit_outlives_the_deadline_is_unknown(
    proxied: tuple[LocalServer, FaultProxy]
) -> None:
    """Held past RetryPolicy.deadline, the COMMIT is given up: outcome ``unknown``, the
    session is closed, and what the server did is at most one commit."""
    server, proxy = proxied

    async def main() -> Case:
        rec = Recorder()
        conninfo = server.conninfo(host=proxy.host, port=str(proxy.port))
        rc = await sf.connect_async(conninfo, policy=sf.RetryPolicy(deadline=0.5),
                                    on_event=rec)
        case = Case(uid="unknown", mode="commit_held", how="cancel", steps=2, nap=0.0)
        try:
            commits_before = await _stat(proxy, "commits_seen")
            task = asyncio.create_task(rc.run(step_unit, case, proxy))

            async def sent() -> bool:
                return await _stat(proxy, "commits_seen") > commits_before
            try:
                assert await _until(sent, task), "the proxy never held the COMMIT"
                case.cancel_requested = task.cancel()
                await asyncio.wait([task], timeout=WAIT)
                case.ended_while_held = task.done()
            finally:
                await asyncio.to_thread(proxy.resume)
                await asyncio.wait([task], timeout=WAIT)
            assert task.cancelled()
            case.error = asyncio.CancelledError()
            case.events = list(rec.events)
            assert case.raw is not None
            assert case.raw.closed
            assert rc.connection is not case.raw
            seen: list[Any] = []
            assert await rc.run(probe_unit, case.uid, seen) == case.uid
            assert seen[0] is not case.raw
        finally:
            await rc.close()
        await _settled(server)
        return case

    case = asyncio.run(main())
    [event] = case.interrupted
    assert (event.phase, event.outcome, event.xid) == ("commit", "unknown", case.xid)
    assert case.ended_while_held
    rows = rows_of(server, case.uid)
    assert rows <= 1
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_xact_status(%s::xid8)", (case.xid,)).fetchone()
    assert row is not None
    assert row[0] == ("committed" if rows else "aborted")


def rows_of(server: LocalServer, uid: str) -> int:
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM done WHERE uid = %s", (uid,)).fetchone()
    assert row is not None
    return int(row[0])


@needs_timeout
@pytest.mark.parametrize("fault", ["drop", "hold"])
def test_cancellation_while_a_lost_commit_is_resolved_is_unknown(
    proxied: tuple[LocalServer, FaultProxy], fault: str
) -> None:
    """The COMMIT's reply is lost (``drop``: the server committed; ``hold``: the COMMIT
    never arrived); while the library tries to reach the server to ask, the call is
    cancelled. Nobody knows what became of the unit: ``unknown``, with its xid."""
    server, proxy = proxied

    async def main() -> Case:
        rec = Recorder()
        conninfo = server.conninfo(host=proxy.host, port=str(proxy.port))
        rc = await sf.connect_async(conninfo, policy=CANCEL_POLICY, on_event=rec)
        case = Case(uid=f"lost-{fault}", mode="lost_commit", how="cancel", steps=2, nap=0.0)
        try:
            rejected_before = await _stat(proxy, "connections_rejected")
            arm = proxy.arm_commit_drop if fault == "drop" else proxy.arm_commit_hold
            await asyncio.to_thread(arm)
            task = asyncio.create_task(rc.run(step_unit, case, proxy))

            async def asking() -> bool:
                return await _stat(proxy, "connections_rejected") > rejected_before
            try:
                assert await _until(asking, task), "the library never tried to reconnect"
                case.cancel_requested = task.cancel()
                await asyncio.wait([task], timeout=WAIT)
                case.ended_while_held = task.done()
            finally:
                await asyncio.to_thread(proxy.reject_new, False)
                await asyncio.to_thread(proxy.release_held)
                await asyncio.wait([task], timeout=WAIT)
            assert task.cancelled()
            case.error = asyncio.CancelledError()
            case.events = list(rec.events)
            seen: list[Any] = []
            assert await rc.run(probe_unit, case.uid, seen) == case.uid
            assert seen[0] is not case.raw
        finally:
            await rc.close()
        await _settled(server)
        return case

    case = asyncio.run(main())
    said = [type(e).__name__ for e in case.events]
    [event] = case.interrupted
    assert (event.outcome, event.xid) == ("unknown", case.xid), said
    assert case.ended_while_held, "a cancelled reconnect waited for the network"
    assert "CommitResolved" not in said, said
    assert said.index("FailureDetected") < said.index("UnitInterrupted")
    rows = rows_of(server, case.uid)
    assert rows == (1 if fault == "drop" else 0)
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_xact_status(%s::xid8)", (case.xid,)).fetchone()
    assert row is not None
    assert row[0] == ("committed" if rows else "aborted")
