"""The pod server: the worker contract over HTTP, for RunPod Pods, Vast.ai and any plain host.

Routes (JSON everywhere; errors are ``{"error": "<readable message>"}``):

=========================  ===================================================================
``GET /``                  service info: version, model, device, status, limits, routes
``GET /health``            ``{"status": "loading"|"ready"|"busy"|"error", "queue_length",
                           "model", "device", "error"?}``; never needs the token
``GET /docs``              Swagger UI (``/openapi.json`` behind it)
``POST /inference``        the contract's request as JSON → the response, in one request
``POST /inference/upload`` multipart: ``file`` (the picture) + the other fields as form fields
``POST /jobs``             the same JSON → 202 ``{"id", "status"}``; for clients behind proxies
                           that cut long requests (RunPod's proxy: ~100 s)
``GET /jobs/{id}``         ``{"id", "status", "output"?, "error"?, "progress"?, "timings"}``
``DELETE /jobs/{id}``      cancel: a queued job never runs; a running one is marked CANCELLED at
                           once, stops after its current step, and its result is dropped
=========================  ===================================================================

One GPU job runs at a time; the others wait in a bounded queue (``MAX_QUEUE``). A full queue
answers 503 with ``Retry-After`` (seconds, estimated from the jobs observed so far) so a router
can overflow elsewhere. The model loads in the background at start-up: ``/health`` says
``loading`` (then ``ready``, or ``error`` with the reason, e.g. missing weights) and the job
routes answer 503 until it is ready. With ``WORKER_API_TOKEN`` set, every route but ``/health``
needs ``Authorization: Bearer <token>`` (compared in constant time). Finished jobs are kept for
``RESULT_TTL_S`` seconds, then ``GET /jobs/{id}`` answers 404. A job id sent as
``Idempotency-Key`` on ``POST /jobs`` or ``POST /inference`` is used as the job's id: sending it
again returns the same job instead of running another.

:func:`create_app` returns a plain ASGI application (FastAPI), so uvicorn, hypercorn or Modal's
``asgi_app`` can serve it; :func:`serve` runs it with uvicorn.
"""

from __future__ import annotations

import base64
import hmac
import logging
import math
import re
import threading
import time
import uuid
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, MutableMapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Final

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

import gpujobs
from gpujobs.worker.schemas import (
    IMAGE_FORMATS,
    MAX_IMAGE_BYTES,
    MAX_IMAGE_PIXELS,
    InferenceRequest,
    InferenceResponse,
    InvalidRequest,
    parse_request,
    parse_request_json,
)
from gpujobs.worker.service import (
    InferenceService,
    JobCancelledError,
    PipelineLike,
    request_fingerprint,
)

__all__ = ["JobState", "PodSettings", "create_app", "serve"]

logger = logging.getLogger(__name__)

PipelineFactory = Callable[[], PipelineLike]
"""Builds (loads) the pipeline; called once, in a worker thread, at start-up."""

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_JOB_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_INT_FIELDS: Final = frozenset({"layers", "resolution", "num_inference_steps", "seed"})
_FLOAT_FIELDS: Final = frozenset({"true_cfg_scale"})
_OPEN_PATHS: Final = frozenset({"/health"})
# base64 grows the image by 4/3; the rest of the request is small.
_DEFAULT_MAX_BODY: Final = MAX_IMAGE_BYTES * 4 // 3 + 1024 * 1024
_LOADING_RETRY_AFTER_S: Final = 10


class JobState(StrEnum):
    """Where a pod job stands; the names match :class:`gpujobs.JobStatus`."""

    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


_TERMINAL: Final = frozenset({JobState.COMPLETED, JobState.FAILED, JobState.CANCELLED})


