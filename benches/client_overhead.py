"""Client overhead: ``gpujobs.RunPodServerless`` against the runpod SDK's ``AsyncioEndpoint``.

Both clients, and a bare asyncio long-poll client as the floor reference, run the same jobs
against the same RunPod Serverless API emulator (``python -m gpujobs.testing.runpod_emulator``),
served on loopback in its own process. Each client runs in a fresh child process of this script
(``--client gpujobs|sdk|floor``), so its CPU time and peak RSS are its own: the emulator's work is
not counted, nor is another client's import footprint.

Per client and scenario it reports:

- client CPU per job: ``time.process_time()`` of the child around the client's run (building the
  HTTP client and closing it included; importing the client's package excluded, lazy imports on
  first use included), divided by the number of jobs;
- HTTP requests per job: requests to the emulator's API routes (its ``/_emulator/*`` routes
  excluded), from ``GET /_emulator/stats``, divided by the number of jobs;
- latency added after the job is done: for each job, the wall-clock time at which the caller had
  the result minus the emulator's ``completed_at`` for that job (both processes read the same
  host clock); p50 and p95;
- peak RSS of the child (``ru_maxrss``) and its growth during the run.

Job durations are spread evenly around the scenario's (``--spread``, see :class:`Workload`) so a
client polling at a fixed interval is not measured at one lucky phase; ``--repeat`` runs each
client several times, alternating the order, and reports medians. The table, the gpujobs/SDK
ratios and PASS/MISS against the targets (DESIGN.md, "Performance notes") go to stdout, and to
``--output`` as Markdown. See ``benches/README.md``.

Usage::

    PYTHONPATH=src python benches/client_overhead.py                  # 200 x 2 s, 20 x 20 s
    PYTHONPATH=src python benches/client_overhead.py --quick          # smoke check, < 1 min
    PYTHONPATH=src python benches/client_overhead.py --time-factor 0.25 --output bench.md
    PYTHONPATH=src python benches/client_overhead.py --repeat 3 --scenario 400x2s
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import http.client
import io
import json
import math
import os
import platform
import pstats
import re
import resource
import select
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, Self, TextIO, cast

ClientName = Literal["gpujobs", "sdk", "floor"]

CLIENTS: Final[tuple[ClientName, ...]] = ("gpujobs", "sdk", "floor")
CLIENT_LABELS: Final[Mapping[str, str]] = {
    "gpujobs": "gpujobs `RunPodServerless`",
    "sdk": "runpod SDK `AsyncioEndpoint`",
    "floor": "floor: bare asyncio long-poll (reference)",
}
FULL_SCENARIOS: Final = ("200x2s", "20x20s")
QUICK_SCENARIOS: Final = ("20x0.5s", "5x2s")
ENDPOINT_ID: Final = "test-endpoint"
API_KEY: Final = "bench-key"
EMULATOR_MODULE: Final = "gpujobs.testing.runpod_emulator"
# The emulator's own control API (not counted in its request stats).
CONTROL_PREFIX: Final = "/_emulator"

# Targets (docs: DESIGN.md, "Performance notes").
TARGET_CPU_RATIO: Final = 1 / 5
TARGET_REQUEST_RATIO: Final = 1 / 3
TARGET_ADDED_P50_MS: Final = 100.0

EMULATOR_START_TIMEOUT_S: Final = 30.0
EMULATOR_POLL_S: Final = 0.1
EMULATOR_STOP_TIMEOUT_S: Final = 10.0
# A job may take this many times its scripted duration before the client gives up on it.
JOB_TIMEOUT_FACTOR: Final = 3.0
JOB_TIMEOUT_MARGIN_S: Final = 60.0


# -- scenarios --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Scenario:
    """``jobs`` jobs submitted at once, each sleeping ``sleep_s`` seconds in the handler."""

    jobs: int
    sleep_s: float

    @classmethod
    def parse(cls, text: str) -> Scenario:
        """Parse ``"200x2s"`` (200 jobs of 2 s each)."""
        match = re.fullmatch(r"(\d+)x(\d+(?:\.\d+)?)s", text.strip())
        if match is None or int(match[1]) < 1:
            msg = f"a scenario reads like 200x2s (jobs x seconds), not {text!r}"
            raise argparse.ArgumentTypeError(msg)
        return cls(jobs=int(match[1]), sleep_s=float(match[2]))

    @property
    def name(self) -> str:
        """The scenario as given on the command line, e.g. ``200x2s``."""
        return f"{self.jobs}x{self.sleep_s:g}s"


@dataclass(frozen=True, slots=True)
class Workload:
    """A scenario as run: durations scaled by ``time_factor`` and spread by ``spread``.

    Job ``n`` of ``N`` sleeps ``mean_s × (1 - spread + 2·spread·(n + ½)/N)``: evenly spread
    over ``mean_s × (1 ± spread)``, mean unchanged. The spread matters for a client that polls
    at a fixed interval: with jobs all of exactly 2 s and polls 1 s apart, every job ends in the
    same phase of its poller's cycle, so the measured lag is an accident of that phase (a few ms
    or a whole interval) rather than its average.
    """

    scenario: Scenario
    time_factor: float = 1.0
    spread: float = 0.25
    warm: bool = False
    loop: str = "asyncio"

    @property
    def jobs(self) -> int:
        """How many jobs are submitted at once."""
        return self.scenario.jobs

    @property
    def mean_s(self) -> float:
        """The mean job duration once the time factor is applied."""
        return self.scenario.sleep_s * self.time_factor

    @property
    def label(self) -> str:
        """Human-readable, e.g. ``200 jobs × 2 s``."""
        spread = f" ± {self.spread:.0%}" if self.spread else ""
        return f"{self.jobs} jobs × {self.mean_s:g} s{spread}"

    def payloads(self) -> list[dict[str, Any]]:
        """Job inputs for ``scripted_handler``; ``n`` lets the caller check each output."""
        return [
            {
                "sleep_s": round(
                    self.mean_s * (1 - self.spread + 2 * self.spread * (n + 0.5) / self.jobs), 4
                ),
                "n": n,
            }
            for n in range(self.jobs)
        ]

    @property
    def job_timeout_s(self) -> float:
        """The per-job timeout both clients get."""
        return self.mean_s * (1 + self.spread) * JOB_TIMEOUT_FACTOR + JOB_TIMEOUT_MARGIN_S

    def child_args(self) -> list[str]:
        """The command-line arguments that rebuild this workload in a child process."""
        return [
            "--scenario",
            self.scenario.name,
            "--time-factor",
            repr(self.time_factor),
            "--spread",
            repr(self.spread),
            *(["--warm"] if self.warm else []),
            "--loop",
            self.loop,
        ]


# -- child: one client, one scenario ------------------------------------------------------------


@dataclass(slots=True)
class JobRecord:
    """What the caller saw of one job."""

    n: int
    job_id: str | None = None
    received_at: float | None = None  # time.time() when run()/output() returned
    error: str | None = None


@dataclass(slots=True)
class ChildReport:
    """What a child process measured of its own run; written as JSON for the parent."""

    client: str
    library_version: str
    jobs: int
    cpu_s: float
    wall_s: float
    maxrss_before_mb: float
    maxrss_after_mb: float
    records: list[JobRecord] = field(default_factory=list)


def _maxrss_mb() -> float:
    # ru_maxrss is in KiB on Linux, in bytes on macOS.
    scale = 1024 * 1024 if sys.platform == "darwin" else 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / scale


def _check_output(record: JobRecord, output: Any) -> None:
    """``scripted_handler`` echoes the input: a job that got someone else's output is an error."""
    echo = output.get("echo") if isinstance(output, Mapping) else None
    if not isinstance(echo, Mapping) or echo.get("n") != record.n:
        record.error = f"unexpected output: {output!r:.80}"


