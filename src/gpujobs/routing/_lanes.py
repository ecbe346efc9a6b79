"""What a router is built from (:class:`Route`, :class:`Hedge`); its state per runner and job."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpujobs._models import JobHandle, JobResult
from gpujobs._polling import Deadline
from gpujobs._runner import JobRunner
from gpujobs.routing._breaker import BreakerConfig, CircuitBreaker
from gpujobs.routing._estimates import Priors, RunnerStats

__all__ = ["Hedge", "Route"]


@dataclass(frozen=True)
class Route:
    """A runner in a router, with what the router should assume and limit for it.

    Args:
        runner: the runner.
        priors: what to expect before anything was observed (service time, cold starts,
            concurrency: 1 for a pod).
        max_in_flight: a bulkhead: at most this many of the router's jobs at the runner at once;
            when full, jobs go to the next runner.
        breaker: this runner's breaker settings (default: the router's).
    """

    runner: JobRunner
    priors: Priors = field(default_factory=Priors)
    max_in_flight: int | None = None
    breaker: BreakerConfig | None = None


@dataclass(frozen=True, slots=True)
class Hedge:
    """Start a copy of a slow job on the next runner; the first result wins.

    ``delay_s`` fixes when; ``None`` uses the primary's observed ``quantile`` of latency once
    ``min_samples`` jobs were seen (``fallback_s`` before that). Each hedge spends the retry
    budget, so hedging cannot double the load.
    """

    delay_s: float | None = None
    quantile: float = 0.95
    min_samples: int = 20
    fallback_s: float = 30.0


class _Lane:
    """One runner as the router sees it: breaker, statistics, bulkhead (shared across tasks)."""

    def __init__(self, route: Route, breaker: BreakerConfig, clock: Callable[[], float]) -> None:
        self.route = route
        self.runner = route.runner
        self.name = route.runner.name
        self.breaker = CircuitBreaker(route.breaker or breaker, clock)
        self.stats = RunnerStats(route.priors)

    def has_room(self) -> bool:
        limit = self.route.max_in_flight
        return limit is None or self.stats.in_flight < limit


@dataclass
class _Job:
    id: str
    payload: Mapping[str, Any]
    lanes: list[_Lane]
    deadline: Deadline
    submitted_at: float
    caller_deadline: bool  # the caller gave a timeout (else the router's default bounds it)
    tried: set[int] = field(default_factory=set)
    attempt_started: float = 0.0  # clock time the latest attempt went out
    handle: JobHandle | None = None  # the job at its current runner (submit/wait only)
    lane: _Lane | None = None
    lane_key: int | None = None  # the submitted job's place in its lane's count (submit/wait)
    outcome: asyncio.Future[JobResult] | None = None  # set once the job is being driven
    result: JobResult | None = None
    attempts: int = 0
