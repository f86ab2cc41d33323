"""The decisions of DESIGN §3, as a table and as properties. No I/O."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from symfo_failover import Failure, Kind, classify
from symfo_failover._decide import (
    CommitEvidence,
    Phase,
    Resolution,
    Situation,
    Step,
    next_step,
    resolve,
    resolve_commit,
)

LIVE = True
DEAD = False


@pytest.mark.parametrize(
    ("code", "phase", "usable", "step"),
    [
        # Nothing reached the server: try again.
        ("08001", Phase.CONNECT, DEAD, Step.RECONNECT),
        ("57P03", Phase.CONNECT, DEAD, Step.RECONNECT),
        ("28P01", Phase.CONNECT, DEAD, Step.RAISE),
        # Inside the transaction: the server rolled it back; new session, run again.
        ("57P01", Phase.UNIT, DEAD, Step.RECONNECT),
        ("57P02", Phase.UNIT, DEAD, Step.RECONNECT),
        ("08S01", Phase.UNIT, DEAD, Step.RECONNECT),
        ("08006", Phase.UNIT, DEAD, Step.RECONNECT),
        ("25006", Phase.UNIT, LIVE, Step.RECONNECT),  # read-only: a standby after a switch
        # Conflicts: same session.
        ("40001", Phase.UNIT, LIVE, Step.RETRY),
        ("40P01", Phase.UNIT, LIVE, Step.RETRY),
        # The application's own errors are its own.
        ("23505", Phase.UNIT, LIVE, Step.RAISE),
        ("42P01", Phase.UNIT, LIVE, Step.RAISE),
        ("XX000", Phase.UNIT, LIVE, Step.RAISE),
        # COMMIT with no answer from a live server: ask the server.
        ("57P01", Phase.COMMIT, DEAD, Step.RESOLVE),
        ("08S01", Phase.COMMIT, DEAD, Step.RESOLVE),
        ("57P02", Phase.COMMIT, DEAD, Step.RESOLVE),
        # COMMIT answered with an error: it rolled back.
        ("40001", Phase.COMMIT, LIVE, Step.RETRY),
        ("23505", Phase.COMMIT, LIVE, Step.RAISE),
    ],
)
def test_next_step_table(code: str, phase: Phase, usable: bool, step: Step) -> None:
    assert next_step(classify(code), Situation(phase, usable)) is step


def test_a_lost_session_without_sqlstate_during_commit_is_resolved() -> None:
    lost = Failure(Kind.CONNECTION_LOST, None, True, True, "gone")
    assert next_step(lost, Situation(Phase.COMMIT, session_usable=False)) is Step.RESOLVE
    assert next_step(lost, Situation(Phase.UNIT, session_usable=False)) is Step.RECONNECT


def test_a_lost_prepared_statement_runs_again_once_and_only_on_a_new_session() -> None:
    failure = classify("26000")
    assert next_step(failure, Situation(Phase.UNIT, LIVE, fresh_session=True)) is Step.RETRY
    again = Situation(Phase.UNIT, LIVE, fresh_session=True, state_lost_retried=True)
    assert next_step(failure, again) is Step.RAISE
    assert next_step(failure, Situation(Phase.UNIT, LIVE, fresh_session=False)) is Step.RAISE


@pytest.mark.parametrize(
    ("status", "resolution"),
    [
        ("committed", Resolution.COMMITTED),
        ("aborted", Resolution.ABORTED),
        ("in progress", Resolution.END_OLD_SESSION),
        (None, Resolution.UNKNOWN),
        ("", Resolution.UNKNOWN),
        ("something new", Resolution.UNKNOWN),
    ],
)
def test_resolve(status: str | None, resolution: Resolution) -> None:
    assert resolve(status) is resolution


codes = st.text(alphabet="0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=5, max_size=5)
phases = st.sampled_from(list(Phase))


@given(codes, phases, st.booleans(), st.booleans(), st.booleans())
def test_never_runs_again_what_is_not_retryable(
    code: str, phase: Phase, usable: bool, fresh: bool, retried: bool
) -> None:
    failure = classify(code)
    step = next_step(failure, Situation(phase, usable, fresh, retried))
    if not failure.retryable and phase is not Phase.COMMIT:
        assert step is Step.RAISE


@given(codes, st.booleans(), st.booleans())
def test_a_commit_without_an_answer_is_never_run_again_blindly(
    code: str, fresh: bool, retried: bool
) -> None:
    """On a dead session COMMIT may have happened: the only steps are ask or raise."""
    failure = classify(code)
    step = next_step(failure, Situation(Phase.COMMIT, False, fresh, retried))
    assert step is Step.RESOLVE


@given(codes, phases, st.booleans())
def test_same_session_retries_only_on_a_usable_session(
    code: str, phase: Phase, usable: bool
) -> None:
    step = next_step(classify(code), Situation(phase, usable, True, False))
    if step is Step.RETRY:
        assert usable


@pytest.mark.parametrize(
    ("status", "restarted", "resolution"),
    [
        # One server throughout: its answer is final.
        ("committed", False, Resolution.COMMITTED),
        ("aborted", False, Resolution.ABORTED),
        ("in progress", False, Resolution.END_OLD_SESSION),
        (None, False, Resolution.UNKNOWN),
        ("future", False, Resolution.UNKNOWN),
        # A restart in between: an id that never reached the log can be reused, so
        # "committed" may be another transaction's. Anything else means we did not commit.
        ("committed", True, Resolution.UNKNOWN),
        ("aborted", True, Resolution.ABORTED),
        ("in progress", True, Resolution.ABORTED),
        ("future", True, Resolution.ABORTED),
        (None, True, Resolution.UNKNOWN),
    ],
)
def test_resolve_commit(status: str | None, restarted: bool, resolution: Resolution) -> None:
    assert resolve_commit(CommitEvidence(status, restarted)) is resolution


@given(st.one_of(st.none(), st.text(max_size=12)), st.booleans())
def test_resolve_commit_returns_a_result_only_on_a_committed_answer(
    status: str | None, restarted: bool
) -> None:
    """Never guessed: only the server's "committed" (on the same server) returns."""
    resolution = resolve_commit(CommitEvidence(status, restarted))
    if resolution is Resolution.COMMITTED:
        assert status == "committed"
        assert not restarted


