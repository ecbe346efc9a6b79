"""HTTP plumbing of the emulators: ASGI replies, faults, rate limits, counters, loopback serving.

Nothing here knows a provider's API; :mod:`gpujobs.testing._runpod_emulator` builds on it.
uvicorn (the ``testing`` extra) is imported only when a server starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import logging
import math
import queue
import random
import threading
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, Protocol, TypeVar

if TYPE_CHECKING:
    import uvicorn

__all__ = ["EmulatorServer", "EmulatorStats", "Faults", "serve", "serve_in_thread"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_BAD_GATEWAY_HTML = b"<html><head><title>502 Bad Gateway</title></head><body>502</body></html>"
_SHUTDOWN_GRACE_S = 2.0  # in-flight requests get this long to finish when a server stops


# -- replies --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """One HTTP response; ``drop`` cuts the connection midway through the body."""

    status: int
    body: bytes
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type: bytes = b"application/json"
    drop: bool = False


def json_reply(status: int, body: Any, headers: tuple[tuple[bytes, bytes], ...] = ()) -> Reply:
    """A JSON reply (values JSON cannot encode are sent as their ``str``)."""
    return Reply(status, json.dumps(body, separators=(",", ":"), default=str).encode(), headers)


def error_reply(status: int, message: str) -> Reply:
    """``{"error": message}`` with ``status``."""
    return json_reply(status, {"error": message})


def retry_after(seconds: float) -> tuple[tuple[bytes, bytes], ...]:
    """A ``Retry-After`` header: whole seconds, or the fraction a fast test asked for."""
    text = str(int(seconds)) if float(seconds).is_integer() else str(seconds)
    return ((b"retry-after", text.encode()),)


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The request body, or ``None`` when it is larger than ``limit`` bytes."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk: bytes = message.get("body", b"")
        size += len(chunk)
        if size <= limit:
            chunks.append(chunk)
        if not message.get("more_body", False):
            break
    # An oversized body is still drained, so the connection stays usable.
    return None if size > limit else b"".join(chunks)


async def send_reply(send: Send, reply: Reply) -> None:
    """Send ``reply``; a dropping one announces more bytes than it sends and never ends."""
    declared = len(reply.body) + (1024 if reply.drop else 0)
    headers = [(b"content-type", reply.content_type),
               (b"content-length", str(declared).encode()), *reply.headers]  # fmt: skip
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    if reply.drop:
        # Returning now leaves the response incomplete: uvicorn closes the connection, and
        # the client sees it cut mid-response (raising before the start would be a 500).
        body = reply.body[: len(reply.body) // 2]
        await send({"type": "http.response.body", "body": body, "more_body": True})
        return
    await send({"type": "http.response.body", "body": reply.body})


# -- faults and rate limits -----------------------------------------------------------------


@dataclass(frozen=True)
class Faults:
    """Random faults, each a probability from 0 to 1; all off by default.

    Request faults (``rate_limit``, ``server_error``, ``drop_connection``, ``slow_response``)
    are drawn per request and fire before the route does its work. ``server_error`` answers 500
    or 503 with a JSON error, or 502 with an HTML page, as a proxy would. Job faults
    (``stuck_in_queue``, ``lose_job``, ``fail_job``, ``timeout_job``) are drawn per submitted job;
    ``expire_results_s`` shortens how long every result is kept. ``seed`` makes the draws
    repeatable. With ``idempotent_routes_only``, server errors, cut connections and slow answers
    hit only requests a client may safely repeat (status, stream, cancel, health, purge-queue),
    while 429s hit every route: the faults a good client rides out without its caller noticing.
    For deterministic one-shot faults use ``RunPodEmulator.inject``.

    Example::

        RunPodEmulator(faults=Faults(seed=1, rate_limit=0.1, server_error=0.05))
    """

    seed: int | None = None
    rate_limit: float = 0.0
    retry_after_s: float = 1.0
    server_error: float = 0.0
    drop_connection: float = 0.0
    slow_response: float = 0.0
    slow_response_s: float = 0.0
    stuck_in_queue: float = 0.0
    lose_job: float = 0.0
    fail_job: float = 0.0
    timeout_job: float = 0.0
    expire_results_s: float | None = None
    idempotent_routes_only: bool = False


@dataclass(frozen=True, slots=True)
class Fault:
    """One fault to apply to one request: its kind and parameters."""

    kind: str
    params: Mapping[str, Any]


@dataclass(slots=True)
class _Injection:
    fault: Fault
    remaining: int


class FaultInjector:
    """Hands out the fault for each request: injected ones first, in order, then random ones."""

    def __init__(self, faults: Faults) -> None:
        self.faults = faults
        self._lock = threading.Lock()  # inject() runs in the test's thread under serve_in_thread
        self._injected: dict[str, deque[_Injection]] = {}

    @property
    def faults(self) -> Faults:
        """The random faults; setting them restarts the dice from their seed."""
        return self._faults

    @faults.setter
    def faults(self, faults: Faults) -> None:
        self._faults = faults
        self._rng = random.Random(faults.seed)  # noqa: S311 - fault dice, not secrets

    def inject(self, route: str, fault: Fault, times: int) -> None:
        """Apply ``fault`` to the next ``times`` requests to ``route``."""
        with self._lock:
            self._injected.setdefault(route, deque()).append(_Injection(fault, times))

    def clear(self) -> None:
        """Forget injected faults that have not fired."""
        with self._lock:
            self._injected.clear()

    def draw(self, chance: float) -> bool:
        """Whether an event of probability ``chance`` happens (no draw for 0)."""
        return chance > 0 and self._rng.random() < chance

    def take(self, route: str, *, idempotent: bool) -> Fault | None:
        """The fault for this request to ``route`` (safe to repeat if ``idempotent``), if any."""
        with self._lock:
            pending = self._injected.get(route)
            if pending:
                injection = pending[0]
                injection.remaining -= 1
                if injection.remaining <= 0:
                    pending.popleft()
                return injection.fault
        return self._random_fault(idempotent=idempotent)

    def _random_fault(self, *, idempotent: bool) -> Fault | None:
        f = self.faults
        if not (f.rate_limit or f.server_error or f.drop_connection or f.slow_response):
            return None
        roll = self._rng.random()
        if roll < f.rate_limit:
            return Fault("rate_limit", {"retry_after_s": f.retry_after_s})
        if f.idempotent_routes_only and not idempotent:
            return None
        return self._harmful_fault(roll - f.rate_limit)

    def _harmful_fault(self, roll: float) -> Fault | None:
        # Faults after which a client cannot tell whether the request was carried out.
        f = self.faults
        if roll < f.server_error:
            status = self._rng.choice((500, 502, 503))
            return Fault("server_error", {"status": status, "html": status == 502})  # noqa: PLR2004
        if roll < f.server_error + f.drop_connection:
            return Fault("drop_connection", {})
        if self.draw(f.slow_response):
            return Fault("slow_response", {"delay_s": f.slow_response_s})
        return None

    def reply(self, fault: Fault, processed: Reply | None, not_found: str) -> Reply:
        """The answer a request fault gives, replacing ``processed`` when the route ran."""
        params = fault.params
        if fault.kind == "rate_limit":
            seconds = float(params.get("retry_after_s", self.faults.retry_after_s))
            return json_reply(429, {"error": "rate limited"}, retry_after(seconds))
        if fault.kind == "lost":
            return error_reply(404, not_found)
        if fault.kind == "drop_connection":
            body = processed.body if processed is not None else b'{"id":"","status":"IN_QUEUE"}'
            return Reply(200, body, drop=True)
        status = int(params.get("status", 500))
        if params.get("html", False):
            return Reply(status, _BAD_GATEWAY_HTML, content_type=b"text/html; charset=utf-8")
        return error_reply(status, str(params.get("message", "internal server error (injected)")))


class RateLimiter:
    """Requests per route per sliding window; over the limit answers 429 with ``Retry-After``."""

    def __init__(self, limits: Mapping[str, int], window_s: float) -> None:
        self._limits = dict(limits)
        self._window_s = window_s
        self._seen: dict[str, deque[float]] = {route: deque() for route in limits}

    def check(self, route: str) -> Reply | None:
        """``None`` when the request may proceed (and is counted), else the 429 reply."""
        limit = self._limits.get(route)
        if limit is None:
            return None
        now = time.monotonic()
        seen = self._seen[route]
        while seen and seen[0] <= now - self._window_s:
            seen.popleft()
        if len(seen) < limit:
            seen.append(now)
            return None
        wait_s = max(1, math.ceil(seen[0] + self._window_s - now))
        return json_reply(429, {"error": "rate limited"}, retry_after(wait_s))


# -- counters -------------------------------------------------------------------------------


@dataclass(frozen=True)
class EmulatorStats:
    """What an emulator saw since it started or since its stats were last reset.

    ``completed_at`` maps job ids to the wall-clock ``time.time()`` at which they became
    terminal, so a client can measure how long a result took to reach its caller. ``cpu_s`` is
    the process's CPU time (the server's alone when it runs in its own process).
    """

    requests: Mapping[str, int]
    responses: Mapping[int, int]
    dropped_connections: int
    jobs_submitted: int
    jobs_completed: int
    jobs_failed: int
    jobs_cancelled: int
    jobs_timed_out: int
    jobs_expired: int
    jobs_purged: int
    cpu_s: float
    wall_s: float
    completed_at: Mapping[str, float]

    @property
    def total_requests(self) -> int:
        """All requests to the provider's routes."""
        return sum(self.requests.values())

    def as_dict(self) -> dict[str, Any]:
        """The stats as JSON-ready data (status codes become strings)."""
        data = dataclasses.asdict(self)
        data["responses"] = {str(code): n for code, n in self.responses.items()}
        return data


