"""The job server under the pod server: a queue, one slot, and the job API, for any backend.

A :class:`Backend` loads once and runs one job at a time in a :class:`JobServer`;
:func:`gpujobs.worker._job_app.create_job_app` serves it over HTTP:

=========================  ===================================================================
``GET /health``            ``{"status": "loading"|"ready"|"busy"|"error", "queue_length",
                           ...the backend's fields, "error"?}``; never needs the token
``POST /inference``        a job, answered in the same request
``POST /jobs``             a job → 202 ``{"id", "status"}``; for clients behind proxies that cut
                           long requests (RunPod's proxy: ~100 s)
``GET /jobs/{id}``         ``{"id", "status", "output"?, "error"?, "progress"?, "timings"}``;
                           ``?wait=S`` holds the answer until the job ends or ``S`` seconds
                           (at most 60) pass: one request per job instead of a poll loop
``DELETE /jobs/{id}``      cancel: a queued job never runs; a running one is marked CANCELLED at
                           once, stops as soon as the backend can, and its result is dropped
=========================  ===================================================================

One job runs at a time; ``max_queue`` more wait. A full queue answers 503 with ``Retry-After``
(what remains of the running job, from the durations observed so far). Until the backend has
loaded, job routes answer 503 (with ``Retry-After`` while loading). With a token, every route but
``/health`` needs ``Authorization: Bearer <token>`` (compared in constant time). Bodies over
``max_body_bytes`` answer 413. A job id sent as ``Idempotency-Key`` names the job: sending the
same request again returns the same job. Errors are ``{"error": ...}``.

The pod server (:mod:`gpujobs.worker.pod`) serves the inference pipeline with it; the conformance
suite serves ``gpujobs.testing.scripted_handler`` with the same code.
"""

from __future__ import annotations

import logging
import math
import threading
import time
import uuid
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final, Protocol

import anyio

from gpujobs.worker.schemas import MAX_IMAGE_BYTES, InvalidRequest

__all__ = [
    "Backend",
    "JobCancelled",
    "JobFailure",
    "JobServer",
    "JobState",
    "PodSettings",
    "QueueFullError",
    "ServerJob",
    "describe",
]

logger = logging.getLogger("gpujobs.worker.pod")

# base64 grows the image by 4/3; the rest of the request is small.
_DEFAULT_MAX_BODY: Final = MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024
_EWMA_WEIGHT: Final = 0.3