async def _timed(record: JobRecord, call: Callable[[], Awaitable[Any]]) -> Any:
    """Await ``call``; note when it returned (or what it raised) in ``record``."""
    try:
        result = await call()
    except Exception as exc:  # noqa: BLE001 - every failure is counted, none ends the run
        record.received_at = time.time()
        record.error = f"{type(exc).__name__}: {exc}"[:200]
        return None
    record.received_at = time.time()
    return result


Measured = tuple[list[JobRecord], float, float]  # records, CPU seconds, wall seconds
ClientRun = Callable[[int, list[dict[str, Any]], float, bool], Coroutine[Any, Any, Measured]]

# Warm-up jobs are short: they only open connections and fill caches.
WARM_UP_SLEEP_S: Final = 0.05


def _reset_emulator_stats(port: int) -> None:
    """Forget the warm-up's requests and jobs, so the counts are the measured batch's alone."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", f"{CONTROL_PREFIX}/reset-stats")
        connection.getresponse().read()
    finally:
        connection.close()


async def _measured(
    port: int,
    payloads: list[dict[str, Any]],
    warm: bool,
    batch: Callable[[list[JobRecord], list[dict[str, Any]]], Awaitable[None]],
) -> Measured:
    """Run ``batch`` on the payloads, after a warm-up batch of as many short jobs if ``warm``.

    Only the measured batch counts: CPU and wall time are taken around it alone.
    """
    if warm:
        warm_up = [{"sleep_s": WARM_UP_SLEEP_S, "n": p["n"]} for p in payloads]
        await batch([JobRecord(n=p["n"]) for p in warm_up], warm_up)
        _reset_emulator_stats(port)
    records = [JobRecord(n=payload["n"]) for payload in payloads]
    cpu_0, wall_0 = time.process_time(), time.perf_counter()
    await batch(records, payloads)
    return records, time.process_time() - cpu_0, time.perf_counter() - wall_0


def _load_gpujobs() -> tuple[str, ClientRun]:
    """Import gpujobs (only in its own child) and return its version and run function."""
    import gpujobs  # noqa: PLC0415 - the SDK's child must not pay for this import

    async def run(
        port: int, payloads: list[dict[str, Any]], timeout: float, warm: bool
    ) -> Measured:
        runner = gpujobs.RunPodServerless(
            endpoint_url=f"http://127.0.0.1:{port}/v2/{ENDPOINT_ID}", api_key=API_KEY
        )

        async def one(record: JobRecord, payload: dict[str, Any]) -> None:
            result = await _timed(record, lambda: runner.run(payload, timeout=timeout))
            if result is not None:
                record.job_id = result.id
                _check_output(record, result.output)

        async def batch(records: list[JobRecord], batch_payloads: list[dict[str, Any]]) -> None:
            await asyncio.gather(*(one(r, p) for r, p in zip(records, batch_payloads, strict=True)))

        async with runner:
            return await _measured(port, payloads, warm, batch)

    return gpujobs.__version__, run


def _load_sdk() -> tuple[str, ClientRun]:
    """Import the runpod SDK and aiohttp (only in their own child); version and run function."""
    import aiohttp  # noqa: PLC0415 - the gpujobs child must not pay for these imports
    import runpod  # noqa: PLC0415

    async def run(
        port: int, payloads: list[dict[str, Any]], timeout: float, warm: bool
    ) -> Measured:
        # Endpoint and Job read both module globals when they are built.
        runpod.endpoint_url_base = f"http://127.0.0.1:{port}/v2"
        runpod.api_key = API_KEY

        async def one(
            endpoint: runpod.AsyncioEndpoint, record: JobRecord, payload: dict[str, Any]
        ) -> None:
            try:
                job = await endpoint.run(payload)
            except Exception as exc:  # noqa: BLE001 - counted as this job's error
                record.error = f"{type(exc).__name__}: {exc}"[:200]
                return
            record.job_id = job.job_id
            # The SDK's timeout is an int number of seconds (0 = time out at once).
            output = await _timed(record, lambda: job.output(timeout=math.ceil(timeout)))
            if record.error is None:
                _check_output(record, output)

        # The session as the SDK's README builds it: aiohttp defaults (100 connections).
        async with aiohttp.ClientSession() as session:
            endpoint = runpod.AsyncioEndpoint(ENDPOINT_ID, session)

            async def batch(records: list[JobRecord], batch_payloads: list[dict[str, Any]]) -> None:
                await asyncio.gather(
                    *(one(endpoint, r, p) for r, p in zip(records, batch_payloads, strict=True))
                )

            return await _measured(port, payloads, warm, batch)

    return runpod.__version__, run


def child_main(
    *,
    client: ClientName,
    workload: Workload,
    port: int,
    json_out: Path,
    profile_out: Path | None,
    warm: bool,
) -> None:
    """Run one client through one workload and write a :class:`ChildReport` to ``json_out``."""
    loaders = {"gpujobs": _load_gpujobs, "sdk": _load_sdk, "floor": _load_floor}
    version, run = loaders[client]()
    payloads = workload.payloads()
    timeout = workload.job_timeout_s
    # CPU time, not wall time: the client mostly waits, and waiting is not what we profile.
    profiler = cProfile.Profile(time.process_time) if profile_out is not None else None

    maxrss_before = _maxrss_mb()
    if profiler is not None:
        profiler.enable()
    main = run(port, payloads, timeout, warm or workload.warm)
    if workload.loop == "uvloop":
        import uvloop  # noqa: PLC0415 - only when asked for

        records, cpu_s, wall_s = uvloop.run(main)
    else:
        records, cpu_s, wall_s = asyncio.run(main)
    if profiler is not None:
        profiler.disable()

    report = ChildReport(
        client=client,
        library_version=version,
        jobs=workload.jobs,
        cpu_s=cpu_s,
        wall_s=wall_s,
        maxrss_before_mb=maxrss_before,
        maxrss_after_mb=_maxrss_mb(),
        records=records,
    )
    json_out.write_text(json.dumps(asdict(report)))
    if profiler is not None and profile_out is not None:
        profiler.dump_stats(profile_out.with_suffix(".prof"))
        text = io.StringIO()
        stats = pstats.Stats(profiler, stream=text).strip_dirs()
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(40)
        profile_out.with_suffix(".txt").write_text(text.getvalue())


class _FloorConnection(asyncio.Protocol):
    """One keep-alive connection of the floor client: a response with a Content-Length at most."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[bytes] | None = None
        self._buffer = bytearray()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast("asyncio.Transport", transport)

    def send(self, request: bytes) -> asyncio.Future[bytes]:
        assert self.transport is not None  # noqa: S101
        self._buffer.clear()
        self.answer = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self.answer

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0 or self.answer is None or self.answer.done():
            return
        head = bytes(self._buffer[:end]).lower()
        _, found, rest = head.partition(b"content-length:")
        if not found:  # the emulator always sends one; anything else is an error to count
            self.answer.set_exception(ValueError("an answer without Content-Length"))
            return
        length = int(rest.split(b"\r\n", 1)[0])
        if len(self._buffer) - end - 4 >= length:
            self.answer.set_result(bytes(self._buffer[end + 4 : end + 4 + length]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(ConnectionError(f"connection lost: {exc}"))


class _FloorClient:
    """Keep-alive connections to the emulator, one request in flight on each."""

    def __init__(self, port: int) -> None:
        self._port = port
        self._idle: list[_FloorConnection] = []

    async def _connect(self) -> _FloorConnection:
        while self._idle:  # the server closes idle keep-alive connections after a while
            connection = self._idle.pop()
            if connection.transport is not None and not connection.transport.is_closing():
                return connection
        loop = asyncio.get_running_loop()
        _, connection = await loop.create_connection(_FloorConnection, "127.0.0.1", self._port)
        return connection

    async def exchange(self, request: bytes) -> Any:
        """Send one request; the JSON of its answer."""
        connection = await self._connect()
        answer = await connection.send(request)
        self._idle.append(connection)
        return json.loads(answer)

    def close(self) -> None:
        for connection in self._idle:
            if connection.transport is not None:
                connection.transport.close()


def _load_floor() -> tuple[str, ClientRun]:
    """The floor: the least any asyncio client that hands each result over on arrival can do.

    One held ``/runsync`` per job on a keep-alive connection of its own, the request built by
    string formatting, the answer parsed by ``json.loads``; no retries, no timeouts, no error
    handling, no models. Not a client to use: a yardstick for what the machine charges for
    one long-poll per job (connection, wake-ups, task), which no client of that design avoids.
    """

    async def run(
        port: int, payloads: list[dict[str, Any]], timeout: float, warm: bool
    ) -> Measured:
        client = _FloorClient(port)
        head = (
            f"POST /v2/{ENDPOINT_ID}/runsync?wait={min(300_000, math.ceil(timeout * 1000))} "
            f"HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: {API_KEY}\r\n"
            "Content-Type: application/json\r\nContent-Length: "
        )

        async def one(record: JobRecord, payload: dict[str, Any]) -> None:
            body = json.dumps({"input": payload}).encode()
            request = f"{head}{len(body)}\r\n\r\n".encode() + body
            job = await _timed(record, lambda: client.exchange(request))
            if isinstance(job, Mapping):
                record.job_id = job.get("id")
                _check_output(record, job.get("output"))
            elif record.error is None:
                record.error = f"not a job: {job!r:.80}"

        async def batch(records: list[JobRecord], batch_payloads: list[dict[str, Any]]) -> None:
            await asyncio.gather(*(one(r, p) for r, p in zip(records, batch_payloads, strict=True)))

        try:
            return await _measured(port, payloads, warm, batch)
        finally:
            client.close()

    return "-", run


# -- parent: the emulator, the children, the table ---------------------------------------------


class Emulator:
    """The RunPod emulator in its own process on loopback, with its control API.

    It is started with ``--port 0`` and writes its endpoint URL as one line to stdout once it
    listens; :meth:`__enter__` waits for that line (bounded), then checks that the control API
    answers.

    Args:
        workers: concurrent jobs it runs (as many as the scenario has jobs: none waits in line).
        log: where its stderr (logging) goes.
        rate_limits: keep RunPod's per-route rate limits (``False`` lifts them).
    """

    def __init__(self, workers: int, log: Path, *, rate_limits: bool = True) -> None:
        self.port = 0
        self.url = ""
        self._workers = workers
        self._rate_limits = rate_limits
        self._log_path = log
        self._log: TextIO | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> Self:
        self._log = self._log_path.open("w")
        argv = [
            sys.executable,
            "-m",
            EMULATOR_MODULE,
            "--port",
            "0",
            "--workers",
            str(self._workers),
            "--cold-start-s",
            "0",
        ]
        if not self._rate_limits:
            argv.append("--no-rate-limits")
        self._proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._log)  # noqa: S603 - our own program
        try:
            self.url = self._wait_for_url()
            self.port = urllib.parse.urlsplit(self.url).port or 0
            self.stats()  # the control API answers too
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._proc is not None:
            if self._proc.poll() is None:
                self._proc.terminate()
                try:
                    self._proc.wait(timeout=EMULATOR_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    self._proc.kill()
                    self._proc.wait()
            if self._proc.stdout is not None:
                self._proc.stdout.close()
        if self._log is not None:
            self._log.close()

    def _wait_for_url(self) -> str:
        """The URL line from the emulator's stdout; fail if it exits or stays silent too long."""
        proc = self._proc
        if proc is None or proc.stdout is None:
            raise RuntimeError("the emulator is not running")
        deadline = time.monotonic() + EMULATOR_START_TIMEOUT_S
        while (left := deadline - time.monotonic()) > 0:
            readable, _, _ = select.select([proc.stdout], [], [], min(left, EMULATOR_POLL_S))
            if readable:
                line = proc.stdout.readline().decode().strip()
                if line.startswith("http://"):
                    return line
            if proc.poll() is not None:
                msg = f"the emulator exited with {proc.returncode}:\n{self.log_tail()}"
                raise RuntimeError(msg)
        msg = f"the emulator did not start within {EMULATOR_START_TIMEOUT_S:g} s"
        raise RuntimeError(f"{msg}:\n{self.log_tail()}")

    def log_tail(self, lines: int = 30) -> str:
        """The last lines the emulator wrote."""
        if self._log is not None:
            self._log.flush()
        text = self._log_path.read_text(errors="replace") if self._log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def _call(self, method: str, path: str, body: bytes | None = None) -> Any:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            body = response.read()
        finally:
            conn.close()
        if response.status >= 300:
            msg = f"{method} {path} answered {response.status}: {body[:200]!r}"
            raise RuntimeError(msg)
        return json.loads(body) if body else None

    def warm_up(self) -> None:
        """One job through ``/run``, ``/status`` and ``/runsync`` before anything is measured.

        The first client served would otherwise also pay for the server's first-call costs in
        the server CPU column.
        """
        body = json.dumps({"input": {"n": -1}}).encode()
        job = self._call("POST", f"/v2/{ENDPOINT_ID}/run", body)
        self._call("GET", f"/v2/{ENDPOINT_ID}/status/{job['id']}")
        self._call("POST", f"/v2/{ENDPOINT_ID}/runsync?wait=5000", body)

    def stats(self) -> Any:
        """``GET /_emulator/stats``."""
        return self._call("GET", f"{CONTROL_PREFIX}/stats")

    def reset_stats(self) -> None:
        """``POST /_emulator/reset-stats``."""
        self._call("POST", f"{CONTROL_PREFIX}/reset-stats")

    def job(self, job_id: str) -> Any:
        """``GET /_emulator/jobs/{id}``."""
        return self._call("GET", f"{CONTROL_PREFIX}/jobs/{job_id}")


@dataclass(frozen=True, slots=True)
class ServerView:
    """What the emulator saw of one client's run."""

    api_requests: int
    requests_by_route: dict[str, int]
    responses_by_status: dict[str, int]
    server_cpu_s: float | None
    completed_at: dict[str, float]


def _api_requests(stats: Mapping[str, Any]) -> dict[str, int]:
    """Requests per API route (``run``, ``runsync``, ``status``...).

    The emulator counts RunPod routes only; its ``/_emulator/*`` control routes are left out.
    """
    return {str(route): int(count) for route, count in stats["requests"].items()}


def _completed_at(
    stats: Mapping[str, Any], emulator: Emulator, ids: Sequence[str]
) -> dict[str, float]:
    """Server-side completion time (``time.time()``) per job id.

    From the stats' ``completed_at`` map; a job missing there is looked up on its own
    (``GET /_emulator/jobs/{id}``), and left out if it never completed.
    """
    known: Mapping[str, Any] = stats.get("completed_at") or {}
    found: dict[str, float] = {}
    for job_id in ids:
        when = known.get(job_id)
        if when is None:
            with contextlib.suppress(RuntimeError):  # 404: the emulator never saw it
                when = (emulator.job(job_id) or {}).get("completed_at")
        if when is not None:
            found[job_id] = float(when)
    return found


def _server_view(emulator: Emulator, ids: Sequence[str]) -> ServerView:
    """What the emulator saw since its stats were last reset (``EmulatorStats.as_dict()``)."""
    stats = emulator.stats()
    by_route = _api_requests(stats)
    cpu = stats.get("cpu_s")
    return ServerView(
        api_requests=sum(by_route.values()),
        requests_by_route=by_route,
        responses_by_status={str(k): int(v) for k, v in stats.get("responses", {}).items()},
        server_cpu_s=None if cpu is None else float(cpu),
        completed_at=_completed_at(stats, emulator, ids),
    )


def _percentile(values: Sequence[float], pct: float) -> float | None:
    """Nearest-rank percentile; ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(pct / 100 * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class Row:
    """One line of the table: one client through one workload, over ``runs`` runs."""

    scenario: str
    client: str
    library_version: str
    runs: int
    cpu_ms_per_job: float
    requests_per_job: float
    added_p50_ms: float | None
    added_p95_ms: float | None
    peak_rss_mb: float
    rss_growth_mb: float
    errors: int
    wall_s: float
    server_cpu_ms_per_job: float | None
    requests_by_route: dict[str, int]
    responses_by_status: dict[str, int]
    first_errors: list[str]


def _added_ms(report: ChildReport, server: ServerView) -> list[float]:
    """Per completed job: when the caller had the result minus when the server finished it."""
    return [
        (record.received_at - server.completed_at[record.job_id]) * 1000
        for record in report.records
        if record.error is None
        and record.received_at is not None
        and record.job_id in server.completed_at
    ]


def _row(label: str, runs: Sequence[tuple[ChildReport, ServerView]]) -> Row:
    """Combine one client's runs: medians of per-run figures, latencies pooled, errors summed."""
    reports = [report for report, _ in runs]
    servers = [server for _, server in runs]
    jobs = sum(report.jobs for report in reports)
    added_ms = [ms for report, server in runs for ms in _added_ms(report, server)]
    failed = [r.error for report in reports for r in report.records if r.error is not None]
    server_cpu = [
        server.server_cpu_s * 1000 / report.jobs
        for report, server in runs
        if server.server_cpu_s is not None
    ]
    return Row(
        scenario=label,
        client=reports[0].client,
        library_version=reports[0].library_version,
        runs=len(runs),
        cpu_ms_per_job=statistics.median(r.cpu_s * 1000 / r.jobs for r in reports),
        requests_per_job=sum(server.api_requests for server in servers) / jobs,
        added_p50_ms=_percentile(added_ms, 50),
        added_p95_ms=_percentile(added_ms, 95),
        peak_rss_mb=max(report.maxrss_after_mb for report in reports),
        rss_growth_mb=statistics.median(r.maxrss_after_mb - r.maxrss_before_mb for r in reports),
        errors=len(failed),
        wall_s=statistics.median(report.wall_s for report in reports),
        server_cpu_ms_per_job=statistics.median(server_cpu) if server_cpu else None,
        requests_by_route=dict(sum((Counter(s.requests_by_route) for s in servers), Counter())),
        responses_by_status=dict(sum((Counter(s.responses_by_status) for s in servers), Counter())),
        first_errors=failed[:3],
    )


def _run_child(
    *,
    client: ClientName,
    workload: Workload,
    port: int,
    workdir: Path,
    profile_dir: Path | None,
    run: int,
) -> ChildReport:
    """Run one client in a fresh process of this script; its report."""
    name = f"{client}-{workload.scenario.name}" + (f"-{run}" if run else "")
    json_out = workdir / f"{name}.json"
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--client",
        client,
        *workload.child_args(),
        "--port",
        str(port),
        "--json-out",
        str(json_out),
    ]
    if profile_dir is not None:
        argv += ["--profile", str(profile_dir / name)]
    limit_s = workload.job_timeout_s + JOB_TIMEOUT_MARGIN_S
    done = subprocess.run(argv, check=False, timeout=limit_s, capture_output=True, text=True)  # noqa: S603 - this script
    if done.returncode != 0 or not json_out.exists():
        msg = f"the {client} child failed ({done.returncode}):\n{done.stderr[-3000:]}"
        raise RuntimeError(msg)
    raw = json.loads(json_out.read_text())
    raw["records"] = [JobRecord(**record) for record in raw["records"]]
    return ChildReport(**raw)


def run_workload(
    workload: Workload,
    *,
    workdir: Path,
    profile_dir: Path | None,
    rate_limits: bool,
    repeat: int,
    progress: TextIO,
) -> list[Row]:
    """One emulator, the clients in turn (stats reset before each); a row per client.

    With ``repeat`` > 1 the clients alternate which goes first, so a drift in the machine's
    load over the runs weighs on both alike.
    """
    label = workload.label
    runs: dict[ClientName, list[tuple[ChildReport, ServerView]]] = {c: [] for c in CLIENTS}
    log = workdir / f"emulator-{workload.scenario.name}.log"
    with Emulator(workers=workload.jobs, log=log, rate_limits=rate_limits) as emulator:
        emulator.warm_up()
        for run in range(repeat):
            for client in CLIENTS if run % 2 == 0 else CLIENTS[::-1]:
                print(f"  {label}: {client} (run {run + 1}/{repeat})", file=progress, flush=True)
                emulator.reset_stats()
                report = _run_child(
                    client=client,
                    workload=workload,
                    port=emulator.port,
                    workdir=workdir,
                    profile_dir=profile_dir,
                    run=run,
                )
                ids = [record.job_id for record in report.records if record.job_id is not None]
                runs[client].append((report, _server_view(emulator, ids)))
    return [_row(label, runs[client]) for client in CLIENTS]


# -- the report -------------------------------------------------------------------------------


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.1f}"


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


