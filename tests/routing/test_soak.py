"""A bounded soak: 2,000 jobs through a router over three faulty emulators on loopback."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest

from gpujobs import GpuJobsError, JobResult, RunPodServerless
from gpujobs.routing import EventKind, Router, RouterEvent
from gpujobs.testing import Faults, RunPodEmulator

Emulated = tuple[RunPodEmulator, RunPodServerless]
Emulators = Callable[..., AbstractAsyncContextManager[list[Emulated]]]

pytestmark = pytest.mark.anyio

JOBS = 2_000
FAULTS = Faults(
    seed=2026,
    server_error=0.10,
    rate_limit=0.05,
    retry_after_s=0.01,
    drop_connection=0.02,
    lose_job=0.01,
)


@pytest.mark.timeout(120)
async def test_every_job_ends_exactly_once(emulators: Emulators) -> None:
    events: list[RouterEvent] = []
    async with emulators("primary", "secondary", "tertiary", faults=FAULTS, workers=64) as fleet:
        router = Router([runner for _, runner in fleet], hooks=[events.append])
        payloads = [{"output": n} for n in range(JOBS)]
        batch = await router.map(payloads, concurrency=200, return_exceptions=True)
        completed_at = {runner.name: e.stats.completed_at for e, runner in fleet}
        executed = sum(e.stats.jobs_submitted for e, _ in fleet)

    # One outcome per job, in order, nothing missing, nothing delivered twice.
    assert len(batch.outcomes) == JOBS
    for n, outcome in enumerate(batch.outcomes):
        if isinstance(outcome, JobResult):
            assert outcome.output == n
        else:
            assert isinstance(outcome, GpuJobsError)
    results = batch.results
    assert len({r.id for r in results}) == len(results)
    # Every result was produced by the runner it names.
    assert all(r.id in completed_at[r.provider] for r in results)
    # Faults hit about one request in six; with three runners almost every job gets through.
    assert len(results) >= 0.99 * JOBS, batch.summary()
    completions = Counter(e.kind for e in events)
    assert completions[EventKind.COMPLETED] == len(results)
    assert completions[EventKind.FAILED] == len(batch.failures)
    # Failovers stayed within the retry budget, and possible extra submissions are reported.
    assert completions[EventKind.FAILED_OVER] <= 0.2 * JOBS + 30
    assert router.extra_submissions > 0
    print(  # noqa: T201 - the soak's figures, shown with pytest -s
        f"\n{batch.summary()}; failovers {completions[EventKind.FAILED_OVER]}, "
        f"possible extra submissions {router.extra_submissions}, "
        f"jobs the emulators took {executed}"
    )
