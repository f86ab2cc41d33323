"""The classification table: the one place that says what each SQLSTATE means.

Lookup goes from the exact five-character code to its two-character class to
`DEFAULT`. The situations without any SQLSTATE (a driver that reports NULL or an
empty string) are rows of `NO_SQLSTATE`. `docs/classification.md` is generated
from these tuples (``python tools/gen_classification_doc.py``) and a test keeps
it in step.

Sources:
- "guide": Fujitsu Symfoware Server V12.6 cluster operation guide, section
  3.4.1, the tables of what each client driver reports during a failover.
- "measured": what psycopg 3 and pyodbc + psqlODBC reported on PostgreSQL 15
  (DESIGN.md section 1 and `symfo-failover conformance`).
- "errcodes": PostgreSQL's error codes (Appendix A of its manual).
- "ODBC": the ODBC 3 specification's SQLSTATEs.
"""

from __future__ import annotations

from dataclasses import dataclass

from ._kind import Kind


@dataclass(frozen=True)
class Rule:
    """One row: a code (or class) and what it means."""

    code: str
    condition: str
    kind: Kind
    reconnect: bool
    source: str
    why: str

    @property
    def retryable(self) -> bool:
        return self.kind.retryable


def _row(
    code: str,
    condition: str,
    kind: Kind,
    source: str,
    why: str,
    *,
    reconnect: bool | None = None,
) -> Rule:
    return Rule(
        code=code,
        condition=condition,
        kind=kind,
        reconnect=kind.needs_new_session if reconnect is None else reconnect,
        source=source,
        why=why,
    )


LOST = Kind.CONNECTION_LOST
CONNECT = Kind.CONNECT_FAILED
STATE = Kind.SESSION_STATE_LOST
CONFLICT = Kind.TRANSACTION_CONFLICT
NO = Kind.NOT_RETRYABLE

_GUIDE_ALL = "guide: JDBC, ODBC, .NET, libpq, embedded SQL; measured: psycopg, pyodbc"

