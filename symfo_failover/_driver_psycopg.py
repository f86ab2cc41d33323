"""The psycopg 3 adapter: SQLSTATEs, broken sessions, and the session interface.

Imported only when psycopg is installed; `classify` loads it lazily.
"""

from __future__ import annotations

import functools
import getpass
import os
import select
import types
import weakref
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import psycopg
from psycopg import IsolationLevel, generators
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.pq import ConnStatus, DiagnosticField, ExecStatus, TransactionStatus

from . import _sqlstates as table
from . import _target as _t
from ._contract import UnitGuard
from ._ledger import How, claim_sql, prune_sql

if TYPE_CHECKING:
    from psycopg.pq.abc import PGresult


def owns(error: object) -> bool:
    return isinstance(error, psycopg.Error)


def owns_connection(connection: object) -> bool:
    return isinstance(connection, (psycopg.Connection, psycopg.AsyncConnection))


def sqlstate_of(error: object) -> str | None:
    code = getattr(error, "sqlstate", None)
    return code if isinstance(code, str) and code else None


def is_broken(connection: Any) -> bool:
    """True when the session can no longer be used. Looks at local state only."""
    if connection is None:
        return False
    if getattr(connection, "closed", False) or getattr(connection, "broken", False):
        return True
    pgconn = getattr(connection, "pgconn", None)
    return pgconn is not None and pgconn.status == ConnStatus.BAD


def backend_pid(connection: Any) -> int | None:
    if is_broken(connection):
        return None
    pid = connection.info.backend_pid
    return int(pid) if pid else None


def rule_without_sqlstate(error: object, connection: Any) -> table.Rule:
    """Decide from the exception's type and the session's state, never its text.

    libpq reports a lost connection as a FATAL error with no SQLSTATE (the
    guide's libpq row "57P01 or NULL"); a failed connect carries the finished
    `PGconn`, with the flags that say whether the server asked for a password.
    """
    if isinstance(error, pg_errors.ConnectionTimeout):
        return table.NO_SQLSTATE_CONNECT
    if error is not None and not isinstance(error, psycopg.OperationalError):
        return table.NO_SQLSTATE_OTHER
    if isinstance(error, (pg_errors.PipelineAborted, pg_errors.CancellationTimeout)):
        return table.NO_SQLSTATE_OTHER

    pgconn = getattr(error, "pgconn", None)
    if pgconn is not None and pgconn.status == ConnStatus.BAD:
        # Raised by connect(): the session was never established.
        if pgconn.needs_password or pgconn.used_password:
            return table.NO_SQLSTATE_AUTH
        return table.NO_SQLSTATE_CONNECT

    # psycopg raises a plain OperationalError without a SQLSTATE for a dead
    # connection ("consuming input failed", "the connection is closed", "connection
    # socket closed"): the guide's libpq NULL row. It can do so before it marks the
    # session broken (seen: the socket already closed, the session still ACTIVE), so
    # the session's state may only add to this, never overrule it.
    if type(error) is psycopg.OperationalError:
        return table.NO_SQLSTATE_LOST
    if connection is not None and is_broken(connection):
        return table.NO_SQLSTATE_LOST
    return table.NO_SQLSTATE_OTHER


# --- the session interface the resilient connection uses (`_target.Driver`) --------------

#: psycopg.connect() keywords that are not connection parameters.
_CONNECT_KEYWORDS = ("prepare_threshold", "context", "row_factory", "cursor_factory")

_DETECTION = {
    "keepalives": "1",
    "keepalives_idle": str(_t.KEEPALIVE_IDLE),
    "keepalives_interval": str(_t.KEEPALIVE_INTERVAL),
    "keepalives_count": str(_t.KEEPALIVE_COUNT),
    "tcp_user_timeout": str(_t.TCP_USER_TIMEOUT_MS),
    "connect_timeout": str(_t.CONNECT_TIMEOUT),
}


