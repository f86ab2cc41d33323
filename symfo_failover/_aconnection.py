"""`AsyncResilientConnection`: the asyncio runner of the unit-of-work core.

The same flows as the sync `ResilientConnection` (`_core`), carried out with awaits on
psycopg's ``AsyncConnection``. What only an event loop has is here: a COMMIT in flight
is shielded from cancellation and let finish (bounded by the policy), and the waits of
the policy do not block the loop. pyodbc has no async API, so this is psycopg only.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from types import TracebackType
from typing import (
    TYPE_CHECKING,
    Any,
    Concatenate,
    ParamSpec,
    Protocol,
    TypeVar,
    overload,
)

from . import _core
from . import _events as ev
from ._classify import classify
from ._connection import PROBE_TIMEOUT, ConnectionFacts, make_core
from ._contract import refuse_sync_function, require_awaitable
from ._core import Core, Flow, Job
from ._decide import Phase, Situation, Step, next_step
from ._errors import UnitContractError
from ._ledger import LedgerMode
from ._policy import RetryPolicy
from ._probe import probe
from ._target import AsyncDriver, Target, normalise_isolation

if TYPE_CHECKING:
    import psycopg
    from psycopg.rows import Row, TupleRow

_T = TypeVar("_T")
_P = ParamSpec("_P")
#: The driver's connection type, as units and `AsyncResilientConnection.connection` see it.
C = TypeVar("C")


class AsyncSessionSource(Protocol):
    """`_core.SessionSource` for the async runner: the same seam, awaited."""

    async def connect(self) -> Any: ...
    async def discard(self, raw: Any) -> None: ...


class AsyncDriverSource:
    """The plain session source for the async runner: the driver's connect and close."""

    __slots__ = ("_driver", "_target")

    def __init__(self, driver: AsyncDriver[Any], target: Target) -> None:
        self._driver = driver
        self._target = target

    async def connect(self) -> Any:
        return await self._driver.connect(self._target)

    async def discard(self, raw: Any) -> None:
        await self._driver.close(raw)


