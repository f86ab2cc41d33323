"""LocalServer on a real PostgreSQL: start, stop, kill, crash, and nothing left behind."""

from __future__ import annotations

import os
import pathlib
import signal
import socket
import subprocess
import sys
import textwrap
import time

import psycopg
import pytest
from psycopg import errors

from symfo_failover.harness import LocalServer, ServerBinariesNotFound, _binaries, find_bindir
from symfo_failover.harness._reaper import reaper
from symfo_failover.harness._server import ServerError

pytestmark = pytest.mark.server


def _alive(pid: int) -> bool:
    """Running, not a zombie (this container's init never reaps orphans)."""
    try:
        stat = pathlib.Path(f"/proc/{pid}/stat").read_bytes()
    except FileNotFoundError:
        return False
    return stat[stat.rindex(b")") + 2 :].split()[0] not in (b"Z", b"X")


def _wait_gone(pids: list[int], timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if _alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.02)
    return alive


def _connect(srv: LocalServer) -> psycopg.Connection[tuple[object, ...]]:
    return psycopg.connect(srv.conninfo(connect_timeout="5"), autocommit=True)


def _shm_ids() -> set[str]:
    lines = pathlib.Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    return {line.split()[1] for line in lines}


def test_start_connect_select_1(server: LocalServer) -> None:
    assert server.running
    assert server.accepting
    with _connect(server) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert conn.info.backend_pid in server.backend_pids()
        user = conn.execute("SELECT current_user").fetchone()
    assert user == ("postgres",)
    pid = server.postmaster_pid
    assert pid is not None
    assert os.getpgid(pid) == pid  # its own process group, for the reaper
    if os.getuid() == 0:
        # PostgreSQL refuses root; the harness must have switched users.
        status = pathlib.Path(f"/proc/{pid}/status").read_text()
        uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
        assert uid_line.split()[1] != "0"


def test_server_processes_do_not_hold_the_reaper_pipe(server: LocalServer) -> None:
    fd = reaper().pipe_fd
    assert fd is not None, "the reaper should watch the running server"
    pipe = os.readlink(f"/proc/self/fd/{fd}")
    assert pipe.startswith("pipe:")
    pid = server.postmaster_pid
    assert pid is not None
    with _connect(server):  # a backend forked from the postmaster too
        for proc in [pid, *server.backend_pids()]:
            held = {os.readlink(f"/proc/{proc}/fd/{n}") for n in os.listdir(f"/proc/{proc}/fd")}
            assert pipe not in held, f"process {proc} holds the reaper pipe: EOF would never come"


def test_stop_fast_sends_admin_shutdown(fresh_server: LocalServer) -> None:
    conn = _connect(fresh_server)
    pids = [fresh_server.postmaster_pid, *fresh_server.backend_pids()]
    fresh_server.stop("fast")
    assert not fresh_server.running
    assert fresh_server.postmaster_pid is None
    with pytest.raises(errors.AdminShutdown) as info:
        conn.execute("SELECT 1")
    assert info.value.sqlstate == "57P01"
    assert [p for p in pids if p is not None and _alive(p)] == []
    conn.close()


def test_stop_immediate(fresh_server: LocalServer) -> None:
    conn = _connect(fresh_server)
    pids = [fresh_server.postmaster_pid, *fresh_server.backend_pids()]
    down_at = fresh_server.stop("immediate")
    assert down_at <= time.monotonic()
    assert not fresh_server.running
    with pytest.raises(psycopg.OperationalError) as info:
        conn.execute("SELECT 1")
    assert info.value.sqlstate in ("57P01", None)
    assert [p for p in pids if p is not None and _alive(p)] == []
    conn.close()


def test_kill_postmaster_leaves_no_server_process(fresh_server: LocalServer) -> None:
    conn = _connect(fresh_server)
    postmaster = fresh_server.postmaster_pid
    assert postmaster is not None
    children = fresh_server.backend_pids()
    assert conn.info.backend_pid in children
    shmid = (fresh_server.data_dir / "postmaster.pid").read_text().splitlines()[6].split()[1]
    assert shmid in _shm_ids()

    killed_at = fresh_server.kill_postmaster()

    assert killed_at <= time.monotonic()
    assert not fresh_server.running
    assert [p for p in [postmaster, *children] if _alive(p)] == []
    with pytest.raises(psycopg.OperationalError):
        conn.execute("SELECT 1")
    conn.close()
    # PostgreSQL leaves its System V segment behind after a SIGKILL; the harness must not.
    assert shmid not in _shm_ids()


def test_kill_backend_crashes_the_server_and_it_restarts_on_the_same_data(
    fresh_server: LocalServer,
) -> None:
    with _connect(fresh_server) as setup:
        setup.execute("CREATE TABLE survivor (x int)")
        setup.execute("INSERT INTO survivor VALUES (42)")
    with _connect(fresh_server) as victim, _connect(fresh_server) as bystander:
        fresh_server.kill_backend(victim.info.backend_pid)
        # restart_after_crash is off: the postmaster ends every session and shuts down.
        fresh_server.wait_stopped(timeout=15)
        assert not fresh_server.running
        with pytest.raises(psycopg.OperationalError) as info:
            bystander.execute("SELECT 1")
    assert info.value.sqlstate in ("57P02", None)
    if info.value.sqlstate is not None:
        assert isinstance(info.value, errors.CrashShutdown)

    fresh_server.start()
    with _connect(fresh_server) as conn:
        assert conn.execute("SELECT x FROM survivor").fetchall() == [(42,)]


