"""The exception tree.

Every error gpujobs raises is a :class:`GpuJobsError` and carries ``provider`` (the runner's name),
``job_id`` (when one is known) and ``retryable`` (whether trying again, on this runner or another,
can succeed). ::

    GpuJobsError
    ├── ConfigurationError            bad arguments, missing credentials or extras
    ├── AuthenticationError           401/403: the key is wrong; never retried
    ├── InvalidInputError             the payload is refused (too large, not JSON); never retried
    ├── ProviderError                 the provider misbehaved: 5xx, garbage, dropped connections
    │   ├── RateLimitedError          429, with ``retry_after`` when the provider said so
    │   ├── CapacityError             no free worker or queue slot: overflow elsewhere
    │   └── ProviderUnavailableError  the provider cannot be reached or reports itself down
    └── JobError                      something happened to one job
        ├── JobFailedError            the worker ran the job and it failed (carries ``error``)
        ├── JobTimeoutError           the caller's deadline passed; the remote job was cancelled
        ├── JobCancelledError         the job was cancelled
        └── JobLostError              the provider no longer knows the job (expired, 404)

Messages never contain credentials: exceptions are built from status codes, paths and the
provider's own error text, never from request headers.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AuthenticationError",
    "CapacityError",
    "ConfigurationError",
    "GpuJobsError",
    "InvalidInputError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobLostError",
    "JobTimeoutError",
    "ProviderError",
    "ProviderUnavailableError",
    "RateLimitedError",
]


class GpuJobsError(Exception):
    """Root of every error gpujobs raises."""

    retryable_by_default = False

    def __init__(
        self,
        message: str,
        *,
        provider: str | None = None,
        job_id: str | None = None,
        retryable: bool | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.job_id = job_id
        self.retryable = self.retryable_by_default if retryable is None else retryable
        self.retry_after = retry_after

    def __str__(self) -> str:
        where = ", ".join(
            f"{key}={value}"
            for key, value in (("provider", self.provider), ("job_id", self.job_id))
            if value is not None
        )
        return f"{self.message} ({where})" if where else self.message

    def __repr__(self) -> str:
        name = type(self).__name__
        return f"{name}({self.message!r}, provider={self.provider!r}, job_id={self.job_id!r})"


class ConfigurationError(GpuJobsError):
    """The runner is configured wrongly: a missing key, extra or argument."""


class AuthenticationError(GpuJobsError):
    """The provider refused the credentials (401/403). Never retried."""


class InvalidInputError(GpuJobsError):
    """The payload was refused before or by the provider. Never retried."""


class ProviderError(GpuJobsError):
    """The provider answered with an error or garbage, or the connection failed."""

    retryable_by_default = True

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        request_sent: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(message, **kwargs)
        self.status_code = status_code
        #: ``False`` when the request never left this process (the connection could not be
        #: opened), so the provider cannot have acted on it and sending it again is safe.
        self.request_sent = request_sent


class RateLimitedError(ProviderError):
    """429: too many requests. ``retry_after`` holds the provider's hint in seconds."""


class CapacityError(ProviderError):
    """No free worker or queue slot right now; another runner may have one."""


class ProviderUnavailableError(ProviderError):
    """The provider cannot be reached or reports itself unavailable."""


class JobError(GpuJobsError):
    """Something happened to one job."""


class JobFailedError(JobError):
    """The worker ran the job and it failed. ``error`` is the worker's own message."""

    def __init__(self, message: str, *, error: Any = None, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.error = error


class JobTimeoutError(JobError):
    """The caller's deadline (or the provider's execution timeout) passed before the job ended."""


class JobCancelledError(JobError):
    """The job was cancelled before it ended."""


class JobLostError(JobError):
    """The provider no longer knows the job: its result expired or it was never kept."""

    retryable_by_default = True
