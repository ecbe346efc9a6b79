"""A RunPod Serverless endpoint emulated in-process: queue, cold-starting workers, HTTP API.

Wire format as documented at https://docs.runpod.io/serverless/endpoints/operations and
``/send-requests`` (read 2026-11): ``/v2/{endpoint_id}/run``, ``/runsync?wait=ms``,
``/status/{id}``, ``/stream/{id}``, ``/cancel/{id}``, ``/retry/{id}``, ``/purge-queue``,
``/health``; 10 MB / 20 MB payload limits; results kept 30 min after ``/run`` and 1 min after
``/runsync``; per-route rate limits per 10 s. Handler semantics follow the runpod SDK 1.12
(``runpod/serverless/modules/rp_job.py``): an exception becomes a JSON ``error`` string, a
returned dict with a truthy ``"error"`` fails the job, a generator's chunks are streamed and
aggregated into the output. Extras for tests and benchmarks, kept out of the counts:
``GET /_emulator/stats``, ``GET /_emulator/jobs/{id}``, ``POST /_emulator/reset-stats``.

The app is raw ASGI on the standard library, so that benchmarks measure clients rather than a
web framework.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import math
import threading
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs

from gpujobs._handler import invoke_handler
from gpujobs.testing._emulator_server import (
    ASGIApp,
    EmulatorStats,
    Fault,
    FaultInjector,
    Faults,
    RateLimiter,
    Receive,
    Reply,
    Scope,
    Send,
    StatsRecorder,
    error_reply,
    json_reply,
    read_body,
    send_reply,
)
from gpujobs.testing.handlers import scripted_handler

__all__ = ["DEFAULT_RATE_LIMITS", "RunPodEmulator"]

IN_QUEUE, IN_PROGRESS, COMPLETED = "IN_QUEUE", "IN_PROGRESS", "COMPLETED"
FAILED, CANCELLED, TIMED_OUT = "FAILED", "CANCELLED", "TIMED_OUT"
_TERMINAL: Final = frozenset({COMPLETED, FAILED, CANCELLED, TIMED_OUT})
_MIB: Final = 1024 * 1024
# route -> (method, whether the path ends in a job id)
_ROUTES: Final[Mapping[str, tuple[str, bool]]] = {
    "run": ("POST", False), "runsync": ("POST", False), "status": ("GET", True),
    "stream": ("GET", True), "cancel": ("POST", True), "retry": ("POST", True),
    "purge-queue": ("POST", False), "health": ("GET", False),
}  # fmt: skip
DEFAULT_RATE_LIMITS: Final[Mapping[str, int]] = {
    "run": 1000, "runsync": 2000, "status": 2000, "stream": 2000, "cancel": 100, "purge-queue": 2,
}  # fmt: skip
# Routes a client may repeat without harm (the random faults of Faults.idempotent_routes_only).
_IDEMPOTENT: Final = frozenset({"status", "stream", "cancel", "health", "purge-queue"})
_JOB_FAULTS: Final = frozenset({"stuck_in_queue", "lose_job", "fail_job", "timeout_job"})
_FAULT_PARAMS: Final[Mapping[str, frozenset[str]]] = {
    "rate_limit": frozenset({"retry_after_s"}),
    "server_error": frozenset({"status", "html", "message", "after_processing"}),
    "drop_connection": frozenset({"after_processing"}),
    "slow_response": frozenset({"delay_s"}),
    "lost": frozenset(),
    **{name: frozenset() for name in _JOB_FAULTS},
}
_UNSET: Final[Any] = object()  # no output/error (yet), as distinct from a None output
_NOT_FOUND: Final = "request does not exist"
_Outcome = tuple[str, Any, Any]  # status, output, error


@dataclass(frozen=True, slots=True)
class _Request:
    route: str
    job_id: str | None
    body: bytes | None  # None: over the payload limit
    query: str
    job_fault: str | None


@dataclass(eq=False, slots=True)
class _Worker:
    id: str
    state: str = "idle"  # idle | initializing | running
    warm_until: float = -math.inf


@dataclass(eq=False, slots=True)
class _Job:
    id: str
    input: Any
    route: str
    execution_timeout_s: float
    ttl_s: float
    submitted: float
    fault: str | None
    record: dict[str, Any]
    done: asyncio.Event = field(default_factory=asyncio.Event)
    status: str = IN_QUEUE
    output: Any = _UNSET
    error: Any = _UNSET
    delay_ms: int | None = None
    execution_ms: int | None = None
    worker_id: str | None = None
    task: asyncio.Task[_Outcome] | None = None
    chunks: list[Any] = field(default_factory=list)  # streamed, not yet fetched by /stream
    finished: float | None = None
    expires: float = math.inf
    timer: asyncio.TimerHandle | None = None

    def as_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"id": self.id, "status": self.status}
        if self.delay_ms is not None:
            body["delayTime"] = self.delay_ms
        if self.execution_ms is not None:
            body["executionTime"] = self.execution_ms
        if self.output is not _UNSET:
            body["output"] = self.output
        if self.error is not _UNSET:
            body["error"] = self.error
        if self.worker_id is not None:
            body["workerId"] = self.worker_id
        return body


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


def _policy_s(policy: Any, key: str, default_ms: float) -> float | None:
    value = policy.get(key, default_ms) if isinstance(policy, dict) else None
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        return None
    return float(value) / 1000


def _injected_failure(job: Mapping[str, Any]) -> Any:  # noqa: ARG001 - a handler's signature
    raise RuntimeError("emulator: injected job failure")


class RunPodEmulator:
    """A RunPod Serverless endpoint in this process, speaking RunPod's HTTP API.

    Serve it with ``async with serve(emulator) as server`` (or ``serve_in_thread``) and point a
    client at ``server.url``; :attr:`app` is the ASGI app for any other server.

    Example::

        emulator = RunPodEmulator(workers=4, cold_start_s=0.05)
        async with serve(emulator) as server:
            emulator.inject("status", "rate_limit", retry_after_s=0.1)
            ...  # a client against server.url

    Args:
        handler: Called like a RunPod handler with ``{"id", "input"}``: a sync function (run in a
            thread) or async function, or a sync or async generator (its chunks are streamed and
            the output is the list of them). A ``progress`` keyword parameter, when present,
            gets a callable that sets the running job's partial output.
        endpoint_id: The ``{endpoint_id}`` in ``/v2/{endpoint_id}/...``.
        workers: How many jobs run at once.
        cold_start_s: Time a cold worker spends initializing before its first job.
        idle_timeout_s: A worker idle longer than this is cold again.
        api_key: When set, requests need ``Authorization: Bearer <key>`` (or the bare key).
        faults: Random faults; see :class:`Faults`.
        rate_limits: Requests per window per route, merged over :data:`DEFAULT_RATE_LIMITS`;
            ``None`` lifts a route's limit.
        rate_limit_window_s: The sliding window of the rate limits.
        result_ttl_s: How long results of ``/run`` jobs are kept after they finish.
        runsync_result_ttl_s: The same for ``/runsync`` jobs.
        max_payload_bytes: Largest ``/run`` body.
        max_runsync_payload_bytes: Largest ``/runsync`` body.
        runsync_default_wait_ms: ``/runsync`` wait without ``?wait=``.
        runsync_wait_limits_ms: The range ``?wait=`` is clamped to.
    """

    def __init__(
        self,
        handler: Callable[..., Any] = scripted_handler,
        *,
        endpoint_id: str = "test-endpoint",
        workers: int = 2,
        cold_start_s: float = 0.0,
        idle_timeout_s: float = 5.0,
        api_key: str | None = None,
        faults: Faults | None = None,
        rate_limits: Mapping[str, int | None] | None = None,
        rate_limit_window_s: float = 10.0,
        result_ttl_s: float = 1800.0,
        runsync_result_ttl_s: float = 60.0,
        max_payload_bytes: int = 10 * _MIB,
        max_runsync_payload_bytes: int = 20 * _MIB,
        runsync_default_wait_ms: int = 90_000,
        runsync_wait_limits_ms: tuple[int, int] = (1000, 300_000),
    ) -> None:
        if workers < 1:
            raise ValueError("workers must be at least 1")
        self.endpoint_id = endpoint_id
        self._handler = handler
        self._api_key = api_key
        self._faults = FaultInjector(faults or Faults())
        self._cold_start_s, self._idle_timeout_s = cold_start_s, idle_timeout_s
        limits = {**DEFAULT_RATE_LIMITS, **(rate_limits or {})}
        self._rate_limits = {route: n for route, n in limits.items() if n is not None}
        self._window_s = rate_limit_window_s
        self._result_ttl_s, self._runsync_result_ttl_s = result_ttl_s, runsync_result_ttl_s
        self._payload_limits = {"run": max_payload_bytes, "runsync": max_runsync_payload_bytes}
        self._default_wait_ms, self._wait_limits_ms = (
            runsync_default_wait_ms,
            runsync_wait_limits_ms,
        )
        self._workers = [_Worker(f"emulator-worker-{i}") for i in range(workers)]
        self._routes: Mapping[str, Callable[[_Request], Awaitable[Reply]]] = {
            "run": self._submit, "runsync": self._submit, "status": self._status,
            "stream": self._stream, "cancel": self._cancel, "retry": self._retry,
            "purge-queue": self._purge, "health": self._health,
        }  # fmt: skip
        self._stats = StatsRecorder()
        self._totals: Counter[str] = Counter()  # since start, for /health
        self._reset_runtime()

    @property
    def app(self) -> ASGIApp:
        """The ASGI application."""
        return self._asgi

    @property
    def base_path(self) -> str:
        """``/v2/{endpoint_id}``."""
        return f"/v2/{self.endpoint_id}"

    @property
    def worker_ids(self) -> list[str]:
        """The ids that appear as ``workerId`` in job JSON."""
        return [worker.id for worker in self._workers]

    @property
    def faults(self) -> Faults:
        """The random faults in force; assign a new :class:`Faults` to change them."""
        return self._faults.faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults.faults = faults

    # -- lifecycle --------------------------------------------------------------------------

    def _reset_runtime(self) -> None:
        self._started = self._closed = False
        self._jobs: dict[str, _Job] = {}
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._idle = list(reversed(self._workers))  # a stack: the warmest worker is on top
        self._worker_free = asyncio.Event()
        self._closing = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._limiter = RateLimiter(self._rate_limits, self._window_s)

    async def start(self) -> None:
        """Start dispatching jobs in the running event loop (the first request also does)."""
        self._closed = False
        self._ensure_started()

    def _ensure_started(self) -> None:
        if self._started or self._closed:
            return
        self._started = True
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        # One thread per worker for sync handlers, as each RunPod worker runs one job at once
        # (asyncio's default pool is capped by the CPU count).
        self._threads = ThreadPoolExecutor(len(self._workers), "runpod-emulator-worker")
        self._spawn(self._dispatch_jobs())

    async def aclose(self) -> None:
        """Cancel running jobs and workers, answer waiting ``/runsync`` calls, drop all jobs."""
        self._closing.set()
        for job in self._jobs.values():
            job.done.set()
            if job.timer is not None:
                job.timer.cancel()
        tasks = [*self._tasks, *(j.task for j in self._jobs.values() if j.task is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._started:
            # Handlers still running in threads finish there; nothing waits for them.
            self._threads.shutdown(wait=False, cancel_futures=True)
        self._reset_runtime()
        self._closed = True  # requests arriving while the server drains start nothing

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- faults and stats -------------------------------------------------------------------

    def inject(self, route: str, fault: str, times: int = 1, **params: Any) -> None:
        """Make the next ``times`` requests to ``route`` meet ``fault``, before random faults.

        Request faults: ``rate_limit`` (``retry_after_s``), ``server_error`` (``status``=500,
        ``html``=False, ``message``), ``drop_connection``, ``slow_response`` (``delay_s``) and
        ``lost`` (404, routes with a job id). Job faults, on ``run``/``runsync``, for the job
        submitted: ``stuck_in_queue``, ``lose_job``, ``fail_job``, ``timeout_job``. A fault
        fires before the route does any work, unless ``after_processing=True`` (for
        ``server_error`` and ``drop_connection``): then the route runs (``/run`` queues its
        job) and its answer is replaced. Injections on one route fire in the order made.

        Example::

            emulator.inject("status", "rate_limit", times=2, retry_after_s=0.1)
            emulator.inject("run", "drop_connection", after_processing=True)

        Raises:
            ValueError: For an unknown route or fault, or a fault the route cannot have.
            TypeError: For a parameter the fault does not take.
        """
        if route not in _ROUTES:
            raise ValueError(f"unknown route {route!r}; routes: {sorted(_ROUTES)}")
        allowed = _FAULT_PARAMS.get(fault)
        if allowed is None:
            raise ValueError(f"unknown fault {fault!r}; faults: {sorted(_FAULT_PARAMS)}")
        if fault in _JOB_FAULTS and route not in {"run", "runsync"}:
            raise ValueError(f"{fault!r} applies to submissions (run, runsync) only")
        if fault == "lost" and not _ROUTES[route][1]:
            raise ValueError("'lost' applies to routes with a job id only")
        if unknown := set(params) - allowed:
            raise TypeError(f"{fault!r} takes no parameter(s) {sorted(unknown)}")
        if times < 1:
            raise ValueError("times must be at least 1")
        self._faults.inject(route, Fault(fault, params), times)

    def clear_injected(self) -> None:
        """Forget injected faults that have not fired yet."""
        self._faults.clear()

    @property
    def stats(self) -> EmulatorStats:
        """A snapshot of the counters; see :class:`EmulatorStats`."""
        return self._stats.snapshot()

    def reset_stats(self) -> None:
        """Zero the counters of :attr:`stats` and forget the job records."""
        self._stats.reset()

    def job_record(self, job_id: str) -> dict[str, Any] | None:
        """What the emulator recorded about a job: wall-clock times, worker, attempts, fault.

        Records outlive the job's expiry and go with :meth:`reset_stats`.
        """
        return self._stats.record(job_id)

    # -- HTTP -------------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        self._ensure_started()
        if scope["path"].startswith("/_emulator/"):
            await send_reply(send, self._internal(scope["method"], scope["path"]))
            return
        reply = await self._public(scope, receive)
        self._stats.response(reply)
        await send_reply(send, reply)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _match(self, method: str, path: str) -> tuple[str, str | None] | Reply:
        parts = path.split("/")  # ["", "v2", endpoint, route, id?]
        spec = _ROUTES.get(parts[3]) if len(parts) > 3 and parts[:2] == ["", "v2"] else None  # noqa: PLR2004
        if spec is None or len(parts) != 4 + spec[1] or not parts[-1]:
            return error_reply(404, "not found")
        if parts[2] != self.endpoint_id:
            return error_reply(404, "endpoint not found")
        if method != spec[0]:
            return json_reply(405, {"error": "method not allowed"}, ((b"allow", spec[0].encode()),))
        return parts[3], parts[4] if spec[1] else None

    async def _public(self, scope: Scope, receive: Receive) -> Reply:
        found = self._match(scope["method"], scope["path"])
        if isinstance(found, Reply):
            return found
        route, job_id = found
        self._stats.request(route)
        limit = self._payload_limits.get(route, self._payload_limits["run"])
        body = await read_body(receive, limit) if scope["method"] == "POST" else b""
        if not self._authorized(scope):
            return error_reply(401, "Unauthorized")
        fault, job_fault = self._faults.take(route, idempotent=route in _IDEMPOTENT), None
        if fault is not None and fault.kind == "slow_response":
            await self._pause(float(fault.params.get("delay_s", self.faults.slow_response_s)))
            fault = None
        elif fault is not None and fault.kind in _JOB_FAULTS:
            job_fault = fault.kind
            fault = None
        if fault is not None and not fault.params.get("after_processing", False):
            return self._faults.reply(fault, None, _NOT_FOUND)
        if limited := self._limiter.check(route):
            return limited
        query = scope.get("query_string", b"").decode("latin-1")
        reply = await self._routes[route](_Request(route, job_id, body, query, job_fault))
        return reply if fault is None else self._faults.reply(fault, reply, _NOT_FOUND)

    def _authorized(self, scope: Scope) -> bool:
        if self._api_key is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, rest = value.decode("latin-1").strip().partition(" ")
                token = rest.strip() if scheme.lower() == "bearer" else scheme
                return hmac.compare_digest(token.encode(), self._api_key.encode())
        return False

    def _internal(self, method: str, path: str) -> Reply:
        if path == "/_emulator/stats" and method == "GET":
            return json_reply(200, self.stats.as_dict())
        if path == "/_emulator/reset-stats" and method == "POST":
            self.reset_stats()
            return json_reply(200, {"status": "reset"})
        if path.startswith("/_emulator/jobs/") and method == "GET":
            record = self.job_record(path.removeprefix("/_emulator/jobs/"))
            return error_reply(404, _NOT_FOUND) if record is None else json_reply(200, record)
        return error_reply(404, "not found")

    async def _pause(self, seconds: float) -> None:
        # A sleep that ends when the emulator closes, so shutdown never waits on it.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    # -- routes -----------------------------------------------------------------------------

    def _lookup(self, job_id: str | None) -> _Job | None:
        job = self._jobs.get(job_id or "")
        if job is not None and time.monotonic() >= job.expires:
            self._forget(job, "expired")  # the timer may not have fired yet
            return None
        return job

    def _parse_submission(self, request: _Request) -> tuple[Any, float, float, float] | Reply:
        """The input, execution timeout, ttl and /runsync wait (s) of a submission, or a 400."""
        if request.body is None:
            limit = self._payload_limits[request.route]
            return error_reply(400, f"payload too large: /{request.route} takes {limit} bytes")
        try:
            payload = json.loads(request.body)
        except ValueError:
            return error_reply(400, "request body is not valid JSON")
        if not isinstance(payload, dict) or not isinstance(payload.get("input"), dict):
            return error_reply(400, 'request body must be a JSON object with an "input" object')
        policy = payload.get("policy") or {}
        timeout_s = _policy_s(policy, "executionTimeout", 600_000)
        ttl_s = _policy_s(policy, "ttl", 86_400_000)
        if timeout_s is None or ttl_s is None:
            return error_reply(400, "policy.executionTimeout and policy.ttl must be positive ms")
        wait_s = self._runsync_wait_s(request.query) if request.route == "runsync" else 0.0
        if wait_s is None:
            return error_reply(400, "wait must be an integer number of milliseconds")
        return payload["input"], timeout_s, ttl_s, wait_s

    async def _submit(self, request: _Request) -> Reply:
        parsed = self._parse_submission(request)
        if isinstance(parsed, Reply):
            return parsed
        job_input, timeout_s, ttl_s, wait_s = parsed
        job = self._new_job(request, job_input, timeout_s, ttl_s)
        if request.route == "run" or job.id not in self._jobs:
            return json_reply(200, {"id": job.id, "status": IN_QUEUE})
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait_s):
                await job.done.wait()
        if job.status in _TERMINAL:
            return json_reply(200, job.as_json())
        return json_reply(200, {"id": job.id, "status": job.status})

    def _runsync_wait_s(self, query: str) -> float | None:
        values = parse_qs(query).get("wait")
        try:
            wait_ms = int(values[-1]) if values else self._default_wait_ms
        except ValueError:
            return None
        low, high = self._wait_limits_ms
        return min(max(wait_ms, low), high) / 1000

    def _new_job(self, request: _Request, job_input: Any, timeout_s: float, ttl_s: float) -> _Job:
        job_id = f"{uuid.uuid4()}-u1"  # RunPod's ids are UUIDs with a region suffix
        fault = request.job_fault or next(
            (name for name in sorted(_JOB_FAULTS) if self._faults.draw(getattr(self.faults, name))),
            None,
        )
        record: dict[str, Any] = {
            "id": job_id, "route": request.route, "status": IN_QUEUE, "fault": fault,
            "submitted_at": time.time(), "started_at": None, "completed_at": None,
            "worker_id": None, "attempts": 0,
        }  # fmt: skip
        job = _Job(
            job_id, job_input, request.route, timeout_s, ttl_s, time.monotonic(), fault, record
        )
        self._stats.add_record(record)
        self._stats.count("submitted")
        if fault == "lose_job":
            return job  # answered as queued, then never heard of again
        self._jobs[job_id] = job
        self._schedule_expiry(job)
        if fault != "stuck_in_queue":
            self._queue.put_nowait(job)
        return job

    async def _status(self, request: _Request) -> Reply:
        job = self._lookup(request.job_id)
        return error_reply(404, _NOT_FOUND) if job is None else json_reply(200, job.as_json())

    async def _stream(self, request: _Request) -> Reply:
        job = self._lookup(request.job_id)
        if job is None:
            return error_reply(404, _NOT_FOUND)
        chunks, job.chunks = job.chunks, []
        body: dict[str, Any] = {"status": job.status, "stream": [{"output": c} for c in chunks]}
        if job.error is not _UNSET:
            body["error"] = job.error
        return json_reply(200, body)

    async def _cancel(self, request: _Request) -> Reply:
        job = self._lookup(request.job_id)
        if job is None:
            return error_reply(404, _NOT_FOUND)
        if job.status not in _TERMINAL:
            if job.task is not None:
                job.task.cancel()
            self._finish(job, (CANCELLED, _UNSET, _UNSET), None)
        return json_reply(200, {"id": job.id, "status": job.status})

    async def _retry(self, request: _Request) -> Reply:
        job = self._lookup(request.job_id)
        if job is None:
            return error_reply(404, _NOT_FOUND)
        if job.status not in {FAILED, TIMED_OUT}:
            return error_reply(
                400, f"only FAILED or TIMED_OUT jobs can be retried, not {job.status}"
            )
        # Same id, a fresh attempt: the injected fault that failed it is not repeated.
        job.status, job.output, job.error, job.fault = IN_QUEUE, _UNSET, _UNSET, None
        job.delay_ms = job.execution_ms = job.worker_id = job.task = job.finished = None
        job.chunks, job.done, job.submitted = [], asyncio.Event(), time.monotonic()
        self._totals["retried"] += 1
        self._stats.count(
            "retried", job.record, status=IN_QUEUE, started_at=None, completed_at=None
        )
        self._schedule_expiry(job)
        self._queue.put_nowait(job)
        return json_reply(200, {"id": job.id, "status": IN_QUEUE})

    async def _purge(self, _request: _Request) -> Reply:
        queued = [job for job in self._jobs.values() if job.status == IN_QUEUE]
        for job in queued:
            self._forget(job, "purged")
        return json_reply(200, {"removed": len(queued), "status": "completed"})

    async def _health(self, _request: _Request) -> Reply:
        statuses = Counter(job.status for job in self._jobs.values())
        # Cold idle workers are scaled to zero, as RunPod reports them; without a cold start
        # every worker is warm.
        now, always_warm = time.monotonic(), self._cold_start_s <= 0
        states = Counter(
            w.state for w in self._workers if w.state != "idle" or always_warm or w.warm_until > now
        )
        return json_reply(200, {
            "jobs": {"completed": self._totals[COMPLETED], "failed": self._totals[FAILED],
                     "inProgress": statuses[IN_PROGRESS], "inQueue": statuses[IN_QUEUE],
                     "retried": self._totals["retried"]},
            "workers": {"idle": states["idle"], "running": states["running"],
                        "initializing": states["initializing"], "throttled": 0, "unhealthy": 0},
        })  # fmt: skip

    # -- jobs -------------------------------------------------------------------------------

    def _schedule_expiry(self, job: _Job) -> None:
        # Forgotten at ttl after submission, or once its result has been kept long enough.
        job.expires = job.submitted + job.ttl_s
        if job.finished is not None:
            keep_s = self._runsync_result_ttl_s if job.route == "runsync" else self._result_ttl_s
            if self.faults.expire_results_s is not None:
                keep_s = self.faults.expire_results_s
            job.expires = min(job.expires, job.finished + keep_s)
        if job.timer is not None:
            job.timer.cancel()
        delay = max(0.0, job.expires - time.monotonic())
        job.timer = self._loop.call_later(delay, self._forget, job, "expired")

    def _forget(self, job: _Job, reason: str) -> None:
        if self._jobs.get(job.id) is not job:
            return
        del self._jobs[job.id]
        if job.timer is not None:
            job.timer.cancel()
        if job.task is not None:
            job.task.cancel()
        job.done.set()
        self._stats.count(reason)

    def _finish(self, job: _Job, outcome: _Outcome, run_s: float | None) -> None:
        job.status, job.output, job.error = outcome
        job.execution_ms = None if run_s is None else _ms(run_s)
        job.finished = time.monotonic()
        job.done.set()
        self._totals[job.status] += 1
        self._stats.count(job.status, job.record, status=job.status, completed_at=time.time())
        self._schedule_expiry(job)

    def _runnable(self, job: _Job) -> bool:
        return job.status == IN_QUEUE and self._jobs.get(job.id) is job

    async def _dispatch_jobs(self) -> None:
        while True:
            job = await self._queue.get()
            while not self._idle:
                self._worker_free.clear()
                await self._worker_free.wait()
            if self._runnable(job):
                worker = self._idle.pop()
                cold = self._cold_start_s > 0 and time.monotonic() >= worker.warm_until
                worker.state = "initializing" if cold else "running"
                self._spawn(self._serve_job(worker, job, cold=cold))

    async def _serve_job(self, worker: _Worker, job: _Job, *, cold: bool) -> None:
        try:
            if cold:
                await asyncio.sleep(self._cold_start_s)
            if self._runnable(job):
                worker.state = "running"
                await self._execute(worker, job)
        finally:
            worker.state, worker.warm_until = "idle", time.monotonic() + self._idle_timeout_s
            self._idle.append(worker)
            self._worker_free.set()

    async def _execute(self, worker: _Worker, job: _Job) -> None:
        started = time.monotonic()
        job.status, job.worker_id, job.delay_ms = (
            IN_PROGRESS,
            worker.id,
            _ms(started - job.submitted),
        )
        attempts = job.record["attempts"] + 1
        self._stats.update(job.record, status=IN_PROGRESS, started_at=time.time(),
                           worker_id=worker.id, attempts=attempts)  # fmt: skip
        task = job.task = asyncio.ensure_future(self._call_handler(job, worker.id))
        # A "timeout_job" fault hangs and is cut off at once: IN_PROGRESS briefly, then TIMED_OUT.
        timeout = 0.0 if job.fault == "timeout_job" else job.execution_timeout_s
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout)
        except asyncio.CancelledError:
            task.cancel()
            raise
        if not done:
            task.cancel()
            await asyncio.wait((task,))
            outcome: _Outcome = (TIMED_OUT, _UNSET, _UNSET)
        elif task.cancelled():
            return  # /cancel or the job's expiry cancelled it, and settled the job
        else:
            outcome = task.result()
        if job.status == IN_PROGRESS and self._jobs.get(job.id) is job:
            self._finish(job, outcome, time.monotonic() - started)

    async def _call_handler(self, job: _Job, worker_id: str) -> _Outcome:
        if job.fault == "timeout_job":
            await asyncio.Event().wait()  # hangs until its (zero) execution timeout cuts it off
        outcome = await invoke_handler(
            _injected_failure if job.fault == "fail_job" else self._handler,
            {"id": job.id, "input": job.input},
            progress=functools.partial(self._progress, job),
            # /stream swaps job.chunks for a fresh list: look it up at each chunk.
            on_chunk=lambda chunk: job.chunks.append(chunk),  # noqa: PLW0108 - late-bound
            executor=self._threads,
            worker_id=worker_id,
            hostname="runpod-emulator",
        )
        output = outcome.output if outcome.has_output else _UNSET
        if not outcome.failed:
            return COMPLETED, output, _UNSET
        # RunPod sends a handler's error record as a JSON string.
        error = outcome.error
        return FAILED, output, json.dumps(error) if isinstance(error, dict) else error

    def _progress(self, job: _Job, update: Any) -> None:
        if job.status == IN_PROGRESS:
            job.output = update
