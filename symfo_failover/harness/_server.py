"""A real PostgreSQL server on a free loopback port, started and killed on demand."""

from __future__ import annotations

import atexit
import contextlib
import ipaddress
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Literal

from ._binaries import find_bindir
from ._reaper import descendants, kill_groups, process_table, read_stat, reaper

__all__ = ["LocalServer", "ServerError"]

StopMode = Literal["fast", "immediate", "smart"]

_STOP_SIGNALS: dict[str, signal.Signals] = {
    "smart": signal.SIGTERM,
    "fast": signal.SIGINT,
    "immediate": signal.SIGQUIT,
}
_SUPERUSER = "postgres"
# fsync=off: a SIGKILLed server still loses nothing (the kernel keeps the written data);
# only a machine crash would, and the harness never simulates one. mmap DSM keeps dynamic
# shared memory inside the data directory, so a killed server leaves nothing in /dev/shm.
_DEFAULT_SETTINGS = {"fsync": "off", "dynamic_shared_memory_type": "mmap"}
_START_ATTEMPTS = 5
# Copying a data directory (about 1000 files) takes 0.1 s on tmpfs and 0.2-1.3 s on this
# machine's ext4, so the throwaway area goes to /dev/shm unless TMPDIR says otherwise.
_FAST_TMP = Path("/dev/shm")
_FAST_TMP_MIN_FREE = 1 << 30
_KILL_GRACE = 2.0
# ControlFileData starts with system_identifier (8 bytes), pg_control_version and
# catalog_version_no (4 each), then the DBState enum, in the machine's byte order.
_CONTROL_STATE_OFFSET = 16
_DB_IN_PRODUCTION = 6


class ServerError(RuntimeError):
    """The server did not start, stop or take a signal as asked."""


@dataclass(frozen=True)
class _OsUser:
    name: str
    uid: int
    gid: int

    @property
    def switch(self) -> bool:
        """Whether the server must run under another uid than ours."""
        return self.uid != os.getuid()


def _resolve_os_user(name: str | None) -> _OsUser:
    if name is None:
        # PostgreSQL refuses to run as root.
        entry = pwd.getpwnam("postgres") if os.getuid() == 0 else pwd.getpwuid(os.getuid())
    else:
        entry = pwd.getpwnam(name)
    if entry.pw_uid != os.getuid() and os.getuid() != 0:
        raise ValueError(f"only root can run the server as another user ({entry.pw_name})")
    return _OsUser(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _chown_tree(root: Path, user: _OsUser) -> None:
    if not user.switch:
        return
    os.chown(root, user.uid, user.gid)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            os.chown(os.path.join(parent, name), user.uid, user.gid, follow_symlinks=False)


def _popen_identity(user: _OsUser) -> dict[str, Any]:
    """Popen arguments that run the child as ``user`` (no preexec_fn: not thread-safe)."""
    if not user.switch:
        return {}
    return {"user": user.uid, "group": user.gid, "extra_groups": []}


def _server_env() -> dict[str, str]:
    # A clean environment: PG* variables and LANGUAGE (which overrides lc_messages for
    # gettext) must not leak into the server.
    return {"PATH": os.environ.get("PATH", os.defpath), "LANG": "C.UTF-8"}


def _check_loopback(host: str) -> None:
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"the harness only uses loopback addresses, not {host!r}")


def _bind_probe(host: str, port: int) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.bind((host, port))
        return int(sock.getsockname()[1])


def _free_port(host: str) -> int:
    return _bind_probe(host, 0)


def _port_after_failed_start(
    host: str, port: int, *, explicit: bool, ever_started: bool, attempt: int, attempts: int
) -> int | None:
    """A new free port when a first start failed because the port picked for it was
    taken meanwhile (another program won the race); None when the failure stands."""
    if explicit or ever_started or attempt >= attempts or not _port_taken(host, port):
        return None
    return _free_port(host)


def _port_taken(host: str, port: int) -> bool:
    try:
        _bind_probe(host, port)
    except OSError:
        return True
    return False


def make_conninfo(
    host: str, port: int, user: str, password: str | None, dbname: str, /, **extra: str
) -> str:
    """A libpq keyword/value string; ``extra`` adds or overrides parameters."""
    params = {"host": host, "port": str(port), "user": user, "dbname": dbname}
    if password is not None:
        params["password"] = password
    params.update(extra)
    return " ".join(f"{k}={_conninfo_quote(str(v))}" for k, v in params.items())