@dataclass(frozen=True)
class PodSettings:
    """How the pod server behaves; :meth:`from_env` reads them from the environment.

    Attributes:
        api_token: bearer token required on every route but ``/health``; ``None``: open.
        max_queue: jobs allowed to wait behind the running one; more answer 503.
        result_ttl_s: how long a finished job's result is kept for ``GET /jobs/{id}``.
        max_results: finished jobs kept at most (oldest dropped first), to bound memory.
        default_job_s: a job's expected duration before one was observed (for Retry-After).
        max_body_bytes: largest request body accepted (413 beyond).
        host: address to listen on (:func:`serve`).
        port: port to listen on (:func:`serve`).
        cache_size: recent answers kept for repeated job ids.
    """

    api_token: str | None = None
    max_queue: int = 8
    result_ttl_s: float = 1800.0
    max_results: int = 64
    default_job_s: float = 60.0
    max_body_bytes: int = _DEFAULT_MAX_BODY
    host: str = "0.0.0.0"  # noqa: S104  # a pod serves its proxy and peers, not only itself
    port: int = 8000
    cache_size: int = 32

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> PodSettings:
        """Settings from the environment variables below, each optional.

        ``WORKER_API_TOKEN``, ``MAX_QUEUE``, ``RESULT_TTL_S``, ``HOST``, ``PORT``.

        Raises:
            ValueError: a variable is set to something that is not a number.
        """
        defaults = cls()
        return cls(
            api_token=environ.get("WORKER_API_TOKEN") or None,
            max_queue=int(environ.get("MAX_QUEUE", defaults.max_queue)),
            result_ttl_s=float(environ.get("RESULT_TTL_S", defaults.result_ttl_s)),
            host=environ.get("HOST", defaults.host),
            port=int(environ.get("PORT", defaults.port)),
        )


@dataclass(eq=False)
class _Job:
    id: str
    request: InferenceRequest | None
    fingerprint: str | None = None  # set when the client named the job (Idempotency-Key)
    received_at: float = field(default_factory=time.monotonic)
    state: JobState = JobState.QUEUED
    started_at: float | None = None
    finished_at: float | None = None
    output: dict[str, Any] | None = None
    error: str | None = None
    invalid: bool = False  # failed on the client's input (4xx), not on the worker
    progress: tuple[int, int] | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    done: anyio.Event = field(default_factory=anyio.Event)

    def set_progress(self, step: int, total: int) -> None:
        self.progress = (step, total)  # one assignment: safe from the worker thread

    def view(self) -> dict[str, Any]:
        now = time.monotonic()
        started = self.started_at
        queued_until = started if started is not None else (self.finished_at or now)
        body: dict[str, Any] = {
            "id": self.id,
            "status": self.state.value,
            "timings": {
                "queue_s": round(queued_until - self.received_at, 4),
                "execution_s": (
                    None if started is None else round((self.finished_at or now) - started, 4)
                ),
            },
        }
        if self.progress is not None:
            body["progress"] = {"step": self.progress[0], "total": self.progress[1]}
        if self.output is not None:
            body["output"] = self.output
        if self.error is not None:
            body["error"] = self.error
        return body


