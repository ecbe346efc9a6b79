"""The routing simulation: virtual clock, simulated pod and serverless runners, traces, replay."""

from __future__ import annotations

import asyncio
import math
import time

import anyio

from gpujobs import CapacityError, JobResult, JobTimeoutError
from gpujobs.routing import (
    Candidate,
    EventKind,
    Overflow,
    Priors,
    Route,
    Router,
    RouterEvent,
    RunnerStats,
)
from gpujobs.testing import (
    JobRecord,
    SimulatedPod,
    SimulatedServerless,
    TraceJob,
    bursty_trace,
    replay,
    run_virtual,
)

POD = Priors(concurrency=1, service_s=20.0, dispatch_s=0.0)
SERVERLESS = Priors(service_s=20.0, cold_start_s=40.0, cold_probability=0.5, dispatch_s=0.0)
COLD = (30.0, 45.0)
FIRST = (120.0, 180.0)


def _now() -> float:
    return asyncio.get_running_loop().time()


def hybrid(*, seed: int = 0, events: list[RouterEvent] | None = None) -> Router:
    pod = SimulatedPod(name="pod", max_queue=8, seed=seed)
    serverless = SimulatedServerless(name="serverless", seed=seed + 1)
    return Router(
        [Route(pod, priors=POD), Route(serverless, priors=SERVERLESS)],
        policy=Overflow(),
        hooks=[events.append] if events is not None else (),
    )


# -- the virtual clock ---------------------------------------------------------------------------


def test_timers_run_on_virtual_time_in_no_wall_time() -> None:
    async def main() -> tuple[float, float, bool]:
        await asyncio.sleep(3600)
        slept = _now()
        with anyio.move_on_after(10) as scope:  # anyio's timeouts read the same clock
            await anyio.sleep(100)
        return slept, _now(), scope.cancelled_caught

    started = time.perf_counter()
    slept, ended, cut = run_virtual(main())
    assert time.perf_counter() - started < 1.0
    assert slept == 3600.0
    assert math.isclose(ended, 3610.0)
    assert cut


def test_a_runner_deadline_passes_on_virtual_time() -> None:
    async def main() -> tuple[type[BaseException], float]:
        pod = SimulatedPod(name="pod")
        started = _now()
        try:
            await pod.run({"duration_s": 100.0}, timeout=30.0)
        except JobTimeoutError as exc:
            return type(exc), _now() - started
        return type(None), _now() - started  # type: ignore[return-value]

    kind, waited = run_virtual(main())
    assert kind is JobTimeoutError
    assert math.isclose(waited, 30.0)


def test_an_hour_of_traffic_through_the_router_takes_seconds() -> None:
    trace = bursty_trace(1.0, seed=1)

    async def main() -> tuple[list[JobRecord], float]:
        async with hybrid() as router:
            records = await replay(router, trace)
        return records, _now()

    started = time.perf_counter()
    records, ended = run_virtual(main())
    assert time.perf_counter() - started < 5.0
    assert ended > 3600.0
    assert len(records) == len(trace) > 50
    assert all(r.provider in {"pod", "serverless"} for r in records)


# -- the simulated runners -----------------------------------------------------------------------


def test_serverless_cold_starts_first_long_then_warm_then_cold_after_the_idle_timeout() -> None:
    async def main() -> tuple[list[JobResult], SimulatedServerless]:
        endpoint = SimulatedServerless(name="sl", idle_timeout_s=5.0, seed=3)
        first = await endpoint.run({"duration_s": 20.0})
        await asyncio.sleep(4.0)  # within the idle timeout: the same worker, warm
        warm = await endpoint.run({"duration_s": 20.0})
        await asyncio.sleep(6.0)  # past it: the worker stopped
        cold = await endpoint.run({"duration_s": 20.0})
        return [first, warm, cold], endpoint

    (first, warm, cold), endpoint = run_virtual(main())
    assert first.timings.cold_start is True
    assert FIRST[0] <= (first.timings.queue_s or 0) <= FIRST[1]  # the endpoint's first start
    assert warm.timings.cold_start is False
    assert warm.timings.queue_s == 0.0
    assert cold.timings.cold_start is True
    assert COLD[0] <= (cold.timings.queue_s or 0) <= COLD[1]
    assert all(math.isclose(r.timings.execution_s or 0, 20.0) for r in (first, warm, cold))
    assert endpoint.cold_starts == 2