class _SyncGuard:
    """A psycopg connection that refuses, while a unit of work runs on it, every call
    that would end the unit's transaction (the way psycopg itself refuses ``commit()``
    inside ``Connection.transaction()``). Outside a unit it is a plain connection.

    The library calls ``psycopg.Connection``'s own methods for its BEGIN and COMMIT.
    A pool's connections (of the application's ``connection_class``) get the same
    refusals for the time of a unit from `guard_on`.
    """

    _symfo_guard: UnitGuard | None = None
    _symfo_cursor_factory: type[psycopg.Cursor[Any]]

    def commit(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "commit() was called")
        super().commit()  # type: ignore[misc]

    def rollback(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "rollback() was called")
        super().rollback()  # type: ignore[misc]

    def close(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("closed-connection", "close() was called")
        super().close()  # type: ignore[misc]

    def set_autocommit(self, value: bool) -> None:
        # The ``autocommit`` property's setter comes here too.
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "autocommit was set")
        super().set_autocommit(value)  # type: ignore[misc]

    def tpc_begin(self, xid: Any) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "tpc_begin() was called")
        super().tpc_begin(xid)  # type: ignore[misc]

    def tpc_prepare(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "tpc_prepare() was called")
        super().tpc_prepare()  # type: ignore[misc]


class GuardedConnection(_SyncGuard, psycopg.Connection[Any]):  # any row factory
    """`_SyncGuard` over psycopg's own ``Connection``: the resilient connection's."""


#: What `_SyncGuard` refuses inside a unit: method -> (rule, what was done).
_REFUSED = {
    "commit": ("ended-transaction", "commit() was called"),
    "rollback": ("ended-transaction", "rollback() was called"),
    "close": ("closed-connection", "close() was called"),
    "set_autocommit": ("ended-transaction", "autocommit was set"),  # the property too
    "tpc_begin": ("ended-transaction", "tpc_begin() was called"),
    "tpc_prepare": ("ended-transaction", "tpc_prepare() was called"),
}


def _refusing(name: str, rule: str, what: str, is_async: bool) -> Any:
    """A stand-in for the method ``name`` that refuses while a unit's guard is on."""
    if is_async:
        async def refusing_async(self: Any, *args: Any) -> Any:
            guard = self._symfo_guard
            if guard is not None:
                raise guard.refuse(rule, what)
            return await getattr(type(self), name)(self, *args)

        return refusing_async

    def refusing(self: Any, *args: Any) -> Any:
        guard = self._symfo_guard
        if guard is not None:
            raise guard.refuse(rule, what)
        return getattr(type(self), name)(self, *args)

    return refusing


_SYNC_REFUSING = {n: _refusing(n, r, w, False) for n, (r, w) in _REFUSED.items()}
_ASYNC_REFUSING = {n: _refusing(n, r, w, True) for n, (r, w) in _REFUSED.items()}


def guard_on(raw: psycopg.BaseConnection[Any]) -> None:
    """Give a pooled connection (any ``connection_class``) `_SyncGuard`'s refusals for
    the time of a unit: instance attributes, which psycopg's own calls (``with conn:``,
    the ``autocommit`` property) look up before the class's methods. Outside units
    the connection is the application's class, untouched (`guard_off`)."""
    table = _ASYNC_REFUSING if isinstance(raw, psycopg.AsyncConnection) else _SYNC_REFUSING
    attrs = raw.__dict__
    for name, fn in table.items():
        attrs[name] = types.MethodType(fn, raw)


def guard_off(raw: psycopg.BaseConnection[Any]) -> None:
    attrs = raw.__dict__
    for name in _REFUSED:
        attrs.pop(name, None)


class _StatementGuard:
    """Mixed into the unit's cursor class while a unit runs: statements that end the
    transaction are refused before they are sent."""

    connection: Any

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _check(self.connection, query)
        return super().execute(query, params, **kwargs)  # type: ignore[misc]

    def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> Any:
        _check(self.connection, query)
        return super().executemany(query, params_seq, **kwargs)  # type: ignore[misc]


def _check(conn: Any, query: Any) -> None:
    guard = getattr(conn, "_symfo_guard", None)
    if guard is not None:
        if not isinstance(query, (str, bytes)) and hasattr(query, "as_string"):
            query = query.as_string(conn)  # psycopg.sql composition
        guard.check_statement(query)