def make_odbc_connection_string(
    host: str, port: int, user: str, password: str | None, database: str, /, **extra: str
) -> str:
    """A psqlODBC (``PostgreSQL Unicode``) string; ``extra`` adds or overrides keywords."""
    params = {
        "Driver": "{PostgreSQL Unicode}",
        "Server": host,
        "Port": str(port),
        "Database": _odbc_quote(database),
        "Uid": _odbc_quote(user),
    }
    if password is not None:
        params["Pwd"] = _odbc_quote(password)
    params.update({k: _odbc_quote(str(v)) for k, v in extra.items()})
    return "".join(f"{k}={v};" for k, v in params.items())


def _conninfo_quote(value: str) -> str:
    if value and not any(c in value for c in " '\\\t\n"):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _odbc_quote(value: str) -> str:
    if value == value.strip() and not any(c in value for c in ";{}="):
        return value
    return "{" + value.replace("}", "}}") + "}"


def _guc_list_quote(path: str) -> str:
    # unix_socket_directories is a comma-separated list; quote paths that need it.
    return f'"{path}"' if any(c in path for c in ', "') else path


# --- the per-process workspace and the initdb template -----------------------------------


def _workspace_parent() -> str | None:
    """Where throwaway files go: $TMPDIR if set, else /dev/shm if roomy, else the default."""
    if "TMPDIR" in os.environ:
        return None
    try:
        roomy = shutil.disk_usage(_FAST_TMP).free >= _FAST_TMP_MIN_FREE
    except OSError:
        return None
    return str(_FAST_TMP) if roomy and os.access(_FAST_TMP, os.W_OK | os.X_OK) else None


