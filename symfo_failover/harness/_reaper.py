"""A watchdog that cleans up after the harness even when the Python process is SIGKILLed.

The first registration starts one watchdog child per Python process (running
:func:`main` of this module) with a pipe on its stdin. The parent writes
one line per change::

    pgid 1234            # on cleanup: freeze the group, SIGKILL it and every descendant
    forget-pgid 1234
    cmd ["ipcrm", "-m", "15"]   # on cleanup: run this argv (JSON, no shell)
    forget-cmd [...]
    path /tmp/symfo-xyz  # on cleanup: remove this tree
    forget-path /tmp/symfo-xyz

The parent never writes EOF on purpose while it lives; the kernel closes the pipe when the
parent dies, however it dies. On EOF the watchdog kills, then runs the commands, then
removes the paths (in that order, so nothing still writes into a removed directory) and
exits. The write end is close-on-exec and is closed in forked children, so no other process
holds it open and EOF really comes.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

__all__ = [
    "ProcInfo",
    "Reaper",
    "descendants",
    "kill_groups",
    "main",
    "process_table",
    "read_stat",
    "reaper",
]

_KINDS = ("pgid", "cmd", "path")
_CMD_TIMEOUT = 30.0


# --- /proc helpers, shared with _server ------------------------------------------------


class ProcInfo(NamedTuple):
    """The fields of ``/proc/<pid>/stat`` that the harness needs."""

    pid: int
    state: str
    ppid: int
    pgrp: int

    @property
    def alive(self) -> bool:
        """Not a zombie: zombies hold no resources and never run again."""
        return self.state not in ("Z", "X", "x")


def read_stat(pid: int) -> ProcInfo | None:
    """The process's stat line, or None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name is in parentheses and may itself contain spaces and parentheses.
    fields = data[data.rindex(b")") + 2 :].split()
    return ProcInfo(pid, fields[0].decode(), int(fields[1]), int(fields[2]))


def process_table() -> dict[int, ProcInfo]:
    """Every process visible in /proc, by pid."""
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                info = read_stat(int(entry))
                if info is not None:
                    table[info.pid] = info
    return table


