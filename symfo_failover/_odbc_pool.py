"""`OdbcFailoverPool`: a small pool of pyodbc connections that notices a failover once.

Why a pool of its own. pyodbc has no pool; the only one at hand is the ODBC driver
manager's (unixODBC's pooling, which ``pyodbc.pooling`` switches on for the process
before its first connection, and which unixODBC uses only when ``odbcinst.ini`` also
says ``Pooling=Yes``). It cannot be used here: it is opaque (no way to list, count or
close the idle connections, so a generation of connections to the old server cannot be
taken out), it is configured per process and per machine rather than by code, and it
hands out connections that died while idle: with ``Pooling=Yes`` and ``CPTimeout``
set, a pooled session ended by ``pg_terminate_backend`` came back from
``pyodbc.connect()`` and failed on its first statement (57P01), tried with unixODBC
2.3.11 and psqlODBC. Leave it off (unixODBC's default; ``pyodbc.pooling = False``
before the first connection makes sure). Should it be on, a new connection of this
pool that is dead on its first statement is taken for a dead pooled one and the
connect is tried again at once (a few times), so that it does not read as a failover.
No other well-kept pool fits either: SQLAlchemy's ``QueuePool`` knows nothing of
generations and would still have to be driven from outside for every decision here,
so the pool is kept small, and its decisions are the shared, unit-tested ones of
`_pool_state.Generations` (the same as `FailoverPool`'s).

What it does (the behaviour of every pool of the library):

- each new connection reads its server's start time (one round trip) and is tagged
  with its *generation*; a different start time, or a connect that finds no server,
  is a failover, noticed once: the idle connections to the old server are closed at
  once, the ones in use when they come back, and none is handed out again;
- while the server is down, one connect attempt at a time (the pool's background
  thread) probes it, with the `RetryPolicy`'s backoff and jitter; requests wait for it;
- a session that died on a server that did not restart (``pg_terminate_backend``)
  costs that connection only: the replacement reaches the same start time.

pyodbc has no socket to look at, so a connection whose server died while it was idle
is seen dead only when it is used. When a request gives back a connection that died
under it (or ``run()`` meets a lost session), the pool *probes* before it hands out
anything else: it makes one new connection, which either reaches the same server (that
one connection is replaced) or finds the server gone or a different start time (a
failover: the whole old generation is taken out). So at most the first request per
failover (on each thread that was already holding a connection) meets a dead
connection through `OdbcFailoverPool.connection`; `OdbcFailoverPool.run` carries the
unit on to another connection and commits it exactly once.

``min_size`` connections are opened, and kept open, by a background thread (the
constructor does no I/O: a pool can be made before the server is up; `wait` waits for
them). Requests beyond that connect in their own thread, up to ``max_size``.

A request that gets no connection within ``timeout`` raises `PoolTimeout`, raised as a
subclass of ``pyodbc.OperationalError`` too (`_errors.flavoured`), as psycopg_pool's
``PoolTimeout`` is a ``psycopg.OperationalError``: ``except pyodbc.OperationalError``
keeps catching it.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyodbc

from . import _core
from . import _events as ev
from ._classify import classify, driver_text
from ._connection import drive, nothing, operations
from ._contract import refuse_coroutine_function
from ._core import Core
from ._driver_pyodbc import PyodbcDriver
from ._errors import LibraryError, flavoured
from ._kind import Failure, Kind
from ._ledger import LedgerMode, check_mode
from ._policy import DEFAULT_POLICY, RetryPolicy
from ._pool_state import (
    RUNNING,
    UNIT_STATE,
    FailoverStats,
    Generations,
    PolicyAttempt,
    Verdict,
    nested_run,
)
from ._target import SessionInfo, SessionState

_T = TypeVar("_T")
_P = ParamSpec("_P")


#: Connections are handed out as ``pyodbc.connect`` makes them by default.
POOLED_STATE = SessionState(autocommit=False)
#: Kinds of a failed connect that say the server is not there (as `Generations` reads).
_SERVER_GONE = (Kind.CONNECT_FAILED, Kind.CONNECTION_LOST)
_names = itertools.count(1)


class PoolTimeout(LibraryError):
    """No connection could be had within the pool's ``timeout``.

    ``failure``: the last connect failure when the server could not be reached
    (retryable: `run()` goes on trying within its policy), else a not-retryable
    "every connection in use". ``timeout`` is the seconds waited. Raised as a subclass
    of ``pyodbc.OperationalError`` as well.
    """

    def __init__(self, message: str, *, failure: Failure, timeout: float) -> None:
        super().__init__(message, failure=failure)
        self.timeout = timeout


class _Stale(Exception):
    """A connect that raced a failover reached the old server: not used."""


@dataclass(eq=False)
class _Slot:
    """One pooled connection and what the pool knows of it (a ``pyodbc.Connection``
    takes no attributes of ours)."""

    raw: Any
    generation: int
    info: SessionInfo


class OdbcFailoverPool:
    """A thread-safe pool of pyodbc connections that notices a failover once and
    replaces every connection to the old server (see the module's documentation).

    ``connection_string``: an ODBC connection string for psqlODBC (keepalive and
    timeout settings that detect a partition are added unless given, as by
    `symfo_failover.connect`). ``min_size`` connections are kept open by a background
    thread, at most ``max_size`` (default: ``min_size``, at least 1) exist at once;
    ``timeout`` is how long a request waits for one. ``policy``: the `RetryPolicy` of
    ``run()`` and of the refill's waits. ``configure(raw)`` runs on each new
    connection (what it leaves open is committed). ``on_event`` receives every `Event`.
    ``name`` shows in the pool's events and log lines. ``ledger``: as for
    `symfo_failover.connect` (``require`` is checked by each read-write ``run()``).
    """

    _driver_class: type[Any] = PyodbcDriver

    def __init__(
        self,
        connection_string: str,
        *,
        min_size: int = 4,
        max_size: int | None = None,
        timeout: float = 30.0,
        policy: RetryPolicy | None = None,
        configure: Callable[[Any], object] | None = None,
        on_event: ev.EventHook | None = None,
        name: str | None = None,
        ledger: LedgerMode = "auto",
    ) -> None:
        self._ledger = check_mode(ledger)
        if not isinstance(connection_string, str):
            raise TypeError("connection_string must be a str, not "
                            f"{type(connection_string).__name__}")
        self._min_size = _count("min_size", min_size, least=0)
        if max_size is None:
            max_size = max(self._min_size, 1)
        self._max_size = _count("max_size", max_size, least=1)
        if self._max_size < self._min_size:
            raise ValueError(f"max_size ({max_size}) must not be smaller than min_size "
                             f"({min_size})")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)):
            raise TypeError(f"timeout must be a number, not {type(timeout).__name__}")
        if not math.isfinite(timeout) or timeout <= 0:
            raise ValueError(f"timeout must be a finite number > 0, not {timeout!r}")
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, not {type(policy).__name__}")
        if configure is not None:
            if not callable(configure):
                raise TypeError("configure must be callable")
            refuse_coroutine_function(configure, what="configure")
        if on_event is not None and not callable(on_event):
            raise TypeError("on_event must be callable")
        if name is not None and not isinstance(name, str):
            raise TypeError(f"name must be a str, not {type(name).__name__}")
        self._driver = self._driver_class()
        try:
            self._target = self._driver.target(connection_string, {})
        except self._driver.error as exc:
            raise ValueError(str(exc.args[0] if exc.args else exc)) from None
        self.name = name or f"odbc-pool-{next(_names)}"
        self._timeout = float(timeout)
        self._policy = policy or DEFAULT_POLICY
        self._configure = configure
        self._on_event = on_event
        self._ops = self._operations()

        self._cond = threading.Condition(threading.Lock())
        self._gens = Generations(clock=self._policy.clock)
        self._idle: deque[_Slot] = deque()
        self._out: dict[int, _Slot] = {}
        #: Connects under way (they count towards max_size).
        self._opening = 0
        #: Requests waiting for a connection.
        self._waiting = 0
        #: Probes asked for: a connection died under a request; nothing idle is handed
        #: out until the background thread has made one new connection.
        self._suspect = 0
        self._last_failure: tuple[Failure, str] | None = None
        self._closed = False
        self._filler = threading.Thread(target=self._fill, name=f"{self.name}-filler",
                                        daemon=True)
        self._filler.start()

    # --- public --------------------------------------------------------------------------

    @property
    def target(self) -> str:
        """Where the pool connects, without secrets."""
        return str(self._target.description)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def min_size(self) -> int:
        return self._min_size

    @property
    def max_size(self) -> int:
        return self._max_size

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<OdbcFailoverPool {self.name!r} {self._target.description} {state}>"

    def failover_stats(self) -> FailoverStats:
        """Failovers noticed, connections replaced, requests that met a dead
        connection, and how long refills took (`FailoverStats`)."""
        with self._cond:
            return self._gens.stats()

    def get_stats(self) -> dict[str, int]:
        """The pool's measures now, with psycopg_pool's names: ``pool_min``,
        ``pool_max``, ``pool_size`` (open, in use or being opened), ``pool_available``
        (idle) and ``requests_waiting``."""
        with self._cond:
            return {
                "pool_min": self._min_size,
                "pool_max": self._max_size,
                "pool_size": len(self._idle) + len(self._out) + self._opening,
                "pool_available": len(self._idle),
                "requests_waiting": self._waiting,
            }

    def wait(self, timeout: float = 30.0) -> None:
        """Wait until ``min_size`` connections to the current server are open; raise
        `PoolTimeout` if that takes longer than ``timeout`` seconds."""
        deadline = self._policy.clock() + timeout
        with self._cond:
            while True:
                self._check_open()
                current = sum(1 for s in itertools.chain(self._idle, self._out.values())
                              if self._gens.is_current(s.generation))
                if current >= self._min_size:
                    return
                remaining = deadline - self._policy.clock()
                if remaining <= 0:
                    raise self._timeout_error(timeout, f"{current} of min_size "
                                                       f"{self._min_size} connections open")
                self._cond.wait(remaining)

    @contextlib.contextmanager
    def connection(self, timeout: float | None = None) -> Iterator[Any]:
        """A ``pyodbc.Connection`` of the pool (autocommit off), for a ``with`` block:
        committed when the block ends, rolled back when it raises, and given back.
        A connection that broke is closed and replaced. Not retried: use `run` for
        units of work that must survive a failover. Raises `PoolTimeout` when no
        connection is had within ``timeout`` (default: the pool's)."""
        slot = self._checkout(self._timeout if timeout is None else timeout)
        raw = slot.raw
        try:
            yield raw
        except BaseException:
            with contextlib.suppress(Exception):
                raw.rollback()
            self._give_back(slot)
            raise
        try:
            raw.commit()
        finally:
            self._give_back(slot)

    def run(self, fn: Callable[Concatenate[Any, _P], _T], /,
            *args: _P.args, **kwargs: _P.kwargs) -> _T:
        """Run ``fn(connection, *args, **kwargs)`` on a pooled connection, in one
        transaction, and commit it exactly once: the guarantees, the contract and the
        errors of `ResilientConnection.run` (``fn`` gets the guarded stand-in of a
        ``pyodbc.Connection`` that `connect` gives units). On a lost session the unit
        goes on on another connection of the pool; a lost COMMIT is resolved with the
        server. A pool that cannot give a connection raises `PoolTimeout`.
        """
        refuse_coroutine_function(fn)
        nested = nested_run(RUNNING.get())
        if nested is not None:
            raise nested
        slot = self._checkout(self._timeout)
        core = Core(self._driver, self._target, policy=self._policy,
                    on_event=self._on_event, state=UNIT_STATE, configure=False,
                    ledger=self._ledger)
        link = core.link
        link.raw, link.info, link.server_started = slot.raw, slot.info, slot.info.server_started
        token = RUNNING.set(core)
        try:
            return drive(core.run((fn, args, kwargs)), self._ops)  # type: ignore[no-any-return]
        finally:
            RUNNING.reset(token)
            raw = link.raw
            if raw is not None:
                link.raw = None
                self._give_back(self._slot_of(raw))

    def close(self, timeout: float = 10.0) -> None:
        """Close the idle connections now and the ones in use as they come back; stop
        the background thread (waiting up to ``timeout`` s for a connect under way).
        Idempotent."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            idle = list(self._idle)
            self._idle.clear()
            self._cond.notify_all()
        for slot in idle:
            self._close_raw(slot.raw)
        if self._filler is not threading.current_thread():
            self._filler.join(timeout)

    def __enter__(self) -> OdbcFailoverPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- handing out and taking back ----------------------------------------------------

    def _checkout(self, timeout: float) -> _Slot:
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout < 0:
            raise ValueError(f"timeout must be a number >= 0, not {timeout!r}")
        clock = self._policy.clock
        deadline = clock() + timeout
        while True:
            slot, mine, dropped = self._take_or_reserve(deadline, timeout)
            for each, reason in dropped:
                self._replaced(each, reason)
            if slot is not None:
                return slot
            if not mine:
                continue
            error: Exception | None = None
            slot = None
            keep = False
            try:
                slot = self._open()
            except _Stale:
                pass
            except Exception as exc:
                error = exc
            finally:
                # One step from "being opened" to "in use": never counted twice or not
                # at all, or another request could open one more than max_size.
                with self._cond:
                    self._opening -= 1
                    if slot is not None:
                        keep = not self._closed and self._gens.is_current(slot.generation)
                        if keep:
                            self._out[id(slot.raw)] = slot
                    self._cond.notify_all()
            if slot is not None:
                if keep:
                    self._added(slot)
                    return slot
                self._close_raw(slot.raw)
            if error is not None and not self._server_gone(error):
                raise error
            # Raced a failover, or the server is down now (then the background thread
            # probes it and this request waits): try again.

    def _take_or_reserve(
        self, deadline: float, timeout: float
    ) -> tuple[_Slot | None, bool, list[tuple[_Slot, str]]]:
        """Under the lock: an idle connection; else the right to connect (True); else
        wait. What was found unusable on the way is returned to be closed."""
        dropped: list[tuple[_Slot, str]] = []
        with self._cond:
            while True:
                self._check_open()
                if not self._suspect:
                    while self._idle:
                        slot = self._idle.pop()
                        if not self._gens.is_current(slot.generation):
                            dropped.append((slot, "old server"))
                        elif self._driver.is_broken(slot.raw):
                            dropped.append((slot, "dead"))
                        else:
                            self._out[id(slot.raw)] = slot
                            if dropped:
                                self._cond.notify_all()
                            return slot, False, dropped
                    if dropped:
                        return None, False, dropped  # closed, then try again
                    if not self._gens.down and self._total() < self._max_size:
                        self._opening += 1
                        return None, True, dropped
                remaining = deadline - self._policy.clock()
                if remaining <= 0:
                    raise self._timeout_error(timeout, None)
                self._waiting += 1
                self._cond.notify_all()  # the background thread may connect for us
                try:
                    self._cond.wait(remaining)
                finally:
                    self._waiting -= 1

    def _give_back(self, slot: _Slot, *, discard: bool = False) -> None:
        """A connection comes back: kept when alive and current, else closed and
        replaced. A connection that died under its request makes the pool probe."""
        raw = slot.raw
        closed = bool(getattr(raw, "closed", False))
        dead = not closed and self._driver.is_broken(raw)
        keep = not (discard or closed or dead)
        if keep and raw.autocommit:
            try:
                raw.autocommit = False
            except pyodbc.Error:
                keep, dead = False, self._driver.is_broken(raw)
        with self._cond:
            self._out.pop(id(raw), None)
            current = self._gens.is_current(slot.generation)
            if keep and current and not self._closed:
                self._idle.append(slot)
                self._cond.notify_all()
                return
            if dead:
                # A request met a dead connection (a run() carried on on another one).
                self._gens.met_dead += 1
                if current:
                    self._suspect += 1  # probe before handing anything else out
            self._cond.notify_all()
        if keep:
            self._close_raw(raw)  # alive, but the pool is closed
        else:
            self._replaced(slot, "returned broken" if current else "old server")

    def _discard(self, raw: Any) -> None:
        """The core gives a session up (a lost session, an interrupted unit)."""
        self._give_back(self._slot_of(raw), discard=True)

    def _slot_of(self, raw: Any) -> _Slot:
        with self._cond:
            return self._out[id(raw)]

    # --- making connections --------------------------------------------------------------

    def _open(self) -> _Slot:
        """One new connection, its server's verdict taken (a failover noticed here
        takes the old generation out). Raises what the connect raised (after the
        bookkeeping), or `_Stale`."""
        driver = self._driver
        # A dead session on its first statement is tried again at once: the driver
        # manager's pooling, if it is on, hands out sessions that died while idle.
        tries_left = self._max_size
        begun = self._policy.clock()
        while True:
            try:
                raw = driver.connect(self._target)
            except Exception as exc:
                self._connect_failed(exc, begun)
                raise
            try:
                info: SessionInfo = driver.session_info(raw)
                break
            except Exception as exc:
                dead_at_once = driver.is_broken(raw)
                self._close_raw(raw)
                if dead_at_once and tries_left:
                    tries_left -= 1
                    continue
                self._connect_failed(exc, begun)
                raise
        with self._cond:
            gens = self._gens
            previous = gens.started
            verdict = gens.connected(info.server_started, wanted=self._wanted())
            taking_out = verdict is Verdict.NEW_SERVER or verdict is Verdict.SETTLED
            old = self._take_old_idle() if taking_out else []
            slot = _Slot(raw, gens.current, info)
            self._last_failure = None
        if verdict is Verdict.STALE:
            self._close_raw(raw)
            raise _Stale(info.server_started)
        if taking_out:
            self._took_out("new server", previous, info.server_started, old,
                           noticed=verdict is Verdict.NEW_SERVER)
        try:
            driver.apply_state(raw, POOLED_STATE)
            if self._configure is not None:
                self._configure(raw)
                raw.commit()
        except BaseException:
            self._close_raw(raw)
            raise
        return slot

    def _connect_failed(self, exc: BaseException, begun: float) -> None:
        """A connect begun at ``begun`` failed (see `Generations.connect_failed`)."""
        failure = classify(exc)
        with self._cond:
            self._last_failure = (failure, ev.driver_message(driver_text(exc)))
            previous = self._gens.started
            verdict = self._gens.connect_failed(failure, wanted=self._wanted(),
                                                attempt_started=begun)
            old = self._take_old_idle() if verdict is not None else []
            self._cond.notify_all()
        if verdict is not None:
            self._took_out("server went away", previous, None, old,
                           noticed=verdict is Verdict.NEW_SERVER)

    def _server_gone(self, exc: BaseException) -> bool:
        return classify(exc).kind in _SERVER_GONE

    def _fill(self) -> None:
        """The background thread: keeps min_size connections, connects for waiting
        requests while the server is down (one attempt at a time, the policy's waits),
        and probes after a connection died under a request."""
        attempt: PolicyAttempt | None = None
        while True:
            with self._cond:
                while not self._closed and not self._needs_connection():
                    self._cond.wait()
                if self._closed:
                    return
                self._opening += 1
                probing = self._suspect
            try:
                slot = self._open()
            except Exception as exc:
                with self._cond:
                    self._opening -= 1
                    self._suspect = max(0, self._suspect - probing)
                    self._cond.notify_all()
                if attempt is None:
                    attempt = PolicyAttempt(self._policy, timeout=math.inf)
                if not isinstance(exc, _Stale):
                    ev.log("warning" if attempt.tries == 0 else "debug", "pool_connect_failed",
                           pool=self.name, target=self._target.description,
                           attempt=attempt.tries + 1, error=ev.driver_message(driver_text(exc)))
                attempt.update_delay(self._policy.clock(), server_gone=self._gens.down)
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, attempt.delay)
                continue
            attempt = None
            with self._cond:
                self._opening -= 1
                self._suspect = max(0, self._suspect - probing)
                keep = (not self._closed and self._gens.is_current(slot.generation)
                        and self._total() < self._max_size)
                if keep:
                    self._idle.append(slot)
                self._cond.notify_all()
            if keep:
                self._added(slot)
            else:
                self._close_raw(slot.raw)

    def _needs_connection(self) -> bool:
        """Under the lock: whether the background thread is to connect now."""
        total = self._total()
        if total >= self._max_size:
            self._suspect = 0  # no room to probe: the next use will tell
            return False
        if self._suspect or total < self._min_size:
            return True
        # Requests wait for it while the server is down (they do not probe themselves).
        return bool(self._waiting and self._gens.down and not self._idle)

    # --- generations ---------------------------------------------------------------------

    def _total(self) -> int:
        return len(self._idle) + len(self._out) + self._opening

    def _wanted(self) -> int:
        return max(self._min_size, 1)

    def _take_old_idle(self) -> list[_Slot]:
        """Under the lock: the idle connections of earlier generations, taken out."""
        old = [s for s in self._idle if not self._gens.is_current(s.generation)]
        if old:
            keep = [s for s in self._idle if self._gens.is_current(s.generation)]
            self._idle.clear()
            self._idle.extend(keep)
        return old

    def _took_out(self, reason: str, previous: str | None, started: str | None,
                  old: list[_Slot], *, noticed: bool = True) -> None:
        """The old generation's idle connections were taken out: closed now; the event
        once per failover (not for the second step of one, `Verdict.SETTLED`)."""
        with self._cond:
            failovers = self._gens.failovers
        if noticed:
            ev.emit(ev.PoolFailover(
                target=self._target.description, elapsed=0.0, pool=self.name, reason=reason,
                previous_server_started=previous, server_started=started,
                closed_idle=len(old), failovers=failovers), self._on_event)
        for slot in old:
            self._replaced(slot, "old server")

    def _replaced(self, slot: _Slot, reason: str) -> None:
        """Close ``slot``'s connection, counted as replaced (the background thread
        makes the new one when the pool is below min_size; requests make the rest)."""
        with self._cond:
            self._gens.replaced += 1
            self._cond.notify_all()
        self._close_raw(slot.raw)
        ev.emit(ev.PoolConnectionReplaced(target=self._target.description, elapsed=0.0,
                                          pool=self.name, reason=reason), self._on_event)

    def _added(self, slot: _Slot) -> None:
        with self._cond:
            took = self._gens.added(slot.generation, wanted=self._wanted())
            size = self._total()
        if took is not None:
            ev.emit(ev.PoolRefilled(target=self._target.description, elapsed=took,
                                    pool=self.name, seconds=took, connections=size),
                    self._on_event)

    def _close_raw(self, raw: Any) -> None:
        with contextlib.suppress(Exception):
            raw.close()

    def _check_open(self) -> None:
        if self._closed:
            raise pyodbc.ProgrammingError(f"the pool {self.name!r} is closed")

    def _timeout_error(self, timeout: float, why: str | None) -> PoolTimeout:
        cls = flavoured(PoolTimeout, pyodbc.OperationalError)
        last = self._last_failure
        if last is not None and self._gens.down:
            failure, text = last
            why = why or f"the server cannot be reached: {failure}" + (
                f" ({text})" if text and text not in str(failure) else "")
        else:
            failure = Failure(kind=Kind.NOT_RETRYABLE, sqlstate=None, retryable=False,
                              reconnect=False, message="no pooled connection free in time",
                              rule="pool timeout", condition="pool_timeout")
            why = why or f"all {self._max_size} connections (max_size) are in use"
        return cls(f"no connection from the pool {self.name!r} within {timeout:g} s: {why} "
                   f"({self._target.description})", failure=failure, timeout=timeout)

    # --- run(): the pool as the core's session source ------------------------------------

    def _operations(self) -> list[Callable[..., Any]]:
        return operations(self._driver, connect=lambda: self._checkout(self._timeout).raw,
                          discard=self._discard, sleep=self._policy.sleep, instead={
                              _core.OP_INFO: lambda raw: self._slot_of(raw).info,
                              # configure ran when the connection was made
                              _core.OP_APPLY_STATE: nothing,
                          })


def _count(what: str, value: object, *, least: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if value < least:
        raise ValueError(f"{what} must be >= {least}, not {value}")
    return value
