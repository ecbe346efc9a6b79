"""Routing simulation: a pod with serverless overflow, against a clairvoyant schedule.

One seeded, bursty trace (``gpujobs.testing.bursty_trace``: quiet stretches and bursts, each job
15–25 s) is replayed through the real :class:`gpujobs.routing.Router` over simulated runners
(``SimulatedPod``: one job at a time, paid by the hour; ``SimulatedServerless``: workers started
per job with 30–45 s cold starts, a 2–3 min first start, billed per second from start to stop,
idle timeout included), on a virtual clock (``run_virtual``): an hour of traffic takes a fraction
of a second. Policies, each on the same trace:

- ``pod only``: ``Router([pod])``, the pod's queue unbounded;
- ``serverless only``: ``Router([serverless])``;
- ``overflow``: ``Router([Route(pod, ...), Route(serverless, ...)], policy=Overflow())``;
- ``overflow, cold path``: the same with ``Overflow(cold_path=True)`` (the pod keeps a job as
  long as it beats a cold serverless worker);
- ``overflow, max_wait_s=60``: ``Overflow(max_wait_s=60)``, a latency budget: the pod also
  keeps a job while it finishes within 60 s (``--max-wait-s``);
- ``overflow + hedge``: ``Overflow()`` with ``hedge=Hedge()`` (a copy after the observed p95);
- ``clairvoyant``: an offline schedule that knows every arrival and duration (see
  :func:`clairvoyant`), held to a judged policy's p95 for every job; one per judged policy
  (the three ``overflow`` rows), and a looser ``keep-warm`` bound.

It prints a Markdown table (``--output`` writes it to a file too), draws latency CDFs and cost
bars into ``--plot`` (default docs/img/routing.png) and says PASS/MISS for "overflow within 10 %
of the clairvoyant cost at equal or better p95". ``--seeds N`` repeats the verdict over N seeds.

Usage::

    PYTHONPATH=src python benches/routing.py                        # 1 h, seed 1
    PYTHONPATH=src python benches/routing.py --hours 8 --seed 3 --jobs-per-hour 120
    PYTHONPATH=src python benches/routing.py --seeds 50 --plot ''   # the verdict over 50 seeds
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from gpujobs.routing import Hedge, Overflow, Priors, Route, Router
from gpujobs.testing import (
    JobRecord,
    SimulatedPod,
    SimulatedServerless,
    TraceJob,
    bursty_trace,
    replay,
    run_virtual,
)
from gpujobs.testing._traffic import mean_jobs_per_hour


@dataclass(frozen=True)
class Prices:
    """The price table (DESIGN.md, "Cost figures from the seeds"; as of 2026-11-28)."""

    pod_usd_per_hour: float = 1.89  # A100 pod
    serverless_usd_per_s: float = 0.00076  # A100 serverless flex worker (≈ $2.74/h)


@dataclass(frozen=True)
class Platform:
    """How the simulated runners behave (seed figures; RunPod's default idle timeout)."""

    cold_start_s: tuple[float, float] = (30.0, 45.0)
    first_start_s: tuple[float, float] = (120.0, 180.0)
    idle_timeout_s: float = 5.0
    max_workers: int = 10
    pod_queue: int = 8  # the pod's bounded queue when it has an overflow (503 beyond)
    max_wait_s: float = 60.0  # the latency budget of the "overflow, max_wait_s" policy

    @property
    def budget_policy(self) -> str:
        return f"overflow, max_wait_s={self.max_wait_s:g}"

    @property
    def policies(self) -> tuple[str, ...]:
        return (
            "pod only",
            "serverless only",
            "overflow",
            "overflow, cold path",
            self.budget_policy,
            "overflow + hedge",
        )

    @property
    def judged(self) -> tuple[str, ...]:
        return ("overflow", "overflow, cold path", self.budget_policy)


@dataclass(frozen=True)
class Outcome:
    """One policy on one trace."""

    policy: str
    latencies: list[float]
    on_pod: int
    on_serverless: int
    failed: int
    cold_starts: int
    serverless_usd: float
    pod_usd: float

    @property
    def total_usd(self) -> float:
        return self.serverless_usd + self.pod_usd

    def quantile(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


# -- the router's policies, on simulated runners -------------------------------------------------

POD_PRIORS = Priors(concurrency=1, service_s=20.0, dispatch_s=0.0)
SERVERLESS_PRIORS = Priors(service_s=20.0, cold_start_s=40.0, cold_probability=0.5, dispatch_s=0.0)


async def _simulate(  # noqa: PLR0917 - one private call site
    policy: str,
    trace: Sequence[TraceJob],
    hours: float,
    prices: Prices,
    platform: Platform,
    seed: int,
) -> Outcome:
    pod = SimulatedPod(
        name="pod",
        max_queue=None if policy == "pod only" else platform.pod_queue,
        usd_per_hour=prices.pod_usd_per_hour,
        seed=seed,
    )
    serverless = SimulatedServerless(
        name="serverless",
        usd_per_s=prices.serverless_usd_per_s,
        cold_start_s=platform.cold_start_s,
        first_start_s=platform.first_start_s,
        idle_timeout_s=platform.idle_timeout_s,
        max_workers=platform.max_workers,
        seed=seed + 1,
    )
    if policy == "pod only":
        router = Router([pod], name=policy)
    elif policy == "serverless only":
        router = Router([serverless], name=policy)
    else:
        router = Router(
            [Route(pod, priors=POD_PRIORS), Route(serverless, priors=SERVERLESS_PRIORS)],
            policy=Overflow(
                cold_path=policy == "overflow, cold path",
                max_wait_s=platform.max_wait_s if policy == platform.budget_policy else None,
            ),
            hedge=Hedge() if policy == "overflow + hedge" else None,
            name=policy,
        )
    async with router:
        records = await replay(router, trace)
        # Let the last workers idle out and stop: their tails are billed too.
        await asyncio.sleep(platform.idle_timeout_s + 1.0)
        billed = serverless.billed_usd
    return _outcome(
        policy,
        records,
        billed,
        pod_usd=0.0 if policy == "serverless only" else prices.pod_usd_per_hour * hours,
        cold_starts=serverless.cold_starts,
    )


def _outcome(
    policy: str,
    records: Sequence[JobRecord],
    serverless_usd: float,
    *,
    pod_usd: float,
    cold_starts: int,
) -> Outcome:
    return Outcome(
        policy=policy,
        latencies=[r.latency_s for r in records if r.provider is not None],
        on_pod=sum(r.provider == "pod" for r in records),
        on_serverless=sum(r.provider == "serverless" for r in records),
        failed=sum(r.provider is None for r in records),
        cold_starts=cold_starts,
        serverless_usd=serverless_usd,
        pod_usd=pod_usd,
    )


# -- the clairvoyant schedule ----------------------------------------------------------------------


def clairvoyant(
    trace: Sequence[TraceJob],
    *,
    target_s: float,
    hours: float,
    prices: Prices,
    platform: Platform,
    seed: int,
    keep_warm: bool = False,
    label: str = "clairvoyant",
) -> Outcome:
    """An offline schedule that knows every arrival and service time in advance.

    Jobs are taken in arrival order. A job goes to the pod (FIFO, one at a time, free at the
    margin) when the pod finishes it within ``target_s`` of its arrival; otherwise to
    serverless. There the platform's rules hold: a worker that finished its last job at most
    ``idle_timeout_s`` ago is still warm and takes the job (the idle gap is billed); otherwise a
    new worker starts (a cold start, billed; the endpoint's first start is the long one), every
    worker pays the idle timeout after its last job, and each worker's bill is rounded up to the
    second. Knowing the arrival, the schedule starts that worker one cold start ahead, so its
    serverless jobs never wait (the cost is the same; only the latency is better).

    ``keep_warm=True`` also lets it keep a worker alive across any gap shorter than a cold start
    (as if it chose each worker's idle timeout knowing the future): a lower bound no online
    policy on a fixed idle timeout can reach.
    """
    rng = random.Random(seed + 2)
    pod_free = 0.0
    latencies: list[float] = []
    free_at: list[float] = []  # serverless workers: when each finished its last job
    billed: list[float] = []  # seconds billed so far per worker (start + jobs + idle gaps)
    on_pod = 0
    for job in trace:
        finish = max(pod_free, job.at) + job.duration_s
        if finish - job.at <= target_s:
            pod_free, on_pod = finish, on_pod + 1
            latencies.append(finish - job.at)
            continue
        latencies.append(job.duration_s)
        cold = rng.uniform(*(platform.cold_start_s if billed else platform.first_start_s))
        free = [(job.at - f, i) for i, f in enumerate(free_at) if f <= job.at]
        gap, worker = min(free, default=(math.inf, -1))
        if gap <= (max(cold, platform.idle_timeout_s) if keep_warm else platform.idle_timeout_s):
            billed[worker] += gap + job.duration_s
            free_at[worker] = job.at + job.duration_s
        else:
            billed.append(cold + job.duration_s)
            free_at.append(job.at + job.duration_s)
    billed_s = sum(math.ceil(s + platform.idle_timeout_s - 1e-9) for s in billed)
    return Outcome(
        policy=label,
        latencies=latencies,
        on_pod=on_pod,
        on_serverless=len(trace) - on_pod,
        failed=0,
        cold_starts=len(billed),
        serverless_usd=billed_s * prices.serverless_usd_per_s,
        pod_usd=prices.pod_usd_per_hour * hours,
    )


# -- running and reporting -------------------------------------------------------------------------


@dataclass(frozen=True)
class Judged:
    """A router policy and the clairvoyant schedule held to its p95."""

    ours: Outcome
    best: Outcome

    @property
    def ratio(self) -> float:
        return self.ours.total_usd / self.best.total_usd

    @property
    def ok(self) -> bool:
        """Within 10 % of the clairvoyant's cost (the issue's target)."""
        return self.ratio <= 1.10

    def line(self) -> str:
        ours, best = self.ours, self.best
        marginal = ours.serverless_usd / best.serverless_usd if best.serverless_usd else math.inf
        return (
            f"{'PASS' if self.ok else 'MISS'}: {ours.policy} costs {self.ratio:.3f} × the "
            f"clairvoyant schedule (${ours.total_usd:.2f} vs ${best.total_usd:.2f}; serverless "
            f"part {marginal:.2f} ×) at p95 {ours.quantile(0.95):.1f} s vs "
            f"{best.quantile(0.95):.1f} s"
        )


def run_all(
    trace: Sequence[TraceJob], hours: float, prices: Prices, platform: Platform, seed: int
) -> tuple[list[Outcome], list[Judged]]:
    """Every policy on ``trace``; the clairvoyant schedule at each judged policy's p95."""
    outcomes = [
        run_virtual(_simulate(policy, trace, hours, prices, platform, seed))
        for policy in platform.policies
    ]
    by = {o.policy: o for o in outcomes}
    judged: list[Judged] = []
    for name in platform.judged:
        target = by[name].quantile(0.95)
        best = clairvoyant(
            trace,
            target_s=target,
            hours=hours,
            prices=prices,
            platform=platform,
            seed=seed,
            label=f"clairvoyant, target {target:.1f} s ({name})",
        )
        judged.append(Judged(by[name], best))
    bound = clairvoyant(
        trace,
        target_s=by["overflow"].quantile(0.95),
        hours=hours,
        prices=prices,
        platform=platform,
        seed=seed,
        keep_warm=True,
        label="keep-warm bound (overflow's target)",
    )
    return [*outcomes, *(j.best for j in judged), bound], judged


def table(outcomes: Sequence[Outcome], n_jobs: int) -> str:
    """The Markdown table."""
    head = (
        "| policy | p50 s | p95 s | max s | on pod | on serverless | failed | cold starts "
        "| serverless $ | pod $ | total $ | $ per job |"
    )
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    rows = [
        f"| {o.policy} | {o.quantile(0.5):.1f} | {o.quantile(0.95):.1f} | "
        f"{max(o.latencies):.1f} | {o.on_pod} | {o.on_serverless} | {o.failed} | "
        f"{o.cold_starts} | {o.serverless_usd:.2f} | {o.pod_usd:.2f} | {o.total_usd:.2f} | "
        f"{o.total_usd / n_jobs:.4f} |"
        for o in outcomes
    ]
    return "\n".join([head, rule, *rows])


def plot(outcomes: Sequence[Outcome], path: Path, title: str) -> None:
    """Latency CDFs per policy and stacked cost bars, into ``path`` (PNG)."""
    import matplotlib as mpl  # noqa: PLC0415 - only when plotting

    mpl.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415
    from matplotlib.ticker import FixedLocator, NullLocator, ScalarFormatter  # noqa: PLC0415

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), width_ratios=(5, 4))
    # One clairvoyant curve: the others have (nearly) the same latencies.
    curves = [o for o in outcomes if not o.policy.startswith(("clairvoyant", "keep-warm"))]
    curves += [next(o for o in outcomes if o.policy.startswith("clairvoyant"))]
    for o in curves:
        xs = sorted(o.latencies)
        ys = [(i + 1) / len(xs) for i in range(len(xs))]
        label = f"{o.policy.split(' (')[0]} (p95 {o.quantile(0.95):.0f} s)"
        left.step(xs, ys, where="post", label=label)
    left.axhline(0.95, color="grey", linewidth=0.6, linestyle=":")
    left.set_xscale("log")
    left.xaxis.set_major_locator(FixedLocator([15, 20, 30, 45, 60, 90, 120, 180, 300, 450]))
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.xaxis.set_minor_locator(NullLocator())
    left.set_xlabel("latency, arrival to result (s, log scale)")
    left.set_ylabel("share of jobs")
    left.set_title("latency CDF")
    left.legend(fontsize=8, loc="lower right")
    names = [o.policy for o in outcomes][::-1]
    pods = [o.pod_usd for o in outcomes][::-1]
    right.barh(names, pods, label="pod (hourly, always on)", color="#8da0cb")
    right.barh(
        names,
        [o.serverless_usd for o in outcomes][::-1],
        left=pods,
        label="serverless (billed seconds)",
        color="#fc8d62",
    )
    for y, o in enumerate(outcomes[::-1]):
        right.text(o.total_usd + 0.05, y, f"${o.total_usd:.2f}", va="center", fontsize=8)
    right.set_xlabel("USD for the trace")
    right.set_title("cost")
    right.tick_params(axis="y", labelsize=8)
    right.set_xlim(0, max(o.total_usd for o in outcomes) * 1.18)
    right.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.4, -0.12), ncol=2)
    fig.suptitle(title.replace("$", r"\$"), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", type=int, default=0, help="also judge over this many seeds")
    parser.add_argument(
        "--jobs-per-hour",
        type=float,
        default=None,
        help="average arrival rate (default ≈ 96/h: 30/h quiet, 360/h in bursts)",
    )
    parser.add_argument("--pod-usd-per-hour", type=float, default=Prices.pod_usd_per_hour)
    parser.add_argument("--serverless-usd-per-s", type=float, default=Prices.serverless_usd_per_s)
    parser.add_argument("--idle-timeout-s", type=float, default=Platform.idle_timeout_s)
    parser.add_argument("--max-workers", type=int, default=Platform.max_workers)
    parser.add_argument("--pod-queue", type=int, default=Platform.pod_queue)
    parser.add_argument("--max-wait-s", type=float, default=Platform.max_wait_s)
    parser.add_argument("--output", type=Path, default=None, help="write the table here too")
    parser.add_argument("--plot", default="docs/img/routing.png", help="'' for no plot")
    args = parser.parse_args(argv)

    prices = Prices(args.pod_usd_per_hour, args.serverless_usd_per_s)
    platform = replace(
        Platform(),
        idle_timeout_s=args.idle_timeout_s,
        max_workers=args.max_workers,
        pod_queue=args.pod_queue,
        max_wait_s=args.max_wait_s,
    )
    scale = 1.0 if args.jobs_per_hour is None else args.jobs_per_hour / mean_jobs_per_hour()

    def trace_for(seed: int) -> list[TraceJob]:
        return bursty_trace(
            args.hours, seed=seed, quiet_per_hour=30.0 * scale, burst_per_hour=360.0 * scale
        )

    started = time.perf_counter()
    trace = trace_for(args.seed)
    outcomes, judged = run_all(trace, args.hours, prices, platform, args.seed)
    wall = time.perf_counter() - started
    ok = all(j.ok for j in judged)
    lines = "\n".join(j.line() for j in judged)
    header = (
        f"{len(trace)} jobs over {args.hours:g} h (seed {args.seed}, "
        f"{sum(j.burst for j in trace)} in bursts); prices: pod ${prices.pod_usd_per_hour}/h, "
        f"serverless ${prices.serverless_usd_per_s}/s; idle timeout {platform.idle_timeout_s:g} s; "
        f"simulated in {wall:.2f} s of wall time"
    )
    report = f"{header}\n\n{table(outcomes, len(trace))}\n\n{lines}\n"
    print(report)
    if args.seeds:
        runs = [
            run_all(trace_for(seed), args.hours, prices, platform, seed)[1]
            for seed in range(1, args.seeds + 1)
        ]
        for i, name in enumerate(platform.judged):
            ratios = [judged[i].ratio for judged in runs]
            p95s = [judged[i].ours.quantile(0.95) for judged in runs]
            summary = (
                f"{name}, seeds 1-{args.seeds}: PASS {sum(r <= 1.10 for r in ratios)}/"
                f"{args.seeds}; cost / clairvoyant's median {statistics.median(ratios):.3f}, "
                f"worst {max(ratios):.3f}; p95 median {statistics.median(p95s):.1f} s"
            )
            print(summary)
            report += f"\n{summary}\n"
    if args.output:
        args.output.write_text(report)
    if args.plot:
        plot(outcomes, Path(args.plot), header.split("; simulated", maxsplit=1)[0])
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
