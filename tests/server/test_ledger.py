"""The commit ledger against real servers: install, the CLI, ``ledger="auto"|"require"|"off"``,
lost COMMITs decided by the unit's token (also across a crash), a ledger dropped or a
privilege missing under a live connection, pruning, and the pools.

One server (with scram passwords) serves the module; each test gets a database of its
own (``CREATE DATABASE`` is cheap on PostgreSQL 15), dropped with the roles it made.
Tests that crash a server make a `LocalCluster` of their own.

Every connection-level test runs with psycopg, psycopg's AsyncResilientConnection
("psycopg-async", see resilient_helpers.connect) and pyodbc + psqlODBC where the
behaviour is the driver's to get right.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from resilient_helpers import DRIVERS, Recorder, connect, conninfo, exe

import symfo_failover as sf
from symfo_failover import _cli
from symfo_failover._ledger import INSTALL_HINT, grant_statements, new_token
from symfo_failover.harness import FaultProxy, LocalCluster, LocalServer

pytestmark = pytest.mark.server

PASSWORD = "ledger-Su-pw7"
FAST = sf.RetryPolicy(deadline=30)
#: A policy whose randomness is 0: a new session's first prune is due at once.
PRUNE_NOW = sf.RetryPolicy(deadline=30, random=lambda: 0.0)
INSTALL_COMMAND = "symfo-failover ledger install"
ODBC = pytest.mark.odbc
#: What `install_ledger` says a role needs, with and without DELETE (``{role}``: the role).
FULL_GRANTS = [g.replace('"ROLE"', "{role}") for g in grant_statements("ROLE")]
NO_DELETE_GRANTS = [g.replace('"ROLE"', "{role}") for g in grant_statements("ROLE", prune=False)]


# --- fixtures and helpers -------------------------------------------------------------


@pytest.fixture(scope="module")
def srv() -> Iterator[LocalServer]:
    """The module's server; no test stops it (they crash clusters of their own)."""
    with LocalServer(password=PASSWORD) as server:
        server.start()
        yield server


