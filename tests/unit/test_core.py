"""The sans-I/O core (`_core.Core`) against a scripted fake session. No server, no sleeping.

Each test drives a flow (`Core.run`, `Core.connect`) the way a runner does, answering each
operation it yields from a script: the operation it must be, and what to send back or to
throw in. A script is therefore the expected sequence of operations, and it must be used
up; the tests spell the sequence out as well where it is the point. `OP_SLEEP` is recorded
and advances a fake clock, the policy's clock, so deadlines are exact; nothing sleeps.

The errors are psycopg's own classes, so that `classify` decides as it does in production
(a SQLSTATE where psycopg has one; psycopg's plain ``OperationalError`` and a failed
connect's finished PGconn where it has none). The last part is a Hypothesis model of a
server: random failures everywhere, and the truth of what committed, to check that a
unit commits exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from psycopg import errors as pg_errors
from psycopg.pq import ConnStatus

from symfo_failover import (
    CommitOutcomeUnknown,
    CommitResolved,
    Event,
    FailureDetected,
    GaveUp,
    Kind,
    ReconnectAttempt,
    Reconnected,
    RetriesExhausted,
    RetryPolicy,
    SessionInfo,
    UnitContractError,
    UnitInterrupted,
    UnitReplayed,
    _core,
)
from symfo_failover._contract import UnitGuard
from symfo_failover._core import (
    COMMIT_OUTCOME_ATTR,
    OP_APPLY_STATE,
    OP_AUTOCOMMIT,
    OP_BEGIN,
    OP_COMMIT,
    OP_CONFIGURE,
    OP_CONNECT,
    OP_DISCARD,
    OP_END_SESSION,
    OP_INFO,
    OP_PROBE,
    OP_ROLLBACK,
    OP_SLEEP,
    OP_UNIT,
    OP_XACT_STATUS,
    Core,
    Flow,
    Job,
)
from symfo_failover._decide import SERVER_UP, ProbeAnswer
from symfo_failover._sqlstates import NO_SQLSTATE_AUTH
from symfo_failover._target import Endpoint, SessionState, Target

OP_NAMES = {getattr(_core, name): name[3:] for name in dir(_core) if name.startswith("OP_")}
assert len(OP_NAMES) == _core.N_OPS

TARGET = Target(connect_args={}, endpoints=(Endpoint("db1", 5432),), user="app",
                database="app", description="fake db1:5432/app")


# --- the fake session and driver ----------------------------------------------------------


class FakeSession(psycopg.Connection[Any]):
    """A session with no server behind it: its local facts are plain fields.

    It is a `psycopg.Connection` only so that `classify` reads it as psycopg's session:
    without a SQLSTATE, classify asks the adapter of the driver that owns the session
    whether it is broken (``classify(None, connection=raw)`` for a unit that caught the
    loss of its session). It is never initialised, so it holds no PGconn (psycopg's
    ``__del__`` then has nothing to warn about), and psycopg's properties that would
    read one are overridden. Names psycopg uses (``autocommit``, ``xid``) are avoided.
    """

    def __init__(self, label: str, boot: int = 1) -> None:  # no PGconn, on purpose
        self.label = label
        #: The server's boot the session was made on (the Hypothesis model).
        self.boot = boot
        self.pid = 0
        #: The server went away (psycopg: ``broken``).
        self.lost = False
        #: Closed: by the application, or discarded by the core.
        self.shut = False
        #: As the adapters connect: autocommit on.
        self.autocommit_on = True
        self.in_tx: bool | None = False
        #: What `unit_left` reports while the session is neither lost nor closed.
        self.left: str | None = "open"
        self.error_text = ""
        self.guard: UnitGuard | None = None
        # The server's side, for the Hypothesis model.
        self.server_alive = True
        self.open_xid: str | None = None

    @property
    def closed(self) -> bool:
        return self.shut or self.lost

    @property
    def broken(self) -> bool:
        return self.lost

    def __repr__(self) -> str:
        return f"<FakeSession {self.label}>"


class FakeDriver:
    """`_target.Facts` over `FakeSession` fields, with psycopg's error classes."""

    name = "fake"
    error = psycopg.Error
    operational_error = psycopg.OperationalError
    programming_error = psycopg.ProgrammingError

    def target(self, conninfo: str, kwargs: Any) -> Target:
        return TARGET

    def in_transaction(self, raw: FakeSession) -> bool | None:
        return raw.in_tx

    def lend(self, raw: FakeSession, guard: UnitGuard) -> FakeSession:
        raw.guard = guard
        return raw

    def reclaim(self, raw: FakeSession, guard: UnitGuard) -> None:
        raw.guard = None

    def unit_left(self, raw: FakeSession) -> str | None:
        if raw.lost:
            return "lost"
        if raw.shut:
            return "closed"
        return raw.left

    def last_error_text(self, raw: FakeSession) -> str:
        return raw.error_text

    def get_autocommit(self, raw: FakeSession) -> bool:
        return raw.autocommit_on

    def is_broken(self, raw: FakeSession) -> bool:
        return raw.closed

    def gone(self, raw: FakeSession) -> bool:
        return False

    def closed_error(self) -> BaseException:
        return psycopg.OperationalError("the connection is closed")

    def bad_input(self, message: str) -> BaseException:
        return psycopg.ProgrammingError(message)


# --- errors as psycopg raises them (fresh each time: classify attaches `.failure`) --------


def server_gone() -> psycopg.OperationalError:
    """A dead session: psycopg's plain OperationalError, no SQLSTATE (the libpq NULL row)."""
    return psycopg.OperationalError("server closed the connection unexpectedly")


def sqlstate(code: str, message: str = "") -> psycopg.Error:
    """psycopg's exception class for ``code``, as the server would raise it."""
    error: psycopg.Error = pg_errors.lookup(code)(message or f"the server said {code}")
    return error


def shutdown() -> psycopg.Error:
    return sqlstate("57P01", "terminating connection due to administrator command")


def conflict() -> psycopg.Error:
    return sqlstate("40001", "could not serialize access due to concurrent update")


def refused(**flags: bool) -> psycopg.OperationalError:
    """A failed connect: the finished PGconn (no SQLSTATE), as psycopg.connect raises it."""
    pgconn = pg_errors.FinishedPGconn(status=ConnStatus.BAD, **flags)
    return psycopg.OperationalError("connection failed: Connection refused", pgconn=pgconn)


# --- scripts -------------------------------------------------------------------------------


@dataclass
class Answer:
    """What to do with one operation: which it must be, and what it gives back."""

    op: int
    value: Any = None
    error: BaseException | None = None
    #: Done to the operation's session (None for CONNECT, SLEEP, PROBE) before answering.
    effect: Callable[[Any], None] | None = None


def ok(op: int, value: Any = None, effect: Callable[[Any], None] | None = None) -> Answer:
    """The operation succeeds; ``ok(OP_UNIT)`` calls the unit (the job) on its session."""
    return Answer(op, value, effect=effect)


def _lose(session: FakeSession | None) -> None:
    if session is not None:
        session.lost = True


def fail(op: int, error: BaseException, *, lost: bool = True) -> Answer:
    """The operation raises ``error``; ``lost``: its session is broken afterwards."""
    return Answer(op, error=error, effect=_lose if lost else None)


SWITCH = ok(OP_AUTOCOMMIT)  # the unit's own autocommit, once per session


def info(pid: int, boot: int = 1) -> SessionInfo:
    return SessionInfo(pid, f"boot-{boot}", f"backend-start-{pid}")