@functools.lru_cache(maxsize=16)
def _guarded_cursor(cls: type[Any]) -> type[Any]:
    if issubclass(cls, _StatementGuard):
        return cls
    return type(f"Guarded{cls.__name__}", (_StatementGuard, cls), {})


#: The transaction's state by libpq's status (plain ints: compared per unit).
_TRANSACTION_STATES = {
    int(TransactionStatus.INTRANS): "open",
    int(TransactionStatus.INERROR): "failed",
    int(TransactionStatus.IDLE): "ended",
}
_BAD = int(ConnStatus.BAD)
_IDLE = int(TransactionStatus.IDLE)


# --- psycopg's AsyncConnection, guarded the same way ----------------------------------
# The local facts (broken, transaction state, what a unit left, lending) are the sync
# adapter's: they read attributes, not the network. What talks to the server is async.


class _AsyncGuard:
    """`_SyncGuard` for ``psycopg.AsyncConnection``."""

    _symfo_guard: UnitGuard | None = None
    _symfo_cursor_factory: type[psycopg.AsyncCursor[Any]]

    async def commit(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "commit() was called")
        await super().commit()  # type: ignore[misc]

    async def rollback(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "rollback() was called")
        await super().rollback()  # type: ignore[misc]

    async def close(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("closed-connection", "close() was called")
        await super().close()  # type: ignore[misc]

    async def set_autocommit(self, value: bool) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "autocommit was set")
        await super().set_autocommit(value)  # type: ignore[misc]

    async def tpc_begin(self, xid: Any) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "tpc_begin() was called")
        await super().tpc_begin(xid)  # type: ignore[misc]

    async def tpc_prepare(self) -> None:
        if self._symfo_guard is not None:
            raise self._symfo_guard.refuse("ended-transaction", "tpc_prepare() was called")
        await super().tpc_prepare()  # type: ignore[misc]


class GuardedAsyncConnection(_AsyncGuard, psycopg.AsyncConnection[Any]):
    """`_AsyncGuard` over psycopg's own ``AsyncConnection``."""


class _AsyncStatementGuard:
    """`_StatementGuard` for async cursors."""

    connection: Any

    async def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        _check(self.connection, query)
        return await super().execute(query, params, **kwargs)  # type: ignore[misc]

    async def executemany(self, query: Any, params_seq: Iterable[Any], **kwargs: Any) -> Any:
        _check(self.connection, query)
        return await super().executemany(query, params_seq, **kwargs)  # type: ignore[misc]


@functools.lru_cache(maxsize=16)
def _guarded_async_cursor(cls: type[Any]) -> type[Any]:
    if issubclass(cls, _AsyncStatementGuard):
        return cls
    return type(f"Guarded{cls.__name__}", (_AsyncStatementGuard, cls), {})



# --- the look at an idle session's socket (no round trip) ----------------------------

_POLLIN = select.POLLIN | select.POLLERR | select.POLLHUP


def gone(raw: psycopg.BaseConnection[Any]) -> bool:
    """Whether an idle connection is already dead, without a round trip.

    After a switchover or a shutdown the server sends a FATAL and closes the socket; a
    crashed or killed server's kernel closes it. Either way the socket is readable:
    libpq reads what is waiting (a FATAL while idle is a notice to libpq), and reading
    the end of the stream marks the connection bad. A socket with nothing to read is
    taken as alive: a partition shows only on use (keepalives, ``tcp_user_timeout``).
    """
    pgconn = raw.pgconn
    if pgconn.transaction_status != _IDLE:
        # BAD, or in a transaction (or a query): not to be swapped for another
        return pgconn.status == _BAD
    if getattr(raw, "_symfo_fatal", False):
        return True  # the server said goodbye; the end of the stream may follow later
    poller = getattr(raw, "_symfo_poller", None)
    if poller is None:  # a connection not made by the library
        try:
            watch_goodbye(raw)
        except psycopg.OperationalError:
            return True  # no socket
        poller = raw._symfo_poller  # type: ignore[attr-defined]
    for _ in range(3):  # the message, then the end of the stream
        if not poller.poll(0):
            return False
        try:
            pgconn.consume_input()
        except psycopg.OperationalError:
            return True
        if pgconn.status == _BAD or getattr(raw, "_symfo_fatal", False):
            return True
    return False


