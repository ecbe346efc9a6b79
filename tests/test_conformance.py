"""The conformance suite: every runner must pass every test here.

Each deployment runs ``gpujobs.testing.scripted_handler`` (its input says what the job does) and
hands the test a ready runner. A new runner joins by adding a deployment below.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager

import anyio
import pytest

from gpujobs import (
    JobCancelledError,
    JobFailedError,
    JobHandle,
    JobLostError,
    JobRunner,
    JobStatus,
    JobTimeoutError,
    LocalRunner,
    ModalRunner,
    PollSchedule,
    RetryPolicy,
    RunPodPod,
    RunPodServerless,
    VastRunner,
)
from gpujobs.testing import (
    FakeModal,
    Faults,
    HandlerWorker,
    ModalWebEmulator,
    RunPodEmulator,
    VastEmulator,
    scripted_handler,
    serve,
)

WORKERS = 4
FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=6, initial_backoff_s=0.01, max_backoff_s=0.05)
WORKER_TOKEN = "worker-token"
MODAL_PROXY_TOKEN = ("wk-test", "ws-secret")


@asynccontextmanager
async def local() -> AsyncIterator[JobRunner]:
    async with LocalRunner(scripted_handler, concurrency=WORKERS, name="conformance") as runner:
        yield runner


def runpod_emulated(
    faults: Faults | None = None,
) -> Callable[[], AbstractAsyncContextManager[JobRunner]]:
    @asynccontextmanager
    async def deployment() -> AsyncIterator[JobRunner]:
        emulator = RunPodEmulator(
            scripted_handler, workers=WORKERS, api_key="secret-key", faults=faults or Faults()
        )
        async with serve(emulator) as server:
            runner = RunPodServerless(
                endpoint_url=server.url,
                api_key="secret-key",
                name="conformance",
                poll=FAST_POLL,
                retry=FAST_RETRY,
            )
            async with runner:
                yield runner

    return deployment


# Faults a runner must ride out without the caller noticing: throttling everywhere, and 5xx,
# cut connections and slow answers on requests that are safe to repeat.
RIDEABLE_FAULTS = Faults(
    seed=7,
    rate_limit=0.1,
    retry_after_s=0.01,
    server_error=0.1,
    drop_connection=0.05,
    slow_response=0.05,
    slow_response_s=0.05,
    idempotent_routes_only=True,
)


@asynccontextmanager
async def runpod_pod_worker() -> AsyncIterator[JobRunner]:
    """The worker's own job server (the pod's code) running the scripted handler."""
    worker = HandlerWorker(scripted_handler, api_token=WORKER_TOKEN, max_queue=32)
    async with serve(worker) as server:
        runner = RunPodPod(
            base_url=server.url,
            worker_token=WORKER_TOKEN,
            name="conformance",
            queue_limit=32,
            poll=FAST_POLL,
            retry=FAST_RETRY,
        )
        async with runner:
            yield runner


def vast_emulated(
    faults: Faults | None = None,
) -> Callable[[], AbstractAsyncContextManager[JobRunner]]:
    """Instances rented from the Vast emulator, each running the worker's job server."""

    def worker(env: Mapping[str, str]) -> HandlerWorker:
        return HandlerWorker(scripted_handler, api_token=env["WORKER_API_TOKEN"], max_queue=32)

    @asynccontextmanager
    async def deployment() -> AsyncIterator[JobRunner]:
        emulator = VastEmulator(worker, api_key="secret-key", boot_s=0.05, faults=faults)
        async with serve(emulator) as server:
            runner = VastRunner(
                "gpujobs/test-worker",
                api_key="secret-key",
                server_url=server.url,
                name="conformance",
                queue_limit=32,
                poll=FAST_POLL,
                start_poll=FAST_POLL,
                retry=FAST_RETRY,
                reconcile_s=1.0,
            )
            async with runner:
                yield runner

    return deployment