class JobState(StrEnum):
    """Where a pod job stands; the names match :class:`gpujobs.JobStatus`."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


_TERMINAL: Final = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class PodSettings:
    """How the pod server behaves; :meth:`from_env` reads them from the environment.

    Attributes:
        api_token: bearer token required on every route but ``/health``; ``None``: open.
        max_queue: jobs allowed to wait behind the running one; more answer 503.
        result_ttl_s: how long a finished job's result is kept for ``GET /jobs/{id}``.
        max_results: finished jobs kept at most (oldest dropped first), to bound memory.
        default_job_s: a job's expected duration before one was observed (for Retry-After).
        max_body_bytes: largest request body accepted (413 beyond).
        host: address to listen on (:func:`gpujobs.worker.pod.serve`).
        port: port to listen on (:func:`gpujobs.worker.pod.serve`).
        cache_size: recent answers kept for repeated job ids.
    """

    api_token: str | None = None
    max_queue: int = 8
    result_ttl_s: float = 1800.0
    max_results: int = 64
    default_job_s: float = 60.0
    max_body_bytes: int = _DEFAULT_MAX_BODY
    host: str = "0.0.0.0"  # noqa: S104  # a pod serves its proxy and peers, not only itself
    port: int = 8000
    cache_size: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PodSettings:
        """Settings from the environment variables below, each optional.

        ``WORKER_API_TOKEN``, ``MAX_QUEUE``, ``RESULT_TTL_S``, ``HOST``, ``PORT``.

        Raises:
            ValueError: a variable is set to something that is not a number.
        """
        defaults = cls()
        return cls(
            api_token=environ.get("WORKER_API_TOKEN") or None,
            max_queue=int(environ.get("MAX_QUEUE", defaults.max_queue)),
            result_ttl_s=float(environ.get("RESULT_TTL_S", defaults.result_ttl_s)),
            host=environ.get("HOST", defaults.host),
            port=int(environ.get("PORT", defaults.port)),
        )


class JobFailure(Exception):  # noqa: N818 - an outcome, raised by a backend
    """A backend's job failed: ``error`` is what ``GET /jobs/{id}`` shows (any JSON value).

    ``invalid`` marks a failure caused by the client's input (``POST /inference`` answers 422).
    """

    def __init__(self, error: Any, *, invalid: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.invalid = invalid


class JobCancelled(Exception):  # noqa: N818 - an outcome, raised by a backend
    """The backend stopped the job because it was cancelled."""


@dataclass(eq=False)
class ServerJob:
    """One job in the server; a backend reads ``payload`` and reports ``progress``."""

    id: str
    payload: Any
    fingerprint: str | None = None  # set when the client named the job (Idempotency-Key)
    received_at: float = field(default_factory=time.monotonic)
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    output: Any = None
    error: Any = None
    invalid: bool = False  # failed on the client's input (4xx), not on the worker
    progress: Any = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: anyio.Event = field(default_factory=anyio.Event)
    ended: anyio.Event = field(default_factory=anyio.Event)  # terminal state shown (done or not)
    scope: anyio.CancelScope | None = None

    def view(self) -> dict[str, Any]:
        """The job as ``GET /jobs/{id}`` shows it."""
        now = time.monotonic()
        started = self.started_at
        queued_until = started if started is not None else (self.finished_at or now)
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.state.value,
            "timings": {
                "queue_s": round(queued_until - self.received_at, 4),
                "execution_s": (
                    None if started is None else round((self.finished_at or now) - started, 4)
                ),
            },
        }
        if self.progress is not None:
            body["progress"] = self.progress
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


class Backend(Protocol):
    """What the job server runs jobs on."""

    #: Whether cancelling a running job also cancels the task running it (an async backend);
    #: otherwise the backend watches ``job.cancel`` (a thread that stops between steps).
    cancel_by_task: bool

    @property
    def loaded(self) -> bool:
        """Whether :meth:`load` has succeeded."""
        ...

    async def load(self) -> None:
        """Load (once, at start-up); an exception puts the server in the ``error`` state."""
        ...

    async def parse(self, body: bytes) -> Any:
        """The job's payload from a JSON body; raise :class:`InvalidRequest` to refuse it."""
        ...

    def fingerprint(self, payload: Any) -> str:
        """A digest of the payload: equal digests, equal requests."""
        ...

    async def run(self, job: ServerJob) -> Any:
        """Run the job; its output, or :class:`JobFailure` / :class:`JobCancelled`."""
        ...

    def health(self) -> dict[str, Any]:
        """Fields the backend adds to ``GET /health`` (e.g. model, device)."""
        ...


