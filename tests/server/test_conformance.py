"""The guide's section 3.4.1 tables, reproduced with real sessions on a real server.

Asserts the classification (and that the codes are those the guide documents for the
driver's row), never the wording of messages.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from symfo_failover import Kind
from symfo_failover import _conformance as conformance
from symfo_failover.harness import LocalServer

pytestmark = [pytest.mark.server, pytest.mark.odbc]

#: The guide's codes for the driver's row, plus what the DESIGN measured beyond it:
#: pyodbc reports 57P02 when another backend crashed (the embedded SQL row has it).
ALLOWED = {
    ("psycopg", "in_progress"): {"57P01", None},
    ("psycopg", "while_down"): {None},
    ("pyodbc", "in_progress"): {"57P01", "08S01", "57P02"},
    ("pyodbc", "while_down"): {"08001"},
}

CASES = [(d, s) for d in conformance.DRIVERS for s in conformance.SITUATIONS]


def _ids(case: tuple[str, conformance.Situation]) -> str:
    return f"{case[0]}-{case[1].name}"


@pytest.fixture(scope="module")
def english_server() -> Iterator[LocalServer]:
    with LocalServer() as srv:
        srv.start()
        yield srv


@pytest.fixture(scope="module")
def japanese_server(ja_locale: str) -> Iterator[LocalServer]:
    with LocalServer(lc_messages=ja_locale) as srv:
        srv.start()
        yield srv


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_situation(case: tuple[str, conformance.Situation], english_server: LocalServer) -> None:
    driver, situation = case
    obs = conformance.observe(driver, situation, english_server)
    assert obs.kind == situation.expected.name, obs
    assert obs.sqlstate in ALLOWED[(driver, situation.column)], obs
    assert obs.retryable
    assert obs.reconnect


@pytest.mark.japanese
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_situation_with_a_japanese_server(
    case: tuple[str, conformance.Situation], japanese_server: LocalServer
) -> None:
    driver, situation = case
    obs = conformance.observe(driver, situation, japanese_server)
    assert obs.kind == situation.expected.name, obs
    assert obs.sqlstate in ALLOWED[(driver, situation.column)], obs


@pytest.mark.japanese
def test_the_japanese_server_really_speaks_japanese(japanese_server: LocalServer) -> None:
    # Without this, the test above could pass against an English server.
    situation = next(s for s in conformance.SITUATIONS if s.name == "switchover")
    obs = conformance.observe("psycopg", situation, japanese_server)
    assert obs.sqlstate == "57P01"
    assert any(ord(ch) > 0x3000 for ch in obs.message_text), obs.message_text


def test_the_report_names_the_guide_rows(english_server: LocalServer) -> None:
    wanted = ("switchover", "connect_while_down")
    situations = [s for s in conformance.SITUATIONS if s.name in wanted]
    observations = conformance.run(situations=situations, server=english_server)
    report = conformance.format_report(observations)
    assert "libpq: 57P01 or NULL" in report
    assert "ODBC: 57P01 or 08S01" in report
    assert "ODBC: 08001" in report
    assert "4 of 4 classified as expected" in report
    assert {o.kind for o in observations} == {Kind.CONNECTION_LOST.name, Kind.CONNECT_FAILED.name}


def test_unknown_driver_is_refused(english_server: LocalServer) -> None:
    with pytest.raises(ValueError, match="unknown driver 'jdbc'"):
        conformance.run(["jdbc"], server=english_server)


def test_cli_conformance_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "symfo_failover", "conformance", "--driver", "psycopg", "--json"],
        capture_output=True, text=True, timeout=240, check=False,
    )
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert len(rows) == len(conformance.SITUATIONS)
    assert all(r["ok"] for r in rows)
    assert {r["driver"] for r in rows} == {"psycopg"}
