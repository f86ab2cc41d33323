"""What the events log: silent by default, plain logging when asked, structlog natively.

No server, no network: events are made by hand and given to ``emit``. The runs of a
fresh interpreter (``python -c``) are there because pytest itself configures logging.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
import structlog

import symfo_failover as sf
from symfo_failover._events import emit, log

TARGET = "psycopg host=db.example port=5432 dbname=bank user=app"
DRIVER_SAID = "terminating connection due to administrator command"


def failure_detected(**overrides: Any) -> sf.FailureDetected:
    fields: dict[str, Any] = {
        "target": TARGET, "elapsed": 0.25, "failure": sf.classify("57P01"),
        "phase": "unit", "attempt": 1, "error": DRIVER_SAID,
    }
    fields.update(overrides)
    return sf.FailureDetected(**fields)


def one_of_each() -> list[sf.Event]:
    return [
        failure_detected(),
        sf.ReconnectAttempt(target=TARGET, elapsed=0.5, attempt=2),
        sf.Reconnected(
            target=TARGET, elapsed=1.5, backend_pid=4242,
            server_started="2026-01-01 10:00:00+00",
            previous_server_started="2026-01-01 09:00:00+00",
            failover=True, ended_old_session=False,
        ),
        sf.UnitReplayed(target=TARGET, elapsed=1.6, attempt=2, reason="connection_lost"),
        sf.CommitResolved(
            target=TARGET, elapsed=1.7, xid="771", status="committed", outcome="returned",
            terminated_old_session=True,
        ),
        sf.GaveUp(target=TARGET, elapsed=30.0, failure=sf.classify("08001"), attempts=7),
    ]


@pytest.fixture(autouse=True)
def structlog_unconfigured() -> Iterator[None]:
    """Each test starts as an application that never configured structlog.

    (``capture_logs()`` elsewhere in the session leaves structlog "configured".)
    """
    was_configured = structlog.is_configured()
    saved = structlog.get_config()
    structlog.reset_defaults()
    yield
    if was_configured:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []
        self.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[str]:
        return [self.format(r) for r in self.records]


@pytest.fixture
def handler() -> Iterator[Collect]:
    """A handler on the ``symfo_failover`` logger, which is set to INFO."""
    logger = logging.getLogger("symfo_failover")
    level = logger.level
    collect = Collect()
    logger.addHandler(collect)
    logger.setLevel(logging.INFO)
    yield collect
    logger.removeHandler(collect)
    logger.setLevel(level)


# --- a fresh interpreter --------------------------------------------------------------

SCRIPT = textwrap.dedent("""
    import logging, sys
    import symfo_failover as sf
    from symfo_failover._events import emit

    if sys.argv[1] != "none":
        logging.basicConfig(level=getattr(logging, sys.argv[1]))
    failure = sf.classify("57P01")
    t = "psycopg host=db.example port=5432 user=app"
    emit(sf.FailureDetected(target=t, elapsed=0.25, failure=failure, phase="unit",
                            attempt=1, error="terminating connection"), None)
    emit(sf.ReconnectAttempt(target=t, elapsed=0.5, attempt=2), None)
    emit(sf.GaveUp(target=t, elapsed=9.0, failure=failure, attempts=3), None)

    def broken_hook(event):
        raise RuntimeError("observer bug")

    emit(sf.ReconnectAttempt(target=t, elapsed=0.6, attempt=3), broken_hook)
    print("done")