def opening(session: FakeSession, pid: int, *, boot: int = 1,
            fence: bool | None = None) -> list[Answer]:
    """A new session: CONNECT, INFO, END_SESSION of the lost one (``fence`` is its
    answer; None: not expected), APPLY_STATE."""
    script = [ok(OP_CONNECT, session), ok(OP_INFO, info(pid, boot))]
    if fence is not None:
        script.append(ok(OP_END_SESSION, fence))
    return [*script, ok(OP_APPLY_STATE)]


def committing(xid: str | None = "100") -> list[Answer]:
    return [ok(OP_BEGIN, xid), ok(OP_UNIT), ok(OP_COMMIT)]


class Unit:
    """A unit of work that records each run; ``body`` decides what it does."""

    def __init__(self, result: Any = "done",
                 body: Callable[[FakeSession], Any] | None = None) -> None:
        self.result = result
        self.body = body
        self.calls: list[FakeSession] = []

    def __call__(self, session: FakeSession, *args: Any, **kwargs: Any) -> Any:
        self.calls.append(session)
        if self.body is not None:
            return self.body(session)
        return self.result

    @property
    def job(self) -> Job:
        return (self, (), {})


def _never_sleep(seconds: float) -> None:
    raise AssertionError(f"the core slept {seconds} s itself instead of yielding OP_SLEEP")


class Harness:
    """A core with a fake clock, its events, and a driver loop that follows scripts."""

    def __init__(self, *, state: SessionState | None = None, configure: bool = False,
                 deadline: float = 60.0, attempts: int | None = None,
                 clock: Callable[[], float] | None = None) -> None:
        self.now = 0.0
        self.events: list[Event] = []
        self.trace: list[tuple[Any, ...]] = []
        # Delays 0.25, 0.5, 1, 1, ...: exact in binary, so the clock's sums are exact.
        self.policy = RetryPolicy(deadline=deadline, first_delay=0.25, max_delay=1.0,
                                  jitter=0.5, attempts=attempts, clock=clock or (lambda: self.now),
                                  sleep=_never_sleep, random=lambda: 0.0)
        self.core = Core(FakeDriver(), TARGET, policy=self.policy,
                         on_event=self.events.append, state=state or SessionState(),
                         configure=configure)

    def drive(self, flow: Flow[Any], script: Iterable[Answer]) -> Any:
        """Run ``flow`` to its end, answering each operation from ``script``."""
        answers = list(script)
        used = 0
        throw, value = False, None
        while True:
            try:
                op = flow.throw(value) if throw else flow.send(value)
            except StopIteration as done:
                self._used_up(answers, used)
                return done.value
            except BaseException as exc:
                self._used_up(answers, used, exc)
                raise
            self.trace.append(op)
            assert used < len(answers), f"unscripted {OP_NAMES[op[0]]}; ops: {self.ops}"
            answer = answers[used]
            used += 1
            assert op[0] == answer.op, (
                f"expected {OP_NAMES[answer.op]}, got {OP_NAMES[op[0]]}; ops: {self.ops}")
            try:
                throw, value = False, self.answer(op, answer)
            except BaseException as exc:
                throw, value = True, exc

    def answer(self, op: tuple[Any, ...], answer: Answer) -> Any:
        code = op[0]
        session = op[2] if code == OP_UNIT else (
            op[1] if len(op) > 1 and isinstance(op[1], FakeSession) else None)
        if code == OP_SLEEP:
            self.now += op[1]
        if answer.effect is not None:
            answer.effect(session)
        if answer.error is not None:
            raise answer.error
        if code == OP_UNIT:
            fn, args, kwargs = op[1]
            return fn(op[2], *args, **kwargs)
        if code == OP_APPLY_STATE:
            session.autocommit_on = op[2].autocommit
        elif code == OP_AUTOCOMMIT:
            session.autocommit_on = op[2]
        elif code == OP_DISCARD:
            session.shut = True
        return answer.value

    def _used_up(self, answers: list[Answer], used: int,
                 raised: BaseException | None = None) -> None:
        if used < len(answers):
            left = [OP_NAMES[a.op] for a in answers[used:]]
            raise AssertionError(
                f"the flow ended ({raised!r}) before the script did; left: {left}; "
                f"ops: {self.ops}") from raised

    @property
    def ops(self) -> list[str]:
        return [OP_NAMES[op[0]] for op in self.trace]

    @property
    def sleeps(self) -> list[float]:
        return [op[1] for op in self.trace if op[0] == OP_SLEEP]

    @property
    def names(self) -> list[str]:
        return [type(e).__name__ for e in self.events]

    def one(self, kind: type[Any]) -> Any:
        found = [e for e in self.events if isinstance(e, kind)]
        assert len(found) == 1, self.names
        return found[0]

    def reset(self) -> None:
        self.trace.clear()
        self.events.clear()


def connected(**kwargs: Any) -> tuple[Harness, FakeSession]:
    """A harness whose core has its first session (pid 1 on boot 1), trace cleared."""
    h = Harness(**kwargs)
    s1 = FakeSession("s1")
    assert h.drive(h.core.connect(), opening(s1, 1)) is s1
    h.reset()
    return h, s1


# --- the steady state ----------------------------------------------------------------------


def test_connect_makes_a_session_and_applies_the_settings() -> None:
    h = Harness()
    s1 = FakeSession("s1")
    assert h.drive(h.core.connect(), opening(s1, 1)) is s1
    assert h.ops == ["CONNECT", "INFO", "APPLY_STATE"]
    assert h.trace[1] == (OP_INFO, s1)
    assert h.trace[2] == (OP_APPLY_STATE, s1, h.core.state)
    assert h.events == []  # the first session is no reconnection
    link = h.core.link
    assert (link.raw, link.info, link.server_started) == (s1, info(1), "boot-1")


def test_a_unit_begins_runs_and_commits_and_the_next_one_pays_only_that() -> None:
    h, s1 = connected()
    unit = Unit("paid")
    assert h.drive(h.core.run(unit.job), [SWITCH, *committing("100")]) == "paid"
    assert h.ops == ["AUTOCOMMIT", "BEGIN", "UNIT", "COMMIT"]
    assert h.trace[0] == (OP_AUTOCOMMIT, s1, True)
    assert h.trace[1] == (OP_BEGIN, s1, h.core.state, None, "literal")
    assert h.trace[2] == (OP_UNIT, unit.job, s1)
    assert h.trace[3] == (OP_COMMIT, s1)
    assert unit.calls == [s1]
    assert h.events == []
    assert s1.guard is None  # reclaimed

    h.reset()
    assert h.drive(h.core.run(unit.job), committing("101")) == "paid"
    assert h.ops == ["BEGIN", "UNIT", "COMMIT"]
    assert h.events == []


def test_run_without_a_session_connects_first() -> None:
    h = Harness()
    s1 = FakeSession("s1")
    unit = Unit(42)
    assert h.drive(h.core.run(unit.job), [*opening(s1, 1), SWITCH, *committing()]) == 42
    assert h.ops == ["CONNECT", "INFO", "APPLY_STATE", "AUTOCOMMIT", "BEGIN", "UNIT", "COMMIT"]
    assert h.events == []


