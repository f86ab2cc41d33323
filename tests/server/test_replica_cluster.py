"""ReplicaCluster on real servers: a primary, a streaming standby, and its scenarios.

Observed with psycopg sessions (and pyodbc for the multi-host ODBC string). Asserts the
order of events and their outcomes, never how long they took.
"""

from __future__ import annotations

import os
import pathlib
import threading
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import errors

from symfo_failover.harness import ReplicaCluster, ServerError
from symfo_failover.harness._server import _alive

pytestmark = pytest.mark.server

Conn = psycopg.Connection[tuple[object, ...]]


def _connect(conninfo: str) -> Conn:
    return psycopg.connect(conninfo, autocommit=True, connect_timeout=10)


def _one(conn: Conn, query: str) -> object:
    row = conn.execute(query).fetchone()
    assert row is not None
    return row[0]


def _on(cluster: ReplicaCluster, node: str, query: str) -> object:
    with _connect(cluster.node_conninfo(node)) as conn:
        return _one(conn, query)


def _replication(cluster: ReplicaCluster) -> list[tuple[object, ...]]:
    """(application_name, state, sync_state) of each walsender on the primary."""
    assert cluster.primary is not None
    with _connect(cluster.node_conninfo(cluster.primary)) as conn:
        return conn.execute(
            "SELECT application_name, state, sync_state FROM pg_stat_replication"
        ).fetchall()



def _server_pids(cluster: ReplicaCluster) -> set[int]:
    pids: set[int] = set()
    for node in cluster.nodes:
        srv = cluster.server(node)
        if srv.postmaster_pid is not None:
            pids.add(srv.postmaster_pid)
        pids.update(srv.backend_pids())
    return pids


def _print_logs(cluster: ReplicaCluster) -> None:
    # Captured, so shown only under a failed test's "Captured stdout teardown".
    for node in cluster.nodes:
        log = cluster.server(node).log_path
        if log.exists():
            print(f"--- {node} server log {log} ---")
            print(log.read_text(encoding="utf-8", errors="replace")[-4000:])


@pytest.fixture
def cluster(symfo_replica_cluster: ReplicaCluster) -> Iterator[ReplicaCluster]:
    """The plugin's synchronous cluster, with a table ``t (v int)`` holding 1."""
    with _connect(symfo_replica_cluster.conninfo()) as conn:
        conn.execute("CREATE TABLE t (v int)")
        conn.execute("INSERT INTO t VALUES (1)")
    yield symfo_replica_cluster
    _print_logs(symfo_replica_cluster)


