"""Realistic sample `Report`s for the views' tests (no I/O, deterministic).

`sample_drill` is a whole drill (6 scenarios x 3 drivers x 2 access = 36 runs, one of
which doubled a write), `sample_probe` a probe that watched one switchover of a real
cluster, `sample_check` a settings check. The edge cases: a probe that saw nothing
(`sample_empty_probe`), one whose server never came back (`sample_unrecovered_probe`), a
drill cut short by Ctrl-C (`sample_interrupted_drill`), and text that must be escaped
(`sample_hostile`).
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass

from symfo_failover._report import (
    ErrorSeen,
    Finding,
    Incident,
    Marker,
    Phase,
    Report,
    Run,
    Sample,
    ServerIdentity,
    ServerOutage,
    Window,
    WriteCheck,
)

STARTED = "2025-12-02T03:00:05+00:00"

_CLIENT_SETTINGS = {
    "connect_timeout": "2",
    "keepalives_idle": "5",
    "keepalives_interval": "1",
    "keepalives_count": "3",
    "tcp_user_timeout": "8000",
}


def _node(name: str, port: int, *, started: str, timeline: int = 1,
          in_recovery: bool = False) -> ServerIdentity:
    return ServerIdentity(address="127.0.0.1", port=port, started=started,
                          in_recovery=in_recovery, timeline=timeline,
                          system_identifier="7443219876543210987", name=name)


@dataclass(frozen=True)
class _Scenario:
    name: str
    down_at: float
    accepting_at: float | None
    listening_at: float | None
    #: (sqlstate, kind, message) the session got when it broke, then while connecting.
    lost: tuple[str | None, str, str]
    connect: tuple[str | None, str, str]
    change: str


_LOST_KILL = (None, "CONNECTION_LOST", "server closed the connection unexpectedly")
_REFUSED = (None, "CONNECT_FAILED",
            'connection to server at "127.0.0.1", port 5432 failed: Connection refused')
_ODBC_REFUSED = ("08001", "CONNECT_FAILED", "could not connect to server: Connection refused")

SCENARIOS = (
    _Scenario("switchover", 6.0, 8.4, None,
              ("57P01", "CONNECTION_LOST",
               "terminating connection due to administrator command"), _REFUSED, "promoted"),
    _Scenario("failover", 6.0, 9.1, None, _LOST_KILL, _REFUSED, "promoted"),
    _Scenario("failover, 3 s switch delay", 6.0, 11.6, None, _LOST_KILL, _REFUSED,
              "promoted"),
    _Scenario("failover, starting (57P03)", 6.0, 10.8, 8.1, _LOST_KILL,
              ("57P03", "CONNECT_FAILED", "the database system is starting up"), "promoted"),
    _Scenario("crash", 6.0, 9.6, None,
              ("57P02", "CONNECTION_LOST",
               "terminating connection because of crash of another server process"),
              _REFUSED, "restarted"),
    _Scenario("restart", 6.0, 12.2, None,
              ("57P01", "CONNECTION_LOST",
               "terminating connection due to administrator command"), _REFUSED, "restarted"),
)
DRIVERS = ("psycopg", "psycopg async", "pyodbc")
ACCESS = ("connection", "pool")


def _samples(rng: random.Random, seconds: float, windows: list[Window],
             step: float = 0.1) -> list[Sample]:
    """A read and a write every ``step`` seconds; failed inside a window, some retried."""
    out: list[Sample] = []
    for kind in ("write", "read"):
        t = 0.03 if kind == "write" else 0.08
        while t < seconds:
            hit = next((w for w in windows if w.kind == kind
                        and w.start < t < (w.end if w.end is not None else seconds)), None)
            if hit is None:
                latency = rng.lognormvariate(1.1 if kind == "read" else 1.6, 0.35)
                out.append(Sample(t=round(t, 3), kind=kind, ok=True,
                                  latency_ms=round(latency, 2)))
            elif hit.end is not None and rng.random() < 0.6:
                out.append(Sample(t=round(t, 3), kind=kind, ok=True, retried=True,
                                  latency_ms=round(rng.uniform(300, 2500), 1)))
            else:
                out.append(Sample(t=round(t, 3), kind=kind, ok=False,
                                  latency_ms=round(rng.uniform(0.2, 3.0), 2)))
            t += step
    out.sort(key=lambda s: s.t)
    return out


def _count_into_windows(windows: list[Window], samples: list[Sample], seconds: float) -> None:
    """Each window's failed and retried requests, from the samples in it."""
    for w in windows:
        inside = [s for s in samples if s.kind == w.kind
                  and w.start < s.t < (w.end if w.end is not None else seconds)]
        w.failed = sum(1 for s in inside if not s.ok)
        w.retried = sum(1 for s in inside if s.retried)


