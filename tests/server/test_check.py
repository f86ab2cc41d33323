"""``symfo-failover check`` against real servers: good settings, bad ones, a role without
privileges, and input it must refuse (with a clear message that holds no password)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import psycopg
import pytest

from symfo_failover._check import read_facts, run_check
from symfo_failover._report import Finding, InputError, Report
from symfo_failover.harness import LocalServer

pytestmark = pytest.mark.server

ADMIN_PASSWORD = "admin-s3cret"
APP_PASSWORD = "app-s3cret"
GOOD_SETTINGS = {
    "fsync": "on",  # the harness turns it off by default
    "full_page_writes": "on",
    "synchronous_commit": "on",
    "tcp_keepalives_idle": "60",
    "tcp_keepalives_interval": "10",
    "tcp_keepalives_count": "6",
    "idle_session_timeout": "0",
}
BAD_SETTINGS = {
    "synchronous_commit": "off",
    "fsync": "off",
    "full_page_writes": "off",
    "idle_session_timeout": "60s",
    "default_transaction_read_only": "on",
}


@pytest.fixture(scope="module")
def good() -> Iterator[LocalServer]:
    """restart_after_crash off (the harness's default), keepalives set, durable commits;
    a password on TCP, so that a wrong one can be given."""
    with LocalServer(settings=GOOD_SETTINGS, password=ADMIN_PASSWORD) as srv:
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def bad() -> Iterator[LocalServer]:
    with LocalServer(settings=BAD_SETTINGS, restart_after_crash=True) as srv:
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def app_role(good: LocalServer) -> str:
    """A login role of its own, on a server where PUBLIC may not run pg_xact_status nor
    pg_terminate_backend: its conninfo."""
    with psycopg.connect(good.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE ROLE app LOGIN PASSWORD '{APP_PASSWORD}'")
        conn.execute("REVOKE EXECUTE ON FUNCTION pg_xact_status(xid8) FROM PUBLIC")
        conn.execute(
            "REVOKE EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) FROM PUBLIC")
    return good.conninfo(user="app", password=APP_PASSWORD)


OK_ON_GOOD = ("restart_after_crash", "synchronous_commit", "fsync", "full_page_writes",
              "tcp_keepalives", "idle_session_timeout", "pg_xact_status",
              "pg_terminate_backend", "read_only")
FAIL_ON_BAD = ("restart_after_crash", "synchronous_commit", "fsync", "full_page_writes")


def by_name(report: Report) -> dict[str, Finding]:
    return {f.name: f for f in report.findings}


def statuses(report: Report, *names: str) -> dict[str, str]:
    found = by_name(report)
    return {name: found[name].status for name in names}


def assert_no_secret(report: Report, *secrets: str) -> None:
    shown = repr(report.to_dict())
    for secret in secrets:
        assert secret not in shown


def test_good_settings_fail_nothing(good: LocalServer) -> None:
    report = run_check(good.conninfo())
    found = by_name(report)
    assert report.ok, [f for f in report.findings if f.status == "fail"]
    assert report.command == "check"
    assert report.target == f"postgres@127.0.0.1:{good.port}/postgres"
    assert statuses(report, *OK_ON_GOOD) == dict.fromkeys(OK_ON_GOOD, "ok")
    assert found["port"].value == str(good.port)
    assert found["data_directory"].value == str(good.data_dir)
    assert found["wal_directory"].value == f"{good.data_dir}/pg_wal"
    assert found["keystore_location"].value == "not a Fujitsu server"
    assert_no_secret(report, ADMIN_PASSWORD)


def test_keepalives_over_a_unix_socket_read_as_configured(good: LocalServer) -> None:
    # Over a Unix socket SHOW says 0 for tcp_keepalives_*; the configured value counts.
    facts = read_facts(good.conninfo(host=str(good._sockdir)))
    assert facts.settings["tcp_keepalives_idle"] == "60"
    assert facts.socket_keepalives == {}


def test_bad_settings_fail_and_warn(bad: LocalServer) -> None:
    report = run_check(bad.conninfo())
    found = by_name(report)
    assert not report.ok
    assert statuses(report, *FAIL_ON_BAD) == dict.fromkeys(FAIL_ON_BAD, "fail")
    assert found["restart_after_crash"].guide == "3.2.3"
    assert found["idle_session_timeout"].status == "warn"
    assert found["idle_session_timeout"].value == "60000 ms"
    assert found["tcp_keepalives"].status == "warn"  # the system's default
    # Read-only, and still checked: the check writes nothing.
    assert found["read_only"].status == "info"
    assert "default_transaction_read_only" in found["read_only"].value


def test_a_role_without_privileges(app_role: str) -> None:
    report = run_check(app_role)
    found = by_name(report)
    assert report.target.startswith("app@127.0.0.1:")
    assert found["pg_xact_status"].status == "fail"
    assert "CommitOutcomeUnknown" in found["pg_xact_status"].why
    assert found["pg_terminate_backend"].status == "warn"
    assert found["data_directory"].status == "info"
    assert found["data_directory"].value == "not visible to this role"
    assert found["wal_directory"].value == "not visible to this role"
    # What every role may see is still judged.
    assert found["restart_after_crash"].status == "ok"
    assert found["tcp_keepalives"].status == "ok"
    assert_no_secret(report, APP_PASSWORD)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_a_conninfo_that_does_not_parse() -> None:
    with pytest.raises(InputError, match="does not parse") as got:
        run_check("host=127.0.0.1 hots=x password=hunter2")
    assert "hots" in str(got.value)
    assert "hunter2" not in str(got.value)
    with pytest.raises(InputError, match="does not parse") as got:
        run_check("host=127.0.0.1 password='hunter2")
    assert "hunter2" not in str(got.value)


def test_a_closed_port() -> None:
    port = _closed_port()
    with pytest.raises(InputError) as got:
        run_check(f"host=127.0.0.1 port={port} user=postgres password=hunter2",
                  connect_timeout=2)
    assert f"127.0.0.1:{port}" in str(got.value)
    assert "connection refused" in str(got.value)
    assert "hunter2" not in str(got.value)


def test_a_wrong_password(good: LocalServer) -> None:
    with pytest.raises(InputError, match="28P01") as got:
        run_check(good.conninfo(password="wrong-pw-123"))
    assert f"127.0.0.1:{good.port}" in str(got.value)
    assert "password" in str(got.value)
    assert "wrong-pw-123" not in str(got.value)


def test_a_missing_database(good: LocalServer) -> None:
    with pytest.raises(InputError, match="3D000") as got:
        run_check(good.conninfo("no_such_db"))
    assert "'no_such_db'" in str(got.value)
    assert ADMIN_PASSWORD not in str(got.value)
