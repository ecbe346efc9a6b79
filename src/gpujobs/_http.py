"""HTTP plumbing shared by every runner: the client, status → exception, secret redaction.

All of a runner's HTTP goes through one ``httpx.AsyncClient`` built lazily (building one costs
20-50 ms of CPU for its SSL context) and injectable, so tests can hand in a client bound to an
emulator or a ``respx`` mock.
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any, Final

import httpx

from gpujobs._errors import (
    AuthenticationError,
    CapacityError,
    GpuJobsError,
    InvalidInputError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)

__all__ = ["Secret", "error_for_response", "error_for_transport", "parse_json", "retry_after_s"]

_REDACTED: Final = "***"


class Secret:
    """A credential that never shows itself: ``repr``, ``str`` and f-strings print ``***``."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        """The credential itself, for the one place that sends it."""
        return self._value

    def __repr__(self) -> str:
        return f"Secret({_REDACTED!r})"

    def __str__(self) -> str:
        return _REDACTED

    def __format__(self, spec: str) -> str:
        return _REDACTED

    def __bool__(self) -> bool:
        return bool(self._value)


def retry_after_s(value: str | None) -> float | None:
    """``Retry-After`` in seconds, from either of its forms (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _provider_message(response: httpx.Response) -> str:
    """The provider's own words about an error, short, or the status line."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if isinstance(body.get(key), str):
                return str(body[key])[:500]
    return f"HTTP {response.status_code} {response.reason_phrase}".strip()


def error_for_response(
    response: httpx.Response, *, provider: str, job_id: str | None = None
) -> GpuJobsError:
    """The exception for an HTTP error status. The one place that maps status → exception."""
    status = response.status_code
    what = f"{response.request.method} {response.request.url.path}: {_provider_message(response)}"
    common: dict[str, Any] = {"provider": provider, "job_id": job_id}
    if status in {401, 403}:
        return AuthenticationError(f"the provider refused the credentials ({what})", **common)
    if status == 429:  # noqa: PLR2004 - HTTP status codes read best as numbers
        return RateLimitedError(
            f"rate limited ({what})",
            status_code=status,
            retry_after=retry_after_s(response.headers.get("retry-after")),
            **common,
        )
    if status in {400, 413, 422}:
        return InvalidInputError(f"the provider refused the request ({what})", **common)
    if status == 503:  # noqa: PLR2004
        return CapacityError(
            f"no capacity ({what})",
            status_code=status,
            retry_after=retry_after_s(response.headers.get("retry-after")),
            **common,
        )
    # 5xx and 408 may pass; any other 4xx (404 on a wrong URL, 405...) will not by trying again.
    retryable = status >= 500 or status == 408  # noqa: PLR2004
    return ProviderError(
        f"provider error ({what})", status_code=status, retryable=retryable, **common
    )


def error_for_transport(
    exc: httpx.TransportError, *, provider: str, job_id: str | None = None
) -> ProviderError:
    """The exception for a request that got no (complete) answer.

    A connection that could not be opened means the provider never saw the request
    (``request_sent=False``); anything later (a read timeout, a connection cut mid-response) means
    it may have acted on it.
    """
    not_sent = isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout | httpx.PoolTimeout)
    kind = type(exc).__name__
    if not_sent:
        return ProviderUnavailableError(
            f"could not connect to the provider ({kind})",
            request_sent=False,
            provider=provider,
            job_id=job_id,
        )
    return ProviderError(
        f"the request got no complete answer ({kind})", provider=provider, job_id=job_id
    )


def parse_json(response: httpx.Response, *, provider: str, job_id: str | None = None) -> Any:
    """The response's JSON body, or a :class:`ProviderError` naming the garbage."""
    try:
        return json.loads(response.content)
    except ValueError:
        snippet = response.text[:80].replace("\n", " ")
        raise ProviderError(
            f"the provider answered {response.status_code} with a body that is not JSON: "
            f"{snippet!r}",
            status_code=response.status_code,
            provider=provider,
            job_id=job_id,
        ) from None
