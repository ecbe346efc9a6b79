"""The retry budget: how many retries and failovers the router may add on top of first attempts.

Finagle's and Envoy's model: over a sliding window of ``window_s`` seconds, retries may reach
``ratio`` × first attempts plus a floor of ``min_per_s`` × ``window_s`` (so a quiet router can
still retry). During an outage every job fails and wants a retry; the budget keeps the extra load
at about ``ratio`` instead of multiplying it by the number of runners.

State is per process (per :class:`Router`): several replicas each keep their own budget.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["RetryBudget", "RetryBudgetConfig"]


@dataclass(frozen=True, slots=True)
class RetryBudgetConfig:
    """Retries allowed per first attempt (``ratio``), a floor per second, and the window."""

    ratio: float = 0.2
    min_per_s: float = 3.0
    window_s: float = 10.0


class RetryBudget:
    """Counts first attempts and retries over a sliding window; says whether one more may go."""

    def __init__(self, config: RetryBudgetConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self._clock = clock
        self._attempts: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.refused = 0

    def _trim(self, now: float) -> None:
        horizon = now - self.config.window_s
        for times in (self._attempts, self._retries):
            while times and times[0] <= horizon:
                times.popleft()

    def record_attempt(self) -> None:
        """A job's first attempt went out."""
        now = self._clock()
        self._trim(now)
        self._attempts.append(now)

    def try_spend(self) -> bool:
        """Take one retry from the budget if there is one left."""
        now = self._clock()
        self._trim(now)
        allowed = (
            self.config.ratio * len(self._attempts) + self.config.min_per_s * self.config.window_s
        )
        if len(self._retries) + 1 > allowed:
            self.refused += 1
            return False
        self._retries.append(now)
        return True
