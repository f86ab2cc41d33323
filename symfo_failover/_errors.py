"""The library's own errors.

`FailoverError` is the base of what a failover can end in; `UnitContractError` is what a
unit of work that breaks the contract of `run()` gets. Each is raised as a subclass that
also derives from one of the driver's exceptions (`flavoured`): ``OperationalError`` for
the failover errors, ``ProgrammingError`` for a broken contract, so that an
application's existing ``except psycopg.OperationalError`` or
``except pyodbc.ProgrammingError`` keeps catching what it caught before the library was
there (psycopg_pool does the same with its ``PoolTimeout``).

Every error pickles with its attributes (multiprocessing, Celery, ``concurrent.futures``
send exceptions between processes) and shows ``symfo_failover`` as its module.
"""

from __future__ import annotations

import threading
from typing import Any, TypeVar

from ._kind import Failure, Kind

_E = TypeVar("_E", bound="LibraryError")

#: Where the public classes live, as users import them (and as pickle finds them).
PUBLIC_MODULE = "symfo_failover"


class LibraryError(Exception):
    """What every error of the library has: ``failure``, and a pickling that keeps it."""

    failure: Failure

    def __init__(self, message: str, *, failure: Failure) -> None:
        super().__init__(message)
        self.failure = failure

    def __reduce__(self) -> tuple[Any, ...]:
        # A flavoured class is made at run time and cannot be found by name: pickle the
        # library's class and the driver's, and make the pair again on the other side.
        base, driver_error = _origin(type(self))
        state = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return (_restore, (base, driver_error, self.args, state))


class FailoverError(LibraryError):
    """Base class: the library could not carry a unit of work through a failover.

    ``failure`` is the classification the decision was based on; `classify` returns it.
    """


class CommitOutcomeUnknown(FailoverError):
    """COMMIT was sent, the reply was lost, and the server could not say what happened.

    The unit may or may not have committed; it was not run again. ``xid`` is the
    transaction id that was being committed (text), when it was known; ``token`` the
    unit's token in the commit ledger, when it used the ledger (then look it up in
    ``symfo_failover.ledger`` once a server answers).
    """

    def __init__(self, message: str, *, failure: Failure, xid: str | None,
                 token: str | None = None) -> None:
        super().__init__(message, failure=failure)
        self.xid = xid
        self.token = token


class LedgerUnavailable(LibraryError):
    """``ledger="require"``, and the server has no commit ledger this role may use.

    Raised at connect (and by ``run()`` of a read-write unit on a session without it),
    before anything ran. The message names the install command; ``reason`` says what
    is missing.
    """

    def __init__(self, message: str, *, reason: str, failure: Failure | None = None) -> None:
        super().__init__(message, failure=failure or ledger_failure(message))
        self.reason = reason


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


class UnitContractError(LibraryError, RuntimeError):
    """A unit of work broke the contract of `run()`; nothing it wrote was committed.

    ``rule`` names the rule it broke (one of `CONTRACT_RULES`). The unit was not run
    again: a broken contract is a bug in the unit, not a failover. Raised as a subclass
    of the driver's ``ProgrammingError`` too, the way psycopg refuses ``commit()``
    inside ``Connection.transaction()``.
    """

    def __init__(self, message: str, *, rule: str, failure: Failure | None = None) -> None:
        super().__init__(message, failure=failure or contract_failure(rule, message))
        self.rule = rule


#: The rules of the unit-of-work contract, by the names `UnitContractError.rule` uses.
CONTRACT_RULES: dict[str, str] = {
    "nested-run": "run() was called inside a unit of work on the same connection",
    "ended-transaction": "the unit ended the transaction that run() began (commit, "
                         "rollback, a COMMIT or ROLLBACK statement, or autocommit)",
    "closed-connection": "the unit closed the connection it was given",
    "swallowed-error": "the unit caught a database error and returned; the transaction "
                       "had failed",
    "connection-in-unit": "the ResilientConnection was used inside its own unit of work; "
                          "use the connection the unit was given",
    "open-transaction": "run() was called inside an open passthrough transaction",
    "used-after-unit": "the connection lent to a unit was used after the unit ended",
}


def _never_retried(message: str, rule: str, condition: str) -> Failure:
    """A classification of the library's own: no SQLSTATE, never retried."""
    return Failure(kind=Kind.NOT_RETRYABLE, sqlstate=None, retryable=False,
                   reconnect=False, message=message, rule=rule, condition=condition)


def contract_failure(rule: str, message: str) -> Failure:
    """The classification `UnitContractError` carries: a bug, never retried."""
    return _never_retried(message, f"unit contract: {rule}", "unit_contract_violated")


def ledger_failure(message: str) -> Failure:
    """The classification `LedgerUnavailable` carries: configuration, never retried."""
    return _never_retried(message, "commit ledger unavailable", "ledger_unavailable")


def outcome_unknown_failure(reason: str) -> Failure:
    """The classification carried by `CommitOutcomeUnknown`: never retry it blindly."""
    return _never_retried(f"the outcome of COMMIT is unknown: {reason}",
                          "commit outcome unknown", "commit_outcome_unknown")


def flavoured(cls: type[_E], driver_error: type[BaseException] | None) -> type[_E]:
    """``cls`` as a subclass of the driver's exception too (cached per pair).

    The class shows as ``symfo_failover.<Name>`` in tracebacks; its ``driver`` says
    whose exception it also is.
    """
    if driver_error is None:
        return cls
    key = (cls, driver_error)
    with _lock:
        combined = _combined.get(key)
        if combined is None:
            combined = type(cls.__name__, (cls, driver_error), {
                "__module__": PUBLIC_MODULE,
                "__doc__": cls.__doc__,
                "driver_error": driver_error,
            })
            combined.__qualname__ = cls.__qualname__
            _combined[key] = combined
            _origins[combined] = key
    return combined


def _origin(cls: type[Any]) -> tuple[type[Any], type[BaseException] | None]:
    with _lock:
        pair = _origins.get(cls)
    return pair if pair is not None else (cls, None)


def _restore(
    base: type[LibraryError],
    driver_error: type[BaseException] | None,
    args: tuple[Any, ...],
    state: dict[str, Any],
) -> LibraryError:
    cls = flavoured(base, driver_error)
    error = cls.__new__(cls, *args)
    # The driver's own initialiser sets its private attributes (psycopg's diagnostics).
    (driver_error or Exception).__init__(error, *args)
    error.__dict__.update(state)
    return error


_combined: dict[tuple[type[Any], type[BaseException]], type[Any]] = {}
_origins: dict[type[Any], tuple[type[Any], type[BaseException]]] = {}
_lock = threading.Lock()

for _cls in (FailoverError, CommitOutcomeUnknown, RetriesExhausted,
             UnitContractError):
    _cls.__module__ = PUBLIC_MODULE
