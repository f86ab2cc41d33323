"""`FailoverPool`: psycopg_pool's ``ConnectionPool`` that notices a failover once.

A subclass, not a second pool: psycopg_pool keeps doing everything it documents
(waiting clients, growing and shrinking, ``max_lifetime``, ``reset``, ``check``,
workers, stats). What is added goes through a few of its hooks:

- ``_connect``: each new connection reads its server's start time (one round trip,
  no transaction) and is tagged with its *generation* (`_pool_state.Generations`); a
  different start time, or a connect that finds no server, is a failover: the whole
  old generation is taken out at once;
- ``_get_ready_connection``: before an idle connection is handed out, a look at its
  socket without a round trip (`_driver_psycopg.gone`) finds the ones the server
  already closed; they are replaced and never seen by a request;
- ``getconn``, ``_return_connection``: nothing of an old generation is handed out
  again; dead connections are counted;
- ``_add_connection``: refills with the `RetryPolicy`'s short waits and jitter, one
  attempt at a time while the server is down (psycopg_pool's 1, 2, 4 ... s waits
  would leave the pool empty long after the server is back).

The bookkeeping behind the hooks is shared with the async pool (`_pool_common`).
``run()`` carries the unit-of-work core (`_core`) out on pooled connections: the pool
is the core's session source.
"""

from __future__ import annotations

from collections.abc import Callable
from time import monotonic
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar, cast

import psycopg
from psycopg.pq import ConnStatus, TransactionStatus
from psycopg_pool import ConnectionPool
from psycopg_pool.abc import CT
from psycopg_pool.pool import AddConnection

from . import _core
from . import _events as ev
from ._connection import drive, nothing, operations
from ._contract import refuse_coroutine_function
from ._driver_psycopg import PsycopgDriver, gone, guard_off, guard_on, pooled_session_info
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
    from psycopg_pool.abc import ConnectFailedCB, ConnectionCB, ConninfoParam, KwargsParam

_T = TypeVar("_T")
BAD = ConnStatus.BAD
IDLE = TransactionStatus.IDLE
_P = ParamSpec("_P")


