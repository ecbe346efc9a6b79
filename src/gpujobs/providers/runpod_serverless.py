"""``RunPodServerless``: jobs on a RunPod Serverless endpoint.

What this module relies on (RunPod's "Send API requests" and "Operation reference" pages):

* base ``https://api.runpod.ai/v2/{endpoint_id}``, header ``Authorization: Bearer <key>``;
* ``POST /run`` → ``{"id", "status": "IN_QUEUE"}``; payload at most 10 MB; results kept 30 min;
* ``POST /runsync?wait=ms`` (1000-300000, default 90000) answers with the finished job, or with a
  non-terminal status and the id once the wait is over; payload at most 20 MB; results kept 1 min;
* ``GET /status/{id}``, ``GET /stream/{id}``, ``POST /cancel/{id}``, ``POST /purge-queue``,
  ``GET /health``; an unknown or expired job answers 404 on ``/status``;
* job JSON ``id, status, output?, error?, delayTime (ms, queue + cold start), executionTime (ms),
  workerId?``; statuses IN_QUEUE, IN_PROGRESS, COMPLETED, FAILED, CANCELLED, TIMED_OUT; a handler
  exception arrives as ``error``, a JSON string holding ``error_message``;
* ``policy``: ``executionTimeout`` (ms, 5 s-7 days) and ``ttl`` (ms, 10 s-7 days, queue plus
  execution).

runpod's own local test server (``handler.py --rp_serve_api``) differs: every route is POST (GET
answers 405, so :meth:`status` switches to POST on a 405), there is no ``/v2/{id}`` prefix, no
``/health`` nor ``/cancel``, and a job queued with ``/run`` runs during the first ``/status``.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import anyio
from pydantic import ValidationError

from gpujobs._errors import (
    ConfigurationError,
    JobLostError,
    JobTimeoutError,
    ProviderError,
)
from gpujobs._http import (
    auth_headers,
    error_for_response,
    error_for_wire,
    parse_json,
)
from gpujobs._models import Cost, Health, JobHandle, JobState, JobStatus, JobTimings
from gpujobs._polling import Deadline, PollSchedule
from gpujobs._retry import RetryPolicy, call_with_retries, queue_job
from gpujobs._runner import BaseRunner
from gpujobs._wire import WireError, WireResponse, make_wire
from gpujobs.providers._runpod_jobs import (
    RUN_MAX_BYTES,
    RUNSYNC_MAX_BYTES,
    STATUSES,
    RunPodJob,
    clamp_ms,
    counters,
    job_body,
    parse_job,
    worker_error,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["RunPodServerless"]

_API: Final = "https://api.runpod.ai/v2"
_RUNSYNC_WAIT_MS: Final = (1_000, 300_000)
#: A held /runsync answers this long before the caller's deadline at the latest.
_RUNSYNC_MARGIN_S: Final = 0.5
#: How long closing waits for cancels of abandoned jobs still going out.
_CLOSE_GRACE_S: Final = 10.0
#: The provider's RunPod caps concurrent /runsync and /status requests per endpoint at 400.
_MAX_CONNECTIONS: Final = 400


class RunPodServerless(BaseRunner):
    """Jobs on a RunPod Serverless endpoint (or any server speaking its API).

    Example::

        async with RunPodServerless("endpoint-id", usd_per_s=0.00076) as runner:
            result = await runner.run({"image": b64, "layers": 4}, timeout=300)
            print(result.output, result.timings.queue_s, result.cost)

    ``run`` takes the fast path: one ``/runsync`` long-poll that usually brings the result back in
    a single request, falling back to polling ``/status`` when the job outlives the wait. Past
    ``max_long_polls`` requests held open at once it submits with ``/run`` and polls instead, so
    thousands of jobs in flight stay within the provider's limit on open requests.

    Args:
        endpoint_id: the endpoint to call at RunPod. Give this or ``endpoint_url``.
        api_key: the API key; read from ``RUNPOD_API_KEY`` when not given.
        endpoint_url: any server speaking the API (an emulator, runpod's local test server).
        name: label of this runner (default ``"runpod-serverless"``).
        usd_per_s: price per second of execution, for :attr:`JobResult.cost`.
        execution_timeout_s: upper bound on a job's execution, sent as ``executionTimeout``;
            the caller's deadline lowers it further.
        low_priority: send ``policy.lowPriority`` (the job never triggers scaling up).
        webhook: a URL RunPod calls with the result.
        cold_start_threshold_s: a job first seen on a worker this runner never saw before, and
            that waited longer than this, is flagged as a cold start.
        http_client: an ``httpx.AsyncClient`` to use instead of building one.
        retry: how requests that may be retried are retried.
        poll: how ``wait`` spaces its looks at ``/status``.
        request_timeout_s: timeout of a single ordinary request.
        max_long_polls: ``/runsync`` requests held open at once before ``run`` polls instead.
        runsync_wait_s: how long one held ``/runsync`` waits (RunPod allows 1-300 s) before
            ``run`` polls on. A caller that gives up on a job before the answer names it leaves
            the job running until then, when it is cancelled: the wait bounds that waste.
        default_timeout_s: the deadline of a ``run``/``wait`` called without one.
    """

    kind = "runpod-serverless"
    _start_honours_deadline = True

    def __init__(
        self,
        endpoint_id: str | None = None,
        *,
        api_key: str | None = None,
        endpoint_url: str | None = None,
        name: str | None = None,
        usd_per_s: float | None = None,
        execution_timeout_s: float | None = None,
        low_priority: bool = False,
        webhook: str | None = None,
        cold_start_threshold_s: float = 5.0,
        http_client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        poll: PollSchedule | None = None,
        request_timeout_s: float = 30.0,
        max_long_polls: int = 300,
        runsync_wait_s: float = 60.0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        super().__init__(name=name, default_timeout_s=default_timeout_s, poll=poll)
        if (endpoint_id is None) == (endpoint_url is None):
            raise ConfigurationError("give either endpoint_id or endpoint_url", provider=self.name)
        if api_key is None:
            api_key = os.environ.get("RUNPOD_API_KEY")
        if endpoint_id is not None and not api_key:
            raise ConfigurationError(
                "no API key: pass api_key= or set RUNPOD_API_KEY", provider=self.name
            )
        self._base_url = (endpoint_url or f"{_API}/{endpoint_id}").rstrip("/")
        self._usd_per_s = usd_per_s
        self._execution_timeout_s = execution_timeout_s
        self._low_priority = low_priority
        self._webhook = webhook
        self._cold_start_threshold_s = cold_start_threshold_s
        self._wire = make_wire(http_client, max_connections=_MAX_CONNECTIONS)
        self._headers = auth_headers(api_key)
        self._json_headers = auth_headers(api_key, **{"Content-Type": "application/json"})
        self._retry = retry or RetryPolicy()
        self._request_timeout_s = request_timeout_s
        self._max_long_polls = max_long_polls
        self._runsync_wait_s = runsync_wait_s
        self._abandoned: set[asyncio.Task[None]] = set()
        self._long_polls = 0
        self._status_method = "GET"
        self._seen_workers: set[str] = set()

    def __repr__(self) -> str:
        return f"RunPodServerless(name={self.name!r}, url={self._base_url!r})"

    # -- HTTP --------------------------------------------------------------------------------

    async def aclose(self) -> None:
        """Close the connections this runner opened (not an ``http_client`` handed in).

        Jobs whose callers gave up while their held request was out are cancelled first, once
        RunPod names them (waiting at most ten seconds; past that they stop at their ``ttl``).
        """
        if self._abandoned:
            with anyio.move_on_after(_CLOSE_GRACE_S, shield=True):
                await asyncio.gather(*self._abandoned, return_exceptions=True)
        await self._wire.aclose()

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        job_id: str | None = None,
        content: bytes | None = None,
        timeout: float | None = None,
        on_abandoned: Callable[[asyncio.Future[WireResponse]], None] | None = None,
    ) -> WireResponse:
        """One request, its errors translated; the 2xx answer."""
        try:
            response = await self._wire.request(
                method,
                self._base_url + path,
                headers=self._json_headers if content is not None else self._headers,
                body=content,
                timeout=self._request_timeout_s if timeout is None else timeout,
                on_abandoned=on_abandoned,
            )
        except WireError as exc:
            raise error_for_wire(exc, provider=self.name, job_id=job_id) from None
        if 200 <= response.status < 300:  # noqa: PLR2004
            return response
        what = f"{method} {path.partition('?')[0]}"
        error = error_for_response(response, what=what, provider=self.name, job_id=job_id)
        if response.status == 404 and job_id is not None:  # noqa: PLR2004
            raise JobLostError(
                "RunPod no longer knows the job (expired or never kept)",
                provider=self.name,
                job_id=job_id,
                retryable=True,
            ) from error
        raise error

    async def _request(self, method: str, path: str, *, job_id: str | None = None) -> Any:
        """One request without a body; the JSON of its 2xx answer."""
        response = await self._exchange(method, path, job_id=job_id)
        return parse_json(response, provider=self.name, job_id=job_id)

    # -- jobs ----------------------------------------------------------------------------------

    def _body(self, payload: Mapping[str, Any], left_s: float | None, max_bytes: int) -> bytes:
        return job_body(
            payload,
            left_s=left_s,
            execution_timeout_s=self._execution_timeout_s,
            low_priority=self._low_priority,
            webhook=self._webhook,
            max_bytes=max_bytes,
            provider=self.name,
        )

    def _handle(self, job: RunPodJob, submitted_at: float) -> JobHandle:
        return JobHandle(id=job.id, provider=self.name, submitted_at=submitted_at)

    async def _queue(self, request: Callable[[], Awaitable[Any]], deadline: Deadline) -> Any:
        """Send a request that queues a job (the request timeouts capped by the deadline)."""
        return await queue_job(request, policy=self._retry, deadline=deadline, provider=self.name)

    async def _submit(self, payload: Mapping[str, Any], deadline: Deadline) -> JobHandle:
        body = self._body(payload, deadline.remaining(), RUN_MAX_BYTES)
        submitted_at = time.time()
        timeout = deadline.cap(self._request_timeout_s)
        answer = await self._queue(
            lambda: self._exchange("POST", "/run", content=body, timeout=timeout), deadline
        )
        return self._handle(parse_job(answer, provider=self.name), submitted_at)

    async def _start(
        self, payload: Mapping[str, Any], deadline: Deadline
    ) -> tuple[JobHandle, JobState | None]:
        # The held request must end before the deadline, so that a job still running then
        # comes back with its id (to cancel it): too little time left for the shortest wait
        # RunPod takes, and the job goes through /run instead.
        left = deadline.remaining()
        held_s = self._runsync_wait_s + _RUNSYNC_MARGIN_S
        wait_s = (held_s if left is None else min(held_s, left)) - _RUNSYNC_MARGIN_S
        if self._long_polls >= self._max_long_polls or wait_s < _RUNSYNC_WAIT_MS[0] / 1000:
            return await self._submit(payload, deadline), None
        body = self._body(payload, left, RUNSYNC_MAX_BYTES)
        wait_ms = clamp_ms(wait_s, _RUNSYNC_WAIT_MS)
        # RunPod answers when the wait is over, before the deadline; the read timeout stops at
        # the deadline whatever the server does (read after encoding: a large body takes time).
        timeout = deadline.cap(wait_ms / 1000 + self._request_timeout_s)
        submitted_at = time.time()
        self._long_polls += 1
        try:
            answer = await self._queue(
                lambda: self._exchange(
                    "POST",
                    f"/runsync?wait={wait_ms}",
                    content=body,
                    timeout=timeout,
                    on_abandoned=self._cancel_abandoned,
                ),
                deadline,
            )
        finally:
            self._long_polls -= 1
        job = parse_job(answer, provider=self.name)
        return self._handle(job, submitted_at), self._state(job)

    def _cancel_abandoned(self, answer: asyncio.Future[WireResponse]) -> None:
        """A /runsync whose caller gave up: once it answers, cancel the job if it still runs."""
        task = asyncio.ensure_future(self._cancel_when_answered(answer))
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def _cancel_when_answered(self, answer: asyncio.Future[WireResponse]) -> None:
        try:
            response = await answer
            job = RunPodJob.model_validate_json(response.body)
        except (WireError, ValidationError, asyncio.CancelledError):
            return  # no answer, or no job in it: nothing to cancel
        taken = 200 <= response.status < 300  # noqa: PLR2004 - a 2xx: RunPod took the job
        if not taken or STATUSES.get(job.status, JobStatus.RUNNING).is_terminal:
            return
        await self._cancel_quietly(
            JobHandle(id=job.id, provider=self.name, submitted_at=time.time())
        )

    def _state(self, job: RunPodJob) -> JobState:
        status = STATUSES.get(job.status, JobStatus.RUNNING)
        return JobState(
            id=job.id,
            provider=self.name,
            status=status,
            provider_status=job.status,
            output=job.output,
            error=worker_error(job.error),
            timings=self._timings(job),
        )

    def _timings(self, job: RunPodJob) -> JobTimings:
        queue_s = None if job.delayTime is None else job.delayTime / 1000
        cold_start = None
        if job.workerId is not None and queue_s is not None:
            seen = job.workerId in self._seen_workers
            cold_start = not seen and queue_s > self._cold_start_threshold_s
            if job.executionTime is not None:
                self._seen_workers.add(job.workerId)
        return JobTimings(
            queue_s=queue_s,
            execution_s=None if job.executionTime is None else job.executionTime / 1000,
            cold_start=cold_start,
        )

    async def _look(self, handle: JobHandle) -> JobState:
        path = f"/status/{handle.id}"
        method = self._status_method
        try:
            answer = await self._exchange(method, path, job_id=handle.id)
        except ProviderError as exc:
            if exc.status_code != 405 or method == "POST":  # noqa: PLR2004
                raise
            # runpod's local test server takes only POST.
            self._status_method = "POST"
            answer = await self._exchange("POST", path, job_id=handle.id)
        return self._state(parse_job(answer, provider=self.name, job_id=handle.id))

    async def status(self, handle: JobHandle) -> JobState:
        """One look at ``/status``, retried within the retry policy."""
        return await call_with_retries(
            lambda: self._look(handle), policy=self._retry, idempotent=True
        )

    async def _cancel(self, handle: JobHandle) -> None:
        try:
            await call_with_retries(
                lambda: self._request("POST", f"/cancel/{handle.id}", job_id=handle.id),
                policy=self._retry,
                idempotent=True,
            )
        except JobLostError:
            return  # nothing left to cancel
        except ProviderError as exc:
            if exc.status_code != 405:  # noqa: PLR2004 - a server without /cancel
                raise

    def _cost(self, state: JobState) -> Cost | None:
        if self._usd_per_s is None or state.timings.execution_s is None:
            return None
        return Cost.of_execution(state.timings.execution_s, self._usd_per_s)

    # -- endpoint ------------------------------------------------------------------------------

    async def health(self) -> Health:
        """``GET /health``: worker and job counters; ``ok=False`` when it cannot be asked."""
        try:
            answer = await call_with_retries(
                lambda: self._request("GET", "/health"), policy=self._retry, idempotent=True
            )
        except ProviderError as exc:
            return Health(provider=self.name, ok=False, detail=str(exc))
        if not isinstance(answer, Mapping):
            return Health(provider=self.name, ok=False, detail="malformed /health answer")
        return Health(
            provider=self.name,
            ok=True,
            workers=counters(answer.get("workers")),
            jobs=counters(answer.get("jobs")),
        )

    async def purge_queue(self) -> int:
        """Remove every job still waiting in the endpoint's queue; returns how many."""
        answer = await call_with_retries(
            lambda: self._request("POST", "/purge-queue"), policy=self._retry, idempotent=True
        )
        removed = answer.get("removed", 0) if isinstance(answer, Mapping) else 0
        return int(removed) if isinstance(removed, int | float) else 0

    async def stream(
        self, handle: JobHandle, *, timeout: float | None = None
    ) -> AsyncIterator[Any]:
        """Yield a generator handler's chunks (``/stream``) as they come, until the job ends.

        Raises as :meth:`wait` does when the job fails or the deadline passes.
        """
        deadline = self._deadline(timeout)
        intervals = self._poll.intervals()
        while True:
            answer = await call_with_retries(
                lambda: self._request("GET", f"/stream/{handle.id}", job_id=handle.id),
                policy=self._retry,
                idempotent=True,
                deadline=deadline,
            )
            if not isinstance(answer, Mapping) or "status" not in answer:
                raise ProviderError(
                    "malformed /stream answer", provider=self.name, job_id=handle.id
                )
            chunks = answer.get("stream") or []
            for chunk in chunks:
                yield chunk.get("output") if isinstance(chunk, Mapping) else chunk
            status = STATUSES.get(str(answer["status"]), JobStatus.RUNNING)
            if status.is_terminal:
                if status is not JobStatus.COMPLETED:
                    state = await self._look(handle)
                    self._result(handle, state)  # raises the matching error
                return
            if deadline.expired:
                await self._cancel_quietly(handle)
                raise JobTimeoutError(
                    "the deadline passed before the job ended", provider=self.name, job_id=handle.id
                )
            if not chunks:
                await anyio.sleep(deadline.cap(next(intervals)))
