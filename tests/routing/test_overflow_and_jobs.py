"""Cold-start-aware overflow, the submit/status/wait/cancel API through a router, batches."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import pytest

from gpujobs import (
    ConfigurationError,
    JobCancelledError,
    JobFailedError,
    JobLostError,
    JobStatus,
    LocalRunner,
    RunPodServerless,
)
from gpujobs.routing import EventKind, Overflow, Priors, Route, Router, RouterEvent
from gpujobs.testing import RunPodEmulator, scripted_handler

Emulated = tuple[RunPodEmulator, RunPodServerless]
OneEmulated = Callable[..., AbstractAsyncContextManager[Emulated]]
Emulators = Callable[..., AbstractAsyncContextManager[list[Emulated]]]

pytestmark = pytest.mark.anyio

JOB_S = 0.2
POD = Priors(concurrency=1, service_s=JOB_S, dispatch_s=0.0)
SERVERLESS = Priors(service_s=JOB_S, cold_start_s=0.3, cold_probability=1.0, dispatch_s=0.0)


def hybrid(pod: LocalRunner, serverless: RunPodServerless, **options: object) -> Router:
    return Router(
        [Route(pod, priors=POD), Route(serverless, priors=SERVERLESS)],
        policy=Overflow(),
        **options,  # type: ignore[arg-type]
    )


async def test_a_burst_overflows_once_the_pod_queue_is_slower(emulated: OneEmulated) -> None:
    events: list[RouterEvent] = []
    async with (
        LocalRunner(scripted_handler, concurrency=1, name="pod") as pod,
        emulated("serverless", cold_start_s=0.3, workers=4) as (_, serverless),
    ):
        router = hybrid(pod, serverless, hooks=[events.append])
        burst = [router.run({"output": n, "sleep_s": JOB_S}) for n in range(5)]
        results = await asyncio.gather(*burst)
    # The pod takes a job (0.2 s) and one behind it (0.4 s); a third would finish at 0.6 s,
    # later than a cold serverless worker (0.3 + 0.2 s): from there on, the burst overflows.
    assert [r.provider for r in results] == ["pod", "pod", "serverless", "serverless", "serverless"]
    overflowed = [e for e in events if e.kind is EventKind.OVERFLOWED]
    assert len(overflowed) == 3
    assert "primary expected 0.6 s > serverless 0.5 s" in (overflowed[0].reason or "")


async def test_a_safe_deadline_keeps_jobs_on_the_pod(emulated: OneEmulated) -> None:
    async with (
        LocalRunner(scripted_handler, concurrency=1, name="pod") as pod,
        emulated("serverless", cold_start_s=0.3) as (emulator, serverless),
    ):
        router = hybrid(pod, serverless)
        burst = [router.run({"output": n, "sleep_s": JOB_S}, timeout=30) for n in range(5)]
        results = await asyncio.gather(*burst)
    # Slower on the pod, but well within the caller's deadline: no serverless bill.
    assert {r.provider for r in results} == {"pod"}
    assert emulator.stats.jobs_submitted == 0


async def test_observed_timings_replace_the_priors(emulated: OneEmulated) -> None:
    async with emulated("serverless") as (_, serverless):
        router = Router([Route(serverless, priors=Priors(service_s=60.0))])
        for n in range(10):
            await router.run({"output": n, "sleep_s": 0.05})
        stats = router.lane_stats()["serverless"]
    assert stats.completed == 10
    assert stats.service_s < 10  # moved from the 60 s prior towards the observed 0.05 s
    assert stats.latency_quantile(0.95) is not None


async def test_submit_status_wait_through_the_router(emulators: Emulators) -> None:
    async with emulators("a", "b") as [(first, a), (_, b)]:
        router = Router([a, b])
        first.inject("run", "server_error", status=500)  # refused: the job goes to b
        handle = await router.submit({"output": "x", "sleep_s": 0.05}, timeout=10)
        assert handle.provider == "router"
        state = await router.status(handle)
        assert state.id == handle.id
        assert state.status in {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED}
        result = await router.wait(handle, timeout=10)
        assert (result.output, result.provider) == ("x", "b")
        assert (await router.status(handle)).status is JobStatus.COMPLETED
        assert await router.wait(handle) == result


async def test_a_job_lost_while_waited_for_runs_elsewhere(emulators: Emulators) -> None:
    async with emulators("a", "b") as [(first, a), (_, b)]:
        router = Router([a, b])
        first.inject("run", "lose_job")
        handle = await router.submit({"output": "again", "sleep_s": 0.05}, timeout=10)
        result = await router.wait(handle, timeout=10)
    assert (result.output, result.provider) == ("again", "b")


async def test_cancel_through_the_router(emulators: Emulators) -> None:
    async with emulators("a") as [(first, a)]:
        router = Router([a])
        handle = await router.submit({"sleep_s": 30}, timeout=60)
        await router.cancel(handle)
        with pytest.raises(JobCancelledError):
            await router.wait(handle, timeout=5)
    assert first.stats.jobs_cancelled == 1


async def test_an_unknown_handle_is_lost(emulators: Emulators) -> None:
    async with emulators("a") as [(_, a)]:
        router = Router([a])
        handle = (await router.submit({"output": 1})).model_copy(update={"id": "nope"})
        with pytest.raises(JobLostError):
            await router.status(handle)


async def test_idempotency_key_runs_the_job_once(emulators: Emulators) -> None:
    async with emulators("a") as [(first, a)]:
        router = Router([a])
        one = await router.run({"output": 1}, idempotency_key="order-17")
        two = await router.run({"output": 2}, idempotency_key="order-17")
    assert one == two
    assert first.stats.jobs_submitted == 1


async def test_routes_by_task(emulators: Emulators) -> None:
    async with emulators("layers", "lora") as [(_, layers), (_, lora)]:
        router = Router({"layered-image": [layers], "lora-training": [lora]})
        assert (await router.run({"output": 1})).provider == "layers"  # the first task
        assert (await router.run({"output": 2}, task="lora-training")).provider == "lora"
        with pytest.raises(ConfigurationError, match="no routes for task"):
            await router.run({"output": 3}, task="special")


async def test_map_reports_progress_and_partial_failures(emulators: Emulators) -> None:
    events: list[RouterEvent] = []
    async with emulators("a") as [(_, a)]:
        router = Router([a], hooks=[events.append])
        payloads = [{"output": n} if n % 4 else {"raise": f"bad {n}"} for n in range(12)]
        batch = await router.map(payloads, concurrency=3, return_exceptions=True)
    assert len(batch.outcomes) == 12
    assert sorted(batch.failures) == [0, 4, 8]
    assert [r.output for r in batch.results] == [n for n in range(12) if n % 4]
    assert batch.summary() == "9/12 succeeded (9 on a); failed: 3 JobFailedError"
    progress = [e for e in events if e.kind is EventKind.PROGRESS]
    assert [(e.done, e.total) for e in progress] == [(n, 12) for n in range(1, 13)]


async def test_map_stops_at_the_first_failure_and_cancels_the_rest(emulators: Emulators) -> None:
    async with emulators("a", workers=8) as [(first, a)]:
        router = Router([a])
        payloads = [{"raise": "bad"}] + [{"sleep_s": 30} for _ in range(5)]
        with anyio.fail_after(10), pytest.raises(JobFailedError, match="bad"):
            await router.map(payloads, concurrency=6, timeout=3)
    # The held requests of the others were answered (with their ids) before the deadline and
    # their jobs cancelled by the time the runner closed.
    assert first.stats.jobs_cancelled == 5


async def test_bulkheads_cap_jobs_per_runner(emulators: Emulators) -> None:
    async with emulators("small", "big", workers=8) as [(_, small), (_, big)]:
        router = Router([Route(small, max_in_flight=2), big])
        results = await asyncio.gather(
            *(router.run({"output": n, "sleep_s": 0.1}) for n in range(6))
        )
    assert sum(r.provider == "small" for r in results) == 2
    assert sum(r.provider == "big" for r in results) == 4


async def test_submitted_jobs_count_at_their_runner_until_seen_ended(
    emulated: OneEmulated,
) -> None:
    async with (
        LocalRunner(scripted_handler, concurrency=1, name="pod") as pod,
        emulated("serverless", cold_start_s=0.3, workers=4) as (_, serverless),
    ):
        router = hybrid(pod, serverless)
        handles = [await router.submit({"output": n, "sleep_s": JOB_S}) for n in range(4)]
        assert router.lane_stats()["pod"].in_flight == 2  # the others overflowed
        results = [await router.wait(h) for h in handles]
        assert [r.provider for r in results] == ["pod", "pod", "serverless", "serverless"]
        assert router.lane_stats()["pod"].in_flight == 0
        # A job only looked at (never waited for) is released once seen ended.
        handle = await router.submit({"output": "x"})
        with anyio.fail_after(5):
            while not (await router.status(handle)).status.is_terminal:  # noqa: ASYNC110
                await anyio.sleep(0.01)
        assert router.lane_stats()["pod"].in_flight == 0


async def test_concurrent_callers_of_one_job_share_one_run(emulators: Emulators) -> None:
    async with emulators("a", "b") as [(first, a), (second, b)]:
        router = Router([a, b])
        same = [router.run({"output": 1, "sleep_s": 0.1}, idempotency_key="k") for _ in range(3)]
        results = await asyncio.gather(*same)
        handle = await router.submit({"output": 2, "sleep_s": 0.1})
        waited = await asyncio.gather(*(router.wait(handle) for _ in range(3)))
    assert len({r.id for r in results}) == 1
    assert len({r.id for r in waited}) == 1
    assert first.stats.jobs_submitted + second.stats.jobs_submitted == 2