# --- a failed first connect, decided from what the servers answered ---------------------

from symfo_failover._decide import (  # noqa: E402
    SERVER_UP,
    ProbeAnswer,
    first_connect_failure,
)
from symfo_failover._sqlstates import NO_SQLSTATE_AUTH, NO_SQLSTATE_CONNECT  # noqa: E402


def _connect_failed() -> Failure:
    return Failure(
        kind=Kind.CONNECT_FAILED, sqlstate=None, retryable=True, reconnect=True,
        message="could not connect", rule=NO_SQLSTATE_CONNECT.code, condition="x")


def _auth_failed() -> Failure:
    return Failure(kind=Kind.NOT_RETRYABLE, sqlstate=None, retryable=False, reconnect=True,
                   message="authentication failed", rule=NO_SQLSTATE_AUTH.code, condition="y")


A = "10.0.0.1:5432"  # never connected to: these are data
B = "10.0.0.2:5432"


@pytest.mark.parametrize(
    ("make", "answers", "sqlstate", "retryable", "again", "waits"),
    [
        # Nobody answers: wait for a server, and say so once.
        (_connect_failed, [ProbeAnswer(A, "refused")], None, True, False, True),
        (_connect_failed, [ProbeAnswer(A, "timeout"), ProbeAnswer(B, "unreachable")],
         None, True, False, True),
        # The server's own word, in any language.
        (_connect_failed, [ProbeAnswer(A, "error", "3D000", True)], "3D000", False, False,
         False),
        (_auth_failed, [ProbeAnswer(A, "error", "3D000", True)], "3D000", False, False, False),
        (_auth_failed, [ProbeAnswer(A, "error", "28P01")], "28P01", False, False, False),
        (_connect_failed, [ProbeAnswer(A, "error", "28000", True)], "28000", False, False,
         False),
        # Not accepting yet: wait.
        (_connect_failed, [ProbeAnswer(A, "error", "57P03")], "57P03", True, False, False),
        (_auth_failed, [ProbeAnswer(A, "error", "53300", True)], "53300", True, False, False),
        # The second host answers after the first is down.
        (_connect_failed, [ProbeAnswer(A, "refused"), ProbeAnswer(B, "error", "3D000")],
         "3D000", False, False, False),
        # Up and accepting this very login: it came up just now, try again at once.
        (_connect_failed, [ProbeAnswer(A, "accepting", None, True)], None, False, True,
         False),
        # Up, asked for a password the probe could not send: the login is at fault.
        (_auth_failed, [ProbeAnswer(A, "accepting")], None, False, True, False),
        (_connect_failed, [ProbeAnswer(A, "accepting")], None, False, True, False),
        # No endpoint known (an ODBC DSN): nothing to ask, nothing said.
        (_connect_failed, [], None, True, False, False),
        # A replica cluster between losing its primary and the promotion: only a
        # standby answers a read-write connection string. Wait for a primary.
        (_connect_failed, [ProbeAnswer(A, "refused"),
                           ProbeAnswer(B, "accepting", None, True, standby=True)],
         None, True, False, True),
        # A standby and a primary that refuses the login: the login is at fault.
        (_connect_failed, [ProbeAnswer(A, "accepting", None, True, standby=True),
                           ProbeAnswer(B, "error", "28P01")], "28P01", False, False, False),
    ],
)
def test_a_failed_first_connect_is_decided_by_the_servers_answer(
    make: object, answers: list[ProbeAnswer], sqlstate: str | None, retryable: bool,
    again: bool, waits: bool,
) -> None:
    failure = make()  # type: ignore[operator]
    verdict = first_connect_failure(failure, answers, driver_text="driver text")
    assert verdict.failure.sqlstate == sqlstate
    assert verdict.failure.retryable is retryable
    assert verdict.try_again_now is again
    assert verdict.nobody_answers is waits
    if sqlstate is not None and not retryable:
        assert verdict.failure.rule == SERVER_UP
        assert f"refused this login with {sqlstate}" in verdict.failure.message
        assert "refused this connection" not in verdict.failure.message
    if sqlstate == "3D000":
        assert "28P01" not in verdict.failure.message
        assert "authentication" not in verdict.failure.message.lower()


