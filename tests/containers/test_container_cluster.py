"""ContainerCluster on a real Docker engine, seen by real psycopg and pyodbc sessions.

Two containers share one data directory on the host; the access point is a loopback
port on host networking. Each test brings the cluster to the state it needs, so they
also pass alone. No message text is read, except the Japanese server's on purpose.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pyodbc
import pytest
from psycopg import errors

from symfo_failover import Kind, classify, sqlstate_of
from symfo_failover.harness import ServerError, probe
from symfo_failover.harness._containers import ContainerCluster
from symfo_failover.harness._reaper import reaper
from symfo_failover.harness._server import _free_port

pytestmark = pytest.mark.containers

PASSWORD = "c0ntainer-pw"
SLEEP_SQL = "SELECT pg_sleep(60)"


def _docker_names(*filters: str) -> list[str]:
    argv = ["docker", "ps", "--all", "--format", "{{.Names}}"]
    for f in filters:
        argv += ["--filter", f]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=True).stdout
    return sorted(out.split())


def _our_containers() -> list[str]:
    return _docker_names(f"name=symfo-{os.getpid()}-")


@pytest.fixture(scope="module", autouse=True)
def _no_container_left(container_image: str) -> Iterator[None]:
    """Set up first, torn down last: after the module no container of ours remains."""
    assert _our_containers() == []
    yield
    assert _our_containers() == []


@pytest.fixture(scope="module")
def cluster(container_image: str) -> Iterator[ContainerCluster]:
    with ContainerCluster(image=container_image, password=PASSWORD) as c:
        yield c
    assert not c.shared_dir.exists()


def _up(cluster: ContainerCluster) -> str:
    if cluster.active is None:
        cluster.start()
    assert cluster.active is not None
    return cluster.active


def _pg(cluster: ContainerCluster) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(cluster.conninfo(connect_timeout="5"), autocommit=True)


def _odbc(cluster: ContainerCluster) -> pyodbc.Connection:
    return pyodbc.connect(cluster.odbc_connection_string(), autocommit=True, timeout=5)


def _node_psycopg(cluster: ContainerCluster) -> str:
    with _pg(cluster) as conn:
        row = conn.execute("SHOW cluster_name").fetchone()
    assert row is not None
    return str(row[0])


def _node_odbc(cluster: ContainerCluster) -> str:
    conn = _odbc(cluster)
    try:
        return str(conn.cursor().execute("SHOW cluster_name").fetchone()[0])
    finally:
        conn.close()


def _write(cluster: ContainerCluster, value: int) -> None:
    with _pg(cluster) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS shared_disk (v int)")
        conn.execute("INSERT INTO shared_disk VALUES (%s)", (value,))


def _values(cluster: ContainerCluster) -> set[int]:
    with _pg(cluster) as conn:
        return {r[0] for r in conn.execute("SELECT v FROM shared_disk")}


def _during_calls(
    cluster: ContainerCluster, fault: Callable[[], object]
) -> tuple[dict[str, BaseException], dict[str, Any]]:
    """Run ``fault`` while a psycopg and a pyodbc session each wait in pg_sleep.

    Returns what each session's call raised, and the sessions (for classify()).
    """
    conns: dict[str, Any] = {"psycopg": _pg(cluster), "pyodbc": _odbc(cluster)}
    raised: dict[str, BaseException] = {}

    def call(driver: str) -> None:
        try:
            if driver == "psycopg":
                conns[driver].execute(SLEEP_SQL)
            else:
                conns[driver].cursor().execute(SLEEP_SQL)
        except Exception as exc:
            raised[driver] = exc

    threads = [threading.Thread(target=call, args=(d,), daemon=True) for d in conns]
    for t in threads:
        t.start()
    with _pg(cluster) as admin:
        deadline = time.monotonic() + 10
        while True:
            row = admin.execute(
                "SELECT count(*) FROM pg_stat_activity"
                " WHERE state = 'active' AND query = %s AND pid <> pg_backend_pid()",
                (SLEEP_SQL,),
            ).fetchone()
            if row is not None and row[0] == 2:
                break
            assert time.monotonic() < deadline, "the sessions did not start their calls"
            time.sleep(0.02)
    fault()
    for t in threads:
        t.join(15)
    assert not any(t.is_alive() for t in threads), "a call survived the fault"
    assert set(raised) == set(conns), f"only {sorted(raised)} raised"
    for driver, conn in conns.items():
        assert classify(raised[driver], connection=conn).kind is Kind.CONNECTION_LOST
        with contextlib.suppress(Exception):
            conn.close()
    return raised, conns


def test_start_serves_node_a_on_both_drivers(cluster: ContainerCluster) -> None:
    if cluster.active is not None:
        cluster.stop_both()
    t = cluster.start("node-a")
    assert (t.to_node, cluster.active) == ("node-a", "node-a")
    assert t.accepting_at is not None
    assert t.started_at <= t.accepting_at
    assert _node_psycopg(cluster) == "node-a"
    assert _node_odbc(cluster) == "node-a"
    names = _our_containers()
    assert names == [cluster.container_names["node-a"]]
    # The guard: the other node must not start on the shared directory meanwhile.
    with pytest.raises(ServerError):
        cluster.start("node-b")
    assert _our_containers() == names


def test_switchover_ends_calls_with_57P01_and_keeps_the_data(cluster: ContainerCluster) -> None:
    old = _up(cluster)
    new = cluster.standby
    _write(cluster, 1)
    transitions = []
    raised, _ = _during_calls(cluster, lambda: transitions.append(cluster.switchover()))
    assert isinstance(raised["psycopg"], errors.AdminShutdown)  # 57P01
    assert isinstance(raised["pyodbc"], pyodbc.Error)
    assert sqlstate_of(raised["pyodbc"]) == "57P01"
    (t,) = transitions
    assert (t.from_node, t.to_node) == (old, new)
    assert t.down_at is not None
    assert t.accepting_at is not None
    assert t.started_at <= t.down_at <= t.accepting_at
    assert _node_psycopg(cluster) == new
    assert _node_odbc(cluster) == new
    assert 1 in _values(cluster)  # written on the old node: one shared disk
    # The stopped node's container is gone: nothing piles up.
    assert _our_containers() == [cluster.container_names[new]]


def test_node_down_loses_sessions_and_refuses_connects(cluster: ContainerCluster) -> None:
    node = _up(cluster)
    pg, od = _pg(cluster), _odbc(cluster)
    try:
        pg.execute("SELECT 1")
        od.cursor().execute("SELECT 1")
        t = cluster.node_down()
        assert (t.from_node, t.to_node) == (node, None)
        assert cluster.active is None
        with pytest.raises(psycopg.OperationalError) as pg_lost:
            pg.execute("SELECT 1")
        assert classify(pg_lost.value, connection=pg).kind is Kind.CONNECTION_LOST
        with pytest.raises(pyodbc.Error) as odbc_lost:
            od.cursor().execute("SELECT 1")
        assert classify(odbc_lost.value, connection=od).kind is Kind.CONNECTION_LOST
    finally:
        pg.close()
        with contextlib.suppress(Exception):
            od.close()
    assert probe(cluster.host, cluster.port).state == "refused"
    with pytest.raises(psycopg.OperationalError) as pg_refused:
        _pg(cluster)
    assert classify(pg_refused.value).kind is Kind.CONNECT_FAILED
    with pytest.raises(pyodbc.Error) as odbc_refused:
        _odbc(cluster)
    assert classify(odbc_refused.value).kind is Kind.CONNECT_FAILED
    assert sqlstate_of(odbc_refused.value) == "08001"
    assert _our_containers() == []  # the node vanished with its container
    cluster.start()
    assert _node_psycopg(cluster) == node  # the node that ran last comes back


def test_crash_resets_the_other_sessions_with_57P02(cluster: ContainerCluster) -> None:
    node = _up(cluster)
    transitions = []
    raised, _ = _during_calls(cluster, lambda: transitions.append(cluster.crash()))
    assert sqlstate_of(raised["pyodbc"]) == "57P02"
    assert sqlstate_of(raised["psycopg"]) in ("57P02", None)
    (t,) = transitions
    assert (t.from_node, t.to_node) == (node, None)
    assert cluster.active is None  # restart_after_crash = off: the server stopped
    assert _our_containers() == []
    cluster.start()
    assert _node_psycopg(cluster) == node


def test_stop_modes(cluster: ContainerCluster) -> None:
    for mode in ("immediate", "smart", "fast"):
        node = _up(cluster)
        t = cluster.stop_both(mode)
        assert t.from_node == node
        assert t.down_at is not None
        assert probe(cluster.host, cluster.port).state == "refused"
        assert _our_containers() == []


def _phases(answers: list[object]) -> list[object]:
    """``answers`` with repeats folded: the states the access point went through, in order."""
    return [a for i, a in enumerate(answers) if i == 0 or answers[i - 1] != a]


def test_failover_windows_refused_then_57P03_then_accepting(cluster: ContainerCluster) -> None:
    old = _up(cluster)
    new = cluster.standby
    _write(cluster, 2)
    # (driver, began, ended, answer), in the order tried, one attempt at a time: the
    # answer is a node name, an exception, or, for the protocol probe, its state
    # ("refused", "error 57P03", "accepting").
    seen: list[tuple[str, float, float, object]] = []
    stop = threading.Event()

    def attempt(driver: str, connect: Callable[[], str]) -> None:
        began = time.monotonic()
        try:
            answer: object = connect()
        except Exception as exc:
            answer = exc
        seen.append((driver, began, time.monotonic(), answer))

    def watch() -> None:
        while not stop.is_set():
            attempt("probe", lambda: str(probe(cluster.host, cluster.port)))
            attempt("psycopg", lambda: _node_psycopg(cluster))
            attempt("pyodbc", lambda: _node_odbc(cluster))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while len(seen) < 3:  # one whole round on the old node first
            assert time.monotonic() < deadline, "the watcher did not get going"
            time.sleep(0.01)
        t = cluster.failover(switch_delay=0.5, startup_delay=0.5)
        assert t.accepting_at is not None
        accepting_at = t.accepting_at
        deadline = time.monotonic() + 10
        while not any(d == "pyodbc" and b > accepting_at for d, b, _, _ in seen):
            assert time.monotonic() < deadline, "no connect after the failover"
            time.sleep(0.05)
    finally:
        stop.set()
        watcher.join(15)
    assert (t.from_node, t.to_node) == (old, new)
    assert t.down_at is not None
    assert t.listening_at is not None
    assert t.started_at <= t.down_at < t.listening_at < t.accepting_at
    assert all(a == old for d, _, _, a in seen[:3] if d != "probe")

    # The probe: refused while switching, 57P03 from the held node, accepting again; in
    # this order and no other. Each change came after the harness's step that makes it
    # (the harness notes each moment just after it happened).
    probes = [(i, e, a) for i, (d, _, e, a) in enumerate(seen) if d == "probe"]
    answers = [a for _, _, a in probes]
    assert _phases(answers) == ["accepting", "refused", "error 57P03", "accepting"], answers
    refused = [(i, e) for i, e, a in probes if a == "refused"]
    starting = [(i, e) for i, e, a in probes if a == "error 57P03"]
    back = next(e for i, e, a in probes if a == "accepting" and i > starting[-1][0])
    assert refused[0][1] > t.started_at
    assert starting[0][1] > t.down_at
    assert back > t.listening_at
    assert {a for d, b, _, a in seen if d == "probe" and b > t.accepting_at} == {"accepting"}

    def between(driver: str, first: int, last: int) -> list[object]:
        return [a for i, (d, _, _, a) in enumerate(seen) if d == driver and first < i < last]

    # A connect tried after one probe found no node accepting and before a later one found
    # the same fails: the old node was gone and the new one not promoted yet.
    for driver in ("psycopg", "pyodbc"):
        away = between(driver, refused[0][0], starting[-1][0])
        switching = between(driver, refused[0][0], refused[-1][0])
        assert switching, f"no {driver} connect while no node was there"
        held = between(driver, starting[0][0], starting[-1][0])
        assert held, f"no {driver} connect while the node was starting"
        for exc in away:
            assert isinstance(exc, Exception), away
            assert classify(exc).kind is Kind.CONNECT_FAILED, exc
            if driver == "pyodbc":
                assert sqlstate_of(exc) == "08001"  # psqlODBC: every failed connect
        assert {a for d, b, _, a in seen if d == driver and b > t.accepting_at} == {new}
    assert 2 in _values(cluster)


def test_image_honours_postgres_user_password_and_db(container_image: str) -> None:
    from testcontainers.core.container import DockerContainer

    port = _free_port("127.0.0.1")
    name = f"symfo-{os.getpid()}-env-{secrets.token_hex(3)}"
    cleanup = ["docker", "rm", "--force", "--volumes", name]
    reaper().watch_command(cleanup)
    container = (
        DockerContainer(
            container_image,
            name=name,
            env={
                "POSTGRES_USER": "alice",
                "POSTGRES_PASSWORD": "wonder-land",
                "POSTGRES_DB": "appdb",
                # The official image trusts every loopback connection unless told
                # otherwise, and with host networking the test connects over loopback.
                "POSTGRES_INITDB_ARGS": "--auth-host=scram-sha-256",
            },
        )
        # Arguments that begin with "-" are for postgres, as in the official image.
        .with_command(["-c", f"port={port}", "-c", "listen_addresses=127.0.0.1"])
        .with_kwargs(network="host")
    )
    container.start()
    try:
        deadline = time.monotonic() + 60
        while probe("127.0.0.1", port, user="alice", database="appdb").state != "accepting":
            wrapped = container.get_wrapped_container()
            wrapped.reload()
            assert wrapped.status == "running", wrapped.logs(tail=30).decode()
            assert time.monotonic() < deadline, wrapped.logs(tail=30).decode()
            time.sleep(0.05)
        base = f"host=127.0.0.1 port={port} user=alice dbname=appdb connect_timeout=5"
        with psycopg.connect(f"{base} password=wonder-land") as conn:
            row = conn.execute("SELECT current_user, current_database()").fetchone()
            assert row == ("alice", "appdb")
            superuser = conn.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'alice'")
            assert superuser.fetchone() == (True,)
        with pytest.raises(psycopg.OperationalError) as wrong:
            psycopg.connect(f"{base} password=not-the-password")
        assert classify(wrong.value).kind is Kind.NOT_RETRYABLE  # a wrong password: no retry
        odbc = (
            f"Driver={{PostgreSQL Unicode}};Server=127.0.0.1;Port={port};Database=appdb;Uid=alice;"
        )
        conn_odbc = pyodbc.connect(odbc + "Pwd=wonder-land;", timeout=5)
        try:
            assert conn_odbc.cursor().execute("SELECT current_user").fetchone()[0] == "alice"
        finally:
            conn_odbc.close()
        with pytest.raises(pyodbc.Error):
            pyodbc.connect(odbc + "Pwd=not-the-password;", timeout=5)
    finally:
        container.stop()
        reaper().forget_command(cleanup)
    assert _docker_names(f"name={name}") == []


def _image_has_locale(image: str, locale: str) -> bool:
    out = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", "--entrypoint", "locale", image, "-a"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    wanted = locale.lower().replace("-", "")
    return any(line.strip().lower().replace("-", "") == wanted for line in out.splitlines())


def test_japanese_speaking_server(container_image: str) -> None:
    if not _image_has_locale(container_image, "ja_JP.UTF-8"):
        pytest.skip(f"{container_image} has no ja_JP.UTF-8 locale (the built image has)")
    with ContainerCluster(image=container_image, lc_messages="ja_JP.UTF-8") as ja:
        ja.start()
        with _pg(ja) as conn, pytest.raises(errors.DivisionByZero) as info:
            conn.execute("SELECT 1 / 0")
        message = info.value.diag.message_primary or ""
        assert message
        assert not message.isascii(), message  # a translated message
        assert classify(info.value).kind is Kind.NOT_RETRYABLE


def test_nothing_outlives_a_sigkilled_python(container_image: str, tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import time
        from symfo_failover.harness._containers import ContainerCluster
        c = ContainerCluster(image={container_image!r})
        c.start()
        print(c.container_names["node-a"], c.shared_dir, flush=True)
        time.sleep(600)
        """
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    ) as proc:
        try:
            assert proc.stdout is not None
            name, shared_dir = proc.stdout.readline().split()
            assert _docker_names(f"name={name}", "status=running") == [name]
            assert Path(shared_dir).is_dir()
        finally:
            proc.kill()
    deadline = time.monotonic() + 30
    while _docker_names(f"name={name}") or Path(shared_dir).exists():
        assert time.monotonic() < deadline, "the watchdog left the container or its files"
        time.sleep(0.1)