def test_the_unit_gets_its_arguments() -> None:
    h, s1 = connected()
    seen = []
    job: Job = (lambda conn, a, *, b: seen.append((conn, a, b)) or "ok", (1,), {"b": 2})
    assert h.drive(h.core.run(job), [SWITCH, *committing()]) == "ok"
    assert h.trace[2] == (OP_UNIT, job, s1)
    assert seen == [(s1, 1, 2)]


@pytest.mark.parametrize(("opens", "ops"), [
    (True, ["CONNECT", "INFO", "APPLY_STATE", "CONFIGURE", "COMMIT"]),
    (False, ["CONNECT", "INFO", "APPLY_STATE", "CONFIGURE"]),
])
def test_configure_runs_on_each_new_session_and_what_it_opened_is_committed(
    opens: bool, ops: list[str]
) -> None:
    h = Harness(configure=True)
    s1 = FakeSession("s1")

    def configure(session: FakeSession) -> None:
        session.in_tx = opens

    script = [ok(OP_CONNECT, s1), ok(OP_INFO, info(1)), ok(OP_APPLY_STATE),
              ok(OP_CONFIGURE, effect=configure)]
    if opens:
        script.append(ok(OP_COMMIT))
    assert h.drive(h.core.connect(), script) is s1
    assert h.ops == ops


@pytest.mark.parametrize(("in_tx", "maybe"), [(True, False), (None, True)])
def test_run_inside_an_open_passthrough_transaction_is_refused_before_any_io(
    in_tx: bool | None, maybe: bool
) -> None:
    h, s1 = connected()
    s1.in_tx = in_tx
    h.core.link.maybe_in_transaction = maybe
    unit = Unit()
    with pytest.raises(UnitContractError) as raised:
        h.drive(h.core.run(unit.job), [])
    assert raised.value.rule == "open-transaction"
    assert isinstance(raised.value, psycopg.ProgrammingError)
    assert h.ops == []
    assert unit.calls == []


def test_a_driver_that_cannot_tell_is_trusted_when_no_passthrough_ran() -> None:
    h, s1 = connected()
    s1.in_tx = None
    assert h.drive(h.core.run(Unit().job), [SWITCH, *committing()]) == "done"


# --- failures inside the unit --------------------------------------------------------------


def test_a_conflict_rolls_back_and_runs_again_on_the_same_session() -> None:
    h, s1 = connected()
    unit = Unit("second time lucky")
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, conflict(), lost=False),
              ok(OP_ROLLBACK), ok(OP_SLEEP), *committing("101")]
    assert h.drive(h.core.run(unit.job), script) == "second time lucky"
    assert h.ops == ["AUTOCOMMIT", "BEGIN", "UNIT", "ROLLBACK", "SLEEP",
                     "BEGIN", "UNIT", "COMMIT"]
    assert h.sleeps == [0.25]
    assert all(op[1] is s1 for op in h.trace if op[0] in (OP_BEGIN, OP_ROLLBACK, OP_COMMIT))
    assert unit.calls == [s1]  # the first run was thrown at, the second one ran
    assert h.names == ["FailureDetected", "UnitReplayed"]
    detected = h.one(FailureDetected)
    assert (detected.phase, detected.attempt, detected.failure.kind) == (
        "unit", 1, Kind.TRANSACTION_CONFLICT)
    replayed = h.one(UnitReplayed)
    assert (replayed.attempt, replayed.reason) == (2, "transaction_conflict")
    assert h.core.link.raw is s1


@pytest.mark.parametrize(("boot", "fence"), [(1, True), (1, False), (2, None)])
def test_a_lost_session_in_the_unit_reconnects_and_runs_again(
    boot: int, fence: bool | None
) -> None:
    """END_SESSION fences the lost session on the same server, never after a failover."""
    h, s1 = connected()
    s2 = FakeSession("s2")
    unit = Unit("done")
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, shutdown()), ok(OP_DISCARD),
              ok(OP_SLEEP), *opening(s2, 2, boot=boot, fence=fence), SWITCH,
              *committing("101")]
    assert h.drive(h.core.run(unit.job), script) == "done"
    same_server = ["END_SESSION"] if boot == 1 else []
    assert h.ops == ["AUTOCOMMIT", "BEGIN", "UNIT", "DISCARD", "SLEEP",
                     "CONNECT", "INFO", *same_server, "APPLY_STATE", "AUTOCOMMIT",
                     "BEGIN", "UNIT", "COMMIT"]
    assert h.trace[3] == (OP_DISCARD, s1)
    if boot == 1:
        assert h.trace[7] == (OP_END_SESSION, s2, info(1))  # the lost one, by pid and start
    assert h.names == ["FailureDetected", "ReconnectAttempt", "Reconnected", "UnitReplayed"]
    assert h.one(FailureDetected).failure.kind is Kind.CONNECTION_LOST
    assert h.one(ReconnectAttempt).attempt == 2
    reconnected = h.one(Reconnected)
    assert reconnected.failover is (boot != 1)
    assert reconnected.ended_old_session is bool(fence)
    assert (reconnected.server_started, reconnected.previous_server_started) == (
        f"boot-{boot}", "boot-1")
    assert h.one(UnitReplayed).reason == "connection_lost"
    assert unit.calls == [s2]
    assert h.core.link.raw is s2
    assert h.core.link.lost is None


def test_a_lost_session_without_sqlstate_in_the_unit_is_a_lost_session() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, server_gone()), ok(OP_DISCARD),
              ok(OP_SLEEP), *opening(s2, 2, fence=True), SWITCH, *committing("101")]
    assert h.drive(h.core.run(Unit().job), script) == "done"
    assert h.one(FailureDetected).failure.sqlstate is None


def test_a_lost_session_at_begin_reconnects_and_runs_the_unit_once() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    unit = Unit()
    script = [SWITCH, fail(OP_BEGIN, server_gone()), ok(OP_DISCARD), ok(OP_SLEEP),
              *opening(s2, 2, fence=False), SWITCH, *committing("101")]
    assert h.drive(h.core.run(unit.job), script) == "done"
    assert unit.calls == [s2]
    # It had not run, but this try had begun: the next one counts as a replay.
    assert h.one(UnitReplayed).attempt == 2


def test_a_unit_that_caught_the_loss_of_its_session_runs_again() -> None:
    """unit_left 'lost': the unit swallowed the error and returned; nothing committed."""
    h, _ = connected()
    s2 = FakeSession("s2")

    def swallow_once(session: FakeSession) -> str:
        if len(unit.calls) > 1:
            return "done"
        session.lost = True  # a statement failed: the session died; the unit caught it
        return "a result from a dead session"

    unit = Unit(body=swallow_once)
    script = [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), ok(OP_DISCARD), ok(OP_SLEEP),
              *opening(s2, 2, fence=True), SWITCH, *committing("101")]
    assert h.drive(h.core.run(unit.job), script) == "done"
    assert h.ops[:4] == ["AUTOCOMMIT", "BEGIN", "UNIT", "DISCARD"]  # never committed
    assert len(unit.calls) == 2
    detected = h.one(FailureDetected)
    assert (detected.phase, detected.failure.kind) == ("unit", Kind.CONNECTION_LOST)
    assert "the unit caught the error" in detected.error
    assert h.one(UnitReplayed).reason == "connection_lost"