class _Worker:
    """The model, the queue and the jobs of one pod server (no HTTP in here)."""

    def __init__(self, factory: PipelineFactory, settings: PodSettings) -> None:
        self.settings = settings
        self._factory = factory
        self.service: InferenceService | None = None
        self.load_error: str | None = None
        self._jobs: dict[str, _Job] = {}
        self._queue: deque[_Job] = deque()
        self._running: _Job | None = None
        self._work = anyio.Event()

    # -- lifecycle ----------------------------------------------------------------------------

    async def load(self) -> None:
        logger.info("loading the pipeline")
        try:
            pipeline = await anyio.to_thread.run_sync(self._factory, abandon_on_cancel=True)
            self.service = InferenceService(pipeline, cache_size=self.settings.cache_size)
        except Exception as exc:
            self.load_error = str(exc) or type(exc).__name__
            logger.exception("the pipeline failed to load; /health reports the error")
            return
        info = pipeline.info
        logger.info("pipeline ready on %s (%s) in %.1f s", info.device, info.dtype, info.load_s)

    async def run_jobs(self) -> None:
        while True:
            while not self._queue:
                self._work = anyio.Event()
                await self._work.wait()
            job = self._queue.popleft()
            if job.state is JobState.QUEUED:
                await self._execute(job)

    def stop(self) -> None:
        for job in self._jobs.values():
            job.cancel.set()

    async def _execute(self, job: _Job) -> None:
        assert self.service is not None  # noqa: S101  # jobs are refused until loaded
        assert job.request is not None  # noqa: S101
        self._running = job
        job.state = JobState.RUNNING
        job.started_at = time.monotonic()
        try:
            output = await self.service.run(
                job.request,
                job_id=job.id,
                received_at=job.received_at,
                on_progress=job.set_progress,
                cancel=job.cancel,
            )
        except JobCancelledError:
            self._finish(job, JobState.CANCELLED)
        except InvalidRequest as exc:
            self._finish(job, JobState.FAILED, error=str(exc), invalid=True)
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            self._finish(job, JobState.FAILED, error=f"inference failed: {_describe(exc)}")
        else:
            # Cancelled while its last step ran: the result is dropped, as promised.
            cancelled = job.cancel.is_set() or job.state is JobState.CANCELLED
            if not cancelled:
                job.output = output  # before _finish wakes whoever waits on the job
            self._finish(job, JobState.CANCELLED if cancelled else JobState.COMPLETED)
        finally:
            self._running = None

    def _finish(
        self, job: _Job, state: JobState, *, error: str | None = None, invalid: bool = False
    ) -> None:
        if job.state not in _TERMINAL:  # DELETE may have marked it CANCELLED already
            job.state = state
            job.error = error
            job.invalid = invalid
        job.finished_at = job.finished_at or time.monotonic()
        job.request = None  # the picture may weigh 20 MB: drop it now
        job.done.set()

    # -- jobs -----------------------------------------------------------------------------------

    @property
    def status(self) -> str:
        if self.load_error is not None:
            return "error"
        if self.service is None:
            return "loading"
        return "busy" if self._running is not None or self.queue_length else "ready"

    @property
    def queue_length(self) -> int:
        return sum(1 for job in self._queue if job.state is JobState.QUEUED)

    def retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: what remains of the running job."""
        per_job = self.settings.default_job_s
        running_for = 0.0
        if self.service is not None:
            per_job = self.service.observed_job_s or per_job
            running_for = self.service.running_for_s
        # A slot frees when the running job ends and the first waiting one starts.
        rest = max(per_job - running_for, 1.0) if self._running is not None else per_job
        return max(1, math.ceil(rest))

    def get(self, job_id: str) -> _Job | None:
        self._purge()
        return self._jobs.get(job_id)

    def submit(self, request: InferenceRequest, job_id: str | None) -> tuple[_Job, bool]:
        """Queue a job; ``(job, False)`` when ``job_id`` names a job already known."""
        self._purge()
        fingerprint = None if job_id is None else request_fingerprint(request)
        if job_id is not None and (known := self._jobs.get(job_id)) is not None:
            if known.fingerprint != fingerprint:
                raise InvalidRequest(
                    f"job id {job_id!r} was already used for a different request; use a new id"
                )
            return known, False
        # The running job holds the GPU, not a queue slot: MAX_QUEUE jobs may wait behind it.
        ahead = self.queue_length + (self._running is not None)
        if ahead > self.settings.max_queue:
            raise _QueueFullError(self.retry_after_s())
        job = _Job(id=job_id or uuid.uuid4().hex, request=request, fingerprint=fingerprint)
        self._jobs[job.id] = job
        self._queue.append(job)
        self._work.set()
        return job, True

    def cancel(self, job: _Job) -> None:
        if job.state in _TERMINAL:
            return
        job.cancel.set()
        if job.state is JobState.QUEUED:
            self._finish(job, JobState.CANCELLED)
        else:  # running: answered CANCELLED now; the thread stops after its current step
            job.state = JobState.CANCELLED
            job.finished_at = time.monotonic()

    def _purge(self) -> None:
        now = time.monotonic()
        ttl = self.settings.result_ttl_s
        finished = [
            job
            for job in self._jobs.values()
            if job.state in _TERMINAL and job.finished_at is not None and job is not self._running
        ]
        finished.sort(key=lambda job: job.finished_at or 0.0)
        excess = len(finished) - self.settings.max_results
        for index, job in enumerate(finished):
            if index < excess or now - (job.finished_at or now) > ttl:
                del self._jobs[job.id]


class _QueueFullError(Exception):
    def __init__(self, retry_after_s: int) -> None:
        super().__init__(f"the queue is full; retry in about {retry_after_s} s")
        self.retry_after_s = retry_after_s


class _BodyTooLargeError(Exception):
    pass


# -- ASGI middleware --------------------------------------------------------------------------


async def _send_json(send: _Send, status: int, body: bytes, headers: list[Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BearerAuth:
    """Every route but the open ones needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: _ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                if scheme.lower() != b"bearer":
                    given = b""
                break
        if not hmac.compare_digest(given.strip(), self._token):
            await _send_json(
                send,
                401,
                b'{"error":"missing or wrong bearer token (Authorization: Bearer <token>)"}',
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self._app(scope, receive, send)


class _BodyLimit:
    """Refuses bodies over the limit: by Content-Length up front, else while reading."""

    def __init__(self, app: _ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit():
                if int(value) > self._limit:
                    await _send_json(send, 413, _too_large_body(self._limit), [])
                    return
                break
        received = 0

        async def limited() -> _Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._limit:
                    raise _BodyTooLargeError
            return message

        await self._app(scope, limited, send)


def _too_large_body(limit: int) -> bytes:
    mb = limit / (1024 * 1024)
    return f'{{"error":"the request body is larger than {mb:.0f} MB"}}'.encode()


# -- the app ----------------------------------------------------------------------------------


def create_app(
    pipeline_factory: PipelineFactory,
    settings: PodSettings | None = None,
) -> FastAPI:
    """Build the pod server as an ASGI application.

    Args:
        pipeline_factory: loads the pipeline (e.g. ``lambda: load_pipeline(model_path)``);
            called once at start-up, in a worker thread, while ``/health`` says ``loading``.
            An exception it raises puts the server in the ``error`` state with its message.
        settings: queue, token, retention; by default :class:`PodSettings` ``()`` (no token).

    Returns:
        The application; its lifespan loads the model and runs the job queue, so serve it with
        an ASGI server that runs lifespans (uvicorn, hypercorn, Modal's ``asgi_app`` do).

    Example::

        app = create_app(lambda: load_pipeline("/models/qwen-image-layered"))
        uvicorn.run(app, host="0.0.0.0", port=8000)
    """
    settings = settings or PodSettings()
    worker = _Worker(pipeline_factory, settings)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(worker.load)
            tasks.start_soon(worker.run_jobs)
            try:
                yield
            finally:
                worker.stop()  # a running job stops after its current step
                tasks.cancel_scope.cancel()

    app = FastAPI(
        title="gpujobs worker: Qwen-Image-Layered",
        description=(
            "Decomposes a picture into RGBA layers. One GPU job at a time; long jobs go "
            "through the job API (`POST /jobs`, then `GET /jobs/{id}`)."
        ),
        version=_version(),
        lifespan=lifespan,
    )
    app.state.worker = worker
    _install_error_handlers(app)
    app.add_middleware(_BodyLimit, limit=settings.max_body_bytes)
    if settings.api_token:
        app.add_middleware(_BearerAuth, token=settings.api_token)
    _add_routes(app, worker)
    return app


def serve(pipeline_factory: PipelineFactory, settings: PodSettings | None = None) -> None:
    """Run the pod server with uvicorn until it is stopped (SIGINT/SIGTERM)."""
    import uvicorn  # noqa: PLC0415  # only the pod mode needs it

    settings = settings or PodSettings()
    uvicorn.run(
        create_app(pipeline_factory, settings),
        host=settings.host,
        port=settings.port,
        log_config=None,  # keep the logging the entry point configured
        timeout_graceful_shutdown=30,
    )


def _add_routes(app: FastAPI, worker: _Worker) -> None:
    request_schema = InferenceRequest.model_json_schema()
    json_body: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": request_schema}},
        }
    }
    form_properties = {
        name: spec for name, spec in request_schema["properties"].items() if name != "image"
    }
    upload_body: dict[str, Any] = {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": {
                            "file": {"type": "string", "format": "binary"},
                            **form_properties,
                        },
                    }
                }
            },
        }
    }
    ok: dict[int | str, dict[str, Any]] = {
        200: {"model": InferenceResponse, "description": "the layers"}
    }

    @app.get("/", summary="Service info")
    async def info() -> dict[str, Any]:
        service = worker.service
        return {
            "service": "gpujobs-worker",
            "version": _version(),
            "mode": "pod",
            "model": service.model if service else None,
            "revision": service.info.revision if service else None,
            "device": service.info.device if service else None,
            "status": worker.status,
            "limits": {
                "max_queue": worker.settings.max_queue,
                "layers": [2, 10],
                "resolutions": [640, 1024],
                "num_inference_steps": [1, 100],
                "image_formats": list(IMAGE_FORMATS),
                "max_image_bytes": MAX_IMAGE_BYTES,
                "max_image_pixels": MAX_IMAGE_PIXELS,
            },
            "routes": [
                "GET /health",
                "GET /docs",
                "POST /inference",
                "POST /inference/upload",
                "POST /jobs",
                "GET /jobs/{id}",
                "DELETE /jobs/{id}",
            ],
        }

    @app.get("/health", summary="Readiness: loading, ready, busy or error")
    async def health() -> dict[str, Any]:
        service = worker.service
        body: dict[str, Any] = {
            "status": worker.status,
            "queue_length": worker.queue_length,
            "model": service.model if service else None,
            "device": service.info.device if service else None,
        }
        if worker.load_error is not None:
            body["error"] = worker.load_error
        return body

    @app.post(
        "/inference", summary="Run a job and wait for it", responses=ok, openapi_extra=json_body
    )
    async def inference(request: Request) -> JSONResponse:
        job = await _submit(worker, request, await _json_request(request))
        await job.done.wait()
        return _final_answer(job)

    @app.post(
        "/inference/upload",
        summary="Run a job from a multipart upload and wait for it",
        responses=ok,
        openapi_extra=upload_body,
    )
    async def inference_upload(request: Request) -> JSONResponse:
        job = await _submit(worker, request, await _form_request(request))
        await job.done.wait()
        return _final_answer(job)

    @app.post("/jobs", summary="Queue a job", status_code=202, openapi_extra=json_body)
    async def submit_job(request: Request) -> JSONResponse:
        job = await _submit(worker, request, await _json_request(request))
        return JSONResponse(
            {"id": job.id, "status": job.state.value},
            status_code=202,
            headers={"Location": f"/jobs/{job.id}"},
        )

    @app.get("/jobs/{job_id}", summary="Look at a job")
    async def get_job(job_id: str) -> dict[str, Any]:
        return _known(worker, job_id).view()

    @app.delete("/jobs/{job_id}", summary="Cancel a job")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = _known(worker, job_id)
        worker.cancel(job)
        return job.view()


