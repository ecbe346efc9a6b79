"""``RunPodPod`` against the pod-API emulator, a cutting proxy and the worker's own job server.

Each pod is three real servers on loopback: RunPod's REST API (:class:`RunPodPodsEmulator`), the
pod's proxy (:class:`CuttingProxy`, which cuts held requests and answers 502 while the pod does
not run) and the worker's job server running the scripted handler (:class:`HandlerWorker`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("fastapi", reason="needs the worker extra")

from gpujobs import (
    AuthenticationError,
    CapacityError,
    ConfigurationError,
    JobStatus,
    PollSchedule,
    ProviderError,
    ProviderUnavailableError,
    RetryPolicy,
    RunPodPod,
)
from gpujobs.testing import (
    CuttingProxy,
    HandlerWorker,
    RunPodPodsEmulator,
    scripted_handler,
    serve,
)
from gpujobs.testing._emulator_server import ASGIApp, Receive, Scope, Send

pytestmark = pytest.mark.anyio

KEY = "runpod-secret-key"
TOKEN = "worker-secret-token"
POD = "pod1abc"
FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


@dataclass
class Pod:
    runner: RunPodPod
    api: RunPodPodsEmulator
    proxy: CuttingProxy
    proxy_url: str


@asynccontextmanager
async def pod(
    *,
    running: bool = False,
    idle_stop_s: float | None = None,
    cut_after_s: float = 30.0,
    queue_limit: int = 8,
    max_queue: int = 8,
    provision_s: float = 0.05,
    start_s: float = 0.05,
    report_status: bool = True,
    **options: Any,
) -> AsyncIterator[Pod]:
    api = RunPodPodsEmulator(api_key=KEY, report_status=report_status)
    worker = HandlerWorker(scripted_handler, api_token=TOKEN, max_queue=max_queue)
    api.add_pod(
        POD, running=running, provision_s=provision_s, start_s=start_s, on_stop=worker.restart
    )
    async with serve(api) as api_server, serve(worker) as worker_server:
        proxy = CuttingProxy(
            worker_server.url, cut_after_s=cut_after_s, gate=lambda: api.is_running(POD)
        )
        async with serve(proxy) as proxy_server:
            runner = RunPodPod(
                POD,
                api_key=KEY,
                api_url=api_server.url,
                worker_url=proxy_server.url,
                worker_token=TOKEN,
                idle_stop_s=idle_stop_s,
                queue_limit=queue_limit,
                poll=FAST_POLL,
                retry=FAST_RETRY,
                **options,
            )
            async with runner:
                yield Pod(runner, api, proxy, proxy_server.url)


async def until(predicate: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait (bounded) for a remote state that announces nothing."""
    with anyio.fail_after(within_s):
        while not predicate():  # noqa: ASYNC110 - remote state, no event to await
            await anyio.sleep(0.01)


# -- resume on demand ---------------------------------------------------------------------------


async def test_a_stopped_pod_is_resumed_by_the_first_job() -> None:
    async with pod() as p:
        assert p.api.status(POD) == "EXITED"
        result = await p.runner.run({"output": "layers", "sleep_s": 0.05}, timeout=30)
        assert result.output == "layers"
        assert result.provider == "runpod-pod"
        assert result.timings.cold_start is True
        assert p.api.starts(POD) == 1
        assert p.api.status(POD) == "RUNNING"
        again = await p.runner.run({"output": 2}, timeout=30)
        assert again.timings.cold_start is False
        assert p.api.starts(POD) == 1


async def test_concurrent_first_jobs_share_one_resume() -> None:
    async with pod(provision_s=0.2, start_s=0.2, queue_limit=20, max_queue=20) as p:
        results = await asyncio.gather(
            *(p.runner.run({"output": n, "sleep_s": 0.01}, timeout=30) for n in range(12))
        )
        assert [r.output for r in results] == list(range(12))
        assert p.api.starts(POD) == 1
        assert [m for m, path in p.api.requests if path.endswith("/start")] == ["POST"]


async def test_a_start_whose_answer_is_lost_is_not_sent_twice() -> None:
    async with pod() as p:
        p.api.inject("start", "drop_connection")
        p.api.inject("get", "server_error", status=502, html=True)
        result = await p.runner.run({"output": "ok"}, timeout=30)
        assert result.output == "ok"
        assert p.api.starts(POD) == 1


