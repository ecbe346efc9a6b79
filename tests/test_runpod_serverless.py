"""RunPodServerless against exact, scripted answers (respx): what it sends and how it reads."""

from __future__ import annotations

import json

import anyio
import httpx
import pytest
import respx

from gpujobs import (
    AuthenticationError,
    ConfigurationError,
    InvalidInputError,
    JobFailedError,
    JobHandle,
    JobLostError,
    JobStatus,
    JobTimeoutError,
    PollSchedule,
    ProviderError,
    RetryPolicy,
    RunPodServerless,
)

BASE = "https://api.runpod.ai/v2/ep"
FAST_POLL = PollSchedule(first_s=0.001, max_interval_s=0.01)
FAST_RETRY = RetryPolicy(initial_backoff_s=0.001, max_backoff_s=0.01)


def runner(**kwargs: object) -> RunPodServerless:
    # respx intercepts httpx: hand the runner an httpx client (the http_client= seam).
    options: dict[str, object] = {
        "api_key": "key",
        "poll": FAST_POLL,
        "retry": FAST_RETRY,
        "http_client": httpx.AsyncClient(),
    }
    options.update(kwargs)
    return RunPodServerless("ep", **options)  # type: ignore[arg-type]


def job(status: str, **fields: object) -> dict[str, object]:
    return {"id": "job-1", "status": status, **fields}


def test_configuration_is_checked_up_front(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="API key"):
        RunPodServerless("ep")
    with pytest.raises(ConfigurationError):
        RunPodServerless("ep", endpoint_url="http://127.0.0.1:1", api_key="k")
    monkeypatch.setenv("RUNPOD_API_KEY", "from-env")
    assert RunPodServerless("ep").name == "runpod-serverless"
    assert RunPodServerless("ep", name="overflow").name == "overflow"


@pytest.mark.anyio
async def test_submit_carries_the_deadline_into_ttl_and_execution_timeout() -> None:
    with respx.mock:
        route = respx.post(f"{BASE}/run").respond(json=job("IN_QUEUE"))
        async with runner(execution_timeout_s=600) as r:
            handle = await r.submit({"x": 1}, timeout=120)
    body = json.loads(route.calls.last.request.content)
    assert body == {"input": {"x": 1}, "policy": {"executionTimeout": 120000, "ttl": 120000}}
    assert route.calls.last.request.headers["authorization"] == "Bearer key"
    assert handle.id == "job-1"
    assert handle.provider == "runpod-serverless"


@pytest.mark.anyio
async def test_run_takes_one_request_when_runsync_brings_the_result() -> None:
    with respx.mock:
        route = respx.post(f"{BASE}/runsync").respond(
            json=job(
                "COMPLETED",
                output={"layers": 4},
                delayTime=12000,
                executionTime=3500,
                workerId="w1",
            )
        )
        async with runner(usd_per_s=0.001) as r:
            result = await r.run({"x": 1}, timeout=100)
    assert route.call_count == 1
    assert 1000 <= int(route.calls.last.request.url.params["wait"]) <= 100000
    assert result.status is JobStatus.COMPLETED
    assert result.output == {"layers": 4}
    assert result.timings.queue_s == 12.0
    assert result.timings.execution_s == 3.5
    assert result.timings.cold_start is True  # an unseen worker after a 12 s wait
    assert result.cost is not None
    assert result.cost.usd == pytest.approx(0.0035)


@pytest.mark.anyio
async def test_run_falls_back_to_polling_when_the_job_outlives_the_wait() -> None:
    with respx.mock:
        respx.post(f"{BASE}/runsync").respond(json=job("IN_PROGRESS"))
        status = respx.get(f"{BASE}/status/job-1").mock(
            side_effect=[
                httpx.Response(200, json=job("IN_PROGRESS", output={"step": 3})),
                httpx.Response(502, text="<html>bad gateway</html>"),
                httpx.Response(200, text="not json at all"),
                httpx.Response(200, json=job("COMPLETED", output="done", executionTime=10)),
            ]
        )
        async with runner() as r:
            result = await r.run({"x": 1}, timeout=10)
    assert result.output == "done"
    assert status.call_count == 4


