"""What to do after a failure, and what an interrupted COMMIT's status means. No I/O.

These are the rules of DESIGN §3 as pure functions of data; the resilient connection
carries them out. ``docs/concepts.md`` explains them for users.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace

from ._kind import Failure, Kind
from ._sqlstates import NO_SQLSTATE_AUTH, lookup


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
    #: Return the unit's result: a read-only unit lost the reply to COMMIT, and had
    #: nothing to commit.
    RETURN = "return"


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
    #: The transaction has an id (False: a read-only unit, which writes nothing).
    has_xid: bool = True


def next_step(failure: Failure, situation: Situation) -> Step:
    """The step for ``failure`` in ``situation`` (DESIGN §3)."""
    phase = situation.phase
    if phase is Phase.CONNECT:
        return Step.RECONNECT if failure.retryable else Step.RAISE

    session_gone = failure.reconnect or not situation.session_usable
    if phase is Phase.COMMIT and (session_gone or failure.sqlstate is None):
        # No answer to COMMIT from a live server: it may have committed. Only the
        # server can tell (pg_xact_status); never guess. A read-only unit wrote
        # nothing: whatever became of its COMMIT, its result stands.
        return Step.RESOLVE if situation.has_xid else Step.RETURN

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


#: What `run()` does with each resolution (the ``outcome`` of `CommitResolved`).
OUTCOME = {
    Resolution.COMMITTED: "returned",
    Resolution.ABORTED: "replayed",
    Resolution.UNKNOWN: "raised",
    Resolution.END_OLD_SESSION: "asked again",
}


#: Appended to every unknown outcome of the transaction-id path.
LEDGER_ADVICE = ("; the commit ledger makes this outcome provable: install it with "
                 "symfo-failover ledger install CONNINFO")


def unknown_outcome_reason(evidence: CommitEvidence, xid: str) -> str:
    """Why `resolve_commit` said UNKNOWN, for `CommitOutcomeUnknown`'s message."""
    if evidence.status == "committed":
        return (f"transaction {xid} shows as committed, but the server restarted in "
                "between and may have handed the id out again, so that answer may be "
                "another transaction's" + LEDGER_ADVICE)
    return f"pg_xact_status({xid}) gave no answer ({evidence.status!r})" + LEDGER_ADVICE


def resolve_claim(answer: str | None) -> Resolution:
    """What a claim of the unit's ledger token (`_ledger.claim_answer`) means.

    After the old session was fenced, the token's row is either committed (the claim
    hits the primary key: 23505), held by a transaction still open (the claim waits
    and times out: 55P03), or absent, and then it never will be there: the token is
    inserted first in the unit's transaction, so a transaction that could still
    commit would hold the row. Every answer is final, across crashes and promotions.
    """
    return _CLAIMED.get(answer or "", Resolution.UNKNOWN)


_CLAIMED = {"committed": Resolution.COMMITTED, "free": Resolution.ABORTED,
            "held": Resolution.END_OLD_SESSION}


def unknown_claim_reason(answer: str | None, said: str = "") -> str:
    """Why `resolve_claim` said UNKNOWN."""
    detail = f" ({said})" if said else ""
    if answer == "missing":
        return ("the server that answered has no commit ledger this role may use"
                f"{detail}: the unit's token cannot be looked up there")
    return f"the ledger claim gave no answer{detail}"


#: The rule of a read-write unit that landed on a standby.
WRONG_SERVER = "read-write unit on a server in recovery"


def wrong_server_failure(target: str) -> Failure:
    """A session on a standby (``pg_is_in_recovery()``) for a read-write unit: the
    wrong server, not the application's error. Reconnect, within the policy: the
    access point reaches the primary once the cluster has one."""
    return Failure(
        kind=Kind.CONNECTION_LOST, sqlstate="25006", retryable=True, reconnect=True,
        message=f"the session reached a server in recovery (a standby) through {target}; "
                "a read-write unit needs the primary: reconnecting",
        rule=WRONG_SERVER, condition="read_only_sql_transaction")


def connect_failure(failure: Failure, *, connected_before: bool) -> Failure:
    """A failed connect, read in the light of whether these settings worked before.

    libpq's "failed after the server asked for a password" (no SQLSTATE) is what a
    wrong password gives, and also what a server shutting down mid-handshake gives.
    Once a session was made with the same settings it is the second: retry.
    """
    if connected_before and failure.rule == NO_SQLSTATE_AUTH.code:
        return replace(failure, kind=Kind.CONNECT_FAILED, retryable=True)
    return failure