def _phases(seconds: float, start: float, end: float, requests: int) -> list[Phase]:
    before, during, after = start, end - start, seconds - end
    rate = requests / seconds
    return [
        Phase("before", round(before, 2), int(rate * before), round(rate, 1), 3.1, 9.8),
        Phase("during", round(during, 2), int(rate * during * 0.4), round(rate * 0.4, 1),
              410.0, 2380.0),
        Phase("after", round(after, 2), int(rate * after), round(rate, 1), 3.4, 12.5),
    ]


def _drill_run(sc: _Scenario, driver: str, access: str, rng: random.Random) -> Run:
    seconds = 20.0
    odbc = driver == "pyodbc"
    pool = access == "pool"
    lost = ("08S01", "CONNECTION_LOST", "communication link failure") \
        if odbc and sc.lost[0] is None else sc.lost
    connect = _ODBC_REFUSED if odbc and sc.connect[0] is None else sc.connect
    accepting = sc.accepting_at if sc.accepting_at is not None else seconds
    detect_w = round(rng.uniform(0.002, 0.03) if sc.lost[0] else rng.uniform(0.01, 0.4), 3)
    lag = round(rng.uniform(0.05, 0.6) + (0.25 if pool else 0.0), 3)
    w_start = round(sc.down_at - rng.uniform(0.01, 0.09), 3)
    r_start = round(sc.down_at - rng.uniform(0.02, 0.09), 3)
    w_err = round(sc.down_at + 0.004 + detect_w, 3)
    r_err = round(sc.down_at + 0.006 + detect_w, 3)
    w_end = round(accepting + lag, 3)
    r_end = round(accepting + lag * 0.7, 3)
    first = ErrorSeen(lost[0], lost[1], 1, lost[2], in_guide=True)
    windows = [
        Window("write", w_start, w_end, w_err, first, detect_seconds=detect_w,
               reconnect_seconds=round(w_end - w_err, 3)),
        Window("read", r_start, r_end, r_err, first, detect_seconds=round(detect_w * 1.2, 3),
               reconnect_seconds=round(r_end - r_err, 3)),
    ]
    samples = _samples(rng, seconds, windows)
    _count_into_windows(windows, samples, seconds)
    requests = len(samples)
    n_connect = rng.randint(4, 25)
    errors = [
        ErrorSeen(lost[0], lost[1], rng.randint(1, 3), lost[2], in_guide=not (odbc and lost[0]
                                                                              == "08S01")),
        ErrorSeen(connect[0], connect[1], n_connect, connect[2], in_guide=True),
    ]
    acknowledged = sum(1 for s in samples if s.kind == "write" and s.ok)
    doubled = [131] if (sc.name == "crash" and driver == "pyodbc" and not pool) else []
    writes = WriteCheck(acknowledged=acknowledged, present_once=acknowledged - len(doubled),
                        doubled=doubled, unacknowledged=windows[0].failed,
                        unacknowledged_committed=0)
    replayed = rng.randint(1, 4)
    commits = {"committed": 1} if rng.random() < 0.5 else {"not committed": 1}
    findings = [
        Finding("writes exactly once", "fail" if doubled else "ok",
                (f"{len(doubled)} doubled (seq {doubled[0]})" if doubled
                 else f"{acknowledged} of {acknowledged} present once"),
                "every acknowledged write present exactly once",
                "A unit of work was run again after it had committed: the commit resolution "
                "must look the unit up before replaying it." if doubled else "", "3.5"),
        Finding("recovered", "ok", f"writes back {w_end - sc.down_at:.2f} s after the fault",
                "within the run"),
    ]
    if odbc and lost[0] == "08S01":
        findings.append(Finding(
            "errors in the guide", "warn", "08S01 not in the guide's table for pyodbc",
            "every SQLSTATE seen is listed", "The library treats it as a lost connection; "
            "the guide's ODBC table does not list it.", "4.2.3"))
    if pool and sc.name == "failover" and driver == "psycopg":
        findings.append(Finding("detection", "warn", f"{detect_w + 2.1:.2f} s",
                                "under 2 s", "A pool's idle connections were found dead only "
                                "when borrowed; set check= or max_idle.", "3.4.1"))
    timeline = [
        Marker("fault", round(sc.down_at - 0.01, 3)),
        Marker("last good write", w_start),
        Marker("first error", min(w_err, r_err)),
        Marker("accepting", accepting),
        Marker("first good write", w_end),
    ]
    if sc.listening_at is not None:
        timeline.append(Marker("listening", sc.listening_at))
    before = _node("node-a", 5432, started="2025-12-02 03:00:01.512+00")
    after_started = f"2025-12-02 03:00:{int(5 + accepting):02d}"
    after = (_node("node-a", 5432, started=after_started + ".204+00")
             if sc.change == "restarted" else
             _node("node-b", 5433, started=after_started + ".918+00", timeline=2))
    incident = Incident(start=min(w_start, r_start), end=max(w_end, r_end), windows=windows,
                        units_replayed=replayed, commits=commits, errors=errors,
                        server_change=sc.change, server_after=after)
    return Run(
        name=f"{sc.name} · {driver} · {access}", driver=driver, access=access,
        scenario=sc.name, seconds=seconds, requests=requests,
        failed=sum(1 for s in samples if not s.ok),
        retried=sum(1 for s in samples if s.retried),
        timeline=timeline, windows=windows, incidents=[incident],
        server_outages=[ServerOutage(sc.name, sc.down_at, sc.accepting_at, sc.listening_at)],
        server_before=before, server_after=after, server_change=sc.change,
        writes=writes, phases=_phases(seconds, w_start, w_end, requests),
        client_settings=dict(_CLIENT_SETTINGS) if not odbc else {
            "driver": "PostgreSQL Unicode", "ConnSettings": "SET statement_timeout=5000",
            "KeepaliveTime": "5", "KeepaliveInterval": "1"},
        detection_seconds=round(detect_w * 1.2, 3), errors=errors, units_replayed=replayed,
        commits=commits, findings=findings, samples=samples,
    )


