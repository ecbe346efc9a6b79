"""gpujobs: one async ``JobRunner`` protocol for GPU jobs on rented GPUs.

Example::

    import asyncio
    from gpujobs import RunPodServerless

    async def main() -> None:
        async with RunPodServerless("endpoint-id") as runner:
            results = await asyncio.gather(*(runner.run(p, timeout=300) for p in payloads))

Importing this package does no I/O, reads no environment variable and imports no provider SDK.
"""

from gpujobs._errors import (
    AuthenticationError,
    CapacityError,
    ConfigurationError,
    GpuJobsError,
    InvalidInputError,
    JobCancelledError,
    JobError,
    JobFailedError,
    JobLostError,
    JobTimeoutError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from gpujobs._handler import Handler
from gpujobs._models import Cost, Health, JobHandle, JobResult, JobState, JobStatus, JobTimings
from gpujobs._polling import PollSchedule
from gpujobs._retry import RetryPolicy
from gpujobs._runner import BaseRunner, JobRunner
from gpujobs._sync import SyncRunner
from gpujobs.providers._machine import MachineRunner
from gpujobs.providers.local import LocalRunner
from gpujobs.providers.modal import ModalRunner
from gpujobs.providers.runpod_pod import RunPodPod
from gpujobs.providers.runpod_serverless import RunPodServerless
from gpujobs.providers.vast import VastRunner
from gpujobs.routing import Router

__version__ = "0.1.0.dev0"

__all__ = [
    "AuthenticationError",
    "BaseRunner",
    "CapacityError",
    "ConfigurationError",
    "Cost",
    "GpuJobsError",
    "Handler",
    "Health",
    "InvalidInputError",
    "JobCancelledError",
    "JobError",
    "JobFailedError",
    "JobHandle",
    "JobLostError",
    "JobResult",
    "JobRunner",
    "JobState",
    "JobStatus",
    "JobTimeoutError",
    "JobTimings",
    "LocalRunner",
    "MachineRunner",
    "ModalRunner",
    "PollSchedule",
    "ProviderError",
    "ProviderUnavailableError",
    "RateLimitedError",
    "RetryPolicy",
    "Router",
    "RunPodPod",
    "RunPodServerless",
    "SyncRunner",
    "VastRunner",
    "__version__",
]
