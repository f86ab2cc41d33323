"""`ResilientConnection`: the blocking runner of the unit-of-work core.

Everything that decides and sequences lives in `_core` (flows that yield operations)
and `_decide` (pure decisions). This module carries the operations out with blocking
calls on a driver adapter, and offers the DB-API passthrough.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType, TracebackType
from typing import TYPE_CHECKING, Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

from . import _core
from . import _events as ev
from ._contract import refuse_awaitable_result, refuse_coroutine_function
from ._core import Core, Flow, Job
from ._errors import UnitContractError
from ._ledger import LedgerMode, check_mode
from ._policy import DEFAULT_POLICY, RetryPolicy
from ._probe import probe
from ._target import Driver, Facts, SessionInfo, SessionState, Target, normalise_isolation

if TYPE_CHECKING:
    import psycopg
    import pyodbc
    from psycopg.rows import Row, TupleRow

_T = TypeVar("_T")
_P = ParamSpec("_P")
#: The driver's connection type, as units and `ResilientConnection.connection` see it.
C = TypeVar("C")

DRIVERS = ("psycopg", "pyodbc")
PROBE_TIMEOUT = 1.0


class DriverSource(Generic[C]):
    """The plain session source: the driver's own connect and close."""

    __slots__ = ("_driver", "_target")

    def __init__(self, driver: Driver[C], target: Target) -> None:
        self._driver = driver
        self._target = target

    def connect(self) -> C:
        return self._driver.connect(self._target)

    def discard(self, raw: C) -> None:
        self._driver.close(raw)


class ConnectionFacts(Generic[C]):
    """What the sync and the async connection say about themselves alike, read from
    the core's `_core.Link` (no I/O)."""

    _core: Core

    def __repr__(self) -> str:
        link = self._core.link
        state = "closed" if link.closed else ("connected" if link.raw is not None else "idle")
        return f"<{type(self).__name__} {self._core.target.description} {state}>"

    @property
    def connection(self) -> C | None:
        """The current driver connection (None while there is no session)."""
        return self._core.link.raw  # type: ignore[no-any-return]

    @property
    def closed(self) -> bool:
        return self._core.link.closed

    @property
    def driver(self) -> str:
        return self._core.driver.name

    @property
    def target(self) -> str:
        """Where this connection connects, without secrets."""
        return self._core.target.description

    @property
    def session(self) -> SessionInfo | None:
        """Facts about the current session (pid, server start time), if any."""
        return self._core.link.info

    @property
    def last_token(self) -> str | None:
        """The commit ledger's token of the last unit `run` returned (32 hex digits),
        None when it went without the ledger (read-only, ``ledger="off"``, not
        installed). With asynchronous replication, keep it to find later whether a
        failover lost the unit: ``SELECT 1 FROM symfo_failover.ledger WHERE token =
        %s``."""
        return self._core.link.last_token

    def _check_open(self) -> None:
        if self._core.link.closed:
            raise self._core.driver.closed_error()