#: Exact five-character codes.
EXACT: tuple[Rule, ...] = (
    # --- what the guide's drivers report while a call is in progress
    _row("57P01", "admin_shutdown", LOST, _GUIDE_ALL,
         "The server was shut down (switchover, or an administrator ended the session). "
         "The server rolled back the transaction; reconnect and run it again."),
    _row("57P02", "crash_shutdown", LOST, "guide: embedded SQL; measured: pyodbc",
         "Another server process crashed and the server reset every session. "
         "The transaction was rolled back."),
    _row("08006", "connection_failure", LOST, "guide: JDBC",
         "The connection broke during a call."),
    _row("08S01", "communication_link_failure", LOST, "guide: ODBC; measured: pyodbc",
         "ODBC's code for a broken connection (node down, killed session, "
         "any later call on a dead session)."),
    _row("YE000", "ecpg_internal_error", LOST, "guide: embedded SQL",
         "Embedded SQL's report of a connection that went away during a call."),
    _row("08003", "connection_does_not_exist", LOST, "errcodes",
         "The session is already closed; a new one is needed."),
    _row("08000", "connection_exception", LOST, "errcodes",
         "Generic connection exception: the session cannot be trusted."),
    _row("08007", "transaction_resolution_unknown", LOST, "errcodes",
         "The connection broke while a transaction was ending. Retried only with the "
         "commit outcome resolved first (the resilient connection does that)."),
    _row("57P05", "idle_session_timeout", LOST, "errcodes (PostgreSQL 14+)",
         "The server closed a session that was idle; nothing was in flight."),
    _row("25P03", "idle_in_transaction_session_timeout", LOST, "errcodes",
         "The server ended a session left idle inside a transaction and rolled it back."),
    _row("25006", "read_only_sql_transaction", LOST, "errcodes",
         "Seen after a role change in replication-based clusters: the session still points "
         "at a node that became read-only. A new session through the access point reaches "
         "the new primary. (Work that itself declares READ ONLY and writes fails again and "
         "stops at the policy's attempts.)"),
    # --- the guide: a call made while the server is down or switching
    _row("08001", "sqlclient_unable_to_establish_sqlconnection", CONNECT,
         "guide: JDBC, ODBC, embedded SQL; measured: pyodbc",
         "No session could be made: the server is down or the access point is moving."),
    _row("08004", "sqlserver_rejected_establishment_of_sqlconnection", CONNECT, "errcodes",
         "The server refused the new session for now."),
    _row("57P03", "cannot_connect_now", CONNECT, "errcodes",
         "The new server is still starting up (crash recovery after a failover) "
         "or shutting down."),
    _row("53300", "too_many_connections", CONNECT, "errcodes",
         "Every client reconnects at once after a failover; the limit clears as old "
         "sessions are reaped. Retried with backoff."),
    _row("HYT01", "connection_timeout_expired", CONNECT, "ODBC",
         "The driver gave up connecting in time."),
    # --- embedded SQL rows that are not about the connection
    _row("26000", "invalid_sql_statement_name", STATE, "guide: embedded SQL",
         "A prepared statement is unknown: it lived on the old session. "
         "Prepare it again on the new session."),
    _row("40001", "serialization_failure", CONFLICT, "guide: embedded SQL; errcodes",
         "The transaction was rolled back because of a concurrent update; run it again "
         "on the same session."),
    _row("40P01", "deadlock_detected", CONFLICT, "errcodes",
         "The server broke a deadlock by rolling this transaction back; run it again."),
    # --- codes that end the session but where running the work again would not help
    _row("08P01", "protocol_violation", NO, "errcodes",
         "Client and server disagree on the protocol: a bug or a broken proxy, not a "
         "failover. The session is unusable.", reconnect=True),
    _row("57P04", "database_dropped", NO, "errcodes",
         "The database itself is gone.", reconnect=True),
    _row("57014", "query_canceled", NO, "errcodes",
         "A statement timeout or a cancel request. Running the same statement again "
         "would wait as long again."),
    _row("57000", "operator_intervention", NO, "errcodes",
         "Unspecified operator intervention: not known to be a failover."),
    # --- authentication and connection targets: a clear error at once, no retry loop
    _row("28000", "invalid_authorization_specification", NO, "errcodes",
         "Authentication or authorization failed (pg_hba, unknown role). Retrying "
         "cannot fix it.", reconnect=True),
    _row("28P01", "invalid_password", NO, "errcodes",
         "Wrong password. Retrying cannot fix it and may lock the account.", reconnect=True),
    _row("3D000", "invalid_catalog_name", NO, "errcodes",
         "The database does not exist.", reconnect=True),
    _row("IM002", "data_source_not_found", NO, "ODBC",
         "The ODBC data source or driver named in the connection string does not exist."),
    _row("HY000", "general_error", NO, "ODBC",
         "ODBC's catch-all; not known to be a failover."),
    # --- the rest of classes 40, 53
    _row("40000", "transaction_rollback", NO, "errcodes",
         "A rollback without a stated cause: not known to be safe to repeat."),
    _row("40002", "transaction_integrity_constraint_violation", NO, "errcodes",
         "A deferred constraint failed at commit: the data is wrong, not the server."),
    _row("40003", "statement_completion_unknown", NO, "errcodes",
         "The outcome is unknown; never guessed."),
    _row("53100", "disk_full", NO, "errcodes",
         "The server's disk is full. Repeating the work adds load and cannot succeed "
         "until an operator acts."),
    _row("53200", "out_of_memory", NO, "errcodes",
         "The server is out of memory; retrying adds load."),
    _row("53400", "configuration_limit_exceeded", NO, "errcodes",
         "A configured limit was hit by this work; it would hit it again."),
)