def sample_drill() -> Report:
    rng = random.Random(20251202)
    runs = [_drill_run(sc, driver, access, rng)
            for sc in SCENARIOS for driver in DRIVERS for access in ACCESS]
    return Report(
        command="drill", target="local two-node cluster (node-a, node-b; PostgreSQL 16.4)",
        started_at=STARTED, finished_at="2025-12-02T03:14:41+00:00", runs=runs,
        notes=["Each run: 20 s of one read and one write every 100 ms per client; the fault "
               "at 6 s.", "Times are seconds from each run's start."],
        tool_version="0.1.0",
    )


def _probe_run(*, recovered: bool = True) -> Run:
    rng = random.Random(7)
    seconds = 120.0 if recovered else 60.0
    err = ErrorSeen("57P01", "CONNECTION_LOST", 2,
                    "terminating connection due to administrator command", in_guide=True)
    if recovered:
        windows = [
            Window("write", 42.113, 47.902, 42.151, err, detect_seconds=0.012,
                   reconnect_seconds=5.751),
            Window("read", 42.120, 46.034, 42.160, err, detect_seconds=0.015,
                   reconnect_seconds=3.874),
        ]
    else:
        windows = [
            Window("write", 42.113, None, 42.151, err, detect_seconds=0.012),
            Window("read", 42.120, None, 42.160, err, detect_seconds=0.015),
        ]
    samples = _samples(rng, seconds, windows, step=0.25)
    _count_into_windows(windows, samples, seconds)
    before = ServerIdentity("10.20.0.11", 5432, "2025-11-28 22:10:04.001+09", False,
                            timeline=3, system_identifier="7299887766554433221",
                            name="db-tokyo-1")
    after = (ServerIdentity("10.20.0.12", 5432, "2025-12-02 12:00:47.660+09", False,
                            timeline=4, system_identifier="7299887766554433221",
                            name="db-tokyo-2") if recovered else None)
    errors = [err, ErrorSeen(None, "CONNECT_FAILED", 19,
                             'connection to server at "10.20.0.11", port 5432 failed: '
                             "Connection refused", in_guide=True)]
    ack = sum(1 for s in samples if s.kind == "write" and s.ok)
    incident = Incident(42.113, 47.902 if recovered else None, windows, units_replayed=3,
                        commits={"committed": 1, "not committed": 1}, errors=errors,
                        server_change="different server" if recovered else "unknown",
                        server_after=after, within_rto=recovered)
    timeline = [Marker("last good write", 42.113), Marker("first error", 42.151)]
    if recovered:
        timeline += [Marker("first good read", 46.034), Marker("first good write", 47.902)]
    findings = [
        Finding("writes exactly once", "ok", f"{ack} of {ack} present once",
                "every acknowledged write present exactly once", "", "3.5"),
        Finding("recovery within RTO", "ok" if recovered else "fail",
                "5.79 s" if recovered else "not recovered in 17.9 s", "under 30 s (--rto 30)",
                "" if recovered else "The access point never accepted sessions again: check "
                "that the standby took over."),
        Finding("errors in the guide", "ok", "2 of 2 SQLSTATEs listed", "all listed", "",
                "4.2.1"),
        Finding("detection", "ok", "0.02 s", "under 2 s"),
    ]
    return Run(
        name="probe · psycopg · pool", driver="psycopg", access="pool", scenario=None,
        seconds=seconds, requests=len(samples), failed=sum(1 for s in samples if not s.ok),
        retried=sum(1 for s in samples if s.retried), timeline=timeline, windows=windows,
        incidents=[incident], server_before=before, server_after=after,
        server_change=incident.server_change,
        writes=WriteCheck(ack, ack, unacknowledged=1, unacknowledged_committed=1)
        if recovered else None,
        phases=_phases(seconds, 42.113, 47.902, len(samples)) if recovered else [],
        client_settings=dict(_CLIENT_SETTINGS), detection_seconds=0.015, errors=errors,
        units_replayed=3, commits={"committed": 1, "not committed": 1}, findings=findings,
        samples=samples,
        notes=[] if recovered else ["The writes lookup was skipped: no server to ask."],
    )


