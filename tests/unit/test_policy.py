"""RetryPolicy: validation, the delays, and the tenacity loop with a fake clock."""

from __future__ import annotations

import pytest
import tenacity
from hypothesis import given
from hypothesis import strategies as st

from symfo_failover import RetryPolicy


class FakeTime:
    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Boom(Exception):
    pass


def test_defaults_are_for_production() -> None:
    policy = RetryPolicy()
    assert policy.deadline == 60.0
    assert policy.first_delay == 0.02
    assert policy.max_delay == 0.16
    assert 0 < policy.jitter < 1
    assert policy.attempts is None


@pytest.mark.parametrize(
    "kwargs",
    [
        {"deadline": -1},
        {"deadline": float("inf")},
        {"first_delay": -0.1},
        {"max_delay": 0.01, "first_delay": 0.02},
        {"jitter": 1.5},
        {"attempts": 0},
        {"deadline": "10"},
    ],
)
def test_bad_values_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError, match="RetryPolicy"):
        RetryPolicy(**kwargs)  # type: ignore[arg-type]


def test_delays_double_up_to_the_cap_without_jitter() -> None:
    policy = RetryPolicy(first_delay=0.1, max_delay=0.5, jitter=0.0)
    assert [policy.delay(n) for n in range(1, 6)] == [0.1, 0.2, 0.4, 0.5, 0.5]


@given(st.integers(min_value=1, max_value=10_000), st.floats(0, 1, exclude_max=True))
def test_jitter_only_shortens(n: int, r: float) -> None:
    policy = RetryPolicy(jitter=0.5, random=lambda: r)
    plain = RetryPolicy(jitter=0.0).delay(n)
    assert plain * 0.5 <= policy.delay(n) <= plain


def test_gives_up_exactly_at_the_deadline_and_tries_there_once_more() -> None:
    t = FakeTime()
    policy = RetryPolicy(deadline=1.0, jitter=0.0, clock=t.clock, sleep=t.sleep)
    tries: list[float] = []

    def loop() -> None:
        for attempt in policy.retrying(Boom):
            with attempt:
                tries.append(t.now - 100.0)
                raise Boom

    with pytest.raises(tenacity.RetryError):
        loop()
    assert tries[0] == 0.0
    assert tries[-1] == pytest.approx(1.0)
    assert sum(t.sleeps) == pytest.approx(1.0)
    assert max(t.sleeps) <= 0.16
    # Waits 0.02, 0.04, 0.08, five of 0.16, then the 0.06 left: no storm.
    assert t.sleeps[:3] == pytest.approx([0.02, 0.04, 0.08])
    assert t.sleeps[3:8] == pytest.approx([0.16] * 5)
    assert len(tries) == 10


def test_attempts_limit() -> None:
    t = FakeTime()
    policy = RetryPolicy(attempts=3, clock=t.clock, sleep=t.sleep)
    count = 0

    def loop() -> None:
        nonlocal count
        for attempt in policy.retrying(Boom):
            with attempt:
                count += 1
                raise Boom

    with pytest.raises(tenacity.RetryError):
        loop()
    assert count == 3


def test_other_errors_pass_through_at_once() -> None:
    t = FakeTime()
    policy = RetryPolicy(clock=t.clock, sleep=t.sleep)
    def loop() -> None:
        for attempt in policy.retrying(Boom):
            with attempt:
                raise KeyError("x")

    with pytest.raises(KeyError):
        loop()
    assert t.sleeps == []


def test_success_returns_without_sleeping_again() -> None:
    t = FakeTime()
    policy = RetryPolicy(clock=t.clock, sleep=t.sleep, jitter=0.0)
    calls = 0
    for attempt in policy.retrying(Boom):
        with attempt:
            calls += 1
            if calls < 3:
                raise Boom
    assert calls == 3
    assert t.sleeps == [0.02, 0.04]
