"""The client side of the worker's pod server (:mod:`gpujobs.worker.pod`), over the wire seam.

``POST /jobs`` (the payload as JSON, ``Idempotency-Key`` = our job id, so resending it cannot
queue the job twice) → 202 ``{"id", "status"}``; ``GET /jobs/{id}`` → ``{"id", "status",
"output"?, "error"?, "progress"?, "timings": {"queue_s", "execution_s"}}`` (``?wait=S``: held
until the job ends, at most ``S`` s); ``DELETE /jobs/{id}``; ``GET /health`` → ``{"status":
"loading"|"ready"|"busy"|"error", "queue_length"}``; ``POST /inference`` for a plain server
without the job API. A full queue answers 503 with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

from gpujobs._errors import CapacityError, InvalidInputError, JobLostError, ProviderError
from gpujobs._http import auth_headers, error_for_response, error_for_wire, parse_json
from gpujobs._models import JobStatus
from gpujobs._polling import Deadline
from gpujobs._retry import RetryPolicy, call_with_retries
from gpujobs._wire import WireError, make_wire

if TYPE_CHECKING:
    import httpx

__all__ = ["NO_JOB_API", "HeldJobs", "WorkerApi", "WorkerJob", "worker_status"]

#: What ``POST /jobs`` answers on a server without the job API.
NO_JOB_API: Final = frozenset({404, 405})
#: A held ``POST /inference`` is allowed this long when the caller gave no deadline.
_HELD_TIMEOUT_S: Final = 3600.0
#: What ``POST /inference`` answers for a job that ran and did not complete.
_JOB_ENDED: Final = {409: "CANCELLED", 500: "FAILED"}


class WorkerJob(BaseModel):
    """A job as the worker describes it; parsed tolerantly."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: str
    output: Any = None
    error: Any = None
    progress: Any = None
    timings: dict[str, Any] | None = None


