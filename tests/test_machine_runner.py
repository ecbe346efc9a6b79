"""``MachineRunner`` over a scripted ``Machine``: shared starts, deadlines, idle release, errors.

The worker is the real job server (``HandlerWorker``) on loopback; the machine is a double whose
start and release the tests hold, fail and count.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import httpx
import pytest

pytest.importorskip("fastapi", reason="needs the worker extra")

from gpujobs import (
    CapacityError,
    ConfigurationError,
    InvalidInputError,
    JobTimeoutError,
    MachineRunner,
    PollSchedule,
    ProviderError,
    RetryPolicy,
)
from gpujobs._polling import Deadline
from gpujobs.testing import HandlerWorker, scripted_handler, serve

pytestmark = pytest.mark.anyio

FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=3, initial_backoff_s=0.01, max_backoff_s=0.05)


class ScriptedMachine:
    """A machine whose start waits for ``may_start`` and may fail; calls are counted."""

    name = "test machine"

    def __init__(self, url: str) -> None:
        self.url = url
        self.may_start = anyio.Event()
        self.may_start.set()
        self.start_errors: list[Exception] = []
        self.release_errors: list[Exception] = []
        self.readies = 0
        self.releases = 0
        self.running = False
        self.released = anyio.Event()

    async def ready(self, deadline: Deadline) -> str:
        self.readies += 1
        with anyio.fail_after(deadline.remaining()):
            await self.may_start.wait()
        if self.start_errors:
            raise self.start_errors.pop(0)
        self.running = True
        return self.url

    async def check(self) -> bool:
        return self.running

    async def release(self) -> None:
        self.releases += 1
        if self.release_errors:
            raise self.release_errors.pop(0)
        self.running = False
        self.released.set()

    def hourly_usd(self) -> float | None:
        return 1.8

    def uptime_s(self) -> float:
        return 36.0 if self.running else 0.0


@asynccontextmanager
async def machine_runner(**options: object) -> AsyncIterator[tuple[MachineRunner, ScriptedMachine]]:
    async with serve(HandlerWorker(scripted_handler, max_queue=32)) as worker:
        machine = ScriptedMachine(worker.url)
        runner = MachineRunner(
            machine,
            poll=FAST_POLL,
            retry=FAST_RETRY,
            queue_limit=32,
            **options,  # type: ignore[arg-type]
        )
        async with runner:
            yield runner, machine


async def test_jobs_arriving_during_a_start_share_it() -> None:
    async with machine_runner() as (runner, machine):
        machine.may_start = anyio.Event()
        results: list[object] = []

        async def one(n: int) -> None:
            results.append((await runner.run({"output": n}, timeout=10)).output)

        async with anyio.create_task_group() as tasks:
            for n in range(8):
                tasks.start_soon(one, n)
            await anyio.wait_all_tasks_blocked()
            assert machine.readies == 1
            machine.may_start.set()
        assert sorted(results) == list(range(8))  # type: ignore[type-var]
        assert machine.readies == 1


async def test_a_failed_start_fails_every_waiter_and_the_next_job_tries_again() -> None:
    async with machine_runner() as (runner, machine):
        machine.start_errors.append(CapacityError("no GPU free", provider="test"))
        with anyio.fail_after(10):
            outcomes = []

            async def one() -> None:
                try:
                    await runner.run({"output": 1}, timeout=10)
                except CapacityError as exc:
                    outcomes.append(exc)

            async with anyio.create_task_group() as tasks:
                for _ in range(3):
                    tasks.start_soon(one)
        assert len(outcomes) == 3
        assert machine.readies == 1
        assert (await runner.run({"output": 2}, timeout=10)).output == 2
        assert machine.readies == 2


async def test_a_caller_whose_deadline_passes_during_the_start_leaves_it_running() -> None:
    async with machine_runner() as (runner, machine):
        machine.may_start = anyio.Event()
        with pytest.raises(JobTimeoutError, match="not ready before the deadline"):
            await runner.run({"output": 1}, timeout=0.1)
        machine.may_start.set()
        assert (await runner.run({"output": 2}, timeout=10)).output == 2
        assert machine.readies == 1


async def test_idle_release_retries_a_failed_release() -> None:
    async with machine_runner(idle_release_s=0.1) as (runner, machine):
        machine.release_errors.append(ProviderError("stop failed", provider="test"))
        await runner.run({"output": 1}, timeout=10)
        with anyio.fail_after(5):
            await machine.released.wait()
        assert machine.releases == 2
        assert runner.cost_report().running is False


async def test_no_release_while_a_job_runs() -> None:
    async with machine_runner(idle_release_s=0.05) as (runner, machine):
        await runner.run({"sleep_s": 0.4, "output": 1}, timeout=10)
        assert machine.releases == 0


async def test_cost_is_shared_by_the_jobs_of_a_run() -> None:
    async with machine_runner() as (runner, _):
        first = await runner.run({"output": 1}, timeout=10)
        second = await runner.run({"output": 2}, timeout=10)
        assert first.cost is not None
        assert second.cost is not None
        assert first.cost.usd == pytest.approx(1.8 * 36 / 3600)
        assert second.cost.usd == pytest.approx(1.8 * 36 / 3600 / 2)
        report = runner.cost_report()
        assert report.jobs == 2
        assert report.amortised_usd_per_job == pytest.approx(0.009)


async def test_input_and_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        MachineRunner(ScriptedMachine("http://127.0.0.1:1"), queue_limit=-1)
    async with machine_runner() as (runner, machine):
        with pytest.raises(InvalidInputError):
            await runner.run({"x": object()}, timeout=1)
        assert machine.readies == 0


# -- the job server's held look (GET /jobs/{id}?wait=S) --------------------------------------------


async def test_a_held_look_answers_when_the_job_ends_or_the_wait_is_over() -> None:
    async with serve(HandlerWorker(scripted_handler)) as worker, httpx.AsyncClient() as client:
        url = worker.url
        job = (await client.post(f"{url}/jobs", json={"sleep_s": 0.3, "output": 7})).json()
        started = anyio.current_time()
        short = (await client.get(f"{url}/jobs/{job['id']}", params={"wait": 0.05})).json()
        assert short["status"] in {"QUEUED", "RUNNING"}
        assert anyio.current_time() - started < 0.25
        done = (await client.get(f"{url}/jobs/{job['id']}", params={"wait": 5})).json()
        assert done["status"] == "COMPLETED"
        assert done["output"] == 7
        assert anyio.current_time() - started < 2


async def test_cancelling_a_running_job_ends_a_held_look_at_once() -> None:
    async with serve(HandlerWorker(scripted_handler)) as worker, httpx.AsyncClient() as client:
        url = worker.url
        job_id = (await client.post(f"{url}/jobs", json={"sleep_s": 30})).json()["id"]
        answers: list[dict[str, object]] = []

        async def hold() -> None:
            response = await client.get(f"{url}/jobs/{job_id}", params={"wait": 20}, timeout=30)
            answers.append(response.json())

        with anyio.fail_after(5):
            async with anyio.create_task_group() as tasks:
                tasks.start_soon(hold)
                while (await client.get(f"{url}/jobs/{job_id}")).json()["status"] != "RUNNING":  # noqa: ASYNC110
                    await anyio.sleep(0.01)
                await client.delete(f"{url}/jobs/{job_id}")
        assert answers[0]["status"] == "CANCELLED"


async def test_failures_of_many_jobs_at_once_share_one_check() -> None:
    worker_server = serve(HandlerWorker(scripted_handler, max_queue=32))
    worker = await worker_server.__aenter__()
    machine = ScriptedMachine(worker.url)
    checks = 0
    may_answer = anyio.Event()

    async def slow_check() -> bool:
        nonlocal checks
        checks += 1
        await may_answer.wait()
        return False  # the machine died

    machine.check = slow_check  # type: ignore[method-assign]
    async with MachineRunner(machine, poll=FAST_POLL, retry=FAST_RETRY, queue_limit=8) as runner:
        handles = [await runner.submit({"sleep_s": 30}, timeout=60) for _ in range(4)]
        await worker_server.__aexit__(None, None, None)  # the worker goes away mid-job
        outcomes: list[BaseException] = []

        async def look(handle: object) -> None:
            try:
                await runner.status(handle)  # type: ignore[arg-type]
            except ProviderError as exc:
                outcomes.append(exc)

        async with anyio.create_task_group() as tasks:
            for handle in handles:
                tasks.start_soon(look, handle)
            await anyio.wait_all_tasks_blocked()
            may_answer.set()
    assert checks == 1
    assert len(outcomes) == 4
    assert all(exc.retryable for exc in outcomes)
