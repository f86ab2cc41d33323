"""A TCP proxy that knows PostgreSQL's message framing well enough to break sessions on purpose.

It sits between real clients and a server (or a cluster's access point) and can cut every
connection, delay or hold the traffic, refuse new connections, and make a COMMIT's outcome
unknown to the client: either the server commits and the reply is lost
(`FaultProxy.arm_commit_drop`), or the COMMIT never arrives and the old session stays open,
idle in its transaction (`FaultProxy.arm_commit_hold`).

One background thread runs an asyncio event loop for every connection. The protocol logic
(`_FrontendParser`, `_BackendScanner`, `is_commit_sql`) does no I/O.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from enum import Enum
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from ._server import _check_loopback

__all__ = ["FaultProxy", "ProxyStats"]

_T = TypeVar("_T")

# Startup-phase request codes (the second int32 of an untyped packet).
_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
# Client messages whose content matters; all others are streamed without being held back.
_INSPECTED = frozenset(b"QPBECSHF")
_READY_FOR_QUERY = ord("Z")
# Answers to SSLRequest / GSSENCRequest after which the stream is encrypted.
_ENCRYPTED_ANSWERS = frozenset(b"SG")
_RST_LINGER = struct.pack("ii", 1, 0)
_CONTROL_TIMEOUT = 30.0
_SHUTDOWN_GRACE = 2.0
# asyncio runs a timer up to one clock tick early.
_CLOCK_TICK = time.get_clock_info("monotonic").resolution

_COMMIT_SQL = re.compile(
    r"\s*(?:commit|end)(?:\s+(?:work|transaction))?(?:\s+and\s+(?:no\s+)?chain)?\s*;?\s*",
    re.IGNORECASE,
)


def is_commit_sql(sql: str) -> bool:
    """Whether ``sql`` is one statement that commits: COMMIT, END (not COMMIT PREPARED)."""
    return _COMMIT_SQL.fullmatch(sql) is not None


def _commit_text(query: bytes) -> bool:
    return is_commit_sql(query.decode("utf-8", errors="replace"))


@dataclass(frozen=True)
class ProxyStats:
    """Counters of a `FaultProxy`.

    ``connections_open`` counts proxied connections with a socket still open, held server
    sides included; rejected connections count only in ``connections_rejected``. Bytes
    are those forwarded (``up``: to the server), after faults.
    """

    connections_accepted: int = 0
    connections_rejected: int = 0
    connections_open: int = 0
    commits_seen: int = 0
    commits_dropped: int = 0
    commits_held: int = 0
    bytes_up: int = 0
    bytes_down: int = 0


# --- protocol logic, no I/O ----------------------------------------------------------------


class _Phase(Enum):
    STARTUP = "startup"  # untyped packets: length, then payload
    TYPED = "typed"  # one type byte, then length
    BLIND = "blind"  # encrypted or not PostgreSQL: passed through unparsed


class _Message(NamedTuple):
    type: bytes  # b"" for a startup-phase packet
    body: bytes


class _Segment(NamedTuple):
    data: bytes
    message: _Message | None  # set when ``data`` is one whole inspected message


class _FrontendParser:
    """Splits the client's stream at message boundaries.

    Inspected messages (`_INSPECTED`, startup packets) come out whole; the others are
    streamed in pieces as they arrive, so that large CopyData never waits.
    """

    def __init__(self) -> None:
        self.phase = _Phase.STARTUP
        self._pending = bytearray()  # an incomplete header or inspected message
        self._need = 0  # size of the inspected message being collected; 0: header first
        self._stream_left = 0  # bytes of a streamed message still to pass

    def go_blind(self) -> None:
        self.phase = _Phase.BLIND

    def feed(self, data: bytes) -> list[_Segment]:
        out: list[_Segment] = []
        view = memoryview(data)
        i, n = 0, len(data)
        while i < n:
            if self.phase is _Phase.BLIND:
                out.append(_Segment(bytes(self._pending) + bytes(view[i:]), None))
                self._pending.clear()
                break
            if self._stream_left:
                take = min(self._stream_left, n - i)
                out.append(_Segment(bytes(view[i : i + take]), None))
                i += take
                self._stream_left -= take
                continue
            if not self._need:
                header = 4 if self.phase is _Phase.STARTUP else 5
                take = min(header - len(self._pending), n - i)
                self._pending += view[i : i + take]
                i += take
                if len(self._pending) < header:
                    break
                length = int.from_bytes(self._pending[header - 4 : header], "big")
                if length < (8 if self.phase is _Phase.STARTUP else 4):
                    self.phase = _Phase.BLIND  # not PostgreSQL framing: stop interpreting
                    continue
                total = length + header - 4
                if self.phase is _Phase.TYPED and self._pending[0] not in _INSPECTED:
                    out.append(_Segment(bytes(self._pending), None))
                    self._pending.clear()
                    self._stream_left = total - header
                    continue
                self._need = total
            take = min(self._need - len(self._pending), n - i)
            self._pending += view[i : i + take]
            i += take
            if len(self._pending) == self._need:
                raw = bytes(self._pending)
                self._pending.clear()
                self._need = 0
                out.append(_Segment(raw, self._message(raw)))
        return out

    def _message(self, raw: bytes) -> _Message:
        if self.phase is _Phase.STARTUP:
            code = int.from_bytes(raw[4:8], "big")
            if code == _CANCEL_REQUEST:
                self.phase = _Phase.BLIND  # the server answers nothing, just closes
            elif code not in (_SSL_REQUEST, _GSSENC_REQUEST):
                self.phase = _Phase.TYPED  # the StartupMessage
            return _Message(b"", raw[4:])
        return _Message(raw[:1], raw[5:])


class _BackendScanner:
    """Finds where each ReadyForQuery ends in the server's stream, without copying it."""

    def __init__(self) -> None:
        self.blind = False
        self._answers = 0  # one-byte answers expected (to SSLRequest / GSSENCRequest)
        self._header = bytearray()
        self._skip = 0
        self._type = 0

    def expect_answer(self) -> None:
        self._answers += 1

    def feed(self, data: bytes) -> list[int]:
        """Offsets in ``data`` just after each ReadyForQuery message."""
        ends: list[int] = []
        i, n = 0, len(data)
        while i < n and not self.blind:
            if self._skip:
                take = min(self._skip, n - i)
                i += take
                self._skip -= take
                if not self._skip and self._type == _READY_FOR_QUERY:
                    ends.append(i)
            elif self._answers:
                self._answers -= 1
                self.blind = data[i] in _ENCRYPTED_ANSWERS
                i += 1
            else:
                take = min(5 - len(self._header), n - i)
                self._header += data[i : i + take]
                i += take
                if len(self._header) == 5:
                    self._type = self._header[0]
                    self._skip = int.from_bytes(self._header[1:5], "big") - 4
                    self._header.clear()
                    if self._skip < 0:
                        self.blind = True
                    elif not self._skip and self._type == _READY_FOR_QUERY:
                        ends.append(i)
        return ends


