"""``python -m gpujobs.worker``: start the worker in the mode the environment names.

Environment (read here, in :func:`main`, never at import):

- ``DEPLOYMENT_MODE``: ``serverless`` (default; RunPod Serverless handler) or ``pod`` (HTTP
  server; see :mod:`gpujobs.worker.pod` for ``PORT``, ``HOST``, ``MAX_QUEUE``,
  ``RESULT_TTL_S``, ``WORKER_API_TOKEN``).
- ``MODEL_PATH``: the weights folder (default ``/models/qwen-image-layered``); never downloaded.
- ``WORKER_DEVICE``: ``cuda``, ``cuda:1``, ``cpu``... (default: CUDA when there is one).
- ``LOG_LEVEL``: ``INFO`` by default.
- ``GPUJOBS_WORKER_FAKE=1``: serve :class:`~gpujobs.worker.fake.FakePipeline` instead of the
  model. A test seam (solid-colour layers, no torch, no weights), never for production.

``python -m gpujobs.worker healthcheck`` exits 0 when the worker is healthy: in pod mode when
``GET /health`` on ``127.0.0.1:$PORT`` answers ``loading``, ``ready`` or ``busy``; in serverless
mode always (RunPod watches that mode itself). The image's ``HEALTHCHECK`` runs it.

In serverless mode the runpod SDK reads its own flags from the command line, e.g.
``python -m gpujobs.worker --rp_serve_api --rp_api_port 8000`` for its local test server.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from gpujobs.worker.service import PipelineLike

__all__ = ["DEFAULT_MODEL_PATH", "main"]

DEFAULT_MODEL_PATH: Final = "/models/qwen-image-layered"
"""Where the image expects the weights (baked in, or a volume mounted there)."""

_HEALTHY: Final = frozenset({"loading", "ready", "busy"})

logger = logging.getLogger("gpujobs.worker")


def main(argv: Sequence[str] | None = None) -> int:
    """Start the worker (serverless or pod) or run the health check; the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    environ = os.environ
    level = environ.get("LOG_LEVEL", "INFO").strip().upper()
    logging.basicConfig(
        level=level if level in logging.getLevelNamesMapping() else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    mode = environ.get("DEPLOYMENT_MODE", "serverless").strip().lower()
    if args[:1] == ["healthcheck"]:
        return healthcheck(environ)
    factory = pipeline_factory(environ)
    if mode == "pod":
        from gpujobs.worker import pod  # noqa: PLC0415  # FastAPI only in this mode

        try:
            settings = pod.PodSettings.from_env(environ)
        except ValueError as exc:
            logger.error("bad pod setting: %s", exc)  # noqa: TRY400  # a message, not a crash
            return 2
        pod.serve(factory, settings)
        return 0
    if mode == "serverless":
        from gpujobs.worker import serverless  # noqa: PLC0415  # the runpod SDK only here

        # The platform sets this URL; runpod's local test server does not.
        serverless.serve(factory, send_progress=bool(environ.get("RUNPOD_WEBHOOK_POST_OUTPUT")))
        return 0
    logger.error("DEPLOYMENT_MODE must be 'serverless' or 'pod', not %r", mode)
    return 2


def pipeline_factory(environ: Mapping[str, str]) -> Callable[[], PipelineLike]:
    """What loads the pipeline, from ``MODEL_PATH``/``WORKER_DEVICE`` (or the fake)."""
    if environ.get("GPUJOBS_WORKER_FAKE") == "1":
        from gpujobs.worker.fake import FakePipeline  # noqa: PLC0415

        logger.warning("GPUJOBS_WORKER_FAKE=1: serving the fake pipeline, not the model")
        return FakePipeline
    model_path = environ.get("MODEL_PATH") or DEFAULT_MODEL_PATH
    device = environ.get("WORKER_DEVICE") or None
    # WORKER_COMPILE=0/1 forces the GPU speed-ups off/on; unset: on for CUDA only.
    optimize = {"0": False, "1": True}.get(environ.get("WORKER_COMPILE", "").strip())

    def load() -> PipelineLike:
        from gpujobs.worker.pipeline import load_pipeline  # noqa: PLC0415

        logger.info("loading %s", model_path)
        pipeline = load_pipeline(model_path, device=device, optimize=optimize)
        # Pay the compilation at start-up, not in a user's first job.
        if pipeline.info.optimized:
            pipeline.warm_up()
        logger.info("ready (compile %.1f s)", pipeline.info.compile_s or 0.0)
        return pipeline

    return load


def healthcheck(environ: Mapping[str, str]) -> int:
    """0 when the local pod server says it is healthy (or in serverless mode), else 1."""
    if environ.get("DEPLOYMENT_MODE", "serverless").strip().lower() != "pod":
        return 0
    port = int(environ.get("PORT", "8000"))
    # http.client, not urllib: a proxy set in the environment must not see this request.
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        connection.request("GET", "/health")
        response = connection.getresponse()
        status = json.loads(response.read()).get("status")
    except (OSError, ValueError, AttributeError) as exc:
        logger.error("health check failed: %s", exc)  # noqa: TRY400
        return 1
    finally:
        connection.close()
    if status in _HEALTHY:
        return 0
    logger.error("the worker reports status %r", status)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
