"""The breaker and the retry budget on a hand-driven clock."""

from __future__ import annotations

import pytest

from gpujobs.routing import (
    BreakerConfig,
    BreakerState,
    CircuitBreaker,
    RetryBudget,
    RetryBudgetConfig,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def state_of(breaker: CircuitBreaker) -> BreakerState:
    return breaker.state  # read afresh each time: the clock moves it


def test_consecutive_failures_open_the_breaker() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=3, min_calls=100), clock)
    for _ in range(2):
        breaker.record(success=False)
    assert state_of(breaker) is BreakerState.CLOSED
    breaker.record(success=False)
    assert state_of(breaker) is BreakerState.OPEN
    assert not breaker.admit()


def test_the_failure_ratio_opens_it_once_enough_calls_were_seen() -> None:
    clock = Clock()
    config = BreakerConfig(failure_ratio=0.5, window=10, min_calls=4, consecutive_failures=99)
    breaker = CircuitBreaker(config, clock)
    for success in (True, False, True):
        breaker.record(success=success)
    assert state_of(breaker) is BreakerState.CLOSED  # 3 calls: too few to judge
    breaker.record(success=False)  # 2 of 4 failed
    assert state_of(breaker) is BreakerState.OPEN


def test_half_open_admits_only_the_configured_probes() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_s=30, probes=2), clock)
    breaker.record(success=False)
    clock.now += 29.9
    assert not breaker.admit()
    clock.now += 0.2
    admitted = [breaker.admit() for _ in range(10)]  # a burst arrives as it turns half-open
    assert admitted.count(True) == 2
    assert state_of(breaker) is BreakerState.HALF_OPEN
    breaker.record(success=True)
    assert state_of(breaker) is BreakerState.HALF_OPEN  # one probe back is not enough
    breaker.record(success=True)
    assert state_of(breaker) is BreakerState.CLOSED
    assert breaker.admit()


def test_a_failed_probe_opens_it_again_for_a_full_period() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_s=10), clock)
    breaker.record(success=False)
    clock.now += 10
    assert breaker.admit()
    breaker.record(success=False)
    assert state_of(breaker) is BreakerState.OPEN
    clock.now += 9
    assert not breaker.admit()


def test_a_released_probe_frees_its_permit() -> None:
    clock = Clock()
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=1, open_s=1, probes=1), clock)
    breaker.record(success=False)
    clock.now += 1
    assert breaker.admit()
    assert not breaker.admit()
    breaker.release()  # the probe was cancelled: it told nothing
    assert breaker.admit()


def test_bad_breaker_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="failure_ratio"):
        BreakerConfig(failure_ratio=0)
    with pytest.raises(ValueError, match="at least 1"):
        BreakerConfig(probes=0)


def test_the_budget_allows_a_share_of_attempts_plus_a_floor() -> None:
    clock = Clock()
    budget = RetryBudget(RetryBudgetConfig(ratio=0.2, min_per_s=0.5, window_s=10), clock)
    for _ in range(100):
        budget.record_attempt()
    allowed = sum(budget.try_spend() for _ in range(100))
    assert allowed == 25  # 20% of 100, plus 0.5/s over 10 s
    assert budget.refused == 75
    clock.now += 10.1  # the window moved on: attempts and retries forgotten
    assert sum(budget.try_spend() for _ in range(10)) == 5


def test_fast_failures_after_a_burst_do_not_trip_a_healthy_runner() -> None:
    # 200 jobs go out; the 26 that fail answer at once, before any success comes back.
    breaker = CircuitBreaker(BreakerConfig(consecutive_failures=5, min_calls=20), Clock())
    for pending in range(199, 173, -1):
        breaker.record(success=False, pending=pending)
    assert state_of(breaker) is BreakerState.CLOSED
    # An outage: everything fails fast. The breaker opens once failures outweigh the jobs
    # still out, well before the last of them failed.
    opened_with_pending = None
    for pending in range(173, -1, -1):
        breaker.record(success=False, pending=pending)
        if state_of(breaker) is BreakerState.OPEN:
            opened_with_pending = pending
            break
    assert opened_with_pending is not None
    assert opened_with_pending >= 50
