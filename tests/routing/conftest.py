from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

import pytest

from gpujobs import PollSchedule, RetryPolicy, RunPodServerless
from gpujobs.testing import Faults, RunPodEmulator, scripted_handler, serve

FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.02)

Emulated = tuple[RunPodEmulator, RunPodServerless]


@asynccontextmanager
async def _emulated(
    name: str, *, faults: Faults | None = None, **options: Any
) -> AsyncIterator[Emulated]:
    """A RunPod emulator on loopback and a runner named ``name`` pointed at it."""
    emulator = RunPodEmulator(scripted_handler, faults=faults, **options)
    async with serve(emulator) as server:
        runner = RunPodServerless(
            endpoint_url=server.url, api_key="k", name=name, poll=FAST_POLL, retry=FAST_RETRY
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