class _Workspace:
    """One temporary directory per Python process, watched by the reaper."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._root: Path | None = None
        self._templates: dict[tuple[str, int, str | None], Path] = {}

    def root(self) -> Path:
        with self._lock:
            if self._root is None:
                root = Path(tempfile.mkdtemp(prefix="symfo-pg-", dir=_workspace_parent()))
                reaper().watch_path(root)
                # Servers run as another user: they may pass through, not list.
                root.chmod(0o711)
                self._root = root
            return self._root

    def new_dir(self, prefix: str, user: _OsUser) -> Path:
        path = Path(tempfile.mkdtemp(prefix=prefix, dir=self.root()))
        _chown_tree(path, user)
        return path

    def template(self, bindir: Path, user: _OsUser, password: str | None) -> Path:
        """An initdb'd data directory to copy; made once per (bindir, user, password)."""
        key = (str(bindir), user.uid, password)
        with self._lock:
            found = self._templates.get(key)
        if found is not None:
            return found
        parent = self.new_dir("template-", user)
        data = parent / "data"
        argv = [
            str(bindir / "initdb"),
            "-D",
            str(data),
            "-U",
            _SUPERUSER,
            "--encoding=UTF8",
            "--locale=C.UTF-8",
            "--no-sync",
        ]
        if password is None:
            argv.append("--auth=trust")
        else:
            pwfile = parent / "pwfile"
            pwfile.write_text(password + "\n", encoding="utf-8")
            _chown_tree(pwfile, user)
            argv += ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        try:
            result = subprocess.run(
                argv,
                cwd=parent,
                env=_server_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
                **_popen_identity(user),
            )
        finally:
            if password is not None:
                (parent / "pwfile").unlink(missing_ok=True)
        if result.returncode != 0:
            raise ServerError(
                f"initdb failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )
        method = "trust" if password is None else "scram-sha-256"
        # Rewriting the file in place keeps its owner.
        (data / "pg_hba.conf").write_text(
            "# written by symfo_failover.harness\n"
            "local all all trust\n"
            f"host all all 127.0.0.0/8 {method}\n"
            f"host all all ::1/128 {method}\n",
            encoding="utf-8",
        )
        with self._lock:
            self._templates[key] = data
        return data

    def remove(self) -> None:
        with self._lock:
            root, self._root = self._root, None
            self._templates.clear()
        if root is not None:
            shutil.rmtree(root, ignore_errors=True)
            with contextlib.suppress(RuntimeError):
                reaper().forget_path(root)


_workspace = _Workspace()
_open_servers: set[LocalServer] = set()
_open_lock = threading.Lock()


def _close_all_at_exit() -> None:
    with _open_lock:
        servers = list(_open_servers)
    for server in servers:
        with contextlib.suppress(Exception):
            server.close()
    _workspace.remove()


# Registered after _reaper's own handler, so it runs before it (atexit is LIFO).
atexit.register(_close_all_at_exit)


# --- the server ------------------------------------------------------------------------


class LocalServer:
    """A PostgreSQL server on a loopback port, run by the ``postgres`` OS user when root.

    Without ``data_dir`` the server gets a fresh throwaway data directory (a copy of an
    initdb template made once per process), removed by :meth:`close`. With ``data_dir``
    it runs on that existing directory and leaves it in place. Nothing outlives the Python
    process: :meth:`close` runs at exit, and the reaper's watchdog kills the server and
    removes its files even if the process is SIGKILLed.

    Not thread-safe: drive one server from one thread.
    """

    host: str
    port: int
    data_dir: Path
    bindir: Path
    user: str

    def __init__(
        self,
        *,
        bindir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        host: str = "127.0.0.1",
        data_dir: str | os.PathLike[str] | None = None,
        settings: Mapping[str, str] | None = None,
        lc_messages: str | None = None,
        restart_after_crash: bool = False,
        os_user: str | None = None,
        password: str | None = None,
    ) -> None:
        _check_loopback(host)
        if password is not None and ("\n" in password or not password):
            raise ValueError("the password must be a non-empty single line")
        self.bindir = find_bindir(bindir)
        self.host = host
        self.user = _SUPERUSER
        self.password = password
        self.lc_messages = lc_messages
        self.restart_after_crash = restart_after_crash
        self.settings: dict[str, str] = dict(settings or {})
        self._os_user = _resolve_os_user(os_user)
        self._port_explicit = port is not None
        self.port = port if port is not None else _free_port(host)
        self._proc: subprocess.Popen[bytes] | None = None
        self._pgid: int | None = None
        self._orphans: set[int] = set()
        self._shm_cmd: list[str] | None = None
        self._ever_started = False
        self._hold = False
        self._standby = False
        self._closed = False
        self._workdir = _workspace.new_dir("server-", self._os_user)
        try:
            self._sockdir = self._workdir / "sock"
            self._sockdir.mkdir(mode=0o700)
            _chown_tree(self._sockdir, self._os_user)
            self.log_path = self._workdir / "server.log"
            self.log_path.touch(mode=0o644)
            self._throwaway = data_dir is None
            if data_dir is None:
                template = _workspace.template(self.bindir, self._os_user, password)
                self.data_dir = self._workdir / "data"
                shutil.copytree(template, self.data_dir, symlinks=True)
                _chown_tree(self.data_dir, self._os_user)
            else:
                self.data_dir = Path(data_dir).absolute()
        except BaseException:
            shutil.rmtree(self._workdir, ignore_errors=True)
            raise
        with _open_lock:
            _open_servers.add(self)

    def __repr__(self) -> str:
        state = "running" if self.running else "stopped"
        return f"<LocalServer {self.host}:{self.port} {state} data_dir={self.data_dir}>"

    # --- addresses ---

    def conninfo(self, dbname: str = "postgres", **extra: str) -> str:
        """A libpq keyword/value connection string for this server."""
        return make_conninfo(self.host, self.port, self.user, self.password, dbname, **extra)

    def odbc_connection_string(self, database: str = "postgres", **extra: str) -> str:
        """A connection string for the psqlODBC driver (``PostgreSQL Unicode``)."""
        return make_odbc_connection_string(
            self.host, self.port, self.user, self.password, database, **extra
        )

    # --- state ---

    @property
    def running(self) -> bool:
        """Whether the postmaster process is alive."""
        return self._poll()

    @property
    def postmaster_pid(self) -> int | None:
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def accepting(self) -> bool:
        """Whether the postmaster is alive and says (in postmaster.pid) it accepts connections."""
        pid = self.postmaster_pid
        return pid is not None and self._pidfile_status(pid) == "ready"

    def backend_pids(self) -> list[int]:
        """The postmaster's child processes: backends and auxiliary processes."""
        pid = self.postmaster_pid
        if pid is None:
            return []
        table = process_table()
        return sorted(p for p, info in table.items() if info.ppid == pid and info.alive)

    # --- control ---

    def start(
        self, *, timeout: float = 30, hold_in_recovery: bool = False, standby: bool = False
    ) -> float:
        """Start the postmaster and wait until it accepts connections.

        Returns the ``time.monotonic()`` at which it was seen accepting.

        With ``hold_in_recovery`` the server starts as a standby that accepts no
        connections (clients get 57P03, "not accepting connections", as from a server
        still in crash recovery after a failover) and stays so until :meth:`promote`.
        Then this returns as soon as the postmaster listens.

        With ``standby`` the server starts as a hot standby (``standby.signal``; set
        ``primary_conninfo`` in :attr:`settings` to stream from a primary) and this
        returns once it accepts read-only sessions; :meth:`promote` ends the recovery.
        """
        self._check_open()
        if self.running:
            raise ServerError(f"{self!r} is already running")
        if hold_in_recovery and standby:
            raise ValueError("hold_in_recovery and standby exclude each other")
        self._hold = hold_in_recovery
        self._standby = standby
        if hold_in_recovery or standby:
            signal_file = self.data_dir / "standby.signal"
            signal_file.touch()
            _chown_tree(signal_file, self._os_user)
        # Leftovers of a killed postmaster would keep the shared memory attached.
        self.wait_stopped(timeout)
        deadline = time.monotonic() + timeout
        for attempt in range(1, _START_ATTEMPTS + 1):
            log_offset = self.log_path.stat().st_size
            try:
                ready_at = self._start_once(deadline)
            except _PostmasterExited as exc:
                new_port = _port_after_failed_start(
                    self.host, self.port, explicit=self._port_explicit,
                    ever_started=self._ever_started, attempt=attempt, attempts=_START_ATTEMPTS,
                )
                if new_port is not None:
                    self.port = new_port
                    continue
                raise ServerError(
                    f"the postmaster exited during start (code {exc.returncode}); "
                    f"server log {self.log_path}:\n{self._log_tail(log_offset)}"
                ) from None
            except TimeoutError:
                self._kill_everything()
                raise ServerError(
                    f"the server did not accept connections within {timeout}s; "
                    f"server log {self.log_path}:\n{self._log_tail(log_offset)}"
                ) from None
            except BaseException:
                # KeyboardInterrupt in the middle of a start must not leave a server behind.
                self._kill_everything()
                raise
            self._ever_started = True
            return ready_at
        raise AssertionError("unreachable")

    def stop(self, mode: StopMode = "fast", *, timeout: float = 30) -> float:
        """Shut down (smart: SIGTERM, fast: SIGINT, immediate: SIGQUIT) and wait until every
        server process is gone. Returns the ``time.monotonic()`` at which it was."""
        if mode not in _STOP_SIGNALS:
            raise ValueError(f"unknown stop mode {mode!r}; use one of {sorted(_STOP_SIGNALS)}")
        pid = self.postmaster_pid
        if pid is not None:
            os.kill(pid, _STOP_SIGNALS[mode])
        return self.wait_stopped(timeout)

    def kill_postmaster(self) -> float:
        """Node down: SIGKILL the postmaster, then make sure its children are gone too.

        The children notice the postmaster's death and exit by themselves; any still
        alive after a short grace are SIGKILLed. Returns the ``time.monotonic()`` of the kill.
        """
        proc = self._proc
        if proc is None or proc.poll() is not None:
            raise ServerError(f"{self!r} is not running")
        # Frozen, the postmaster cannot fork a backend we would miss.
        os.kill(proc.pid, signal.SIGSTOP)
        _wait_for(lambda: _state(proc.pid) in ("T", "t", "Z", "X"), 1.0)
        children = descendants(process_table(), [proc.pid])
        # Each child is its own session leader (PostgreSQL calls setsid()), so the reaper
        # can kill it by process group once the postmaster's group is gone.
        for pid in children - self._orphans:
            reaper().watch_process_group(pid)
        self._orphans |= children
        os.kill(proc.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        proc.wait()
        self._poll()
        if not _wait_for(lambda: not self._alive_orphans(), _KILL_GRACE):
            for pid in self._alive_orphans():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        self.wait_stopped(_KILL_GRACE)
        return killed_at

    def promote(self, *, timeout: float = 30) -> float:
        """End a :meth:`start` held in recovery: the server finishes recovery and accepts
        connections. Returns the ``time.monotonic()`` at which it does."""
        pid = self.postmaster_pid
        if pid is None or not (self._hold or self._standby):
            raise ServerError(f"{self!r} is not running held in recovery or as a standby")
        # pg_ctl writes promote.signal and signals the postmaster; doing the same by hand
        # from here was not acted on, so the supported tool is used. It refuses ("not in
        # standby mode") until the startup process has marked the control file as in
        # recovery, which a loaded machine can delay past the postmaster's listening:
        # asked again until the timeout.
        deadline = time.monotonic() + timeout
        while True:
            result = subprocess.run(
                [str(self.bindir / "pg_ctl"), "promote", "--no-wait", "-D",
                 str(self.data_dir)],
                env=_server_env(),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
                **_popen_identity(self._os_user),
            )
            said = f"{result.stdout}{result.stderr}"
            if result.returncode == 0:
                break
            if "not in standby mode" not in said or time.monotonic() > deadline:
                raise ServerError(f"pg_ctl promote failed: {said}")
            time.sleep(0.02)
        if self._standby:
            # A hot standby's postmaster.pid already says "ready"; the control file says
            # "in production" once recovery ended (what `pg_ctl promote -w` waits for).
            def promoted() -> bool:
                return self._control_state() == _DB_IN_PRODUCTION
        else:
            def promoted() -> bool:
                return self._pidfile_status(pid) == "ready"
        if not _wait_for(promoted, timeout):
            raise ServerError(
                f"{self!r} did not finish recovery within {timeout}s; "
                f"server log {self.log_path}:\n{self._log_tail(0)}"
            )
        self._hold = self._standby = False
        return time.monotonic()

    def kill_backend(self, pid: int) -> None:
        """SIGKILL one child of this postmaster (a server crash, as far as PostgreSQL knows).

        With ``restart_after_crash`` off, the postmaster then ends every other session
        (57P02) and shuts down; :meth:`wait_stopped` waits for that.
        """
        if pid not in self.backend_pids():
            raise ValueError(f"process {pid} is not a child of the postmaster of {self!r}")
        os.kill(pid, signal.SIGKILL)

    def wait_stopped(self, timeout: float = 30) -> float:
        """Wait until no process of this server remains; return that ``time.monotonic()``."""
        proc = self._proc
        deadline = time.monotonic() + timeout
        if proc is not None:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise TimeoutError(f"{self!r} still running after {timeout}s") from None
            self._poll()
        if not _wait_for(lambda: not self._alive_orphans(), max(0.0, deadline - time.monotonic())):
            raise TimeoutError(f"processes {sorted(self._alive_orphans())} of {self!r} remain")
        stopped_at = time.monotonic()
        self._forget_orphans()
        self._remove_stale_shared_memory()
        return stopped_at

    def close(self) -> None:
        """Stop immediately, kill whatever is left, remove the throwaway files. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            if self.running:
                with contextlib.suppress(TimeoutError, OSError):
                    self.stop("immediate", timeout=10)
            self._kill_everything()
        finally:
            shutil.rmtree(self._workdir, ignore_errors=True)
            with _open_lock:
                _open_servers.discard(self)

    def __enter__(self) -> LocalServer:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- internals ---

    def _check_open(self) -> None:
        if self._closed:
            raise ServerError(f"{self!r} is closed")

    def _argv(self) -> list[str]:
        settings = {
            "listen_addresses": self.host,
            "unix_socket_directories": _guc_list_quote(str(self._sockdir)),
            "restart_after_crash": "on" if self.restart_after_crash else "off",
            **_DEFAULT_SETTINGS,
        }
        if self.lc_messages is not None:
            settings["lc_messages"] = self.lc_messages
        settings.update(self.settings)
        if self._hold:
            settings["hot_standby"] = "off"
        elif self._standby:
            settings["hot_standby"] = "on"
        argv = [str(self.bindir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)]
        for name, value in settings.items():
            argv += ["-c", f"{name}={value}"]
        return argv

    def _start_once(self, deadline: float) -> float:
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                self._argv(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
                env=_server_env(),
                close_fds=True,
                # Its own process group (pgid == pid), out of reach of the terminal's ^C.
                start_new_session=True,
                umask=0o077,
                **_popen_identity(self._os_user),
            )
        self._proc = proc
        self._pgid = proc.pid
        reaper().watch_process_group(proc.pid)
        delay = 0.002
        while True:
            returncode = proc.poll()
            if returncode is not None:
                self.wait_stopped(_KILL_GRACE)
                raise _PostmasterExited(returncode)
            # Line 8 of postmaster.pid is "ready" once connections are accepted (PG >= 10);
            # the pid check ignores a stale file left by a killed postmaster.
            status = self._pidfile_status(proc.pid)
            # "starting" is written once the sockets listen; a held standby stays there.
            # (A hot standby writes "ready" once it accepts read-only sessions.)
            if status == "ready" or (self._hold and status in ("starting", "standby")):
                ready_at = time.monotonic()
                self._watch_shared_memory(proc.pid)
                return ready_at
            if time.monotonic() > deadline:
                raise TimeoutError
            time.sleep(delay)
            delay = min(delay * 1.5, 0.02)

    def _pidfile_lines(self) -> list[str]:
        try:
            return (self.data_dir / "postmaster.pid").read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError):
            return []

    def _pidfile_status(self, pid: int) -> str | None:
        lines = self._pidfile_lines()
        if len(lines) < 8 or lines[0].strip() != str(pid):
            return None
        return lines[7].strip()

    def _control_state(self) -> int | None:
        """The cluster state (DBState) in global/pg_control, or None if unreadable."""
        try:
            with open(self.data_dir / "global" / "pg_control", "rb") as f:
                head = f.read(_CONTROL_STATE_OFFSET + 4)
        except OSError:
            return None
        if len(head) < _CONTROL_STATE_OFFSET + 4:
            return None
        return int.from_bytes(head[_CONTROL_STATE_OFFSET:], sys.byteorder)

    def _watch_shared_memory(self, pid: int) -> None:
        # PostgreSQL's small System V segment outlives a SIGKILLed server; a later start on
        # the same data dir would reuse it, but a removed data dir leaks it: remove it then.
        lines = self._pidfile_lines()
        shmid = lines[6].split()[-1] if len(lines) >= 7 and lines[6].split() else None
        if self._shm_cmd is not None:
            reaper().forget_command(self._shm_cmd)
            self._shm_cmd = None
        if shmid is not None and shmid.isdigit() and shutil.which("ipcrm"):
            self._shm_cmd = ["ipcrm", "-m", shmid]
            reaper().watch_command(self._shm_cmd)

    def _poll(self) -> bool:
        """Whether the postmaster is alive; once it is reaped, its pid may be reused, so
        the reaper must forget it at once."""
        if self._proc is None:
            return False
        if self._proc.poll() is None:
            return True
        if self._pgid is not None:
            with contextlib.suppress(RuntimeError):
                reaper().forget_process_group(self._pgid)
            self._pgid = None
        return False

    def _alive_orphans(self) -> set[int]:
        return {p for p in self._orphans if _alive(p)}

    def _forget_orphans(self) -> None:
        for pid in self._orphans:
            with contextlib.suppress(RuntimeError):
                reaper().forget_process_group(pid)
        self._orphans = set()

    def _remove_stale_shared_memory(self) -> None:
        if self._shm_cmd is not None:
            # A clean exit removed the segment itself; after a SIGKILL it is still there.
            if _shm_unattached(int(self._shm_cmd[-1])):
                subprocess.run(self._shm_cmd, capture_output=True, check=False, timeout=10)
            with contextlib.suppress(RuntimeError):
                reaper().forget_command(self._shm_cmd)
            self._shm_cmd = None

    def _kill_everything(self) -> None:
        if self._poll() and self._pgid is not None:
            kill_groups([self._pgid], timeout=10)
        for pid in self._alive_orphans():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if self._proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(10)
        with contextlib.suppress(TimeoutError):
            self.wait_stopped(5)

    def _log_tail(self, offset: int, limit: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(offset)
                data = f.read()
        except OSError as exc:
            return f"(cannot read the log: {exc})"
        return data[-limit:].decode("utf-8", "replace") or "(empty)"


class _PostmasterExited(Exception):
    def __init__(self, returncode: int) -> None:
        super().__init__(returncode)
        self.returncode = returncode


def _state(pid: int) -> str:
    """The process's state letter from /proc; "X" (dead) once it is gone."""
    info = read_stat(pid)
    return "X" if info is None else info.state


def _alive(pid: int) -> bool:
    return _state(pid) not in ("Z", "X", "x")


def _shm_unattached(shmid: int) -> bool:
    """Whether the System V segment exists with no process attached."""
    try:
        with open("/proc/sysvipc/shm", encoding="ascii") as f:
            next(f)
            for line in f:
                fields = line.split()
                # key shmid perms size cpid lpid nattch ...
                if len(fields) > 6 and fields[1] == str(shmid):
                    return fields[6] == "0"
    except (OSError, StopIteration):
        pass
    return False


def _wait_for(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.02)