class WorkerApi:
    """Requests to one worker; errors mapped onto the tree in :mod:`gpujobs._errors`."""

    def __init__(
        self,
        *,
        provider: str,
        api_token: str | None,
        http_client: httpx.AsyncClient | None,
        retry: RetryPolicy,
        request_timeout_s: float,
    ) -> None:
        self._provider = provider
        self._wire = make_wire(http_client, max_connections=32)
        self._headers = auth_headers(api_token)
        self._json_headers = auth_headers(api_token, **{"Content-Type": "application/json"})
        self._retry = retry
        self._timeout_s = request_timeout_s

    async def aclose(self) -> None:
        """Close the connections (not an ``http_client`` handed in)."""
        await self._wire.aclose()

    async def request(
        self,
        method: str,
        url: str,
        path: str,
        *,
        job_id: str | None = None,
        body: bytes | None = None,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> Any:
        """One request; the JSON body of a 2xx answer, else the mapped error."""
        headers = self._json_headers if body is not None else self._headers
        if idempotency_key is not None:
            headers = auth_headers(None, **headers, **{"Idempotency-Key": idempotency_key})
        try:
            response = await self._wire.request(
                method,
                url + path,
                headers=headers,
                body=body,
                timeout=self._timeout_s if timeout is None else timeout,
            )
        except WireError as exc:
            raise error_for_wire(exc, provider=self._provider, job_id=job_id) from None
        if 200 <= response.status < 300:  # noqa: PLR2004
            return parse_json(response, provider=self._provider, job_id=job_id)
        what = f"{method} {path.partition('?')[0]}"
        raise error_for_response(response, what=what, provider=self._provider, job_id=job_id)

    async def post_job(self, url: str, body: bytes, job_id: str, deadline: Deadline) -> None:
        """Queue the job; :class:`CapacityError` at once when the worker's queue is full."""

        async def once() -> Any:
            # A 503 is an answer, not a failure to retry: the caller overflows elsewhere.
            try:
                return await self.request(
                    "POST",
                    url,
                    "/jobs",
                    body=body,
                    job_id=job_id,
                    timeout=deadline.cap(self._timeout_s),
                    idempotency_key=job_id,
                )
            except CapacityError as exc:
                return exc

        # Idempotent: the worker takes our job id as Idempotency-Key.
        answer = await call_with_retries(
            once, policy=self._retry, idempotent=True, deadline=deadline
        )
        if isinstance(answer, CapacityError):
            raise answer

    async def get_job(self, url: str, job_id: str, *, wait_s: float = 0.0) -> WorkerJob:
        """One look at the job (no retries: the polling loop is the retry layer).

        With ``wait_s``, the worker holds its answer until the job ends or ``wait_s`` passes (a
        worker that does not know ``?wait=`` answers at once: the caller polls on).
        """
        path = f"/jobs/{job_id}" + (f"?wait={wait_s:.3f}" if wait_s > 0 else "")
        try:
            answer = await self.request(
                "GET", url, path, job_id=job_id, timeout=self._timeout_s + wait_s
            )
        except ProviderError as exc:
            if exc.status_code == 404:  # noqa: PLR2004
                raise JobLostError(
                    "the worker no longer knows the job (expired or never kept)",
                    provider=self._provider,
                    job_id=job_id,
                ) from exc
            raise
        try:
            return WorkerJob.model_validate(answer)
        except ValidationError:
            msg = "the worker answered with something that is not a job"
            raise ProviderError(msg, provider=self._provider, job_id=job_id) from None

    async def delete_job(self, url: str, job_id: str) -> None:
        """Cancel the job; one already gone is not an error."""
        try:
            await call_with_retries(
                lambda: self.request("DELETE", url, f"/jobs/{job_id}", job_id=job_id),
                policy=self._retry,
                idempotent=True,
            )
        except ProviderError as exc:
            if exc.status_code != 404:  # noqa: PLR2004
                raise

    async def health(self, url: str, *, retry: bool = True) -> Mapping[str, Any]:
        """``GET /health``'s answer (a mapping, possibly empty)."""
        answer = await call_with_retries(
            lambda: self.request("GET", url, "/health"),
            policy=self._retry if retry else RetryPolicy(attempts=1),
            idempotent=True,
        )
        return answer if isinstance(answer, Mapping) else {}

    async def hold(self, url: str, body: bytes, job_id: str, deadline: Deadline) -> WorkerJob:
        """A plain server's job: one held ``POST /inference``, the answer as a job."""
        started = time.monotonic()
        output: Any = None
        error: str | None = None
        try:
            output = await self.request(
                "POST",
                url,
                "/inference",
                body=body,
                job_id=job_id,
                timeout=deadline.cap(_HELD_TIMEOUT_S),
                idempotency_key=job_id,
            )
            status = "COMPLETED"
        except InvalidInputError as exc:  # 422: the worker refused the input
            status, error = "FAILED", exc.message
        except ProviderError as exc:
            if exc.status_code not in _JOB_ENDED:
                raise
            status, error = _JOB_ENDED[exc.status_code], exc.message
        elapsed = round(time.monotonic() - started, 4)
        return WorkerJob(
            id=job_id,
            status=status,
            output=output,
            error=error,
            timings={"queue_s": None, "execution_s": elapsed},
        )


class HeldJobs:
    """A plain server's jobs: one held ``POST /inference`` each, run as a local task."""

    def __init__(self, api: WorkerApi) -> None:
        self._api = api
        self._tasks: dict[str, asyncio.Task[WorkerJob]] = {}

    def __contains__(self, job_id: object) -> bool:
        return job_id in self._tasks

    def start(self, url: str, body: bytes, job_id: str, deadline: Deadline) -> None:
        """Send the job; its answer is awaited in the background."""
        self._tasks[job_id] = asyncio.ensure_future(self._api.hold(url, body, job_id, deadline))

    def look(self, job_id: str) -> WorkerJob:
        """Where the job stands, as far as its held request tells."""
        task = self._tasks[job_id]
        if task.cancelled():
            return WorkerJob(id=job_id, status="CANCELLED")
        if not task.done() or task.exception() is not None:
            return WorkerJob(id=job_id, status="RUNNING")  # a failure is what outcome() raises
        return task.result()

    async def outcome(self, job_id: str, deadline: Deadline) -> WorkerJob:
        """The job's end: ``TimeoutError`` at the deadline, the request's error if it failed."""
        task = self._tasks[job_id]
        try:
            async with asyncio.timeout_at(deadline.at):
                return await asyncio.shield(task)
        finally:
            if task.done():
                del self._tasks[job_id]

    def cancel(self, job_id: str) -> None:
        """Stop waiting (a plain server cannot be told: it finishes the job unseen)."""
        if (task := self._tasks.pop(job_id, None)) is not None:
            task.cancel()

    def close(self) -> None:
        """Stop waiting for every job."""
        for task in self._tasks.values():
            task.cancel()


def worker_status(word: Any) -> JobStatus:
    """The worker's word for a job's status (``GET /jobs/{id}``, Modal's job records).

    The worker speaks :class:`JobStatus`'s own words; one it invents later counts as running.
    """
    try:
        return JobStatus(str(word))
    except ValueError:
        return JobStatus.RUNNING
