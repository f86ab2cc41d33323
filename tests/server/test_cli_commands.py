"""The ``symfo-failover`` drill, probe and check commands as a person runs them: in a
process of their own, with exit statuses, Ctrl-C and bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from symfo_failover.harness import LocalCluster, LocalServer

pytestmark = pytest.mark.server

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = ROOT / "symfo_failover" / "schemas" / "report.schema.json"
PASSWORD = "s3cret-Pw"


def command(*args: str) -> list[str]:
    return [sys.executable, "-m", "symfo_failover", *args]


def run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(command(*args), capture_output=True, text=True, timeout=timeout,
                          env=env, check=False)


def validate(data: object) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    jsonschema.Draft202012Validator(schema).validate(data)


def interrupt(args: list[str], *, after: float, timeout: float) -> tuple[int, str, str]:
    """Run the command, send it a Ctrl-C after ``after`` seconds; its exit status and
    output (the process is killed should it not end within ``timeout``)."""
    proc = subprocess.Popen(command(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(after)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, out, err


def no_traceback(result: subprocess.CompletedProcess[str] | tuple[str, str]) -> None:
    out, err = (result.stdout, result.stderr) if not isinstance(result, tuple) else result
    assert "Traceback" not in out + err, out + err


@pytest.fixture(scope="module")
def server() -> Iterator[LocalServer]:
    """A server with a password, a role that may log in but not create tables, and
    nothing else: the bad-input cases need no cluster."""
    with LocalServer(password=PASSWORD) as srv:
        srv.start()
        with psycopg.connect(srv.conninfo(), autocommit=True) as conn:
            conn.execute(f"CREATE ROLE weak LOGIN PASSWORD '{PASSWORD}'")
        yield srv


def canary_tables(conninfo: str) -> list[str]:
    with psycopg.connect(conninfo, autocommit=True) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables "
                            "WHERE tablename LIKE 'symfo_canary_%'").fetchall()
    return [r[0] for r in rows]


def test_drill_quick_end_to_end(tmp_path: Path) -> None:
    html = tmp_path / "drill.html"
    result = run("drill", "--quick", "--json", "--html", str(html), "--no-progress")
    no_traceback(result)
    assert result.returncode == 0, result.stderr + result.stdout[-3000:]
    data = json.loads(result.stdout)
    validate(data)
    assert data["command"] == "drill"
    assert data["ok"] is True
    scenarios = {r["scenario"] for r in data["runs"]}
    assert scenarios == {"switchover", "node_down", "lost_commit"}
    clients = {(r["driver"], r["access"]) for r in data["runs"]}
    assert ("psycopg", "connection") in clients
    assert ("psycopg", "pool") in clients
    for r in data["runs"]:
        assert r["writes"]["ok"], r["name"]
        assert r["writes"]["acknowledged"] > 0
        if r["scenario"] != "lost_commit":
            # The outage each client saw spans the server's.
            [outage] = r["server_outages"]
            verdict = {f["name"]: f for f in r["findings"]}["client outage against the server's"]
            assert verdict["status"] == "ok", (r["name"], verdict, r["windows"], outage)
    resolved = {f["name"]: f for f in data["findings"]}["lost_commit: interrupted COMMITs "
                                                         "resolved"]
    assert resolved["status"] == "ok"
    text = html.read_text(encoding="utf-8")
    assert "<svg" in text
    assert "http://" not in text
    assert "https://" not in text


def test_drill_refuses_an_unknown_scenario() -> None:
    result = run("drill", "--scenarios", "switchover,meteor")
    assert result.returncode == 2
    assert "unknown scenario meteor" in result.stderr
    no_traceback(result)


def test_drill_text_report_when_piped() -> None:
    result = run("drill", "--scenarios", "switchover")
    no_traceback(result)
    assert result.returncode == 0, result.stderr
    assert "\x1b[" not in result.stdout
    assert "drill: OK" in result.stdout
    # Progress goes to stderr, one line per step when it is not a terminal.
    assert "switchover" in result.stderr


@pytest.mark.parametrize(("conninfo", "message"), [
    ("host=127.0.0.1 port=notaport", "not a valid connection string"),
    ("nonsense", "not a valid connection string"),
    ("", "give a libpq connection string"),
])
def test_probe_bad_conninfo(conninfo: str, message: str) -> None:
    result = run("probe", conninfo)
    assert result.returncode == 2
    assert message in result.stderr
    no_traceback(result)


def test_probe_unreachable_server() -> None:
    with LocalServer() as srv:  # never started: nothing listens on its port
        result = run("probe", srv.conninfo(connect_timeout="2"))
    assert result.returncode == 2
    assert "cannot reach the server" in result.stderr
    no_traceback(result)


def test_probe_wrong_password_says_so_without_the_password(server: LocalServer) -> None:
    result = run("probe", server.conninfo(password="not-the-Pw"))
    assert result.returncode == 2
    assert "authentication failed" in result.stderr
    assert "not-the-Pw" not in result.stderr + result.stdout
    no_traceback(result)


def test_probe_role_without_privileges(server: LocalServer) -> None:
    # PostgreSQL 15: only the owner may create tables in the public schema.
    result = run("probe", server.conninfo(user="weak"))
    assert result.returncode == 2
    assert "may not" in result.stderr
    assert PASSWORD not in result.stderr
    no_traceback(result)
    assert canary_tables(server.conninfo()) == []


def test_probe_refuses_a_read_only_server_for_writes(server: LocalServer) -> None:
    info = server.conninfo(options="-c default_transaction_read_only=on")
    result = run("probe", info)
    assert result.returncode == 2
    assert "read-only" in result.stderr
    assert "--read-only" in result.stderr
    no_traceback(result)
    assert canary_tables(server.conninfo()) == []


def test_probe_bad_numbers_are_usage_errors(server: LocalServer) -> None:
    for args in (["--duration", "0"], ["--concurrency", "-1"], ["--rto", "soon"]):
        result = run("probe", server.conninfo(), *args)
        assert result.returncode == 2, args
        assert "usage:" in result.stderr
        no_traceback(result)


@pytest.mark.parametrize("after", [0.3, 0.8, 2.5])
def test_ctrl_c_stops_the_probe_cleanly(server: LocalServer, after: float) -> None:
    """At any moment: during start-up, while setting up, and while probing."""
    code, out, err = interrupt(["probe", server.conninfo(), "--no-progress"], after=after,
                               timeout=60)
    assert code == 2, out + err
    no_traceback((out, err))
    assert "Ctrl-C" in out + err
    assert canary_tables(server.conninfo()) == []
    if after >= 2.5:
        # It was probing: it stopped, checked, dropped its table and reported.
        assert "probe: interrupted" in out
        assert "present exactly once" in out


def test_probe_json_over_a_switchover() -> None:
    with LocalCluster() as cl:
        cl.start()
        proc = subprocess.Popen(
            command("probe", cl.conninfo(), "--until-failovers", "1", "--duration", "60",
                    "--interval", "0.02", "--rto", "30", "--json"),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 20
            while not canary_tables(cl.conninfo()) and time.monotonic() < deadline:
                time.sleep(0.05)
            time.sleep(1.0)
            cl.switchover()
            out, err = proc.communicate(timeout=90)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, err + out[-2000:]
        data = json.loads(out)
        validate(data)
        [r] = data["runs"]
        assert r["incidents"], r["windows"]
        assert r["incidents"][0]["within_rto"] is True
        assert r["writes"]["ok"]
        verdict = {f["name"]: f for f in r["findings"]}["outages within --rto 30 s"]
        assert verdict["value"].startswith("1 of 1 within 30 s")
        assert canary_tables(cl.conninfo()) == []


def test_check_reports_and_validates(server: LocalServer, tmp_path: Path) -> None:
    html = tmp_path / "check.html"
    result = run("check", server.conninfo(), "--json", "--html", str(html))
    no_traceback(result)
    assert result.returncode in (0, 1), result.stderr
    data = json.loads(result.stdout)
    validate(data)
    assert data["command"] == "check"
    names = {f["name"] for f in data["findings"]}
    assert "restart_after_crash" in names
    assert PASSWORD not in result.stdout + html.read_text(encoding="utf-8")
    assert result.returncode == (0 if data["ok"] else 1)


def test_check_bad_input_exits_2(server: LocalServer) -> None:
    for info in ("host=127.0.0.1 port=notaport", server.conninfo(password="wrong-Pw")):
        result = run("check", info)
        assert result.returncode == 2, info
        assert result.stderr.startswith("symfo-failover check: ")
        assert "wrong-Pw" not in result.stderr
        no_traceback(result)


def test_html_to_an_unwritable_place_is_refused_before_anything_runs(
        server: LocalServer) -> None:
    result = run("check", server.conninfo(), "--html", "/nonexistent/dir/report.html")
    assert result.returncode == 2
    assert "cannot write the HTML report" in result.stderr


def _cluster_postmasters() -> set[int]:
    """Postmasters of harness clusters (their data directory is ``.../cluster-*/data``)."""
    pids = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if cmdline and cmdline[0].endswith(b"postgres") and any(
                b"/cluster-" in arg for arg in cmdline):
            pids.add(int(entry.name))
    return pids


def test_ctrl_c_stops_the_drill_and_its_cluster() -> None:
    before = _cluster_postmasters()
    # After 4 s: in the first scenarios.
    code, out, err = interrupt(["drill", "--no-progress"], after=4.0, timeout=90)
    assert code == 2, out + err
    no_traceback((out, err))
    assert "interrupted" in out + err
    deadline = time.monotonic() + 10
    while _cluster_postmasters() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _cluster_postmasters() - before == set()
