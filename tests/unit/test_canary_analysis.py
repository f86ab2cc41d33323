"""The canary's analysis (windows, incidents, phases, the write check), without I/O."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from symfo_failover import _events as ev
from symfo_failover._canary import (
    Records,
    Request,
    analyse,
    errors_seen,
    find_windows,
    merge_incidents,
    phases,
    samples,
    server_change,
    write_check,
)
from symfo_failover._classify import classify
from symfo_failover._drill import GUIDE_CODES, scenario_findings, select_scenarios
from symfo_failover._report import Incident, InputError, ServerIdentity, ServerOutage

LOST = classify("57P01")
REFUSED = classify(None)


def detected(at: float, failure: object = LOST) -> tuple[float, ev.Event]:
    return (at, ev.FailureDetected(target="t", elapsed=0.0, failure=failure,  # type: ignore[arg-type]
                                   phase="unit", attempt=1, error="terminating connection"))


def req(kind: str, start: float, end: float, *, ok: bool = True,
        events: list[tuple[float, ev.Event]] | None = None, seq: int | None = None) -> Request:
    r = Request(kind, 0, start, end, ok=ok, seq=seq)  # type: ignore[arg-type]
    if not ok:
        r.failure = REFUSED
        r.message = "RetriesExhausted: gave up"
    r.events = events or []
    return r


def steady(kind: str, start: float, end: float, step: float = 0.1) -> list[Request]:
    count = round((end - start) / step)
    return [req(kind, start + i * step, start + i * step + 0.002) for i in range(count)]


def test_a_retried_request_makes_a_window_from_the_last_good_to_its_completion() -> None:
    reqs = [
        *steady("write", 0.0, 1.0),
        req("write", 1.05, 1.6, events=[detected(1.06)]),
        *steady("write", 1.7, 2.5),
    ]
    [w] = find_windows(reqs, "write")
    assert w.start == pytest.approx(0.902)  # the last good completion before
    assert w.end == pytest.approx(1.6)
    assert w.first_error_at == pytest.approx(1.06)
    assert w.first_error is not None
    assert w.first_error.sqlstate == "57P01"
    assert w.detect_seconds == pytest.approx(0.01)
    assert w.reconnect_seconds == pytest.approx(0.54)
    assert (w.failed, w.retried) == (0, 1)


def test_failed_requests_then_a_good_one_are_one_window() -> None:
    reqs = [
        *steady("read", 0.0, 0.5),
        req("read", 0.5, 0.6, ok=False),
        req("read", 0.7, 0.8, ok=False),
        req("read", 0.9, 0.95),
        *steady("read", 1.0, 1.5),
    ]
    [w] = find_windows(reqs, "read")
    assert (w.failed, w.retried) == (2, 0)
    assert w.end == pytest.approx(0.95)
    assert w.first_error_at == pytest.approx(0.6)  # a failed request's error is its end


def test_an_outage_that_never_ends_has_no_end() -> None:
    reqs = [*steady("write", 0.0, 0.5), req("write", 0.6, 0.7, ok=False)]
    [w] = find_windows(reqs, "write")
    assert w.end is None
    assert w.seconds is None
    assert w.reconnect_seconds is None


def test_a_stalled_request_is_an_outage_though_nothing_raised() -> None:
    # A session that hung in a partition and went on when the network healed.
    reqs = [*steady("read", 0.0, 1.0), req("read", 1.0, 5.0), *steady("read", 5.1, 6.0)]
    [w] = find_windows(reqs, "read")
    assert w.end == pytest.approx(5.0)
    assert w.failed == 0
    # A bit slower than usual is not.
    assert find_windows([*steady("read", 0, 1), req("read", 1.0, 1.2)], "read") == []


def test_a_request_in_flight_at_a_pool_failover_is_troubled() -> None:
    reqs = [*steady("write", 0.0, 1.0), req("write", 1.0, 1.3), *steady("write", 1.4, 2.0)]
    assert find_windows(reqs, "write") == []
    [w] = find_windows(reqs, "write", overlaps=[1.1])
    assert w.end == pytest.approx(1.3)


def test_quiet_runs_have_no_windows_and_one_phase() -> None:
    reqs = steady("write", 0.0, 2.0)
    assert find_windows(reqs, "write") == []
    [before] = phases(reqs, [], 0.0, 2.0)
    assert before.name == "before"
    assert before.requests == len(reqs)


def test_windows_of_both_kinds_that_overlap_are_one_incident() -> None:
    reqs = (steady("write", 0, 1) + steady("read", 0.05, 1)
            + [req("write", 1.0, 1.5, events=[detected(1.01)]),
               req("read", 1.05, 1.55, events=[detected(1.06)])]
            + steady("write", 1.6, 5) + steady("read", 1.65, 5)
            + [req("write", 5.0, 5.4, events=[detected(5.01)])] + steady("write", 5.5, 6))
    windows = find_windows(reqs, "write") + find_windows(reqs, "read")
    groups = merge_incidents(windows)
    assert [len(g) for g in groups] == [2, 1]


def test_phases_split_before_during_after() -> None:
    reqs = steady("write", 0, 1) + steady("write", 3, 4)
    incident = Incident(start=1.0, end=3.0, windows=[])
    before, during, after = phases(reqs, [incident], 0.0, 4.0)
    assert (before.requests, during.requests, after.requests) == (10, 0, 10)
    assert before.per_second == pytest.approx(10.0)
    assert during.seconds == pytest.approx(2.0)


def test_write_check_finds_lost_and_doubled_writes() -> None:
    check = write_check({1: 1, 2: 2, 4: 1}, acknowledged={1, 2, 3}, unacknowledged={4, 5})
    assert check.lost == [3]
    assert check.doubled == [2]
    assert check.present_once == 1
    assert (check.unacknowledged, check.unacknowledged_committed) == (2, 1)
    assert not check.ok
    assert write_check({1: 1, 2: 1}, {1, 2}, set()).ok


def ident(started: str = "s1", **kw: object) -> ServerIdentity:
    base = {"address": "127.0.0.1", "port": 5432, "started": started, "in_recovery": False,
            "timeline": 1, "system_identifier": "42", "name": "node-a"}
    base.update(kw)
    return ServerIdentity(**base)  # type: ignore[arg-type]


@pytest.mark.parametrize(("after", "change"), [
    (ident(), "same server"),
    (ident("s2"), "restarted"),
    (ident("s2", name="node-b"), "restarted"),
    (ident("s2", timeline=2), "promoted"),
    (ident("s2", system_identifier="43"), "different server"),
    (None, "unknown"),
])
def test_server_change(after: ServerIdentity | None, change: str) -> None:
    assert server_change(ident(), after) == change


def test_a_standby_that_became_writable_was_promoted() -> None:
    assert server_change(ident(in_recovery=True, timeline=None),
                         ident("s1", timeline=None)) == "promoted"


def test_errors_seen_counts_absorbed_and_raised_errors_against_the_guide() -> None:
    reqs = [req("write", 0, 1, events=[detected(0.5), detected(0.6, REFUSED)]),
            req("write", 1, 2, ok=False)]
    seen = errors_seen(reqs, guide_codes=GUIDE_CODES["psycopg"])
    by_code = {(e.sqlstate, e.kind): e for e in seen}
    assert by_code[("57P01", "CONNECTION_LOST")].in_guide is True
    assert by_code[(None, REFUSED.kind.name)].count == 2


def run_of(reqs: list[Request], *, writes: bool = True, rto: float | None = None,
           loose: list[tuple[float, ev.Event]] | None = None) -> object:
    end = max(r.ended for r in reqs)
    records = Records(t0=0.0, t_end=end, requests=reqs, loose_events=loose or [],
                      identities=[(0.0, ident()), (end, ident("s2", name="node-b"))])
    check = write_check({1: 1}, {1}, set()) if writes else write_check({}, {1}, set())
    return analyse(records, name="x", driver="psycopg", access="connection", rto=rto,
                   writes=check)


def test_analyse_judges_the_invariant_and_the_rto() -> None:
    reqs = [
        *steady("write", 0, 1),
        req("write", 1.0, 1.5, events=[detected(1.01)]),
        *steady("write", 1.6, 3),
    ]
    run = run_of(reqs, rto=10)
    assert run.ok  # type: ignore[attr-defined]
    [incident] = run.incidents  # type: ignore[attr-defined]
    assert incident.within_rto is True
    assert incident.server_change == "restarted"
    assert incident.server_after is not None
    assert incident.server_after.name == "node-b"
    names = {f.name: f.status for f in run.findings}  # type: ignore[attr-defined]
    assert names["every acknowledged write present exactly once"] == "ok"
    assert names["outages within --rto 10 s"] == "ok"
    tight = run_of(reqs, rto=0.1)
    assert not tight.ok  # type: ignore[attr-defined]
    lost = run_of(reqs, writes=False)
    assert not lost.ok  # type: ignore[attr-defined]


def test_analyse_counts_replays_and_commit_resolutions() -> None:
    replay = (1.2, ev.UnitReplayed(target="t", elapsed=0.0, attempt=2, reason="lost"))
    resolved = (1.3, ev.CommitResolved(target="t", elapsed=0.0, xid="7", status="committed",
                                       outcome="returned", terminated_old_session=False))
    reqs = [
        *steady("write", 0, 1),
        req("write", 1.0, 1.5, events=[detected(1.01), replay, resolved]),
        *steady("write", 1.6, 2),
    ]
    run = run_of(reqs)
    assert run.units_replayed == 1  # type: ignore[attr-defined]
    assert run.commits == {"returned": 1}  # type: ignore[attr-defined]
    assert run.incidents[0].commits == {"returned": 1}  # type: ignore[attr-defined]


def test_samples_keep_every_troubled_request_and_thin_the_rest() -> None:
    reqs = [*steady("write", 0, 400, step=0.05), req("write", 400, 401, ok=False)]
    kept = samples(reqs, 0.0)
    assert len(kept) <= 3001
    assert any(not s.ok for s in kept)


def test_scenario_findings_check_the_client_window_covers_the_server_outage() -> None:
    reqs = [
        *steady("write", 0, 1),
        req("write", 1.0, 1.5, events=[detected(1.01)]),
        *steady("write", 1.6, 2),
    ]
    run = run_of(reqs)
    good = scenario_findings(run, ServerOutage("switchover", 1.05, 1.45),  # type: ignore[arg-type]
                             GUIDE_CODES["psycopg"])
    assert {f.name: f.status for f in good}["client outage against the server's"] == "ok"
    bad = scenario_findings(run, ServerOutage("switchover", 0.2, 1.45),  # type: ignore[arg-type]
                            GUIDE_CODES["psycopg"])
    assert {f.name: f.status for f in bad}["client outage against the server's"] == "warn"


def test_unknown_scenarios_are_refused_and_quick_is_a_subset() -> None:
    with pytest.raises(InputError, match="unknown scenario nope"):
        select_scenarios(["switchover", "nope"], quick=False)
    quick = {s.name for s in select_scenarios(None, quick=True)}
    assert quick == {"switchover", "node_down", "lost_commit"}
    assert quick < {s.name for s in select_scenarios(None, quick=False)}


# Any sequence of requests (stalls among them, as noise): every failed or retried one
# lies inside a window, windows of a kind
# never overlap, and each window starts before its first error.
outcome = st.sampled_from(["good", "good", "good", "failed", "retried", "stalled"])


@settings(max_examples=200, deadline=None)
@given(st.lists(outcome, min_size=1, max_size=60))
def test_every_troubled_request_lies_in_a_window(outcomes: list[str]) -> None:
    reqs = []
    t = 0.0
    for o in outcomes:
        length = 2.0 if o == "stalled" else 0.01
        events = [detected(t + 0.001)] if o == "retried" else []
        reqs.append(req("write", t, t + length, ok=o != "failed", events=events))
        t += length + 0.05
    windows = find_windows(reqs, "write")
    for r in reqs:
        if r.troubled:
            assert any(w.start <= r.started and (w.end is None or r.started <= w.end)
                       for w in windows), (r, windows)
    for a, b in itertools.pairwise(windows):
        assert a.end is not None
        assert a.end <= b.start + 1e-9
    for w in windows:
        assert w.start <= w.first_error_at + 1e-9


def test_odbc_string_carries_the_libpq_settings_and_refuses_several_hosts() -> None:
    from symfo_failover._canary import odbc_string, parse_conninfo

    params = parse_conninfo("host=127.0.0.1 port=5433 dbname=app user=me password=p}w "
                            "keepalives_idle=1 tcp_user_timeout=2000")
    text = odbc_string(params)
    assert "Server=127.0.0.1;" in text
    assert "Port=5433;" in text
    assert "Pwd={p}}w};" in text  # braced, a } doubled
    assert "KeepaliveTime=1;" in text
    assert "pqopt={tcp_user_timeout=2000};" in text
    with pytest.raises(InputError, match="one host"):
        odbc_string(parse_conninfo("host=a,b dbname=app"))


def test_a_description_never_has_the_password() -> None:
    from symfo_failover._canary import describe, parse_conninfo

    text = describe(parse_conninfo("host=db port=5432 user=me password=hunter2 dbname=x"))
    assert text == "me@db:5432/x"
    assert "hunter2" not in text


@pytest.mark.parametrize("bad", ["", "   ", "host=a port", "nonsense"])
def test_a_bad_connection_string_is_an_input_error(bad: str) -> None:
    from symfo_failover._canary import parse_conninfo

    with pytest.raises(InputError):
        parse_conninfo(bad)


def test_unanswered_turns_failed_identity_reads_into_outages() -> None:
    from symfo_failover._canary import unanswered

    samples = [(0.0, ident()), (1.0, None), (2.0, None), (3.0, ident("s2")), (4.0, None)]
    first, last = unanswered(samples, 0.0, every=1.0)
    assert (first.down_at, first.accepting_at) == (0.0, 3.0)
    assert (last.down_at, last.accepting_at) == (3.0, None)