@dataclass(frozen=True)
class ProbeAnswer:
    """What one endpoint answered a startup packet (see `symfo_failover._probe`)."""

    endpoint: str
    #: ``accepting``, ``refused``, ``error``, ``timeout`` or ``unreachable``.
    state: str
    sqlstate: str | None = None
    #: The probe got past authentication (the login itself works).
    authenticated: bool = False
    #: The server said it is a standby (``in_hot_standby``); None: not known.
    standby: bool | None = None


@dataclass(frozen=True)
class LoginVerdict:
    """What a failed first connect means, once the servers were asked."""

    failure: Failure
    #: Some server is up and accepts this login now: try once more at once.
    try_again_now: bool = False
    #: No server answered at all: the call will wait for one (say so, once).
    nobody_answers: bool = False


#: The rule of a failed connect to a server that is up.
SERVER_UP = "connect failed, server up"

#: libpq's messages when ``target_session_attrs`` found no suitable server (libpq 14+:
#: read-write, read-only, primary, standby; older: "could not make a writable ...").
_STANDBY_TEXT = re.compile(
    r"session is read-only|session is not read-only|server is in hot standby mode|"
    r"server is not in hot standby mode|could not make a writable connection")


def is_login_question(failure: Failure) -> bool:
    """A failed connect that may be the login's fault rather than a server's absence."""
    return failure.kind is Kind.CONNECT_FAILED or failure.rule == NO_SQLSTATE_AUTH.code


def first_connect_failure(
    failure: Failure, answers: Sequence[ProbeAnswer], *, driver_text: str = ""
) -> LoginVerdict:
    """Decide a failed *first* connect from what each server answered (no I/O).

    Drivers report a wrong password, a missing database and a server that is down
    alike (psqlODBC: 08001 for all; psycopg: no SQLSTATE), so the servers are asked
    with a startup packet, which gives the server's own SQLSTATE in any language.
    """
    if not is_login_question(failure):
        return LoginVerdict(failure)
    said = f" Driver said: {driver_text}" if driver_text else ""
    if answers and all(a.state in ("refused", "timeout", "unreachable") or a.standby
                       for a in answers) and any(a.standby for a in answers):
        # Only standbys answer (a replica cluster between the primary's loss and the
        # promotion; a read-write connection string skips them): wait for a primary.
        where = ", ".join(a.endpoint for a in answers if a.standby)
        return LoginVerdict(replace(
            failure, kind=Kind.CONNECT_FAILED, retryable=True,
            message=f"no writable server yet: only standbys answer ({where}).{said}"),
            nobody_answers=True)
    if _STANDBY_TEXT.search(driver_text):
        # libpq's own words for target_session_attrs found no server of the kind
        # asked for (the probe could not log in to see it): a failover in progress.
        return LoginVerdict(replace(
            failure, kind=Kind.CONNECT_FAILED, retryable=True,
            message=f"no server of the kind the connection string asks for "
                    f"(target_session_attrs) answers yet.{said}"), nobody_answers=True)
    for answer in answers:
        if answer.standby:
            continue  # not the kind of server asked for: the next one decides
        if answer.state == "error" and answer.sqlstate:
            rule = lookup(answer.sqlstate)
            what = f"{answer.sqlstate} ({rule.condition}): {rule.why}"
            if rule.retryable:
                # Up, but not accepting sessions yet (57P03 starting, 53300 full).
                return LoginVerdict(replace(
                    failure, kind=Kind.CONNECT_FAILED, retryable=True,
                    sqlstate=answer.sqlstate,
                    message=f"the server at {answer.endpoint} is not accepting this "
                            f"connection yet, {what}{said}"))
            return LoginVerdict(replace(
                failure, kind=Kind.NOT_RETRYABLE, retryable=False,
                sqlstate=answer.sqlstate, rule=SERVER_UP, condition=rule.condition,
                message=f"the server at {answer.endpoint} refused this login with "
                        f"{what}{said}"))
        if answer.state in ("accepting", "error"):
            if answer.authenticated:
                how = "accepts this login now"
            elif failure.rule == NO_SQLSTATE_AUTH.code:
                how = ("is up and asked for a password, and the login failed: a wrong "
                       "password, an unknown role or a missing database (the server says "
                       "which only after authentication, which the probe could not do here)")
            else:
                how = "is up but refused this connection: check the user, password, " \
                      "database and options"
            return LoginVerdict(
                replace(failure, kind=Kind.NOT_RETRYABLE, retryable=False, rule=SERVER_UP,
                        message=f"the server at {answer.endpoint} {how}.{said}"),
                try_again_now=True,
            )
    return LoginVerdict(failure, nobody_answers=bool(answers) and failure.retryable)