def sample_probe() -> Report:
    return Report(
        command="probe", target="host=db.tokyo.example port=5432 dbname=orders user=app",
        started_at="2025-12-02T02:59:40+00:00", finished_at="2025-12-02T03:01:40+00:00",
        runs=[_probe_run()], tool_version="0.1.0",
        notes=["The probe wrote to a table of its own (symfo_probe) and removed it after."],
    )


def sample_unrecovered_probe() -> Report:
    return Report(
        command="probe", target="host=db.tokyo.example port=5432 dbname=orders user=app",
        started_at="2025-12-02T02:59:40+00:00", finished_at="2025-12-02T03:00:40+00:00",
        runs=[_probe_run(recovered=False)], tool_version="0.1.0",
    )


def sample_empty_probe() -> Report:
    """A probe that never got a request through: nothing at all to show."""
    return Report(
        command="probe", target="host=localhost port=5432", started_at=STARTED,
        finished_at=STARTED,
        runs=[Run(name="probe · psycopg · connection", driver="psycopg", access="connection",
                  scenario=None, seconds=0.0, requests=0, failed=0, retried=0)],
    )


def sample_check() -> Report:
    f = Finding
    findings = [
        f("connect_timeout", "ok", "2", "1 to 5 (seconds)",
          "A connect to a node that is gone gives up quickly.", "3.4.1"),
        f("keepalives_idle", "warn", "7200 (the system default)", "at most 30",
          "A dead server is noticed only after two hours of silence; set keepalives_idle=5.",
          "3.4.2"),
        f("tcp_user_timeout", "fail", "0 (off)", "about 8000 (ms)",
          "A write to a vanished server hangs until the kernel gives up (about 15 min).",
          "3.4.2"),
        f("target_session_attrs", "ok", "read-write", "read-write",
          "A standby that answers is not taken for the primary.", "3.4.3"),
        f("statement_timeout", "info", "0", "", "Not about failover; shown for reference."),
        f("psqlODBC driver", "ok", "PostgreSQL Unicode 16.00.0000", "registered", "", "4.1"),
        f("libpq", "ok", "16.4", "14 or newer", "", None),
    ]
    return Report(command="check", target="host=db.tokyo.example port=5432 dbname=orders",
                  started_at=STARTED, finished_at=STARTED, findings=findings,
                  notes=["Nothing was connected to; only the settings were read."],
                  tool_version="0.1.0")