async def test_the_older_api_without_a_fine_status_is_read_from_desired_status() -> None:
    async with pod(report_status=False) as p:
        result = await p.runner.run({"output": "ok"}, timeout=30)
        assert result.output == "ok"
        assert p.api.starts(POD) == 1


async def test_a_host_without_a_free_gpu_is_a_capacity_error() -> None:
    async with pod() as p:
        p.api.set_faults(POD, no_gpu=True)
        with pytest.raises(CapacityError, match="free GPU") as info:
            await p.runner.run({"output": 1}, timeout=30)
        assert KEY not in str(info.value)
        p.api.set_faults(POD, no_gpu=False)
        assert (await p.runner.run({"output": 1}, timeout=30)).output == 1  # tries again


async def test_a_pod_that_fails_to_start_is_unavailable() -> None:
    async with pod() as p:
        p.api.set_faults(POD, fail_start=True)
        with pytest.raises(ProviderUnavailableError, match="ERROR"):
            await p.runner.run({"output": 1}, timeout=30)


async def test_a_wrong_api_key_is_an_authentication_error_that_hides_the_key() -> None:
    async with pod(running=False) as p:
        p.runner.machine._headers = {"Authorization": "Bearer wrong-key"}  # type: ignore[union-attr]
        with pytest.raises(AuthenticationError) as info:
            await p.runner.run({"output": 1}, timeout=30)
        assert "wrong-key" not in str(info.value)
        assert "wrong-key" not in repr(info.value)


# -- idle stop ----------------------------------------------------------------------------------


async def test_an_idle_pod_is_stopped_on_time_and_not_while_busy() -> None:
    idle_s = 0.4
    async with pod(idle_stop_s=idle_s) as p:
        await p.runner.run({"sleep_s": 2 * idle_s}, timeout=30)  # longer than idle_s: kept up
        assert p.api.stops(POD) == 0
        ended = anyio.current_time()
        await until(lambda: p.api.status(POD) == "EXITED")
        stopped_after = anyio.current_time() - ended
        assert idle_s * 0.9 <= stopped_after <= idle_s + 1.0
        assert p.api.stops(POD) == 1
        assert p.runner.cost_report().running is False
        # The next job resumes it again.
        assert (await p.runner.run({"output": 3}, timeout=30)).output == 3
        assert p.api.starts(POD) == 2


async def test_stop_on_close_stops_the_pod() -> None:
    async with pod(stop_on_close=True) as p:
        await p.runner.run({"output": 1}, timeout=30)
        assert p.api.status(POD) == "RUNNING"
    assert p.api.status(POD) == "EXITED"


# -- capacity -----------------------------------------------------------------------------------


async def test_a_busy_pod_answers_capacity_error_instead_of_queueing_without_bound() -> None:
    async with pod(running=True, queue_limit=2, max_queue=8) as p:
        handles = [await p.runner.submit({"sleep_s": 30}, timeout=60) for _ in range(3)]
        forwarded = p.proxy.forwarded
        with pytest.raises(CapacityError, match="queue is full"):
            await p.runner.submit({"output": "one too many"}, timeout=60)
        assert p.proxy.forwarded == forwarded  # refused here, without a request
        await p.runner.cancel(handles[-1])
        extra = await p.runner.submit({"output": "room again"}, timeout=60)
        for handle in [*handles, extra]:
            await p.runner.cancel(handle)


async def test_the_workers_503_is_a_capacity_error_with_retry_after() -> None:
    async with pod(running=True, queue_limit=8, max_queue=0) as p:
        running = await p.runner.submit({"sleep_s": 30}, timeout=60)
        with pytest.raises(CapacityError) as info:
            await p.runner.submit({"output": 1}, timeout=60)
        assert info.value.retry_after is not None
        assert info.value.retry_after >= 1
        await p.runner.cancel(running)


# -- the proxy's cut ----------------------------------------------------------------------------


async def test_long_jobs_survive_a_proxy_that_cuts_held_requests() -> None:
    cut_s = 0.5
    async with pod(running=True, cut_after_s=cut_s, long_poll_s=cut_s / 2) as p:
        # A plain held request is cut...
        async with httpx.AsyncClient(headers={"Authorization": f"Bearer {TOKEN}"}) as client:
            held = await client.post(
                f"{p.proxy_url}/inference", json={"sleep_s": 3 * cut_s, "output": 1}, timeout=10
            )
        assert held.status_code == 524
        assert p.proxy.cut == 1
        # ...the job API path is not.
        result = await p.runner.run({"sleep_s": 3 * cut_s, "output": "long"}, timeout=30)
        assert result.output == "long"
        assert result.timings.execution_s is not None
        assert result.timings.execution_s >= 3 * cut_s
        assert p.proxy.cut == 1


