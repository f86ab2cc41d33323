"""SQLAlchemy on a `FailoverPool`: the pool keeps the connections, SQLAlchemy uses them.

    pip install "symfo-failover[pool]" "sqlalchemy>=2.0"

Two ways, both on the same pool:

1. `make_engine`: an ``Engine`` whose connections come from the pool
   (``creator=pool.getconn``) and go back to it. SQLAlchemy's own pool is switched off
   (``NullPool``): SQLAlchemy then *closes* each connection when it is done with it,
   so the pool is made with psycopg_pool's ``close_returns=True`` (psycopg 3.3 or newer):
   ``close()`` on a pooled connection gives it back instead of closing it. Core, the
   ORM and ``Session`` work as usual; after a failover no connection to the old server
   is handed out, but a statement that meets the failover raises as it would without
   the pool (SQLAlchemy does not run it again).
2. `run_core`: units of work that must commit exactly once across a failover, written
   with SQLAlchemy Core statements and run by ``pool.run()``: the unit gets the pool's
   psycopg connection and executes the statements compiled for psycopg.
"""

from __future__ import annotations

from typing import Any

import psycopg
from sqlalchemy import ClauseElement, Engine, create_engine
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.pool import NullPool

from symfo_failover import FailoverPool

Pool = FailoverPool[psycopg.Connection[Any]]


def make_pool(conninfo: str, **kwargs: Any) -> Pool:
    # close_returns=True: SQLAlchemy's close() gives the connection back to the pool.
    return FailoverPool(conninfo, close_returns=True, **kwargs)


def make_engine(pool: Pool) -> Engine:
    return create_engine("postgresql+psycopg://", creator=pool.getconn, poolclass=NullPool)


# --- 2. Core statements in units of work ------------------------------------------------

_DIALECT = psycopg_dialect()  # type: ignore[no-untyped-call]


def execute(conn: psycopg.Connection[Any], statement: ClauseElement) -> psycopg.Cursor[Any]:
    """Execute a SQLAlchemy Core statement on a plain psycopg connection."""
    compiled = statement.compile(dialect=_DIALECT,
                                 compile_kwargs={"render_postcompile": True})
    return conn.execute(str(compiled), compiled.params)


def run_core(pool: Pool, *statements: ClauseElement) -> list[list[tuple[Any, ...]]]:
    """Run ``statements`` as one unit of work (one transaction, committed exactly once,
    run again on another connection after a failover); the rows of each."""

    def unit(conn: psycopg.Connection[Any]) -> list[list[tuple[Any, ...]]]:
        results = []
        for statement in statements:
            cur = execute(conn, statement)
            results.append(cur.fetchall() if cur.description else [])
        return results

    return pool.run(unit)
