"""The unit-of-work protocol, written once, with no I/O.

Everything that sequences a unit of work lives here: begin with the transaction id,
call the unit, commit, classify a failure, decide (`_decide`), reconnect, fence the
old session, resolve a lost COMMIT, restore the session's settings, emit events, and
the retry loop around it all. It is written as generators ("flows"): a flow *yields
an operation*, a tuple ``(OP, *args)`` naming one piece of I/O, and is sent back the
operation's result, or has its exception thrown in at the ``yield``.

Runners carry the operations out: `ResilientConnection` with blocking calls,
`AsyncResilientConnection` with awaits (``_connection.py``, ``_aconnection.py``).
That is all they do; there is no second copy of the logic. The choice (a generator
core rather than async source with generated sync code) is explained in
``docs/development.md``.

Local facts about a session (is it broken, is a transaction open, what a unit left
behind) are attribute reads on the driver's connection object, not I/O: the core
reads them from the adapter directly.

A *session source* makes and discards sessions (`OP_CONNECT`, `OP_DISCARD`); the
runner owns it. A plain connection's source is the driver itself; a pooled one is
another source. The state kept across calls is `Link`; the state of one call is
`Call`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Generator
from dataclasses import dataclass, replace
from typing import Any, Protocol, TypeVar

import tenacity

from . import _events as ev
from . import _ledger as lg
from ._classify import classify, driver_text
from ._contract import UnitGuard
from ._decide import (
    OUTCOME,
    CommitEvidence,
    Phase,
    ProbeAnswer,
    Resolution,
    Situation,
    Step,
    connect_failure,
    first_connect_failure,
    is_login_question,
    next_step,
    resolve_claim,
    resolve_commit,
    unknown_claim_reason,
    unknown_outcome_reason,
    wrong_server_failure,
)
from ._errors import (
    CommitOutcomeUnknown,
    LedgerUnavailable,
    RetriesExhausted,
    UnitContractError,
    flavoured,
    outcome_unknown_failure,
)
from ._kind import Failure, Kind
from ._policy import RetryPolicy
from ._target import Facts, SessionInfo, SessionState, Target

_T = TypeVar("_T")

#: One operation: ``(OP_..., *args)``.
Op = tuple[Any, ...]
#: A flow: yields operations, is sent their results, returns ``_T``.
Flow = Generator[Op, Any, _T]

# --- the operations a runner carries out ------------------------------------------------
# Each names one piece of I/O; the comment gives its arguments and what it returns.
OP_CONNECT = 0  # () -> a new session, from the session source
OP_DISCARD = 1  # (raw,) -> None: give the session up (close it)
OP_INFO = 2  # (raw,) -> SessionInfo
OP_END_SESSION = 3  # (raw, SessionInfo) -> bool: fence an old session of ours
OP_APPLY_STATE = 4  # (raw, SessionState) -> None
OP_CONFIGURE = 5  # (raw,) -> None: the application's configure(raw)
OP_BEGIN = 6  # (raw, SessionState, token, how) -> the transaction id (None when read-only
#               or with a ledger token, which is inserted in the same message instead;
#               ``how``: `_ledger.How`)
OP_UNIT = 7  # (job, lent) -> the unit's result: the runner calls (or awaits) it
OP_COMMIT = 8  # (raw,) -> None
OP_ROLLBACK = 9  # (raw,) -> None
OP_XACT_STATUS = 10  # (raw, xid) -> pg_xact_status, None when no answer
OP_AUTOCOMMIT = 11  # (raw, bool) -> None
OP_SLEEP = 12  # (seconds,) -> None
OP_PROBE = 13  # (Target,) -> list[ProbeAnswer]: ask each server with a startup packet
OP_CLAIM = 14  # (raw, token, lock_timeout_ms) -> None: `_ledger.claim_sql`, rolled back;
#                raises the driver's error (23505, 55P03, ...) as the server gave it
OP_PRUNE = 15  # (raw, retention, batch) -> rows deleted from the ledger (autocommit)
N_OPS = 16

#: What a runner passes as a unit: ``(fn, args, kwargs)``.
Job = tuple[Callable[..., Any], tuple[Any, ...], dict[str, Any]]

#: Set on a `BaseException` by a runner that let an interrupted COMMIT finish: what
#: became of it (``committed``, ``rolled back``, ``unknown``).
COMMIT_OUTCOME_ATTR = "_symfo_commit_outcome"


class SessionSource(Protocol):
    """Where sessions come from: the seam a pool plugs into.

    The sync runner calls these directly; the async runner awaits them.
    """

    def connect(self) -> Any: ...
    def discard(self, raw: Any) -> Any: ...


class Again(Exception):
    """This try failed in a way the policy may retry."""

    def __init__(self, failure: Failure, phase: Phase) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.phase = phase


class SessionLostUnderUnit(Exception):
    """The unit returned, but its session had died under it (the unit caught it)."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure

    def as_driver_error(self, driver: Facts[Any]) -> BaseException:
        error = driver.operational_error(
            "the session was lost during the unit of work (the unit caught the error)")
        attach(error, self.failure)
        return error