class ResilientConnection(ConnectionFacts[C]):
    """A connection that survives failover. Make one with `symfo_failover.connect`.

    Use `run` for units of work (exactly once); the DB-API methods pass through to the
    current driver connection, which is replaced after a lost session. Like a DB-API
    connection it is meant for one thread at a time; calls are serialised by a lock.
    """

    def __init__(
        self,
        core: Core,
        driver: Driver[C],
        *,
        configure: Callable[[C], object] | None = None,
        source: _core.SessionSource | None = None,
    ) -> None:
        self._core = core
        self._driver = driver
        self._configure = configure
        self._source = source or DriverSource(driver, core.target)
        self._lock = threading.RLock()
        self._ops = self._operations()

    # --- public: units of work -----------------------------------------------------

    def run(self, fn: Callable[Concatenate[C, _P], _T], /,
            *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn(connection, *args, **kwargs)`` in one transaction and commit it.

        ``fn`` must not commit or roll back, and must have no effect outside the
        database: it may run more than once. On a retryable failure the unit runs again
        (on a new session when needed) within the policy; an interrupted COMMIT is
        resolved with the server, so a unit that committed is never run again.
        Raises `CommitOutcomeUnknown` when the server cannot tell, `RetriesExhausted`
        when the policy runs out, `UnitContractError` when ``fn`` breaks the contract
        (it ends the transaction, nests ``run()``, swallows a database error), and the
        driver's own exception for anything else. A coroutine function is refused with
        ``TypeError`` before anything runs.
        """
        refuse_coroutine_function(fn)
        job: Job = (fn, args, kwargs)
        with self._lock:
            link = self._core.link
            if link.guard is not None:
                raise link.guard.refuse("nested-run", "run() was called again")
            self._check_open()
            return self._drive(self._core.run(job))  # type: ignore[no-any-return]

    # --- public: DB-API passthrough -----------------------------------------------

    @overload
    def cursor(self: ResilientConnection[psycopg.Connection[Row]], *args: Any,
               **kwargs: Any) -> psycopg.Cursor[Row]: ...
    @overload
    def cursor(self: ResilientConnection[pyodbc.Connection], *args: Any,
               **kwargs: Any) -> pyodbc.Cursor: ...
    @overload
    def cursor(self, *args: Any, **kwargs: Any) -> Any: ...

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """A cursor of the current driver connection (a new session if the last was lost)."""
        return self._passthrough(lambda raw: _dbapi(raw).cursor(*args, **kwargs), opens=True)

    @overload
    def execute(self: ResilientConnection[psycopg.Connection[Row]], query: Any,
                params: Any = None, **kwargs: Any) -> psycopg.Cursor[Row]: ...
    @overload
    def execute(self: ResilientConnection[pyodbc.Connection], query: Any,
                params: Any = None, **kwargs: Any) -> pyodbc.Cursor: ...
    @overload
    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any: ...

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        """Execute one statement on the current session; returns the driver's cursor.

        Never run again by the library: a failure is raised (with its ``failure``
        classification attached) and the next call gets a new session if needed.
        """
        with self._lock:
            core = self._core
            link = core.link
            raw = link.raw
            driver = self._driver
            if link.guard is not None:
                raise self._in_unit("execute()")
            if (raw is None or link.closed or driver.is_broken(raw) or driver.gone(raw)
                    or driver.get_autocommit(raw) != core.state.autocommit):
                return self._passthrough(
                    lambda r: driver.execute(r, query, params, kwargs), opens=True
                )
            # The steady state: straight to the driver (DESIGN §5: at most 3% more).
            link.maybe_in_transaction = not core.state.autocommit
            try:
                return driver.execute(raw, query, params, kwargs)
            except driver.error as exc:
                self._drive(core.passthrough_failed(raw, exc))
                raise

    def commit(self) -> None:
        self._passthrough(lambda raw: _dbapi(raw).commit(), opens=False)

    def rollback(self) -> None:
        """Roll back. On a lost session there is nothing to roll back: the server did."""
        with self._lock:
            if self._core.link.guard is not None:
                raise self._in_unit("rollback()")
            self._check_open()
            core = self._core
            raw = self._drive(core.rollback_session())
            if raw is None:
                return
            try:
                raw.rollback()
            except self._driver.error as exc:
                self._drive(core.passthrough_failed(raw, exc))
                raise

    def close(self) -> None:
        """Close the session. Idempotent."""
        with self._lock:
            if self._core.link.guard is not None:
                raise self._in_unit("close()")
            self._drive(self._core.close())

    def __enter__(self) -> ResilientConnection[C]:
        return self

    def __exit__(
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
                self.commit()
            else:
                with contextlib.suppress(Exception):
                    self.rollback()
        finally:
            self.close()

    # --- public: tracked session state ---------------------------------------------

    @property
    def autocommit(self) -> bool:
        return self._core.state.autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._set_state(autocommit=bool(value))

    @property
    def isolation_level(self) -> str | None:
        """``"read committed"``, ``"repeatable read"``, ``"serializable"``; None: the server's."""
        return self._core.state.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: object) -> None:
        self._set_state(isolation_level=normalise_isolation(value))

    @property
    def read_only(self) -> bool | None:
        """Read-only units need no transaction id and run in READ ONLY transactions."""
        return self._core.state.read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._set_state(read_only=None if value is None else bool(value))

    def _set_state(self, **changes: Any) -> None:
        with self._lock:
            if self._core.link.guard is not None:
                raise self._in_unit(f"{', '.join(changes)} was set")
            self._check_open()
            self._drive(self._core.set_state(replace(self._core.state, **changes)))

    # --- carrying the core's operations out ------------------------------------------

    def _drive(self, flow: Flow[_T]) -> _T:
        """Run ``flow`` to its end, carrying out each operation it yields."""
        return drive(flow, self._ops)

    def _operations(self) -> list[Callable[..., Any]]:
        return operations(
            self._driver, connect=self._source.connect, discard=self._source.discard,
            sleep=self._core.policy.sleep,
            instead={
                _core.OP_CONFIGURE: self._run_configure,
                _core.OP_PROBE: lambda target: _core.probe_answers(target, probe,
                                                                    PROBE_TIMEOUT),
            })

    def _run_configure(self, raw: C) -> None:
        assert self._configure is not None
        self._configure(raw)

    def _passthrough(self, op: Callable[[C], _T], *, opens: bool) -> _T:
        """``op(raw)`` on the current session. ``opens``: it may open a transaction
        (statements, cursors); commit and rollback end it."""
        with self._lock:
            core = self._core
            if core.link.guard is not None:
                raise self._in_unit("a passthrough call")
            self._check_open()
            raw: C = self._drive(core.passthrough_session(opens))
            try:
                core.link.maybe_in_transaction = opens and not core.state.autocommit
                return op(raw)
            except self._driver.error as exc:
                self._drive(core.passthrough_failed(raw, exc))
                raise

    def _connect_with_retries(self) -> C:
        raw: C = self._drive(self._core.connect())
        return raw

    def _in_unit(self, what: str) -> UnitContractError:
        guard = self._core.link.guard
        assert guard is not None
        return guard.refuse("connection-in-unit", f"{what} on the {type(self).__name__}")



