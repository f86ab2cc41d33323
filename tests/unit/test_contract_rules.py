"""The unit-of-work contract without I/O: the statement check, the guard, coroutine
refusal, and the errors' pickling."""

from __future__ import annotations

import asyncio
import functools
import pickle

import psycopg
import pyodbc
import pytest
from hypothesis import given
from hypothesis import strategies as st

import symfo_failover as sf
from symfo_failover._contract import (
    UnitGuard,
    refuse_awaitable_result,
    refuse_coroutine_function,
    transaction_control,
)
from symfo_failover._errors import CONTRACT_RULES, flavoured, outcome_unknown_failure


@pytest.mark.parametrize(("sql", "found"), [
    ("COMMIT", "COMMIT"),
    ("commit work", "COMMIT"),
    ("  COMMIT AND CHAIN", "COMMIT"),
    ("END", "END"),
    ("end transaction", "END"),
    ("ABORT", "ABORT"),
    ("ROLLBACK", "ROLLBACK"),
    ("rollback work", "ROLLBACK"),
    ("PREPARE TRANSACTION 'x'", "PREPARE TRANSACTION"),
    ("prepare\n  transaction 'x'", "PREPARE TRANSACTION"),
    ("SELECT 1; COMMIT", "COMMIT"),
    ("INSERT INTO t VALUES (1);commit", "COMMIT"),
    ("-- finish\nCOMMIT", "COMMIT"),
    ("/* finish */ COMMIT", "COMMIT"),
    ("SELECT 'a''b'; END", "END"),
    ("SELECT $x$ ; $x$; ROLLBACK", "ROLLBACK"),
    # Not transaction control:
    ("ROLLBACK TO SAVEPOINT s", None),
    ("rollback to s", None),
    ("ROLLBACK WORK TO SAVEPOINT s", None),
    ("ROLLBACK TRANSACTION TO s", None),
    ("SELECT CASE WHEN true THEN 1 END", None),
    ("SELECT 'x; commit'", None),
    ('SELECT 1 AS "a;commit"', None),
    ("DO $$ BEGIN PERFORM 1; END $$", None),
    ("DO $body$ BEGIN COMMIT; END $body$", None),
    ("SELECT 1 -- ; commit", None),
    ("SELECT 1 /* ; commit */", None),
    ("PREPARE q AS SELECT 1", None),
    ("SELECT committed FROM t", None),
    ("UPDATE t SET ended = true", None),
    ("SELECT $1; SELECT 2", None),
    ("", None),
])
def test_transaction_control_is_found_only_at_statement_starts(
    sql: str, found: str | None
) -> None:
    assert transaction_control(sql) == found


@given(st.text(max_size=200))
def test_the_statement_scan_never_fails(sql: str) -> None:
    transaction_control(sql)  # any text at all: a result, never an exception


@given(st.sampled_from(["COMMIT", "END", "ROLLBACK", "ABORT"]),
       st.text(alphabet="abc 1();=", max_size=30))
def test_a_control_statement_after_any_plain_statement_is_found(word: str, before: str) -> None:
    assert transaction_control(f"SELECT {before!r}; {word}") == word


def _guard(driver_error: type[BaseException] = psycopg.ProgrammingError) -> UnitGuard:
    return UnitGuard(flavoured(sf.UnitContractError, driver_error))


def test_the_guard_keeps_the_first_rule_broken() -> None:
    guard = _guard()
    first = guard.refuse("ended-transaction", "commit() was called")
    guard.refuse("nested-run", "run() was called again")
    assert guard.violation is first
    assert first.rule == "ended-transaction"
    assert "commit() was called" in str(first)
    assert "nothing the unit wrote is committed" in str(first)
    assert isinstance(first, psycopg.ProgrammingError)
    assert isinstance(first, RuntimeError)


def test_the_guard_refuses_control_statements_and_any_statement_after_the_unit() -> None:
    guard = _guard()
    guard.check_statement("SELECT 1")
    guard.check_statement(b"INSERT INTO t VALUES (1)")
    with pytest.raises(sf.UnitContractError, match="a COMMIT statement"):
        guard.check_statement(b"commit")
    guard.active = False
    with pytest.raises(sf.UnitContractError) as raised:
        guard.check_statement("SELECT 1")
    assert raised.value.rule == "used-after-unit"


