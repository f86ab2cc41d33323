"""Structured events: frozen dataclasses given to an ``on_event`` hook and logged.

Each event is also one structlog line on the ``symfo_failover`` logger, so a
deployment sees failovers in its logs without writing a hook. Events never hold a
password or a whole connection string: ``target`` is a redacted description.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
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
    """

    name: ClassVar[str] = "commit_resolved"

    xid: str | None
    status: str
    outcome: str
    terminated_old_session: bool


@dataclass(frozen=True)
class GaveUp(Event):
    """The policy ran out; the call raises."""

    name: ClassVar[str] = "gave_up"
    level: ClassVar[str] = "error"

    failure: Failure
    attempts: int


EventHook = Callable[[Event], None]

_log = structlog.get_logger("symfo_failover")


def emit(event: Event, hook: EventHook | None) -> None:
    """Log ``event`` and hand it to ``hook``. A failing hook is logged, never raised."""
    getattr(_log, event.level)(event.name, **event.fields())
    if hook is None:
        return
    try:
        hook(event)
    except Exception as exc:  # an observer must not change what the application sees
        _log.error("event_hook_failed", hook_event=event.name, error=type(exc).__name__)
