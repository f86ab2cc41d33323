"""`ResilientConnection`: reconnect, and run units of work exactly once across failover.

The decisions are `_decide`'s (pure); this module carries them out with a driver
adapter (`_target.Driver`) inside a tenacity loop built from the `RetryPolicy`.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import TracebackType
from typing import Any, TypeVar

import tenacity

from . import _events as ev
from ._classify import classify, driver_text
from ._contract import UnitGuard, refuse_awaitable_result, refuse_coroutine_function
from ._decide import (
    CommitEvidence,
    LoginVerdict,
    Phase,
    ProbeAnswer,
    Resolution,
    Situation,
    Step,
    first_connect_failure,
    is_login_question,
    next_step,
    resolve_commit,
)
from ._errors import (
    CommitOutcomeUnknown,
    RetriesExhausted,
    UnitContractError,
    flavoured,
    outcome_unknown_failure,
)
from ._kind import Failure, Kind
from ._policy import DEFAULT_POLICY, RetryPolicy
from ._probe import probe
from ._sqlstates import NO_SQLSTATE_AUTH
from ._target import (
    Driver,
    SessionInfo,
    SessionState,
    Target,
    normalise_isolation,
)

_T = TypeVar("_T")

DRIVERS = ("psycopg", "pyodbc")
_PROBE_TIMEOUT = 1.0


class _Again(Exception):
    """Internal: this try failed in a way the policy may retry."""

    def __init__(self, failure: Failure, phase: Phase) -> None:
        super().__init__(str(failure))
        self.failure = failure
        self.phase = phase


class _SessionLostUnderUnit(Exception):
    """Internal: the unit returned, but its session had died under it."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure

    def as_driver_error(self, driver: Driver) -> Exception:
        error: Exception = driver.operational_error(  # type: ignore[assignment]
            "the session was lost during the unit of work (the unit caught the error)")
        _attach(error, self.failure)
        return error


@dataclass
class _Pending:
    """A COMMIT whose reply was lost: what is needed to ask the server about it."""

    xid: str
    result: Any
    session: SessionInfo | None


class _Call:
    """The state of one `run` (or one reconnect) across its tries."""

    def __init__(self, started: float) -> None:
        self.started = started
        self.attempts = 0
        self.failure: Failure | None = None
        self.fresh_session = False
        self.state_lost_retried = False
        self.pending: _Pending | None = None
        self.ran = False  # the unit started at least once


_NOTHING = object()