def watch_goodbye(raw: psycopg.BaseConnection[Any]) -> None:
    """Make a new connection ready for `gone`: its socket's poller (one for the
    connection's life), and a note on ``raw`` when the server sends a FATAL while the
    session is idle (libpq gives it as a notice: a shutdown, ``pg_terminate_backend``,
    ``idle_session_timeout``), so that `gone` knows before the end of the stream
    arrives."""
    poller = select.poll()
    poller.register(raw.pgconn.socket, _POLLIN)
    raw._symfo_poller = poller  # type: ignore[attr-defined]
    raw._symfo_fatal = False  # type: ignore[attr-defined]
    ref = weakref.ref(raw)

    def on_notice(diag: psycopg.errors.Diagnostic) -> None:
        if diag.severity_nonlocalized in ("FATAL", "PANIC"):
            conn = ref()
            if conn is not None:
                conn._symfo_fatal = True  # type: ignore[attr-defined]

    raw.add_notice_handler(on_notice)


#: A psycopg session of either kind: what the local facts read.
_Session = TypeVar("_Session", "GuardedConnection", "GuardedAsyncConnection")


class _PsycopgFacts(Generic[_Session]):
    """What both psycopg adapters read locally: parsing the target, and the facts of
    a session (libpq's own state, no round trip)."""

    name = "psycopg"
    operational_error: type[BaseException] = psycopg.OperationalError
    programming_error: type[BaseException] = psycopg.ProgrammingError
    error: type[BaseException] = psycopg.Error
    def _guarded(self, factory: type[Any]) -> type[Any]:
        """The cursor class a unit's statements go through (checked for COMMIT & co)."""
        raise NotImplementedError

    def target(self, conninfo: str, kwargs: Mapping[str, Any]) -> _t.Target:
        options = dict(kwargs)
        extra = {k: options.pop(k) for k in _CONNECT_KEYWORDS if k in options}
        # Raises psycopg.ProgrammingError for bad syntax or an unknown parameter.
        params = conninfo_to_dict(conninfo, **options)
        for key, value in _DETECTION.items():
            params.setdefault(key, value)
        endpoints = _endpoints(params)
        user = str(params.get("user") or os.environ.get("PGUSER") or getpass.getuser())
        database = str(params.get("dbname") or os.environ.get("PGDATABASE") or user)
        shown = " ".join(f"{k}={params[k]}" for k in ("host", "port", "dbname", "user")
                         if params.get(k) not in (None, ""))
        return _t.Target(
            connect_args={"conninfo": make_conninfo("", **params), **extra},
            endpoints=endpoints,
            user=user,
            database=database,
            description=f"psycopg {shown}".strip(),
            password=str(params.get("password") or os.environ.get("PGPASSWORD") or "") or None,
            sslmode=str(params.get("sslmode") or os.environ.get("PGSSLMODE") or "") or None,
        )

    def in_transaction(self, raw: _Session) -> bool:
        return bool(raw.pgconn.transaction_status != TransactionStatus.IDLE)

    def get_autocommit(self, raw: _Session) -> bool:
        return bool(raw.autocommit)

    def lend(self, raw: _Session, guard: UnitGuard) -> _Session:
        raw._symfo_guard = guard
        factory = raw.cursor_factory
        raw._symfo_cursor_factory = factory
        raw.cursor_factory = self._guarded(factory)
        return raw

    def reclaim(self, raw: _Session, guard: UnitGuard) -> None:
        raw._symfo_guard = None
        raw.cursor_factory = raw._symfo_cursor_factory

    def unit_left(self, raw: _Session) -> str | None:
        pgconn = raw.pgconn
        if pgconn.status == _BAD:
            return "lost" if raw.broken else "closed"
        return _TRANSACTION_STATES.get(pgconn.transaction_status)

    def last_error_text(self, raw: _Session) -> str:
        return bytes(raw.pgconn.error_message or b"").decode(errors="replace")

    def sqlstate(self, error: BaseException) -> str | None:
        return sqlstate_of(error)

    def is_broken(self, raw: _Session) -> bool:
        # psycopg: a broken connection is always closed (its PGconn is BAD).
        return bool(raw.closed)

    #: The function itself: the passthrough asks it before every statement.
    gone = staticmethod(gone)

    def closed_error(self) -> BaseException:
        return psycopg.OperationalError("the connection is closed")

    def bad_input(self, message: str) -> BaseException:
        return psycopg.ProgrammingError(message)


