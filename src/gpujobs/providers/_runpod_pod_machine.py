"""``RunPodPodMachine``: one RunPod pod, resumed on demand, watched and stopped.

RunPod's REST API (docs.runpod.io, "API reference → Pods", read 2026-11):
``GET https://rest.runpod.io/v1/pods/{podId}`` answers the pod with ``desiredStatus``
(``RUNNING``, ``EXITED``, ``TERMINATED``), ``costPerHr`` (USD per hour, a string in the documented
example), ``adjustedCostPerHr`` (after savings plans, a number) and ``lastStartedAt``;
``POST /v1/pods/{podId}/start`` starts (resumes) a stopped pod and ``POST /v1/pods/{podId}/stop``
stops it, each answering a short JSON message. The newer API reports a finer ``status``
(``PROVISIONING``, ``STARTING``, ``RUNNING``, ``EXITED``, ``ERROR``, ``TERMINATED``): read when
present. Header ``Authorization: Bearer <key>``, sent to RunPod's API only, never to the worker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

import anyio

from gpujobs._errors import (
    CapacityError,
    GpuJobsError,
    InvalidInputError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from gpujobs._http import auth_headers, error_for_response, error_for_wire, parse_json
from gpujobs._polling import Deadline, PollSchedule
from gpujobs._retry import RetryPolicy, call_with_retries
from gpujobs._wire import Wire, WireError

__all__ = ["REST_API", "STARTING_POLL", "RunPodPodMachine"]

REST_API: Final = "https://rest.runpod.io/v1"
#: A pod in these states serves nothing and will not by waiting.
_DEAD: Final = frozenset({"EXITED", "TERMINATED", "ERROR"})
STARTING_POLL: Final = PollSchedule(first_s=0.5, factor=1.5, max_interval_s=5.0)


def _status(pod: Mapping[str, Any]) -> str:
    """The pod's state: the finer ``status`` where the API gives it, else ``desiredStatus``."""
    for key in ("status", "desiredStatus"):
        if isinstance(value := pod.get(key), str) and value:
            return value.upper()
    return "UNKNOWN"


def _price(pod: Mapping[str, Any]) -> float | None:
    for key in ("adjustedCostPerHr", "costPerHr", "cost"):
        value = pod.get(key)
        try:
            price = float(value) if isinstance(value, int | float | str) else None
        except ValueError:
            price = None
        if price is not None and price >= 0:
            return price
    return None


def _started_at(pod: Mapping[str, Any]) -> float | None:
    """``lastStartedAt`` as wall-clock seconds, if it parses."""
    value = pod.get("lastStartedAt")
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


