"""What this machine charges a process for waiting: the baseline under ``client_overhead.py``.

A client that delivers results as they arrive spends most of a batch asleep in the event loop
and wakes once per answer. Where the kernel's CPU accounting charges a sleeping process, or
charges much per wake-up (some virtual machines do), that charge lands in every client's CPU
time, whatever its code. This script measures both charges with no client code at all, so the
per-job numbers of ``client_overhead.py`` can be read against them:

- a process asleep in ``asyncio.sleep`` for the whole time (one wake-up);
- the same time spent in many short waits of ``select.epoll.poll`` (one wake-up each), at about
  the rate at which 200 jobs of 2 s answer.

Usage::

    python benches/idle_charge.py [--seconds 2.5] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import select
import statistics
import time
from collections.abc import Callable, Sequence


def _cpu_ms(work: Callable[[], None]) -> float:
    start = time.process_time()
    work()
    return (time.process_time() - start) * 1000


def _asleep(seconds: float) -> None:
    asyncio.run(asyncio.sleep(seconds))


def _short_waits(seconds: float, waits: int) -> None:
    poller = select.epoll()
    try:
        for _ in range(waits):
            poller.poll(seconds / waits)
    finally:
        poller.close()


def main(argv: Sequence[str] | None = None) -> int:
    """Print a Markdown table of CPU charged while waiting."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=2.5, help="wall time per case")
    parser.add_argument("--repeat", type=int, default=3, help="runs per case (median shown)")
    args = parser.parse_args(argv)
    seconds = args.seconds
    cases: list[tuple[str, int, Callable[[], None]]] = [
        (f"asyncio.sleep({seconds:g})", 1, lambda: _asleep(seconds)),
        *(
            (f"{n} waits over {seconds:g} s", n, lambda n=n: _short_waits(seconds, n))
            for n in (200, 800)
        ),
    ]
    print("| case | wake-ups | CPU ms charged (median) | per second |")
    print("|---|--:|--:|--:|")
    for label, wakeups, work in cases:
        charged = statistics.median(_cpu_ms(work) for _ in range(args.repeat))
        print(f"| {label} | {wakeups} | {charged:.1f} | {charged / seconds:.1f} ms/s |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