@pytest.mark.parametrize("text", [
    'connection to server at "127.0.0.1", port 5433 failed: session is read-only',
    'connection to server at "127.0.0.1", port 5433 failed: server is in hot standby mode',
    "could not make a writable connection to server",
])
def test_libpqs_words_for_no_writable_server_mean_wait(text: str) -> None:
    # The probe could not log in to see in_hot_standby (e.g. no password to give).
    verdict = first_connect_failure(_connect_failed(), [ProbeAnswer(A, "accepting")],
                                    driver_text=text)
    assert verdict.failure.retryable
    assert not verdict.try_again_now
    assert "target_session_attrs" in verdict.failure.message


def test_other_failures_are_not_a_login_question() -> None:
    lost = classify("57P01")
    verdict = first_connect_failure(lost, [ProbeAnswer(A, "error", "3D000")])
    assert verdict.failure == lost
    assert not verdict.try_again_now
    assert not verdict.nobody_answers


# --- a failed connect once a session existed, a read-only COMMIT, the outcomes ------------

from symfo_failover._decide import (  # noqa: E402
    OUTCOME,
    connect_failure,
    unknown_outcome_reason,
)


@pytest.mark.parametrize(
    ("make", "connected_before", "retried"),
    [
        # "Failed after the server asked for a password": a wrong password at first...
        (_auth_failed, False, False),
        # ... but once these settings worked, a server shutting down mid-handshake.
        (_auth_failed, True, True),
        # Everything else is read as it is.
        (_connect_failed, False, False),
        (_connect_failed, True, False),
        (lambda: classify("28P01"), True, False),  # the server's own word
        (lambda: classify("3D000"), True, False),
        (lambda: classify("57P03"), True, False),
    ],
)
def test_connect_failure(make: object, connected_before: bool, retried: bool) -> None:
    failure = make()  # type: ignore[operator]
    read = connect_failure(failure, connected_before=connected_before)
    if retried:
        assert (read.kind, read.retryable) == (Kind.CONNECT_FAILED, True)
        assert (read.sqlstate, read.rule, read.message, read.reconnect) == (
            failure.sqlstate, failure.rule, failure.message, failure.reconnect)
    else:
        assert read == failure


