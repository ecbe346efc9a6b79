"""Batch fan-out over any :class:`JobRunner`: bounded concurrency, progress, a failure summary."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gpujobs._errors import GpuJobsError
from gpujobs._models import JobResult
from gpujobs._runner import JobRunner

__all__ = ["BatchResults", "run_batch"]

Outcome = JobResult | GpuJobsError
Progress = Callable[[int, int, int, Outcome], None]  # done, total, index, outcome


@dataclass(frozen=True)
class BatchResults:
    """What a batch came to, in the order of its payloads."""

    outcomes: Sequence[Outcome]

    @property
    def results(self) -> list[JobResult]:
        """The jobs that succeeded."""
        return [o for o in self.outcomes if isinstance(o, JobResult)]

    @property
    def failures(self) -> dict[int, GpuJobsError]:
        """The jobs that failed, by their index in the batch."""
        return {i: o for i, o in enumerate(self.outcomes) if isinstance(o, GpuJobsError)}

    @property
    def ok(self) -> bool:
        """Whether every job succeeded."""
        return not self.failures

    def summary(self) -> str:
        """One line: how many succeeded, by which runner, and how many failed, by error."""
        by_runner = Counter(r.provider for r in self.results)
        by_error = Counter(type(e).__name__ for e in self.failures.values())
        done = ", ".join(f"{n} on {name}" for name, n in sorted(by_runner.items())) or "none"
        line = f"{len(self.results)}/{len(self.outcomes)} succeeded ({done})"
        if by_error:
            line += "; failed: " + ", ".join(f"{n} {kind}" for kind, n in sorted(by_error.items()))
        return line


async def run_batch(
    runner: JobRunner,
    payloads: Sequence[Mapping[str, Any]],
    *,
    concurrency: int = 16,
    return_exceptions: bool = False,
    timeout: float | None = None,
    on_progress: Progress | None = None,
    **run_options: Any,
) -> BatchResults:
    """Run every payload on ``runner``, at most ``concurrency`` at once.

    With ``return_exceptions=False`` the first failure cancels the jobs still running (remotely
    too) and is raised; with ``True`` every job runs to its end and failures are in the result.
    """
    if concurrency < 1:
        msg = f"concurrency must be at least 1, not {concurrency}"
        raise ValueError(msg)
    slots = asyncio.Semaphore(concurrency)
    outcomes: list[Outcome | None] = [None] * len(payloads)
    done = 0

    async def one(index: int, payload: Mapping[str, Any]) -> None:
        nonlocal done
        async with slots:
            try:
                outcome: Outcome = await runner.run(payload, timeout=timeout, **run_options)
            except GpuJobsError as exc:
                if not return_exceptions:
                    raise
                outcome = exc
        outcomes[index] = outcome
        done += 1
        if on_progress is not None:
            on_progress(done, len(payloads), index, outcome)

    try:
        async with asyncio.TaskGroup() as group:
            for index, payload in enumerate(payloads):
                group.create_task(one(index, payload))
    except ExceptionGroup as group:  # the first failure cancelled the others: raise it as is
        raise group.exceptions[0] from None
    return BatchResults(outcomes=[o for o in outcomes if o is not None])