class QueueFullError(Exception):
    """No room in the queue; ``retry_after_s`` estimates when there will be."""

    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class JobServer:
    """The queue and the jobs of one server (no HTTP in here)."""

    def __init__(self, backend: Backend, settings: PodSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.load_error: str | None = None
        self._jobs: dict[str, ServerJob] = {}
        self._queue: deque[ServerJob] = deque()
        self._running: ServerJob | None = None
        self._work = anyio.Event()
        self._observed_job_s: float | None = None

    async def load(self) -> None:
        """Load the backend; a failure is kept for ``/health``."""
        try:
            await self.backend.load()
        except Exception as exc:
            self.load_error = str(exc) or type(exc).__name__
            logger.exception("the worker failed to load; /health reports the error")

    async def run_jobs(self) -> None:
        """Run queued jobs one at a time, forever."""
        while True:
            while not self._queue:
                self._work = anyio.Event()
                await self._work.wait()
            job = self._queue.popleft()
            if job.state is JobState.QUEUED:
                await self._execute(job)

    def stop(self) -> None:
        """Ask every job to stop (the server is going down)."""
        for job in self._jobs.values():
            job.cancel.set()

    def forget_all(self) -> None:
        """Drop every job, stopping the running one: what a restarted container knows."""
        for job in list(self._jobs.values()):
            self.cancel(job)
        self._jobs.clear()
        self._queue.clear()

    async def _execute(self, job: ServerJob) -> None:
        self._running = job
        job.state = JobState.RUNNING
        job.started_at = time.monotonic()
        output: Any = None
        try:
            with anyio.CancelScope() as job.scope:
                output = await self.backend.run(job)
        except JobCancelled:
            self._finish(job, JobState.CANCELLED)
        except (JobFailure, InvalidRequest) as exc:
            invalid = isinstance(exc, InvalidRequest) or getattr(exc, "invalid", False)
            error = exc.error if isinstance(exc, JobFailure) else str(exc)
            self._finish(job, JobState.FAILED, error=error, invalid=invalid)
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            self._finish(job, JobState.FAILED, error=f"the job failed: {describe(exc)}")
        else:
            # Cancelled while its last step ran: the result is dropped, as promised.
            cancelled = job.cancel.is_set() or job.state is JobState.CANCELLED
            if not cancelled:
                job.output = output  # before _finish wakes whoever waits on the job
            self._finish(job, JobState.CANCELLED if cancelled else JobState.COMPLETED)
        finally:
            self._running = None
            job.scope = None
            self._observe(time.monotonic() - job.started_at)

    def _observe(self, seconds: float) -> None:
        previous = self._observed_job_s
        self._observed_job_s = (
            seconds if previous is None else previous + _EWMA_WEIGHT * (seconds - previous)
        )

    def _finish(
        self, job: ServerJob, state: JobState, *, error: Any = None, invalid: bool = False
    ) -> None:
        if job.state not in _TERMINAL:  # DELETE may have marked it CANCELLED already
            job.state = state
            job.error = error
            job.invalid = invalid
        job.finished_at = job.finished_at or time.monotonic()
        job.payload = None  # the picture may weigh 20 MB: drop it now
        job.ended.set()
        job.done.set()

    @property
    def status(self) -> str:
        """``loading``, ``ready``, ``busy`` or ``error``."""
        if self.load_error is not None:
            return "error"
        if not self.backend.loaded:
            return "loading"
        return "busy" if self._running is not None or self.queue_length else "ready"

    @property
    def queue_length(self) -> int:
        """Jobs waiting (not the running one)."""
        return sum(1 for job in self._queue if job.state is JobState.QUEUED)

    def retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: what remains of the running job."""
        per_job = self._observed_job_s or self.settings.default_job_s
        running = self._running
        if running is None or running.started_at is None:
            return max(1, math.ceil(per_job))
        # A slot frees when the running job ends and the first waiting one starts.
        return max(1, math.ceil(max(per_job - (time.monotonic() - running.started_at), 1.0)))

    def get(self, job_id: str) -> ServerJob | None:
        """The job, if still kept."""
        self._purge()
        return self._jobs.get(job_id)

    def submit(self, payload: Any, job_id: str | None) -> ServerJob:
        """Queue a job, or return the job ``job_id`` already names."""
        self._purge()
        fingerprint = None if job_id is None else self.backend.fingerprint(payload)
        if job_id is not None and (known := self._jobs.get(job_id)) is not None:
            if known.fingerprint != fingerprint:
                raise InvalidRequest(
                    f"job id {job_id!r} was already used for a different request; use a new id"
                )
            return known
        # The running job holds the GPU, not a queue slot: max_queue jobs may wait behind it.
        if self.queue_length + (self._running is not None) > self.settings.max_queue:
            raise QueueFullError(self.retry_after_s())
        job = ServerJob(id=job_id or uuid.uuid4().hex, payload=payload, fingerprint=fingerprint)
        self._jobs[job.id] = job
        self._queue.append(job)
        self._work.set()
        return job

    def cancel(self, job: ServerJob) -> None:
        """Cancel a job: a queued one never runs, a running one stops as soon as it can."""
        if job.state in _TERMINAL:
            return
        job.cancel.set()
        if job.state is JobState.QUEUED:
            self._finish(job, JobState.CANCELLED)
            return
        # Running: answered CANCELLED now; it stops after its current step (or at once).
        job.state = JobState.CANCELLED
        job.finished_at = time.monotonic()
        job.ended.set()
        if self.backend.cancel_by_task and job.scope is not None:
            job.scope.cancel()

    def _purge(self) -> None:
        now = time.monotonic()
        ttl = self.settings.result_ttl_s
        finished = [
            job
            for job in self._jobs.values()
            if job.state in _TERMINAL and job.finished_at is not None and job is not self._running
        ]
        finished.sort(key=lambda job: job.finished_at or 0.0)
        excess = len(finished) - self.settings.max_results
        for index, job in enumerate(finished):
            if index < excess or now - (job.finished_at or now) > ttl:
                del self._jobs[job.id]


def describe(exc: BaseException) -> str:
    """``Type: message`` of an exception, without a traceback."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