@asynccontextmanager
async def modal_fake() -> AsyncIterator[JobRunner]:
    """ModalRunner through its SDK seam, on a fake Modal running the worker's Modal method."""
    fake = FakeModal.for_handler(scripted_handler, max_containers=WORKERS, min_containers=1)
    try:
        runner = ModalRunner(
            calls=fake, name="conformance", poll=FAST_POLL, retry=FAST_RETRY, long_poll_s=0.5
        )
        async with runner:
            yield runner
    finally:
        await fake.aclose()


@asynccontextmanager
async def modal_web() -> AsyncIterator[JobRunner]:
    """ModalRunner over HTTP: the worker's Modal web app behind Modal's web layer (proxy auth,
    and a request cap short enough that long polls get Modal's 303 to a result URL)."""
    fake = FakeModal.for_handler(scripted_handler, max_containers=WORKERS, min_containers=1)
    emulator = ModalWebEmulator(fake, proxy_token=MODAL_PROXY_TOKEN, request_cap_s=0.2)
    async with serve(emulator) as server:
        runner = ModalRunner(
            web_url=server.url,
            proxy_token_id=MODAL_PROXY_TOKEN[0],
            proxy_token_secret=MODAL_PROXY_TOKEN[1],
            name="conformance",
            poll=FAST_POLL,
            retry=FAST_RETRY,
            long_poll_s=0.5,
        )
        async with runner:
            yield runner


#: What a provider cannot show, as it documents: a test that needs it skips (or asks less of)
#: those deployments only, saying why. Modal reports no progress for a spawned call, and a call
#: waiting for a container looks the same as a running one ("no output yet").
CANNOT_SHOW: dict[str, set[str]] = {
    "modal-fake": {"progress", "queued"},
    "modal-web": {"progress", "queued"},
}


def shows(request: pytest.FixtureRequest, what: str) -> bool:
    """Whether the deployment under test can show ``what`` ("progress", "queued")."""
    return what not in CANNOT_SHOW.get(request.node.callspec.params["runner"], set())


DEPLOYMENTS = {
    "local": local,
    "runpod-emulator": runpod_emulated(),
    "runpod-emulator-faults": runpod_emulated(RIDEABLE_FAULTS),
    "runpod-pod-worker": runpod_pod_worker,
    "vast-emulator": vast_emulated(),
    "vast-emulator-faults": vast_emulated(RIDEABLE_FAULTS),
    "modal-fake": modal_fake,
    "modal-web": modal_web,
}


@pytest.fixture(params=sorted(DEPLOYMENTS))
async def runner(request: pytest.FixtureRequest) -> AsyncIterator[JobRunner]:
    async with DEPLOYMENTS[request.param]() as ready:
        yield ready


def handle_of(runner: JobRunner, job_id: str) -> JobHandle:
    return JobHandle(id=job_id, provider=runner.name, submitted_at=0.0)


async def settles_at(runner: JobRunner, job_id: str, expected: JobStatus) -> None:
    """Wait (bounded) for the provider to show ``expected`` for the job."""
    with anyio.fail_after(5):
        while (await runner.status(handle_of(runner, job_id))).status is not expected:  # noqa: ASYNC110 - remote state, no event to await
            await anyio.sleep(0.01)


pytestmark = pytest.mark.anyio


async def test_run_returns_the_output_with_timings(runner: JobRunner) -> None:
    result = await runner.run({"output": {"layers": 4}, "sleep_s": 0.05}, timeout=30)
    assert result.status is JobStatus.COMPLETED
    assert result.output == {"layers": 4}
    assert result.provider == "conformance"
    assert result.timings.execution_s is not None
    assert result.timings.execution_s >= 0.04
    assert result.timings.queue_s is not None
    assert result.timings.total_s is not None
    assert result.timings.total_s >= result.timings.execution_s


async def test_fan_out_twenty_jobs_with_gather(runner: JobRunner) -> None:
    results = await asyncio.gather(
        *(runner.run({"output": n, "sleep_s": 0.02}, timeout=60) for n in range(20))
    )
    assert [r.output for r in results] == list(range(20))
    assert len({r.id for r in results}) == 20


async def test_a_raising_handler_fails_the_job_with_its_message(runner: JobRunner) -> None:
    with pytest.raises(JobFailedError, match="the image is not an image") as info:
        await runner.run({"raise": "the image is not an image"}, timeout=30)
    assert info.value.error["error_message"] == "the image is not an image"
    assert info.value.job_id
    assert info.value.provider == "conformance"


