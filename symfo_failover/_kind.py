"""What a failure means for the application: the `Kind` and the `Failure` record."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Kind(enum.Enum):
    """What happened, from the application's point of view."""

    #: The session died (server shut down, crashed, node down, network cut).
    #: Work in flight was rolled back by the server; a new session is needed.
    CONNECTION_LOST = "connection_lost"
    #: No session could be made (server down, starting up, switching nodes).
    #: Nothing reached the server; trying again later is safe.
    CONNECT_FAILED = "connect_failed"
    #: The session is fine but state it relied on is gone (a prepared
    #: statement that lived on the old session).
    SESSION_STATE_LOST = "session_state_lost"
    #: Serialization failure or deadlock: the transaction was rolled back and
    #: may be run again on the same session.
    TRANSACTION_CONFLICT = "transaction_conflict"
    #: Anything else: bad input, constraint, authentication, unknown codes.
    NOT_RETRYABLE = "not_retryable"

    @property
    def retryable(self) -> bool:
        """Whether work that failed this way may be run again."""
        return self is not Kind.NOT_RETRYABLE

    @property
    def needs_new_session(self) -> bool:
        """Whether this kind, by itself, means the session is unusable."""
        return self in (Kind.CONNECTION_LOST, Kind.CONNECT_FAILED)


@dataclass(frozen=True)
class Failure:
    """The classification of one error.

    ``retryable`` says whether the work may be run again; ``reconnect`` says
    whether a new session is needed first (it can be true for a failure that is
    not retryable: the session is gone, but running the work again would not help).
    ``rule`` names the row of the classification table that decided.
    """

    kind: Kind
    sqlstate: str | None
    retryable: bool
    reconnect: bool
    message: str
    rule: str = ""
    condition: str = ""

    def __str__(self) -> str:
        code = self.sqlstate or "no SQLSTATE"
        return f"{self.kind.name} ({code}): {self.message}"
