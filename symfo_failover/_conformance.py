"""Reproduce the vendor guide's section 3.4.1 tables on a local server.

For each situation of the guide (a failure while a call is in progress, a call
made while the server is down) and each Python driver, make it happen on a real
server, record what the driver raised, and classify it. The guide's rows for
the drivers that Python uses: psycopg is a libpq program, pyodbc goes through
psqlODBC (the ODBC row).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from ._classify import classify, sqlstate_of
from ._kind import Failure, Kind
from .harness import LocalServer

#: What the guide documents, per driver row: (in progress, while down).
#: ``None`` stands for the guide's "NULL" / "CONNECTION_BAD" / empty string.
GUIDE_ROWS: dict[str, tuple[str, tuple[str | None, ...], tuple[str | None, ...]]] = {
    "psycopg": ("libpq", ("57P01", None), (None,)),
    "pyodbc": ("ODBC", ("57P01", "08S01"), ("08001",)),
}

DRIVERS = tuple(GUIDE_ROWS)


@dataclass(frozen=True)
class Situation:
    name: str
    description: str
    #: "in_progress" or "while_down": which column of the guide's table.
    column: str
    expected: Kind


SITUATIONS: tuple[Situation, ...] = (
    Situation("switchover", "switchover during a call (orderly fast shutdown)",
              "in_progress", Kind.CONNECTION_LOST),
    Situation("server_down", "server down during a call (immediate shutdown)",
              "in_progress", Kind.CONNECTION_LOST),
    Situation("node_down", "node down during a call (SIGKILL of the postmaster)",
              "in_progress", Kind.CONNECTION_LOST),
    Situation("server_crash", "server crash during a call (another backend dies, all reset)",
              "in_progress", Kind.CONNECTION_LOST),
    Situation("idle_after_switchover", "call on an idle session after a switchover",
              "in_progress", Kind.CONNECTION_LOST),
    Situation("dead_session", "any later call on the same dead session",
              "in_progress", Kind.CONNECTION_LOST),
    Situation("connect_while_down", "connect while the server is down",
              "while_down", Kind.CONNECT_FAILED),
)


@dataclass(frozen=True)
class Observation:
    driver: str
    situation: str
    description: str
    guide_row: str
    guide_codes: tuple[str | None, ...]
    exception: str
    sqlstate: str | None
    in_guide: bool
    kind: str
    expected_kind: str
    retryable: bool
    reconnect: bool
    message_text: str

    @property
    def ok(self) -> bool:
        return self.kind == self.expected_kind

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


class Reachable(Protocol):
    """Anything with a libpq connection string: a server, or a cluster's access point."""

    def conninfo(self, dbname: str = "postgres", **extra: str) -> str: ...

    def odbc_connection_string(self, database: str = "postgres", **extra: str) -> str: ...


class NoErrorRaised(AssertionError):
    """The situation did not make the driver raise: the reproduction failed."""


# --- drivers ---------------------------------------------------------------


def connect(driver: str, server: Reachable) -> Any:
    if driver == "psycopg":
        import psycopg

        return psycopg.connect(server.conninfo(connect_timeout="5"), autocommit=True)
    if driver == "pyodbc":
        import pyodbc

        return pyodbc.connect(server.odbc_connection_string(), autocommit=True, timeout=5)
    raise ValueError(f"unknown driver {driver!r}; expected one of {', '.join(DRIVERS)}")


def backend_pid(conn: Any) -> int:
    cur = conn.cursor()
    cur.execute("SELECT pg_backend_pid()")
    row = cur.fetchone()
    assert row is not None
    return int(row[0])


def _query(conn: Any, sql: str) -> None:
    cur = conn.cursor()
    cur.execute(sql)
    if cur.description is not None:
        cur.fetchall()


def close_quietly(conn: Any) -> None:
    """Close a driver connection, dead or alive, without raising."""
    with suppress(Exception):
        conn.close()


# --- making things happen ---------------------------------------------------


def _wait_until_running_query(server: Reachable, pid: int, timeout: float = 10.0) -> None:
    """Wait until backend ``pid`` is executing a statement, seen by another session."""
    import psycopg

    deadline = time.monotonic() + timeout
    with psycopg.connect(server.conninfo(), autocommit=True) as admin:
        while time.monotonic() < deadline:
            row = admin.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row and row[0] == "active":
                return
            time.sleep(0.02)
    raise TimeoutError(f"backend {pid} never started its query")


def during_call(
    conn: Any, server: Reachable, fault: Callable[[], object]
) -> BaseException | None:
    """Run a long statement on ``conn`` and inject ``fault`` while it runs."""
    pid = backend_pid(conn)
    errors: list[BaseException] = []

    def inject() -> None:
        try:
            _wait_until_running_query(server, pid)
            fault()
        except BaseException as exc:  # reported below, never swallowed
            errors.append(exc)

    injector = threading.Thread(target=inject, name="conformance-fault", daemon=True)
    injector.start()
    raised: BaseException | None = None
    try:
        _query(conn, "SELECT pg_sleep(30)")
    except Exception as exc:
        raised = exc
    injector.join(timeout=60)
    if errors:
        raise errors[0]
    return raised