async def test_a_returned_error_fails_the_job(runner: JobRunner) -> None:
    with pytest.raises(JobFailedError, match="out of memory"):
        await runner.run({"error": "out of memory"}, timeout=30)


async def test_submit_status_wait(runner: JobRunner) -> None:
    handle = await runner.submit({"output": "done", "sleep_s": 0.05}, timeout=30)
    assert handle.provider == "conformance"
    state = await runner.status(handle)
    assert state.id == handle.id
    assert state.status in {JobStatus.QUEUED, JobStatus.RUNNING, JobStatus.COMPLETED}
    result = await runner.wait(handle, timeout=30)
    assert result.output == "done"
    assert result.id == handle.id


async def test_progress_is_visible_while_running(
    runner: JobRunner, request: pytest.FixtureRequest
) -> None:
    if not shows(request, "progress"):
        pytest.skip("this provider sends no progress updates (documented)")
    handle = await runner.submit(
        {"progress": ["step 1"], "progress_interval_s": 0.01, "sleep_s": 2}, timeout=30
    )
    with anyio.fail_after(5):
        while (state := await runner.status(handle)).output != "step 1":  # noqa: ASYNC110
            await anyio.sleep(0.01)
    assert state.status is JobStatus.RUNNING
    await runner.cancel(handle)


async def test_timeout_stops_the_remote_job(runner: JobRunner) -> None:
    started = anyio.current_time()
    with pytest.raises(JobTimeoutError) as info:
        await runner.run({"sleep_s": 30}, timeout=0.3)
    assert anyio.current_time() - started < 0.3 + 1.0
    assert info.value.job_id
    # Cancelled by the runner, or stopped by the provider's own limit the deadline was carried
    # into, whichever came first: either way it no longer runs (or bills).
    with anyio.fail_after(5):
        while not (await runner.status(handle_of(runner, info.value.job_id))).status.is_terminal:  # noqa: ASYNC110
            await anyio.sleep(0.01)


async def test_a_cancelled_caller_cancels_the_remote_job(runner: JobRunner) -> None:
    handle = await runner.submit({"sleep_s": 30}, timeout=60)
    await settles_at(runner, handle.id, JobStatus.RUNNING)
    async with anyio.create_task_group() as tg:
        tg.start_soon(runner.wait, handle)
        await anyio.sleep(0.05)
        tg.cancel_scope.cancel()
    await settles_at(runner, handle.id, JobStatus.CANCELLED)


async def test_cancel_a_queued_job(runner: JobRunner, request: pytest.FixtureRequest) -> None:
    busy = [await runner.submit({"sleep_s": 30}, timeout=60) for _ in range(WORKERS)]
    queued = await runner.submit({"output": "never"}, timeout=60)
    state = await runner.status(queued)
    if shows(request, "queued"):
        assert state.status is JobStatus.QUEUED
    else:  # queued and running look the same at this provider: it is at least not over
        assert not state.status.is_terminal
    await runner.cancel(queued)
    with pytest.raises(JobCancelledError):
        await runner.wait(queued, timeout=5)
    for handle in busy:
        await runner.cancel(handle)
    await runner.cancel(queued)  # cancelling an ended job is not an error


async def test_idempotency_key_returns_the_same_job(runner: JobRunner) -> None:
    first = await runner.submit({"output": 1}, idempotency_key="order-17", timeout=30)
    second = await runner.submit({"output": 2}, idempotency_key="order-17", timeout=30)
    assert first == second
    assert (await runner.wait(second, timeout=30)).output == 1


async def test_an_unknown_job_is_lost(runner: JobRunner) -> None:
    with pytest.raises(JobLostError) as info:
        await runner.status(handle_of(runner, "no-such-job"))
    assert info.value.job_id == "no-such-job"


async def test_health(runner: JobRunner) -> None:
    health = await runner.health()
    assert health.ok
    assert health.provider == "conformance"
    assert sum(health.workers.values()) >= 1
