"""The pyodbc adapter: SQLSTATEs and broken sessions.

pyodbc puts the SQLSTATE in ``args[0]``. Whether a session is dead is asked of
the driver through the ODBC attribute ``SQL_ATTR_CONNECTION_DEAD``, which
psqlODBC answers from its own state without a round trip.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import re
from typing import Any

import pyodbc

from . import _sqlstates as table

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
