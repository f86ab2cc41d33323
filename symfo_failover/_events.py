"""Structured events: frozen dataclasses given to an ``on_event`` hook and logged.

Each event is also one log line on the ``symfo_failover`` logger, so a deployment
sees failovers in its logs without writing a hook (``docs/logging.md``):

- by default through the standard library's ``logging.getLogger("symfo_failover")``,
  which has a ``NullHandler`` as a library's logger should: nothing is printed until
  the application configures logging. The message reads ``name key=value ...``; the
  fields are also on the record (``record.symfo_event``, ``record.symfo_fields`` and
  one attribute per field);
- once the application has configured structlog, natively through
  ``structlog.get_logger("symfo_failover")``, into the application's pipeline.

Events never hold a password or a whole connection string: ``target`` is a redacted
description, and the driver's message in ``FailureDetected.error`` is scrubbed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass
from typing import Any, ClassVar

import structlog

from ._kind import Failure


@dataclass(frozen=True)
class Event:
    """Fields every event has: where (``target``) and how long into the call (``elapsed``)."""

    name: ClassVar[str] = "event"
    level: ClassVar[str] = "info"

    target: str
    elapsed: float

    def fields(self) -> dict[str, Any]:
        """The event as flat, loggable values."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Failure):
                out["kind"] = value.kind.value
                out["sqlstate"] = value.sqlstate
                out["rule"] = value.rule
            elif isinstance(value, float):
                out[f.name] = round(value, 6)
            else:
                out[f.name] = value
        return out


@dataclass(frozen=True)
class FailureDetected(Event):
    """A call failed; ``phase`` is ``connect``, ``unit``, ``commit`` or ``passthrough``."""

    name: ClassVar[str] = "failure_detected"
    level: ClassVar[str] = "warning"

    failure: Failure
    phase: str
    attempt: int
    #: The driver's own message: its first line, at most 300 characters, passwords
    #: scrubbed. Empty when not known; then it is left out of the log line.
    error: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "error", driver_message(self.error))

    def fields(self) -> dict[str, Any]:
        out = super().fields()
        if not out["error"]:
            del out["error"]
        return out


@dataclass(frozen=True)
class ReconnectAttempt(Event):
    """A new session is being made (``attempt`` counts the tries of this call)."""

    name: ClassVar[str] = "reconnect_attempt"

    attempt: int


@dataclass(frozen=True)
class Reconnected(Event):
    """A new session is ready.

    ``failover`` is true when the server is not the one the previous session talked
    to (its start time changed): a restart or a switch to the other node, not a blip.
    ``ended_old_session`` says the old session was still alive on the server (a network
    break) and was terminated so that it can neither commit nor hold locks.
    """

    name: ClassVar[str] = "reconnected"

    backend_pid: int
    server_started: str
    previous_server_started: str | None
    failover: bool
    ended_old_session: bool


@dataclass(frozen=True)
class UnitReplayed(Event):
    """A unit of work runs again; ``reason`` is the kind of failure that caused it."""

    name: ClassVar[str] = "unit_replayed"

    attempt: int
    reason: str


@dataclass(frozen=True)
class CommitResolved(Event):
    """The outcome of an interrupted COMMIT, as the server told it.

    ``status``: ``committed``, ``aborted``, ``no transaction id`` (nothing was written)
    or ``unknown``. ``outcome``: ``returned`` (not run again), ``replayed`` or ``raised``.
    ``via``: what decided it: ``ledger`` (the unit's token in the commit ledger, then
    ``token`` is set), ``xid`` (``pg_xact_status``) or ``none``.
    """

    name: ClassVar[str] = "commit_resolved"

    xid: str | None
    status: str
    outcome: str
    terminated_old_session: bool
    via: str = "xid"
    token: str | None = None


@dataclass(frozen=True)
class UnitInterrupted(Event):
    """A `run()` was interrupted: a task was cancelled (``asyncio.timeout``,
    ``task.cancel()``, a client that went away) or Ctrl-C was pressed. The call
    raises the interruption after this event.

    ``phase``: where the call was (``connect``, ``unit``, ``commit``). ``outcome``:
    what became of the unit: ``not begun``, ``rolled back`` (nothing committed),
    ``committed`` (the COMMIT was in flight and was let finish) or ``unknown`` (the
    COMMIT did not finish in time, or a lost COMMIT was being asked about: look up
    ``token`` in ``symfo_failover.ledger`` when it is set, else ``xid`` with
    ``pg_xact_status``).
    """

    name: ClassVar[str] = "unit_interrupted"
    level: ClassVar[str] = "warning"

    phase: str
    xid: str | None
    outcome: str
    interruption: str
    token: str | None = None


@dataclass(frozen=True)
class LedgerNotUsed(Event):
    """A session's read-write units go without the commit ledger (``ledger="auto"``):
    a lost COMMIT after a crash may then end in `CommitOutcomeUnknown`. Once per
    session; ``reason`` says why (not installed, a privilege missing, revoked)."""

    name: ClassVar[str] = "ledger_not_used"
    level: ClassVar[str] = "info"

    reason: str


@dataclass(frozen=True)
class LedgerPruned(Event):
    """A session deleted old tokens from the commit ledger (at most about once a
    minute). ``deleted``: rows; ``retention``: seconds kept; ``error``: why it could
    not (the session goes on; a role without DELETE stops pruning)."""

    name: ClassVar[str] = "ledger_pruned"
    level: ClassVar[str] = "debug"

    deleted: int
    retention: float
    error: str | None = None


