"""What `FailoverPool` and `AsyncFailoverPool` add to psycopg_pool alike, with no I/O.

The two pools differ only where psycopg_pool's sync and async pools differ (a hook is
a method or a coroutine); the bookkeeping behind those hooks (generations, the one
probing attempt, counting, events) is this mixin. It keeps its own small lock, so
the same code serves threads and an event loop (it never waits while holding it).
"""

from __future__ import annotations

import contextvars
import threading
from collections import deque
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict

from . import _events as ev
from ._classify import classify, driver_text
from ._core import Core
from ._driver_psycopg import _DETECTION, PsycopgDriver, guard_off, unit_state, watch_goodbye
from ._ledger import check_mode
from ._policy import DEFAULT_POLICY, RetryPolicy
from ._pool_state import (
    FailoverStats,
    Generations,
    PolicyAttempt,
    Verdict,
)
from ._target import SessionInfo, Target

#: The conninfo of the connect under way in this thread or task (`_conninfo_resolved`).
_RESOLVED: contextvars.ContextVar[str] = contextvars.ContextVar("symfo_conninfo", default="")


class FailoverBookkeeping:
    """Mixed into the psycopg pools, before psycopg_pool's class."""

    # psycopg_pool's, read here
    name: str
    conninfo: Any
    _pool: deque[Any]
    _nconns: int
    _growing: bool
    #: psycopg_pool's AddConnection task class of the pool's flavour (sync or async).
    _add_task: Any
    run_task: Any

    def _init_failover(self, policy: RetryPolicy | None, on_event: ev.EventHook | None,
                       conninfo: object, kwargs: object, connection_class: object,
                       base: type[Any], ledger: object = "auto") -> None:
        self._ledger = check_mode(ledger)
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise TypeError(f"policy must be a RetryPolicy, not {type(policy).__name__}")
        if on_event is not None and not callable(on_event):
            raise TypeError("on_event must be callable")
        if not (isinstance(connection_class, type) and issubclass(connection_class, base)):
            raise TypeError(f"connection_class must be a {base.__module__}."
                            f"{base.__qualname__} subclass, not {connection_class!r}")
        self._policy = policy or DEFAULT_POLICY
        self._on_event = on_event
        self._glock = threading.Lock()
        self._gens = Generations(clock=self._policy.clock)
        self._prober: PolicyAttempt | None = None
        self._parked: list[bool] = []
        self._target = Target({}, (), "", "", describe(conninfo, kwargs))

    # --- public --------------------------------------------------------------------------

    def failover_stats(self) -> FailoverStats:
        """Failovers noticed, connections replaced, requests that met a dead
        connection, and how long refills took (`FailoverStats`)."""
        with self._glock:
            return self._gens.stats()

    # --- a new connection ----------------------------------------------------------------

    def _conninfo_resolved(self, conninfo: str) -> str:
        """psycopg_pool resolves the conninfo (maybe a callable), then the kwargs, for
        each connect, in one thread or task: what the conninfo says is kept here for
        the kwargs' detection defaults (see `detection_defaults`)."""
        _RESOLVED.set(conninfo)
        return conninfo

    def _kwargs_with_detection(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        return detection_defaults(_RESOLVED.get(), kwargs)

    def _verdict(self, info: SessionInfo) -> tuple[Verdict, int, str | None]:
        """What a new connection's server says; its generation; the server before."""
        with self._glock:
            gens = self._gens
            previous = gens.started
            verdict = gens.connected(info.server_started, wanted=self._nconns)
            return verdict, gens.current, previous

    def _connect_failed(self, exc: BaseException, conn: object,
                        begun: float) -> tuple[Verdict | None, str | None]:
        """A connect begun at ``begun`` failed: what it says (see
        `Generations.connect_failed`), and the server before."""
        failure = classify(exc, connection=conn)
        with self._glock:
            previous = self._gens.started
            verdict = self._gens.connect_failed(failure, wanted=self._nconns,
                                                attempt_started=begun)
        return verdict, previous

    # --- refilling: one attempt at a time probes a server that is down -------------------

    def _attempt_for(self, attempt: Any) -> PolicyAttempt:
        if isinstance(attempt, PolicyAttempt):
            return attempt
        return PolicyAttempt(self._policy, timeout=self.reconnect_timeout)

    reconnect_timeout: float

    def _park(self, attempt: PolicyAttempt, growing: bool) -> bool:
        """True when ``attempt`` is to wait for the one probing the server."""
        with self._glock:
            if self._gens.down and self._prober not in (None, attempt):
                self._parked.append(growing)
                return True
            return False

    def _attempt_failed(self, attempt: PolicyAttempt, exc: BaseException) -> None:
        with self._glock:
            if self._gens.down and self._prober is None:
                self._prober = attempt
        # The first failure of an attempt is a warning; its repeats are DEBUG, so that
        # waiting for a server is one line per connection, not one per try.
        ev.log("warning" if attempt.tries == 0 else "debug", "pool_connect_failed",
               pool=self.name, target=self._target.description, attempt=attempt.tries + 1,
               error=ev.driver_message(driver_text(exc)))

    def _attempt_worked(self, attempt: PolicyAttempt) -> list[bool]:
        """The attempts that waited for this one (to be run now)."""
        with self._glock:
            if self._prober is attempt or self._prober is None:
                self._prober = None
                parked, self._parked = self._parked, []
                return parked
            return []

    def _giving_up(self, growing: bool) -> int:
        """psycopg_pool's giving up after ``reconnect_timeout``, for this attempt and
        the ones that waited for it: how many gave up (``reconnect_failed`` is called
        once for each, as psycopg_pool calls it for each attempt)."""
        with self._glock:
            parked, self._parked = self._parked, []
            self._prober = None
        self._nconns -= 1 + len(parked)
        if (growing or any(parked)) and self._growing:
            self._growing = False
        return 1 + len(parked)

    # --- generations ---------------------------------------------------------------------

    def _is_current(self, conn: object) -> bool:
        return self._gens.current == getattr(conn, "_symfo_gen", -1)

    def _take_old_idle(self) -> list[Any]:
        """Take the idle connections of earlier generations out of the pool (the
        caller holds the pool's lock, or runs on its event loop without awaiting)."""
        pool = self._pool
        old = [c for c in pool if not self._is_current(c)]
        if old:
            keep = [c for c in pool if self._is_current(c)]
            pool.clear()
            pool.extend(keep)
        return old

    def _failover_event(self, reason: str, previous: str | None, started: str | None,
                        closed: int) -> None:
        with self._glock:
            failovers = self._gens.failovers
        ev.emit(ev.PoolFailover(
            target=self._target.description, elapsed=0.0, pool=self.name, reason=reason,
            previous_server_started=previous, server_started=started,
            closed_idle=closed, failovers=failovers), self._on_event)

    def _replace(self, conn: Any, reason: str) -> None:
        """Close ``conn`` (no round trip) and have a new connection made in its place."""
        with self._glock:
            self._gens.replaced += 1
        finish(conn)
        ev.emit(ev.PoolConnectionReplaced(target=self._target.description, elapsed=0.0,
                                          pool=self.name, reason=reason), self._on_event)
        self.run_task(self._add_task(self))

    def _give_up(self, conn: Any) -> None:
        """The core gives a session up (both pools' ``_discard``): counted, and replaced
        straight away rather than given back, since psycopg_pool would warn about a
        closed connection coming back ("discarding closed connection") for a loss
        already handled here."""
        guard_off(conn)
        self._check_pool_putconn(conn)  # type: ignore[attr-defined]
        if conn.closed:
            self._count_met_dead()
        if self._closed:  # type: ignore[attr-defined]
            finish(conn)
            return
        self._replace(conn, "returned broken")

    def _count_met_dead(self) -> None:
        with self._glock:
            self._gens.met_dead += 1

    def _returned_dead(self, conn: Any) -> None:
        """A connection came back dead: counted once (psycopg_pool replaces it)."""
        if getattr(conn, "_symfo_counted", False):
            return
        conn._symfo_counted = True
        with self._glock:
            self._gens.replaced += 1
            self._gens.met_dead += 1
        ev.emit(ev.PoolConnectionReplaced(target=self._target.description, elapsed=0.0,
                                          pool=self.name, reason="returned broken"),
                self._on_event)

    def _added(self, conn: Any) -> None:
        with self._glock:
            took = self._gens.added(getattr(conn, "_symfo_gen", -1), wanted=self._nconns)
            size = self._nconns
        if took is not None:
            ev.emit(ev.PoolRefilled(target=self._target.description, elapsed=took,
                                    pool=self.name, seconds=took, connections=size),
                    self._on_event)

    # --- run() ---------------------------------------------------------------------------

    def _unit_core(self, driver: Any, conn: Any) -> Core:
        """A core for one ``run()``, starting on ``conn`` (a connection of the pool),
        whose server is known: no first-connect questions, no reconnect reported."""
        # The unit's transaction settings are the connection's own (configure's).
        core = Core(driver, self._target, policy=self._policy, on_event=self._on_event,
                    state=conn._symfo_state, configure=False,
                    ledger=self._ledger)
        link = core.link
        link.raw = conn
        link.info = info = conn._symfo_info
        link.server_started = info.server_started
        return core


class OldGeneration(Exception):
    """Raised by the pools' checkout check for a connection of an earlier generation:
    psycopg_pool gives it back and hands out another (never seen by the application)."""


def stale_error(info: SessionInfo) -> psycopg.OperationalError:
    return psycopg.OperationalError(
        f"connected to the server of before the failover (started {info.server_started}): "
        "not used")


def describe(conninfo: object, kwargs: object) -> str:
    """What a pool connects to, safe to log (no password)."""
    if callable(conninfo) or callable(kwargs):
        return "psycopg (conninfo from a callable)"
    try:
        params = dict(kwargs) if isinstance(kwargs, dict) else {}
        target = PsycopgDriver().target(str(conninfo or ""), params)
    except Exception:
        return "psycopg (a conninfo that does not parse)"
    return target.description


def detection_defaults(conninfo: str, kwargs: dict[str, Any]) -> dict[str, Any]:
    """The keepalive and timeout settings `connect` adds (docs/concepts.md), where
    neither the conninfo nor the kwargs say otherwise."""
    try:
        given = conninfo_to_dict(conninfo)
    except psycopg.Error:
        return kwargs  # psycopg says what is wrong with it when it connects
    missing = {k: v for k, v in _DETECTION.items() if k not in kwargs and k not in given}
    return {**missing, **kwargs} if missing else kwargs


def tag(conn: Any, generation: int, info: SessionInfo) -> None:
    """What the pool keeps on a connection: its generation, its session, and the
    settings a unit's BEGIN and the return to the pool need."""
    conn._symfo_gen = generation
    conn._symfo_info = info
    conn._symfo_state = unit_state(conn)
    conn._symfo_autocommit = conn.autocommit
    watch_goodbye(conn)  # ready for the socket look before each checkout (`gone`)


def finish(conn: Any) -> None:
    """Close past everything (``close_returns``, the unit guard): libpq's own finish,
    which sends no query and waits for nothing."""
    conn._pool = None
    if not conn.closed:
        conn.pgconn.finish()
