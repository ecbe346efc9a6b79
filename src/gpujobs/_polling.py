"""The one deadline-aware polling loop, and the deadline it honours.

Every runner that has to ask "is it done yet?" uses :func:`poll_until_terminal`. Polls start fast
(most jobs on a warm worker end within seconds) and back off towards ``max_interval_s``; no sleep
ever runs past the caller's deadline. Transient errors of a single poll (a retryable
:class:`ProviderError`: a 5xx, a dropped connection, a 429) count as a poll with no news: the
loop keeps going within its deadline, and only gives up after ``max_consecutive_errors`` such
polls in a row. That is the only retry layer for polls, so retries never stack.
"""

from __future__ import annotations

import asyncio
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import anyio

from gpujobs._errors import GpuJobsError, JobTimeoutError, ProviderError
from gpujobs._models import JobState

__all__ = ["Deadline", "PollSchedule", "poll_until_terminal"]


def _now() -> float:
    # The event loop's clock: what anyio.current_time() reads on asyncio, without loading anyio's
    # backend (11 ms, once) on the fast path, where nothing else needs it.
    return asyncio.get_running_loop().time()


@dataclass(frozen=True, slots=True)
class Deadline:
    """A point in time on the event loop's monotonic clock, or none (``at is None``)."""

    at: float | None

    @classmethod
    def after(cls, seconds: float | None) -> Deadline:
        """The deadline ``seconds`` from now; ``None`` means no deadline."""
        if seconds is None:
            return cls(None)
        if seconds < 0 or math.isnan(seconds):
            msg = f"a timeout must be a non-negative number of seconds, not {seconds!r}"
            raise ValueError(msg)
        return cls(_now() + seconds)

    def remaining(self) -> float | None:
        """Seconds left (never negative), or ``None`` without a deadline."""
        if self.at is None:
            return None
        return max(0.0, self.at - _now())

    @property
    def expired(self) -> bool:
        """Whether the deadline has passed."""
        return self.at is not None and _now() >= self.at

    def cap(self, seconds: float) -> float:
        """``seconds``, or less if the deadline comes first."""
        left = self.remaining()
        return seconds if left is None else min(seconds, left)


@dataclass(frozen=True, slots=True)
class PollSchedule:
    """How often to look: ``first_s``, then ×``factor`` per poll up to ``max_interval_s``.

    ``jitter`` spreads polls of jobs submitted together (a fraction of the interval, ±).
    """

    first_s: float = 0.1
    factor: float = 1.5
    max_interval_s: float = 2.0
    jitter: float = 0.1
    max_consecutive_errors: int = 8

    def intervals(self) -> _Intervals:
        """A fresh sequence of sleep intervals."""
        return _Intervals(self)


class _Intervals:
    def __init__(self, schedule: PollSchedule) -> None:
        self._schedule = schedule
        self._next = schedule.first_s

    def __next__(self) -> float:
        base = self._next
        self._next = min(base * self._schedule.factor, self._schedule.max_interval_s)
        spread = base * self._schedule.jitter
        return max(0.0, base + random.uniform(-spread, spread))  # noqa: S311 - not for secrets


async def poll_until_terminal(
    look: Callable[[], Awaitable[JobState]],
    *,
    deadline: Deadline,
    schedule: PollSchedule,
    job_id: str,
    provider: str,
) -> JobState:
    """Call ``look`` until the job is terminal or the deadline passes.

    Raises:
        JobTimeoutError: the deadline passed first (the caller decides whether to cancel).
        GpuJobsError: a non-retryable error from ``look``, or too many retryable ones in a row.
    """
    intervals = schedule.intervals()
    errors_in_a_row = 0
    while True:
        # The look after the last (deadline-capped) sleep still counts: a job that ended just now
        # is better than a timeout.
        try:
            # A single look may not outlive the deadline either (a slow or hung request).
            with anyio.move_on_after(deadline.remaining()) as scope:
                state = await look()
            if scope.cancelled_caught:
                raise _timeout(provider, job_id)
        except GpuJobsError as exc:
            errors_in_a_row += 1
            transient = isinstance(exc, ProviderError) and exc.retryable
            if not transient or errors_in_a_row >= schedule.max_consecutive_errors:
                raise
            if deadline.expired:
                raise _timeout(provider, job_id) from exc
            wait = max(next(intervals), exc.retry_after or 0.0)
        else:
            if state.status.is_terminal:
                return state
            if deadline.expired:
                raise _timeout(provider, job_id)
            errors_in_a_row = 0
            wait = next(intervals)
        await anyio.sleep(deadline.cap(wait))


def _timeout(provider: str, job_id: str) -> JobTimeoutError:
    return JobTimeoutError(
        "the deadline passed before the job ended", provider=provider, job_id=job_id
    )