@pytest.mark.anyio
async def test_failed_job_raises_with_the_workers_message() -> None:
    error = json.dumps({"error_type": "<class 'ValueError'>", "error_message": "bad image"})
    with respx.mock:
        respx.post(f"{BASE}/runsync").respond(json=job("FAILED", error=error))
        async with runner() as r:
            with pytest.raises(JobFailedError, match="bad image") as info:
                await r.run({"x": 1})
    assert info.value.error["error_type"] == "<class 'ValueError'>"
    assert info.value.job_id == "job-1"
    assert info.value.retryable is False


@pytest.mark.anyio
async def test_auth_errors_are_not_retried() -> None:
    with respx.mock:
        route = respx.post(f"{BASE}/run").respond(401, json={"error": "Unauthorized"})
        async with runner() as r:
            with pytest.raises(AuthenticationError):
                await r.submit({"x": 1})
    assert route.call_count == 1


@pytest.mark.anyio
async def test_submit_retries_a_429_but_never_an_ambiguous_failure() -> None:
    with respx.mock:
        route = respx.post(f"{BASE}/run").mock(
            side_effect=[
                httpx.Response(429, headers={"Retry-After": "0"}, json={"error": "slow"}),
                httpx.Response(200, json=job("IN_QUEUE")),
            ]
        )
        async with runner() as r:
            assert (await r.submit({"x": 1})).id == "job-1"
        assert route.call_count == 2

    for ambiguous in (httpx.Response(500, json={"error": "?"}), httpx.ReadTimeout("slow")):
        with respx.mock:
            route = respx.post(f"{BASE}/run").mock(side_effect=[ambiguous])
            async with runner() as r:
                with pytest.raises(ProviderError) as info:
                    await r.submit({"x": 1})
            # The job may be queued already: sending it again could run it twice.
            assert route.call_count == 1
            assert info.value.request_sent is True


@pytest.mark.anyio
async def test_submit_retries_when_the_connection_could_not_be_opened() -> None:
    with respx.mock:
        route = respx.post(f"{BASE}/run").mock(
            side_effect=[httpx.ConnectError("refused"), httpx.Response(200, json=job("IN_QUEUE"))]
        )
        async with runner() as r:
            await r.submit({"x": 1})
    assert route.call_count == 2


@pytest.mark.anyio
async def test_oversize_and_unserialisable_payloads_are_refused_before_sending() -> None:
    with respx.mock:
        route = respx.post(f"{BASE}/run")
        async with runner() as r:
            with pytest.raises(InvalidInputError, match="at most 10 MB"):
                await r.submit({"image": "x" * (10 * 1024 * 1024)})
            with pytest.raises(InvalidInputError, match="JSON"):
                await r.submit({"bytes": b"raw"})
            with pytest.raises(InvalidInputError, match="JSON"):
                await r.submit({"nan": float("nan")})
    assert route.call_count == 0


@pytest.mark.anyio
async def test_status_404_of_a_known_job_is_a_lost_job() -> None:
    with respx.mock:
        respx.post(f"{BASE}/run").respond(json=job("IN_QUEUE"))
        respx.get(f"{BASE}/status/job-1").respond(404, json={"error": "request does not exist"})
        async with runner() as r:
            handle = await r.submit({"x": 1})
            with pytest.raises(JobLostError) as info:
                await r.wait(handle, timeout=5)
    assert info.value.job_id == "job-1"


@pytest.mark.anyio
async def test_status_switches_to_post_on_405() -> None:
    with respx.mock:
        respx.post(f"{BASE}/run").respond(json=job("IN_PROGRESS"))
        get = respx.get(f"{BASE}/status/job-1").respond(405)
        post = respx.post(f"{BASE}/status/job-1").respond(json=job("COMPLETED", output=1))
        async with runner() as r:
            result = await r.wait(await r.submit({"x": 1}), timeout=5)
            await r.status(result_handle(result.id))
    assert result.output == 1
    assert get.call_count == 1  # remembered: later looks go straight to POST
    assert post.call_count == 2


def result_handle(job_id: str) -> JobHandle:
    return JobHandle(id=job_id, provider="runpod-serverless", submitted_at=0)


@pytest.mark.anyio
async def test_timeout_cancels_the_remote_job() -> None:
    with respx.mock:
        # Less time than RunPod's shortest held wait: /run, so the id is known at once.
        respx.post(f"{BASE}/run").respond(json=job("IN_QUEUE"))
        respx.get(f"{BASE}/status/job-1").respond(json=job("IN_QUEUE"))
        cancel = respx.post(f"{BASE}/cancel/job-1").respond(json=job("CANCELLED"))
        async with runner() as r:
            with pytest.raises(JobTimeoutError):
                await r.run({"x": 1}, timeout=0.2)
    assert cancel.call_count == 1


