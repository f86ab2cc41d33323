"""``symfo-failover drill``: every scenario of the guide on a local cluster, measured.

A `LocalCluster` (two nodes on one shared data directory) runs behind a `FaultProxy`
(for the COMMIT scenarios). For each scenario, one canary per client (psycopg and pyodbc,
each through a `ResilientConnection` and through a pool) writes and reads while the
harness fails the cluster; then every acknowledged write is looked up, and each client's
outage is set beside the server's (the harness's `Transition`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import __version__
from ._canary import (
    Canary,
    CanaryOptions,
    analyse,
    client_settings,
    read_identity,
    write_check,
)
from ._ledger_admin import install_ledger
from ._policy import RetryPolicy
from ._report import (
    Finding,
    InputError,
    Report,
    Run,
    ServerIdentity,
    ServerOutage,
    from_ctrl_c,
    now_iso,
)

#: The drill's sessions notice a partition in about 2 s (DESIGN §5's tuned settings).
TUNED = {"keepalives_idle": "1", "keepalives_interval": "1", "keepalives_count": "2",
         "tcp_user_timeout": "2000", "connect_timeout": "2"}
#: Good requests each client must have made before and after the failure.
WARM_UP = 4
AFTER = 3
#: How long a scenario may take to come back before the drill gives up on it (s).
RECOVERY_TIMEOUT = 45.0
#: How far the client's window may fall inside the server's outage at either end (s):
#: the harness polls for "accepting", so a client's retry can get in first; and the
#: backends of a killed postmaster may answer for a moment after the kill.
HARNESS_STEP = 0.1

#: What the guide's section 3.4.1 table documents per driver (None: no SQLSTATE).
GUIDE_CODES: dict[str, frozenset[str | None]] = {
    "psycopg": frozenset({"57P01", None}),
    "pyodbc": frozenset({"57P01", "08S01", "08001"}),
}


@dataclass(frozen=True)
class Scenario:
    name: str
    title: str
    guide: str
    quick: bool = False
    #: Needs root and iptables (a kernel partition).
    partition: bool = False


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("switchover", "switchover (fast shutdown, the other node starts)", "4.3.2.4",
             quick=True),
    Scenario("node_down", "node down: the active node dies, the standby takes over", "3.4.1",
             quick=True),
    Scenario("server_crash", "server crash: a backend dies, every session is reset, "
             "the server starts again", "3.4.1"),
    Scenario("stop_both", "both-nodes stop for maintenance, then start", "4.3.1"),
    Scenario("while_switching", "access while switching (no node for 1 s)", "3.4.1"),
    Scenario("while_starting", "access while the new node starts (57P03 for 1 s)", "3.4.1"),
    Scenario("lost_commit", "the reply to COMMIT is lost (the server committed)", "3.4.1",
             quick=True),
    Scenario("commit_held", "a COMMIT held with the old session alive", "3.4.1"),
    Scenario("partition", "a network partition for 4 s (packets dropped in the kernel)",
             "3.4.1", partition=True),
)
BY_NAME = {s.name: s for s in SCENARIOS}


@dataclass(frozen=True)
class Client:
    driver: str
    access: str

    @property
    def label(self) -> str:
        return f"{self.driver} · {self.access}"


def clients(*, odbc: bool) -> list[Client]:
    drivers = ["psycopg", "pyodbc"] if odbc else ["psycopg"]
    return [Client(d, a) for d in drivers for a in ("connection", "pool")]


def odbc_available() -> tuple[bool, str]:
    try:
        import pyodbc
    except ImportError:
        return False, "pyodbc is not installed (pip install 'symfo-failover[odbc]')"
    if "PostgreSQL Unicode" not in pyodbc.drivers():
        return False, ("psqlODBC is not installed (Debian: apt-get install unixodbc "
                       "odbc-postgresql)")
    return True, ""


def select_scenarios(names: Sequence[str] | None, *, quick: bool) -> list[Scenario]:
    if names:
        unknown = [n for n in names if n not in BY_NAME]
        if unknown:
            raise InputError(f"unknown scenario {', '.join(unknown)}; the scenarios are "
                             f"{', '.join(BY_NAME)}")
        return [BY_NAME[n] for n in names]
    return [s for s in SCENARIOS if s.quick or not quick]


Step = Callable[[str], None]


class Drill:
    """One cluster, one proxy, the scenarios in turn (see the module's docstring)."""

    def __init__(self, scenarios: Sequence[Scenario], *, rounds: int = 1,
                 on_step: Step | None = None, odbc: bool | None = None) -> None:
        if rounds < 1:
            raise InputError("--rounds must be at least 1")
        self.scenarios = list(scenarios)
        self.rounds = rounds
        self._step = on_step or (lambda _text: None)
        self.notes: list[str] = []
        if odbc is None:
            odbc, why = odbc_available()
            if not odbc:
                self.notes.append(f"pyodbc not drilled: {why}")
        self.clients = clients(odbc=odbc)
        self.cluster: Any = None
        self.proxy: Any = None
        self.runs: list[Run] = []
        self.findings: list[Finding] = []

    def run(self) -> Report:
        """Run every scenario; the report. Ctrl-C stops it, and what ran is reported."""
        from .harness import (
            FaultProxy,
            LocalCluster,
            ServerBinariesNotFound,
            ServerError,
            partition_available,
        )

        started = now_iso()
        interrupted = False
        can_partition, why_not = partition_available()
        todo = [s for s in self.scenarios if not s.partition or can_partition]
        for s in self.scenarios:
            if s.partition and not can_partition:
                self.notes.append(f"{s.name} not drilled: {why_not}")
        try:
            self._step("starting a two-node cluster")
            try:
                cluster_cm = LocalCluster()
            except (ServerBinariesNotFound, ServerError) as exc:
                raise InputError(f"cannot start a local cluster: {exc}") from None
            with cluster_cm as cluster, FaultProxy(cluster.host, cluster.port) as proxy:
                self.cluster, self.proxy = cluster, proxy
                cluster.start()
                # The setup the docs advise: every lost COMMIT is then provable, after a
                # crash too (docs/exactly-once.md).
                install_ledger(cluster.conninfo())
                self.notes.append("the commit ledger is installed: every lost COMMIT is "
                                  "decided by the unit's token (docs/exactly-once.md)")
                for number in range(1, self.rounds + 1):
                    for scenario in todo:
                        self._scenario(scenario, number)
        except (KeyboardInterrupt, SystemError) as exc:
            if not from_ctrl_c(exc):
                raise
            interrupted = True
            self.notes.append("interrupted by Ctrl-C: the report covers the scenarios "
                              "that finished")
        finally:
            self.cluster = self.proxy = None
        return Report(command="drill", target="a local two-node cluster (harness)",
                      started_at=started, finished_at=now_iso(), runs=self.runs,
                      findings=self.findings, notes=self.notes, interrupted=interrupted,
                      tool_version=__version__)

    # --- one scenario ---

    def _conninfo(self, extra: dict[str, str] | None = None) -> str:
        return str(self.cluster.conninfo(host=self.proxy.host, port=str(self.proxy.port),
                                         **TUNED, **(extra or {})))

    def _scenario(self, scenario: Scenario, number: int) -> None:
        label = scenario.name if self.rounds == 1 else f"{scenario.name} #{number}"
        self._step(f"{label}: starting {len(self.clients)} clients")
        canaries = [Canary(CanaryOptions(self._conninfo(), driver=c.driver, access=c.access,
                                         interval=0.01, label=c.driver + "-" + c.access,
                                         policy=RetryPolicy(deadline=30.0)))
                    for c in self.clients]
        started: list[Canary] = []
        try:
            for canary in canaries:
                canary.setup()
            for canary in canaries:
                canary.start()
                started.append(canary)
            self._wait(lambda: all(c.good_since(c.t0) >= WARM_UP for c in canaries),
                       30.0, f"{label}: the clients did not start writing")
            before = (time.monotonic(), read_identity(self.cluster.conninfo()))
            self._step(f"{label}: {scenario.title}")
            outage = self._act(scenario)
            since = time.monotonic()
            self._step(f"{label}: waiting for every client to write again")
            recovered = self._wait(
                lambda: all(c.good_since(since) >= AFTER for c in canaries),
                RECOVERY_TIMEOUT, None)
            for canary in started:
                canary.stop(timeout=RECOVERY_TIMEOUT)
            started.clear()
            identities = [before, (time.monotonic(), read_identity(self.cluster.conninfo()))]
            self._step(f"{label}: checking every acknowledged write")
            commits = 0
            for client, canary in zip(self.clients, canaries, strict=True):
                run = self._result(scenario, label, client, canary, outage, identities)
                if not recovered:
                    run.findings.append(Finding(
                        "every client wrote again", "fail", "no",
                        why=f"not all clients wrote again within {RECOVERY_TIMEOUT:g} s"))
                commits += sum(run.commits.values())
                self.runs.append(run)
            if scenario.name in ("lost_commit", "commit_held"):
                self.findings.append(Finding(
                    f"{label}: interrupted COMMITs resolved", "ok" if commits else "fail",
                    f"{commits} resolved", expected="at least 1",
                    why="the proxy withheld COMMIT replies; each must be resolved with the "
                        "server (pg_xact_status) before the unit runs again", guide="3.4.1"))
            self.proxy.release_held()
            for canary in canaries:
                problem = canary.teardown()
                if problem:
                    self.notes.append(problem)
        finally:
            # Interrupted (Ctrl-C, a scenario that failed): the clients are stopped at once;
            # their tables go with the throwaway cluster.
            for canary in started:
                canary.abort()
            for canary in started:
                canary.stop(abort=True, timeout=1)

    def _wait(self, ready: Callable[[], bool], timeout: float, failure: str | None) -> bool:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                if failure is not None:
                    raise InputError(failure)
                return False
            time.sleep(0.02)
        return True

    def _act(self, scenario: Scenario) -> ServerOutage:
        """Make the scenario happen; what the server did, in ``time.monotonic()`` times."""
        cl = self.cluster
        name = scenario.name
        if name == "switchover":
            t = cl.switchover()
        elif name == "node_down":
            t = cl.failover()
        elif name == "while_switching":
            t = cl.failover(switch_delay=1.0)
        elif name == "while_starting":
            t = cl.failover(startup_delay=1.0)
        elif name in ("server_crash", "stop_both"):
            t = cl.crash() if name == "server_crash" else cl.stop_both()
            if name == "stop_both":
                time.sleep(1.0)
            up = cl.start()
            return ServerOutage(name, t.down_at, up.accepting_at)
        elif name in ("lost_commit", "commit_held"):
            count = len(self.clients)
            if name == "lost_commit":
                self.proxy.arm_commit_drop(count)
            else:
                self.proxy.arm_commit_hold(count)
            self.proxy.wait_commit_faults(10.0)
            return ServerOutage(name, None, None)
        elif name == "partition":
            from .harness import Partition

            with Partition(self.proxy.host, self.proxy.port) as part:
                part.start()
                cut = time.monotonic()
                time.sleep(4.0)
                part.heal()
                healed = time.monotonic()
            # Not the server's outage but the network's: the clients' windows cover it.
            return ServerOutage(name, cut, healed)
        else:  # pragma: no cover - select_scenarios refuses unknown names
            raise InputError(f"unknown scenario {name}")
        return ServerOutage(name, t.down_at, t.accepting_at, listening_at=t.listening_at)

    def _result(self, scenario: Scenario, label: str, client: Client, canary: Canary,
                outage: ServerOutage,
                identities: list[tuple[float, ServerIdentity | None]]) -> Run:
        writes = canary.check_writes()
        records = canary.records(identities)
        t0 = records.t0

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 4)

        shifted = ServerOutage(outage.scenario, rel(outage.down_at), rel(outage.accepting_at),
                               rel(outage.listening_at))
        guide = GUIDE_CODES[client.driver]
        run = analyse(records, name=f"{label} · {client.label}", driver=client.driver,
                      access=client.access, scenario=scenario.name, guide_codes=guide,
                      server_outages=[shifted] if shifted.down_at is not None else [],
                      settings=client_settings(client.driver, canary.params),
                      writes=writes or write_check({}, set(), set()))
        run.findings.extend(scenario_findings(run, shifted, guide))
        if canary.worker_errors:
            run.findings.append(Finding(
                "reads saw the client's last acknowledged write", "fail",
                "; ".join(canary.worker_errors[:3])))
        return run