class PsycopgDriver(_PsycopgFacts["GuardedConnection"], _t.DriverBase["GuardedConnection"]):
    def _guarded(self, factory: type[Any]) -> type[Any]:
        return _guarded_cursor(factory)  # type: ignore[arg-type]  # a class is hashable

    def connect(self, target: _t.Target) -> GuardedConnection:
        raw = GuardedConnection.connect(**target.connect_args, autocommit=True)
        watch_goodbye(raw)
        return raw

    def apply_state(self, raw: GuardedConnection, state: _t.SessionState) -> None:
        raw.autocommit = state.autocommit
        raw.isolation_level = _isolation(state)
        raw.read_only = state.read_only

    def set_autocommit(self, raw: GuardedConnection, value: bool) -> None:
        raw.autocommit = value

    def begin(self, raw: GuardedConnection, state: _t.SessionState,
              token: str | None = None, how: How = "literal") -> str | None:
        # Straight through libpq: psycopg's cursor machinery costs more than the
        # round trip on a fast network (DESIGN §5). PQexec returns the last result.
        want_xid = token is None and not state.read_only
        result = raw.pgconn.exec_(_t.begin_sql_bytes(state, want_xid, token, how))
        return _begun(raw, result, want_xid)

    def claim(self, raw: GuardedConnection, token: str, lock_timeout_ms: int) -> None:
        pgconn = raw.pgconn
        result = pgconn.exec_(claim_sql(token, lock_timeout_ms).encode())
        error = _error(raw, result) if result.status != ExecStatus.COMMAND_OK else None
        if pgconn.status != _BAD:
            rolled = pgconn.exec_(b"ROLLBACK")
            if error is None and rolled.status != ExecStatus.COMMAND_OK:
                error = _error(raw, rolled)
        if error is not None:
            raise error

    def commit(self, raw: GuardedConnection) -> None:
        # Straight through libpq like BEGIN (the unit's transaction is the core's: the
        # connection is in autocommit mode): psycopg's commit() waits for the reply in
        # its Python loop, which costs about 5 % of a unit on a fast network (measured:
        # benchmarks/bench_ledger.py). A session without a transaction (a unit on a
        # connection in a state the core does not know) gets psycopg's own path.
        pgconn = raw.pgconn
        if pgconn.transaction_status == TransactionStatus.IDLE:
            psycopg.Connection.commit(raw)
            return
        result = pgconn.exec_(b"COMMIT")
        if result.status != ExecStatus.COMMAND_OK:
            raise _error(raw, result)

    def rollback(self, raw: GuardedConnection) -> None:
        psycopg.Connection.rollback(raw)

    def close(self, raw: GuardedConnection) -> None:
        psycopg.Connection.close(raw)

    def query_one(self, raw: GuardedConnection, sql: str, *params: object) -> _t.Row | None:
        row = raw.execute(sql, params or None).fetchone()
        return None if row is None else tuple(row)

    def execute(self, raw: GuardedConnection, query: _t.Query, params: _t.Params,
                kwargs: Mapping[str, Any]) -> psycopg.Cursor[Any]:
        return raw.execute(query, params, **kwargs)


