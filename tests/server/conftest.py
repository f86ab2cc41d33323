"""Server fixtures: a shared running server and a fresh one per test."""

from __future__ import annotations

from collections.abc import Generator, Iterator

import psycopg
import pytest

from symfo_failover.harness import BaseCluster, LocalCluster, LocalServer, container_available
from symfo_failover.harness.pytest_plugin import make_cluster


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    if report.when == "call":
        item.stash[_FAILED] = report.failed
    return report


_FAILED = pytest.StashKey[bool]()


def _print_log_on_failure(request: pytest.FixtureRequest, srv: LocalServer) -> None:
    if request.node.stash.get(_FAILED, False):
        # Shown under "Captured stdout teardown" of the failed test.
        print(f"--- server log {srv.log_path} ---")
        print(srv.log_path.read_text(encoding="utf-8", errors="replace")[-5000:])


@pytest.fixture(scope="session")
def server() -> Iterator[LocalServer]:
    """One running server for the whole session; tests must leave it running."""
    with LocalServer() as srv:
        srv.start()
        yield srv


@pytest.fixture
def fresh_server(request: pytest.FixtureRequest) -> Iterator[LocalServer]:
    """A running server of its own, for tests that stop, kill or crash it."""
    with LocalServer() as srv:
        srv.start()
        yield srv
        _print_log_on_failure(request, srv)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    """A running two-node cluster of its own, with a ``ledger (id, amount)`` and a
    one-row ``counter (n)`` table (a module may define its own ``cluster``)."""
    with LocalCluster() as cl:
        cl.start()
        with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (id text, amount int)")
            conn.execute("CREATE TABLE counter (n int)")
            conn.execute("INSERT INTO counter VALUES (0)")
        yield cl


@pytest.fixture(
    params=["local", pytest.param("container", marks=pytest.mark.containers)],
)
def symfo_cluster(request: pytest.FixtureRequest) -> Iterator[BaseCluster]:
    """Our own suite runs every cluster scenario on both backends in one run.

    Overrides the plugin's fixture of the same name (which picks one backend by
    option); the container runs skip, with the reason, where Docker is not at hand.
    """
    backend = str(request.param)
    if backend == "container":
        ok, why = container_available()
        if not ok:
            pytest.skip(f"container backend: {why}")
    with make_cluster(backend) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture(autouse=True)
def _hooks_did_not_fail() -> Iterator[None]:
    """Fail a test whose event-hook actions raised (the library swallows them)."""
    try:
        from resilient_helpers import Recorder
    except ImportError:  # pragma: no cover - the helpers live beside this file
        yield
        return
    start = len(Recorder.made)
    yield
    failures = [f for rec in Recorder.made[start:] for f in rec.failures]
    del Recorder.made[start:]
    assert not failures, "an event hook's action failed:\n" + "\n".join(failures)
