"""The router against RunPod emulators on loopback: failover, breakers, deadlines, hedging."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import anyio
import pytest

from gpujobs import (
    InvalidInputError,
    JobFailedError,
    JobTimeoutError,
    ProviderError,
    RunPodServerless,
)
from gpujobs.routing import (
    BreakerConfig,
    EventKind,
    Hedge,
    RetryBudgetConfig,
    Router,
    RouterEvent,
)
from gpujobs.routing import _router as router_module
from gpujobs.testing import Faults, RunPodEmulator

ALWAYS_THROTTLED = Faults(seed=1, rate_limit=1.0, retry_after_s=0.01)

Emulated = tuple[RunPodEmulator, RunPodServerless]
Emulators = Callable[..., AbstractAsyncContextManager[list[Emulated]]]
OneEmulated = Callable[..., AbstractAsyncContextManager[Emulated]]

pytestmark = pytest.mark.anyio


async def test_the_first_runner_serves_while_it_works(emulators: Emulators) -> None:
    async with emulators("pod", "serverless") as [(_, a), (second, b)]:
        router = Router([a, b])
        results = await asyncio.gather(*(router.run({"output": n}, timeout=10) for n in range(5)))
    assert [r.output for r in results] == list(range(5))
    assert {r.provider for r in results} == {"pod"}
    assert second.stats.jobs_submitted == 0


async def test_a_provider_error_fails_over_to_the_next_runner(emulators: Emulators) -> None:
    events: list[RouterEvent] = []
    async with emulators("pod", "serverless") as [(first, a), (_, b)]:
        first.inject("runsync", "server_error", status=500)
        result = await Router([a, b], hooks=[events.append]).run({"output": 1}, timeout=10)
    assert result.provider == "serverless"
    assert first.stats.jobs_submitted == 0
    assert [e.kind for e in events] == [
        EventKind.SUBMITTED,
        EventKind.STARTED,
        EventKind.FAILED_OVER,
        EventKind.STARTED,
        EventKind.COMPLETED,
    ]
    assert events[2].runner == "pod"
    assert events[2].error_type == "ProviderError"


async def test_a_job_that_failed_in_the_worker_runs_once(emulators: Emulators) -> None:
    async with emulators("pod", "serverless") as [(first, a), (second, b)]:
        with pytest.raises(JobFailedError, match="bad layers"):
            await Router([a, b]).run({"raise": "bad layers"}, timeout=10)
    assert first.stats.jobs_submitted == 1
    assert second.stats.jobs_submitted == 0


async def test_bad_input_does_not_fail_over(emulators: Emulators) -> None:
    async with emulators("pod", "serverless") as [(first, a), (second, b)]:
        with pytest.raises(InvalidInputError):
            await Router([a, b]).run({"blob": "x" * (21 * 1024 * 1024)}, timeout=10)
    assert first.stats.requests.get("runsync", 0) == 0
    assert second.stats.requests.get("runsync", 0) == 0


async def test_failover_classes_are_configurable(emulators: Emulators) -> None:
    async with emulators("pod", "serverless") as [(first, a), (_, b)]:
        router = Router([a, b], failover_on=(JobFailedError,))
        first.inject("runsync", "fail_job")
        result = await router.run({"output": "second try"}, timeout=10)
    assert result.provider == "serverless"


async def test_a_lost_job_is_run_elsewhere(emulators: Emulators) -> None:
    async with emulators("pod", "serverless") as [(first, a), (_, b)]:
        first.inject("runsync", "lose_job")
        result = await Router([a, b]).run({"output": 7, "sleep_s": 0.05}, timeout=10)
    assert (result.provider, result.output) == ("serverless", 7)


async def test_retries_do_not_stack_between_router_and_runner(emulators: Emulators) -> None:
    # Every request throttled: each runner retries within its own policy (3 attempts), the
    # router moves on once per runner, never re-trying a runner: 3 + 3 requests, not (1+N)².
    async with emulators("a", "b", faults=ALWAYS_THROTTLED) as [(first, a), (second, b)]:
        with pytest.raises(ProviderError):
            await Router([a, b]).run({"output": 1}, timeout=10)
    assert first.stats.requests["runsync"] == 3
    assert second.stats.requests["runsync"] == 3


async def test_the_runners_own_retries_are_reported(emulators: Emulators) -> None:
    events: list[RouterEvent] = []
    async with emulators("a") as [(first, a)]:
        first.inject("runsync", "rate_limit", times=2, retry_after_s=0.01)
        result = await Router([a], hooks=[events.append]).run({"output": 1}, timeout=10)
    assert result.output == 1
    retried = [e for e in events if e.kind is EventKind.RETRIED]
    assert [e.error_type for e in retried] == ["RateLimitedError", "RateLimitedError"]
    assert retried[0].reason is not None
    assert retried[0].reason.startswith("a retries request 2 in")


async def test_the_overall_deadline_holds_across_three_failing_runners(
    emulators: Emulators,
) -> None:
    # Each attempt fails after 0.4 s in a way that fails over: the third attempt gets only what
    # is left of the one second, not a second of its own.
    failing_slowly = {"sleep_s": 0.4, "raise": "out of memory"}
    async with emulators("a", "b", "c") as deployments:
        router = Router(
            [runner for _, runner in deployments],
            failover_on=(ProviderError, JobFailedError),
        )
        started = anyio.current_time()
        with pytest.raises(JobTimeoutError):
            await router.run(failing_slowly, timeout=1.0)
        elapsed = anyio.current_time() - started
        assert [emulator.stats.jobs_submitted for emulator, _ in deployments] == [1, 1, 1]
    assert 1.0 <= elapsed < 1.0 + 0.3


async def test_an_endpoint_answering_500s_is_taken_out_of_rotation(emulators: Emulators) -> None:
    breaker = BreakerConfig(consecutive_failures=3, open_s=60)
    async with emulators("flaky", "steady") as [(first, a), (_, b)]:
        first.inject("runsync", "server_error", times=100)
        router = Router([a, b], breaker=breaker)
        for n in range(10):
            assert (await router.run({"output": n}, timeout=10)).provider == "steady"
        assert router.breaker_states() == {"flaky": "open", "steady": "closed"}
    assert first.stats.requests["runsync"] == 3  # none once its breaker opened


async def test_half_open_lets_only_the_probes_through(emulators: Emulators) -> None:
    breaker = BreakerConfig(consecutive_failures=1, open_s=0.2, probes=2)
    async with emulators("flaky", "steady") as [(first, a), (_, b)]:
        first.inject("runsync", "server_error")
        router = Router([a, b], breaker=breaker)
        await router.run({"output": 0}, timeout=10)
        assert router.breaker_states()["flaky"] == "open"
        await anyio.sleep(0.25)  # the open period passes: the breaker turns half-open
        before = first.stats.requests["runsync"]
        burst = await asyncio.gather(
            *(router.run({"output": n, "sleep_s": 0.05}, timeout=10) for n in range(10))
        )
        assert first.stats.requests["runsync"] - before == 2
        assert sum(r.provider == "flaky" for r in burst) == 2
        assert router.breaker_states()["flaky"] == "closed"


async def test_all_breakers_open_is_not_a_total_outage(emulators: Emulators) -> None:
    breaker = BreakerConfig(consecutive_failures=1, open_s=60)
    async with emulators("a", "b") as [(first, a), (second, b)]:
        first.inject("runsync", "server_error")
        second.inject("runsync", "server_error")
        router = Router([a, b], breaker=breaker)
        with pytest.raises(ProviderError):
            await router.run({"output": 0}, timeout=10)
        assert router.breaker_states() == {"a": "open", "b": "open"}
        # Both providers are back: a job still goes (as a probe) instead of failing at once.
        result = await router.run({"output": 1}, timeout=10)
    assert result.output == 1
    assert router.breaker_states()[result.provider] == "closed"


async def test_the_retry_budget_bounds_failovers_in_an_outage(emulators: Emulators) -> None:
    budget = RetryBudgetConfig(ratio=0.1, min_per_s=0.1, window_s=10)  # 1 + 10% of attempts
    async with emulators("down", "up") as [(first, a), (second, b)]:
        first.inject("runsync", "server_error", times=1000)
        never_opens = BreakerConfig(consecutive_failures=99, min_calls=99)
        router = Router([a, b], retry_budget=budget, breaker=never_opens)
        outcomes = await asyncio.gather(
            *(router.run({"output": n}, timeout=10) for n in range(20)), return_exceptions=True
        )
    failed_over = sum(not isinstance(o, BaseException) for o in outcomes)
    assert failed_over == 3  # 10% of 20 first attempts, plus the floor of 1
    assert second.stats.jobs_submitted == 3


async def test_the_loser_of_a_hedge_is_cancelled_at_the_provider(emulated: OneEmulated) -> None:
    events: list[RouterEvent] = []
    async with (
        emulated("slow", cold_start_s=5.0) as (slow, a),
        emulated("fast") as (_, b),
    ):
        router = Router([a, b], hedge=Hedge(delay_s=0.1), hooks=[events.append])
        started = anyio.current_time()
        result = await router.run({"output": "layers"}, timeout=10)
        elapsed = anyio.current_time() - started
    assert (result.provider, result.output) == ("fast", "layers")
    assert elapsed < 1.0
    assert slow.stats.requests["cancel"] == 1  # the loser was cancelled at the provider
    assert slow.stats.jobs_cancelled == 1
    kinds = [e.kind for e in events]
    assert kinds.count(EventKind.HEDGED) == 1
    assert kinds.count(EventKind.CANCELLED_LOSER) == 1


async def test_no_hedge_for_a_job_faster_than_the_delay(emulators: Emulators) -> None:
    async with emulators("a", "b") as [(_, a), (second, b)]:
        router = Router([a, b], hedge=Hedge(delay_s=1.0))
        results = await asyncio.gather(*(router.run({"output": n}, timeout=10) for n in range(5)))
    assert {r.provider for r in results} == {"a"}
    assert second.stats.requests.get("runsync", 0) == 0


async def test_state_is_per_router_and_is_documented_so(emulators: Emulators) -> None:
    # Breakers and budgets live in the Router object: a second router (another replica) keeps
    # its own, and the docs say so instead of claiming to share them.
    breaker = BreakerConfig(consecutive_failures=1, open_s=60)
    async with emulators("flaky", "steady") as [(first, a), (_, b)]:
        first.inject("runsync", "server_error")
        one, two = Router([a, b], breaker=breaker), Router([a, b], breaker=breaker)
        await one.run({"output": 1})
        assert one.breaker_states()["flaky"] == "open"
        assert two.breaker_states()["flaky"] == "closed"
        assert (await two.run({"output": 2})).provider == "flaky"
    assert "per process" in (Router.__doc__ or "") + (router_module.__doc__ or "")
