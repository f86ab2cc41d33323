"""The commit ledger without a server: its tokens, SQL and rules (`_ledger`, `_decide`), and
the core's flows with the ledger (`_core`), driven by the scripted fake of ``test_core``.

With the ledger a read-write unit's BEGIN carries its token; a lost COMMIT is decided by
claiming the token again (OP_CLAIM): 23505 = committed, 55P03 = the old session still
holds it, success = not committed. Every answer is final, also after a restart.
"""

from __future__ import annotations

import re
import uuid

import pytest
from hypothesis import given
from hypothesis import strategies as st
from test_core import (
    SWITCH,
    FakeSession,
    Harness,
    Unit,
    fail,
    ok,
    server_gone,
    sqlstate,
)

from symfo_failover import (
    CommitOutcomeUnknown,
    CommitResolved,
    LedgerNotUsed,
    LedgerPruned,
    LedgerUnavailable,
    SessionInfo,
    UnitInterrupted,
)
from symfo_failover import _ledger as lg
from symfo_failover._core import (
    OP_APPLY_STATE,
    OP_BEGIN,
    OP_CLAIM,
    OP_COMMIT,
    OP_CONNECT,
    OP_DISCARD,
    OP_END_SESSION,
    OP_INFO,
    OP_PRUNE,
    OP_ROLLBACK,
    OP_SLEEP,
    OP_UNIT,
)
from symfo_failover._decide import Resolution, resolve_claim
from symfo_failover._ledger import LedgerState
from symfo_failover._target import SessionState, begin_sql, session_info_of

# --- tokens ----------------------------------------------------------------------------------


@given(st.floats(min_value=0, max_value=2**47 / 1000), st.binary(min_size=10, max_size=10))
def test_a_token_is_a_uuid_version_7_that_keeps_its_time(now: float, entropy: bytes) -> None:
    token = lg.new_token(now, entropy)
    assert re.fullmatch(r"[0-9a-f]{32}", token)
    parsed = uuid.UUID(hex=token)
    assert parsed.version == 7
    assert parsed.variant == uuid.RFC_4122
    assert lg.token_time(token) == int(now * 1000) / 1000


@given(st.floats(min_value=1, max_value=2**46 / 1000), st.floats(min_value=0.002, max_value=1e6),
       st.binary(min_size=10, max_size=10), st.binary(min_size=10, max_size=10))
def test_tokens_sort_by_the_time_they_were_made(t: float, later: float, a: bytes,
                                                 b: bytes) -> None:
    # Time-ordered keys go to the primary key's rightmost leaf (one page image per
    # checkpoint, not one per insert).
    assert lg.new_token(t, a) < lg.new_token(t + later, b)


def test_fresh_tokens_differ() -> None:
    tokens = {lg.new_token() for _ in range(10_000)}
    assert len(tokens) == 10_000


@pytest.mark.parametrize("bad", ["", "x" * 32, "0" * 31, "0" * 31 + "'", "A" * 32,
                                 "0" * 16 + "); DROP TABLE t; --"])
def test_only_a_token_goes_into_the_sql(bad: str) -> None:
    with pytest.raises(ValueError, match="not a ledger token"):
        lg.insert_sql(bad)
    for how in ("prepare", "execute"):
        with pytest.raises(ValueError, match="not a ledger token"):
            lg.ledger_sql(bad, how)  # type: ignore[arg-type]


def test_the_begin_message_carries_the_insert_instead_of_reading_the_id() -> None:
    token = lg.new_token()
    sql = begin_sql(SessionState(isolation_level="serializable"), False, token)
    assert sql == (f"BEGIN ISOLATION LEVEL SERIALIZABLE; INSERT INTO symfo_failover.ledger "
                   f"(token) VALUES ('{token}')")
    assert "pg_current_xact_id" not in sql
    assert begin_sql(SessionState(), True).endswith("SELECT pg_current_xact_id()::text")