#: Two-character classes, used when the exact code has no row.
CLASSES: tuple[Rule, ...] = (
    _row("08", "connection_exception", LOST, "errcodes",
         "Every code of class 08 is about the connection itself; an unknown one is "
         "treated as a lost session."),
    _row("57", "operator_intervention", NO, "errcodes",
         "Codes of class 57 without a row above are not known to be failovers."),
    _row("53", "insufficient_resources", NO, "errcodes",
         "Resource exhaustion other than the connection limit: retrying adds load."),
    _row("58", "system_error", NO, "errcodes",
         "Errors of the server's operating system or files (58000, 58030 io_error, "
         "58P01, 58P02). When a shared disk really fails, the server crashes and the "
         "sessions see 57P02, which is retried; the 58 error itself is not."),
    _row("40", "transaction_rollback", NO, "errcodes",
         "Rollbacks other than serialization failures and deadlocks."),
    _row("23", "integrity_constraint_violation", NO, "errcodes",
         "A constraint rejected the data: the work is wrong, not the server."),
    _row("42", "syntax_error_or_access_rule_violation", NO, "errcodes",
         "The statement is wrong or not permitted."),
    _row("22", "data_exception", NO, "errcodes", "The data is invalid for the statement."),
    _row("28", "invalid_authorization_specification", NO, "errcodes",
         "Authentication failures.", reconnect=True),
)

#: When neither the code nor its class has a row.
DEFAULT = _row("*", "unknown", NO, "policy",
               "A code the table does not know is never retried: retrying the unknown "
               "can duplicate or storm.")

#: Situations in which the driver gave no SQLSTATE at all.
NO_SQLSTATE_LOST = _row(
    "none: session broken", "connection_lost", LOST,
    "guide: libpq (NULL), .NET (empty string); measured: psycopg",
    "The driver gave no SQLSTATE for a dead connection (psycopg's plain "
    "OperationalError, the guide's libpq NULL), or the session is now broken or closed: "
    "the server went away (server down, node down, own session killed, network cut).")
NO_SQLSTATE_CONNECT = _row(
    "none: connect failed", "connect_failed", CONNECT,
    "guide: libpq (CONNECTION_BAD), .NET (empty string); measured: psycopg",
    "Making the session failed before it was established (connection refused, "
    "timeout, the server refused it for now).")
NO_SQLSTATE_AUTH = _row(
    "none: connect failed after the server asked for a password", "authentication_failed",
    NO, "measured: psycopg (libpq gives no SQLSTATE for a failed connect)",
    "The server asked for a password and the connection then failed: treated as an "
    "authentication failure (28P01) so that a wrong password fails at once.",
    reconnect=True)
NO_SQLSTATE_OTHER = _row(
    "none: other", "unknown", NO, "policy",
    "No SQLSTATE and nothing shows the session broke: not known to be a failover.")

NO_SQLSTATE: tuple[Rule, ...] = (
    NO_SQLSTATE_LOST, NO_SQLSTATE_CONNECT, NO_SQLSTATE_AUTH, NO_SQLSTATE_OTHER,
)

#: A driver's own catch-all code, raised on a session the driver now knows is dead.
GENERIC_ON_BROKEN = _row(
    "HY000 on a broken session", "connection_lost", LOST,
    "measured: psqlODBC ('internal SAVEPOINT failed' when the server went away inside "
    "a transaction)",
    "psqlODBC reports its catch-all HY000 when the statement-level SAVEPOINT it sends "
    "first finds the connection gone; ODBC's SQL_ATTR_CONNECTION_DEAD then says the "
    "session is dead: a lost connection.")
#: The codes that are a driver's catch-all rather than the server's word.
GENERIC_CODES = frozenset({"HY000"})
ON_BROKEN_SESSION: tuple[Rule, ...] = (GENERIC_ON_BROKEN,)

EXACT_BY_CODE: dict[str, Rule] = {r.code: r for r in EXACT}
CLASS_BY_CODE: dict[str, Rule] = {r.code: r for r in CLASSES}


def lookup(sqlstate: str) -> Rule:
    """The row for a (valid, upper-case) SQLSTATE: exact, then class, then default."""
    return EXACT_BY_CODE.get(sqlstate) or CLASS_BY_CODE.get(sqlstate[:2]) or DEFAULT
