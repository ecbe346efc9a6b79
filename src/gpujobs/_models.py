"""Frozen models for everything that crosses the public API."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["Cost", "Health", "JobHandle", "JobResult", "JobState", "JobStatus", "JobTimings"]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class JobStatus(StrEnum):
    """Where a job stands. Provider statuses are mapped onto these six.

    A status a provider invents later is reported as :attr:`RUNNING` (not terminal), with the
    provider's own word kept in :attr:`JobState.provider_status`; the caller's deadline still
    bounds every wait, so an unknown status never makes polling endless.
    """

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"

    @property
    def is_terminal(self) -> bool:
        """Whether the job can no longer change."""
        return self not in {JobStatus.QUEUED, JobStatus.RUNNING}


class JobHandle(_Frozen):
    """What :meth:`JobRunner.submit` returns: enough to look at, wait for or cancel a job.

    ``provider`` is the ``name`` of the runner that accepted the job. ``submitted_at`` is the
    caller's wall-clock time (``time.time()``) at submission.
    """

    id: str
    provider: str
    submitted_at: float
    idempotency_key: str | None = None


class JobTimings(_Frozen):
    """Where the time went, in seconds.

    ``queue_s`` is the time from submission to the start of execution as the provider reports it
    (RunPod's ``delayTime``: queueing plus any cold start); ``execution_s`` is the time the worker
    spent on the job; ``total_s`` is what the caller saw, from submission to the result in hand.
    ``cold_start`` is ``True``/``False`` where it can be inferred and ``None`` where it cannot.
    """

    queue_s: float | None = None
    execution_s: float | None = None
    total_s: float | None = None
    cold_start: bool | None = None


class Cost(_Frozen):
    """What a job cost, in US dollars, and how that was worked out.

    ``basis`` names the rule: ``"execution"`` (price per second × execution time), ``"free"``
    (in-process runs), and later ``"amortised"``/``"marginal"`` for machines rented by the hour.
    """

    usd: float = Field(ge=0)
    billed_s: float | None = Field(default=None, ge=0)
    usd_per_s: float | None = Field(default=None, ge=0)
    basis: str

    @classmethod
    def of_execution(cls, seconds: float, usd_per_s: float) -> Cost:
        """``usd_per_s`` × ``seconds`` of execution (``basis="free"`` at a zero price)."""
        return cls(
            usd=seconds * usd_per_s,
            billed_s=seconds,
            usd_per_s=usd_per_s,
            basis="execution" if usd_per_s else "free",
        )


class JobState(_Frozen):
    """One look at a job (:meth:`JobRunner.status`): no waiting involved.

    ``output`` may hold a partial result (progress updates) while the job is still running.
    """

    id: str
    provider: str
    status: JobStatus
    provider_status: str
    output: Any = None
    error: Any = None
    timings: JobTimings = JobTimings()


class JobResult(_Frozen):
    """A job that ended, as :meth:`JobRunner.run` and :meth:`JobRunner.wait` return it.

    ``provider`` is the ``name`` of the runner that produced it, so a router's caller sees which
    runner served each job.
    """

    id: str
    provider: str
    status: JobStatus
    output: Any = None
    error: Any = None
    timings: JobTimings = JobTimings()
    cost: Cost | None = None


class Health(_Frozen):
    """A runner's view of its provider (:meth:`JobRunner.health`).

    ``workers`` and ``jobs`` are the provider's counters as it names them (RunPod: ``idle``,
    ``running``, ``initializing``…; ``inQueue``, ``inProgress``…). ``ok`` is ``False`` when the
    provider could not be asked or reports itself unable to take work.
    """

    provider: str
    ok: bool
    workers: dict[str, int] = Field(default_factory=dict)
    jobs: dict[str, int] = Field(default_factory=dict)
    detail: str | None = None
