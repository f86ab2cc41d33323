"""A real partition: with the default settings a session is declared lost while the
network is still cut, and the unit then fails over to the other node.

How long detection takes (DESIGN §5: within 15 s by default) is measured by
``benchmarks/bench_resilient.py --only partition``, not here.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from resilient_helpers import DRIVERS, connect, conninfo

import symfo_failover as sf
from symfo_failover.harness import LocalCluster, Partition, partition_available

pytestmark = [pytest.mark.server, pytest.mark.partition]

#: Bounds the wait for detection so that a miss fails instead of hanging (DESIGN §5's
#: 15 s, plus a generous margin for a loaded machine). Not a measurement.
WAIT = 45.0


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    ok, why = partition_available()
    if not ok:
        pytest.skip(why)
    with LocalCluster() as cl:
        cl.start()
        with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
            conn.execute("CREATE TABLE ledger (id text)")
        yield cl


def test_a_partitioned_session_is_declared_lost_and_fails_over(
    driver: str, cluster: LocalCluster
) -> None:
    info = conninfo(driver, cluster)
    partition = Partition(cluster.host, cluster.port)
    lost = threading.Event()
    # The library's events and the test's own steps, in the order they happened.
    timeline: list[object] = []
    cut_when_lost: list[bool] = []

    def on_event(event: sf.Event) -> None:
        timeline.append(event)
        if isinstance(event, sf.FailureDetected) and not lost.is_set():
            cut_when_lost.append(partition.active)
            lost.set()

    def insert(raw: Any) -> str:
        raw.execute("INSERT INTO ledger VALUES ('partition')")
        return "ok"

    results: list[object] = []
    # Default policy and default detection settings: nothing tuned.
    with connect(info, driver=driver, on_event=on_event) as rc:
        assert rc.run(lambda raw: raw.execute("SELECT 1").fetchone()[0]) == 1
        with partition:
            partition.start()
            timeline.append("partitioned")
            worker = threading.Thread(target=lambda: results.append(rc.run(insert)))
            worker.start()
            assert lost.wait(WAIT), "the partitioned session was never declared lost"
            # The active node goes while the network is cut; the standby takes over.
            cluster.switchover()
            timeline.append("switched over")
            partition.heal()
            timeline.append("healed")
            worker.join(60)
        assert not worker.is_alive(), "run() did not finish after the partition healed"
    assert results == ["ok"]

    # Declared lost by the session's own detection, while the network was still cut:
    # after the cut, before the switchover and the heal.
    assert cut_when_lost == [True]
    detected = [e for e in timeline if isinstance(e, sf.FailureDetected)]
    first = detected[0]
    assert first.failure.kind is sf.Kind.CONNECTION_LOST
    assert first.phase == "unit"  # nothing of the unit got through: BEGIN was lost
    assert (
        timeline.index("partitioned")
        < timeline.index(first)
        < timeline.index("switched over")
        < timeline.index("healed")
    )
    # Then a new session on the other node, and the unit committed there, once.
    reconnected = [e for e in timeline if isinstance(e, sf.Reconnected)]
    assert reconnected
    assert reconnected[-1].failover
    assert timeline.index(reconnected[-1]) > timeline.index("healed")
    with psycopg.connect(cluster.conninfo()) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
