"""``RunPodPod``: jobs on a RunPod Pod running the worker's pod server.

The worker listens on port 8000 and is reached through RunPod's proxy,
``https://{pod_id}-8000.proxy.runpod.net``, which cuts any request held longer than ~100 s: jobs
go through the worker's job API (``POST /jobs``, then ``GET /jobs/{id}`` looks held under the
cut), never one request held to the end (see :mod:`gpujobs.providers._machine`).

Lifecycle (:mod:`gpujobs.providers._runpod_pod_machine`): pod state, price, start and stop
through RunPod's REST API, ``https://rest.runpod.io/v1/pods/{podId}``. A stopped pod keeps its
volume (billed) and frees its GPU: a resume can fail when the host's GPUs were rented meanwhile
— reported as :class:`CapacityError`, so a router overflows elsewhere.

Ids go into the URL path only after checking they are plain ids (no query, GraphQL or path
text can be smuggled in).
"""

from __future__ import annotations

import os
import re
import time
from typing import TYPE_CHECKING, Final

from gpujobs._errors import ConfigurationError
from gpujobs._polling import Deadline, PollSchedule
from gpujobs._retry import RetryPolicy
from gpujobs._wire import make_wire
from gpujobs.providers._machine import MachineRunner
from gpujobs.providers._runpod_pod_machine import (
    REST_API,
    STARTING_POLL,
    RunPodPodMachine,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["RunPodPod", "RunPodPodMachine"]

_POD_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class _FixedMachine:
    """A worker at a fixed URL that this runner does not start or stop."""

    always_on = True

    def __init__(self, url: str, usd_per_hour: float | None) -> None:
        self.name = url
        self._url = url.rstrip("/")
        self._usd_per_hour = usd_per_hour
        self._since: float | None = None

    async def ready(self, deadline: Deadline) -> str:
        del deadline
        self._since = self._since or time.time()
        return self._url

    async def check(self) -> bool:
        return True  # nothing to ask: a failing request stays a failing request

    async def release(self) -> None:
        return None

    def hourly_usd(self) -> float | None:
        return self._usd_per_hour

    def uptime_s(self) -> float:
        return 0.0 if self._since is None else time.time() - self._since


class RunPodPod(MachineRunner):
    """Jobs on a RunPod Pod (or any host) running the worker's pod server.

    Example::

        async with RunPodPod("abc123xyz", worker_token=token, idle_stop_s=600) as pod:
            result = await pod.run({"image": b64, "layers": 4}, timeout=600)
            print(result.cost, pod.cost_report())

    With ``pod_id`` the runner resumes a stopped pod on the first job (one resume however many
    jobs arrive at once), waits for the worker's ``/health`` to say ready, and, with
    ``idle_stop_s``, stops the pod after that long with no job. With ``base_url`` it only talks
    to the worker there.

    Args:
        pod_id: the pod to run jobs on. Give this or ``base_url``.
        base_url: a worker's URL (no lifecycle).
        api_key: RunPod API key, for the lifecycle; read from ``RUNPOD_API_KEY`` when not given.
        worker_token: the worker's bearer token (its ``WORKER_API_TOKEN``).
        port: the worker's port on the pod, for the proxy URL.
        worker_url: where the worker answers, instead of RunPod's proxy.
        api_url: RunPod's REST API (an emulator in tests).
        idle_stop_s: stop the pod after this long with no job in flight (``None``: never).
        stop_on_close: stop the pod when the runner closes.
        queue_limit: jobs allowed to wait behind the running one; more raise
            :class:`CapacityError`.
        usd_per_hour: the price, where RunPod's is not read (``base_url``) or to override it.
        name: label of this runner (default ``"runpod-pod"``).
        http_client, retry, poll, request_timeout_s, long_poll_s, start_timeout_s,
            default_timeout_s: as for :class:`gpujobs.MachineRunner` (``long_poll_s``, 50 s by
            default, must stay under the proxy's 100 s cut).
    """

    kind = "runpod-pod"

    def __init__(
        self,
        pod_id: str | None = None,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        worker_token: str | None = None,
        port: int = 8000,
        worker_url: str | None = None,
        api_url: str = REST_API,
        idle_stop_s: float | None = None,
        stop_on_close: bool = False,
        queue_limit: int = 8,
        usd_per_hour: float | None = None,
        name: str | None = None,
        http_client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        poll: PollSchedule | None = None,
        request_timeout_s: float = 30.0,
        long_poll_s: float = 50.0,
        start_timeout_s: float = 900.0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        label = name or self.kind
        if (pod_id is None) == (base_url is None):
            raise ConfigurationError("give either pod_id or base_url", provider=label)
        retry = retry or RetryPolicy()
        machine: RunPodPodMachine | _FixedMachine
        if pod_id is None:
            assert base_url is not None  # noqa: S101 - checked above
            machine = _FixedMachine(base_url, usd_per_hour)
        else:
            if not _POD_ID.match(pod_id):
                raise ConfigurationError(f"not a pod id: {pod_id!r}", provider=label)
            api_key = api_key or os.environ.get("RUNPOD_API_KEY")
            if not api_key:
                msg = "no API key: pass api_key= or set RUNPOD_API_KEY"
                raise ConfigurationError(msg, provider=label)
            self._pod_wire = make_wire(http_client, max_connections=8)
            machine = RunPodPodMachine(
                pod_id,
                api_key=api_key,
                worker_url=worker_url or f"https://{pod_id}-{int(port)}.proxy.runpod.net",
                provider=label,
                api_url=api_url,
                wire=self._pod_wire,
                retry=retry,
                poll=poll or STARTING_POLL,
                request_timeout_s=request_timeout_s,
                usd_per_hour=usd_per_hour,
            )
        self.machine = machine
        super().__init__(
            machine,
            name=name,
            api_token=worker_token,
            queue_limit=queue_limit,
            idle_release_s=idle_stop_s,
            release_on_close=stop_on_close,
            http_client=http_client,
            retry=retry,
            poll=poll,
            request_timeout_s=request_timeout_s,
            long_poll_s=long_poll_s,
            start_timeout_s=start_timeout_s,
            default_timeout_s=default_timeout_s,
        )

    async def aclose(self) -> None:
        """Stop watching the pod (stopping it with ``stop_on_close``); close connections."""
        await super().aclose()
        if (wire := getattr(self, "_pod_wire", None)) is not None:
            await wire.aclose()
