"""``RunPodPod``: jobs on a RunPod Pod running the worker's pod server.

The worker listens on port 8000 and is reached through RunPod's proxy,
``https://{pod_id}-8000.proxy.runpod.net``, which cuts any request held longer than ~100 s: jobs
go through the worker's job API (``POST /jobs``, then short ``GET /jobs/{id}`` looks), never one
held request (see :mod:`gpujobs.providers._machine`).

Lifecycle, through RunPod's REST API (docs.runpod.io, "API reference → Pods", read 2026-11):
``GET https://rest.runpod.io/v1/pods/{podId}`` answers the pod with ``desiredStatus``
(``RUNNING``, ``EXITED``, ``TERMINATED``), ``costPerHr`` (USD per hour, sent as a string in the
documented example), ``adjustedCostPerHr`` (after savings plans, a number) and ``lastStartedAt``;
``POST /v1/pods/{podId}/start`` starts (resumes) a stopped pod and ``POST /v1/pods/{podId}/stop``
stops it, each answering a short JSON message. The newer API reports a finer ``status``
(``PROVISIONING``, ``STARTING``, ``RUNNING``, ``EXITED``, ``ERROR``, ``TERMINATED``): read when
present. Header ``Authorization: Bearer <key>``. A stopped pod keeps its volume (billed) and
frees its GPU: a resume can fail when the host's GPUs were rented meanwhile — that is reported as
:class:`CapacityError`, so a router overflows elsewhere.

Ids go into the URL path only after checking they are plain ids (no query, GraphQL or path
text can be smuggled in).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from datetime import datetime
from typing import Any, Final
from urllib.parse import urlsplit

import anyio
import httpx

from gpujobs._errors import (
    CapacityError,
    ConfigurationError,
    GpuJobsError,
    InvalidInputError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
)
from gpujobs._http import auth_headers, error_for_response, error_for_wire, parse_json
from gpujobs._polling import Deadline, PollSchedule
from gpujobs._retry import RetryPolicy, call_with_retries
from gpujobs._wire import Http11Wire, HttpxWire, Wire, WireError
from gpujobs.providers._machine import MachineRunner

__all__ = ["RunPodPod", "RunPodPodMachine"]

_REST: Final = "https://rest.runpod.io/v1"
_POD_ID: Final = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: A pod in these states serves nothing and will not by waiting.
_DEAD: Final = frozenset({"EXITED", "TERMINATED", "ERROR"})
_STARTING_POLL: Final = PollSchedule(first_s=0.5, factor=1.5, max_interval_s=5.0)


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
        api_url: str = _REST,
        wire: Wire,
        retry: RetryPolicy,
        poll: PollSchedule = _STARTING_POLL,
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


class _FixedMachine:
    """A worker at a fixed URL that this runner does not start or stop."""

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
        api_url: str = _REST,
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
            self._pod_wire: Wire = (
                HttpxWire(http_client, owned=False) if http_client else Http11Wire()
            )
            machine = RunPodPodMachine(
                pod_id,
                api_key=api_key,
                worker_url=worker_url or f"https://{pod_id}-{int(port)}.proxy.runpod.net",
                provider=label,
                api_url=api_url,
                wire=self._pod_wire,
                retry=retry,
                poll=poll or _STARTING_POLL,
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
