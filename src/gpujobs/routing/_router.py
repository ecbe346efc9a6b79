"""``Router``: a :class:`JobRunner` that spreads jobs over other runners.

One overall deadline per job; each attempt gets only what remains (and the runner carries that
into the provider's own limits). Failover to the next runner by error class, a circuit breaker per
runner, a retry budget over all failovers and hedges, optional hedging whose loser is cancelled at
the provider, per-runner bulkheads. The router never retries a runner itself: runners retry what
is safe to retry (polls, throttled requests) within their own bounded policy, and the router only
moves a job to a *different* runner, so retries never stack into (1+N)² calls.

State (breakers, budget, observed timings) is per :class:`Router` object, so per process; several
replicas each judge the runners on their own.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from functools import partial
from types import TracebackType
from typing import Any, Self

import anyio

from gpujobs._errors import (
    AuthenticationError,
    CapacityError,
    ConfigurationError,
    GpuJobsError,
    JobLostError,
    JobTimeoutError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from gpujobs._models import Health, JobHandle, JobResult, JobState, JobStatus
from gpujobs._polling import Deadline
from gpujobs._retry import retry_observer
from gpujobs._runner import JobRunner
from gpujobs.routing._batch import BatchResults, run_batch
from gpujobs.routing._breaker import BreakerConfig
from gpujobs.routing._budget import RetryBudget, RetryBudgetConfig
from gpujobs.routing._estimates import RunnerStats
from gpujobs.routing._events import EventKind, RouterEvent, RouterHook
from gpujobs.routing._lanes import Hedge, Route, _Job, _Lane
from gpujobs.routing._policies import Candidate, Failover, RoutingPolicy

__all__ = ["DEFAULT_FAILOVER_ON", "Router"]

_log = logging.getLogger("gpujobs.routing")

#: Errors that move a job to the next runner: the runner could not take or keep it.
DEFAULT_FAILOVER_ON: tuple[type[GpuJobsError], ...] = (ProviderError, JobLostError)
#: Jobs the router remembers for status/wait/cancel by handle (oldest forgotten first).
_JOBS_KEPT = 100_000
_CANCEL_GRACE_S = 10.0


class Router:
    """Spread jobs over runners; itself a :class:`JobRunner`, so callers do not change.

    Example::

        pod = RunPodPod(base_url=..., name="pod")
        serverless = RunPodServerless("endpoint-id", name="serverless")
        async with Router([Route(pod, priors=Priors(concurrency=1)), serverless],
                          policy=Overflow()) as router:
            result = await router.run(payload, timeout=300)
            result.provider  # "pod" or "serverless"

    ``routes`` is a list (one workload) or a mapping of task name → list, so one router serves
    several endpoints per workload (``run(payload, task="lora-training")``). Closing the router
    closes its runners.
    """

    kind = "router"

    def __init__(
        self,
        routes: Sequence[JobRunner | Route] | Mapping[str, Sequence[JobRunner | Route]],
        *,
        policy: RoutingPolicy | None = None,
        name: str | None = None,
        hedge: Hedge | None = None,
        breaker: BreakerConfig | None = None,
        retry_budget: RetryBudgetConfig | None = None,
        failover_on: tuple[type[GpuJobsError], ...] = DEFAULT_FAILOVER_ON,
        hooks: Sequence[RouterHook] = (),
        default_timeout_s: float = 3600.0,
        clock: Any = None,
    ) -> None:
        tasks = dict(routes) if isinstance(routes, Mapping) else {"default": routes}
        if not tasks or not all(tasks.values()):
            msg = "a router needs at least one runner per task"
            raise ConfigurationError(msg)
        self._name = name or self.kind
        self._clock = clock or _loop_time
        self._policy = policy or Failover()
        self._hedge = hedge
        self._failover_on = failover_on
        self._hooks = list(hooks)
        self._default_timeout_s = default_timeout_s
        self._budget = RetryBudget(retry_budget or RetryBudgetConfig(), self._clock)
        lanes: dict[int, _Lane] = {}  # one lane per runner object, shared by tasks
        self._tasks: dict[str, list[_Lane]] = {}
        for task, entries in tasks.items():
            self._tasks[task] = []
            for entry in entries:
                route = entry if isinstance(entry, Route) else Route(entry)
                key = id(route.runner)
                if key not in lanes:
                    lanes[key] = _Lane(route, breaker or BreakerConfig(), self._clock)
                self._tasks[task].append(lanes[key])
        self._lanes = list(lanes.values())
        self._default_task = next(iter(self._tasks))
        self._jobs: OrderedDict[str, _Job] = OrderedDict()
        self._attempt_keys = itertools.count()
        self._room_waiters: list[asyncio.Future[None]] = []
        self.extra_submissions = 0  # attempts whose job may also be queued elsewhere

    @property
    def name(self) -> str:
        """Label of this router (results keep the name of the runner that produced them)."""
        return self._name

    def __repr__(self) -> str:
        return f"Router(name={self._name!r}, runners={[lane.name for lane in self._lanes]!r})"

    def lane_stats(self) -> dict[str, RunnerStats]:
        """What the router has observed of each runner, by runner name."""
        return {lane.name: lane.stats for lane in self._lanes}

    def breaker_states(self) -> dict[str, str]:
        """Each runner's breaker state, by runner name."""
        return {lane.name: lane.breaker.state.value for lane in self._lanes}

    # -- the JobRunner protocol ----------------------------------------------------------------

    async def run(
        self,
        payload: Mapping[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
        task: str | None = None,
    ) -> JobResult:
        """Run the job on the best runner, failing over and hedging as configured."""
        job = self._new_job(payload, timeout, idempotency_key, task)
        if job.result is not None:
            return job.result
        return await self._drive(job)

    async def submit(
        self,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
        task: str | None = None,
    ) -> JobHandle:
        """Queue the job on the best runner that takes it (failing over if one refuses)."""
        job = self._new_job(payload, timeout, idempotency_key, task)
        if job.handle is None and job.result is None:
            self._budget.record_attempt()
            while job.handle is None:
                lane, reason = await self._pick(job)
                job.attempts += 1
                self._emit(EventKind.STARTED, job, lane, reason=reason)
                try:
                    job.handle = await lane.runner.submit(payload, timeout=job.deadline.remaining())
                except GpuJobsError as exc:
                    self._judge(lane, exc)
                    self._failover_or_raise(job, lane, exc)
                else:
                    job.lane = lane
        return JobHandle(
            id=job.id,
            provider=self._name,
            submitted_at=job.submitted_at,
            idempotency_key=idempotency_key,
        )

    async def status(self, handle: JobHandle) -> JobState:
        """One look at the job at the runner that has it now."""
        job = self._known(handle)
        if job.result is not None:
            return JobState(
                id=job.id,
                provider=job.result.provider,
                status=job.result.status,
                provider_status=job.result.status.value,
                output=job.result.output,
                timings=job.result.timings,
            )
        if job.handle is None or job.lane is None:
            return JobState(
                id=job.id, provider=self._name, status=JobStatus.QUEUED, provider_status="ROUTING"
            )
        state = await job.lane.runner.status(job.handle)
        return state.model_copy(update={"id": job.id})

    async def wait(
        self, handle: JobHandle, *, timeout: float | None = None, cancel_on_timeout: bool = True
    ) -> JobResult:
        """Wait for a submitted job; if its runner loses it, it is run elsewhere."""
        job = self._known(handle)
        if job.result is not None:
            return job.result
        if timeout is not None:
            job.deadline, job.caller_deadline = Deadline.after(timeout), True
        return await self._drive(job, cancel_on_timeout=cancel_on_timeout)

    async def cancel(self, handle: JobHandle) -> None:
        """Cancel the job at the runner that has it."""
        job = self._known(handle)
        if job.handle is not None and job.lane is not None and job.result is None:
            await job.lane.runner.cancel(job.handle)

    async def health(self) -> Health:
        """Healthy while any runner is: each runner's health and breaker in ``detail``."""
        views = await asyncio.gather(
            *(lane.runner.health() for lane in self._lanes), return_exceptions=True
        )
        parts, ok = [], False
        for lane, view in zip(self._lanes, views, strict=True):
            healthy = isinstance(view, Health) and view.ok
            ok = ok or (healthy and lane.breaker.state.value != "open")
            state = "ok" if healthy else "down"
            parts.append(f"{lane.name}: {state}, breaker {lane.breaker.state}")
        return Health(provider=self._name, ok=ok, detail="; ".join(parts))

    async def map(
        self,
        payloads: Sequence[Mapping[str, Any]],
        *,
        concurrency: int = 16,
        return_exceptions: bool = False,
        timeout: float | None = None,
        task: str | None = None,
    ) -> BatchResults:
        """Run a batch through the router, at most ``concurrency`` jobs at once.

        Each finished job emits a ``progress`` event. With ``return_exceptions=False`` the first
        failure cancels the rest (remotely too) and is raised; with ``True`` the batch runs to
        its end and :meth:`BatchResults.summary` tells what failed where.
        """

        def progress(done: int, total: int, index: int, outcome: JobResult | GpuJobsError) -> None:
            job_id = outcome.id if isinstance(outcome, JobResult) else outcome.job_id
            self._emit(EventKind.PROGRESS, job_id or f"#{index}", None, done=done, total=total)

        return await run_batch(
            self,
            payloads,
            concurrency=concurrency,
            return_exceptions=return_exceptions,
            timeout=timeout,
            on_progress=progress,
            task=task,
        )

    async def aclose(self) -> None:
        """Close every runner of the router."""
        for lane in self._lanes:
            await lane.runner.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- choosing ------------------------------------------------------------------------------

    def _new_job(
        self,
        payload: Mapping[str, Any],
        timeout: float | None,
        idempotency_key: str | None,
        task: str | None,
    ) -> _Job:
        if idempotency_key is not None and idempotency_key in self._jobs:
            return self._jobs[idempotency_key]
        lanes = self._tasks.get(task or self._default_task)
        if lanes is None:
            msg = f"no routes for task {task!r}; known: {sorted(self._tasks)}"
            raise ConfigurationError(msg, provider=self._name)
        job = _Job(
            id=uuid.uuid4().hex,
            payload=payload,
            lanes=lanes,
            deadline=Deadline.after(self._default_timeout_s if timeout is None else timeout),
            submitted_at=time.time(),
            caller_deadline=timeout is not None,
        )
        self._remember(job.id, job)
        if idempotency_key is not None:
            self._remember(idempotency_key, job)
        self._emit(EventKind.SUBMITTED, job, None)
        return job

    def _remember(self, key: str, job: _Job) -> None:
        self._jobs[key] = job
        while len(self._jobs) > _JOBS_KEPT:
            self._jobs.popitem(last=False)

    def _known(self, handle: JobHandle) -> _Job:
        job = self._jobs.get(handle.id)
        if job is None:
            msg = "this router does not know the job"
            raise JobLostError(msg, provider=self._name, job_id=handle.id)
        return job

    async def _pick(self, job: _Job) -> tuple[_Lane, str]:
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

    def _failover_or_raise(self, job: _Job, lane: _Lane, exc: GpuJobsError) -> None:
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

    def _judge(self, lane: _Lane, exc: BaseException, pending: int = 0) -> None:
        """Tell the lane's breaker what an attempt's error says about the runner."""
        if isinstance(exc, CapacityError | RateLimitedError):
            lane.breaker.release()  # busy or throttled: healthy, just full
        elif isinstance(exc, ProviderError | JobLostError | AuthenticationError):
            lane.breaker.record(success=False, pending=pending)
        elif isinstance(exc, JobTimeoutError) or not isinstance(exc, GpuJobsError):
            lane.breaker.release()  # out of time or cancelled: nothing learned
        else:
            lane.breaker.record(success=True, pending=pending)  # the runner worked; the job not

    # -- driving one job -----------------------------------------------------------------------

    async def _drive(self, job: _Job, *, cancel_on_timeout: bool = True) -> JobResult:
        """Attempts until one succeeds, the job cannot move on, or the deadline passes."""
        running: dict[asyncio.Task[JobResult], _Lane] = {}
        if job.handle is not None and job.lane is not None:  # submitted: wait where it is
            where = "waiting where it was submitted"
            running[self._start(job, job.lane, where, cancel_on_timeout)] = job.lane
        try:
            while True:
                if not running:
                    lane, reason = await self._pick(job)
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
                    self._failover_or_raise(job, lane, exc)
        finally:
            if running:
                await self._cancel_losers(job, running)

    def _start(
        self, job: _Job, lane: _Lane, reason: str, cancel_on_timeout: bool
    ) -> asyncio.Task[JobResult]:
        job.attempts += 1
        job.attempt_started = self._clock()
        self._emit(EventKind.STARTED, job, lane, reason=reason)
        if job.attempts == 1:
            self._budget.record_attempt()
        # Counted at the runner now, not when the task first runs: the next job's choice (in
        # the same gather) must see this one.
        key = next(self._attempt_keys)
        lane.stats.started[key] = job.attempt_started
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
            self._judge(lane, exc, pending=lane.stats.in_flight - 1)
            raise
        finally:
            lane.stats.started.pop(key, None)
            self._room_freed()
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

    def _emit(
        self,
        kind: EventKind,
        job: _Job | str,
        lane: _Lane | None,
        *,
        reason: str | None = None,
        error: BaseException | None = None,
        **fields: Any,
    ) -> None:
        if not self._hooks:
            return
        event = RouterEvent(
            kind=kind,
            job_id=job if isinstance(job, str) else job.id,
            router=self._name,
            runner=lane.name if lane else None,
            reason=reason,
            error=str(error) if error is not None else None,
            error_type=type(error).__name__ if error is not None else None,
            attempt=0 if isinstance(job, str) else job.attempts,
            **fields,
        )
        for hook in self._hooks:
            try:
                hook(event)
            except Exception:  # noqa: BLE001 - a hook must never fail a job
                _log.exception("a router hook raised; the event is dropped for it")


def _loop_time() -> float:
    return asyncio.get_running_loop().time()