_COLUMNS: Final = (
    "scenario",
    "client",
    "CPU ms/job",
    "requests/job",
    "added latency p50 ms",
    "p95 ms",
    "peak RSS MB",
    "errors",
    "RSS growth MB",
    "wall s",
    "server CPU ms/job",
)


def _table_row(row: Row) -> str:
    cells = (
        row.scenario,
        CLIENT_LABELS.get(row.client, row.client),
        f"{row.cpu_ms_per_job:.2f}",
        f"{row.requests_per_job:.2f}",
        _ms(row.added_p50_ms),
        _ms(row.added_p95_ms),
        f"{row.peak_rss_mb:.1f}",
        str(row.errors),
        f"{row.rss_growth_mb:.1f}",
        f"{row.wall_s:.1f}",
        _ms(row.server_cpu_ms_per_job),
    )
    return "| " + " | ".join(cells) + " |"


def _ratio(ours: float, theirs: float) -> float:
    return ours / theirs if theirs else math.inf


def _targets(scenario: str, ours: Row, sdk: Row, floor: Row | None) -> list[str]:
    """Ratio lines and PASS/MISS per target; a gpujobs run with failed jobs passes nothing."""
    clean = ours.errors == 0
    cpu = _ratio(ours.cpu_ms_per_job, sdk.cpu_ms_per_job)
    requests = _ratio(ours.requests_per_job, sdk.requests_per_job)
    p50 = ours.added_p50_ms
    p50_ok = p50 is not None and p50 <= TARGET_ADDED_P50_MS
    lines = [
        f"**{scenario}**",
        (
            f"- CPU per job, gpujobs/SDK = {cpu:.2f} (target ≤ {TARGET_CPU_RATIO:.2f}): "
            f"{_verdict(clean and cpu <= TARGET_CPU_RATIO)}"
        ),
        (
            f"- requests per job, gpujobs/SDK = {requests:.2f} "
            f"(target ≤ {TARGET_REQUEST_RATIO:.2f}): "
            f"{_verdict(clean and requests <= TARGET_REQUEST_RATIO)}"
        ),
        (
            f"- gpujobs added latency p50 = {_ms(p50)} ms "
            f"(target ≤ {TARGET_ADDED_P50_MS:g} ms): {_verdict(clean and p50_ok)}"
        ),
    ]
    if floor is not None and floor.errors:
        lines.append(f"- reference: the floor had {floor.errors} failed jobs; no floor ratios")
    elif floor is not None:
        lines.append(
            f"- reference: floor/SDK = {_ratio(floor.cpu_ms_per_job, sdk.cpu_ms_per_job):.2f}, "
            f"gpujobs/floor = {_ratio(ours.cpu_ms_per_job, floor.cpu_ms_per_job):.2f} (the "
            "floor is the least a client that hands each result over on arrival spends here)"
        )
    if not clean:
        lines.append(f"- gpujobs had {ours.errors} failed jobs, so every target is a MISS")
    return [*lines, ""]