@pytest.fixture(params=DRIVERS)
def driver(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@dataclass(frozen=True)
class Role:
    name: str
    password: str


@dataclass
class Db:
    """A database of the test's own on the module's server, with ``items (id text)``
    (no unique constraint: a unit stored twice shows as two rows)."""

    server: LocalServer | LocalCluster
    name: str
    roles: list[Role] = field(default_factory=list)

    def conninfo(self, driver: str = "psycopg", role: Role | None = None,
                 proxy: FaultProxy | None = None) -> str:
        libpq: dict[str, str] = {"dbname": self.name}
        if role is not None:
            libpq.update(user=role.name, password=role.password)
        if proxy is not None:
            libpq.update(host=proxy.host, port=str(proxy.port))
        return conninfo(driver, self.server, **libpq)

    def query(self, sql: str, *params: Any) -> list[tuple[Any, ...]]:
        with psycopg.connect(self.conninfo(), autocommit=True) as conn:
            cur = conn.execute(sql, params or None)
            return cur.fetchall() if cur.description is not None else []

    def one(self, sql: str, *params: Any) -> Any:
        return self.query(sql, *params)[0][0]

    def items(self, entry: str) -> int:
        return int(self.one("SELECT count(*) FROM items WHERE id = %s", entry))

    def ledger_rows(self) -> int:
        return int(self.one("SELECT count(*) FROM symfo_failover.ledger"))

    def token_rows(self, token: str) -> int:
        return int(self.one("SELECT count(*) FROM symfo_failover.ledger WHERE token = %s::uuid",
                            token))

    def tokens(self) -> set[str]:
        return {r[0] for r in self.query(
            "SELECT replace(token::text, '-', '') FROM symfo_failover.ledger")}

    def installed(self) -> bool:
        return bool(self.one("SELECT to_regclass('symfo_failover.ledger') IS NOT NULL"))

    def role(self, *grants: str) -> Role:
        """A login role with a password (no CREATE on the database: PostgreSQL 15's
        default for a non-owner), granted ``grants`` (``{role}``: its quoted name) and
        everything on ``items``."""
        suffix = uuid.uuid4().hex[:8]
        role = Role(f"app_{suffix}", f"Pw-{suffix}-secret")
        quoted = f'"{role.name}"'
        self.query(f"CREATE ROLE {quoted} LOGIN PASSWORD '{role.password}'")
        self.roles.append(role)
        self.query(f"GRANT ALL ON items TO {quoted}")
        for grant in grants:
            self.query(grant.format(role=quoted))
        return role

    def add_tokens(self, count: int, *, token_age: float, created_age: float) -> list[str]:
        """``count`` tokens made ``token_age`` seconds ago (the client's clock), stored
        as created ``created_age`` seconds ago (the server's clock)."""
        tokens = [new_token(now=time.time() - token_age) for _ in range(count)]
        self.query("INSERT INTO symfo_failover.ledger (token, created) "
                   "SELECT t::uuid, now() - make_interval(secs => %s) FROM unnest(%s::text[]) t",
                   float(created_age), tokens)
        return tokens


def make_db(server: LocalServer | LocalCluster) -> Db:
    db = Db(server, f"ledger_{uuid.uuid4().hex[:10]}")
    with psycopg.connect(server.conninfo(), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {db.name}")
    db.query("CREATE TABLE items (id text NOT NULL)")
    return db


def drop_db(db: Db) -> None:
    with psycopg.connect(db.server.conninfo(), autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {db.name} WITH (FORCE)")
        for role in db.roles:
            conn.execute(f'DROP ROLE IF EXISTS "{role.name}"')


@pytest.fixture
def db(srv: LocalServer) -> Iterator[Db]:
    """A fresh database without the ledger."""
    made = make_db(srv)
    try:
        yield made
    finally:
        drop_db(made)


@pytest.fixture
def ledger_db(db: Db) -> Db:
    """A fresh database with the ledger installed."""
    sf.install_ledger(db.conninfo())
    return db


@pytest.fixture
def proxy(srv: LocalServer) -> Iterator[FaultProxy]:
    with FaultProxy(srv.host, srv.port) as px:
        yield px


class Insert:
    """A read-write unit: one row in ``items``; counts how often it ran. Also reads how
    many ledger rows its own transaction wrote (``created = now()``: the transaction's
    start), when the ledger is there."""

    def __init__(self, entry: str, *, look: bool = False) -> None:
        self.entry, self.look, self.runs = entry, look, 0
        self.own_ledger_rows: list[int] = []

    def __call__(self, raw: Any) -> str:
        self.runs += 1
        exe(raw, "INSERT INTO items VALUES (%s)", self.entry)
        if self.look:
            row = exe(raw, "SELECT count(*) FROM symfo_failover.ledger "
                           "WHERE created = now()").fetchone()
            self.own_ledger_rows.append(int(row[0]))
        return self.entry


def read_items(raw: Any) -> tuple[int, str]:
    """A read-only unit: how many items, and whether the transaction is read-only."""
    row = exe(raw, "SELECT count(*), current_setting('transaction_read_only') "
                   "FROM items").fetchone()
    return int(row[0]), str(row[1])


def free_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """``symfo-failover ledger ARGS`` in this process: exit status, stdout, stderr."""
    capsys.readouterr()
    code = _cli.main(["ledger", *args])
    out, err = capsys.readouterr()
    return code, out, err


def types(rec: Recorder, *kinds: type[sf.Event]) -> list[type[sf.Event]]:
    """The order of the events of ``kinds`` the recorder saw."""
    return [type(e) for e in rec.events if isinstance(e, kinds)]


# --- install_ledger -----------------------------------------------------------------------


def test_install_creates_the_ledger_once_and_grants_on_request(db: Db) -> None:
    first = sf.install_ledger(db.conninfo())
    assert isinstance(first, sf.LedgerInstall)
    assert (first.created, first.schema_created, first.granted) == (True, True, [])
    assert first.grants == ["GRANT USAGE ON SCHEMA symfo_failover TO ROLE",
                            "GRANT SELECT, INSERT, DELETE ON symfo_failover.ledger TO ROLE"]
    # A logged table, its token (uuid) the primary key, no other index.
    oid, persistence, comment = db.query(
        "SELECT c.oid, c.relpersistence, obj_description(c.oid, 'pg_class') "
        "FROM pg_class c WHERE c.oid = 'symfo_failover.ledger'::regclass")[0]
    assert persistence == "p"
    assert "commit ledger" in comment
    assert db.query("SELECT a.attname, format_type(a.atttypid, a.atttypmod) "
                    "FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
                    "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = %s AND i.indisprimary",
                    oid) == [("token", "uuid")]
    assert db.one("SELECT count(*) FROM pg_index WHERE indrelid = %s", oid) == 1
    [kept] = db.add_tokens(1, token_age=0, created_age=0)

    second = sf.install_ledger(db.conninfo())
    assert (second.created, second.schema_created, second.granted) == (False, False, [])
    assert second.grants == first.grants
    assert db.query("SELECT c.oid, obj_description(c.oid, 'pg_class') FROM pg_class c "
                    "WHERE c.oid = 'symfo_failover.ledger'::regclass") == [(oid, comment)]
    assert db.tokens() == {kept}, "a second install changes nothing"

    role = db.role()
    third = sf.install_ledger(db.conninfo(), grant_to=role.name)
    assert (third.created, third.schema_created) == (False, False)
    assert third.granted == grant_statements(role.name) == [
        f'GRANT USAGE ON SCHEMA symfo_failover TO "{role.name}"',
        f'GRANT SELECT, INSERT, DELETE ON symfo_failover.ledger TO "{role.name}"']
    assert third.grants == third.granted
    status = sf.ledger_status(db.conninfo(role=role))
    assert isinstance(status, sf.LedgerStatus)
    assert (status.installed, status.access, status.usable) == (True, "UISD", True)
    assert role.name in status.roles
    assert db.tokens() == {kept}


@pytest.mark.parametrize("driver", ["psycopg", pytest.param("pyodbc", marks=ODBC)])
def test_the_printed_grants_are_what_a_role_needs(driver: str, ledger_db: Db) -> None:
    """The GRANTs `install_ledger` names (ROLE replaced) are enough for
    ``ledger="require"``, a unit's token and pruning."""
    template = sf.install_ledger(ledger_db.conninfo()).grants
    role = ledger_db.role(*(g.replace(" ROLE", " {role}") for g in template))
    assert sf.ledger_status(ledger_db.conninfo(role=role)).access == "UISD"
    old = ledger_db.add_tokens(3, token_age=7200, created_age=7200)
    rec = Recorder()
    with connect(ledger_db.conninfo(driver, role=role), driver=driver, ledger="require",
                 policy=PRUNE_NOW, on_event=rec) as rc:
        assert rc.run(Insert("granted")) == "granted"
    assert ledger_db.items("granted") == 1
    assert ledger_db.ledger_rows() == 1
    assert not set(old) & ledger_db.tokens()
    assert [(e.deleted, e.error) for e in rec.of(sf.LedgerPruned)] == [(3, None)]


def test_install_without_create_on_the_database(
    db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    role = db.role()
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        sf.install_ledger(db.conninfo(role=role))
    assert not db.installed()
    assert db.one("SELECT to_regnamespace('symfo_failover') IS NULL")

    code, out, err = cli(capsys, "install", db.conninfo(role=role))
    assert code == 2
    assert out == ""
    assert "CREATE" in err
    assert "42501" in err
    assert role.password not in err
    assert "Traceback" not in err
    assert not db.installed()


# --- the CLI ------------------------------------------------------------------------------


def test_cli_install_status_and_prune(db: Db, capsys: pytest.CaptureFixture[str]) -> None:
    info = db.conninfo()
    code, out, err = cli(capsys, "status", info)
    assert (code, err) == (0, "")
    assert "not installed" in out
    assert INSTALL_COMMAND in out
    code, out, _ = cli(capsys, "status", info, "--json")
    assert code == 0
    assert json.loads(out)["installed"] is False

    code, out, err = cli(capsys, "install", info)
    assert (code, err) == (0, "")
    assert "installed the commit ledger symfo_failover.ledger" in out
    assert "GRANT SELECT, INSERT, DELETE ON symfo_failover.ledger TO ROLE;" in out
    assert db.installed()
    code, out, _ = cli(capsys, "install", info, "--json")
    assert code == 0
    assert json.loads(out)["created"] is False

    code, out, _ = cli(capsys, "status", info, "--json")
    assert code == 0
    status = json.loads(out)
    assert (status["installed"], status["usable"], status["rows"]) == (True, True, 0)

    old = db.add_tokens(3, token_age=7200, created_age=7200)
    young = db.add_tokens(2, token_age=0, created_age=0)
    code, out, _ = cli(capsys, "status", info, "--json", "--retention", "3600")
    status = json.loads(out)
    assert (code, status["rows"], status["prunable"]) == (0, 5, 3)

    code, out, err = cli(capsys, "prune", info, "--retention", "3600", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {"deleted": 3, "retention": 3600.0}
    assert db.tokens() == set(young)
    assert not set(old) & db.tokens()
    code, out, _ = cli(capsys, "prune", info, "--retention", "3600")
    assert (code, out.strip()) == (0, "deleted 0 tokens older than 3600 s")

    code, out, _ = cli(capsys, "status", info)
    assert code == 0
    assert "installed; this role may use it (privileges: UISD)" in out
    assert "rows: 2 " in out

    role = db.role()
    code, out, _ = cli(capsys, "install", info, "--grant", role.name, "--json")
    assert code == 0
    assert json.loads(out)["granted"] == grant_statements(role.name)
    assert sf.ledger_status(db.conninfo(role=role)).usable


def test_cli_status_of_a_role_that_may_not_use_it(
    ledger_db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    role = ledger_db.role("GRANT USAGE ON SCHEMA symfo_failover TO {role}")
    code, out, _ = cli(capsys, "status", ledger_db.conninfo(role=role), "--json")
    status = json.loads(out)
    assert code == 0
    assert (status["installed"], status["usable"], status["access"]) == (True, False, "U")


@pytest.mark.parametrize("action", ["install", "status", "prune"])
@pytest.mark.parametrize("where", ["does not parse", "nothing listens", "wrong password"])
def test_cli_cannot_connect_exits_2_without_a_traceback(
    srv: LocalServer, capsys: pytest.CaptureFixture[str], action: str, where: str
) -> None:
    secret = "Very-Secret-pw-42"
    conninfo_ = {
        "does not parse": f"host=127.0.0.1 password={secret} port",
        "nothing listens": f"host=127.0.0.1 port={free_port()} user=postgres "
                           f"password={secret} dbname=postgres connect_timeout=3",
        "wrong password": srv.conninfo(password=secret, connect_timeout="3"),
    }[where]
    code, out, err = cli(capsys, action, conninfo_)
    assert code == 2
    assert out == ""
    assert err.startswith(f"symfo-failover ledger {action}: ")
    assert "Traceback" not in err
    assert secret not in err
    expected = {"does not parse": "does not parse", "nothing listens": "nothing listens",
                "wrong password": "28P01"}[where]
    assert expected in err


def test_cli_prune_refuses_a_short_retention(
    ledger_db: Db, capsys: pytest.CaptureFixture[str]
) -> None:
    ledger_db.add_tokens(2, token_age=7200, created_age=7200)
    code, out, err = cli(capsys, "prune", ledger_db.conninfo(), "--retention", "10")
    assert (code, out) == (2, "")
    assert "at least 60 seconds" in err
    assert "Traceback" not in err
    assert ledger_db.ledger_rows() == 2


# --- ledger="require" ---------------------------------------------------------------------


def test_require_without_the_ledger_raises_at_connect(driver: str, db: Db) -> None:
    rec = Recorder()
    with pytest.raises(sf.LedgerUnavailable) as raised:
        connect(db.conninfo(driver), driver=driver, ledger="require", policy=FAST,
                on_event=rec)
    err = raised.value
    assert INSTALL_COMMAND in str(err)
    assert "not installed" in err.reason
    assert not sf.classify(err).retryable
    assert not db.installed(), "require never installs anything"
    assert not rec.of(sf.LedgerNotUsed)
    assert settled_sessions(db) == 0, "the refused session was closed"


def test_require_for_a_role_without_insert(driver: str, ledger_db: Db) -> None:
    role = ledger_db.role("GRANT USAGE ON SCHEMA symfo_failover TO {role}")
    with pytest.raises(sf.LedgerUnavailable) as raised:
        connect(ledger_db.conninfo(driver, role=role), driver=driver, ledger="require",
                policy=FAST)
    err = raised.value
    assert "INSERT on symfo_failover.ledger" in err.reason
    assert "USAGE" not in err.reason, "it has USAGE: only what is missing is named"
    assert INSTALL_COMMAND in str(err)

    # The same role with "auto": the units go without the ledger, and say why once.
    rec = Recorder()
    with connect(ledger_db.conninfo(driver, role=role), driver=driver, policy=FAST,
                 on_event=rec) as rc:
        rc.run(Insert("no-insert-1"))
        rc.run(Insert("no-insert-2"))
    assert (ledger_db.items("no-insert-1"), ledger_db.items("no-insert-2")) == (1, 1)
    assert ledger_db.ledger_rows() == 0
    [not_used] = rec.of(sf.LedgerNotUsed)
    assert "INSERT on symfo_failover.ledger" in not_used.reason


def settled_sessions(db: Db, want: int = 0) -> int:
    """The client sessions on ``db`` other than the asking one, once there are ``want``
    (a session ends on the server a moment after the client closed it); what there is
    after 10 s otherwise."""
    deadline = time.monotonic() + 10
    while True:
        count = int(db.one("SELECT count(*) FROM pg_stat_activity WHERE datname = %s "
                           "AND pid <> pg_backend_pid()", db.name))
        if count == want or time.monotonic() > deadline:
            return count
        time.sleep(0.02)


# --- ledger="auto" and "off" --------------------------------------------------------------


def test_auto_without_the_ledger_uses_the_transaction_id(
    driver: str, db: Db, proxy: FaultProxy
) -> None:
    """Units commit; one LedgerNotUsed per session (a lost COMMIT makes a second
    session); the lost COMMIT is decided by pg_xact_status."""
    rec = Recorder()
    with connect(db.conninfo(driver, proxy=proxy), driver=driver, policy=FAST,
                 on_event=rec) as rc:
        rc.run(Insert("xid-1"))
        rc.run(Insert("xid-2"))
        assert len(rec.of(sf.LedgerNotUsed)) == 1
        proxy.arm_commit_drop()
        lost = Insert("xid-3")
        assert rc.run(lost) == "xid-3"
    assert [db.items(f"xid-{i}") for i in (1, 2, 3)] == [1, 1, 1]
    assert lost.runs == 1
    assert not db.installed()
    first, second = rec.of(sf.LedgerNotUsed)
    for event in (first, second):
        assert "not installed" in event.reason
        assert INSTALL_HINT in event.reason
    [resolved] = rec.of(sf.CommitResolved)
    assert (resolved.via, resolved.status, resolved.outcome) == ("xid", "committed",
                                                                  "returned")
    assert resolved.token is None
    assert types(rec, sf.LedgerNotUsed, sf.FailureDetected, sf.Reconnected,
                 sf.CommitResolved) == [sf.LedgerNotUsed, sf.FailureDetected,
                                        sf.Reconnected, sf.LedgerNotUsed, sf.CommitResolved]


def test_auto_with_the_ledger_one_row_per_read_write_unit(driver: str, ledger_db: Db) -> None:
    rec = Recorder()
    with connect(ledger_db.conninfo(driver), driver=driver, policy=FAST, on_event=rec) as rc:
        assert ledger_db.ledger_rows() == 0
        units = [Insert(f"rw-{i}", look=True) for i in range(3)]
        for n, unit in enumerate(units, 1):
            rc.run(unit)
            assert ledger_db.ledger_rows() == n
        assert [u.own_ledger_rows for u in units] == [[1], [1], [1]], \
            "the token is written inside the unit's own transaction"

        rc.read_only = True
        assert rc.run(read_items) == (3, "on")
        assert ledger_db.ledger_rows() == 3, "a read-only unit writes no token"
        rc.read_only = None
        rc.run(Insert("rw-after"))
    assert ledger_db.ledger_rows() == 4
    assert [ledger_db.items(f"rw-{i}") for i in range(3)] == [1, 1, 1]
    assert ledger_db.items("rw-after") == 1
    assert not rec.of(sf.LedgerNotUsed)


def test_a_prepared_insert_discarded_by_the_application_is_prepared_again(
    driver: str, ledger_db: Db,
) -> None:
    # The ledger's insert is prepared once per session; DISCARD ALL (a pool's reset, an
    # application's own) deallocates it: the next unit prepares it again, same token.
    rec = Recorder()
    with connect(ledger_db.conninfo(driver), driver=driver, policy=FAST, on_event=rec) as rc:
        rc.run(Insert("before"))
        rc.autocommit = True
        rc.execute("DISCARD ALL")
        rc.autocommit = False
        rc.run(Insert("after"))
        rc.run(Insert("again"))
    assert [ledger_db.items(e) for e in ("before", "after", "again")] == [1, 1, 1]
    assert ledger_db.ledger_rows() == 3
    assert not rec.of(sf.LedgerNotUsed)
    assert not rec.of(sf.FailureDetected)


def test_off_never_touches_the_ledger(driver: str, ledger_db: Db) -> None:
    ledger_db.add_tokens(2, token_age=7200, created_age=7200)
    rec = Recorder()
    with connect(ledger_db.conninfo(driver), driver=driver, policy=PRUNE_NOW, ledger="off",
                 on_event=rec) as rc:
        rc.run(Insert("off-1"))
        rc.run(Insert("off-2"))
    assert (ledger_db.items("off-1"), ledger_db.items("off-2")) == (1, 1)
    assert ledger_db.ledger_rows() == 2, "no token and no prune"
    assert not rec.of(sf.LedgerNotUsed)
    assert not rec.of(sf.LedgerPruned)


# --- a lost COMMIT, decided by the ledger -------------------------------------------------


@pytest.mark.parametrize("fault", ["drop", "hold"])
def test_a_lost_commit_is_decided_by_the_ledger(
    driver: str, ledger_db: Db, proxy: FaultProxy, fault: str
) -> None:
    rec = Recorder()
    unit = Insert(f"lost-{fault}")
    with connect(ledger_db.conninfo(driver, proxy=proxy), driver=driver, policy=FAST,
                 on_event=rec) as rc:
        rc.run(Insert("before"))
        (proxy.arm_commit_drop if fault == "drop" else proxy.arm_commit_hold)()
        assert rc.run(unit) == unit.entry
        # A withheld COMMIT arriving late finds its session ended: nothing happens.
        proxy.release_held()
        rc.run(Insert("after"))
    [resolved] = rec.of(sf.CommitResolved)
    assert resolved.via == "ledger"
    assert resolved.token is not None
    if fault == "drop":
        assert (resolved.status, resolved.outcome, unit.runs) == ("committed", "returned", 1)
        assert proxy.stats.commits_dropped == 1
        assert not rec.of(sf.UnitReplayed)
    else:
        assert (resolved.status, resolved.outcome, unit.runs) == ("aborted", "replayed", 2)
        assert resolved.terminated_old_session, "the old session was alive: it was ended"
        assert len(rec.of(sf.UnitReplayed)) == 1
    assert ledger_db.items(unit.entry) == 1
    assert ledger_db.token_rows(resolved.token) == 1, "the replay reuses the unit's token"
    assert ledger_db.ledger_rows() == 3
    assert types(rec, sf.FailureDetected, sf.Reconnected, sf.CommitResolved) == [
        sf.FailureDetected, sf.Reconnected, sf.CommitResolved]


@pytest.fixture
def crash_cluster() -> Iterator[tuple[LocalCluster, Db, FaultProxy]]:
    """A cluster of its own (the test crashes it) with the ledger, and a proxy."""
    with LocalCluster(password=PASSWORD) as cluster:
        cluster.start()
        db = make_db(cluster)
        sf.install_ledger(db.conninfo())
        with FaultProxy(cluster.host, cluster.port) as px:
            yield cluster, db, px


@pytest.mark.parametrize(("driver", "fault"), [
    ("psycopg", "hold"),
    ("psycopg", "drop"),
    pytest.param("pyodbc", "hold", marks=ODBC),
])
def test_a_crash_while_the_commit_is_in_flight(
    crash_cluster: tuple[LocalCluster, Db, FaultProxy], driver: str, fault: str
) -> None:
    """The COMMIT is held at the proxy (or its reply lost), the node crashes and comes
    back: the token decides; never CommitOutcomeUnknown, the row is there once."""
    cluster, db, proxy = crash_cluster
    rec = Recorder()
    crashed: list[str] = []

    def crash_and_restart(event: sf.Event) -> None:
        cluster.crash()
        cluster.start()
        crashed.append(type(event).__name__)

    rec.on[sf.FailureDetected] = crash_and_restart
    unit = Insert(f"crash-{fault}")
    with connect(db.conninfo(driver, proxy=proxy), driver=driver, policy=FAST,
                 on_event=rec) as rc:
        (proxy.arm_commit_hold if fault == "hold" else proxy.arm_commit_drop)()
        assert rc.run(unit) == unit.entry
        rc.run(Insert("after-crash"))
    assert crashed == ["FailureDetected"]
    [resolved] = rec.of(sf.CommitResolved)
    assert resolved.via == "ledger"
    expected = ("aborted", "replayed", 2) if fault == "hold" else ("committed", "returned", 1)
    assert (resolved.status, resolved.outcome, unit.runs) == expected
    reconnected = rec.of(sf.Reconnected)
    assert reconnected, "a new session after the crash"
    assert reconnected[0].failover, "the server that answered restarted"
    assert db.items(unit.entry) == 1
    assert db.items("after-crash") == 1
    assert resolved.token is not None
    assert db.token_rows(resolved.token) == 1


# --- the ledger gone under a live connection ----------------------------------------------


@pytest.mark.parametrize("mode", ["auto", "require"])
def test_the_ledger_dropped_under_a_live_connection(driver: str, ledger_db: Db,
                                                    mode: str) -> None:
    rec = Recorder()
    with connect(ledger_db.conninfo(driver), driver=driver, policy=FAST, ledger=mode,
                 on_event=rec) as rc:
        rc.run(Insert("with-ledger"))
        assert ledger_db.ledger_rows() == 1
        ledger_db.query("DROP TABLE symfo_failover.ledger")
        unit = Insert("after-drop")
        if mode == "auto":
            assert rc.run(unit) == "after-drop"
            rc.run(Insert("later"))
        else:
            with pytest.raises(sf.LedgerUnavailable) as raised:
                rc.run(unit)
            assert "gone" in raised.value.reason
            assert INSTALL_COMMAND in str(raised.value)
            again = Insert("again")
            with pytest.raises(sf.LedgerUnavailable):
                rc.run(again)
            assert again.runs == 0
    if mode == "auto":
        assert (unit.runs, ledger_db.items("after-drop"), ledger_db.items("later")) == (1, 1, 1)
        [gone] = rec.of(sf.LedgerNotUsed)
        assert "gone" in gone.reason
        assert INSTALL_HINT in gone.reason
    else:
        assert unit.runs == 0, "nothing of the unit ran"
        assert ledger_db.items("after-drop") == 0
        assert ledger_db.items("again") == 0
    assert ledger_db.items("with-ledger") == 1


# --- pruning ------------------------------------------------------------------------------


def test_a_session_prunes_old_tokens(driver: str, ledger_db: Db) -> None:
    old = ledger_db.add_tokens(50, token_age=7200, created_age=7200)
    young = ledger_db.add_tokens(5, token_age=0, created_age=0)
    rec = Recorder()
    with connect(ledger_db.conninfo(driver), driver=driver, policy=PRUNE_NOW,
                 on_event=rec) as rc:
        rc.run(Insert("pruning"))
        rc.run(Insert("not-pruning"))
    [pruned] = rec.of(sf.LedgerPruned)
    assert (pruned.deleted, pruned.retention, pruned.error) == (50, 3600.0, None)
    left = ledger_db.tokens()
    assert len(left) == 7
    assert set(young) <= left
    assert not set(old) & left
    assert (ledger_db.items("pruning"), ledger_db.items("not-pruning")) == (1, 1)


def test_a_role_without_delete_never_prunes(driver: str, ledger_db: Db) -> None:
    role = ledger_db.role(*NO_DELETE_GRANTS)
    assert sf.ledger_status(ledger_db.conninfo(role=role)).access == "UIS"
    old = ledger_db.add_tokens(5, token_age=7200, created_age=7200)
    rec = Recorder()
    with connect(ledger_db.conninfo(driver, role=role), driver=driver, policy=PRUNE_NOW,
                 ledger="require", on_event=rec) as rc:
        rc.run(Insert("no-delete-1"))
        rc.run(Insert("no-delete-2"))
    assert (ledger_db.items("no-delete-1"), ledger_db.items("no-delete-2")) == (1, 1)
    assert set(old) <= ledger_db.tokens()
    assert ledger_db.ledger_rows() == 7
    assert not rec.of(sf.LedgerPruned)
    assert not rec.of(sf.LedgerNotUsed)


def test_delete_revoked_under_a_live_connection_is_no_error(driver: str,
                                                           ledger_db: Db) -> None:
    """The session was made with DELETE; the prune it then tries fails: one
    LedgerPruned with the error, the unit commits, and the session stops pruning."""
    role = ledger_db.role(*FULL_GRANTS)
    old = ledger_db.add_tokens(5, token_age=7200, created_age=7200)
    rec = Recorder()
    with connect(ledger_db.conninfo(driver, role=role), driver=driver, policy=PRUNE_NOW,
                 on_event=rec) as rc:
        assert rc.session is not None
        ledger_db.query(f'REVOKE DELETE ON symfo_failover.ledger FROM "{role.name}"')
        assert rc.run(Insert("revoked-1")) == "revoked-1"
        rc.run(Insert("revoked-2"))
    [pruned] = rec.of(sf.LedgerPruned)
    assert pruned.deleted == 0
    assert pruned.error is not None
    assert pruned.error.startswith("42501")
    assert (ledger_db.items("revoked-1"), ledger_db.items("revoked-2")) == (1, 1)
    assert set(old) <= ledger_db.tokens()
    assert ledger_db.ledger_rows() == 7


def test_prune_ledger_deletes_old_tokens_by_both_clocks(ledger_db: Db) -> None:
    old = ledger_db.add_tokens(50, token_age=7200, created_age=7200)
    young = ledger_db.add_tokens(5, token_age=0, created_age=0)
    # A client clock that ran behind (an old token, made now), and one that ran ahead
    # (a young token stored long ago): the server's clock and the token range both
    # have to agree before a row goes.
    behind = ledger_db.add_tokens(1, token_age=7200, created_age=0)
    ahead = ledger_db.add_tokens(1, token_age=0, created_age=7200)
    with pytest.raises(ValueError, match="at least 60 seconds"):
        sf.prune_ledger(ledger_db.conninfo(), retention=10)
    assert ledger_db.ledger_rows() == 57
    assert sf.prune_ledger(ledger_db.conninfo(), retention=3600, batch=20) == 50
    assert ledger_db.tokens() == set(young + behind + ahead)
    assert not set(old) & ledger_db.tokens()
    assert sf.prune_ledger(ledger_db.conninfo(), retention=3600) == 0
    assert sf.ledger_status(ledger_db.conninfo(), retention=3600).rows == 7


def test_status_prunable_is_what_a_prune_deletes(ledger_db: Db) -> None:
    ledger_db.add_tokens(2, token_age=7200, created_age=7200)
    ledger_db.add_tokens(1, token_age=0, created_age=7200)  # a client clock ahead
    promised = sf.ledger_status(ledger_db.conninfo(), retention=3600).prunable
    assert sf.prune_ledger(ledger_db.conninfo(), retention=3600) == promised


# --- the pools ----------------------------------------------------------------------------


def test_failover_pool_require_without_the_ledger(db: Db) -> None:
    unit = Insert("pool-refused")
    with sf.FailoverPool(db.conninfo(), ledger="require", min_size=1, open=True,
                         policy=FAST) as pool, pytest.raises(sf.LedgerUnavailable) as raised:
        pool.run(unit)
    assert INSTALL_COMMAND in str(raised.value)
    assert "not installed" in raised.value.reason
    assert unit.runs == 0
    assert db.items("pool-refused") == 0


def test_failover_pool_with_the_ledger(ledger_db: Db) -> None:
    rec = Recorder()
    with sf.FailoverPool(ledger_db.conninfo(), ledger="require", min_size=1, open=True,
                         policy=FAST, on_event=rec) as pool:
        for i in range(3):
            assert pool.run(Insert(f"pool-{i}")) == f"pool-{i}"
            assert ledger_db.ledger_rows() == i + 1

    def read_only(conn: psycopg.Connection[Any]) -> None:
        conn.read_only = True

    with sf.FailoverPool(ledger_db.conninfo(), ledger="require", min_size=1, open=True,
                         policy=FAST, configure=read_only) as pool:
        assert pool.run(read_items) == (3, "on")
    assert ledger_db.ledger_rows() == 3, "a read-only pool connection writes no token"
    assert [ledger_db.items(f"pool-{i}") for i in range(3)] == [1, 1, 1]
    assert not rec.of(sf.LedgerNotUsed)


@ODBC
def test_odbc_pool_require_without_the_ledger(db: Db) -> None:
    unit = Insert("odbc-refused")
    with sf.OdbcFailoverPool(db.conninfo("pyodbc"), ledger="require", min_size=1,
                             policy=FAST) as pool, pytest.raises(sf.LedgerUnavailable) as raised:
        pool.run(unit)
    assert "not installed" in raised.value.reason
    assert INSTALL_COMMAND in str(raised.value)
    assert unit.runs == 0
    assert db.items("odbc-refused") == 0


@ODBC
def test_odbc_pool_with_the_ledger(ledger_db: Db) -> None:
    rec = Recorder()
    with sf.OdbcFailoverPool(ledger_db.conninfo("pyodbc"), ledger="require", min_size=1,
                             policy=FAST, on_event=rec) as pool:
        for i in range(3):
            assert pool.run(Insert(f"odbc-{i}")) == f"odbc-{i}"
            assert ledger_db.ledger_rows() == i + 1
    assert [ledger_db.items(f"odbc-{i}") for i in range(3)] == [1, 1, 1]
    assert not rec.of(sf.LedgerNotUsed)


def test_async_pool_requires_and_uses_the_ledger(db: Db) -> None:
    runs: list[str] = []

    async def insert(conn: psycopg.AsyncConnection[Any], entry: str) -> str:
        runs.append(entry)
        await conn.execute("INSERT INTO items VALUES (%s)", (entry,))
        return entry

    async def main() -> tuple[BaseException | None, list[int]]:
        refused: BaseException | None = None
        async with sf.AsyncFailoverPool(db.conninfo(), ledger="require", min_size=1,
                                        open=False, policy=FAST) as pool:
            try:
                await pool.run(insert, "async-refused")
            except sf.LedgerUnavailable as exc:
                refused = exc
        sf.install_ledger(db.conninfo())
        counts = []
        async with sf.AsyncFailoverPool(db.conninfo(), ledger="require", min_size=1,
                                        open=False, policy=FAST) as pool:
            for i in range(2):
                await pool.run(insert, f"async-{i}")
                counts.append(db.ledger_rows())
        return refused, counts

    refused, counts = asyncio.run(main())
    assert isinstance(refused, sf.LedgerUnavailable)
    assert "not installed" in refused.reason
    assert runs == ["async-0", "async-1"], "the refused unit never ran"
    assert counts == [1, 2]
    assert db.items("async-refused") == 0
    assert (db.items("async-0"), db.items("async-1")) == (1, 1)


# --- a bad mode -----------------------------------------------------------------------------


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A loopback socket that listens and never answers: a connect attempt would be
    seen in its backlog."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        sock.setblocking(False)
        yield sock


def _open(kind: str, port: int) -> Callable[[], object]:
    libpq = f"host=127.0.0.1 port={port} user=postgres dbname=postgres connect_timeout=2"
    odbc = ("Driver={PostgreSQL Unicode};Server=127.0.0.1;"
            f"Port={port};Database=postgres;Uid=postgres;")
    policy = sf.RetryPolicy(deadline=1)
    return {
        "connect-psycopg": lambda: sf.connect(libpq, ledger="bogus", policy=policy),
        "connect-pyodbc": lambda: sf.connect(odbc, driver="pyodbc", ledger="bogus",
                                             policy=policy),
        "connect_async": lambda: asyncio.run(sf.connect_async(libpq, ledger="bogus",
                                                              policy=policy)),
        "FailoverPool": lambda: sf.FailoverPool(libpq, ledger="bogus", open=False),
        "AsyncFailoverPool": lambda: sf.AsyncFailoverPool(libpq, ledger="bogus", open=False),
        "OdbcFailoverPool": lambda: sf.OdbcFailoverPool(odbc, ledger="bogus", min_size=1),
    }[kind]


@pytest.mark.parametrize("kind", [
    "connect-psycopg",
    pytest.param("connect-pyodbc", marks=ODBC),
    "connect_async",
    "FailoverPool",
    "AsyncFailoverPool",
    pytest.param("OdbcFailoverPool", marks=ODBC),
])
def test_a_bogus_ledger_mode_is_refused_before_connecting(
    listener: socket.socket, kind: str
) -> None:
    with pytest.raises(ValueError, match="ledger must be one of 'auto', 'require', 'off'"):
        _open(kind, int(listener.getsockname()[1]))()
    with pytest.raises(BlockingIOError):
        listener.accept()  # nobody tried to connect


def test_status_and_prune_on_the_callers_own_connection_leave_nothing_open(
    ledger_db: Db,
) -> None:
    # A psycopg Connection of the application's (not autocommit): what prune_ledger
    # deletes is committed, and the connection is left idle, as it was given.
    ledger_db.add_tokens(3, token_age=7200, created_age=7200)
    with psycopg.connect(ledger_db.conninfo()) as mine:
        assert sf.ledger_status(mine, retention=3600).prunable == 3
        assert mine.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
        assert sf.prune_ledger(mine, retention=3600) == 3
        assert mine.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert ledger_db.ledger_rows() == 0
