"""Seeded bursty traffic and its replay through any runner, for routing simulations.

:func:`bursty_trace` draws arrivals from a two-state Markov-modulated Poisson process: quiet
stretches (exponentially long, ``mean_quiet_s`` on average) at ``quiet_per_hour`` alternate with
bursts (``mean_burst_s``) at ``burst_per_hour``. The defaults have the shape of the seed's
workload: a pod doing one 15–25 s job at a time (~180 jobs an hour) is idle most of the time
(≈ 30 jobs an hour when quiet) and overloaded in bursts (≈ 360 an hour); on average ≈ 96 jobs
an hour, about half the pod's capacity. Each job carries its service time (15–25 s: 4 layers at
640 px on the reference worker), so every policy replays exactly the same work.

:func:`replay` sends each job at its arrival time (on the running loop's clock, virtual under
:func:`run_virtual`) and records what the caller saw.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpujobs._errors import GpuJobsError
from gpujobs._runner import JobRunner

__all__ = ["JobRecord", "TraceJob", "bursty_trace", "replay"]


@dataclass(frozen=True, slots=True)
class TraceJob:
    """One job of a trace: when it arrives (seconds from the start), how long it runs."""

    at: float
    duration_s: float
    burst: bool = False

    def payload(self, index: int) -> dict[str, Any]:
        """The job's payload for the simulated runners (``duration_s`` sets its service time)."""
        return {"output": index, "duration_s": self.duration_s}


def bursty_trace(
    hours: float = 1.0,
    *,
    seed: int = 0,
    quiet_per_hour: float = 30.0,
    burst_per_hour: float = 360.0,
    mean_quiet_s: float = 720.0,
    mean_burst_s: float = 180.0,
    duration_s: tuple[float, float] = (15.0, 25.0),
) -> list[TraceJob]:
    """Arrivals over ``hours`` from a seeded two-state MMPP, starting quiet; sorted by time."""
    rng = random.Random(seed)  # noqa: S311 - a simulation, not cryptography
    end = hours * 3600.0
    jobs: list[TraceJob] = []
    t, burst = 0.0, False
    while t < end:
        stretch_end = min(end, t + rng.expovariate(1.0 / (mean_burst_s if burst else mean_quiet_s)))
        rate = (burst_per_hour if burst else quiet_per_hour) / 3600.0
        if rate > 0:
            t += rng.expovariate(rate)
            while t < stretch_end:
                jobs.append(TraceJob(at=t, duration_s=rng.uniform(*duration_s), burst=burst))
                t += rng.expovariate(rate)
        t, burst = stretch_end, not burst
    return jobs


def mean_jobs_per_hour(
    *,
    quiet_per_hour: float = 30.0,
    burst_per_hour: float = 360.0,
    mean_quiet_s: float = 720.0,
    mean_burst_s: float = 180.0,
) -> float:
    """The long-run arrival rate of :func:`bursty_trace` with these settings."""
    return (quiet_per_hour * mean_quiet_s + burst_per_hour * mean_burst_s) / (
        mean_quiet_s + mean_burst_s
    )


@dataclass(frozen=True, slots=True)
class JobRecord:
    """What the caller saw of one replayed job (times on the loop's clock).

    ``provider`` is the runner that served it (``None`` if it failed; ``error`` says how).
    """

    index: int
    arrived_at: float
    latency_s: float
    provider: str | None
    cost_usd: float
    cold_start: bool | None
    burst: bool
    error: str | None = None


async def replay(
    runner: JobRunner, trace: Sequence[TraceJob], *, timeout: float | None = None
) -> list[JobRecord]:
    """Send every job of ``trace`` to ``runner`` at its arrival time; one record per job.

    Failures are recorded, not raised. Latency is measured on the running loop's clock, from
    arrival to the result in hand.
    """
    loop = asyncio.get_running_loop()
    origin = loop.time()
    records: list[JobRecord | None] = [None] * len(trace)

    async def one(index: int, job: TraceJob) -> None:
        await asyncio.sleep(max(0.0, origin + job.at - loop.time()))
        arrived = loop.time()
        try:
            result = await runner.run(job.payload(index), timeout=timeout)
        except GpuJobsError as exc:
            records[index] = JobRecord(
                index=index,
                arrived_at=arrived - origin,
                latency_s=loop.time() - arrived,
                provider=None,
                cost_usd=0.0,
                cold_start=None,
                burst=job.burst,
                error=f"{type(exc).__name__}: {exc}",
            )
            return
        records[index] = JobRecord(
            index=index,
            arrived_at=arrived - origin,
            latency_s=loop.time() - arrived,
            provider=result.provider,
            cost_usd=result.cost.usd if result.cost is not None else 0.0,
            cold_start=result.timings.cold_start,
            burst=job.burst,
        )

    async with asyncio.TaskGroup() as group:
        for index, job in enumerate(trace):
            group.create_task(one(index, job))
    return [record for record in records if record is not None]
