"""RunPod's job JSON both ways: the request body with its ``policy``, the job in an answer."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, ValidationError

from gpujobs._errors import InvalidInputError, ProviderError
from gpujobs._http import encode_json, parse_json
from gpujobs._models import JobStatus
from gpujobs._wire import WireResponse

__all__ = [
    "RUNSYNC_MAX_BYTES",
    "RUN_MAX_BYTES",
    "STATUSES",
    "RunPodJob",
    "clamp_ms",
    "counters",
    "job_body",
    "parse_job",
    "worker_error",
]

_MB: Final = 1024 * 1024
RUN_MAX_BYTES: Final = 10 * _MB
RUNSYNC_MAX_BYTES: Final = 20 * _MB
_EXECUTION_TIMEOUT_MS: Final = (5_000, 7 * 24 * 3_600_000)
_TTL_MS: Final = (10_000, 7 * 24 * 3_600_000)

STATUSES: Final = {
    "IN_QUEUE": JobStatus.QUEUED,
    "IN_PROGRESS": JobStatus.RUNNING,
    "COMPLETED": JobStatus.COMPLETED,
    "FAILED": JobStatus.FAILED,
    "CANCELLED": JobStatus.CANCELLED,
    "TIMED_OUT": JobStatus.TIMED_OUT,
}


class RunPodJob(BaseModel):
    """A job as RunPod describes it; unknown fields ignored, optional ones may be missing."""

    model_config = ConfigDict(extra="ignore")

    id: str
    status: str
    output: Any = None
    error: Any = None
    delayTime: float | None = None  # noqa: N815 - RunPod's field names
    executionTime: float | None = None  # noqa: N815
    workerId: str | None = None  # noqa: N815


def clamp_ms(seconds: float, bounds: tuple[int, int]) -> int:
    low, high = bounds
    return max(low, min(high, math.ceil(seconds * 1000)))


def job_body(
    payload: Mapping[str, Any],
    *,
    left_s: float | None,
    execution_timeout_s: float | None,
    low_priority: bool,
    webhook: str | None,
    max_bytes: int,
    provider: str,
) -> bytes:
    """The body of ``/run`` or ``/runsync``, refused here when RunPod would refuse it anyway.

    ``left_s`` is the time to the caller's deadline (``None``: none): it bounds the job's
    ``executionTimeout`` and becomes its ``ttl``.
    """
    policy: dict[str, Any] = {}
    limits = [s for s in (execution_timeout_s, left_s) if s is not None]
    if limits:
        policy["executionTimeout"] = clamp_ms(min(limits), _EXECUTION_TIMEOUT_MS)
    if left_s is not None:
        # A job still queued when its caller has given up is worth nothing: let it expire.
        policy["ttl"] = clamp_ms(left_s, _TTL_MS)
    if low_priority:
        policy["lowPriority"] = True
    request: dict[str, Any] = {"input": dict(payload)}
    if policy:
        request["policy"] = policy
    if webhook:
        request["webhook"] = webhook
    body = encode_json(request, provider=provider)
    if len(body) > max_bytes:
        raise InvalidInputError(
            f"the payload is {len(body) / _MB:.1f} MB; this route takes at most "
            f"{max_bytes / _MB:.0f} MB (send large inputs by URL or network volume)",
            provider=provider,
        )
    return body


def parse_job(response: WireResponse, *, provider: str, job_id: str | None = None) -> RunPodJob:
    """The job in a 2xx answer, or a :class:`ProviderError` naming what came instead."""
    # Straight from the bytes: pydantic's JSON parser, no json.loads and dict in between.
    try:
        return RunPodJob.model_validate_json(response.body)
    except ValidationError:
        pass
    # What pydantic's parser refuses and json's takes (a byte-order mark, UTF-16), or garbage.
    try:
        return RunPodJob.model_validate(parse_json(response, provider=provider, job_id=job_id))
    except ValidationError:
        raise ProviderError(
            "RunPod answered with something that is not a job", provider=provider, job_id=job_id
        ) from None


def worker_error(error: Any) -> Any:
    """RunPod sends a handler's exception as a JSON string; hand back the parsed record."""
    if isinstance(error, str) and error.startswith("{"):
        try:
            return json.loads(error)
        except ValueError:
            return error
    return error


def counters(value: Any) -> dict[str, int]:
    """The integer counters of a ``/health`` section (``workers``, ``jobs``); others dropped."""
    if not isinstance(value, Mapping):
        return {}
    return {str(k): int(v) for k, v in value.items() if isinstance(v, int | float)}