@dataclass(slots=True)
class Pending:
    """A COMMIT whose reply was lost: what is needed to ask the server about it (the
    transaction id, or the unit's ledger token)."""

    xid: str | None
    result: Any
    session: SessionInfo | None
    token: str | None = None


@dataclass(slots=True)
class Call:
    """The state of one `run` (or one reconnect) across its tries."""

    started: float
    attempts: int = 0
    failure: Failure | None = None
    #: The session in use was made during this call.
    fresh_session: bool = False
    #: The unit already ran again once for a lost prepared statement (26000).
    state_lost_retried: bool = False
    pending: Pending | None = None
    #: The unit started at least once.
    ran: bool = False
    #: Where the call is now (what an interruption would interrupt).
    phase: Phase = Phase.CONNECT
    xid: str | None = None
    #: The unit's ledger token: made at its first BEGIN with the ledger, kept for its
    #: replays (so that a committed first run is always found).
    token: str | None = None


@dataclass(slots=True)
class Link:
    """What the connection keeps across calls: its session and what it knows of it."""

    raw: Any = None
    info: SessionInfo | None = None
    #: A session given up after a failure: fenced by the next one on the same server.
    lost: SessionInfo | None = None
    #: The server's start time as of the last session (None before the first).
    server_started: str | None = None
    #: The last new session ended the old one on the server.
    ended_old: bool = False
    #: A passthrough call may have opened a transaction the driver cannot report (ODBC).
    maybe_in_transaction: bool = False
    #: The guard of the unit running now (None outside units).
    guard: UnitGuard | None = None
    #: Who runs that unit (the async runner: the task), to tell a nested call.
    guard_owner: object = None
    closed: bool = False
    #: The ledger token of the last unit that returned (None: without the ledger).
    last_token: str | None = None


_NOTHING = object()
_PROBE_STOPS = ("refused", "timeout", "unreachable")


