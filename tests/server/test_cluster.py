"""The guide's scenarios on a two-node cluster, observed by real psycopg and pyodbc sessions.

Runs on the backend the plugin option picks (``--symfo-backend``), so the container
tier re-runs this file unchanged. The codes asserted are those of the conformance
tables (the guide's row for each driver); no message text is read.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from symfo_failover import Kind, classify, sqlstate_of
from symfo_failover import _conformance as conformance
from symfo_failover.harness import BaseCluster, NodeConflict, ServerError, probe

pytestmark = [pytest.mark.server, pytest.mark.odbc]

DRIVERS = conformance.DRIVERS
IN_PROGRESS = {
    "psycopg": {"57P01", None},
    "pyodbc": {"57P01", "08S01", "57P02"},
}


def _node(cluster: BaseCluster) -> str:
    import psycopg

    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        row = conn.execute("SHOW cluster_name").fetchone()
    assert row is not None
    return str(row[0])


def _write(cluster: BaseCluster, value: int) -> None:
    import psycopg

    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS shared_disk (v int)")
        conn.execute("INSERT INTO shared_disk VALUES (%s)", (value,))


def _values(cluster: BaseCluster) -> list[int]:
    import psycopg

    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        return [r[0] for r in conn.execute("SELECT v FROM shared_disk ORDER BY v")]


def _connect_error(driver: str) -> type[Exception]:
    """What a failed connect raises: each driver's own error class."""
    if driver == "psycopg":
        import psycopg

        return psycopg.OperationalError
    import pyodbc

    return pyodbc.OperationalError  # 08001


def _lost_during(cluster: BaseCluster, driver: str, fault: Any) -> BaseException:
    conn = conformance.connect(driver, cluster)
    try:
        raised = conformance.during_call(conn, cluster, fault)
        assert raised is not None, "the call survived the fault"
        failure = classify(raised, connection=conn)
        assert failure.kind is Kind.CONNECTION_LOST, failure
        assert sqlstate_of(raised) in IN_PROGRESS[driver], raised
        return raised
    finally:
        conformance.close_quietly(conn)


@pytest.mark.parametrize("driver", DRIVERS)
def test_switchover(symfo_cluster: BaseCluster, driver: str) -> None:
    assert _node(symfo_cluster) == "node-a"
    _write(symfo_cluster, 1)
    transitions = []
    raised = _lost_during(
        symfo_cluster, driver, lambda: transitions.append(symfo_cluster.switchover())
    )
    assert sqlstate_of(raised) == "57P01"  # an orderly shutdown, as the guide says
    (t,) = transitions
    assert (t.from_node, t.to_node) == ("node-a", "node-b")
    assert t.down_at is not None
    assert t.accepting_at is not None
    assert t.started_at <= t.down_at <= t.accepting_at
    assert symfo_cluster.active == "node-b"
    assert _node(symfo_cluster) == "node-b"
    assert _values(symfo_cluster) == [1]  # the same data: one shared disk


@pytest.mark.parametrize("driver", DRIVERS)
def test_node_down(symfo_cluster: BaseCluster, driver: str) -> None:
    _lost_during(symfo_cluster, driver, symfo_cluster.node_down)
    assert symfo_cluster.active is None
    assert probe(symfo_cluster.host, symfo_cluster.port).state == "refused"
    with pytest.raises(_connect_error(driver)) as info:
        conformance.connect(driver, symfo_cluster)
    assert classify(info.value).kind is Kind.CONNECT_FAILED
    symfo_cluster.start(symfo_cluster.standby)
    assert _node(symfo_cluster) == "node-b"


@pytest.mark.parametrize("driver", DRIVERS)
def test_crash(symfo_cluster: BaseCluster, driver: str) -> None:
    raised = _lost_during(symfo_cluster, driver, symfo_cluster.crash)
    if driver == "pyodbc":
        assert sqlstate_of(raised) == "57P02"  # the server reset every session
    assert symfo_cluster.active is None
    symfo_cluster.start()
    assert _node(symfo_cluster) == "node-a"  # restarted where it ran


def _phases(answers: list[str]) -> list[str]:
    """``answers`` with repeats folded: the states the access point went through, in order."""
    return [a for i, a in enumerate(answers) if i == 0 or answers[i - 1] != a]