class StatsRecorder:
    """Thread-safe counters and per-job records behind :class:`EmulatorStats`."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # read from the test's thread under serve_in_thread
        self.reset()

    def reset(self) -> None:
        """Zero everything and restart the CPU and wall clocks."""
        with self._lock:
            self._requests: Counter[str] = Counter()
            self._responses: Counter[int] = Counter()
            self._counts: Counter[str] = Counter()
            self._records: dict[str, dict[str, Any]] = {}
            self._cpu_start, self._wall_start = time.process_time(), time.monotonic()

    def request(self, route: str) -> None:
        """Count a request to ``route``."""
        with self._lock:
            self._requests[route] += 1

    def response(self, reply: Reply) -> None:
        """Count a response by status code, or a dropped connection."""
        with self._lock:
            if reply.drop:
                self._counts["dropped"] += 1
            else:
                self._responses[reply.status] += 1

    def count(self, key: str, record: dict[str, Any] | None = None, **fields: Any) -> None:
        """Count an event (``"submitted"``, a job status...) and update a job's record."""
        with self._lock:
            self._counts[key] += 1
            if record is not None:
                record.update(fields)

    def add_record(self, record: dict[str, Any]) -> None:
        """Keep a job's record (a dict with an ``"id"`` the caller goes on updating)."""
        with self._lock:
            self._records[record["id"]] = record

    def update(self, record: dict[str, Any], **fields: Any) -> None:
        """Update a job's record."""
        with self._lock:
            record.update(fields)

    def record(self, job_id: str) -> dict[str, Any] | None:
        """A copy of a job's record."""
        with self._lock:
            found = self._records.get(job_id)
            return None if found is None else dict(found)

    def snapshot(self) -> EmulatorStats:
        """The counters now."""
        with self._lock:
            counts = self._counts
            return EmulatorStats(
                requests=dict(self._requests),
                responses=dict(self._responses),
                dropped_connections=counts["dropped"],
                jobs_submitted=counts["submitted"],
                jobs_completed=counts["COMPLETED"],
                jobs_failed=counts["FAILED"],
                jobs_cancelled=counts["CANCELLED"],
                jobs_timed_out=counts["TIMED_OUT"],
                jobs_expired=counts["expired"],
                jobs_purged=counts["purged"],
                cpu_s=time.process_time() - self._cpu_start,
                wall_s=time.monotonic() - self._wall_start,
                completed_at={
                    job_id: record["completed_at"]
                    for job_id, record in self._records.items()
                    if record.get("completed_at") is not None
                },
            )


