"""``VastRunner`` end to end: the real ``vastai`` SDK against the Vast emulator, whose instances
each run the worker's pod server (fake pipeline) on loopback.
"""

from __future__ import annotations

import base64
import functools
import io
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

pytest.importorskip("vastai", reason="needs the vast extra")
pytest.importorskip("fastapi", reason="needs the worker extra")

from PIL import Image

from gpujobs import (
    CapacityError,
    JobRunner,
    JobStatus,
    PollSchedule,
    ProviderUnavailableError,
    RetryPolicy,
    VastRunner,
)
from gpujobs.testing import EmulatorServer, serve
from gpujobs.testing._vast_emulator import VastEmulator
from gpujobs.worker.fake import FakePipeline
from gpujobs.worker.pod import PodSettings, create_app

pytestmark = pytest.mark.anyio

KEY = "vast-secret-key"
FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)


def picture() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


JOB = {"image": picture(), "num_inference_steps": 2, "seed": 7, "resolution": 640}
LONG_JOB = {**JOB, "num_inference_steps": 100}  # 100 steps of 0.1 s: 10 s unless stopped


def fake_worker(env: Mapping[str, str]) -> Any:
    return create_app(lambda: FakePipeline(step_s=0.1, scale=16), PodSettings.from_env(env))


@asynccontextmanager
async def emulated(**options: Any) -> AsyncIterator[EmulatorServer[VastEmulator]]:
    options.setdefault("worker", fake_worker)
    async with serve(VastEmulator(api_key=KEY, **options)) as server:
        yield server


def runner_for(server: EmulatorServer[VastEmulator], **options: Any) -> VastRunner:
    settings: dict[str, Any] = {
        "api_key": KEY, "server_url": server.url, "max_usd_per_hour": 0.6, "disk_gb": 40,
        "name": "vast-test", "poll": FAST_POLL, "start_poll": FAST_POLL, "retry": FAST_RETRY,
        "reconcile_s": 2.0, "request_timeout_s": 5.0, "start_timeout_s": 20.0,
    }  # fmt: skip
    settings.update(options)
    return VastRunner("registry.example/qwen-layered-worker:test", **settings)


async def settled(condition: Any, within_s: float = 10.0) -> None:
    """Wait (bounded) for remote state to satisfy ``condition()``."""
    with anyio.fail_after(within_s):
        while not condition():  # noqa: ASYNC110 - the emulator's state, no event to await
            await anyio.sleep(0.01)


async def test_a_job_runs_on_a_rented_instance_with_the_worker_environment() -> None:
    async with emulated(boot_s=0.1) as server, runner_for(server) as runner:
        assert isinstance(runner, JobRunner)
        result = await runner.run(JOB, timeout=30)
        assert result.status is JobStatus.COMPLETED
        assert result.provider == "vast-test"
        assert len(result.output["layers"]) == 4
        assert result.cost is not None
        assert result.cost.basis == "amortised"
        assert result.cost.usd > 0
        [row] = server.emulator.instances()
        env = dict(row["extra_env"])
        assert env["DEPLOYMENT_MODE"] == "pod"
        assert env["MODEL_PATH"] == "/models/qwen-image-layered"
        assert env["-p 8000:8000"] == "1"
        assert env["WORKER_API_TOKEN"]
        assert row["label"].startswith("gpujobs-")
        assert row["image_uuid"] == "registry.example/qwen-layered-worker:test"
        report = runner.cost_report()
        assert report.running
        assert report.hourly_usd == pytest.approx(row["dph_total"])
    assert server.emulator.instances() == []  # destroyed on close


async def test_concurrent_jobs_share_one_instance() -> None:
    async with emulated(boot_s=0.1) as server, runner_for(server) as runner:
        async with anyio.create_task_group() as tasks:
            for seed in range(4):
                tasks.start_soon(functools.partial(runner.run, {**JOB, "seed": seed}, timeout=30))
        assert server.emulator.created_count == 1