class Core:
    """The protocol for one connection: its settings, its `Link`, and the flows."""

    def __init__(
        self,
        driver: Facts[Any],
        target: Target,
        *,
        policy: RetryPolicy,
        on_event: ev.EventHook | None,
        state: SessionState,
        configure: bool,
        ledger: lg.LedgerMode = "auto",
    ) -> None:
        self.ledger = lg.check_mode(ledger)
        self.driver = driver
        self.target = target
        self.policy = policy
        self.on_event = on_event
        self.state = state
        self.configure = configure
        self.link = Link()
        self.contract_error = flavoured(UnitContractError, driver.programming_error)

    # --- calls ---------------------------------------------------------------------------

    def run(self, job: Job) -> Flow[Any]:
        """One `run()`: the unit, committed exactly once, within the policy."""
        call = Call(self.policy.clock())
        try:
            try:
                # The first try straight away: the steady state pays for no more.
                result = yield from self.run_attempt(call, job)
            except Again as exc:
                result = yield from self.retrying(
                    call, lambda: self.run_attempt(call, job), exc)
            self.link.last_token = call.token
            return result
        except (Exception, GeneratorExit):
            raise
        except BaseException as exc:
            # KeyboardInterrupt, or an async cancellation: say what became of the
            # unit, and hand out no session whose state is not known.
            yield from self.interrupted(call, exc)
            raise

    def connect(self) -> Flow[Any]:
        """A session, made within the policy (nothing reached the server before)."""
        call = Call(self.policy.clock())

        def attempt() -> Flow[Any]:
            call.attempts += 1
            return self.session(call)

        return (yield from self.retrying(call, attempt))

    def retrying(
        self, call: Call, attempt: Callable[[], Flow[_T]], first: Again | None = None
    ) -> Flow[_T]:
        """``attempt`` until it succeeds, within the policy; waits are `OP_SLEEP`.
        ``first``: how the first try, made by the caller, failed."""
        if first is None:
            # The first try runs without tenacity: the steady state pays nothing for it.
            try:
                return (yield from attempt())
            except Again as exc:
                first = exc
        last: Again = first
        # The deadline runs from the first failure (RetryPolicy.deadline), not from the
        # start of the call: a long unit that fails late still gets its retries.
        retrying = self.policy.retrying(Again, started=self.policy.clock())
        retrying.begin()
        state = tenacity.RetryCallState(retrying, None, (), {})
        retrying.iter(state)  # tenacity's first try is the one above
        state.set_exception((type(last), last, last.__traceback__))
        try:
            while True:
                do = retrying.iter(state)
                if isinstance(do, tenacity.DoAttempt):
                    try:
                        return (yield from attempt())
                    except Again as exc:
                        last = exc
                        state.set_exception((type(exc), exc, exc.__traceback__))
                elif isinstance(do, tenacity.DoSleep):
                    state.prepare_for_next_attempt()
                    yield (OP_SLEEP, float(do))
                else:  # pragma: no cover - tenacity retries only on Again
                    raise AssertionError(f"unexpected tenacity action {do!r}")
        except tenacity.RetryError:
            raise self.gave_up(call, last.failure) from last.__cause__

    def gave_up(self, call: Call, failure: Failure) -> Exception:
        elapsed = self.policy.clock() - call.started
        self.emit(ev.GaveUp, call, failure=failure, attempts=call.attempts)
        driver = self.driver
        if call.pending is not None:
            return self.pending_unknown(
                call.pending, f"no session to ask the server within {elapsed:.1f} s "
                              f"({call.attempts} tries); last failure: {failure}")
        policy = self.policy
        cls2 = flavoured(RetriesExhausted, driver.operational_error)
        return cls2(
            f"gave up after {call.attempts} tries in {elapsed:.1f} s "
            f"(policy: deadline {policy.deadline} s"
            + (f", attempts {policy.attempts}" if policy.attempts else "")
            + f") with {self.target.description}; last failure: {failure}",
            failure=failure,
            attempts=call.attempts,
            elapsed=elapsed,
            target=self.target.description,
        )

    def pending_unknown(self, pending: Pending, reason: str) -> Exception:
        """`CommitOutcomeUnknown` for a pending COMMIT."""
        cls = flavoured(CommitOutcomeUnknown, self.driver.operational_error)
        what = (f"ledger token {pending.token}" if pending.token is not None
                else f"transaction {pending.xid}")
        return cls(
            f"the outcome of COMMIT ({what}) is unknown: {reason}",
            failure=outcome_unknown_failure(reason),
            xid=pending.xid,
            token=pending.token,
        )

    def interrupted(self, call: Call, exc: BaseException) -> Flow[None]:
        """A call interrupted by a `BaseException` (Ctrl-C, a task's cancellation)."""
        phase = call.phase
        outcome = getattr(exc, COMMIT_OUTCOME_ATTR, None)
        xid = call.pending.xid if call.pending is not None else call.xid
        if phase is Phase.CONNECT and call.pending is None:
            outcome = "not begun" if not call.ran else "rolled back"
        elif phase is Phase.UNIT and call.pending is None:
            outcome = "rolled back"
        elif outcome is None:
            outcome = "unknown"
        raw = self.link.raw
        if raw is not None and not (outcome == "committed" and not self.driver.is_broken(raw)):
            # Its state is not known (a statement may still be running): never hand it
            # out again. Closing it rolls back whatever was open; the next session
            # fences it on the server in case the close did not get there.
            yield from self.drop()
        token = call.pending.token if call.pending is not None else call.token
        self.emit(ev.UnitInterrupted, call, phase=phase.value, xid=xid,
                  outcome=outcome, interruption=type(exc).__name__,
                  token=token if outcome == "unknown" else None)

    # --- one try ---------------------------------------------------------------------

    def run_attempt(self, call: Call, job: Job) -> Flow[Any]:
        call.attempts += 1
        driver = self.driver
        raw = self.link.raw
        if raw is None or driver.is_broken(raw):
            raw = yield from self.session(call)
        if not driver.get_autocommit(raw):
            known = driver.in_transaction(raw)
            if known or (known is None and self.link.maybe_in_transaction):
                raise self.contract_error(
                    "run() was called inside an open passthrough transaction: commit or "
                    "roll it back first (a unit of work is its own transaction); nothing "
                    "ran (rule 'open-transaction')",
                    rule="open-transaction",
                )
            # The unit's BEGIN and COMMIT are ours; passthrough calls switch it back.
            yield (OP_AUTOCOMMIT, raw, True)
        if not self.state.read_only:
            raw = yield from self.writable_session(call, raw)
        if call.pending is not None:
            done, result = yield from self.resolve(call, raw)
            if done:
                return result
        if call.ran and call.failure is not None:
            self.emit(ev.UnitReplayed, call, attempt=call.attempts,
                      reason=call.failure.kind.value)
        call.ran = True
        return (yield from self.unit(call, raw, job))

    def writable_session(self, call: Call, raw: Any) -> Flow[Any]:
        """Before a read-write unit: a standby is the wrong server (reconnect); the
        ledger is used, or refused (``require``), or noted as not used (``auto``);
        old tokens are pruned when due. No round trip unless a prune is due."""
        info = self.link.info
        if info is None:
            return raw
        if info.in_recovery:
            failure = wrong_server_failure(self.target.description)
            call.failure = failure
            self.emit(ev.FailureDetected, call, failure=failure, phase=Phase.CONNECT.value,
                      attempt=call.attempts, error=failure.message)
            yield from self.drop()
            raise Again(failure, Phase.CONNECT)
        state = info.ledger
        if state is None or self.ledger == "off":
            return raw
        if not state.usable:
            self.ledger_not_used(state)
            return raw
        if state.can_prune:
            now = self.policy.clock()
            if state.next_prune is None:
                # A new session's first prune comes at a random point of its first
                # minute: a pool refilled after a failover does not prune all at once.
                state.next_prune = now + self.policy.random() * lg.PRUNE_EVERY
            if now >= state.next_prune:
                raw = yield from self.prune(call, raw, state)
        return raw

    def ledger_not_used(self, state: lg.LedgerState) -> None:
        reason = state.why_not()
        if self.ledger == "require":
            raise self.ledger_unavailable(reason)
        if not state.noted:  # once per session
            state.noted = True
            self.emit(ev.LedgerNotUsed, None, level=_once_level(),
                      reason=f"{reason}; install it for provable commit outcomes "
                             f"after a crash: {lg.INSTALL_HINT}")

    def required_ledger_missing(self) -> LedgerUnavailable | None:
        """``ledger="require"`` on a session without a usable ledger: the error for
        `connect` to raise (no I/O: the facts were read with the session's)."""
        info = self.link.info
        if self.ledger != "require" or info is None or info.ledger is None \
                or info.ledger.usable:
            return None
        return self.ledger_unavailable(info.ledger.why_not())

    def ledger_unavailable(self, reason: str) -> LedgerUnavailable:
        cls = flavoured(LedgerUnavailable, self.driver.programming_error)
        return cls(f"ledger='require', but {reason} on {self.target.description}: run "
                   f"{lg.INSTALL_HINT} and grant the role what it prints", reason=reason)

    def prune(self, call: Call, raw: Any, state: lg.LedgerState) -> Flow[Any]:
        """Delete one batch of old tokens (autocommit, before the unit's BEGIN)."""
        now = self.policy.clock()
        retention = lg.retention_for(self.policy.deadline)
        try:
            deleted = int((yield (OP_PRUNE, raw, retention, lg.PRUNE_BATCH)) or 0)
        except self.driver.error as exc:
            failure = classify(exc, connection=raw)
            state.next_prune = now + lg.PRUNE_EVERY
            if failure.sqlstate in lg.MISSING:
                state.can_prune = False
            self.emit(ev.LedgerPruned, None, level="warning" if not state.can_prune else None,
                      deleted=0, retention=retention,
                      error=f"{failure.sqlstate or 'no SQLSTATE'}: "
                            f"{ev.driver_message(driver_text(exc))}")
            if self.driver.is_broken(raw):
                raw = yield from self.session(call)
            return raw
        state.next_prune = now + (lg.PRUNE_AGAIN if deleted >= lg.PRUNE_BATCH
                                  else lg.PRUNE_EVERY)
        self.emit(ev.LedgerPruned, None, deleted=deleted, retention=retention)
        return raw

    def unit_ledger(self, call: Call) -> tuple[str | None, lg.LedgerState | None]:
        """The ledger token of this unit's BEGIN and the session's ledger state;
        (None, None): the transaction-id path."""
        if self.state.read_only or self.ledger == "off":
            return None, None
        info = self.link.info
        state = info.ledger if info is not None else None
        if state is None or not state.usable:
            return None, None
        if call.token is None:
            call.token = lg.new_token()
        return call.token, state

    def unit(self, call: Call, raw: Any, job: Job) -> Flow[Any]:
        driver = self.driver
        link = self.link
        call.phase = phase = Phase.UNIT
        xid: str | None = None
        result: Any = _NOTHING
        guard = UnitGuard(self.contract_error)
        token, ledger = self.unit_ledger(call)
        try:
            how: lg.How = ("literal" if ledger is None
                           else "execute" if ledger.prepared else "prepare")
            try:
                call.xid = xid = yield (OP_BEGIN, raw, self.state, token, how)
            except driver.error as exc:
                code = classify(exc, connection=raw).sqlstate
                if ledger is None or driver.is_broken(raw) or code not in lg.BEGIN_AGAIN:
                    raise
                # Nothing of the unit ran (M1): roll back and begin again, once.
                yield from self.rollback_quietly(raw)
                if code in lg.MISSING:
                    # The table was dropped or a privilege revoked since the session
                    # was made. Without the ledger from now on.
                    self.ledger_gone(call, exc)
                    token, ledger, how = None, None, "literal"
                else:
                    # The session's prepared insert was deallocated (DISCARD ALL), or
                    # is there already (an earlier BEGIN message that prepared it).
                    how = "execute" if code == lg.STATEMENT_THERE else "prepare"
                call.xid = xid = yield (OP_BEGIN, raw, self.state, token, how)
            if ledger is not None:
                ledger.prepared = True
            lent = driver.lend(raw, guard)
            link.guard = guard
            try:
                result = yield (OP_UNIT, job, lent)
            finally:
                link.guard = link.guard_owner = None
                guard.active = False
                driver.reclaim(raw, guard)
            if guard.violation is None:
                self.check_unit_left(raw, guard)
            if guard.violation is not None:
                raise guard.violation
            call.phase = phase = Phase.COMMIT
            yield (OP_COMMIT, raw)
        except Exception as exc:
            if isinstance(exc, LedgerUnavailable):
                raise
            if guard.violation is None and phase is Phase.UNIT and \
                    driver.unit_left(raw) == "closed":
                # Closed behind the guard's back: a bug in the unit, not a lost session.
                guard.refuse("closed-connection", "the connection was closed")
            if guard.violation is not None:
                yield from self.contract_broken(raw, guard.violation, exc)
            return (yield from self.unit_failed(call, raw, exc, phase, xid, result, token))
        call.phase = Phase.CONNECT
        return result

    def ledger_gone(self, call: Call, exc: BaseException) -> None:
        """A BEGIN found the ledger gone: ``require`` raises, ``auto`` goes on without."""
        info = self.link.info
        if info is not None and info.ledger is not None:
            info.ledger.usable = info.ledger.can_prune = False
            info.ledger.noted = True  # the event below is the session's one
        call.token = None
        said = ev.driver_message(driver_text(exc))
        reason = f"the commit ledger is gone or its privileges were revoked ({said})"
        if self.ledger == "require":
            raise self.ledger_unavailable(reason) from exc
        self.emit(ev.LedgerNotUsed, call, level="warning",
                  reason=f"{reason}; install it again: {lg.INSTALL_HINT}")

    def check_unit_left(self, raw: Any, guard: UnitGuard) -> None:
        """What the unit left behind, from the driver's local state (no round trip)."""
        driver = self.driver
        state = driver.unit_left(raw)
        if state == "open" or state is None:
            return
        if state == "closed":
            guard.refuse("closed-connection", "the connection was closed")
        elif state == "lost":
            # The session died under the unit, which caught the error and returned.
            # Nothing was committed: as after any lost session, run it again.
            raise SessionLostUnderUnit(classify(None, connection=raw))
        elif state == "failed":
            said = ev.driver_message(driver.last_error_text(raw))
            guard.refuse("swallowed-error", "the transaction had failed when the unit "
                         "returned" + (f" (the server said: {said})" if said else ""))
        elif state == "ended":
            guard.refuse("ended-transaction", "no transaction was open when the unit "
                         "returned (a COMMIT or ROLLBACK statement the library could "
                         "not see ended it; what was written before it may be committed)")

    def contract_broken(
        self, raw: Any, violation: UnitContractError, exc: Exception
    ) -> Flow[None]:
        """Roll back what the unit wrote and raise the rule it broke. Never retried."""
        if self.driver.is_broken(raw) or not (yield from self.rollback_quietly(raw)):
            yield from self.drop()
        if exc is violation:
            raise violation
        raise violation from exc

    def unit_failed(
        self, call: Call, raw: Any, exc: Exception, phase: Phase, xid: str | None,
        result: Any, token: str | None = None,
    ) -> Flow[Any]:
        driver = self.driver
        if isinstance(exc, SessionLostUnderUnit):
            exc = exc.as_driver_error(driver)  # type: ignore[assignment]
        elif not isinstance(exc, driver.error):
            # Not the database's: the application's own error. Roll back, raise it.
            yield from self.rollback_quietly(raw)
            call.phase = Phase.CONNECT
            raise exc
        failure = classify(exc, connection=raw)
        usable = not driver.is_broken(raw)
        call.failure = failure
        self.emit(ev.FailureDetected, call, failure=failure, phase=phase.value,
                  attempt=call.attempts, error=driver_text(exc))
        step = next_step(failure, Situation(
            phase, usable, call.fresh_session, call.state_lost_retried,
            has_xid=xid is not None or token is not None))
        call.phase = Phase.CONNECT
        if step is Step.RETRY:
            if failure.kind is Kind.SESSION_STATE_LOST:
                call.state_lost_retried = True
            if not (yield from self.rollback_quietly(raw)):
                yield from self.drop()
            raise Again(failure, phase) from exc
        if step is Step.RECONNECT:
            yield from self.drop()
            raise Again(failure, phase) from exc
        if step is Step.RESOLVE:
            assert xid is not None or token is not None
            old = self.link.info
            call.pending = Pending(xid, result, old, token)
            yield from self.drop()
            raise Again(failure, phase) from exc
        if step is Step.RETURN:
            # A read-only unit lost the reply to COMMIT: nothing to commit, the
            # result stands.
            yield from self.drop()
            self.emit(ev.CommitResolved, call, xid=None, status="no transaction id",
                      outcome="returned", terminated_old_session=False)
            call.failure = None
            return result
        # RAISE: the application's error (or one not worth retrying), as the driver gave it.
        if usable:
            yield from self.rollback_quietly(raw)
        else:
            yield from self.drop()
        attach(exc, failure)
        raise exc

    def resolve(self, call: Call, raw: Any) -> Flow[tuple[bool, Any]]:
        """Ask the server what became of the pending COMMIT (DESIGN §3): by the unit's
        ledger token when it had one (every answer final), else by its transaction id.

        An answer that the old session is still running (a network break, the server
        never saw the session end) ends that session, so that it can never commit
        later, and asks again; still running then, the next try asks again.
        """
        pending = call.pending
        assert pending is not None
        token, xid = pending.token, pending.xid
        if token is not None:
            def ask() -> Flow[tuple[Resolution, str, str]]:
                return self.ask_ledger(call, raw, token)
        else:
            assert xid is not None
            info = self.link.info
            restarted = (pending.session is None or info is None
                         or pending.session.server_started != info.server_started)

            def ask() -> Flow[tuple[Resolution, str, str]]:
                return self.ask_xact_status(call, raw, xid, restarted)
        terminated = self.link.ended_old
        for _ in range(2):
            resolution, status, reason = yield from ask()
            if resolution is not Resolution.END_OLD_SESSION or pending.session is None:
                break
            ended = yield from self.quietly((OP_END_SESSION, raw, pending.session))
            terminated = bool(ended) or terminated
        if resolution is Resolution.END_OLD_SESSION:
            failure = replace(outcome_unknown_failure(reason),
                              kind=Kind.CONNECTION_LOST, retryable=True)
            raise Again(failure, Phase.COMMIT)
        self.emit(ev.CommitResolved, call, xid=xid, status=status,
                  outcome=OUTCOME[resolution], terminated_old_session=terminated,
                  via="ledger" if token is not None else "xid", token=token)
        call.pending = None
        if resolution is Resolution.COMMITTED:
            return True, pending.result
        if resolution is Resolution.UNKNOWN:
            raise self.pending_unknown(pending, reason)
        return False, None

    def ask_xact_status(self, call: Call, raw: Any, xid: str, restarted: bool
                        ) -> Flow[tuple[Resolution, str, str]]:
        """``pg_xact_status(xid)``, read in the light of a restart (`resolve_commit`)."""
        evidence = CommitEvidence(None, restarted)
        try:
            status = yield (OP_XACT_STATUS, raw, xid)
            evidence = CommitEvidence(status, restarted)
        except self.driver.error as exc:
            # A lost session is asked again on the next; anything else (e.g. the role
            # may not call pg_xact_status) is no answer.
            yield from self.asking_failed(call, raw, exc)
        resolution = resolve_commit(evidence)
        reason = ("the old session is still running"
                  if resolution is Resolution.END_OLD_SESSION
                  else unknown_outcome_reason(evidence, xid))
        return resolution, evidence.status or "unknown", reason

    def ask_ledger(self, call: Call, raw: Any, token: str
                   ) -> Flow[tuple[Resolution, str, str]]:
        """Claim the unit's token again (`resolve_claim`); the claim is rolled back and
        a replay inserts the token itself."""
        said = ""
        try:
            yield (OP_CLAIM, raw, token, lg.CLAIM_LOCK_TIMEOUT_MS)
            answer: lg.ClaimAnswer | None = "free"
        except self.driver.error as exc:
            failure = yield from self.asking_failed(call, raw, exc)
            answer = lg.claim_answer(failure.sqlstate)
            said = ev.driver_message(driver_text(exc))
        resolution = resolve_claim(answer)
        status = {"committed": "committed", "free": "aborted"}.get(answer or "", "unknown")
        reason = ("the old session still holds the unit's ledger row"
                  if resolution is Resolution.END_OLD_SESSION
                  else unknown_claim_reason(answer, said))
        return resolution, status, reason

    def asking_failed(self, call: Call, raw: Any, exc: BaseException) -> Flow[Failure]:
        """The question about a pending COMMIT failed: on a lost session, ask on the
        next one (`Again`); otherwise the failure, for the caller to read."""
        failure = classify(exc, connection=raw)
        if failure.reconnect or self.driver.is_broken(raw):
            yield from self.drop()
            call.failure = failure
            raise Again(failure, Phase.COMMIT) from exc
        return failure

    # --- sessions --------------------------------------------------------------------

    def session(self, call: Call) -> Flow[Any]:
        """The current session, or a new one (one try; raises `Again` to be retried)."""
        driver = self.driver
        link = self.link
        raw = link.raw
        if raw is not None and not driver.is_broken(raw):
            return raw
        if raw is not None:
            yield from self.drop()
        call.phase = Phase.CONNECT
        connected_before = link.server_started is not None
        if connected_before:
            self.emit(ev.ReconnectAttempt, call, level=_repeat_level(call),
                      attempt=call.attempts)
        try:
            return (yield from self.open(call))
        except driver.error as exc:
            error: BaseException = exc
            failure = connect_failure(classify(exc), connected_before=connected_before)
        if not connected_before and is_login_question(failure):
            # Only before the first session: later, the same settings just worked, and
            # a cluster in the middle of a failover may accept and drop connections.
            verdict = yield from self.ask_servers(failure, error)
            failure = verdict.failure
            if verdict.try_again_now:
                # The server answered the probe: one more immediate try, in case it
                # came up between the failed connect and the probe.
                try:
                    return (yield from self.open(call))
                except driver.error as again:
                    error = again
                    failure = (yield from self.ask_servers(classify(again), again)).failure
            elif verdict.nobody_answers and call.attempts == 1:
                self.say_waiting(failure)
        call.failure = failure
        self.emit(ev.FailureDetected, call, level=_repeat_level(call),
                  failure=failure, phase=Phase.CONNECT.value, attempt=call.attempts,
                  error=driver_text(error))
        if not failure.retryable:
            attach(error, failure)
            if call.pending is not None:
                # The COMMIT may have gone through, and no server can be asked.
                raise self.pending_unknown(
                    call.pending, f"no session to ask the server: {failure}") from error
            raise error
        raise Again(failure, Phase.CONNECT) from error

    def ask_servers(self, failure: Failure, error: BaseException) -> Flow[Any]:
        """A failed first connect, decided from what the servers themselves answer.

        Drivers say "could not connect" alike for a server that is down and for a wrong
        password or database (psqlODBC: 08001 for both; psycopg: no SQLSTATE). A
        startup packet (authenticated where libpq would send the password too) gets
        the server's own SQLSTATE, in any server language.
        """
        answers: list[ProbeAnswer] = yield (OP_PROBE, self.target)
        return first_connect_failure(failure, answers, driver_text=driver_text(error))

    def say_waiting(self, failure: Failure) -> None:
        """One warning, at once, for a first connect that will wait (a typo looks like
        a hang otherwise): where, and for how long at most."""
        where = ", ".join(f"{e.host}:{e.port}" for e in self.target.endpoints)
        policy = self.policy
        bound = f"for up to {policy.deadline:g} s (RetryPolicy.deadline)"
        if policy.attempts:
            bound += f", at most {policy.attempts} tries"
        ev.log("warning", "connect_waiting",
               message=f"no server answers at {where}; connect() keeps trying {bound}",
               target=self.target.description, sqlstate=failure.sqlstate,
               kind=failure.kind.value)

    def open(self, call: Call | None) -> Flow[Any]:
        driver = self.driver
        link = self.link
        raw = yield (OP_CONNECT,)
        try:
            info: SessionInfo = yield (OP_INFO, raw)
            previous = link.server_started
            failover = previous is not None and info.server_started != previous
            link.ended_old = False
            lost = link.lost
            if lost is not None and not failover:
                # Same server: the old session may still be alive there (a network
                # break). End it so that it can neither commit nor hold locks. Until
                # that worked it stays to be fenced by the next session.
                link.ended_old = bool((yield (OP_END_SESSION, raw, lost)))
            link.lost = None
            yield (OP_APPLY_STATE, raw, self.state)
            if self.configure:
                yield (OP_CONFIGURE, raw)
                if not self.state.autocommit and driver.in_transaction(raw) is not False:
                    yield (OP_COMMIT, raw)
        except (Exception, GeneratorExit) as exc:
            if isinstance(exc, driver.error):
                # Decide while the session can still be asked whether it died (a driver's
                # catch-all code on a dead session is a lost connection).
                attach(exc, classify(exc, connection=raw))
            if not isinstance(exc, GeneratorExit):
                yield from self.quietly((OP_DISCARD, raw))
            raise
        except BaseException:
            yield from self.quietly((OP_DISCARD, raw))
            raise
        if call is not None:
            call.fresh_session = True
        link.raw, link.info = raw, info
        link.maybe_in_transaction = False
        link.server_started = info.server_started
        if previous is not None:
            self.emit(
                ev.Reconnected, call,
                backend_pid=info.backend_pid,
                server_started=info.server_started,
                previous_server_started=previous,
                failover=failover,
                ended_old_session=link.ended_old,
            )
        return raw

    def drop(self) -> Flow[None]:
        """Give the session up; the next session on the same server fences it."""
        link = self.link
        raw, info = link.raw, link.info
        link.raw = link.info = None
        if info is not None:
            link.lost = info
        if raw is not None:
            yield from self.quietly((OP_DISCARD, raw))

    def rollback_quietly(self, raw: Any) -> Flow[bool]:
        try:
            yield (OP_ROLLBACK, raw)
        except Exception:
            return False
        return not self.driver.is_broken(raw)

    def quietly(self, op: Op) -> Flow[Any]:
        """``op``, its failure ignored (None)."""
        try:
            return (yield op)
        except Exception:
            return None

    # --- the passthrough -------------------------------------------------------------

    def passthrough_session(self, opens: bool = False) -> Flow[Any]:
        """A usable session in the connection's own autocommit setting. ``opens``: for
        a statement or a cursor (a commit on an idle session that is gone has nothing
        to commit, and needs no new session)."""
        driver = self.driver
        raw = self.link.raw
        if opens and raw is not None and not driver.is_broken(raw) and driver.gone(raw):
            # The server closed the idle session (a switchover, a restart): nothing is
            # lost by sending the statement to a new session instead of failing it.
            yield from self.drop()
            raw = None
        if raw is None or driver.is_broken(raw):
            raw = yield from self.connect()
        if driver.get_autocommit(raw) != self.state.autocommit:
            yield (OP_AUTOCOMMIT, raw, self.state.autocommit)
        return raw

    def passthrough_failed(self, raw: Any, exc: BaseException) -> Flow[None]:
        """Classify a passthrough failure onto the exception; drop a lost session."""
        failure = classify(exc, connection=raw)
        attach(exc, failure)
        if failure.reconnect or self.driver.is_broken(raw):
            self.emit(ev.FailureDetected, None, failure=failure, phase="passthrough",
                      attempt=1, error=driver_text(exc))
            yield from self.drop()

    def rollback_session(self) -> Flow[Any]:
        """The session a passthrough rollback rolls back; None when it was lost (the
        server rolled back, there is nothing to do)."""
        raw = self.link.raw
        if raw is None or self.driver.is_broken(raw):
            yield from self.drop()
            return None
        raw = yield from self.passthrough_session()
        self.link.maybe_in_transaction = False
        return raw

    def set_state(self, new: SessionState) -> Flow[None]:
        raw = self.link.raw
        if raw is not None and not self.driver.is_broken(raw):
            yield (OP_APPLY_STATE, raw, new)
        self.state = new

    def close(self) -> Flow[None]:
        link = self.link
        link.closed = True
        raw, link.raw, link.info = link.raw, None, None
        if raw is not None:
            yield from self.quietly((OP_DISCARD, raw))

    # --- events ----------------------------------------------------------------------

    def emit(self, kind: type[ev.Event], call: Call | None, *, level: str | None = None,
             **fields: Any) -> None:
        elapsed = self.policy.clock() - call.started if call is not None else 0.0
        event = kind(target=self.target.description, elapsed=elapsed, **fields)
        ev.emit(event, self.on_event, level=level)


