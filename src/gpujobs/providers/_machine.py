"""What RunPod Pods and Vast.ai share: jobs over the worker's job API on one rented machine.

A :class:`Machine` is one machine we rent that runs the worker's pod server
(:mod:`gpujobs.worker.pod`); :class:`MachineRunner` runs jobs on it:

* jobs go through the worker's job API — ``POST /jobs`` (the payload as JSON, our own job id as
  ``Idempotency-Key`` so a retried submit cannot queue the job twice) → 202 ``{"id"}``;
  ``GET /jobs/{id}`` → ``{"id", "status", "output"?, "error"?, "progress"?, "timings"}``;
  ``DELETE /jobs/{id}`` — so a job may outlive any proxy's cut-off on held requests (RunPod's
  proxy: ~100 s). ``wait`` asks ``GET /jobs/{id}?wait=S`` (``long_poll_s``, under the cut-off):
  the worker answers when the job ends, so a job usually costs two requests and its result comes
  back milliseconds after it ends (a worker that ignores ``wait`` is simply polled). A server
  without ``/jobs`` (404/405: a plain seed-style server) gets one held ``POST /inference`` per
  job instead (:mod:`gpujobs.providers._worker_api`);
* one GPU slot at the worker, and a bounded local count of jobs in flight (``1 + queue_limit``):
  past it ``submit`` raises :class:`CapacityError` at once, as does the worker's 503 +
  ``Retry-After`` (never retried here: a router overflows instead of queueing without bound);
* the machine is started on the first job (``Machine.ready``), every concurrent caller sharing
  that one start; it is released (stopped, destroyed) after ``idle_release_s`` with no job in
  flight and a worker that reports itself idle;
* a connection error or 5xx while a job is in flight makes the runner ask ``Machine.check()``;
  a dead machine fails the job with a retryable :class:`ProviderUnavailableError` carrying the job
  id, and the next job calls ``ready()`` again (which may resume or re-rent);
* cost: hourly rate × uptime, reported per job as ``basis="amortised"`` (the bill so far shared
  by the jobs served in this uptime) in :attr:`JobResult.cost`, and by :meth:`cost_report` with
  the marginal cost of one more job (nothing while the machine is up: it bills by the hour
  either way; start-up, execution and idle tail when it must be started for it).

The ``Machine`` implementations: ``RunPodPodMachine`` (:mod:`gpujobs.providers.runpod_pod`) and
``VastMachine`` (:mod:`gpujobs.providers._vast_machine`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final

from gpujobs._errors import (
    CapacityError,
    ConfigurationError,
    JobLostError,
    JobTimeoutError,
    ProviderError,
    ProviderUnavailableError,
)
from gpujobs._http import encode_json
from gpujobs._models import Cost, Health, JobHandle, JobState, JobStatus, JobTimings
from gpujobs._polling import Deadline, PollSchedule, poll_until_terminal
from gpujobs._retry import RetryPolicy
from gpujobs._runner import BaseRunner
from gpujobs.providers._machine_cost import CostBook, MachineCost
from gpujobs.providers._machine_lifecycle import Lifecycle, Machine
from gpujobs.providers._worker_api import (
    NO_JOB_API,
    HeldJobs,
    WorkerApi,
    WorkerJob,
    worker_status,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["Machine", "MachineCost", "MachineRunner"]

_log = logging.getLogger("gpujobs")


#: What a proxy in front of the worker answers to a request held too long (Cloudflare: 524).
_PROXY_TIMEOUT: Final = 524


class _MachineGoneError(ProviderUnavailableError):
    """The machine running the job stopped or died; the job went with it."""


class _Escape(Exception):  # noqa: N818 - carries an error past the polling loop's retries
    def __init__(self, error: _MachineGoneError) -> None:
        super().__init__(str(error))
        self.error = error


class MachineRunner(BaseRunner):
    """Jobs on one rented :class:`Machine` through the worker's job API.

    Concurrency 1 at the worker, at most ``1 + queue_limit`` jobs in flight from this runner
    (more raise :class:`CapacityError`, as does the worker's 503 + ``Retry-After``), the machine
    started on the first job and released after ``idle_release_s`` idle, cost = hourly rate ×
    uptime. See the module docstring for the whole contract.

    Args:
        machine: the machine to run jobs on.
        name: label of this runner (default: the provider's kind).
        api_token: the worker's bearer token (its ``WORKER_API_TOKEN``), if it has one.
        queue_limit: jobs allowed to wait behind the running one.
        idle_release_s: release the machine after this long with no job in flight;
            ``None``: never (a machine you stop yourself).
        release_on_close: release the machine when the runner closes.
        http_client: an ``httpx.AsyncClient`` to use instead of the built-in HTTP client.
        retry: how requests that may be retried are retried.
        poll: how ``wait`` spaces its looks at ``GET /jobs/{id}``.
        request_timeout_s: timeout of a single request to the worker.
        long_poll_s: how long one look at a job may be held by the worker (``?wait=``) while
            ``wait`` waits; keep it under any proxy's cut-off (RunPod's: 100 s). 0: plain polls.
        start_timeout_s: how long starting the machine may take, whoever waits for it.
        default_timeout_s: the deadline of a ``run``/``wait`` called without one.
    """

    kind = "machine"
    _start_honours_deadline = True

    def __init__(
        self,
        machine: Machine,
        *,
        name: str | None = None,
        api_token: str | None = None,
        queue_limit: int = 8,
        idle_release_s: float | None = None,
        release_on_close: bool = False,
        http_client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        poll: PollSchedule | None = None,
        request_timeout_s: float = 30.0,
        long_poll_s: float = 50.0,
        start_timeout_s: float = 900.0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        super().__init__(name=name, default_timeout_s=default_timeout_s, poll=poll)
        self._long_poll_s = long_poll_s
        if queue_limit < 0:
            raise ConfigurationError("queue_limit must be 0 or more", provider=self.name)
        self._machine = machine
        self._queue_limit = queue_limit
        self._idle_release_s = idle_release_s
        self._release_on_close = release_on_close
        self._api = WorkerApi(
            provider=self.name,
            api_token=api_token,
            http_client=http_client,
            retry=retry or RetryPolicy(),
            request_timeout_s=request_timeout_s,
        )
        self._life = Lifecycle(
            machine,
            start_timeout_s=start_timeout_s,
            idle_release_s=idle_release_s,
            in_flight=self._in_flight,
            is_idle=self._worker_idle,
        )
        # job id -> (the machine's run it went to, loop time it stops mattering, cold start)
        self._jobs: dict[str, tuple[int, float | None, bool]] = {}
        self._reserved = 0
        self._held: HeldJobs | None = None  # a plain server: no /jobs
        self._book = CostBook()
        self._checking: asyncio.Future[bool] | None = None

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, machine={self._machine.name!r})"

    async def aclose(self) -> None:
        """Stop watching the machine (releasing it if ``release_on_close``); close connections."""
        if self._held is not None:
            self._held.close()
        await self._life.aclose(release=self._release_on_close)
        await self._api.aclose()

    # -- the machine -----------------------------------------------------------------------

    def _in_flight(self) -> int:
        now = asyncio.get_running_loop().time()
        for job_id, (_, until, _) in list(self._jobs.items()):
            if until is not None and until < now:
                del self._jobs[job_id]  # its caller has given up on it
        return len(self._jobs) + self._reserved

    async def _worker_idle(self) -> bool:
        if (url := self._life.url) is None:
            return True
        try:
            answer = await self._api.health(url, retry=False)
        except ProviderError:
            return True  # a worker that cannot answer has nothing worth keeping it up for
        return answer.get("status") != "busy" and not answer.get("queue_length")

    async def _gone_if_dead(self, exc: ProviderError, job_id: str | None) -> None:
        """After a failed request: raise :class:`_MachineGoneError` if the machine died."""
        if isinstance(exc, CapacityError) or (exc.status_code or 500) < 500:  # noqa: PLR2004
            return
        try:
            alive = await self._check()
        except ProviderError:
            return  # cannot tell: treat the failure as passing
        if alive:
            return
        self._life.forget()
        raise _MachineGoneError(
            f"{self._machine.name} stopped or died while the job was in flight",
            provider=self.name,
            job_id=job_id,
            retryable=True,
        ) from exc

    async def _check(self) -> bool:
        """``Machine.check``, once for however many jobs' requests failed at the same time."""
        if self._checking is None or self._checking.done():
            self._checking = asyncio.ensure_future(self._machine.check())
            self._checking.add_done_callback(_retrieve_error)
        return await asyncio.shield(self._checking)

    async def release(self) -> None:
        """Release the machine now (stop the pod, destroy the instance); idempotent."""
        await self._life.release()

    # -- jobs -------------------------------------------------------------------------------

    async def _submit(self, payload: Mapping[str, Any], deadline: Deadline) -> JobHandle:
        if (in_flight := self._in_flight()) >= 1 + self._queue_limit:
            raise CapacityError(
                f"{in_flight} jobs in flight on {self._machine.name}: the queue is full",
                provider=self.name,
            )
        body = encode_json(dict(payload), provider=self.name)
        job_id = uuid.uuid4().hex
        submitted_at = time.time()
        self._reserved += 1
        try:
            try:
                url, waited = await self._life.ready(deadline)
                # A job that waited for the machine to start met a cold start; a worker that
                # was always up (a fixed URL) never does.
                cold = waited and not getattr(self._machine, "always_on", False)
            except TimeoutError:
                msg = f"{self._machine.name} was not ready before the deadline"
                raise JobTimeoutError(msg, provider=self.name) from None
            generation = self._life.generation
            if self._held is None:
                try:
                    await self._post(url, body, job_id, deadline)
                except ProviderError as exc:
                    if deadline.expired:
                        # Our id names the job even if the worker's answer was lost: cancel it.
                        await self._cancel_quietly(
                            JobHandle(id=job_id, provider=self.name, submitted_at=submitted_at)
                        )
                        msg = "the deadline passed before the worker took the job"
                        raise JobTimeoutError(msg, provider=self.name, job_id=job_id) from exc
                    raise
            if self._held is not None:
                self._held.start(url, body, job_id, deadline)
            self._jobs[job_id] = (generation, deadline.at, cold)
        finally:
            self._reserved -= 1
            self._life.touch()
        return JobHandle(id=job_id, provider=self.name, submitted_at=submitted_at)

    async def _post(self, url: str, body: bytes, job_id: str, deadline: Deadline) -> None:
        try:
            await self._api.post_job(url, body, job_id, deadline)
        except ProviderError as exc:
            if exc.status_code in NO_JOB_API:
                _log.info("%s has no job API: one held POST /inference per job", url)
                self._held = HeldJobs(self._api)
                return
            await self._gone_if_dead(exc, job_id)
            raise

    async def _look(self, handle: JobHandle, *, wait_s: float = 0.0) -> JobState:
        if self._held is not None and handle.id in self._held:
            return self._state(self._held.look(handle.id))
        url = self._url_for(handle.id)
        try:
            job = await self._api.get_job(url, handle.id, wait_s=wait_s)
        except JobLostError:
            self._jobs.pop(handle.id, None)
            raise
        except ProviderError as exc:
            await self._gone_if_dead(exc, handle.id)
            raise
        return self._state(job)

    def _url_for(self, job_id: str) -> str:
        url, tracked = self._life.url, self._jobs.get(job_id)
        if tracked is not None and (url is None or tracked[0] != self._life.generation):
            self._jobs.pop(job_id, None)
            raise _MachineGoneError(
                f"{self._machine.name} was stopped or died while the job was in flight",
                provider=self.name,
                job_id=job_id,
                retryable=True,
            )
        if url is None:
            raise JobLostError(
                f"{self._machine.name} is not running: it holds no jobs",
                provider=self.name,
                job_id=job_id,
            )
        return url

    def _state(self, job: WorkerJob) -> JobState:
        status = worker_status(job.status)
        timings = job.timings or {}
        tracked = self._jobs.get(job.id)
        if status.is_terminal and tracked is not None:
            del self._jobs[job.id]
            self._life.touch()
            if status is JobStatus.COMPLETED:
                self._book.completed(tracked[0], _seconds(timings.get("execution_s")))
        return JobState(
            id=job.id,
            provider=self.name,
            status=status,
            provider_status=job.status,
            # A running job's progress is its partial output, as RunPod shows it.
            output=job.output if job.output is not None or status.is_terminal else job.progress,
            error=job.error,
            timings=JobTimings(
                queue_s=_seconds(timings.get("queue_s")),
                execution_s=_seconds(timings.get("execution_s")),
                cold_start=None if tracked is None else tracked[2],
            ),
        )

    async def _await_terminal(self, handle: JobHandle, deadline: Deadline) -> JobState:
        if self._held is not None and handle.id in self._held:
            try:
                return self._state(await self._held.outcome(handle.id, deadline))
            except TimeoutError:
                msg = "the deadline passed before the job ended"
                raise JobTimeoutError(msg, provider=self.name, job_id=handle.id) from None
            except ProviderError as exc:
                self._jobs.pop(handle.id, None)
                await self._gone_if_dead(exc, handle.id)
                raise

        async def look() -> JobState:
            wait_s = deadline.cap(self._long_poll_s)
            try:
                # One held look per job where the worker can hold it, polls where not.
                return await self._look(handle, wait_s=wait_s)
            except _MachineGoneError as exc:
                raise _Escape(exc) from exc  # no use polling a machine that is gone
            except ProviderError as exc:
                if exc.status_code == _PROXY_TIMEOUT and wait_s > 0:
                    # A proxy cuts held requests sooner than we thought: hold them shorter.
                    self._long_poll_s = wait_s / 2
                raise

        try:
            return await poll_until_terminal(
                look, deadline=deadline, schedule=self._poll, job_id=handle.id, provider=self.name
            )
        except _Escape as escape:
            raise escape.error from None

    async def _cancel(self, handle: JobHandle) -> None:
        self._jobs.pop(handle.id, None)
        self._life.touch()
        if self._held is not None and handle.id in self._held:
            self._held.cancel(handle.id)
            return
        if (url := self._life.url) is not None:  # a stopped machine runs nothing
            await self._api.delete_job(url, handle.id)

    # -- health and cost -------------------------------------------------------------------

    async def health(self) -> Health:
        """The worker's ``GET /health``; a stopped machine is reported, not started."""
        url = self._life.url
        if url is None and getattr(self._machine, "always_on", False):
            url = await self._machine.ready(Deadline(None))  # at hand: nothing to start
        if url is None:
            return Health(
                provider=self.name,
                ok=True,
                workers={"stopped": 1},
                detail=f"{self._machine.name} is not running; the next job starts it",
            )
        try:
            answer = await self._api.health(url)
        except ProviderError as exc:
            return Health(provider=self.name, ok=False, detail=str(exc))
        status = str(answer.get("status", "unknown"))
        queued = answer.get("queue_length")
        error = answer.get("error")
        return Health(
            provider=self.name,
            ok=status in {"ready", "busy"},
            workers={status: 1},
            jobs={
                "inQueue": int(queued) if isinstance(queued, int | float) else 0,
                "inFlight": self._in_flight(),
            },
            detail=error if isinstance(error, str) else None,
        )

    def _cost(self, state: JobState) -> Cost | None:
        del state
        machine = self._machine
        return self._book.amortised(machine.hourly_usd(), machine.uptime_s(), self._life.generation)

    def cost_report(self) -> MachineCost:
        """What the machine costs so far, per job amortised, and one more job's marginal cost."""
        return self._book.report(
            self.name,
            self._machine,
            self._life.generation,
            running=self._life.url is not None,
            start_s=self._life.start_s,
            idle_release_s=self._idle_release_s,
        )


def _seconds(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and value >= 0 else None


def _retrieve_error(done: asyncio.Future[bool]) -> None:
    # Every waiter sees the error; this keeps asyncio from also logging it as never retrieved.
    if not done.cancelled():
        done.exception()