class AsyncPsycopgDriver(_PsycopgFacts["GuardedAsyncConnection"]):
    """The psycopg adapter for ``AsyncConnection``: the same facts, async I/O."""

    def _guarded(self, factory: type[Any]) -> type[Any]:
        return _guarded_async_cursor(factory)  # type: ignore[arg-type]

    async def connect(self, target: _t.Target) -> GuardedAsyncConnection:
        raw = await GuardedAsyncConnection.connect(**target.connect_args, autocommit=True)
        watch_goodbye(raw)
        return raw

    async def close(self, raw: GuardedAsyncConnection) -> None:
        await psycopg.AsyncConnection.close(raw)

    async def query_one(
        self, raw: GuardedAsyncConnection, sql: str, *params: object
    ) -> _t.Row | None:
        cur = await raw.execute(sql, params or None)
        row = await cur.fetchone()
        return None if row is None else tuple(row)

    async def session_info(self, raw: GuardedAsyncConnection) -> _t.SessionInfo:
        return _t.session_info_of(await self.query_one(raw, _t.SESSION_INFO_SQL))

    async def xact_status(self, raw: GuardedAsyncConnection, xid: str) -> str | None:
        try:
            row = await self.query_one(raw, _t.XACT_STATUS_SQL, xid)
        except psycopg.Error as exc:
            if sqlstate_of(exc) == _t.XID_IN_FUTURE and not self.is_broken(raw):
                return "future"
            raise
        return _t.xact_status_of(row)

    async def end_session(self, raw: GuardedAsyncConnection, old: _t.SessionInfo) -> bool:
        row = await self.query_one(raw, _t.END_SESSION_SQL, old.backend_pid, old.backend_start)
        return bool(row and row[0])

    async def apply_state(self, raw: GuardedAsyncConnection, state: _t.SessionState) -> None:
        await psycopg.AsyncConnection.set_autocommit(raw, state.autocommit)
        await raw.set_isolation_level(_isolation(state))
        await raw.set_read_only(state.read_only)

    async def set_autocommit(self, raw: GuardedAsyncConnection, value: bool) -> None:
        await psycopg.AsyncConnection.set_autocommit(raw, value)

    async def begin(self, raw: GuardedAsyncConnection, state: _t.SessionState,
                    token: str | None = None, how: How = "literal") -> str | None:
        # As the sync adapter: one simple-protocol round trip past the cursor machinery,
        # under the connection's lock as psycopg's own commands are.
        want_xid = token is None and not state.read_only
        results = await self._simple(raw, _t.begin_sql_bytes(state, want_xid, token, how))
        for each in results[:-1]:
            if each.status not in (ExecStatus.COMMAND_OK, ExecStatus.TUPLES_OK):
                raise _error(raw, each)
        return _begun(raw, results[-1], want_xid)

    async def _simple(self, raw: GuardedAsyncConnection, sql: bytes) -> list[PGresult]:
        pgconn = raw.pgconn
        async with raw.lock:
            pgconn.send_query(sql)
            return await raw.wait(generators.execute(pgconn))

    async def claim(self, raw: GuardedAsyncConnection, token: str, lock_timeout_ms: int) -> None:
        results = await self._simple(raw, claim_sql(token, lock_timeout_ms).encode())
        failed = [r for r in results if r.status != ExecStatus.COMMAND_OK]
        error = _error(raw, failed[0]) if failed else None
        if raw.pgconn.status != _BAD:
            rolled = await self._simple(raw, b"ROLLBACK")
            if error is None and rolled[-1].status != ExecStatus.COMMAND_OK:
                error = _error(raw, rolled[-1])
        if error is not None:
            raise error

    async def prune(self, raw: GuardedAsyncConnection, retention: float, batch: int) -> int:
        row = await self.query_one(raw, prune_sql(retention, batch))
        return int(str(row[0])) if row else 0

    async def commit(self, raw: GuardedAsyncConnection) -> None:
        await psycopg.AsyncConnection.commit(raw)

    async def rollback(self, raw: GuardedAsyncConnection) -> None:
        await psycopg.AsyncConnection.rollback(raw)

    async def execute(self, raw: GuardedAsyncConnection, query: _t.Query,
                      params: _t.Params, kwargs: Mapping[str, Any]) -> psycopg.AsyncCursor[Any]:
        return await raw.execute(query, params, **kwargs)