def render(
    rows: Sequence[Row],
    *,
    time_factor: float,
    spread: float,
    rate_limits: bool,
    command: str,
    warm: bool = False,
    loop: str = "asyncio",
) -> str:
    """The Markdown report: the table, then ratios and targets per scenario."""
    versions = {row.client: row.library_version for row in rows}
    runs = max((row.runs for row in rows), default=1)
    lines = [
        "# Client overhead: gpujobs vs the runpod SDK",
        "",
        f"- time factor: **{time_factor:g}** (job durations = the scenario's × {time_factor:g})",
        (
            f"- spread: {spread:g} (job durations evenly spread over mean × (1 ± {spread:g}), "
            "so fixed-interval polling is not measured at one lucky or unlucky phase)"
        ),
        f"- command: `{command}`",
        f"- event loop of both clients: {loop}",
        (
            "- **warm** clients: a warm-up batch of as many short jobs ran first on the same "
            "client object (not counted)"
            if warm
            else "- **cold** clients: the measured batch is the first thing each fresh process "
            "does (connection set-up and first-use costs included)"
        ),
        (
            f"- gpujobs {versions.get('gpujobs', '?')}, runpod SDK {versions.get('sdk', '?')}, "
            f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs"
        ),
        (
            "- each client in a fresh process of its own; the emulator "
            f"(`{EMULATOR_MODULE}`, one worker per job, no cold start, RunPod's rate limits "
            f"{'on' if rate_limits else 'off'}) in another, on loopback"
        ),
        (
            f"- {runs} run(s) per client and scenario: CPU, RSS growth, wall and server CPU are "
            "medians over runs, peak RSS the maximum, latency percentiles pooled over all jobs"
        ),
        "",
        "| " + " | ".join(_COLUMNS) + " |",
        "|---|---|" + "--:|" * (len(_COLUMNS) - 2),
        *(_table_row(row) for row in rows),
        "",
        "## Ratios and targets",
        "",
    ]
    for scenario in dict.fromkeys(row.scenario for row in rows):
        by_client = {row.client: row for row in rows if row.scenario == scenario}
        if "gpujobs" in by_client and "sdk" in by_client:
            lines += _targets(
                scenario, by_client["gpujobs"], by_client["sdk"], by_client.get("floor")
            )
    lines += [f"## Requests by route (summed over {runs} run(s))", ""]
    for row in rows:
        routes = ", ".join(f"`{r}` {n}" for r, n in sorted(row.requests_by_route.items()))
        statuses = ", ".join(f"{s}: {n}" for s, n in sorted(row.responses_by_status.items()))
        lines.append(f"- {row.scenario}, {row.client}: {routes or 'none'} (responses {statuses})")
        lines += [f"  - error: {error}" for error in row.first_errors]
    return "\n".join(lines) + "\n"


