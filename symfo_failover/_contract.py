"""The unit-of-work contract: what a unit may not do, and the guard that enforces it.

A unit of work is a function that `run()` calls inside a transaction that `run()` begins
and commits. It must not end that transaction (``commit()``, ``rollback()``, a
``COMMIT`` or ``ROLLBACK`` statement, switching autocommit, ``close()``), must not call
``run()`` again on the same connection, must not swallow a database error that failed
the transaction, and must not be a coroutine function (for the sync ``run()``).

A `UnitGuard` lives for one run of the unit. The driver adapters consult it at each
call that would end the transaction and refuse the call; the refusal is also kept
(`UnitGuard.violation`), so that a unit that catches the refusal and carries on still
has nothing committed. No I/O here.
"""

from __future__ import annotations

import inspect
import re
import types
from typing import Any

from ._errors import CONTRACT_RULES, UnitContractError

_CONSEQUENCE = "nothing the unit wrote is committed, and it is not run again"

#: Words a transaction-control statement starts with; a quick test before the scan.
_MAYBE_CONTROL = re.compile(r"commit|rollback|abort|end|prepare", re.IGNORECASE)
_CONTROL = re.compile(
    r"(?:commit|end|abort|prepare\s+transaction"
    r"|rollback(?!\s+(?:work\s+|transaction\s+)?to\b))\b",
    re.IGNORECASE,
)


class UnitGuard:
    """One run of a unit: whether it is still running, and the first rule it broke."""

    __slots__ = ("active", "error_class", "violation")

    def __init__(self, error_class: type[UnitContractError]) -> None:
        self.active = True
        self.error_class = error_class
        self.violation: UnitContractError | None = None

    def refuse(self, rule: str, what: str) -> UnitContractError:
        """The error for breaking ``rule`` by ``what``; the first one is kept."""
        error = self.error_class(
            f"{what}: {CONTRACT_RULES[rule]}; {_CONSEQUENCE}. run() begins and commits "
            f"the transaction itself (rule {rule!r}; docs/resilient.md, the unit-of-work "
            "contract)",
            rule=rule,
        )
        if self.violation is None:
            self.violation = error
        return error

    def check_statement(self, query: object) -> None:
        """Refuse a statement that would end the unit's transaction, before it runs."""
        if not self.active:
            raise self.refuse("used-after-unit", "a statement was sent")
        text = query.decode(errors="replace") if isinstance(query, bytes) else query
        if isinstance(text, str) and _MAYBE_CONTROL.search(text):
            keyword = transaction_control(text)
            if keyword is not None:
                raise self.refuse("ended-transaction", f"a {keyword} statement was sent")


def transaction_control(sql: str) -> str | None:
    """The first top-level statement of ``sql`` that ends a transaction, if any.

    Looks only at the start of each statement, outside quotes, dollar quotes and
    comments: ``CASE ... END``, ``ROLLBACK TO SAVEPOINT`` and a PL/pgSQL ``END`` inside
    ``DO $$ ... $$`` are not transaction control.
    """
    i, n = 0, len(sql)
    at_start = True
    while i < n:
        c = sql[i]
        if c in " \t\r\n\f":
            i += 1
            continue
        if sql.startswith("--", i):
            end = sql.find("\n", i)
            i = n if end < 0 else end + 1
            continue
        if sql.startswith("/*", i):
            end = sql.find("*/", i + 2)
            i = n if end < 0 else end + 2
            continue
        if at_start:
            match = _CONTROL.match(sql, i)
            if match is not None:
                return " ".join(match.group(0).upper().split())
            at_start = False
        if c == ";":
            at_start = True
            i += 1
        elif c in "'\"":
            end = sql.find(c, i + 1)
            while end >= 0 and sql.startswith(c * 2, end):
                end = sql.find(c, end + 2)  # a doubled quote inside the literal
            i = n if end < 0 else end + 1
        elif c == "$":
            tag = re.match(r"\$(?:[A-Za-z_][A-Za-z0-9_]*)?\$", sql[i:])
            if tag is None:
                i += 1
            else:
                end = sql.find(tag.group(0), i + len(tag.group(0)))
                i = n if end < 0 else end + len(tag.group(0))
        else:
            i += 1
    return None


def refuse_coroutine_function(fn: object, what: str = "run()") -> None:
    """``TypeError`` for an ``async def`` unit given to the sync ``run()``."""
    if type(fn) is types.FunctionType and not fn.__code__.co_flags & _ASYNC_FLAGS:
        return  # the common case first: a run() pays for this check
    if not callable(fn):
        raise TypeError(f"{what} needs a function, not {type(fn).__name__}")
    if _is_async(fn):
        raise TypeError(
            f"{what} of a sync connection was given a coroutine function "
            f"({_name(fn)}): it would return an un-awaited coroutine and commit nothing. "
            "Give it a plain function, or use connect_async() and await run()"
        )


def refuse_sync_function(fn: object, what: str = "run()") -> None:
    """``TypeError`` for what the async ``run()`` cannot await, before anything runs:
    not callable, a generator or async generator function. A plain function may still
    return an awaitable (a lambda around a coroutine function): `require_awaitable`
    checks its result."""
    if not callable(fn):
        raise TypeError(f"{what} needs a function, not {type(fn).__name__}")
    code = getattr(fn, "__code__", None)
    if code is not None and code.co_flags & (inspect.CO_GENERATOR | inspect.CO_ASYNC_GENERATOR):
        raise TypeError(
            f"{what} of an async connection was given a generator function ({_name(fn)}): "
            "give it an async def function")


def require_awaitable(result: object, fn: object) -> Any:
    """The async ``run()``'s check of what a unit returned: it must be awaitable."""
    if inspect.isawaitable(result):
        return result
    raise TypeError(
        f"run() of an async connection was given {_name(fn)}, which returned "
        f"{type(result).__name__}, not an awaitable: give it an async def function "
        "(nothing was committed)")


_PLAIN_RESULTS = frozenset({int, str, bytes, float, bool, tuple, list, dict, set})


def refuse_awaitable_result(result: object, fn: object) -> None:
    """``TypeError`` for a unit that returned an awaitable (a coroutine, a future)."""
    if result is None or type(result) in _PLAIN_RESULTS:
        return  # the common case, without the ABC check of inspect.isawaitable
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited: close it, so that Python does not warn
        raise TypeError(
            f"the unit of work {_name(fn)} returned {type(result).__name__}, an awaitable: "
            "the sync run() cannot await it, and nothing was committed"
        )


_ASYNC_FLAGS = inspect.CO_COROUTINE | inspect.CO_ASYNC_GENERATOR


def _is_async(fn: object) -> bool:
    if inspect.iscoroutinefunction(fn) or inspect.isasyncgenfunction(fn):
        return True
    call = getattr(type(fn), "__call__", None)  # noqa: B004 - a callable object's method
    return not inspect.isfunction(fn) and not inspect.ismethod(fn) and (
        inspect.iscoroutinefunction(call) or inspect.isasyncgenfunction(call)
    )


def _name(fn: object) -> str:
    return str(getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn))

