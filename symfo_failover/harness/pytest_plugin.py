"""pytest fixtures for testing an application's failover handling.

Installed with the package and loaded by pytest automatically (entry point
``pytest11``). Fixtures:

- ``symfo_cluster``: a started two-node cluster (``LocalCluster``, or
  ``ContainerCluster`` with ``--symfo-backend=container``);
- ``symfo_server``: a started single ``LocalServer``;
- ``symfo_proxy``: a started ``FaultProxy`` in front of ``symfo_cluster``'s access point;
- ``symfo_partition``: a ``Partition`` of ``symfo_cluster``'s access point, not yet
  started, healed at the end (skipped where a kernel partition cannot be made).

Each is function-scoped and leaves nothing behind, also when the test fails.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from ._cluster import BaseCluster, LocalCluster
from ._partition import Partition, partition_available
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

        ok, why = container_available()
        if not ok:
            pytest.skip(f"container backend unavailable: {why}")
        return ContainerCluster(**options)  # type: ignore[arg-type]
    raise ValueError(f"unknown backend {backend!r}; expected one of {', '.join(BACKENDS)}")


@pytest.fixture
def symfo_cluster(request: pytest.FixtureRequest) -> Iterator[BaseCluster]:
    """A two-node active/standby cluster, started on node-a."""
    with make_cluster(_backend(request.config)) as cluster:
        cluster.start()
        yield cluster


@pytest.fixture
def symfo_server() -> Iterator[LocalServer]:
    """A single throwaway PostgreSQL server, started."""
    with LocalServer() as server:
        server.start()
        yield server


@pytest.fixture
def symfo_proxy(symfo_cluster: BaseCluster) -> Iterator[FaultProxy]:
    """A fault proxy in front of the cluster's access point.

    Connect through it with ``symfo_cluster.conninfo(host=proxy.host, port=str(proxy.port))``.
    """
    from ._proxy import FaultProxy

    with FaultProxy(symfo_cluster.host, symfo_cluster.port) as proxy:  # started by `with`
        yield proxy


@pytest.fixture
def symfo_partition(symfo_cluster: BaseCluster) -> Iterator[Partition]:
    """A kernel partition of the cluster's access point; call ``.start()`` to cut."""
    ok, why = partition_available()
    if not ok:
        pytest.skip(why)
    partition = Partition(symfo_cluster.host, symfo_cluster.port)
    try:
        yield partition
    finally:
        partition.heal()
