"""``LocalRunner``: a worker handler run in this process, with the semantics of a remote runner.

It is the embedded default for the demo, the examples and tests: the same handler function a
RunPod worker runs (``handler({"id": ..., "input": ...})``), a concurrency limit standing in for
the number of workers, a queue, an execution timeout, cancellation, expiring results and the same
errors as every other runner.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import anyio

from gpujobs._errors import ConfigurationError, JobLostError, JobTimeoutError
from gpujobs._handler import Handler, invoke_handler
from gpujobs._models import Cost, Health, JobHandle, JobState, JobStatus, JobTimings
from gpujobs._polling import Deadline
from gpujobs._runner import BaseRunner

__all__ = ["LocalRunner"]


@dataclass(eq=False)
class _Job:
    id: str
    input: Any
    submitted: float
    expires: float | None
    status: JobStatus = JobStatus.QUEUED
    output: Any = None
    error: Any = None
    started: float | None = None
    ended: float | None = None
    done: anyio.Event = field(default_factory=anyio.Event)
    task: asyncio.Task[None] | None = None

    def end(self, status: JobStatus) -> None:
        if not self.status.is_terminal:
            self.status = status
            self.ended = time.monotonic()
            self.done.set()


class LocalRunner(BaseRunner):
    """Run a handler in-process, ``concurrency`` jobs at a time.

    Example::

        async def handler(job):
            return {"doubled": job["input"]["x"] * 2}

        async with LocalRunner(handler, concurrency=2) as runner:
            result = await runner.run({"x": 21})
            assert result.output == {"doubled": 42}

    Args:
        handler: the worker handler (sync or async function, or generator).
        concurrency: how many jobs run at once; the rest wait in a queue.
        usd_per_s: a price per second of execution, to rehearse cost reports (default free).
        execution_timeout_s: a job running longer ends ``TIMED_OUT``.
        result_ttl_s: how long an ended job's result stays available.
    """

    kind = "local"

    def __init__(
        self,
        handler: Handler,
        *,
        concurrency: int = 1,
        name: str | None = None,
        usd_per_s: float = 0.0,
        execution_timeout_s: float | None = None,
        result_ttl_s: float = 1800.0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        if concurrency < 1:
            raise ConfigurationError("concurrency must be at least 1")
        if not callable(handler):
            raise ConfigurationError("handler must be callable")
        super().__init__(name=name, default_timeout_s=default_timeout_s)
        self._handler = handler
        self._concurrency = concurrency
        self._slots = asyncio.Semaphore(concurrency)
        self._usd_per_s = usd_per_s
        self._execution_timeout_s = execution_timeout_s
        self._result_ttl_s = result_ttl_s
        self._jobs: OrderedDict[str, _Job] = OrderedDict()

    async def aclose(self) -> None:
        """Cancel every job still queued or running: nothing else would ever finish them."""
        tasks = [job.task for job in self._jobs.values() if job.task and not job.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _submit(self, payload: Mapping[str, Any], deadline: Deadline) -> JobHandle:
        self._forget_expired()
        now = time.monotonic()
        left = deadline.remaining()
        job = _Job(
            id=f"local-{uuid.uuid4()}",
            input=dict(payload),
            submitted=now,
            expires=None if left is None else now + left,
        )
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._execute(job))
        return JobHandle(id=job.id, provider=self.name, submitted_at=time.time())

    async def _execute(self, job: _Job) -> None:
        try:
            async with self._slots:
                if job.status.is_terminal:  # cancelled while queued
                    return
                job.status, job.started = JobStatus.RUNNING, time.monotonic()
                limit = self._execution_limit(job)
                with anyio.move_on_after(limit) as scope:
                    outcome = await invoke_handler(
                        self._handler,
                        {"id": job.id, "input": job.input},
                        progress=lambda update: setattr(job, "output", update),
                    )
                if scope.cancelled_caught:
                    job.end(JobStatus.TIMED_OUT)
                elif outcome.failed:
                    job.error = outcome.error
                    job.end(JobStatus.FAILED)
                else:
                    job.output = outcome.output
                    job.end(JobStatus.COMPLETED)
        except asyncio.CancelledError:
            job.end(JobStatus.CANCELLED)

    def _execution_limit(self, job: _Job) -> float | None:
        limits = [self._execution_timeout_s]
        if job.expires is not None:
            limits.append(max(0.0, job.expires - time.monotonic()))
        given = [limit for limit in limits if limit is not None]
        return min(given) if given else None

    def _forget_expired(self) -> None:
        cutoff = time.monotonic() - self._result_ttl_s
        for job_id in [j.id for j in self._jobs.values() if j.ended and j.ended < cutoff]:
            del self._jobs[job_id]

    def _job(self, handle: JobHandle) -> _Job:
        self._forget_expired()
        try:
            return self._jobs[handle.id]
        except KeyError:
            raise JobLostError(
                "the job is unknown or its result expired", provider=self.name, job_id=handle.id
            ) from None

    async def _look(self, handle: JobHandle) -> JobState:
        job = self._job(handle)
        return JobState(
            id=job.id,
            provider=self.name,
            status=job.status,
            provider_status=job.status.value,
            output=job.output,
            error=job.error,
            timings=_timings(job),
        )

    async def _await_terminal(self, handle: JobHandle, deadline: Deadline) -> JobState:
        job = self._job(handle)
        with anyio.move_on_after(deadline.remaining()):
            await job.done.wait()
        if not job.status.is_terminal:
            raise JobTimeoutError(
                "the deadline passed before the job ended", provider=self.name, job_id=job.id
            )
        return await self._look(handle)

    async def _cancel(self, handle: JobHandle) -> None:
        job = self._job(handle)
        if job.status.is_terminal:
            return
        job.end(JobStatus.CANCELLED)
        if job.task is not None:
            job.task.cancel()

    def _cost(self, state: JobState) -> Cost:
        return Cost.of_execution(state.timings.execution_s or 0.0, self._usd_per_s)

    async def health(self) -> Health:
        """Jobs and worker slots, in RunPod's vocabulary."""
        counts = dict.fromkeys(JobStatus, 0)
        for job in self._jobs.values():
            counts[job.status] += 1
        running = counts[JobStatus.RUNNING]
        return Health(
            provider=self.name,
            ok=True,
            workers={"idle": self._concurrency - running, "running": running},
            jobs={
                "inQueue": counts[JobStatus.QUEUED],
                "inProgress": running,
                "completed": counts[JobStatus.COMPLETED],
                "failed": counts[JobStatus.FAILED] + counts[JobStatus.TIMED_OUT],
            },
        )


def _timings(job: _Job) -> JobTimings:
    queue_s = None if job.started is None else job.started - job.submitted
    execution_s = None
    if job.started is not None:
        execution_s = (job.ended or time.monotonic()) - job.started
    return JobTimings(queue_s=queue_s, execution_s=execution_s, cold_start=False)