async def test_held_looks_longer_than_the_proxy_allows_are_shortened() -> None:
    cut_s = 0.3
    async with pod(running=True, cut_after_s=cut_s, long_poll_s=10 * cut_s) as p:
        result = await p.runner.run({"sleep_s": 8 * cut_s, "output": "long"}, timeout=30)
        assert result.output == "long"
        assert 1 <= p.proxy.cut <= 4  # 3.0 s → 1.5 → 0.75 → 0.375 → 0.19: held under the cut


async def test_one_held_look_per_job_where_the_worker_can_hold_it() -> None:
    async with pod(running=True) as p:
        await p.runner.run({"output": "warm"}, timeout=30)
        before = p.proxy.forwarded
        result = await p.runner.run({"sleep_s": 1.0, "output": "held"}, timeout=30)
        assert result.output == "held"
        assert p.proxy.forwarded - before == 2  # POST /jobs, then one GET held until the end
        assert result.timings.total_s is not None
        assert result.timings.execution_s is not None
        assert result.timings.total_s - result.timings.execution_s < 0.5


class PlainServer:
    """A seed-style server: only ``POST /inference``, answered in the same request."""

    def __init__(self) -> None:
        self.inference_calls = 0

    @property
    def app(self) -> ASGIApp:
        return self._handle

    @property
    def base_path(self) -> str:
        return ""

    async def start(self) -> None:
        return None

    async def aclose(self) -> None:
        return None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        message = await receive()
        status, body = 404, {"detail": "Not Found"}
        if scope["method"] == "POST" and scope["path"] == "/inference":
            self.inference_calls += 1
            payload = json.loads(message.get("body", b"{}"))
            status, body = 200, await scripted_handler({"id": "x", "input": payload})
        data = json.dumps(body).encode()
        headers = [(b"content-type", b"application/json")]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": data})


async def test_a_plain_server_gets_held_requests_which_the_proxy_cuts() -> None:
    plain = PlainServer()
    async with (
        serve(plain) as server,
        serve(CuttingProxy(server.url, cut_after_s=0.5)) as proxy,
        RunPodPod(base_url=proxy.url, poll=FAST_POLL, retry=FAST_RETRY) as runner,
    ):
        short = await runner.run({"output": "quick"}, timeout=10)
        assert short.output == "quick"
        with pytest.raises(ProviderError) as info:
            await runner.run({"sleep_s": 1.5, "output": "slow"}, timeout=10)
        assert info.value.status_code == 524
        assert info.value.job_id
        assert plain.inference_calls == 2


# -- machine death -------------------------------------------------------------------------------


async def test_a_pod_stopped_mid_job_fails_it_retryably_and_the_next_job_resumes_it() -> None:
    async with pod(running=True) as p:
        handle = await p.runner.submit({"sleep_s": 30}, timeout=60)
        assert (await p.runner.status(handle)).status in {JobStatus.QUEUED, JobStatus.RUNNING}
        p.api.stop_now(POD)
        with pytest.raises(ProviderUnavailableError) as info:
            await p.runner.wait(handle, timeout=10)
        assert info.value.retryable
        assert info.value.job_id == handle.id
        result = await p.runner.run({"output": "after"}, timeout=30)
        assert result.output == "after"
        assert p.api.starts(POD) == 1


# -- cost ---------------------------------------------------------------------------------------


async def test_cost_is_amortised_per_job_and_marginal_is_zero_while_up() -> None:
    async with pod() as p:
        results = [await p.runner.run({"output": n, "sleep_s": 0.05}, timeout=30) for n in range(3)]
        report = p.runner.cost_report()
        assert report.hourly_usd == pytest.approx(0.69)
        assert report.running
        assert report.jobs == 3
        assert report.marginal_usd_per_job == 0.0
        assert report.spent_usd is not None
        assert report.amortised_usd_per_job == pytest.approx(report.spent_usd / 3, rel=0.5)
        last = results[-1].cost
        assert last is not None
        assert last.basis == "amortised"
        assert last.usd_per_s == pytest.approx(0.69 / 3600)
        assert 0 < last.usd <= report.spent_usd
        await p.runner.release()
        stopped = p.runner.cost_report()
        assert not stopped.running
        assert stopped.marginal_usd_per_job is not None
        assert stopped.marginal_usd_per_job > 0


