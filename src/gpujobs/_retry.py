"""The one retry policy, built on tenacity, and its one classification function.

A request is retried only when :func:`should_retry` says so:

* never for errors marked non-retryable (authentication, invalid input, a failed job);
* always for a 429 and for errors raised before the request left this process (the connection
  could not be opened): the provider cannot have acted on it;
* for any other retryable error (5xx, a dropped connection, a read timeout) only when the
  request is idempotent. ``POST /run`` is not: a timeout after sending may have queued the job,
  and sending it again could run it twice.

Every retry is bounded in attempts *and* time, jittered, honours ``Retry-After``, and never
sleeps past the caller's deadline.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

import anyio

from gpujobs._errors import GpuJobsError, JobTimeoutError, ProviderError, RateLimitedError
from gpujobs._polling import Deadline

if TYPE_CHECKING:
    from tenacity import RetryCallState

__all__ = ["RetryPolicy", "call_with_retries", "should_retry"]

_log = logging.getLogger("gpujobs")
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How hard to try one request again.

    ``attempts`` counts the first try. Backoff doubles from ``initial_backoff_s`` up to
    ``max_backoff_s`` with ±``jitter`` (a fraction); a provider's ``Retry-After`` replaces it
    when longer. ``max_time_s`` bounds the whole affair, and so does the caller's deadline.
    """

    attempts: int = 3
    max_time_s: float = 30.0
    initial_backoff_s: float = 0.5
    max_backoff_s: float = 8.0
    jitter: float = 0.25

    def backoff(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based), before jitter."""
        return float(min(self.max_backoff_s, self.initial_backoff_s * 2 ** (attempt - 1)))


NO_RETRIES = RetryPolicy(attempts=1)


def should_retry(exc: BaseException, *, idempotent: bool) -> bool:
    """Whether ``exc`` is worth another attempt of the same request."""
    # Job errors (failed, lost, timed out) are about the job, not the request: trying the same
    # request again cannot help.
    if not isinstance(exc, ProviderError) or not exc.retryable:
        return False
    if isinstance(exc, RateLimitedError) or not exc.request_sent:
        return True
    return idempotent


#: Who wants to hear of retries made in this context (a router, to emit ``retried`` events):
#: called with the error, the number of the attempt that failed, and the pause before the next.
retry_observer: ContextVar[Callable[[GpuJobsError, int, float], None] | None] = ContextVar(
    "gpujobs_retry_observer", default=None
)


async def call_with_retries(
    request: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    idempotent: bool,
    deadline: Deadline | None = None,
) -> T:
    """Await ``request()``, trying again as ``policy`` and :func:`should_retry` allow."""
    # Most requests succeed the first time: only a failure pays for building the retry machinery.
    try:
        return await request()
    except GpuJobsError as exc:
        if policy.attempts <= 1 or not should_retry(exc, idempotent=idempotent):
            raise
        first_error = exc
    return await _retry(request, first_error, policy, idempotent, deadline or Deadline(None))


async def queue_job(
    request: Callable[[], Awaitable[T]],
    *,
    policy: RetryPolicy,
    deadline: Deadline,
    provider: str,
) -> T:
    """Send a request that may queue a job, ended at ``deadline``.

    Retried only where it cannot have queued the job (see :func:`should_retry`); a failure
    once the deadline has passed is a timeout. Cap the request's own timeouts by the deadline.
    """
    try:
        return await call_with_retries(request, policy=policy, idempotent=False, deadline=deadline)
    except ProviderError as exc:
        if deadline.expired:
            msg = f"the deadline passed before {provider} answered"
            raise JobTimeoutError(msg, provider=provider) from exc
        raise


async def _retry(
    request: Callable[[], Awaitable[T]],
    first_error: GpuJobsError,
    policy: RetryPolicy,
    idempotent: bool,
    deadline: Deadline,
) -> T:
    # tenacity is loaded with the first failure that may be retried, not with gpujobs.
    from tenacity import (  # noqa: PLC0415
        AsyncRetrying,
        retry_if_exception,
        stop_after_attempt,
        stop_any,
        stop_before_delay,
    )

    def wait(state: RetryCallState) -> float:
        exc = state.outcome.exception() if state.outcome else None
        hint = exc.retry_after if isinstance(exc, GpuJobsError) else None
        base = policy.backoff(state.attempt_number)
        pause = base + random.uniform(-policy.jitter, policy.jitter) * base  # noqa: S311
        return max(pause, hint or 0.0)

    def out_of_time(state: RetryCallState) -> bool:
        # Stop rather than sleep into (or past) the caller's deadline.
        left = deadline.remaining()
        return left is not None and (state.upcoming_sleep or 0.0) >= left

    def log_retry(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        _log.info(
            "retrying after %s (attempt %d, next in %.2fs)",
            type(exc).__name__,
            state.attempt_number,
            state.upcoming_sleep,
        )
        if (observer := retry_observer.get()) is not None and isinstance(exc, GpuJobsError):
            observer(exc, state.attempt_number, state.upcoming_sleep or 0.0)

    bounds = stop_any(stop_after_attempt(policy.attempts), stop_before_delay(policy.max_time_s))
    retrying = AsyncRetrying(
        stop=lambda state: bounds(state) or out_of_time(state),
        wait=wait,
        retry=retry_if_exception(lambda exc: should_retry(exc, idempotent=idempotent)),
        before_sleep=log_retry,
        sleep=anyio.sleep,
        reraise=True,
    )
    replayed = False

    async def attempt() -> T:
        # The first attempt already failed: replay its error so tenacity counts and waits for it.
        # (A coroutine function: tenacity awaits only what it recognises as one, not a lambda.)
        nonlocal replayed
        if not replayed:
            replayed = True
            raise first_error
        return await request()

    return await retrying(attempt)
