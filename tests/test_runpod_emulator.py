"""The RunPod Serverless emulator, seen from the wire: plain httpx against it on loopback."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator, MutableMapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest

from gpujobs.testing import (
    DEFAULT_RATE_LIMITS,
    EmulatorStats,
    Faults,
    RunPodEmulator,
    scripted_handler,
    scripted_stream_handler,
    serve,
    serve_in_thread,
)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


pytestmark = pytest.mark.anyio

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMED_OUT"}


@asynccontextmanager
async def emulated(
    handler: Any = scripted_handler, **options: Any
) -> AsyncIterator[tuple[RunPodEmulator, httpx.AsyncClient]]:
    emulator = RunPodEmulator(handler, **options)
    async with (
        serve(emulator) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as client,
    ):
        yield emulator, client


async def submit(client: httpx.AsyncClient, job_input: dict[str, Any], **extra: Any) -> str:
    response = await client.post("/run", json={"input": job_input, **extra})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["status"] == "IN_QUEUE"
    return str(body["id"])


async def until(
    client: httpx.AsyncClient, job_id: str, statuses: set[str], *, output: Any = None
) -> dict[str, Any]:
    """Poll /status (bounded) until the job shows one of ``statuses`` (and ``output``)."""
    with anyio.fail_after(5):
        while True:
            response = await client.get(f"/status/{job_id}")
            assert response.status_code == 200, response.text
            body: dict[str, Any] = response.json()
            if body["status"] in statuses and (output is None or body.get("output") == output):
                return body
            await anyio.sleep(0.005)


async def until_gone(client: httpx.AsyncClient, job_id: str) -> dict[str, Any]:
    with anyio.fail_after(5):
        while (response := await client.get(f"/status/{job_id}")).status_code == 200:  # noqa: ASYNC110 - remote state
            await anyio.sleep(0.005)
    assert response.status_code == 404
    body: dict[str, Any] = response.json()
    return body


async def health(client: httpx.AsyncClient) -> dict[str, Any]:
    response = await client.get("/health")
    assert response.status_code == 200
    body: dict[str, Any] = response.json()
    return body


def control(client: httpx.AsyncClient, path: str) -> str:
    """The URL of one of the emulator's own routes (``/_emulator/...``)."""
    return str(client.base_url.copy_with(path=f"/_emulator/{path}"))