class ResilientConnection:
    """A connection that survives failover. Make one with `symfo_failover.connect`.

    Use `run` for units of work (exactly once); the DB-API methods pass through to the
    current driver connection, which is replaced after a lost session. Like a DB-API
    connection it is meant for one thread at a time; calls are serialised by a lock.
    """

    def __init__(
        self,
        driver: Driver,
        target: Target,
        *,
        policy: RetryPolicy,
        configure: Callable[[Any], None] | None,
        on_event: ev.EventHook | None,
        state: SessionState,
    ) -> None:
        self._driver = driver
        self._target = target
        self._policy = policy
        self._configure = configure
        self._on_event = on_event
        self._state = state
        self._raw: Any = None
        self._info: SessionInfo | None = None
        self._lost: SessionInfo | None = None
        self._server_started: str | None = None
        self._closed = False
        self._lock = threading.RLock()
        #: The guard of the unit running now (None outside units).
        self._guard: UnitGuard | None = None
        self._contract_error = flavoured(UnitContractError, driver.programming_error)

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("connected" if self._raw is not None else "idle")
        return f"<ResilientConnection {self._target.description} {state}>"

    # --- public: units of work -----------------------------------------------------

    def run(self, fn: Callable[..., _T], /, *args: Any, **kwargs: Any) -> _T:
        """Run ``fn(raw_connection, *args, **kwargs)`` in one transaction and commit it.

        ``fn`` must not commit or roll back, and must have no effect outside the
        database: it may run more than once. On a retryable failure the unit runs again
        (on a new session when needed) within the policy; an interrupted COMMIT is
        resolved with the server, so a unit that committed is never run again.
        Raises `CommitOutcomeUnknown` when the server cannot tell, `RetriesExhausted`
        when the policy runs out, `UnitContractError` when ``fn`` breaks the contract
        (it ends the transaction, nests ``run()``, swallows a database error), and the
        driver's own exception for anything else. A coroutine function is refused with
        ``TypeError`` before anything runs.
        """
        refuse_coroutine_function(fn)
        with self._lock:
            if self._guard is not None:
                raise self._guard.refuse("nested-run", "run() was called again")
            self._check_open()
            call = _Call(self._policy.clock())
            return self._retrying(call, lambda: self._run_attempt(call, fn, args, kwargs))

    # --- public: DB-API passthrough -----------------------------------------------

    @property
    def connection(self) -> Any:
        """The current driver connection (None while there is no session)."""
        return self._raw

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def driver(self) -> str:
        return self._driver.name

    @property
    def target(self) -> str:
        """Where this connection connects, without secrets."""
        return self._target.description

    @property
    def session(self) -> SessionInfo | None:
        """Facts about the current session (pid, server start time), if any."""
        return self._info

    def cursor(self, *args: Any, **kwargs: Any) -> Any:
        """A cursor of the current driver connection (a new session if the last was lost)."""
        return self._passthrough(lambda raw: raw.cursor(*args, **kwargs), opens=True)

    def execute(self, query: Any, params: Any = None, **kwargs: Any) -> Any:
        """Execute one statement on the current session; returns the driver's cursor.

        Never run again by the library: a failure is raised (with its ``failure``
        classification attached) and the next call gets a new session if needed.
        """
        with self._lock:
            raw = self._raw
            driver = self._driver
            if self._guard is not None:
                raise self._in_unit("execute()")
            if (raw is None or self._closed or driver.is_broken(raw)
                    or driver.get_autocommit(raw) != self._state.autocommit):
                return self._passthrough(
                    lambda r: driver.execute(r, query, params, kwargs), opens=True
                )
            # The steady state: straight to the driver (DESIGN §5: at most 3% more).
            self._maybe_in_transaction = not self._state.autocommit
            try:
                return driver.execute(raw, query, params, kwargs)
            except driver.error as exc:
                self._passthrough_failed(raw, exc)
                raise

    def commit(self) -> None:
        self._passthrough(lambda raw: raw.commit(), opens=False)

    def rollback(self) -> None:
        """Roll back. On a lost session there is nothing to roll back: the server did."""
        with self._lock:
            if self._guard is not None:
                raise self._in_unit("rollback()")
            self._check_open()
            raw = self._raw
            if raw is None or self._driver.is_broken(raw):
                self._drop_session()
                return
            self._passthrough(lambda r: r.rollback(), opens=False)

    def close(self) -> None:
        """Close the session. Idempotent."""
        with self._lock:
            if self._guard is not None:
                raise self._in_unit("close()")
            self._closed = True
            raw, self._raw, self._info = self._raw, None, None
            if raw is not None:
                _quietly(self._driver.close, raw)

    def __enter__(self) -> ResilientConnection:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Commit a passthrough transaction on success, roll it back on error; close."""
        try:
            if self._closed or self._raw is None or self._state.autocommit:
                return
            if exc_type is None:
                self.commit()
            else:
                _quietly(self.rollback)
        finally:
            self.close()

    # --- public: tracked session state ---------------------------------------------

    @property
    def autocommit(self) -> bool:
        return self._state.autocommit

    @autocommit.setter
    def autocommit(self, value: bool) -> None:
        self._set_state(autocommit=bool(value))

    @property
    def isolation_level(self) -> str | None:
        """``"read committed"``, ``"repeatable read"``, ``"serializable"``; None: the server's."""
        return self._state.isolation_level

    @isolation_level.setter
    def isolation_level(self, value: object) -> None:
        self._set_state(isolation_level=normalise_isolation(value))

    @property
    def read_only(self) -> bool | None:
        """Read-only units need no transaction id and run in READ ONLY transactions."""
        return self._state.read_only

    @read_only.setter
    def read_only(self, value: bool | None) -> None:
        self._set_state(read_only=None if value is None else bool(value))

    def _set_state(self, **changes: Any) -> None:
        with self._lock:
            if self._guard is not None:
                raise self._in_unit(f"{', '.join(changes)} was set")
            self._check_open()
            new = replace(self._state, **changes)
            raw = self._raw
            if raw is not None and not self._driver.is_broken(raw):
                self._driver.apply_state(raw, new)
            self._state = new

    # --- the retry loop ------------------------------------------------------------

    def _retrying(self, call: _Call, attempt: Callable[[], _T]) -> _T:
        # The first try runs without tenacity: the steady state pays nothing for it.
        try:
            return attempt()
        except _Again as exc:
            first: list[_Again] = [exc]
        try:
            for try_ in self._policy.retrying(_Again, started=call.started):
                with try_:
                    if first:
                        raise first.pop()  # counted as tenacity's first try
                    return attempt()
        except tenacity.RetryError as exc:
            last = exc.last_attempt.exception()
            failure = last.failure if isinstance(last, _Again) else call.failure
            assert failure is not None
            raise self._gave_up(call, failure) from (last.__cause__ if last else None)
        raise AssertionError("unreachable: tenacity returns or raises")  # pragma: no cover

    def _gave_up(self, call: _Call, failure: Failure) -> Exception:
        elapsed = self._policy.clock() - call.started
        self._emit(ev.GaveUp, call, failure=failure, attempts=call.attempts)
        if call.pending is not None:
            reason = (f"no session to ask the server within {elapsed:.1f} s "
                      f"({call.attempts} tries); last failure: {failure}")
            cls = flavoured(CommitOutcomeUnknown, self._driver.operational_error)
            return cls(
                f"the outcome of COMMIT (transaction {call.pending.xid}) is unknown: {reason}",
                failure=outcome_unknown_failure(reason),
                xid=call.pending.xid,
            )
        cls2 = flavoured(RetriesExhausted, self._driver.operational_error)
        return cls2(
            f"gave up after {call.attempts} tries in {elapsed:.1f} s "
            f"(policy: deadline {self._policy.deadline} s"
            + (f", attempts {self._policy.attempts}" if self._policy.attempts else "")
            + f") with {self._target.description}; last failure: {failure}",
            failure=failure,
            attempts=call.attempts,
            elapsed=elapsed,
            target=self._target.description,
        )

    def _run_attempt(
        self, call: _Call, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> _T:
        call.attempts += 1
        raw = self._session(call)
        if not self._driver.get_autocommit(raw):
            known = self._driver.in_transaction(raw)
            if known or (known is None and self._maybe_in_transaction):
                raise self._contract_error(
                    "run() was called inside an open passthrough transaction: commit or "
                    "roll it back first (a unit of work is its own transaction); nothing "
                    "ran (rule 'open-transaction')",
                    rule="open-transaction",
                )
            # The unit's BEGIN and COMMIT are ours; passthrough calls switch it back.
            self._driver.set_autocommit(raw, True)
        if call.pending is not None:
            done, result = self._resolve(call, raw)
            if done:
                return result  # type: ignore[no-any-return]
        if call.ran and call.failure is not None:
            self._emit(ev.UnitReplayed, call, attempt=call.attempts, reason=call.failure.kind.value)
        call.ran = True
        return self._unit(call, raw, fn, args, kwargs)

    def _unit(
        self,
        call: _Call,
        raw: Any,
        fn: Callable[..., _T],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> _T:
        driver = self._driver
        phase = Phase.UNIT
        xid: str | None = None
        result: Any = _NOTHING
        guard = UnitGuard(self._contract_error)
        try:
            xid = driver.begin(raw, self._state)
            lent = driver.lend(raw, guard)
            self._guard = guard
            try:
                result = fn(lent, *args, **kwargs)
            finally:
                self._guard = None
                guard.active = False
                driver.reclaim(raw, guard)
            refuse_awaitable_result(result, fn)
            if guard.violation is None:
                self._check_unit_left(raw, guard)
            if guard.violation is not None:
                raise guard.violation
            phase = Phase.COMMIT
            driver.commit(raw)
        except Exception as exc:
            if guard.violation is None and phase is Phase.UNIT and \
                    driver.unit_left(raw) == "closed":
                # Closed behind the guard's back: a bug in the unit, not a lost session.
                guard.refuse("closed-connection", "the connection was closed")
            if guard.violation is not None:
                self._contract_broken(raw, guard.violation, exc)
            returned = self._unit_failed(call, raw, exc, phase, xid, result)
            return returned  # type: ignore[no-any-return]
        except BaseException:
            # KeyboardInterrupt and the like: the session's state is unknown; drop it.
            self._drop_session()
            raise
        return result  # type: ignore[no-any-return]

    def _check_unit_left(self, raw: Any, guard: UnitGuard) -> None:
        """What the unit left behind, from the driver's local state (no round trip)."""
        driver = self._driver
        state = driver.unit_left(raw)
        if state == "open" or state is None:
            return
        if state == "closed":
            guard.refuse("closed-connection", "the connection was closed")
        elif state == "lost":
            # The session died under the unit, which caught the error and returned.
            # Nothing was committed: as after any lost session, run it again.
            failure = classify(None, connection=raw)
            raise _SessionLostUnderUnit(failure)
        elif state == "failed":
            said = ev.driver_message(driver.last_error_text(raw))
            guard.refuse("swallowed-error", "the transaction had failed when the unit "
                         "returned" + (f" (the server said: {said})" if said else ""))
        elif state == "ended":
            guard.refuse("ended-transaction", "no transaction was open when the unit "
                         "returned (a COMMIT or ROLLBACK statement the library could "
                         "not see ended it; what was written before it may be committed)")

    def _contract_broken(self, raw: Any, violation: UnitContractError, exc: Exception) -> None:
        """Roll back what the unit wrote and raise the rule it broke. Never retried."""
        driver = self._driver
        if driver.is_broken(raw) or not self._rollback_quietly(raw):  # closed is broken too
            self._drop_session()
        if exc is violation:
            raise violation
        raise violation from exc

    def _unit_failed(
        self, call: _Call, raw: Any, exc: Exception, phase: Phase, xid: str | None, result: Any
    ) -> Any:
        driver = self._driver
        if isinstance(exc, _SessionLostUnderUnit):
            exc = exc.as_driver_error(driver)
        elif not isinstance(exc, driver.error):
            # Not the database's: the application's own error. Roll back, raise it.
            self._rollback_quietly(raw)
            raise exc
        failure = classify(exc, connection=raw)
        usable = not driver.is_broken(raw)
        call.failure = failure
        self._emit(ev.FailureDetected, call, failure=failure, phase=phase.value,
                   attempt=call.attempts, error=driver_text(exc))
        step = next_step(
            failure,
            Situation(phase, usable, call.fresh_session, call.state_lost_retried),
        )
        if step is Step.RETRY:
            if failure.kind is Kind.SESSION_STATE_LOST:
                call.state_lost_retried = True
            if not self._rollback_quietly(raw):
                self._drop_session()
            raise _Again(failure, phase) from exc
        if step is Step.RECONNECT:
            self._drop_session()
            raise _Again(failure, phase) from exc
        if step is Step.RESOLVE:
            old = self._info
            self._drop_session()
            if xid is None:
                # A read-only unit: nothing to commit, its result stands.
                self._emit(ev.CommitResolved, call, xid=None, status="no transaction id",
                           outcome="returned", terminated_old_session=False)
                call.failure = None
                return result
            call.pending = _Pending(xid, result, old)
            raise _Again(failure, phase) from exc
        # RAISE: the application's error (or one not worth retrying), as the driver gave it.
        if usable:
            self._rollback_quietly(raw)
        else:
            self._drop_session()
        _attach(exc, failure)
        raise exc

    def _resolve(self, call: _Call, raw: Any) -> tuple[bool, Any]:
        """Ask the server what became of the pending COMMIT (DESIGN §3)."""
        pending = call.pending
        assert pending is not None
        driver = self._driver
        terminated = self._ended_old
        info = self._info
        restarted = (pending.session is None or info is None
                     or pending.session.server_started != info.server_started)
        resolution = Resolution.UNKNOWN
        evidence = CommitEvidence(None, restarted)
        for _ in range(2):
            try:
                evidence = self._commit_evidence(raw, pending.xid, restarted)
            except driver.error as exc:
                failure = classify(exc, connection=raw)
                if failure.reconnect or driver.is_broken(raw):
                    self._drop_session()
                    call.failure = failure
                    raise _Again(failure, Phase.COMMIT) from exc
                # e.g. the role may not call pg_xact_status: no answer
            resolution = resolve_commit(evidence)
            if resolution is not Resolution.END_OLD_SESSION or pending.session is None:
                break
            # Still running on the old session (a network break, the server never saw
            # the session end): end it, so that it can never commit later, and ask again.
            terminated = _quietly(driver.end_session, raw, pending.session) or terminated
        if resolution is Resolution.END_OLD_SESSION:
            failure = replace(outcome_unknown_failure("the old session is still running"),
                              kind=Kind.CONNECTION_LOST, retryable=True)
            raise _Again(failure, Phase.COMMIT)
        outcome = {
            Resolution.COMMITTED: "returned",
            Resolution.ABORTED: "replayed",
            Resolution.UNKNOWN: "raised",
        }[resolution]
        status = evidence.status or "unknown"
        self._emit(ev.CommitResolved, call, xid=pending.xid, status=status,
                   outcome=outcome, terminated_old_session=terminated)
        call.pending = None
        if resolution is Resolution.COMMITTED:
            return True, pending.result
        if resolution is Resolution.UNKNOWN:
            if evidence.status == "committed":
                reason = (f"transaction {pending.xid} shows as committed, but the server "
                          "restarted in between and may have handed the id out again, "
                          "so that answer may be another transaction's")
            else:
                reason = f"pg_xact_status({pending.xid}) gave no answer ({evidence.status!r})"
            cls = flavoured(CommitOutcomeUnknown, driver.operational_error)
            raise cls(f"the outcome of COMMIT is unknown: {reason}",
                      failure=outcome_unknown_failure(reason), xid=pending.xid)
        return False, None

    def _commit_evidence(self, raw: Any, xid: str, restarted: bool) -> CommitEvidence:
        return CommitEvidence(self._driver.xact_status(raw, xid), restarted)

    # --- sessions --------------------------------------------------------------------

    def _session(self, call: _Call) -> Any:
        """The current session, or a new one (one try; raises `_Again` to be retried)."""
        raw = self._raw
        if raw is not None and not self._driver.is_broken(raw):
            return raw
        if raw is not None:
            self._drop_session()
        if self._server_started is not None:
            self._emit(ev.ReconnectAttempt, call, level=self._repeat_level(call),
                       attempt=call.attempts)
        try:
            return self._open(call)
        except self._driver.error as exc:
            error: BaseException = exc
            failure = classify(exc)
        if self._server_started is not None and failure.rule == NO_SQLSTATE_AUTH.code:
            # libpq's "failed after the server asked for a password" is also what a
            # server shutting down mid-handshake gives; these settings worked before.
            failure = replace(failure, kind=Kind.CONNECT_FAILED, retryable=True)
        if self._server_started is None:
            # Only before the first session: later, the same settings just worked, and
            # a cluster in the middle of a failover may accept and drop connections.
            verdict = self._ask_servers(failure, error)
            failure = verdict.failure
            if verdict.try_again_now:
                # The server answered the probe: one more immediate try, in case it
                # came up between the failed connect and the probe.
                try:
                    return self._open(call)
                except self._driver.error as again:
                    error = again
                    failure = self._ask_servers(classify(again), again).failure
            elif verdict.nobody_answers and call.attempts == 1:
                self._say_waiting(failure)
        call.failure = failure
        self._emit(ev.FailureDetected, call, level=self._repeat_level(call),
                   failure=failure, phase=Phase.CONNECT.value, attempt=call.attempts,
                   error=driver_text(error))
        if not failure.retryable:
            _attach(error, failure)
            raise error
        raise _Again(failure, Phase.CONNECT) from error

    def _ask_servers(self, failure: Failure, error: BaseException) -> LoginVerdict:
        """A failed first connect, decided from what the servers themselves answer.

        Drivers say "could not connect" alike for a server that is down and for a wrong
        password or database (psqlODBC: 08001 for both; psycopg: no SQLSTATE). A
        startup packet (authenticated where libpq would send the password too) gets
        the server's own SQLSTATE, in any server language.
        """
        if not is_login_question(failure):
            return LoginVerdict(failure)
        target = self._target
        answers = []
        for endpoint in target.endpoints:
            got = probe(endpoint.host, endpoint.port, user=target.user or "postgres",
                        database=target.database or "postgres", timeout=_PROBE_TIMEOUT,
                        password=target.password, sslmode=target.sslmode)
            answers.append(ProbeAnswer(f"{endpoint.host}:{endpoint.port}", got.state,
                                       got.sqlstate, got.authenticated))
            if got.state not in ("refused", "timeout", "unreachable"):
                break
        return first_connect_failure(failure, answers, driver_text=driver_text(error))

    def _say_waiting(self, failure: Failure) -> None:
        """One warning, at once, for a first connect that will wait (a typo looks like
        a hang otherwise): where, and for how long at most."""
        where = ", ".join(f"{e.host}:{e.port}" for e in self._target.endpoints)
        policy = self._policy
        bound = f"for up to {policy.deadline:g} s (RetryPolicy.deadline)"
        if policy.attempts:
            bound += f", at most {policy.attempts} tries"
        ev.log("warning", "connect_waiting",
               message=f"no server answers at {where}; connect() keeps trying {bound}",
               target=self._target.description, sqlstate=failure.sqlstate,
               kind=failure.kind.value)

    def _open(self, call: _Call | None) -> Any:
        driver = self._driver
        raw = driver.connect(self._target)
        try:
            info = driver.session_info(raw)
            previous = self._server_started
            failover = previous is not None and info.server_started != previous
            self._ended_old = False
            lost, self._lost = self._lost, None
            if lost is not None and not failover:
                # Same server: the old session may still be alive there (a network
                # break). End it so that it can neither commit nor hold locks.
                self._ended_old = bool(driver.end_session(raw, lost))
            driver.apply_state(raw, self._state)
            if self._configure is not None:
                self._configure(raw)
                if not self._state.autocommit and driver.in_transaction(raw) is not False:
                    raw.commit()
        except BaseException as exc:
            if isinstance(exc, driver.error):
                # Decide while the session can still be asked whether it died (a driver's
                # catch-all code on a dead session is a lost connection).
                _attach(exc, classify(exc, connection=raw))
            _quietly(driver.close, raw)
            raise
        if call is not None:
            call.fresh_session = True
        self._raw, self._info = raw, info
        self._maybe_in_transaction = False
        self._server_started = info.server_started
        if previous is not None:
            self._emit(
                ev.Reconnected, call,
                backend_pid=info.backend_pid,
                server_started=info.server_started,
                previous_server_started=previous,
                failover=failover,
                ended_old_session=self._ended_old,
            )
        return raw

    _ended_old = False
    #: A passthrough call may have opened a transaction the driver cannot report (ODBC).
    _maybe_in_transaction = False

    def _drop_session(self) -> None:
        raw, info = self._raw, self._info
        self._raw = self._info = None
        if info is not None:
            self._lost = info
        if raw is not None:
            _quietly(self._driver.close, raw)

    def _rollback_quietly(self, raw: Any) -> bool:
        try:
            self._driver.rollback(raw)
            return not self._driver.is_broken(raw)
        except Exception:
            return False

    def _passthrough(self, op: Callable[[Any], _T], *, opens: bool) -> _T:
        """``op(raw)`` on the current session. ``opens``: it may open a transaction
        (statements, cursors); commit and rollback end it."""
        with self._lock:
            if self._guard is not None:
                raise self._in_unit("a passthrough call")
            self._check_open()
            raw = self._raw
            if raw is None or self._driver.is_broken(raw):
                raw = self._connect_with_retries()
            try:
                if self._driver.get_autocommit(raw) != self._state.autocommit:
                    self._driver.set_autocommit(raw, self._state.autocommit)
                self._maybe_in_transaction = opens and not self._state.autocommit
                return op(raw)
            except self._driver.error as exc:
                self._passthrough_failed(raw, exc)
                raise

    def _passthrough_failed(self, raw: Any, exc: BaseException) -> None:
        """Classify a passthrough failure onto the exception; drop a lost session."""
        failure = classify(exc, connection=raw)
        _attach(exc, failure)
        if failure.reconnect or self._driver.is_broken(raw):
            self._emit(ev.FailureDetected, None, failure=failure, phase="passthrough",
                       attempt=1, error=driver_text(exc))
            self._drop_session()

    def _connect_with_retries(self) -> Any:
        """A session, made within the policy (nothing reached the server before)."""
        call = _Call(self._policy.clock())

        def attempt() -> Any:
            call.attempts += 1
            return self._session(call)

        return self._retrying(call, attempt)

    def _in_unit(self, what: str) -> UnitContractError:
        assert self._guard is not None
        return self._guard.refuse("connection-in-unit", f"{what} on the ResilientConnection")

    def _check_open(self) -> None:
        if self._closed:
            raise self._driver.closed_error()

    @staticmethod
    def _repeat_level(call: _Call) -> str | None:
        """The log level of a connect retry: its own at first, DEBUG for the repeats."""
        return "debug" if call.attempts > 2 else None

    def _emit(self, kind: type[ev.Event], call: _Call | None, *, level: str | None = None,
              **fields: Any) -> None:
        elapsed = self._policy.clock() - call.started if call is not None else 0.0
        event = kind(target=self._target.description, elapsed=elapsed, **fields)
        ev.emit(event, self._on_event, level=level)


def connect(
    conninfo: str,
    *,
    driver: str = "psycopg",
    policy: RetryPolicy | None = None,
    configure: Callable[[Any], None] | None = None,
    on_event: ev.EventHook | None = None,
    **kwargs: Any,
) -> ResilientConnection:
    """Open a `ResilientConnection`.

    ``conninfo`` is a libpq connection string for ``driver="psycopg"`` and an ODBC
    connection string for ``driver="pyodbc"``; ``kwargs`` go to the driver's connect
    (``autocommit=`` sets the tracked autocommit). Keepalive and timeout settings that
    detect a partition (see docs/concepts.md) are added unless given. ``configure(raw)``
    runs on every new session. ``on_event`` receives every `Event`.

    Connects at once: a bad connection string, an unknown driver or a wrong password
    raise here without retrying; a server that is down is retried within ``policy``.
    """
    adapter = _driver(driver)
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise TypeError(f"policy must be a RetryPolicy, not {type(policy).__name__}")
    if configure is not None and not callable(configure):
        raise TypeError("configure must be callable")
    if on_event is not None and not callable(on_event):
        raise TypeError("on_event must be callable")
    options = dict(kwargs)
    state = SessionState(autocommit=bool(options.pop("autocommit", False)))
    target = adapter.target(conninfo, options)
    conn = ResilientConnection(
        adapter, target, policy=policy or DEFAULT_POLICY, configure=configure,
        on_event=on_event, state=state,
    )
    conn._connect_with_retries()
    return conn


def _driver(name: str) -> Driver:
    if name not in DRIVERS:
        raise ValueError(f"unknown driver {name!r}; use one of {', '.join(DRIVERS)}")
    module, cls, extra = {
        "psycopg": ("_driver_psycopg", "PsycopgDriver", "psycopg"),
        "pyodbc": ("_driver_pyodbc", "PyodbcDriver", "odbc"),
    }[name]
    try:
        mod = importlib.import_module(f"symfo_failover.{module}")
    except ImportError as exc:
        raise ImportError(
            f"the {name} driver is not installed: pip install 'symfo-failover[{extra}]' ({exc})"
        ) from exc
    adapter: Driver = getattr(mod, cls)()
    return adapter


def _attach(exc: BaseException, failure: Failure) -> None:
    with contextlib.suppress(AttributeError):  # an exception type with __slots__
        exc.failure = failure  # type: ignore[attr-defined]


def _quietly(fn: Callable[..., _T], *args: Any) -> _T | None:
    try:
        return fn(*args)
    except Exception:
        return None

