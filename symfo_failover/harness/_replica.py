"""A streaming-replica cluster: a primary and a ``pg_basebackup -R`` standby on loopback.

This is the topology of Fujitsu Enterprise Postgres's Mirroring Controller and of
Patroni-style clusters: two nodes, each with its own data directory and its own port,
the standby streaming the primary's WAL, synchronously or not. There is no shared
access address: clients list both nodes (libpq's multi-host string with
``target_session_attrs=read-write``) and find the primary themselves.

The cluster itself uses no database driver: it runs PostgreSQL's own programs
(``pg_basebackup``, ``pg_rewind``, ``pg_ctl``, ``psql``) and reads ``postmaster.pid`` and
``global/pg_control``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType

from ._binaries import find_bindir
from ._cluster import NODE_NAMES, Transition
from ._reaper import kill_groups, reaper
from ._server import (
    _DEFAULT_SETTINGS,
    _SUPERUSER,
    LocalServer,
    ServerError,
    _check_loopback,
    _chown_tree,
    _conninfo_quote,
    _free_port,
    _odbc_quote,
    _popen_identity,
    _resolve_os_user,
    _server_env,
    _workspace,
)

__all__ = ["SYNCHRONOUS_COMMIT_VALUES", "ReplicaCluster"]

SYNCHRONOUS_COMMIT_VALUES: tuple[str, ...] = ("on", "remote_apply", "remote_write", "local", "off")
# Settings the cluster sets itself, per node and per role; passing them is refused.
_MANAGED_SETTINGS = frozenset(
    {
        "cluster_name",
        "hot_standby",
        "listen_addresses",
        "port",
        "primary_conninfo",
        "primary_slot_name",
        "synchronous_commit",
        "synchronous_standby_names",
        "wal_log_hints",
    }
)
_TOOLS = ("pg_basebackup", "pg_rewind", "pg_ctl", "psql")
_TOOL_TIMEOUT = 120.0
_SQL_TIMEOUT = 60.0
_STREAM_TIMEOUT = 30.0
_AUTO_CONF = "postgresql.auto.conf"
# Settings of both nodes, in the shared postgresql.conf as well as on the command line
# (see _init_first_primary); ``settings`` may override the last two.
_CLUSTER_SETTINGS = {
    # pg_rewind needs hint-bit changes WAL-logged (or data checksums).
    "wal_log_hints": "on",
    # pg_rewind reads the killed node's WAL back to the last common checkpoint.
    "wal_keep_size": "128MB",
    # PostgreSQL 15's startup process can see a promote request and still sleep out this
    # interval (default 5 s) when its walreceiver has just died with the primary.
    "wal_retrieve_retry_interval": "50ms",
}
# The timeline of the server's last checkpoint and its current one (from its WAL file).
_CHECKPOINT_TIMELINE_CURRENT = (
    "SELECT (pg_control_checkpoint()).timeline_id = "
    "('x' || substr(pg_walfile_name(pg_current_wal_lsn()), 1, 8))::bit(32)::int"
)


def _other(node: str) -> str:
    return NODE_NAMES[1] if node == NODE_NAMES[0] else NODE_NAMES[0]


def _pgpass_quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace(":", "\\:")


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _conf_literal(value: str) -> str:
    """A quoted value for postgresql.conf, where a backslash starts an escape."""
    return "'" + value.replace("\\", "\\\\").replace("'", "''") + "'"


_open_clusters: set[ReplicaCluster] = set()
_open_lock = threading.Lock()


def _close_all_at_exit() -> None:
    with _open_lock:
        clusters = list(_open_clusters)
    for cluster in clusters:
        with contextlib.suppress(Exception):
            cluster.close()


# Registered after _server's handler (imported above), so it runs before it: the
# clusters stop their servers and remove their directories before the workspace goes.
atexit.register(_close_all_at_exit)


class ReplicaCluster:
    """A primary and a streaming standby, two local servers on two loopback ports.

    ``start()`` starts node-a as the primary (from the same initdb template as
    `LocalServer`) and makes node-b its standby with ``pg_basebackup -R``. With
    ``synchronous`` (the default) the primary's ``synchronous_standby_names`` names the
    standby, so a COMMIT waits for it as ``synchronous_commit`` says (a server setting of
    both nodes: ``on``, ``remote_apply``, ``remote_write``, ``local`` or ``off``).
    Each node's ``cluster_name`` and replication ``application_name`` is its name.

    The scenarios (`failover`, `switchover`, `rejoin`) return a `Transition` with
    ``time.monotonic()`` timestamps; `lag` pauses the standby's replay. Connect with
    `conninfo` (libpq multi-host, lands on whichever node is primary) or
    `node_conninfo` (one node). `close` (also at exit) stops everything and removes the
    directories; the reaper's watchdog does it even if the process is SIGKILLed.
    """

    nodes: tuple[str, str] = NODE_NAMES

    def __init__(
        self,
        *,
        synchronous: bool = True,
        synchronous_commit: str = "on",
        bindir: str | os.PathLike[str] | None = None,
        host: str = "127.0.0.1",
        settings: Mapping[str, str] | None = None,
        password: str | None = None,
        os_user: str | None = None,
        lc_messages: str | None = None,
    ) -> None:
        _check_loopback(host)
        if synchronous_commit not in SYNCHRONOUS_COMMIT_VALUES:
            raise ValueError(
                f"synchronous_commit={synchronous_commit!r}: expected one of "
                f"{', '.join(SYNCHRONOUS_COMMIT_VALUES)}"
            )
        clash = sorted(set(settings or {}) & _MANAGED_SETTINGS)
        if clash:
            raise ValueError(
                f"the cluster sets {', '.join(clash)} itself; use synchronous= and "
                "synchronous_commit= instead of passing them in settings"
            )
        if password is not None and ("\n" in password or not password):
            raise ValueError("the password must be a non-empty single line")
        self.synchronous = synchronous
        self.synchronous_commit = synchronous_commit
        self.host = host
        self.user = _SUPERUSER
        self.password = password
        self.bindir = find_bindir(bindir)
        missing = [t for t in _TOOLS if not os.access(self.bindir / t, os.X_OK)]
        if missing:
            raise ServerError(
                f"{self.bindir} lacks {', '.join(missing)}, which a replica cluster needs "
                "(Debian/Ubuntu: the postgresql-client package of the same version)"
            )
        self._os_user = _resolve_os_user(os_user)
        self._settings = dict(settings or {})
        self._lock = threading.RLock()
        self._primary: str | None = None
        self._standby: str | None = None
        # What each node's postgresql.auto.conf says for synchronous_standby_names.
        self._sync_names: dict[str, str] = {}
        self._started = False
        self._closed = False
        # The standby whose replay lag() paused.
        self._paused: str | None = None
        self.last_rejoin_method: str | None = None
        """How the last rejoin brought the old primary back: "pg_rewind" or
        "pg_basebackup" (the fallback when pg_rewind failed)."""
        self.last_rejoin_output = ""
        """What pg_rewind (and any fallback) printed during the last rejoin."""
        self.servers: dict[str, LocalServer] = {}
        """The `LocalServer` of each node (also `server(node)`)."""
        self.dir = _workspace.new_dir("replica-", self._os_user)
        """The cluster's directory: each node's data directory (``dir / node``) and the
        password file. Removed by `close`."""
        try:
            self._passfile: Path | None = None
            if password is not None:
                # For the walreceiver, pg_basebackup, pg_rewind and psql: the password
                # stays off every command line.
                self._passfile = self.dir / "pgpass"
                fd = os.open(self._passfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "w", encoding="utf-8") as f:
                    f.write(f"*:*:*:{_pgpass_quote(self.user)}:{_pgpass_quote(password)}\n")
                _chown_tree(self._passfile, self._os_user)
            for node in self.nodes:
                self.servers[node] = LocalServer(
                    bindir=self.bindir,
                    host=host,
                    data_dir=self.dir / node,
                    settings=self._node_settings(node, upstream=None),
                    lc_messages=lc_messages,
                    restart_after_crash=False,
                    os_user=os_user,
                    password=password,
                )
            a, b = (self.servers[n] for n in self.nodes)
            while b.port == a.port:
                b.port = _free_port(host)
        except BaseException:
            self._close_everything()
            raise
        with _open_lock:
            _open_clusters.add(self)

    def __repr__(self) -> str:
        ports = ",".join(str(self.servers[n].port) for n in self.nodes if n in self.servers)
        return (
            f"<ReplicaCluster {self.host}:{ports} primary={self._primary} "
            f"standby={self._standby} {'sync' if self.synchronous else 'async'}>"
        )

    # --- state -----------------------------------------------------------------------

    @property
    def primary(self) -> str | None:
        """The node that is primary now (None before `start` and after `close`)."""
        return self._primary

    @property
    def standby(self) -> str | None:
        """The node streaming from the primary, or None when there is none."""
        return self._standby

    def server(self, node: str) -> LocalServer:
        """The `LocalServer` of one node (its port, log, processes)."""
        try:
            return self.servers[node]
        except KeyError:
            raise ValueError(f"unknown node {node!r}; the nodes are {self.nodes}") from None

    # --- addresses -------------------------------------------------------------------

    def conninfo(self, dbname: str = "postgres", **extra: str) -> str:
        """libpq's multi-host access point: both nodes, ``target_session_attrs=read-write``.

        libpq (and psycopg) try the hosts in order and keep the first session that is
        not read-only, so it lands on whichever node is primary. ``extra`` adds or
        overrides parameters (e.g. ``target_session_attrs="any"``).
        """
        params = {
            "host": ",".join(self.host for _ in self.nodes),
            "port": ",".join(str(self.servers[n].port) for n in self.nodes),
            "user": self.user,
            "dbname": dbname,
            "target_session_attrs": "read-write",
        }
        if self.password is not None:
            params["password"] = self.password
        params.update(extra)
        return " ".join(f"{k}={_conninfo_quote(str(v))}" for k, v in params.items())

    def node_conninfo(self, node: str, dbname: str = "postgres", **extra: str) -> str:
        """A libpq connection string for one node, whatever its role."""
        return self.server(node).conninfo(dbname, **extra)

    def odbc_connection_string(self, database: str = "postgres", **extra: str) -> str:
        """psqlODBC's equivalent of `conninfo`: both hosts in ``Server``, and the ports and
        ``target_session_attrs=read-write`` in ``pqopt={...}``, with no ``Port`` keyword.

        psqlODBC (13.02 measured) hands ``Server``, ``Port`` and the ``pqopt`` parameters
        to libpq as they are, so libpq's multi-host search picks the primary. But it keeps
        ``Port`` in a 10-byte field: ``Port=p1,p2`` with two five-digit ports is cut to 9
        characters (the second port becomes a wrong one), and a ``port`` in ``pqopt`` that
        differs from ``Port`` is refused as a conflict; so the ports go in ``pqopt`` only.
        ``extra`` adds or overrides keywords (a ``pqopt`` of your own replaces this one).
        """
        libpq = (
            "port=" + ",".join(str(self.servers[n].port) for n in self.nodes)
            + " target_session_attrs=read-write"
        )
        params = {
            "Driver": "{PostgreSQL Unicode}",
            "Server": ",".join(self.host for _ in self.nodes),
            "Database": _odbc_quote(database),
            "Uid": _odbc_quote(self.user),
        }
        if self.password is not None:
            params["Pwd"] = _odbc_quote(self.password)
        params["pqopt"] = _odbc_quote(libpq)
        params.update({k: _odbc_quote(str(v)) for k, v in extra.items()})
        return "".join(f"{k}={v};" for k, v in params.items())

    def node_odbc_connection_string(
        self, node: str, database: str = "postgres", **extra: str
    ) -> str:
        """A psqlODBC connection string for one node, whatever its role."""
        return self.server(node).odbc_connection_string(database, **extra)

    # --- the scenarios ---------------------------------------------------------------

    def start(self) -> Transition:
        """Primary up on node-a, node-b made its standby with ``pg_basebackup -R``.

        Returns when the standby streams (and, when synchronous, is the primary's
        synchronous standby): ``accepting_at`` is when the primary accepted sessions,
        ``streaming_at`` when the standby streamed.
        """
        with self._lock:
            self._check_open()
            if self._started:
                raise ServerError(f"{self!r} was already started")
            self._started = True
            first, second = self.nodes
            t0 = time.monotonic()
            self._init_first_primary(first)
            up = self._start_node(first, upstream=None)
            self._primary = first
            self._base_backup(second, source=first)
            streaming = self._start_standby(second)
            return Transition("start", None, first, t0, accepting_at=up, streaming_at=streaming)

    def failover(self, *, rejoin: bool = True) -> Transition:
        """The primary's postmaster is SIGKILLed (``down_at``) and the standby promoted.

        ``accepting_at``: the promoted server accepts read-write sessions (its control
        file says "in production", which PostgreSQL writes just after recovery ended:
        ``pg_is_in_recovery()`` is false from then on).

        With ``rejoin`` the old primary then comes back as a standby of the new one
        (``pg_rewind``, else a fresh ``pg_basebackup``) and streams (``streaming_at``); in
        synchronous mode the new primary requires it as its synchronous standby from the
        promotion on, so a COMMIT in between waits for the rejoin. Without ``rejoin`` the
        old primary stays down and, in synchronous mode, the new primary's
        ``synchronous_standby_names`` is emptied first (so writes do not hang): the
        cluster runs unprotected until `rejoin`.
        """
        with self._lock:
            old, new = self._require_pair("failover")
            t0 = time.monotonic()
            if self.synchronous and not rejoin:
                self._set_sync_names(new, "")
            down = self.servers[old].kill_postmaster()
            self._primary = self._standby = None
            self._end_pause(new)
            accepting = self.servers[new].promote()
            self._primary = new
            streaming = self._rejoin(old) if rejoin else None
            return Transition(
                "failover", old, new, t0,
                down_at=down, accepting_at=accepting, streaming_at=streaming,
            )

    def switchover(self) -> Transition:
        """Fast shutdown of the primary (``down_at``), promotion of the standby
        (``accepting_at``), the old primary restarted as its standby (``streaming_at``)."""
        with self._lock:
            old, new = self._require_pair("switchover")
            t0 = time.monotonic()
            down = self.servers[old].stop("fast")
            self._primary = self._standby = None
            self._end_pause(new)
            accepting = self.servers[new].promote()
            self._primary = new
            streaming = self._rejoin(old)
            return Transition(
                "switchover", old, new, t0,
                down_at=down, accepting_at=accepting, streaming_at=streaming,
            )

    def rejoin(self) -> float:
        """Bring the down old primary back as a standby of the primary.

        ``pg_rewind`` first (a fresh ``pg_basebackup`` if it fails); in synchronous mode
        the primary requires it as its synchronous standby again once it streams.
        Returns the ``time.monotonic()`` at which it streams (and is in sync).
        """
        with self._lock:
            self._check_started("rejoin")
            primary = self._primary
            if primary is None:
                raise ServerError(f"{self!r} has no primary to rejoin")
            if self._standby is not None:
                raise ServerError(
                    f"{self._standby} already streams from {primary}: nothing to rejoin"
                )
            return self._rejoin(_other(primary))

    @contextlib.contextmanager
    def lag(self) -> Iterator[None]:
        """Pause WAL replay on the standby while inside (``pg_wal_replay_pause()``).

        The standby still receives and flushes WAL, so ``synchronous_commit`` ``on`` and
        ``remote_write`` commits go through; ``remote_apply`` commits wait until the end
        of the block, and reads on the standby see nothing new meanwhile. Replay resumes
        on exit, or when a `failover` or `switchover` inside the block has killed or
        stopped the primary, just before the standby's promotion (which would replay
        what it received anyway, but sees the request only once a second while paused).
        """
        with self._lock:
            node = self._require_standby("lag")
            if self._paused is not None:
                raise ServerError(f"{node}'s replay is already paused by lag()")
            self._sql(node, "SELECT pg_wal_replay_pause()")
            self._paused = node
            deadline = time.monotonic() + _STREAM_TIMEOUT
            while self._sql(node, "SELECT pg_get_wal_replay_pause_state()") != "paused":
                if time.monotonic() > deadline:
                    raise ServerError(f"{node}'s replay did not pause")
                time.sleep(0.005)
        try:
            yield
        finally:
            with self._lock:
                if self._paused == node and self.servers[node].running:
                    self._sql(node, "SELECT pg_wal_replay_resume()")
                self._paused = None

    def wait_synced(self, timeout: float = 30) -> None:
        """Wait until the standby has replayed all the WAL the primary had written when
        called (``pg_current_wal_lsn()``). A COMMIT with ``synchronous_commit=off``
        reaches the WAL up to ``wal_writer_delay`` later. Raises ``TimeoutError``."""
        with self._lock:
            node = self._require_standby("wait_synced")
            assert self._primary is not None
            target = self._sql(self._primary, "SELECT pg_current_wal_lsn()")
            query = f"SELECT pg_last_wal_replay_lsn() >= {_sql_literal(target)}::pg_lsn"
            deadline = time.monotonic() + timeout
            while self._sql(node, query) != "t":
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"{node} had not replayed up to {target} after {timeout}s "
                        "(is replay paused by lag()?)"
                    )
                time.sleep(0.005)

    # --- life cycle ------------------------------------------------------------------

    def close(self) -> None:
        """Stop both servers and remove every directory of the cluster. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._primary = self._standby = None
            self._close_everything()

    def __enter__(self) -> ReplicaCluster:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals -------------------------------------------------------------------

    def _close_everything(self) -> None:
        try:
            for srv in self.servers.values():
                with contextlib.suppress(Exception):
                    srv.close()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)
            with _open_lock:
                _open_clusters.discard(self)

    def _check_open(self) -> None:
        if self._closed:
            raise ServerError(f"{self!r} is closed")

    def _check_started(self, what: str) -> None:
        self._check_open()
        if not self._started:
            raise ServerError(f"{what}() needs a started cluster: call start() first")

    def _require_pair(self, what: str) -> tuple[str, str]:
        self._check_started(what)
        if self._primary is None:
            raise ServerError(f"{what}() needs a primary, and {self!r} has none")
        if self._standby is None:
            raise ServerError(
                f"{what}() needs a standby, and {self._primary} has none: call rejoin() first"
            )
        return self._primary, self._standby

    def _require_standby(self, what: str) -> str:
        return self._require_pair(what)[1]

    def _end_pause(self, node: str) -> None:
        """Resume a paused replay before promoting: a paused standby notices a promote
        request only once a second, a merely lagging one at once. (Promotion would replay
        what was received anyway.)"""
        if self._paused == node:
            self._sql(node, "SELECT pg_wal_replay_resume()")
            self._paused = None

    def _data_dir(self, node: str) -> Path:
        return self.dir / node

    def _shared_settings(self) -> dict[str, str]:
        """The settings of both nodes, whatever their role."""
        return {
            **_CLUSTER_SETTINGS,
            **self._settings,
            "wal_log_hints": "on",
            "synchronous_commit": self.synchronous_commit,
        }

    def _node_settings(self, node: str, *, upstream: str | None) -> dict[str, str]:
        settings = {**self._shared_settings(), "cluster_name": node}
        if upstream is not None:
            params = {
                "host": self.host,
                "port": str(self.servers[upstream].port),
                "user": self.user,
                "application_name": node,
            }
            if self._passfile is not None:
                # The password stays out of the postmaster's command line.
                params["passfile"] = str(self._passfile)
            settings["primary_conninfo"] = " ".join(
                f"{k}={_conninfo_quote(v)}" for k, v in params.items()
            )
        return settings

    def _tool_env(self) -> dict[str, str]:
        env = _server_env()
        env["PGCONNECT_TIMEOUT"] = "10"
        if self._passfile is not None:
            env["PGPASSFILE"] = str(self._passfile)
        return env

    def _tool_conninfo(self, node: str) -> str:
        return (
            f"host={self.host} port={self.servers[node].port} user={self.user} "
            "dbname=postgres application_name=symfo-harness"
        )

    def _sql(self, node: str, query: str, *, timeout: float = _SQL_TIMEOUT) -> str:
        """Run one statement on ``node`` with psql; its unaligned output, stripped."""
        argv = [
            str(self.bindir / "psql"), "-X", "-A", "-t", "-q", "-v", "ON_ERROR_STOP=1",
            "-d", self._tool_conninfo(node), "-c", query,
        ]
        try:
            result = subprocess.run(
                argv, env=self._tool_env(), stdin=subprocess.DEVNULL, capture_output=True,
                text=True, timeout=timeout, check=False,
            )
        except subprocess.TimeoutExpired:
            raise ServerError(f"{query!r} on {node} took more than {timeout}s") from None
        if result.returncode != 0:
            raise ServerError(f"{query!r} on {node} failed: {result.stderr.strip()}")
        return result.stdout.strip()

    def _run_tool(self, argv: list[str], *, what: str) -> subprocess.CompletedProcess[str]:
        """Run a PostgreSQL program as the server's OS user, in its own process group
        watched by the reaper (pg_rewind runs a single-user ``postgres`` of its own)."""
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=self.dir,
            env=self._tool_env(),
            close_fds=True,
            start_new_session=True,
            **_popen_identity(self._os_user),
        )
        reaper().watch_process_group(proc.pid)
        try:
            try:
                out, _ = proc.communicate(timeout=_TOOL_TIMEOUT)
            except BaseException:
                kill_groups([proc.pid], timeout=10)
                proc.wait()
                raise
        except subprocess.TimeoutExpired:
            raise ServerError(f"{what} took more than {_TOOL_TIMEOUT}s") from None
        finally:
            with contextlib.suppress(RuntimeError):
                reaper().forget_process_group(proc.pid)
        return subprocess.CompletedProcess(argv, proc.returncode, out, "")

    def _init_first_primary(self, node: str) -> None:
        data = self._data_dir(node)
        template = _workspace.template(self.bindir, self._os_user, self.password)
        shutil.copytree(template, data, symlinks=True)
        _chown_tree(data, self._os_user)
        method = "trust" if self.password is None else "scram-sha-256"
        # The template's pg_hba.conf lets no replication connection in.
        with open(data / "pg_hba.conf", "a", encoding="utf-8") as f:
            f.write(
                f"host replication all 127.0.0.0/8 {method}\n"
                f"host replication all ::1/128 {method}\n"
            )
        # The settings in the file too, not only on the command line (pg_basebackup and
        # pg_rewind copy the file to the other node). pg_rewind's single-user crash
        # recovery of a killed node reads only the files: without wal_log_hints there it
        # records "off" in the control file, which pg_rewind then refuses; without
        # wal_keep_size its end-of-recovery checkpoint recycles the WAL segment holding
        # the last common checkpoint, which pg_rewind must read. And a reload (for
        # synchronous_standby_names) complains of a file that disagrees with the command
        # line about a restart-only setting (dynamic_shared_memory_type).
        shared = {**_DEFAULT_SETTINGS, **self._shared_settings()}
        with open(data / "postgresql.conf", "a", encoding="utf-8") as f:
            f.write("\n# written by symfo_failover.harness (ReplicaCluster)\n")
            f.writelines(f"{k} = {_conf_literal(v)}\n" for k, v in shared.items())
        self._write_sync_names(node, self._protected_sync_names(node))

    def _protected_sync_names(self, node: str) -> str:
        """``synchronous_standby_names`` of a node in a protected cluster: the other node
        (as a standby, it is what the node requires once promoted)."""
        return f'"{_other(node)}"' if self.synchronous else ""

    def _write_sync_names(self, node: str, value: str) -> None:
        """Set ``synchronous_standby_names`` in the node's postgresql.auto.conf (what
        ALTER SYSTEM writes; pg_basebackup and pg_rewind copy the source's file)."""
        path = self._data_dir(node) / _AUTO_CONF
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = [
                "# Do not edit this file manually!",
                "# It will be overwritten by the ALTER SYSTEM command.",
            ]
        kept = [ln for ln in lines if not ln.lstrip().startswith("synchronous_standby_names")]
        kept.append(f"synchronous_standby_names = {_conf_literal(value)}")
        tmp = path.with_name(_AUTO_CONF + ".symfo-tmp")
        tmp.write_text("\n".join(kept) + "\n", encoding="utf-8")
        tmp.chmod(0o600)
        _chown_tree(tmp, self._os_user)
        os.replace(tmp, path)
        self._sync_names[node] = value

    def _set_sync_names(self, node: str, value: str) -> None:
        """Write the setting and, if the node runs, reload it and wait until it shows."""
        self._write_sync_names(node, value)
        pid = self.servers[node].postmaster_pid
        if pid is None:
            return
        os.kill(pid, signal.SIGHUP)
        deadline = time.monotonic() + _STREAM_TIMEOUT
        while self._sql(node, "SHOW synchronous_standby_names") != value:
            if time.monotonic() > deadline:
                raise ServerError(f"{node} did not reload synchronous_standby_names={value!r}")
            time.sleep(0.005)

    def _start_node(self, node: str, *, upstream: str | None) -> float:
        srv = self.servers[node]
        srv.settings = self._node_settings(node, upstream=upstream)
        return srv.start(standby=upstream is not None)

    def _base_backup(self, node: str, *, source: str) -> None:
        data = self._data_dir(node)
        shutil.rmtree(data, ignore_errors=True)
        result = self._run_tool(
            [
                str(self.bindir / "pg_basebackup"),
                "-h", self.host, "-p", str(self.servers[source].port), "-U", self.user,
                "-D", str(data), "-R", "-X", "stream", "-c", "fast", "--no-sync", "-w",
            ],
            what="pg_basebackup",
        )
        if result.returncode != 0:
            raise ServerError(f"pg_basebackup from {source} failed:\n{result.stdout}")
        self._write_sync_names(node, self._protected_sync_names(node))

    def _start_standby(self, node: str) -> float:
        """Start ``node`` as a standby of the primary; return when it streams (and, if
        the primary names it, is its synchronous standby)."""
        primary = self._primary
        assert primary is not None
        self._start_node(node, upstream=primary)
        streaming = self._wait_streaming(node)
        if self.synchronous and self._sync_names.get(primary) != f'"{node}"':
            # After a failover without rejoin: protected again once it streams.
            self._set_sync_names(primary, f'"{node}"')
            streaming = self._wait_streaming(node)
        self._standby = node
        return streaming

    def _wait_streaming(self, node: str) -> float:
        primary = self._primary
        assert primary is not None
        want_sync = self._sync_names.get(primary) == f'"{node}"'
        query = (
            "SELECT state || ' ' || sync_state FROM pg_stat_replication "
            f"WHERE application_name = {_sql_literal(node)}"
        )
        want = "streaming sync" if want_sync else "streaming async"
        deadline = time.monotonic() + _STREAM_TIMEOUT
        while True:
            seen = self._sql(primary, query)
            if want in seen.splitlines():
                return time.monotonic()
            if time.monotonic() > deadline:
                log = self.servers[node].log_path
                raise ServerError(
                    f"{node} did not stream from {primary} ({want}) within "
                    f"{_STREAM_TIMEOUT}s; pg_stat_replication says {seen!r}; log {log}"
                )
            if not self.servers[node].running:
                raise ServerError(
                    f"{node} stopped while joining {primary}; log {self.servers[node].log_path}"
                )
            time.sleep(0.005)

    def _rejoin(self, old: str) -> float:
        """``old`` (stopped) becomes a standby of the primary; return when it streams."""
        new = self._primary
        assert new is not None
        srv = self.servers[old]
        if srv.running:
            raise ServerError(f"{old} is running; it must be down to rejoin as a standby")
        # pg_rewind reads the source's timeline from its control file, which a promoted
        # server updates only at its first checkpoint (asynchronous after a promotion);
        # with the old timeline there, it would wrongly find "no rewind required".
        deadline = time.monotonic() + _STREAM_TIMEOUT
        while True:
            self._sql(new, "CHECKPOINT")
            if self._sql(new, _CHECKPOINT_TIMELINE_CURRENT) == "t":
                break
            if time.monotonic() > deadline:
                raise ServerError(f"{new}'s checkpoint did not reach its new timeline")
            time.sleep(0.01)
        data = self._data_dir(old)
        rewind = self._run_tool(
            [
                str(self.bindir / "pg_rewind"),
                "--target-pgdata", str(data),
                "--source-server", self._tool_conninfo(new),
                "--no-sync",
            ],
            what="pg_rewind",
        )
        self.last_rejoin_output = rewind.stdout
        if rewind.returncode == 0:
            self.last_rejoin_method = "pg_rewind"
            self._write_sync_names(old, self._protected_sync_names(old))
        else:
            self.last_rejoin_method = "pg_basebackup"
            self._base_backup(old, source=new)
        # pg_rewind leaves no standby.signal; start(standby=True) writes it.
        (data / "promote.signal").unlink(missing_ok=True)
        return self._start_standby(old)
