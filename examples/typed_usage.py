"""Typed user code: what `mypy --strict` sees of symfo_failover (checked in the tests).

Nothing here runs against a server in the test suite; the test only type-checks it.
"""

from __future__ import annotations

from typing import assert_type

import psycopg
import pyodbc
from psycopg.rows import TupleRow

import symfo_failover as sf


def transfer(conn: psycopg.Connection[TupleRow], source: str, target: str, amount: int) -> int:
    conn.execute("UPDATE account SET balance = balance - %s WHERE id = %s", (amount, source))
    conn.execute("UPDATE account SET balance = balance + %s WHERE id = %s", (amount, target))
    row = conn.execute("SELECT balance FROM account WHERE id = %s", (source,)).fetchone()
    assert row is not None
    return int(row[0])


async def atransfer(conn: psycopg.AsyncConnection[TupleRow], source: str, amount: int) -> str:
    await conn.execute("UPDATE account SET balance = balance - %s WHERE id = %s",
                       (amount, source))
    return source


def odbc_count(conn: pyodbc.Connection, table: str) -> int:
    row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
    return int(row[0]) if row else 0


def sync_use(dsn: str, odbc: str) -> None:
    rc = sf.connect(dsn, policy=sf.RetryPolicy(deadline=30))
    assert_type(rc, sf.ResilientConnection[psycopg.Connection[TupleRow]])
    left = rc.run(transfer, "alice", "bob", 10)
    assert_type(left, int)
    assert_type(rc.connection, psycopg.Connection[TupleRow] | None)
    assert_type(rc.cursor(), psycopg.Cursor[TupleRow])
    assert_type(rc.execute("SELECT 1"), psycopg.Cursor[TupleRow])

    # pyodbc's own types are what mypy makes of pyodbc (without stubs it sees Any).
    orc = sf.connect(odbc, driver="pyodbc")
    assert_type(orc, sf.ResilientConnection[pyodbc.Connection])
    assert_type(orc.run(odbc_count, "account"), int)


async def async_use(dsn: str) -> None:
    arc = await sf.connect_async(dsn)
    assert_type(arc, sf.AsyncResilientConnection[psycopg.AsyncConnection[TupleRow]])
    who = await arc.run(atransfer, "alice", 5)
    assert_type(who, str)
    assert_type(await arc.execute("SELECT 1"), psycopg.AsyncCursor[TupleRow])
    assert_type(arc.connection, psycopg.AsyncConnection[TupleRow] | None)
    async with arc:
        await arc.commit()


def pool_use(dsn: str) -> None:
    # The pools are psycopg_pool's pools: generic over the connection class.
    pool: sf.FailoverPool[psycopg.Connection[TupleRow]] = sf.FailoverPool(dsn, open=True)
    left = pool.run(transfer, "alice", "bob", 10)
    assert_type(left, int)
    with pool.connection() as conn:
        assert_type(conn, psycopg.Connection[TupleRow])
    assert_type(pool.failover_stats(), sf.FailoverStats)
    assert_type(pool.failover_stats().failovers, int)
    pool.close()


async def async_pool_use(dsn: str) -> None:
    pool: sf.AsyncFailoverPool[psycopg.AsyncConnection[TupleRow]] = sf.AsyncFailoverPool(
        dsn, open=False)
    await pool.open()
    who = await pool.run(atransfer, "alice", 5)
    assert_type(who, str)
    async with pool.connection() as conn:
        assert_type(conn, psycopg.AsyncConnection[TupleRow])
    await pool.close()
