"""A stand-in for the model: same interface as ``LayeredPipeline``, no torch, instant.

A test seam, not a model. The worker's tests serve it to check the HTTP and RunPod plumbing in
milliseconds; ``python -m gpujobs.worker`` serves it when ``GPUJOBS_WORKER_FAKE=1`` (so runpod's
local test server can be started as a subprocess without weights). Its layers are solid colours
derived from the seed, at the size the real pipeline would produce, so the same request always
gives the same bytes.
"""

from __future__ import annotations

import hashlib
import math
import secrets
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from gpujobs.worker.pipeline import RESOLUTIONS, Generation, PipelineInfo

if TYPE_CHECKING:
    import PIL.Image

__all__ = ["FakePipeline", "layer_size"]


def layer_size(image_size: tuple[int, int], resolution: int) -> tuple[int, int]:
    """The ``(width, height)`` the real pipeline gives its layers for an input of that size.

    It keeps the input's aspect ratio at about ``resolution²`` pixels, each side rounded to a
    multiple of 32 (diffusers 0.42.1, ``calculate_dimensions``).
    """
    width, height = image_size
    ratio = width / height
    out_width = math.sqrt(resolution * resolution * ratio)
    out_height = out_width / ratio
    return round(out_width / 32) * 32, round(out_height / 32) * 32


class FakePipeline:
    """Answers like ``LayeredPipeline.generate``, with solid-colour layers chosen by the seed.

    Args:
        step_s: seconds each step takes (a sleep), to make jobs last.
        load_s: reported as the load time.
        gate: when given, each job waits for it after its first step (tests hold a job
            "running" with it).
        scale: divide the real layer size by this (smaller PNGs in fast tests).

    Attributes:
        info: what a real pipeline reports about itself, with ``model_path="fake"``.
        calls: jobs started so far.
    """

    def __init__(
        self,
        *,
        step_s: float = 0.0,
        load_s: float = 0.0,
        gate: threading.Event | None = None,
        scale: int = 1,
    ) -> None:
        self.info = PipelineInfo(
            model_path="fake", revision="fake-1", device="cpu", dtype="float32", load_s=load_s
        )
        self.calls = 0
        self._step_s = step_s
        self._gate = gate
        self._scale = scale
        self._lock = threading.Lock()

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
        """Make ``layers`` solid RGBA layers; see ``LayeredPipeline.generate`` for the arguments.

        Raises:
            ValueError: ``resolution`` or ``layers`` out of range, as the real pipeline does.
        """
        from PIL import Image  # noqa: PLC0415  # Pillow is a worker extra

        del negative_prompt, cfg_normalize, use_en_prompt  # shape only
        if resolution not in RESOLUTIONS:
            raise ValueError(f"resolution must be one of {RESOLUTIONS}, not {resolution!r}")
        if layers < 1:
            raise ValueError(f"layers must be at least 1, not {layers}")
        used_seed = secrets.randbelow(2**32) if seed is None else seed
        with self._lock:
            self.calls += 1
            start = time.perf_counter()
            for step in range(1, num_inference_steps + 1):
                if self._step_s:
                    time.sleep(self._step_s)
                if on_step is not None:
                    on_step(step, num_inference_steps)
                if step == 1 and self._gate is not None:
                    self._gate.wait()
            width, height = layer_size(image.size, resolution)
            width, height = max(1, width // self._scale), max(1, height // self._scale)
            out = [
                Image.new("RGBA", (width, height), _colour(used_seed, index, prompt))
                for index in range(layers)
            ]
            return Generation(
                layers=out,
                seed=used_seed,
                resolution=resolution,
                width=width,
                height=height,
                steps=num_inference_steps,
                true_cfg_scale=true_cfg_scale,
                inference_s=time.perf_counter() - start,
                peak_gpu_memory_bytes=None,
            )


def _colour(seed: int, index: int, prompt: str | None) -> tuple[int, int, int, int]:
    digest = hashlib.blake2b(f"{seed}/{index}/{prompt}".encode(), digest_size=4).digest()
    red, green, blue, alpha = digest
    return red, green, blue, 255 if index == 0 else alpha