def operations(driver: Driver[Any], *, connect: Callable[[], Any],
               discard: Callable[[Any], Any], sleep: Callable[[float], Any],
               instead: Mapping[int, Callable[..., Any]] = MappingProxyType({}),
               ) -> list[Callable[..., Any]]:
    """The blocking runner's table of operations (indexed by the operation's number):
    the session source's ``connect`` and ``discard``, the driver's I/O, and what a
    runner does its own way ``instead`` (a pool reads a session's facts it kept, a
    plain connection runs ``configure`` and asks the servers)."""
    table: dict[int, Callable[..., Any]] = {
        _core.OP_CONNECT: connect,
        _core.OP_DISCARD: discard,
        _core.OP_INFO: driver.session_info,
        _core.OP_END_SESSION: driver.end_session,
        _core.OP_APPLY_STATE: driver.apply_state,
        _core.OP_CONFIGURE: nothing,
        _core.OP_BEGIN: driver.begin,
        _core.OP_UNIT: call_unit,
        _core.OP_COMMIT: driver.commit,
        _core.OP_ROLLBACK: driver.rollback,
        _core.OP_XACT_STATUS: driver.xact_status,
        _core.OP_AUTOCOMMIT: driver.set_autocommit,
        _core.OP_SLEEP: sleep,
        _core.OP_PROBE: lambda target: [],
        _core.OP_CLAIM: driver.claim,
        _core.OP_PRUNE: driver.prune,
    }
    table.update(instead)
    return [table[i] for i in range(_core.N_OPS)]


def nothing(*args: Any) -> None:
    """An operation a runner has nothing to do for."""
    return None


def drive(flow: Flow[_T], ops: list[Callable[..., Any]]) -> _T:
    """Run ``flow`` to its end, carrying out each operation it yields with ``ops``
    (indexed by the operation's number)."""
    try:
        op = flow.send(None)
        while True:
            try:
                value = ops[op[0]](*op[1:])
            except BaseException as exc:
                op = flow.throw(exc)
            else:
                op = flow.send(value)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]


def _dbapi(raw: object) -> Any:
    """The session as the DB-API object it is (cursor, commit: as each driver has them)."""
    return raw


def call_unit(job: Job, lent: Any) -> Any:
    fn, args, kwargs = job
    result = fn(lent, *args, **kwargs)
    refuse_awaitable_result(result, fn)
    return result


