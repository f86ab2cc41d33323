"""An active/standby cluster like the vendor guide's: two nodes, one shared data directory.

Both nodes run the server on the same data directory and the same port of the same
address, never both at once, so the address itself is the client access point: it
reaches whichever node is active, and refuses connections while none is (exactly what
a cluster IP address that moves to the active node does). The scenarios are written
once, in `BaseCluster`, over a handful of node primitives; `LocalCluster` implements
them with server processes, `ContainerCluster` with containers.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import os
import shutil
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

from ._binaries import find_bindir
from ._server import (
    LocalServer,
    ServerError,
    _chown_tree,
    _free_port,
    _resolve_os_user,
    _workspace,
)

StopMode = Literal["fast", "immediate", "smart"]
NODE_NAMES: tuple[str, str] = ("node-a", "node-b")


class NodeConflict(ServerError):
    """Both nodes would run on the shared data directory at once: refused."""


@dataclass(frozen=True)
class Transition:
    """What the cluster did, with ``time.monotonic()`` timestamps.

    ``down_at``: the old server was gone (killed, stopped or crashed).
    ``listening_at``: the new node's server listened but did not yet accept sessions
    (clients got 57P03); set by `BaseCluster.failover` with a startup delay.
    ``accepting_at``: the access point accepted sessions again (None: left down).
    ``streaming_at``: a streaming-replica cluster only (`ReplicaCluster`): its standby
    streamed from the primary again (None: no standby, or not that kind of cluster).
    """

    scenario: str
    from_node: str | None
    to_node: str | None
    started_at: float
    down_at: float | None = None
    listening_at: float | None = None
    accepting_at: float | None = None
    streaming_at: float | None = None

    @property
    def downtime(self) -> float | None:
        """Seconds from going down to accepting again, when both happened."""
        if self.down_at is None or self.accepting_at is None:
            return None
        return self.accepting_at - self.down_at


class _NodeGuard:
    """An exclusive lock on the shared data directory, held while a node runs.

    A file lock (not only a flag) so that a second cluster object, or another process,
    pointed at the same directory is refused as well.
    """

    def __init__(self, path: Path) -> None:
        self._path = path
        self._fd: int | None = None
        self.holder: str | None = None

    def acquire(self, node: str) -> None:
        if self._fd is not None:
            raise NodeConflict(
                f"{self.holder} still holds the shared data directory; {node} must not start"
            )
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise NodeConflict(
                f"another process runs a node on {self._path.parent}; {node} must not start"
            ) from None
        self._fd, self.holder = fd, node

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
        self._fd, self.holder = None, None


class BaseCluster(abc.ABC):
    """The guide's scenarios over node primitives. Subclasses provide the nodes.

    The node primitives are called with the cluster's lock held; the scenarios keep
    the invariant that at most one node runs.
    """

    host: str
    port: int
    nodes: tuple[str, str] = NODE_NAMES

    def __init__(self, guard_path: Path, *, sleep: Callable[[float], None] = time.sleep) -> None:
        self._guard = _NodeGuard(guard_path)
        self._lock = threading.RLock()
        self._active: str | None = None
        self._preferred: str = self.nodes[0]
        self._sleep = sleep

    # --- node primitives -------------------------------------------------------------

    @abc.abstractmethod
    def _node_start(self, node: str, *, hold_in_recovery: bool) -> float:
        """Start the server on ``node``; return when it accepts (or, held, listens)."""

    @abc.abstractmethod
    def _node_promote(self, node: str) -> float:
        """End a held start; return when the node accepts sessions."""

    @abc.abstractmethod
    def _node_stop(self, node: str, mode: StopMode) -> float:
        """Shut the node's server down; return when every server process is gone."""

    @abc.abstractmethod
    def _node_kill(self, node: str) -> float:
        """SIGKILL the node's server processes (the node vanished); return the kill time."""

    @abc.abstractmethod
    def _node_crash(self, node: str) -> float:
        """Kill one server process so that the server resets every session and stops
        (restart_after_crash is off); return when it has stopped."""

    @abc.abstractmethod
    def _node_running(self, node: str) -> bool:
        """Whether any server process of the node is alive."""

    @abc.abstractmethod
    def conninfo(self, dbname: str = "postgres", **extra: str) -> str:
        """A libpq connection string for the access point."""

    @abc.abstractmethod
    def odbc_connection_string(self, database: str = "postgres", **extra: str) -> str:
        """An ODBC connection string (psqlODBC) for the access point."""

    @abc.abstractmethod
    def _close_nodes(self) -> None:
        """Stop and remove everything the nodes use."""

    # --- state -----------------------------------------------------------------------

    @property
    def active(self) -> str | None:
        """The node whose server runs now, or None."""
        return self._active

    @property
    def standby(self) -> str:
        """The node that would take over next."""
        current = self._active or self._preferred
        return self.nodes[1] if current == self.nodes[0] else self.nodes[0]

    def _begin(self, node: str, *, hold_in_recovery: bool = False) -> float:
        other = self.nodes[1] if node == self.nodes[0] else self.nodes[0]
        if self._node_running(other):
            raise NodeConflict(f"{other} is still running; {node} must not start")
        self._guard.acquire(node)
        try:
            at = self._node_start(node, hold_in_recovery=hold_in_recovery)
        except BaseException:
            with contextlib.suppress(Exception):
                self._node_kill(node)
            self._guard.release()
            raise
        self._active = self._preferred = node
        return at

    def _ended(self) -> None:
        self._active = None
        self._guard.release()

    def _require_active(self) -> str:
        if self._active is None:
            raise ServerError("no node is running; call start() first")
        return self._active

    # --- the guide's scenarios -------------------------------------------------------

    def start(self, node: str | None = None) -> Transition:
        """Start the cluster on ``node`` (default: the node that ran last, else node-a)."""
        with self._lock:
            if self._active is not None:
                raise ServerError(f"{self._active} is already running")
            target = node or self._preferred
            if target not in self.nodes:
                raise ValueError(f"unknown node {target!r}; the nodes are {self.nodes}")
            t0 = time.monotonic()
            up = self._begin(target)
            return Transition("start", None, target, t0, accepting_at=up)

    def stop_both(self, mode: StopMode = "fast") -> Transition:
        """Both-nodes maintenance (guide 4.3.1): the active node's server shuts down."""
        with self._lock:
            t0 = time.monotonic()
            node = self._active
            down = self._node_stop(node, mode) if node is not None else t0
            self._ended()
            return Transition("stop_both", node, None, t0, down_at=down)

    def switchover(self) -> Transition:
        """Orderly switch: fast shutdown on the active node, start on the other."""
        with self._lock:
            old = self._require_active()
            new = self.standby
            t0 = time.monotonic()
            down = self._node_stop(old, "fast")
            self._ended()
            up = self._begin(new)
            return Transition("switchover", old, new, t0, down_at=down, accepting_at=up)

    def node_down(self) -> Transition:
        """The active node vanishes (SIGKILL of its server processes); nothing takes over."""
        with self._lock:
            old = self._require_active()
            t0 = time.monotonic()
            down = self._node_kill(old)
            self._ended()
            return Transition("node_down", old, None, t0, down_at=down)

    def crash(self) -> Transition:
        """One server process dies; the server resets every session (57P02) and stops."""
        with self._lock:
            old = self._require_active()
            t0 = time.monotonic()
            down = self._node_crash(old)
            self._ended()
            return Transition("crash", old, None, t0, down_at=down)

    def failover(self, *, switch_delay: float = 0.0, startup_delay: float = 0.0) -> Transition:
        """The active node goes down and the standby takes over.

        ``switch_delay``: seconds with no node at all (clients: connection refused,
        the guide's "access while switching"). ``startup_delay``: seconds during which
        the new node's server listens but is still starting (clients: 57P03).
        """
        if switch_delay < 0 or startup_delay < 0:
            raise ValueError("delays must not be negative")
        with self._lock:
            old = self._require_active()
            new = self.standby
            t0 = time.monotonic()
            down = self._node_kill(old)
            self._ended()
            if switch_delay:
                self._sleep(switch_delay)
            if startup_delay:
                listening = self._begin(new, hold_in_recovery=True)
                self._sleep(startup_delay)
                up = self._node_promote(new)
            else:
                listening = None
                up = self._begin(new)
            return Transition(
                "failover", old, new, t0, down_at=down, listening_at=listening, accepting_at=up
            )

    # --- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        """Stop every node and remove what the cluster made. Idempotent."""
        with self._lock:
            try:
                self._close_nodes()
            finally:
                self._ended()

    def __enter__(self) -> BaseCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LocalCluster(BaseCluster):
    """Two server processes ("nodes") on one shared data directory, one access point.

    The access point is ``host:port``; each node's server listens there while it is
    active. ``SHOW cluster_name`` tells a session which node served it.
    """

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        lc_messages: str | None = None,
        password: str | None = None,
        os_user: str | None = None,
    ) -> None:
        user = _resolve_os_user(os_user)
        resolved_bindir = find_bindir(bindir)
        self.host = host
        self.port = port if port is not None else _free_port(host)
        self.shared_dir = _workspace.new_dir("cluster-", user)
        self.data_dir = self.shared_dir / "data"
        template = _workspace.template(resolved_bindir, user, password)
        shutil.copytree(template, self.data_dir, symlinks=True)
        _chown_tree(self.data_dir, user)
        super().__init__(self.shared_dir / "active-node.lock")
        self.servers: dict[str, LocalServer] = {}
        try:
            for name in self.nodes:
                self.servers[name] = LocalServer(
                    bindir=resolved_bindir,
                    host=host,
                    port=self.port,
                    data_dir=self.data_dir,
                    settings={**dict(settings or {}), "cluster_name": name},
                    lc_messages=lc_messages,
                    restart_after_crash=False,
                    os_user=os_user,
                    password=password,
                )
        except BaseException:
            self._close_nodes()
            raise

    def __repr__(self) -> str:
        return f"<LocalCluster {self.host}:{self.port} active={self._active}>"

    def conninfo(self, dbname: str = "postgres", **extra: str) -> str:
        return self.servers[self.nodes[0]].conninfo(dbname, **extra)

    def odbc_connection_string(self, database: str = "postgres", **extra: str) -> str:
        return self.servers[self.nodes[0]].odbc_connection_string(database, **extra)

    def server(self, node: str) -> LocalServer:
        """The `LocalServer` of one node (its log, its processes)."""
        return self.servers[node]

    def _node_start(self, node: str, *, hold_in_recovery: bool) -> float:
        return self.servers[node].start(hold_in_recovery=hold_in_recovery)

    def _node_promote(self, node: str) -> float:
        return self.servers[node].promote()

    def _node_stop(self, node: str, mode: StopMode) -> float:
        return self.servers[node].stop(mode)

    def _node_kill(self, node: str) -> float:
        return self.servers[node].kill_postmaster()

    def _node_crash(self, node: str) -> float:
        srv = self.servers[node]
        victim = _crash_victim(srv)
        srv.kill_backend(victim)
        return srv.wait_stopped()

    def _node_running(self, node: str) -> bool:
        srv = self.servers.get(node)
        return srv is not None and srv.running

    def _close_nodes(self) -> None:
        for srv in self.servers.values():
            with contextlib.suppress(Exception):
                srv.close()
        shutil.rmtree(self.shared_dir, ignore_errors=True)


_VICTIMS = ("walwriter", "background writer", "checkpointer")


def _crash_victim(srv: LocalServer) -> int:
    """A server process whose death makes PostgreSQL reset every session.

    An auxiliary process, not a client backend: then every client session sees the
    reset (57P02), none sees its own backend die, and no session has to exist.
    """
    ranked: list[tuple[int, int]] = []
    for pid in srv.backend_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                title = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        for rank, name in enumerate(_VICTIMS):
            if name in title:
                ranked.append((rank, pid))
    if not ranked:
        raise ServerError(f"{srv!r} has no auxiliary server process to kill")
    return min(ranked)[1]
