"""The commit ledger: what makes a lost COMMIT's outcome provable. SQL text and pure rules.

A transaction id is no proof that a COMMIT went through: ids that never reached the
write-ahead log before a crash are handed out again by the server that recovers, and a
promoted standby hands out ids of its own (measured: ``docs/exactly-once.md``). A row
written *inside the unit's own transaction*, keyed by a token the client made, is.

- Each read-write unit inserts a fresh token into ``symfo_failover.ledger`` in the
  message that already carries its BEGIN: no round trip of its own.
- After a lost COMMIT, and after the old session was fenced, inserting the same token
  again is an atomic check-and-claim (`claim_answer`): a unique violation means the unit
  committed; a lock timeout means the old session still holds the row; success means
  it did not commit and never will (the claim is rolled back and the unit runs again
  with the same token).
- Old tokens are deleted in batches, at most about once a minute per session, by the
  server's clock only (`PRUNE_SQL`).

Nothing here does I/O: the adapters send the statements, the core (`_core`) decides.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from typing import Literal

SCHEMA = "symfo_failover"
TABLE = f"{SCHEMA}.ledger"

#: ``connect(..., ledger=...)``: use it when it is there / insist on it / never.
LedgerMode = Literal["auto", "require", "off"]
MODES: tuple[str, ...] = ("auto", "require", "off")

#: Shown wherever the ledger is missing.
INSTALL_HINT = "symfo-failover ledger install CONNINFO (or symfo_failover.install_ledger())"

#: The shortest retention, and its floor relative to the policy's deadline.
DEFAULT_RETENTION = 3600.0
RETENTION_FACTOR = 10
#: A session prunes at most this often; sooner while each prune finds a full batch.
PRUNE_EVERY = 60.0
PRUNE_AGAIN = 1.0
PRUNE_BATCH = 5000
#: How long a claim waits for a row another session holds (the old one, unfenced).
CLAIM_LOCK_TIMEOUT_MS = 1000

#: SQLSTATEs that mean "no ledger here for this role": undefined table, insufficient
#: privilege, invalid schema name.
MISSING = frozenset({"42P01", "42501", "3F000"})
UNIQUE_VIOLATION = "23505"
LOCK_NOT_AVAILABLE = "55P03"


def check_mode(value: object) -> LedgerMode:
    """``value`` if it is a ledger mode; a clear ValueError otherwise."""
    if value not in MODES:
        raise ValueError(f"ledger must be one of {', '.join(map(repr, MODES))}, not {value!r}")
    return value  # type: ignore[return-value]


def new_token(now: float | None = None, entropy: bytes | None = None) -> str:
    """A fresh token: 32 hex digits in the UUIDv7 layout (RFC 9562).

    48 bits of Unix time in milliseconds, the version nibble 7, the variant bits, and
    74 bits from ``os.urandom`` (fork-safe; never the ``random`` module). Time-ordered
    keys keep the primary key's inserts on its rightmost leaf: random keys write a full
    page image of a random leaf after every checkpoint (18 times the WAL, measured).
    """
    ms = int((time.time() if now is None else now) * 1000) & 0xFFFF_FFFF_FFFF
    rand = int.from_bytes(entropy if entropy is not None else os.urandom(10), "big")
    rand_a = (rand >> 62) & 0xFFF  # 12 bits
    rand_b = rand & 0x3FFF_FFFF_FFFF_FFFF  # 62 bits
    value = (ms << 80) | (0x7 << 76) | (rand_a << 64) | (0b10 << 62) | rand_b
    return f"{value:032x}"


def token_time(token: str) -> float:
    """The Unix time (seconds) a token was made at, from its first 48 bits."""
    return int(token[:12], 16) / 1000


_TOKEN = re.compile(r"[0-9a-f]{32}")


def check_token(token: str) -> str:
    """``token`` if it is 32 lower-case hex digits (what `new_token` makes): the only
    thing ever put into the SQL as a literal."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not a ledger token: {token!r}")
    return token


def insert_sql(token: str) -> str:
    """The literal insert of ``token`` (the claim's; a BEGIN uses `ledger_sql`)."""
    return f"INSERT INTO {TABLE} (token) VALUES ('{check_token(token)}')"


#: The session's prepared insert (parsed and planned once per session: a new literal
#: INSERT each unit costs about 5 % of a unit, measured).
PREPARED = "symfo_failover_ledger_insert"
#: How a BEGIN message inserts the token: a literal INSERT, the prepared statement
#: (``execute``), or preparing it first in the same message (``prepare``).
How = Literal["literal", "prepare", "execute"]
#: SQLSTATEs of the prepared statement: gone (``DISCARD ALL``, ``DEALLOCATE``), or there
#: already (a BEGIN message that prepared it failed later).
STATEMENT_GONE = "26000"
STATEMENT_THERE = "42P05"
#: A BEGIN message with the token that failed with one of these is begun again, once.
BEGIN_AGAIN = MISSING | {STATEMENT_GONE, STATEMENT_THERE}


def ledger_sql(token: str, how: How) -> str:
    """The statement(s) that insert ``token`` inside the unit's transaction."""
    if how == "literal":
        return insert_sql(token)
    execute = f"EXECUTE {PREPARED}('{check_token(token)}')"
    if how == "execute":
        return execute
    return f"PREPARE {PREPARED}(uuid) AS INSERT INTO {TABLE} (token) VALUES ($1); {execute}"


def claim_sql(token: str, lock_timeout_ms: int = CLAIM_LOCK_TIMEOUT_MS) -> str:
    """The claim of `claim_answer`, in its own transaction (rolled back after)."""
    return (f"BEGIN; SET LOCAL lock_timeout = {int(lock_timeout_ms)}; "
            + insert_sql(token))