@pytest.mark.parametrize(
    ("code", "phase", "usable", "has_xid", "step"),
    [
        # A read-only unit (no transaction id) lost the reply to COMMIT: its result stands.
        ("57P01", Phase.COMMIT, DEAD, False, Step.RETURN),
        ("08006", Phase.COMMIT, DEAD, False, Step.RETURN),
        (None, Phase.COMMIT, DEAD, False, Step.RETURN),  # a lost session, no SQLSTATE
        (None, Phase.COMMIT, LIVE, False, Step.RETURN),  # no answer from a live server
        # The same with a transaction id: ask the server.
        ("57P01", Phase.COMMIT, DEAD, True, Step.RESOLVE),
        (None, Phase.COMMIT, LIVE, True, Step.RESOLVE),
        # COMMIT answered with an error: the id changes nothing.
        ("40001", Phase.COMMIT, LIVE, False, Step.RETRY),
        ("23505", Phase.COMMIT, LIVE, False, Step.RAISE),
        # Before COMMIT was sent the id changes nothing either.
        ("57P01", Phase.UNIT, DEAD, False, Step.RECONNECT),
        ("40001", Phase.UNIT, LIVE, False, Step.RETRY),
        ("08001", Phase.CONNECT, DEAD, False, Step.RECONNECT),
    ],
)
def test_next_step_without_a_transaction_id(
    code: str | None, phase: Phase, usable: bool, has_xid: bool, step: Step
) -> None:
    failure = classify(code) if code is not None else Failure(
        Kind.CONNECTION_LOST, None, True, True, "gone")
    assert next_step(failure, Situation(phase, usable, has_xid=has_xid)) is step


@given(codes, phases, st.booleans(), st.booleans(), st.booleans())
def test_a_missing_transaction_id_only_turns_resolve_into_return(
    code: str, phase: Phase, usable: bool, fresh: bool, retried: bool
) -> None:
    failure = classify(code)
    with_xid = next_step(failure, Situation(phase, usable, fresh, retried, has_xid=True))
    without = next_step(failure, Situation(phase, usable, fresh, retried, has_xid=False))
    assert without is (Step.RETURN if with_xid is Step.RESOLVE else with_xid)


@pytest.mark.parametrize(
    ("resolution", "outcome"),
    [
        (Resolution.COMMITTED, "returned"),
        (Resolution.ABORTED, "replayed"),
        (Resolution.UNKNOWN, "raised"),
        (Resolution.END_OLD_SESSION, "asked again"),
    ],
)
def test_outcome(resolution: Resolution, outcome: str) -> None:
    assert OUTCOME[resolution] == outcome


def test_every_resolution_has_an_outcome() -> None:
    assert set(OUTCOME) == set(Resolution)


@pytest.mark.parametrize(
    ("status", "restarted", "says"),
    [
        ("committed", True, "transaction 742 shows as committed, but the server restarted"),
        (None, False, "pg_xact_status(742) gave no answer (None)"),
        (None, True, "pg_xact_status(742) gave no answer (None)"),
        ("future", False, "pg_xact_status(742) gave no answer ('future')"),
        ("", False, "pg_xact_status(742) gave no answer ('')"),
    ],
)
def test_unknown_outcome_reason(status: str | None, restarted: bool, says: str) -> None:
    evidence = CommitEvidence(status, restarted)
    assert resolve_commit(evidence) is Resolution.UNKNOWN  # the only case it is asked for
    assert says in unknown_outcome_reason(evidence, "742")
    if status == "committed":
        assert "another transaction's" in unknown_outcome_reason(evidence, "742")


@given(st.one_of(st.none(), st.text(max_size=12)), st.booleans(),
       st.from_regex(r"[1-9][0-9]{0,9}", fullmatch=True))
def test_an_unknown_outcome_always_names_the_transaction(
    status: str | None, restarted: bool, xid: str
) -> None:
    evidence = CommitEvidence(status, restarted)
    if resolve_commit(evidence) is Resolution.UNKNOWN:
        assert xid in unknown_outcome_reason(evidence, xid)
