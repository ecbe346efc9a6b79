"""Fan a batch out over a real RunPod Serverless endpoint, or the emulator when none is set.

    RUNPOD_API_KEY=... RUNPOD_ENDPOINT_ID=... python examples/fan_out_runpod.py
    python examples/fan_out_runpod.py      # no endpoint: runs against the loopback emulator

Each job is submitted and waited for with one overall deadline; failures come back as typed
exceptions next to the results, and nothing is left running when the deadline passes.
"""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import AsyncExitStack

from gpujobs import GpuJobsError, RunPodServerless

USD_PER_S = 0.00076


async def main(jobs: int = 8) -> int:
    """Run ``jobs`` jobs at once and print one line per job; exit status 1 if any failed."""
    payloads = [{"prompt": f"job {n}", "sleep_s": 0.2, "output": {"n": n}} for n in range(jobs)]
    async with AsyncExitStack() as stack:
        endpoint_id = os.environ.get("RUNPOD_ENDPOINT_ID")
        if endpoint_id:
            runner = RunPodServerless(endpoint_id, usd_per_s=USD_PER_S)
        else:
            from gpujobs.testing import RunPodEmulator, serve  # noqa: PLC0415 - only without one

            server = await stack.enter_async_context(serve(RunPodEmulator(workers=4)))
            runner = RunPodServerless(endpoint_url=server.url, api_key="local", usd_per_s=USD_PER_S)
        await stack.enter_async_context(runner)
        outcomes = await asyncio.gather(
            *(runner.run(p, timeout=120) for p in payloads), return_exceptions=True
        )
    failed = 0
    for n, outcome in enumerate(outcomes):
        if isinstance(outcome, GpuJobsError):
            failed += 1
            print(f"{n}: {type(outcome).__name__} {outcome}")
        elif isinstance(outcome, BaseException):
            raise outcome
        else:
            cost = f"${outcome.cost.usd:.6f}" if outcome.cost else "n/a"
            print(f"{n}: {outcome.status.value} in {outcome.timings.total_s:.2f}s, {cost}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