@contextmanager
def _crash_partner(server: LocalServer, driver: str) -> Iterator[Callable[[], None]]:
    """A second session whose backend is killed to crash the server."""
    partner = connect(driver, server)
    partner_pid = backend_pid(partner)
    try:
        yield lambda: server.kill_backend(partner_pid)
    finally:
        close_quietly(partner)


def _make_situation(
    name: str, driver: str, server: LocalServer
) -> tuple[BaseException | None, Any]:
    """Bring the server up, reproduce one situation, return (what was raised, connection)."""
    if not server.running:
        server.start()
    if name == "connect_while_down":
        server.stop("fast")
        try:
            conn = connect(driver, server)
        except Exception as exc:
            return exc, None
        close_quietly(conn)
        return None, None

    conn = connect(driver, server)
    try:
        return _reproduce(name, driver, server, conn), conn
    except BaseException:
        close_quietly(conn)  # the caller only closes what it was given back
        raise


def _reproduce(name: str, driver: str, server: LocalServer, conn: Any) -> BaseException | None:
    if name == "switchover":
        return during_call(conn, server, lambda: server.stop("fast"))
    if name == "server_down":
        return during_call(conn, server, lambda: server.stop("immediate"))
    if name == "node_down":
        return during_call(conn, server, server.kill_postmaster)
    if name == "server_crash":
        with _crash_partner(server, driver) as crash:
            raised = during_call(conn, server, crash)
        server.wait_stopped()
        return raised
    if name == "idle_after_switchover":
        server.stop("fast")
        server.start()
        return _call(conn)
    if name == "dead_session":
        server.stop("immediate")
        if _call(conn) is None:
            raise NoErrorRaised("the first call after the server went down succeeded")
        server.start()
        return _call(conn)
    raise ValueError(f"unknown situation {name!r}")


def _call(conn: Any) -> BaseException | None:
    try:
        _query(conn, "SELECT 1")
    except Exception as exc:
        return exc
    return None


def observe(driver: str, situation: Situation, server: LocalServer) -> Observation:
    """Reproduce one situation with one driver and record what was seen."""
    raised, conn = _make_situation(situation.name, driver, server)
    try:
        if raised is None:
            raise NoErrorRaised(f"{driver}: {situation.description}: no error was raised")
        failure: Failure = classify(raised, connection=conn)
    finally:
        if conn is not None:
            close_quietly(conn)
    row, in_progress, while_down = GUIDE_ROWS[driver]
    guide = in_progress if situation.column == "in_progress" else while_down
    code = sqlstate_of(raised)
    return Observation(
        driver=driver,
        situation=situation.name,
        description=situation.description,
        guide_row=row,
        guide_codes=guide,
        exception=f"{type(raised).__module__}.{type(raised).__qualname__}",
        sqlstate=code,
        in_guide=code in guide,
        kind=failure.kind.name,
        expected_kind=situation.expected.name,
        retryable=failure.retryable,
        reconnect=failure.reconnect,
        message_text=_first_line(raised),
    )


def _first_line(exc: BaseException) -> str:
    args = exc.args
    text = args[1] if len(args) >= 2 and isinstance(args[1], str) else str(exc)
    lines = text.strip().splitlines()
    return lines[0][:160] if lines else ""


def run(
    drivers: Iterable[str] = DRIVERS,
    *,
    situations: Iterable[Situation] = SITUATIONS,
    lc_messages: str | None = None,
    server: LocalServer | None = None,
) -> list[Observation]:
    """Run every situation for every driver on one local server."""
    drivers = list(drivers)
    for d in drivers:
        if d not in GUIDE_ROWS:
            raise ValueError(f"unknown driver {d!r}; expected one of {', '.join(DRIVERS)}")
    own = server is None
    srv = server or LocalServer(lc_messages=lc_messages)
    try:
        return [observe(d, s, srv) for d in drivers for s in situations]
    finally:
        if own:
            srv.close()


def _code(code: str | None) -> str:
    return code if code else "NULL"


def format_report(observations: list[Observation], *, lc_messages: str | None = None) -> str:
    """A plain-text report: guide, observed, classification, per driver and situation."""
    lines = [
        "Vendor guide section 3.4.1, reproduced on a local PostgreSQL server"
        + (f" (lc_messages={lc_messages})" if lc_messages else ""),
        "",
    ]
    header = (
        f"{'driver':8} {'situation':62} {'guide says':22} {'observed':48} "
        f"{'SQLSTATE':8} {'classified as':18} ok"
    )
    lines += [header, "-" * len(header)]
    for o in observations:
        guide = f"{o.guide_row}: " + " or ".join(_code(c) for c in o.guide_codes)
        note = "" if o.in_guide else " *"
        lines.append(
            f"{o.driver:8} {o.description:62} {guide:22} {o.exception:48} "
            f"{_code(o.sqlstate) + note:8} {o.kind:18} {'yes' if o.ok else 'NO'}"
        )
    lines += [
        "",
        "* observed code not in the guide's row for this driver (see docs/conformance.md).",
        f"{sum(o.ok for o in observations)} of {len(observations)} classified as expected.",
    ]
    return "\n".join(lines)
