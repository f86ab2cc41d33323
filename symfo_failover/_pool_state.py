"""What a failover pool knows about its connections' server, with no I/O and no locks.

The three pools (`FailoverPool`, `AsyncFailoverPool`, `OdbcFailoverPool`) do their I/O
their own way; what they decide is decided here, once, and unit-tested with an
injected clock:

- which *generation* a new connection belongs to, from the server's start time
  (``pg_postmaster_start_time()``): a different start time is a failover (the other
  node took over, or the server restarted); a start time of an earlier generation is a
  straggler to the old server and is not used;
- whether a failed connect means the server went away (a failover), or is a problem
  of that one attempt (too many clients, a wrong password);
- while the server is down, that one connect attempt at a time probes it (the others
  wait for it), with the `RetryPolicy`'s backoff and jitter instead of one attempt per
  missing connection;
- the figures of `failover_stats()`.

A session that dies on a server that did not restart (``pg_terminate_backend``,
``idle_session_timeout``, a proxy cut) is not a failover: its replacement connects to
the same start time and only that connection is replaced. SQLSTATE 57P01 is said in
both cases, so the SQLSTATE alone never decides.

The pool holds its own lock around every call here.
"""

from __future__ import annotations

import contextvars
import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ._kind import Failure, Kind
from ._policy import RetryPolicy
from ._target import SessionState

if TYPE_CHECKING:
    from ._core import Core

#: The core running a pool's unit in this context (thread or task), whichever pool:
#: a nested ``run()`` is refused, as on a `ResilientConnection`.
RUNNING: contextvars.ContextVar[Core | None] = contextvars.ContextVar(
    "symfo_failover_pool_unit", default=None)
#: The core's session state for pooled units: BEGIN takes the connection's own settings.
UNIT_STATE = SessionState(autocommit=False)


def nested_run(core: Core | None) -> BaseException | None:
    """The error for a ``run()`` inside a unit run by ``core`` (None: not nested)."""
    if core is None or core.link.guard is None:
        return None
    return core.link.guard.refuse("nested-run", "pool.run() was called inside a unit of work")


@dataclass(frozen=True)
class FailoverStats:
    """What `failover_stats()` reports (counters since the pool was made)."""

    #: Failovers the pool noticed: the server went away or came back with a different
    #: start time. Each is counted once however many connections noticed it.
    failovers: int = 0
    #: Connections closed because they were dead or belonged to the old server.
    connections_replaced: int = 0
    #: Requests that were handed a connection that turned out dead: a ``connection()``
    #: block (or ``getconn()``) whose connection came back broken, a ``run()`` that met a
    #: lost session (``run()`` then carried on on another connection).
    requests_met_dead: int = 0
    #: Seconds from noticing the last failover to a pool full of connections to the
    #: new server (None until that has happened once).
    last_refill_seconds: float | None = None
    #: Each refill, oldest first (at most the last 100).
    refill_seconds: tuple[float, ...] = ()
    #: The current generation of connections (0 first; one more for each failover
    #: noticed). No connection of an earlier generation is handed out.
    generation: int = 0
    #: The server start time the current connections were made to (None: not known yet).
    server_started: str | None = None
    #: The pool is refilling after a failover now.
    refilling: bool = False

    def as_dict(self) -> dict[str, object]:
        return {
            "failovers": self.failovers,
            "connections_replaced": self.connections_replaced,
            "requests_met_dead": self.requests_met_dead,
            "last_refill_seconds": self.last_refill_seconds,
            "refill_seconds": list(self.refill_seconds),
            "generation": self.generation,
            "server_started": self.server_started,
            "refilling": self.refilling,
        }


