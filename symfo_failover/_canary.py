"""The canary workload of ``probe`` and ``drill``: requests through the library, recorded.

A `Canary` owns one small table (created at the start, dropped at the end) and a few
worker threads that each alternate a write (one INSERT of a sequence number, through
``run()``) and a read (is my last acknowledged write there?), through a
`ResilientConnection` or a pool, with either driver. Every request is recorded with its
times, its outcome and the library's events that happened while it ran; `analyse` (pure)
turns the records into the report's `Run`: the outage windows, incidents, phases, the
errors seen. After the workload `Canary.check_writes` looks every acknowledged write up.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import _events as ev
from ._classify import classify, sqlstate_of
from ._kind import Failure, Kind
from ._policy import RetryPolicy
from ._report import (
    ErrorSeen,
    Finding,
    Incident,
    InputError,
    Marker,
    Phase,
    RequestKind,
    Run,
    Sample,
    ServerIdentity,
    ServerOutage,
    Window,
    WriteCheck,
)

#: The client settings the report shows beside the measured detection time.
CLIENT_SETTINGS = ("connect_timeout", "keepalives", "keepalives_idle", "keepalives_interval",
                   "keepalives_count", "tcp_user_timeout", "target_session_attrs")
#: At most this many request samples per run go into the report (for the chart).
MAX_SAMPLES = 3000
#: Requests whose events are this close to each other's windows are one incident (s).
INCIDENT_GAP = 1.0
#: A request slower than this many times the median, and than the floor (s), stalled.
STALL_FACTOR = 10.0
STALL_FLOOR = 0.5
#: The canary tables' names: ``symfo_canary_<hex>``.
TABLE_PREFIX = "symfo_canary_"

_IDENTITY_SQL = (
    "SELECT host(inet_server_addr()), inet_server_port(), pg_postmaster_start_time()::text,"
    " pg_is_in_recovery(), current_setting('cluster_name', true)"
)
_CONTROL_SQL = (
    "SELECT (pg_control_checkpoint()).timeline_id,"
    " (pg_control_system()).system_identifier::text"
)


class Stopped(Exception):
    """Raised from a retry wait when the canary is aborted (Ctrl-C): the request ends."""


# --- records ------------------------------------------------------------------------


@dataclass
class Request:
    """One request as the worker saw it (``time.monotonic()`` times)."""

    kind: RequestKind
    worker: int
    started: float
    ended: float = 0.0
    ok: bool = False
    seq: int | None = None
    failure: Failure | None = None
    message: str = ""
    events: list[tuple[float, ev.Event]] = field(default_factory=list)

    @property
    def retried(self) -> bool:
        return any(isinstance(e, (ev.FailureDetected, ev.UnitReplayed, ev.Reconnected,
                                  ev.CommitResolved)) for _, e in self.events)

    @property
    def troubled(self) -> bool:
        return not self.ok or self.retried


@dataclass
class Records:
    """What a canary recorded: requests, events no request owned, server identities."""

    t0: float
    t_end: float
    requests: list[Request]
    loose_events: list[tuple[float, ev.Event]]
    identities: list[tuple[float, ServerIdentity | None]]


# --- connection strings ----------------------------------------------------------------


def parse_conninfo(conninfo: str) -> dict[str, str]:
    """A libpq connection string (key=value or URI) as a dict; `InputError` when bad."""
    try:
        from psycopg.conninfo import conninfo_to_dict
    except ImportError as exc:  # pragma: no cover - psycopg is installed with the CLI
        raise InputError("the probe needs psycopg: pip install 'symfo-failover[psycopg]'"
                         ) from exc
    import psycopg

    if not isinstance(conninfo, str) or not conninfo.strip():
        raise InputError("give a libpq connection string, e.g. "
                         "'host=db.example port=5432 dbname=app user=probe'")
    try:
        params = conninfo_to_dict(conninfo)
    except psycopg.Error as exc:
        # psycopg's message quotes the bad part, never the whole string.
        raise InputError(f"not a valid connection string: {first_line(exc)}") from None
    return {k: str(v) for k, v in params.items() if v is not None}


def describe(params: dict[str, str]) -> str:
    """``user@host:port/dbname``, with libpq's defaults filled in: safe to print."""
    from psycopg.conninfo import make_conninfo

    from ._check import describe as describe_target
    from ._driver_psycopg import PsycopgDriver

    try:
        return describe_target(PsycopgDriver().target(make_conninfo("", **params), {}))
    except Exception:
        return f"{params.get('user', '')}@{params.get('host', '')}:{params.get('port', '')}"


