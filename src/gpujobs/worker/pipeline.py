"""Load Qwen-Image-Layered from local weights and run one decomposition job.

This module is the worker's only door to the model. It never downloads: the weights are put in
``MODEL_PATH`` once, by an operator, with ``python -m gpujobs.worker.fetch_weights`` (see
:mod:`gpujobs.worker.fetch_weights`), and :func:`load_pipeline` reads them with the Hugging Face
Hub switched off. A missing or half-filled folder is a :class:`WeightsMissingError` at start-up,
never a 58 GB download during a cold start.

torch, diffusers and Pillow are imported inside the functions that need them, so that importing
this module (for :class:`WeightsMissingError` or :func:`check_weights`, as ``fetch_weights`` does in
a download-only build stage) costs nothing.

Facts relied on, read in diffusers 0.42.1 ``pipelines/qwenimage/pipeline_qwenimage_layered.py``:

- ``resolution`` must be 640 or 1024 (checked there with ``assert``, so we check it first: asserts
  vanish under ``python -O``). The output keeps the input's aspect ratio at about resolution²
  pixels, each side a multiple of 16 after rounding to 32.
- The prompt ``None``, ``""`` or ``" "`` makes the Qwen2.5-VL model caption the image first, which
  needs the ``processor`` component (``Qwen2VLProcessor``, which needs torchvision).
- Classifier-free guidance runs only when ``true_cfg_scale > 1`` and a negative prompt is given;
  the pipeline then calls the transformer twice per step (conditional, then unconditional).
- The image is pre-processed with as many channels as it has: an RGB image reaches the RGBA VAE
  with 3 channels and fails, so every image is converted to RGBA here.
- ``callback_on_step_end(pipe, step_index, timestep, tensors)`` runs after each step and must
  return a dict.
- ``images[0]`` is the list of ``layers`` RGBA images, bottom layer first.

On CUDA the transformer is optimized by default (real-valued RoPE and compiled blocks, see
:mod:`gpujobs.worker._speedups`): the compilation then runs during the first job, which
:meth:`LayeredPipeline.warm_up` lets the cold start pay instead of a user.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import PIL.Image
    import torch

    from gpujobs.worker import _speedups

__all__ = [
    "MODEL_ID",
    "RESOLUTIONS",
    "WEIGHTS_MARKER",
    "Generation",
    "LayeredPipeline",
    "PipelineInfo",
    "WeightsMissingError",
    "check_weights",
    "load_pipeline",
]

MODEL_ID = "Qwen/Qwen-Image-Layered"
"""The Hugging Face repository the weights come from."""

RESOLUTIONS = (640, 1024)
"""The two resolution buckets the pipeline accepts."""

WEIGHTS_MARKER = "gpujobs-weights.json"
"""File that ``fetch_weights`` writes beside the weights: repository, revision and commit."""

PIPELINE_CLASS = "QwenImageLayeredPipeline"
_MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes up to an unsigned 64-bit value
_DRAWN_SEED_BOUND = 2**32  # drawn seeds stay small enough for every JSON client
# Dynamic shapes: one compilation serves every prompt length, image size and layer count. With
# static shapes (what the benchmark timed) each new prompt length or size compiled again, 3-6 s
# inside a user's job; the compiled forward was as fast either way (NVIDIA H200, 640 and 1024).
_COMPILE_DYNAMIC = True
_WARM_UP_PROMPT = "warm-up"


class WeightsMissingError(Exception):
    """``MODEL_PATH`` does not hold a complete copy of the Qwen-Image-Layered weights.

    Raised by :func:`check_weights` and :func:`load_pipeline` before anything is loaded, so a
    worker fails at start-up with a message that says how to fill the folder, instead of trying
    to download ~58 GB while a job waits.

    Attributes:
        model_path: the folder that was checked.
        problem: what is wrong with it, in a few words.
    """

    def __init__(self, model_path: str | os.PathLike[str], problem: str) -> None:
        self.model_path = str(model_path)
        self.problem = problem
        super().__init__(
            f"no usable {MODEL_ID} weights at MODEL_PATH={self.model_path}: {problem}. "
            "The worker never downloads weights at start-up. Fill that folder once (a network "
            "volume, or a Docker build stage) with "
            f"`python -m gpujobs.worker.fetch_weights {self.model_path}`, "
            "or point MODEL_PATH at a folder that holds them."
        )


@dataclass(frozen=True)
class PipelineInfo:
    """What was loaded, where, and how long it took.

    Attributes:
        model_path: absolute path of the weights folder.
        revision: the Hub commit (or revision name) the weights came from, as recorded by
            ``fetch_weights``; ``None`` when the folder was filled some other way.
        device: ``"cuda"``, ``"cuda:1"``, ``"cpu"``...
        dtype: ``"bfloat16"`` on CUDA, ``"float32"`` on CPU.
        load_s: seconds spent reading the weights and moving them to the device.
        optimized: whether the transformer uses real-valued RoPE and compiled blocks (see
            :func:`load_pipeline`'s ``optimize``).
        compile_s: seconds that :meth:`LayeredPipeline.warm_up` spent compiling; ``None`` before
            a warm-up, when not optimized, or when this torch cannot tell.
    """

    model_path: str
    revision: str | None
    device: str
    dtype: str
    load_s: float
    optimized: bool = False
    compile_s: float | None = None


@dataclass(frozen=True)
class Generation:
    """The result of one :meth:`LayeredPipeline.generate` call.

    Attributes:
        layers: RGBA images, bottom layer first; ``Image.alpha_composite`` over them in order
            rebuilds the picture.
        seed: the seed used (drawn at random when none was given), so the job can be repeated.
        resolution: the resolution bucket (640 or 1024).
        width: width of every layer, in pixels.
        height: height of every layer, in pixels.
        steps: denoising steps run.
        true_cfg_scale: the guidance scale asked for (guidance runs only with a negative prompt).
        inference_s: wall-clock seconds of the pipeline call, captioning included.
        peak_gpu_memory_bytes: ``torch.cuda.max_memory_allocated`` during the job; ``None`` on CPU.
        compile_s: seconds of ``inference_s`` spent compiling the transformer's blocks: most of
            the first job's time without a warm-up, ``0.0`` once warm. ``None`` when the pipeline
            is not optimized, or when this torch cannot tell.
    """

    layers: list[PIL.Image.Image]
    seed: int
    resolution: int
    width: int
    height: int
    steps: int
    true_cfg_scale: float
    inference_s: float
    peak_gpu_memory_bytes: int | None
    compile_s: float | None = None


def check_weights(model_path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check that ``model_path`` holds a complete diffusers copy of Qwen-Image-Layered.

    Looks only at the files (no torch, no network): ``model_index.json`` naming
    ``QwenImageLayeredPipeline``, a non-empty folder for every component it lists, and every
    shard named by a ``*.index.json`` file (a download cut short leaves shards missing).

    Args:
        model_path: the weights folder (``MODEL_PATH``).

    Returns:
        The parsed ``model_index.json``.

    Raises:
        WeightsMissingError: saying what is missing.
    """
    path = Path(model_path)
    if not path.exists():
        raise WeightsMissingError(path, "the folder does not exist")
    if not path.is_dir():
        raise WeightsMissingError(path, "it is not a folder")
    index_file = path / "model_index.json"
    if not index_file.is_file():
        empty = not any(path.iterdir())
        raise WeightsMissingError(
            path, "the folder is empty" if empty else "model_index.json is missing"
        )
    try:
        index = json.loads(index_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise WeightsMissingError(path, f"model_index.json cannot be read ({exc})") from exc
    if not isinstance(index, dict) or index.get("_class_name") != PIPELINE_CLASS:
        found = index.get("_class_name") if isinstance(index, dict) else None
        raise WeightsMissingError(
            path, f"model_index.json describes {found!r}, not {PIPELINE_CLASS}"
        )
    for name in _components(index):
        folder = path / name
        if not folder.is_dir() or not any(folder.iterdir()):
            raise WeightsMissingError(path, f"the {name}/ folder is missing or empty")
        for shard_index in folder.glob("*.index.json"):
            _check_shards(path, folder, shard_index)
    return index


def load_pipeline(
    model_path: str | os.PathLike[str],
    *,
    device: str | None = None,
    optimize: bool | None = None,
) -> LayeredPipeline:
    """Load the pipeline from local weights, with the Hugging Face Hub switched off.

    bf16 on CUDA, fp32 on CPU. A component saved as ``null`` in ``model_index.json`` (the
    ``processor`` of the tiny test model) is loaded as ``None``; such a pipeline cannot caption,
    so it needs a prompt for every job.

    Optimized, the transformer applies RoPE without complex numbers and its 60 blocks are
    compiled with ``torch.compile``: ~20 % less time a job on an H100 (46.6 s → 37.4 s for 50
    steps with CFG at 640; ``docs/worker-performance.md``). The compilation runs during the
    first job (seconds to tens of seconds); call :meth:`LayeredPipeline.warm_up` before taking
    jobs so that the cold start pays it. The layers differ from the stock pipeline's by rounding
    only.

    Args:
        model_path: the weights folder (``MODEL_PATH``), as ``fetch_weights`` filled it.
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``; by default CUDA when there is one.
        optimize: real-valued RoPE and compiled blocks; ``None`` (the default) means on CUDA
            only. A worker's entry point maps ``WORKER_COMPILE=0``/``1`` to ``False``/``True``
            (this module reads no environment variable).

    Returns:
        A :class:`LayeredPipeline` ready for :meth:`~LayeredPipeline.generate`.

    Raises:
        WeightsMissingError: the folder is missing, empty or incomplete (checked before any
            import of diffusers, and without touching the network).

    Example:
        >>> pipe = load_pipeline(os.environ["MODEL_PATH"])  # doctest: +SKIP
        >>> pipe.warm_up()  # doctest: +SKIP
        >>> result = pipe.generate(image, layers=4, seed=7)  # doctest: +SKIP
    """
    # An absolute path: from_pretrained takes a string that is not a folder for a Hub repo id.
    path = Path(model_path).expanduser().resolve()
    index = check_weights(path)

    import torch  # noqa: PLC0415  # heavy: only a worker that loads the model pays for it

    resolved_device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(resolved_device).type == "cuda"
    dtype = torch.bfloat16 if on_cuda else torch.float32
    # diffusers refuses to build a pipeline whose saved component is null unless it is passed.
    absent = {name: None for name, spec in index.items() if _is_null_component(name, spec)}

    start = time.perf_counter()
    with _hub_offline():
        # Imported as untyped: diffusers' own annotations are partial and would fail --strict.
        diffusers: Any = importlib.import_module("diffusers")
        pipe = diffusers.QwenImageLayeredPipeline.from_pretrained(
            str(path), local_files_only=True, dtype=dtype, **absent
        )
    pipe.to(resolved_device)
    if not on_cuda:
        # The VAE's RMS norm reduces over channels; with channels-last 3D weights that reduction
        # is contiguous and the CPU decode runs ~4x faster (measured on the tiny model).
        _vae_convs_channels_last(pipe.vae)
    optimized = on_cuda if optimize is None else optimize
    if optimized:
        from gpujobs.worker import _speedups  # noqa: PLC0415  # imports torch._dynamo

        _speedups.use_real_rope(pipe.transformer)
        _speedups.compile_blocks(pipe.transformer, dynamic=_COMPILE_DYNAMIC)
    pipe.set_progress_bar_config(disable=True)
    if on_cuda:
        torch.cuda.synchronize(resolved_device)
    load_s = time.perf_counter() - start

    info = PipelineInfo(
        model_path=str(path),
        revision=_recorded_revision(path),
        device=resolved_device,
        dtype=str(dtype).removeprefix("torch."),
        load_s=load_s,
        optimized=optimized,
    )
    return LayeredPipeline(pipe, info)


class LayeredPipeline:
    """A loaded Qwen-Image-Layered pipeline that runs one job at a time.

    Build it with :func:`load_pipeline`. :meth:`generate` holds a lock for the whole job: the
    scheduler inside the pipeline keeps per-job state, and one GPU runs one job at a time anyway.

    Attributes:
        info: what was loaded, where, and how long it took.
    """

    def __init__(self, pipe: Any, info: PipelineInfo) -> None:
        self._pipe = pipe
        self.info = info
        self._lock = threading.Lock()

    @property
    def can_caption(self) -> bool:
        """Whether the pipeline can write its own prompt (it has the VL ``processor``)."""
        return getattr(self._pipe, "processor", None) is not None

    def warm_up(self, *, resolution: int = 640, layers: int = 4, steps: int = 2) -> Generation:
        """Run one small job, so that the cold start pays for compilation, not a user's job.

        On an optimized pipeline (:attr:`PipelineInfo.optimized`) the transformer's blocks
        compile during this job, once for the prompt lengths, image sizes and layer counts of
        every later job; the seconds it spent compiling go to ``info.compile_s``.
        Without optimization it only loads the GPU's kernels, which the first job would do too.

        Args:
            resolution: 640 or 1024.
            layers: number of layers of the warm-up job.
            steps: denoising steps (at least 2).

        Returns:
            The warm-up job's result; its ``compile_s`` says how long compilation took.
        """
        from PIL import Image  # noqa: PLC0415  # Pillow is a worker extra

        grey = Image.new("RGBA", (resolution, resolution), (128, 128, 128, 255))
        generation = self.generate(
            grey,
            layers=layers,
            resolution=resolution,
            prompt=_WARM_UP_PROMPT,  # never caption: that would run the 7B VL model for nothing
            num_inference_steps=steps,
            seed=0,
        )
        if self.info.optimized:
            self.info = dataclasses.replace(self.info, compile_s=generation.compile_s)
        return generation

    def generate(
        self,
        image: PIL.Image.Image,
        *,
        layers: int = 4,
        resolution: int = 640,
        prompt: str | None = None,
        negative_prompt: str | None = " ",
        num_inference_steps: int = 50,
        true_cfg_scale: float = 4.0,
        seed: int | None = None,
        cfg_normalize: bool = True,
        use_en_prompt: bool = True,
        on_step: Callable[[int, int], None] | None = None,
    ) -> Generation:
        """Decompose ``image`` into ``layers`` RGBA layers.

        The defaults are the model card's settings (negative prompt ``" "``, 50 steps, CFG 4.0,
        ``cfg_normalize`` and English captions on).

        Args:
            image: any Pillow image; converted to RGBA (EXIF rotation applied first).
            layers: number of layers to produce (at least 1).
            resolution: 640 or 1024; the output keeps the input's aspect ratio at about
                resolution² pixels.
            prompt: a description of the image. Empty or ``None``: the model captions the image
                first (slower, and only when :attr:`can_caption`).
            negative_prompt: ``None`` turns classifier-free guidance off (twice as fast per step).
            num_inference_steps: denoising steps; at least 2 with the model's scheduler (its
                ``shift_terminal`` divides by zero for a single step and yields NaN images).
            true_cfg_scale: guidance scale; guidance runs when it is above 1 and a negative
                prompt is given.
            seed: makes the job repeatable; drawn at random (and reported) when ``None``.
            cfg_normalize: rescale the guided prediction to the norm of the conditional one.
            use_en_prompt: caption in English rather than Chinese.
            on_step: called as ``on_step(step, total)`` after each step, ``step`` counting from
                1. An exception it raises aborts the job and propagates (a way to cancel).

        Returns:
            The layers and what produced them.

        Raises:
            ValueError: an argument is out of range, or no prompt was given to a pipeline that
                cannot caption.
        """
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, not {resolution!r}")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, not {layers}")
        min_steps = 2 if self._pipe.scheduler.config.get("shift_terminal") else 1
        if num_inference_steps < min_steps:
            raise ValueError(
                f"num_inference_steps must be at least {min_steps}, not {num_inference_steps}"
            )
        if not math.isfinite(true_cfg_scale):
            raise ValueError(f"true_cfg_scale must be a finite number, not {true_cfg_scale}")
        if seed is not None and not 0 <= seed <= _MAX_SEED:
            raise ValueError(f"seed must be between 0 and 2**64 - 1, not {seed}")
        caption = prompt is None or not prompt.strip()
        if caption and not self.can_caption:
            raise ValueError(
                "a prompt is required: this pipeline has no processor (Qwen2VLProcessor) to "
                "caption the image itself"
            )
        used_seed = secrets.randbelow(_DRAWN_SEED_BOUND) if seed is None else seed
        rgba = _to_rgba(image)

        with self._lock:
            return self._run(
                rgba,
                layers=layers,
                resolution=resolution,
                # The pipeline captions for None, "" and " " only: "  " would be used as is.
                prompt=None if caption else prompt,
                negative_prompt=negative_prompt,
                num_inference_steps=num_inference_steps,
                true_cfg_scale=true_cfg_scale,
                seed=used_seed,
                cfg_normalize=cfg_normalize,
                use_en_prompt=use_en_prompt,
                on_step=on_step,
            )

    def _run(
        self,
        image: PIL.Image.Image,
        *,
        layers: int,
        resolution: int,
        prompt: str | None,
        negative_prompt: str | None,
        num_inference_steps: int,
        true_cfg_scale: float,
        seed: int,
        cfg_normalize: bool,
        use_en_prompt: bool,
        on_step: Callable[[int, int], None] | None,
    ) -> Generation:
        import torch  # noqa: PLC0415

        device = torch.device(self.info.device)
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.reset_peak_memory_stats(device)
        generator = torch.Generator(device=device).manual_seed(seed)

        callback = None
        if on_step is not None:
            report = on_step

            def callback(
                _pipe: Any, step_index: int, _timestep: Any, _tensors: dict[str, Any]
            ) -> dict[str, Any]:
                report(step_index + 1, num_inference_steps)
                return {}  # nothing replaced: the pipeline keeps its own latents

        start = time.perf_counter()
        with torch.inference_mode(), self._compile_clock() as clock:
            output = self._pipe(
                image=image,
                prompt=prompt,
                negative_prompt=negative_prompt,
                true_cfg_scale=true_cfg_scale,
                layers=layers,
                num_inference_steps=num_inference_steps,
                num_images_per_prompt=1,  # more than 1 groups the layers wrongly in 0.42.1
                generator=generator,
                output_type="pil",
                callback_on_step_end=callback,
                resolution=resolution,
                cfg_normalize=cfg_normalize,
                use_en_prompt=use_en_prompt,
            )
        inference_s = time.perf_counter() - start

        out_layers = [
            layer if layer.mode == "RGBA" else layer.convert("RGBA") for layer in output.images[0]
        ]
        width, height = out_layers[0].size
        peak = int(torch.cuda.max_memory_allocated(device)) if on_cuda else None
        return Generation(
            layers=out_layers,
            seed=seed,
            resolution=resolution,
            width=width,
            height=height,
            steps=num_inference_steps,
            true_cfg_scale=true_cfg_scale,
            inference_s=inference_s,
            peak_gpu_memory_bytes=peak,
            compile_s=None if clock is None else clock.seconds,
        )

    def _compile_clock(self) -> contextlib.AbstractContextManager[_speedups.CompileClock | None]:
        """Times compilation during a job of an optimized pipeline; ``None`` otherwise."""
        if not self.info.optimized:
            return contextlib.nullcontext()
        from gpujobs.worker import _speedups  # noqa: PLC0415

        return _speedups.CompileClock()


def _components(index: dict[str, Any]) -> list[str]:
    """Names of the components that ``model_index.json`` says were saved."""
    return [
        name
        for name, spec in index.items()
        if not name.startswith("_")
        and isinstance(spec, list)
        and len(spec) == 2  # noqa: PLR2004  # [library, class]
        and spec[0] is not None
    ]


def _is_null_component(name: str, spec: Any) -> bool:
    return (
        not name.startswith("_")
        and isinstance(spec, list)
        and len(spec) == 2  # noqa: PLR2004  # [library, class]
        and spec[0] is None
    )


def _check_shards(root: Path, folder: Path, shard_index: Path) -> None:
    try:
        weight_map = json.loads(shard_index.read_text(encoding="utf-8")).get("weight_map", {})
    except (OSError, ValueError, AttributeError) as exc:
        raise WeightsMissingError(root, f"{folder.name}/{shard_index.name} is unreadable") from exc
    for shard in sorted(set(weight_map.values())):
        if not (folder / shard).is_file():
            raise WeightsMissingError(
                root, f"{folder.name}/{shard} is missing (an interrupted download?)"
            )


def _recorded_revision(path: Path) -> str | None:
    """The commit (else the revision) that ``fetch_weights`` recorded, if it did."""
    try:
        marker = json.loads((path / WEIGHTS_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(marker, dict):
        return None
    for key in ("commit", "revision"):
        value = marker.get(key)
        if isinstance(value, str) and value:
            return value
    return None


@contextlib.contextmanager
def _hub_offline() -> Iterator[None]:
    """Switch the Hugging Face Hub off while the weights load.

    ``local_files_only=True`` and an absolute folder path already keep diffusers off the
    network; this also covers anything that asks huggingface_hub directly. The library reads
    ``HF_HUB_OFFLINE`` once, at import, so both the variable and the constant are set.
    """
    import huggingface_hub.constants as hub_constants  # noqa: PLC0415

    saved_env = os.environ.get("HF_HUB_OFFLINE")
    saved_constant = hub_constants.HF_HUB_OFFLINE
    os.environ["HF_HUB_OFFLINE"] = "1"
    hub_constants.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        hub_constants.HF_HUB_OFFLINE = saved_constant
        if saved_env is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = saved_env


def _vae_convs_channels_last(vae: torch.nn.Module) -> None:
    """Store the VAE's 3D convolution weights channels-last (``Module.to`` refuses: 4D params)."""
    import torch  # noqa: PLC0415

    for module in vae.modules():
        if isinstance(module, torch.nn.Conv3d):
            module.weight.data = module.weight.data.to(memory_format=torch.channels_last_3d)


def _to_rgba(image: PIL.Image.Image) -> PIL.Image.Image:
    """The picture as a viewer shows it, in RGBA: the VAE takes four channels."""
    from PIL import Image, ImageOps  # noqa: PLC0415

    upright: Image.Image = ImageOps.exif_transpose(image)
    return upright if upright.mode == "RGBA" else upright.convert("RGBA")
