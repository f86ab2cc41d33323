"""The symfo-failover command's classify subcommand and argument handling (no I/O)."""

from __future__ import annotations

import json
import pathlib

import pytest

from symfo_failover import __version__
from symfo_failover._cli import main
from symfo_failover._table_doc import BEGIN, END, render_markdown


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
    assert main(["classify", "--json", "57P03", "ZZ999"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert records[0]["input"] == "57P03"
    assert records[0]["sqlstate"] == "57P03"
    assert records[0]["kind"] == "CONNECT_FAILED"
    assert records[1]["sqlstate"] == "ZZ999"  # well formed but in no row: the default
    assert records[1]["kind"] == "NOT_RETRYABLE"
    assert records[1]["retryable"] is False
    assert records[1]["rule"] == "*"


def test_an_unknown_but_well_formed_sqlstate_is_classified(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["classify", "ZZ999"]) == 0
    assert capsys.readouterr().out.split()[:2] == ["ZZ999", "NOT_RETRYABLE"]


@pytest.mark.parametrize("flags", [[], ["--json"], ["-v"]])
def test_arguments_that_are_not_sqlstates_refuse_the_whole_call(
    flags: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["classify", *flags, "5", "57P01", "57P011", "hello", "bogus!", "57P0 "]) == 2
    out, err = capsys.readouterr()
    assert out == ""  # not even the valid one: a typo must be fixed, not half-answered
    lines = err.splitlines()
    assert [line.split("'")[1] for line in lines] == ["5", "57P011", "hello", "bogus!", "57P0 "]
    assert all("is not a SQLSTATE" in line for line in lines)


def test_lower_case_is_refused_with_a_hint(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["classify", "57p01", "hello"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    first, second = err.splitlines()
    assert "'57p01' is not a SQLSTATE" in first
    assert first.endswith("did you mean 57P01?")
    assert "did you mean" not in second  # no hint that HELLO is a code


def test_classify_table_is_the_doc_table_without_its_markers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["classify", "--table"]) == 0
    out = capsys.readouterr().out
    assert "<!--" not in out
    assert "GENERATED" not in out
    assert out.startswith("### Exact codes\n")
    assert "| `57P01` | admin_shutdown | CONNECTION_LOST | yes | yes |" in out
    # The same table as the generated block of docs/classification.md, minus the markers.
    assert out.strip() in render_markdown()
    assert render_markdown().startswith(BEGIN)
    assert render_markdown().rstrip().endswith(END)


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


def test_a_missing_driver_is_a_message_not_a_traceback() -> None:
    """`pip install symfo-failover` without the psycopg extra, then `check`."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['psycopg'] = None; "
            "from symfo_failover._cli import main; sys.exit(main(['check', 'host=x']))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, check=False)
    assert result.returncode == 2
    assert "psycopg is not installed" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("argv", [
    ["drill", "--rounds", "0"],
    ["drill", "--rounds", "many"],
    ["probe"],
    ["probe", "host=x", "--driver", "jdbc"],
    ["check"],
])
def test_bad_arguments_are_usage_errors(argv: list[str],
                                        capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_ctrl_c_raised_inside_exec_still_exits_2(tmp_path: pathlib.Path) -> None:
    """CPython 3.11 marks a KeyboardInterrupt raised inside exec() of a string (as the
    dataclasses module does while a module is imported) as unhandled even when it was
    caught, and a program run with ``python -m`` then ends by SIGINT: the command
    clears the mark."""
    import os
    import subprocess
    import sys

    (tmp_path / "interrupted_check.py").write_text(
        "import os, sys\n"
        "from symfo_failover import _cli, _report\n"  # loaded: no exec() after the Ctrl-C
        "if os.environ.get('LEAVE_THE_MARK'):\n"
        "    _cli._forget_unhandled_interrupt = lambda: None\n"
        "_cli._cmd_check = lambda args: exec('raise KeyboardInterrupt')\n"
        "sys.exit(_cli.main(['check', 'host=x']))\n", encoding="utf-8")

    def run(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "interrupted_check"], cwd=tmp_path,
                              capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, **env})

    result = run()
    assert result.returncode == 2, result
    assert "interrupted by Ctrl-C" in result.stderr
    assert "Traceback" not in result.stderr
    # Without clearing the mark this interpreter would have ended by SIGINT (where it
    # has the behaviour at all): the test above can fail.
    bare = run(LEAVE_THE_MARK="1")
    if sys.version_info < (3, 12):
        assert bare.returncode == -2, bare


def test_an_error_a_c_extension_made_of_ctrl_c_counts_as_ctrl_c() -> None:
    from symfo_failover._report import from_ctrl_c

    def connect() -> None:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as inner:
            raise SystemError("<built-in function connect> returned a result with an "
                              "exception set") from inner

    with pytest.raises(SystemError) as caught:
        connect()
    assert from_ctrl_c(caught.value)
    assert not from_ctrl_c(SystemError("something else"))
    assert from_ctrl_c(KeyboardInterrupt())
