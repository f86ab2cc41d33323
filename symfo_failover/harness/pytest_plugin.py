"""pytest fixtures for testing an application's failover handling.

Installed with the package and loaded by pytest automatically (entry point
``pytest11``). Fixtures:

- ``symfo_cluster``: a started two-node cluster (``LocalCluster``, or
  ``ContainerCluster`` with ``--symfo-backend=container``);
- ``symfo_server``: a started single ``LocalServer``;
- ``symfo_replica_cluster``: a started ``ReplicaCluster``, a primary (node-a) and a
  synchronous streaming standby (node-b), on two loopback ports;
- ``symfo_proxy``: a started ``FaultProxy`` in front of ``symfo_cluster``'s access point;
- ``symfo_partition``: a ``Partition`` of ``symfo_cluster``'s access point, not yet
  started, healed at the end (skipped where a kernel partition cannot be made).

Each is function-scoped and leaves nothing behind, also when the test fails.

What each needs: the fixtures themselves use no database driver (the servers are
processes, the proxy and the partition are pure Python and iptables), but a test that
connects to them needs one: ``pip install 'symfo-failover[psycopg]'`` for psycopg, or
``[odbc]`` for pyodbc and psqlODBC. The container backend needs
``pip install 'symfo-failover[containers]'`` and a Docker engine; without them
``symfo_cluster`` skips, naming what is missing. The local backend needs the PostgreSQL
server binaries (``SYMFO_PG_BINDIR``, ``pg_config``, ``PATH`` or
``/usr/lib/postgresql/*/bin``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from ._cluster import BaseCluster, LocalCluster
from ._partition import Partition, partition_available
from ._replica import ReplicaCluster
from ._server import LocalServer

if TYPE_CHECKING:
    from ._proxy import FaultProxy

BACKENDS = ("local", "container")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("symfo-failover", "symfo_failover failover harness")
    group.addoption(
        "--symfo-backend",
        choices=BACKENDS,
        default=None,
        help="cluster backend for the symfo_cluster fixture: local server processes "
        "(default) or containers (needs a Docker engine). Env: SYMFO_HARNESS_BACKEND.",
    )


def _backend(config: pytest.Config) -> str:
    chosen = config.getoption("--symfo-backend", default=None)
    value = str(chosen or os.environ.get("SYMFO_HARNESS_BACKEND") or "local")
    if value not in BACKENDS:
        raise pytest.UsageError(
            f"SYMFO_HARNESS_BACKEND={value!r}: expected one of {', '.join(BACKENDS)}"
        )
    return value


def make_cluster(backend: str = "local", **options: object) -> BaseCluster:
    """A new, not yet started, cluster of the given backend."""
    if backend == "local":
        return LocalCluster(**options)  # type: ignore[arg-type]
    if backend == "container":
        from ._containers import ContainerCluster, container_available

        _require_containers_extra()
        ok, why = container_available()
        if not ok:
            pytest.skip(f"container backend unavailable: {why}")
        return ContainerCluster(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


def _require_containers_extra() -> None:
    """Skip, naming the extra, when the container backend's packages are missing."""
    try:
        import testcontainers.core.container  # noqa: F401
    except ImportError as exc:
        pytest.skip(
            "the container backend needs the 'containers' extra: "
            f"pip install 'symfo-failover[containers]' ({exc})"
        )


@pytest.fixture
def symfo_cluster(request: pytest.FixtureRequest) -> Iterator[BaseCluster]:
    """A two-node active/standby cluster, started on node-a.

    Connect with ``symfo_cluster.conninfo()`` (psycopg: needs
    ``pip install 'symfo-failover[psycopg]'``) or ``symfo_cluster.odbc_connection_string()``
    (pyodbc: ``pip install 'symfo-failover[odbc]'`` and psqlODBC). With
    ``--symfo-backend=container`` it needs ``pip install 'symfo-failover[containers]'``
    and a Docker engine, and skips, saying which is missing, without them.
    """
    with make_cluster(_backend(request.config)) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture
def symfo_server() -> Iterator[LocalServer]:
    """A single throwaway PostgreSQL server, started (always a local process).

    Connect with ``symfo_server.conninfo()`` (psycopg: needs
    ``pip install 'symfo-failover[psycopg]'``) or ``odbc_connection_string()``
    (``pip install 'symfo-failover[odbc]'``).
    """
    with LocalServer() as server:
        server.start()
        yield server


@pytest.fixture
def symfo_replica_cluster() -> Iterator[ReplicaCluster]:
    """A primary (node-a) and a synchronous streaming standby (node-b), started.

    Always local processes (``--symfo-backend`` does not apply). Connect with
    ``symfo_replica_cluster.conninfo()``, libpq's multi-host string that lands on the
    primary (psycopg: needs ``pip install 'symfo-failover[psycopg]'``), or
    ``odbc_connection_string()`` (``pip install 'symfo-failover[odbc]'``). For other
    options (asynchronous, ``synchronous_commit``), use ``ReplicaCluster`` directly.
    """
    with ReplicaCluster() as cluster:
        cluster.start()
        yield cluster


@pytest.fixture
def symfo_proxy(symfo_cluster: BaseCluster) -> Iterator[FaultProxy]:
    """A fault proxy in front of the cluster's access point.

    Connect through it with ``symfo_cluster.conninfo(host=proxy.host, port=str(proxy.port))``
    (psycopg: needs ``pip install 'symfo-failover[psycopg]'``; or ``[odbc]``). The proxy
    itself is pure Python; what ``symfo_cluster`` needs, it needs too.
    """
    from ._proxy import FaultProxy

    with FaultProxy(symfo_cluster.host, symfo_cluster.port) as proxy:  # started by `with`
        yield proxy


@pytest.fixture
def symfo_partition(symfo_cluster: BaseCluster) -> Iterator[Partition]:
    """A kernel partition of the cluster's access point; call ``.start()`` to cut.

    Needs root and ``iptables`` (no extra); skips, saying why, without them. A test
    that connects across it needs a driver: ``pip install 'symfo-failover[psycopg]'``
    (or ``[odbc]``).
    """
    ok, why = partition_available()
    if not ok:
        pytest.skip(why)
    partition = Partition(symfo_cluster.host, symfo_cluster.port)
    try:
        yield partition
    finally:
        partition.heal()
