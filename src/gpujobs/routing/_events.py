"""What the router tells its hooks: one frozen event per step of a job's way through it.

A hook is any callable taking a :class:`RouterEvent`; it runs inline, so it must be quick and must
not raise (an exception from a hook is logged and dropped, never allowed to fail a job).
Ready-made: :class:`LoggingHook`; ``gpujobs.routing.hooks`` has OpenTelemetry and Prometheus ones.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum

from gpujobs._models import Cost

__all__ = ["EventKind", "LoggingHook", "RouterEvent", "RouterHook"]

_log = logging.getLogger("gpujobs.routing")


class EventKind(StrEnum):
    """The steps of a job through a router."""

    SUBMITTED = "submitted"  # the router accepted the job
    STARTED = "started"  # an attempt was sent to a runner (``reason`` says why that one)
    RETRIED = "retried"  # the runner retries a request within the attempt (its own policy)
    OVERFLOWED = "overflowed"  # the primary was passed over for another runner
    FAILED_OVER = "failed_over"  # an attempt failed and the job moves to another runner
    HEDGED = "hedged"  # a copy was started on another runner while the first still runs
    CANCELLED_LOSER = "cancelled_loser"  # the slower copy of a hedge was cancelled remotely
    RETRY_REFUSED = "retry_refused"  # the retry budget allowed no failover or hedge
    COMPLETED = "completed"  # the job ended with a result (``cost`` when known)
    FAILED = "failed"  # the job ended with an error (``error``)
    PROGRESS = "progress"  # a batch (:meth:`Router.map`) moved on: ``done`` of ``total``


@dataclass(frozen=True, slots=True)
class RouterEvent:
    """One step of one job. ``runner`` is the runner's name where one is involved."""

    kind: EventKind
    job_id: str
    router: str
    runner: str | None = None
    reason: str | None = None
    error: str | None = None
    error_type: str | None = None
    cost: Cost | None = None
    elapsed_s: float | None = None
    attempt: int = 0
    done: int | None = None
    total: int | None = None
    extra: dict[str, object] = field(default_factory=dict)


RouterHook = Callable[[RouterEvent], None]


class LoggingHook:
    """Logs every event on the ``gpujobs.routing`` logger (INFO; failures at WARNING)."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self._log = logger or _log

    def __call__(self, event: RouterEvent) -> None:
        level = logging.WARNING if event.kind is EventKind.FAILED else logging.INFO
        parts = [f"job {event.job_id} {event.kind}"]
        if event.runner:
            parts.append(f"on {event.runner}")
        if event.reason:
            parts.append(f"({event.reason})")
        if event.error:
            parts.append(f"error: {event.error_type}: {event.error}")
        if event.cost is not None:
            parts.append(f"cost ${event.cost.usd:.6f}")
        if event.elapsed_s is not None:
            parts.append(f"after {event.elapsed_s:.2f} s")
        self._log.log(level, " ".join(parts))
