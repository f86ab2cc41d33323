"""The failover pools' decisions (`_pool_state`): generations, failovers, refills and
the policy's waits between connect attempts. Pure logic, a fake clock, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

import symfo_failover as sf
from symfo_failover import FailoverStats, Kind, RetryPolicy
from symfo_failover._kind import Failure
from symfo_failover._pool_state import Generations, PolicyAttempt, Verdict

A = "2026-01-01 10:00:00+00"
B = "2026-01-01 11:00:00+00"
C = "2026-01-01 12:00:00+00"


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def gens(now: float = 1000.0) -> tuple[Generations, FakeClock]:
    clock = FakeClock(now)
    return Generations(clock=clock), clock


REFUSED = sf.classify("08001")  # connection refused: no server there
LOST = sf.classify("08006")  # the session broke while connecting
AUTH = sf.classify("28P01")  # a wrong password: the server is there


def went_away(g: Generations, clock: FakeClock, gone: Failure = REFUSED,
              *, wanted: int = 4) -> Verdict | None:
    """The server went away: an attempt fails, and the next one, begun after that
    failure, fails as well (what the probing attempt's next try does)."""
    first = g.connect_failed(gone, wanted=wanted, attempt_started=clock.now)
    assert first is None  # one failed attempt is not enough
    clock.now += 0.02
    return g.connect_failed(gone, wanted=wanted, attempt_started=clock.now)


def failure(kind: Kind) -> Failure:
    return Failure(kind=kind, sqlstate=None, retryable=kind.retryable,
                   reconnect=kind.needs_new_session, message="made by hand")


# --- connected(): verdicts --------------------------------------------------------------


def test_the_first_connection_makes_the_server_known() -> None:
    g, _ = gens()
    assert g.connected(A) is Verdict.KNOWN_NOW
    assert (g.started, g.current, g.failovers) == (A, 0, 0)


def test_the_same_start_time_is_the_same_server() -> None:
    g, _ = gens()
    g.connected(A)
    for _ in range(5):
        assert g.connected(A) is Verdict.SAME
    assert (g.current, g.failovers) == (0, 0)
    assert not g.down


def test_a_different_start_time_is_a_new_server() -> None:
    g, _ = gens()
    g.connected(A)
    assert g.connected(B) is Verdict.NEW_SERVER
    assert (g.started, g.current, g.failovers) == (B, 1, 1)
    assert g.is_current(1)
    assert not g.is_current(0)
    # The rest of the new generation is the same server: not counted again.
    assert g.connected(B) is Verdict.SAME
    assert g.failovers == 1


def test_an_earlier_start_time_while_the_current_one_is_known_is_stale() -> None:
    g, _ = gens()
    g.connected(A)
    g.connected(B)
    assert g.connected(A) is Verdict.STALE
    assert (g.started, g.current, g.failovers) == (B, 1, 1)
    # A third server is a failover again; both A and B are stragglers then.
    assert g.connected(C) is Verdict.NEW_SERVER
    assert g.connected(A) is Verdict.STALE
    assert g.connected(B) is Verdict.STALE
    assert (g.current, g.failovers) == (2, 2)


# --- connect_failed(): the server went away ----------------------------------------------


@pytest.mark.parametrize("gone", [REFUSED, LOST, failure(Kind.CONNECT_FAILED),
                                  failure(Kind.CONNECTION_LOST)],
                         ids=["08001", "08006", "CONNECT_FAILED", "CONNECTION_LOST"])
def test_a_server_that_went_away_is_one_failover_however_often_it_is_seen(
        gone: Failure) -> None:
    g, clock = gens()
    g.connected(A)
    assert went_away(g, clock, gone) is Verdict.NEW_SERVER
    assert (g.failovers, g.current, g.started, g.down) == (1, 1, None, True)
    assert not g.is_current(0)
    for _ in range(10):  # the same outage, met by every attempt
        clock.now += 0.1
        assert g.connect_failed(gone, wanted=4, attempt_started=clock.now) is None
    assert (g.failovers, g.current) == (1, 1)
    assert g.stats().generation == 1


def test_attempts_under_way_together_are_one_blow_not_a_failover() -> None:
    """Connects under way when a proxy cut its connections all fail; none of them
    began after a failure: not a failover by itself."""
    g, clock = gens()
    g.connected(A)
    begun = clock.now
    clock.now += 0.01
    for _ in range(3):
        assert g.connect_failed(LOST, wanted=4, attempt_started=begun) is None
    assert (g.failovers, g.current, g.started) == (0, 0, A)
    # and the next attempt reaches the same server: nothing happened
    assert g.connected(A) is Verdict.SAME
    assert (g.failovers, g.down) == (0, False)


def test_back_with_the_same_start_time_is_known_now_not_stale() -> None:
    """A network break: the same server comes back. Its connections are the new
    generation (the old ones may be half dead), not stragglers."""
    g, clock = gens()
    g.connected(A)
    went_away(g, clock)
    assert g.connected(A) is Verdict.KNOWN_NOW
    assert (g.started, g.current, g.failovers, g.down) == (A, 1, 1, False)
    assert g.connected(A) is Verdict.SAME


def test_back_with_a_different_start_time_after_an_outage_is_not_counted_twice() -> None:
    g, clock = gens()
    g.connected(A)
    went_away(g, clock)
    assert g.connected(B) is Verdict.KNOWN_NOW
    assert (g.current, g.failovers) == (1, 1)
    # A straggler to the old server (it raced the outage) is not used.
    assert g.connected(A) is Verdict.STALE


def test_the_old_server_reached_as_it_went_then_the_new_one_is_one_failover() -> None:
    g, clock = gens()
    g.connected(A)
    went_away(g, clock)
    assert g.connected(A) is Verdict.KNOWN_NOW  # a connect under way as it went
    assert g.connected(B) is Verdict.SETTLED  # the same failover
    assert (g.current, g.failovers, g.started) == (2, 1, B)
    assert g.connected(A) is Verdict.STALE


def test_a_failed_connect_before_any_server_was_known_is_not_a_failover() -> None:
    g, clock = gens()
    assert went_away(g, clock) is None
    assert (g.failovers, g.current, g.down) == (0, 0, True)
    assert g.connected(A) is Verdict.KNOWN_NOW
    assert g.failovers == 0


@pytest.mark.parametrize("refused", [AUTH, failure(Kind.NOT_RETRYABLE),
                                     failure(Kind.TRANSACTION_CONFLICT),
                                     failure(Kind.SESSION_STATE_LOST)],
                         ids=["28P01", "NOT_RETRYABLE", "TRANSACTION_CONFLICT",
                              "SESSION_STATE_LOST"])
def test_a_refused_attempt_is_not_a_failover(refused: Failure) -> None:
    g, clock = gens()
    g.connected(A)
    for _ in range(3):
        clock.now += 0.1
        assert g.connect_failed(refused, wanted=4, attempt_started=clock.now) is None
    assert (g.failovers, g.current, g.started, g.down) == (0, 0, A, False)
    assert g.connected(A) is Verdict.SAME


def test_too_many_clients_is_not_a_failover() -> None:
    """53300 is retryable (CONNECT_FAILED), but a server that says so is there."""
    g, clock = gens()
    g.connected(A)
    assert went_away(g, clock, sf.classify("53300")) is None
    assert (g.failovers, g.current, g.started) == (0, 0, A)


# --- the refill ---------------------------------------------------------------------------


def test_refill_is_timed_from_noticing_to_a_full_pool() -> None:
    g, clock = gens()
    for _ in range(3):
        g.connected(A)
        assert g.added(0, wanted=3) is None  # no failover yet: nothing to time
    clock.now = 1010.0
    assert g.connected(B, wanted=3) is Verdict.NEW_SERVER
    assert g.stats().refilling
    clock.now = 1010.5
    assert g.added(1, wanted=3) is None
    assert g.added(0, wanted=3) is None  # an old connection does not count
    clock.now = 1011.0
    assert g.added(1, wanted=3) is None
    clock.now = 1012.25
    assert g.added(1, wanted=3) == pytest.approx(2.25)
    s = g.stats()
    assert not s.refilling
    assert s.last_refill_seconds == pytest.approx(2.25)
    assert s.refill_seconds == (pytest.approx(2.25),)
    assert g.added(1, wanted=3) is None  # done: a later connection is not a refill


def test_refill_after_the_server_went_away_counts_from_the_failed_connect() -> None:
    g, clock = gens()
    g.connected(A)
    clock.now = 2000.0
    assert went_away(g, clock, wanted=2) is Verdict.NEW_SERVER  # noticed at 2000.02
    clock.now = 2003.0
    assert g.connect_failed(REFUSED, wanted=2, attempt_started=2003.0) is None
    clock.now = 2004.0
    g.connected(A)
    assert g.added(1, wanted=2) is None
    clock.now = 2005.0
    assert g.added(1, wanted=2) == pytest.approx(4.98)


def test_refill_completes_at_the_smaller_of_the_wanted_sizes() -> None:
    """The pool shrank during the refill (a connect that gave up): full is the new
    size, not the one at the failover."""
    g, clock = gens()
    g.connected(A)
    g.connected(B, wanted=4)
    clock.now += 1.0
    assert g.added(1, wanted=2) is None
    assert g.added(1, wanted=2) == pytest.approx(1.0)


def test_only_the_last_100_refills_are_kept() -> None:
    g, clock = gens()
    g.connected(A)
    for i in range(105):
        g.connected(f"s{i}", wanted=1)
        clock.now += 1.0 + i
        g.added(g.current, wanted=1)
    s = g.stats()
    assert len(s.refill_seconds) == 100
    assert s.refill_seconds[-1] == s.last_refill_seconds == 105.0
    assert s.refill_seconds[0] == 6.0


def test_stats() -> None:
    g, clock = gens()
    assert g.stats() == FailoverStats()
    assert g.stats().as_dict() == {
        "failovers": 0, "connections_replaced": 0, "requests_met_dead": 0,
        "last_refill_seconds": None, "refill_seconds": [], "generation": 0,
        "server_started": None, "refilling": False,
    }
    g.connected(A)
    g.replaced += 3
    g.met_dead += 1
    g.connected(B, wanted=1)
    clock.now += 0.5
    g.added(1, wanted=1)
    s = g.stats()
    assert s == FailoverStats(failovers=1, connections_replaced=3, requests_met_dead=1,
                              last_refill_seconds=0.5, refill_seconds=(0.5,),
                              generation=1, server_started=B, refilling=False)
    assert s.as_dict()["refill_seconds"] == [0.5]
    went_away(g, clock, wanted=1)
    s = g.stats()
    assert (s.failovers, s.generation, s.server_started, s.refilling) == (2, 2, None, True)


# --- PolicyAttempt ------------------------------------------------------------------------


def fixed_random(*values: float) -> Callable[[], float]:
    it = iter(values)
    return lambda: next(it)


def test_attempt_delays_follow_the_policy() -> None:
    randoms = [0.0, 0.5, 0.25, 0.9, 0.1, 0.0, 0.3]
    policy = RetryPolicy(first_delay=0.02, max_delay=0.16, jitter=0.5,
                         random=fixed_random(*randoms))
    twin = RetryPolicy(first_delay=0.02, max_delay=0.16, jitter=0.5,
                       random=fixed_random(*randoms))
    attempt = PolicyAttempt(policy, timeout=300.0)
    now = 50.0
    for tries in range(1, len(randoms) + 1):
        attempt.update_delay(now)
        assert attempt.tries == tries
        assert attempt.delay == pytest.approx(twin.delay(tries))
        now += attempt.delay
    assert attempt.give_up_at == 350.0
    assert attempt.delay <= policy.max_delay


def test_attempt_delay_is_capped_by_the_give_up_time() -> None:
    policy = RetryPolicy(first_delay=1.0, max_delay=8.0, jitter=0.0)
    attempt = PolicyAttempt(policy, timeout=2.5)
    attempt.update_delay(10.0)
    assert attempt.delay == 1.0
    assert not attempt.time_to_give_up(11.0)
    attempt.update_delay(11.0)  # the policy says 2.0, 1.5 are left
    assert attempt.delay == pytest.approx(1.5)
    attempt.update_delay(12.4)
    assert attempt.delay == pytest.approx(0.1)
    attempt.update_delay(13.0)  # past the time: no negative wait
    assert attempt.delay == 0.0


def test_time_to_give_up() -> None:
    attempt = PolicyAttempt(RetryPolicy(jitter=0.0), timeout=5.0)
    # Before the first failure the clock has not started.
    assert not attempt.time_to_give_up(1e9)
    assert not attempt.gave_up
    attempt.update_delay(100.0)
    assert not attempt.time_to_give_up(104.999)
    assert not attempt.gave_up
    assert attempt.time_to_give_up(105.0)
    assert attempt.gave_up
    assert not attempt.time_to_give_up(100.0)  # asked again earlier: not now...
    assert attempt.gave_up  # ... but it did give up once


def test_the_give_up_time_runs_from_the_first_failure_only() -> None:
    attempt = PolicyAttempt(RetryPolicy(jitter=0.0), timeout=5.0)
    attempt.update_delay(100.0)
    attempt.update_delay(104.0)
    assert attempt.give_up_at == 105.0


# --- a property: failovers are the server changes -----------------------------------------

event = st.one_of(st.sampled_from([A, B, C]).map(lambda s: ("connected", s)),
                  st.just(("connect_failed", None)))


@given(st.lists(event, max_size=40))
def test_failovers_are_the_server_changes_of_a_reference_model(
        events: list[tuple[str, str | None]]) -> None:
    """Each connect_failed is an attempt begun after the one before failed. The
    model: a server change is a different server than the known one, or an outage
    (two failures in a row) while one is known; a change right after the old server
    was reached once more as it went away is part of the same failover."""
    g, clock = gens()
    known: str | None = None  # the server the pool uses now
    left: set[str] = set()  # servers it used and left
    tentative = False  # ``known`` is the old server, reached as it went away
    failures_in_a_row = 0
    changes = 0
    last_current = g.current
    for kind, started in events:
        clock.now += 1.0
        if kind == "connect_failed":
            failures_in_a_row += 1
            said = g.connect_failed(REFUSED, wanted=3, attempt_started=clock.now - 0.5)
            expected: Verdict | None = None
            if failures_in_a_row >= 2 and known is not None:
                expected = Verdict.SETTLED if tentative else Verdict.NEW_SERVER
                changes += not tentative
                left.add(known)
                known, tentative = None, False
            assert said is expected
            assert g.down
        else:
            assert started is not None
            failures_in_a_row = 0
            verdict = g.connected(started)
            if known == started:
                expected = Verdict.SAME
            elif known is None:
                expected = Verdict.KNOWN_NOW
                tentative = started in left
                left.discard(started)
                known = started
            elif started in left:
                expected = Verdict.STALE
            else:
                expected = Verdict.SETTLED if tentative else Verdict.NEW_SERVER
                changes += not tentative
                left.add(known)
                known, tentative = started, False
            assert verdict is expected
            assert not g.down
        assert g.failovers == changes
        assert g.current >= last_current
        assert g.current >= g.failovers  # each change is (at least) one generation
        last_current = g.current
        assert g.started == known
        assert g.stats().failovers == changes


def test_a_refused_connect_waits_like_psycopg_pool_not_like_a_gone_server() -> None:
    """A wrong password or a full server: 1 s, 2 s, 4 s (±10 %), not the policy's
    short waits that are meant for the one attempt probing a server that is gone."""
    policy = sf.RetryPolicy(first_delay=0.02, max_delay=0.16, random=lambda: 0.5)
    attempt = PolicyAttempt(policy, timeout=100.0)
    waits = []
    for now in (0.0, 1.0, 3.0):
        attempt.update_delay(now, server_gone=False)
        waits.append(attempt.delay)
    assert waits == [1.0, 2.0, 4.0]
    attempt.update_delay(7.0, server_gone=True)
    assert attempt.delay == policy.delay(4)
