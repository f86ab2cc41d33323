"""The cluster of `_cluster` with containers for nodes, on testcontainers.

Each node is a PostgreSQL container on host networking; both mount one host directory
holding the shared data directory, so that the access point ``host:port`` reaches
whichever node runs, exactly as with `LocalCluster`. A node start is a new container
(``docker run``) whose command line says which node it is and whether it is held in
recovery; every stop, kill or crash ends with the container removed, so stopped
containers never pile up. The reaper removes the containers (``docker rm -f``) and the
host directory even if Python is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import threading
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ._cluster import BaseCluster, StopMode
from ._reaper import reaper
from ._server import (
    _DEFAULT_SETTINGS,
    ServerError,
    _check_loopback,
    _chown_tree,
    _free_port,
    _OsUser,
    _port_after_failed_start,
    _resolve_os_user,
    _wait_for,
    _workspace,
    make_conninfo,
    make_odbc_connection_string,
)

if TYPE_CHECKING:
    from testcontainers.core.container import DockerContainer

__all__ = ["ContainerCluster", "container_available", "default_image"]

IMAGE_ENV = "SYMFO_CONTAINER_IMAGE"
DEFAULT_IMAGE = "postgres:15"
_SUPERUSER = "postgres"
# The host directory is mounted here and PGDATA is a directory inside it (the layout the
# official image's documentation recommends: no anonymous volume is created).
_MOUNT = "/var/lib/postgresql/data"
_PGDATA = f"{_MOUNT}/pgdata"
_STOP_SIGNALS: dict[str, str] = {"smart": "SIGTERM", "fast": "SIGINT", "immediate": "SIGQUIT"}
# The first start runs initdb inside the container (about a second with the built image);
# later starts take a few tenths of a second.
_START_TIMEOUT = 120.0
_STOP_TIMEOUT = 60.0
_START_ATTEMPTS = 3
_STATUS_POLL = 0.1
# Killing any server child but the logger makes the postmaster reset every session.
# The walwriter runs only after recovery; the checkpointer always does.
_CRASH_SCRIPT = r"""
for victim in walwriter checkpointer; do
  for p in /proc/[0-9]*; do
    title=$(tr '\0' ' ' < "$p/cmdline" 2>/dev/null) || continue
    case "$title" in
      "postgres: "*"$victim"*) kill -9 "${p#/proc/}" && echo "${p#/proc/} $title" && exit 0 ;;
    esac
  done
