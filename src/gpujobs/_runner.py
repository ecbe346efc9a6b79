"""The :class:`JobRunner` protocol and :class:`BaseRunner`, which every runner builds on.

``BaseRunner`` holds the logic every provider shares and that does no I/O of its own:
``run`` = submit + wait, the caller's deadline carried through both, the remote job cancelled
(shielded) when the deadline passes or the caller's task is cancelled, terminal states turned
into a :class:`JobResult` or the matching exception. A provider implements five small methods.
"""

from __future__ import annotations

import asyncio
import logging
import time
from abc import ABC, abstractmethod
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Protocol, Self, runtime_checkable

import anyio

from gpujobs._errors import (
    GpuJobsError,
    JobCancelledError,
    JobFailedError,
    JobTimeoutError,
)
from gpujobs._models import Cost, Health, JobHandle, JobResult, JobState, JobStatus, JobTimings
from gpujobs._polling import Deadline, PollSchedule, poll_until_terminal

__all__ = ["BaseRunner", "JobRunner"]

_log = logging.getLogger("gpujobs")

#: How long a cancel sent on the way out (timeout, caller cancelled) may take.
_CANCEL_GRACE_S = 10.0


@runtime_checkable
class JobRunner(Protocol):
    """One way to run GPU jobs, whatever the provider.

    Example::

        async with RunPodServerless("endpoint-id") as runner:
            result = await runner.run({"image": b64, "layers": 4}, timeout=300)
            results = await asyncio.gather(*(runner.run(p) for p in payloads))
    """

    @property
    def name(self) -> str:
        """Label of this runner; it becomes :attr:`JobResult.provider`."""
        ...

    async def submit(
        self,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> JobHandle:
        """Queue a job and return at once. ``timeout`` says when the job stops being useful."""
        ...

    async def status(self, handle: JobHandle) -> JobState:
        """One look at the job, no waiting."""
        ...

    async def wait(
        self, handle: JobHandle, *, timeout: float | None = None, cancel_on_timeout: bool = True
    ) -> JobResult:
        """Wait until the job ends; raise as :meth:`run` does."""
        ...

    async def cancel(self, handle: JobHandle) -> None:
        """Cancel the job at the provider. Cancelling an ended job is not an error."""
        ...

    async def run(
        self,
        payload: Mapping[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> JobResult:
        """Submit and wait. Raises :class:`JobFailedError`, :class:`JobTimeoutError`..."""
        ...

    async def health(self) -> Health:
        """The provider's view of its workers and queue."""
        ...

    async def aclose(self) -> None:
        """Release connections; jobs already submitted keep running at the provider."""
        ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class BaseRunner(ABC):
    """Shared behaviour of all runners. Subclasses implement the ``_``-prefixed primitives.

    Args:
        name: label of this runner (default: the provider's kind, e.g. ``"runpod-serverless"``).
        default_timeout_s: the deadline used when a caller passes none: every wait is bounded.
        poll: how :meth:`wait` spaces its looks at the job.
    """

    kind: str = "runner"
    #: A runner whose ``_start`` already ends by the deadline (raising ``JobTimeoutError``)
    #: spares the extra timer ``run`` would otherwise put around it.
    _start_honours_deadline: bool = False

    def __init__(
        self,
        *,
        name: str | None = None,
        default_timeout_s: float = 3600.0,
        poll: PollSchedule | None = None,
    ) -> None:
        self._name = name or self.kind
        self._default_timeout_s = default_timeout_s
        self._poll = poll or PollSchedule()
        self._by_idempotency_key: dict[str, JobHandle] = {}

    @property
    def name(self) -> str:
        """Label of this runner; it becomes :attr:`JobResult.provider`."""
        return self._name

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self._name!r})"

    # -- what a provider implements --------------------------------------------------------

    @abstractmethod
    async def _submit(self, payload: Mapping[str, Any], deadline: Deadline) -> JobHandle:
        """Queue the job once. Never retried blindly: it may double-run."""

    @abstractmethod
    async def _look(self, handle: JobHandle) -> JobState:
        """One look at the job, without retries (the polling loop is the retry layer)."""

    @abstractmethod
    async def _cancel(self, handle: JobHandle) -> None:
        """Cancel the job at the provider."""

    @abstractmethod
    async def health(self) -> Health:
        """The provider's view of its workers and queue."""

    def _cost(self, state: JobState) -> Cost | None:
        """What the ended job cost; ``None`` where the runner cannot tell."""
        del state
        return None

    async def _start(
        self, payload: Mapping[str, Any], deadline: Deadline
    ) -> tuple[JobHandle, JobState | None]:
        """Start a job for :meth:`run`; a runner with a fast path may return its end state too."""
        return await self._submit(payload, deadline), None

    async def _await_terminal(self, handle: JobHandle, deadline: Deadline) -> JobState:
        """Wait for the job's terminal state; raise :class:`JobTimeoutError` at the deadline."""
        return await poll_until_terminal(
            lambda: self._look(handle),
            deadline=deadline,
            schedule=self._poll,
            job_id=handle.id,
            provider=self.name,
        )

    async def aclose(self) -> None:
        """Release connections; jobs already submitted keep running at the provider."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- shared behaviour ------------------------------------------------------------------

    def _deadline(self, timeout: float | None) -> Deadline:
        return Deadline.after(self._default_timeout_s if timeout is None else timeout)

    async def submit(
        self,
        payload: Mapping[str, Any],
        *,
        idempotency_key: str | None = None,
        timeout: float | None = None,
    ) -> JobHandle:
        """Queue a job and return at once.

        A second submit with the same ``idempotency_key`` returns the first job's handle instead
        of queueing another. ``timeout`` is how long the job stays useful; runners carry it into
        the provider's own limits (RunPod's ``ttl`` and ``executionTimeout``).
        """
        if idempotency_key is not None and idempotency_key in self._by_idempotency_key:
            return self._by_idempotency_key[idempotency_key]
        handle = await self._submit(payload, self._deadline(timeout))
        return self._remember(handle, idempotency_key)

    def _remember(self, handle: JobHandle, idempotency_key: str | None) -> JobHandle:
        if idempotency_key is None:
            return handle
        handle = handle.model_copy(update={"idempotency_key": idempotency_key})
        self._by_idempotency_key[idempotency_key] = handle
        return handle

    async def status(self, handle: JobHandle) -> JobState:
        """One look at the job, no waiting."""
        return await self._look(handle)

    async def cancel(self, handle: JobHandle) -> None:
        """Cancel the job at the provider. Cancelling an ended job is not an error."""
        await self._cancel(handle)

    async def wait(
        self, handle: JobHandle, *, timeout: float | None = None, cancel_on_timeout: bool = True
    ) -> JobResult:
        """Wait until the job ends and return its result.

        Raises:
            JobFailedError: the job failed in the worker (``.error`` holds the worker's error).
            JobTimeoutError: ``timeout`` passed (the remote job is cancelled first unless
                ``cancel_on_timeout`` is false) or the provider timed the job out.
            JobCancelledError: the job was cancelled.
            JobLostError: the provider no longer knows the job.
        """
        return await self._finish(handle, self._deadline(timeout), None, cancel_on_timeout)

    async def run(
        self,
        payload: Mapping[str, Any],
        *,
        timeout: float | None = None,
        idempotency_key: str | None = None,
    ) -> JobResult:
        """Submit a job and wait for its result; raises as :meth:`wait` does.

        If the caller's task is cancelled while waiting, the remote job is cancelled too, so
        nobody pays for abandoned work.
        """
        deadline = self._deadline(timeout)
        if idempotency_key is not None and idempotency_key in self._by_idempotency_key:
            handle, state = self._by_idempotency_key[idempotency_key], None
        else:
            handle, state = await self._start_within(payload, deadline)
            handle = self._remember(handle, idempotency_key)
        return await self._finish(handle, deadline, state, cancel_on_timeout=True)

    async def _start_within(
        self, payload: Mapping[str, Any], deadline: Deadline
    ) -> tuple[JobHandle, JobState | None]:
        """:meth:`_start`, cut off at the deadline however long the provider holds the request.

        A fast path (one held request) has no job id to cancel until it answers; the deadline
        was carried into the provider's own limits, which stop the job there.
        """
        if deadline.at is None or self._start_honours_deadline:
            return await self._start(payload, deadline)
        try:
            async with asyncio.timeout_at(deadline.at):
                return await self._start(payload, deadline)
        except TimeoutError:
            msg = "the deadline passed before the provider answered"
            raise JobTimeoutError(msg, provider=self.name) from None

    async def _finish(
        self,
        handle: JobHandle,
        deadline: Deadline,
        state: JobState | None,
        cancel_on_timeout: bool,
    ) -> JobResult:
        try:
            if state is None or not state.status.is_terminal:
                state = await self._await_terminal(handle, deadline)
        except JobTimeoutError:
            if cancel_on_timeout:
                await self._cancel_quietly(handle)
            raise
        except anyio.get_cancelled_exc_class():
            await self._cancel_quietly(handle)
            raise
        return self._result(handle, state)

    async def _cancel_quietly(self, handle: JobHandle) -> None:
        """Cancel on the way out; shielded, bounded, and never masking the original error."""
        with anyio.move_on_after(_CANCEL_GRACE_S, shield=True):
            try:
                await self._cancel(handle)
            except GpuJobsError as exc:
                _log.warning("could not cancel job %s on %s: %s", handle.id, self.name, exc)

    def _result(self, handle: JobHandle, state: JobState) -> JobResult:
        """Turn a terminal state into a result, or raise the error it stands for."""
        total_s = max(0.0, time.time() - handle.submitted_at)
        seen = state.timings
        timings = JobTimings(
            queue_s=seen.queue_s,
            execution_s=seen.execution_s,
            cold_start=seen.cold_start,
            total_s=total_s,
        )
        common: dict[str, Any] = {"provider": self.name, "job_id": handle.id}
        if state.status is JobStatus.COMPLETED:
            return JobResult(
                id=handle.id,
                provider=self.name,
                status=state.status,
                output=state.output,
                timings=timings,
                cost=self._cost(state),
            )
        if state.status is JobStatus.FAILED:
            raise JobFailedError(
                f"the job failed: {_error_message(state.error)}", error=state.error, **common
            )
        if state.status is JobStatus.TIMED_OUT:
            raise JobTimeoutError("the provider timed the job out", **common)
        raise JobCancelledError("the job was cancelled", **common)


def _error_message(error: Any) -> str:
    """The worker's own message out of whatever shape the provider wrapped it in."""
    if isinstance(error, Mapping):
        for key in ("error_message", "message", "error"):
            if error.get(key):
                return str(error[key])
    return str(error) if error is not None else "no error message given"
