"""`AsyncFailoverPool`: psycopg_pool's ``AsyncConnectionPool`` that notices a
failover once. The same hooks as `FailoverPool` (see ``_pool``), as coroutines where
psycopg_pool's async pool has them; the bookkeeping is shared (`_pool_common`).
``run()`` is the async runner of the unit-of-work core on pooled connections.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from time import monotonic
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import AsyncConnectionPool
from psycopg_pool.abc import ACT
from psycopg_pool.pool_async import AddConnection

from . import _core
from . import _events as ev
from ._aconnection import AsyncResilientConnection
from ._contract import refuse_sync_function
from ._driver_psycopg import (
    AsyncPsycopgDriver,
    apooled_session_info,
    gone,
    guard_off,
    guard_on,
)
from ._ledger import LedgerMode
from ._policy import RetryPolicy
from ._pool_common import (
    FailoverBookkeeping,
    OldGeneration,
    finish,
    stale_error,
    tag,
)
from ._pool_state import RUNNING, Verdict, nested_run

if TYPE_CHECKING:
    from psycopg_pool.abc import (
        AsyncConnectFailedCB,
        AsyncConnectionCB,
        AsyncConninfoParam,
        AsyncKwargsParam,
    )

_T = TypeVar("_T")
BAD = ConnStatus.BAD
IDLE = TransactionStatus.IDLE
_P = ParamSpec("_P")


class AsyncFailoverPool(FailoverBookkeeping, AsyncConnectionPool[ACT]):
    """psycopg_pool's ``AsyncConnectionPool`` that notices a failover once and
    replaces every connection to the old server at once. Arguments: those of
    ``AsyncConnectionPool``, plus ``policy``, ``on_event`` and ``ledger`` (see `FailoverPool`)."""

    _add_task = AddConnection

    def __init__(
        self,
        conninfo: AsyncConninfoParam = "",
        *,
        connection_class: type[ACT] = cast("type[ACT]", psycopg.AsyncConnection),  # noqa: B008
        kwargs: AsyncKwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: AsyncConnectionCB[ACT] | None = None,
        check: AsyncConnectionCB[ACT] | None = None,
        reset: AsyncConnectionCB[ACT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: AsyncConnectFailedCB | None = None,
        num_workers: int = 3,
        policy: RetryPolicy | None = None,
        on_event: ev.EventHook | None = None,
        ledger: LedgerMode = "auto",
    ) -> None:
        self._init_failover(policy, on_event, conninfo, kwargs, connection_class,
                            psycopg.AsyncConnection, ledger)
        self._driver = AsyncPsycopgDriver()
        super().__init__(
            conninfo,
            connection_class=connection_class,
            kwargs=kwargs,
            min_size=min_size,
            max_size=max_size,
            open=open,
            configure=configure,
            check=check,
            reset=reset,
            name=name,
            close_returns=close_returns,
            timeout=timeout,
            max_waiting=max_waiting,
            max_lifetime=max_lifetime,
            max_idle=max_idle,
            reconnect_timeout=reconnect_timeout,
            reconnect_failed=reconnect_failed,
            num_workers=num_workers,
        )

    # --- public: units of work -----------------------------------------------------------

    async def run(self, fn: Callable[Concatenate[ACT, _P], Awaitable[_T]], /,
                  *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """``await fn(connection, *args, **kwargs)`` on a pooled connection, committed
        exactly once: the guarantees, the contract, the errors and the cancellation
        rules of `AsyncResilientConnection.run`. On a lost session the unit goes on on
        another connection of the pool; a lost COMMIT is resolved with the server."""
        refuse_sync_function(fn)  # before a connection is taken for it
        nested = nested_run(RUNNING.get())
        if nested is not None:
            raise nested
        runner = _PooledRunner(self._unit_core(self._driver, await self._lend()),
                               self._driver, pool=self)
        core = runner._core
        token = RUNNING.set(core)
        try:
            return await runner.run(fn, *args, **kwargs)
        finally:
            RUNNING.reset(token)
            raw = core.link.raw
            if raw is not None:
                core.link.raw = None
                await self._give_back(raw)

    # --- psycopg_pool's hooks ------------------------------------------------------------

    async def _check_connection(self, conn: ACT) -> None:
        # psycopg_pool's check before a connection is handed out (``check=``), first
        # the generation: one handed over as a failover was noticed is given back
        # (and replaced) and psycopg_pool hands out another one at once.
        if getattr(conn, "_symfo_gen", -1) != self._gens.current:
            raise OldGeneration("a connection to the server of before the failover")
        if self._check:
            await super()._check_connection(conn)

    async def _resolve_conninfo(self) -> str:
        return self._conninfo_resolved(await super()._resolve_conninfo())

    async def _resolve_kwargs(self) -> dict[str, Any]:
        return self._kwargs_with_detection(await super()._resolve_kwargs())

    async def _connect(self, timeout: float | None = None) -> ACT:
        conn: ACT | None = None
        begun = self._policy.clock()
        try:
            conn = await super()._connect(timeout)
            info = await apooled_session_info(conn)
        except psycopg.Error as exc:
            if conn is not None:
                finish(conn)
            gone_verdict, previous = self._connect_failed(exc, conn, begun)
            if gone_verdict is not None:
                self._take_out_old("server went away", previous, None,
                                   noticed=gone_verdict is Verdict.NEW_SERVER)
            raise
        verdict, generation, previous = self._verdict(info)
        if verdict is Verdict.STALE:
            finish(conn)
            raise stale_error(info)
        tag(conn, generation, info)
        if verdict is Verdict.NEW_SERVER or verdict is Verdict.SETTLED:
            self._take_out_old("new server", previous, info.server_started,
                               noticed=verdict is Verdict.NEW_SERVER)
        return conn

    async def _add_connection(self, attempt: Any, growing: bool = False) -> None:
        now = monotonic()
        attempt = self._attempt_for(attempt)
        if self._park(attempt, growing):
            return
        try:
            conn = await self._connect()
        except Exception as exc:
            self._attempt_failed(attempt, exc)
            if attempt.time_to_give_up(now):
                async with self._lock:
                    gave_up = self._giving_up(growing)
                for _ in range(gave_up):
                    await self.reconnect_failed()
            else:
                attempt.update_delay(now, server_gone=self._gens.down)
                await self.schedule_task(AddConnection(self, attempt, growing=growing),
                                         attempt.delay)
            return
        for each in self._attempt_worked(attempt):
            self.run_task(AddConnection(self, growing=each))
        await self._add_to_pool(conn)
        self._added(conn)
        if growing:
            async with self._lock:
                if self._nconns < self._min_size or (
                    self._nconns < self._max_size and self._waiting
                ):
                    self._nconns += 1
                    self.run_task(AddConnection(self, growing=True))
                else:
                    self._growing = False

    async def _get_ready_connection(self, timeout: float | None) -> ACT | None:
        # Under the pool's lock. The look costs no round trip (a poll of the socket).
        while True:
            conn = await super()._get_ready_connection(timeout)
            if conn is None:
                return None
            if getattr(conn, "_symfo_gen", -1) == self._gens.current:
                # `gone`, its usual answer first: idle, no goodbye, nothing to read.
                if (conn.pgconn.transaction_status == IDLE and not conn._symfo_fatal  # type: ignore[attr-defined]
                        and not conn._symfo_poller.poll(0)):  # type: ignore[attr-defined]
                    return conn
                if not gone(conn):
                    return conn
            self._stats[self._CONNECTIONS_LOST] += 1
            self._replace(conn, "dead" if conn.closed else "old server")

    async def _return_connection(self, conn: ACT, from_getconn: bool) -> None:
        pgconn = conn.pgconn
        if pgconn.status == BAD:
            self._returned_dead(conn)
        elif getattr(conn, "_symfo_gen", -1) != self._gens.current:
            self._replace(conn, "old server")
            return
        elif pgconn.transaction_status != IDLE:
            # psycopg_pool rolls back what was left open: the session may die under it.
            await super()._return_connection(conn, from_getconn)
            if conn.closed:
                self._returned_dead(conn)
            return
        await super()._return_connection(conn, from_getconn)

    def _take_out_old(self, reason: str, previous: str | None, started: str | None,
                      *, noticed: bool = True) -> None:
        # On the event loop, without awaiting: nothing else touches the pool meanwhile.
        old = self._take_old_idle()
        if noticed:
            self._failover_event(reason, previous, started, len(old))
        for conn in old:
            self._replace(conn, "old server")

    # --- run(): the pool as the core's session source ------------------------------------

    async def _lend(self) -> ACT:
        conn = await self.getconn()
        guard_on(conn)  # commit() & co refused inside the unit (the core's are its own)
        if not conn.autocommit:
            await psycopg.AsyncConnection.set_autocommit(conn, True)
        return conn

    async def _discard(self, conn: ACT) -> None:
        self._give_up(conn)

    async def _give_back(self, conn: ACT) -> None:
        guard_off(conn)
        autocommit = conn._symfo_autocommit  # type: ignore[attr-defined]
        if not conn.closed and conn.autocommit != autocommit:
            await psycopg.AsyncConnection.set_autocommit(conn, autocommit)
        await self.putconn(conn)


class _PooledSource:
    __slots__ = ("_pool",)

    def __init__(self, pool: AsyncFailoverPool[Any]) -> None:
        self._pool = pool

    async def connect(self) -> Any:
        return await self._pool._lend()

    async def discard(self, raw: Any) -> None:
        await self._pool._discard(raw)


class _PooledRunner(AsyncResilientConnection[Any]):
    """The async runner for one ``run()`` of the pool: the pool is its session source,
    a connection's session facts and settings are the ones the pool read at connect."""

    def __init__(self, core: _core.Core, driver: AsyncPsycopgDriver,
                 *, pool: AsyncFailoverPool[Any]) -> None:
        super().__init__(core, driver, source=_PooledSource(pool))

    def _operations(self) -> list[Callable[..., Awaitable[Any]]]:
        ops = super()._operations()
        driver = self._driver
        ops[_core.OP_INFO] = _info
        ops[_core.OP_APPLY_STATE] = _nothing
        ops[_core.OP_CONFIGURE] = _nothing  # psycopg_pool's configure ran at connect
        ops[_core.OP_BEGIN] = lambda raw, state, *ledger: driver.begin(
            raw, raw._symfo_state, *ledger)
        ops[_core.OP_PROBE] = _no_answers
        return ops


async def _info(raw: Any) -> Any:
    return raw._symfo_info


async def _nothing(*args: Any) -> None:
    return None


async def _no_answers(target: Any) -> list[Any]:
    return []
