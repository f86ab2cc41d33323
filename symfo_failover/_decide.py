"""What to do after a failure, and what an interrupted COMMIT's status means. No I/O.

These are the rules of DESIGN §3 as pure functions of data; the resilient connection
carries them out. ``docs/concepts.md`` explains them for users.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ._kind import Failure, Kind


class Phase(enum.Enum):
    """Where a unit of work was when it failed."""

    #: Making a session: nothing reached the server.
    CONNECT = "connect"
    #: Inside the transaction, before COMMIT was sent: the server rolls it back.
    UNIT = "unit"
    #: COMMIT was sent and no answer came back (or the session died answering).
    COMMIT = "commit"


class Step(enum.Enum):
    """The next step after a failure."""

    #: Roll back and run the unit again on the same session.
    RETRY = "retry"
    #: Make a new session (after the policy's wait), then run the unit again.
    RECONNECT = "reconnect"
    #: Make a new session and ask the server what became of the COMMIT.
    RESOLVE = "resolve"
    #: Give the failure to the caller.
    RAISE = "raise"


@dataclass(frozen=True)
class Situation:
    """What the connection knows when a failure happens."""

    phase: Phase
    #: The session still works (not broken or closed, as the driver sees it).
    session_usable: bool
    #: This session was made during the current call, after an earlier failure.
    fresh_session: bool = False
    #: The unit already ran again once because of a lost prepared statement (26000).
    state_lost_retried: bool = False


def next_step(failure: Failure, situation: Situation) -> Step:
    """The step for ``failure`` in ``situation`` (DESIGN §3)."""
    phase = situation.phase
    if phase is Phase.CONNECT:
        return Step.RECONNECT if failure.retryable else Step.RAISE

    session_gone = failure.reconnect or not situation.session_usable
    if phase is Phase.COMMIT and (session_gone or failure.sqlstate is None):
        # No answer to COMMIT from a live server: it may have committed. Only the
        # server can tell (pg_xact_status); never guess.
        return Step.RESOLVE

    # The server answered with an error, or the session died before COMMIT was sent:
    # either way the transaction was rolled back.
    if session_gone:
        return Step.RECONNECT if failure.retryable else Step.RAISE
    if failure.kind is Kind.TRANSACTION_CONFLICT:
        return Step.RETRY
    if failure.kind is Kind.SESSION_STATE_LOST:
        # 26000: a prepared statement vanished with the old session. Worth one more
        # run only on a session made during this call; otherwise it is a plain bug.
        if situation.fresh_session and not situation.state_lost_retried:
            return Step.RETRY
        return Step.RAISE
    if failure.kind in (Kind.CONNECTION_LOST, Kind.CONNECT_FAILED) and failure.retryable:
        return Step.RECONNECT
    return Step.RAISE


class Resolution(enum.Enum):
    """What the status of the interrupted transaction means for the unit."""

    #: It committed: return the unit's result, do not run it again.
    COMMITTED = "committed"
    #: It rolled back: run the unit again.
    ABORTED = "aborted"
    #: Still running on the old session (a network break): end that session, ask again.
    END_OLD_SESSION = "end_old_session"
    #: The server cannot tell (too old, unknown, in the future): raise, never guess.
    UNKNOWN = "unknown"


def resolve(status: str | None) -> Resolution:
    """Map ``pg_xact_status(xid)`` (``None``: no answer) to a `Resolution`."""
    if status == "committed":
        return Resolution.COMMITTED
    if status == "aborted":
        return Resolution.ABORTED
    if status == "in progress":
        return Resolution.END_OLD_SESSION
    return Resolution.UNKNOWN


@dataclass(frozen=True)
class CommitEvidence:
    """What the server said about a transaction whose COMMIT reply was lost.

    ``restarted``: the server that answers is not the one the COMMIT was sent to (its
    start time changed). Then the transaction id may have been **handed out again**:
    ids that never reached the write-ahead log before a crash are reused by the server
    that recovers (measured here: see docs/resilient.md), so ``committed`` may be
    somebody else's commit. Every other answer stays sound: a transaction that
    committed had its commit record, with its id, in the log, so its id was not reused
    and its status reads ``committed``.
    """

    #: ``pg_xact_status``: committed, aborted, in progress; ``future`` when the server
    #: said the id is in the future; None when it gave no answer.
    status: str | None
    restarted: bool


def resolve_commit(evidence: CommitEvidence) -> Resolution:
    """The outcome of the lost COMMIT, never guessed (DESIGN §3, plus id reuse)."""
    status = evidence.status
    if not evidence.restarted:
        # One server throughout: ids are never reused, every answer is final.
        return resolve(status)
    if status in ("aborted", "in progress", "future"):
        # The old session is gone with the old server; whatever holds the id now is
        # not us, and had we committed the id could not have been reused.
        return Resolution.ABORTED
    return Resolution.UNKNOWN
