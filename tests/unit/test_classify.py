"""The classification table, row by row, and classify() on every kind of input. No I/O."""

from __future__ import annotations

import psycopg
import pyodbc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from psycopg import errors as pg_errors
from psycopg.pq import ConnStatus

from symfo_failover import Failure, Kind, classify, sqlstate_of
from symfo_failover import _sqlstates as table

LOST, CONNECT, STATE, CONFLICT, NO = (
    Kind.CONNECTION_LOST,
    Kind.CONNECT_FAILED,
    Kind.SESSION_STATE_LOST,
    Kind.TRANSACTION_CONFLICT,
    Kind.NOT_RETRYABLE,
)

# What the issue and the guide require, written out independently of the table.
# (code, kind, retryable, reconnect)
REQUIRED = [
    ("57P01", LOST, True, True),
    ("57P02", LOST, True, True),
    ("08006", LOST, True, True),
    ("08S01", LOST, True, True),
    ("08003", LOST, True, True),
    ("YE000", LOST, True, True),
    ("08001", CONNECT, True, True),
    ("08004", CONNECT, True, True),
    ("57P03", CONNECT, True, True),
    ("26000", STATE, True, False),
    ("40001", CONFLICT, True, False),
    ("40P01", CONFLICT, True, False),
    ("28000", NO, False, True),
    ("28P01", NO, False, True),
    ("42601", NO, False, False),  # syntax error
    ("42P01", NO, False, False),  # undefined table
    ("23505", NO, False, False),  # unique violation
    ("23503", NO, False, False),  # foreign key violation
    ("22012", NO, False, False),  # division by zero
    ("XX000", NO, False, False),  # internal error: unknown class
    ("ZZ999", NO, False, False),  # not a PostgreSQL code at all
]


@pytest.mark.parametrize(("code", "kind", "retryable", "reconnect"), REQUIRED)
def test_required_mapping(code: str, kind: Kind, retryable: bool, reconnect: bool) -> None:
    failure = classify(code)
    assert (failure.kind, failure.retryable, failure.reconnect) == (kind, retryable, reconnect)
    assert failure.sqlstate == code


@pytest.mark.parametrize("rule", table.EXACT, ids=lambda r: r.code)
def test_every_exact_row_is_reached(rule: table.Rule) -> None:
    failure = classify(rule.code)
    assert failure.rule == rule.code
    assert failure.kind is rule.kind
    assert failure.reconnect is rule.reconnect
    assert failure.retryable is (rule.kind is not NO)
    assert failure.condition == rule.condition


@pytest.mark.parametrize("rule", table.CLASSES, ids=lambda r: r.code)
def test_every_class_row_is_the_fallback_of_its_class(rule: table.Rule) -> None:
    code = rule.code + "ZZZ"  # no exact row has a Z suffix
    assert code not in table.EXACT_BY_CODE
    failure = classify(code)
    assert failure.rule == rule.code
    assert failure.kind is rule.kind


def test_exact_row_wins_over_its_class() -> None:
    # Class 53 is not retryable, but the connection limit is, after a failover.
    assert classify("53100").kind is NO
    assert classify("53300").kind is CONNECT
    # Class 08 is a lost connection, but a protocol violation is not retried.
    assert classify("08ZZZ").kind is LOST
    failure = classify("08P01")
    assert (failure.kind, failure.reconnect) == (NO, True)


def test_decided_class_rows() -> None:
    # The issue asks us to decide the rest of 08, 53, 57 and 58.
    assert classify("08007").kind is LOST
    assert classify("57014").kind is NO  # statement timeout is not a failover
    assert classify("57P04").kind is NO
    assert classify("57P05").kind is LOST
    assert classify("58030").kind is NO
    assert classify("58P01").kind is NO
    assert classify("53200").kind is NO
    assert classify("25006").kind is LOST


def test_unknown_is_never_retryable() -> None:
    failure = classify("QQ123")
    assert failure.rule == "*"
    assert not failure.retryable


@pytest.mark.parametrize("code", ["57p01", " 57P01 ", "57P01\n"])
def test_codes_are_normalised(code: str) -> None:
    assert classify(code).sqlstate == "57P01"
    assert classify(code).kind is LOST