def test_kill_backend_refuses_a_process_that_is_not_its_child(server: LocalServer) -> None:
    with pytest.raises(ValueError, match="not a child"):
        server.kill_backend(os.getpid())
    assert server.running


def test_close_removes_the_throwaway_data_dir() -> None:
    srv = LocalServer()
    srv.start()
    pid = srv.postmaster_pid
    assert pid is not None
    assert (srv.data_dir / "PG_VERSION").is_file()
    assert srv.log_path.is_file()
    srv.close()
    assert not srv.data_dir.exists()
    assert not srv.log_path.exists()
    assert not _alive(pid)
    srv.close()  # idempotent
    with pytest.raises(ServerError, match="closed"):
        srv.start()


def test_a_second_node_runs_on_the_same_data_dir_and_leaves_it(fresh_server: LocalServer) -> None:
    with _connect(fresh_server) as conn:
        conn.execute("CREATE TABLE shared (x int)")
    fresh_server.stop("fast")
    with LocalServer(data_dir=fresh_server.data_dir) as node_b:
        assert node_b.port != fresh_server.port
        node_b.start()
        with _connect(node_b) as conn:
            conn.execute("INSERT INTO shared VALUES (1)")
    assert (fresh_server.data_dir / "PG_VERSION").is_file()
    fresh_server.start()
    with _connect(fresh_server) as conn:
        assert conn.execute("SELECT count(*) FROM shared").fetchone() == (1,)


def test_start_retries_on_another_port_when_its_port_was_taken() -> None:
    with LocalServer() as srv:
        first_port = srv.port
        with socket.socket() as squatter:
            squatter.bind(("127.0.0.1", first_port))
            squatter.listen()
            srv.start()
        assert srv.port != first_port
        with _connect(srv) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)


def test_failed_start_reports_the_server_log() -> None:
    with LocalServer(settings={"no_such_setting": "1"}) as srv:
        with pytest.raises(ServerError) as info:
            srv.start(timeout=10)
        assert "no_such_setting" in str(info.value)
        assert str(srv.log_path) in str(info.value)
        assert not srv.running


def test_explicit_port_in_use_is_an_error_not_a_silent_move() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        with LocalServer(port=port) as srv, pytest.raises(ServerError, match="exited during start"):
            srv.start(timeout=10)
        assert srv.port == port


def test_password_server_needs_the_password() -> None:
    with LocalServer(password="s3cret pass'word") as srv:
        srv.start()
        with _connect(srv) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
        no_password = f"host={srv.host} port={srv.port} user=postgres dbname=postgres"
        with pytest.raises(psycopg.OperationalError, match="password"):
            psycopg.connect(no_password, connect_timeout=5)
        odbc = srv.odbc_connection_string()
        assert odbc.startswith("Driver={PostgreSQL Unicode};Server=127.0.0.1;")
        assert f"Port={srv.port};Database=postgres;Uid=postgres;Pwd=s3cret pass'word;" in odbc


@pytest.mark.japanese
def test_lc_messages_is_applied(ja_locale: str) -> None:
    with LocalServer(lc_messages=ja_locale) as srv:
        srv.start()
        with _connect(srv) as conn:
            assert conn.execute("SHOW lc_messages").fetchone() == ("ja_JP.UTF-8",)
            with pytest.raises(errors.UndefinedTable) as info:
                conn.execute("SELECT * FROM no_such_table")
    assert "存在しません" in str(info.value)


VICTIM = textwrap.dedent(
    """
    import sys, time
    from symfo_failover.harness import LocalServer
    srv = LocalServer()
    srv.start()
    print(srv.postmaster_pid, *srv.backend_pids(), flush=True)
    print(srv.data_dir.parent.parent, flush=True)
    time.sleep(120)
    """
)


def test_a_sigkilled_process_leaves_no_server_and_no_directory() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", VICTIM], stdout=subprocess.PIPE, text=True, start_new_session=True
    ) as child:
        try:
            assert child.stdout is not None
            pids = [int(p) for p in child.stdout.readline().split()]
            workspace = pathlib.Path(child.stdout.readline().strip())
            assert pids, "the child did not start its server"
            assert workspace.is_dir()
            assert all(_alive(p) for p in pids)
        finally:
            child.send_signal(signal.SIGKILL)
    assert _wait_gone(pids) == []
    deadline = time.monotonic() + 10
    while workspace.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not workspace.exists()


def _fake_bindir(path: pathlib.Path) -> pathlib.Path:
    path.mkdir()
    for name in ("postgres", "initdb"):
        (path / name).write_text("#!/bin/sh\n")
        (path / name).chmod(0o755)
    return path


def test_find_bindir_honours_the_environment_variable(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_bindir(tmp_path / "bin")
    monkeypatch.setenv("SYMFO_PG_BINDIR", str(fake))
    assert find_bindir() == fake
    # An explicit argument wins over the variable.
    real = find_bindir(pathlib.Path("/usr/lib/postgresql/15/bin"))
    assert (real / "postgres").is_file()


def test_find_bindir_refuses_a_bad_explicit_dir(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ServerBinariesNotFound) as info:
        find_bindir(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "postgres" in message
    assert "apt-get install postgresql" in message
    assert "SYMFO_PG_BINDIR" in message
    assert isinstance(info.value, RuntimeError)


def test_find_bindir_lists_what_it_tried(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SYMFO_PG_BINDIR", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(_binaries, "_DEBIAN_GLOB_ROOT", tmp_path / "nowhere")
    with pytest.raises(ServerBinariesNotFound) as info:
        find_bindir()
    message = str(info.value)
    for tried in ("SYMFO_PG_BINDIR", "pg_config", "`postgres` on PATH", "nowhere"):
        assert tried in message
