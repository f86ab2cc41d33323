"""Ask an access point what state it is in, without a driver and without reading text.

A PostgreSQL startup packet is answered before authentication finishes: with an
authentication request when the server accepts sessions, or with an ErrorResponse
whose ``C`` field is the SQLSTATE (57P03 while starting up or shutting down), in
any server language. A refused TCP connection means no node listens.

Given the password, the probe also authenticates (SCRAM-SHA-256 or MD5, never a
cleartext password, never over a channel less protected than libpq would use), and so
learns what the server says *after* authentication: the database is missing (3D000),
the role may not log in (28000), too many clients (53300), or a whole session opens.
A wrong password is 28P01. Drivers cannot tell these apart on a failed connect
(psqlODBC says 08001 for all, psycopg gives no SQLSTATE), and their message text is
in the server's language.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import secrets
import socket
import stringprep
import struct
import unicodedata
from dataclasses import dataclass
from typing import Literal

State = Literal["accepting", "refused", "error", "timeout", "unreachable"]

_PROTOCOL_3 = 196608
_SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_TERMINATE = b"X" + struct.pack("!i", 4)

# Authentication request codes (the int32 after an 'R' message's length).
_AUTH_OK = 0
_AUTH_MD5 = 5
_AUTH_SASL = 10
_AUTH_SASL_CONTINUE = 11
_AUTH_SASL_FINAL = 12

_SCRAM = "SCRAM-SHA-256"
#: 18 random bytes, as libpq's SCRAM_RAW_NONCE_LEN.
_NONCE_BYTES = 18
#: A server asking for more PBKDF2 iterations than this (PostgreSQL's default is 4096)
#: is not answered: the probe must not spend seconds of CPU on a hostile server.
_MAX_ITERATIONS = 1 << 20

#: sslmode values under which libpq may send a password in plaintext over TCP (after
#: the server declines SSL, for allow and prefer).
_PLAINTEXT_OK = frozenset({"disable", "allow", "prefer"})
_NEGOTIATE_SSL = frozenset({"allow", "prefer"})
_LIBPQ_DEFAULT_SSLMODE = "prefer"


@dataclass(frozen=True)
class ProbeResult:
    state: State
    #: The SQLSTATE of the server's ErrorResponse, when ``state == "error"``.
    sqlstate: str | None = None
    #: The server sent AuthenticationOk (after the probe's password, or with ``trust``):
    #: ``sqlstate`` is then its verdict after authentication (3D000, 28000, 53300, ...),
    #: and ``"accepting"`` means a whole session opened. False for ``"accepting"`` means
    #: the server asked for a password the probe did not (or could not) give.
    authenticated: bool = False
    #: The server's ``in_hot_standby`` report (PostgreSQL 14+), seen once a session
    #: opened: True for a standby (which a read-write connection string skips), None
    #: when not seen.
    standby: bool | None = None

    def __str__(self) -> str:
        text = f"{self.state} {self.sqlstate}" if self.sqlstate else self.state
        return text + " (standby)" if self.standby else text


def probe(
    host: str,
    port: int,
    *,
    user: str = "postgres",
    database: str = "postgres",
    timeout: float = 1.0,
    password: str | None = None,
    sslmode: str | None = None,
) -> ProbeResult:
    """One startup exchange with ``host:port``: accepting, refused, error (with SQLSTATE).

    A ``host`` that starts with ``/`` is a Unix-domain socket directory, as in libpq.
    ``timeout`` bounds each connect and each read.

    Without ``password``, a server that asks for one is reported ``"accepting"`` at
    once (the server is up; authentication is not attempted).

    With ``password``, the probe authenticates when the server asks for SCRAM-SHA-256
    (without channel binding) or MD5, and then reads on: ``"error"`` with the SQLSTATE
    the server sends (28P01 wrong password, 3D000 missing database, 28000, 53300,
    57P03, ...) or ``"accepting"`` once a session opened (ended at once with a Terminate
    message); ``authenticated`` tells whether AuthenticationOk was seen. A cleartext
    password request, any other method (GSSAPI, SSPI, ...), a malformed exchange, or a
    server that fails to prove it knows the password (SCRAM server signature) is
    answered with nothing: ``"accepting"``, not authenticated.

    ``sslmode`` decides whether the password may be used at all, so that nothing secret
    ever goes over a channel less protected than the one libpq would use (the probe
    itself never speaks TLS):

    - ``require``, ``verify-ca``, ``verify-full`` (and any unknown value): never
      authenticate over TCP.
    - ``allow``, ``prefer``: send an SSLRequest first. If the server answers ``S`` (it
      supports SSL, so libpq would encrypt), do not authenticate: a fresh connection
      does the plain startup exchange as without a password. If it answers ``N``, go
      on in plaintext and authenticate, as libpq would.
    - ``disable``: authenticate in plaintext, no SSLRequest.
    - ``None``: as libpq, ``PGSSLMODE`` from the environment if set, else libpq's
      built-in default ``prefer``.

    Over a Unix-domain socket libpq ignores ``sslmode`` and never uses SSL; so does the
    probe (no SSLRequest; it authenticates whatever ``sslmode`` says). GSSAPI encryption
    (``gssencmode``) is not negotiated: pass ``sslmode="require"`` where a password must
    only travel encrypted.

    The password is never logged, nor put into a result, a repr or an exception.
    """
    packet = _startup_packet(user, database)
    unix = host.startswith("/")
    # Case as libpq: "Require" is no sslmode libpq knows, so it counts as unknown.
    mode = sslmode or os.environ.get("PGSSLMODE") or _LIBPQ_DEFAULT_SSLMODE
    credentials: _Credentials | None = None
    if password is not None and (unix or mode in _PLAINTEXT_OK):
        credentials = _Credentials.make(user, password)
    try:
        if credentials is not None and not unix and mode in _NEGOTIATE_SSL:
            with _open(host, port, timeout) as sock:
                sock.sendall(_SSL_REQUEST)
                if _read_exactly(sock, 1) == b"N":
                    sock.sendall(packet)
                    return _answer(sock, credentials)
            # 'S': the server expects a TLS handshake now. libpq would encrypt, so the
            # password is not used: a fresh connection asks as without one.
            credentials = None
        with _open(host, port, timeout) as sock:
            sock.sendall(packet)
            return _answer(sock, credentials)
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


def _startup_packet(user: str, database: str) -> bytes:
    params = b"".join(
        k.encode() + b"\0" + v.encode() + b"\0"
        for k, v in (("user", user), ("database", database), ("application_name", "probe"))
    ) + b"\0"
    return struct.pack("!ii", 8 + len(params), _PROTOCOL_3) + params


class _Credentials:
    """The user name and password bytes for one probe; shows neither in its repr."""

    __slots__ = ("password", "user")

    def __init__(self, user: bytes, password: bytes) -> None:
        self.user = user
        self.password = password

    @classmethod
    def make(cls, user: str, password: str) -> _Credentials | None:
        try:
            # surrogateescape: a password read from bytes (environment, file) goes
            # out as those bytes, as libpq would send them.
            secret = password.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            # The exception would carry the password: not usable, not propagated.
            return None
        return cls(user.encode(), secret)

    def __repr__(self) -> str:
        return "<_Credentials>"


def _answer(sock: socket.socket, credentials: _Credentials | None = None) -> ProbeResult:
    authenticated = False
    answered = False  # a password response was sent: only one per probe
    scram: ScramClient | None = None
    standby: bool | None = None
    while True:
        head = _read_exactly(sock, 5)
        kind, length = head[:1], struct.unpack("!i", head[1:])[0]
        body = _read_exactly(sock, min(max(length - 4, 0), 1 << 16))
        if kind == b"E":
            return ProbeResult("error", _error_field(body, b"C"), authenticated)
        if kind == b"Z":  # ReadyForQuery: a whole session was opened
            _terminate(sock)
            return ProbeResult("accepting", authenticated=authenticated, standby=standby)
        if kind == b"S" and authenticated:  # ParameterStatus: name NUL value NUL
            name, _, rest = body.partition(b"\0")
            if name == b"in_hot_standby":
                standby = rest.split(b"\0", 1)[0] == b"on"
            continue
        if kind == b"R":
            code = struct.unpack("!i", body[:4])[0] if len(body) >= 4 else -1
            if code == _AUTH_OK and not authenticated:
                if scram is not None and not scram.verified:
                    # AuthenticationOk before the server proved it knows the password:
                    # nothing it says next can be trusted.
                    return ProbeResult("accepting")
                # Read on: the session may still be refused because the database is
                # missing or there are too many clients.
                authenticated = True
                continue
            if credentials is None or authenticated:
                # A password is asked for: the server accepts sessions.
                return ProbeResult("accepting")
            try:
                if code == _AUTH_MD5 and not answered and len(body) >= 8:
                    response = _md5_response(credentials, body[4:8])
                    if response is not None:
                        sock.sendall(_password_message(response))
                        answered = True
                        continue
                if code == _AUTH_SASL and not answered and _SCRAM in _mechanisms(body[4:]):
                    scram = ScramClient(credentials.password)
                    sock.sendall(_sasl_initial_response(_SCRAM, scram.client_first()))
                    answered = True
                    continue
                if code == _AUTH_SASL_CONTINUE and scram is not None and not scram.finished:
                    sock.sendall(_password_message(scram.client_final(body[4:])))
                    continue
                if code == _AUTH_SASL_FINAL and scram is not None and (
                    scram.finished and scram.verify_server_final(body[4:])
                ):
                    continue
            except ScramError:
                pass
            # Cleartext, GSSAPI, SSPI, a mechanism not offered, a malformed or
            # unverifiable exchange: the server is up, the probe says no more.
            return ProbeResult("accepting")
        if kind not in b"SKN":
            return ProbeResult("error")


def _terminate(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.sendall(_TERMINATE)


def _password_message(data: bytes) -> bytes:
    """A 'p' message (PasswordMessage, SASLResponse) carrying ``data``."""
    return b"p" + struct.pack("!i", 4 + len(data)) + data


def _sasl_initial_response(mechanism: str, data: bytes) -> bytes:
    return _password_message(mechanism.encode() + b"\0" + struct.pack("!i", len(data)) + data)


def _mechanisms(data: bytes) -> list[str]:
    return [m.decode("ascii", "replace") for m in data.split(b"\0") if m]


def _md5_response(credentials: _Credentials, salt: bytes) -> bytes | None:
    """``"md5" + md5(md5(password + user).hexdigest() + salt).hexdigest()``, NUL-ended;
    None where MD5 is not available (a FIPS build)."""
    try:
        inner = hashlib.md5(credentials.password + credentials.user).hexdigest()
        outer = hashlib.md5(inner.encode("ascii") + salt).hexdigest()
    except ValueError:
        return None
    return b"md5" + outer.encode("ascii") + b"\0"


# --- SCRAM-SHA-256 (RFC 5802, RFC 7677), as PostgreSQL does it --------------------------


class ScramError(ValueError):
    """A malformed or unacceptable SCRAM message from the server (never says the password)."""


class ScramClient:
    """The client side of one SCRAM-SHA-256 exchange, without I/O.

    PostgreSQL takes the user name from the startup packet and ignores the SCRAM one,
    so libpq sends ``n=`` empty; ``user`` is there for the RFC's test vectors. No
    channel binding (``n,,``): the probe never speaks TLS.
    """

    __slots__ = ("_auth_message", "_first_bare", "_nonce", "_password", "_salted",
                 "finished", "verified")

    def __init__(self, password: bytes, *, nonce: str | None = None, user: str = "") -> None:
        self._password = _saslprep(password)
        self._nonce = nonce if nonce is not None else base64.b64encode(
            secrets.token_bytes(_NONCE_BYTES)).decode("ascii")
        self._first_bare = f"n={_scram_name(user)},r={self._nonce}"
        self._salted = b""
        self._auth_message = b""
        self.finished = False  # the client-final message was made
        self.verified = False  # the server's signature was checked and is right

    def __repr__(self) -> str:
        return f"<ScramClient finished={self.finished} verified={self.verified}>"

    def client_first(self) -> bytes:
        return b"n,," + self._first_bare.encode("ascii")

    def client_final(self, server_first: bytes) -> bytes:
        """The client-final message, with the proof, for the server-first message."""
        try:
            text = server_first.decode("ascii")
        except UnicodeDecodeError:
            raise ScramError("server-first message is not ASCII") from None
        attrs = text.split(",")
        if len(attrs) < 3 or [a[:2] for a in attrs[:3]] != ["r=", "s=", "i="]:
            raise ScramError("malformed server-first message")
        nonce, salt_b64, iterations_s = (a[2:] for a in attrs[:3])
        if not nonce.startswith(self._nonce) or len(nonce) <= len(self._nonce):
            raise ScramError("the server nonce does not extend the client nonce")
        try:
            salt = base64.b64decode(salt_b64, validate=True)
        except ValueError:
            raise ScramError("the salt is not base64") from None
        if not salt or not iterations_s.isdigit():
            raise ScramError("malformed salt or iteration count")
        iterations = int(iterations_s)
        if not 1 <= iterations <= _MAX_ITERATIONS:
            raise ScramError(f"iteration count {iterations} refused")
        self._salted = hashlib.pbkdf2_hmac("sha256", self._password, salt, iterations)
        without_proof = f"c=biws,r={nonce}"
        self._auth_message = ",".join((self._first_bare, text, without_proof)).encode("ascii")
        client_key = _hmac(self._salted, b"Client Key")
        signature = _hmac(hashlib.sha256(client_key).digest(), self._auth_message)
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        self.finished = True
        return f"{without_proof},p={base64.b64encode(proof).decode('ascii')}".encode("ascii")

    def verify_server_final(self, server_final: bytes) -> bool:
        """Whether the server-final message carries the right server signature."""
        if not self.finished or not server_final.startswith(b"v="):
            return False
        try:
            signature = base64.b64decode(server_final[2:].split(b",")[0], validate=True)
        except ValueError:
            return False
        expected = _hmac(_hmac(self._salted, b"Server Key"), self._auth_message)
        self.verified = hmac.compare_digest(signature, expected)
        return self.verified


def _hmac(key: bytes, message: bytes) -> bytes:
    return hmac.new(key, message, hashlib.sha256).digest()


def _scram_name(name: str) -> str:
    return name.replace("=", "=3D").replace(",", "=2C")


def _saslprep(password: bytes) -> bytes:
    """The password as PostgreSQL's pg_saslprep prepares it (RFC 4013 SASLprep).

    ASCII passwords are used as they are; others are mapped, NFKC-normalised and checked;
    a password that is not valid UTF-8 or not allowed by SASLprep is used as raw bytes,
    as libpq and the server both do.
    """
    if password.isascii():
        return password
    try:
        text = password.decode("utf-8")
    except UnicodeDecodeError:
        return password
    mapped = "".join(
        " " if stringprep.in_table_c12(c) else c for c in text if not stringprep.in_table_b1(c)
    )
    prepared = unicodedata.normalize("NFKC", mapped)
    prohibited = (
        stringprep.in_table_a1, stringprep.in_table_c12, stringprep.in_table_c21_c22,
        stringprep.in_table_c3, stringprep.in_table_c4, stringprep.in_table_c5,
        stringprep.in_table_c6, stringprep.in_table_c7, stringprep.in_table_c8,
        stringprep.in_table_c9,
    )
    if not prepared or any(check(c) for c in prepared for check in prohibited):
        return password
    if any(stringprep.in_table_d1(c) for c in prepared) and (
        any(stringprep.in_table_d2(c) for c in prepared)
        or not stringprep.in_table_d1(prepared[0])
        or not stringprep.in_table_d1(prepared[-1])
    ):
        return password
    return prepared.encode("utf-8")


# --- sockets -----------------------------------------------------------------------------


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