#: What a claim's reply means.
ClaimAnswer = Literal["free", "committed", "held", "missing"]


def claim_answer(sqlstate: str | None) -> ClaimAnswer | None:
    """A claim's reply: success (None) is ``free``; 23505 ``committed``; 55P03 ``held``
    (the old transaction still holds the row); no table or privilege ``missing``.
    Anything else is no answer (None)."""
    if sqlstate is None:
        return "free"
    if sqlstate == UNIQUE_VIOLATION:
        return "committed"
    if sqlstate == LOCK_NOT_AVAILABLE:
        return "held"
    if sqlstate in MISSING:
        return "missing"
    return None


def retention_for(deadline: float) -> float:
    """How long tokens are kept: at least an hour, and at least ten times the retry
    deadline (a unit still being resolved must find its token)."""
    return max(DEFAULT_RETENTION, RETENTION_FACTOR * deadline)


def prune_sql(retention: float, batch: int = PRUNE_BATCH) -> str:
    """Delete up to ``batch`` tokens older than ``retention`` seconds; one row back,
    the count. The token range makes it cheap (the primary key); the ``created``
    filter makes it safe against client clocks that run behind (only the server's clock
    decides). Formatted, not bound: both values are numbers the library checked."""
    if int(batch) < 1:
        raise ValueError("retention and batch must be positive")
    return (
        f"WITH gone AS (DELETE FROM {TABLE} WHERE ctid = ANY(ARRAY("
        f"SELECT ctid FROM {TABLE} WHERE {prune_condition(retention)} "
        f"LIMIT {int(batch)})) RETURNING 1) SELECT count(*) FROM gone"
    )


def prune_condition(retention: float) -> str:
    """Which tokens a prune deletes: made before the cutoff by their own time (the
    primary key's range) *and* inserted before it by the server's clock."""
    seconds = int(retention)
    if seconds < 1:
        raise ValueError("retention and batch must be positive")
    cutoff = f"now() - interval '{seconds} seconds'"
    return (f"token < (lpad(to_hex((extract(epoch FROM {cutoff}) * 1000)::bigint), 12, '0') "
            f"|| '00000000000000000000')::uuid AND created < {cutoff}")


#: The ledger's privileges for the session's role, read with the session's facts in the
#: same round trip (`_target.SESSION_INFO_SQL`): NULL when the table is not there, else
#: letters: U (schema usage), I (insert), S (select), D (delete). Catalog reads only, so
#: it never fails for a role without privileges.
ACCESS_SQL = (
    "(SELECT concat(CASE WHEN has_schema_privilege(n.oid, 'USAGE') THEN 'U' END, "
    "CASE WHEN has_table_privilege(c.oid, 'INSERT') THEN 'I' END, "
    "CASE WHEN has_table_privilege(c.oid, 'SELECT') THEN 'S' END, "
    "CASE WHEN has_table_privilege(c.oid, 'DELETE') THEN 'D' END) "
    "FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
    f"WHERE n.nspname = '{SCHEMA}' AND c.relname = 'ledger')"
)


@dataclass(slots=True)
class LedgerState:
    """What one session knows of the ledger; mutable, kept with its `SessionInfo`."""

    #: `ACCESS_SQL`'s answer: None when the table is not installed.
    access: str | None
    #: Cleared when a BEGIN found the table gone or the privilege revoked.
    usable: bool = False
    can_prune: bool = False
    #: When this session prunes next (the policy's clock); None: at its first chance.
    next_prune: float | None = None
    #: The session has the prepared insert (`PREPARED`).
    prepared: bool = False
    #: `LedgerNotUsed` was emitted for this session.
    noted: bool = False

    @classmethod
    def from_access(cls, access: str | None) -> LedgerState:
        letters = access or ""
        usable = access is not None and "U" in letters and "I" in letters
        return cls(access, usable=usable,
                   can_prune=usable and "D" in letters and "S" in letters)

    def why_not(self) -> str:
        """Why the session cannot use the ledger (for messages)."""
        if self.access is None:
            return f"the commit ledger ({TABLE}) is not installed"
        missing = [what for letter, what in (("U", "USAGE on schema " + SCHEMA),
                                             ("I", "INSERT on " + TABLE))
                   if letter not in self.access]
        if missing:
            return "the role may not use the commit ledger (it lacks " + " and ".join(
                missing) + ")"
        return "the commit ledger was found missing or revoked by a BEGIN"


def install_statements() -> list[str]:
    """The idempotent install: a schema, a logged table, no other index."""
    return [
        f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}",
        f"CREATE TABLE IF NOT EXISTS {TABLE} ("
        "token uuid PRIMARY KEY, "
        "created timestamptz NOT NULL DEFAULT now())",
        f"COMMENT ON TABLE {TABLE} IS 'symfo_failover commit ledger: one row per "
        "committed read-write unit of work, pruned after the retention'",
    ]


def grant_statements(role: str, *, prune: bool = True) -> list[str]:
    """What an application role needs (DELETE only if its sessions prune)."""
    who = quote_ident(role)
    privileges = "SELECT, INSERT, DELETE" if prune else "SELECT, INSERT"
    return [f"GRANT USAGE ON SCHEMA {SCHEMA} TO {who}",
            f"GRANT {privileges} ON {TABLE} TO {who}"]


def quote_ident(name: str) -> str:
    """A role name as an SQL identifier (always quoted, quotes doubled)."""
    if not name or "\x00" in name:
        raise ValueError(f"not a role name: {name!r}")
    return '"' + name.replace('"', '""') + '"'