# -- serving --------------------------------------------------------------------------------


class Servable(Protocol):
    """What :func:`serve` needs from an emulator."""

    @property
    def app(self) -> ASGIApp:
        """The ASGI app."""
        ...

    @property
    def base_path(self) -> str:
        """The path clients put after the root URL, e.g. ``/v2/test-endpoint``."""
        ...

    async def start(self) -> None:
        """Start background work in the running loop."""

    async def aclose(self) -> None:
        """Stop background work and wake waiting requests."""


E = TypeVar("E", bound=Servable)


@dataclass(frozen=True)
class EmulatorServer(Generic[E]):
    """An emulator listening on loopback.

    Attributes:
        emulator: The emulator being served (to inject faults or read stats).
        host: The address it listens on.
        port: The port it got.
    """

    emulator: E
    host: str
    port: int

    @property
    def root_url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """The endpoint's base URL, e.g. ``http://127.0.0.1:PORT/v2/test-endpoint``."""
        return self.root_url + self.emulator.base_path


class _HideDroppedConnections(logging.Filter):
    """Hides uvicorn's error for the responses an emulator cuts on purpose, while serving."""

    MESSAGE = "ASGI callable returned without completing response."

    def __init__(self) -> None:
        super().__init__()
        self._users = 0
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.msg != self.MESSAGE

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        logger = logging.getLogger("uvicorn.error")
        with self._lock:
            self._users += 1
            logger.addFilter(self)
        try:
            yield
        finally:
            with self._lock:
                self._users -= 1
                if not self._users:
                    logger.removeFilter(self)


