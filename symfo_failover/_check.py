"""``symfo-failover check``: a server's settings and the role's privileges, against the
guide (Symfoware Server cluster operation guide) and the library's correctness model.

`evaluate` holds the rules and does no I/O: it turns `ServerFacts` into findings.
`read_facts` reads those facts over one read-only psycopg session, each query on its
own so that a privilege the role lacks makes that one fact unknown (None), not the
check fail. `run_check` is both, as a `Report`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import psycopg

from . import __version__
from ._driver_psycopg import PsycopgDriver
from ._ledger import ACCESS_SQL, LedgerState
from ._probe import probe
from ._report import Finding, InputError, Report, now_iso
from ._target import CONNECT_TIMEOUT, Endpoint, Target

__all__ = [
    "SETTINGS", "ServerFacts", "describe", "evaluate", "is_fujitsu", "read_facts", "run_check",
]

#: The settings the check reads from ``pg_settings``.
SETTINGS = (
    "restart_after_crash",
    "port",
    "data_directory",
    "keystore_location",
    "synchronous_commit",
    "synchronous_standby_names",
    "fsync",
    "full_page_writes",
    "tcp_keepalives_idle",
    "tcp_keepalives_interval",
    "tcp_keepalives_count",
    "idle_session_timeout",
    "default_transaction_read_only",
)
KEEPALIVES = ("tcp_keepalives_idle", "tcp_keepalives_interval", "tcp_keepalives_count")

#: A dead client noticed within this many seconds (idle + interval * count) is fine.
KEEPALIVE_WITHIN = 300
#: What the server uses where a tcp_keepalives_* setting is 0 and the socket's own value
#: could not be read: Linux's defaults, and what PostgreSQL sets on Windows (which has
#: no way to read the system's value, and a fixed count of 10).
_SYSTEM_KEEPALIVES = {"unix": (7200, 75, 9), "windows": (7200, 1, 10)}

_TRUE = frozenset({"on", "true", "yes", "1"})
_FALSE = frozenset({"off", "false", "no", "0"})
_FUJITSU = re.compile(r"fujitsu|symfoware|enterprise\s*postgres", re.IGNORECASE)
_WINDOWS = re.compile(r"windows|visual c\+\+|msvc|mingw|cygwin", re.IGNORECASE)
_DRIVE = re.compile(r"^[a-z]:/", re.IGNORECASE)


@dataclass(frozen=True)
class ServerFacts:
    """What `read_facts` saw of a server; None wherever it could not see."""

    #: ``pg_settings.setting`` by name (None or missing: not visible to the role, or no
    #: such setting on this server). For ``tcp_keepalives_*`` the *configured* value
    #: (``reset_val``; 0 = the system's default), since over a Unix socket ``setting``
    #: always reads 0 and over TCP it shows the socket's value instead.
    settings: Mapping[str, str | None] = field(default_factory=dict)
    #: ``tcp_keepalives_*`` as this session's socket has them (``setting`` over TCP):
    #: the system's defaults where the configured value is 0. Empty over a Unix socket.
    socket_keepalives: Mapping[str, str | None] = field(default_factory=dict)
    #: ``version()``.
    version: str | None = None
    #: ``server_version_num`` (150018).
    version_num: int | None = None
    #: Fujitsu Enterprise Postgres / Symfoware Server (`is_fujitsu`).
    fujitsu: bool = False
    in_recovery: bool | None = None
    #: Rows of ``pg_stat_replication`` (every role sees how many, not their details).
    wal_senders: int | None = None
    superuser: bool | None = None
    #: EXECUTE on ``pg_xact_status(xid8)`` (resolving a lost COMMIT).
    may_xact_status: bool | None = None
    #: EXECUTE on ``pg_terminate_backend(integer, bigint)`` (fencing an old session).
    may_terminate_backend: bool | None = None
    #: The WAL directory, when the role may look at files (``pg_stat_file``).
    wal_directory: str | None = None
    #: The commit ledger: `_ledger.ACCESS_SQL`'s letters for this role; None: not
    #: installed. ``ledger_read``: whether it could be read at all.
    ledger_access: str | None = None
    ledger_read: bool = False

    def setting(self, name: str) -> str | None:
        return self.settings.get(name)


def is_fujitsu(settings: Mapping[str, str | None], version: str | None) -> bool:
    """A Fujitsu server has a ``keystore_location`` setting, or says so in ``version()``."""
    return "keystore_location" in settings or bool(version and _FUJITSU.search(version))


# --- the rules ---------------------------------------------------------------------------


def evaluate(facts: ServerFacts) -> list[Finding]:
    """The findings for these facts, in a fixed order. No I/O."""
    findings = [
        _restart_after_crash(facts),
        _port(facts),
        _data_directory(facts),
        _wal_directory(facts),
        _keystore_location(facts),
        _synchronous_commit(facts),
        _must_be_on(facts, "fsync",
                    "With fsync off, a crash (and so every failover, which starts the server "
                    "on the data the failed node left) can lose acknowledged commits or "
                    "corrupt the database."),
        _must_be_on(facts, "full_page_writes",
                    "With full_page_writes off, a page half written when the node failed "
                    "cannot be repaired by crash recovery: the database can be corrupt "
                    "after a failover."),
        _tcp_keepalives(facts),
        _idle_session_timeout(facts),
        _xact_status_privilege(facts),
        _terminate_privilege(facts),
        _read_only(facts),
    ]
    findings.append(_commit_ledger(facts))
    for f in findings:
        f.value = f.value or "(empty)"
    return findings


def _not_visible(name: str, why: str, guide: str | None = None) -> Finding:
    return Finding(name, "info", "not visible to this role", why=why, guide=guide)


def _unreadable(name: str, value: str, expected: str, guide: str | None = None) -> Finding:
    return Finding(name, "info", value, expected,
                   f"{value!r} is not a value this check understands.", guide)


def _bool(value: str | None) -> bool | None:
    if value is None:
        return None
    text = value.strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def _restart_after_crash(facts: ServerFacts) -> Finding:
    name, guide = "restart_after_crash", "3.2.3"
    value = facts.setting(name)
    if value is None:
        return _not_visible(name, "pg_settings did not show it.", guide)
    on = _bool(value)
    if on is None:
        return _unreadable(name, value, "off", guide)
    if on:
        return Finding(name, "fail", value, "off",
                       "A crashed server process makes the server restart itself with crash "
                       "recovery, while the cluster manager has seen the failure and fails "
                       "over, stopping that restart half-way. The guide asks for off.", guide)
    return Finding(name, "ok", value, "off",
                   "The cluster manager, not the server, restarts the server after a crash.",
                   guide)


def _port(facts: ServerFacts) -> Finding:
    name, guide = "port", "3.2.3"
    value = facts.setting(name)
    if value is None:
        return _not_visible(name, "pg_settings did not show it.", guide)
    return Finding(name, "info", value, "the same port on every node",
                   "The guide asks that the service of every node uses the port set in "
                   "postgresql.conf; only the node that is active now can be seen from here.",
                   guide)


def _data_directory(facts: ServerFacts) -> Finding:
    name, guide = "data_directory", "3.2.2"
    value = facts.setting(name)
    if value is None:
        return _not_visible(name, "data_directory is shown only to superusers and members "
                                  "of pg_read_all_settings.", guide)
    return Finding(name, "info", value, "on the shared disk",
                   "The data directory, tablespaces, WAL and backups must be on the shared "
                   "disk that only the active node mounts; which disk a path is on cannot "
                   "be told from SQL.", guide)


def _wal_directory(facts: ServerFacts) -> Finding:
    name, guide = "wal_directory", "3.2.2"
    if not facts.wal_directory:
        return _not_visible(name, "Looking at the data directory's files needs EXECUTE on "
                                  "pg_stat_file (superusers have it).", guide)
    return Finding(name, "info", facts.wal_directory,
                   "on a shared disk, preferably another than the data directory's",
                   "The guide puts the WAL on a shared disk and recommends another one than "
                   "the data's, to spread the I/O. Whether pg_wal is a link or a mount to "
                   "another disk, and which disk, cannot be told from SQL.", guide)


def _keystore_location(facts: ServerFacts) -> Finding:
    name, guide = "keystore_location", "3.3"
    expected = "a local directory, at the same path on every node (not the shared disk)"
    if not facts.fujitsu:
        return Finding(name, "info", "not a Fujitsu server",
                       why="keystore_location (transparent data encryption) exists only on "
                           "Fujitsu Enterprise Postgres / Symfoware Server.", guide=guide)
    value = facts.setting(name)
    if value is None:
        return _not_visible(name, "pg_settings did not show it.", guide)
    if not value.strip():
        return Finding(name, "info", "not set", expected,
                       "Transparent data encryption is not set up. If it is used, the "
                       "keystore must be local to every node and auto-open enabled on each.",
                       guide)
    data = facts.setting("data_directory")
    if data is not None and _inside(value, data):
        return Finding(name, "fail", value, expected,
                       "The keystore is inside the data directory, which is on the shared "
                       "disk: the auto-open file (keystore.aks) is readable only on the node "
                       "that made it, so the server fails to start on the other node.", guide)
    return Finding(name, "ok", value, expected,
                   "Set. That it is a local directory on every node, with the same keystore "
                   "file and auto-open enabled on each, cannot be seen from here.", guide)


def _inside(path: str, parent: str) -> bool:
    """Whether ``path`` is ``parent`` or below it (a relative path is: the server runs in
    its data directory). Windows paths compare without case."""
    p, d = (x.strip().replace("\\", "/").rstrip("/") for x in (path, parent))
    if not (p.startswith("/") or _DRIVE.match(p + "/")):
        return True
    if _DRIVE.match(d + "/"):
        p, d = p.lower(), d.lower()
    return p == d or p.startswith(d + "/")


def _synchronous_commit(facts: ServerFacts) -> Finding:
    name = "synchronous_commit"
    value = facts.setting(name)
    if value is None:
        return _not_visible(name, "pg_settings did not show it.")
    text = value.strip().lower()
    mode = "on" if text in _TRUE else "off" if text in _FALSE else text
    expected = "on (or remote_apply)"
    role = " (as this role's sessions have it; ALTER ROLE/DATABASE ... SET can differ)"
    if mode == "off":
        return Finding(name, "fail", value, expected,
                       "COMMIT returns before its WAL is flushed: a crash or failover loses "
                       "commits the application was told succeeded, which exactly once "
                       "cannot survive" + role + ".")
    if mode not in ("local", "remote_write", "on", "remote_apply"):
        return _unreadable(name, value, expected)
    names = facts.setting("synchronous_standby_names")
    sync = bool(names and names.strip())
    replicas = sync or bool(facts.wal_senders) or bool(facts.in_recovery)
    if mode == "local" and replicas:
        return Finding(name, "fail", value, expected,
                       "COMMIT waits for the local disk only: a promoted standby lacks "
                       "commits the application was told succeeded" + role + ".")
    if mode == "remote_write" and sync:
        return Finding(name, "warn", value, expected,
                       "The synchronous standby has the commit in its OS cache, not on its "
                       "disk, when COMMIT returns: a crash of the standby's machine with the "
                       "primary's loses it" + role + ".")
    if replicas and not sync:
        return Finding(name, "warn", value, expected + ", with synchronous_standby_names set",
                       "The server streams to standbys but synchronous_standby_names is "
                       "empty: COMMIT waits for none of them, so a failover to a standby "
                       "loses acknowledged commits. Name the standby there, or fail over "
                       "only on the shared disk.")
    return Finding(name, "ok", value, expected,
                   "COMMIT returns once its WAL is durable" + (
                       " on the synchronous standby too." if sync else
                       "; no standby streams from this server."))


def _must_be_on(facts: ServerFacts, name: str, why_off: str) -> Finding:
    value = facts.setting(name)
    if value is None:
        return _not_visible(name, "pg_settings did not show it.")
    on = _bool(value)
    if on is None:
        return _unreadable(name, value, "on")
    if not on:
        return Finding(name, "fail", value, "on", why_off)
    return Finding(name, "ok", value, "on", "Crash recovery, and so failover, keeps every "
                                            "acknowledged commit.")


def _tcp_keepalives(facts: ServerFacts) -> Finding:
    name = "tcp_keepalives"
    expected = f"idle, interval and count set: a dead client noticed within {KEEPALIVE_WITHIN} s"
    raw = [facts.setting(n) for n in KEEPALIVES]
    if any(v is None for v in raw):
        return _not_visible(name, "pg_settings did not show tcp_keepalives_*.")
    configured = [_int(v) for v in raw]
    shown = " ".join(f"{n.rsplit('_', 1)[1]}={v}" for n, v in zip(KEEPALIVES, raw, strict=True))
    if any(v is None or v < 0 for v in configured):
        return _unreadable(name, shown, expected)
    windows = bool(facts.version and _WINDOWS.search(facts.version))
    system = _SYSTEM_KEEPALIVES["windows" if windows else "unix"]
    effective = []
    defaulted = []
    for n, conf, fallback in zip(KEEPALIVES, configured, system, strict=True):
        assert conf is not None
        if conf > 0:
            effective.append(conf)
            continue
        sock = _int(facts.socket_keepalives.get(n))
        effective.append(sock if sock is not None and sock > 0 else fallback)
        # Windows has a fixed count and PostgreSQL makes an interval of 0 one second.
        if not (windows and n != "tcp_keepalives_idle"):
            defaulted.append(n)
    idle, interval, count = effective
    total = idle + interval * count
    value = f"{shown} (a dead client noticed after about {_duration(total)})"
    if defaulted:
        return Finding(name, "warn", value, expected,
                       f"{', '.join(defaulted)} {'is' if len(defaulted) == 1 else 'are'} 0, "
                       "the system's default: a client whose node died or was cut off keeps "
                       "its session, open transaction and "
                       f"locks for about {_duration(total)}. Set them in postgresql.conf, "
                       "e.g. tcp_keepalives_idle = 60, tcp_keepalives_interval = 10, "
                       "tcp_keepalives_count = 6.")
    if total > KEEPALIVE_WITHIN:
        return Finding(name, "warn", value, expected,
                       "A client whose node died or was cut off keeps its session and locks "
                       f"for about {_duration(total)}; shorten idle, interval or count.")
    return Finding(name, "ok", value, expected,
                   "A session whose client vanished is ended, and its locks freed, within "
                   f"about {_duration(total)}.")


def _duration(seconds: int) -> str:
    if seconds < 120:
        return f"{seconds} s"
    minutes = round(seconds / 60)
    if minutes < 120:
        return f"{minutes} min"
    return f"{minutes // 60} h {minutes % 60} min"


def _idle_session_timeout(facts: ServerFacts) -> Finding:
    name = "idle_session_timeout"
    value = facts.setting(name)
    if value is None:
        if facts.version_num is not None and facts.version_num < 140000:
            return Finding(name, "info", "not a setting of this server (PostgreSQL 13 or "
                                         "older)")
        return _not_visible(name, "pg_settings did not show it.")
    ms = _int(value)
    if ms is None or ms < 0:
        return _unreadable(name, value, "0")
    if ms == 0:
        return Finding(name, "ok", "0", "0", "Idle sessions are left open.")
    return Finding(name, "warn", f"{ms} ms", "0",
                   f"The server closes a session idle for {_duration(math.ceil(ms / 1000))} "
                   "(57P05, FATAL): pooled connections waiting for work are closed under the "
                   "pool, which must replace them. The library copes, but each costs a "
                   "reconnect; set it to 0 for the application's role, or above the pool's "
                   "max_idle.")


def _xact_status_privilege(facts: ServerFacts) -> Finding:
    name, expected = "pg_xact_status", "EXECUTE on pg_xact_status(xid8)"
    may = facts.may_xact_status
    if may is None:
        return Finding(name, "info", "not found", expected,
                       "pg_xact_status(xid8) is there from PostgreSQL 13; whether this role "
                       "may run it could not be read.")
    if not may:
        if facts.ledger_read and LedgerState.from_access(facts.ledger_access).usable:
            return Finding(name, "info", "no EXECUTE", expected,
                           "The commit ledger decides lost COMMITs for this role; "
                           "pg_xact_status would be the fallback where a server has no "
                           "ledger.")
        return Finding(name, "fail", "no EXECUTE", expected,
                       "A COMMIT whose reply was lost cannot be resolved: the library raises "
                       "CommitOutcomeUnknown instead of knowing whether it committed. "
                       "GRANT EXECUTE ON FUNCTION pg_xact_status(xid8) TO the role, or "
                       "install the commit ledger (symfo-failover ledger install).")
    return Finding(name, "ok", "superuser" if facts.superuser else "EXECUTE", expected,
                   "The outcome of a COMMIT whose reply was lost can be asked.")


def _terminate_privilege(facts: ServerFacts) -> Finding:
    name, expected = "pg_terminate_backend", "EXECUTE on pg_terminate_backend(integer, bigint)"
    may = facts.may_terminate_backend
    if facts.superuser:
        return Finding(name, "ok", "superuser", expected,
                       "An old session still holding a COMMIT can be ended.")
    if may is None:
        return Finding(name, "info", "not found", expected,
                       "Whether this role may run pg_terminate_backend could not be read.")
    if not may:
        return Finding(name, "warn", "no EXECUTE", expected,
                       "An old session of this role that still holds a COMMIT (a network "
                       "break, not a server failure) cannot be ended: the outcome stays "
                       "unknown (CommitOutcomeUnknown) until the server notices it is dead. "
                       "GRANT EXECUTE ON FUNCTION pg_terminate_backend(integer, bigint) TO "
                       "the role.")
    return Finding(name, "ok", "EXECUTE", expected,
                   "An old session of this role still holding a COMMIT can be ended (a role "
                   "may end its own sessions).")


def _commit_ledger(facts: ServerFacts) -> Finding:
    name, expected = "commit_ledger", "installed, and this role may use it"
    guide = None  # not in the vendor's guide: see docs/exactly-once.md
    if not facts.ledger_read:
        return _not_visible(name, "The catalog could not be read.", guide)
    access = facts.ledger_access
    state = LedgerState.from_access(access)
    if access is None:
        return Finding(name, "warn", "not installed", expected,
                       "A transaction id is no proof after a crash or a promotion: the "
                       "server hands ids out again, so a COMMIT lost then can end in "
                       "CommitOutcomeUnknown. Install the commit ledger: symfo-failover "
                       "ledger install CONNINFO (docs/exactly-once.md).", guide)
    if not state.usable:
        return Finding(name, "warn", f"installed; this role may not use it ({access or 'no'} "
                       "privileges)", expected,
                       f"{state.why_not()}. Grant it: symfo-failover ledger install CONNINFO "
                       "--grant ROLE (as the owner).", guide)
    if not state.can_prune:
        return Finding(name, "warn", "installed; usable, but this role may not prune it",
                       expected, "Without DELETE (and SELECT) the role's sessions cannot "
                       "delete old tokens: run symfo-failover ledger prune from a role that "
                       "may, or grant them.", guide)
    return Finding(name, "ok", "installed; usable and pruned by this role", expected,
                   "Every lost COMMIT's outcome is provable, also after a crash or a "
                   "promotion (with synchronous replication).", guide)


def _read_only(facts: ServerFacts) -> Finding:
    name = "read_only"
    why = "The probe's canary writes need a writable server; so does the application."
    if facts.in_recovery:
        return Finding(name, "info", "read-only server: a standby (in recovery)",
                       "a writable primary", why)
    dtro = _bool(facts.setting("default_transaction_read_only"))
    if dtro:
        return Finding(name, "info", "read-only server: default_transaction_read_only = on",
                       "a writable primary", why)
    if facts.in_recovery is None or dtro is None:
        return Finding(name, "info", "not visible to this role", "a writable primary", why)
    return Finding(name, "ok", "read-write", "a writable primary", why)


# --- reading the facts -------------------------------------------------------------------

_PRIVILEGE = "SELECT has_function_privilege(%s, 'EXECUTE')"


def read_facts(conninfo: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> ServerFacts:
    """Read what `evaluate` needs, over one autocommit session that writes nothing.

    Raises `InputError` for a connection string that does not parse, a server that
    cannot be reached, a refused login or a missing database; the message names the
    host and port, never the password.
    """
    return _read(_parse(conninfo), connect_timeout)


def run_check(conninfo: str, *, connect_timeout: float = CONNECT_TIMEOUT) -> Report:
    """``symfo-failover check``: read the facts, evaluate them, as a `Report`."""
    started = now_iso()
    target = _parse(conninfo)
    facts = _read(target, connect_timeout)
    notes = []
    if facts.version:
        notes.append(f"server: {facts.version}")
    if facts.superuser:
        notes.append("checked as a superuser: the application's role may lack privileges "
                     "a superuser has; check as that role too")
    return Report(command="check", target=describe(target), started_at=started,
                  finished_at=now_iso(), findings=evaluate(facts), notes=notes,
                  tool_version=__version__)


def describe(target: Target) -> str:
    """``user@host:port/dbname`` (several ``host:port`` comma-separated); no password."""
    where = ",".join(f"{e.host}:{e.port}" for e in target.endpoints) or "(local socket)"
    return f"{target.user}@{where}/{target.database}"


def _parse(conninfo: str) -> Target:
    try:
        return PsycopgDriver().target(conninfo, {})
    except psycopg.ProgrammingError as exc:
        message = _redact(str(exc).strip(), conninfo)
        raise InputError(f"the connection string does not parse: {message}") from None


_PASSWORD_VALUE = re.compile(
    r"password\s*=\s*('(?:[^'\\]|\\.)*'?|\S+)"  # keyword=value
    r"|://[^:/@\s]*:([^@\s]*)@"  # a URI's user:password@
    r"|[?&]password=([^&\s]*)",  # a URI's parameter
    re.IGNORECASE,
)


def _redact(message: str, conninfo: str, password: str | None = None) -> str:
    """``message`` with every password value of ``conninfo`` (and ``password``) cut out."""
    secrets = {password} if password else set()
    for match in _PASSWORD_VALUE.finditer(conninfo):
        for group in match.groups():
            if group:
                secrets.add(group)
                secrets.add(group.strip("'"))
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            message = message.replace(secret, "***")
    return message


def _read(target: Target, connect_timeout: float) -> ServerFacts:
    timeout = max(1, math.ceil(connect_timeout))
    try:
        conn = psycopg.connect(**target.connect_args, autocommit=True,
                               connect_timeout=str(timeout))
    except psycopg.Error as exc:
        raise InputError(_why_no_connection(target, exc, timeout)) from None
    try:
        with conn:
            return _facts_of(conn)
    except psycopg.OperationalError:
        raise InputError(f"lost the connection to {describe(target)} while reading its "
                         "settings; is it failing over? Run the check again.") from None


def _why_no_connection(target: Target, exc: psycopg.Error, timeout: int,
                       what: str = "check") -> str:
    """Why the connect failed, in words, from the server's SQLSTATE (the probe asks it
    again: psycopg gives none on a failed connect, and its text is in the server's
    language). Only where no endpoint's answer says it, psycopg's own message."""
    reasons = [r for r in (_why_not(target, e, timeout) for e in target.endpoints) if r]
    if not reasons:
        text = " ".join(str(exc).split())  # libpq's message is several lines
        reasons = [_redact(text, str(target.connect_args.get("conninfo", "")), target.password)]
    return f"cannot {what} {describe(target)}: {'; '.join(reasons)}"


def _why_not(target: Target, endpoint: Endpoint, timeout: int) -> str | None:
    where = f"{endpoint.host}:{endpoint.port}"
    got = probe(endpoint.host, endpoint.port, user=target.user, database=target.database,
                timeout=timeout, password=target.password, sslmode=target.sslmode)
    user, database = target.user, target.database
    if got.state == "refused":
        return (f"nothing listens at {where} (connection refused): is the server running, "
                "and are the host and port right?")
    if got.state in ("timeout", "unreachable"):
        return f"no answer from {where} within {timeout} s"
    reason = {
        "28P01": f"refused the password for user {user!r} (28P01: a wrong password, or no "
                 "such role)",
        "3D000": f"has no database {database!r} (3D000)",
        "28000": f"does not let user {user!r} log in to {database!r} (28000: pg_hba.conf, "
                 "or the role has no LOGIN)",
        "57P03": "is starting up or shutting down (57P03)",
        "53300": "has too many clients (53300)",
    }.get(got.sqlstate or "", f"refused the session (SQLSTATE {got.sqlstate})")
    return f"the server at {where} {reason}" if got.sqlstate else None


def _facts_of(conn: psycopg.Connection[Any]) -> ServerFacts:
    settings: dict[str, str | None] = {}
    socket_keepalives: dict[str, str | None] = {}
    rows = _rows(conn, "SELECT name, setting, reset_val FROM pg_settings WHERE name = ANY(%s)",
                 list(SETTINGS))
    for name, setting, reset_val in rows or []:
        if name in KEEPALIVES:
            settings[name] = reset_val
            socket_keepalives[name] = setting
        else:
            settings[name] = setting
    # Belt and braces: nothing below writes, and nothing may wait long. After the settings
    # were read, since this sets default_transaction_read_only.
    _rows(conn, "SET SESSION CHARACTERISTICS AS TRANSACTION READ ONLY")
    _rows(conn, "SET statement_timeout = '10s'")
    row = _one(conn, "SELECT version(), current_setting('server_version_num')::int, "
                     "pg_is_in_recovery(), current_setting('is_superuser'), "
                     "inet_server_addr() IS NOT NULL")
    version, version_num, in_recovery, superuser, over_tcp = row or (None,) * 5
    if not over_tcp:
        socket_keepalives = {}  # over a Unix socket they read 0: nothing to learn
    senders = _one(conn, "SELECT count(*) FROM pg_stat_replication")
    xact = _one(conn, _PRIVILEGE, "pg_xact_status(xid8)")
    terminate = (_one(conn, _PRIVILEGE, "pg_terminate_backend(integer, bigint)")
                 or _one(conn, _PRIVILEGE, "pg_terminate_backend(integer)"))
    wal = _one(conn, "SELECT (pg_stat_file('pg_wal')).isdir")
    ledger = _one(conn, f"SELECT {ACCESS_SQL}")
    data = settings.get("data_directory")
    wal_directory = None
    if wal is not None and wal[0]:
        wal_directory = f"{data.rstrip('/')}/pg_wal" if data else "pg_wal, in the data directory"
    return ServerFacts(
        settings=settings,
        socket_keepalives=socket_keepalives,
        version=None if version is None else str(version),
        version_num=None if version_num is None else int(str(version_num)),
        fujitsu=is_fujitsu(settings, None if version is None else str(version)),
        in_recovery=None if in_recovery is None else bool(in_recovery),
        wal_senders=None if senders is None else int(str(senders[0])),
        superuser=_bool(None if superuser is None else str(superuser)),
        may_xact_status=None if xact is None else bool(xact[0]),
        may_terminate_backend=None if terminate is None else bool(terminate[0]),
        ledger_access=None if ledger is None or ledger[0] is None else str(ledger[0]),
        ledger_read=ledger is not None,
        wal_directory=wal_directory,
    )


def _rows(conn: psycopg.Connection[Any], sql: str,
          *params: object) -> list[tuple[Any, ...]] | None:
    """The rows of one statement; None where the server refused it (a privilege the role
    lacks, a function this version does not have). A lost connection propagates."""
    try:
        cur = conn.execute(sql, params or None)
        return cur.fetchall() if cur.description is not None else []
    except psycopg.OperationalError:
        if conn.closed:
            raise
        return None  # the server's own refusals that psycopg files as operational
    except psycopg.Error:
        return None


def _one(conn: psycopg.Connection[Any], sql: str, *params: object) -> tuple[Any, ...] | None:
    rows = _rows(conn, sql, *params)
    return rows[0] if rows else None
