"""The psycopg 3 adapter: SQLSTATEs and broken sessions.

Imported only when psycopg is installed; `classify` loads it lazily.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors as pg_errors
from psycopg.pq import ConnStatus

from . import _sqlstates as table


def owns(error: object) -> bool:
    return isinstance(error, psycopg.Error)


def owns_connection(connection: object) -> bool:
    return isinstance(connection, psycopg.Connection)


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