class RunPodPodMachine:
    """One RunPod pod: resumed on demand, watched, stopped. Satisfies ``Machine``.

    Args:
        pod_id: the pod.
        api_key: RunPod API key.
        worker_url: where the worker answers (default: RunPod's proxy for ``port``).
        provider: the runner's name, for errors.
        api_url: RunPod's REST API (an emulator in tests).
        wire: the HTTP seam.
        retry: how idempotent requests are retried.
        poll: how the start is watched.
        request_timeout_s: timeout of one request.
        usd_per_hour: a price to use where RunPod reports none.
    """

    def __init__(
        self,
        pod_id: str,
        *,
        api_key: str,
        worker_url: str,
        provider: str,
        api_url: str = REST_API,
        wire: Wire,
        retry: RetryPolicy,
        poll: PollSchedule = STARTING_POLL,
        request_timeout_s: float = 30.0,
        usd_per_hour: float | None = None,
    ) -> None:
        self.name = f"pod {pod_id}"
        self._pod_url = f"{api_url.rstrip('/')}/pods/{pod_id}"
        self._worker_url = worker_url.rstrip("/")
        self._provider = provider
        self._headers = auth_headers(api_key)
        self._wire = wire
        self._retry = retry
        self._poll = poll
        self._timeout_s = request_timeout_s
        self._usd_per_hour = usd_per_hour
        self._lock = anyio.Lock()
        self._running_since: float | None = None  # wall clock
        self.starts = 0  # start calls this machine sent

    def __repr__(self) -> str:
        return f"RunPodPodMachine({self.name!r})"

    async def _call(
        self, method: str, url: str, *, deadline: Deadline | None = None, runpod: bool = True
    ) -> Any:
        """One request; the key goes to RunPod's API only, never to the worker."""
        timeout = self._timeout_s if deadline is None else deadline.cap(self._timeout_s)
        headers = self._headers if runpod else {}
        try:
            response = await self._wire.request(method, url, headers=headers, timeout=timeout)
        except WireError as exc:
            raise error_for_wire(exc, provider=self._provider) from None
        if 200 <= response.status < 300:  # noqa: PLR2004
            return parse_json(response, provider=self._provider) if response.body else {}
        what = f"{method} {urlsplit(url).path}"
        raise error_for_response(response, what=what, provider=self._provider)

    async def pod(self, deadline: Deadline | None = None) -> Mapping[str, Any]:
        """The pod as RunPod describes it (retried: a look is safe to repeat)."""
        answer = await call_with_retries(
            lambda: self._call("GET", self._pod_url, deadline=deadline),
            policy=self._retry,
            idempotent=True,
            deadline=deadline,
        )
        pod = answer if isinstance(answer, Mapping) else {}
        self._note(pod)
        return pod

    def _note(self, pod: Mapping[str, Any]) -> None:
        if (price := _price(pod)) is not None:
            self._usd_per_hour = price
        if _status(pod) in _DEAD:
            self._running_since = None
        elif self._running_since is None and _status(pod) != "UNKNOWN":
            self._running_since = _started_at(pod) or time.time()

    # -- the Machine protocol ---------------------------------------------------------------

    async def ready(self, deadline: Deadline) -> str:
        """Resume the pod if it is stopped, wait for RUNNING and a ready worker; its URL."""
        async with self._lock:
            pod = await self.pod(deadline)
            status = _status(pod)
            if status == "TERMINATED" or not pod:
                raise ProviderUnavailableError(
                    f"{self.name} is terminated (or unknown): it cannot be resumed",
                    provider=self._provider,
                    retryable=False,
                )
            if status in _DEAD:
                await self._start(deadline)
            await self._until(deadline, self._pod_running)
            await self._until(deadline, self._worker_ready)
            return self._worker_url

    async def _start(self, deadline: Deadline) -> None:
        self.starts += 1
        try:
            # Retried only where RunPod cannot have acted on it (429, no connection); after an
            # answer lost on the way back, the pod itself says whether it started.
            await call_with_retries(
                lambda: self._call("POST", f"{self._pod_url}/start", deadline=deadline),
                policy=self._retry,
                idempotent=False,
                deadline=deadline,
            )
        except (InvalidInputError, ProviderError) as exc:
            if isinstance(exc, RateLimitedError):
                raise
            if getattr(exc, "status_code", 0) is None:
                if _status(await self.pod(deadline)) in _DEAD:
                    raise
                return  # it started: the answer was lost on the way back
            # A refused start is most often a host whose GPUs were rented while it was stopped.
            raise CapacityError(
                f"RunPod could not resume {self.name} ({exc.message}); its host may have no"
                " free GPU left",
                provider=self._provider,
            ) from exc
        self._running_since = time.time()

    async def _pod_running(self, deadline: Deadline) -> bool:
        status = _status(await self.pod(deadline))
        if status in {"ERROR", "TERMINATED"}:
            raise ProviderUnavailableError(
                f"{self.name} went {status} while starting", provider=self._provider
            )
        return status == "RUNNING"

    async def _worker_ready(self, deadline: Deadline) -> bool:
        try:
            health = await self._call(
                "GET", f"{self._worker_url}/health", deadline=deadline, runpod=False
            )
        except ProviderError:
            return False  # the proxy answers 502/404 until the server listens
        status = health.get("status") if isinstance(health, Mapping) else None
        if status == "error":
            raise ProviderUnavailableError(
                f"the worker on {self.name} failed to start: {health.get('error')}",
                provider=self._provider,
                retryable=False,
            )
        return status in {"ready", "busy"}

    async def _until(self, deadline: Deadline, done: Any) -> None:
        intervals = self._poll.intervals()
        while not await done(deadline):
            if deadline.expired:
                raise ProviderUnavailableError(
                    f"{self.name} was not ready in time", provider=self._provider
                )
            await anyio.sleep(deadline.cap(next(intervals)))

    async def check(self) -> bool:
        """Whether RunPod says the pod is still running."""
        return _status(await self.pod()) not in _DEAD

    async def release(self) -> None:
        """Stop the pod (its volume stays, and keeps billing for storage). Idempotent."""
        async with self._lock:
            try:
                await call_with_retries(
                    lambda: self._call("POST", f"{self._pod_url}/stop"),
                    policy=self._retry,
                    idempotent=True,
                )
            except GpuJobsError:
                if _status(await self.pod()) not in _DEAD:
                    raise
            self._running_since = None

    def hourly_usd(self) -> float | None:
        """RunPod's price for the pod (``adjustedCostPerHr``, else ``costPerHr``), USD/h."""
        return self._usd_per_hour

    def uptime_s(self) -> float:
        """Seconds since the pod last started (0 when stopped)."""
        since = self._running_since
        return 0.0 if since is None else max(0.0, time.time() - since)
