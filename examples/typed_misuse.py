"""Mistakes `mypy --strict` must catch (the test expects an error on each marked line)."""

from __future__ import annotations

import psycopg
from psycopg.rows import TupleRow

import symfo_failover as sf


def transfer(conn: psycopg.Connection[TupleRow], source: str, amount: int) -> int:
    return amount


async def atransfer(conn: psycopg.AsyncConnection[TupleRow], amount: int) -> int:
    return amount


async def misuse(dsn: str) -> None:
    rc = sf.connect(dsn)
    rc.run(transfer, "alice", "ten")  # error: amount is an int
    rc.run(transfer, "alice")  # error: amount is missing
    arc = await sf.connect_async(dsn)
    await arc.run(transfer, "alice", 10)  # error: a sync unit for the async run()
    rc.run(atransfer, 10)  # error: an async unit for the sync run()
    pool: sf.FailoverPool[psycopg.Connection[TupleRow]] = sf.FailoverPool(dsn, open=True)
    pool.run(transfer, "alice", "ten")  # error: amount is an int