_noted = False


def _once_level() -> str | None:
    """Its own level the first time in the process, DEBUG after (one line per session
    would be noise in a pool)."""
    global _noted
    if _noted:
        return "debug"
    _noted = True
    return None


def _repeat_level(call: Call) -> str | None:
    """The log level of a connect retry: its own at first, DEBUG for the repeats."""
    return "debug" if call.attempts > 2 else None


def attach(exc: BaseException, failure: Failure) -> None:
    with contextlib.suppress(AttributeError):  # an exception type with __slots__
        exc.failure = failure  # type: ignore[attr-defined]


def probe_answers(target: Target, probe: Callable[..., Any], timeout: float) -> list[ProbeAnswer]:
    """`OP_PROBE` for a runner: each endpoint in turn, until one answers."""
    answers = []
    for endpoint in target.endpoints:
        got = probe(endpoint.host, endpoint.port, user=target.user or "postgres",
                    database=target.database or "postgres", timeout=timeout,
                    password=target.password, sslmode=target.sslmode)
        answers.append(ProbeAnswer(f"{endpoint.host}:{endpoint.port}", got.state,
                                   got.sqlstate, got.authenticated, got.standby))
        if got.state not in _PROBE_STOPS and not got.standby:
            break  # a standby is passed over, as a read-write connection string does
    return answers
