"""One report model for ``drill``, ``probe`` and ``check``.

The text, JSON and HTML reports are views of a `Report` (`symfo_failover._views`); the
JSON view is `Report.to_dict()`, described by ``symfo_failover/schemas/report.schema.json``.
Times inside a run are seconds from the run's start (``time.monotonic()`` based), so that
a chart needs no clock arithmetic; ``started_at`` / ``finished_at`` are wall-clock ISO 8601.
Nothing here does I/O.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

#: Bumped when a field changes meaning or goes away (adding a field does not).
SCHEMA_VERSION = 1

Command = Literal["drill", "probe", "check"]
Status = Literal["ok", "warn", "fail", "info"]
RequestKind = Literal["read", "write"]
STATUSES: tuple[Status, ...] = ("ok", "warn", "fail", "info")


def now_iso() -> str:
    """The wall-clock time, UTC, ISO 8601 with seconds."""
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


@dataclass
class Finding:
    """One verdict: a setting against the guide, or an invariant of a run."""

    name: str
    status: Status
    #: What was found (a setting's value, "3 of 3", ...).
    value: str
    #: What is wanted.
    expected: str = ""
    #: Why it matters / what to do, in one or two sentences.
    why: str = ""
    #: The guide's section, where there is one ("3.4.1").
    guide: str | None = None


@dataclass
class ErrorSeen:
    """An error a client got (or that the library absorbed), by SQLSTATE."""

    sqlstate: str | None
    #: The classification (`Kind` name).
    kind: str
    count: int = 1
    #: The first message seen, one line.
    message: str = ""
    #: Whether the guide's table for the driver lists this SQLSTATE (None: not compared).
    in_guide: bool | None = None


@dataclass
class Window:
    """An outage of one kind of request, as the client saw it.

    ``start``: the last good request of that kind completed; ``end``: the first good one
    after the trouble completed (None: never, within the run).
    """

    kind: RequestKind
    start: float
    end: float | None
    first_error_at: float
    first_error: ErrorSeen | None = None
    #: From the start of the first request that met the outage to its first error.
    detect_seconds: float | None = None
    #: From the first error to the first good request's completion.
    reconnect_seconds: float | None = None
    #: Requests that failed (the application got an error).
    failed: int = 0
    #: Requests that succeeded only after the library ran them (or reconnected) again.
    retried: int = 0

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class ServerIdentity:
    """Who served the client: read from the server itself."""

    address: str | None
    port: int | None
    started: str
    in_recovery: bool
    timeline: int | None = None
    system_identifier: str | None = None
    #: ``cluster_name`` (the harness's node name), when set.
    name: str | None = None


@dataclass
class Incident:
    """One failover as the client saw it: the read and write windows that overlap."""

    start: float
    end: float | None
    windows: list[Window]
    units_replayed: int = 0
    #: Commit resolutions by outcome ("committed", "not committed", ...).
    commits: dict[str, int] = field(default_factory=dict)
    errors: list[ErrorSeen] = field(default_factory=list)
    #: "same server", "restarted", "promoted", "different server", "unknown".
    server_change: str = "unknown"
    server_after: ServerIdentity | None = None
    #: None: no ``--rto`` given.
    within_rto: bool | None = None

    @property
    def seconds(self) -> float | None:
        return None if self.end is None else self.end - self.start


@dataclass
class ServerOutage:
    """What the server did (drill: the harness's `Transition`), in run seconds."""

    scenario: str
    down_at: float | None
    accepting_at: float | None
    listening_at: float | None = None


@dataclass
class Phase:
    """Throughput and latency of good requests before, during or after the outages."""

    name: Literal["before", "during", "after"]
    seconds: float
    requests: int
    per_second: float
    p50_ms: float | None
    p99_ms: float | None


@dataclass
class WriteCheck:
    """Every acknowledged canary write looked up after the run."""

    acknowledged: int
    present_once: int
    #: Sequence numbers acknowledged but not found: lost by the server (the RPO).
    lost: list[int] = field(default_factory=list)
    #: Sequence numbers found more than once: doubled.
    doubled: list[int] = field(default_factory=list)
    #: Writes that raised, and whether they committed anyway (found) or not.
    unacknowledged: int = 0
    unacknowledged_committed: int = 0

    @property
    def ok(self) -> bool:
        return not self.lost and not self.doubled and self.present_once == self.acknowledged


@dataclass
class Sample:
    """One request, for the chart (a run keeps at most a few thousand)."""

    t: float
    kind: RequestKind
    ok: bool
    latency_ms: float
    retried: bool = False


@dataclass
class Marker:
    """A named instant on the timeline ("last good write", "first error", ...)."""

    name: str
    at: float


@dataclass
class Run:
    """One canary workload: a probe, or one client of one drill scenario."""

    name: str
    driver: str
    #: "connection" (`ResilientConnection`) or "pool" (`FailoverPool` / `OdbcFailoverPool`).
    access: str
    scenario: str | None
    seconds: float
    requests: int
    failed: int
    retried: int
    timeline: list[Marker] = field(default_factory=list)
    windows: list[Window] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    server_outages: list[ServerOutage] = field(default_factory=list)
    server_before: ServerIdentity | None = None
    server_after: ServerIdentity | None = None
    server_change: str = "unknown"
    writes: WriteCheck | None = None
    phases: list[Phase] = field(default_factory=list)
    #: Client settings in force (connect_timeout, keepalives, ...), name -> value.
    client_settings: dict[str, str] = field(default_factory=dict)
    #: The longest time to detect measured in this run.
    detection_seconds: float | None = None
    errors: list[ErrorSeen] = field(default_factory=list)
    units_replayed: int = 0
    commits: dict[str, int] = field(default_factory=dict)
    #: The run's own verdicts (the invariant, the errors against the guide, ...).
    findings: list[Finding] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(f.status != "fail" for f in self.findings)


@dataclass
class Report:
    """What one command found. ``ok`` decides the exit status (0 or 1)."""

    command: Command
    target: str
    started_at: str
    finished_at: str
    runs: list[Run] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Set when Ctrl-C ended the command early (what was seen is still reported).
    interrupted: bool = False
    tool_version: str = ""
    schema_version: int = SCHEMA_VERSION

    @property
    def ok(self) -> bool:
        return (not self.interrupted
                and all(f.status != "fail" for f in self.findings)
                and all(run.ok for run in self.runs))

    @property
    def summary(self) -> str:
        """One line: the verdict."""
        fails = [f for f in self.findings if f.status == "fail"]
        fails += [f for run in self.runs for f in run.findings if f.status == "fail"]
        warns = [f for f in self.findings if f.status == "warn"]
        warns += [f for run in self.runs for f in run.findings if f.status == "warn"]
        head = "interrupted" if self.interrupted else ("OK" if self.ok else "FAILED")
        parts = [f"{len(fails)} failed", f"{len(warns)} warnings"]
        if self.runs:
            parts.insert(0, f"{sum(run.ok for run in self.runs)} of {len(self.runs)} runs held")
        return f"{self.command}: {head} ({', '.join(parts)})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON report (see ``schemas/report.schema.json``)."""
        data = asdict(self)
        data["ok"] = self.ok
        data["summary"] = self.summary
        for run, rdata in zip(self.runs, data["runs"], strict=True):
            rdata["ok"] = run.ok
            if run.writes is not None:
                rdata["writes"]["ok"] = run.writes.ok
            for window, wdata in zip(run.windows, rdata["windows"], strict=True):
                wdata["seconds"] = window.seconds
            for incident, idata in zip(run.incidents, rdata["incidents"], strict=True):
                idata["seconds"] = incident.seconds
                for window, wdata in zip(incident.windows, idata["windows"], strict=True):
                    wdata["seconds"] = window.seconds
        return data


class InputError(Exception):
    """Bad input or an environment the command cannot work in (exit status 2).

    The message is for people: one or two sentences that say what to do. Never a
    connection string with a password in it.
    """


def from_ctrl_c(exc: BaseException) -> bool:
    """A KeyboardInterrupt, or an error a C extension made of one (pyodbc's ``connect``
    raises ``SystemError: ... returned a result with an exception set`` when Ctrl-C
    lands inside it)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, KeyboardInterrupt):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False