# --- rules -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("sqlstate", "answer", "resolution"), [
    (None, "free", Resolution.ABORTED),
    ("23505", "committed", Resolution.COMMITTED),
    ("55P03", "held", Resolution.END_OLD_SESSION),
    ("42P01", "missing", Resolution.UNKNOWN),
    ("42501", "missing", Resolution.UNKNOWN),
    ("3F000", "missing", Resolution.UNKNOWN),
    ("XX000", None, Resolution.UNKNOWN),
])
def test_a_claims_reply_decides_the_outcome(sqlstate: str | None, answer: str | None,
                                            resolution: Resolution) -> None:
    assert lg.claim_answer(sqlstate) == answer
    assert resolve_claim(answer) is resolution


@pytest.mark.parametrize(("access", "usable", "prunes"), [
    (None, False, False), ("", False, False), ("U", False, False), ("I", False, False),
    ("UI", True, False), ("UIS", True, False), ("UID", True, False), ("UISD", True, True),
])
def test_what_a_role_may_do_with_the_ledger(access: str | None, usable: bool,
                                            prunes: bool) -> None:
    state = LedgerState.from_access(access)
    assert (state.usable, state.can_prune) == (usable, prunes)
    if not usable:
        assert "ledger" in state.why_not()


def test_the_session_facts_carry_the_ledger_access_and_recovery() -> None:
    info = session_info_of((7, "boot", "start", "UISD", "t"))
    assert info.ledger is not None
    assert info.ledger.usable
    assert info.in_recovery
    info = session_info_of((7, "boot", "start", None, False))
    assert info.ledger is not None
    assert not info.ledger.usable
    assert not info.in_recovery


def test_retention_is_an_hour_or_ten_deadlines() -> None:
    assert lg.retention_for(60) == 3600
    assert lg.retention_for(1000) == 10_000


def test_the_prune_trusts_only_the_servers_clock() -> None:
    sql = lg.prune_sql(3600, 500)
    assert sql.count("now() - interval '3600 seconds'") == 2  # token range and created
    assert "created <" in sql
    assert "LIMIT 500" in sql
    with pytest.raises(ValueError, match="positive"):
        lg.prune_sql(0)


@pytest.mark.parametrize("bad", ["on", True, None, "AUTO", 1])
def test_a_bad_ledger_mode_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="ledger must be one of 'auto', 'require', 'off'"):
        lg.check_mode(bad)


def test_grants_quote_the_role() -> None:
    assert lg.grant_statements('we"ird') == [
        'GRANT USAGE ON SCHEMA symfo_failover TO "we""ird"',
        'GRANT SELECT, INSERT, DELETE ON symfo_failover.ledger TO "we""ird"']
    with pytest.raises(ValueError, match="not a role name"):
        lg.quote_ident("")


# --- the core's flows with the ledger ----------------------------------------------------------


def linfo(pid: int, boot: int = 1, access: str | None = "UISD",
          in_recovery: bool = False) -> SessionInfo:
    return SessionInfo(pid, f"boot-{boot}", f"backend-start-{pid}",
                       ledger=LedgerState.from_access(access), in_recovery=in_recovery)


def opening(session: FakeSession, pid: int, *, boot: int = 1, fence: bool | None = None,
            access: str | None = "UISD", in_recovery: bool = False) -> list:
    script = [ok(OP_CONNECT, session), ok(OP_INFO, linfo(pid, boot, access, in_recovery))]
    if fence is not None:
        script.append(ok(OP_END_SESSION, fence))
    return [*script, ok(OP_APPLY_STATE)]


def connected(access: str | None = "UISD", *, pruned: bool = True,
              **kwargs: object) -> tuple[Harness, FakeSession]:
    h = Harness(**kwargs)  # type: ignore[arg-type]
    s1 = FakeSession("s1")
    h.drive(h.core.connect(), opening(s1, 1, access=access))
    if pruned and h.core.link.info is not None and h.core.link.info.ledger is not None:
        h.core.link.info.ledger.next_prune = 1e9  # not due in these tests
    h.reset()
    return h, s1


def begun_token(h: Harness, index: int = -1) -> str | None:
    begins = [op for op in h.trace if op[0] == OP_BEGIN]
    return begins[index][3]


