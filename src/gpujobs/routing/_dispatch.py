"""How a router carries one job: choosing a runner, attempts, failover, hedging.

:class:`Router` holds the jobs and the public API; this holds what happens between a job's
arrival and its end. Everything here works on lanes (one per runner, shared across tasks).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import anyio

from gpujobs._errors import (
    AuthenticationError,
    CapacityError,
    GpuJobsError,
    JobLostError,
    JobTimeoutError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from gpujobs._models import JobResult
from gpujobs._retry import retry_observer
from gpujobs.routing._budget import RetryBudget
from gpujobs.routing._events import EventKind
from gpujobs.routing._lanes import Hedge, _Job, _Lane
from gpujobs.routing._policies import Candidate, RoutingPolicy

__all__: list[str] = []

_CANCEL_GRACE_S = 10.0

Emit = Callable[..., None]


class _Dispatcher:
    """Choosing, attempting, failing over and hedging, for one router."""

    def __init__(
        self,
        *,
        name: str,
        policy: RoutingPolicy,
        hedge: Hedge | None,
        failover_on: tuple[type[GpuJobsError], ...],
        budget: RetryBudget,
        clock: Callable[[], float],
        emit: Emit,
    ) -> None:
        self._name = name
        self._policy = policy
        self._hedge = hedge
        self._failover_on = failover_on
        self._budget = budget
        self._clock = clock
        self._emit = emit
        self._attempt_keys = itertools.count()
        self._room_waiters: list[asyncio.Future[None]] = []
        self.extra_submissions = 0  # attempts whose job may also be queued elsewhere

    async def pick(self, job: _Job) -> tuple[_Lane, str]:
        """The lane for the job's next attempt (admitted by its breaker), and why.

        When every untried runner's bulkhead is full, wait (within the deadline) for room.
        """
        while not any(job.lanes[i].has_room() for i in self._untried(job)):
            if not self._untried(job):
                break
            room = asyncio.get_running_loop().create_future()
            self._room_waiters.append(room)
            left = job.deadline.remaining()
            try:
                await asyncio.wait_for(room, timeout=left)
            except TimeoutError:
                msg = "no runner had room for the job before its deadline"
                raise JobTimeoutError(msg, provider=self._name, job_id=job.id) from None
        return self._choose(job)

    def _untried(self, job: _Job) -> list[int]:
        return [i for i in range(len(job.lanes)) if i not in job.tried]

    def _room_freed(self) -> None:
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    def _choose(self, job: _Job) -> tuple[_Lane, str]:
        candidates = [
            Candidate(index=i, name=lane.name, stats=lane.stats)
            for i, lane in enumerate(job.lanes)
            if i not in job.tried and lane.has_room() and lane.breaker.state.value != "open"
        ]
        ordered = self._policy.order(
            candidates,
            now=self._clock(),
            deadline_left_s=job.deadline.remaining() if job.caller_deadline else None,
        )
        for candidate, reason in ordered:
            lane = job.lanes[candidate.index]
            if lane.breaker.admit():
                if candidate.index != 0 and not job.tried:
                    self._emit(EventKind.OVERFLOWED, job, lane, reason=reason)
                return lane, reason
        return self._last_resort(job)

    def _last_resort(self, job: _Job) -> tuple[_Lane, str]:
        # Every untried runner's breaker is open: rather than fail everything at once (a total
        # outage made by the breakers themselves), probe the one that opened longest ago.
        untried = [
            (lane.breaker.opened_at, i)
            for i, lane in enumerate(job.lanes)
            if i not in job.tried and lane.has_room()
        ]
        if not untried:
            msg = "no runner could take the job (all tried, busy or refused)"
            raise ProviderUnavailableError(msg, provider=self._name, job_id=job.id)
        lane = job.lanes[min(untried)[1]]
        lane.breaker.force_admit()
        return lane, "every breaker open: probing the one open longest"

    def failover_or_raise(self, job: _Job, lane: _Lane, exc: GpuJobsError) -> None:
        """After a failed attempt: raise unless the job may move to another runner."""
        job.tried.add(job.lanes.index(lane))
        if not isinstance(exc, self._failover_on) or job.deadline.expired:
            self._emit(EventKind.FAILED, job, lane, error=exc)
            raise exc
        if len(job.tried) >= len(job.lanes):
            self._emit(EventKind.FAILED, job, lane, error=exc)
            raise exc
        if not self._budget.try_spend():
            self._emit(EventKind.RETRY_REFUSED, job, lane, error=exc)
            self._emit(EventKind.FAILED, job, lane, error=exc)
            raise exc
        if isinstance(exc, ProviderError) and exc.job_id is None and exc.request_sent:
            self.extra_submissions += 1  # the runner may have queued it before failing
        self._emit(EventKind.FAILED_OVER, job, lane, error=exc)

    def judge(self, lane: _Lane, exc: BaseException, pending: int = 0) -> None:
        """Tell the lane's breaker what an attempt's error says about the runner."""
        if isinstance(exc, CapacityError | RateLimitedError):
            lane.breaker.release()  # busy or throttled: healthy, just full
        elif isinstance(exc, ProviderError | JobLostError | AuthenticationError):
            lane.breaker.record(success=False, pending=pending)
        elif isinstance(exc, JobTimeoutError) or not isinstance(exc, GpuJobsError):
            lane.breaker.release()  # out of time or cancelled: nothing learned
        else:
            lane.breaker.record(success=True, pending=pending)  # the runner worked; the job not

    async def drive(self, job: _Job, *, cancel_on_timeout: bool = True) -> JobResult:
        """Attempts until one succeeds, the job cannot move on, or the deadline passes."""
        running: dict[asyncio.Task[JobResult], _Lane] = {}
        if job.handle is not None and job.lane is not None and job.lane_key is not None:
            # Submitted: wait where it is, in the attempt that submit started.
            waiting = self._attempt(job, job.lane, job.lane_key, cancel_on_timeout)
            running[asyncio.ensure_future(waiting)] = job.lane
        try:
            while True:
                if not running:
                    lane, reason = await self.pick(job)
                    running[self._start(job, lane, reason, cancel_on_timeout)] = lane
                done, _ = await asyncio.wait(
                    running,
                    timeout=self._hedge_wait(job, running),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if not done:
                    self._hedge_now(job, running)
                    continue
                for attempt in done:
                    lane = running.pop(attempt)
                    exc = attempt.exception()
                    if exc is None:
                        job.result = attempt.result()
                        await self._cancel_losers(job, running)
                        return job.result
                    if not isinstance(exc, GpuJobsError):
                        raise exc
                    if running:  # a hedge is still going: let it finish instead
                        job.tried.add(job.lanes.index(lane))
                        continue
                    self.failover_or_raise(job, lane, exc)
        finally:
            if running:
                await self._cancel_losers(job, running)

    async def submit(self, job: _Job) -> None:
        """Queue the job at the best runner that takes it.

        It stays counted there until :meth:`drive` (the caller's ``wait``) or :meth:`release`
        sees it end.
        """
        while job.handle is None:
            lane, reason = await self.pick(job)
            key = self._occupy(job, lane, reason)
            try:
                job.handle = await lane.runner.submit(job.payload, timeout=job.deadline.remaining())
            except GpuJobsError as exc:
                self.release(lane, key)
                self.judge(lane, exc, pending=lane.stats.in_flight)
                self.failover_or_raise(job, lane, exc)
            else:
                job.lane, job.lane_key = lane, key

    def release(self, lane: _Lane, key: int) -> None:
        """The job of attempt ``key`` no longer occupies the runner."""
        lane.stats.started.pop(key, None)
        self._room_freed()

    def _occupy(self, job: _Job, lane: _Lane, reason: str) -> int:
        """A new attempt at ``lane``, counted there at once.

        Not when its task first runs: the next job's choice (in the same gather) must see it.
        """
        job.attempts += 1
        job.attempt_started = self._clock()
        self._emit(EventKind.STARTED, job, lane, reason=reason)
        if job.attempts == 1:
            self._budget.record_attempt()
        key = next(self._attempt_keys)
        lane.stats.started[key] = job.attempt_started
        return key

    def _start(
        self, job: _Job, lane: _Lane, reason: str, cancel_on_timeout: bool
    ) -> asyncio.Task[JobResult]:
        key = self._occupy(job, lane, reason)
        return asyncio.ensure_future(self._attempt(job, lane, key, cancel_on_timeout))

    async def _attempt(
        self, job: _Job, lane: _Lane, key: int, cancel_on_timeout: bool
    ) -> JobResult:
        started = job.attempt_started
        # This task's own context: the runner's retries within this attempt are reported here.
        retry_observer.set(partial(self._on_retry, job, lane))
        timeout = job.deadline.remaining()
        try:
            if job.handle is not None and job.lane is lane:
                result = await lane.runner.wait(
                    job.handle, timeout=timeout, cancel_on_timeout=cancel_on_timeout
                )
            elif self._hedge is not None:
                # A hedge's loser is cancelled by id, so hedged attempts are submitted and
                # waited for: a runner's one-request fast path has no id until it answers.
                handle = await lane.runner.submit(job.payload, timeout=timeout)
                result = await lane.runner.wait(handle, timeout=job.deadline.remaining())
            else:
                job.lane, job.handle = lane, None
                result = await lane.runner.run(job.payload, timeout=timeout)
        except BaseException as exc:
            self.judge(lane, exc, pending=lane.stats.in_flight - 1)
            raise
        finally:
            self.release(lane, key)
            if job.lane_key == key:
                job.lane_key = None
        lane.breaker.record(success=True, pending=lane.stats.in_flight)
        lane.stats.observe(result, self._clock() - started)
        self._emit(
            EventKind.COMPLETED, job, lane, cost=result.cost, elapsed_s=self._clock() - started
        )
        return result

    def _on_retry(
        self, job: _Job, lane: _Lane, exc: GpuJobsError, attempt: int, pause: float
    ) -> None:
        reason = f"{lane.name} retries request {attempt + 1} in {pause:.2f} s"
        self._emit(EventKind.RETRIED, job, lane, reason=reason, error=exc)

    def _hedge_wait(self, job: _Job, running: Mapping[Any, _Lane]) -> float | None:
        """Seconds until a hedge is due (``None``: no hedge for this job)."""
        if self._hedge is None or len(running) != 1 or len(job.tried) + 1 >= len(job.lanes):
            return None
        lane = next(iter(running.values()))
        delay = self._hedge.delay_s
        if delay is None:
            enough = lane.stats.completed >= self._hedge.min_samples
            observed = lane.stats.latency_quantile(self._hedge.quantile) if enough else None
            delay = observed if observed is not None else self._hedge.fallback_s
        return max(0.0, job.deadline.cap(job.attempt_started + delay - self._clock()))

    def _hedge_now(self, job: _Job, running: dict[asyncio.Task[JobResult], _Lane]) -> None:
        first = next(iter(running.values()))
        job.tried.add(job.lanes.index(first))
        if job.deadline.expired:
            return
        if not self._budget.try_spend():
            self._emit(EventKind.RETRY_REFUSED, job, first, reason="no budget for a hedge")
            self._hedge_off(job)
            return
        if not any(job.lanes[i].has_room() for i in self._untried(job)):
            self._hedge_off(job)
            return
        try:
            lane, reason = self._choose(job)
        except ProviderUnavailableError:
            self._hedge_off(job)
            return
        self._emit(EventKind.HEDGED, job, lane, reason=f"{first.name} slow; {reason}")
        running[self._start(job, lane, reason, cancel_on_timeout=True)] = lane

    def _hedge_off(self, job: _Job) -> None:
        job.tried = set(range(len(job.lanes)))  # nothing left to hedge with

    async def _cancel_losers(
        self, job: _Job, running: dict[asyncio.Task[JobResult], _Lane]
    ) -> None:
        """Cancel attempts still going; each runner cancels its remote job on the way out."""
        for attempt, lane in running.items():
            attempt.cancel()
            if job.result is not None:
                self._emit(EventKind.CANCELLED_LOSER, job, lane)
        with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
            await asyncio.gather(*running, return_exceptions=True)
        running.clear()