def test_a_lost_prepared_statement_runs_again_once_on_a_session_of_this_call() -> None:
    h = Harness()
    s1 = FakeSession("s1")
    unit = Unit()
    script = [*opening(s1, 1), SWITCH, ok(OP_BEGIN, "100"),
              fail(OP_UNIT, sqlstate("26000"), lost=False), ok(OP_ROLLBACK), ok(OP_SLEEP),
              ok(OP_BEGIN, "101"), fail(OP_UNIT, sqlstate("26000"), lost=False),
              ok(OP_ROLLBACK)]
    with pytest.raises(pg_errors.InvalidSqlStatementName) as raised:
        h.drive(h.core.run(unit.job), script)
    assert raised.value.failure.kind is Kind.SESSION_STATE_LOST  # type: ignore[attr-defined]
    assert h.names == ["FailureDetected", "UnitReplayed", "FailureDetected"]


def test_a_lost_prepared_statement_on_an_older_session_is_raised() -> None:
    h, _ = connected()
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, sqlstate("26000"), lost=False),
              ok(OP_ROLLBACK)]
    with pytest.raises(pg_errors.InvalidSqlStatementName):
        h.drive(h.core.run(Unit().job), script)


def test_the_applications_own_exception_rolls_back_and_is_raised_as_it_is() -> None:
    h, s1 = connected()
    mistake = ValueError("the application's own bug")

    def body(session: FakeSession) -> None:
        raise mistake

    unit = Unit(body=body)
    with pytest.raises(ValueError, match="own bug") as raised:
        h.drive(h.core.run(unit.job), [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT),
                                       ok(OP_ROLLBACK)])
    assert raised.value is mistake
    assert h.ops == ["AUTOCOMMIT", "BEGIN", "UNIT", "ROLLBACK"]
    assert len(unit.calls) == 1
    assert h.events == []
    assert h.core.link.raw is s1


def test_a_database_error_that_is_not_retryable_rolls_back_and_is_raised() -> None:
    h, s1 = connected()
    duplicate = sqlstate("23505", "duplicate key value violates unique constraint")
    with pytest.raises(pg_errors.UniqueViolation) as raised:
        h.drive(h.core.run(Unit().job), [SWITCH, ok(OP_BEGIN, "100"),
                                         fail(OP_UNIT, duplicate, lost=False),
                                         ok(OP_ROLLBACK)])
    assert raised.value is duplicate
    assert raised.value.failure.kind is Kind.NOT_RETRYABLE  # type: ignore[attr-defined]
    assert h.names == ["FailureDetected"]
    assert h.core.link.raw is s1


def test_a_commit_the_server_refused_is_not_a_lost_commit() -> None:
    """COMMIT answered with 40001 (serializable): rolled back, run again, no resolution."""
    h, s1 = connected()
    script = [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), fail(OP_COMMIT, conflict(), lost=False),
              ok(OP_ROLLBACK), ok(OP_SLEEP), *committing("101")]
    assert h.drive(h.core.run(Unit().job), script) == "done"
    assert "XACT_STATUS" not in h.ops
    assert h.ops[3:5] == ["COMMIT", "ROLLBACK"]
    assert all(op[1] is s1 for op in h.trace if op[0] != OP_UNIT and op[0] != OP_SLEEP)
    assert h.one(FailureDetected).phase == "commit"


# --- the unit-of-work contract ---------------------------------------------------------------


def _refuse_raised(session: FakeSession) -> None:
    assert session.guard is not None
    raise session.guard.refuse("ended-transaction", "commit() was called")


def _refuse_caught(session: FakeSession) -> str:
    assert session.guard is not None
    with contextlib.suppress(UnitContractError):
        raise session.guard.refuse("nested-run", "run() was called again")
    return "carried on"


def _left(state: str, text: str = "") -> Callable[[FakeSession], str]:
    def body(session: FakeSession) -> str:
        session.left = state
        session.error_text = text
        return "returned"
    return body


def _closed(session: FakeSession) -> str:
    session.shut = True
    return "returned"


def _closed_then_error(session: FakeSession) -> None:
    session.shut = True
    raise psycopg.OperationalError("the connection is closed")


@pytest.mark.parametrize(("body", "rule", "cleanup", "said"), [
    (_refuse_raised, "ended-transaction", "ROLLBACK", "commit() was called"),
    (_refuse_caught, "nested-run", "ROLLBACK", "run() was called again"),
    (_left("failed", "ERROR:  duplicate key value\nDETAIL: x"), "swallowed-error", "ROLLBACK",
     "the server said: ERROR:  duplicate key value"),
    (_left("ended"), "ended-transaction", "ROLLBACK", "no transaction was open"),
    # A closed session cannot roll back: it is given up (the server rolled back).
    (_closed, "closed-connection", "DISCARD", "the connection was closed"),
    (_closed_then_error, "closed-connection", "DISCARD", "the connection was closed"),
], ids=["refused", "refusal-caught", "failed", "ended", "closed", "closed-then-error"])
def test_a_broken_contract_rolls_back_and_is_never_retried(
    body: Callable[[FakeSession], Any], rule: str, cleanup: str, said: str
) -> None:
    h, s1 = connected()
    unit = Unit(body=body)
    with pytest.raises(UnitContractError) as raised:
        h.drive(h.core.run(unit.job), [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), ok(
            OP_ROLLBACK if cleanup == "ROLLBACK" else OP_DISCARD)])
    error = raised.value
    assert error.rule == rule
    assert said in str(error)
    assert isinstance(error, psycopg.ProgrammingError)
    assert error.failure.retryable is False
    assert h.ops == ["AUTOCOMMIT", "BEGIN", "UNIT", cleanup]
    assert len(unit.calls) == 1
    assert h.events == []
    assert (h.core.link.raw is s1) is (cleanup == "ROLLBACK")
    if body is _closed_then_error:
        assert isinstance(error.__cause__, psycopg.OperationalError)


def test_a_broken_contract_whose_rollback_fails_gives_the_session_up() -> None:
    h, _ = connected()
    with pytest.raises(UnitContractError):
        h.drive(h.core.run(Unit(body=_refuse_raised).job),
                [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT),
                 fail(OP_ROLLBACK, server_gone()), ok(OP_DISCARD)])
    assert h.core.link.raw is None
    assert h.core.link.lost == info(1)


# --- a lost reply to COMMIT -------------------------------------------------------------------


def lost_commit(s2: FakeSession, *, boot: int = 1, fence: bool | None = True) -> list[Answer]:
    """COMMIT of xid 100 on s1 loses its reply; s2 (pid 2, on ``boot``) is made to ask."""
    return [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), fail(OP_COMMIT, server_gone()),
            ok(OP_DISCARD), ok(OP_SLEEP),
            *opening(s2, 2, boot=boot, fence=fence if boot == 1 else None), SWITCH]


LOST_COMMIT_OPS = ["AUTOCOMMIT", "BEGIN", "UNIT", "COMMIT", "DISCARD", "SLEEP",
                   "CONNECT", "INFO", "END_SESSION", "APPLY_STATE", "AUTOCOMMIT"]


def test_a_lost_commit_that_committed_returns_its_result_and_is_not_run_again() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    unit = Unit("paid")
    result = h.drive(h.core.run(unit.job), [*lost_commit(s2), ok(OP_XACT_STATUS, "committed")])
    assert result == "paid"
    assert len(unit.calls) == 1
    assert h.ops == [*LOST_COMMIT_OPS, "XACT_STATUS"]
    assert h.trace[-1] == (OP_XACT_STATUS, s2, "100")
    assert h.names == ["FailureDetected", "ReconnectAttempt", "Reconnected", "CommitResolved"]
    assert h.one(FailureDetected).phase == "commit"
    resolved = h.one(CommitResolved)
    assert (resolved.xid, resolved.status, resolved.outcome, resolved.terminated_old_session) \
        == ("100", "committed", "returned", True)
    # Resolved for good: the next unit is the steady state on the new session.
    h.reset()
    assert h.drive(h.core.run(unit.job), committing("101")) == "paid"
    assert all(op[1] is s2 for op in h.trace if op[0] != OP_UNIT)


