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
``GET /jobs/{id}``         ``{"id", "status", "output"?, "error"?, "progress"?, "timings"}``;
                           ``?wait=S``: answer when the job ends or after ``S`` s (max 60)
``DELETE /jobs/{id}``      cancel: a queued job never runs; a running one is marked CANCELLED at
                           once, stops after its current step, and its result is dropped
=========================  ===================================================================

The queue, the job API, auth and limits are the generic job server
(:mod:`gpujobs.worker._job_server`); this module adds the model, ``GET /``, the multipart route
and the request schema. One GPU job runs at a time; the others wait in a bounded queue
(``MAX_QUEUE``). A full queue answers 503 with ``Retry-After`` (seconds, estimated from the jobs
observed so far) so a router can overflow elsewhere. The model loads in the background at
start-up: ``/health`` says ``loading`` (then ``ready``, or ``error`` with the reason, e.g.
missing weights) and the job routes answer 503 until it is ready. With ``WORKER_API_TOKEN`` set,
every route but ``/health`` needs ``Authorization: Bearer <token>`` (compared in constant time).
Finished jobs are kept for ``RESULT_TTL_S`` seconds, then ``GET /jobs/{id}`` answers 404. A job
id sent as ``Idempotency-Key`` on ``POST /jobs`` or ``POST /inference`` is used as the job's id:
sending it again returns the same job instead of running another.

:func:`create_app` returns a plain ASGI application (FastAPI), so uvicorn, hypercorn or Modal's
``asgi_app`` can serve it; :func:`serve` runs it with uvicorn.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import re
from collections.abc import Callable
from typing import Any, Final

import anyio
import anyio.to_thread
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import gpujobs
from gpujobs.worker._asgi import Refusal
from gpujobs.worker._job_app import create_job_app, final_answer, submit
from gpujobs.worker._job_server import (
    JobCancelled,
    JobFailure,
    JobServer,
    JobState,
    PodSettings,
    ServerJob,
    describe,
)
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

_INT_FIELDS: Final = frozenset({"layers", "resolution", "num_inference_steps", "seed"})
_FLOAT_FIELDS: Final = frozenset({"true_cfg_scale"})


class _Inference:
    """The job server's backend: the pipeline behind an :class:`InferenceService`."""

    cancel_by_task = False  # the GPU thread owns the GPU until it returns: it stops between steps

    def __init__(self, factory: PipelineFactory, settings: PodSettings) -> None:
        self._factory = factory
        self._cache_size = settings.cache_size
        self.service: InferenceService | None = None

    @property
    def loaded(self) -> bool:
        return self.service is not None

    async def load(self) -> None:
        logger.info("loading the pipeline")
        # A failure is logged and kept for /health by the job server.
        pipeline = await anyio.to_thread.run_sync(self._factory, abandon_on_cancel=True)
        self.service = InferenceService(pipeline, cache_size=self._cache_size)
        info = pipeline.info
        logger.info("pipeline ready on %s (%s) in %.1f s", info.device, info.dtype, info.load_s)

    async def parse(self, body: bytes) -> InferenceRequest:
        # Decoding 20 MB of base64 and reading the picture's header is CPU work: off the loop.
        return await anyio.to_thread.run_sync(parse_request_json, body)

    def fingerprint(self, payload: Any) -> str:
        if isinstance(payload, InferenceRequest):
            return request_fingerprint(payload)
        return hashlib.sha256(repr(payload).encode()).hexdigest()

    async def run(self, job: ServerJob) -> Any:
        assert self.service is not None  # noqa: S101  # jobs are refused until loaded

        def on_progress(step: int, total: int) -> None:
            job.progress = {"step": step, "total": total}  # one assignment: thread-safe

        try:
            return await self.service.run(
                job.payload,
                job_id=job.id,
                received_at=job.received_at,
                on_progress=on_progress,
                cancel=job.cancel,
            )
        except JobCancelledError:
            raise JobCancelled from None
        except InvalidRequest as exc:
            raise JobFailure(str(exc), invalid=True) from None
        except Exception as exc:
            logger.exception("job %s failed", job.id)
            raise JobFailure(f"inference failed: {describe(exc)}") from None

    def health(self) -> dict[str, Any]:
        service = self.service
        return {
            "model": service.model if service else None,
            "device": service.info.device if service else None,
        }


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
    backend = _Inference(pipeline_factory, settings)
    app = create_job_app(
        backend,
        settings,
        title="gpujobs worker: Qwen-Image-Layered",
        description=(
            "Decomposes a picture into RGBA layers. One GPU job at a time; long jobs go "
            "through the job API (`POST /jobs`, then `GET /jobs/{id}`)."
        ),
        version=_version(),
        request_schema=InferenceRequest.model_json_schema(),
    )
    app.state.worker = app.state.jobs
    _add_routes(app, app.state.jobs, backend)
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


def _add_routes(app: FastAPI, server: JobServer, backend: _Inference) -> None:
    request_schema = InferenceRequest.model_json_schema()
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
        service = backend.service
        return {
            "service": "gpujobs-worker",
            "version": _version(),
            "mode": "pod",
            "model": service.model if service else None,
            "revision": service.info.revision if service else None,
            "device": service.info.device if service else None,
            "status": server.status,
            "limits": {
                "max_queue": server.settings.max_queue,
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

    @app.post(
        "/inference/upload",
        summary="Run a job from a multipart upload and wait for it",
        responses=ok,
        openapi_extra=upload_body,
    )
    async def inference_upload(request: Request) -> JSONResponse:
        job = await submit(server, request, await _form_request(request))
        await job.done.wait()
        return final_answer(job)


# -- route helpers ----------------------------------------------------------------------------


async def _form_request(request: Request) -> InferenceRequest:
    content_type = request.headers.get("content-type", "")
    if not content_type.startswith("multipart/form-data"):
        raise Refusal(415, "send multipart/form-data with the picture in a `file` field")
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


def _version() -> str:
    return gpujobs.__version__
