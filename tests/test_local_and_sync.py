"""LocalRunner's handler kinds, limits and expiry, and the blocking SyncRunner facade."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import anyio
import pytest

from gpujobs import (
    ConfigurationError,
    JobFailedError,
    JobStatus,
    JobTimeoutError,
    LocalRunner,
    SyncRunner,
)
from gpujobs.testing import scripted_handler


def blocking_handler(job: dict[str, Any]) -> dict[str, Any]:
    time.sleep(0.05)  # a sync handler blocks: it must not block the event loop
    return {"thread": threading.current_thread().name, "x": job["input"]["x"]}


def generator_handler(job: dict[str, Any]) -> Iterator[str]:
    yield from job["input"]["words"]


def handler_with_progress(job: dict[str, Any], progress: Any) -> str:
    progress({"percent": 50})
    time.sleep(0.05)
    return "done"


pytestmark = pytest.mark.anyio


async def test_sync_handlers_run_off_the_event_loop() -> None:
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await anyio.sleep(0.005)

    async with (
        LocalRunner(blocking_handler, concurrency=2) as runner,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(ticker)
        result = await runner.run({"x": 3})
        tg.cancel_scope.cancel()
    assert result.output["x"] == 3
    assert result.output["thread"] != threading.current_thread().name
    assert ticks >= 3  # the loop kept turning while the handler blocked


async def test_generator_handlers_aggregate_their_chunks() -> None:
    async with LocalRunner(generator_handler) as runner:
        result = await runner.run({"words": ["a", "b"]})
    assert result.output == ["a", "b"]


async def test_progress_from_a_thread_reaches_the_state() -> None:
    async with LocalRunner(handler_with_progress) as runner:
        result = await runner.run({})
    assert result.output == "done"


async def test_concurrency_limit_queues_the_rest() -> None:
    async with LocalRunner(scripted_handler, concurrency=1) as runner:
        first = await runner.submit({"sleep_s": 0.2})
        second = await runner.submit({"output": 2})
        assert (await runner.status(second)).status is JobStatus.QUEUED
        assert (await runner.wait(second, timeout=5)).output == 2
        assert (await runner.status(first)).status is JobStatus.COMPLETED
        health = await runner.health()
    assert health.jobs["completed"] == 2


async def test_execution_timeout_and_result_expiry(until_lost) -> None:
    async with LocalRunner(scripted_handler, execution_timeout_s=0.05, result_ttl_s=0.1) as r:
        with pytest.raises(JobTimeoutError, match="provider timed the job out"):
            await r.run({"sleep_s": 5}, timeout=10)
        done = await r.submit({"output": 1})
        await r.wait(done, timeout=5)
        await until_lost(r, done)


async def test_usd_per_s_prices_execution() -> None:
    async with LocalRunner(scripted_handler, usd_per_s=2.0) as runner:
        result = await runner.run({"sleep_s": 0.05})
    assert result.cost is not None
    assert result.cost.basis == "execution"
    assert 0.1 <= result.cost.usd < 0.5


def test_bad_configuration_is_refused() -> None:
    with pytest.raises(ConfigurationError):
        LocalRunner(scripted_handler, concurrency=0)
    with pytest.raises(ConfigurationError):
        LocalRunner("not a function")  # type: ignore[arg-type]


def test_sync_runner_wraps_the_async_core() -> None:
    with SyncRunner(LocalRunner(scripted_handler, concurrency=2)) as runner:
        assert runner.name == "local"
        assert runner.run({"output": 7}).output == 7
        handle = runner.submit({"output": 8})
        assert runner.wait(handle, timeout=5).output == 8
        assert runner.status(handle).status is JobStatus.COMPLETED
        runner.cancel(handle)
        assert runner.health().ok
        with pytest.raises(JobFailedError, match="nope"):
            runner.run({"raise": "nope"})


def test_sync_runner_needs_its_context() -> None:
    with pytest.raises(RuntimeError, match="context manager"):
        SyncRunner(LocalRunner(scripted_handler)).run({})
