"""The pool examples (examples/pool_sqlalchemy.py, pool_factory.py, pool_fastapi.py)
against a real two-node cluster: each works, and a failover between two requests is
invisible to the second one."""

from __future__ import annotations

from collections.abc import Iterator
from types import ModuleType
from typing import Any

import psycopg
import pytest
from example_loader import load

pytest.importorskip("psycopg_pool")
sqlalchemy = pytest.importorskip("sqlalchemy")

from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, text  # noqa: E402
from sqlalchemy.orm import Session  # noqa: E402
from starlette.testclient import TestClient  # noqa: E402

from symfo_failover import FailoverPool  # noqa: E402
from symfo_failover.harness import LocalCluster  # noqa: E402

pytestmark = [pytest.mark.server, pytest.mark.timeout(120)]


@pytest.fixture(scope="module")
def sqla_example() -> Iterator[ModuleType]:
    yield from load("pool_sqlalchemy")


@pytest.fixture(scope="module")
def factory_example() -> Iterator[ModuleType]:
    yield from load("pool_factory")


@pytest.fixture(scope="module")
def fastapi_example() -> Iterator[ModuleType]:
    yield from load("pool_fastapi")


@pytest.fixture
def cluster() -> Iterator[LocalCluster]:
    with LocalCluster() as cl:
        cl.start()
        yield cl


def started(cl: LocalCluster) -> Any:
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        row = conn.execute("SELECT pg_postmaster_start_time()").fetchone()
        assert row is not None
        return row[0]


def fail_over(cl: LocalCluster) -> None:
    before = started(cl)
    old_node = cl.active
    t = cl.failover()  # the active node is killed, the standby takes over
    assert t.to_node is not None
    assert t.to_node != old_node
    assert started(cl) != before