def test_a_read_write_unit_inserts_a_fresh_token_in_its_begin() -> None:
    h, _s1 = connected()
    assert h.drive(h.core.run(Unit().job), [SWITCH, ok(OP_BEGIN), ok(OP_UNIT),
                                           ok(OP_COMMIT)]) == "done"
    first = begun_token(h)
    assert first is not None
    assert uuid.UUID(hex=first).version == 7
    h.reset()
    h.drive(h.core.run(Unit().job), [ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])
    assert begun_token(h) not in (None, first)
    assert h.ops == ["BEGIN", "UNIT", "COMMIT"]  # no round trip of its own


def test_the_first_begin_of_a_session_prepares_the_insert_and_the_next_ones_execute_it(
) -> None:
    h, _ = connected()
    for _ in range(2):
        h.drive(h.core.run(Unit().job), [ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)]
                if h.trace else [SWITCH, ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])
    assert [op[4] for op in h.trace if op[0] == OP_BEGIN] == ["prepare", "execute"]
    sql = lg.ledger_sql(lg.new_token(), "prepare")
    assert sql.startswith(f"PREPARE {lg.PREPARED}(uuid) AS INSERT INTO symfo_failover.ledger")
    assert "EXECUTE" in lg.ledger_sql("0" * 32, "execute")


@pytest.mark.parametrize(("code", "again"), [("26000", "prepare"), ("42P05", "execute")])
def test_a_prepared_insert_that_is_gone_or_there_already_is_begun_again(code: str,
                                                                         again: str) -> None:
    # 26000: DISCARD ALL / DEALLOCATE took it; 42P05: an earlier message prepared it.
    h, _ = connected()
    ledger = h.core.link.info.ledger
    ledger.prepared = code == "26000"
    unit = Unit()
    script = [SWITCH, fail(OP_BEGIN, sqlstate(code), lost=False), ok(OP_ROLLBACK),
              ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)]
    assert h.drive(h.core.run(unit.job), script) == "done"
    begins = [op for op in h.trace if op[0] == OP_BEGIN]
    assert begins[1][4] == again
    assert begins[0][3] == begins[1][3]  # the same token
    assert len(unit.calls) == 1
    assert ledger.prepared


def test_a_read_only_unit_has_no_token() -> None:
    h, _ = connected(state=SessionState(read_only=True))
    h.drive(h.core.run(Unit().job), [SWITCH, ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])
    assert begun_token(h) is None


def test_ledger_off_uses_the_transaction_id() -> None:
    h, _ = connected()
    h.core.ledger = "off"
    h.drive(h.core.run(Unit().job), [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), ok(OP_COMMIT)])
    assert begun_token(h) is None


def lost_commit_with_token(s2: FakeSession, *, boot: int = 1,
                           access: str | None = "UISD") -> list:
    """The COMMIT of a unit with a token loses its reply; s2 is made to claim it."""
    return [SWITCH, ok(OP_BEGIN), ok(OP_UNIT), fail(OP_COMMIT, server_gone()),
            ok(OP_DISCARD), ok(OP_SLEEP),
            *opening(s2, 2, boot=boot, fence=True if boot == 1 else None, access=access),
            SWITCH]


@pytest.mark.parametrize("boot", [1, 2])
def test_a_lost_commit_whose_token_is_there_returns_without_running_again(boot: int) -> None:
    # boot 2: the server restarted (a crash, a promotion): the xid path would have to
    # say "unknown" for a "committed" answer; the token is proof.
    h, _ = connected()
    s2 = FakeSession("s2")
    unit = Unit("paid")
    script = [*lost_commit_with_token(s2, boot=boot),
              ok(OP_PRUNE, 0), fail(OP_CLAIM, sqlstate("23505"), lost=False)]
    assert h.drive(h.core.run(unit.job), script) == "paid"
    assert len(unit.calls) == 1
    claim = next(op for op in h.trace if op[0] == OP_CLAIM)
    assert claim[1:] == (s2, begun_token(h), lg.CLAIM_LOCK_TIMEOUT_MS)
    resolved = h.one(CommitResolved)
    assert (resolved.status, resolved.outcome, resolved.via, resolved.token) == (
        "committed", "returned", "ledger", begun_token(h))


