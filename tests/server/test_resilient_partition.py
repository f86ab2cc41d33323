"""A real partition: with the default settings a session is declared lost within
DESIGN §5's bound (15 s), and the unit then fails over to the other node."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

import symfo_failover as sf
from symfo_failover.harness import LocalCluster, Partition, partition_available

pytestmark = [pytest.mark.server, pytest.mark.partition]

#: DESIGN §5: a session on a partitioned network is declared lost within 15 s by default.
BOUND = 15.0


@pytest.fixture(params=["psycopg", pytest.param("pyodbc", marks=pytest.mark.odbc)])
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


def test_a_partitioned_session_is_declared_lost_within_the_bound_and_fails_over(
    driver: str, cluster: LocalCluster
) -> None:
    info = (cluster.conninfo() if driver == "psycopg" else cluster.odbc_connection_string())
    lost = threading.Event()
    detected: list[float] = []
    events: list[sf.Event] = []

    def on_event(event: sf.Event) -> None:
        events.append(event)
        if isinstance(event, sf.FailureDetected) and not lost.is_set():
            detected.append(time.monotonic())
            lost.set()

    def insert(raw: Any) -> str:
        if isinstance(raw, psycopg.Connection):
            raw.execute("INSERT INTO ledger VALUES ('partition')")
        else:
            raw.execute("INSERT INTO ledger VALUES ('partition')")
        return "ok"

    results: list[object] = []
    # Default policy and default detection settings: nothing tuned.
    with sf.connect(info, driver=driver, on_event=on_event) as rc:
        assert rc.run(lambda raw: raw.execute("SELECT 1").fetchone()[0]) == 1
        with Partition(cluster.host, cluster.port) as partition:
            partition.start()
            cut_at = time.monotonic()
            worker = threading.Thread(target=lambda: results.append(rc.run(insert)))
            worker.start()
            # Generous wait so that a miss shows as a figure, not a hang.
            assert lost.wait(BOUND + 30), "the partitioned session was never declared lost"
            noticed_after = detected[0] - cut_at
            # The active node goes while the network is cut; the standby takes over.
            cluster.switchover()
            partition.heal()
            worker.join(60)
        assert not worker.is_alive(), "run() did not finish after the partition healed"
    assert results == ["ok"]
    print(f"{driver}: declared lost after {noticed_after:.1f} s")
    assert noticed_after < BOUND, f"declared lost after {noticed_after:.1f} s"
    reconnected = [e for e in events if isinstance(e, sf.Reconnected)]
    assert reconnected
    assert reconnected[-1].failover
    with psycopg.connect(cluster.conninfo()) as conn:
        assert conn.execute("SELECT count(*) FROM ledger").fetchone() == (1,)