@overload
def connect(
    conninfo: str, *, driver: Literal["psycopg"] = "psycopg", policy: RetryPolicy | None = None,
    configure: Callable[[psycopg.Connection[TupleRow]], object] | None = None,
    on_event: ev.EventHook | None = None, ledger: LedgerMode = "auto", **kwargs: Any,
) -> ResilientConnection[psycopg.Connection[TupleRow]]: ...
@overload
def connect(
    conninfo: str, *, driver: Literal["pyodbc"], policy: RetryPolicy | None = None,
    configure: Callable[[pyodbc.Connection], object] | None = None,
    on_event: ev.EventHook | None = None, ledger: LedgerMode = "auto", **kwargs: Any,
) -> ResilientConnection[pyodbc.Connection]: ...
@overload
def connect(
    conninfo: str, *, driver: str, policy: RetryPolicy | None = None,
    configure: Callable[[Any], object] | None = None,
    on_event: ev.EventHook | None = None, ledger: LedgerMode = "auto", **kwargs: Any,
) -> ResilientConnection[Any]: ...


def connect(
    conninfo: str,
    *,
    driver: str = "psycopg",
    policy: RetryPolicy | None = None,
    configure: Callable[[Any], object] | None = None,
    on_event: ev.EventHook | None = None,
    ledger: LedgerMode = "auto",
    **kwargs: Any,
) -> ResilientConnection[Any]:
    """Open a `ResilientConnection`.

    ``conninfo`` is a libpq connection string for ``driver="psycopg"`` and an ODBC
    connection string for ``driver="pyodbc"``; ``kwargs`` go to the driver's connect
    (``autocommit=`` sets the tracked autocommit). Keepalive and timeout settings that
    detect a partition (see docs/concepts.md) are added unless given. ``configure(raw)``
    runs on every new session. ``on_event`` receives every `Event`.

    ``ledger``: the commit ledger (docs/exactly-once.md), which makes the outcome of a
    lost COMMIT provable after a crash or a promotion. ``"auto"`` uses it wherever it
    is installed and the role may use it (read once per session, with the session's
    other facts); ``"require"`` raises `LedgerUnavailable` here when it is not;
    ``"off"`` never uses it.

    Connects at once: a bad connection string, an unknown driver or a wrong password
    raise here without retrying; a server that is down is retried within ``policy``.
    """
    adapter = load_driver(driver)
    core = make_core(adapter, conninfo, policy=policy, configure=configure,
                     on_event=on_event, kwargs=kwargs, ledger=ledger)
    if configure is not None:
        refuse_coroutine_function(configure, what="configure")
    conn: ResilientConnection[Any] = ResilientConnection(core, adapter, configure=configure)
    conn._connect_with_retries()
    refused = core.required_ledger_missing()
    if refused is not None:
        conn.close()
        raise refused
    return conn


def make_core(
    adapter: Facts[Any],
    conninfo: str,
    *,
    policy: RetryPolicy | None,
    configure: object,
    on_event: ev.EventHook | None,
    kwargs: dict[str, Any],
    ledger: object = "auto",
) -> Core:
    """Check what `connect` (or `connect_async`) was given; the core for it."""
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"policy must be a RetryPolicy, not {type(policy).__name__}")
    if configure is not None and not callable(configure):
        raise TypeError("configure must be callable")
    if on_event is not None and not callable(on_event):
        raise TypeError("on_event must be callable")
    if not isinstance(conninfo, str):
        raise TypeError(f"conninfo must be a str, not {type(conninfo).__name__}")
    mode = check_mode(ledger)
    options = dict(kwargs)
    state = SessionState(autocommit=bool(options.pop("autocommit", False)))
    target = adapter.target(conninfo, options)
    return Core(adapter, target, policy=policy or DEFAULT_POLICY,
                on_event=on_event, state=state,
                configure=configure is not None, ledger=mode)


def load_driver(name: str) -> Driver[Any]:
    if name not in DRIVERS:
        raise ValueError(f"unknown driver {name!r}; use one of {', '.join(DRIVERS)}")
    module, cls, extra = {
        "psycopg": ("_driver_psycopg", "PsycopgDriver", "psycopg"),
        "pyodbc": ("_driver_pyodbc", "PyodbcDriver", "odbc"),
    }[name]
    try:
        mod = importlib.import_module(f"symfo_failover.{module}")
    except ImportError as exc:
        raise ImportError(
            f"the {name} driver is not installed: pip install 'symfo-failover[{extra}]' ({exc})"
        ) from exc
    adapter: Driver[Any] = getattr(mod, cls)()
    return adapter
