"""A FastAPI service on an `AsyncFailoverPool`: concurrent requests, each unit of work
on a connection of its own, committed exactly once across a failover.

Run it (the table: `SCHEMA` below):

    pip install "symfo-failover[pool]" fastapi uvicorn
    SYMFO_DSN="host=db.example dbname=shop user=app password=..." \\
        uvicorn examples.pool_fastapi:app

    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
        -d '{"customer": 42, "amount": 100}'
    curl localhost:8000/orders/1

- The pool is made with ``open=False`` (psycopg_pool's advice for async pools: opening
  needs the running event loop) and opened in the lifespan; ``wait()`` waits for its
  ``min_size`` connections, so that the service starts only with the database up.
  Leaving the lifespan closes it.
- Each endpoint's database work is a unit of work given to ``await pool.run(...)``: a
  connection is taken from the pool for it and given back; after a failover the unit
  runs again on a connection to the new server. A unit must have no effect outside
  the database and must not commit or roll back itself (docs/resilient.md).
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from symfo_failover import AsyncFailoverPool

#: The environment variable with the libpq connection string.
DSN_VAR = "SYMFO_DSN"

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    customer int NOT NULL,
    amount int NOT NULL CHECK (amount > 0)
)
"""

Pool = AsyncFailoverPool[psycopg.AsyncConnection[Any]]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    pool: Pool = AsyncFailoverPool(os.environ[DSN_VAR], min_size=4, max_size=10,
                                   open=False)
    await pool.open(wait=True)
    app.state.pool = pool
    try:
        yield
    finally:
        await pool.close()


app = FastAPI(title="orders on an AsyncFailoverPool", lifespan=lifespan)


def get_pool(request: Request) -> Pool:
    pool: Pool = request.app.state.pool
    return pool


PoolDep = Annotated[Pool, Depends(get_pool)]


# --- the units of work: database work only, no commit, safe to run again -------------


async def add_order(conn: psycopg.AsyncConnection[Any], customer: int, amount: int) -> int:
    cur = await conn.execute(
        "INSERT INTO orders (customer, amount) VALUES (%s, %s) RETURNING id",
        (customer, amount))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def order_by_id(conn: psycopg.AsyncConnection[Any],
                      order_id: int) -> tuple[int, int] | None:
    cur = await conn.execute("SELECT customer, amount FROM orders WHERE id = %s",
                             (order_id,))
    row = await cur.fetchone()
    return None if row is None else (int(row[0]), int(row[1]))


# --- the endpoints ------------------------------------------------------------------


class OrderIn(BaseModel):
    customer: int
    amount: int = Field(gt=0)


class Order(BaseModel):
    id: int
    customer: int
    amount: int


@app.post("/orders")
async def post_order(body: OrderIn, pool: PoolDep) -> Order:
    # Committed exactly once when this returns, across a failover too.
    order_id = await pool.run(add_order, body.customer, body.amount)
    return Order(id=order_id, customer=body.customer, amount=body.amount)


@app.get("/orders/{order_id}")
async def get_order(order_id: int, pool: PoolDep) -> Order:
    found = await pool.run(order_by_id, order_id)
    if found is None:
        raise HTTPException(404, f"no order {order_id}")
    return Order(id=order_id, customer=found[0], amount=found[1])


@app.get("/health")
async def health(pool: PoolDep) -> dict[str, Any]:
    """The pool's failover figures, for a dashboard or a probe."""
    return pool.failover_stats().as_dict()