@pytest.mark.parametrize(("status", "boot"), [
    ("aborted", 1),
    # After a restart anything but "committed" means ours did not commit.
    ("aborted", 2),
    ("future", 2),
    ("in progress", 2),
])
def test_a_lost_commit_that_did_not_commit_is_run_again(status: str, boot: int) -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    unit = Unit()
    script = [*lost_commit(s2, boot=boot), ok(OP_XACT_STATUS, status), *committing("101")]
    assert h.drive(h.core.run(unit.job), script) == "done"
    assert len(unit.calls) == 2
    assert ("END_SESSION" in h.ops) is (boot == 1)
    assert h.ops[-4:] == ["XACT_STATUS", "BEGIN", "UNIT", "COMMIT"]
    assert h.names == ["FailureDetected", "ReconnectAttempt", "Reconnected", "CommitResolved",
                       "UnitReplayed"]
    resolved = h.one(CommitResolved)
    assert (resolved.status, resolved.outcome) == (status, "replayed")
    assert h.one(Reconnected).failover is (boot != 1)
    assert h.one(UnitReplayed).attempt == 2


@pytest.mark.parametrize(("second", "replays"), [("aborted", True), ("committed", False)])
def test_a_lost_commit_still_in_progress_ends_the_old_session_and_asks_again(
    second: str, replays: bool
) -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    unit = Unit()
    script = [*lost_commit(s2, fence=False), ok(OP_XACT_STATUS, "in progress"),
              ok(OP_END_SESSION, True), ok(OP_XACT_STATUS, second)]
    if replays:
        script += committing("101")
    assert h.drive(h.core.run(unit.job), script) == "done"
    ask = h.ops.index("XACT_STATUS")
    assert h.ops[ask:ask + 3] == ["XACT_STATUS", "END_SESSION", "XACT_STATUS"]
    assert h.trace[ask + 1] == (OP_END_SESSION, s2, info(1))  # the COMMIT's own session
    assert len(unit.calls) == 1 + replays
    resolved = h.one(CommitResolved)
    assert resolved.status == second
    assert resolved.terminated_old_session is True


def test_a_lost_commit_in_progress_twice_is_asked_about_on_the_next_try() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    script = [*lost_commit(s2, fence=False), ok(OP_XACT_STATUS, "in progress"),
              ok(OP_END_SESSION, False), ok(OP_XACT_STATUS, "in progress"),
              ok(OP_END_SESSION, False), ok(OP_SLEEP),
              # the same session asks again on the next try: it is still usable
              ok(OP_XACT_STATUS, "aborted"), *committing("101")]
    assert h.drive(h.core.run(Unit().job), script) == "done"
    assert h.sleeps == [0.25, 0.5]
    assert h.one(CommitResolved).outcome == "replayed"


@pytest.mark.parametrize(("answer", "boot", "reason"), [
    (None, 1, "pg_xact_status(100) gave no answer (None)"),
    ("future", 1, "gave no answer ('future')"),
    # After a restart the id may have been handed out again: "committed" may not be ours.
    ("committed", 2, "the server restarted in between and may have handed the id out again"),
    (None, 2, "gave no answer (None)"),
])
def test_a_lost_commit_the_server_cannot_vouch_for_raises_commit_outcome_unknown(
    answer: str | None, boot: int, reason: str
) -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    unit = Unit()
    with pytest.raises(CommitOutcomeUnknown) as raised:
        h.drive(h.core.run(unit.job), [*lost_commit(s2, boot=boot), ok(OP_XACT_STATUS, answer)])
    error = raised.value
    assert error.xid == "100"
    assert reason in str(error)
    assert isinstance(error, psycopg.OperationalError)
    assert error.failure.condition == "commit_outcome_unknown"
    assert error.failure.retryable is False
    assert len(unit.calls) == 1
    resolved = h.one(CommitResolved)
    assert (resolved.status, resolved.outcome) == (answer or "unknown", "raised")
    assert h.core.link.raw is s2  # the asking session is fine


def test_a_lost_commit_whose_status_may_not_be_read_is_unknown() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    denied = sqlstate("42501", "permission denied for function pg_xact_status")
    with pytest.raises(CommitOutcomeUnknown, match="gave no answer"):
        h.drive(h.core.run(Unit().job), [*lost_commit(s2), fail(OP_XACT_STATUS, denied,
                                                                 lost=False)])


def test_a_lost_commit_whose_asking_session_is_lost_too_asks_on_the_next_one() -> None:
    h, _ = connected()
    s2, s3 = FakeSession("s2"), FakeSession("s3")
    unit = Unit("paid")
    script = [*lost_commit(s2), fail(OP_XACT_STATUS, server_gone()), ok(OP_DISCARD),
              ok(OP_SLEEP), *opening(s3, 3, fence=True), SWITCH,
              ok(OP_XACT_STATUS, "committed")]
    assert h.drive(h.core.run(unit.job), script) == "paid"
    assert h.trace[-1] == (OP_XACT_STATUS, s3, "100")
    assert len(unit.calls) == 1
    assert h.one(CommitResolved).outcome == "returned"


def test_a_read_only_unit_that_lost_the_commit_reply_returns_its_result() -> None:
    """No transaction id (BEGIN READ ONLY): nothing was written, nothing to ask."""
    h, _ = connected(state=SessionState(read_only=True))
    unit = Unit("read")
    script = [SWITCH, ok(OP_BEGIN, None), ok(OP_UNIT), fail(OP_COMMIT, server_gone()),
              ok(OP_DISCARD)]
    assert h.drive(h.core.run(unit.job), script) == "read"
    assert h.ops == ["AUTOCOMMIT", "BEGIN", "UNIT", "COMMIT", "DISCARD"]
    assert h.names == ["FailureDetected", "CommitResolved"]
    resolved = h.one(CommitResolved)
    assert (resolved.xid, resolved.status, resolved.outcome) == (
        None, "no transaction id", "returned")
    assert h.core.link.raw is None
    # The next unit makes a new session, which fences the old one.
    h.reset()
    s2 = FakeSession("s2")
    assert h.drive(h.core.run(unit.job), [*opening(s2, 2, fence=True), SWITCH,
                                          *committing(None)]) == "read"
    assert h.names == ["ReconnectAttempt", "Reconnected"]


# --- the policy running out ---------------------------------------------------------------


def test_a_server_that_never_comes_back_ends_in_retries_exhausted_at_the_deadline() -> None:
    h, _ = connected(deadline=4.0)
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, shutdown()), ok(OP_DISCARD)]
    for _ in range(6):
        script += [ok(OP_SLEEP), fail(OP_CONNECT, refused())]
    with pytest.raises(RetriesExhausted) as raised:
        h.drive(h.core.run(Unit().job), script)
    error = raised.value
    # 0.25 + 0.5 + 1 + 1 + 1, then the rest of the deadline: the last try is at it.
    assert h.sleeps == [0.25, 0.5, 1.0, 1.0, 1.0, 0.25]
    assert h.now == 4.0
    assert (error.attempts, error.elapsed, error.target) == (7, 4.0, TARGET.description)
    assert error.failure.kind is Kind.CONNECT_FAILED
    assert isinstance(error, psycopg.OperationalError)
    assert isinstance(error.__cause__, psycopg.OperationalError)  # the last connect's
    assert "gave up after 7 tries in 4.0 s" in str(error)
    gave_up = h.one(GaveUp)
    assert gave_up.attempts == 7
    assert h.names[-1] == "GaveUp"
    assert h.names.count("ReconnectAttempt") == 6
    assert "PROBE" not in h.ops  # a session existed: no login question