def test_serverless_scales_out_one_worker_per_concurrent_job() -> None:
    async def main() -> tuple[list[JobResult], SimulatedServerless]:
        endpoint = SimulatedServerless(name="sl", max_workers=3, first_start_s=COLD, seed=4)
        results = await asyncio.gather(*(endpoint.run({"duration_s": 20.0}) for _ in range(4)))
        return list(results), endpoint

    results, endpoint = run_virtual(main())
    assert endpoint.cold_starts == 3  # capped at max_workers
    waits = sorted(r.timings.queue_s or 0 for r in results)
    assert waits[3] >= waits[0] + 20.0  # the fourth waited for a worker to free up
    assert sum(bool(r.timings.cold_start) for r in results) == 3


def test_serverless_bill_adds_up_start_to_stop_rounded_up_per_worker() -> None:
    price = 0.001

    async def main() -> tuple[list[JobResult], SimulatedServerless]:
        endpoint = SimulatedServerless(name="sl", usd_per_s=price, idle_timeout_s=5.0, seed=5)
        results = []
        for gap in (0.0, 3.0, 30.0, 1.0):
            await asyncio.sleep(gap)
            results.append(await endpoint.run({"duration_s": 17.3}))
        await asyncio.sleep(10.0)  # the last worker idles out and stops
        return results, endpoint

    results, endpoint = run_virtual(main())
    per_job = sum(r.cost.usd for r in results if r.cost is not None)
    unattributed = (endpoint.idle_s + endpoint.unused_start_s) * price
    # Jobs pay their cold start + execution; idle tails go to the endpoint only; each worker's
    # lifetime is rounded up to the second.
    assert per_job + unattributed <= endpoint.billed_usd <= per_job + unattributed + 2 * price
    assert math.isclose(endpoint.idle_s, 3.0 + 5.0 + 1.0 + 5.0)
    costs = [r.cost for r in results if r.cost is not None]
    assert [c.basis for c in costs] == [
        "start+execution",
        "execution",
        "start+execution",
        "execution",
    ]
    assert math.isclose(costs[1].usd, 17.3 * price)


def test_pod_runs_one_job_at_a_time_and_refuses_a_full_queue() -> None:
    async def main() -> tuple[list[JobResult], str, SimulatedPod]:
        pod = SimulatedPod(name="pod", max_queue=1)
        running = asyncio.ensure_future(pod.run({"duration_s": 20.0}))
        queued = asyncio.ensure_future(pod.run({"duration_s": 15.0}))
        await asyncio.sleep(1.0)
        refused = ""
        try:
            await pod.submit({"duration_s": 15.0})
        except CapacityError as exc:
            refused = f"{exc.provider}: {exc}"
        results = [await running, await queued]
        return results, refused, pod

    (first, second), refused, pod = run_virtual(main())
    assert refused.startswith("pod: ")
    assert pod.refused == 1
    assert first.timings.queue_s == 0.0
    assert math.isclose(second.timings.queue_s or 0, 20.0)  # waited for the first
    assert math.isclose(second.timings.execution_s or 0, 15.0)
    assert second.timings.cold_start is False
    assert second.cost is not None
    assert (second.cost.usd, second.cost.basis) == (0.0, "marginal")


def test_pod_cancel_of_a_queued_job_frees_its_place() -> None:
    async def main() -> tuple[float, float]:
        pod = SimulatedPod(name="pod", max_queue=1)
        running = asyncio.ensure_future(pod.run({"duration_s": 20.0}))
        await asyncio.sleep(1.0)
        handle = await pod.submit({"duration_s": 50.0})
        await pod.cancel(handle)
        after = await pod.run({"duration_s": 10.0})  # would be refused if the place were taken
        await running
        return after.timings.queue_s or 0, _now()

    waited, ended = run_virtual(main())
    assert math.isclose(waited, 19.0)  # behind the running job only, not the cancelled one
    assert math.isclose(ended, 30.0)


