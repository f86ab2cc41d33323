"""A failover test harness: real PostgreSQL servers and clusters on loopback, failed on demand.

- `LocalServer`: one throwaway server that can be stopped, killed and crashed.
- `LocalCluster` / `ContainerCluster`: the guide's active/standby cluster, two nodes on one
  shared data directory behind one access point, with the guide's scenarios.
- `ReplicaCluster`: a primary and a streaming standby (``pg_basebackup -R``), synchronous
  or not, each on its own port; failover (promotion, ``pg_rewind`` rejoin), switchover,
  replay lag; clients reach the primary with a multi-host connection string.
- `FaultProxy`: a PostgreSQL-aware proxy that cuts, delays, pauses and loses COMMIT replies.
- `Partition`: packets to the access point dropped in the kernel.
- pytest fixtures (`symfo_cluster`, `symfo_server`, `symfo_replica_cluster`, `symfo_proxy`,
  `symfo_partition`), loaded automatically from `symfo_failover.harness.pytest_plugin`.
"""

from .._probe import ProbeResult, probe
from ._binaries import ServerBinariesNotFound, find_bindir
from ._cluster import NODE_NAMES, BaseCluster, LocalCluster, NodeConflict, Transition
from ._containers import ContainerCluster, container_available
from ._partition import Partition, PartitionUnavailable, leftover_rules, partition_available
from ._proxy import FaultProxy, ProxyStats
from ._replica import ReplicaCluster
from ._server import LocalServer, ServerError

__all__ = [
    "NODE_NAMES",
    "BaseCluster",
    "ContainerCluster",
    "FaultProxy",
    "LocalCluster",
    "LocalServer",
    "NodeConflict",
    "Partition",
    "PartitionUnavailable",
    "ProbeResult",
    "ProxyStats",
    "ReplicaCluster",
    "ServerBinariesNotFound",
    "ServerError",
    "Transition",
    "container_available",
    "find_bindir",
    "leftover_rules",
    "partition_available",
    "probe",
]
