"""The symfo-failover command's classify subcommand and argument handling (no I/O)."""

from __future__ import annotations

import json

import pytest

from symfo_failover import __version__
from symfo_failover._cli import main
from symfo_failover._table_doc import render_markdown


def test_classify_prints_one_line_per_code(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "57P01", "08001", "40001", "42601"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4
    assert lines[0].split()[:2] == ["57P01", "CONNECTION_LOST"]
    assert "retryable=yes new-session=yes" in lines[0]
    assert lines[1].split()[:2] == ["08001", "CONNECT_FAILED"]
    assert "new-session=no" in lines[2]
    assert lines[3].split()[:2] == ["42601", "NOT_RETRYABLE"]
    assert "[42]" in lines[3]  # decided by its class


def test_classify_verbose_explains(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "-v", "57P02"]) == 0
    out = capsys.readouterr().out
    assert "reset every session" in out


def test_classify_json(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--json", "57p03", "bogus!"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["sqlstate"] == "57P03"
    assert records[0]["kind"] == "CONNECT_FAILED"
    assert records[1]["kind"] == "NOT_RETRYABLE"
    assert records[1]["retryable"] is False
    assert records[1]["sqlstate"] is None


def test_classify_table_is_the_generated_doc_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "--table"]) == 0
    assert capsys.readouterr().out.strip() == render_markdown().strip()


def test_classify_without_codes_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify"]) == 2
    assert "give one or more SQLSTATE codes" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [[], ["frobnicate"], ["conformance", "--driver", "jdbc"]])
def test_bad_arguments_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert __version__ in capsys.readouterr().out
