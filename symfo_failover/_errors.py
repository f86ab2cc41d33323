"""The library's own errors.

`FailoverError` is the base. Each error is raised as a subclass that also derives from
the driver's ``OperationalError`` (`flavoured`), so that an application's existing
``except psycopg.OperationalError`` or ``except pyodbc.OperationalError`` keeps catching
what it caught before the library was there (psycopg_pool does the same with its
``PoolTimeout``). ``except symfo_failover.FailoverError`` catches them with either driver.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from ._kind import Failure, Kind

_E = TypeVar("_E", bound="FailoverError")


class FailoverError(Exception):
    """Base class: the library could not carry a unit of work through a failover.

    ``failure`` is the classification the decision was based on; `classify` returns it.
    """

    failure: Failure

    def __init__(self, message: str, *, failure: Failure) -> None:
        super().__init__(message)
        self.failure = failure


class CommitOutcomeUnknown(FailoverError):
    """COMMIT was sent, the reply was lost, and the server could not say what happened.

    The unit may or may not have committed; it was not run again. ``xid`` is the
    transaction id that was being committed (text), when it was known.
    """

    def __init__(self, message: str, *, failure: Failure, xid: str | None) -> None:
        super().__init__(message, failure=failure)
        self.xid = xid


class RetriesExhausted(FailoverError):
    """The policy's deadline or attempts ran out before the work could be done.

    Nothing was committed. ``failure`` is the last failure seen, ``attempts`` how many
    times the library tried, ``elapsed`` the seconds spent, ``target`` where it connected
    (without secrets).
    """

    def __init__(
        self, message: str, *, failure: Failure, attempts: int, elapsed: float, target: str
    ) -> None:
        super().__init__(message, failure=failure)
        self.attempts = attempts
        self.elapsed = elapsed
        self.target = target


def outcome_unknown_failure(reason: str) -> Failure:
    """The classification carried by `CommitOutcomeUnknown`: never retry it blindly."""
    return Failure(
        kind=Kind.NOT_RETRYABLE,
        sqlstate=None,
        retryable=False,
        reconnect=False,
        message=f"the outcome of COMMIT is unknown: {reason}",
        rule="commit outcome unknown",
        condition="commit_outcome_unknown",
    )


def flavoured(cls: type[_E], driver_error: type[BaseException] | None) -> type[_E]:
    """``cls`` as a subclass of the driver's OperationalError too (cached per pair)."""
    if driver_error is None:
        return cls
    key = (cls, driver_error)
    with _lock:
        combined = _combined.get(key)
        if combined is None:
            module = driver_error.__module__.split(".")[0]
            combined = type(cls.__name__, (cls, driver_error), {"__module__": cls.__module__})
            combined.__qualname__ = f"{cls.__qualname__}[{module}]"
            _combined[key] = combined
    return combined


_combined: dict[tuple[type[Any], type[BaseException]], type[Any]] = {}
_lock = threading.Lock()
