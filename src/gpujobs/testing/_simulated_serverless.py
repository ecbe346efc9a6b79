"""A simulated serverless endpoint: workers per job, cold starts, idle timeout, per-second bill.

:class:`SimulatedServerless` models a RunPod Serverless endpoint with flex workers: a job that
finds no idle worker starts a new one (up to ``max_workers``; otherwise it waits in the queue);
a worker's start takes a cold start (30–45 s), the endpoint's very first start longer (2–3 min,
the image pulled); a worker idle for ``idle_timeout_s`` stops. Billing follows RunPod's pricing
page (docs.runpod.io/pricing/serverless, read 2026-11-28): "billed from when a worker starts until
it fully stops, rounded up to the nearest second", i.e. start time, execution time and the idle
timeout (default 5 s). :attr:`SimulatedServerless.billed_usd` is that bill; each job's
:class:`Cost` is the part it caused (the cold start of the fresh worker it met, plus its
execution); idle tails and starts no job used are billed to the endpoint only.
Simplification: a new worker is started as soon as a job finds none free (RunPod's autoscaler
may wait for a queue delay first).
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from gpujobs._errors import ConfigurationError
from gpujobs._models import Cost, Health, JobHandle, JobState
from gpujobs._polling import Deadline
from gpujobs.testing._simulation import SERVICE_S, _Job, _now, _SimulatedRunner

__all__ = ["SimulatedServerless"]


@dataclass(eq=False)
class _Worker:
    started: float
    start_s: float
    stopped: float | None = None
    jobs: int = 0
    idle_since: float | None = None
    handed: _Job | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self) -> _Job | None:
        job, self.handed = self.handed, None
        return job


class SimulatedServerless(_SimulatedRunner):
    """A serverless endpoint: workers started per job, cold starts, idle timeout, billed per second.

    Example::

        endpoint = SimulatedServerless(name="serverless", idle_timeout_s=5)
        result = run_virtual(endpoint.run({"duration_s": 20}))
        result.timings.cold_start, result.timings.queue_s   # True, 120-180 s (first start)
        endpoint.billed_usd                                  # start + execution + idle tail

    Args:
        usd_per_s: price per second of a running worker (A100 flex: $0.00076/s, DESIGN.md).
        cold_start_s: range of a worker's start time (model loaded from a volume).
        first_start_s: range of the endpoint's very first worker start (image pulled).
        idle_timeout_s: a worker with no job for this long stops (RunPod's default: 5 s).
        max_workers: workers at most; jobs beyond wait in the endpoint's queue.
        service_s: range of service times for jobs whose payload gives no ``duration_s``.
        seed: seeds the start-time and service-time draws.
    """

    kind = "simulated-serverless"

    def __init__(
        self,
        *,
        name: str | None = None,
        usd_per_s: float = 0.00076,
        cold_start_s: tuple[float, float] = (30.0, 45.0),
        first_start_s: tuple[float, float] = (120.0, 180.0),
        idle_timeout_s: float = 5.0,
        max_workers: int = 10,
        service_s: tuple[float, float] = SERVICE_S,
        seed: int = 0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        if max_workers < 1:
            raise ConfigurationError("max_workers must be at least 1")
        super().__init__(
            name=name, service_s=service_s, seed=seed, default_timeout_s=default_timeout_s
        )
        self.usd_per_s = usd_per_s
        self.cold_start_range = cold_start_s
        self.first_start_range = first_start_s
        self.idle_timeout_s = idle_timeout_s
        self.max_workers = max_workers
        self._queue: deque[_Job] = deque()
        self._workers: list[_Worker] = []
        self.idle_s = 0.0  # billed seconds with no job
        self.unused_start_s = 0.0  # starts of workers that stopped without a job

    # -- what it costs ---------------------------------------------------------------------

    @property
    def cold_starts(self) -> int:
        """Worker starts so far (the first start of the endpoint included)."""
        return len(self._workers)

    @property
    def billed_s(self) -> float:
        """Billed worker seconds: each worker from start to stop, rounded up to the second."""
        now = _now() if self._live() else 0.0  # readable after the loop ended, too
        return sum(
            math.ceil((w.stopped if w.stopped is not None else now) - w.started - 1e-9)
            for w in self._workers
        )

    @property
    def billed_usd(self) -> float:
        """The endpoint's bill so far."""
        return self.billed_s * self.usd_per_s

    def _cost(self, state: JobState) -> Cost:
        job = self._jobs[state.id]
        seconds = job.cold_start_s + (state.timings.execution_s or 0.0)
        return Cost(
            usd=seconds * self.usd_per_s,
            billed_s=seconds,
            usd_per_s=self.usd_per_s,
            basis="start+execution" if job.cold_start else "execution",
        )

    # -- jobs and workers ------------------------------------------------------------------

    def _live(self) -> list[_Worker]:
        return [w for w in self._workers if w.stopped is None]

    async def _submit(self, payload: Mapping[str, Any], deadline: Deadline) -> JobHandle:
        del deadline
        job = self._new_job(payload)
        idle = [w for w in self._live() if w.idle_since is not None and w.handed is None]
        if idle:
            worker = min(idle, key=lambda w: w.idle_since or 0.0)  # longest idle first
            worker.handed = job
            worker.wake.set()
            return self._handle(job)
        self._queue.append(job)
        live = self._live()
        starting = sum(1 for w in live if w.jobs == 0 and w.idle_since is None)
        waiting = sum(1 for j in self._queue if not j.status.is_terminal)
        if waiting > starting and len(live) < self.max_workers:
            self._start_worker()
        return self._handle(job)

    def _start_worker(self) -> None:
        first = not self._workers
        start_s = self._rng.uniform(*(self.first_start_range if first else self.cold_start_range))
        worker = _Worker(started=_now(), start_s=start_s)
        self._workers.append(worker)
        self._spawn(self._work(worker))

    def _next_queued(self) -> _Job | None:
        while self._queue:
            job = self._queue.popleft()
            if not job.status.is_terminal:
                return job
        return None

    async def _work(self, worker: _Worker) -> None:
        try:
            await asyncio.sleep(worker.start_s)
            while True:
                job = self._next_queued()
                if job is None:
                    job = await self._idle(worker)
                    if job is None:
                        break
                if worker.jobs == 0:
                    job.cold_start, job.cold_start_s = True, worker.start_s
                worker.jobs += 1
                self.jobs_completed += await job.execute()
        finally:
            worker.stopped = _now()
            if worker.jobs == 0:
                self.unused_start_s += worker.start_s

    async def _idle(self, worker: _Worker) -> _Job | None:
        """Wait up to the idle timeout for a job handed over; ``None``: the worker stops."""
        worker.idle_since, worker.handed = _now(), None
        worker.wake.clear()
        try:
            async with asyncio.timeout(self.idle_timeout_s):
                await worker.wake.wait()
        except TimeoutError:
            pass
        finally:
            self.idle_s += _now() - worker.idle_since
            worker.idle_since = None
        job = worker.take()
        if job is not None and job.status.is_terminal:  # cancelled before the worker took it
            return await self._idle(worker)
        return job

    async def health(self) -> Health:
        """Workers by state and jobs by status, in RunPod's vocabulary."""
        live = self._live()
        idle = sum(1 for w in live if w.idle_since is not None)
        initializing = sum(1 for w in live if w.jobs == 0 and w.idle_since is None)
        running = len(live) - idle - initializing
        waiting = sum(1 for j in self._queue if not j.status.is_terminal)
        return Health(
            provider=self.name,
            ok=True,
            workers={"idle": idle, "running": running, "initializing": initializing},
            jobs={"inQueue": waiting, "inProgress": running, "completed": self.jobs_completed},
        )
