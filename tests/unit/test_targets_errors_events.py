"""Connection targets (detection defaults, redaction), the errors' bases, the events."""

from __future__ import annotations

import psycopg
import pyodbc
import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st
from psycopg.conninfo import conninfo_to_dict

import symfo_failover as sf
from symfo_failover._connection import load_driver as _driver
from symfo_failover._driver_psycopg import PsycopgDriver
from symfo_failover._driver_pyodbc import PyodbcDriver, parse_connection_string
from symfo_failover._errors import flavoured, outcome_unknown_failure
from symfo_failover._events import emit
from symfo_failover._target import Endpoint, SessionState, begin_sql, normalise_isolation

# --- psycopg targets ---------------------------------------------------------------


def test_psycopg_target_adds_detection_defaults_and_hides_the_password() -> None:
    target = PsycopgDriver().target("host=127.0.0.1 port=5999 user=app password=s3cret", {})
    params = conninfo_to_dict(target.connect_args["conninfo"])
    assert params["keepalives"] == "1"
    assert params["keepalives_idle"] == "5"
    assert params["keepalives_interval"] == "2"
    assert params["keepalives_count"] == "3"
    assert params["tcp_user_timeout"] == "10000"
    assert params["connect_timeout"] == "5"
    assert params["password"] == "s3cret"
    assert "s3cret" not in target.description
    assert "port=5999" in target.description
    assert target.endpoints == (Endpoint("127.0.0.1", 5999),)
    assert (target.user, target.database) == ("app", "app")


def test_psycopg_target_keeps_the_users_own_settings() -> None:
    target = PsycopgDriver().target(
        "host=127.0.0.1 keepalives_idle=1", {"tcp_user_timeout": 2000, "dbname": "x"}
    )
    params = conninfo_to_dict(target.connect_args["conninfo"])
    assert params["keepalives_idle"] == "1"
    assert params["tcp_user_timeout"] == "2000"
    assert params["keepalives_count"] == "3"  # the ones not given still get defaults
    assert target.database == "x"


def test_psycopg_target_passes_connect_keywords_through() -> None:
    target = PsycopgDriver().target("host=127.0.0.1", {"prepare_threshold": None})
    assert target.connect_args["prepare_threshold"] is None


def test_psycopg_multi_host_endpoints() -> None:
    target = PsycopgDriver().target("host=127.0.0.1,127.0.0.2 port=5432,5433", {})
    assert target.endpoints == (Endpoint("127.0.0.1", 5432), Endpoint("127.0.0.2", 5433))


@pytest.mark.parametrize(
    "conninfo", ["host=127.0.0.1 bogus=1", "host='unterminated", "port=notanumber host=h"]
)
def test_psycopg_bad_connection_strings_fail_at_once(conninfo: str) -> None:
    with pytest.raises(psycopg.ProgrammingError):
        PsycopgDriver().target(conninfo, {})


# --- ODBC targets --------------------------------------------------------------------


def test_odbc_connection_string_parsing() -> None:
    pairs = parse_connection_string("Driver={PostgreSQL Unicode};Server=h;Pwd={a;b}}c};")
    assert pairs == [("Driver", "PostgreSQL Unicode"), ("Server", "h"), ("Pwd", "a;b}c")]


@pytest.mark.parametrize("text", ["Driver={PostgreSQL", "Server", "=x"])
def test_odbc_bad_strings(text: str) -> None:
    with pytest.raises(pyodbc.ProgrammingError):
        PyodbcDriver().target(text, {})


def test_odbc_target_adds_detection_and_merges_pqopt() -> None:
    target = PyodbcDriver().target(
        "Driver={PostgreSQL Unicode};Server=127.0.0.1;Port=5999;Uid=app;Pwd={p;w};"
        "pqopt={keepalives_count=9}",
        {"timeout": 3},
    )
    pairs = dict(parse_connection_string(target.connect_args["connstring"]))
    assert pairs["KeepaliveTime"] == "5"
    assert pairs["KeepaliveInterval"] == "2"
    pq = dict(item.split("=") for item in pairs["pqopt"].split())
    assert pq == {"keepalives_count": "9", "tcp_user_timeout": "10000", "connect_timeout": "5"}
    assert pairs["Pwd"] == "p;w"
    assert target.connect_args["kwargs"] == {"timeout": 3}
    assert target.endpoints == (Endpoint("127.0.0.1", 5999),)
    assert "p;w" not in target.description
    assert "Pwd" not in target.description