def test_the_policys_attempts_bound_the_tries() -> None:
    h, _ = connected(attempts=3)
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, shutdown()), ok(OP_DISCARD),
              ok(OP_SLEEP), fail(OP_CONNECT, refused()), ok(OP_SLEEP),
              fail(OP_CONNECT, refused())]
    with pytest.raises(RetriesExhausted, match="attempts 3") as raised:
        h.drive(h.core.run(Unit().job), script)
    assert raised.value.attempts == 3


def test_a_lost_commit_with_no_server_to_ask_ends_in_commit_outcome_unknown() -> None:
    h, _ = connected(deadline=1.0)
    script = [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), fail(OP_COMMIT, server_gone()),
              ok(OP_DISCARD), ok(OP_SLEEP), fail(OP_CONNECT, refused()), ok(OP_SLEEP),
              fail(OP_CONNECT, refused()), ok(OP_SLEEP), fail(OP_CONNECT, refused())]
    with pytest.raises(CommitOutcomeUnknown) as raised:
        h.drive(h.core.run(Unit().job), script)
    assert h.sleeps == [0.25, 0.5, 0.25]
    error = raised.value
    assert error.xid == "100"
    assert "no session to ask the server within 1.0 s (4 tries)" in str(error)
    assert not isinstance(error, RetriesExhausted)
    assert h.names[-1] == "GaveUp"


def test_the_deadline_runs_from_the_first_failure() -> None:
    h, _ = connected(deadline=60.0)
    s2 = FakeSession("s2")

    def slow_then_lost(session: FakeSession) -> None:
        h.now += 100.0  # a long report, then the server goes away
        session.lost = True

    script = [SWITCH, ok(OP_BEGIN, "100"),
              Answer(OP_UNIT, error=shutdown(), effect=slow_then_lost), ok(OP_DISCARD),
              ok(OP_SLEEP), *opening(s2, 2, fence=True), SWITCH, *committing("101")]
    assert h.drive(h.core.run(Unit().job), script) == "done"


# --- connecting -------------------------------------------------------------------------------


def test_a_connect_failure_that_is_not_retryable_is_raised_at_once() -> None:
    h = Harness()
    wrong = sqlstate("28P01", 'password authentication failed for user "app"')
    with pytest.raises(pg_errors.InvalidPassword) as raised:
        h.drive(h.core.connect(), [fail(OP_CONNECT, wrong)])
    assert raised.value is wrong
    assert raised.value.failure.kind is Kind.NOT_RETRYABLE  # type: ignore[attr-defined]
    assert h.ops == ["CONNECT"]
    assert h.names == ["FailureDetected"]
    assert h.one(FailureDetected).phase == "connect"
    assert h.core.link.raw is None


def test_a_first_connect_that_is_refused_waits_for_the_server() -> None:
    h = Harness()
    s1 = FakeSession("s1")
    down = [ProbeAnswer("db1:5432", "refused")]
    script = [fail(OP_CONNECT, refused()), ok(OP_PROBE, down), ok(OP_SLEEP),
              *opening(s1, 1)]
    assert h.drive(h.core.connect(), script) is s1
    assert h.ops == ["CONNECT", "PROBE", "SLEEP", "CONNECT", "INFO", "APPLY_STATE"]
    assert h.trace[1] == (OP_PROBE, TARGET)
    assert h.names == ["FailureDetected"]


def test_a_first_connect_refused_by_a_server_that_is_up_is_the_logins_fault() -> None:
    h = Harness()
    error = refused()
    script = [fail(OP_CONNECT, error), ok(OP_PROBE, [ProbeAnswer("db1:5432", "error", "3D000")])]
    with pytest.raises(psycopg.OperationalError) as raised:
        h.drive(h.core.connect(), script)
    assert raised.value is error
    failure = raised.value.failure  # type: ignore[attr-defined]
    assert (failure.retryable, failure.rule, failure.sqlstate) == (False, SERVER_UP, "3D000")


def test_a_first_connect_to_a_server_that_just_came_up_tries_once_more_at_once() -> None:
    h = Harness()
    s1 = FakeSession("s1")
    up = [ProbeAnswer("db1:5432", "accepting", None, True)]
    assert h.drive(h.core.connect(), [fail(OP_CONNECT, refused()), ok(OP_PROBE, up),
                                      *opening(s1, 1)]) is s1
    assert h.ops == ["CONNECT", "PROBE", "CONNECT", "INFO", "APPLY_STATE"]
    assert h.events == []


def test_a_failed_login_after_a_session_existed_is_a_failover_and_retried() -> None:
    """``connect_failure``: "failed after the server asked for a password" is retried once
    the same settings worked (a server shutting down mid-handshake), never probed."""
    h, _ = connected()
    s2 = FakeSession("s2")
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, shutdown()), ok(OP_DISCARD),
              ok(OP_SLEEP), fail(OP_CONNECT, refused(needs_password=True)), ok(OP_SLEEP),
              *opening(s2, 2, fence=True), SWITCH, *committing("101")]
    assert h.drive(h.core.run(Unit().job), script) == "done"
    connect_failure = [e for e in h.events if isinstance(e, FailureDetected)][1]
    assert connect_failure.phase == "connect"
    assert connect_failure.failure.kind is Kind.CONNECT_FAILED
    assert connect_failure.failure.retryable is True
    assert connect_failure.failure.rule == NO_SQLSTATE_AUTH.code


def test_the_same_failed_login_on_the_first_connect_asks_the_server() -> None:
    h = Harness()
    error = refused(needs_password=True)
    script = [fail(OP_CONNECT, error), ok(OP_PROBE, [ProbeAnswer("db1:5432", "accepting")]),
              fail(OP_CONNECT, refused(needs_password=True)),
              ok(OP_PROBE, [ProbeAnswer("db1:5432", "accepting")])]
    with pytest.raises(psycopg.OperationalError) as raised:
        h.drive(h.core.connect(), script)
    failure = raised.value.failure  # type: ignore[attr-defined]
    assert (failure.retryable, failure.rule) == (False, SERVER_UP)


def test_a_session_that_fails_while_being_set_up_is_discarded_and_retried() -> None:
    h = Harness()
    half, s1 = FakeSession("half"), FakeSession("s1")
    script = [ok(OP_CONNECT, half), fail(OP_INFO, server_gone()), ok(OP_DISCARD),
              ok(OP_SLEEP), *opening(s1, 1)]
    assert h.drive(h.core.connect(), script) is s1
    assert h.trace[2] == (OP_DISCARD, half)


def test_a_fence_that_failed_is_tried_again_by_the_next_session() -> None:
    h, _ = connected()
    s2, s3 = FakeSession("s2"), FakeSession("s3")
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, shutdown()), ok(OP_DISCARD),
              ok(OP_SLEEP), ok(OP_CONNECT, s2), ok(OP_INFO, info(2)),
              fail(OP_END_SESSION, server_gone()), ok(OP_DISCARD), ok(OP_SLEEP),
              *opening(s3, 3, fence=True), SWITCH, *committing("101")]
    assert h.drive(h.core.run(Unit().job), script) == "done"
    assert (OP_END_SESSION, s3, info(1)) in h.trace