def sample_interrupted_drill() -> Report:
    """Ctrl-C in the middle of the fourth run: what was seen is still reported."""
    report = sample_drill()
    report.runs = report.runs[:4]
    last = report.runs[-1]
    last.seconds = 7.4
    last.windows[0].end = None
    last.windows[0].reconnect_seconds = None
    last.windows[1].end = None
    last.windows[1].reconnect_seconds = None
    last.incidents[0].end = None
    last.server_outages[0].accepting_at = None
    last.server_after = None
    last.server_change = "unknown"
    last.samples = [s for s in last.samples if s.t < 7.4]
    last.requests = len(last.samples)
    last.failed = sum(1 for s in last.samples if not s.ok)
    last.retried = sum(1 for s in last.samples if s.retried)
    last.timeline = [m for m in last.timeline if m.at < 7.4]
    last.phases = []
    last.writes = None
    last.findings = [Finding("recovered", "warn", "interrupted before recovery",
                             "within the run")]
    report.interrupted = True
    report.finished_at = "2025-12-02T03:02:11+00:00"
    return report


HOSTILE = '<script>alert("x")</script>'


def sample_hostile() -> Report:
    """Text from servers and users that must not become markup (HTML or rich)."""
    report = sample_probe()
    run = report.runs[0]
    run.name = f"probe {HOSTILE} · [bold red]psycopg[/]"
    run.errors.append(ErrorSeen("XX000", "NOT_RETRYABLE", 1,
                                f"サーバが予期せず接続を閉じました {HOSTILE} & <b>", False))
    run.timeline.append(Marker(f"mark {HOSTILE}", 60.0))
    report.target = f"host=db dbname={HOSTILE}"
    report.notes.append(f"note with {HOSTILE} and [link=file:///etc/passwd]markup[/link]")
    report.findings.append(Finding(f"name {HOSTILE}", "warn", "<i>value</i>", "&amp;",
                                   f"why {HOSTILE}", "1.2"))
    return report


SAMPLES: dict[str, Callable[[], Report]] = {
    "drill": sample_drill,
    "probe": sample_probe,
    "check": sample_check,
    "empty_probe": sample_empty_probe,
    "unrecovered_probe": sample_unrecovered_probe,
    "interrupted_drill": sample_interrupted_drill,
    "hostile": sample_hostile,
}