def test_every_rule_has_a_description() -> None:
    guard = _guard()
    for rule in CONTRACT_RULES:
        assert guard.refuse(rule, "x").rule == rule


async def _async_unit(raw: object) -> None:  # pragma: no cover - never awaited
    pass


class _AsyncCallable:
    async def __call__(self, raw: object) -> None:  # pragma: no cover - never awaited
        pass


class _SyncCallable:
    def __call__(self, raw: object) -> None:
        pass


async def _async_gen(raw: object):  # type: ignore[no-untyped-def]  # pragma: no cover
    yield


@pytest.mark.parametrize("fn", [
    _async_unit, functools.partial(_async_unit), _AsyncCallable(), _async_gen,
])
def test_coroutine_functions_are_refused(fn: object) -> None:
    with pytest.raises(TypeError, match="coroutine function"):
        refuse_coroutine_function(fn)


@pytest.mark.parametrize("fn", [
    lambda raw: None, functools.partial(lambda raw, x: None, x=1), _SyncCallable(), print,
])
def test_plain_callables_are_accepted(fn: object) -> None:
    refuse_coroutine_function(fn)


def test_a_non_callable_is_refused() -> None:
    with pytest.raises(TypeError, match="needs a function"):
        refuse_coroutine_function(42)


def test_an_awaitable_result_is_refused_and_a_coroutine_closed() -> None:
    coro = _async_unit(None)
    with pytest.raises(TypeError, match="awaitable"):
        refuse_awaitable_result(coro, _async_unit)
    assert coro.cr_frame is None, "closed, so that Python does not warn it was never awaited"
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(TypeError):
            refuse_awaitable_result(loop.create_future(), _async_unit)
    finally:
        loop.close()
    refuse_awaitable_result([1, 2], _async_unit)  # anything else is a result


# --- the errors pickle, with their attributes and driver flavour ------------------------


def _failure() -> sf.Failure:
    return outcome_unknown_failure("test")


@pytest.mark.parametrize("driver_error", [
    None, psycopg.OperationalError, pyodbc.OperationalError,
])
def test_failover_errors_pickle_with_their_attributes(
    driver_error: type[BaseException] | None
) -> None:
    made: list[sf.FailoverError] = [
        flavoured(sf.RetriesExhausted, driver_error)(
            "gave up", failure=_failure(), attempts=3, elapsed=1.5, target="psycopg host=x"),
        flavoured(sf.CommitOutcomeUnknown, driver_error)(
            "unknown", failure=_failure(), xid="1234"),
        flavoured(sf.FailoverError, driver_error)("base", failure=_failure()),
    ]
    for err in made:
        copy = pickle.loads(pickle.dumps(err))
        assert type(copy) is type(err)
        assert copy.__dict__ == err.__dict__
        assert str(copy) == str(err)
        assert type(copy).__module__ == "symfo_failover"
        assert "[" not in type(copy).__qualname__
        if driver_error is not None:
            assert isinstance(copy, driver_error)


@pytest.mark.parametrize("driver_error", [psycopg.ProgrammingError, pyodbc.ProgrammingError])
def test_contract_errors_pickle(driver_error: type[BaseException]) -> None:
    err = _guard(driver_error).refuse("nested-run", "run() was called again")
    copy = pickle.loads(pickle.dumps(err))
    assert (type(copy), copy.rule, copy.failure, str(copy)) == (
        type(err), err.rule, err.failure, str(err))
    assert isinstance(copy, driver_error)
    assert not sf.classify(copy).retryable


def test_a_pickled_psycopg_flavour_keeps_psycopgs_own_attributes() -> None:
    err = flavoured(sf.RetriesExhausted, psycopg.OperationalError)(
        "gave up", failure=_failure(), attempts=1, elapsed=0.1, target="t")
    copy = pickle.loads(pickle.dumps(err))
    assert copy.sqlstate is None
    assert copy.diag is not None  # psycopg's own state was set up on the way back
