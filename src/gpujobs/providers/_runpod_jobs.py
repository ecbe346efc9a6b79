"""RunPod's job JSON and its mapping onto gpujobs' models (shared by RunPod's runners)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Final

from pydantic import BaseModel, ConfigDict

from gpujobs._models import JobStatus

__all__ = ["STATUSES", "RunPodJob", "clamp_ms", "counters", "worker_error"]

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
