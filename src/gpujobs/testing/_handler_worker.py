"""The worker's job server (the same code a pod runs) with any handler behind it, for tests.

The pod server's queue, job API, 503 + ``Retry-After``, bearer auth and body limit are
:mod:`gpujobs.worker._job_server`; here a RunPod-style handler (``handler({"id", "input"})``,
e.g. :func:`gpujobs.testing.scripted_handler`) replaces the model, run as the runpod SDK would
(:func:`gpujobs._handler.invoke_handler`). Needs the worker extra (FastAPI).

Example::

    async with serve(HandlerWorker(scripted_handler, max_queue=32)) as worker:
        runner = RunPodPod(base_url=worker.url)
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from typing import Any

from gpujobs._handler import Handler, invoke_handler
from gpujobs.testing._emulator_server import ASGIApp

__all__ = ["HandlerWorker"]


class _HandlerBackend:
    """A job server backend that runs a handler; cancelling a job cancels its task."""

    cancel_by_task = True
    loaded = True

    def __init__(self, handler: Handler) -> None:
        self._handler = handler

    async def load(self) -> None:
        return None

    async def parse(self, body: bytes) -> Any:
        from gpujobs.worker.schemas import InvalidRequest  # noqa: PLC0415 - the worker extra

        try:
            return json.loads(body)
        except ValueError:
            raise InvalidRequest("the body is not JSON") from None

    def fingerprint(self, payload: Any) -> str:
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    async def run(self, job: Any) -> Any:
        from gpujobs.worker._job_server import JobFailure  # noqa: PLC0415 - the worker extra

        def progress(value: Any) -> None:
            job.progress = value

        outcome = await invoke_handler(
            self._handler, {"id": job.id, "input": job.payload}, progress=progress
        )
        if outcome.failed:
            raise JobFailure(outcome.error)
        return outcome.output

    def health(self) -> dict[str, Any]:
        return {}


class HandlerWorker:
    """The pod server's job server running ``handler``, to serve with :func:`serve`.

    Args:
        handler: a RunPod-style handler, e.g. :func:`gpujobs.testing.scripted_handler`.
        api_token: the bearer token the worker requires (``None``: open).
        max_queue: jobs allowed to wait behind the running one (more answer 503).
        result_ttl_s: how long finished jobs are kept.
    """

    def __init__(
        self,
        handler: Handler,
        *,
        api_token: str | None = None,
        max_queue: int = 8,
        result_ttl_s: float = 1800.0,
    ) -> None:
        from gpujobs.worker._job_app import create_job_app  # noqa: PLC0415 - the worker extra
        from gpujobs.worker._job_server import PodSettings  # noqa: PLC0415

        settings = PodSettings(api_token=api_token, max_queue=max_queue, result_ttl_s=result_ttl_s)
        self._app = create_job_app(
            _HandlerBackend(handler), settings, title="gpujobs test worker", lifespan=False
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def app(self) -> ASGIApp:
        """The ASGI app (its queue runs between :meth:`start` and :meth:`aclose`)."""
        app: ASGIApp = self._app
        return app

    @property
    def base_path(self) -> str:
        """Nothing: the worker's routes sit at the root."""
        return ""

    async def start(self) -> None:
        """Run the job queue in the running loop."""
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        server = self._app.state.jobs
        await server.load()
        await server.run_jobs()

    def restart(self) -> None:
        """Forget every job and stop the running one, as a stopped pod's container would."""
        self._app.state.jobs.forget_all()

    async def aclose(self) -> None:
        """Stop the queue; running jobs are cancelled."""
        self._app.state.jobs.stop()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