# -- route helpers ----------------------------------------------------------------------------


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


class _Refusal(Exception):  # noqa: N818  # not an error of the server: an answer
    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def _install_error_handlers(app: FastAPI) -> None:
    async def refusal(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, _Refusal)  # noqa: S101
        return _error(exc.status, str(exc), exc.headers)

    async def invalid(_request: Request, exc: Exception) -> JSONResponse:
        return _error(422, str(exc))

    async def too_large(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(413, "the request body is too large")

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        return _error(exc.status_code, str(exc.detail), exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        fields = ", ".join(
            ".".join(str(part) for part in error.get("loc", ())) for error in exc.errors()
        )
        return _error(422, f"invalid request: check {fields or 'the request'}")

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return _error(500, "internal error; the worker's log has the details")

    app.add_exception_handler(_Refusal, refusal)
    app.add_exception_handler(InvalidRequest, invalid)
    app.add_exception_handler(_BodyTooLargeError, too_large)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)


async def _json_request(request: Request) -> InferenceRequest:
    body = await request.body()
    # Decoding 20 MB of base64 and reading the picture's header is CPU work: off the loop.
    return await anyio.to_thread.run_sync(parse_request_json, body)


async def _form_request(request: Request) -> InferenceRequest:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise _Refusal(415, "send multipart/form-data with the picture in a `file` field")
    # A malformed body is starlette's HTTPException(400), answered as {"error": ...}.
    form = await request.form(max_files=1, max_fields=16)
    try:
        upload = form.get("file")
        if upload is None or isinstance(upload, str):
            raise InvalidRequest("file: is required (the picture, as a multipart file field)")
        data = await upload.read(MAX_IMAGE_BYTES + 1)
        if len(data) > MAX_IMAGE_BYTES:
            raise InvalidRequest(f"file: is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
        fields: dict[str, Any] = {"image": _b64(data)}
        for name, value in form.multi_items():
            if name == "file":
                continue
            if not isinstance(value, str):
                raise InvalidRequest(f"{name}: must be a form field, not a file")
            fields[name] = _form_value(name, value)
    finally:
        await form.close()
    return await anyio.to_thread.run_sync(parse_request, fields)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _form_value(name: str, value: str) -> Any:
    """Form fields are text: numbers become numbers, so the strict schema checks them."""
    text = value.strip()
    if name in _INT_FIELDS and re.fullmatch(r"-?\d{1,30}", text):
        return int(text)
    if name in _FLOAT_FIELDS:
        try:
            return float(text)
        except ValueError:
            return value
    return value


async def _submit(worker: _Worker, request: Request, parsed: InferenceRequest) -> _Job:
    if worker.load_error is not None:
        raise _Refusal(503, f"the model failed to load: {worker.load_error}")
    if worker.service is None:
        raise _Refusal(
            503,
            "the model is still loading; retry shortly",
            {"Retry-After": str(_LOADING_RETRY_AFTER_S)},
        )
    job_id = request.headers.get("idempotency-key")
    if job_id is not None and not _JOB_ID.match(job_id):
        raise _Refusal(400, "Idempotency-Key must be 1-128 letters, digits or ._:-")
    try:
        job, _new = worker.submit(parsed, job_id)
    except _QueueFullError as exc:
        raise _Refusal(
            503,
            f"busy: {worker.queue_length} jobs are waiting; retry in about {exc.retry_after_s} s",
            {"Retry-After": str(exc.retry_after_s)},
        ) from None
    return job


def _final_answer(job: _Job) -> JSONResponse:
    headers = {"X-Job-Id": job.id}
    if job.state is JobState.COMPLETED and job.output is not None:
        return JSONResponse(job.output, headers=headers)
    if job.state is JobState.CANCELLED:
        return _error(409, "the job was cancelled", headers)
    return _error(422 if job.invalid else 500, job.error or "the job failed", headers)


def _known(worker: _Worker, job_id: str) -> _Job:
    job = worker.get(job_id)
    if job is None:
        raise _Refusal(404, f"no job {job_id!r} (unknown, or its result has expired)")
    return job


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _version() -> str:
    return gpujobs.__version__
