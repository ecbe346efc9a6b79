"""A tiny Qwen-Image-Layered with random weights, for tests and demos without the real weights.

``python -m gpujobs.worker.tiny DIR`` builds the real architecture (``QwenImageLayeredPipeline``
with its transformer, RGBA VAE, Qwen2.5-VL text encoder, Qwen2 tokenizer and scheduler) at a
size of about 4 MB, offline, and saves it with ``save_pretrained``. :func:`load_pipeline
<gpujobs.worker.pipeline.load_pipeline>` then loads that folder exactly as it loads the real
weights. The layers it returns are noise: it tests plumbing, not pictures.

What is small, and why it still runs the real code paths:

- tokenizer: byte-level BPE over the 256 byte symbols with no merges, plus the chat and vision
  special tokens the pipeline's templates use; any text encodes.
- text encoder: one-layer Qwen2.5-VL, hidden size 32 (the transformer's ``joint_attention_dim``).
- transformer: 2 blocks of 3 heads × 16, ``axes_dims_rope`` (4, 6, 6) summing to the head size,
  ``in_channels`` = 4 × ``z_dim``, layered RoPE and the extra timestep condition on, like the real
  model.
- VAE: RGBA input, ``z_dim`` 8 (4 would make the pipeline take the RGBA image for latents), base
  width 4 but the real three down-samplings, so images keep the real latent grid (1,600 tokens a
  layer at 640).
- scheduler: the Qwen-Image flow-matching configuration.
- no ``processor``: ``Qwen2VLProcessor`` needs torchvision, which does not load beside the CPU
  torch wheel; the saved pipeline cannot caption, so every job needs a prompt.

On 2 CPU cores a job at 640 with 4 layers takes ~1.5 s plus ~0.6 s per step (with CFG).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpujobs.worker.pipeline import WEIGHTS_MARKER

__all__ = ["TINY_REPO_ID", "TINY_REVISION", "build_tiny_pipeline", "main", "save_tiny_pipeline"]

TINY_REPO_ID = "gpujobs/tiny-random-qwen-image-layered"
"""Stands in for the Hub repository in the tiny model's weights marker."""

TINY_REVISION = "tiny-random-1"
"""Revision recorded for the tiny model; bump it when the recipe changes."""

_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
_TEXT_HIDDEN = 32
_Z_DIM = 8

# The scheduler configuration of the Qwen-Image family (scheduler/scheduler_config.json).
_SCHEDULER_CONFIG: dict[str, Any] = {
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


def build_tiny_pipeline(seed: int = 0) -> Any:
    """Build the tiny pipeline in memory, on CPU in fp32.

    Args:
        seed: seeds the random weights; the same seed builds the same model.

    Returns:
        A ``diffusers.QwenImageLayeredPipeline`` with ``processor=None``.
    """
    import torch  # noqa: PLC0415  # heavy imports stay out of `import gpujobs.worker.tiny`
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration  # noqa: PLC0415

    # Untyped on purpose: diffusers' own annotations are partial and would fail --strict.
    diffusers: Any = importlib.import_module("diffusers")
    tokenizer = _tiny_tokenizer()
    ids = dict(
        zip(_SPECIAL_TOKENS, tokenizer.convert_tokens_to_ids(list(_SPECIAL_TOKENS)), strict=True)
    )

    # fork_rng: building the model must not move the caller's global random state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_config = Qwen2_5_VLConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": _TEXT_HIDDEN,
                "intermediate_size": 64,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "num_key_value_heads": 1,
                "max_position_embeddings": 4096,
                # mrope sections sum to half the head size (32 / 2 heads / 2).
                "rope_parameters": {"rope_type": "default", "mrope_section": [2, 3, 3]},
                "bos_token_id": ids["<|endoftext|>"],
                "eos_token_id": ids["<|im_end|>"],
                "pad_token_id": ids["<|endoftext|>"],
            },
            vision_config={
                "depth": 1,
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_heads": 2,
                "out_hidden_size": _TEXT_HIDDEN,
                "fullatt_block_indexes": [0],
            },
            image_token_id=ids["<|image_pad|>"],
            video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"],
            vision_end_token_id=ids["<|vision_end|>"],
        )
        text_encoder: Any = Qwen2_5_VLForConditionalGeneration(text_config)
        text_encoder.eval()
        transformer = diffusers.QwenImageTransformer2DModel(
            patch_size=2,
            in_channels=4 * _Z_DIM,
            out_channels=_Z_DIM,
            num_layers=2,
            attention_head_dim=16,
            num_attention_heads=3,
            joint_attention_dim=_TEXT_HIDDEN,
            axes_dims_rope=(4, 6, 6),
            use_additional_t_cond=True,
            use_layer3d_rope=True,
        ).eval()
        vae = diffusers.AutoencoderKLQwenImage(
            base_dim=4,
            z_dim=_Z_DIM,
            dim_mult=[1, 2, 4, 4],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            input_channels=4,
            latents_mean=[0.0] * _Z_DIM,
            latents_std=[1.0] * _Z_DIM,
        ).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(**_SCHEDULER_CONFIG)
    return diffusers.QwenImageLayeredPipeline(
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        processor=None,
        transformer=transformer,
    )


def save_tiny_pipeline(directory: str | Path, *, seed: int = 0) -> Path:
    """Build the tiny pipeline and save it where ``load_pipeline`` can read it.

    Also writes the weights marker that ``fetch_weights`` writes for real weights, so the
    loaded pipeline reports ``revision`` :data:`TINY_REVISION`.

    Args:
        directory: created if needed; files already there are overwritten.
        seed: seeds the random weights.

    Returns:
        The folder, as a :class:`~pathlib.Path`.
    """
    target = Path(directory)
    target.mkdir(parents=True, exist_ok=True)
    build_tiny_pipeline(seed).save_pretrained(str(target))
    marker = {"repo_id": TINY_REPO_ID, "revision": TINY_REVISION, "commit": None, "seed": seed}
    (target / WEIGHTS_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m gpujobs.worker.tiny DIR [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m gpujobs.worker.tiny",
        description="Save a tiny random-weight Qwen-Image-Layered pipeline (offline, ~4 MB).",
    )
    parser.add_argument("directory", type=Path, help="folder to save it in (MODEL_PATH)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the random weights")
    args = parser.parse_args(argv)
    target = save_tiny_pipeline(args.directory, seed=args.seed)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    sys.stdout.write(f"saved a tiny Qwen-Image-Layered ({size / 1e6:.1f} MB) to {target}\n")
    return 0


def _tiny_tokenizer() -> Any:
    """A byte-level ``Qwen2Tokenizer``: one token per byte, plus the special tokens."""
    from tokenizers import pre_tokenizers  # noqa: PLC0415
    from transformers import Qwen2Tokenizer  # noqa: PLC0415

    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(byte_symbols)}
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=_SPECIAL_TOKENS[0],
        eos_token=_SPECIAL_TOKENS[0],
        pad_token=_SPECIAL_TOKENS[0],
        additional_special_tokens=list(_SPECIAL_TOKENS[1:]),
    )


if __name__ == "__main__":
    raise SystemExit(main())