_HIDE_DROPPED = _HideDroppedConnections()


def _import_uvicorn() -> Any:
    try:
        import uvicorn  # noqa: PLC0415 - an optional extra, imported when a server starts
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError(
            "serving an emulator needs uvicorn: pip install 'gpujobs[testing]'"
        ) from exc
    return uvicorn


@contextlib.asynccontextmanager
async def serve(
    emulator: E, *, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[EmulatorServer[E]]:
    """Serve ``emulator`` with uvicorn in the running event loop, on an ephemeral port.

    Example::

        async with serve(RunPodEmulator()) as server:
            await httpx.AsyncClient().post(f"{server.url}/run", json={"input": {}})

    Args:
        emulator: The emulator to serve.
        host: The address to listen on.
        port: The port; 0 picks a free one.

    Yields:
        The running server; its ``url`` is the endpoint's base URL.
    """
    uvicorn_module = _import_uvicorn()
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    config = uvicorn_module.Config(
        emulator.app, host=host, port=port, loop="asyncio", http=http, lifespan="off",
        interface="asgi3", proxy_headers=False,
        log_level="warning", access_log=False, log_config=None,
    )  # fmt: skip
    config.load()
    server: uvicorn.Server = uvicorn_module.Server(config)
    # uvicorn's serve() polls every 0.1 s and sleeps on shutdown; tests start many servers, so
    # run its startup directly and stop it as soon as the in-flight requests have finished.
    server.lifespan = config.lifespan_class(config)
    await emulator.start()
    with _HIDE_DROPPED.installed():
        try:
            try:
                await server.startup()
            except SystemExit as exc:  # uvicorn logs why it could not bind, then exits
                raise OSError(f"the emulator could not listen on {host}:{port}") from exc
            bound_port = server.servers[0].sockets[0].getsockname()[1]
            yield EmulatorServer(emulator, host, bound_port)
        finally:
            # Stop taking requests, then stop the emulator, which answers the waiting
            # /runsync calls, so the last connections drain at once.
            listeners = getattr(server, "servers", [])
            for listener in listeners:
                listener.close()
            for connection in list(server.server_state.connections):
                connection.shutdown()
            await emulator.aclose()
            await _drain(server, listeners)


async def _drain(server: uvicorn.Server, listeners: list[asyncio.Server]) -> None:
    pending = set(server.server_state.tasks)
    if pending:
        _, stuck = await asyncio.wait(pending, timeout=_SHUTDOWN_GRACE_S)
        for task in stuck:
            task.cancel()
        if stuck:
            await asyncio.wait(stuck)
    for listener in listeners:
        await listener.wait_closed()


@contextlib.contextmanager
def serve_in_thread(
    emulator: E, *, host: str = "127.0.0.1", port: int = 0, timeout_s: float = 10.0
) -> Iterator[EmulatorServer[E]]:
    """Serve ``emulator`` from a background thread with its own event loop.

    For synchronous tests and for clients (such as the runpod SDK) that run their own loop.
    ``emulator.inject`` and ``emulator.stats`` are safe to use from the calling thread.

    Example::

        with serve_in_thread(RunPodEmulator()) as server:
            httpx.post(f"{server.url}/run", json={"input": {}})

    Args:
        emulator: The emulator to serve.
        host: The address to listen on.
        port: The port; 0 picks a free one.
        timeout_s: How long to wait for the server to start, and to stop.

    Yields:
        The running server.

    Raises:
        TimeoutError: When the server does not start in time.
    """
    handoff: queue.Queue[
        tuple[EmulatorServer[E], asyncio.AbstractEventLoop, asyncio.Event] | None
    ] = queue.Queue()
    failures: list[BaseException] = []

    async def run() -> None:
        stop = asyncio.Event()
        async with serve(emulator, host=host, port=port) as server:
            handoff.put((server, asyncio.get_running_loop(), stop))
            await stop.wait()

    def main() -> None:
        try:
            asyncio.run(run())
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread below
            failures.append(exc)
            handoff.put_nowait(None)  # wakes the caller

    thread = threading.Thread(target=main, name="gpujobs-emulator", daemon=True)
    thread.start()
    try:
        started = handoff.get(timeout=timeout_s)
    except queue.Empty:
        raise TimeoutError(f"the emulator did not start within {timeout_s} s") from None
    if started is None:
        raise failures[0]
    server, loop, stop = started
    try:
        yield server
    finally:
        loop.call_soon_threadsafe(stop.set)
        thread.join(timeout_s)
        if failures:
            raise failures[0]
