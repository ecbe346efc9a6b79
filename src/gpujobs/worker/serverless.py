"""The RunPod Serverless mode: the worker contract as a runpod SDK handler.

RunPod hands the handler ``{"id": ..., "input": <request>}``; the handler answers the contract's
response, which becomes the job's ``output``. What it relies on (runpod SDK 1.12,
``serverless/modules/rp_job.py`` and ``rp_progress.py``):

- an async handler is awaited on the SDK's event loop, so the GPU work runs in a worker thread
  (:class:`~gpujobs.worker.service.InferenceService`) and the SDK keeps sending heartbeats;
- a returned dict with an ``"error"`` key fails the job with that text as its ``error`` (no
  traceback): bad input answers ``{"error": "invalid request: layers: must be at most 10"}``;
- ``runpod.serverless.progress_update(job, data)`` posts ``data`` as the running job's partial
  output, to ``RUNPOD_WEBHOOK_POST_OUTPUT``. runpod's local test server (``--rp_serve_api``)
  has no such URL, so progress is sent only when the platform set it.

The pipeline loads once per process, before the first job is taken. If it cannot load (no
weights at ``MODEL_PATH``), the worker still starts and fails every job with the reason, so the
caller reads "no usable weights at MODEL_PATH=..." instead of watching jobs wait on a worker
that restarts forever. Jobs are idempotent by ``job["id"]``: a job RunPod delivers twice to this
worker answers the first run's result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final

import anyio.to_thread

from gpujobs.worker.schemas import InvalidRequest, parse_request
from gpujobs.worker.service import InferenceService, JobCancelledError, PipelineLike

__all__ = ["Handler", "make_handler", "serve"]

logger = logging.getLogger(__name__)

Handler = Callable[[Mapping[str, Any]], Awaitable[dict[str, Any]]]
"""An async RunPod handler: ``await handler({"id": ..., "input": {...}})``."""

ProgressSender = Callable[[Mapping[str, Any], dict[str, Any]], None]
"""Sends a running job's partial output (``runpod.serverless.progress_update``)."""

_PROGRESS_INTERVAL_S: Final = 1.0


def make_handler(
    service: InferenceService | None,
    *,
    load_error: str | None = None,
    send_progress: ProgressSender | None = None,
    progress_interval_s: float = _PROGRESS_INTERVAL_S,
) -> Handler:
    """Build the RunPod handler around a service.

    Args:
        service: the loaded service; ``None`` when the pipeline failed to load.
        load_error: why it failed to load; every job then fails with this message.
        send_progress: called as ``send_progress(job, {"progress": {"step", "total"}})`` at
            most once per ``progress_interval_s`` (and for the last step); ``None``: no progress.
        progress_interval_s: least time between two progress updates of a job.

    Returns:
        An async handler for ``runpod.serverless.start({"handler": handler})``.
    """

    async def handler(job: Mapping[str, Any]) -> dict[str, Any]:
        """Run one RunPod job: validate, generate, encode; failures become ``{"error": ...}``."""
        if service is None:
            return {"error": f"the model failed to load: {load_error or 'unknown reason'}"}
        job_id = job.get("id")
        try:
            # Decoding up to 20 MB of base64 is CPU work: off the SDK's event loop.
            request = await anyio.to_thread.run_sync(parse_request, job.get("input"))
        except InvalidRequest as exc:
            return {"error": str(exc)}
        reporter = None
        if send_progress is not None:
            reporter = _ThrottledProgress(job, send_progress, progress_interval_s)
        try:
            return await service.run(
                request,
                job_id=None if job_id is None else str(job_id),
                on_progress=reporter,
            )
        except InvalidRequest as exc:
            return {"error": str(exc)}
        except JobCancelledError as exc:
            return {"error": str(exc)}
        except Exception as exc:
            logger.exception("job %s failed", job_id)
            text = str(exc)
            return {"error": f"inference failed: {type(exc).__name__}" + (f": {text}" * bool(text))}

    return handler


def serve(pipeline_factory: Callable[[], PipelineLike], *, send_progress: bool) -> None:
    """Load the pipeline, then hand the handler to the runpod SDK (which never returns).

    ``runpod.serverless.start`` reads its own command-line flags (``--rp_serve_api``,
    ``--rp_api_port``...) from ``sys.argv``.

    Args:
        pipeline_factory: loads the pipeline; called once, here, before any job is taken.
        send_progress: send progress updates (only on the platform: see the module docstring).
    """
    import runpod  # noqa: PLC0415  # the runpod extra; only this mode needs it

    service: InferenceService | None = None
    load_error: str | None = None
    started = time.perf_counter()
    try:
        service = InferenceService(pipeline_factory())
    except Exception as exc:
        load_error = str(exc) or type(exc).__name__
        logger.exception("the pipeline failed to load; every job will fail with the reason")
    else:
        logger.info(
            "pipeline ready on %s in %.1f s", service.info.device, time.perf_counter() - started
        )
    sender = runpod.serverless.progress_update if send_progress else None
    runpod.serverless.start(
        {"handler": make_handler(service, load_error=load_error, send_progress=sender)}
    )


class _ThrottledProgress:
    """Forwards ``(step, total)`` as a progress update, at most once per interval."""

    def __init__(self, job: Mapping[str, Any], send: ProgressSender, interval_s: float) -> None:
        self._job = job
        self._send = send
        self._interval_s = interval_s
        self._last = float("-inf")
        self._lock = threading.Lock()

    def __call__(self, step: int, total: int) -> None:
        now = time.monotonic()
        with self._lock:
            if step < total and now - self._last < self._interval_s:
                return
            self._last = now
        self._send(self._job, {"progress": {"step": step, "total": total}})