class Verdict(enum.Enum):
    """What a new connection's server start time says."""

    #: The same server as the pool's current connections.
    SAME = "same"
    #: The first connection, or the first after the server went away.
    KNOWN_NOW = "known now"
    #: A different server: a failover. The old generation is to be taken out.
    NEW_SERVER = "new server"
    #: A different server right after a connect reached the old one as it went away:
    #: the same failover (already counted and timed); the old generation is taken out.
    SETTLED = "settled"
    #: A server of an earlier generation (a connect that raced a failover): unusable.
    STALE = "stale"


#: Kinds of a failed connect that mean the server is not there (down, starting up,
#: switching nodes, unreachable), as opposed to one attempt that was refused.
_SERVER_GONE = (Kind.CONNECT_FAILED, Kind.CONNECTION_LOST)
_REFILLS_KEPT = 100
#: SQLSTATE classes of a server that answered and is there: insufficient resources
#: (53300 too many connections, 53100 disk full ...) is a busy server, not a gone one.
_SERVER_THERE = ("53",)


def _server_answered(failure: Failure) -> bool:
    return failure.sqlstate is not None and failure.sqlstate[:2] in _SERVER_THERE


@dataclass
class Generations:
    """The pool's record of servers and generations (see the module's docstring)."""

    clock: Callable[[], float]
    #: The number of the current generation; each connection carries the one it was
    #: made in, and only connections of the current one are handed out.
    current: int = 0
    #: The current generation's server start time (None: not known yet).
    started: str | None = None
    #: Start times of earlier generations.
    earlier: set[str] = field(default_factory=set)
    #: The last connect attempt found no server: one attempt at a time probes it.
    down: bool = False
    #: When the connect attempts began to fail (None: the last one worked).
    failing_since: float | None = None
    #: The current generation's server is the one from before it went away: the next
    #: different server belongs to the failover already counted.
    tentative: bool = False
    #: When the pool noticed the failover it is refilling after (None: not refilling).
    detected_at: float | None = None
    #: Connections of the current generation made since then.
    refilled: int = 0
    #: How many connections the pool wants (psycopg_pool's pool size then).
    wanted: int = 0
    failovers: int = 0
    replaced: int = 0
    met_dead: int = 0
    refills: list[float] = field(default_factory=list)

    # --- decisions ---------------------------------------------------------------------

    def connected(self, started: str, *, wanted: int = 0) -> Verdict:
        """A new connection reached a server that started at ``started``. On a new
        server the refill to ``wanted`` connections (the pool's size) is timed from
        now."""
        self.down = False
        self.failing_since = None
        if self.started == started:
            return Verdict.SAME
        if self.started is None:
            # The first server, or the first after it went away. The same start time as
            # before the outage (a network break, not a restart) is the same server
            # back: still a new generation, as the old connections may be half dead.
            # Or a connect to the old server that was under way when it went: then
            # the new server comes next, and that is the same failover, not another.
            self.tentative = started in self.earlier
            self.earlier.discard(started)
            self.started = started
            return Verdict.KNOWN_NOW
        if started in self.earlier:
            return Verdict.STALE
        settled = self.tentative
        self._next_generation(counted=not settled)
        self.tentative = False
        self.started = started
        if settled:
            return Verdict.SETTLED
        self.start_refill(wanted)
        return Verdict.NEW_SERVER

    def connect_failed(self, failure: Failure, *, wanted: int,
                       attempt_started: float | None = None) -> Verdict | None:
        """A connect attempt (begun at ``attempt_started``, a reading of ``clock``)
        failed as ``failure``. `Verdict.NEW_SERVER`: the server went away, a failover
        noticed now (the caller takes the old generation out and says so);
        `Verdict.SETTLED`: the old generation is to be taken out, within a failover
        already noticed; None: nothing to do.

        One failed attempt is not enough: a connect under way when a proxy cut its
        connections fails too. The server has gone away when an attempt *begun after*
        a failed one fails as well (the probing attempt's next try, at the policy's
        first wait).
        """
        if failure.kind not in _SERVER_GONE or _server_answered(failure):
            return None
        now = self.clock()
        begun = now if attempt_started is None else attempt_started
        first = self.failing_since
        self.down = True
        if first is None:
            self.failing_since = now
            return None
        if begun <= first:
            return None  # under way at the same moment: the same single blow
        if self.started is None:
            return None  # not known yet, or already noticed: the same outage
        if self.tentative:
            # The server of before, reached once more as it went: the same failover.
            self._next_generation(counted=False)
            self.tentative = False
            return Verdict.SETTLED
        self._next_generation()
        self.start_refill(wanted)
        return Verdict.NEW_SERVER

    def is_current(self, generation: int) -> bool:
        return generation == self.current

    # --- the refill ----------------------------------------------------------------------

    def start_refill(self, wanted: int) -> None:
        self.detected_at = self.clock()
        self.refilled = 0
        self.wanted = wanted

    def added(self, generation: int, *, wanted: int) -> float | None:
        """A connection of ``generation`` entered the pool. When it completes a refill,
        the seconds from noticing the failover to a full pool."""
        if self.detected_at is None or generation != self.current:
            return None
        self.refilled += 1
        if self.refilled < min(self.wanted, wanted):
            return None
        took = self.clock() - self.detected_at
        self.detected_at = None
        self.tentative = False  # full of connections to this server: it is the one
        self.refills.append(took)
        del self.refills[:-_REFILLS_KEPT]
        return took

    def stats(self) -> FailoverStats:
        return FailoverStats(
            failovers=self.failovers,
            connections_replaced=self.replaced,
            requests_met_dead=self.met_dead,
            last_refill_seconds=self.refills[-1] if self.refills else None,
            refill_seconds=tuple(self.refills),
            generation=self.current,
            server_started=self.started,
            refilling=self.detected_at is not None,
        )

    def _next_generation(self, *, counted: bool = True) -> None:
        if self.started is not None:
            self.earlier.add(self.started)
        self.current += 1
        self.started = None
        if counted:
            self.failovers += 1


