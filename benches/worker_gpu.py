"""Qwen-Image-Layered on one GPU: seconds per job, MFU, peak memory, and what makes it faster.

No weights exist on the benchmark machine, so this builds the real architecture with random
weights, directly on the GPU in bf16:

- transformer: ``QwenImageTransformer2DModel`` with the model's config (60 blocks, 24 heads × 128,
  ``joint_attention_dim`` 3584, ``in_channels`` 64, ``out_channels`` 16, ``axes_dims_rope``
  (16, 56, 56), ``use_additional_t_cond``, ``use_layer3d_rope``): ~20.4 B parameters;
- VAE: ``AutoencoderKLQwenImage`` at full size (base 96, ``z_dim`` 16, RGBA input);
- text encoder: skipped. The 7B Qwen2.5-VL would only turn the prompt into embeddings (a few ms;
  captioning an image when no prompt is sent costs much more and is not measured here). The
  pipeline is given random prompt embeddings of realistic length instead: 256 tokens for the
  prompt (a detailed caption) and 6 for the negative prompt ``" "`` (what the pipeline's template
  leaves of it). By default 16.6 GB are set aside on the GPU for its weights, so peak memory is
  what a serving worker needs.

Each job is the stock ``QwenImageLayeredPipeline.__call__`` (diffusers 0.42.1): VAE encode, the
denoising loop with true CFG (two transformer forwards a step), VAE decode, PIL output. A job
is timed whole and by phase (VAE encode / decode timed with synchronisation, the rest is the
denoising loop). From one measured job of N steps the script projects the time of 20- and
50-step jobs (fixed part + steps × time a step), so a short sweep compares variants and a few
full jobs confirm.

MFU of the transformer: the FLOPs of one forward are counted once per shape with
``torch.utils.flop_counter.FlopCounterMode``; MFU = FLOPs a step × steps / seconds / peak, where
the FLOPs a step are those of the conditional plus the unconditional forward (the work needed,
whatever a variant does), and the peak is the GPU's dense bf16 figure (989.4 TFLOP/s for H100
SXM and H200; ``--peak-tflops`` overrides). ``mfu`` uses the denoising time, ``mfu job`` the
whole job.

Variants (``--variants``, comma-separated; options joined with ``+``, e.g. ``cudnn+compile``):

- ``stock``: nothing changed;
- ``flash`` / ``cudnn`` / ``efficient`` / ``math``: only that SDPA backend
  (``torch.nn.attention.sdpa_kernel``);
- ``compile`` / ``compile-max``: regional ``torch.compile`` of the 60 transformer blocks (all run
  the same code, so one block's compilation serves all), mode ``default`` or
  ``max-autotune-no-cudagraphs``, ``dynamic=False``; compile time is reported apart;
- ``cfgbatch``: CFG as one batch-2 forward instead of two (the pipeline runs two). A stand-in
  transformer runs both halves on the pipeline's conditional call, returns the unconditional
  half on its next call, and leaves every line of the pipeline's math as it is. The negative
  prompt is padded to the prompt's length and masked, which rules out the flash kernel; the
  script checks batched against two forwards numerically before timing it;
- ``vae-tiling``: ``vae.enable_tiling()``;
- ``vae-cl``: the VAE's convolution weights stored channels-last;
- ``cudnn-bench``: ``torch.backends.cudnn.benchmark = True`` (VAE convolutions).

Prints a Markdown table as it goes and rewrites a JSON file after every job (``--json``, default
``$OUT/worker_gpu.json`` when ``$OUT`` is set). ``--time-budget`` is hard: no job starts that
would not end in time, and one running past it is stopped at its next step.

Check it on CPU first: ``python benches/worker_gpu.py --tiny``. See benches/README-worker.md for
the device commands.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import importlib
import json
import math
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

PROCESS_START = time.monotonic()  # the time budget counts from here, diffusers import included
FULL_TRANSFORMER: dict[str, Any] = {
    "patch_size": 2,
    "in_channels": 64,
    "out_channels": 16,
    "num_layers": 60,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 3584,
    "guidance_embeds": False,
    "axes_dims_rope": (16, 56, 56),
    "zero_cond_t": False,
    "use_additional_t_cond": True,
    "use_layer3d_rope": True,
}
TINY_TRANSFORMER: dict[str, Any] = {
    **FULL_TRANSFORMER,
    "in_channels": 32,
    "out_channels": 8,
    "num_layers": 2,
    "attention_head_dim": 16,
    "num_attention_heads": 3,
    "joint_attention_dim": 32,
    "axes_dims_rope": (4, 6, 6),
}
FULL_VAE: dict[str, Any] = {
    "base_dim": 96,
    "z_dim": 16,
    "dim_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
    "dropout": 0.0,
    "input_channels": 4,
}
TINY_VAE: dict[str, Any] = {
    **FULL_VAE,
    "base_dim": 4,
    "z_dim": 8,
    "num_res_blocks": 1,
    "latents_mean": [0.0] * 8,
    "latents_std": [1.0] * 8,
}
# The Qwen-Image family's scheduler/scheduler_config.json. gpujobs.worker.tiny holds the same
# published file; this script stays standalone (the GPU machine runs it with wheels alone).
SCHEDULER: dict[str, Any] = {
    "base_image_seq_len": 256,
    "base_shift": 0.5,
    "invert_sigmas": False,
    "max_image_seq_len": 8192,
    "max_shift": 0.9,
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "shift_terminal": 0.02,
    "stochastic_sampling": False,
    "time_shift_type": "exponential",
    "use_beta_sigmas": False,
    "use_dynamic_shifting": True,
    "use_exponential_sigmas": False,
    "use_karras_sigmas": False,
}
TEXT_ENCODER_BYTES = 16.6e9  # Qwen2.5-VL-7B (8.3 B parameters) in bf16
# Dense bf16 tensor-core peaks (vendor datasheets), first match on the device name wins.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("RTX 4090", 165.2),
)
DEFAULT_VARIANTS = (
    "stock,cudnn,flash,efficient,cfgbatch,cudnn+cfgbatch,rope-real,vae-cl,cudnn-bench,"
    "vae-tiling,cudnn+compile,cudnn+rope-real+compile"
)
QUICK_VARIANTS = "stock,cudnn,cudnn+rope-real+compile"
TINY_VARIANTS = "stock,flash,cfgbatch,rope-real,vae-cl,vae-tiling,cudnn-bench,rope-real+compile"
ATTENTION_OPTIONS = ("flash", "cudnn", "efficient", "math")
COMPILE_MODES = {"compile": "default", "compile-max": "max-autotune-no-cudagraphs"}
FLAG_OPTIONS = {
    "cfgbatch": "cfg_batch",
    "rope-real": "real_rope",
    "vae-tiling": "vae_tiling",
    "vae-cl": "vae_channels_last",
    "cudnn-bench": "cudnn_benchmark",
}
WARMUP_STEPS = 2  # one step divides by zero in the scheduler (shift_terminal) and yields NaN
COMPILE_ESTIMATE_S = 150.0  # budget kept free for a first compilation


class BudgetExceededError(RuntimeError):
    """The hard time budget ran out during a job."""


@dataclasses.dataclass(frozen=True)
class Variant:
    """One combination of options, parsed from e.g. ``cudnn+compile``."""

    name: str
    attention: str | None = None
    compile_mode: str | None = None
    cfg_batch: bool = False
    real_rope: bool = False
    vae_tiling: bool = False
    vae_channels_last: bool = False
    cudnn_benchmark: bool = False

    @classmethod
    def parse(cls, text: str) -> Variant:
        """Parse ``opt+opt+...``; ``stock`` is the empty set."""
        fields: dict[str, Any] = {}
        for option in text.strip().split("+"):
            if option == "stock":
                continue
            if option in ATTENTION_OPTIONS:
                if "attention" in fields:
                    raise ValueError(f"{text}: two attention backends")
                fields["attention"] = option
            elif option in COMPILE_MODES:
                fields["compile_mode"] = COMPILE_MODES[option]
            elif option in FLAG_OPTIONS:
                fields[FLAG_OPTIONS[option]] = True
            else:
                known = ", ".join(("stock", *ATTENTION_OPTIONS, *COMPILE_MODES, *FLAG_OPTIONS))
                raise ValueError(f"unknown option {option!r} in {text!r}; known: {known}")
        return cls(name=text.strip(), **fields)


class BatchedCfgTransformer(torch.nn.Module):
    """Stands in for the transformer: CFG as one batch-2 forward instead of two.

    The pipeline calls the transformer twice a step with the same ``hidden_states`` tensor: first
    with the prompt, then with the negative prompt. On the first call this runs both in one
    batch (the negative prompt, known in advance, is padded to the prompt's length and masked)
    and returns the conditional half; the second call gets the unconditional half. The pipeline's
    own CFG arithmetic is untouched.
    """

    def __init__(self, inner: Any, negative_embeds: torch.Tensor) -> None:
        super().__init__()
        self.inner: Any = inner  # a diffusers model: untyped
        self.config = inner.config
        self.negative_embeds = negative_embeds
        self._stash: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def dtype(self) -> torch.dtype:
        dtype: torch.dtype = self.inner.dtype
        return dtype

    @property
    def device(self) -> torch.device:
        device: torch.device = self.inner.device
        return device

    def cache_context(self, name: str) -> Any:
        return self.inner.cache_context(name)

    def forward(
        self,
        *,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        img_shapes: list[Any],
        encoder_hidden_states_mask: torch.Tensor | None = None,
        additional_t_cond: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        attention_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
    ) -> tuple[torch.Tensor]:
        del return_dict  # always a tuple, as the pipeline asks
        if self._stash is not None and self._stash[0] is hidden_states:
            uncond = self._stash[1]
            self._stash = None
            return (uncond,)
        if encoder_hidden_states_mask is not None or guidance is not None:
            raise NotImplementedError("the bench gives unpadded embeddings and no guidance")
        embeds, mask = pad_and_stack([encoder_hidden_states, self.negative_embeds])
        out = self.inner(
            hidden_states=torch.cat([hidden_states, hidden_states]),
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=mask,
            timestep=torch.cat([timestep, timestep]),
            img_shapes=img_shapes * 2,
            additional_t_cond=None
            if additional_t_cond is None
            else torch.cat([additional_t_cond, additional_t_cond]),
            attention_kwargs=attention_kwargs,
            return_dict=False,
        )[0]
        self._stash = (hidden_states, out[1:])
        return (out[:1],)


class TextEncoderStub(torch.nn.Module):
    """The pipeline reads only ``text_encoder.dtype`` when prompt embeddings are given."""

    anchor: torch.Tensor

    def __init__(self, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.register_buffer("anchor", torch.zeros((), dtype=dtype, device=device))

    @property
    def dtype(self) -> torch.dtype:
        return self.anchor.dtype

    @property
    def device(self) -> torch.device:
        return self.anchor.device


def pad_and_stack(embeds: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Pad ``[1, L_i, D]`` embeddings to one length; the mask is ``None`` when none was padded."""
    length = max(e.shape[1] for e in embeds)
    if all(e.shape[1] == length for e in embeds):
        return torch.cat(embeds), None
    padded = [torch.nn.functional.pad(e, (0, 0, 0, length - e.shape[1])) for e in embeds]
    mask = torch.zeros(len(embeds), length, dtype=torch.bool, device=embeds[0].device)
    for row, e in enumerate(embeds):
        mask[row, : e.shape[1]] = True
    return torch.cat(padded), mask


def set_conv_memory_format(module: torch.nn.Module, *, channels_last: bool) -> None:
    """Channels-last (or back) for every conv weight; ``Module.to`` refuses mixed ranks."""
    for sub in module.modules():
        if isinstance(sub, torch.nn.Conv3d):
            fmt = torch.channels_last_3d if channels_last else torch.contiguous_format
        elif isinstance(sub, torch.nn.Conv2d):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
        else:
            continue
        sub.weight.data = sub.weight.data.contiguous(memory_format=fmt)


def set_cudnn_benchmark(*, enabled: bool) -> None:
    """cuDNN tries its algorithms on the first call of each shape and keeps the fastest."""
    torch.backends.cudnn.benchmark = enabled


def apply_rope_real(
    x: torch.Tensor,
    freqs: torch.Tensor,
    use_real: bool = True,
    use_real_unbind_dim: int = -1,
    *,
    fallback: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """``apply_rotary_emb_qwen`` without complex numbers, for ``freqs`` as ``[S, D/2, 2]`` reals.

    Same arithmetic as diffusers' complex path (fp32, then back to the input's dtype), but
    Inductor can fuse it: it does not generate code for complex operators.
    """
    if use_real or freqs.is_complex():
        return fallback(x, freqs, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim)
    cos = freqs[..., 0].unsqueeze(1)  # [S, 1, D/2] against x's [B, S, H, D/2]
    sin = freqs[..., 1].unsqueeze(1)
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(3)
    return out.type_as(x)


def flops_text(value: float) -> str:
    for unit, scale in (("TFLOP", 1e12), ("GFLOP", 1e9)):
        if value >= scale:
            return f"{value / scale:.1f} {unit}"
    return f"{value / 1e6:.1f} MFLOP"


def peak_tflops(device: torch.device, override: float | None) -> tuple[str, float | None]:
    """The device's name and its dense bf16 peak in TFLOP/s (``None`` if unknown)."""
    if device.type != "cuda":
        return platform.processor() or "cpu", override
    name = torch.cuda.get_device_name(device)
    if override is not None:
        return name, override
    for key, value in PEAK_BF16_TFLOPS:
        if key in name:
            return name, value
    return name, None


def sync(device: torch.device) -> None:
    """Wait for the GPU, so that wall-clock times cover the work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**30:.1f}"


def fmt(value: float | None, digits: int = 2) -> str:
    return (
        "–"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{value:.{digits}f}")
    )


class Bench:
    """Builds the random-weight pipeline once and runs jobs under variants."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.dtype = getattr(torch, args.dtype)
        self.on_cuda = self.device.type == "cuda"
        self.started = PROCESS_START
        self.hard_deadline: float = self.started + float(args.time_budget)
        self.gpu_name, self.peak = peak_tflops(self.device, args.peak_tflops)
        self.results: list[dict[str, Any]] = []
        self.flops: dict[tuple[int, int], float] = {}
        self.attention_share: dict[int, float] = {}
        self.reference_pixels: dict[tuple[int, int], list[np.ndarray]] = {}
        self.compiled: dict[str, list[Callable[..., Any]]] = {}
        self.checks: dict[str, float] = {}
        self.fullgraph = True
        self.phase_s: dict[str, float] = {}
        self.forwards = 0
        self._job_deadline: float | None = None
        self.reserved: torch.Tensor | None = None
        self._build()

    # --- set-up ------------------------------------------------------------------------------

    def _build(self) -> None:
        # Imported after the CLI is parsed (4 s), and untyped: its annotations are partial.
        diffusers: Any = importlib.import_module("diffusers")
        args = self.args
        transformer_config = TINY_TRANSFORMER if args.tiny else FULL_TRANSFORMER
        vae_config = TINY_VAE if args.tiny else FULL_VAE
        torch.manual_seed(0)
        start = time.perf_counter()
        # Build the modules on the device in the target dtype: 20 B parameters initialised on
        # the GPU in bf16 take seconds; on the CPU in fp32 they would need 80 GB and minutes.
        previous = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device), torch.no_grad():
                transformer = diffusers.QwenImageTransformer2DModel(**transformer_config).eval()
                vae = diffusers.AutoencoderKLQwenImage(**vae_config).eval()
        finally:
            torch.set_default_dtype(previous)
        sync(self.device)
        self.init_s = time.perf_counter() - start
        self.transformer = transformer
        self.vae = vae
        self.blocks = list(transformer.transformer_blocks)
        self.params = sum(p.numel() for p in transformer.parameters())
        self.vae_params = sum(p.numel() for p in vae.parameters())
        self.pipe = diffusers.QwenImageLayeredPipeline(
            scheduler=diffusers.FlowMatchEulerDiscreteScheduler(**SCHEDULER),
            vae=vae,
            text_encoder=TextEncoderStub(self.dtype, self.device),
            tokenizer=None,
            processor=None,
            transformer=transformer,
        )
        self.pipe.set_progress_bar_config(disable=True)
        self._instrument()

        dim = transformer_config["joint_attention_dim"]
        gen = torch.Generator(self.device).manual_seed(1)
        self.prompt_embeds = torch.randn(
            1, args.prompt_tokens, dim, generator=gen, device=self.device, dtype=self.dtype
        )
        self.negative_embeds = torch.randn(
            1, args.negative_tokens, dim, generator=gen, device=self.device, dtype=self.dtype
        )
        rng = np.random.default_rng(0)
        noise = rng.integers(0, 256, (args.image_size, args.image_size, 4), dtype=np.uint8)
        self.image = Image.fromarray(noise)  # H×W×4 uint8: RGBA
        if self.on_cuda and args.text_encoder_memory:
            # Held, never used: the 7B text encoder's weights a serving worker keeps on the GPU.
            self.reserved = torch.empty(
                int(TEXT_ENCODER_BYTES) // 2, dtype=torch.bfloat16, device=self.device
            )

    def _instrument(self) -> None:
        """Time VAE encode / decode (synchronised) and count transformer forwards."""
        for name in ("encode", "decode"):
            original = getattr(self.vae, name)

            def timed(*a: Any, _original: Any = original, _name: str = name, **k: Any) -> Any:
                sync(self.device)
                start = time.perf_counter()
                out = _original(*a, **k)
                sync(self.device)
                self.phase_s[_name] = self.phase_s.get(_name, 0.0) + time.perf_counter() - start
                return out

            setattr(self.vae, name, timed)

        def count(*_: Any) -> None:
            self.forwards += 1

        self.transformer.register_forward_pre_hook(count)

    # --- pieces of a job ----------------------------------------------------------------------

    def transformer_inputs(self, resolution: int, text: torch.Tensor) -> dict[str, Any]:
        """The transformer's inputs for one forward at ``resolution`` (square image)."""
        side = resolution // 16  # 8x VAE, then 2x2 patches
        layers = self.args.layers
        tokens = (layers + 2) * side * side  # noisy layers + composite + condition image
        channels = self.transformer.config.in_channels
        gen = torch.Generator(self.device).manual_seed(2)
        return {
            "hidden_states": torch.randn(
                1, tokens, channels, generator=gen, device=self.device, dtype=self.dtype
            ),
            "encoder_hidden_states": text,
            "timestep": torch.full((1,), 0.5, device=self.device, dtype=self.dtype),
            "img_shapes": [[(1, side, side)] * (layers + 2)],
            "additional_t_cond": torch.zeros(1, dtype=torch.long, device=self.device),
            "return_dict": False,
        }

    def count_flops(self, resolution: int) -> None:
        """FLOPs of one conditional and one unconditional forward, counted once per shape."""
        from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

        for text in (self.prompt_embeds, self.negative_embeds):
            key = (resolution, text.shape[1])
            if key in self.flops:
                continue
            counter = FlopCounterMode(display=False)
            with torch.no_grad(), counter:
                self.transformer(**self.transformer_inputs(resolution, text))
            self.flops[key] = float(counter.get_total_flops())
            if text is self.prompt_embeds:
                per_op = counter.get_flop_counts().get("Global", {})
                attention = sum(v for op, v in per_op.items() if "attention" in str(op))
                self.attention_share[resolution] = attention / max(self.flops[key], 1.0)
        sync(self.device)

    def flops_per_step(self, resolution: int) -> float:
        return (
            self.flops[(resolution, self.args.prompt_tokens)]
            + self.flops[(resolution, self.args.negative_tokens)]
        )

    def numeric_check(self, variant: Variant) -> float:
        """Max |variant − stock| / max |stock| over a conditional and an unconditional forward.

        A small case (640, one layer), eager: it checks that ``cfgbatch`` and ``rope-real``
        change no math before their times count. Compilation is left out on purpose (it would
        compile one more shape).
        """
        saved_layers = self.args.layers
        self.args.layers = 1
        try:
            inputs = self.transformer_inputs(640, self.prompt_embeds)
        finally:
            self.args.layers = saved_layers
        negative = {**inputs, "encoder_hidden_states": self.negative_embeds}
        with torch.no_grad():
            reference = torch.cat(
                [self.transformer(**inputs)[0], self.transformer(**negative)[0]]
            ).float()
            eager = dataclasses.replace(variant, compile_mode=None)
            with self.configured(eager):
                model: torch.nn.Module = self.transformer
                if variant.cfg_batch:
                    model = BatchedCfgTransformer(self.transformer, self.negative_embeds)
                # The stand-in answers the second call from its stash, whatever it is given.
                candidate = torch.cat([model(**inputs)[0], model(**negative)[0]]).float()
        error = (candidate - reference).abs().max() / reference.abs().max().clamp_min(1e-12)
        return float(error)

    @contextlib.contextmanager
    def attention(self, variant: Variant) -> Iterator[None]:
        if variant.attention is None:
            yield
            return
        from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: PLC0415

        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[variant.attention]
        # The chosen kernel first; the VAE's attention (head dim 384, beyond flash and cuDNN) falls
        # back to the next one that takes it, so the choice applies to the transformer.
        fallbacks = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        order = [backend, *(b for b in fallbacks if b != backend)]
        with sdpa_kernel(order, set_priority=True):
            yield

    def compiled_blocks(self, mode: str) -> list[Callable[..., Any]]:
        """One ``torch.compile`` wrapper per block, kept so that switching back costs nothing."""
        if mode not in self.compiled:
            import torch._dynamo as dynamo  # noqa: PLC0415

            # Static shapes (cond / uncond × resolutions) compile once each; raise the limit so
            # that no shape falls back to eager silently.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(dynamo.config, name):
                    setattr(dynamo.config, name, 64)
            self.compiled[mode] = [
                torch.compile(
                    block._call_impl,  # noqa: SLF001  # what nn.Module.compile() wraps
                    mode=mode,
                    fullgraph=self.fullgraph,
                    dynamic=False,
                )
                for block in self.blocks
            ]
        return self.compiled[mode]

    @contextlib.contextmanager
    def configured(self, variant: Variant) -> Iterator[None]:
        """Apply a variant's options for the duration of the block, then undo them."""
        with contextlib.ExitStack() as undo:
            undo.enter_context(self.attention(variant))
            if variant.cudnn_benchmark:
                set_cudnn_benchmark(enabled=True)
                undo.callback(set_cudnn_benchmark, enabled=False)
            if variant.vae_tiling:
                self.vae.enable_tiling()
                undo.callback(self.vae.disable_tiling)
            if variant.vae_channels_last:
                set_conv_memory_format(self.vae, channels_last=True)
                undo.callback(set_conv_memory_format, self.vae, channels_last=False)
            if variant.compile_mode is not None:
                # nn.Module.compile() stores its wrapper in _compiled_call_impl; setting it back
                # to None restores eager. Swapping saved wrappers avoids recompiling.
                for block, impl in zip(
                    self.blocks, self.compiled_blocks(variant.compile_mode), strict=True
                ):
                    block._compiled_call_impl = impl  # noqa: SLF001  # see above
                undo.callback(self._eager_blocks)
            if variant.real_rope:
                self._use_real_rope(undo)
            if variant.cfg_batch:
                proxy = BatchedCfgTransformer(self.transformer, self.negative_embeds)
                # object.__setattr__: DiffusionPipeline.__setattr__ would rewrite its config.
                object.__setattr__(self.pipe, "transformer", proxy)
                undo.callback(object.__setattr__, self.pipe, "transformer", self.transformer)
            yield

    def _use_real_rope(self, undo: contextlib.ExitStack) -> None:
        """Real-valued RoPE: tables as ``[S, D/2, 2]`` reals, and the matching apply function."""
        module: Any = importlib.import_module("diffusers.models.transformers.transformer_qwenimage")
        original_apply = module.apply_rotary_emb_qwen
        module.apply_rotary_emb_qwen = functools.partial(apply_rope_real, fallback=original_apply)
        undo.callback(setattr, module, "apply_rotary_emb_qwen", original_apply)
        pos_embed = self.transformer.pos_embed
        original_forward = pos_embed.forward

        def real_tables(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
            image, text = original_forward(*args, **kwargs)
            return torch.view_as_real(image), torch.view_as_real(text)

        pos_embed.forward = real_tables
        undo.callback(delattr, pos_embed, "forward")

    def _eager_blocks(self) -> None:
        for block in self.blocks:
            block._compiled_call_impl = None  # noqa: SLF001  # back to eager

    def _check_deadline(self, *_: Any) -> dict[str, Any]:
        if self._job_deadline is not None and time.monotonic() > self._job_deadline:
            raise BudgetExceededError("time budget reached during a job")
        return {}

    def job(self, resolution: int, steps: int) -> dict[str, Any]:
        """Run one pipeline job; return its timings."""
        self.phase_s = {}
        self.forwards = 0
        if self.on_cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        sync(self.device)
        self._job_deadline = self.hard_deadline
        start = time.perf_counter()
        with torch.inference_mode():
            output = self.pipe(
                image=self.image,
                prompt="benchmark",  # not empty: an empty prompt would make the pipeline caption
                prompt_embeds=self.prompt_embeds,
                prompt_embeds_mask=torch.ones(
                    self.prompt_embeds.shape[:2], dtype=torch.long, device=self.device
                ),
                negative_prompt_embeds=self.negative_embeds,
                negative_prompt_embeds_mask=torch.ones(
                    self.negative_embeds.shape[:2], dtype=torch.long, device=self.device
                ),
                true_cfg_scale=4.0,
                layers=self.args.layers,
                num_inference_steps=steps,
                generator=torch.Generator(self.device).manual_seed(0),
                resolution=resolution,
                cfg_normalize=True,
                use_en_prompt=True,
                output_type="pil",
                callback_on_step_end=self._check_deadline,
            )
        sync(self.device)
        job_s = time.perf_counter() - start
        self._job_deadline = None
        layers = output.images[0]
        encode_s = self.phase_s.get("encode", 0.0)
        decode_s = self.phase_s.get("decode", 0.0)
        return {
            "job_s": job_s,
            "encode_s": encode_s,
            "decode_s": decode_s,
            "denoise_s": job_s - encode_s - decode_s,
            "forwards": self.forwards,
            "peak_bytes": torch.cuda.max_memory_allocated(self.device) if self.on_cuda else None,
            "size": layers[0].size,
            "pixels": [np.asarray(layer) for layer in layers],
        }

    # --- the sweep ----------------------------------------------------------------------------

    def remaining(self) -> float:
        return self.hard_deadline - time.monotonic()

    def estimate(self, resolution: int, steps: int, variant: Variant) -> float | None:
        """Seconds a job should take, from the stock job measured at this resolution."""
        for row in self.results:
            if row["resolution"] == resolution and row.get("per_step_s") is not None:
                guess = float(row["fixed_s"]) + steps * float(row["per_step_s"])
                if variant.compile_mode is not None and variant.compile_mode not in self.compiled:
                    guess += COMPILE_ESTIMATE_S
                return guess
        return None

    def run_variant(self, variant: Variant, resolution: int, steps_list: list[int]) -> None:
        """Warm up, then run one measured job per step count; record a row each."""
        base = {
            "variant": variant.name,
            "resolution": resolution,
            "layers": self.args.layers,
        }
        warm_estimate = self.estimate(resolution, WARMUP_STEPS, variant)
        if warm_estimate is not None and warm_estimate > self.remaining():
            self.record({**base, "steps": steps_list[0], "status": "skipped: time budget"})
            return
        try:
            check = None
            if variant.cfg_batch or variant.real_rope:
                if variant.name not in self.checks:
                    self.checks[variant.name] = self.numeric_check(variant)
                check = self.checks[variant.name]
            with self.configured(variant):
                warm_start = time.perf_counter()
                self.job(resolution, WARMUP_STEPS)
                warmup_s = time.perf_counter() - warm_start
                for steps in steps_list:
                    estimate = self.estimate(resolution, steps, variant)
                    if estimate is not None and estimate > self.remaining():
                        self.record({**base, "steps": steps, "status": "skipped: time budget"})
                        continue
                    timing = self.job(resolution, steps)
                    self.record(
                        self.row(
                            base=base,
                            variant=variant,
                            steps=steps,
                            timing=timing,
                            warmup_s=warmup_s,
                            cfg_check=check,
                        )
                    )
        except BudgetExceededError:
            self.record({**base, "steps": steps_list[-1], "status": "stopped: time budget"})
        except Exception as exc:  # noqa: BLE001  # one variant's failure must not end the sweep
            message = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
            self.record({**base, "steps": steps_list[0], "status": f"failed: {message}"})
            if self.on_cuda:
                torch.cuda.empty_cache()  # an out-of-memory variant must not starve the next
            if variant.compile_mode is not None and self.fullgraph:
                # A graph break fails fullgraph=True: later compile variants try without it.
                self.fullgraph = False
                self.compiled.clear()
                torch._dynamo.reset()  # noqa: SLF001  # drop the failed fullgraph wrappers

    def row(
        self,
        *,
        base: dict[str, Any],
        variant: Variant,
        steps: int,
        timing: dict[str, Any],
        warmup_s: float,
        cfg_check: float | None,
    ) -> dict[str, Any]:
        resolution = base["resolution"]
        per_step = timing["denoise_s"] / steps
        fixed = timing["job_s"] - timing["denoise_s"]
        flops = self.flops_per_step(resolution) * steps
        mfu = None if self.peak is None else flops / timing["denoise_s"] / (self.peak * 1e12)
        mfu_job = None if self.peak is None else flops / timing["job_s"] / (self.peak * 1e12)
        expected_warmup = fixed + WARMUP_STEPS * per_step
        reference_key = (resolution, steps)
        pixel_diff = None
        if variant.name == "stock" and reference_key not in self.reference_pixels:
            self.reference_pixels[reference_key] = timing["pixels"]
        elif reference_key in self.reference_pixels:
            pixel_diff = max(
                int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())
                for a, b in zip(timing["pixels"], self.reference_pixels[reference_key], strict=True)
            )
        return {
            **base,
            "steps": steps,
            "status": "ok",
            "width": timing["size"][0],
            "height": timing["size"][1],
            "job_s": timing["job_s"],
            "denoise_s": timing["denoise_s"],
            "per_step_s": per_step,
            "fixed_s": fixed,
            "encode_s": timing["encode_s"],
            "decode_s": timing["decode_s"],
            "projected_20_s": fixed + 20 * per_step,
            "projected_50_s": fixed + 50 * per_step,
            "forwards": timing["forwards"],
            "mfu": mfu,
            "mfu_job": mfu_job,
            "peak_bytes": timing["peak_bytes"],
            "warmup_s": warmup_s,
            # The first job after compiling pays for it; a warm-up job of 2 steps otherwise
            # costs about fixed + 2 steps.
            "compile_s": max(warmup_s - expected_warmup, 0.0)
            if variant.compile_mode is not None
            else None,
            "numeric_check_rel_err": cfg_check,
            "max_pixel_diff_vs_stock": pixel_diff,
        }

    # --- output -------------------------------------------------------------------------------

    HEADER = (
        "| variant | res | steps | job s | s/step | enc s | dec s | 20-step s | 50-step s "
        "| MFU | MFU job | peak GiB | compile s | fwd | px Δ | status |"
    )

    def print_header(self) -> None:
        print(self.HEADER)
        print("|" + "---|" * (self.HEADER.count("|") - 1), flush=True)

    def record(self, row: dict[str, Any]) -> None:
        self.results.append(row)
        cells = [
            row["variant"],
            str(row["resolution"]),
            str(row.get("steps", "")),
            fmt(row.get("job_s")),
            fmt(row.get("per_step_s"), 3),
            fmt(row.get("encode_s")),
            fmt(row.get("decode_s")),
            fmt(row.get("projected_20_s"), 1),
            fmt(row.get("projected_50_s"), 1),
            "–" if row.get("mfu") is None else f"{100 * row['mfu']:.1f}%",
            "–" if row.get("mfu_job") is None else f"{100 * row['mfu_job']:.1f}%",
            gib(row.get("peak_bytes")),
            fmt(row.get("compile_s"), 0),
            str(row.get("forwards", "–")),
            "–"
            if row.get("max_pixel_diff_vs_stock") is None
            else str(row["max_pixel_diff_vs_stock"]),
            row["status"]
            + (
                f" (vs stock {row['numeric_check_rel_err']:.1e})"
                if row.get("numeric_check_rel_err") is not None
                else ""
            ),
        ]
        print("| " + " | ".join(cells) + " |", flush=True)
        self.write_json()

    def setup_report(self) -> dict[str, Any]:
        import diffusers  # noqa: PLC0415

        return {
            "device": self.gpu_name,
            "peak_bf16_tflops": self.peak,
            "torch": torch.__version__,
            "diffusers": diffusers.__version__,
            "python": platform.python_version(),
            "dtype": self.args.dtype,
            "tiny": self.args.tiny,
            "transformer_params": self.params,
            "vae_params": self.vae_params,
            "init_s": self.init_s,
            "layers": self.args.layers,
            "input_image": f"{self.args.image_size}x{self.args.image_size} RGBA (square)",
            "prompt_tokens": self.args.prompt_tokens,
            "negative_prompt_tokens": self.args.negative_tokens,
            "true_cfg_scale": 4.0,
            "cfg_normalize": True,
            "text_encoder_reserved_bytes": None
            if self.reserved is None
            else self.reserved.numel() * 2,
            "flops_per_forward": {f"{r}x{t}": f for (r, t), f in self.flops.items()},
            "attention_share_of_flops": self.attention_share,
            "fullgraph": self.fullgraph,
            "default_sdpa_backend": self.default_sdpa_backend(),
        }

    def default_sdpa_backend(self) -> dict[str, str]:
        """Which SDPA kernel PyTorch picks for the shapes here, with and without a mask."""
        if not self.on_cuda:
            return {}
        heads = self.transformer.config.num_attention_heads
        head_dim = self.transformer.config.attention_head_dim
        q = torch.empty(1, heads, 1024, head_dim, device=self.device, dtype=self.dtype)
        mask = torch.ones(1, 1, 1, 1024, dtype=torch.bool, device=self.device)
        picks: dict[str, str] = {}
        for label, attn_mask in (("no mask", None), ("bool mask", mask)):
            try:
                choice = torch._fused_sdp_choice(q, q, q, attn_mask)  # noqa: SLF001  # no public API
                picks[label] = torch.nn.attention.SDPBackend(choice).name
            except (AttributeError, RuntimeError, TypeError, ValueError) as exc:
                picks[label] = f"unknown ({type(exc).__name__})"
        return picks

    def write_json(self) -> None:
        if not self.args.json:
            return
        rows = [{k: v for k, v in row.items() if k != "pixels"} for row in self.results]
        document = {"setup": self.setup_report(), "results": rows}
        Path(self.args.json).write_text(json.dumps(document, indent=2, default=str) + "\n")


def per_resolution(
    specs: list[str] | None, resolutions: list[int], default: str
) -> dict[int, list[str]]:
    """``["a,b", "1024:c"]`` → ``{640: ["a", "b"], 1024: ["c"]}``: a ``RES:`` prefix wins."""
    plain: list[str] | None = None
    prefixed: dict[int, list[str]] = {}
    for spec in specs or []:
        head, sep, tail = spec.partition(":")
        if sep:
            prefixed[int(head)] = [item for item in tail.split(",") if item]
        else:
            plain = [item for item in spec.split(",") if item]
    fallback = plain if plain is not None else default.split(",")
    return {r: prefixed.get(r, fallback) for r in resolutions}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n", maxsplit=1)[0],
        epilog="--variants and --steps take an optional RES: prefix and repeat, e.g. "
        "--variants 640:stock,cudnn --variants 1024:stock --steps 640:20,50 --steps 1024:20",
    )
    parser.add_argument("--tiny", action="store_true", help="tiny dims (CPU check of the script)")
    parser.add_argument("--quick", action="store_true", help=f"640, 3 steps, {QUICK_VARIANTS}")
    parser.add_argument("--resolutions", default=None, help="comma-separated (default 640,1024)")
    parser.add_argument(
        "--steps", action="append", help="step counts of the measured jobs (default 3)"
    )
    parser.add_argument("--variants", action="append", help=f"default: {DEFAULT_VARIANTS}")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--negative-tokens", type=int, default=6)
    parser.add_argument("--image-size", type=int, default=1024, help="square input, pixels")
    parser.add_argument("--time-budget", type=float, default=540.0, help="hard limit, seconds")
    parser.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak")
    parser.add_argument("--device", default=None, help="default cuda if available, else cpu")
    parser.add_argument("--dtype", default=None, help="default bfloat16 on CUDA, float32 on CPU")
    parser.add_argument(
        "--no-text-encoder-memory",
        dest="text_encoder_memory",
        action="store_false",
        help="do not set 16.6 GB aside for the text encoder's weights",
    )
    parser.add_argument("--json", default=None, help="JSON output (default $OUT/worker_gpu.json)")
    args = parser.parse_args(argv)

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(args.device).type == "cuda"
    args.dtype = args.dtype or ("bfloat16" if on_cuda else "float32")
    default_variants, default_steps = DEFAULT_VARIANTS, "3"
    prefixes = {
        int(spec.partition(":")[0])
        for spec in (args.variants or []) + (args.steps or [])
        if ":" in spec
    }
    default_resolutions = ",".join(str(r) for r in sorted(prefixes)) if prefixes else "640,1024"
    if args.quick:
        default_resolutions, default_variants = "640", QUICK_VARIANTS
    if args.tiny:
        default_resolutions, default_variants, default_steps = "640", TINY_VARIANTS, "2,3"
        args.prompt_tokens = min(args.prompt_tokens, 16)
        args.image_size = min(args.image_size, 96)
    resolutions = [int(r) for r in (args.resolutions or default_resolutions).split(",")]
    if any(r not in (640, 1024) for r in resolutions):
        parser.error("resolutions must be 640 or 1024")
    try:
        variants = per_resolution(args.variants, resolutions, default_variants)
        steps = per_resolution(args.steps, resolutions, default_steps)
        args.plan = [
            (r, [Variant.parse(v) for v in variants[r]], [int(n) for n in steps[r]])
            for r in resolutions
        ]
    except ValueError as exc:
        parser.error(str(exc))
    if any(min(n) < WARMUP_STEPS for _, _, n in args.plan):
        parser.error(f"steps must be at least {WARMUP_STEPS} (1 step yields NaN)")
    if args.json is None and os.environ.get("OUT"):
        args.json = str(Path(os.environ["OUT"]) / "worker_gpu.json")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Random weights can overflow to NaN somewhere in 60 blocks; timing does not care, and the
    # image conversion would warn once a job.
    warnings.filterwarnings("ignore", category=RuntimeWarning)
    print(f"# building the {'tiny' if args.tiny else 'full-size'} model on {args.device}...")
    sys.stdout.flush()
    bench = Bench(args)
    print(
        f"# {bench.gpu_name}; torch {torch.__version__}; transformer {bench.params / 1e9:.2f} B "
        f"parameters, VAE {bench.vae_params / 1e6:.1f} M; init {bench.init_s:.1f} s; "
        f"peak {bench.peak} TFLOP/s bf16; time budget {args.time_budget:.0f} s",
        flush=True,
    )
    for resolution, _, _ in args.plan:
        bench.count_flops(resolution)
        cond = bench.flops[(resolution, args.prompt_tokens)]
        share = bench.attention_share.get(resolution, 0.0)
        print(
            f"# {resolution}: {flops_text(cond)} per conditional forward "
            f"({args.prompt_tokens} text tokens, {100 * share:.0f}% in attention), "
            f"{flops_text(bench.flops_per_step(resolution))} per CFG step",
            flush=True,
        )
    print(f"# default SDPA kernel: {bench.default_sdpa_backend()}", flush=True)
    print(
        f"# {args.layers} layers, square {args.image_size}px RGBA input, true_cfg_scale 4, "
        f"cfg_normalize, prompt {args.prompt_tokens} + negative {args.negative_tokens} tokens; "
        "'20/50-step s' project the measured job (fixed part + steps × s/step)",
        flush=True,
    )
    bench.print_header()
    for resolution, variants, steps in args.plan:
        # Eager variants first, then each compile mode: compiling is the expensive part.
        order = sorted(variants, key=lambda v: (v.compile_mode is not None, v.compile_mode or ""))
        for variant in order:
            if bench.remaining() <= 0:
                bench.record(
                    {
                        "variant": variant.name,
                        "resolution": resolution,
                        "steps": steps[0],
                        "status": "skipped: time budget",
                    }
                )
                continue
            bench.run_variant(variant, resolution, steps)
    bench.write_json()
    print(f"# done in {time.monotonic() - bench.started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