async def test_a_create_that_times_out_after_renting_leads_to_exactly_one_instance() -> None:
    async with emulated() as server, runner_for(server, request_timeout_s=0.5) as runner:
        server.emulator.inject("create", "slow_response", delay_s=3, after_processing=True)
        result = await runner.run(JOB, timeout=30)
        assert result.status is JobStatus.COMPLETED
        assert server.emulator.created_count == 1
        assert server.emulator.requests("create") == 1
        assert len(server.emulator.instances()) == 1


async def test_an_instance_that_dies_mid_job_fails_it_retryably_and_is_destroyed() -> None:
    async with emulated() as server, runner_for(server) as runner:
        handle = await runner.submit(LONG_JOB, timeout=60)
        with anyio.fail_after(10):
            while (await runner.status(handle)).status is not JobStatus.RUNNING:  # noqa: ASYNC110 - remote state
                await anyio.sleep(0.01)
        [row] = server.emulator.instances()
        await server.emulator.kill(row["id"], "exited")
        with pytest.raises(ProviderUnavailableError) as info:
            await runner.wait(handle, timeout=30)
        assert info.value.retryable
        assert info.value.job_id == handle.id
        assert server.emulator.instances() == []  # destroyed
        # The next job rents another instance.
        result = await runner.run(JOB, timeout=30)
        assert result.status is JobStatus.COMPLETED
        assert server.emulator.created_count == 2


async def test_an_instance_that_goes_unreachable_is_given_up_and_destroyed() -> None:
    async with emulated() as server, runner_for(server) as runner:
        handle = await runner.submit(LONG_JOB, timeout=60)
        with anyio.fail_after(10):
            while (await runner.status(handle)).status is not JobStatus.RUNNING:  # noqa: ASYNC110 - remote state
                await anyio.sleep(0.01)
        [row] = server.emulator.instances()
        await server.emulator.kill(row["id"], "running")  # Vast still lists it as running
        with pytest.raises(ProviderUnavailableError) as info:
            await runner.wait(handle, timeout=30)
        assert info.value.retryable
        assert info.value.job_id == handle.id
        assert server.emulator.instances() == []


async def test_an_idle_instance_is_destroyed_on_time() -> None:
    async with emulated() as server, runner_for(server, idle_release_s=0.3) as runner:
        await runner.run(JOB, timeout=30)
        assert len(server.emulator.instances()) == 1
        await settled(lambda: server.emulator.instances() == [], within_s=5)
        assert not runner.cost_report().running
        await runner.run(JOB, timeout=30)  # and the next job rents again
        assert server.emulator.created_count == 2


async def test_offers_above_the_max_spend_per_hour_are_refused() -> None:
    async with emulated() as server, runner_for(server, max_usd_per_hour=0.3) as runner:
        with pytest.raises(CapacityError, match="no Vast offer") as info:
            await runner.run(JOB, timeout=30)
        assert info.value.retryable
        assert server.emulator.created_count == 0


async def test_health_before_and_after_the_start() -> None:
    async with emulated() as server, runner_for(server) as runner:
        before = await runner.health()
        assert before.ok
        assert before.workers == {"stopped": 1}
        await runner.run(JOB, timeout=30)
        after = await runner.health()
        assert after.ok
        assert after.workers in ({"ready": 1}, {"busy": 1})


async def test_secrets_stay_out_of_reprs_errors_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    async with emulated() as server:
        async with runner_for(server, worker_token="worker-secret-token") as runner:  # noqa: S106
            await runner.run(JOB, timeout=30)
            shown = repr(runner) + repr(runner.machine) + repr(vars(runner))
        async with runner_for(server, api_key="wrong-vast-key") as refused:
            with pytest.raises(Exception) as info:  # noqa: PT011 - the message is what matters
                await refused.run(JOB, timeout=30)
        shown += str(info.value) + repr(info.value)
    for secret in ("worker-secret-token", KEY, "wrong-vast-key"):
        assert secret not in shown
        assert secret not in caplog.text


def test_import_gpujobs_does_not_import_vastai() -> None:
    import subprocess  # noqa: PLC0415
    import sys  # noqa: PLC0415

    probe = (
        "import sys, gpujobs; from gpujobs.providers import vast; print('vastai' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