def rows(cl: LocalCluster, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(cl.conninfo(), autocommit=True) as conn:
        return conn.execute(query).fetchall()


# --- SQLAlchemy -------------------------------------------------------------------------

metadata = MetaData()
items = Table("items", metadata, Column("id", Integer, primary_key=True),
              Column("qty", Integer, nullable=False))


@pytest.fixture
def sqla_pool(sqla_example: ModuleType, cluster: LocalCluster) -> Iterator[Any]:
    with sqla_example.make_pool(cluster.conninfo(), min_size=2, max_size=4) as pool:
        pool.wait()
        yield pool


def test_sqlalchemy_engine_gives_connections_back(sqla_example: ModuleType,
                                                  sqla_pool: Any) -> None:
    engine = sqla_example.make_engine(sqla_pool)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(insert(items), [{"id": 1, "qty": 5}, {"id": 2, "qty": 7}])
        raw_seen = []
        for _ in range(5):  # more than max_size: each close() gave the connection back
            with Session(engine) as session:
                assert session.scalar(select(func.sum(items.c.qty))) == 12
                raw_seen.append(session.connection().connection.dbapi_connection)
        assert all(not raw.closed for raw in raw_seen)
        assert sqla_pool.get_stats()["pool_size"] <= 4

        # SQLAlchemy sets back the isolation level it set before it closes (returns).
        with engine.connect().execution_options(isolation_level="SERIALIZABLE") as conn:
            assert conn.scalar(text("SHOW transaction_isolation")) == "serializable"
            raw = conn.connection.dbapi_connection
        assert not raw.closed
        assert raw.isolation_level != psycopg.IsolationLevel.SERIALIZABLE
    finally:
        engine.dispose()


def test_sqlalchemy_engine_after_a_failover(sqla_example: ModuleType, sqla_pool: Any,
                                            cluster: LocalCluster) -> None:
    engine = sqla_example.make_engine(sqla_pool)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
            conn.execute(insert(items), [{"id": 1, "qty": 5}])
        fail_over(cluster)
        # The idle connections to the old server are never handed to SQLAlchemy.
        with engine.begin() as conn:
            conn.execute(insert(items), [{"id": 2, "qty": 1}])
            assert conn.scalar(select(func.count()).select_from(items)) == 2
        stats = sqla_pool.failover_stats()
        assert stats.failovers == 1
        assert stats.requests_met_dead == 0
    finally:
        engine.dispose()


def test_sqlalchemy_core_units_commit_once_across_a_failover(
    sqla_example: ModuleType, sqla_pool: Any, cluster: LocalCluster
) -> None:
    engine = sqla_example.make_engine(sqla_pool)
    try:
        with engine.begin() as conn:
            metadata.create_all(conn)
    finally:
        engine.dispose()
    result = sqla_example.run_core(
        sqla_pool, insert(items).values(id=1, qty=3),
        select(items.c.qty).where(items.c.id.in_([1, 2])))
    assert result == [[], [(3,)]]
    fail_over(cluster)
    sqla_example.run_core(sqla_pool, insert(items).values(id=2, qty=4))
    assert rows(cluster, "SELECT id, qty FROM items ORDER BY id") == [(1, 3), (2, 4)]


# --- any connection factory -------------------------------------------------------------


@pytest.fixture
def plain_pool(factory_example: ModuleType, cluster: LocalCluster) -> Iterator[Any]:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute(factory_example.SCHEMA)
    pool: FailoverPool[Any] = FailoverPool(cluster.conninfo(), min_size=2)
    with pool:
        pool.wait()
        yield pool


def test_factories(factory_example: ModuleType, plain_pool: Any,
                   cluster: LocalCluster) -> None:
    factory = factory_example.context_factory(plain_pool)
    with factory() as conn:
        conn.execute("INSERT INTO orders (customer, amount) VALUES (1, 10)")
    get, give_back = factory_example.pair_factory(plain_pool)
    conn = get()
    try:
        conn.execute("INSERT INTO orders (customer, amount) VALUES (2, 20)")
        conn.commit()
    finally:
        give_back(conn)
    with factory_example.autocommit_factory(plain_pool) as conn:
        assert conn.autocommit
        conn.execute("INSERT INTO orders (customer, amount) VALUES (3, 30)")
    with factory() as conn:
        assert not conn.autocommit
    assert rows(cluster, "SELECT customer, amount FROM orders ORDER BY id") == [
        (1, 10), (2, 20), (3, 30)]


def test_factory_and_unit_after_a_failover(factory_example: ModuleType, plain_pool: Any,
                                           cluster: LocalCluster) -> None:
    first = factory_example.save_order(plain_pool, 1, 10)
    fail_over(cluster)
    with factory_example.context_factory(plain_pool)() as conn:
        conn.execute("INSERT INTO orders (customer, amount) VALUES (2, 20)")
    assert factory_example.save_order(plain_pool, 3, 30) > first
    assert rows(cluster, "SELECT customer, amount FROM orders ORDER BY id") == [
        (1, 10), (2, 20), (3, 30)]
    assert plain_pool.failover_stats().failovers == 1


# --- the async pool in a FastAPI lifespan -----------------------------------------------


@pytest.fixture
def client(fastapi_example: ModuleType, cluster: LocalCluster,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[TestClient]:
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        conn.execute(fastapi_example.SCHEMA)
    monkeypatch.setenv(fastapi_example.DSN_VAR, cluster.conninfo())
    with TestClient(fastapi_example.app) as tc:  # runs the lifespan: opens the pool
        yield tc


def test_fastapi_pool_through_a_failover(fastapi_example: ModuleType, client: TestClient,
                                         cluster: LocalCluster) -> None:
    pool = fastapi_example.app.state.pool
    assert not pool.closed
    r = client.post("/orders", json={"customer": 42, "amount": 100})
    assert r.status_code == 200, r.text
    first = r.json()["id"]
    assert client.get(f"/orders/{first}").json() == {"id": first, "customer": 42,
                                                     "amount": 100}
    fail_over(cluster)
    r = client.post("/orders", json={"customer": 43, "amount": 5})
    assert r.status_code == 200, r.text
    assert r.json()["id"] > first
    assert client.get("/orders/999").status_code == 404
    assert client.post("/orders", json={"customer": 1, "amount": 0}).status_code == 422
    health = client.get("/health").json()
    assert health["failovers"] == 1
    assert health["generation"] == 1
    assert rows(cluster, "SELECT customer, amount FROM orders ORDER BY id") == [
        (42, 100), (43, 5)]


def test_fastapi_lifespan_closes_the_pool(fastapi_example: ModuleType,
                                          cluster: LocalCluster,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(fastapi_example.DSN_VAR, cluster.conninfo())
    with TestClient(fastapi_example.app) as tc:
        assert tc.get("/health").status_code == 200
        pool = fastapi_example.app.state.pool
        assert not pool.closed
    assert pool.closed
