"""The worker's Modal web endpoints, as a plain ASGI app over a spawn/get/cancel seam.

=========================  ===================================================================
``POST /submit``           the job's input (a JSON object) → ``{"id": "fc-..."}``: the call
                           spawned on the worker's GPU function
``GET /result/{id}``       ``?wait=S`` (at most 120 s, under Modal's 150 s request cap): 202
                           ``{"id", "status": "RUNNING"}`` while there is no output, 200 with the
                           job record ``{"id", "status", "output"?, "error"?, "timings"}`` once
                           it ended, 404 once the output expired (7 days) or for an unknown id
``POST /cancel/{id}``      cancel the call → ``{"id", "status": "CANCELLED"}``
``GET /health``            ``{"status": "ready", "backlog", "runners", "running"}``
=========================  ===================================================================

In production :mod:`gpujobs.worker.modal_app` serves it with ``@modal.asgi_app`` over the real
GPU function (:class:`~gpujobs.providers._modal_calls.ModalSdkCalls`); tests serve the same app
with uvicorn over :class:`gpujobs.testing.FakeModal`. Nothing here imports modal.

:func:`run_modal_job` is the body of the worker's Modal method: it runs a RunPod-style handler
and wraps the outcome in the envelope the runner reads timings from.
"""

from __future__ import annotations

import json
import re
import time
from collections import OrderedDict
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from gpujobs._errors import CapacityError, GpuJobsError, JobLostError, RateLimitedError
from gpujobs._handler import Handler, invoke_handler
from gpujobs.providers._modal_calls import ModalCalls, job_envelope, look_call, sdk_error_for

__all__ = ["MAX_WAIT_S", "create_modal_web_app", "run_modal_job"]

#: The longest ``GET /result/{id}?wait=`` holds its answer: under Modal's 150 s request cap.
MAX_WAIT_S: Final = 120.0
_CALL_ID: Final = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_FORGET_CANCELLED_AFTER: Final = 10_000
_RUNNING: Final = 202


async def run_modal_job(
    handler: Handler, payload: Any, *, job_id: str | None, cold_start: bool | None
) -> dict[str, Any]:
    """Run ``handler({"id", "input": payload})`` and wrap its outcome in the runner's envelope.

    A handler that raises or returns ``{"error": ...}`` gives a failed job (never an exception:
    Modal's retries are for the platform's failures, not for bad input).
    """
    started_at, started = time.time(), time.perf_counter()
    outcome = await invoke_handler(handler, {"id": job_id, "input": payload})
    return job_envelope(
        output=outcome.output if not outcome.failed else None,
        error=outcome.error,
        started_at=started_at,
        execution_s=time.perf_counter() - started,
        cold_start=cold_start,
    )


def _error_reply(exc: Exception) -> JSONResponse:
    status = 502
    if isinstance(exc, RateLimitedError):
        status = 429
    elif isinstance(exc, CapacityError):
        status = 503
    message = exc.message if isinstance(exc, GpuJobsError) else f"{type(exc).__name__}: {exc}"
    return JSONResponse({"error": message}, status_code=status)


class _Routes:
    """The handlers, over one :class:`ModalCalls`; remembers the calls cancelled through it."""

    def __init__(self, calls: ModalCalls, *, terminate_containers: bool) -> None:
        self._calls = calls
        self._terminate_containers = terminate_containers
        self._cancelled: OrderedDict[str, None] = OrderedDict()

    async def health(self) -> JSONResponse:
        try:
            stats = await self._calls.stats()
        except Exception as exc:  # noqa: BLE001 - any failure is an unhealthy answer
            return _error_reply(sdk_error_for(exc, what="stats", common={}) or exc)
        return JSONResponse({"status": "ready", **stats})

    async def submit(self, request: Request) -> JSONResponse:
        try:
            payload = json.loads(await request.body())
        except ValueError:
            return JSONResponse({"error": "the body is not JSON"}, status_code=400)
        if not isinstance(payload, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, status_code=400)
        try:
            call_id = await self._calls.spawn(payload)
        except Exception as exc:  # noqa: BLE001 - reported to the caller, who decides
            return _error_reply(sdk_error_for(exc, what="spawn", common={}) or exc)
        return JSONResponse({"id": call_id})

    async def result(self, call_id: str, wait: float = 0.0) -> JSONResponse:
        if not _CALL_ID.match(call_id):
            return JSONResponse({"error": "no such call"}, status_code=404)
        wait = min(max(0.0, wait), MAX_WAIT_S)
        try:
            state = await look_call(
                self._calls,
                call_id,
                timeout=wait,
                cancelled=call_id in self._cancelled,
                provider="modal",
            )
        except JobLostError as exc:
            return JSONResponse({"error": exc.message}, status_code=404)
        except GpuJobsError as exc:
            return _error_reply(exc)
        record = state.to_json(call_id)
        return JSONResponse(record, status_code=200 if state.status.is_terminal else _RUNNING)

    async def cancel(self, call_id: str) -> JSONResponse:
        if not _CALL_ID.match(call_id):
            return JSONResponse({"error": "no such call"}, status_code=404)
        self._cancelled[call_id] = None
        while len(self._cancelled) > _FORGET_CANCELLED_AFTER:
            self._cancelled.popitem(last=False)
        try:
            await self._calls.cancel(call_id, terminate_containers=self._terminate_containers)
        except Exception as exc:  # noqa: BLE001 - reported to the caller
            known = sdk_error_for(exc, what="cancel", common={})
            if known is None and type(exc).__name__ == "NotFoundError":
                return JSONResponse({"error": "no such call"}, status_code=404)
            return _error_reply(known or exc)
        return JSONResponse({"id": call_id, "status": "CANCELLED"})


def create_modal_web_app(
    calls: ModalCalls, *, terminate_containers: bool = False, title: str = "gpujobs on Modal"
) -> FastAPI:
    """The job routes over ``calls`` as an ASGI application (FastAPI)."""
    app = FastAPI(title=title, docs_url="/docs", redoc_url=None)
    routes = _Routes(calls, terminate_containers=terminate_containers)
    app.add_api_route("/health", routes.health, methods=["GET"])
    app.add_api_route("/submit", routes.submit, methods=["POST"])
    app.add_api_route("/result/{call_id}", routes.result, methods=["GET"])
    app.add_api_route("/cancel/{call_id}", routes.cancel, methods=["POST"])
    return app
