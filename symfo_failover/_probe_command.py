"""``symfo-failover probe CONNINFO``: a canary against a real cluster while it fails over.

The probe creates its own small table, writes a sequence number per request and reads
it back (or only reads, ``read_only``), through the library, until the duration is up,
``until_failovers`` outages have ended, or Ctrl-C. Then it checks every acknowledged
write, drops its table and reports what the client saw (`symfo_failover._canary.analyse`).
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from . import __version__
from ._canary import (
    Canary,
    CanaryOptions,
    IdentityMonitor,
    Request,
    all_windows,
    analyse,
    client_settings,
    connect_problem,
    describe,
    merge_incidents,
    unanswered,
)
from ._drill import GUIDE_CODES
from ._report import Finding, InputError, Report, from_ctrl_c, now_iso

#: After the last awaited outage ended, measure this long before stopping (s).
SETTLE = 2.0
DEFAULT_DURATION = 600.0


@dataclass
class ProbeOptions:
    conninfo: str
    driver: str = "psycopg"
    access: str = "connection"
    duration: float | None = None
    interval: float = 0.1
    read_only: bool = False
    concurrency: int = 1
    rto: float | None = None
    until_failovers: int | None = None
    #: How often the server's identity is read (s).
    identity_every: float = 1.0


@dataclass
class Status:
    """What the live progress shows."""

    #: The ``time.monotonic()`` that the report's run times count from.
    t0: float
    elapsed: float
    requests: int
    failed: int
    writes_up: bool | None
    reads_up: bool | None
    outages_ended: int
    outages_open: int


def validate(options: ProbeOptions) -> None:
    if options.duration is not None and options.duration <= 0:
        raise InputError("--duration must be more than 0 seconds")
    if options.until_failovers is not None and options.until_failovers < 1:
        raise InputError("--until-failovers must be at least 1")
    if options.rto is not None and options.rto <= 0:
        raise InputError("--rto must be more than 0 seconds")
    # --interval is checked by the Canary, which the drill shares.
    if not 1 <= options.concurrency <= 64:
        raise InputError("--concurrency must be between 1 and 64")


def probe(options: ProbeOptions, *, stop: threading.Event | None = None,
          on_status: Callable[[Status], None] | None = None) -> Report:
    """Run the probe; the report. Ctrl-C (KeyboardInterrupt) ends it early: the writes
    are still checked, the table dropped, and the report says ``interrupted``."""
    validate(options)
    started = now_iso()
    canary = Canary(CanaryOptions(
        options.conninfo, driver=options.driver, access=options.access,
        read_only=options.read_only, concurrency=options.concurrency,
        interval=options.interval, label="probe"))
    target = describe(canary.params)
    monitor = IdentityMonitor(options.conninfo, every=options.identity_every)
    interrupted = False
    notes: list[str] = []
    writes = None
    problem: str | None = None
    unchecked: str | None = None
    try:
        try:
            canary.setup()
            monitor.sample()
            monitor.start()
            try:
                canary.start()
            except InputError:
                raise
            except Exception as exc:
                raise InputError(connect_problem(exc, canary.params)) from None
            notes.append(_watch(canary, options, stop, on_status))
        except (KeyboardInterrupt, SystemError) as exc:
            if not from_ctrl_c(exc):
                raise
            interrupted = True
            notes.append("interrupted by Ctrl-C: the report covers what was seen until then")
        with _no_interrupts():
            # Requests still retrying (a server that never came back) are ended after a
            # moment: their writes are not acknowledged.
            canary.stop(abort=interrupted, timeout=2 if interrupted else 5)
            monitor.stop()
            monitor.sample()
            try:
                writes = canary.check_writes()
            except InputError as exc:
                unchecked = str(exc)
    finally:
        with _no_interrupts():
            problem = canary.teardown()
            monitor.stop()
        if problem:
            notes.append(problem)
    records = canary.records(monitor.samples)
    run = analyse(records, server_outages=unanswered(records.identities, records.t0,
                                                     every=options.identity_every),
                  name=f"probe · {options.driver} · {options.access}",
                  driver=options.driver, access=options.access, rto=options.rto,
                  guide_codes=GUIDE_CODES[options.driver],
                  settings=client_settings(options.driver, canary.params), writes=writes)
    findings: list[Finding] = []
    if unchecked:
        findings.append(Finding("acknowledged writes checked", "fail", "no", why=unchecked))
    if problem:
        findings.append(Finding("canary table dropped", "fail", "no", why=problem))
    if not run.incidents:
        findings.append(Finding("outages seen", "info", "none",
                                why="no request met an outage during the probe"))
    if options.until_failovers and len(run.incidents) < options.until_failovers \
            and not interrupted:
        findings.append(Finding(
            "failovers seen", "warn", f"{len(run.incidents)} of {options.until_failovers}",
            why="the duration ended before the awaited failovers"))
    return Report(command="probe", target=target, started_at=started, finished_at=now_iso(),
                  runs=[run], findings=findings, notes=notes, interrupted=interrupted,
                  tool_version=__version__)


def _watch(canary: Canary, options: ProbeOptions, stop: threading.Event | None,
           on_status: Callable[[Status], None] | None) -> str:
    """Wait until the probe is done, reporting the status on the way; why it stopped."""
    duration = options.duration
    if duration is None:
        duration = DEFAULT_DURATION
    deadline = time.monotonic() + duration
    while True:
        now = time.monotonic()
        requests, loose = canary.snapshot()
        windows = all_windows(requests, loose)
        groups = merge_incidents(windows)
        ended = [g for g in groups if all(w.end is not None for w in g)]
        last_end = max((w.end for g in ended for w in g if w.end is not None), default=None)
        if on_status is not None:
            on_status(Status(
                t0=canary.t0, elapsed=now - canary.t0, requests=len(requests),
                failed=sum(1 for r in requests if not r.ok),
                writes_up=_up(requests, "write"), reads_up=_up(requests, "read"),
                outages_ended=len(ended), outages_open=len(groups) - len(ended)))
        if now >= deadline:
            return f"stopped at the end of the duration ({duration:g} s)"
        if stop is not None and stop.is_set():
            return "stopped when asked"
        if (options.until_failovers is not None and len(ended) >= options.until_failovers
                and len(ended) == len(groups) and last_end is not None
                and now - last_end >= SETTLE):
            return (f"stopped after {len(ended)} outage(s) had ended "
                    f"(--until-failovers {options.until_failovers})")
        time.sleep(0.2)


def _up(requests: list[Request], kind: str) -> bool | None:
    for request in reversed(requests):
        if request.kind == kind:
            return request.ok
    return None


@contextlib.contextmanager
def _no_interrupts() -> Iterator[None]:
    """Ctrl-C waits while the probe cleans up (in the main thread; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: pending.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