def test_a_lost_commit_whose_reconnect_is_refused_for_good_is_unknown() -> None:
    h, _ = connected()
    script = [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), fail(OP_COMMIT, server_gone()),
              ok(OP_DISCARD), ok(OP_SLEEP),
              fail(OP_CONNECT, sqlstate("28P01", "password authentication failed"))]
    with pytest.raises(CommitOutcomeUnknown):
        h.drive(h.core.run(Unit().job), script)


# --- interruptions (Ctrl-C, a task's cancellation) ---------------------------------------------

INTERRUPTIONS = [KeyboardInterrupt, asyncio.CancelledError]


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
def test_an_interrupted_unit_gives_its_session_up_and_says_rolled_back(
    interruption: type[BaseException],
) -> None:
    h, s1 = connected()
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, interruption(), lost=False),
              ok(OP_DISCARD)]
    with pytest.raises(interruption):
        h.drive(h.core.run(Unit().job), script)
    assert h.ops == ["AUTOCOMMIT", "BEGIN", "UNIT", "DISCARD"]
    event = h.one(UnitInterrupted)
    assert (event.phase, event.xid, event.outcome, event.interruption) == (
        "unit", "100", "rolled back", interruption.__name__)
    assert h.core.link.raw is None
    assert h.core.link.lost == info(1)  # fenced by the next session
    assert h.core.link.guard is None
    assert s1.guard is None


@pytest.mark.parametrize("interruption", INTERRUPTIONS)
@pytest.mark.parametrize(("outcome", "lost", "kept"), [
    ("committed", False, True),  # the runner let the COMMIT finish: the session is fine
    ("committed", True, False),  # ... but the session broke doing it
    ("rolled back", False, False),
    (None, False, False),  # nobody knows: never hand the session out again
])
def test_an_interrupted_commit_says_what_became_of_it(
    interruption: type[BaseException], outcome: str | None, lost: bool, kept: bool
) -> None:
    h, s1 = connected()
    exc = interruption()
    if outcome is not None:
        setattr(exc, COMMIT_OUTCOME_ATTR, outcome)
    script = [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), fail(OP_COMMIT, exc, lost=lost)]
    if not kept:
        script.append(ok(OP_DISCARD))
    with pytest.raises(interruption):
        h.drive(h.core.run(Unit().job), script)
    event = h.one(UnitInterrupted)
    assert (event.phase, event.xid, event.outcome) == ("commit", "100", outcome or "unknown")
    assert (h.core.link.raw is s1) is kept


def test_an_interrupted_first_connect_has_not_begun() -> None:
    h = Harness()
    with pytest.raises(KeyboardInterrupt):
        h.drive(h.core.run(Unit().job), [fail(OP_CONNECT, KeyboardInterrupt())])
    event = h.one(UnitInterrupted)
    assert (event.phase, event.xid, event.outcome) == ("connect", None, "not begun")


def test_an_interruption_while_a_session_is_set_up_discards_it() -> None:
    h = Harness()
    half = FakeSession("half")
    with pytest.raises(asyncio.CancelledError):
        h.drive(h.core.run(Unit().job), [ok(OP_CONNECT, half),
                                         fail(OP_INFO, asyncio.CancelledError(), lost=False),
                                         ok(OP_DISCARD)])
    assert h.trace[-1] == (OP_DISCARD, half)
    assert h.one(UnitInterrupted).outcome == "not begun"


def test_an_interruption_while_waiting_to_run_again_says_rolled_back() -> None:
    h, _ = connected()
    script = [SWITCH, ok(OP_BEGIN, "100"), fail(OP_UNIT, shutdown()), ok(OP_DISCARD),
              fail(OP_SLEEP, KeyboardInterrupt())]
    with pytest.raises(KeyboardInterrupt):
        h.drive(h.core.run(Unit().job), script)
    event = h.one(UnitInterrupted)
    assert (event.phase, event.outcome) == ("connect", "rolled back")


def test_an_interruption_while_asking_about_a_lost_commit_is_unknown() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    script = [*lost_commit(s2), fail(OP_XACT_STATUS, KeyboardInterrupt(), lost=False),
              ok(OP_DISCARD)]
    with pytest.raises(KeyboardInterrupt):
        h.drive(h.core.run(Unit().job), script)
    event = h.one(UnitInterrupted)
    assert (event.xid, event.outcome) == ("100", "unknown")
    assert h.core.link.raw is None


# --- random failures everywhere: a model of the server, and exactly once ---------------------

# A connect refused for good (28P01, a password changed in the middle of a failover)
# is in: while a lost COMMIT is pending it must be CommitOutcomeUnknown.
# Weighted by repetition, success first (Hypothesis shrinks towards the first choice):
# failures are common enough to combine, rare enough for calls to get somewhere.
CONNECT_HOW = ["ok"] * 6 + ["refused"] * 2 + ["failover"] * 2 + ["wrong-password"]
IO_HOW = ["ok"] * 9 + ["lost"]
UNIT_HOW = ["ok"] * 6 + ["conflict", "lost", "caught-lost", "app-error", "swallowed"]
COMMIT_HOW = ["ok"] * 3 + ["lost-committed", "lost-in-flight", "lost-before",
                           "lost-server-died"] * 2 + ["conflict", "constraint"]
XACT_HOW = ["truth"] * 6 + ["no-answer", "lost", "denied"]


