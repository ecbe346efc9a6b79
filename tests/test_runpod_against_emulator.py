"""RunPodServerless against the emulator: behaviour that needs a live peer with faults."""

from __future__ import annotations

import asyncio

import anyio
import httpx
import pytest

from gpujobs import (
    JobFailedError,
    JobLostError,
    JobStatus,
    JobTimeoutError,
    PollSchedule,
    ProviderError,
    RateLimitedError,
    RetryPolicy,
    RunPodServerless,
)
from gpujobs.testing import RunPodEmulator, scripted_handler, scripted_stream_handler, serve

FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(initial_backoff_s=0.01, max_backoff_s=0.05)

pytestmark = pytest.mark.anyio


def runner_for(url: str, **kwargs: object) -> RunPodServerless:
    options: dict[str, object] = {"poll": FAST_POLL, "retry": FAST_RETRY, "api_key": "k"}
    options.update(kwargs)
    return RunPodServerless(endpoint_url=url, **options)  # type: ignore[arg-type]


async def test_a_failed_submission_is_never_sent_twice() -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        # The job is queued, then the answer is lost: the runner must not queue it again.
        emulator.inject("run", "server_error", after_processing=True)
        with pytest.raises(ProviderError) as info:
            await runner.submit({"output": 1})
        assert info.value.request_sent
        emulator.inject("run", "drop_connection", after_processing=True)
        with pytest.raises(ProviderError):
            await runner.submit({"output": 2})
        # A 429 means "not taken": that one is retried.
        emulator.inject("run", "rate_limit", retry_after_s=0.01)
        await runner.submit({"output": 3})
    stats = emulator.stats
    assert stats.requests["run"] == 4
    assert stats.jobs_submitted == 3


async def test_throttled_status_polls_are_ridden_out() -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        handle = await runner.submit({"output": "x", "sleep_s": 0.05})
        emulator.inject("status", "rate_limit", times=3, retry_after_s=0.01)
        emulator.inject("status", "server_error", times=2)
        assert (await runner.wait(handle, timeout=10)).output == "x"


async def test_too_many_429s_on_submit_surface_as_rate_limited() -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        emulator.inject("run", "rate_limit", times=10, retry_after_s=0.01)
        with pytest.raises(RateLimitedError) as info:
            await runner.submit({"output": 1})
    assert info.value.retry_after == pytest.approx(0.01)
    assert emulator.stats.jobs_submitted == 0


async def test_cold_starts_are_flagged_and_warm_workers_are_not() -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1, cold_start_s=0.3)
    async with serve(emulator) as server, runner_for(server.url, cold_start_threshold_s=0.2) as r:
        first = await r.run({"output": 1}, timeout=10)
        second = await r.run({"output": 2}, timeout=10)
    assert first.timings.cold_start is True
    assert first.timings.queue_s is not None
    assert first.timings.queue_s >= 0.3
    assert second.timings.cold_start is False


async def test_long_jobs_fall_back_from_runsync_to_polling() -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1, runsync_wait_limits_ms=(100, 100))
    async with serve(emulator) as server, runner_for(server.url) as runner:
        result = await runner.run({"output": "late", "sleep_s": 0.4}, timeout=10)
    assert result.output == "late"
    assert emulator.stats.requests["runsync"] == 1
    assert emulator.stats.requests["status"] >= 1


async def test_many_jobs_in_flight_switch_to_run_and_poll() -> None:
    emulator = RunPodEmulator(scripted_handler, workers=10)
    async with serve(emulator) as server, runner_for(server.url, max_long_polls=4) as runner:
        results = await asyncio.gather(
            *(runner.run({"output": n, "sleep_s": 0.1}, timeout=10) for n in range(10))
        )
    assert [r.output for r in results] == list(range(10))
    stats = emulator.stats
    assert stats.requests["runsync"] == 4
    assert stats.requests["run"] == 6