done
echo "no walwriter or checkpointer process found" >&2
exit 1
"""

_ryuk_lock = threading.Lock()
_image_users: dict[str, _OsUser] = {}
_image_users_lock = threading.Lock()


def default_image() -> str:
    """The image the container tier uses: ``$SYMFO_CONTAINER_IMAGE``, else ``postgres:15``."""
    return os.environ.get(IMAGE_ENV) or DEFAULT_IMAGE


def _testcontainers() -> type[DockerContainer]:
    """testcontainers' DockerContainer, with Ryuk off unless the user asked for it.

    Ryuk (testcontainers' own reaper) is an image to pull; the harness's reaper does its
    job, so it is disabled for this process if the environment does not say otherwise.
    """
    with _ryuk_lock:
        os.environ.setdefault("TESTCONTAINERS_RYUK_DISABLED", "true")
    from testcontainers.core.container import DockerContainer

    return DockerContainer


def _api_status(exc: BaseException) -> int | None:
    """The HTTP status of a docker-py APIError (404: no such container, 409: conflict)."""
    status = getattr(exc, "status_code", None)
    return status if isinstance(status, int) else None


def container_available(image: str | None = None) -> tuple[bool, str]:
    """Whether containers can run here: testcontainers importable, the ``docker`` client
    on PATH (the reaper uses it), an engine answering and ``image`` present locally.

    Returns ``(ok, reason)``; the reason says what is missing and how to get it.
    """
    image = image or default_image()
    try:
        _testcontainers()
    except ImportError as exc:
        return False, f"testcontainers is not installed ({exc}); pip install 'testcontainers>=4'"
    docker = shutil.which("docker")
    if docker is None:
        return False, "the docker command-line client is not on PATH (the harness's reaper uses it)"
    # The command-line client, not docker-py: a failed docker-py connection leaks a socket.
    version = _docker_cli([docker, "version", "--format", "{{.Server.Version}}"])
    if version[0] != 0:
        return False, (
            f"no Docker engine answers ({version[1]}); start one: scripts/docker-engine.sh start"
        )
    found = _docker_cli([docker, "image", "inspect", "--format", "{{.Id}}", image])
    if found[0] != 0:
        return False, (
            f"the image {image} is not present locally: build it offline with "
            f"scripts/build-postgres-image.sh and set {IMAGE_ENV}, or docker pull {image}"
        )
    return True, f"Docker engine {version[1]}, image {image}"


def _docker_cli(argv: list[str]) -> tuple[int, str]:
    """Run the docker client; return its exit status and its output (or last error line)."""
    try:
        done = subprocess.run(
            argv, capture_output=True, text=True, timeout=30, check=False, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return 1, str(exc)
    if done.returncode == 0:
        return 0, done.stdout.strip()
    lines = done.stderr.strip().splitlines()
    return done.returncode, lines[-1] if lines else f"exit status {done.returncode}"


def _run_to_end(image: str, argv: list[str], *, entrypoint: str) -> str:
    """Run a one-off container without network to its end; return its output."""
    _testcontainers()
    from testcontainers.core.docker_client import DockerClient

    client = DockerClient()
    try:
        out = client.client.containers.run(
            image, argv, entrypoint=entrypoint, network_mode="none", remove=True
        )
    finally:
        client.client.close()
    return out.decode("utf-8", "replace") if isinstance(out, bytes) else str(out)


def _image_user(image: str) -> _OsUser:
    """The uid and gid of the image's ``postgres`` user (who must own the data directory)."""
    with _image_users_lock:
        found = _image_users.get(image)
    if found is not None:
        return found
    try:
        text = _run_to_end(image, [_SUPERUSER], entrypoint="id")
    except Exception as exc:
        raise ServerError(f"cannot ask {image} for its {_SUPERUSER} user: {exc}") from exc
    match = re.search(r"uid=(\d+)\S* gid=(\d+)", text)
    if match is None:
        raise ServerError(f"{image} has no {_SUPERUSER} user (id said: {text.strip()!r})")
    user = _OsUser(_SUPERUSER, int(match.group(1)), int(match.group(2)))
    with _image_users_lock:
        _image_users[image] = user
    return user


class ContainerCluster(BaseCluster):
    """Two PostgreSQL containers ("nodes") on one shared data directory, one access point.

    Same interface as `LocalCluster`. The access point is ``host:port`` (host networking);
    ``SHOW cluster_name`` tells a session which node served it. The image is any image
    with the official ``postgres`` image's interface (``POSTGRES_PASSWORD``, ``PGDATA``,
    an entry point that initialises an empty PGDATA and runs ``postgres`` as the
    ``postgres`` user): by default ``$SYMFO_CONTAINER_IMAGE``, else ``postgres:15``.
    The data directory is initialised by the image on the first start. Run as root, the
    host directory is given to the image's ``postgres`` user; otherwise the containers
    run as the caller's uid (``--user``), so that every file stays the caller's.
    """

    def __init__(
        self,
        *,
        image: str | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        settings: Mapping[str, str] | None = None,
        lc_messages: str | None = None,
        password: str | None = None,
    ) -> None:
        _check_loopback(host)
        if password is not None and ("\n" in password or not password):
            raise ValueError("the password must be a non-empty single line")
        self.image = image or default_image()
        self.host = host
        self._port_explicit = port is not None
        self.port = port if port is not None else _free_port(host)
        self.user = _SUPERUSER
        self.password = password
        self.lc_messages = lc_messages
        self.settings: dict[str, str] = dict(settings or {})
        self._containers: dict[str, DockerContainer] = {}
        self._ever_started = False
        self._closed = False
        stem = f"symfo-{os.getpid()}-{secrets.token_hex(3)}"
        self.container_names: dict[str, str] = {node: f"{stem}-{node}" for node in self.nodes}
        self._reaper_commands = [
            ["docker", "rm", "--force", "--volumes", name] for name in self.container_names.values()
        ]
        for argv in self._reaper_commands:
            reaper().watch_command(argv)
        try:
            if os.getuid() == 0:
                # The image's entry point starts the server as its postgres user, who
                # must own the data directory.
                owner = _image_user(self.image)
                self._container_user: str | None = None
                self._exec_user = _SUPERUSER
            else:
                # Without root nothing can be chowned: the containers run as us (as the
                # official image allows with --user), so every file stays ours.
                owner = _resolve_os_user(None)
                self._container_user = self._exec_user = f"{owner.uid}:{owner.gid}"
            self._owner = owner
            self.shared_dir = _workspace.new_dir("containers-", owner)
            self.data_dir = self.shared_dir / "pgdata"
            super().__init__(self.shared_dir / "active-node.lock")
        except BaseException:
            self._forget_reaper_commands()
            raise

    def __repr__(self) -> str:
        return (
            f"<ContainerCluster {self.host}:{self.port} image={self.image} active={self._active}>"
        )

    def __enter__(self) -> ContainerCluster:
        return self

    # --- addresses ---

    def conninfo(self, dbname: str = "postgres", **extra: str) -> str:
        return make_conninfo(self.host, self.port, self.user, self.password, dbname, **extra)

    def odbc_connection_string(self, database: str = "postgres", **extra: str) -> str:
        return make_odbc_connection_string(
            self.host, self.port, self.user, self.password, database, **extra
        )

    def logs(self, node: str, tail: int = 100) -> str:
        """The last lines the node's current container wrote (server log and entry point)."""
        container = self._containers.get(node)
        if container is None:
            return "(no container)"
        try:
            raw = container.get_wrapped_container().logs(tail=tail)
        except Exception as exc:
            return f"(cannot read the container's log: {exc})"
        text = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else str(raw)
        return text or "(empty)"

    # --- node primitives ---

    def _node_start(self, node: str, *, hold_in_recovery: bool) -> float:
        if self._closed:
            raise ServerError(f"{self!r} is closed")
        self._remove(node)
        if hold_in_recovery:
            if not (self.data_dir / "PG_VERSION").exists():
                raise ServerError(
                    "the data directory is initialised by the first start; start() first"
                )
            signal_file = self.data_dir / "standby.signal"
            signal_file.touch()
            _chown_tree(signal_file, self._owner)
        for attempt in range(1, _START_ATTEMPTS + 1):
            try:
                ready_at = self._start_once(node, hold_in_recovery)
            except _StartFailed as exc:
                self._remove(node)
                new_port = _port_after_failed_start(
                    self.host, self.port, explicit=self._port_explicit,
                    ever_started=self._ever_started, attempt=attempt, attempts=_START_ATTEMPTS,
                )
                if new_port is not None:
                    self.port = new_port
                    continue
                raise ServerError(str(exc)) from None
            except BaseException:
                self._remove(node)
                raise
            self._ever_started = True
            return ready_at
        raise AssertionError("unreachable")

    def _node_promote(self, node: str) -> float:
        wrapped = self._wrapped(node)
        # pg_ctl writes promote.signal and signals the postmaster (pid 1 in the container).
        result = wrapped.exec_run(
            ["pg_ctl", "promote", "--no-wait", "-D", _PGDATA], user=self._exec_user
        )
        if result.exit_code != 0:
            output = result.output.decode("utf-8", "replace")
            raise ServerError(f"pg_ctl promote failed in {self.container_names[node]}: {output}")
        if not _wait_for(lambda: self._pidfile_status() == "ready", _START_TIMEOUT):
            raise ServerError(
                f"{node} did not finish recovery within {_START_TIMEOUT}s; "
                f"container log:\n{self.logs(node, 40)}"
            )
        return time.monotonic()

    def _node_stop(self, node: str, mode: StopMode) -> float:
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"unknown stop mode {mode!r}; use one of {sorted(_STOP_SIGNALS)}")
        self._signal(node, _STOP_SIGNALS[mode])
        stopped_at = self._wait_exited(node, _STOP_TIMEOUT)
        self._remove(node)
        return stopped_at

    def _node_kill(self, node: str) -> float:
        # SIGKILL of the container's pid 1 (the postmaster) ends its pid namespace: every
        # server process vanishes at once, as on a node that lost power.
        self._signal(node, "SIGKILL")
        killed_at = time.monotonic()
        self._wait_exited(node, _STOP_TIMEOUT)
        self._remove(node)
        return killed_at

    def _node_crash(self, node: str) -> float:
        wrapped = self._wrapped(node)
        result = wrapped.exec_run(["sh", "-c", _CRASH_SCRIPT], user=self._exec_user)
        if result.exit_code != 0:
            output = result.output.decode("utf-8", "replace")
            raise ServerError(f"cannot crash {node}: {output}")
        # restart_after_crash is off: the postmaster resets every session, then exits.
        stopped_at = self._wait_exited(node, _STOP_TIMEOUT)
        self._remove(node)
        return stopped_at

    def _node_running(self, node: str) -> bool:
        return self._status(node) in ("created", "running", "restarting", "paused")

    def _close_nodes(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            for node in self.nodes:
                with contextlib.suppress(Exception):
                    self._remove(node)
            shutil.rmtree(self.shared_dir, ignore_errors=True)
        finally:
            self._forget_reaper_commands()

    # --- internals ---

    def _argv(self, node: str, hold: bool) -> list[str]:
        settings = {
            "port": str(self.port),
            "listen_addresses": self.host,
            "restart_after_crash": "off",
            **_DEFAULT_SETTINGS,
        }
        if self.lc_messages is not None:
            settings["lc_messages"] = self.lc_messages
        settings.update(self.settings)
        settings["cluster_name"] = node
        if hold:
            settings["hot_standby"] = "off"
        argv = ["postgres"]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _environment(self) -> dict[str, str]:
        method = "trust" if self.password is None else "scram-sha-256"
        env = {
            "PGDATA": _PGDATA,
            # As LocalServer's template: UTF-8, the C.UTF-8 locale, and a password for
            # loopback too (the official image trusts loopback by default).
            "POSTGRES_INITDB_ARGS": (
                f"--encoding=UTF8 --locale=C.UTF-8 --auth-local=trust --auth-host={method}"
            ),
        }
        if self.password is None:
            env["POSTGRES_HOST_AUTH_METHOD"] = "trust"
        else:
            env["POSTGRES_PASSWORD"] = self.password
        return env

    def _start_once(self, node: str, hold: bool) -> float:
        # A killed server leaves its postmaster.pid behind, saying "ready". No server runs
        # on the directory now (the node guard is held and the other container is gone),
        # so the file is stale; removed, it cannot pass for the new server's.
        (self.data_dir / "postmaster.pid").unlink(missing_ok=True)
        container_class = _testcontainers()
        container = (
            container_class(self.image, name=self.container_names[node], env=self._environment())
            .with_command(self._argv(node, hold))
            .with_volume_mapping(self.shared_dir, _MOUNT, "rw")
            # `network` (not network_mode) also stops testcontainers from picking one.
            .with_kwargs(
                network="host",
                labels={"symfo-failover.node": node},
                **({"user": self._container_user} if self._container_user else {}),
            )
        )
        self._containers[node] = container
        try:
            container.start()
        except Exception as exc:
            raise _StartFailed(f"cannot start the container for {node}: {exc}") from exc
        deadline = time.monotonic() + _START_TIMEOUT
        next_status_check = 0.0
        delay = 0.005
        while True:
            status = self._pidfile_status()
            # "starting" is written once the sockets listen; a held standby stays there.
            if status == "ready" or (hold and status in ("starting", "standby")):
                return time.monotonic()
            now = time.monotonic()
            if now >= next_status_check:
                next_status_check = now + _STATUS_POLL
                state = self._status(node)
                if state not in ("created", "running"):
                    raise _StartFailed(
                        f"the container of {node} exited during start ({state}); "
                        f"container log:\n{self.logs(node, 40)}"
                    )
            if now > deadline:
                raise _StartFailed(
                    f"{node} did not accept connections within {_START_TIMEOUT}s; "
                    f"container log:\n{self.logs(node, 40)}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    def _pidfile_status(self) -> str | None:
        """Line 8 of postmaster.pid, if the file is the one of a server on our port.

        The port and listen address lines exclude a server the entry point may run on
        the side while it initialises the directory (it listens on no TCP address).
        """
        try:
            text = (self.data_dir / "postmaster.pid").read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            return None
        lines = text.splitlines()
        if len(lines) < 8 or lines[3].strip() != str(self.port) or not lines[5].strip():
            return None
        return lines[7].strip()

    def _wrapped(self, node: str) -> Any:
        container = self._containers.get(node)
        if container is None:
            raise ServerError(f"{node} has no container")
        return container.get_wrapped_container()

    def _status(self, node: str) -> str | None:
        """The container's state ("running", "exited", ...), None if there is none."""
        container = self._containers.get(node)
        if container is None:
            return None
        try:
            wrapped = container.get_wrapped_container()
            wrapped.reload()
        except Exception as exc:
            if _api_status(exc) == 404:
                return None
            raise
        status = wrapped.status
        return status if isinstance(status, str) else None

    def _signal(self, node: str, signal_name: str) -> None:
        try:
            self._wrapped(node).kill(signal=signal_name)
        except Exception as exc:
            # 409: the container is not running (it exited by itself): nothing to signal.
            if _api_status(exc) != 409:
                raise ServerError(f"cannot send {signal_name} to {node}: {exc}") from exc

    def _wait_exited(self, node: str, timeout: float) -> float:
        try:
            self._wrapped(node).wait(timeout=timeout)
        except Exception as exc:
            if _api_status(exc) == 404:
                return time.monotonic()
            raise ServerError(
                f"{node} did not stop within {timeout}s ({exc}); container log:\n"
                f"{self.logs(node, 20)}"
            ) from exc
        return time.monotonic()

    def _remove(self, node: str) -> None:
        """Remove the node's container (killing it if it still runs)."""
        container = self._containers.pop(node, None)
        if container is None:
            return
        try:
            container.stop(force=True, delete_volume=True)
        except Exception as exc:
            if _api_status(exc) != 404:
                raise
            container.get_docker_client().client.close()

    def _forget_reaper_commands(self) -> None:
        for argv in self._reaper_commands:
            with contextlib.suppress(RuntimeError):
                reaper().forget_command(argv)


class _StartFailed(Exception):
    pass