@pytest.mark.parametrize("text", ["", "   ", None])
def test_missing_sqlstate_without_context_is_not_retryable(text: str | None) -> None:
    failure = classify(text)
    assert failure.sqlstate is None
    assert failure.kind is NO


@pytest.mark.parametrize("text", ["hi", "hello!", "5701", "57P011", "57-01", "ｱｲｳｴｵ"])
def test_malformed_codes_are_not_retryable(text: str) -> None:
    failure = classify(text)
    assert failure.kind is NO
    assert failure.sqlstate is None
    assert "not a SQLSTATE" in failure.message


# --- driver exceptions ----------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (pg_errors.AdminShutdown("terminating connection"), LOST),
        (pg_errors.CrashShutdown("crash"), LOST),
        (pg_errors.CannotConnectNow("starting up"), CONNECT),
        (pg_errors.SerializationFailure("could not serialize"), CONFLICT),
        (pg_errors.DeadlockDetected("deadlock"), CONFLICT),
        (pg_errors.InvalidSqlStatementName("no such prepared statement"), STATE),
        (pg_errors.UniqueViolation("duplicate key"), NO),
        (pg_errors.InvalidPassword("password authentication failed"), NO),
    ],
)
def test_psycopg_exceptions_by_sqlstate(exc: psycopg.Error, kind: Kind) -> None:
    assert classify(exc).kind is kind
    assert classify(exc).sqlstate == exc.sqlstate


def test_psycopg_lost_session_without_sqlstate() -> None:
    # What psycopg raises when the server dies under a query, and on any later call.
    texts = ("consuming input failed: server closed the connection", "the connection is closed")
    for text in texts:
        failure = classify(psycopg.OperationalError(text))
        assert failure.kind is LOST
        assert failure.sqlstate is None
        assert failure.rule == "none: session broken"


def test_psycopg_message_text_does_not_decide() -> None:
    # Same type, Japanese text: the same answer (no English text is read).
    failure = classify(psycopg.OperationalError("サーバとの接続が予期せずクローズされました"))
    assert failure.kind is LOST


def test_psycopg_connect_failure_is_connect_failed() -> None:
    pgconn = pg_errors.FinishedPGconn(status=ConnStatus.BAD)
    failure = classify(psycopg.OperationalError("connection failed: refused", pgconn=pgconn))
    assert failure.kind is CONNECT
    assert failure.reconnect


@pytest.mark.parametrize(("needs", "used"), [(True, False), (False, True), (True, True)])
def test_psycopg_connect_failure_after_password_is_not_retryable(needs: bool, used: bool) -> None:
    pgconn = pg_errors.FinishedPGconn(
        status=ConnStatus.BAD, needs_password=needs, used_password=used
    )
    failure = classify(psycopg.OperationalError("connection failed", pgconn=pgconn))
    assert failure.kind is NO
    assert failure.rule.startswith("none: connect failed after")


def test_psycopg_connection_timeout_is_connect_failed() -> None:
    assert classify(pg_errors.ConnectionTimeout("connection timeout expired")).kind is CONNECT


def test_psycopg_pipeline_aborted_is_not_a_lost_connection() -> None:
    assert classify(pg_errors.PipelineAborted("pipeline aborted")).kind is NO


def test_psycopg_other_errors_without_sqlstate_are_not_retryable() -> None:
    assert classify(psycopg.InterfaceError("bad call")).kind is NO
    assert classify(psycopg.ProgrammingError("bad query")).kind is NO


class _FakeSession:
    """A stand-in with the attributes the psycopg adapter reads (local state only)."""

    def __init__(self, broken: bool) -> None:
        self.closed = broken
        self.broken = broken


def test_psycopg_plain_error_without_sqlstate_is_lost_whatever_the_session_says() -> None:
    # psycopg raises "connection socket closed" once libpq closed the socket, while
    # the session still says ACTIVE: the error decides, the session cannot overrule it.
    err = psycopg.OperationalError("connection socket closed")
    assert classify(err, connection=_FakeSession(broken=False)).kind is LOST
    assert classify(err, connection=_FakeSession(broken=True)).kind is LOST


class _OtherOperationalError(psycopg.OperationalError):
    """Stands for a psycopg OperationalError subclass without a SQLSTATE of its own."""


