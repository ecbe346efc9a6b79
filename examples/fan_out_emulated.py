"""Fan a batch of 20 jobs out with asyncio.gather: over an emulated RunPod endpoint and in-process.

The RunPod Serverless emulator (``gpujobs.testing``) serves RunPod's API on 127.0.0.1 with four
workers that start cold, so the first jobs show queue time spent on cold starts. The same batch
then runs through ``LocalRunner``: ``python examples/fan_out_emulated.py``.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence

from gpujobs import GpuJobsError, JobResult, JobRunner, LocalRunner, RunPodServerless
from gpujobs.testing import RunPodEmulator, scripted_handler, serve

JOBS = 20
WORKERS = 4
COLD_START_S = 1.5
FAILING_EVERY_TENTH = 7
USD_PER_S = 0.00076  # a serverless A100's price per second, from the price examples in docs/


def payloads(seed: int = 17) -> list[dict[str, object]]:
    """Jobs of 0.3-0.9 s, one in ten failing inside the worker."""
    rng = random.Random(seed)
    jobs: list[dict[str, object]] = []
    for n in range(JOBS):
        job: dict[str, object] = {"sleep_s": round(rng.uniform(0.3, 0.9), 2), "output": {"job": n}}
        if n % 10 == FAILING_EVERY_TENTH:
            job["raise"] = "CUDA out of memory (simulated)"
        jobs.append(job)
    return jobs


async def fan_out(
    runner: JobRunner, jobs: Sequence[dict[str, object]]
) -> list[JobResult | BaseException]:
    """Run every job at once; failures come back as exceptions, in order."""
    return await asyncio.gather(
        *(runner.run(job, timeout=60) for job in jobs), return_exceptions=True
    )


def print_table(title: str, outcomes: Sequence[JobResult | BaseException]) -> None:
    """One line per job: status, queue and execution seconds, cost."""
    print(f"\n{title}")
    print(
        f"{'job':>4}  {'status':<10} {'queue s':>8} {'exec s':>7} {'cold':>5} {'cost $':>10}  note"
    )
    total_usd = 0.0
    for n, outcome in enumerate(outcomes):
        if isinstance(outcome, GpuJobsError):
            blank = ""
            print(
                f"{n:>4}  {'FAILED':<10} {blank:>36}  {type(outcome).__name__}: {outcome.message}"
            )
            continue
        if isinstance(outcome, BaseException):
            raise outcome
        t = outcome.timings
        usd = outcome.cost.usd if outcome.cost else 0.0
        total_usd += usd
        cold = {True: "yes", False: "no", None: "?"}[t.cold_start]
        print(
            f"{n:>4}  {outcome.status.value:<10} {t.queue_s or 0:>8.2f} {t.execution_s or 0:>7.2f}"
            f" {cold:>5} {usd:>10.6f}"
        )
    done = sum(not isinstance(o, BaseException) for o in outcomes)
    print(f"      {done}/{len(outcomes)} completed, total cost ${total_usd:.6f}")


async def main() -> None:
    """Run the batch through both runners and print what happened."""
    jobs = payloads()
    emulator = RunPodEmulator(scripted_handler, workers=WORKERS, cold_start_s=COLD_START_S)
    async with (
        serve(emulator) as server,
        RunPodServerless(
            endpoint_url=server.url,
            api_key="demo-key",
            usd_per_s=USD_PER_S,
            # RunPod does not say which jobs met a cold worker: a long first wait on a worker
            # this runner has not seen before is the evidence (see docs/providers).
            cold_start_threshold_s=COLD_START_S / 2,
        ) as runner,
    ):
        outcomes = await fan_out(runner, jobs)
    print_table(
        f"RunPodServerless → emulated endpoint ({WORKERS} workers, {COLD_START_S} s cold starts)",
        outcomes,
    )
    async with LocalRunner(scripted_handler, concurrency=WORKERS) as local:
        print_table(f"LocalRunner (in-process, concurrency {WORKERS})", await fan_out(local, jobs))


if __name__ == "__main__":
    asyncio.run(main())
