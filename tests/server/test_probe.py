"""The probe against a harness cluster that the test fails over, in each scenario: the
windows the report gives must contain the harness's `Transition` times."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from symfo_failover._drill import HARNESS_STEP
from symfo_failover._probe_command import ProbeOptions, Status, probe
from symfo_failover._report import Report
from symfo_failover.harness import LocalCluster, Transition

pytestmark = pytest.mark.server

SCHEMA = Path(__file__).resolve().parents[2] / "symfo_failover" / "schemas" / \
    "report.schema.json"


@pytest.fixture(scope="module")
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as cl:
        cl.start()
        yield cl


def _crash_and_start(cl: LocalCluster) -> Transition:
    down = cl.crash()
    up = cl.start()
    return Transition("crash", down.from_node, up.to_node, down.started_at,
                      down_at=down.down_at, accepting_at=up.accepting_at)


def _stop_both_and_start(cl: LocalCluster) -> Transition:
    down = cl.stop_both()
    time.sleep(0.5)
    up = cl.start()
    return Transition("stop_both", down.from_node, up.to_node, down.started_at,
                      down_at=down.down_at, accepting_at=up.accepting_at)


SCENARIOS: dict[str, Callable[[LocalCluster], Transition]] = {
    "switchover": lambda cl: cl.switchover(),
    "node_down": lambda cl: cl.failover(),
    "server_crash": _crash_and_start,
    "stop_both": _stop_both_and_start,
    "while_switching": lambda cl: cl.failover(switch_delay=1.0),
    "while_starting": lambda cl: cl.failover(startup_delay=1.0),
}


def run_probe(cluster: LocalCluster, act: Callable[[LocalCluster], Transition],
              **options: object) -> tuple[Report, Transition, float]:
    statuses: list[Status] = []
    result: list[Report] = []
    errors: list[BaseException] = []
    opts = ProbeOptions(cluster.conninfo(), until_failovers=1, duration=60, interval=0.02,
                        identity_every=0.5, **options)  # type: ignore[arg-type]

    def target() -> None:
        try:
            result.append(probe(opts, on_status=statuses.append))
        except BaseException as exc:  # handed to the test below
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    deadline = time.monotonic() + 20
    while not (statuses and statuses[-1].requests >= 10) and time.monotonic() < deadline:
        assert thread.is_alive(), errors
        time.sleep(0.02)
    assert statuses, "the probe never reported its status"
    transition = act(cluster)
    thread.join(90)
    assert not thread.is_alive(), "the probe did not stop after the failover"
    assert not errors, errors
    # It stopped because the failover was seen and over, not at the end of its duration.
    assert "stopped after 1 outage(s) had ended (--until-failovers 1)" in result[0].notes
    return result[0], transition, statuses[0].t0


def assert_windows_contain(report: Report, transition: Transition, t0: float) -> None:
    [run] = report.runs
    assert transition.down_at is not None
    assert transition.accepting_at is not None
    down, up = transition.down_at - t0, transition.accepting_at - t0
    covering = [w for w in run.windows if w.end is not None
                and w.start <= down + HARNESS_STEP and w.end >= up - HARNESS_STEP]
    assert covering, (down, up, run.windows)
    # The first error came after the last good request and before it came back.
    for w in covering:
        assert w.start <= w.first_error_at <= w.end  # type: ignore[operator]


def assert_valid_json(report: Report) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    data = json.loads(json.dumps(report.to_dict()))
    jsonschema.Draft202012Validator(schema).validate(data)


def leftover_tables(cluster: LocalCluster) -> list[str]:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        rows = conn.execute("SELECT tablename FROM pg_tables "
                            "WHERE tablename LIKE 'symfo_canary_%'").fetchall()
    return [r[0] for r in rows]


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_the_probe_sees_each_failover_of_the_guide(cluster: LocalCluster,
                                                   scenario: str) -> None:
    report, transition, t0 = run_probe(cluster, SCENARIOS[scenario])
    assert report.ok, report.summary
    [run] = report.runs
    assert_windows_contain(report, transition, t0)
    [incident] = run.incidents
    assert incident.errors, "the report names the errors the library met"
    assert incident.server_change.startswith("restarted"), incident.server_change
    assert run.writes is not None
    assert run.writes.ok
    assert run.writes.acknowledged > 0
    names = [m.name for m in run.timeline]
    assert "first error" in names
    assert any(n.startswith("last good") for n in names)
    assert any(n.startswith("first good") for n in names)
    assert [p.name for p in run.phases] == ["before", "during", "after"]
    assert run.client_settings["tcp_user_timeout"].startswith("10000")
    assert leftover_tables(cluster) == []
    assert_valid_json(report)


@pytest.mark.parametrize(("driver", "access"), [
    ("psycopg", "pool"),
    pytest.param("pyodbc", "connection", marks=pytest.mark.odbc),
    pytest.param("pyodbc", "pool", marks=pytest.mark.odbc),
])
def test_the_probe_through_each_client(cluster: LocalCluster, driver: str,
                                       access: str) -> None:
    report, transition, t0 = run_probe(cluster, SCENARIOS["switchover"], driver=driver,
                                       access=access)
    assert report.ok, report.summary
    assert_windows_contain(report, transition, t0)
    [run] = report.runs
    assert (run.driver, run.access) == (driver, access)
    assert leftover_tables(cluster) == []


def test_a_read_only_probe_writes_nothing(cluster: LocalCluster) -> None:
    report, transition, t0 = run_probe(cluster, SCENARIOS["switchover"], read_only=True)
    assert report.ok, report.summary
    [run] = report.runs
    assert run.writes is None
    assert {w.kind for w in run.windows} == {"read"}
    assert_windows_contain(report, transition, t0)


def test_the_rto_verdict_counts_every_failover(cluster: LocalCluster) -> None:
    report, _, _ = run_probe(cluster, SCENARIOS["while_switching"], rto=0.2)
    [run] = report.runs
    verdict = {f.name: f for f in run.findings}["outages within --rto 0.2 s"]
    # The node was away for a second: longer than 0.2 s.
    assert verdict.status == "fail"
    assert verdict.value.startswith("0 of 1 within 0.2 s")
    assert not report.ok
