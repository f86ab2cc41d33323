"""`classify`: from what a driver reported to a `Failure`. No I/O."""

from __future__ import annotations

import re
import sys
from dataclasses import replace
from typing import Any

from . import _sqlstates as table
from ._kind import Failure

_SQLSTATE = re.compile(r"[0-9A-Z]{5}")
_DRIVER_TEXT_LIMIT = 300


def classify(error: BaseException | str | None, *, connection: Any = None) -> Failure:
    """Classify a driver exception, a DB-API exception or a SQLSTATE string.

    ``connection`` is the raw driver connection the error was raised on, when
    known. It matters only when the driver gave no SQLSTATE: then a session that
    is now broken or closed means the connection was lost. Reading it does no I/O.

    Never raises: anything that cannot be understood is `Kind.NOT_RETRYABLE`.
    """
    try:
        return _classify(error, connection)
    except Exception as exc:  # a hostile __getattr__ or similar must not escape
        return _failure(table.DEFAULT, None, f"could not classify: {type(exc).__name__}")


def _classify(error: object, connection: Any) -> Failure:
    own = getattr(error, "failure", None) if isinstance(error, BaseException) else None
    if isinstance(own, Failure):
        return own

    if error is None or isinstance(error, str):
        raw: object = error
        text = ""
    else:
        raw = sqlstate_of(error)
        text = driver_text(error)

    if raw is None or (isinstance(raw, str) and not raw.strip()):
        rule = _rule_without_sqlstate(error, connection)
        return _failure(rule, None, text)

    code = str(raw).strip().upper()
    if not _SQLSTATE.fullmatch(code):
        shown = str(raw)[:40]
        failure = _failure(table.DEFAULT, None, text)
        return replace(failure, message=f"not a SQLSTATE: {shown!r}. {failure.message}")
    if code in table.GENERIC_CODES and connection is not None and _broken(connection):
        return _failure(table.GENERIC_ON_BROKEN, code, text)
    return _failure(table.lookup(code), code, text)


def sqlstate_of(error: object) -> str | None:
    """The SQLSTATE an exception carries, in any of the usual places, or None."""
    for module, attr in (("psycopg", "_driver_psycopg"), ("pyodbc", "_driver_pyodbc")):
        if module in sys.modules:
            adapter = _adapter(attr)
            if adapter.owns(error):
                code: str | None = adapter.sqlstate_of(error)
                return code
    for attr in ("sqlstate", "pgcode"):
        value = getattr(error, attr, None)
        if isinstance(value, str) and value:
            return value
    diag = getattr(error, "diag", None)
    value = getattr(diag, "sqlstate", None)
    if isinstance(value, str) and value:
        return value
    args = getattr(error, "args", ())
    if isinstance(args, tuple) and args and isinstance(args[0], str):
        first = args[0].strip()
        if _SQLSTATE.fullmatch(first):
            return first
    return None


def _rule_without_sqlstate(error: object, connection: Any) -> table.Rule:
    for module, attr in (("psycopg", "_driver_psycopg"), ("pyodbc", "_driver_pyodbc")):
        if module in sys.modules:
            adapter = _adapter(attr)
            if adapter.owns(error) or (error is None and adapter.owns_connection(connection)):
                rule: table.Rule = adapter.rule_without_sqlstate(error, connection)
                return rule
    return table.NO_SQLSTATE_OTHER


def _broken(connection: Any) -> bool:
    for module, attr in (("psycopg", "_driver_psycopg"), ("pyodbc", "_driver_pyodbc")):
        if module in sys.modules:
            adapter = _adapter(attr)
            if adapter.owns_connection(connection):
                return bool(adapter.is_broken(connection))
    return False


def _adapter(name: str) -> Any:
    # Imported lazily so that a missing driver never breaks classification.
    from importlib import import_module

    return import_module(f"symfo_failover.{name}")


def driver_text(error: object) -> str:
    args = getattr(error, "args", ())
    if isinstance(args, tuple) and len(args) >= 2 and isinstance(args[1], str):
        text = args[1].strip().splitlines()  # pyodbc style: (sqlstate, message)
    else:
        text = str(error).strip().splitlines()
    first = text[0] if text else type(error).__name__
    return first[:_DRIVER_TEXT_LIMIT]


def _failure(rule: table.Rule, sqlstate: str | None, text: str) -> Failure:
    message = rule.why if not text else f"{rule.why} Driver said: {text}"
    return Failure(
        kind=rule.kind,
        sqlstate=sqlstate,
        retryable=rule.retryable,
        reconnect=rule.reconnect,
        message=message,
        rule=rule.code,
        condition=rule.condition,
    )
