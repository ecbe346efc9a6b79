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
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any, Self

from gpujobs._errors import (
    ConfigurationError,
    GpuJobsError,
    JobCancelledError,
    JobLostError,
    ProviderError,
)
from gpujobs._models import Health, JobHandle, JobResult, JobState, JobStatus
from gpujobs._polling import Deadline
from gpujobs._runner import JobRunner
from gpujobs.routing._batch import BatchResults, run_batch
from gpujobs.routing._breaker import BreakerConfig
from gpujobs.routing._budget import RetryBudget, RetryBudgetConfig
from gpujobs.routing._dispatch import _Dispatcher
from gpujobs.routing._estimates import RunnerStats
from gpujobs.routing._events import EventKind, RouterEvent, RouterHook
from gpujobs.routing._lanes import Hedge, Route, _Job, _Lane
from gpujobs.routing._policies import Failover, RoutingPolicy

__all__ = ["DEFAULT_FAILOVER_ON", "Router"]

_log = logging.getLogger("gpujobs.routing")

#: Errors that move a job to the next runner: the runner could not take or keep it.
DEFAULT_FAILOVER_ON: tuple[type[GpuJobsError], ...] = (ProviderError, JobLostError)
#: Jobs the router remembers for status/wait/cancel by handle (oldest forgotten first).
_JOBS_KEPT = 100_000


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
        self._hooks = list(hooks)
        self._default_timeout_s = default_timeout_s
        self._budget = RetryBudget(retry_budget or RetryBudgetConfig(), self._clock)
        self._dispatch = _Dispatcher(
            name=self._name,
            policy=policy or Failover(),
            hedge=hedge,
            failover_on=failover_on,
            budget=self._budget,
            clock=self._clock,
            emit=self._emit,
        )
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

    @property
    def name(self) -> str:
        """Label of this router (results keep the name of the runner that produced them)."""
        return self._name

    def __repr__(self) -> str:
        return f"Router(name={self._name!r}, runners={[lane.name for lane in self._lanes]!r})"

    @property
    def extra_submissions(self) -> int:
        """Failed-over attempts whose job the first runner may have queued all the same."""
        return self._dispatch.extra_submissions

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
        return await self._drive_once(job)

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
            await self._dispatch.submit(job)
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
        if state.status.is_terminal:
            self._release(job)
        return state.model_copy(update={"id": job.id})

    async def wait(
        self, handle: JobHandle, *, timeout: float | None = None, cancel_on_timeout: bool = True
    ) -> JobResult:
        """Wait for a submitted job; if its runner loses it, it is run elsewhere."""
        job = self._known(handle)
        if job.result is not None:
            return job.result
        if timeout is not None and job.outcome is None:
            job.deadline, job.caller_deadline = Deadline.after(timeout), True
        return await self._drive_once(job, cancel_on_timeout=cancel_on_timeout)

    async def cancel(self, handle: JobHandle) -> None:
        """Cancel the job at the runner that has it."""
        job = self._known(handle)
        if job.handle is not None and job.lane is not None and job.result is None:
            await job.lane.runner.cancel(job.handle)
            self._release(job)

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

    # -- jobs and events ------------------------------------------------------------------------

    async def _drive_once(self, job: _Job, *, cancel_on_timeout: bool = True) -> JobResult:
        """Drive the job once.

        A second caller (the same idempotency key, the same handle) awaits the first one's
        outcome instead of running the job again.
        """
        if job.outcome is not None:
            return await asyncio.shield(job.outcome)
        job.outcome = asyncio.get_running_loop().create_future()
        try:
            result = await self._dispatch.drive(job, cancel_on_timeout=cancel_on_timeout)
        except BaseException as exc:
            failure = exc
            if not isinstance(exc, GpuJobsError):  # the first caller was cancelled
                msg = "the job was cancelled with the caller that ran it"
                failure = JobCancelledError(msg, provider=self._name, job_id=job.id)
            job.outcome.set_exception(failure)
            job.outcome.exception()  # retrieved: nobody else may be waiting
            raise
        job.outcome.set_result(result)
        return result

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

    def _release(self, job: _Job) -> None:
        """A submitted job seen ended: it no longer counts at its runner."""
        if job.lane is not None and job.lane_key is not None:
            self._dispatch.release(job.lane, job.lane_key)
            job.lane_key = None

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