def descendants(table: dict[int, ProcInfo], roots: Iterable[int]) -> set[int]:
    """The pids of all descendants of ``roots`` (not the roots themselves)."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def kill_groups(pgids: Iterable[int], *, timeout: float = 5.0) -> None:
    """SIGKILL each process group and all descendants of its members, then wait for them.

    PostgreSQL children call setsid(), so they leave the postmaster's group; they are
    found as its descendants instead. Everything found is SIGSTOPped first so that nothing
    can fork a child we have not seen yet.
    """
    pgids = set(pgids)
    frozen: set[int] = set()
    for _ in range(20):  # a fixpoint: each round freezes what the last round revealed
        table = process_table()
        members = {p for p, info in table.items() if info.pgrp in pgids and info.alive}
        targets = members | descendants(table, members | frozen)
        new = {p for p in targets - frozen if p != os.getpid()}
        if not new:
            break
        for pid in new:
            _signal(pid, signal.SIGSTOP)
        frozen |= new
        deadline = time.monotonic() + 0.5
        while time.monotonic() < deadline:
            infos = [read_stat(p) for p in new]
            if all(i is None or i.state in "TtZXx" for i in infos):
                break
            time.sleep(0.005)
    for pgid in pgids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    for pid in frozen:
        _signal(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        infos = [read_stat(p) for p in frozen]
        if all(i is None or not i.alive for i in infos):
            return
        time.sleep(0.01)


# --- the watchdog -----------------------------------------------------------------------


class _Terminated(Exception):
    pass


def _on_sigterm(signum: int, frame: object) -> None:
    raise _Terminated


def _cleanup(pgids: Iterable[int], cmds: Iterable[str], paths: Iterable[str]) -> None:
    kill_groups(pgids)
    for cmd in cmds:
        with contextlib.suppress(Exception):
            argv = json.loads(cmd)
            subprocess.run(
                [str(a) for a in argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=_CMD_TIMEOUT,
                check=False,
            )
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def main() -> None:
    """The watchdog: read registrations until EOF, then clean up."""
    # Only the end of the pipe may end us: not the terminal's ^C, not a hangup.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # Asked to go away explicitly: clean up first rather than leave servers behind.
    signal.signal(signal.SIGTERM, _on_sigterm)
    # Dicts keep the registration order; paths are removed in that order.
    entries: dict[str, dict[str, None]] = {kind: {} for kind in _KINDS}
    try:
        for raw in sys.stdin.buffer:
            if not raw.endswith(b"\n"):
                continue  # a torn last line: never act on half a pgid
            verb, _, arg = os.fsdecode(raw[:-1]).partition(" ")
            forget = verb.startswith("forget-")
            kind = verb.removeprefix("forget-")
            if kind not in entries or not arg:
                continue
            if forget:
                entries[kind].pop(arg, None)
            else:
                entries[kind][arg] = None
    except _Terminated:
        pass
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pgids = [int(p) for p in entries["pgid"] if p.lstrip("-").isdigit() and int(p) > 1]
        _cleanup(pgids, entries["cmd"], entries["path"])


# --- the parent side --------------------------------------------------------------------


class Reaper:
    """The parent's handle on its watchdog; use :func:`reaper` to get the shared one.

    Everything registered is cleaned up when this Python process ends, however it ends,
    unless it was forgotten first. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._entries: dict[str, dict[str, None]] = {kind: {} for kind in _KINDS}
        self._closed = False

    @property
    def watchdog_pid(self) -> int | None:
        """The watchdog's pid once started."""
        return None if self._proc is None else self._proc.pid

    @property
    def pipe_fd(self) -> int | None:
        """The parent's write end of the pipe (for checks that nobody else holds it)."""
        proc = self._proc
        return None if proc is None or proc.stdin is None else proc.stdin.fileno()

    def watch_process_group(self, pgid: int) -> None:
        """Kill this process group and the descendants of its members at the end."""
        if pgid <= 1:
            raise ValueError(f"refusing to watch process group {pgid}")
        self._update("pgid", str(pgid), forget=False)

    def forget_process_group(self, pgid: int) -> None:
        self._update("pgid", str(pgid), forget=True)

    def watch_path(self, path: str | os.PathLike[str]) -> None:
        """Remove this directory tree (or file) at the end."""
        self._update("path", os.path.abspath(path), forget=False)

    def forget_path(self, path: str | os.PathLike[str]) -> None:
        self._update("path", os.path.abspath(path), forget=True)

    def watch_command(self, argv: Sequence[str]) -> None:
        """Run this command (no shell) at the end, after the kills, before the removals."""
        self._update("cmd", json.dumps([str(a) for a in argv]), forget=False)

    def forget_command(self, argv: Sequence[str]) -> None:
        self._update("cmd", json.dumps([str(a) for a in argv]), forget=True)

    def close(self, timeout: float = 30.0) -> None:
        """Close the pipe and wait for the watchdog to clean up what is still registered."""
        with self._lock:
            self._closed = True
            proc, self._proc = self._proc, None
        if proc is None:
            return
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def _update(self, kind: str, arg: str, *, forget: bool) -> None:
        if "\n" in arg:
            raise ValueError(f"a newline cannot be registered: {arg!r}")
        with self._lock:
            if self._closed:
                raise RuntimeError("the reaper is closed (the interpreter is exiting)")
            if forget:
                if arg not in self._entries[kind]:
                    return
                del self._entries[kind][arg]
            else:
                self._entries[kind][arg] = None
            line = ("forget-" if forget else "") + f"{kind} {arg}\n"
            try:
                self._write(os.fsencode(line))
            except OSError:
                # The watchdog died (someone killed it): start a new one that knows it all.
                self._restart()

    def _write(self, data: bytes) -> None:
        if self._proc is None:
            self._restart()
            return
        assert self._proc.stdin is not None
        fd = self._proc.stdin.fileno()
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]

    def _restart(self) -> None:
        old, self._proc = self._proc, None
        if old is not None:
            if old.stdin is not None:
                with contextlib.suppress(OSError):
                    old.stdin.close()
            with contextlib.suppress(subprocess.TimeoutExpired):
                old.wait(1)
        self._proc = _spawn_watchdog()
        replay = b"".join(
            os.fsencode(f"{kind} {arg}\n") for kind in _KINDS for arg in self._entries[kind]
        )
        if replay:
            self._write(replay)

    def _after_fork_in_child(self) -> None:
        # A forked child must neither hold the parent's pipe open (EOF would never come)
        # nor clean up what the parent registered.
        self._lock = threading.Lock()
        self._entries = {kind: {} for kind in _KINDS}
        if self._proc is not None:
            if self._proc.stdin is not None:
                with contextlib.suppress(OSError):
                    self._proc.stdin.close()
            # Stop Popen.__del__ from warning about a process that is not our child.
            self._proc.returncode = 0
        self._proc = None


def _spawn_watchdog() -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    # The watchdog must import this package even if the parent found it via sys.path tweaks.
    package_root = str(Path(__file__).resolve().parents[2])
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [package_root, env.get("PYTHONPATH")]))
    return subprocess.Popen(
        # Not ``-m``: the package's __init__ imports this module first, and runpy warns.
        [sys.executable, "-c", "from symfo_failover.harness._reaper import main; main()"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        close_fds=True,
        # Its own session: the terminal's ^C and the test runner's group kill miss it.
        start_new_session=True,
        env=env,
    )


_instance: Reaper | None = None
_instance_lock = threading.Lock()


def reaper() -> Reaper:
    """The process-wide :class:`Reaper` (its watchdog starts on first registration)."""
    global _instance
    with _instance_lock:
        if _instance is None:
            _instance = Reaper()
        return _instance


def _after_fork_in_child() -> None:
    global _instance, _instance_lock
    _instance_lock = threading.Lock()
    if _instance is not None:
        _instance._after_fork_in_child()
        _instance = None


def _at_exit() -> None:
    if _instance is not None:
        _instance.close()


os.register_at_fork(after_in_child=_after_fork_in_child)
# Registered at import, before _server registers its own handler: atexit runs handlers
# last-in first-out, so servers stop cleanly before the watchdog reaps the rest.
atexit.register(_at_exit)


if __name__ == "__main__":
    main()
