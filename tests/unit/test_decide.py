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
