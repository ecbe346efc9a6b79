"""RunPodServerless against runpod's own local test server, a peer nobody here wrote.

That server is rough (every route POST, no /v2 prefix, no /health or /cancel, a job queued with
/run runs during the first /status), and the runner must still work: run, runsync, submit/wait.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpujobs import JobFailedError, JobStatus, PollSchedule, RunPodServerless
from gpujobs.testing import runpod_local_server

WORKER = Path(__file__).parent / "peers" / "runpod_worker.py"


@pytest.fixture(scope="module")
def local_server() -> Iterator[str]:
    pytest.importorskip("runpod")
    env = {**os.environ, "RUNPOD_LOG_LEVEL": "ERROR", "UVICORN_LOG_LEVEL": "warning"}
    with runpod_local_server([sys.executable, str(WORKER)], env=env) as url:
        yield url


def runner(url: str) -> RunPodServerless:
    return RunPodServerless(
        endpoint_url=url, poll=PollSchedule(first_s=0.01, max_interval_s=0.1), name="rp-local"
    )


pytestmark = pytest.mark.anyio


async def test_fan_out_twenty_jobs_through_runsync(local_server: str) -> None:
    async with runner(local_server) as r:
        results = await asyncio.gather(
            *(r.run({"output": n, "sleep_s": 0.05}, timeout=60) for n in range(20))
        )
    assert [result.output for result in results] == list(range(20))
    assert all(result.status is JobStatus.COMPLETED for result in results)
    assert all(result.provider == "rp-local" for result in results)


async def test_submit_and_wait_through_run_and_status(local_server: str) -> None:
    async with runner(local_server) as r:
        handles = [await r.submit({"output": n}, timeout=60) for n in range(5)]
        results = await asyncio.gather(*(r.wait(h, timeout=60) for h in handles))
    assert [result.output for result in results] == list(range(5))


async def test_failing_jobs_raise_with_the_workers_message(local_server: str) -> None:
    async with runner(local_server) as r:
        with pytest.raises(JobFailedError, match="the GPU caught fire") as info:
            await r.run({"raise": "the GPU caught fire"}, timeout=60)
        assert info.value.error["error_message"] == "the GPU caught fire"
        handle = await r.submit({"error": "bad input image"}, timeout=60)
        with pytest.raises(JobFailedError, match="bad input image"):
            await r.wait(handle, timeout=60)