def _values(conninfo: str) -> list[object]:
    with _connect(conninfo) as conn:
        return [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")]


def test_start_streams_synchronously_and_a_row_reaches_the_standby(
    cluster: ReplicaCluster,
) -> None:
    assert (cluster.primary, cluster.standby) == ("node-a", "node-b")
    assert _replication(cluster) == [("node-b", "streaming", "sync")]
    assert _on(cluster, "node-a", "SHOW synchronous_standby_names") == '"node-b"'
    for node in cluster.nodes:
        assert _on(cluster, node, "SHOW cluster_name") == node
        assert _on(cluster, node, "SHOW synchronous_commit") == "on"
    assert _on(cluster, "node-b", "SELECT pg_is_in_recovery()") is True
    with _connect(cluster.conninfo()) as conn:
        assert _one(conn, "SHOW cluster_name") == "node-a"
    cluster.wait_synced()
    assert _values(cluster.node_conninfo("node-b")) == [1]
    with _connect(cluster.node_conninfo("node-b")) as conn, pytest.raises(
        errors.ReadOnlySqlTransaction
    ):
        conn.execute("INSERT INTO t VALUES (2)")
    both = cluster.conninfo()
    ports = f"port={cluster.server('node-a').port},{cluster.server('node-b').port}"
    assert "host=127.0.0.1,127.0.0.1" in both
    assert ports in both
    assert "target_session_attrs=read-write" in both


def test_start_returns_a_start_transition() -> None:
    with ReplicaCluster() as replica:
        t = replica.start()
        assert (t.scenario, t.from_node, t.to_node) == ("start", None, "node-a")
        assert t.accepting_at is not None
        assert t.streaming_at is not None
        assert t.started_at <= t.accepting_at <= t.streaming_at
        assert t.down_at is None
        with pytest.raises(ServerError, match="already started"):
            replica.start()


def test_failover_with_rejoin(cluster: ReplicaCluster) -> None:
    old_postmaster = cluster.server("node-a").postmaster_pid
    assert old_postmaster is not None
    session = _connect(cluster.conninfo())
    assert _one(session, "SHOW cluster_name") == "node-a"

    t = cluster.failover()

    assert (t.scenario, t.from_node, t.to_node) == ("failover", "node-a", "node-b")
    assert t.down_at is not None
    assert t.accepting_at is not None
    assert t.streaming_at is not None
    assert t.started_at <= t.down_at <= t.accepting_at <= t.streaming_at
    assert (cluster.primary, cluster.standby) == ("node-b", "node-a")
    assert cluster.last_rejoin_method == "pg_rewind"
    assert not _alive(old_postmaster)
    with pytest.raises(psycopg.OperationalError):
        session.execute("SELECT 1")
    session.close()
    # The multi-host access point now lands on the promoted node, which takes writes.
    with _connect(cluster.conninfo()) as conn:
        assert _one(conn, "SHOW cluster_name") == "node-b"
        assert _one(conn, "SELECT pg_is_in_recovery()") is False
        conn.execute("INSERT INTO t VALUES (2)")
    # The old primary is back, in recovery, streaming, the new primary's sync standby.
    assert _on(cluster, "node-a", "SELECT pg_is_in_recovery()") is True
    assert _on(cluster, "node-a", "SELECT status FROM pg_stat_wal_receiver") == "streaming"
    assert _replication(cluster) == [("node-a", "streaming", "sync")]
    assert _on(cluster, "node-b", "SHOW synchronous_standby_names") == '"node-a"'
    cluster.wait_synced()
    # Synchronous replication: nothing acknowledged before the failover was lost.
    assert _values(cluster.node_conninfo("node-a")) == [1, 2]


def test_failover_without_rejoin_then_rejoin(cluster: ReplicaCluster) -> None:
    t = cluster.failover(rejoin=False)

    assert (t.from_node, t.to_node) == ("node-a", "node-b")
    assert t.down_at is not None
    assert t.accepting_at is not None
    assert t.down_at <= t.accepting_at
    assert t.streaming_at is None
    assert (cluster.primary, cluster.standby) == ("node-b", None)
    assert not cluster.server("node-a").running
    assert _replication(cluster) == []
    # Unprotected, so that writes do not wait for a standby that is not there.
    assert _on(cluster, "node-b", "SHOW synchronous_standby_names") == ""
    wrote = threading.Event()

    def write() -> None:
        with _connect(cluster.conninfo()) as conn:
            conn.execute("INSERT INTO t VALUES (2)")
        wrote.set()

    writer = threading.Thread(target=write, daemon=True)
    writer.start()
    writer.join(30)
    assert wrote.is_set(), "a write on the unprotected new primary hung"
    with pytest.raises(ServerError, match="rejoin"):
        cluster.switchover()
    with pytest.raises(ServerError, match="rejoin"):
        cluster.wait_synced()

    streaming_at = cluster.rejoin()

    assert streaming_at >= t.accepting_at
    assert (cluster.primary, cluster.standby) == ("node-b", "node-a")
    assert _replication(cluster) == [("node-a", "streaming", "sync")]
    assert _on(cluster, "node-b", "SHOW synchronous_standby_names") == '"node-a"'
    cluster.wait_synced()
    assert _values(cluster.node_conninfo("node-a")) == [1, 2]
    with pytest.raises(ServerError, match="nothing to rejoin"):
        cluster.rejoin()


def test_switchover_and_back(cluster: ReplicaCluster) -> None:
    session = _connect(cluster.node_conninfo("node-a"))
    old_postmaster = cluster.server("node-a").postmaster_pid

    t = cluster.switchover()

    assert (t.scenario, t.from_node, t.to_node) == ("switchover", "node-a", "node-b")
    assert t.down_at is not None
    assert t.accepting_at is not None
    assert t.streaming_at is not None
    assert t.started_at <= t.down_at <= t.accepting_at <= t.streaming_at
    # A fast shutdown: the old primary's sessions were told so (57P01).
    with pytest.raises(errors.AdminShutdown):
        session.execute("SELECT 1")
    session.close()
    assert cluster.server("node-a").postmaster_pid not in (None, old_postmaster)
    assert (cluster.primary, cluster.standby) == ("node-b", "node-a")
    assert _replication(cluster) == [("node-a", "streaming", "sync")]
    with _connect(cluster.conninfo()) as conn:
        assert _one(conn, "SHOW cluster_name") == "node-b"
        conn.execute("INSERT INTO t VALUES (2)")

    back = cluster.switchover()

    assert (back.from_node, back.to_node) == ("node-b", "node-a")
    assert (cluster.primary, cluster.standby) == ("node-a", "node-b")
    assert _replication(cluster) == [("node-b", "streaming", "sync")]
    with _connect(cluster.conninfo()) as conn:
        assert _one(conn, "SHOW cluster_name") == "node-a"
        conn.execute("INSERT INTO t VALUES (3)")
    cluster.wait_synced()
    assert _values(cluster.node_conninfo("node-b")) == [1, 2, 3]


def test_lag_holds_a_remote_apply_commit_until_replay_resumes() -> None:
    with ReplicaCluster(synchronous_commit="remote_apply") as replica:
        replica.start()
        with _connect(replica.conninfo()) as conn:
            conn.execute("CREATE TABLE t (v int)")
        assert _on(replica, "node-b", "SHOW synchronous_commit") == "remote_apply"
        done = threading.Event()
        writer_pid: list[int] = []

        def commit() -> None:
            with _connect(replica.conninfo()) as conn:
                writer_pid.append(conn.info.backend_pid)
                conn.execute("INSERT INTO t VALUES (1)")
            done.set()

        monitor = _connect(replica.node_conninfo("node-a"))
        writer = threading.Thread(target=commit, daemon=True)
        with replica.lag():
            assert _on(replica, "node-b", "SELECT pg_get_wal_replay_pause_state()") == "paused"
            writer.start()
            # The COMMIT waits for the standby to apply it (wait event SyncRep).
            deadline = time.monotonic() + 30
            while True:
                waiting = writer_pid and monitor.execute(
                    "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", writer_pid
                ).fetchone() == ("SyncRep",)
                if waiting or time.monotonic() > deadline:
                    break
                time.sleep(0.01)
            assert waiting, "the COMMIT did not wait for the paused standby"
            assert not done.is_set()
            assert _values(replica.node_conninfo("node-b")) == []
        writer.join(30)
        monitor.close()
        assert done.is_set()
        assert _on(replica, "node-b", "SELECT pg_get_wal_replay_pause_state()") == "not paused"
        # remote_apply: acknowledged means visible on the standby.
        assert _values(replica.node_conninfo("node-b")) == [1]

        # The primary dies while a COMMIT waits for the paused standby: the client never
        # hears back, but the promotion replays what the standby had received.
        outcome: list[BaseException | None] = []

        def doomed_commit() -> None:
            try:
                with _connect(replica.conninfo()) as conn:
                    writer_pid[:] = [conn.info.backend_pid]
                    conn.execute("INSERT INTO t VALUES (2)")
                outcome.append(None)
            except psycopg.Error as exc:
                outcome.append(exc)

        writer_pid.clear()
        monitor = _connect(replica.node_conninfo("node-a"))
        doomed = threading.Thread(target=doomed_commit, daemon=True)
        with replica.lag():
            doomed.start()
            deadline = time.monotonic() + 30
            while not (writer_pid and monitor.execute(
                "SELECT wait_event FROM pg_stat_activity WHERE pid = %s", writer_pid
            ).fetchone() == ("SyncRep",)) and time.monotonic() < deadline:
                time.sleep(0.01)
            monitor.close()
            t = replica.failover(rejoin=False)
        doomed.join(30)
        assert t.to_node == "node-b"
        assert len(outcome) == 1
        assert isinstance(outcome[0], psycopg.OperationalError)
        assert _values(replica.conninfo()) == [1, 2]
        _print_logs(replica)


def test_async_cluster_lags_and_fails_over() -> None:
    with ReplicaCluster(synchronous=False) as replica:
        replica.start()
        assert _replication(replica) == [("node-b", "streaming", "async")]
        assert _on(replica, "node-a", "SHOW synchronous_standby_names") == ""
        with _connect(replica.conninfo()) as conn:
            conn.execute("CREATE TABLE t (v int)")
        replica.wait_synced()
        with replica.lag():
            with _connect(replica.conninfo()) as conn:
                conn.execute("INSERT INTO t VALUES (1)")
                lsn = _one(conn, "SELECT pg_current_wal_lsn()")
            # Received (and flushed) by the standby, but not replayed: not visible.
            deadline = time.monotonic() + 30
            query = f"SELECT pg_last_wal_receive_lsn() >= '{lsn}'::pg_lsn"
            while _on(replica, "node-b", query) is not True and time.monotonic() < deadline:
                time.sleep(0.01)
            assert _on(replica, "node-b", query) is True
            assert _values(replica.node_conninfo("node-b")) == []
            with pytest.raises(TimeoutError):
                replica.wait_synced(timeout=0.3)
        replica.wait_synced()
        assert _values(replica.node_conninfo("node-b")) == [1]

        t = replica.failover()

        assert t.down_at is not None
        assert t.accepting_at is not None
        assert t.streaming_at is not None
        assert t.down_at <= t.accepting_at <= t.streaming_at
        assert (replica.primary, replica.standby) == ("node-b", "node-a")
        assert _replication(replica) == [("node-a", "streaming", "async")]
        with _connect(replica.conninfo()) as conn:
            assert _one(conn, "SHOW cluster_name") == "node-b"
            conn.execute("INSERT INTO t VALUES (2)")
        replica.wait_synced()
        assert _values(replica.node_conninfo("node-a")) == [1, 2]
        _print_logs(replica)


def test_close_leaves_no_process_and_no_directory() -> None:
    replica = ReplicaCluster()
    replica.start()
    seen = _server_pids(replica)
    replica.failover()
    seen |= _server_pids(replica)
    dirs = [replica.dir] + [replica.server(n).log_path.parent for n in replica.nodes]
    assert all(d.exists() for d in dirs)
    assert len(seen) > 4

    replica.close()

    assert [p for p in seen if _alive(p)] == []
    assert [d for d in dirs if d.exists()] == []
    assert (replica.primary, replica.standby) == (None, None)
    replica.close()  # idempotent
    with pytest.raises(ServerError, match="closed"):
        replica.failover()


def test_bad_input_and_calls_out_of_order() -> None:
    with pytest.raises(ValueError, match="synchronous_commit"):
        ReplicaCluster(synchronous_commit="bogus")
    with pytest.raises(ValueError, match="synchronous_standby_names"):
        ReplicaCluster(settings={"synchronous_standby_names": "*"})
    with pytest.raises(ValueError, match="loopback"):
        ReplicaCluster(host="192.0.2.1")
    with ReplicaCluster() as replica:
        assert (replica.primary, replica.standby) == (None, None)
        for call in (replica.failover, replica.switchover, replica.rejoin, replica.wait_synced):
            with pytest.raises(ServerError, match=r"call start\(\) first"):
                call()
        with pytest.raises(ServerError, match=r"call start\(\) first"), replica.lag():
            pass
        with pytest.raises(ValueError, match="unknown node"):
            replica.server("node-c")


def test_password_cluster_authenticates_replication_and_rewind() -> None:
    secret = "s3cr:et\\ 'pw"
    with ReplicaCluster(password=secret) as replica:
        replica.start()
        replica.failover()
        assert replica.last_rejoin_method == "pg_rewind"
        assert _replication(replica) == [("node-a", "streaming", "sync")]
        with _connect(replica.conninfo()) as conn:
            assert _one(conn, "SHOW cluster_name") == "node-b"
        with pytest.raises(psycopg.OperationalError):
            _connect(replica.conninfo(password="wrong")).close()
        # The walreceiver reads a password file: the password is on no command line.
        for pid in _server_pids(replica):
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                assert secret.encode() not in f.read()


@pytest.mark.odbc
def test_psqlodbc_multi_host_string_finds_the_primary_on_the_second_host() -> None:
    pyodbc = pytest.importorskip("pyodbc")
    with ReplicaCluster() as replica:
        replica.start()
        replica.failover()  # node-b, the second host of the list, is the primary now
        odbc = replica.odbc_connection_string()
        assert "Port=" not in odbc  # psqlODBC would truncate two five-digit ports
        conn = pyodbc.connect(odbc, autocommit=True, timeout=10)
        try:
            cur = conn.cursor()
            node, port = cur.execute(
                "SELECT current_setting('cluster_name'), inet_server_port()"
            ).fetchone()
            assert (node, port) == ("node-b", replica.server("node-b").port)
            cur.execute("CREATE TABLE odbc_wrote (v int)")
        finally:
            conn.close()
        one = pyodbc.connect(replica.node_odbc_connection_string("node-a"), autocommit=True)
        try:
            row = one.cursor().execute("SELECT pg_is_in_recovery()").fetchone()
            assert row[0] in (True, 1, "1")
        finally:
            one.close()


@pytest.fixture
def after_teardown() -> Iterator[dict[str, object]]:
    """Set up before, so torn down after, the test's ``symfo_replica_cluster``: checks
    that the fixture's cluster left no process and no directory."""
    seen: dict[str, object] = {}
    yield seen
    pids = seen["pids"]
    assert isinstance(pids, set)
    assert [p for p in pids if _alive(p)] == []
    directory = seen["dir"]
    assert isinstance(directory, pathlib.Path)
    assert not directory.exists()


def test_the_fixture_cluster_is_closed_after_the_test(
    after_teardown: dict[str, object], symfo_replica_cluster: ReplicaCluster
) -> None:
    assert symfo_replica_cluster.synchronous
    assert symfo_replica_cluster.standby == "node-b"
    after_teardown["pids"] = _server_pids(symfo_replica_cluster)
    after_teardown["dir"] = symfo_replica_cluster.dir
    assert os.path.isdir(symfo_replica_cluster.dir)