def scenario_findings(run: Run, outage: ServerOutage, guide: frozenset[str | None]
                      ) -> list[Finding]:
    """What a drill run is judged on besides the invariant (pure)."""
    out: list[Finding] = []
    extra = [e for e in run.errors if e.sqlstate not in guide]
    if run.errors:
        listed = ", ".join(f"{e.sqlstate or 'none'} {e.kind}" for e in run.errors)
        if extra:
            out.append(Finding(
                "errors seen, against the guide's table", "info", listed,
                expected=", ".join(sorted(c or "none" for c in guide)),
                why="not in the guide's table for this driver: "
                    + ", ".join(f"{e.sqlstate or 'none'} ({e.kind})" for e in extra)
                    + "; classified and handled by the library", guide="3.4.1"))
        else:
            out.append(Finding("errors seen, against the guide's table", "ok", listed,
                               guide="3.4.1"))
    if outage.down_at is not None and outage.accepting_at is not None:
        server = outage.accepting_at - outage.down_at
        covering = [w for w in run.windows if w.end is not None
                    and w.start <= outage.down_at + HARNESS_STEP
                    and w.end >= outage.accepting_at - HARNESS_STEP]
        seen = ", ".join(f"{w.kind}s {w.seconds:.3f} s" for w in run.windows
                         if w.seconds is not None) or "no request met it"
        out.append(Finding(
            "client outage against the server's",
            "ok" if covering or not run.windows else "warn",
            f"{seen}; server {server:.3f} s",
            why="" if covering or not run.windows else
                "no client window spans the server's outage (clock or measuring problem)"))
    return out
