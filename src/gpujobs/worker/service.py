"""The one code path every deployment mode runs: request in, layers out.

:class:`InferenceService` takes a validated :class:`~gpujobs.worker.schemas.InferenceRequest`,
decodes the picture, calls the pipeline, encodes the layers as PNGs (and, when asked, a .pptx)
and answers the response of the worker contract. The RunPod handler
(:mod:`gpujobs.worker.serverless`) and the pod server (:mod:`gpujobs.worker.pod`) are thin
adapters around it, which is why both give the same bytes for the same request and seed.

- The GPU work (and the CPU-heavy decoding and encoding) runs in a worker thread, never on the
  event loop, and one job at a time: the service holds a lock for the whole job.
- Progress is reported through a callback, ``on_progress(step, total)``, from that thread.
- A job can be cancelled while it runs: set its ``cancel`` event and it stops after the current
  denoising step with :class:`JobCancelledError`.
- Jobs are idempotent by id. A job id seen before answers the response it had (a bounded LRU
  of recent answers), and a job id that is running is waited on, not run twice: RunPod has been
  seen to deliver a long job twice, and Modal re-runs inputs after preemption. A job id reused
  for a different request is refused.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import anyio
import anyio.to_thread

from gpujobs.worker.pipeline import WEIGHTS_MARKER, Generation, PipelineInfo
from gpujobs.worker.schemas import (
    InferenceRequest,
    InferenceResponse,
    InvalidRequest,
    ResponseMetadata,
    Timings,
)

if TYPE_CHECKING:
    import PIL.Image

__all__ = [
    "InferenceService",
    "JobCancelledError",
    "PipelineLike",
    "ProgressCallback",
    "build_pptx",
    "encode_png",
    "request_fingerprint",
]

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[int, int], None]
"""``on_progress(step, total)``, called from the worker thread after each denoising step."""

_EMU_PER_INCH: Final = 914_400
_PPTX_DPI: Final = 96
_PPTX_BLANK_LAYOUT: Final = 6  # "Blank" in python-pptx's default template
_EWMA_WEIGHT: Final = 0.3


class PipelineLike(Protocol):
    """What the service needs of a pipeline: ``LayeredPipeline`` and test fakes both fit."""

    @property
    def info(self) -> PipelineInfo:
        """What was loaded, where, and how long it took."""
        ...

    def generate(
        self,
        image: PIL.Image.Image,
        *,
        layers: int,
        resolution: int,
        prompt: str | None,
        negative_prompt: str | None,
        num_inference_steps: int,
        true_cfg_scale: float,
        seed: int | None,
        on_step: Callable[[int, int], None] | None,
    ) -> Generation:
        """Decompose ``image`` into RGBA layers, bottom first."""
        ...


class JobCancelledError(Exception):
    """The job was cancelled while it ran; its result, if any, was dropped."""


class _Inflight:
    """A job being run, that a second delivery of the same id waits on."""

    __slots__ = ("done", "error", "fingerprint", "response")

    def __init__(self, fingerprint: str) -> None:
        self.fingerprint = fingerprint
        self.done = anyio.Event()
        self.response: dict[str, Any] | None = None
        self.error: BaseException | None = None


class InferenceService:
    """Runs decomposition jobs on one pipeline, one at a time.

    Example::

        service = InferenceService(load_pipeline(model_path))
        response = await service.run(parse_request(job["input"]), job_id=job["id"])

    Args:
        pipeline: a loaded pipeline (``load_pipeline``) or a test fake.
        model: the name reported as ``metadata.model``; by default the Hub repository recorded
            beside the weights by ``fetch_weights``, else the weights folder's name.
        cache_size: how many recent answers are kept for repeated job ids.
    """

    def __init__(
        self,
        pipeline: PipelineLike,
        *,
        model: str | None = None,
        cache_size: int = 32,
    ) -> None:
        self._pipeline = pipeline
        self.model = model or _model_name(pipeline.info)
        self._cache_size = cache_size
        self._answers: OrderedDict[str, tuple[str, dict[str, Any]]] = OrderedDict()
        self._inflight: dict[str, _Inflight] = {}
        self._gpu = anyio.Lock()
        self._observed_job_s: float | None = None
        self._running_since: float | None = None

    @property
    def info(self) -> PipelineInfo:
        """The pipeline's description: path, revision, device, dtype, load time."""
        return self._pipeline.info

    @property
    def busy(self) -> bool:
        """Whether a job is running now."""
        return self._running_since is not None

    @property
    def observed_job_s(self) -> float | None:
        """Moving average of recent jobs' duration, in seconds; ``None`` before the first."""
        return self._observed_job_s

    @property
    def running_for_s(self) -> float:
        """How long the running job has run, in seconds (0 when idle)."""
        since = self._running_since
        return 0.0 if since is None else time.monotonic() - since

    async def run(
        self,
        request: InferenceRequest,
        *,
        job_id: str | None = None,
        received_at: float | None = None,
        on_progress: ProgressCallback | None = None,
        cancel: threading.Event | None = None,
    ) -> dict[str, Any]:
        """Run one job and answer the contract's response as plain JSON types.

        Args:
            request: the validated request.
            job_id: the job's id, for idempotency; ``None`` runs the job unconditionally.
            received_at: ``time.monotonic()`` when the job reached this worker, for
                ``timings.queue_s``; by default now.
            on_progress: called as ``on_progress(step, total)`` after each step (from the
                worker thread; an exception it raises is logged and ignored).
            cancel: set it to stop the job after its current step.

        Returns:
            The response: ``{"layers": [...], "metadata": {...}, "package"?: ...}``.

        Raises:
            InvalidRequest: the picture cannot be decoded, the pipeline refused an argument, or
                the job id was used before for a different request.
            JobCancelledError: ``cancel`` was set while the job ran.
        """
        received_at = time.monotonic() if received_at is None else received_at
        if job_id is None:
            return await self._run_exclusive(request, received_at, on_progress, cancel)
        fingerprint = request_fingerprint(request)
        if (answer := self._answer_for(job_id, fingerprint)) is not None:
            logger.info("job %s was seen before: answering its cached result", job_id)
            return answer
        if (running := self._inflight.get(job_id)) is not None:
            _same_request(job_id, running.fingerprint, fingerprint)
            logger.info("job %s is already running: waiting for that run", job_id)
            await running.done.wait()
            if running.error is not None:
                raise running.error
            assert running.response is not None  # noqa: S101  # set before done
            return running.response
        inflight = self._inflight[job_id] = _Inflight(fingerprint)
        try:
            response = await self._run_exclusive(request, received_at, on_progress, cancel)
        except Exception as exc:
            inflight.error = exc
            raise
        except BaseException:
            # Cancelled from outside: a second delivery waiting on this one must not inherit
            # the cancellation of a task that is not its own.
            inflight.error = JobCancelledError("the first delivery of this job was interrupted")
            raise
        else:
            inflight.response = response
            self._remember(job_id, fingerprint, response)
            return response
        finally:
            del self._inflight[job_id]
            inflight.done.set()

    def cached(self, job_id: str) -> dict[str, Any] | None:
        """The answer kept for ``job_id``, if any."""
        kept = self._answers.get(job_id)
        return None if kept is None else kept[1]

    # -- internals --------------------------------------------------------------------------

    def _answer_for(self, job_id: str, fingerprint: str) -> dict[str, Any] | None:
        kept = self._answers.get(job_id)
        if kept is None:
            return None
        _same_request(job_id, kept[0], fingerprint)
        self._answers.move_to_end(job_id)
        return kept[1]

    def _remember(self, job_id: str, fingerprint: str, response: dict[str, Any]) -> None:
        self._answers[job_id] = (fingerprint, response)
        self._answers.move_to_end(job_id)
        while len(self._answers) > self._cache_size:
            self._answers.popitem(last=False)

    async def _run_exclusive(
        self,
        request: InferenceRequest,
        received_at: float,
        on_progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> dict[str, Any]:
        async with self._gpu:
            started = time.monotonic()
            if cancel is not None and cancel.is_set():
                raise JobCancelledError("the job was cancelled before it started")
            self._running_since = started
            try:
                # Not abandoned on cancellation: the thread owns the GPU until it returns, and
                # the next job must not start beside it. Stop it early with `cancel`.
                return await anyio.to_thread.run_sync(
                    self._run_in_thread,
                    request,
                    started - received_at,
                    on_progress,
                    cancel,
                )
            finally:
                self._running_since = None
                self._observe(time.monotonic() - started)

    def _observe(self, seconds: float) -> None:
        previous = self._observed_job_s
        self._observed_job_s = (
            seconds if previous is None else previous + _EWMA_WEIGHT * (seconds - previous)
        )

    def _run_in_thread(
        self,
        request: InferenceRequest,
        queue_s: float,
        on_progress: ProgressCallback | None,
        cancel: threading.Event | None,
    ) -> dict[str, Any]:
        decode_start = time.perf_counter()
        image = request.open_image()
        decode_s = time.perf_counter() - decode_start

        def on_step(step: int, total: int) -> None:
            if cancel is not None and cancel.is_set():
                raise JobCancelledError(f"the job was cancelled at step {step} of {total}")
            if on_progress is not None:
                try:
                    on_progress(step, total)
                except Exception:
                    logger.exception("a progress callback failed; the job goes on")

        try:
            generation = self._pipeline.generate(
                image,
                layers=request.layers,
                resolution=request.resolution,
                prompt=request.prompt,
                negative_prompt=request.negative_prompt,
                num_inference_steps=request.num_inference_steps,
                true_cfg_scale=request.true_cfg_scale,
                seed=request.seed,
                on_step=on_step,
            )
        except ValueError as exc:
            # The pipeline checks its arguments before any work (e.g. a prompt is required
            # when it cannot caption, or a scheduler that needs two steps).
            raise InvalidRequest(str(exc)) from None
        if cancel is not None and cancel.is_set():
            raise JobCancelledError("the job was cancelled; its result was dropped")

        encode_start = time.perf_counter()
        pngs = [encode_png(layer) for layer in generation.layers]
        package = None
        if request.output_format == "pptx":
            package = build_pptx(pngs, generation.width, generation.height)
        encode_s = decode_s + time.perf_counter() - encode_start

        info = self._pipeline.info
        response = InferenceResponse(
            layers=[base64.b64encode(png).decode("ascii") for png in pngs],
            metadata=ResponseMetadata(
                seed=generation.seed,
                resolution=generation.resolution,
                width=generation.width,
                height=generation.height,
                layers=len(generation.layers),
                steps=generation.steps,
                true_cfg_scale=generation.true_cfg_scale,
                timings=Timings(
                    load_s=round(info.load_s, 4),
                    queue_s=round(max(queue_s, 0.0), 4),
                    inference_s=round(generation.inference_s, 4),
                    encode_s=round(encode_s, 4),
                ),
                device=info.device,
                dtype=info.dtype,
                peak_gpu_memory_bytes=generation.peak_gpu_memory_bytes,
                model=self.model,
                revision=info.revision,
            ),
            package=None if package is None else base64.b64encode(package).decode("ascii"),
        )
        return response.to_json_dict()


def encode_png(layer: PIL.Image.Image) -> bytes:
    """One RGBA layer as PNG bytes; the same pixels always give the same bytes."""
    buffer = io.BytesIO()
    rgba = layer if layer.mode == "RGBA" else layer.convert("RGBA")
    rgba.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def build_pptx(pngs: list[bytes], width: int, height: int) -> bytes:
    """A one-slide PowerPoint file with every layer as a full-slide picture, bottom first.

    The slide is the layers' size at 96 dpi, on the blank layout; each PNG sits at (0, 0) at
    full size, in order, so PowerPoint shows the composite and each layer stays editable.

    Args:
        pngs: the layers as PNG bytes, bottom first.
        width: layer width in pixels.
        height: layer height in pixels.
    """
    from pptx import Presentation  # noqa: PLC0415  # python-pptx is a worker extra
    from pptx.util import Emu  # noqa: PLC0415

    presentation = Presentation()
    slide_width = Emu(width * _EMU_PER_INCH // _PPTX_DPI)
    slide_height = Emu(height * _EMU_PER_INCH // _PPTX_DPI)
    presentation.slide_width = slide_width
    presentation.slide_height = slide_height
    slide = presentation.slides.add_slide(presentation.slide_layouts[_PPTX_BLANK_LAYOUT])
    for index, png in enumerate(pngs):
        picture = slide.shapes.add_picture(
            io.BytesIO(png), 0, 0, width=slide_width, height=slide_height
        )
        picture.name = f"Layer {index + 1}"
    buffer = io.BytesIO()
    presentation.save(buffer)
    return buffer.getvalue()


def request_fingerprint(request: InferenceRequest) -> str:
    """A digest of everything the request asks for: equal digests, equal requests."""
    digest = hashlib.sha256(request.image_bytes)
    digest.update(json.dumps(request.model_dump(exclude={"image"}), sort_keys=True).encode())
    return digest.hexdigest()


def _same_request(job_id: str, kept: str, given: str) -> None:
    if kept != given:
        raise InvalidRequest(
            f"job id {job_id!r} was already used for a different request; use a new id"
        )


def _model_name(info: PipelineInfo) -> str:
    """The Hub repository ``fetch_weights`` recorded beside the weights, else the folder name."""
    try:
        marker = json.loads((Path(info.model_path) / WEIGHTS_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        marker = None
    if isinstance(marker, dict) and isinstance(marker.get("repo_id"), str):
        return str(marker["repo_id"])
    return Path(info.model_path).name or info.model_path
