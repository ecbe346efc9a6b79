"""The worker as a Modal app: ``modal deploy -m gpujobs.worker.modal_app``.

Two pieces, one app (modal SDK 1.6.4: ``App.cls``, ``enter``, ``method``, ``asgi_app``,
``concurrent``, ``Volume.from_name``, ``Image``; Modal's guides "GPU fallbacks", "Request
timeouts", "Proxy auth tokens", "Preemption"):

- ``Worker`` (a class on a GPU, with fallbacks: ``gpu=["H100", "A100-80GB"]`` takes the first
  type free): ``@modal.enter()`` loads the pipeline once per container from the weights volume
  (mounted at ``/models``; filled once with ``python -m gpujobs.worker.fetch_weights``),
  ``run(payload)`` answers one job of the worker contract, wrapped in the envelope
  :class:`~gpujobs.ModalRunner` reads timings from. ``ModalRunner(app, "Worker.run")`` calls it.
- ``web`` (CPU only, many requests at once): the job routes of
  :mod:`gpujobs.worker._modal_web` (``POST /submit``, ``GET /result/{id}``, ``POST
  /cancel/{id}``, ``GET /health``) over ``Worker.run``, behind proxy auth by default.
  ``ModalRunner(web_url=...)`` calls it.

Settings come from the environment when the app is deployed (``GPUJOBS_MODAL_*``, see
:class:`ModalAppSettings`) and travel into the containers with it, so both sides agree.
Importing this module needs the ``modal`` extra, neither a GPU nor Modal credentials: it only
describes the app. Modal restarts an input after a preemption, so a job may run twice; the
worker is idempotent by input id within a container.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

import modal

__all__ = ["ModalAppSettings", "Worker", "app", "web", "worker_image"]

#: Where the weights volume is mounted; ``MODEL_PATH`` points inside it.
MODELS_DIR: Final = "/models"
_MODEL_PATH: Final = f"{MODELS_DIR}/qwen-image-layered"
#: The packages of the GPU image, pinned as in images/qwen-layered/Dockerfile.
WORKER_PACKAGES: Final = (
    "torch==2.13.0",
    "torchvision==0.28.0",
    "diffusers==0.42.1",
    "transformers==5.24.0",
    "accelerate>=1.0",
    "pillow>=10.4",
    "python-pptx>=1.0",
    "fastapi>=0.115",
    "python-multipart>=0.0.9",
    "anyio>=4.4",
    "httpx>=0.27",
    "pydantic>=2.7",
    "tenacity>=8.3",
)
WEB_PACKAGES: Final = (
    "fastapi>=0.115",
    "anyio>=4.4",
    "httpx>=0.27",
    "pydantic>=2.7",
    "tenacity>=8.3",
)


@dataclass(frozen=True)
class ModalAppSettings:
    """What the deployment looks like; every field has a ``GPUJOBS_MODAL_*`` variable.

    Attributes:
        app_name: the app (``GPUJOBS_MODAL_APP``).
        gpus: GPU types in order of preference (``GPUJOBS_MODAL_GPUS``, comma-separated).
        volume: the weights volume (``GPUJOBS_MODAL_VOLUME``), created if missing.
        timeout_s: a job's longest run (``GPUJOBS_MODAL_TIMEOUT_S``).
        startup_timeout_s: a container's longest start, weights loading included
            (``GPUJOBS_MODAL_STARTUP_TIMEOUT_S``).
        scaledown_window_s: how long an idle container stays up, billed, waiting for the next
            job (``GPUJOBS_MODAL_SCALEDOWN_S``).
        min_containers: containers kept warm, billed while idle (``GPUJOBS_MODAL_MIN_CONTAINERS``).
        max_containers: at most this many GPU containers (``GPUJOBS_MODAL_MAX_CONTAINERS``).
        image: a registry reference of the worker image to run instead of building one here
            (``GPUJOBS_MODAL_IMAGE``), e.g. the image RunPod and Vast run.
        proxy_auth: the web endpoints require ``Modal-Key``/``Modal-Secret``
            (``GPUJOBS_MODAL_PROXY_AUTH``, default on).
    """

    app_name: str = "gpujobs-qwen-layered"
    gpus: tuple[str, ...] = ("H100", "A100-80GB")
    volume: str = "gpujobs-weights"
    timeout_s: int = 600
    startup_timeout_s: int = 900
    scaledown_window_s: int = 60
    min_containers: int = 0
    max_containers: int | None = None
    image: str | None = None
    proxy_auth: bool = True

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> ModalAppSettings:
        """Read the ``GPUJOBS_MODAL_*`` variables; missing ones keep their defaults."""

        def get(name: str) -> str | None:
            return (environ.get(f"GPUJOBS_MODAL_{name}") or "").strip() or None

        defaults = cls()
        gpus = get("GPUS")
        max_containers = get("MAX_CONTAINERS")
        return cls(
            app_name=get("APP") or defaults.app_name,
            gpus=tuple(g.strip() for g in gpus.split(",") if g.strip()) if gpus else defaults.gpus,
            volume=get("VOLUME") or defaults.volume,
            timeout_s=int(get("TIMEOUT_S") or defaults.timeout_s),
            startup_timeout_s=int(get("STARTUP_TIMEOUT_S") or defaults.startup_timeout_s),
            scaledown_window_s=int(get("SCALEDOWN_S") or defaults.scaledown_window_s),
            min_containers=int(get("MIN_CONTAINERS") or defaults.min_containers),
            max_containers=int(max_containers) if max_containers else None,
            image=get("IMAGE"),
            proxy_auth=(get("PROXY_AUTH") or "1") not in {"0", "false", "no"},
        )

    def as_env(self) -> dict[str, str]:
        """The variables that give these settings back (sent into the containers)."""
        env = {
            "GPUJOBS_MODAL_APP": self.app_name,
            "GPUJOBS_MODAL_GPUS": ",".join(self.gpus),
            "GPUJOBS_MODAL_VOLUME": self.volume,
            "GPUJOBS_MODAL_TIMEOUT_S": str(self.timeout_s),
            "GPUJOBS_MODAL_STARTUP_TIMEOUT_S": str(self.startup_timeout_s),
            "GPUJOBS_MODAL_SCALEDOWN_S": str(self.scaledown_window_s),
            "GPUJOBS_MODAL_MIN_CONTAINERS": str(self.min_containers),
            "GPUJOBS_MODAL_PROXY_AUTH": "1" if self.proxy_auth else "0",
        }
        if self.max_containers is not None:
            env["GPUJOBS_MODAL_MAX_CONTAINERS"] = str(self.max_containers)
        if self.image:
            env["GPUJOBS_MODAL_IMAGE"] = self.image
        return env


def worker_image(settings: ModalAppSettings) -> modal.Image:
    """The GPU image: the worker image from a registry, or built here from pinned packages."""
    if settings.image:
        base = modal.Image.from_registry(settings.image)
    else:
        base = modal.Image.debian_slim(python_version="3.12").pip_install(*WORKER_PACKAGES)
    # The weights come from the volume only: never downloaded at start.
    return base.env(
        {"MODEL_PATH": _MODEL_PATH, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    ).add_local_python_source("gpujobs")


settings = ModalAppSettings.from_env(os.environ)
app = modal.App(settings.app_name)
_weights = modal.Volume.from_name(settings.volume, create_if_missing=True)
_web_image = (
    modal.Image.debian_slim(python_version="3.12")
    .pip_install(*WEB_PACKAGES)
    .add_local_python_source("gpujobs")
)


@app.cls(
    image=worker_image(settings),
    gpu=list(settings.gpus),
    volumes={MODELS_DIR: _weights},
    timeout=settings.timeout_s,
    startup_timeout=settings.startup_timeout_s,
    scaledown_window=settings.scaledown_window_s,
    min_containers=settings.min_containers,
    max_containers=settings.max_containers,
    env=dict(settings.as_env()),
)
class Worker:
    """One GPU container: the pipeline loaded once, then one job at a time."""

    @modal.enter()
    def load(self) -> None:
        """Load the pipeline from the volume; a failure fails every job with the reason."""
        self._load()

    def _load(self) -> None:
        from gpujobs.worker.__main__ import pipeline_factory  # noqa: PLC0415 - in the container
        from gpujobs.worker.serverless import make_handler  # noqa: PLC0415
        from gpujobs.worker.service import InferenceService  # noqa: PLC0415

        self.jobs_run = 0
        try:
            service = InferenceService(pipeline_factory(os.environ)())
        except Exception as exc:  # noqa: BLE001 - reported by every job instead of a crash loop
            self.handler: Any = make_handler(None, load_error=str(exc) or type(exc).__name__)
        else:
            self.handler = make_handler(service)

    @modal.method()
    async def run(self, payload: dict[str, Any]) -> dict[str, Any]:
        """One job: the worker contract's request in, the envelope of its response out."""
        from gpujobs.worker._modal_web import run_modal_job  # noqa: PLC0415

        if getattr(self, "handler", None) is None:  # run locally (``.local()``): no enter hook
            self._load()
        cold_start = self.jobs_run == 0
        self.jobs_run += 1
        return await run_modal_job(
            self.handler, payload, job_id=modal.current_input_id(), cold_start=cold_start
        )


@app.function(image=_web_image, timeout=settings.timeout_s, env=dict(settings.as_env()))
@modal.concurrent(max_inputs=200)
@modal.asgi_app(requires_proxy_auth=settings.proxy_auth)
def web() -> Any:
    """The job routes over ``Worker.run`` (see :mod:`gpujobs.worker._modal_web`)."""
    from gpujobs.providers._modal_calls import ModalSdkCalls  # noqa: PLC0415
    from gpujobs.worker._modal_web import create_modal_web_app  # noqa: PLC0415

    return create_modal_web_app(ModalSdkCalls.for_function(Worker().run))