class Probe:
    """A handler that tells the test when it started and whether it was cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.calls = 0

    async def __call__(self, job: dict[str, Any]) -> Any:
        self.calls += 1
        self.started.set()
        try:
            await asyncio.sleep(job["input"].get("sleep_s", 0))
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return {"done": job["id"]}


# -- the happy path --------------------------------------------------------------------------------


async def test_run_then_status_reaches_completed_with_timings() -> None:
    async with emulated() as (emulator, client):
        job_id = await submit(client, {"sleep_s": 0.05, "n": 1})
        assert job_id.endswith("-u1")
        body = await until(client, job_id, TERMINAL)
    assert set(body) == {"id", "status", "output", "delayTime", "executionTime", "workerId"}
    assert body["status"] == "COMPLETED"
    assert body["output"] == {"echo": {"sleep_s": 0.05, "n": 1}}
    assert isinstance(body["delayTime"], int)
    assert 40 <= body["executionTime"] < 1000
    assert body["workerId"] in emulator.worker_ids


async def test_a_queued_job_waits_for_the_only_worker() -> None:
    async with emulated(workers=1) as (_, client):
        first = await submit(client, {"sleep_s": 0.2})
        second = await submit(client, {"output": "second"})
        running = await until(client, first, {"IN_PROGRESS"})
        assert set(running) == {"id", "status", "delayTime", "workerId"}
        queued = (await client.get(f"/status/{second}")).json()
        assert queued == {"id": second, "status": "IN_QUEUE"}
        done = await until(client, second, TERMINAL)
    assert done["status"] == "COMPLETED"
    assert done["output"] == "second"
    assert done["delayTime"] >= 150  # it waited for the first job


async def test_runsync_answers_with_the_finished_job() -> None:
    async with emulated() as (emulator, client):
        response = await client.post("/runsync", json={"input": {"output": [1, 2]}})
    body = response.json()
    assert response.status_code == 200
    assert body["status"] == "COMPLETED"
    assert body["output"] == [1, 2]
    assert {"delayTime", "executionTime", "workerId"} <= set(body)
    assert emulator.stats.requests == {"runsync": 1}


async def test_runsync_answers_a_running_job_when_the_wait_is_over() -> None:
    async with emulated(runsync_wait_limits_ms=(10, 300_000)) as (_, client):
        started = time.monotonic()
        response = await client.post("/runsync?wait=50", json={"input": {"sleep_s": 0.3}})
        assert time.monotonic() - started < 0.25
        body = response.json()
        assert body == {"id": body["id"], "status": "IN_PROGRESS"}
        done = await until(client, body["id"], TERMINAL)
    assert done["status"] == "COMPLETED"


async def test_runsync_clamps_the_wait_to_its_limits() -> None:
    async with emulated(runsync_wait_limits_ms=(100, 300_000)) as (_, client):
        started = time.monotonic()
        response = await client.post("/runsync?wait=1", json={"input": {"sleep_s": 5}})
        waited = time.monotonic() - started
        bad = await client.post("/runsync?wait=soon", json={"input": {}})
    assert response.json()["status"] == "IN_PROGRESS"
    assert 0.09 <= waited < 1
    assert bad.status_code == 400


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not json", "not valid JSON"),
        (b"[1, 2]", "input"),
        (b"{}", "input"),
        (b'{"input": 3}', "input"),
        (b'{"input": {}, "policy": {"executionTimeout": -1}}', "policy"),
        (b'{"input": {}, "policy": {"ttl": "long"}}', "policy"),
    ],
)
async def test_a_malformed_submission_is_a_400(content: bytes, reason: str) -> None:
    async with emulated() as (emulator, client):
        for route in ("/run", "/runsync"):
            response = await client.post(route, content=content)
            assert response.status_code == 400
            assert reason in response.json()["error"]
    assert emulator.stats.jobs_submitted == 0


async def test_payload_limits_per_route() -> None:
    async with emulated(max_payload_bytes=1000, max_runsync_payload_bytes=2000) as (_, client):
        job_input = {"text": "x" * 1500}
        too_large = await client.post("/run", json={"input": job_input})
        assert too_large.status_code == 400
        assert "payload too large" in too_large.json()["error"]
        # The connection is still good, and /runsync takes twice as much.
        accepted = await client.post("/runsync", json={"input": job_input})
        assert accepted.status_code == 200


async def test_the_default_run_limit_is_ten_mebibytes() -> None:
    padding = "x" * (10 * 1024 * 1024)
    async with emulated() as (_, client):
        response = await client.post("/run", json={"input": {"data": padding}})
    assert response.status_code == 400
    assert "payload too large" in response.json()["error"]


# -- routes, methods, unknown jobs --------------------------------------------------------------


async def test_unknown_jobs_are_404_on_every_id_route() -> None:
    async with emulated() as (_, client):
        for method, route in [("GET", "status"), ("GET", "stream"), ("POST", "cancel"),
                              ("POST", "retry")]:  # fmt: skip
            response = await client.request(method, f"/{route}/no-such-job")
            assert response.status_code == 404
            assert response.json() == {"error": "request does not exist"}


async def test_wrong_methods_are_405_and_unknown_paths_404() -> None:
    async with emulated() as (_, client):
        assert (await client.get("/run")).status_code == 405
        assert (await client.post("/status/abc")).status_code == 405
        response = await client.delete("/health")
        assert response.status_code == 405
        assert response.headers["allow"] == "GET"
        assert (await client.get("/nothing")).status_code == 404
        assert (await client.get("/status/")).status_code == 404
        other = await client.get(str(client.base_url).replace("test-endpoint", "other") + "/health")
        assert other.status_code == 404


# -- handlers --------------------------------------------------------------------------------------


async def test_progress_shows_as_partial_output_while_running() -> None:
    async with emulated() as (_, client):
        job_id = await submit(client, {"progress": ["1/2", "2/2"], "sleep_s": 5})
        body = await until(client, job_id, {"IN_PROGRESS"}, output="2/2")
        assert body["status"] == "IN_PROGRESS"
        cancelled = await client.post(f"/cancel/{job_id}")
        assert cancelled.json() == {"id": job_id, "status": "CANCELLED"}


async def test_a_sync_handler_runs_in_a_thread_and_reports_progress() -> None:
    def handler(job: dict[str, Any], progress: Any) -> Any:
        progress("half")
        time.sleep(0.01)
        return {"sum": sum(job["input"]["numbers"])}

    async with emulated(handler) as (_, client):
        response = await client.post("/runsync", json={"input": {"numbers": [1, 2, 3]}})
    assert response.json()["output"] == {"sum": 6}


async def test_a_raising_handler_fails_with_the_sdk_error_json() -> None:
    async with emulated() as (emulator, client):
        job_id = await submit(client, {"raise": "bad image"})
        body = await until(client, job_id, TERMINAL)
    assert body["status"] == "FAILED"
    assert "output" not in body
    error = json.loads(body["error"])
    assert error["error_type"] == "<class 'RuntimeError'>"
    assert error["error_message"] == "bad image"
    assert "RuntimeError: bad image" in error["error_traceback"]
    assert emulator.stats.jobs_failed == 1


async def test_a_returned_error_fails_the_job() -> None:
    async with emulated() as (_, client):
        body = (await client.post("/runsync", json={"input": {"error": "out of memory"}})).json()
    assert body["status"] == "FAILED"
    assert body["error"] == "out of memory"
    assert "output" not in body


async def test_an_async_generator_streams_its_chunks_once_each() -> None:
    async with emulated(scripted_stream_handler) as (_, client):
        job_id = await submit(client, {"stream": ["a", "b", "c"], "sleep_s": 0.03})
        chunks: list[Any] = []
        polls = 0
        with anyio.fail_after(5):
            while True:
                body = (await client.get(f"/stream/{job_id}")).json()
                polls += 1
                chunks += [item["output"] for item in body["stream"]]
                if body["status"] in TERMINAL:
                    break
                await anyio.sleep(0.01)
        final = (await client.get(f"/status/{job_id}")).json()
    assert chunks == ["a", "b", "c"]
    assert polls > 1
    assert final["status"] == "COMPLETED"
    assert final["output"] == ["a", "b", "c"]


async def test_a_sync_generator_is_aggregated() -> None:
    def handler(job: dict[str, Any]) -> Iterator[int]:
        yield from job["input"]["items"]

    async with emulated(handler) as (_, client):
        body = (await client.post("/runsync", json={"input": {"items": [3, 4]}})).json()
    assert body["status"] == "COMPLETED"
    assert body["output"] == [3, 4]


async def test_a_failing_stream_keeps_its_chunks_and_fails_as_the_sdk_says() -> None:
    async with emulated(scripted_stream_handler) as (_, client):
        job_id = await submit(client, {"stream": [1], "raise": "broke"})
        await until(client, job_id, TERMINAL)
        body = (await client.get(f"/stream/{job_id}")).json()
    assert body["status"] == "FAILED"
    assert body["stream"] == [{"output": 1}]
    assert body["error"].startswith("handler: broke")


# -- workers, timeouts, expiry ------------------------------------------------------------------


async def test_cold_starts_count_in_delay_time() -> None:
    options = {"workers": 1, "cold_start_s": 0.1, "idle_timeout_s": 0.05}
    async with emulated(**options) as (_, client):
        job_id = await submit(client, {})
        with anyio.fail_after(5):
            while (await health(client))["workers"]["initializing"] != 1:  # noqa: ASYNC110
                await anyio.sleep(0.005)
        assert (await client.get(f"/status/{job_id}")).json()["status"] == "IN_QUEUE"
        cold = await until(client, job_id, TERMINAL)
        warm = (await client.post("/runsync", json={"input": {}})).json()
        await anyio.sleep(0.1)  # idle past idle_timeout_s: the worker is cold again
        assert (await health(client))["workers"]["idle"] == 0
        cold_again = (await client.post("/runsync", json={"input": {}})).json()
    assert cold["delayTime"] >= 100
    assert warm["delayTime"] < 50
    assert cold_again["delayTime"] >= 100


async def test_a_warm_worker_is_preferred_over_a_cold_one() -> None:
    async with emulated(workers=3, cold_start_s=0.1) as (_, client):
        first = (await client.post("/runsync", json={"input": {}})).json()
        second = (await client.post("/runsync", json={"input": {}})).json()
    assert first["delayTime"] >= 100
    assert second["delayTime"] < 50
    assert second["workerId"] == first["workerId"]


async def test_workers_run_jobs_side_by_side() -> None:
    async with emulated(workers=2) as (_, client):
        ids = [await submit(client, {"sleep_s": 0.1}) for _ in range(4)]
        bodies = [await until(client, job_id, TERMINAL) for job_id in ids]
    delays = sorted(body["delayTime"] for body in bodies)
    assert delays[1] < 50
    assert delays[2] >= 80
    assert len({body["workerId"] for body in bodies}) == 2


async def test_execution_timeout_times_the_job_out_and_cancels_the_handler() -> None:
    probe = Probe()
    async with emulated(probe) as (emulator, client):
        job_id = await submit(client, {"sleep_s": 5}, policy={"executionTimeout": 100})
        body = await until(client, job_id, TERMINAL)
        assert probe.cancelled.is_set()
    assert body["status"] == "TIMED_OUT"
    assert 90 <= body["executionTime"] < 1000
    assert emulator.stats.jobs_timed_out == 1


async def test_ttl_forgets_even_a_running_job() -> None:
    probe = Probe()
    async with emulated(probe) as (emulator, client):
        job_id = await submit(client, {"sleep_s": 5}, policy={"ttl": 150})
        await until(client, job_id, {"IN_PROGRESS"})
        assert await until_gone(client, job_id) == {"error": "request does not exist"}
        with anyio.fail_after(1):
            await probe.cancelled.wait()
    assert emulator.stats.jobs_expired == 1


async def test_results_expire_after_their_ttl_runsync_sooner() -> None:
    async with emulated(result_ttl_s=0.3, runsync_result_ttl_s=0.05) as (_, client):
        run_id = await submit(client, {})
        await until(client, run_id, TERMINAL)
        sync_id = (await client.post("/runsync", json={"input": {}})).json()["id"]
        await until_gone(client, sync_id)
        # The /run result outlives the /runsync one, then goes too.
        assert (await client.get(f"/status/{run_id}")).status_code == 200
        await until_gone(client, run_id)


async def test_faults_can_expire_results_early() -> None:
    async with emulated(faults=Faults(expire_results_s=0.05)) as (_, client):
        job_id = await submit(client, {})
        await until(client, job_id, TERMINAL)
        await until_gone(client, job_id)


# -- cancel, retry, purge, health -----------------------------------------------------------------


async def test_cancel_a_running_job_cancels_its_handler() -> None:
    probe = Probe()
    async with emulated(probe) as (emulator, client):
        job_id = await submit(client, {"sleep_s": 5})
        await until(client, job_id, {"IN_PROGRESS"})
        response = await client.post(f"/cancel/{job_id}")
        assert response.json() == {"id": job_id, "status": "CANCELLED"}
        with anyio.fail_after(1):
            await probe.cancelled.wait()
        body = (await client.get(f"/status/{job_id}")).json()
    assert body["status"] == "CANCELLED"
    assert "executionTime" not in body
    assert emulator.stats.jobs_cancelled == 1


async def test_cancel_a_queued_job_and_a_finished_one() -> None:
    probe = Probe()
    async with emulated(probe, workers=1) as (_, client):
        busy = await submit(client, {"sleep_s": 5})
        queued = await submit(client, {})
        await until(client, busy, {"IN_PROGRESS"})
        assert (await client.post(f"/cancel/{queued}")).json()["status"] == "CANCELLED"
        assert (await client.post(f"/cancel/{busy}")).json()["status"] == "CANCELLED"
        done = (await client.post("/runsync", json={"input": {}})).json()
        assert done["status"] == "COMPLETED"
        again = await client.post(f"/cancel/{done['id']}")
        assert (await client.get(f"/status/{queued}")).json()["status"] == "CANCELLED"
    assert again.json() == {"id": done["id"], "status": "COMPLETED"}
    assert probe.calls == 2  # the cancelled queued job never ran


async def test_retry_refuses_a_job_that_did_not_fail() -> None:
    async with emulated() as (_, client):
        completed = await client.post("/runsync", json={"input": {"output": "ok"}})
        refused = await client.post(f"/retry/{completed.json()['id']}")
        assert refused.status_code == 400
        assert "COMPLETED" in refused.json()["error"]


async def test_retry_runs_a_failed_or_timed_out_job_again() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("run", "fail_job")
        failed = await submit(client, {"output": "second time lucky"})
        assert (await until(client, failed, TERMINAL))["status"] == "FAILED"
        emulator.inject("run", "timeout_job")
        timed_out = await submit(client, {"output": "also"})
        assert (await until(client, timed_out, TERMINAL))["status"] == "TIMED_OUT"
        for job_id in (failed, timed_out):
            response = await client.post(f"/retry/{job_id}")
            assert response.json() == {"id": job_id, "status": "IN_QUEUE"}
        assert (await until(client, failed, TERMINAL))["output"] == "second time lucky"
        assert (await until(client, timed_out, TERMINAL))["status"] == "COMPLETED"
        assert (await health(client))["jobs"]["retried"] == 2
    assert emulator.job_record(failed)["attempts"] == 2  # type: ignore[index]


async def test_purge_queue_removes_only_queued_jobs() -> None:
    async with emulated(workers=1) as (_, client):
        running = await submit(client, {"sleep_s": 5})
        await until(client, running, {"IN_PROGRESS"})
        queued = [await submit(client, {}) for _ in range(3)]
        response = await client.post("/purge-queue")
        assert response.json() == {"removed": 3, "status": "completed"}
        for job_id in queued:
            assert (await client.get(f"/status/{job_id}")).status_code == 404
        assert (await client.get(f"/status/{running}")).json()["status"] == "IN_PROGRESS"
        assert (await client.post("/purge-queue")).json()["removed"] == 0


async def test_health_counts_jobs_and_workers() -> None:
    async with emulated(workers=2) as (emulator, client):
        idle = await health(client)
        assert idle["workers"] == {"idle": 2, "running": 0, "initializing": 0, "throttled": 0,
                                   "unhealthy": 0}  # fmt: skip
        await client.post("/runsync", json={"input": {}})
        await client.post("/runsync", json={"input": {"raise": "x"}})
        running = await submit(client, {"sleep_s": 5})
        await until(client, running, {"IN_PROGRESS"})
        emulator.inject("run", "stuck_in_queue")
        await submit(client, {})
        body = await health(client)
    assert body["jobs"] == {"completed": 1, "failed": 1, "inProgress": 1, "inQueue": 1,
                            "retried": 0}  # fmt: skip
    assert body["workers"]["running"] == 1
    assert body["workers"]["idle"] == 1


async def test_cold_workers_are_not_counted_before_they_start() -> None:
    async with emulated(workers=3, cold_start_s=0.05) as (_, client):
        workers = (await health(client))["workers"]
    assert sum(workers.values()) == 0  # scaled to zero, as RunPod reports it


# -- auth and rate limits --------------------------------------------------------------------------


async def test_api_key_is_required_as_bearer_or_bare() -> None:
    secret = "rp-secret-123"
    async with emulated(api_key=secret) as (emulator, client):
        missing = await client.get("/health")
        wrong = await client.get("/health", headers={"Authorization": "Bearer nope"})
        bearer = await client.get("/health", headers={"Authorization": f"Bearer {secret}"})
        bare = await client.get("/health", headers={"Authorization": secret})
        run = await client.post("/run", json={"input": {}})
    assert missing.status_code == wrong.status_code == run.status_code == 401
    assert missing.json() == {"error": "Unauthorized"}
    assert bearer.status_code == bare.status_code == 200
    assert emulator.stats.jobs_submitted == 0
    assert all(secret not in r.text for r in (missing, wrong, bearer, bare, run))
    assert secret not in repr(emulator.stats)


async def test_rate_limits_use_a_sliding_window_per_route() -> None:
    async with emulated(rate_limits={"status": 3}, rate_limit_window_s=0.2) as (emulator, client):
        codes = [(await client.get("/status/x")).status_code for _ in range(4)]
        limited = await client.get("/status/x")
        assert (await client.get("/health")).status_code == 200  # another route, no limit
        await anyio.sleep(0.25)  # the window slides past the first requests
        after = await client.get("/status/x")
    assert codes == [404, 404, 404, 429]
    assert limited.status_code == 429
    assert limited.json() == {"error": "rate limited"}
    assert limited.headers["retry-after"] == "1"
    assert after.status_code == 404
    assert emulator.stats.responses[429] == 2


async def test_purge_queue_is_limited_to_two_per_window_by_default() -> None:
    assert DEFAULT_RATE_LIMITS["purge-queue"] == 2
    async with emulated() as (_, client):
        codes = [(await client.post("/purge-queue")).status_code for _ in range(3)]
    assert codes == [200, 200, 429]


async def test_a_none_rate_limit_lifts_it() -> None:
    async with emulated(rate_limits={"purge-queue": None}) as (_, client):
        codes = {(await client.post("/purge-queue")).status_code for _ in range(5)}
    assert codes == {200}


# -- injected faults -------------------------------------------------------------------------------


async def test_injected_rate_limits_fire_first_with_their_retry_after() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("status", "rate_limit", times=2, retry_after_s=0.1)
        first, second, third = [await client.get("/status/x") for _ in range(3)]
    assert first.status_code == second.status_code == 429
    assert first.headers["retry-after"] == "0.1"
    assert third.status_code == 404


async def test_an_injected_server_error_fires_before_the_job_is_queued() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("run", "server_error")
        emulator.inject("run", "server_error", status=502, html=True)
        json_error = await client.post("/run", json={"input": {}})
        html_error = await client.post("/run", json={"input": {}})
        assert (await health(client))["jobs"]["inQueue"] == 0
    assert json_error.status_code == 500
    assert "error" in json_error.json()
    assert html_error.status_code == 502
    assert html_error.headers["content-type"].startswith("text/html")
    assert html_error.text.startswith("<html>")
    assert emulator.stats.jobs_submitted == 0


async def test_a_server_error_after_processing_has_queued_the_job() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("run", "server_error", status=503, after_processing=True)
        response = await client.post("/run", json={"input": {}})
        assert response.status_code == 503
        with anyio.fail_after(5):
            while emulator.stats.jobs_completed != 1:  # noqa: ASYNC110 - no event to await
                await anyio.sleep(0.005)
    assert emulator.stats.jobs_submitted == 1


async def test_a_dropped_connection_is_a_protocol_error_for_httpx() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("run", "drop_connection")
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/run", json={"input": {}})
        assert emulator.stats.jobs_submitted == 0
        emulator.inject("run", "drop_connection", after_processing=True)
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post("/run", json={"input": {}})
        assert emulator.stats.jobs_submitted == 1
        assert (await client.get("/health")).status_code == 200  # a new connection works
    assert emulator.stats.dropped_connections == 2


async def test_an_injected_slow_response_is_slow() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("health", "slow_response", delay_s=0.15)
        started = time.monotonic()
        response = await client.get("/health")
    assert response.status_code == 200
    assert time.monotonic() - started >= 0.15


async def test_an_injected_lost_answers_404_once() -> None:
    async with emulated() as (emulator, client):
        job_id = (await client.post("/runsync", json={"input": {}})).json()["id"]
        emulator.inject("status", "lost")
        lost = await client.get(f"/status/{job_id}")
        found = await client.get(f"/status/{job_id}")
    assert lost.status_code == 404
    assert found.json()["status"] == "COMPLETED"


async def test_injected_faults_on_a_route_fire_in_order() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("health", "rate_limit")
        emulator.inject("health", "server_error", times=2, status=503)
        codes = [(await client.get("/health")).status_code for _ in range(4)]
    assert codes == [429, 503, 503, 200]


async def test_job_faults_stuck_lost_failed_timed_out() -> None:
    async with emulated() as (emulator, client):
        for fault in ("stuck_in_queue", "lose_job", "fail_job", "timeout_job"):
            emulator.inject("run", fault)
        stuck, lost, failed, timed_out = [await submit(client, {}) for _ in range(4)]
        assert (await client.get(f"/status/{lost}")).status_code == 404
        failure = await until(client, failed, TERMINAL)
        assert (await until(client, timed_out, TERMINAL))["status"] == "TIMED_OUT"
        assert (await client.get(f"/status/{stuck}")).json()["status"] == "IN_QUEUE"
        assert (await health(client))["jobs"]["inQueue"] == 1
    assert failure["status"] == "FAILED"
    assert "injected" in json.loads(failure["error"])["error_message"]
    assert emulator.job_record(stuck)["fault"] == "stuck_in_queue"  # type: ignore[index]


async def test_a_lost_runsync_job_answers_queued_then_404() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("runsync", "lose_job")
        body = (await client.post("/runsync", json={"input": {}})).json()
        assert body["status"] == "IN_QUEUE"
        assert (await client.get(f"/status/{body['id']}")).status_code == 404


def test_inject_refuses_what_it_cannot_do() -> None:
    emulator = RunPodEmulator()
    with pytest.raises(ValueError, match="unknown route"):
        emulator.inject("runs", "server_error")
    with pytest.raises(ValueError, match="unknown fault"):
        emulator.inject("run", "explode")
    with pytest.raises(ValueError, match="submissions"):
        emulator.inject("status", "fail_job")
    with pytest.raises(ValueError, match="job id"):
        emulator.inject("health", "lost")
    with pytest.raises(TypeError, match="retry_after"):
        emulator.inject("run", "server_error", retry_after=1)
    with pytest.raises(ValueError, match="times"):
        emulator.inject("run", "server_error", times=0)


async def test_clear_injected_forgets_pending_faults() -> None:
    async with emulated() as (emulator, client):
        emulator.inject("health", "server_error", times=5)
        emulator.clear_injected()
        assert (await client.get("/health")).status_code == 200


# -- random faults ---------------------------------------------------------------------------------


async def seen_codes(faults: Faults, route: str, n: int = 30) -> list[int]:
    async with emulated(faults=faults, rate_limits={"purge-queue": None}) as (_, client):
        codes = []
        for _ in range(n):
            try:
                codes.append((await client.post(f"/{route}")).status_code)
            except httpx.RemoteProtocolError:
                codes.append(0)
    return codes


async def test_random_faults_repeat_with_the_seed() -> None:
    faults = Faults(seed=11, rate_limit=0.2, server_error=0.2, drop_connection=0.1)
    first = await seen_codes(faults, "purge-queue")
    assert first == await seen_codes(faults, "purge-queue")
    assert {0, 200, 429} <= set(first)
    assert set(first) & {500, 502, 503}


async def test_idempotent_routes_only_spares_submissions_but_not_from_429() -> None:
    harmful = Faults(seed=1, server_error=0.5, drop_connection=0.5, idempotent_routes_only=True)
    assert set(await seen_codes(harmful, "purge-queue", 10)) <= {0, 500, 502, 503}
    assert set(await seen_codes(harmful, "run", 10)) == {400}  # reached the route: no body
    throttled = Faults(seed=1, rate_limit=1.0, idempotent_routes_only=True)
    assert set(await seen_codes(throttled, "run", 5)) == {429}


async def test_random_job_faults() -> None:
    async with emulated(faults=Faults(seed=2, fail_job=1.0)) as (emulator, client):
        body = (await client.post("/runsync", json={"input": {}})).json()
        assert body["status"] == "FAILED"
        emulator.faults = Faults()
        assert (await client.post("/runsync", json={"input": {}})).json()["status"] == "COMPLETED"


# -- stats -----------------------------------------------------------------------------------------


async def test_stats_count_routes_codes_jobs_and_completion_times() -> None:
    async with emulated() as (emulator, client):
        before = time.time()
        done = (await client.post("/runsync", json={"input": {}})).json()["id"]
        after = time.time()
        failed = (await client.post("/runsync", json={"input": {"raise": "x"}})).json()["id"]
        queued = await submit(client, {"sleep_s": 5})
        await client.post(f"/cancel/{queued}")
        await client.get("/status/unknown")
        stats = emulator.stats
        over_http = (await client.get(control(client, "stats"))).json()
    assert isinstance(stats, EmulatorStats)
    assert stats.requests == {"runsync": 2, "run": 1, "cancel": 1, "status": 1}
    assert stats.total_requests == 5
    assert stats.responses == {200: 4, 404: 1}
    assert (stats.jobs_submitted, stats.jobs_completed, stats.jobs_failed) == (3, 1, 1)
    assert stats.jobs_cancelled == 1
    assert stats.cpu_s > 0
    assert before <= stats.completed_at[done] <= after
    assert set(stats.completed_at) == {done, failed, queued}
    assert over_http["requests"] == stats.requests  # /_emulator routes are not counted
    assert over_http["responses"] == {"200": 4, "404": 1}


async def test_emulator_routes_show_job_records_and_reset_stats() -> None:
    async with emulated() as (emulator, client):
        job_id = (await client.post("/runsync", json={"input": {}})).json()["id"]
        record = (await client.get(control(client, f"jobs/{job_id}"))).json()
        missing = await client.get(control(client, "jobs/nope"))
        reset = await client.post(control(client, "reset-stats"))
        stats = emulator.stats
    assert record["id"] == job_id
    assert record["status"] == "COMPLETED"
    assert record["attempts"] == 1
    assert record["submitted_at"] <= record["started_at"] <= record["completed_at"]
    assert record["worker_id"] in emulator.worker_ids
    assert missing.status_code == 404
    assert reset.json() == {"status": "reset"}
    assert stats.total_requests == 0
    assert stats.completed_at == {}


# -- serving ---------------------------------------------------------------------------------------


def test_serve_in_thread_for_sync_clients() -> None:
    emulator = RunPodEmulator(workers=1)
    with serve_in_thread(emulator) as server, httpx.Client(base_url=server.url) as client:
        assert server.url == f"{server.root_url}/v2/test-endpoint"
        emulator.inject("run", "rate_limit")
        assert client.post("/run", json={"input": {}}).status_code == 429
        body = client.post("/runsync", json={"input": {"output": "sync"}}).json()
        assert client.get(f"/status/{body['id']}").json()["output"] == "sync"
    assert emulator.stats.requests == {"run": 1, "runsync": 1, "status": 1}


async def test_a_taken_port_is_an_os_error() -> None:
    async with serve(RunPodEmulator()) as server:
        with pytest.raises(OSError, match="could not listen"):
            async with serve(RunPodEmulator(), port=server.port):
                pass


async def test_closing_the_server_answers_a_waiting_runsync() -> None:
    emulator = RunPodEmulator()
    answers: list[httpx.Response] = []
    async with serve(emulator) as server, httpx.AsyncClient(base_url=server.url) as client:

        async def wait_long() -> None:
            answers.append(await client.post("/runsync", json={"input": {"sleep_s": 30}}))

        async with anyio.create_task_group() as tg:
            tg.start_soon(wait_long)
            with anyio.fail_after(5):  # the job is running, not merely queued
                while (await client.get("/health")).json()["jobs"]["inProgress"] != 1:  # noqa: ASYNC110 - polled over HTTP
                    await anyio.sleep(0.005)
            await emulator.aclose()
    assert answers[0].json()["status"] == "IN_PROGRESS"


async def test_the_app_speaks_asgi_lifespan() -> None:
    emulator = RunPodEmulator()
    inbox: list[MutableMapping[str, Any]] = [
        {"type": "lifespan.startup"},
        {"type": "lifespan.shutdown"},
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return inbox.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    await emulator.app({"type": "lifespan"}, receive, send)
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]


def test_the_cli_serves_in_the_foreground() -> None:
    src = Path(__file__).resolve().parents[1] / "src"
    command = [sys.executable, "-m", "gpujobs.testing.runpod_emulator", "--port", "0",
               "--workers", "4", "--cold-start-s", "0", "--handler", "scripted"]  # fmt: skip
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, text=True, env={"PYTHONPATH": str(src)}
    ) as process:
        try:
            assert process.stdout is not None
            url = process.stdout.readline().strip()
            assert url.startswith("http://127.0.0.1:")
            assert url.endswith("/v2/test-endpoint")
            body = httpx.post(f"{url}/runsync", json={"input": {"output": 7}}, timeout=10).json()
            assert body["output"] == 7
        finally:
            process.terminate()
            process.wait(timeout=10)
    assert process.returncode == 0
