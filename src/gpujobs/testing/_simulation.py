"""Simulated runners for routing studies: an always-on pod (here) and a serverless endpoint.

Both are real :class:`BaseRunner` subclasses with no I/O: they are driven through the same
``run``/``submit``/``wait``/``cancel`` code as every provider, and are meant to run on the virtual
clock of :func:`run_virtual`, so an hour of traffic takes a second. A job's service time is its
payload's ``duration_s`` when given (a trace decides it), else a seeded draw from ``service_s``
(15–25 s: 4 layers at 640 px on the reference worker, DESIGN.md).

:class:`SimulatedPod` runs one job at a time from a bounded queue (a full queue refuses with
:class:`CapacityError`, as the reference worker's pod server answers 503). Its cost per job is
marginal (0 USD): the pod is paid by the hour whatever it does (``usd_per_hour``).
:class:`SimulatedServerless` is in ``_simulated_serverless.py``.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import deque
from collections.abc import Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from gpujobs._errors import CapacityError, ConfigurationError, JobLostError, JobTimeoutError
from gpujobs._models import Cost, Health, JobHandle, JobState, JobStatus, JobTimings
from gpujobs._polling import Deadline
from gpujobs._runner import BaseRunner

__all__ = ["SimulatedPod"]

#: Service time of one job on the reference worker, 4 layers at 640 px (seed figures).
SERVICE_S = (15.0, 25.0)


def _now() -> float:
    return asyncio.get_running_loop().time()


@dataclass(eq=False)
class _Job:
    id: str
    output: Any
    duration_s: float
    submitted: float
    status: JobStatus = JobStatus.QUEUED
    started: float | None = None
    ended: float | None = None
    cold_start_s: float = 0.0  # the start of the fresh worker this job met (0: warm)
    cold_start: bool = False
    done: asyncio.Event = field(default_factory=asyncio.Event)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    def end(self, status: JobStatus) -> None:
        if not self.status.is_terminal:
            self.status, self.ended = status, _now()
            self.done.set()

    async def execute(self) -> bool:
        """Run for ``duration_s`` unless cancelled first; whether it completed."""
        self.status, self.started = JobStatus.RUNNING, _now()
        try:
            # asyncio.timeout, not wait_for: 3.11's wait_for swallows a cancellation that
            # arrives as the inner wait ends, which would keep a stopped worker alive.
            async with asyncio.timeout(self.duration_s):
                await self.cancelled.wait()
        except TimeoutError:
            self.end(JobStatus.COMPLETED)
        return self.status is JobStatus.COMPLETED


class _SimulatedRunner(BaseRunner):
    """What both simulated runners share: jobs by id, looks, waits and cancels."""

    def __init__(
        self,
        *,
        name: str | None,
        service_s: tuple[float, float],
        seed: int,
        default_timeout_s: float,
    ) -> None:
        super().__init__(name=name, default_timeout_s=default_timeout_s)
        self._service_s = service_s
        self._rng = random.Random(seed)  # noqa: S311 - a simulation, not cryptography
        self._ids = itertools.count(1)
        self._jobs: dict[str, _Job] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.jobs_completed = 0

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _new_job(self, payload: Mapping[str, Any]) -> _Job:
        duration = payload.get("duration_s")
        if not isinstance(duration, int | float):
            duration = self._rng.uniform(*self._service_s)
        job = _Job(
            id=f"{self.name}-{next(self._ids)}",
            output=payload.get("output"),
            duration_s=float(duration),
            submitted=_now(),
        )
        self._jobs[job.id] = job
        return job

    def _handle(self, job: _Job) -> JobHandle:
        # Handles carry the caller's wall clock, as every runner's do; the simulation's own
        # timings come from the loop's (virtual) clock.
        return JobHandle(id=job.id, provider=self.name, submitted_at=time.time())

    def _job(self, handle: JobHandle) -> _Job:
        try:
            return self._jobs[handle.id]
        except KeyError:
            raise JobLostError("unknown job", provider=self.name, job_id=handle.id) from None

    async def _look(self, handle: JobHandle) -> JobState:
        job = self._job(handle)
        queue_s = None if job.started is None else job.started - job.submitted
        execution_s = None
        if job.started is not None:
            execution_s = (job.ended if job.ended is not None else _now()) - job.started
        return JobState(
            id=job.id,
            provider=self.name,
            status=job.status,
            provider_status=job.status.value,
            output=job.output if job.status is JobStatus.COMPLETED else None,
            timings=JobTimings(queue_s=queue_s, execution_s=execution_s, cold_start=job.cold_start),
        )

    async def _await_terminal(self, handle: JobHandle, deadline: Deadline) -> JobState:
        job = self._job(handle)
        try:
            async with asyncio.timeout_at(deadline.at):
                await job.done.wait()
        except TimeoutError:
            msg = "the deadline passed before the job ended"
            raise JobTimeoutError(msg, provider=self.name, job_id=job.id) from None
        return await self._look(handle)

    async def _cancel(self, handle: JobHandle) -> None:
        job = self._job(handle)
        job.cancelled.set()
        job.end(JobStatus.CANCELLED)

    async def aclose(self) -> None:
        """Stop the simulated workers (jobs still out end as they are)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SimulatedPod(_SimulatedRunner):
    """An always-on pod: one job at a time, a bounded FIFO queue, paid by the hour.

    Example::

        pod = SimulatedPod(name="pod", max_queue=4)
        result = run_virtual(pod.run({"duration_s": 20}))   # 20 virtual seconds

    Args:
        max_queue: jobs waiting behind the running one; one more is refused with
            :class:`CapacityError`. ``None``: unbounded.
        service_s: range of service times drawn for jobs whose payload gives no ``duration_s``.
        usd_per_hour: the pod's hourly price (reported, not charged per job: marginal cost 0).
        seed: seeds the service-time draws.
    """

    kind = "simulated-pod"

    def __init__(
        self,
        *,
        name: str | None = None,
        max_queue: int | None = None,
        service_s: tuple[float, float] = SERVICE_S,
        usd_per_hour: float = 1.89,
        seed: int = 0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        if max_queue is not None and max_queue < 0:
            raise ConfigurationError("max_queue must be at least 0")
        super().__init__(
            name=name, service_s=service_s, seed=seed, default_timeout_s=default_timeout_s
        )
        self.max_queue = max_queue
        self.usd_per_hour = usd_per_hour
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self.refused = 0

    @property
    def queued(self) -> int:
        """Jobs waiting behind the running one."""
        return sum(1 for job in self._queue if not job.status.is_terminal)

    async def _submit(self, payload: Mapping[str, Any], deadline: Deadline) -> JobHandle:
        del deadline  # the caller's deadline cancels the job through BaseRunner
        busy = self._running is not None
        if busy and self.max_queue is not None and self.queued >= self.max_queue:
            self.refused += 1
            raise CapacityError("the pod's queue is full", provider=self.name)
        job = self._new_job(payload)
        if busy:
            self._queue.append(job)
        else:
            self._begin(job)
        return self._handle(job)

    def _begin(self, job: _Job) -> None:
        self._running = job
        self._spawn(self._execute(job))

    async def _execute(self, job: _Job) -> None:
        try:
            self.jobs_completed += await job.execute()
        finally:
            self._running = None
        while self._queue:
            queued = self._queue.popleft()
            if not queued.status.is_terminal:  # else cancelled while queued
                self._begin(queued)
                return

    def _cost(self, state: JobState) -> Cost:
        del state
        return Cost(usd=0.0, basis="marginal")

    async def health(self) -> Health:
        """One worker, busy or idle, and the queue behind it."""
        busy = int(self._running is not None)
        return Health(
            provider=self.name,
            ok=True,
            workers={"running": busy, "idle": 1 - busy},
            jobs={"inQueue": self.queued, "inProgress": busy, "completed": self.jobs_completed},
        )
