"""A real network partition: the kernel drops the packets of one loopback address and port.

Unlike a proxy that closes sockets, a dropped packet tells nobody anything: the client
only notices through its own TCP keepalives or timeouts, as on a real network when a
switch or a cable fails. Needs root and ``iptables``; the rules carry a comment naming
this process so that they are never confused with anyone else's, and the reaper removes
them even if the Python process is killed.
"""

from __future__ import annotations

import contextlib
import ipaddress
import itertools
import os
import shutil
import subprocess
import threading
from types import TracebackType

from ._reaper import reaper
from ._server import _check_loopback

_counter = itertools.count(1)
_counter_lock = threading.Lock()


class PartitionUnavailable(RuntimeError):
    """A kernel partition cannot be made here (not root, no iptables, no permission)."""


def partition_available() -> tuple[bool, str]:
    """Whether `Partition` can work here, and if not, why."""
    if os.geteuid() != 0:
        return False, "a kernel partition needs root (iptables); run the tests as root"
    if shutil.which("iptables") is None:
        return False, "iptables is not installed (Debian: apt-get install iptables)"
    probe = subprocess.run(
        ["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True, check=False
    )
    if probe.returncode != 0:
        return False, f"iptables does not work here: {probe.stderr.strip()}"
    return True, ""


class Partition:
    """Drop every packet to and from ``host:port`` on the loopback interface.

    ``start()`` cuts, ``heal()`` restores; both are idempotent and it is a context
    manager. Established sessions stay open on both sides but nothing gets through,
    and new connections hang in SYN until the client's connect timeout.
    """

    def __init__(self, host: str, port: int) -> None:
        _check_loopback(host)
        if ipaddress.ip_address(host).version != 4:
            raise ValueError("only IPv4 loopback addresses are supported")
        self.host = host
        self.port = port
        with _counter_lock:
            serial = next(_counter)
        self._tag = f"symfo-failover:{os.getpid()}:{serial}"
        self._rules = [
            ["INPUT", "-i", "lo", "-p", "tcp", "-d", host, "--dport", str(port)],
            ["INPUT", "-i", "lo", "-p", "tcp", "-s", host, "--sport", str(port)],
        ]
        self._lock = threading.Lock()
        self._active = False

    @property
    def active(self) -> bool:
        return self._active

    def _argv(self, action: str, rule: list[str]) -> list[str]:
        return [
            "iptables", "-w", action, *rule,
            "-m", "comment", "--comment", self._tag, "-j", "DROP",
        ]

    def start(self) -> Partition:
        """Cut the network to ``host:port``."""
        ok, why = partition_available()
        if not ok:
            raise PartitionUnavailable(why)
        with self._lock:
            if self._active:
                return self
            added: list[list[str]] = []
            try:
                for rule in self._rules:
                    # Registered before it exists: a kill between the two must not leak it.
                    reaper().watch_command(self._argv("-D", rule))
                    _run(self._argv("-I", rule))
                    added.append(rule)
            except BaseException:
                for rule in added:
                    with contextlib.suppress(Exception):
                        _run(self._argv("-D", rule))
                for rule in self._rules:
                    reaper().forget_command(self._argv("-D", rule))
                raise
            self._active = True
        return self

    def heal(self) -> None:
        """Let packets through again."""
        with self._lock:
            if not self._active:
                return
            for rule in self._rules:
                with contextlib.suppress(subprocess.CalledProcessError):
                    _run(self._argv("-D", rule))
                reaper().forget_command(self._argv("-D", rule))
            self._active = False

    close = heal

    def __enter__(self) -> Partition:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.heal()

    def __repr__(self) -> str:
        return f"<Partition {self.host}:{self.port} {'active' if self._active else 'healed'}>"


def leftover_rules() -> list[str]:
    """Rules of ours still in the INPUT chain (any process): for tests and operators."""
    if shutil.which("iptables") is None:
        return []
    out = subprocess.run(
        ["iptables", "-w", "-S", "INPUT"], capture_output=True, text=True, check=False
    ).stdout
    return [line for line in out.splitlines() if "symfo-failover:" in line]


def _run(argv: list[str]) -> None:
    subprocess.run(argv, capture_output=True, text=True, check=True, timeout=30)


def unacked_segments(fileno: int) -> int:
    """Segments sent on the TCP socket ``fileno`` that the peer has not acknowledged
    (Linux ``TCP_INFO``'s ``tcpi_unacked``). A test waits for 0 before it cuts the
    network, so that what keepalives see is an idle session, not a retransmission."""
    import socket
    import struct

    sock = socket.socket(fileno=fileno)
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104)
    finally:
        sock.detach()
    return int(struct.unpack_from("I", info, 24)[0])
