"""HTTP plumbing shared by every runner: status → exception, garbage → exception, secrets.

The requests themselves go through a :mod:`gpujobs._wire` (the transport seam).
"""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any, Final

from gpujobs._errors import (
    AuthenticationError,
    CapacityError,
    GpuJobsError,
    InvalidInputError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from gpujobs._wire import WireError, WireResponse

__all__ = [
    "Secret",
    "SecretHeaders",
    "auth_headers",
    "encode_json",
    "error_for_response",
    "error_for_wire",
    "parse_json",
    "retry_after_s",
]

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


class SecretHeaders(dict[str, str]):
    """Request headers holding a credential; their repr hides every value."""

    def __repr__(self) -> str:
        return "{" + ", ".join(f"{name!r}: {_REDACTED!r}" for name in self) + "}"

    __str__ = __repr__


def auth_headers(api_key: str | None, **extra: str) -> SecretHeaders:
    """``Authorization: Bearer <key>`` (when there is a key) plus ``extra``, hidden from reprs."""
    headers = SecretHeaders(extra)
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    return headers


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


def _provider_message(response: WireResponse) -> str:
    """The provider's own words about an error, short, or the status line."""
    try:
        body = json.loads(response.body)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if isinstance(body.get(key), str):
                return str(body[key])[:500]
    return f"HTTP {response.status} {response.reason}".strip()


def error_for_response(
    response: WireResponse, *, what: str, provider: str, job_id: str | None = None
) -> GpuJobsError:
    """The exception for an HTTP error status. The one place that maps status → exception.

    ``what`` names the request (method and path, never headers or query).
    """
    status = response.status
    what = f"{what}: {_provider_message(response)}"
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


def error_for_wire(exc: WireError, *, provider: str, job_id: str | None = None) -> ProviderError:
    """The exception for a request that got no (complete) answer.

    A connection that could not be opened means the provider never saw the request
    (``request_sent=False``); anything later (a read timeout, a connection cut mid-response) means
    it may have acted on it.
    """
    if not exc.sent:
        return ProviderUnavailableError(
            f"could not connect to the provider ({exc})",
            request_sent=False,
            provider=provider,
            job_id=job_id,
        )
    return ProviderError(
        f"the request got no complete answer ({exc})", provider=provider, job_id=job_id
    )


# One encoder for every body (json.dumps with options builds a new one per call).
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)


def encode_json(payload: Any, *, provider: str) -> bytes:
    """A request body as compact JSON; :class:`InvalidInputError` for what JSON cannot hold."""
    try:
        return _COMPACT.encode(payload).encode()
    except (TypeError, ValueError) as exc:
        msg = f"the payload is not JSON-serialisable: {exc}"
        raise InvalidInputError(msg, provider=provider) from None


def parse_json(response: WireResponse, *, provider: str, job_id: str | None = None) -> Any:
    """The response's JSON body, or a :class:`ProviderError` naming the garbage."""
    try:
        return json.loads(response.body)
    except ValueError:
        snippet = response.body[:80].decode("utf-8", "replace").replace("\n", " ")
        raise ProviderError(
            f"the provider answered {response.status} with a body that is not JSON: {snippet!r}",
            status_code=response.status,
            provider=provider,
            job_id=job_id,
        ) from None