async def test_stream_yields_chunks_as_they_come() -> None:
    emulator = RunPodEmulator(scripted_stream_handler, workers=1)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        handle = await runner.submit({"stream": ["a", "b", "c"], "sleep_s": 0.02})
        chunks = [chunk async for chunk in runner.stream(handle, timeout=10)]
        failing = await runner.submit({"stream": ["x"], "raise": "broke midway"})
        with pytest.raises(JobFailedError, match="broke midway"):
            [chunk async for chunk in runner.stream(failing, timeout=10)]
    assert chunks == ["a", "b", "c"]


async def test_expired_results_are_lost_jobs(until_lost) -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1, result_ttl_s=0.05)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        handle = await runner.submit({"output": 1})
        await runner.wait(handle, timeout=10)
        await until_lost(runner, handle)


async def test_purge_and_health() -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        busy = await runner.submit({"sleep_s": 5})
        queued = [await runner.submit({"output": n}) for n in range(3)]
        health = await runner.health()
        assert health.ok
        assert health.jobs["inQueue"] == 3
        assert await runner.purge_queue() == 3
        with pytest.raises(JobLostError):
            await runner.status(queued[0])
        await runner.cancel(busy)
        assert (await runner.status(busy)).status is JobStatus.CANCELLED


@pytest.mark.parametrize("anyio_backend", [("asyncio", {"use_uvloop": True})])
async def test_runs_on_uvloop() -> None:
    # Backends served by uvicorn often run on uvloop, whose transports are not
    # asyncio.Transport subclasses: the lean HTTP client must not care.
    emulator = RunPodEmulator(scripted_handler, workers=2)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        results = await asyncio.gather(*(runner.run({"output": n}, timeout=10) for n in range(4)))
        handle = await runner.submit({"output": "later", "sleep_s": 0.05})
        assert (await runner.wait(handle, timeout=10)).output == "later"
    assert [r.output for r in results] == [0, 1, 2, 3]


@pytest.mark.parametrize(
    "anyio_backend",
    [("asyncio", {}), ("asyncio", {"use_uvloop": True})],
    ids=["asyncio", "uvloop"],
)
@pytest.mark.parametrize("through_httpx", [False, True], ids=["lean-wire", "httpx"])
async def test_a_caller_abandoning_a_held_request_still_cancels_the_job(
    through_httpx: bool,
) -> None:
    # /runsync names the job only when it answers: the runner lets the held request end (at
    # runsync_wait_s) and cancels the job then, instead of leaving it to run until its ttl.
    emulator = RunPodEmulator(scripted_handler, workers=1)
    client = httpx.AsyncClient() if through_httpx else None
    async with (
        serve(emulator) as server,
        runner_for(server.url, runsync_wait_s=1.0, http_client=client) as runner,
    ):
        async with anyio.create_task_group() as tg:
            tg.start_soon(runner.run, {"sleep_s": 30})
            with anyio.fail_after(5):
                while emulator.stats.jobs_submitted == 0:  # noqa: ASYNC110 - remote state
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
        with anyio.fail_after(5):
            while emulator.stats.jobs_cancelled == 0:  # noqa: ASYNC110 - remote state
                await anyio.sleep(0.01)
    assert emulator.stats.requests["cancel"] == 1
    if client is not None:
        await client.aclose()


@pytest.mark.parametrize(("route", "timeout"), [("run", 0.5), ("runsync", 2.0)])
async def test_a_server_that_hangs_cannot_hold_the_caller_past_the_deadline(
    route: str, timeout: float
) -> None:
    emulator = RunPodEmulator(scripted_handler, workers=1)
    async with serve(emulator) as server, runner_for(server.url) as runner:
        emulator.inject(route, "slow_response", delay_s=30)
        started = anyio.current_time()
        with pytest.raises(JobTimeoutError):
            await runner.run({"output": 1}, timeout=timeout)
        assert anyio.current_time() - started < timeout + 0.2
