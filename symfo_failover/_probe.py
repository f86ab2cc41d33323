"""Ask an access point what state it is in, without a driver and without reading text.

A PostgreSQL startup packet is answered before authentication finishes: with an
authentication request when the server accepts sessions, or with an ErrorResponse
whose ``C`` field is the SQLSTATE (57P03 while starting up or shutting down), in
any server language. A refused TCP connection means no node listens.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Literal

State = Literal["accepting", "refused", "error", "timeout", "unreachable"]

_PROTOCOL_3 = 196608
_AUTH_OK = struct.pack("!i", 0)


@dataclass(frozen=True)
class ProbeResult:
    state: State
    #: The SQLSTATE of the server's ErrorResponse, when ``state == "error"``.
    sqlstate: str | None = None

    def __str__(self) -> str:
        return f"{self.state} {self.sqlstate}" if self.sqlstate else self.state


def probe(
    host: str,
    port: int,
    *,
    user: str = "postgres",
    database: str = "postgres",
    timeout: float = 1.0,
) -> ProbeResult:
    """One startup exchange with ``host:port``: accepting, refused, error (with SQLSTATE).

    A ``host`` that starts with ``/`` is a Unix-domain socket directory, as in libpq.
    """
    params = b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database), ("application_name", "probe"))
    ) + b"\0"
    packet = struct.pack("!ii", 8 + len(params), _PROTOCOL_3) + params
    try:
        with _open(host, port, timeout) as sock:
            sock.sendall(packet)
            return _answer(sock)
    except (ConnectionRefusedError, FileNotFoundError):
        return ProbeResult("refused")
    except TimeoutError:
        return ProbeResult("timeout")
    except (ConnectionError, EOFError):
        # Accepted then closed without an answer: a server going away.
        return ProbeResult("refused")
    except OSError:
        # No route, unknown host name, bad socket path: nothing to talk to.
        return ProbeResult("unreachable")


def _answer(sock: socket.socket) -> ProbeResult:
    while True:
        head = _read_exactly(sock, 5)
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        body = _read_exactly(sock, min(max(length - 4, 0), 1 << 16))
        if kind == b"E":
            return ProbeResult("error", _error_field(body, b"C"))
        if kind == b"Z":  # ReadyForQuery: a whole session was opened
            return ProbeResult("accepting")
        if kind == b"R" and body[:4] != _AUTH_OK:
            # A password is asked for: the server accepts sessions. (After
            # AuthenticationOk, with trust, read on: the session may still be refused
            # because the database is missing or there are too many clients.)
            return ProbeResult("accepting")
        if kind not in b"RSKN":
            return ProbeResult("error")


def _open(host: str, port: int, timeout: float) -> socket.socket:
    if host.startswith("/"):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(f"{host.rstrip('/')}/.s.PGSQL.{port}")
        except BaseException:
            sock.close()
            raise
        return sock
    return socket.create_connection((host, port), timeout=timeout)


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _error_field(body: bytes, code: bytes) -> str | None:
    for field in body.split(b"\0"):
        if field[:1] == code:
            return field[1:].decode("ascii", "replace")
    return None