class FailoverPool(FailoverBookkeeping, ConnectionPool[CT]):
    """psycopg_pool's ``ConnectionPool`` that notices a failover once and replaces
    every connection to the old server at once.

    Takes ``ConnectionPool``'s arguments with their meaning and defaults, plus
    ``policy`` (the `RetryPolicy` of ``run()`` and of the refill's waits) and
    ``on_event`` (receives every `Event`) and ``ledger`` (the commit ledger, as for
    `symfo_failover.connect`; ``require`` is checked by each read-write ``run()``).
    Connections are ``connection_class``'s, made
    with its own ``connect``; inside a ``run()`` unit (only) ``commit()``,
    ``rollback()``, ``close()`` and setting ``autocommit`` are refused on them.
    """

    _add_task = AddConnection

    def __init__(
        self,
        conninfo: ConninfoParam = "",
        *,
        connection_class: type[CT] = cast("type[CT]", psycopg.Connection),  # noqa: B008
        kwargs: KwargsParam | None = None,
        min_size: int = 4,
        max_size: int | None = None,
        open: bool | None = None,
        configure: ConnectionCB[CT] | None = None,
        check: ConnectionCB[CT] | None = None,
        reset: ConnectionCB[CT] | None = None,
        name: str | None = None,
        close_returns: bool = False,
        timeout: float = 30.0,
        max_waiting: int = 0,
        max_lifetime: float = 60 * 60.0,
        max_idle: float = 10 * 60.0,
        reconnect_timeout: float = 5 * 60.0,
        reconnect_failed: ConnectFailedCB | None = None,
        num_workers: int = 3,
        policy: RetryPolicy | None = None,
        on_event: ev.EventHook | None = None,
        ledger: LedgerMode = "auto",
    ) -> None:
        self._init_failover(policy, on_event, conninfo, kwargs, connection_class,
                            psycopg.Connection, ledger)
        self._driver = PsycopgDriver()
        self._ops = self._operations()
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

    def run(self, fn: Callable[Concatenate[CT, _P], _T], /,
            *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn(connection, *args, **kwargs)`` on a pooled connection, in one
        transaction, and commit it exactly once: the guarantees, the contract and the
        errors of `ResilientConnection.run`. On a lost session the unit goes on on
        another connection of the pool; a lost COMMIT is resolved with the server.

        The unit's transaction has the connection's own ``isolation_level`` and
        ``read_only`` (as ``configure`` set them). A pool that cannot give a connection
        within its ``timeout`` raises psycopg_pool's ``PoolTimeout``.
        """
        refuse_coroutine_function(fn)
        nested = nested_run(RUNNING.get())
        if nested is not None:
            raise nested
        core = self._unit_core(self._driver, self._lend())
        token = RUNNING.set(core)
        try:
            return drive(core.run((fn, args, kwargs)), self._ops)  # type: ignore[no-any-return]
        finally:
            RUNNING.reset(token)
            raw = core.link.raw
            if raw is not None:
                core.link.raw = None
                self._give_back(raw)

    # --- psycopg_pool's hooks ------------------------------------------------------------

    def _check_connection(self, conn: CT) -> None:
        # psycopg_pool's check before a connection is handed out (``check=``), first
        # the generation: one handed over as a failover was noticed is given back
        # (and replaced) and psycopg_pool hands out another one at once.
        if getattr(conn, "_symfo_gen", -1) != self._gens.current:
            raise OldGeneration("a connection to the server of before the failover")
        if self._check:
            super()._check_connection(conn)

    def _resolve_conninfo(self) -> str:
        return self._conninfo_resolved(super()._resolve_conninfo())

    def _resolve_kwargs(self) -> dict[str, Any]:
        return self._kwargs_with_detection(super()._resolve_kwargs())

    def _connect(self, timeout: float | None = None) -> CT:
        conn: CT | None = None
        begun = self._policy.clock()
        try:
            conn = super()._connect(timeout)
            info = pooled_session_info(conn)
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

    def _add_connection(self, attempt: Any, growing: bool = False) -> None:
        # psycopg_pool's, with the policy's waits, one probing attempt while the server
        # is down, and the refill measured.
        now = monotonic()
        attempt = self._attempt_for(attempt)
        if self._park(attempt, growing):
            return
        try:
            conn = self._connect()
        except Exception as exc:
            self._attempt_failed(attempt, exc)
            if attempt.time_to_give_up(now):
                with self._lock:
                    gave_up = self._giving_up(growing)
                for _ in range(gave_up):
                    self.reconnect_failed()
            else:
                attempt.update_delay(now, server_gone=self._gens.down)
                self.schedule_task(AddConnection(self, attempt, growing=growing), attempt.delay)
            return
        for each in self._attempt_worked(attempt):
            self.run_task(AddConnection(self, growing=each))
        self._add_to_pool(conn)
        self._added(conn)
        if growing:
            with self._lock:
                if self._nconns < self._min_size or (
                    self._nconns < self._max_size and self._waiting
                ):
                    self._nconns += 1
                    self.run_task(AddConnection(self, growing=True))
                else:
                    self._growing = False

    def _get_ready_connection(self, timeout: float | None) -> CT | None:
        # Under the pool's lock. The look costs no round trip (a poll of the socket).
        while True:
            conn = super()._get_ready_connection(timeout)
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

    def _return_connection(self, conn: CT, from_getconn: bool) -> None:
        pgconn = conn.pgconn
        if pgconn.status == BAD:
            self._returned_dead(conn)
        elif getattr(conn, "_symfo_gen", -1) != self._gens.current:
            self._replace(conn, "old server")
            return
        elif pgconn.transaction_status != IDLE:
            # psycopg_pool rolls back what was left open: the session may die under it.
            super()._return_connection(conn, from_getconn)
            if conn.closed:
                self._returned_dead(conn)
            return
        super()._return_connection(conn, from_getconn)

    def _take_out_old(self, reason: str, previous: str | None, started: str | None,
                      *, noticed: bool = True) -> None:
        """Close every idle connection of an earlier generation at once; the ones in
        use are replaced as they come back (`_return_connection`)."""
        with self._lock:
            old = self._take_old_idle()
        if noticed:
            self._failover_event(reason, previous, started, len(old))
        for conn in old:
            self._replace(conn, "old server")

    # --- run(): the pool as the core's session source ------------------------------------

    def _operations(self) -> list[Callable[..., Any]]:
        driver = self._driver
        return operations(driver, connect=self._lend, discard=self._discard,
                          sleep=self._policy.sleep, instead={
                              # What the pool read when it made the connection; its
                              # settings are configure's (psycopg_pool ran it then).
                              _core.OP_INFO: lambda raw: raw._symfo_info,
                              _core.OP_APPLY_STATE: nothing,
                              _core.OP_BEGIN: lambda raw, state, *ledger: driver.begin(
                                  raw, raw._symfo_state, *ledger),
                          })

    def _lend(self) -> CT:
        conn = self.getconn()
        guard_on(conn)  # commit() & co refused inside the unit (the core's are its own)
        if not conn.autocommit:
            # The unit's BEGIN and COMMIT are the core's (local: the connection is idle).
            psycopg.Connection.set_autocommit(conn, True)
        return conn

    def _discard(self, conn: CT) -> None:
        """The core gives a session up: replaced (`FailoverBookkeeping._give_up`)."""
        self._give_up(conn)

    def _give_back(self, conn: CT) -> None:
        guard_off(conn)
        autocommit = conn._symfo_autocommit  # type: ignore[attr-defined]
        if not conn.closed and conn.autocommit != autocommit:
            psycopg.Connection.set_autocommit(conn, autocommit)
        self.putconn(conn)