def _cstrings(body: bytes, count: int) -> list[bytes]:
    parts = body.split(b"\0", count)
    return parts[:count] + [b""] * (count - len(parts[:count]))


# --- the event loop side -------------------------------------------------------------------


class _Fault(Enum):
    DROP = "drop"
    HOLD = "hold"


def _reset(transport: asyncio.BaseTransport | None) -> None:
    """Close at once with an RST (SO_LINGER 0), as a broken network would."""
    if transport is None or transport.is_closing():
        return
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RST_LINGER)
    assert isinstance(transport, asyncio.Transport)
    transport.abort()


class _Pipe:
    """One direction of one connection: applies latency and pause, keeps the order."""

    def __init__(self, core: _Core, upstream: bool) -> None:
        self._core = core
        self._upstream = upstream
        self._queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._last_due = 0.0
        self._close_when_drained = False

    def attach(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self.flush()

    def detach(self) -> None:
        self._transport = None
        self._queue.clear()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def push(self, data: bytes) -> None:
        if not data:
            return
        core = self._core
        if (
            not self._queue
            and not core.paused
            and core.latency <= 0
            and self._transport is not None
        ):
            self._write(data)
            return
        # Never earlier than what is queued: lowering the latency must not reorder.
        due = max(core.loop.time() + core.latency, self._last_due)
        self._last_due = due
        self._queue.append((due, data))
        if self._timer is None:
            self.flush()

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        transport = self._transport
        if transport is None or self._core.paused:
            return
        loop = self._core.loop
        now = loop.time() + _CLOCK_TICK
        while self._queue and self._queue[0][0] <= now:
            self._write(self._queue.popleft()[1])
        if self._queue:
            self._timer = loop.call_at(self._queue[0][0], self.flush)
        elif self._close_when_drained and self._transport is not None:
            self._transport.close()

    def close_when_drained(self) -> None:
        self._close_when_drained = True
        if not self._queue and self._transport is not None:
            self._transport.close()

    def _write(self, data: bytes) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        transport.write(data)
        if self._upstream:
            self._core.bytes_up += len(data)
        else:
            self._core.bytes_down += len(data)


class _Session:
    """One client connection and its connection to the target."""

    def __init__(self, core: _Core, client: asyncio.Transport) -> None:
        self.core = core
        self.client: asyncio.Transport | None = client
        self.server: asyncio.Transport | None = None
        self.up = _Pipe(core, upstream=True)
        self.down = _Pipe(core, upstream=False)
        self.down.attach(client)
        self.front = _FrontendParser()
        self.back = _BackendScanner()
        self.done: asyncio.Future[None] = core.loop.create_future()
        # Requests that each get one ReadyForQuery: the startup, Query, Sync, FunctionCall.
        self.requests = 0
        self.replies = 0
        self.commit_statements: set[bytes] = set()
        self.commit_portals: set[bytes] = set()
        # An extended-protocol exchange that may be a COMMIT, withheld until its Sync.
        self.batch: bytearray | None = None
        self.batch_commits = False
        self.fault: _Fault | None = None
        self.fault_done = False
        self.drop_at = 0
        host, port = core.target
        self.connecting: asyncio.Task[Any] | None = core.loop.create_task(
            core.loop.create_connection(lambda: _ServerSide(self), host, port)
        )
        # A callback, not a try/finally: a task cancelled before it ran never runs its body.
        self.connecting.add_done_callback(self._connect_done)

    # --- connecting and closing ---

    def _connect_done(self, task: asyncio.Task[Any]) -> None:
        self.connecting = None
        if task.cancelled() or task.exception() is not None:
            _reset(self.client)  # the target refused: the client sees its connection fail
        self._check_finished()

    def server_made(self, transport: asyncio.Transport) -> None:
        if self.client is None:  # the client left while we were connecting
            transport.close()
            return
        self.server = transport
        self.up.attach(transport)

    def client_lost(self) -> None:
        self.client = None
        self.down.detach()
        if self.fault is None:
            if self.connecting is not None:
                self.connecting.cancel()
            self.up.close_when_drained()
        # A dropped COMMIT keeps its server side until the reply came (the commit must
        # really happen); a held one keeps it until release_held().
        self._check_finished()

    def server_lost(self) -> None:
        self.server = None
        self.up.detach()
        if self.fault is _Fault.DROP:
            self._finish_fault()
            _reset(self.client)
        elif self.fault is None:
            self.down.close_when_drained()
        self._check_finished()

    def cut(self) -> None:
        if self.connecting is not None:
            self.connecting.cancel()
        self.up.detach()
        self.down.detach()
        _reset(self.client)
        _reset(self.server)
        self._check_finished()

    def _check_finished(self) -> None:
        if self.client is None and self.server is None and self.connecting is None:
            if self.fault is not None:
                self._finish_fault()
            if not self.done.done():
                self.done.set_result(None)
            self.core.sessions.discard(self)

    def _finish_fault(self) -> None:
        if self.fault is None or self.fault_done:
            return
        self.fault_done = True
        if self.fault is _Fault.DROP:
            self.core.commits_dropped += 1
        self.core.fault_fired()

    # --- client to server ---

    def client_data(self, data: bytes) -> None:
        for segment in self.front.feed(data):
            if self.fault is not None:
                return  # the client is being cut; what it says now goes nowhere
            self._from_client(segment)

    def _from_client(self, segment: _Segment) -> None:
        message = segment.message
        if message is not None:
            kind, body = message
            if kind == b"":
                if int.from_bytes(body[:4], "big") in (_SSL_REQUEST, _GSSENC_REQUEST):
                    self.back.expect_answer()
                elif self.front.phase is _Phase.TYPED:
                    self.requests += 1
            elif kind == b"Q":
                self.requests += 1
                self.commit_statements.discard(b"")  # a Query ends the unnamed statement
                if self.batch is None and _commit_text(_cstrings(body, 1)[0]):
                    self._commit(segment.data)
                    return
            elif kind == b"P":
                name, query = _cstrings(body, 2)
                self._track(self.commit_statements, name, _commit_text(query))
            elif kind == b"B":
                portal, statement = _cstrings(body, 2)
                self._track(self.commit_portals, portal, statement in self.commit_statements)
            elif kind == b"E":
                if _cstrings(body, 1)[0] in self.commit_portals:
                    self._begin_batch()
                    if self.batch is None:
                        self.core.commits_seen += 1  # no fault armed: just count it
                    else:
                        self.batch_commits = True
            elif kind == b"C":
                names = self.commit_statements if body[:1] == b"S" else self.commit_portals
                names.discard(_cstrings(body[1:], 1)[0])
            elif kind == b"S":
                self.requests += 1
                if self.batch is not None:
                    self.batch += segment.data
                    self._end_batch()
                    return
            elif kind == b"H" and self.batch is not None:
                # The client waits for results before its Sync: it can't be withheld.
                self.batch += segment.data
                batch, self.batch = bytes(self.batch), None
                self.core.commits_seen += int(self.batch_commits)
                self.batch_commits = False
                self.up.push(batch)
                return
            elif kind == b"F":
                self.requests += 1
        if self.batch is not None:
            self.batch += segment.data
        else:
            self.up.push(segment.data)

    def _track(self, names: set[bytes], name: bytes, commits: bool) -> None:
        if commits:
            names.add(name)
            self._begin_batch()
        else:
            names.discard(name)

    def _begin_batch(self) -> None:
        # Withheld from the first message that concerns a COMMIT, so that a held session
        # is left "idle in transaction", not in the middle of an extended exchange.
        if self.batch is None and self.core.armed:
            self.batch = bytearray()
            self.batch_commits = False

    def _end_batch(self) -> None:
        assert self.batch is not None
        batch, commits = bytes(self.batch), self.batch_commits
        self.batch, self.batch_commits = None, False
        if commits:
            self._commit(batch)
        else:
            self.up.push(batch)  # e.g. only a prepared COMMIT statement, not executed

    def _commit(self, data: bytes) -> None:
        """``data`` ends with the message after which the server commits and answers."""
        self.core.commits_seen += 1
        fault = self.core.armed.popleft() if self.core.armed else None
        if fault is None:
            self.up.push(data)
        elif fault is _Fault.DROP:
            self.fault = fault
            self.drop_at = self.requests
            self.up.push(data)
        else:
            self.fault = fault
            self.core.commits_held += 1
            self.core.fault_fired()
            self.fault_done = True
            self.down.detach()
            _reset(self.client)

    # --- server to client ---

    def server_data(self, data: bytes) -> None:
        ends = self.back.feed(data)
        if self.back.blind:
            self.front.go_blind()
        if self.fault is None:
            self.replies += len(ends)
            self.down.push(data)
        elif self.fault is _Fault.DROP and not self.fault_done:
            self._drop_reply(data, ends)
        # A held session's server side only ever says something after release: ignored.

    def _drop_reply(self, data: bytes, ends: list[int]) -> None:
        # Replies to requests before the COMMIT still reach the client; the COMMIT's not.
        keep = len(data) if self.replies < self.drop_at - 1 else 0
        for end in ends:
            self.replies += 1
            if self.replies == self.drop_at - 1:
                keep = end
            if self.replies >= self.drop_at:
                break
        self.down.push(data[:keep])
        if self.replies >= self.drop_at:
            self._finish_fault()
            self.down.detach()
            _reset(self.client)
            if self.server is not None:
                self.server.close()  # the server committed; its session ends normally


class _ClientSide(asyncio.Protocol):
    def __init__(self, core: _Core) -> None:
        self.core = core
        self.session: _Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.session = self.core.accept(transport)

    def data_received(self, data: bytes) -> None:
        if self.session is not None:
            self.session.client_data(data)

    def eof_received(self) -> bool:
        return False  # PostgreSQL has no half-closed sessions: close both ways

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.client_lost()

    # The other side's write buffer is full: stop reading this one.
    def pause_writing(self) -> None:
        if self.session is not None and self.session.server is not None:
            self.session.server.pause_reading()

    def resume_writing(self) -> None:
        if self.session is not None and self.session.server is not None:
            self.session.server.resume_reading()


class _ServerSide(asyncio.Protocol):
    def __init__(self, session: _Session) -> None:
        self.session = session

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.session.server_made(transport)

    def data_received(self, data: bytes) -> None:
        self.session.server_data(data)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session.server is not None:
            self.session.server_lost()

    def pause_writing(self) -> None:
        if self.session.client is not None:
            self.session.client.pause_reading()

    def resume_writing(self) -> None:
        if self.session.client is not None:
            self.session.client.resume_reading()


class _Core:
    """Everything that lives in the event loop. Touched from the loop's thread only."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        target: tuple[str, int],
        fault_fired: Callable[[], None],
    ) -> None:
        self.loop = loop
        self.target = target
        self.fault_fired = fault_fired
        self.server: asyncio.Server | None = None
        self.sessions: set[_Session] = set()
        self.armed: collections.deque[_Fault] = collections.deque()
        self.latency = 0.0
        self.paused = False
        self.reject = False
        self.accepted = 0
        self.rejected = 0
        self.commits_seen = 0
        self.commits_dropped = 0
        self.commits_held = 0
        self.bytes_up = 0
        self.bytes_down = 0

    async def listen(self, host: str, port: int) -> int:
        self.server = await self.loop.create_server(
            lambda: _ClientSide(self), host, port, backlog=1024
        )
        return int(self.server.sockets[0].getsockname()[1])

    def accept(self, transport: asyncio.Transport) -> _Session | None:
        if self.reject:
            self.rejected += 1
            _reset(transport)
            return None
        self.accepted += 1
        session = _Session(self, transport)
        self.sessions.add(session)
        return session

    def set_paused(self, paused: bool) -> None:
        self.paused = paused
        if not paused:
            for session in list(self.sessions):
                session.up.flush()
                session.down.flush()

    def held(self) -> list[_Session]:
        return [s for s in self.sessions if s.fault is _Fault.HOLD and s.server is not None]

    async def cut(self) -> int:
        victims = [s for s in self.sessions if s.fault is not _Fault.HOLD]
        for session in victims:
            session.cut()
        await self._settle(victims)
        return len(victims)

    async def release_held(self) -> int:
        held = self.held()
        for session in held:
            session.up.detach()
            if session.server is not None:
                session.server.close()
        await self._settle(held)
        return len(held)

    async def shutdown(self) -> None:
        if self.server is not None:
            self.server.close()
        sessions = list(self.sessions)
        for session in sessions:
            session.cut()
        await self._settle(sessions)

    async def _settle(self, sessions: list[_Session]) -> None:
        # Closing takes effect on the loop's next turns; return when the sockets are gone.
        pending = [s.done for s in sessions if not s.done.done()]
        if pending:
            await asyncio.wait(pending, timeout=_SHUTDOWN_GRACE)

    def stats(self) -> ProxyStats:
        return ProxyStats(
            connections_accepted=self.accepted,
            connections_rejected=self.rejected,
            connections_open=len(self.sessions),
            commits_seen=self.commits_seen,
            commits_dropped=self.commits_dropped,
            commits_held=self.commits_held,
            bytes_up=self.bytes_up,
            bytes_down=self.bytes_down,
        )


# --- the thread-safe controller ------------------------------------------------------------


class FaultProxy:
    """A fault-injecting TCP proxy on loopback in front of a PostgreSQL server.

    Clients connect to ``host:port``; every control method is thread-safe and has taken
    effect when it returns.
    """

    def __init__(
        self, target_host: str, target_port: int, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        _check_loopback(host)
        _check_loopback(target_host)
        self.host = host
        self.port = port
        self._target = (target_host, target_port)
        self._lock = threading.Lock()
        self._faults = threading.Condition()
        self._outstanding = 0  # armed commit faults that have not fired yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._core: _Core | None = None
        self._final: ProxyStats | None = None

    def __repr__(self) -> str:
        state = "running" if self._core is not None else "stopped"
        host, port = self._target
        return f"<FaultProxy {self.host}:{self.port} -> {host}:{port} {state}>"

    @property
    def target_host(self) -> str:
        return self._target[0]

    @property
    def target_port(self) -> int:
        return self._target[1]

    # --- lifecycle ---

    def start(self) -> FaultProxy:
        """Start the event loop thread and listen. Returns self."""
        with self._lock:
            if self._loop is not None or self._final is not None:
                raise RuntimeError("a FaultProxy can be started once")
            loop = asyncio.new_event_loop()
            core = _Core(loop, self._target, self._fault_fired)
            thread = threading.Thread(
                target=self._run, args=(loop,), name="FaultProxy", daemon=True
            )
            thread.start()
            self._loop, self._core, self._thread = loop, core, thread
            try:
                self.port = self._submit(core.listen(self.host, self.port))
            except BaseException:
                self._stop_loop()
                self._loop = self._core = self._thread = None
                raise
            return self

    def close(self) -> None:
        """Stop listening, close every socket (held ones too), join the thread. Idempotent."""
        with self._lock:
            core = self._core
            if core is None:
                return
            try:
                self._submit(core.shutdown())
                self._final = self._call(lambda c: c.stats())
            finally:
                self._stop_loop()
                self._loop = self._core = self._thread = None
                with self._faults:
                    self._faults.notify_all()

    def __enter__(self) -> FaultProxy:
        return self if self._core is not None else self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # --- faults ---

    def retarget(self, host: str, port: int) -> None:
        """Send new connections to ``host:port``; open ones keep their server."""
        _check_loopback(host)
        self._target = (host, port)
        if self._core is not None:
            self._call(lambda c: setattr(c, "target", (host, port)))

    def cut(self) -> int:
        """Reset every current connection, both sides, now; returns how many.

        Held server sides (`arm_commit_hold`) are not touched. New connections still work.
        """
        return self._submit(self._running_core().cut())

    def set_latency(self, seconds: float) -> None:
        """Delay every chunk forwarded, in both directions, by ``seconds`` (0: none)."""
        if seconds < 0:
            raise ValueError("latency cannot be negative")
        self._call(lambda c: setattr(c, "latency", float(seconds)))

    def pause(self) -> None:
        """Stop forwarding, in both directions and for new connections; nothing is dropped."""
        self._call(lambda c: c.set_paused(True))

    def resume(self) -> None:
        self._call(lambda c: c.set_paused(False))

    def reject_new(self, flag: bool = True) -> None:
        """While set, new connections are accepted and reset at once."""
        self._call(lambda c: setattr(c, "reject", flag))

    def arm_commit_drop(self, count: int = 1) -> None:
        """The next ``count`` COMMITs reach the server, which commits; the reply is lost.

        The client's connection is reset once the server's reply (up to ReadyForQuery)
        has arrived, so the commit has happened when the client sees the error.
        """
        self._arm(_Fault.DROP, count)

    def arm_commit_hold(self, count: int = 1) -> None:
        """The next ``count`` COMMITs are withheld; the client is reset.

        The server side stays open, idle in its transaction, until `release_held` or
        `close` (or until the server ends that session).
        """
        self._arm(_Fault.HOLD, count)

    def release_held(self) -> int:
        """Close the held server sides that are still open; returns how many."""
        return self._submit(self._running_core().release_held())

    def wait_commit_faults(self, timeout: float) -> bool:
        """Wait until every armed commit fault has fired; False on timeout."""
        with self._faults:
            return self._faults.wait_for(lambda: self._outstanding == 0, timeout)

    @property
    def stats(self) -> ProxyStats:
        """A snapshot of the counters (the last one after `close`)."""
        if self._core is None:
            return self._final or ProxyStats()
        return self._call(lambda c: c.stats())

    # --- plumbing ---

    def _arm(self, fault: _Fault, count: int) -> None:
        if count < 1:
            raise ValueError("count must be at least 1")
        self._running_core()
        with self._faults:
            self._outstanding += count
        self._call(lambda c: c.armed.extend([fault] * count))

    def _fault_fired(self) -> None:
        with self._faults:
            self._outstanding -= 1
            self._faults.notify_all()

    def _running_core(self) -> _Core:
        if self._core is None:
            raise RuntimeError("the proxy is not running: call start() first")
        return self._core

    def _call(self, fn: Callable[[_Core], _T]) -> _T:
        """Run ``fn(core)`` in the loop's thread and return its result."""
        core = self._running_core()
        assert self._loop is not None
        assert self._thread is not None
        if threading.get_ident() == self._thread.ident:
            return fn(core)
        future: concurrent.futures.Future[_T] = concurrent.futures.Future()

        def run() -> None:
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn(core))
                except BaseException as exc:
                    future.set_exception(exc)

        self._loop.call_soon_threadsafe(run)
        return future.result(_CONTROL_TIMEOUT)

    def _submit(self, coro: Coroutine[Any, Any, _T]) -> _T:
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(_CONTROL_TIMEOUT)

    def _stop_loop(self) -> None:
        assert self._loop is not None
        assert self._thread is not None
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    @staticmethod
    def _run(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
