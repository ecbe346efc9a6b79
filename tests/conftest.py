from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import anyio
import pytest

from gpujobs import JobHandle, JobLostError, JobRunner, PollSchedule, RetryPolicy, RunPodServerless
from gpujobs.testing import Faults, RunPodEmulator, scripted_handler, serve


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def _poll_until_lost(runner: JobRunner, handle: JobHandle, within_s: float = 5.0) -> None:
    """Look at the job until the runner reports it lost (bounded by ``within_s``)."""
    with anyio.fail_after(within_s):
        while True:
            try:
                await runner.status(handle)
            except JobLostError:
                return
            await anyio.sleep(0.01)


@pytest.fixture
def until_lost() -> Callable[..., Awaitable[None]]:
    return _poll_until_lost


# -- RunPod emulators with runners pointed at them (the router tests use several) --------

_FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
_FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)

Emulated = tuple[RunPodEmulator, RunPodServerless]


@asynccontextmanager
async def _emulated(
    name: str, *, faults: Faults | None = None, **options: Any
) -> AsyncIterator[Emulated]:
    """A RunPod emulator on loopback and a runner named ``name`` pointed at it."""
    emulator = RunPodEmulator(scripted_handler, faults=faults, **options)
    async with serve(emulator) as server:
        runner = RunPodServerless(
            endpoint_url=server.url, api_key="k", name=name, poll=_FAST_POLL, retry=_FAST_RETRY
        )
        async with runner:
            yield emulator, runner


@pytest.fixture
def emulators() -> Callable[..., AbstractAsyncContextManager[list[Emulated]]]:
    """``async with emulators("a", "b") as [(emu_a, runner_a), (emu_b, runner_b)]``."""

    @asynccontextmanager
    async def several(*names: str, **options: Any) -> AsyncIterator[list[Emulated]]:
        async with AsyncExitStack() as stack:
            yield [await stack.enter_async_context(_emulated(n, **options)) for n in names]

    return several


@pytest.fixture
def emulated() -> Callable[..., AbstractAsyncContextManager[Emulated]]:
    """``async with emulated("slow", cold_start_s=5) as (emulator, runner)``."""
    return _emulated