def test_a_lost_commit_whose_token_is_free_runs_again_with_the_same_token() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    unit = Unit()
    script = [*lost_commit_with_token(s2, boot=2), ok(OP_PRUNE, 0), ok(OP_CLAIM),
              ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)]
    assert h.drive(h.core.run(unit.job), script) == "done"
    assert len(unit.calls) == 2
    assert begun_token(h, 0) == begun_token(h, 1) is not None
    assert (h.one(CommitResolved).status, h.one(CommitResolved).outcome) == (
        "aborted", "replayed")


def test_a_token_held_by_the_old_session_ends_it_and_claims_again() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    script = [*lost_commit_with_token(s2), ok(OP_PRUNE, 0),
              fail(OP_CLAIM, sqlstate("55P03"), lost=False), ok(OP_END_SESSION, True),
              fail(OP_CLAIM, sqlstate("23505"), lost=False)]
    assert h.drive(h.core.run(Unit("paid").job), script) == "paid"
    ops = h.ops
    assert ops[-3:] == ["CLAIM", "END_SESSION", "CLAIM"]
    assert h.one(CommitResolved).terminated_old_session


def test_a_server_without_the_ledger_cannot_tell_and_says_so() -> None:
    h, _ = connected()
    s2 = FakeSession("s2")
    script = [*lost_commit_with_token(s2, boot=2, access=None),
              fail(OP_CLAIM, sqlstate("42P01"), lost=False)]
    with pytest.raises(CommitOutcomeUnknown, match="no commit ledger") as caught:
        h.drive(h.core.run(Unit().job), script)
    assert caught.value.token == begun_token(h)


def test_a_claim_whose_session_dies_claims_on_the_next_one() -> None:
    h, _ = connected()
    s2, s3 = FakeSession("s2"), FakeSession("s3")
    script = [*lost_commit_with_token(s2), ok(OP_PRUNE, 0),
              fail(OP_CLAIM, server_gone()), ok(OP_DISCARD), ok(OP_SLEEP),
              *opening(s3, 3, fence=True), SWITCH, ok(OP_PRUNE, 0),
              fail(OP_CLAIM, sqlstate("23505"), lost=False)]
    assert h.drive(h.core.run(Unit("paid").job), script) == "paid"


def test_require_refuses_a_session_without_the_ledger_before_anything_runs() -> None:
    h, _ = connected(access="U")
    h.core.ledger = "require"
    assert h.core.required_ledger_missing() is not None
    unit = Unit()
    with pytest.raises(LedgerUnavailable, match="ledger install") as caught:
        h.drive(h.core.run(unit.job), [SWITCH])
    assert unit.calls == []
    assert "INSERT on symfo_failover.ledger" in caught.value.reason


def test_auto_without_the_ledger_notes_it_once_per_session_and_uses_the_xid() -> None:
    h, _ = connected(access=None, pruned=False)
    for _ in range(3):
        h.drive(h.core.run(Unit().job), [ok(OP_BEGIN, "100"), ok(OP_UNIT), ok(OP_COMMIT)]
                if h.trace else [SWITCH, ok(OP_BEGIN, "100"), ok(OP_UNIT), ok(OP_COMMIT)])
    notes = [e for e in h.events if isinstance(e, LedgerNotUsed)]
    assert len(notes) == 1
    assert "ledger install" in notes[0].reason
    assert begun_token(h) is None


def test_a_ledger_dropped_under_a_session_goes_on_without_it() -> None:
    h, _s1 = connected()
    unit = Unit()
    script = [SWITCH, fail(OP_BEGIN, sqlstate("42P01"), lost=False), ok(OP_ROLLBACK),
              ok(OP_BEGIN, "100"), ok(OP_UNIT), ok(OP_COMMIT)]
    assert h.drive(h.core.run(unit.job), script) == "done"
    assert begun_token(h, 0) is not None
    assert begun_token(h, 1) is None
    assert len(unit.calls) == 1
    assert h.one(LedgerNotUsed).reason.startswith("the commit ledger is gone")


def test_a_ledger_dropped_under_require_raises() -> None:
    h, _ = connected()
    h.core.ledger = "require"
    script = [SWITCH, fail(OP_BEGIN, sqlstate("42501"), lost=False), ok(OP_ROLLBACK)]
    with pytest.raises(LedgerUnavailable):
        h.drive(h.core.run(Unit().job), script)