#: psycopg_pool's waits (``AttemptWithBackoff``) for failures that are not a gone server.
SLOW_FIRST = 1.0
SLOW_JITTER = 0.1


class PolicyAttempt:
    """psycopg_pool's ``AttemptWithBackoff``, with the `RetryPolicy`'s waits.

    psycopg_pool waits 1 s, then 2, 4, 8 ... s between attempts to replace a
    connection: after a failover that can leave a pool empty for seconds after the
    server accepts again. The policy's waits are short and capped (``first_delay`` to
    ``max_delay``, shortened by ``jitter``), and only one attempt at a time probes a
    server that is down, so the short waits cost the server nothing.
    """

    def __init__(self, policy: RetryPolicy, *, timeout: float) -> None:
        self.policy = policy
        self.timeout = timeout
        self.delay = 0.0
        self.give_up_at = 0.0
        self.tries = 0
        self.gave_up = False
        #: The last wait of the slow kind (0: none yet).
        self.slow = 0.0

    def update_delay(self, now: float, *, server_gone: bool = True) -> None:
        """The wait before the next try. The policy's short waits are for a server
        that is gone (one attempt probes it); any other failure (a wrong password, too
        many clients) waits as psycopg_pool does: 1 s, then twice as long each time,
        so that a pool does not hammer a server that refuses it."""
        if self.tries == 0:
            self.give_up_at = now + self.timeout
        self.tries += 1
        if server_gone:
            wait = self.policy.delay(self.tries)
        else:
            self.slow = SLOW_FIRST if self.slow == 0.0 else self.slow * 2.0
            wait = self.slow * (1.0 + SLOW_JITTER * (2.0 * self.policy.random() - 1.0))
        self.delay = max(0.0, min(wait, self.give_up_at - now))

    def time_to_give_up(self, now: float) -> bool:
        done = self.give_up_at > 0.0 and now >= self.give_up_at
        self.gave_up = self.gave_up or done
        return done
