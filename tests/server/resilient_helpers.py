"""What the resilient-connection tests share: statements on either driver, the cluster's
connection strings, and an event recorder whose hook failures are never lost."""

from __future__ import annotations

import traceback
from collections.abc import Callable
from typing import Any, ClassVar

import psycopg

import symfo_failover as sf
from symfo_failover.harness import LocalCluster, LocalServer

#: libpq's key names, as psqlODBC spells them.
_ODBC_KEYS = {"dbname": "Database", "user": "Uid", "password": "Pwd", "host": "Server",
              "port": "Port"}


def conninfo(
    driver: str, cluster: LocalCluster | LocalServer, host: str | None = None,
    port: int | None = None, **libpq: str,
) -> str:
    """A libpq (psycopg) or ODBC (pyodbc) connection string to ``cluster``; ``host``,
    ``port`` and the other keys are given with libpq's names for either driver."""
    if host is not None:
        libpq["host"] = host
    if port is not None:
        libpq["port"] = str(port)
    if driver == "psycopg":
        return cluster.conninfo(**libpq)
    return cluster.odbc_connection_string(**{_ODBC_KEYS[k]: v for k, v in libpq.items()})


def exe(raw: Any, sql: str, *params: Any) -> Any:
    """Run one statement on a raw psycopg or pyodbc connection (``%s`` placeholders)."""
    if isinstance(raw, psycopg.Connection):
        return raw.execute(sql, params or None)
    return raw.execute(sql.replace("%s", "?"), *params)


def rows(cluster: LocalCluster, table: str, entry: str, column: str = "id") -> int:
    """How many rows of ``table`` have ``column = entry`` (read on a session of its own)."""
    with psycopg.connect(cluster.conninfo(), autocommit=True) as conn:
        row = conn.execute(f"SELECT count(*) FROM {table} WHERE {column} = %s",
                           (entry,)).fetchone()
        assert row is not None
        return int(row[0])


class Recorder:
    """An on_event hook that keeps the events and can act on one.

    The library swallows what a hook raises (an observer must not change what the
    application sees), so an assertion inside a hook could never fail a test. Every
    hook failure is kept here instead, and the `_hooks_did_not_fail` fixture of
    tests/server/conftest.py fails the test after it ran.
    """

    made: ClassVar[list[Recorder]] = []

    def __init__(self) -> None:
        self.events: list[sf.Event] = []
        self.on: dict[type[sf.Event], Callable[[sf.Event], None]] = {}
        self.failures: list[str] = []
        Recorder.made.append(self)

    def __call__(self, event: sf.Event) -> None:
        self.events.append(event)
        action = self.on.pop(type(event), None)
        if action is not None:
            try:
                action(event)
            except BaseException:
                self.failures.append(traceback.format_exc())
                raise

    def of(self, kind: type[sf.Event]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


class Unit:
    """A transfer that counts how often it ran."""

    def __init__(self, entry: str, amount: int = 1) -> None:
        self.entry, self.amount, self.runs = entry, amount, 0

    def __call__(self, raw: Any) -> str:
        self.runs += 1
        exe(raw, "INSERT INTO ledger VALUES (%s, %s)", self.entry, self.amount)
        exe(raw, "UPDATE counter SET n = n + 1")
        return f"done {self.entry}"