class AsyncResilientConnection(ConnectionFacts[C]):
    """A psycopg ``AsyncConnection`` that survives failover. Make one with
    `symfo_failover.connect_async`.

    ``await run(fn)`` runs ``async def fn(conn)`` exactly once, with every guarantee of
    the sync `ResilientConnection`; the passthrough methods are coroutines (a call may
    have to make a new session first). One task at a time uses it: calls from other
    tasks wait their turn.
    """

    def __init__(
        self,
        core: Core,
        driver: AsyncDriver[Any],
        *,
        configure: Callable[[Any], object] | None = None,
        source: AsyncSessionSource | None = None,
    ) -> None:
        self._core = core
        self._driver = driver
        self._configure = configure
        self._source = source or AsyncDriverSource(driver, core.target)
        self._lock = asyncio.Lock()
        self._ops = self._operations()

    # --- public: units of work -----------------------------------------------------

    async def run(self, fn: Callable[Concatenate[C, _P], Awaitable[_T]], /,
                  *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``await fn(connection, *args, **kwargs)`` in one transaction and commit it.

        The contract and the errors are those of `ResilientConnection.run`. A plain
        (sync) function is refused with ``TypeError``. On cancellation: before COMMIT
        was sent, the transaction is rolled back and nothing is committed; while COMMIT
        is in flight, it is let finish (at most ``RetryPolicy.deadline``) and its
        outcome is reported in a `UnitInterrupted` event. Either way the cancellation
        is raised.
        """
        refuse_sync_function(fn)
        job: Job = (fn, args, kwargs)
        self._refuse_in_unit("nested-run", "run() was called again")
        async with self._lock:
            self._check_open()
            return await self._drive(self._core.run(job))

    # --- public: passthrough ---------------------------------------------------------

    @overload
    async def cursor(self: AsyncResilientConnection[psycopg.AsyncConnection[Row]],
                     *args: Any, **kwargs: Any) -> psycopg.AsyncCursor[Row]: ...
    @overload
    async def cursor(self, *args: Any, **kwargs: Any) -> Any: ...

    async def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """A cursor of the current session (a new session if the last was lost)."""
        return await self._passthrough(lambda raw: _ready(raw.cursor(*args, **kwargs)),
                                       opens=True)

    @overload
    async def execute(self: AsyncResilientConnection[psycopg.AsyncConnection[Row]],
                      query: Any, params: Any = None,
                      **kwargs: Any) -> psycopg.AsyncCursor[Row]: ...
    @overload
    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any: ...

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        """Execute one statement on the current session; returns psycopg's cursor.

        Never run again by the library: a failure is raised (with its ``failure``
        classification attached) and the next call gets a new session if needed.
        """
        self._refuse_in_unit("connection-in-unit", "execute() on the AsyncResilientConnection")
        driver = self._driver
        return await self._passthrough(
            lambda raw: driver.execute(raw, query, params, kwargs), opens=True)

    async def commit(self) -> None:
        await self._passthrough(lambda raw: raw.commit(), opens=False)

    async def rollback(self) -> None:
        """Roll back. On a lost session there is nothing to roll back: the server did."""
        self._refuse_in_unit("connection-in-unit", "rollback() on the AsyncResilientConnection")
        async with self._lock:
            self._check_open()
            core = self._core
            raw = await self._drive(core.rollback_session())
            if raw is None:
                return
            try:
                await raw.rollback()
            except self._driver.error as exc:
                await self._drive(core.passthrough_failed(raw, exc))
                raise

    async def close(self) -> None:
        """Close the session. Idempotent."""
        self._refuse_in_unit("connection-in-unit", "close() on the AsyncResilientConnection")
        async with self._lock:
            await self._drive(self._core.close())

    async def __aenter__(self) -> AsyncResilientConnection[C]:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit a passthrough transaction on success, roll it back on error; close."""
        try:
            link = self._core.link
            if link.closed or link.raw is None or self._core.state.autocommit:
                return
            if exc_type is None:
                await self.commit()
            else:
                with contextlib.suppress(Exception):
                    await self.rollback()
        finally:
            await self.close()

    # --- public: tracked session state ---------------------------------------------
    # As psycopg's AsyncConnection: read as attributes, set with a coroutine.

    @property
    def autocommit(self) -> bool:
        return self._core.state.autocommit

    async def set_autocommit(self, value: bool) -> None:
        await self._set_state(autocommit=bool(value))

    @property
    def isolation_level(self) -> str | None:
        """``"read committed"``, ``"repeatable read"``, ``"serializable"``; None: the server's."""
        return self._core.state.isolation_level

    async def set_isolation_level(self, value: object) -> None:
        await self._set_state(isolation_level=normalise_isolation(value))

    @property
    def read_only(self) -> bool | None:
        """Read-only units need no transaction id and run in READ ONLY transactions."""
        return self._core.state.read_only

    async def set_read_only(self, value: bool | None) -> None:
        await self._set_state(read_only=None if value is None else bool(value))

    async def _set_state(self, **changes: Any) -> None:
        self._refuse_in_unit("connection-in-unit", f"{', '.join(changes)} was set")
        async with self._lock:
            self._check_open()
            await self._drive(self._core.set_state(replace(self._core.state, **changes)))

    # --- carrying the core's operations out ------------------------------------------

    async def _drive(self, flow: Flow[_T]) -> _T:
        """Run ``flow`` to its end, awaiting each operation it yields."""
        ops = self._ops
        try:
            op = flow.send(None)
            while True:
                try:
                    value = await ops[op[0]](*op[1:])
                except BaseException as exc:
                    op = flow.throw(exc)
                else:
                    op = flow.send(value)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def _operations(self) -> list[Callable[..., Awaitable[Any]]]:
        driver = self._driver
        table: dict[int, Callable[..., Awaitable[Any]]] = {
            _core.OP_CONNECT: self._source.connect,
            _core.OP_DISCARD: self._source.discard,
            _core.OP_INFO: driver.session_info,
            _core.OP_END_SESSION: driver.end_session,
            _core.OP_APPLY_STATE: driver.apply_state,
            _core.OP_CONFIGURE: self._run_configure,
            _core.OP_BEGIN: driver.begin,
            _core.OP_UNIT: self._call_unit,
            _core.OP_COMMIT: self._commit,
            _core.OP_ROLLBACK: driver.rollback,
            _core.OP_XACT_STATUS: driver.xact_status,
            _core.OP_AUTOCOMMIT: driver.set_autocommit,
            _core.OP_SLEEP: self._sleep,
            _core.OP_PROBE: self._probe,
            _core.OP_CLAIM: driver.claim,
            _core.OP_PRUNE: driver.prune,
        }
        return [table[i] for i in range(_core.N_OPS)]

    async def _call_unit(self, job: Job, lent: Any) -> Any:
        fn, args, kwargs = job
        task = asyncio.current_task()
        self._core.link.guard_owner = task
        before = _cancelling(task)
        result = await require_awaitable(fn(lent, *args, **kwargs), fn)
        if _cancelling(task) > before:
            # The unit caught its task's cancellation and returned: the cancellation
            # is not swallowed here. Nothing is committed; it goes on to the caller.
            raise asyncio.CancelledError("the unit of work returned after its task "
                                         "was cancelled; nothing was committed")
        return result

    async def _commit(self, raw: Any) -> None:
        """COMMIT, shielded: a cancellation while it is in flight lets it finish (within
        the policy's deadline), records what became of it, then goes on."""
        task = asyncio.ensure_future(self._driver.commit(raw))
        try:
            await asyncio.shield(task)
        except asyncio.CancelledError as cancelled:
            if not task.done():
                with contextlib.suppress(asyncio.CancelledError):  # raised below, once
                    await asyncio.wait({task}, timeout=self._core.policy.deadline)
            setattr(cancelled, _core.COMMIT_OUTCOME_ATTR, self._commit_outcome(raw, task))
            raise

    def _commit_outcome(self, raw: Any, task: asyncio.Future[None]) -> str:
        if not task.done():
            task.cancel()  # past the bound: the session is given up, the outcome unknown
            return "unknown"
        if task.cancelled():
            return "unknown"
        error = task.exception()
        if error is None:
            return "committed"
        failure = classify(error, connection=raw)
        usable = not self._driver.is_broken(raw)
        step = next_step(failure, Situation(Phase.COMMIT, usable))
        return "unknown" if step is Step.RESOLVE else "rolled back"

    async def _run_configure(self, raw: Any) -> None:
        assert self._configure is not None
        result = self._configure(raw)
        if inspect.isawaitable(result):
            await result

    async def _sleep(self, seconds: float) -> None:
        sleep = self._core.policy.sleep
        if sleep is time.sleep:
            await asyncio.sleep(seconds)
            return
        result: Any = sleep(seconds)  # an injected sleep (tests): sync or async
        if inspect.isawaitable(result):
            await result

    async def _probe(self, target: Any) -> Any:
        return await asyncio.to_thread(_core.probe_answers, target, probe, PROBE_TIMEOUT)

    async def _passthrough(self, op: Callable[[Any], Awaitable[_T]], *, opens: bool) -> _T:
        self._refuse_in_unit("connection-in-unit", "a passthrough call on the "
                             "AsyncResilientConnection")
        async with self._lock:
            core = self._core
            self._check_open()
            raw = await self._drive(core.passthrough_session(opens))
            try:
                core.link.maybe_in_transaction = opens and not core.state.autocommit
                return await op(raw)
            except self._driver.error as exc:
                await self._drive(core.passthrough_failed(raw, exc))
                raise

    async def _connect_with_retries(self) -> Any:
        async with self._lock:
            return await self._drive(self._core.connect())

    def _refuse_in_unit(self, rule: str, what: str) -> None:
        """Refuse a call from inside this connection's own running unit (a call from
        another task waits for the lock instead)."""
        link = self._core.link
        guard = link.guard
        if guard is not None and link.guard_owner is asyncio.current_task():
            error: UnitContractError = guard.refuse(rule, what)
            raise error



def _cancelling(task: asyncio.Task[Any] | None) -> int:
    """How many cancellations of ``task`` are pending (Python 3.11+; 0 before)."""
    count = getattr(task, "cancelling", None)
    return int(count()) if count is not None else 0


async def _ready(value: _T) -> _T:
    return value


async def connect_async(
    conninfo: str,
    *,
    policy: RetryPolicy | None = None,
    configure: Callable[[psycopg.AsyncConnection[TupleRow]], object] | None = None,
    on_event: ev.EventHook | None = None,
    ledger: LedgerMode = "auto",
    **kwargs: Any,
) -> AsyncResilientConnection[psycopg.AsyncConnection[TupleRow]]:
    """Open an `AsyncResilientConnection` (psycopg only: pyodbc has no async API).

    As `connect`: ``conninfo`` is a libpq connection string, ``kwargs`` go to
    ``psycopg.AsyncConnection.connect`` (``autocommit=`` sets the tracked autocommit),
    the detection defaults are added unless given, ``configure(conn)`` (sync or async)
    runs on every new session, ``on_event`` receives every `Event` and ``ledger``
    chooses the commit ledger (``"auto"``, ``"require"``, ``"off"``). Connects at
    once: bad input raises here without retrying; a server that is down is retried
    within ``policy``, without blocking the event loop.
    """
    if "driver" in kwargs:
        driver = kwargs.pop("driver")
        if driver != "psycopg":
            raise ValueError(
                f"connect_async() supports the psycopg driver only, not {driver!r}: "
                "pyodbc has no async API (use connect(..., driver='pyodbc') in a thread)")
    try:
        from ._driver_psycopg import AsyncPsycopgDriver
    except ImportError as exc:
        raise ImportError(
            f"psycopg is not installed: pip install 'symfo-failover[psycopg]' ({exc})"
        ) from exc
    adapter = AsyncPsycopgDriver()
    core = make_core(adapter, conninfo, policy=policy,
                     configure=configure, on_event=on_event, kwargs=kwargs, ledger=ledger)
    conn: AsyncResilientConnection[Any] = AsyncResilientConnection(
        core, adapter, configure=configure)
    await conn._connect_with_retries()
    refused = core.required_ledger_missing()
    if refused is not None:
        await conn.close()
        raise refused
    return conn