def test_failover_windows_are_observable(symfo_cluster: BaseCluster) -> None:
    _write(symfo_cluster, 7)
    seen: list[tuple[float, float, str]] = []  # (probe began, probe ended, answer), in turn
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            began = time.monotonic()
            answer = str(probe(symfo_cluster.host, symfo_cluster.port))
            seen.append((began, time.monotonic(), answer))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        deadline = time.monotonic() + 10
        while not seen:  # the watcher has seen the old node accepting
            assert time.monotonic() < deadline, "no probe answered"
            time.sleep(0.01)
        t = symfo_cluster.failover(switch_delay=0.4, startup_delay=0.4)
        assert t.accepting_at is not None
        accepting_at = t.accepting_at
        # Some probes after the new node accepted, before the watcher stops.
        deadline = time.monotonic() + 10
        while sum(1 for b, _, _ in seen if b > accepting_at) < 3:
            assert time.monotonic() < deadline, "no probe after the failover"
            time.sleep(0.01)
    finally:
        stop.set()
        watcher.join(5)
    assert (t.from_node, t.to_node) == ("node-a", "node-b")
    assert t.down_at is not None
    assert t.listening_at is not None
    assert t.started_at <= t.down_at < t.listening_at < t.accepting_at
    # The guide's windows, in this order and no other: refused while switching ("access
    # while switching"), 57P03 while the new node starts, then accepting again.
    answers = [a for _, _, a in seen]
    assert _phases(answers) == ["accepting", "refused", "error 57P03", "accepting"], answers
    # Each change came after the step of the harness that makes it. (The harness notes
    # each moment just after it happened, so the order against the probes' own clock
    # holds only one way.)
    refused = answers.index("refused")
    starting = answers.index("error 57P03")
    back = answers.index("accepting", starting)
    assert seen[refused][1] > t.started_at  # the old node was killed after the start
    assert seen[starting][1] > t.down_at  # the new node was started after the kill
    assert seen[back][1] > t.listening_at  # and promoted after it was seen listening
    assert {a for b, _, a in seen if b > t.accepting_at} == {"accepting"}
    assert _values(symfo_cluster) == [7]


@pytest.mark.parametrize("driver", DRIVERS)
def test_connect_while_starting_is_a_connect_failure(
    symfo_cluster: BaseCluster, driver: str
) -> None:
    failures: list[BaseException] = []

    def during_startup() -> None:
        deadline = time.monotonic() + 10
        while probe(symfo_cluster.host, symfo_cluster.port).sqlstate != "57P03":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        try:
            conformance.connect(driver, symfo_cluster)
        except Exception as exc:
            failures.append(exc)

    thread = threading.Thread(target=during_startup)
    thread.start()
    symfo_cluster.failover(startup_delay=1.0)
    thread.join(10)
    (exc,) = failures
    assert classify(exc).kind is Kind.CONNECT_FAILED


def test_both_nodes_stop_and_start(symfo_cluster: BaseCluster) -> None:
    _write(symfo_cluster, 3)
    symfo_cluster.switchover()
    t = symfo_cluster.stop_both()
    assert t.from_node == "node-b"
    assert t.down_at is not None
    assert symfo_cluster.active is None
    assert probe(symfo_cluster.host, symfo_cluster.port).state == "refused"
    up = symfo_cluster.start()
    assert up.to_node == "node-b"  # maintenance brings back the node that ran last
    assert _values(symfo_cluster) == [3]


def test_the_nodes_never_run_together(symfo_cluster: BaseCluster) -> None:
    with pytest.raises(ServerError):
        symfo_cluster.start("node-b")  # node-a is running
    with pytest.raises(NodeConflict):
        symfo_cluster._begin("node-b")
    assert symfo_cluster.active == "node-a"
    assert _node(symfo_cluster) == "node-a"


def test_operations_need_a_running_node(symfo_cluster: BaseCluster) -> None:
    symfo_cluster.stop_both()
    for operation in (symfo_cluster.switchover, symfo_cluster.node_down, symfo_cluster.crash):
        with pytest.raises(ServerError, match="no node is running"):
            operation()
    with pytest.raises(ValueError, match="unknown node"):
        symfo_cluster.start("node-c")
    with pytest.raises(ValueError, match="negative"):
        symfo_cluster.failover(switch_delay=-1)