# -- command line -----------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="CPU, requests and added latency per job: gpujobs vs the runpod SDK, "
        "against the RunPod emulator on loopback."
    )
    parser.add_argument(
        "--scenario",
        action="append",
        type=Scenario.parse,
        help="JOBSxSECONDSs, e.g. 200x2s; repeat for several "
        f"(default: {', '.join(FULL_SCENARIOS)})",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke check: {', '.join(QUICK_SCENARIOS)} (well under a minute)",
    )
    parser.add_argument(
        "--time-factor",
        type=float,
        default=1.0,
        help="scale every job's duration (0.25: four times shorter); default 1.0",
    )
    parser.add_argument(
        "--spread",
        type=float,
        default=0.25,
        help="spread job durations evenly over mean × (1 ± SPREAD); 0: all jobs the same "
        "length (default 0.25)",
    )
    parser.add_argument("--output", type=Path, help="also write the Markdown report here")
    parser.add_argument(
        "--profile",
        type=Path,
        help="run each client under cProfile and write CLIENT-SCENARIO.prof/.txt into this "
        "folder (profiling inflates CPU: do not report those numbers)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run each client this many times per scenario, alternating which goes first; "
        "report medians (latencies pooled); default 1",
    )
    parser.add_argument(
        "--warm",
        action="store_true",
        help="measure a warm client: each child first runs a warm-up batch of as many short jobs "
        "(same client object, then the emulator's counts are reset), so connection set-up and "
        "first-use costs fall outside the measured batch, as in a long-running service",
    )
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="the event loop both clients run on (uvloop: what uvicorn-served backends often "
        "run); default asyncio",
    )
    parser.add_argument(
        "--no-rate-limits",
        action="store_true",
        help="lift the emulator's RunPod rate limits (on by default, as at RunPod)",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder (emulator logs, child JSON)"
    )
    child = parser.add_argument_group("child process (internal)")
    child.add_argument("--client", choices=CLIENTS, help=argparse.SUPPRESS)
    child.add_argument("--port", type=int, help=argparse.SUPPRESS)
    child.add_argument("--json-out", type=Path, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark (or, with ``--client``, one child run) and print the report."""
    args = _parser().parse_args(argv)
    if args.time_factor <= 0:
        _parser().error("--time-factor must be positive")
    if args.repeat < 1:
        _parser().error("--repeat must be at least 1")
    if not 0 <= args.spread < 1:
        _parser().error("--spread must be at least 0 and below 1")

    if args.client is not None:
        if args.port is None or args.json_out is None or not args.scenario:
            _parser().error("--client needs --port, --json-out and one --scenario")
        child_main(
            client=args.client,
            workload=Workload(
                args.scenario[0], args.time_factor, args.spread, args.warm, args.loop
            ),
            port=args.port,
            json_out=args.json_out,
            profile_out=args.profile,
            warm=args.warm,
        )
        return 0

    names = QUICK_SCENARIOS if args.quick else FULL_SCENARIOS
    scenarios: list[Scenario] = args.scenario or [Scenario.parse(name) for name in names]
    command = " ".join(["python", "benches/client_overhead.py", *(argv or sys.argv[1:])])
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    with _workdir(keep=args.keep) as workdir:
        print(f"time factor {args.time_factor:g}; work folder {workdir}", file=sys.stderr)
        for scenario in scenarios:
            rows += run_workload(
                Workload(scenario, args.time_factor, args.spread, args.warm, args.loop),
                workdir=workdir,
                profile_dir=args.profile,
                rate_limits=not args.no_rate_limits,
                repeat=args.repeat,
                progress=sys.stderr,
            )
    report = render(
        rows,
        time_factor=args.time_factor,
        spread=args.spread,
        rate_limits=not args.no_rate_limits,
        command=command,
        warm=args.warm,
        loop=args.loop,
    )
    print(report)
    if args.output is not None:
        args.output.write_text(report)
    return 0


@contextlib.contextmanager
def _workdir(*, keep: bool) -> Iterator[Path]:
    if keep:
        yield Path(tempfile.mkdtemp(prefix="gpujobs-bench-"))
        return
    with tempfile.TemporaryDirectory(prefix="gpujobs-bench-") as path:
        yield Path(path)


if __name__ == "__main__":
    sys.exit(main())
