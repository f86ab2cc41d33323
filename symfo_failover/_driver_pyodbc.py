"""The pyodbc adapter: SQLSTATEs and broken sessions.

pyodbc puts the SQLSTATE in ``args[0]``. Whether a session is dead is asked of
the driver through the ODBC attribute ``SQL_ATTR_CONNECTION_DEAD``, which
psqlODBC answers from its own state without a round trip.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import re
from collections.abc import Mapping
from typing import Any

import pyodbc

from . import _sqlstates as table
from . import _target as _t
from ._contract import UnitGuard
from ._ledger import How, claim_sql

_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_SQL_ATTR_CONNECTION_DEAD = 1209
_SQL_CD_TRUE = 1
_SQL_SUCCEEDED = (0, 1)


def owns(error: object) -> bool:
    return isinstance(error, pyodbc.Error)


def owns_connection(connection: object) -> bool:
    return isinstance(connection, pyodbc.Connection)


def sqlstate_of(error: object) -> str | None:
    args = getattr(error, "args", ())
    if args and isinstance(args[0], str) and _SQLSTATE.fullmatch(args[0].strip()):
        return args[0].strip()
    return None


@functools.lru_cache(maxsize=1)
def _odbc_library() -> Any:
    # The driver manager pyodbc itself is linked against (unixODBC here).
    for name in ("odbc", "iodbc"):
        path = ctypes.util.find_library(name)
        if path:
            lib = ctypes.CDLL(path)
            lib.SQLGetConnectAttr.argtypes = [
                ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
            ]
            lib.SQLGetConnectAttr.restype = ctypes.c_short
            return lib
    return None


def connection_dead(connection: Any) -> bool | None:
    """The driver's own answer to "is this session dead?", or None if it can't say."""
    lib = _odbc_library()
    hdbc = getattr(connection, "hdbc", None)
    # pyodbc gives the handle as a ctypes.c_void_p; accept a plain address too.
    handle = hdbc if isinstance(hdbc, ctypes.c_void_p) else ctypes.c_void_p(hdbc or None)
    if lib is None or not handle.value:
        return None
    value = ctypes.c_uint32(0)
    rc = lib.SQLGetConnectAttr(handle, _SQL_ATTR_CONNECTION_DEAD, ctypes.byref(value), 0, None)
    if rc not in _SQL_SUCCEEDED:
        return None
    return value.value == _SQL_CD_TRUE


def is_broken(connection: Any) -> bool:
    if connection is None:
        return False
    if getattr(connection, "closed", False):
        return True
    return connection_dead(connection) is True


def rule_without_sqlstate(error: object, connection: Any) -> table.Rule:
    # pyodbc always reports a SQLSTATE for ODBC errors; without one only the
    # session's state can tell.
    if connection is not None and is_broken(connection):
        return table.NO_SQLSTATE_LOST
    return table.NO_SQLSTATE_OTHER


# --- the session interface the resilient connection uses (`_target.Driver`) --------------

#: psqlODBC's own keepalive settings (seconds), and libpq's through ``pqopt``.
_ODBC_DETECTION = {
    "keepalivetime": ("KeepaliveTime", str(_t.KEEPALIVE_IDLE)),
    "keepaliveinterval": ("KeepaliveInterval", str(_t.KEEPALIVE_INTERVAL)),
}
_PQOPT_DETECTION = {
    "keepalives_count": str(_t.KEEPALIVE_COUNT),
    "tcp_user_timeout": str(_t.TCP_USER_TIMEOUT_MS),
    "connect_timeout": str(_t.CONNECT_TIMEOUT),
}


def parse_connection_string(text: str) -> list[tuple[str, str]]:
    """``key=value;`` pairs, with ``{...}`` values (``}}`` inside means ``}``)."""
    pairs: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in "; \t":
            i += 1
        if i >= n:
            break
        eq = text.find("=", i)
        if eq < 0:
            raise ValueError(f"no '=' after {text[i:i + 20]!r}")
        key = text[i:eq].strip()
        if not key:
            raise ValueError("an empty key")
        i = eq + 1
        if i < n and text[i] == "{":
            value, i = _braced(text, i)
        else:
            end = text.find(";", i)
            end = n if end < 0 else end
            value, i = text[i:end].strip(), end
        pairs.append((key, value))
    return pairs


def _braced(text: str, i: int) -> tuple[str, int]:
    out = []
    i += 1
    while i < len(text):
        if text[i] == "}":
            if text[i + 1:i + 2] == "}":
                out.append("}")
                i += 2
                continue
            return "".join(out), i + 1
        out.append(text[i])
        i += 1
    raise ValueError("a '{' without its '}'")


def _quote(value: str) -> str:
    if any(c in value for c in ";{}= ") or value != value.strip():
        return "{" + value.replace("}", "}}") + "}"
    return value


def _pqopt(text: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    for item in text.split():
        key, _, value = item.partition("=")
        opts[key] = value
    return opts


# --- what a unit of work is given -------------------------------------------------------
# pyodbc's Connection and Cursor are C types that cannot be subclassed, so a unit gets
# thin stand-ins that refuse every call that would end its transaction and pass
# everything else to pyodbc.


class LentConnection:
    """The pyodbc connection as a unit of work sees it (``run(fn)`` calls ``fn(lent)``).

    Behaves like the ``pyodbc.Connection`` it wraps (``raw``), except that ``commit()``,
    ``rollback()``, ``close()``, setting ``autocommit`` and statements that end the
    transaction are refused while the unit runs, and everything is refused after it.
    """

    __slots__ = ("_guard", "raw")

    def __init__(self, raw: pyodbc.Connection, guard: UnitGuard) -> None:
        object.__setattr__(self, "raw", raw)
        object.__setattr__(self, "_guard", guard)

    def _live(self) -> Any:
        if not self._guard.active:
            raise self._guard.refuse("used-after-unit", "the unit's connection was used")
        return self.raw

    def cursor(self) -> LentCursor:
        return LentCursor(self._live().cursor(), self)

    def execute(self, sql: str, *params: Any) -> LentCursor:
        raw = self._live()
        self._guard.check_statement(sql)
        return LentCursor(raw.execute(sql, *params), self)

    def commit(self) -> None:
        raise self._guard.refuse("ended-transaction", "commit() was called")

    def rollback(self) -> None:
        raise self._guard.refuse("ended-transaction", "rollback() was called")

    def close(self) -> None:
        raise self._guard.refuse("closed-connection", "close() was called")

    @property
    def autocommit(self) -> bool:
        return bool(self._live().autocommit)

    def __enter__(self) -> LentConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        # pyodbc commits here unless in autocommit mode; the unit's transaction is run()'s.
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._live(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name == "autocommit":
            raise self._guard.refuse("ended-transaction", "autocommit was set")
        setattr(self._live(), name, value)

    def __repr__(self) -> str:
        state = "in a unit of work" if self._guard.active else "unit ended"
        return f"<symfo_failover lent {self.raw!r} ({state})>"


class LentCursor:
    """A ``pyodbc.Cursor`` of a `LentConnection`: the same guard, results readable after."""

    __slots__ = ("_cursor", "connection")

    def __init__(self, cursor: Any, connection: LentConnection) -> None:
        object.__setattr__(self, "_cursor", cursor)
        object.__setattr__(self, "connection", connection)

    def execute(self, sql: str, *params: Any) -> LentCursor:
        guard = self.connection._guard
        guard.check_statement(sql)
        self._cursor.execute(sql, *params)
        return self

    def executemany(self, sql: str, params: Any) -> None:
        guard = self.connection._guard
        guard.check_statement(sql)
        self._cursor.executemany(sql, params)

    def commit(self) -> None:
        raise self.connection._guard.refuse("ended-transaction", "cursor.commit() was called")

    def rollback(self) -> None:
        raise self.connection._guard.refuse("ended-transaction",
                                            "cursor.rollback() was called")

    def __iter__(self) -> LentCursor:
        return self

    def __next__(self) -> Any:
        return next(self._cursor)

    def __enter__(self) -> LentCursor:
        return self

    def __exit__(self, *exc: object) -> None:
        self._cursor.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._cursor, name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._cursor, name, value)

    def __repr__(self) -> str:
        return f"<symfo_failover lent {self._cursor!r}>"


#: psqlODBC's rollback on error: 0 nothing, 1 the whole transaction, 2 the statement.
_ROLLBACK_LEVEL_KEYS = ("protocol", "a1")
_STATEMENT_ROLLBACK = "7.4-2"


class PyodbcDriver(_t.DriverBase["pyodbc.Connection"]):
    name = "pyodbc"
    operational_error: type[BaseException] = pyodbc.OperationalError
    programming_error: type[BaseException] = pyodbc.ProgrammingError
    error: type[BaseException] = pyodbc.Error

    def target(self, conninfo: str, kwargs: Mapping[str, Any]) -> _t.Target:
        if not isinstance(conninfo, str):
            raise self.bad_input("an ODBC connection string must be a str")
        try:
            pairs = parse_connection_string(conninfo)
        except ValueError as exc:
            raise self.bad_input(f"invalid ODBC connection string: {exc}") from None
        keys = {k.lower(): i for i, (k, _) in enumerate(pairs)}
        self._check_rollback_level(pairs, keys)
        for lower, (key, value) in _ODBC_DETECTION.items():
            if lower not in keys:
                pairs.append((key, value))
        pq = _pqopt(pairs[keys["pqopt"]][1]) if "pqopt" in keys else {}
        for key, value in _PQOPT_DETECTION.items():
            pq.setdefault(key, value)
        pq_text = " ".join(f"{k}={v}" for k, v in pq.items())
        if "pqopt" in keys:
            pairs[keys["pqopt"]] = (pairs[keys["pqopt"]][0], pq_text)
        else:
            pairs.append(("pqopt", pq_text))
        values = {k.lower(): v for k, v in pairs}
        endpoints: tuple[_t.Endpoint, ...] = ()
        if "dsn" not in values:
            host = values.get("server") or values.get("servername") or "localhost"
            port_text = values.get("port") or "5432"
            try:
                port = int(port_text)
            except ValueError:
                raise self.bad_input(
                    f"invalid Port in the connection string: {port_text!r}"
                ) from None
            if not 0 < port < 65536:
                raise self.bad_input(f"invalid Port in the connection string: {port}")
            endpoints = (_t.Endpoint(host, port),)
        user = values.get("uid") or values.get("username") or ""
        database = values.get("database") or user
        shown = ";".join(f"{k}={v}" for k, v in pairs
                         if k.lower() in ("driver", "dsn", "server", "servername", "port",
                                          "database", "uid", "username"))
        connstring = ";".join(f"{k}={_quote(v)}" for k, v in pairs) + ";"
        return _t.Target(
            connect_args={"connstring": connstring, "kwargs": dict(kwargs)},
            endpoints=endpoints,
            user=user,
            database=database,
            description=f"pyodbc {shown}",
            password=values.get("pwd") or values.get("password") or None,
            # Not given: the probe behaves as libpq's "prefer" (it authenticates only if
            # the server declines SSL), the safe reading whatever psqlODBC defaults to.
            sslmode=values.get("sslmode") or None,
        )

    def _check_rollback_level(
        self, pairs: list[tuple[str, str]], keys: dict[str, int]
    ) -> None:
        """Statement-level rollback, whatever a DSN says (the connection string wins).

        With level 1 psqlODBC rolls the whole transaction back on an error and what
        the unit writes next commits on its own; with level 0 a failed transaction's
        COMMIT silently rolls back. Level 2 (psqlODBC's default) undoes only the
        statement that failed, and the transaction goes on.
        """
        for key in _ROLLBACK_LEVEL_KEYS:
            if key in keys:
                value = pairs[keys[key]][1]
                level = value.rpartition("-")[2] if "-" in value else ""
                if level in ("0", "1"):
                    raise self.bad_input(
                        f"{pairs[keys[key]][0]}={value} asks psqlODBC to roll back "
                        f"{'nothing' if level == '0' else 'the whole transaction'} on an "
                        "error, which would let a unit of work commit partially or "
                        f"report a rolled-back COMMIT as success; use Protocol="
                        f"{_STATEMENT_ROLLBACK} (statement-level, psqlODBC's default) or "
                        "leave it out"
                    )
                return
        pairs.append(("Protocol", _STATEMENT_ROLLBACK))
        keys["protocol"] = len(pairs) - 1

    def connect(self, target: _t.Target) -> Any:
        kwargs = dict(target.connect_args["kwargs"])
        kwargs["autocommit"] = True
        return pyodbc.connect(target.connect_args["connstring"], **kwargs)

    def apply_state(self, raw: pyodbc.Connection, state: _t.SessionState) -> None:
        # psqlODBC keeps no isolation or access mode of its own: set them on the session.
        options = []
        if state.isolation_level:
            options.append(f"ISOLATION LEVEL {state.isolation_level.upper()}")
        if state.read_only is not None:
            options.append("READ ONLY" if state.read_only else "READ WRITE")
        if options:
            raw.autocommit = True
            raw.execute("SET SESSION CHARACTERISTICS AS TRANSACTION " + ", ".join(options))
        raw.autocommit = state.autocommit

    def begin(self, raw: pyodbc.Connection, state: _t.SessionState,
              token: str | None = None, how: How = "literal") -> str | None:
        want_xid = token is None and not state.read_only
        cur = raw.execute(_t.begin_sql(state, want_xid, token, how))
        if not want_xid:
            return None
        cur.nextset()
        return str(cur.fetchone()[0])

    def claim(self, raw: pyodbc.Connection, token: str, lock_timeout_ms: int) -> None:
        try:
            raw.execute(claim_sql(token, lock_timeout_ms))
        except pyodbc.Error:
            if not is_broken(raw):
                with contextlib.suppress(pyodbc.Error):
                    raw.execute("ROLLBACK")
            raise
        raw.execute("ROLLBACK")

    def commit(self, raw: pyodbc.Connection) -> None:
        raw.execute("COMMIT")

    def rollback(self, raw: pyodbc.Connection) -> None:
        raw.execute("ROLLBACK")

    def get_autocommit(self, raw: pyodbc.Connection) -> bool:
        return bool(raw.autocommit)

    def set_autocommit(self, raw: pyodbc.Connection, value: bool) -> None:
        raw.autocommit = value

    def close(self, raw: pyodbc.Connection) -> None:
        raw.close()

    def in_transaction(self, raw: pyodbc.Connection) -> bool | None:
        # ODBC cannot tell without a round trip: unknown.
        return None

    def lend(self, raw: pyodbc.Connection, guard: UnitGuard) -> Any:
        return LentConnection(raw, guard)

    def reclaim(self, raw: pyodbc.Connection, guard: UnitGuard) -> None:
        return None

    def unit_left(self, raw: pyodbc.Connection) -> str | None:
        # The transaction's state is unknown locally. With statement-level rollback a
        # failed statement never fails it, and the statements that end it are refused.
        if getattr(raw, "closed", False):
            return "closed"
        return "lost" if is_broken(raw) else None

    def last_error_text(self, raw: pyodbc.Connection) -> str:
        return ""

    def query_one(self, raw: pyodbc.Connection, sql: str, *params: Any) -> tuple[Any, ...] | None:
        row = raw.execute(sql.replace("%s", "?"), *params).fetchone()
        return None if row is None else tuple(row)

    def sqlstate(self, error: BaseException) -> str | None:
        return sqlstate_of(error)

    def gone(self, raw: pyodbc.Connection) -> bool:
        return False  # ODBC shows no socket: a closed session is seen on use only

    def is_broken(self, raw: pyodbc.Connection) -> bool:
        return is_broken(raw)

    def execute(self, raw: pyodbc.Connection, query: Any, params: Any,
                kwargs: Mapping[str, Any]) -> Any:
        if kwargs:
            raise TypeError(f"pyodbc's execute takes no keyword arguments: {sorted(kwargs)}")
        return raw.execute(query) if params is None else raw.execute(query, params)

    def closed_error(self) -> BaseException:
        error: BaseException = pyodbc.ProgrammingError("Attempt to use a closed connection.")
        return error

    def bad_input(self, message: str) -> BaseException:
        error: BaseException = pyodbc.ProgrammingError(message)
        return error
