"""Python spent per ``RunPodServerless.run()`` outside the transport, against the bare minimum.

``client_overhead.py`` measures whole clients on a real socket, where the machine's charges for
connections, wake-ups and sleeping dominate. This isolates gpujobs' own per-job work: ``run()``
is called over a transport that answers at once with a finished job (no socket, no event-loop
wake-up), so what remains is building the body and its policy, the deadline, validating the
answer and building the state and the result. Beside it, the least any client does per job:
``json.dumps`` the input, format the request, ``json.loads`` the answer.

Usage::

    PYTHONPATH=src python benches/run_overhead.py [--jobs 20000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable, Mapping, Sequence

import gpujobs
from gpujobs._wire import WireResponse

_ANSWER = json.dumps(
    {
        "id": "job-1",
        "status": "COMPLETED",
        "delayTime": 12,
        "executionTime": 1500,
        "output": {"echo": {"sleep_s": 1.0}},
        "workerId": "worker-1",
    }
).encode()
_RESPONSE = WireResponse(200, {"content-type": "application/json"}, _ANSWER)


class _InstantWire:
    """A transport that answers every request at once with a finished job."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        timeout: float,
        on_abandoned: Callable[[asyncio.Future[WireResponse]], None] | None = None,
    ) -> WireResponse:
        del method, url, headers, body, timeout, on_abandoned
        return _RESPONSE

    async def aclose(self) -> None:
        pass


async def _gpujobs_us(jobs: int) -> float:
    runner = gpujobs.RunPodServerless(endpoint_url="http://127.0.0.1:1/v2/bench", api_key="k")
    runner._wire = _InstantWire()  # noqa: SLF001 - the seam this benchmark measures around
    async with runner:
        await runner.run({"n": -1}, timeout=30)  # first use out of the way
        start = time.perf_counter()
        for n in range(jobs):
            await runner.run({"sleep_s": 1.0, "n": n}, timeout=30)
        return (time.perf_counter() - start) * 1e6 / jobs


def _minimum_us(jobs: int) -> float:
    start = time.perf_counter()
    for n in range(jobs):
        body = json.dumps({"input": {"sleep_s": 1.0, "n": n}}).encode()
        request = f"POST /runsync HTTP/1.1\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body
        json.loads(_RESPONSE.body)
        del request
    return (time.perf_counter() - start) * 1e6 / jobs


def main(argv: Sequence[str] | None = None) -> int:
    """Print µs per job, medians over runs, as a Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per run")
    parser.add_argument("--repeat", type=int, default=5, help="runs (median shown)")
    args = parser.parse_args(argv)
    ours: list[float] = []
    least: list[float] = []
    for _ in range(args.repeat):  # alternating, so drift weighs on both
        ours.append(asyncio.run(_gpujobs_us(args.jobs)))
        least.append(_minimum_us(args.jobs))
    rows: list[tuple[str, float]] = [
        ("gpujobs `RunPodServerless.run()`", statistics.median(ours)),
        ("the minimum (dumps, format, loads)", statistics.median(least)),
    ]
    print(f"{args.jobs} jobs per run, {args.repeat} runs, medians\n")
    print("| per job | µs |\n|---|--:|")
    for label, us in rows:
        print(f"| {label} | {us:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
