"""What a driver adapter gives the resilient connection: the target and the session.

`Target` is a parsed, validated connection request: how to connect, where the server
is (for the probe), and a description safe to log. `Driver` is the interface each
adapter implements; the connection never touches a driver directly.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

from ._ledger import ACCESS_SQL, How, LedgerState, ledger_sql, prune_sql

if TYPE_CHECKING:
    from ._contract import UnitGuard

#: Detection defaults (DESIGN §5: a partitioned session is declared lost within 15 s).
#: An idle session whose server vanished: keepalive probes after 5 s idle, every 2 s,
#: 3 unanswered = lost after about 11 s. A session with unacknowledged data (a query
#: sent into the partition): ``tcp_user_timeout`` ends it after 10 s. A connect attempt
#: to an unreachable address gives up after 5 s.
KEEPALIVE_IDLE = 5
KEEPALIVE_INTERVAL = 2
KEEPALIVE_COUNT = 3
TCP_USER_TIMEOUT_MS = 10_000
CONNECT_TIMEOUT = 5

#: Isolation levels by their SQL names.
ISOLATION_LEVELS = ("read uncommitted", "read committed", "repeatable read", "serializable")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int


@dataclass(frozen=True)
class Target:
    """A validated connection request."""

    #: What the adapter's ``connect`` needs (driver-specific).
    connect_args: Mapping[str, Any]
    #: Where the servers are, for the startup probe (empty: not known, e.g. an ODBC DSN).
    endpoints: tuple[Endpoint, ...]
    user: str
    database: str
    #: Safe to log: no password, no full connection string.
    description: str
    #: For the startup probe, which authenticates only where libpq would send the
    #: password as well (`symfo_failover._probe`). Never shown.
    password: str | None = field(default=None, repr=False)
    sslmode: str | None = None


@dataclass(frozen=True)
class SessionInfo:
    """Facts about a session, read once when it is made."""

    backend_pid: int
    #: ``pg_postmaster_start_time()``: changes when the server restarts or the other
    #: node takes over.
    server_started: str
    #: The session's own ``backend_start``: with the pid it names this session, so that
    #: a later session never terminates a stranger that reused the pid.
    backend_start: str
    #: What the session's role may do with the commit ledger (`_ledger.LedgerState`,
    #: mutable: it also keeps the session's pruning schedule). None: not read.
    ledger: LedgerState | None = field(default=None, compare=False, repr=False)
    #: ``pg_is_in_recovery()``: a standby, which takes no read-write unit.
    in_recovery: bool = False


@dataclass
class SessionState:
    """The settings the connection keeps across sessions."""

    autocommit: bool = False
    isolation_level: str | None = None
    read_only: bool | None = None
    extra: dict[str, Any] = field(default_factory=dict)


#: The driver's session type (``GuardedConnection``, ``pyodbc.Connection``, ...).
R = TypeVar("R")
R_contra = TypeVar("R_contra", contravariant=True)
#: A statement as the application gives it (a string, psycopg's ``sql.Composed``, ...)
#: and its parameters: passed to the driver untouched.
Query = Any
Params = Any


class Facts(Protocol[R_contra]):
    """What the core reads of a driver: its errors and the local facts of a session.

    Every method here reads the driver's own state, never the network, so the sync and
    the async runner share them. The I/O is in `Driver` and `AsyncDriver`.
    """

    name: str
    #: The driver's OperationalError, the second base of the library's failover errors.
    operational_error: type[BaseException]
    #: The driver's ProgrammingError, the second base of `UnitContractError`.
    programming_error: type[BaseException]
    #: The driver's exception base class.
    error: type[BaseException]

    def target(self, conninfo: str, kwargs: Mapping[str, Any]) -> Target: ...
    def in_transaction(self, raw: R_contra) -> bool | None: ...
    #: What the unit is given (``raw`` itself, or a stand-in), guarded while it runs.
    def lend(self, raw: R_contra, guard: UnitGuard) -> object: ...
    def reclaim(self, raw: R_contra, guard: UnitGuard) -> None: ...
    #: What a unit left, in one local look: ``closed`` (by the application), ``lost``,
    #: or the transaction's state: ``open``, ``failed`` (an error failed it), ``ended``;
    #: None where the driver cannot tell without a round trip.
    def unit_left(self, raw: R_contra) -> str | None: ...
    #: The driver's text of the last error on the session, if it keeps one.
    def last_error_text(self, raw: R_contra) -> str: ...
    def get_autocommit(self, raw: R_contra) -> bool: ...
    def is_broken(self, raw: R_contra) -> bool: ...
    #: An idle session (no transaction open) the server has already closed, seen
    #: without a round trip; False where the driver cannot look (ODBC).
    def gone(self, raw: R_contra) -> bool: ...
    def closed_error(self) -> BaseException: ...
    def bad_input(self, message: str) -> BaseException: ...


class Driver(Facts[R], Protocol[R]):
    """A blocking adapter: the facts, and the I/O as plain calls."""

    def connect(self, target: Target) -> R: ...
    def session_info(self, raw: R) -> SessionInfo: ...
    def apply_state(self, raw: R, state: SessionState) -> None: ...
    def begin(self, raw: R, state: SessionState, token: str | None = None,
              how: How = "literal") -> str | None: ...
    def claim(self, raw: R, token: str, lock_timeout_ms: int) -> None: ...
    def prune(self, raw: R, retention: float, batch: int) -> int: ...
    def commit(self, raw: R) -> None: ...
    def rollback(self, raw: R) -> None: ...
    def set_autocommit(self, raw: R, value: bool) -> None: ...
    def xact_status(self, raw: R, xid: str) -> str | None: ...
    def end_session(self, raw: R, old: SessionInfo) -> bool: ...
    def close(self, raw: R) -> None: ...
    def execute(self, raw: R, query: Query, params: Params,
                kwargs: Mapping[str, Any]) -> object: ...


class AsyncDriver(Facts[R], Protocol[R]):
    """An asyncio adapter: the same facts, the I/O as coroutines."""

    async def connect(self, target: Target) -> R: ...
    async def session_info(self, raw: R) -> SessionInfo: ...
    async def apply_state(self, raw: R, state: SessionState) -> None: ...
    async def begin(self, raw: R, state: SessionState,
                    token: str | None = None, how: How = "literal") -> str | None: ...
    async def claim(self, raw: R, token: str, lock_timeout_ms: int) -> None: ...
    async def prune(self, raw: R, retention: float, batch: int) -> int: ...
    async def commit(self, raw: R) -> None: ...
    async def rollback(self, raw: R) -> None: ...
    async def set_autocommit(self, raw: R, value: bool) -> None: ...
    async def xact_status(self, raw: R, xid: str) -> str | None: ...
    async def end_session(self, raw: R, old: SessionInfo) -> bool: ...
    async def close(self, raw: R) -> None: ...
    async def execute(self, raw: R, query: Query, params: Params,
                      kwargs: Mapping[str, Any]) -> object: ...


#: One row, as the adapters' `query_one` gives it.
Row = tuple[object, ...]


class DriverBase(Generic[R]):
    """What both blocking adapters do alike, over `query_one` (``%s`` placeholders)."""

    error: type[BaseException]

    def query_one(self, raw: R, sql: str, *params: object) -> Row | None:
        raise NotImplementedError

    def sqlstate(self, error: BaseException) -> str | None:
        raise NotImplementedError

    def is_broken(self, raw: R) -> bool:
        raise NotImplementedError

    def session_info(self, raw: R) -> SessionInfo:
        return session_info_of(self.query_one(raw, SESSION_INFO_SQL))

    def xact_status(self, raw: R, xid: str) -> str | None:
        try:
            row = self.query_one(raw, XACT_STATUS_SQL, xid)
        except self.error as exc:
            if self.sqlstate(exc) == XID_IN_FUTURE and not self.is_broken(raw):
                return "future"
            raise
        return xact_status_of(row)

    def end_session(self, raw: R, old: SessionInfo) -> bool:
        row = self.query_one(raw, END_SESSION_SQL, old.backend_pid, old.backend_start)
        return bool(row and row[0])

    def prune(self, raw: R, retention: float, batch: int) -> int:
        row = self.query_one(raw, prune_sql(retention, batch))
        return int(str(row[0])) if row else 0


def session_info_of(row: Row | None) -> SessionInfo:
    """`SessionInfo` from the row of `SESSION_INFO_SQL`."""
    assert row is not None
    access = row[3]
    return SessionInfo(int(str(row[0])), str(row[1]), str(row[2]),
                       ledger=LedgerState.from_access(None if access is None else str(access)),
                       # psycopg: a bool, or libpq's text "t"; psqlODBC: "1" or 1
                       in_recovery=row[4] in (True, "t", "1", 1))


def xact_status_of(row: Row | None) -> str | None:
    """The answer of `XACT_STATUS_SQL` (None: no answer)."""
    return None if row is None or row[0] is None else str(row[0])


def begin_sql_bytes(state: SessionState, want_xid: bool, token: str | None = None,
                    how: How = "literal") -> bytes:
    """`begin_sql`, encoded (for libpq), made once per distinct state; with a ledger
    token, its insert follows in the same message (instead of reading the id)."""
    if token is not None:
        return _begin_bytes(state.isolation_level, state.read_only, False) + b"; " + \
            ledger_sql(token, how).encode()
    return _begin_bytes(state.isolation_level, state.read_only, want_xid)


@functools.lru_cache(maxsize=32)
def _begin_bytes(isolation_level: str | None, read_only: bool | None, want_xid: bool) -> bytes:
    return _begin_sql(isolation_level, read_only, want_xid).encode()


def begin_sql(state: SessionState, want_xid: bool, token: str | None = None,
              how: How = "literal") -> str:
    """The one message that opens a unit's transaction: BEGIN, and the reading of its
    id or the insert of its ledger token."""
    if token is not None:
        return _begin_sql(state.isolation_level, state.read_only, False) + "; " + \
            ledger_sql(token, how)
    return _begin_sql(state.isolation_level, state.read_only, want_xid)


@functools.lru_cache(maxsize=32)
def _begin_sql(isolation_level: str | None, read_only: bool | None, want_xid: bool) -> str:
    options = []
    if isolation_level:
        options.append(f"ISOLATION LEVEL {isolation_level.upper()}")
    if read_only is not None:
        options.append("READ ONLY" if read_only else "READ WRITE")
    sql = "BEGIN " + ", ".join(options) if options else "BEGIN"
    if want_xid:
        # Assigning the id at BEGIN costs no round trip (it travels with BEGIN) and
        # makes it known before any COMMIT is sent, whatever happens to the reply.
        sql += "; SELECT pg_current_xact_id()::text"
    return sql


#: Reads `SessionInfo` in one round trip.
SESSION_INFO_SQL = (
    "SELECT pg_backend_pid(), pg_postmaster_start_time()::text, "
    "(SELECT backend_start::text FROM pg_stat_activity WHERE pid = pg_backend_pid()), "
    f"{ACCESS_SQL}, pg_is_in_recovery()"
)

#: Ends an old session of ours, if it is still the same session (pid and start).
END_SESSION_SQL = (
    "SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity "
    "WHERE pid = %s AND backend_start = %s::timestamptz"
)

XACT_STATUS_SQL = "SELECT pg_xact_status(%s::xid8)"

#: SQLSTATE of "transaction ID ... is in the future".
XID_IN_FUTURE = "22023"


def normalise_isolation(value: object) -> str | None:
    """``"serializable"``, ``"SERIALIZABLE"``, psycopg's ``IsolationLevel.SERIALIZABLE``."""
    if value is None:
        return None
    name = getattr(value, "name", value)
    if not isinstance(name, str):
        raise ValueError(f"not an isolation level: {value!r}")
    text = name.replace("_", " ").strip().lower()
    if text not in ISOLATION_LEVELS:
        raise ValueError(f"not an isolation level: {value!r}; use one of {ISOLATION_LEVELS}")
    return text