""")


def run_fresh(level: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", SCRIPT, level],
        capture_output=True, text=True, timeout=60, check=True,
    )


def test_an_unconfigured_interpreter_prints_nothing() -> None:
    quiet = run_fresh("none")
    assert (quiet.stdout, quiet.stderr) == ("done\n", "")
    # The same script does log once logging is configured: the silence above is the
    # NullHandler's doing, not a script that logs nothing.
    loud = run_fresh("DEBUG").stderr.splitlines()
    assert [line.split(" ")[0] for line in loud] == [
        "WARNING:symfo_failover:failure_detected",
        "INFO:symfo_failover:reconnect_attempt",
        "ERROR:symfo_failover:gave_up",
        "INFO:symfo_failover:reconnect_attempt",
        "ERROR:symfo_failover:event_hook_failed",
    ]


def test_basic_config_at_error_shows_only_errors() -> None:
    result = run_fresh("ERROR")
    assert result.stdout == "done\n"
    assert result.stderr.splitlines() == [
        "ERROR:symfo_failover:gave_up kind=connection_lost sqlstate=57P01 attempts=3 "
        'elapsed=9.0 target="psycopg host=db.example port=5432 user=app"',
        "ERROR:symfo_failover:event_hook_failed hook_event=reconnect_attempt error=RuntimeError",
    ]


# --- in this process --------------------------------------------------------------------


def test_nothing_reaches_stdout_or_stderr_by_default(capfd: pytest.CaptureFixture[str]) -> None:
    seen: list[sf.Event] = []
    for event in one_of_each():
        emit(event, seen.append)
    emit(sf.ReconnectAttempt(target=TARGET, elapsed=0.0, attempt=1), lambda e: 1 / 0)
    assert len(seen) == 6  # the events were emitted...
    assert capfd.readouterr() == ("", "")  # ...and nothing was printed


def test_a_handler_at_info_sees_every_event_with_its_fields(handler: Collect) -> None:
    events = one_of_each()
    for event in events:
        emit(event, None)
    records = handler.records
    assert [r.symfo_event for r in records] == [e.name for e in events]  # type: ignore[attr-defined]
    assert [r.levelname for r in records] == [
        "WARNING", "INFO", "INFO", "INFO", "INFO", "ERROR",
    ]
    for record, event in zip(records, events, strict=True):
        assert record.name == "symfo_failover"
        assert record.symfo_fields == event.fields()  # type: ignore[attr-defined]
        for key, value in event.fields().items():  # each field is its own attribute too
            assert getattr(record, key) == value, key
    assert handler.lines()[0] == (
        "WARNING:symfo_failover:failure_detected kind=connection_lost sqlstate=57P01 "
        f'phase=unit attempt=1 error="{DRIVER_SAID}" elapsed=0.25 target="{TARGET}"'
    )
    assert handler.lines()[2] == (
        "INFO:symfo_failover:reconnected backend_pid=4242 "
        'server_started="2026-01-01 10:00:00+00" '
        'previous_server_started="2026-01-01 09:00:00+00" failover=true '
        f'ended_old_session=false elapsed=1.5 target="{TARGET}"'
    )
    assert handler.lines()[5].startswith(
        "ERROR:symfo_failover:gave_up kind=connect_failed sqlstate=08001 attempts=7 "
    )


def test_the_level_is_checked_before_the_fields_are_made(
    handler: Collect, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    original = sf.FailureDetected.fields

    def counting(self: sf.FailureDetected) -> dict[str, Any]:
        made.append(self.name)
        return original(self)

    monkeypatch.setattr(sf.FailureDetected, "fields", counting)
    logging.getLogger("symfo_failover").setLevel(logging.ERROR)
    emit(failure_detected(), None)  # a warning
    assert (made, handler.records) == ([], [])
    logging.getLogger("symfo_failover").setLevel(logging.WARNING)
    emit(failure_detected(), None)
    assert made == ["failure_detected"]
    assert len(handler.records) == 1


def test_a_failing_hook_is_logged_not_raised(handler: Collect) -> None:
    calls: list[sf.Event] = []

    def hook(event: sf.Event) -> None:
        calls.append(event)
        raise RuntimeError("observer bug")

    event = sf.ReconnectAttempt(target=TARGET, elapsed=0.0, attempt=2)
    emit(event, hook)
    assert calls == [event]
    assert [(r.levelname, r.getMessage()) for r in handler.records] == [
        ("INFO", f'reconnect_attempt attempt=2 elapsed=0.0 target="{TARGET}"'),
        ("ERROR", "event_hook_failed hook_event=reconnect_attempt error=RuntimeError"),
    ]


def test_with_structlog_configured_events_go_to_its_pipeline(handler: Collect) -> None:
    with structlog.testing.capture_logs() as logs:
        emit(failure_detected(), None)
        emit(sf.GaveUp(target=TARGET, elapsed=3.0, failure=sf.classify("57P01"),
                       attempts=3), None)
    assert logs == [
        {
            "event": "failure_detected", "log_level": "warning", "target": TARGET,
            "elapsed": 0.25, "kind": "connection_lost", "sqlstate": "57P01",
            "rule": "57P01", "phase": "unit", "attempt": 1, "error": DRIVER_SAID,
        },
        {
            "event": "gave_up", "log_level": "error", "target": TARGET, "elapsed": 3.0,
            "kind": "connection_lost", "sqlstate": "57P01", "rule": "57P01", "attempts": 3,
        },
    ]
    assert handler.records == []  # logged once, not twice


def test_a_line_that_is_not_an_event_is_logged_the_same_way(handler: Collect) -> None:
    log("warning", "connect_waiting", message="no server answers at db.example:5432",
        target=TARGET, sqlstate=None)
    logging.getLogger("symfo_failover").setLevel(logging.ERROR)
    log("info", "connect_waiting", message="below the level")
    [record] = handler.records
    assert record.getMessage() == (
        'connect_waiting message="no server answers at db.example:5432" sqlstate=null '
        f'target="{TARGET}"'
    )
    # `message` is a LogRecord attribute of its own: kept in symfo_fields, not overwritten.
    assert record.symfo_fields["message"] == "no server answers at db.example:5432"  # type: ignore[attr-defined]
    assert record.sqlstate is None  # type: ignore[attr-defined]


# --- the driver's message ---------------------------------------------------------------


def test_failure_detected_carries_the_drivers_first_line(handler: Collect) -> None:
    long = "x" * 500
    event = failure_detected(error=f"  {DRIVER_SAID}  \nDETAIL: more\nHINT: even more")
    assert event.error == DRIVER_SAID
    assert failure_detected(error=long).error == "x" * 300
    emit(event, None)
    assert handler.records[0].error == DRIVER_SAID  # type: ignore[attr-defined]
    assert f'error="{DRIVER_SAID}"' in handler.records[0].getMessage()


def test_existing_constructors_keep_working_without_an_error() -> None:
    event = sf.FailureDetected(
        target="t", elapsed=0.0, failure=sf.classify("57P01"), phase="connect", attempt=3
    )
    assert event.error == ""
    assert "error" not in event.fields()  # an unknown message is left out of the line
    with structlog.testing.capture_logs() as logs:
        emit(event, None)
    assert "error" not in logs[0]


@pytest.mark.parametrize(
    ("said", "secret"),
    [
        ('invalid connection option: password=s3cret port=x', "s3cret"),
        ("missing \"=\" near PASSWORD = 'sec ret'", "sec ret"),
        ('bad value password="two words" here', "two words"),
        ("[unixODBC] Driver={PostgreSQL};Server=h;Pwd={p;w}}d};", "p;w}}d"),
        ("could not parse postgresql://app:hunter2@db/bank", "hunter2"),
    ],
)
def test_a_password_in_the_drivers_message_is_never_logged(
    said: str, secret: str, handler: Collect
) -> None:
    event = failure_detected(error=said)
    assert secret not in event.error
    assert "***" in event.error
    emit(event, None)
    assert secret not in handler.lines()[0]
    assert secret not in repr(handler.records[0].__dict__)
