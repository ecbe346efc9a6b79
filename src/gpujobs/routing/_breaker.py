"""A circuit breaker per runner: closed → open → half-open with a bounded number of probes.

Closed: every job may go; outcomes fill a sliding window of the last ``window`` calls. The breaker
opens when ``consecutive_failures`` calls in a row failed, or when at least ``min_calls`` are in
the window and the share of failures reaches ``failure_ratio`` (Resilience4j's model). Open: no job
goes until ``open_s`` has passed. Half-open: at most ``probes`` jobs are let through, counted
when they are *admitted*, not when they end, so a burst cannot stampede a runner that is just
coming back (the bug of Polly #216). All probes succeeding closes it; any failing opens it again.
Jobs still out at the runner count as not failed yet, so the fast failures that come back first
after a burst do not trip a healthy runner's breaker.

Only failures that say something about the runner count (connection errors, 5xx, lost jobs): a
job that failed in the worker or a refused payload is the caller's problem, not the runner's.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["BreakerConfig", "BreakerState", "CircuitBreaker"]


class BreakerState(StrEnum):
    """Where a breaker stands."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """When a breaker opens and how it tries again. The defaults suit jobs of seconds to minutes.

    Args:
        failure_ratio: share of failures in the window that opens the breaker.
        window: how many recent calls the ratio is taken over.
        min_calls: no ratio is judged on fewer calls than this.
        consecutive_failures: this many failures in a row open it whatever the ratio.
        open_s: how long it stays open before letting probes through.
        probes: jobs admitted while half-open; all must succeed to close it.
    """

    failure_ratio: float = 0.5
    window: int = 50
    min_calls: int = 20
    consecutive_failures: int = 10
    open_s: float = 30.0
    probes: int = 1

    def __post_init__(self) -> None:
        if not 0 < self.failure_ratio <= 1:
            msg = f"failure_ratio must be in (0, 1], not {self.failure_ratio}"
            raise ValueError(msg)
        if min(self.window, self.min_calls, self.consecutive_failures, self.probes) < 1:
            msg = "window, min_calls, consecutive_failures and probes must be at least 1"
            raise ValueError(msg)


class CircuitBreaker:
    """One runner's breaker. ``clock`` is the event loop's (or a test's) monotonic clock."""

    def __init__(self, config: BreakerConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._outcomes: deque[bool] = deque(maxlen=config.window)
        self._in_a_row = 0
        self._opened_at = 0.0
        self._probes_admitted = 0
        self._probes_passed = 0

    @property
    def state(self) -> BreakerState:
        """The state now (an open breaker whose time is up reads as half-open)."""
        if (
            self._state is BreakerState.OPEN
            and self._clock() >= self._opened_at + self.config.open_s
        ):
            self._state = BreakerState.HALF_OPEN
            self._probes_admitted = self._probes_passed = 0
        return self._state

    @property
    def opened_at(self) -> float:
        """When the breaker last opened (clock time); 0 if it never did."""
        return self._opened_at

    def admit(self) -> bool:
        """Whether a job may go to this runner now; a half-open breaker counts it as a probe."""
        state = self.state
        if state is BreakerState.CLOSED:
            return True
        if state is BreakerState.OPEN or self._probes_admitted >= self.config.probes:
            return False
        self._probes_admitted += 1
        return True

    def force_admit(self) -> None:
        """Admit one job as a probe although the breaker is open (every runner's breaker is)."""
        self._state = BreakerState.HALF_OPEN
        self._probes_admitted = 1
        self._probes_passed = 0

    def release(self) -> None:
        """An admitted job ended without telling anything about the runner (cancelled, say)."""
        if self._state is BreakerState.HALF_OPEN and self._probes_admitted > self._probes_passed:
            self._probes_admitted -= 1

    def record(self, *, success: bool, pending: int = 0) -> None:
        """The outcome of an admitted job; ``pending``: jobs still out at the runner.

        Failures come back faster than successes (an error answers at once, a job takes its
        time), so right after a burst the first outcomes are mostly failures even on a healthy
        runner. Jobs still pending count as not failed (yet) in both rules.
        """
        if self._state is BreakerState.HALF_OPEN:
            if not success:
                self._open()
                return
            self._probes_passed += 1
            if self._probes_passed >= self.config.probes:
                self._close()
            return
        if self._state is BreakerState.OPEN:
            return  # a job admitted before the breaker opened: its news is stale
        self._outcomes.append(success)
        self._in_a_row = 0 if success else self._in_a_row + 1
        ratio = self.config.failure_ratio
        failures = self._outcomes.count(False)
        if (
            self._in_a_row >= self.config.consecutive_failures
            and self._in_a_row >= ratio * (self._in_a_row + pending)
        ) or (
            len(self._outcomes) >= self.config.min_calls
            and failures >= ratio * (len(self._outcomes) + pending)
        ):
            self._open()

    def _open(self) -> None:
        self._state = BreakerState.OPEN
        self._opened_at = self._clock()
        self._outcomes.clear()
        self._in_a_row = 0

    def _close(self) -> None:
        self._state = BreakerState.CLOSED
        self._outcomes.clear()
        self._in_a_row = 0
