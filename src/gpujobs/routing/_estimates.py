"""What the router has seen of each runner: service times, cold starts, latency, jobs in flight.

Estimates start from priors (configuration) and move towards observed values with an
exponentially weighted moving average, so one odd job does not swing the routing: each observed
job moves an estimate by ``weight`` of the way.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

from gpujobs._models import JobResult

__all__ = ["Priors", "RunnerStats"]


@dataclass(frozen=True, slots=True)
class Priors:
    """What to assume of a runner before it has run anything.

    Args:
        service_s: execution time of one job on a warm worker.
        cold_start_s: extra wait when the job meets a cold worker (0 for an always-on pod).
        cold_probability: how likely a job meets a cold worker.
        concurrency: jobs the runner works on at once; ``None`` means elastic (serverless
            scales out, so jobs do not wait behind each other).
        dispatch_s: fixed overhead per job (requests, queueing at the provider when warm).
    """

    service_s: float = 20.0
    cold_start_s: float = 0.0
    cold_probability: float = 0.0
    concurrency: int | None = None
    dispatch_s: float = 0.5


class RunnerStats:
    """Observed behaviour of one runner, as seen by one router."""

    def __init__(self, priors: Priors, *, weight: float = 0.2, latencies_kept: int = 200) -> None:
        self.priors = priors
        self.service_s = priors.service_s
        self.cold_start_s = priors.cold_start_s
        self.cold_probability = priors.cold_probability
        self.dispatch_s = priors.dispatch_s
        self._weight = weight
        self._latencies: deque[float] = deque(maxlen=latencies_kept)
        self.started: dict[int, float] = {}  # attempt key -> clock time it was sent
        self.completed = 0
        self.failed = 0

    @property
    def in_flight(self) -> int:
        """Jobs this router has at the runner now."""
        return len(self.started)

    def _move(self, current: float, observed: float) -> float:
        return current + self._weight * (observed - current)

    def observe(self, result: JobResult, elapsed_s: float) -> None:
        """Learn from a finished job (its provider timings and what the caller waited)."""
        self.completed += 1
        self._latencies.append(elapsed_s)
        timings = result.timings
        if timings.execution_s is not None:
            self.service_s = self._move(self.service_s, timings.execution_s)
        if timings.cold_start is not None:
            self.cold_probability = self._move(self.cold_probability, float(timings.cold_start))
            if timings.cold_start and timings.queue_s is not None:
                self.cold_start_s = self._move(self.cold_start_s, timings.queue_s)
            elif timings.queue_s is not None:
                self.dispatch_s = self._move(self.dispatch_s, timings.queue_s)

    def latency_quantile(self, q: float) -> float | None:
        """The ``q`` quantile of observed caller-side latencies (``None`` before any)."""
        if not self._latencies:
            return None
        ordered = sorted(self._latencies)
        return ordered[min(len(ordered) - 1, math.ceil(q * len(ordered)) - 1)]

    def expected_finish_s(self, now: float, *, cold: bool = False) -> float:
        """When a job sent now would be done, from what is in flight and what was observed.

        A runner with a concurrency limit ``c`` and ``n`` jobs in flight: the job waits for the
        running ones to finish (their remaining time, from when they were sent) and for the
        queued ones ahead of it (``service_s`` each, ``c`` at a time), then runs. An elastic
        runner: ``P(cold) × cold start + service`` (``cold=True``: as if the job met a cold
        worker, ``cold start + service``). Both add ``dispatch_s``.
        """
        concurrency = self.priors.concurrency
        own = self.dispatch_s + self.service_s
        if concurrency is None:
            return (1.0 if cold else self.cold_probability) * self.cold_start_s + own
        sent = sorted(self.started.values())
        if len(sent) < concurrency:
            return own
        running, queued = sent[:concurrency], len(sent) - concurrency
        soonest_free = min(max(0.0, self.service_s - (now - t)) for t in running)
        waves = queued // concurrency
        return soonest_free + waves * self.service_s + own
