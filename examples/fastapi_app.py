"""A small FastAPI service on one `AsyncResilientConnection`: money transfers that commit
exactly once across a PostgreSQL / Symfoware failover.

Run it (the tables: `SCHEMA` below):

    pip install "symfo-failover[psycopg]" fastapi uvicorn
    SYMFO_DSN="host=db.example dbname=bank user=app password=..." \\
        uvicorn examples.fastapi_app:app

    curl -X POST localhost:8000/transfer -H 'content-type: application/json' \\
        -d '{"source": 1, "target": 2, "amount": 30}'
    curl localhost:8000/accounts/1

- The lifespan opens the connection when the service starts (`connect_async` retries a
  server that is down, within the policy, without blocking the event loop) and closes
  it when the service stops.
- A dependency hands it to the endpoints.
- Each endpoint's database work is a *unit of work*, an ``async def`` function given to
  ``await db.run(...)``: the library begins the transaction, runs the function, commits,
  and after a failover reconnects and runs it again, so that a transfer commits exactly
  once. A unit must therefore have no effect outside the database (it may run more than
  once) and must not commit or roll back itself (docs/resilient.md, the contract).
"""

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import psycopg
from fastapi import Depends, FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

import symfo_failover

#: The environment variable with the libpq connection string.
DSN_VAR = "SYMFO_DSN"

#: The tables this service uses (create them once, e.g. with psql).
SCHEMA = """
CREATE TABLE IF NOT EXISTS accounts (
    id int PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE IF NOT EXISTS transfers (
    id bigserial PRIMARY KEY,
    source int NOT NULL REFERENCES accounts,
    target int NOT NULL REFERENCES accounts,
    amount bigint NOT NULL CHECK (amount > 0)
);
"""

Db = symfo_failover.AsyncResilientConnection[psycopg.AsyncConnection[Any]]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    # One connection for the whole service. It serves ONE TASK AT A TIME: while a request
    # runs a unit on it, the other requests' calls wait their turn (they are never
    # interleaved inside a unit), so requests are served one after the other at the
    # database. That is enough for a small or mostly idle service. For concurrent
    # requests, this is where a pool goes later (a pool of resilient connections,
    # the next step of symfo_failover): open the pool here instead, and let `get_db`
    # below lend one connection per request. Until then, a few connections opened here
    # and handed out in turn do the same.
    #
    # autocommit=True: run() begins and commits its own transactions either way; this
    # keeps a passthrough call (`await db.execute(...)`, outside a unit) from leaving a
    # transaction open, which run() would refuse (rule 'open-transaction').
    async with await symfo_failover.connect_async(os.environ[DSN_VAR], autocommit=True) as db:
        app.state.db = db
        yield
    # Leaving the block closed the connection.


app = FastAPI(title="transfers on symfo_failover", lifespan=lifespan)


async def get_db(request: Request) -> Db:
    """The service's connection. With a pool this becomes
    ``async with pool.connection() as db: yield db`` (one connection per request)."""
    db: Db = request.app.state.db
    return db


DbDep = Annotated[Db, Depends(get_db)]


# --- the units of work: database work only, no commit, safe to run again -------------


class UnknownAccount(Exception):
    pass


class InsufficientFunds(Exception):
    pass


async def transfer(conn: psycopg.AsyncConnection[Any], source: int, target: int,
                   amount: int) -> int:
    """Move ``amount`` from ``source`` to ``target``; the transfer's id."""
    cur = await conn.execute(
        "UPDATE accounts SET balance = balance - %s WHERE id = %s AND balance >= %s",
        (amount, source, amount))
    if cur.rowcount != 1:
        exists = await (await conn.execute(
            "SELECT 1 FROM accounts WHERE id = %s", (source,))).fetchone()
        # An exception that is not the database's: run() rolls back and raises it as is.
        raise InsufficientFunds(source) if exists else UnknownAccount(source)
    cur = await conn.execute(
        "UPDATE accounts SET balance = balance + %s WHERE id = %s", (amount, target))
    if cur.rowcount != 1:
        raise UnknownAccount(target)  # rolled back: the debit above is undone too
    cur = await conn.execute(
        "INSERT INTO transfers (source, target, amount) VALUES (%s, %s, %s) RETURNING id",
        (source, target, amount))
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def balance_of(conn: psycopg.AsyncConnection[Any], account: int) -> int | None:
    row = await (await conn.execute(
        "SELECT balance FROM accounts WHERE id = %s", (account,))).fetchone()
    return None if row is None else int(row[0])


# --- the endpoints ------------------------------------------------------------------


class TransferIn(BaseModel):
    source: int
    target: int
    amount: int = Field(gt=0)


class TransferOut(BaseModel):
    id: int


class Account(BaseModel):
    id: int
    balance: int


@app.post("/transfer")
async def post_transfer(body: TransferIn, db: DbDep) -> TransferOut:
    if body.source == body.target:
        raise HTTPException(422, "source and target are the same account")
    try:
        # Committed exactly once when this returns, across a failover too.
        transfer_id = await db.run(transfer, body.source, body.target, body.amount)
    except UnknownAccount as exc:
        raise HTTPException(404, f"no account {exc.args[0]}") from None
    except InsufficientFunds as exc:
        raise HTTPException(409, f"insufficient funds in account {exc.args[0]}") from None
    # Effects outside the database (a message, an e-mail) belong here, after run().
    return TransferOut(id=transfer_id)


@app.get("/accounts/{account_id}")
async def get_account(account_id: int, db: DbDep) -> Account:
    # A read is a unit too, so that it is retried on a new session after a failover.
    # (A passthrough `await db.execute(...)` is never retried: the first call after a
    # failover raises, and the next one gets a new session.)
    balance = await db.run(balance_of, account_id)
    if balance is None:
        raise HTTPException(404, f"no account {account_id}")
    return Account(id=account_id, balance=balance)