def odbc_string(params: dict[str, str]) -> str:
    """The psqlODBC connection string for a libpq one (one host only)."""
    host = params.get("host") or params.get("hostaddr") or "localhost"
    if "," in host:
        raise InputError("psqlODBC connects to one host: give a single host for "
                         "--driver pyodbc (multi-host strings are libpq's)")
    parts = {"Driver": "{PostgreSQL Unicode}", "Server": host,
             "Port": params.get("port") or "5432",
             "Database": params.get("dbname") or params.get("user") or "postgres"}
    if params.get("user"):
        parts["Uid"] = params["user"]
    if params.get("password"):
        parts["Pwd"] = "{" + params["password"].replace("}", "}}") + "}"
    if params.get("sslmode"):
        parts["SSLmode"] = params["sslmode"]
    # The detection settings the libpq string gives: psqlODBC's own keepalive keys, the
    # rest to libpq through pqopt (the adapter adds its defaults for what is missing).
    if "keepalives_idle" in params:
        parts["KeepaliveTime"] = params["keepalives_idle"]
    if "keepalives_interval" in params:
        parts["KeepaliveInterval"] = params["keepalives_interval"]
    pq = " ".join(f"{k}={params[k]}" for k in ("keepalives_count", "tcp_user_timeout",
                                                "connect_timeout") if k in params)
    if pq:
        parts["pqopt"] = "{" + pq + "}"
    return ";".join(f"{k}={v}" for k, v in parts.items()) + ";"


def client_settings(driver: str, params: dict[str, str]) -> dict[str, str]:
    """The detection settings in force for the canary's sessions (the library's defaults
    where the connection string says nothing)."""
    from ._driver_psycopg import _DETECTION

    shown: dict[str, str] = {}
    for key in CLIENT_SETTINGS:
        if key in params:
            shown[key] = params[key]
        elif key in _DETECTION:
            shown[key] = f"{_DETECTION[key]} (library default)"
        elif key == "target_session_attrs":
            shown[key] = "any (libpq default)"
    if driver == "pyodbc":
        from ._driver_pyodbc import _ODBC_DETECTION, _PQOPT_DETECTION

        # What psqlODBC gets: KeepaliveTime/KeepaliveInterval, and libpq's keys by pqopt.
        odbc_defaults = {"keepalives_idle": _ODBC_DETECTION["keepalivetime"][1],
                         "keepalives_interval": _ODBC_DETECTION["keepaliveinterval"][1],
                         **_PQOPT_DETECTION}
        shown = {key: (params[key] if key in params
                       else f"{odbc_defaults[key]} (library default)")
                 for key in ("connect_timeout", "keepalives_idle", "keepalives_interval",
                             "keepalives_count", "tcp_user_timeout")}
        shown["target_session_attrs"] = "not supported by psqlODBC"
    return shown


def first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# --- server identity ------------------------------------------------------------------------


def read_identity(conninfo: str, *, timeout: float = 3.0) -> ServerIdentity | None:
    """Who answers at ``conninfo`` now (None: nobody)."""
    import psycopg

    try:
        with psycopg.connect(conninfo, autocommit=True,
                             connect_timeout=max(1, round(timeout))) as conn:
            row = conn.execute(_IDENTITY_SQL).fetchone()
            assert row is not None
            timeline: int | None = None
            system: str | None = None
            # pg_control_* are for superusers and pg_monitor members only.
            with contextlib.suppress(psycopg.Error):
                control = conn.execute(_CONTROL_SQL).fetchone()
                if control is not None:
                    timeline, system = int(control[0]), str(control[1])
            return ServerIdentity(address=row[0], port=row[1], started=str(row[2]),
                                  in_recovery=bool(row[3]), timeline=timeline,
                                  system_identifier=system, name=row[4] or None)
    except psycopg.Error:
        return None


def server_change(before: ServerIdentity | None, after: ServerIdentity | None) -> str:
    """What happened between two identities: "same server", "restarted", "promoted",
    "different server" or "unknown" (the schema's enum)."""
    if before is None or after is None:
        return "unknown"
    if (before.system_identifier and after.system_identifier
            and before.system_identifier != after.system_identifier):
        return "different server"
    if before.in_recovery and not after.in_recovery:
        return "promoted"
    if before.timeline is not None and after.timeline is not None \
            and after.timeline > before.timeline:
        return "promoted"
    if before.started != after.started:
        return "restarted"  # (on another node when ``name`` differs)
    return "same server"