class Server:
    """A server whose answers Hypothesis draws, and which keeps the truth.

    The truth is which transactions committed, including a COMMIT still on its way when
    the client gave its session up (a network break: the old backend is alive and may
    commit at any later operation, until it is ended or the server fails over). After a
    failover an id that had not committed may be handed out again: its status is then
    anything. Setting autocommit on an idle session is local in both drivers, so
    AUTOCOMMIT never fails here.
    """

    def __init__(self, data: st.DataObject) -> None:
        self.data = data
        self.now = 0.0
        self.boot = 1
        self.pids = itertools.count(2)
        self.xids = itertools.count(100)
        self.status: dict[str, str] = {}
        self.boot_of: dict[str, int] = {}
        self.result_of: dict[str, str] = {}
        self.session_of: dict[str, FakeSession] = {}
        self.sessions: dict[int, FakeSession] = {}
        self.in_flight: set[str] = set()
        self.discarded: set[int] = set()
        #: xids whose COMMIT the client saw succeed; xids the server said committed.
        self.commit_seen: set[str] = set()
        self.said_committed: set[str] = set()
        self.unit_runs = 0
        self.begins = 0

    def draw(self, choices: list[str], label: str) -> str:
        return self.data.draw(st.sampled_from(choices), label=label)

    def first(self) -> FakeSession:
        session = FakeSession("s1")
        session.pid = 1
        self.sessions[1] = session
        return session

    # -- the server's side --

    def end_backend(self, session: FakeSession) -> None:
        session.server_alive = False
        xid = session.open_xid
        if xid is not None and self.status[xid] == "in progress":
            self.status[xid] = "aborted"
        self.in_flight.discard(xid)  # type: ignore[arg-type]

    def land(self, xid: str) -> None:
        self.status[xid] = "committed"
        self.in_flight.discard(xid)

    def maybe_land(self) -> None:
        for xid in sorted(self.in_flight):
            if self.data.draw(st.booleans(), label=f"COMMIT of {xid} lands now"):
                self.land(xid)

    def failover(self) -> None:
        self.boot += 1
        for session in self.sessions.values():
            if session.server_alive:
                self.end_backend(session)
            session.lost = True

    # -- the operations --

    def handle(self, op: tuple[Any, ...]) -> Any:
        self.maybe_land()
        code = op[0]
        if code == OP_BEGIN:
            self.begins += 1
        if code == OP_SLEEP:
            self.now += op[1]
            return None
        if code == OP_PROBE:
            raise AssertionError("probed after a session existed")
        if code == OP_CONNECT:
            return self.connect()
        session: FakeSession = op[2] if code == OP_UNIT else op[1]
        assert id(session) not in self.discarded, f"{OP_NAMES[code]} on a discarded session"
        if code == OP_DISCARD:
            self.discarded.add(id(session))
            session.shut = True
            if session.server_alive and self.data.draw(st.booleans(), label="close arrives"):
                self.end_backend(session)
            return None
        if session.lost:
            raise psycopg.OperationalError("the connection is lost")
        if code == OP_AUTOCOMMIT:
            session.autocommit_on = op[2]
            return None
        if code in (OP_INFO, OP_APPLY_STATE, OP_END_SESSION, OP_BEGIN, OP_ROLLBACK) and \
                self.draw(IO_HOW, OP_NAMES[code]) == "lost":
            self.lose(session)
            raise server_gone()
        if code == OP_INFO:
            return info(session.pid, session.boot)
        if code == OP_APPLY_STATE:
            session.autocommit_on = op[2].autocommit
            return None
        if code == OP_END_SESSION:
            old: SessionInfo = op[2]
            target = self.sessions.get(old.backend_pid)
            if target is None or not target.server_alive or target.boot != self.boot:
                return False
            self.end_backend(target)
            return True
        if code == OP_BEGIN:
            xid = str(next(self.xids))
            self.status[xid] = "in progress"
            self.boot_of[xid] = session.boot
            self.session_of[xid] = session
            session.open_xid = xid
            return xid
        if code == OP_ROLLBACK:
            self.finish(session, "aborted")
            return None
        if code == OP_UNIT:
            return self.unit(session)
        if code == OP_COMMIT:
            return self.commit(session)
        if code == OP_XACT_STATUS:
            return self.xact_status(session, op[2])
        raise AssertionError(f"unexpected {OP_NAMES[code]}")

    def lose(self, session: FakeSession, *, backend_dies: bool = True) -> None:
        session.lost = True
        if backend_dies:
            self.end_backend(session)

    def finish(self, session: FakeSession, status: str) -> None:
        xid = session.open_xid
        if xid is not None and self.status[xid] == "in progress":
            self.status[xid] = status
        session.open_xid = None
        session.left = "open"

    def connect(self) -> FakeSession:
        how = self.draw(CONNECT_HOW, "CONNECT")
        if how == "refused":
            raise refused()
        if how == "wrong-password":
            raise sqlstate("28P01", 'password authentication failed for user "app"')
        if how == "failover":
            self.failover()
        session = FakeSession(f"s{len(self.sessions) + 1}", self.boot)
        session.pid = next(self.pids)
        self.sessions[session.pid] = session
        return session

    def unit(self, session: FakeSession) -> str:
        self.unit_runs += 1
        xid = session.open_xid
        assert xid is not None
        how = self.draw(UNIT_HOW, "UNIT")
        if how == "conflict":
            raise conflict()
        if how == "lost":
            self.lose(session)
            raise shutdown()
        if how == "app-error":
            raise ValueError("the application's own error")
        result = f"result of {xid}"
        self.result_of[xid] = result
        if how == "caught-lost":
            self.lose(session)
        elif how == "swallowed":
            session.left = "failed"
        return result

    def commit(self, session: FakeSession) -> None:
        xid = session.open_xid
        assert xid is not None
        how = self.draw(COMMIT_HOW, "COMMIT")
        if how == "ok":
            self.finish(session, "committed")
            self.commit_seen.add(xid)
            return
        if how in ("conflict", "constraint"):
            self.finish(session, "aborted")
            raise conflict() if how == "conflict" else sqlstate("23505")
        if how == "lost-committed":
            self.land(xid)
        elif how == "lost-in-flight":
            self.in_flight.add(xid)
        # lost-before: the backend is alive and idle in its transaction (a partition)
        self.lose(session, backend_dies=how == "lost-server-died")
        raise server_gone()

    def xact_status(self, session: FakeSession, xid: str) -> str | None:
        how = self.draw(XACT_HOW, "XACT_STATUS")
        if how == "lost":
            self.lose(session)
            raise server_gone()
        if how == "denied":
            raise sqlstate("42501", "permission denied for function pg_xact_status")
        if how == "no-answer":
            return None
        status = self.status[xid]
        if self.boot_of[xid] != self.boot and status != "committed":
            # Handed out again by the server that recovered: anybody's status now.
            status = self.draw(["aborted", "future", "in progress", "committed"], "reused")
        if status == "committed" and self.boot_of[xid] == self.boot:
            self.said_committed.add(xid)
        return status

    def flush(self) -> None:
        """The worst case after the call: every COMMIT still on its way lands."""
        for xid in sorted(self.in_flight):
            session = self.session_of[xid]
            if session.server_alive and self.status[xid] == "in progress":
                self.land(xid)


def drive_model(flow: Flow[Any], server: Server) -> Any:
    throw, value = False, None
    while True:
        try:
            op = flow.throw(value) if throw else flow.send(value)
        except StopIteration as done:
            return done.value
        try:
            throw, value = False, server.handle(op)
        except AssertionError:
            raise
        except BaseException as exc:
            throw, value = True, exc


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_a_unit_commits_exactly_once_whatever_fails(data: st.DataObject) -> None:
    server = Server(data)
    h = Harness(attempts=8, clock=lambda: server.now)
    core, events = h.core, h.events
    s1 = server.first()
    assert h.drive(core.connect(), opening(s1, 1)) is s1

    returned: Any = None
    raised: BaseException | None = None
    try:
        returned = drive_model(core.run((lambda session: None, (), {})), server)
    except Exception as exc:
        raised = exc
    server.flush()
    event(f"outcome: {type(raised).__name__ if raised is not None else 'returned'}")
    for resolved in (e for e in events if isinstance(e, CommitResolved)):
        event(f"resolved: {resolved.status} -> {resolved.outcome}")
    committed = sorted(x for x, s in server.status.items() if s == "committed")

    assert len(committed) <= 1, f"committed more than once: {committed}"
    if raised is None:
        # Returned only if the client saw its COMMIT succeed, or the server said so.
        assert len(committed) == 1
        (xid,) = committed
        assert returned == server.result_of[xid]
        assert xid in server.commit_seen | server.said_committed
    elif isinstance(raised, CommitOutcomeUnknown):
        assert raised.xid in server.status
    else:
        assert not committed, f"{raised!r} raised, but {committed} committed"
        assert isinstance(raised, (RetriesExhausted, UnitContractError, ValueError,
                                   pg_errors.UniqueViolation, pg_errors.InvalidPassword)), \
            repr(raised)
    replays = sum(isinstance(e, UnitReplayed) for e in events)
    assert replays == max(server.begins - 1, 0)
    for emitted in events:
        if isinstance(emitted, CommitResolved) and emitted.outcome == "returned":
            assert emitted.status == "committed"