def test_a_standby_is_the_wrong_server_for_a_read_write_unit() -> None:
    h = Harness()
    s1, s2 = FakeSession("s1"), FakeSession("s2")
    h.drive(h.core.connect(), opening(s1, 1, in_recovery=True))
    h.reset()
    script = [SWITCH, ok(OP_DISCARD), ok(OP_SLEEP), *opening(s2, 2, boot=2), SWITCH,
              ok(OP_PRUNE, 0), ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)]
    assert h.drive(h.core.run(Unit().job), script) == "done"
    assert [op[1] for op in h.trace if op[0] == OP_BEGIN] == [s2]


def test_a_read_only_unit_may_run_on_a_standby() -> None:
    h = Harness(state=SessionState(read_only=True))
    s1 = FakeSession("s1")
    h.drive(h.core.connect(), opening(s1, 1, in_recovery=True))
    h.reset()
    assert h.drive(h.core.run(Unit().job), [SWITCH, ok(OP_BEGIN), ok(OP_UNIT),
                                           ok(OP_COMMIT)]) == "done"


def test_pruning_runs_before_a_begin_at_most_once_a_minute() -> None:
    h, _ = connected(pruned=False)
    unit = Unit()
    h.drive(h.core.run(unit.job), [SWITCH, ok(OP_PRUNE, 12), ok(OP_BEGIN), ok(OP_UNIT),
                                   ok(OP_COMMIT)])
    prune = next(op for op in h.trace if op[0] == OP_PRUNE)
    assert prune[2:] == (3600.0, lg.PRUNE_BATCH)
    assert h.one(LedgerPruned).deleted == 12
    h.now += 59
    h.drive(h.core.run(unit.job), [ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])
    h.now += 2
    h.drive(h.core.run(unit.job), [ok(OP_PRUNE, 0), ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])


def test_a_full_batch_prunes_again_a_second_later() -> None:
    h, _ = connected(pruned=False)
    unit = Unit()
    h.drive(h.core.run(unit.job), [SWITCH, ok(OP_PRUNE, lg.PRUNE_BATCH), ok(OP_BEGIN),
                                   ok(OP_UNIT), ok(OP_COMMIT)])
    h.now += 1.5
    h.drive(h.core.run(unit.job), [ok(OP_PRUNE, 3), ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])


def test_a_role_without_delete_stops_pruning_and_the_unit_goes_on() -> None:
    h, _ = connected(pruned=False)
    unit = Unit()
    h.drive(h.core.run(unit.job), [SWITCH, fail(OP_PRUNE, sqlstate("42501"), lost=False),
                                   ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])
    assert h.one(LedgerPruned).error.startswith("42501")
    h.now += 3600
    h.drive(h.core.run(unit.job), [ok(OP_BEGIN), ok(OP_UNIT), ok(OP_COMMIT)])
    assert len(unit.calls) == 2


def test_ctrl_c_while_the_ledger_is_asked_says_unknown_and_names_the_token() -> None:
    # Interrupted while claiming the token after a lost COMMIT: nobody knows yet whether
    # the unit committed; the event gives the token to look up, the session is dropped.
    h, _ = connected()
    s2 = FakeSession("s2")
    script = [*lost_commit_with_token(s2), ok(OP_PRUNE, 0),
              fail(OP_CLAIM, KeyboardInterrupt(), lost=False), ok(OP_DISCARD)]
    with pytest.raises(KeyboardInterrupt):
        h.drive(h.core.run(Unit().job), script)
    event = h.one(UnitInterrupted)
    assert (event.outcome, event.token) == ("unknown", begun_token(h))
    assert h.core.link.raw is None


def test_ctrl_c_inside_the_unit_rolls_back_and_names_no_token() -> None:
    h, _ = connected()

    def interrupted(session: FakeSession) -> None:
        raise KeyboardInterrupt

    script = [SWITCH, ok(OP_BEGIN), ok(OP_UNIT), ok(OP_DISCARD)]
    with pytest.raises(KeyboardInterrupt):
        h.drive(h.core.run(Unit(body=interrupted).job), script)
    event = h.one(UnitInterrupted)
    assert (event.outcome, event.token) == ("rolled back", None)
