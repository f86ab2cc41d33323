"""examples/fastapi_app.py against a real two-node cluster, through Starlette's TestClient:
the lifespan opens the connection, transfers commit, and a failover between two requests
is invisible to the second one."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType

import psycopg
import pytest
from example_loader import load
from starlette.testclient import TestClient

from symfo_failover.harness import LocalCluster

pytestmark = pytest.mark.server

@pytest.fixture(scope="module")
def example() -> Iterator[ModuleType]:
    yield from load("fastapi_app")


@pytest.fixture
def cluster(example: ModuleType) -> Iterator[LocalCluster]:
    cl = LocalCluster()
    with cl:
        cl.start()
        with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
            conn.execute(example.SCHEMA)
            conn.execute("INSERT INTO accounts (id, balance) VALUES (1, 100), (2, 0)")
        yield cl


@pytest.fixture
def client(example: ModuleType, cluster: LocalCluster,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    monkeypatch.setenv(example.DSN_VAR, cluster.conninfo())
    with TestClient(example.app) as tc:  # runs the lifespan: connect_async() here
        yield tc


def _balances(cluster: LocalCluster) -> dict[int, int]:
    with psycopg.connect(cluster.conninfo()) as conn:
        return dict(conn.execute("SELECT id, balance FROM accounts").fetchall())


def _transfers(cluster: LocalCluster) -> list[tuple[int, int, int]]:
    with psycopg.connect(cluster.conninfo()) as conn:
        return conn.execute(
            "SELECT source, target, amount FROM transfers ORDER BY id").fetchall()


def test_transfer_survives_a_failover_between_requests(
    example: ModuleType, cluster: LocalCluster, client: TestClient
) -> None:
    db = example.app.state.db
    r = client.post("/transfer", json={"source": 1, "target": 2, "amount": 30})
    assert r.status_code == 200, r.text
    first_id = r.json()["id"]
    assert client.get("/accounts/1").json() == {"id": 1, "balance": 70}
    before = db.session
    assert before is not None
    old_node = cluster.active

    t = cluster.failover()  # the active node is killed, the standby takes over
    assert t.to_node is not None
    assert t.to_node != old_node

    # The app's session died with the node; the next request does not notice.
    r = client.post("/transfer", json={"source": 1, "target": 2, "amount": 20})
    assert r.status_code == 200, r.text
    assert r.json()["id"] > first_id
    after = db.session
    assert after is not None
    assert after.server_started != before.server_started
    assert client.get("/accounts/1").json() == {"id": 1, "balance": 50}
    assert client.get("/accounts/2").json() == {"id": 2, "balance": 50}
    # Exactly once: one row per transfer, the balances add up.
    assert _transfers(cluster) == [(1, 2, 30), (1, 2, 20)]
    assert _balances(cluster) == {1: 50, 2: 50}


def test_a_refused_transfer_commits_nothing(cluster: LocalCluster, client: TestClient) -> None:
    r = client.post("/transfer", json={"source": 2, "target": 1, "amount": 5})
    assert r.status_code == 409, r.text
    r = client.post("/transfer", json={"source": 1, "target": 9, "amount": 5})
    assert r.status_code == 404, r.text  # the debit of account 1 was rolled back
    assert client.get("/accounts/9").status_code == 404
    r = client.post("/transfer", json={"source": 1, "target": 2, "amount": 0})
    assert r.status_code == 422
    assert _balances(cluster) == {1: 100, 2: 0}
    assert _transfers(cluster) == []


def test_the_lifespan_closes_the_connection(example: ModuleType, cluster: LocalCluster,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(example.DSN_VAR, cluster.conninfo())
    with TestClient(example.app) as tc:
        assert tc.get("/accounts/1").json() == {"id": 1, "balance": 100}
        db = example.app.state.db
        assert not db.closed
    assert db.closed