def unanswered(identities: Sequence[tuple[float, ServerIdentity | None]], t0: float,
               *, every: float) -> list[ServerOutage]:
    """When the monitor's fresh sessions got no answer, in run seconds (pure): from the
    last answered sample to the next one, so each outage is an upper bound."""
    out: list[ServerOutage] = []
    last_ok: float | None = None
    down_since: float | None = None
    for at, identity in identities:
        if identity is None:
            if down_since is None:
                down_since = last_ok if last_ok is not None else at
            continue
        if down_since is not None:
            out.append(ServerOutage(f"no answer (a new session every {every:g} s)",
                                    _rel(down_since, t0), _rel(at, t0)))
            down_since = None
        last_ok = at
    if down_since is not None:
        out.append(ServerOutage(f"no answer (a new session every {every:g} s)",
                                _rel(down_since, t0), None))
    return out


class IdentityMonitor:
    """Reads the server's identity every ``every`` seconds on a thread of its own."""

    def __init__(self, conninfo: str, *, every: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._conninfo = conninfo
        self._every = every
        self._clock = clock
        self._stop = threading.Event()
        self.samples: list[tuple[float, ServerIdentity | None]] = []
        self._thread = threading.Thread(target=self._loop, name="symfo-identity",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def sample(self) -> ServerIdentity | None:
        identity = read_identity(self._conninfo)
        self.samples.append((self._clock(), identity))
        return identity

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self.sample()


# --- the workload --------------------------------------------------------------------------


@dataclass
class CanaryOptions:
    conninfo: str
    driver: str = "psycopg"
    access: str = "connection"
    read_only: bool = False
    concurrency: int = 1
    interval: float = 0.1
    label: str = "canary"
    policy: RetryPolicy | None = None


class Canary:
    """The canary workload against one server or cluster (see the module's docstring)."""

    def __init__(self, options: CanaryOptions, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if options.driver not in ("psycopg", "pyodbc"):
            raise InputError(f"unknown driver {options.driver!r}: use psycopg or pyodbc")
        if options.access not in ("connection", "pool"):
            raise InputError(f"unknown access {options.access!r}: use connection or pool")
        if options.concurrency < 1:
            raise InputError("--concurrency must be at least 1")
        if options.interval < 0:
            raise InputError("--interval must not be negative")
        self.options = options
        self.params = parse_conninfo(options.conninfo)
        self.table = TABLE_PREFIX + secrets.token_hex(6)
        self._clock = clock
        self._stop = threading.Event()
        self._abort = threading.Event()
        self._lock = threading.Lock()
        self._seq = itertools.count(1)
        self._local = threading.local()
        self.requests: list[Request] = []
        self.loose_events: list[tuple[float, ev.Event]] = []
        self.acknowledged: set[int] = set()
        self._last_acknowledged: int | None = None
        self.unacknowledged: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._client: Any = None
        self._clients: list[Any] = []
        self._created = False
        self.t0 = clock()
        self.t_end: float | None = None
        self.worker_errors: list[str] = []

    # --- set-up and tear-down (a plain psycopg session) ---

    def _admin(self, timeout: int = 5) -> Any:
        import psycopg

        return psycopg.connect(self.options.conninfo, autocommit=True,
                               connect_timeout=timeout)

    def setup(self) -> None:
        """Create the canary table (write probes); `InputError` for what a person must fix."""
        import psycopg

        try:
            with self._admin() as conn:
                if self.options.read_only:
                    conn.execute("SELECT 1")
                    return
                read_only = conn.execute(
                    "SELECT pg_is_in_recovery() OR current_setting("
                    "'default_transaction_read_only') = 'on'").fetchone()
                if read_only is not None and read_only[0]:
                    raise InputError(
                        f"{describe(self.params)} is read-only (a standby, or "
                        "default_transaction_read_only=on): a write probe needs the "
                        "primary; use --read-only, or target_session_attrs=read-write")
                # Set first: a Ctrl-C right after the CREATE must still drop it.
                self._created = True
                conn.execute(f"CREATE TABLE {self.table} (seq bigint NOT NULL, "
                             "client text NOT NULL, at timestamptz NOT NULL DEFAULT now())")
                conn.execute(f"CREATE INDEX ON {self.table} (seq)")
        except psycopg.Error as exc:
            raise InputError(connect_problem(exc, self.params)) from None

    def teardown(self) -> str | None:
        """Drop the canary table; a sentence for the person when it could not be."""
        if not self._created:
            return None
        import psycopg

        for _ in range(2):
            try:
                with self._admin(timeout=3) as conn:
                    conn.execute(f"DROP TABLE IF EXISTS {self.table}")
                self._created = False
                return None
            except psycopg.Error as exc:
                problem = first_line(exc)
                time.sleep(0.5)
        return (f"could not drop the canary table {self.table} ({problem}); "
                f"drop it by hand: DROP TABLE {self.table};")

    # --- the workers ---

    def start(self) -> None:
        """Open the client(s) and start the workers. Raises what connecting raised."""
        self.t0 = self._clock()
        opts = self.options
        policy = opts.policy or RetryPolicy(sleep=self._sleep)
        if opts.policy is not None:
            from dataclasses import replace

            policy = replace(opts.policy, sleep=self._sleep)
        target = (self.options.conninfo if opts.driver == "psycopg"
                  else odbc_string(self.params))
        # Writers and readers apart, so that a read stuck in an outage does not hide
        # whether writes work (and the other way round): the two windows are measured
        # separately.
        kinds: list[RequestKind] = (["read"] if opts.read_only else ["write", "read"])
        roles = [(kind, n) for n in range(opts.concurrency) for kind in kinds]
        if opts.access == "pool":
            self._client = self._open_pool(target, policy, len(roles))
            clients = [self._client] * len(roles)
        else:
            from ._connection import connect

            clients = []
            self._clients = clients
            for _ in roles:
                clients.append(connect(target, driver=opts.driver, policy=policy,
                                       on_event=self._on_event))
        for (kind, number), client in zip(roles, clients, strict=True):
            thread = threading.Thread(target=self._work, args=(kind, number, client),
                                      name=f"symfo-canary-{kind}-{number}", daemon=True)
            self._threads.append(thread)
            thread.start()

    def _open_pool(self, target: str, policy: RetryPolicy, n: int) -> Any:
        if self.options.driver == "psycopg":
            from ._pool import FailoverPool

            pool: Any = FailoverPool(target, min_size=n, max_size=n, policy=policy,
                                     on_event=self._on_event, name=self.options.label,
                                     open=True)
        else:
            from ._odbc_pool import OdbcFailoverPool

            pool = OdbcFailoverPool(target, min_size=n, max_size=n, policy=policy,
                                    on_event=self._on_event, name=self.options.label)
        pool.wait(30)
        return pool

    def _sleep(self, seconds: float) -> None:
        if self._abort.wait(seconds):
            raise Stopped("the canary was stopped")

    def _on_event(self, event: ev.Event) -> None:
        stamped = (self._clock(), event)
        current: Request | None = getattr(self._local, "request", None)
        if current is not None:
            current.events.append(stamped)
        else:
            with self._lock:
                self.loose_events.append(stamped)

    def _work(self, kind: RequestKind, number: int, client: Any) -> None:
        opts = self.options
        pyodbc = opts.driver == "pyodbc"
        insert = f"INSERT INTO {self.table} (seq, client) VALUES " + (
            "(?, ?)" if pyodbc else "(%s, %s)")
        lookup = f"SELECT count(*) FROM {self.table} WHERE seq = " + ("?" if pyodbc else "%s")
        name = f"{opts.label}-{number}"

        def write(raw: Any, seq: int) -> None:
            if pyodbc:
                raw.execute(insert, seq, name)
            else:
                raw.execute(insert, (seq, name))

        def read(raw: Any, seq: int | None) -> int:
            if seq is None:
                row = raw.execute("SELECT 1").fetchone()
            elif pyodbc:
                row = raw.execute(lookup, seq).fetchone()
            else:
                row = raw.execute(lookup, (seq,)).fetchone()
            return int(row[0])

        while not self._stop.is_set():
            request = Request(kind, number, self._clock())
            self._local.request = request
            try:
                if kind == "write":
                    with self._lock:
                        seq = next(self._seq)
                    request.seq = seq
                    client.run(write, seq)
                    with self._lock:
                        self.acknowledged.add(seq)
                        self._last_acknowledged = max(self._last_acknowledged or 0, seq)
                else:
                    # The latest write acknowledged before this read began must be there.
                    with self._lock:
                        last_seq = self._last_acknowledged
                    found = client.run(read, last_seq)
                    if last_seq is not None and found != 1:
                        request.message = f"acknowledged write {last_seq} read back {found}x"
                        with self._lock:
                            self.worker_errors.append(request.message)
                request.ok = True
            except Stopped:
                request.message = "stopped"
                if request.seq is not None:
                    with self._lock:
                        self.unacknowledged.add(request.seq)
                request.ended = self._clock()
                self._keep(request)
                break
            except Exception as exc:
                request.message = f"{type(exc).__name__}: {first_line(exc)}"
                request.failure = failure_of(exc)
                if request.seq is not None:
                    with self._lock:
                        self.unacknowledged.add(request.seq)
            finally:
                self._local.request = None
            request.ended = self._clock()
            self._keep(request)
            if opts.interval and self._stop.wait(opts.interval):
                break

    def _keep(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def good_since(self, since: float, kind: RequestKind = "write") -> int:
        """How many good requests of ``kind`` started at or after ``since``."""
        with self._lock:
            return sum(1 for r in self.requests
                       if r.kind == kind and r.ok and r.started >= since)

    def snapshot(self) -> tuple[list[Request], list[tuple[float, ev.Event]]]:
        """The requests so far, and the events no request owned."""
        with self._lock:
            return list(self.requests), list(self.loose_events)

    def abort(self) -> None:
        """End the workers' retry waits now, without waiting for them (see `stop`)."""
        self._stop.set()
        self._abort.set()

    def stop(self, *, abort: bool = False, timeout: float = 90.0) -> None:
        """Stop the workers after their current request, waiting up to ``timeout``;
        then (or at once with ``abort``) end their retry waits and close a pool under
        them, so that a request waiting for a connection ends too. Requests still under
        way after that are left to their (daemon) threads: they are not acknowledged."""
        self._stop.set()
        if abort:
            self._abort.set()
        self._join(min(timeout, 1.0) if abort else timeout)
        if any(t.is_alive() for t in self._threads):
            self._abort.set()
            if self._client is not None:
                with contextlib.suppress(Exception):
                    self._client.close()
            self._join(5.0)
        self.t_end = self._clock()
        for client in self._clients or ([self._client] if self._client is not None else []):
            with contextlib.suppress(Exception):
                client.close()

    def _join(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    # --- after the workload ---

    def check_writes(self) -> WriteCheck | None:
        """Look up every acknowledged write (None for a read-only canary)."""
        if self.options.read_only or not self._created:
            return None
        import psycopg

        try:
            with self._admin() as conn:
                rows = conn.execute(
                    f"SELECT seq, count(*) FROM {self.table} GROUP BY seq").fetchall()
        except psycopg.Error as exc:
            raise InputError("could not read the canary table back to check the writes: "
                             f"{first_line(exc)}") from None
        return write_check(dict((int(s), int(n)) for s, n in rows),
                           self.acknowledged, self.unacknowledged)

    def records(self, identities: Sequence[tuple[float, ServerIdentity | None]] = ()
                ) -> Records:
        with self._lock:
            return Records(self.t0, self.t_end if self.t_end is not None else self._clock(),
                           list(self.requests), list(self.loose_events), list(identities))


def failure_of(exc: BaseException) -> Failure:
    """How the library classifies what a request raised (its cause, for our errors)."""
    failure = getattr(exc, "failure", None)
    if isinstance(failure, Failure):
        return failure
    return classify(sqlstate_of(exc))


def connect_problem(exc: BaseException, params: dict[str, str]) -> str:
    """A sentence for a person about a failed connect (never the password)."""
    from ._check import _redact

    where = describe(params)
    state = sqlstate_of(exc)
    text = _redact(first_line(exc), "", params.get("password"))
    if "connection option" in text or ("invalid" in text and "value" in text):
        return f"not a valid connection string: {text}"
    if state == "28P01" or "password authentication failed" in text:
        return f"{where}: authentication failed (wrong user or password)"
    if state == "3D000":
        return f"{where}: the database does not exist ({text})"
    if state == "42501":
        return f"{where}: the role may not do this ({text}); the probe needs to create a table"
    if state and state.startswith("28"):
        return f"{where}: the server refused the role ({text})"
    if state is None or state.startswith("08"):
        return f"cannot reach the server at {where}: {text}"
    return f"{where}: {text}"


def write_check(counts: dict[int, int], acknowledged: set[int],
                unacknowledged: set[int]) -> WriteCheck:
    """Every acknowledged write present exactly once? (pure)"""
    lost = sorted(s for s in acknowledged if counts.get(s, 0) == 0)
    doubled = sorted(s for s, n in counts.items() if n > 1)
    once = sum(1 for s in acknowledged if counts.get(s, 0) == 1)
    committed = sum(1 for s in unacknowledged if counts.get(s, 0) > 0)
    return WriteCheck(acknowledged=len(acknowledged), present_once=once, lost=lost,
                      doubled=doubled, unacknowledged=len(unacknowledged),
                      unacknowledged_committed=committed)


# --- the analysis (pure) ------------------------------------------------------------------


def _error_key(failure: Failure | None) -> tuple[str | None, str]:
    if failure is None:
        return (None, Kind.NOT_RETRYABLE.name)
    return (failure.sqlstate, failure.kind.name)


def errors_seen(requests: Iterable[Request], loose: Iterable[tuple[float, ev.Event]] = (),
                guide_codes: frozenset[str | None] | None = None) -> list[ErrorSeen]:
    """Every error the requests met: what the library absorbed (FailureDetected) and what
    the application got (a failed request), by SQLSTATE and classification."""
    counts: Counter[tuple[str | None, str]] = Counter()
    first: dict[tuple[str | None, str], str] = {}
    for request in requests:
        found: list[tuple[Failure, str]] = [
            (e.failure, e.error) for _, e in request.events if isinstance(e, ev.FailureDetected)]
        if not request.ok and request.failure is not None and request.message != "stopped":
            found.append((request.failure, request.message))
        for failure, message in found:
            key = _error_key(failure)
            counts[key] += 1
            first.setdefault(key, message)
    for _, event in loose:
        if isinstance(event, ev.FailureDetected):
            key = _error_key(event.failure)
            counts[key] += 1
            first.setdefault(key, event.error)
    return [ErrorSeen(sqlstate=s, kind=k, count=n, message=first[(s, k)][:300],
                      in_guide=None if guide_codes is None else s in guide_codes)
            for (s, k), n in sorted(counts.items(), key=lambda kv: -kv[1])]


def _first_error(request: Request) -> tuple[float, Failure | None, str]:
    for at, event in request.events:
        if isinstance(event, ev.FailureDetected):
            return at, event.failure, event.error
    for at, event in request.events:
        if isinstance(event, ev.Reconnected):
            return at, None, "reconnected"
    return request.ended, request.failure, request.message


def find_windows(requests: Sequence[Request], kind: RequestKind, *,
                 overlaps: Sequence[float] = ()) -> list[Window]:
    """The outage windows of one kind of request (pure).

    A request is troubled when it failed, when the library ran it again or reconnected
    for it, when it was in flight at one of ``overlaps`` (e.g. a pool's failover
    announcement), or when it stalled: it took longer than `STALL_FACTOR` times the
    median good request of its kind, and at least `STALL_FLOOR` seconds (a session that
    hangs in a partition and goes on when the network heals raises nothing).

    A run of consecutive troubled requests (by start) is one window: from the last good
    completion before it to the first good completion from it on.
    """
    mine = sorted((r for r in requests if r.kind == kind), key=lambda r: r.started)
    latencies = sorted(r.ended - r.started for r in mine if r.ok)
    stall = max(STALL_FLOOR, STALL_FACTOR * latencies[len(latencies) // 2]) if latencies \
        else STALL_FLOOR

    def troubled(r: Request) -> bool:
        return (r.troubled or r.ended - r.started > stall
                or any(r.started <= t <= r.ended for t in overlaps))

    windows: list[Window] = []
    i = 0
    while i < len(mine):
        if not troubled(mine[i]):
            i += 1
            continue
        # The failed requests from here on, then the first that succeeded (mine[j]).
        j = i
        while j < len(mine) and not mine[j].ok:
            j += 1
        group = mine[i:j + 1]
        first = group[0]
        before = [r.ended for r in mine[:i] if r.ok]
        start = max(before) if before else first.started
        error_at, failure, message = _first_error(first)
        ends = [r.ended for r in mine[i:] if r.ok]
        end = min(ends) if ends else None
        windows.append(Window(
            kind=kind, start=start, end=end, first_error_at=error_at,
            first_error=None if failure is None and message in ("", "reconnected")
            else ErrorSeen(failure.sqlstate if failure else None,
                           failure.kind.name if failure else Kind.NOT_RETRYABLE.name,
                           1, message[:300]),
            detect_seconds=max(0.0, error_at - first.started),
            reconnect_seconds=None if end is None else max(0.0, end - error_at),
            failed=sum(1 for r in group if not r.ok and r.message != "stopped"),
            retried=sum(1 for r in group if r.ok and r.retried),
        ))
        i = j + 1
    return windows


def all_windows(requests: Sequence[Request],
                loose_events: Sequence[tuple[float, ev.Event]] = ()) -> list[Window]:
    """The write and read windows; a request in flight when a pool announced a failover
    met it, even when the pool replaced its connection before anything failed (pure)."""
    announced = [t for t, e in loose_events if isinstance(e, ev.PoolFailover)]
    return (find_windows(requests, "write", overlaps=announced)
            + find_windows(requests, "read", overlaps=announced))


def merge_incidents(windows: Sequence[Window], *, gap: float = INCIDENT_GAP
                    ) -> list[list[Window]]:
    """Windows (of both kinds) that overlap or nearly touch: one incident each (pure)."""
    groups: list[list[Window]] = []
    end: float | None = None
    for window in sorted(windows, key=lambda w: w.start):
        if groups and (end is None or window.start <= end + gap):
            groups[-1].append(window)
            end = None if end is None or window.end is None else max(end, window.end)
        else:
            groups.append([window])
            end = window.end
    return groups


def _percentile(values: Sequence[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo = int(k)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def phases(requests: Sequence[Request], incidents: Sequence[Incident], t0: float,
           t_end: float) -> list[Phase]:
    """Throughput and latency of good requests before, during and after the incidents."""
    spans: list[tuple[float, float]] = [
        (t0 + i.start, t0 + (i.end if i.end is not None else t_end - t0)) for i in incidents]
    first = spans[0][0] if spans else t_end
    last = spans[-1][1] if spans else t_end

    def during(t: float) -> bool:
        return any(a <= t <= b for a, b in spans)

    out: list[Phase] = []
    for name, test, seconds in (
        ("before", lambda t: t < first, first - t0),
        ("during", during, sum(b - a for a, b in spans)),
        ("after", lambda t: t > last and not during(t), t_end - last if spans else 0.0),
    ):
        if name != "before" and not spans:
            continue
        good = [r for r in requests if r.ok and test(r.ended)]
        lat = [(r.ended - r.started) * 1000 for r in good]
        p50 = _percentile(lat, 0.5)
        p99 = _percentile(lat, 0.99)
        out.append(Phase(name=name, seconds=round(max(seconds, 0.0), 3),  # type: ignore[arg-type]
                         requests=len(good),
                         per_second=round(len(good) / seconds, 1) if seconds > 0 else 0.0,
                         p50_ms=None if p50 is None else round(p50, 2),
                         p99_ms=None if p99 is None else round(p99, 2)))
    return out


def samples(requests: Sequence[Request], t0: float) -> list[Sample]:
    """The requests for the chart, thinned evenly to `MAX_SAMPLES` (troubled ones kept)."""
    ordered = sorted(requests, key=lambda r: r.started)
    keep = [r for r in ordered if r.troubled]
    rest = [r for r in ordered if not r.troubled]
    room = max(0, MAX_SAMPLES - len(keep))
    step = max(1, -(-len(rest) // room)) if room else len(rest) + 1
    chosen = sorted(keep + rest[::step], key=lambda r: r.started)
    return [Sample(t=round(r.started - t0, 4), kind=r.kind, ok=r.ok,
                   latency_ms=round((r.ended - r.started) * 1000, 2), retried=r.retried)
            for r in chosen]


def _rel(t: float, t0: float) -> float:
    return round(t - t0, 4)


def analyse(records: Records, *, name: str, driver: str, access: str,
            scenario: str | None = None, rto: float | None = None,
            guide_codes: frozenset[str | None] | None = None,
            server_outages: Sequence[ServerOutage] = (),
            settings: dict[str, str] | None = None,
            writes: WriteCheck | None = None) -> Run:
    """The report's `Run` for what a canary recorded (pure)."""
    t0 = records.t0
    reqs = records.requests
    raw_windows = all_windows(reqs, records.loose_events)

    def shift(w: Window) -> Window:
        return Window(kind=w.kind, start=_rel(w.start, t0),
                      end=None if w.end is None else _rel(w.end, t0),
                      first_error_at=_rel(w.first_error_at, t0), first_error=w.first_error,
                      detect_seconds=None if w.detect_seconds is None
                      else round(w.detect_seconds, 4),
                      reconnect_seconds=None if w.reconnect_seconds is None
                      else round(w.reconnect_seconds, 4),
                      failed=w.failed, retried=w.retried)

    windows = sorted((shift(w) for w in raw_windows), key=lambda w: (w.start, w.kind))
    all_events = [(t, e) for r in reqs for t, e in r.events] + list(records.loose_events)
    incidents: list[Incident] = []
    for group in merge_incidents(windows):
        start = min(w.start for w in group)
        ends = [w.end for w in group]
        end = None if any(e is None for e in ends) else max(e for e in ends if e is not None)
        lo, hi = t0 + start, t0 + (end if end is not None else records.t_end - t0) + 0.001
        inside = [e for t, e in all_events if lo <= t <= hi]
        in_reqs = [r for r in reqs if lo <= r.started <= hi or lo <= r.ended <= hi]
        before = _identity_at(records.identities, lo, before=True)
        after = _identity_at(records.identities, hi, before=False)
        seconds = None if end is None else end - start
        incidents.append(Incident(
            start=start, end=end, windows=group,
            units_replayed=sum(isinstance(e, ev.UnitReplayed) for e in inside),
            commits=dict(Counter(e.outcome for e in inside if isinstance(e, ev.CommitResolved))),
            errors=errors_seen(in_reqs, guide_codes=guide_codes),
            server_change=server_change(before, after), server_after=after,
            within_rto=None if rto is None else (seconds is not None and seconds <= rto),
        ))
    timeline = _markers(reqs, windows, t0)
    identities = [i for _, i in records.identities if i is not None]
    before_id = identities[0] if identities else None
    after_id = identities[-1] if identities else None
    detection = [w.detect_seconds for w in windows if w.detect_seconds is not None]
    run = Run(
        name=name, driver=driver, access=access, scenario=scenario,
        seconds=round(records.t_end - t0, 3), requests=len(reqs),
        failed=sum(1 for r in reqs if not r.ok and r.message != "stopped"),
        retried=sum(1 for r in reqs if r.ok and r.retried),
        timeline=timeline, windows=windows, incidents=incidents,
        server_outages=list(server_outages), server_before=before_id, server_after=after_id,
        server_change=server_change(before_id, after_id), writes=writes,
        phases=phases(reqs, incidents, t0, records.t_end),
        client_settings=dict(settings or {}),
        detection_seconds=max(detection) if detection else None,
        errors=errors_seen(reqs, records.loose_events, guide_codes),
        units_replayed=sum(isinstance(e, ev.UnitReplayed) for _, e in all_events),
        commits=dict(Counter(e.outcome for _, e in all_events
                             if isinstance(e, ev.CommitResolved))),
        samples=samples(reqs, t0),
    )
    run.findings = run_findings(run, rto=rto)
    return run


def _identity_at(identities: Sequence[tuple[float, ServerIdentity | None]], t: float, *,
                 before: bool) -> ServerIdentity | None:
    if before:
        known = [i for at, i in identities if at <= t and i is not None]
        return known[-1] if known else None
    known = [i for at, i in identities if at >= t and i is not None]
    return known[0] if known else None


def _markers(requests: Sequence[Request], windows: Sequence[Window], t0: float) -> list[Marker]:
    if not windows:
        return []
    first_window = min(windows, key=lambda w: w.start)
    out = [Marker("first error", first_window.first_error_at)]
    for kind in ("write", "read"):
        mine = [w for w in windows if w.kind == kind]
        if not mine:
            continue
        out.append(Marker(f"last good {kind}", min(w.start for w in mine)))
        ends = [w.end for w in mine if w.end is not None]
        if ends:
            out.append(Marker(f"first good {kind}", min(ends)))
    return sorted(out, key=lambda m: m.at)


def run_findings(run: Run, *, rto: float | None) -> list[Finding]:
    """The verdicts of one run: the invariant first."""
    out: list[Finding] = []
    w = run.writes
    if w is not None:
        if w.ok:
            out.append(Finding("every acknowledged write present exactly once", "ok",
                               f"{w.present_once} of {w.acknowledged}"))
        else:
            out.append(Finding(
                "every acknowledged write present exactly once", "fail",
                f"{w.present_once} of {w.acknowledged}; lost {len(w.lost)}, "
                f"doubled {len(w.doubled)}",
                expected=f"{w.acknowledged} of {w.acknowledged}",
                why="a lost write is one the server acknowledged and no longer has (the "
                    "RPO of this failover); a doubled one committed twice"))
        if w.unacknowledged:
            out.append(Finding(
                "writes that raised", "info",
                f"{w.unacknowledged} raised; {w.unacknowledged_committed} of them committed",
                why="a write that raised may have committed (the application was told "
                    "so, or CommitOutcomeUnknown); not part of the invariant"))
    if run.failed:
        first = next((e.message for e in run.errors if e.kind == "NOT_RETRYABLE"), "")
        out.append(Finding("requests failed", "warn", str(run.failed), expected="0",
                           why="the library retries within its policy; a request fails "
                               "when the outage outlasted the policy's deadline, the error "
                               "was not retryable, or a COMMIT's outcome could not be known"
                               + (f" (first: {first})" if first else "")))
    unended = [i for i in run.incidents if i.end is None]
    if unended:
        out.append(Finding("outages that ended", "fail" if rto is not None else "warn",
                           f"{len(run.incidents) - len(unended)} of {len(run.incidents)}",
                           why="the service did not come back within the run"))
    if rto is not None and run.incidents:
        good = sum(1 for i in run.incidents if i.within_rto)
        longest = max((i.seconds or 0.0) for i in run.incidents)
        out.append(Finding(f"outages within --rto {rto:g} s",
                           "ok" if good == len(run.incidents) else "fail",
                           f"{good} of {len(run.incidents)} within {rto:g} s "
                           f"(longest {longest:.2f} s)", expected=f"all within {rto:g} s"))
    return out