@dataclass(frozen=True)
class PoolFailover(Event):
    """A pool noticed a failover: the server went away (``reason="server went
    away"``) or a new connection reached a server with a different start time
    (``reason="new server"``). Logged once per failover, however many connections
    noticed it. ``closed_idle`` idle connections to the old server were closed at once;
    the ones in use are replaced when they come back.
    """

    name: ClassVar[str] = "pool_failover"
    level: ClassVar[str] = "warning"

    pool: str
    reason: str
    previous_server_started: str | None
    server_started: str | None
    closed_idle: int
    failovers: int


@dataclass(frozen=True)
class PoolRefilled(Event):
    """After a failover, the pool is full again of connections to the new server;
    ``seconds`` from noticing the failover (``elapsed`` is the same)."""

    name: ClassVar[str] = "pool_refilled"

    pool: str
    seconds: float
    connections: int


@dataclass(frozen=True)
class PoolConnectionReplaced(Event):
    """One pooled connection was closed and is being replaced. ``reason``: ``dead``
    (found dead before it was handed out: no request saw it), ``returned broken``,
    ``old server`` (it belongs to the server before a failover)."""

    name: ClassVar[str] = "pool_connection_replaced"
    level: ClassVar[str] = "debug"

    pool: str
    reason: str


@dataclass(frozen=True)
class GaveUp(Event):
    """The policy ran out; the call raises."""

    name: ClassVar[str] = "gave_up"
    level: ClassVar[str] = "error"

    failure: Failure
    attempts: int


EventHook = Callable[[Event], None]

LOGGER_NAME = "symfo_failover"
ERROR_LIMIT = 300

# Passwords a driver might echo back from a connection string: key=value, quoted or
# not (libpq), Key={value} (ODBC) and user:password@ in a URI.
_SECRET = re.compile(
    r"""(?ix)
    \b(password|passwd|pwd)(\s*=\s*)
      ('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*"|\{(?:[^}]|\}\})*\}|[^\s;]+)
    | (://[^/\s:@]*:)[^/\s@]*(@)
    """
)


def driver_message(text: str) -> str:
    """``text`` made fit for a log line: the first line, stripped, at most
    ``ERROR_LIMIT`` characters, with anything that looks like a password replaced."""
    lines = str(text or "").strip().splitlines()
    first = lines[0].strip() if lines else ""
    return _SECRET.sub(_redact, first)[:ERROR_LIMIT]


def _redact(match: re.Match[str]) -> str:
    if match.group(1) is not None:
        return f"{match.group(1)}{match.group(2)}***"
    return f"{match.group(4)}***{match.group(5)}"


_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO,
           "warning": logging.WARNING, "error": logging.ERROR}
# Attributes a LogRecord has already: `extra` may not overwrite them.
_RECORD_ATTRIBUTES = frozenset(
    logging.LogRecord("", 0, "", 0, "", (), None).__dict__
) | {"message", "asctime"}
_PLAIN = re.compile(r'[^\s"=\\]+')


def _value(value: Any) -> str:
    if isinstance(value, str):
        return value if _PLAIN.fullmatch(value) else json.dumps(value, ensure_ascii=False)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def render_message(name: str, fields: dict[str, Any]) -> str:
    """``name key=value ...``: what happened first, then where (``elapsed``, ``target``).

    ``rule`` is left out when it is the SQLSTATE itself; the record keeps every field.
    """
    shown = {k: v for k, v in fields.items() if k not in ("target", "elapsed")}
    if shown.get("rule") == shown.get("sqlstate"):
        shown.pop("rule", None)
    for key in ("elapsed", "target"):
        if key in fields:
            shown[key] = fields[key]
    return " ".join([name, *(f"{k}={_value(v)}" for k, v in shown.items())])


def _to_stdlib(
    logger: Any, method_name: str, event_dict: MutableMapping[str, Any]
) -> tuple[tuple[str], dict[str, Any]]:
    """The last processor of the stdlib path: a plain message, the fields as extras."""
    name = str(event_dict.pop("event"))
    fields = dict(event_dict)
    extra = {k: v for k, v in fields.items() if k not in _RECORD_ATTRIBUTES}
    extra.update(symfo_event=name, symfo_fields=fields)
    return (render_message(name, fields),), {"extra": extra}


_stdlib_logger = logging.getLogger(LOGGER_NAME)
_stdlib_logger.addHandler(logging.NullHandler())  # silent until the application says
_stdlib = structlog.wrap_logger(
    _stdlib_logger,
    processors=[_to_stdlib],
    wrapper_class=structlog.stdlib.BoundLogger,
    context_class=dict,
    cache_logger_on_first_use=True,
)
_native = structlog.get_logger(LOGGER_NAME)


def _log(level: str, name: str, fields: Callable[[], dict[str, Any]]) -> None:
    if structlog.is_configured():  # the application's own structlog pipeline
        getattr(_native, level)(name, **fields())
    elif _stdlib_logger.isEnabledFor(_LEVELS[level]):  # before any formatting work
        getattr(_stdlib, level)(name, **fields())


def log(level: str, name: str, **fields: Any) -> None:
    """Log one line that is not an event (no hook sees it) the way events are logged."""
    _log(level, name, fields.copy)


def emit(event: Event, hook: EventHook | None, *, level: str | None = None) -> None:
    """Log ``event`` and hand it to ``hook``. A failing hook is logged, never raised.

    ``level`` overrides the event's own log level (the library logs the repeats of one
    call's retries at DEBUG, so that waiting for a server is one warning, not hundreds).
    """
    _log(level or event.level, event.name, event.fields)
    if hook is None:
        return
    try:
        hook(event)
    except Exception as exc:  # an observer must not change what the application sees
        failed = {"hook_event": event.name, "error": type(exc).__name__}
        _log("error", "event_hook_failed", failed.copy)