def test_psycopg_session_state_decides_for_other_errors() -> None:
    err = _OtherOperationalError("no sqlstate")
    assert classify(err, connection=_FakeSession(broken=True)).kind is LOST
    assert classify(err, connection=_FakeSession(broken=False)).kind is NO
    assert classify(err).kind is NO


@pytest.mark.parametrize(
    ("code", "kind"),
    [("57P01", LOST), ("08S01", LOST), ("08001", CONNECT), ("57P02", LOST), ("HY000", NO)],
)
def test_pyodbc_exceptions(code: str, kind: Kind) -> None:
    exc = pyodbc.OperationalError(code, f"[{code}] [unixODBC]something (35) (SQLExecDirectW)")
    failure = classify(exc)
    assert failure.kind is kind
    assert failure.sqlstate == code
    assert failure.message.endswith("(SQLExecDirectW)")  # the driver's text, not a tuple


def test_pyodbc_error_without_state() -> None:
    assert classify(pyodbc.Error("no state here")).kind is NO


class _Psycopg2Style(Exception):
    def __init__(self, pgcode: str) -> None:
        super().__init__("boom")
        self.pgcode = pgcode


class _Diag:
    sqlstate = "57P01"


class _DiagStyle(Exception):
    diag = _Diag()


def test_generic_dbapi_exceptions() -> None:
    assert classify(_Psycopg2Style("40001")).kind is CONFLICT
    assert classify(_DiagStyle("x")).kind is LOST
    assert classify(RuntimeError("57P01", "jdbc-like")).kind is LOST
    assert classify(RuntimeError("plain")).kind is NO
    assert sqlstate_of(_Psycopg2Style("08006")) == "08006"


def test_an_error_carrying_its_failure_keeps_it() -> None:
    decided = classify("57P01")

    class Wrapped(Exception):
        failure = decided

    assert classify(Wrapped()) is decided


def test_failure_is_frozen_and_readable() -> None:
    failure = classify("57P01")
    with pytest.raises(AttributeError):
        failure.kind = NO  # type: ignore[misc]
    assert "CONNECTION_LOST (57P01)" in str(failure)


# --- properties -----------------------------------------------------------


@given(st.text(max_size=12))
def test_any_text_classifies(text: str) -> None:
    failure = classify(text)
    assert isinstance(failure, Failure)
    assert failure.retryable is (failure.kind is not NO)


@given(st.from_regex(r"[0-9A-Z]{5}", fullmatch=True))
def test_any_code_follows_exact_then_class_then_default(code: str) -> None:
    failure = classify(code)
    expected = table.EXACT_BY_CODE.get(code) or table.CLASS_BY_CODE.get(code[:2]) or table.DEFAULT
    assert failure.kind is expected.kind
    assert failure.sqlstate == code
    if code[:2] not in table.CLASS_BY_CODE and code not in table.EXACT_BY_CODE:
        assert not failure.retryable


class _Hostile(Exception):
    def __getattribute__(self, name: str) -> object:
        if name in ("sqlstate", "pgcode", "diag", "args", "failure"):
            raise RuntimeError("no")
        return super().__getattribute__(name)


_ERROR_TYPES = st.sampled_from(
    [Exception, RuntimeError, psycopg.Error, psycopg.OperationalError, pyodbc.Error, _Hostile]
)


@given(_ERROR_TYPES, st.lists(st.one_of(st.text(max_size=8), st.integers(), st.none()), max_size=3))
def test_any_exception_classifies(cls: type[Exception], args: list[object]) -> None:
    failure = classify(cls(*args))
    assert isinstance(failure, Failure)
    if failure.sqlstate is None:
        assert failure.kind in (NO, LOST)


def test_retryable_codes_are_exactly_the_listed_ones() -> None:
    # Guards against a row or class quietly becoming retryable.
    retryable_exact = {r.code for r in table.EXACT if r.retryable}
    assert retryable_exact == {
        "57P01", "57P02", "08006", "08S01", "YE000", "08003", "08000", "08007", "57P05",
        "25P03", "25006", "08001", "08004", "57P03", "53300", "HYT01", "26000", "40001",
        "40P01",
    }
    assert {r.code for r in table.CLASSES if r.retryable} == {"08"}
