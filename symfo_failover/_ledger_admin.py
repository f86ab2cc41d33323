"""Installing, inspecting and pruning the commit ledger (`install_ledger` & co).

These run once by an operator (``symfo-failover ledger install|status|prune``) or at an
application's deployment, over psycopg, never inside a unit of work. The application's
sessions use the ledger by themselves once it is installed (``ledger="auto"``).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from . import _ledger as lg


@dataclass(frozen=True)
class LedgerInstall:
    """What `install_ledger` did.

    ``created``: the table was made now (False: it was there; nothing changed).
    ``granted``: the GRANTs it ran (for ``grant_to``). ``grants``: what an application
    role needs, with ``ROLE`` standing for the role where none was given.
    """

    created: bool
    schema_created: bool
    granted: list[str] = field(default_factory=list)
    grants: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class LedgerStatus:
    """What `ledger_status` read. Times are the server's, as ISO text."""

    installed: bool
    #: `_ledger.ACCESS_SQL`'s letters for the connected role (U, I, S, D).
    access: str | None
    rows: int = 0
    oldest: str | None = None
    newest: str | None = None
    size_bytes: int = 0
    #: Rows older than the retention that a prune would delete now.
    prunable: int = 0
    retention: float = lg.DEFAULT_RETENTION
    #: Roles that may insert into the ledger (what the applications need).
    roles: list[str] = field(default_factory=list)

    @property
    def usable(self) -> bool:
        """The connected role's sessions would use it (``ledger="auto"``)."""
        return lg.LedgerState.from_access(self.access).usable

    def to_dict(self) -> dict[str, Any]:
        return {"installed": self.installed, "access": self.access, "usable": self.usable,
                "rows": self.rows, "oldest": self.oldest, "newest": self.newest,
                "size_bytes": self.size_bytes, "prunable": self.prunable,
                "retention": self.retention, "roles": self.roles}


@contextmanager
def _session(conninfo: Any) -> Iterator[Any]:
    """A psycopg session: ``conninfo`` a libpq string (an autocommit session of its
    own), or a psycopg ``Connection`` of the caller's (used as it is, left open; every
    statement here runs inside ``conn.transaction()``, so that nothing is left
    uncommitted on it)."""
    import psycopg

    if isinstance(conninfo, psycopg.Connection):
        if not conninfo.autocommit and conninfo.info.transaction_status != \
                psycopg.pq.TransactionStatus.IDLE:
            raise ValueError("the connection has a transaction open: commit or roll back "
                             "first")
        yield conninfo
        return
    if not isinstance(conninfo, str):
        raise TypeError("conninfo must be a libpq connection string or a psycopg "
                        f"Connection, not {type(conninfo).__name__}")
    from ._check import _parse, _why_no_connection

    target = _parse(conninfo)
    try:
        conn = psycopg.connect(**target.connect_args, autocommit=True)
    except psycopg.Error as exc:
        from ._report import InputError

        raise InputError(_why_no_connection(target, exc, 5, "connect to")) from None
    with conn:
        yield conn


def install_ledger(conninfo: Any, *, grant_to: str | Sequence[str] | None = None
                   ) -> LedgerInstall:
    """Install the commit ledger: the schema ``symfo_failover`` and its table
    ``symfo_failover.ledger`` (a logged table, its token the primary key). Idempotent:
    run it again and nothing changes. Needs CREATE on the database (the owner, or a
    role granted it); a role without it gets psycopg's ``InsufficientPrivilege``.

    ``grant_to``: application roles to grant what their sessions need (USAGE on the
    schema; SELECT, INSERT and DELETE on the table; DELETE is for pruning). The returned
    `LedgerInstall` lists the GRANTs either way. Prints nothing.
    """
    roles = [grant_to] if isinstance(grant_to, str) else list(grant_to or ())
    for role in roles:
        lg.quote_ident(role)  # a bad name is refused before anything is done
    with _session(conninfo) as conn, conn.transaction():
        existed = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                               (lg.TABLE,)).fetchone()[0]
        schema = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                              (lg.SCHEMA,)).fetchone()[0]
        for statement in lg.install_statements():
            if existed and statement.startswith("COMMENT"):
                continue
            conn.execute(statement)
        granted = []
        for role in roles:
            for statement in lg.grant_statements(role):
                conn.execute(statement)
                granted.append(statement)
    template = [s.replace('"ROLE"', "ROLE") for s in lg.grant_statements("ROLE")]
    return LedgerInstall(created=not existed, schema_created=not schema, granted=granted,
                         grants=granted or template)


def _status_sql(retention: float) -> str:
    # "prunable" counts exactly what `_ledger.prune_sql` would delete (both conditions).
    where = lg.prune_condition(retention)
    return (f"SELECT count(*), min(created)::text, max(created)::text, "
            f"pg_total_relation_size('{lg.TABLE}'), count(*) FILTER (WHERE {where}) "
            f"FROM {lg.TABLE}")


_ROLES_SQL = (
    "SELECT DISTINCT grantee FROM information_schema.role_table_grants "
    "WHERE table_schema = %s AND table_name = 'ledger' AND privilege_type = 'INSERT' "
    "ORDER BY 1"
)


def ledger_status(conninfo: Any, *, retention: float = lg.DEFAULT_RETENTION) -> LedgerStatus:
    """Is the ledger installed, may the connected role use it, how big is it, and how
    much would a prune with ``retention`` (seconds) delete now."""
    with _session(conninfo) as conn, conn.transaction():
        access = conn.execute(f"SELECT {lg.ACCESS_SQL}").fetchone()[0]
        if access is None:
            return LedgerStatus(installed=False, access=None, retention=retention)
        roles = [r[0] for r in conn.execute(_ROLES_SQL, (lg.SCHEMA,)).fetchall()]
        if not ("U" in access and "S" in access):
            return LedgerStatus(installed=True, access=access, retention=retention,
                                roles=roles)
        rows, oldest, newest, size, prunable = conn.execute(
            _status_sql(retention)).fetchone()
        return LedgerStatus(installed=True, access=access, rows=rows, oldest=oldest,
                            newest=newest, size_bytes=size, prunable=prunable,
                            retention=retention, roles=roles)


def prune_ledger(conninfo: Any, *, retention: float = lg.DEFAULT_RETENTION,
                 batch: int = lg.PRUNE_BATCH, max_seconds: float = 60.0) -> int:
    """Delete tokens older than ``retention`` seconds (by the server's clock), in
    batches of ``batch`` rows, until none is left or ``max_seconds`` passed. Returns
    the rows deleted. The application's sessions prune by themselves; this is for a
    ledger whose applications stopped, or a role without DELETE."""
    if retention < 60:
        raise ValueError(f"retention must be at least 60 seconds, not {retention!r}: a "
                         "unit still being resolved must find its token")
    sql = lg.prune_sql(retention, batch)
    total = 0
    started = time.monotonic()
    with _session(conninfo) as conn:
        while True:
            with conn.transaction():  # each batch commits, on the caller's connection too
                deleted = int(conn.execute(sql).fetchone()[0])
            total += deleted
            if deleted < batch or time.monotonic() - started > max_seconds:
                return total