def test_odbc_dsn_is_not_probed() -> None:
    assert PyodbcDriver().target("DSN=prod;Uid=u", {}).endpoints == ()


@given(st.dictionaries(
    st.from_regex(r"[A-Za-z][A-Za-z0-9]{0,8}", fullmatch=True),
    st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc")), max_size=12),
    max_size=5,
))
def test_odbc_round_trip(pairs: dict[str, str]) -> None:
    """Whatever values the user gives come back unchanged after quoting."""
    pairs = {k: v for k, v in pairs.items() if k.lower() not in ("pqopt",)}
    if len({k.lower() for k in pairs}) != len(pairs):
        return
    text = ";".join(f"{k}={{{v.replace('}', '}}')}}}" for k, v in pairs.items())
    target = PyodbcDriver().target(text + ";Port=1", {})
    back = dict(parse_connection_string(target.connect_args["connstring"]))
    for key, value in pairs.items():
        if key.lower() != "port":
            assert back[key] == value.strip() or back[key] == value


# --- the rest --------------------------------------------------------------------------


def test_unknown_driver_is_refused_at_once() -> None:
    with pytest.raises(ValueError, match="unknown driver 'odbc'"):
        _driver("odbc")
    with pytest.raises(ValueError, match="unknown driver"):
        sf.connect("host=127.0.0.1", driver="mysql")


def test_begin_sql() -> None:
    state = SessionState(isolation_level="serializable", read_only=False)
    assert begin_sql(state, True) == (
        "BEGIN ISOLATION LEVEL SERIALIZABLE, READ WRITE; SELECT pg_current_xact_id()::text"
    )
    assert begin_sql(SessionState(read_only=True), False) == "BEGIN READ ONLY"
    assert begin_sql(SessionState(), False) == "BEGIN"


def test_isolation_names() -> None:
    assert normalise_isolation(psycopg.IsolationLevel.REPEATABLE_READ) == "repeatable read"
    assert normalise_isolation("SERIALIZABLE") == "serializable"
    assert normalise_isolation(None) is None
    with pytest.raises(ValueError, match="not an isolation level"):
        normalise_isolation("snapshot")


@pytest.mark.parametrize(
    ("driver_error", "other"),
    [(psycopg.OperationalError, pyodbc.Error), (pyodbc.OperationalError, psycopg.Error)],
)
def test_errors_are_the_drivers_operational_errors_too(
    driver_error: type[BaseException], other: type[BaseException]
) -> None:
    failure = sf.classify("57P01")
    cls = flavoured(sf.RetriesExhausted, driver_error)
    assert cls is flavoured(sf.RetriesExhausted, driver_error)  # cached
    err = cls("gave up", failure=failure, attempts=3, elapsed=1.5, target="t")
    assert isinstance(err, driver_error)
    assert isinstance(err, sf.FailoverError)
    assert not isinstance(err, other)
    assert (err.attempts, err.elapsed, err.failure) == (3, 1.5, failure)
    assert sf.classify(err) is failure
    with pytest.raises(driver_error):
        raise err
    unknown = flavoured(sf.CommitOutcomeUnknown, driver_error)(
        "?", failure=outcome_unknown_failure("why"), xid="42"
    )
    assert isinstance(unknown, driver_error)
    assert unknown.xid == "42"
    assert not sf.classify(unknown).retryable


def test_events_are_logged_without_secrets_and_given_to_the_hook() -> None:
    seen: list[sf.Event] = []
    event = sf.FailureDetected(
        target="psycopg host=h port=1", elapsed=0.5, failure=sf.classify("57P01"),
        phase="unit", attempt=1,
    )
    with structlog.testing.capture_logs() as logs:
        emit(event, seen.append)
    assert seen == [event]
    assert logs == [{
        "event": "failure_detected", "log_level": "warning", "target": "psycopg host=h port=1",
        "elapsed": 0.5, "kind": "connection_lost", "sqlstate": "57P01", "rule": "57P01",
        "phase": "unit", "attempt": 1,
    }]
    with pytest.raises(AttributeError):
        event.attempt = 2  # type: ignore[misc]


def test_a_failing_hook_does_not_break_the_call() -> None:
    def hook(event: sf.Event) -> None:
        raise RuntimeError("observer bug")

    with structlog.testing.capture_logs() as logs:
        emit(sf.ReconnectAttempt(target="t", elapsed=0.0, attempt=2), hook)
    assert [entry["event"] for entry in logs] == ["reconnect_attempt", "event_hook_failed"]
