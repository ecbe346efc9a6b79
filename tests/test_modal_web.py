"""ModalRunner's web-endpoint mode against the worker's Modal web app, served by uvicorn on
loopback behind the emulated Modal web layer (proxy auth, the request cap and its 303s); and the
web app's pure ASGI part without modal installed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

pytest.importorskip("modal", reason="needs the modal extra")
pytest.importorskip("fastapi", reason="needs the worker extra")

from gpujobs import (
    AuthenticationError,
    JobCancelledError,
    JobHandle,
    JobLostError,
    JobStatus,
    ModalRunner,
    PollSchedule,
    RetryPolicy,
)
from gpujobs.testing import FakeModal, ModalWebEmulator, scripted_handler, serve

pytestmark = pytest.mark.anyio

FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
KEY, SECRET = "wk-key", "ws-very-secret"


@asynccontextmanager
async def web_runner(
    fake: FakeModal | None = None, *, cap_s: float = 150.0, **options: Any
) -> AsyncIterator[tuple[ModalWebEmulator, ModalRunner]]:
    emulator = ModalWebEmulator(
        fake or FakeModal.for_handler(scripted_handler, min_containers=1),
        proxy_token=(KEY, SECRET),
        request_cap_s=cap_s,
    )
    key, secret = options.pop("credentials", (KEY, SECRET))
    async with serve(emulator) as server:
        runner = ModalRunner(
            web_url=server.url,
            proxy_token_id=key,
            proxy_token_secret=secret,
            poll=FAST_POLL,
            retry=FAST_RETRY,
            **options,
        )
        async with runner:
            yield emulator, runner


async def test_a_long_poll_past_the_request_cap_follows_modals_303() -> None:
    async with web_runner(cap_s=0.05, long_poll_s=5) as (emulator, runner):
        result = await runner.run({"output": "late", "sleep_s": 0.3}, timeout=10)
    assert result.output == "late"
    assert result.timings.execution_s is not None
    assert emulator.web.redirects >= 1


async def test_a_submit_past_the_request_cap_follows_the_303_with_get() -> None:
    class SlowSpawn(FakeModal):
        async def spawn(self, payload: Any) -> str:
            await anyio.sleep(0.2)
            return await super().spawn(payload)

    fake = SlowSpawn.for_handler(scripted_handler)
    async with web_runner(fake, cap_s=0.05) as (emulator, runner):
        handle = await runner.submit({"output": 3}, timeout=10)
        assert (await runner.wait(handle, timeout=10)).output == 3
    assert fake.spawned == 1  # the redirect fetched the answer; it did not submit again
    assert emulator.web.redirects >= 1


async def test_without_the_proxy_token_modal_refuses(caplog: pytest.LogCaptureFixture) -> None:
    async with web_runner(credentials=(KEY, "ws-wrong")) as (emulator, runner):
        with pytest.raises(AuthenticationError, match="refused the credentials") as info:
            await runner.submit({"output": 1}, timeout=5)
        assert emulator.calls.spawned == 0
    assert SECRET not in str(info.value)
    assert SECRET not in caplog.text


async def test_unknown_and_expired_calls_are_lost() -> None:
    fake = FakeModal.for_handler(scripted_handler)
    async with web_runner(fake) as (_, runner):
        with pytest.raises(JobLostError) as info:
            await runner.status(JobHandle(id="fc-nope", provider=runner.name, submitted_at=0))
        assert info.value.job_id == "fc-nope"
        result = await runner.run({"output": 1}, timeout=5)
        fake.expire(result.id)
        with pytest.raises(JobLostError):
            await runner.status(JobHandle(id=result.id, provider=runner.name, submitted_at=0))


async def test_cancel_through_the_web_app_stops_the_call() -> None:
    fake = FakeModal.for_handler(scripted_handler)
    async with web_runner(fake) as (_, runner):
        handle = await runner.submit({"sleep_s": 30}, timeout=60)
        assert (await runner.status(handle)).status is JobStatus.RUNNING
        await runner.cancel(handle)
        assert not fake.is_running(handle.id)
        with pytest.raises(JobCancelledError):
            await runner.wait(handle, timeout=5)


async def test_health_reports_the_gpu_functions_containers() -> None:
    async with web_runner() as (_, runner):
        health = await runner.health()
    assert health.ok
    assert health.workers == {"runners": 1}


def test_the_web_app_works_without_modal() -> None:
    """The plain ASGI part, with modal made unimportable, over a pure-Python seam."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["modal"] = None  # import modal now fails
        import anyio, httpx
        from gpujobs.providers.modal import ModalCallState
        from gpujobs.worker._modal_web import create_modal_web_app, run_modal_job

        class Calls:
            outcome = None
            async def spawn(self, payload):
                self.outcome = await run_modal_job(
                    lambda job: {"echo": job["input"]}, payload, job_id="in-1", cold_start=True
                )
                return "fc-1"
            async def get(self, call_id, *, timeout):
                if call_id == "fc-pending":
                    raise TimeoutError
                if call_id == "fc-broken":
                    raise ValueError("bad picture")
                return self.outcome
            async def cancel(self, call_id, *, terminate_containers):
                pass
            async def stats(self):
                return {"backlog": 0, "runners": 1, "running": 0}

        async def main():
            transport = httpx.ASGITransport(app=create_modal_web_app(Calls()))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
                assert (await client.post("/submit", json={"x": 1})).json() == {"id": "fc-1"}
                done = await client.get("/result/fc-1")
                state = ModalCallState.from_json(done.json())
                assert done.status_code == 200, done.text
                assert state.output == {"echo": {"x": 1}} and state.cold_start is True
                assert (await client.get("/result/fc-pending")).status_code == 202
                broken = (await client.get("/result/fc-broken")).json()
                assert broken["status"] == "FAILED", broken
                assert broken["error"]["error_message"] == "bad picture"
                assert (await client.post("/submit", content=b"[")).status_code == 400
                assert (await client.post("/cancel/fc-1")).json()["status"] == "CANCELLED"
                assert (await client.get("/health")).json()["runners"] == 1
            assert sys.modules["modal"] is None
            print("ok")

        anyio.run(main)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
