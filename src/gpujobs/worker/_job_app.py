"""The job server over HTTP: ``/health``, ``/inference`` and the job API (FastAPI).

See :mod:`gpujobs.worker._job_server` for the routes and what they answer.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gpujobs.worker._asgi import Refusal, install_error_handlers, protect
from gpujobs.worker._job_server import (
    Backend,
    JobServer,
    JobState,
    PodSettings,
    QueueFullError,
    ServerJob,
)

__all__ = ["MAX_WAIT_S", "add_job_routes", "create_job_app", "final_answer", "submit"]

_JOB_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_LOADING_RETRY_AFTER_S: Final = 10
#: The longest ``GET /jobs/{id}?wait=`` holds its answer.
MAX_WAIT_S: Final = 60.0


def create_job_app(
    backend: Backend,
    settings: PodSettings | None = None,
    *,
    title: str = "gpujobs worker",
    description: str = "One job at a time; long jobs go through `POST /jobs`.",
    version: str = "0",
    request_schema: dict[str, Any] | None = None,
    lifespan: bool = True,
) -> FastAPI:
    """The job server for ``backend`` as an ASGI application (FastAPI).

    With ``lifespan`` (the default) the app loads the backend and runs the queue in its lifespan;
    without, whoever serves it calls ``app.state.jobs.load()`` and runs ``run_jobs()``.
    ``request_schema`` documents the job's JSON in ``/docs``.
    """
    settings = settings or PodSettings()
    server = JobServer(backend, settings)

    @asynccontextmanager
    async def run(_app: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(server.load)
            tasks.start_soon(server.run_jobs)
            try:
                yield
            finally:
                server.stop()  # a running job stops after its current step
                tasks.cancel_scope.cancel()

    app = FastAPI(
        title=title,
        description=description,
        version=version,
        lifespan=run if lifespan else None,
    )
    app.state.jobs = server
    install_error_handlers(app)
    protect(app, token=settings.api_token, max_body_bytes=settings.max_body_bytes)
    add_job_routes(app, server, request_schema)
    return app


def add_job_routes(
    app: FastAPI, server: JobServer, request_schema: dict[str, Any] | None = None
) -> None:
    """``/health``, ``/inference`` and the job API, on ``app``."""
    json_body: dict[str, Any] = {}
    if request_schema is not None:
        content = {"application/json": {"schema": request_schema}}
        json_body = {"requestBody": {"required": True, "content": content}}

    @app.get("/health", summary="Readiness: loading, ready, busy or error")
    async def health() -> dict[str, Any]:
        body: dict[str, Any] = {
            "status": server.status,
            "queue_length": server.queue_length,
            **server.backend.health(),
        }
        if server.load_error is not None:
            body["error"] = server.load_error
        return body

    @app.post("/inference", summary="Run a job and wait for it", openapi_extra=json_body)
    async def inference(request: Request) -> JSONResponse:
        job = await submit(server, request, await server.backend.parse(await request.body()))
        await job.done.wait()
        return final_answer(job)

    @app.post("/jobs", summary="Queue a job", status_code=202, openapi_extra=json_body)
    async def submit_job(request: Request) -> JSONResponse:
        job = await submit(server, request, await server.backend.parse(await request.body()))
        return JSONResponse(
            {"id": job.id, "status": job.state.value},
            status_code=202,
            headers={"Location": f"/jobs/{job.id}"},
        )

    @app.get("/jobs/{job_id}", summary="Look at a job (wait=S: until it ends, at most S s)")
    async def get_job(job_id: str, wait: float = 0.0) -> dict[str, Any]:
        job = _known(server, job_id)
        if wait > 0:
            # Short of any proxy's cut-off on held requests (RunPod's: 100 s).
            with anyio.move_on_after(min(wait, MAX_WAIT_S)):
                await job.ended.wait()
        return job.view()

    @app.delete("/jobs/{job_id}", summary="Cancel a job")
    async def cancel_job(job_id: str) -> dict[str, Any]:
        job = _known(server, job_id)
        server.cancel(job)
        return job.view()


async def submit(server: JobServer, request: Request, payload: Any) -> ServerJob:
    """Queue ``payload`` for ``request``, or refuse it (loading, bad id, full queue)."""
    if server.load_error is not None:
        raise Refusal(503, f"the worker failed to load: {server.load_error}")
    if not server.backend.loaded:
        raise Refusal(
            503,
            "the worker is still loading; retry shortly",
            {"Retry-After": str(_LOADING_RETRY_AFTER_S)},
        )
    job_id = request.headers.get("idempotency-key")
    if job_id is not None and not _JOB_ID.match(job_id):
        raise Refusal(400, "Idempotency-Key must be 1-128 letters, digits or ._:-")
    try:
        return server.submit(payload, job_id)
    except QueueFullError as exc:
        raise Refusal(
            503,
            f"busy: {server.queue_length} jobs are waiting; retry in about {exc.retry_after_s} s",
            {"Retry-After": str(exc.retry_after_s)},
        ) from None


def final_answer(job: ServerJob) -> JSONResponse:
    """What ``POST /inference`` answers once the job ended."""
    headers = {"X-Job-Id": job.id}
    if job.state is JobState.COMPLETED and job.output is not None:
        return JSONResponse(job.output, headers=headers)
    if job.state is JobState.CANCELLED:
        return JSONResponse({"error": "the job was cancelled"}, status_code=409, headers=headers)
    return JSONResponse(
        {"error": job.error or "the job failed"},
        status_code=422 if job.invalid else 500,
        headers=headers,
    )


def _known(server: JobServer, job_id: str) -> ServerJob:
    job = server.get(job_id)
    if job is None:
        raise Refusal(404, f"no job {job_id!r} (unknown, or its result has expired)")
    return job
