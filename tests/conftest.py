from __future__ import annotations

from collections.abc import Awaitable, Callable

import anyio
import pytest

from gpujobs import JobHandle, JobLostError, JobRunner


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
