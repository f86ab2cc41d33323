"""A `FailoverPool` behind any framework that asks for a connection factory.

    pip install "symfo-failover[pool]"

Frameworks and helpers that want "something that gives me a connection" usually take
one of two shapes; the pool gives both:

- a context manager factory: ``with factory() as conn: ...``. ``pool.connection``
  is one (it commits at the end of the block, rolls back on an error, and gives the
  connection back);
- a pair of functions, one to get a connection and one to give it back:
  ``pool.getconn`` and ``pool.putconn``.

Either way the connection is a plain ``psycopg.Connection`` (of a subclass), never one
to the old server after a failover, never one the server already closed. Work that
must survive a failover *while it runs* goes to ``pool.run()`` (`save_order`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any

import psycopg

from symfo_failover import FailoverPool

Conn = psycopg.Connection[Any]


def context_factory(pool: FailoverPool[Conn]) -> Callable[[], AbstractContextManager[Conn]]:
    """``with factory() as conn:``: one transaction, committed when the block ends."""
    return pool.connection


def pair_factory(pool: FailoverPool[Conn]) -> tuple[Callable[[], Conn], Callable[[Conn], None]]:
    """``conn = get(); try: ... finally: give_back(conn)``."""
    return pool.getconn, pool.putconn


@contextmanager
def autocommit_factory(pool: FailoverPool[Conn]) -> Iterator[Conn]:
    """A factory of your own: here, a connection in autocommit mode for the block,
    put back as it was (the pool hands the next request what this one left)."""
    with pool.connection() as conn:
        conn.autocommit = True
        try:
            yield conn
        finally:
            if not conn.closed:
                conn.autocommit = False


def save_order(pool: FailoverPool[Conn], customer: int, amount: int) -> int:
    """A unit of work: committed exactly once, run again after a failover."""

    def unit(conn: Conn) -> int:
        row = conn.execute("INSERT INTO orders (customer, amount) VALUES (%s, %s) "
                           "RETURNING id", (customer, amount)).fetchone()
        assert row is not None
        return int(row[0])

    return pool.run(unit)


#: The table `save_order` writes to.
SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    id bigserial PRIMARY KEY,
    customer int NOT NULL,
    amount int NOT NULL
)
"""