def test_pod_draws_service_times_in_range_when_the_payload_gives_none() -> None:
    async def main() -> list[float]:
        pod = SimulatedPod(name="pod", seed=7)
        results = [await pod.run({}) for _ in range(20)]
        return [r.timings.execution_s or 0 for r in results]

    durations = run_virtual(main())
    assert all(15.0 <= d <= 25.0 for d in durations)
    assert len(set(durations)) == 20


# -- traces, routing, determinism ----------------------------------------------------------------


def test_bursty_trace_is_seeded_sorted_and_bursty() -> None:
    trace = bursty_trace(4.0, seed=11)
    assert trace == bursty_trace(4.0, seed=11)
    assert trace != bursty_trace(4.0, seed=12)
    assert [j.at for j in trace] == sorted(j.at for j in trace)
    assert all(0 <= j.at < 4 * 3600 and 15.0 <= j.duration_s <= 25.0 for j in trace)
    bursts = [j for j in trace if j.burst]
    assert len(bursts) > len(trace) / 3  # short bursts hold much of the traffic


def test_overflow_keeps_quiet_jobs_on_the_pod_and_sends_burst_jobs_to_serverless() -> None:
    quiet = [TraceJob(at=100.0 * n, duration_s=20.0) for n in range(1, 6)]  # every 100 s
    burst = [TraceJob(at=600.0 + 2.0 * n, duration_s=20.0, burst=True) for n in range(8)]
    after = [TraceJob(at=1200.0 + 100.0 * n, duration_s=20.0) for n in range(5)]
    trace = [*quiet, *burst, *after]
    events: list[RouterEvent] = []

    async def main() -> list[JobRecord]:
        async with hybrid(events=events) as router:
            return await replay(router, trace)

    records = run_virtual(main())
    providers = [r.provider for r in records]
    assert providers[:5] == ["pod"] * 5
    assert providers[-5:] == ["pod"] * 5
    in_burst = providers[5:13]
    # The pod takes the first burst jobs while it beats a serverless start, then they overflow.
    assert in_burst[:2] == ["pod", "pod"]
    assert in_burst[2:] == ["serverless"] * 6
    assert sum(e.kind is EventKind.OVERFLOWED for e in events) == 6
    assert max(r.latency_s for r in records if not r.burst) == 20.0


def test_the_simulation_is_deterministic_for_a_seed() -> None:
    trace = bursty_trace(1.0, seed=5)

    def once(seed: int) -> list[tuple[str | None, float, float]]:
        async def main() -> list[JobRecord]:
            async with hybrid(seed=seed) as router:
                return await replay(router, trace)

        return [(r.provider, r.latency_s, r.cost_usd) for r in run_virtual(main())]

    first = once(1)
    assert once(1) == first
    assert once(2) != first  # other cold-start draws
    assert len(first) == len(trace) > 20


def test_cold_path_keeps_the_job_on_the_pod_while_it_beats_a_cold_start() -> None:
    pod, serverless = RunnerStats(POD), RunnerStats(SERVERLESS)
    pod.started.update({1: 0.0, 2: 0.0})  # one running for 10 s, one queued: 10 + 20 + 20 = 50 s
    candidates = [
        Candidate(index=0, name="pod", stats=pod),
        Candidate(index=1, name="serverless", stats=serverless),
    ]
    # Expected on serverless: 0.5 × 40 + 20 = 40 s; on a cold worker: 40 + 20 = 60 s.
    default = Overflow().order(candidates, now=10.0, deadline_left_s=None)
    cold_path = Overflow(cold_path=True).order(candidates, now=10.0, deadline_left_s=None)
    assert default[0][0].name == "serverless"
    assert "primary expected 50.0 s > serverless 40.0 s" in default[0][1]
    assert cold_path[0][0].name == "pod"
    assert "≤ serverless 60.0 s" in cold_path[0][1]
    pod.started[3] = 0.0  # a second job queued: 70 s, later than even a cold start
    cold_path = Overflow(cold_path=True).order(candidates, now=10.0, deadline_left_s=None)
    assert cold_path[0] == (
        candidates[1],
        "overflow: primary expected 70.0 s > serverless 60.0 s if cold",
    )