@pytest.mark.anyio
async def test_the_held_request_ends_before_the_deadline() -> None:
    with respx.mock:
        runsync = respx.post(f"{BASE}/runsync").respond(json=job("COMPLETED", output=1))
        async with runner() as r:
            await r.run({"x": 1}, timeout=5)
    # Answered (with the id, if the job still runs) half a second before the deadline.
    wait_ms = int(runsync.calls.last.request.url.params["wait"])
    assert 4_000 < wait_ms <= 4_500


@pytest.mark.anyio
async def test_a_cancelled_caller_cancels_the_remote_job() -> None:
    with respx.mock:
        respx.post(f"{BASE}/runsync").respond(json=job("IN_QUEUE"))
        polled = anyio.Event()

        def still_queued(request: httpx.Request) -> httpx.Response:
            polled.set()
            return httpx.Response(200, json=job("IN_QUEUE"))

        respx.get(f"{BASE}/status/job-1").mock(side_effect=still_queued)
        cancel = respx.post(f"{BASE}/cancel/job-1").respond(json=job("CANCELLED"))
        async with runner() as r, anyio.create_task_group() as tg:
            tg.start_soon(r.run, {"x": 1})
            await polled.wait()
            tg.cancel_scope.cancel()
    assert cancel.call_count == 1


@pytest.mark.anyio
async def test_health_purge_and_stream() -> None:
    with respx.mock:
        respx.get(f"{BASE}/health").respond(
            json={
                "jobs": {"completed": 3, "inQueue": 1},
                "workers": {"idle": 1, "running": 2, "new": "x"},
            }
        )
        respx.post(f"{BASE}/purge-queue").respond(json={"removed": 2, "status": "completed"})
        respx.get(f"{BASE}/stream/job-1").mock(
            side_effect=[
                httpx.Response(200, json={"status": "IN_PROGRESS", "stream": [{"output": "a"}]}),
                httpx.Response(200, json={"status": "IN_PROGRESS", "stream": []}),
                httpx.Response(200, json={"status": "COMPLETED", "stream": [{"output": "b"}]}),
            ]
        )
        async with runner() as r:
            health = await r.health()
            assert await r.purge_queue() == 2
            chunks = [chunk async for chunk in r.stream(result_handle("job-1"), timeout=5)]
    assert health.ok
    assert health.workers == {"idle": 1, "running": 2}
    assert health.jobs["completed"] == 3
    assert chunks == ["a", "b"]


@pytest.mark.anyio
async def test_health_reports_an_unreachable_endpoint_instead_of_raising() -> None:
    with respx.mock:
        respx.get(f"{BASE}/health").mock(side_effect=httpx.ConnectError("refused"))
        async with runner() as r:
            health = await r.health()
    assert health.ok is False
    assert health.detail


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (httpx.Response(200, text="<html>bad gateway</html>"), "not JSON: '<html>bad gateway"),
        (httpx.Response(200, json={"status": "COMPLETED"}), "not a job"),
        (httpx.Response(200, json=["job-1"]), "not a job"),
    ],
)
async def test_an_answer_that_is_not_a_job_is_a_provider_error(
    answer: httpx.Response, message: str
) -> None:
    with respx.mock:
        respx.post(f"{BASE}/runsync").mock(return_value=answer)
        async with runner() as r:
            with pytest.raises(ProviderError, match=message) as info:
                await r.run({"x": 1}, timeout=30)
    assert info.value.provider == "runpod-serverless"
    with respx.mock:
        respx.get(f"{BASE}/status/job-1").mock(return_value=answer)
        async with runner() as r:
            with pytest.raises(ProviderError, match=message) as info:
                await r.status(JobHandle(id="job-1", provider="runpod-serverless", submitted_at=0))
    assert info.value.job_id == "job-1"


@pytest.mark.anyio
async def test_a_job_behind_a_byte_order_mark_is_read() -> None:
    body = "\ufeff" + json.dumps(job("COMPLETED", output={"layers": 2}))
    with respx.mock:
        respx.post(f"{BASE}/runsync").respond(content=body.encode())
        async with runner() as r:
            assert (await r.run({"x": 1}, timeout=30)).output == {"layers": 2}