def _isolation(state: _t.SessionState) -> IsolationLevel | None:
    level = state.isolation_level
    return IsolationLevel[level.upper().replace(" ", "_")] if level else None


def _begun(raw: psycopg.BaseConnection[Any], result: PGresult, want_xid: bool) -> str | None:
    """The transaction id from BEGIN's last result, or the error psycopg would raise."""
    expected = ExecStatus.TUPLES_OK if want_xid else ExecStatus.COMMAND_OK
    if result.status != expected:
        raise _error(raw, result)
    if not want_xid:
        return None
    value = result.get_value(0, 0)
    assert value is not None
    return value.decode()


def _error(raw: psycopg.BaseConnection[Any], result: PGresult) -> psycopg.Error:
    """The exception psycopg itself would raise for a failed ``result``."""
    if result.error_field(DiagnosticField.SQLSTATE):
        return pg_errors.error_from_result(result, encoding=raw.info.encoding)
    # No SQLSTATE: libpq lost the connection (the guide's libpq NULL row).
    text = (result.error_message or raw.pgconn.error_message or b"").decode(errors="replace")
    return psycopg.OperationalError(text.strip() or "the connection was lost")


def _endpoints(params: Mapping[str, Any]) -> tuple[_t.Endpoint, ...]:
    hosts = str(params.get("host") or os.environ.get("PGHOST") or "").split(",")
    addrs = str(params.get("hostaddr") or "").split(",")
    ports = str(params.get("port") or os.environ.get("PGPORT") or "5432").split(",")
    if len(ports) == 1:
        ports = ports * max(len(hosts), len(addrs))
    result = []
    for i, port_text in enumerate(ports):
        try:
            port = int(port_text.strip() or "5432")
        except ValueError:
            raise psycopg.ProgrammingError(
                f"invalid port in the connection string: {port_text!r}"
            ) from None
        if not 0 < port < 65536:
            raise psycopg.ProgrammingError(f"invalid port in the connection string: {port}")
        addr = addrs[i] if i < len(addrs) else ""
        host = addr or (hosts[i] if i < len(hosts) else "")
        if host:  # without a host libpq picks its own socket directory: not probed
            result.append(_t.Endpoint(host.strip(), port))
    return tuple(result)




# --- what a failover pool reads of its connections --------------------------------------

_SESSION_INFO_BYTES = _t.SESSION_INFO_SQL.encode()


def pooled_session_info(raw: psycopg.Connection[Any]) -> _t.SessionInfo:
    """`SessionInfo` of a new pooled connection, in one round trip straight through
    libpq: psycopg opens no transaction for it, whatever ``autocommit`` says."""
    result = raw.pgconn.exec_(_SESSION_INFO_BYTES)
    if result.status != ExecStatus.TUPLES_OK:
        raise _error(raw, result)
    return _info_from_result(result)


async def apooled_session_info(raw: psycopg.AsyncConnection[Any]) -> _t.SessionInfo:
    """`pooled_session_info` for ``AsyncConnection``."""
    pgconn = raw.pgconn
    async with raw.lock:
        pgconn.send_query(_SESSION_INFO_BYTES)
        results = await raw.wait(generators.execute(pgconn))
    result = results[-1]
    if result.status != ExecStatus.TUPLES_OK:
        raise _error(raw, result)
    return _info_from_result(result)


def _info_from_result(result: PGresult) -> _t.SessionInfo:
    values = [result.get_value(0, i) for i in range(5)]
    return _t.session_info_of(tuple(None if v is None else v.decode() for v in values))


def unit_state(raw: psycopg.BaseConnection[Any]) -> _t.SessionState:
    """The transaction settings a pooled connection has (psycopg's ``isolation_level``
    and ``read_only``, as ``configure`` left them): what a unit's BEGIN asks for."""
    return _t.SessionState(
        autocommit=False,
        isolation_level=_t.normalise_isolation(raw.isolation_level),
        read_only=raw.read_only,
    )