# -- the real pod server ---------------------------------------------------------------------------


async def test_image_jobs_on_the_workers_pod_server_behind_a_cutting_proxy() -> None:
    pytest.importorskip("PIL", reason="needs the worker extra")
    import base64  # noqa: PLC0415
    import io  # noqa: PLC0415

    from PIL import Image  # noqa: PLC0415

    from gpujobs.testing import serve_app_in_thread  # noqa: PLC0415
    from gpujobs.worker.fake import FakePipeline  # noqa: PLC0415
    from gpujobs.worker.pod import PodSettings, create_app  # noqa: PLC0415

    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    image = base64.b64encode(buffer.getvalue()).decode()
    app = create_app(lambda: FakePipeline(step_s=0.2), PodSettings(api_token=TOKEN))
    api = RunPodPodsEmulator(api_key=KEY)
    api.add_pod(POD, provision_s=0.05, start_s=0.05)
    with serve_app_in_thread(app) as worker_url:
        proxy = CuttingProxy(worker_url, cut_after_s=0.5, gate=lambda: api.is_running(POD))
        async with serve(api) as rest, serve(proxy) as proxy_server:
            runner = RunPodPod(
                POD,
                api_key=KEY,
                api_url=rest.url,
                worker_url=proxy_server.url,
                worker_token=TOKEN,
                poll=FAST_POLL,
                retry=FAST_RETRY,
                long_poll_s=0.25,
            )
            async with runner:
                request = {"image": image, "layers": 3, "num_inference_steps": 4, "seed": 1}
                result = await runner.run(request, timeout=30)  # ~0.8 s: longer than the cut
    assert len(result.output["layers"]) == 3
    assert result.output["metadata"]["seed"] == 1
    assert api.starts(POD) == 1
    assert proxy.cut == 0  # every held look ended under the cut
    assert proxy.forwarded >= 2


# -- configuration and secrets ---------------------------------------------------------------------


async def test_no_secret_in_logs_or_errors(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with pod(idle_stop_s=0.05) as p:
        await p.runner.run({"output": 1}, timeout=30)
        with pytest.raises(Exception) as info:  # noqa: PT011 - any failure will do
            await p.runner.run({"raise": "boom"}, timeout=30)
        await until(lambda: p.api.status(POD) == "EXITED")
    text = caplog.text + str(info.value) + repr(info.value)
    assert "boom" in text
    assert KEY not in text
    assert TOKEN not in text


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        RunPodPod()
    with pytest.raises(ConfigurationError):
        RunPodPod("pod", base_url="http://127.0.0.1:1")
    with pytest.raises(ConfigurationError, match="not a pod id"):
        RunPodPod("pod/../../graphql?x=1", api_key=KEY)


def test_no_secret_in_reprs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RUNPOD_API_KEY", raising=False)
    with pytest.raises(ConfigurationError, match="RUNPOD_API_KEY"):
        RunPodPod("abc")
    runner = RunPodPod("abc", api_key=KEY, worker_token=TOKEN)
    shown = "".join(
        repr(thing)
        for thing in (runner, runner.machine, vars(runner), vars(runner.machine), vars(runner._api))
    )
    assert KEY not in shown
    assert TOKEN not in shown
    assert "abc-8000.proxy.runpod.net" in runner.machine._worker_url  # type: ignore[union-attr]


async def test_jobs_on_a_worker_at_a_fixed_url_are_never_cold_starts() -> None:
    worker = HandlerWorker(scripted_handler, api_token=TOKEN)
    async with (
        serve(worker) as server,
        RunPodPod(
            base_url=server.url, worker_token=TOKEN, poll=FAST_POLL, retry=FAST_RETRY
        ) as runner,
    ):
        burst = await asyncio.gather(*(runner.run({"output": n}, timeout=30) for n in range(3)))
    assert [r.timings.cold_start for r in burst] == [False, False, False]


async def test_health_of_a_worker_at_a_fixed_url_asks_the_worker() -> None:
    worker = HandlerWorker(scripted_handler, api_token=TOKEN)
    async with (
        serve(worker) as server,
        RunPodPod(base_url=server.url, worker_token=TOKEN, retry=FAST_RETRY) as runner,
    ):
        health = await runner.health()  # before any job
    assert health.ok
    assert health.workers == {"ready": 1}
