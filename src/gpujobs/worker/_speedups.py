"""Real-valued RoPE and regional compilation: what makes the transformer faster on a GPU.

:func:`~gpujobs.worker.pipeline.load_pipeline` applies both on CUDA (see its ``optimize``
argument). Measured on an NVIDIA H100 80GB HBM3 with ``benches/worker_gpu.py``, together they
take a 50-step job with CFG at 640 from 46.6 s to 37.4 s, and the transformer from 43.9 % to
54.9 % of the card's bf16 peak (``docs/worker-performance.md``). Compilation does most of it;
the real-valued RoPE alone is slower in eager mode, and exists so that the compiler can fuse it.

- :func:`use_real_rope`: diffusers rotates queries and keys with complex multiplication
  (``view_as_complex``); Inductor generates no code for complex operators, so that work stays a
  chain of separate kernels between the fused ones. The same arithmetic on (cos, sin) pairs fuses
  with the QK norms around it.
- :func:`compile_blocks`: ``torch.compile`` of each of the 60 transformer blocks, not of the whole
  model: all blocks run the same code, so one compilation (seconds) serves all of them, and the
  pipeline's Python around them stays eager.
- :class:`CompileClock`: the seconds a job spent compiling, from torch's compilation callbacks.

The benchmark (``benches/worker_gpu.py``) keeps its own copy of the RoPE replacement: it runs on a
GPU machine where gpujobs is not installed.

Facts relied on, read in diffusers 0.42.1 ``models/transformers/transformer_qwenimage.py``: the
attention processor calls the module-level ``apply_rotary_emb_qwen(x, freqs, use_real=False)``
with ``x`` as ``[B, S, H, D]`` and ``freqs`` as the complex ``[S, D/2]`` tables that
``transformer.pos_embed`` returns (image, text); ``QwenImageTransformer2DModel._repeated_blocks``
names the block class, which ``compile_repeated_blocks`` compiles with ``Module.compile``.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any, Self

# Imported at the top: only load_pipeline imports this module, and only when it loads a model.
import torch
import torch._dynamo

__all__ = ["CompileClock", "apply_rope_real", "compile_blocks", "use_real_rope"]

_QWEN_TRANSFORMER_MODULE = "diffusers.models.transformers.transformer_qwenimage"
_ROPE_FUNCTION = "apply_rotary_emb_qwen"
_install_lock = threading.Lock()


def apply_rope_real(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` by RoPE tables given as real (cos, sin) pairs, without complex numbers.

    The same arithmetic as diffusers' complex path, in fp32 and back to ``x``'s dtype: each
    adjacent pair ``(x0, x1)`` of the head dimension, read as ``x0 + i·x1``, is multiplied by
    ``cos + i·sin``.

    Args:
        x: queries or keys, ``[B, S, H, D]``.
        freqs: ``torch.view_as_real`` of the complex ``[S, D/2]`` tables: ``[S, D/2, 2]``.

    Returns:
        The rotated tensor, shaped and typed like ``x``.
    """
    cos = freqs[..., 0].unsqueeze(1)  # [S, 1, D/2]: broadcasts over the heads of [B, S, H, D/2]
    sin = freqs[..., 1].unsqueeze(1)
    x0, x1 = x.float().reshape(*x.shape[:-1], -1, 2).unbind(-1)
    rotated = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
    return rotated.flatten(3).type_as(x)


def use_real_rope(transformer: Any) -> None:
    """Make ``transformer`` apply RoPE without complex numbers. Call once per transformer.

    Its ``pos_embed`` then returns the tables as real ``[S, D/2, 2]`` views (a forward hook), and
    diffusers' ``apply_rotary_emb_qwen`` is replaced, once per process, by a function that takes
    the real path for real tables and calls the original for anything else: a transformer left
    alone keeps complex tables and runs exactly as before.

    Args:
        transformer: a diffusers ``QwenImageTransformer2DModel``.
    """
    _install_rope_dispatch()
    transformer.pos_embed.register_forward_hook(_tables_as_real)


def compile_blocks(transformer: Any, *, dynamic: bool) -> None:
    """Compile each transformer block with ``torch.compile``; the compilation runs at first use.

    ``fullgraph=True``: a graph break would leave part of a block eager, slower without a word;
    it fails the first job instead (the tests check that there is none with the pinned versions).

    Args:
        transformer: a diffusers model with ``compile_repeated_blocks`` (0.42.1 has it).
        dynamic: ``True`` compiles once for every sequence length; ``False`` compiles again for
            each new shape (prompt length, image size, layer count), seconds each.
    """
    transformer.compile_repeated_blocks(mode="default", fullgraph=True, dynamic=dynamic)


class CompileClock:
    """Adds up the seconds torch spends compiling while it is entered.

    Counts every compilation in the process, from torch's compilation callbacks
    (``torch._dynamo.callback_handler``), so it is meant to be entered around one job at a time.

    Example::

        with CompileClock() as clock:
            pipe(...)
        print(clock.seconds)

    Attributes:
        seconds: compilation time so far; ``None`` when this torch has no compilation callbacks.
    """

    def __init__(self) -> None:
        self.seconds: float | None = None
        self._started: float | None = None
        self._handler: Any = None

    def __enter__(self) -> Self:
        # Private (there in torch 2.11 and 2.13); without it the time is unknown, not an error.
        self._handler = getattr(torch._dynamo, "callback_handler", None)  # noqa: SLF001
        if self._handler is not None:
            self.seconds = 0.0
            self._handler.register_start_callback(self._on_start)
            self._handler.register_end_callback(self._on_end)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._handler is not None:
            # torch._dynamo.reset() during the job would have dropped them already.
            with contextlib.suppress(ValueError):
                self._handler.remove_start_callback(self._on_start)
            with contextlib.suppress(ValueError):
                self._handler.remove_end_callback(self._on_end)

    def _on_start(self, _args: object) -> None:
        self._started = time.perf_counter()

    def _on_end(self, _args: object) -> None:
        if self._started is not None and self.seconds is not None:
            self.seconds += time.perf_counter() - self._started
            self._started = None


def _install_rope_dispatch() -> None:
    """Replace diffusers' ``apply_rotary_emb_qwen`` by :func:`_dispatching`, once."""
    module: Any = importlib.import_module(_QWEN_TRANSFORMER_MODULE)
    with _install_lock:
        current = getattr(module, _ROPE_FUNCTION)
        if getattr(current, "__gpujobs_real_rope__", False):
            return
        setattr(module, _ROPE_FUNCTION, _dispatching(current))


def _dispatching(original: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``apply_rotary_emb_qwen`` that sends real tables to :func:`apply_rope_real`."""

    @functools.wraps(original)
    def apply_rotary_emb_qwen(
        x: torch.Tensor,
        freqs_cis: Any,
        use_real: bool = True,
        use_real_unbind_dim: int = -1,
    ) -> torch.Tensor:
        # use_real=True means a (cos, sin) tuple in another layout: not ours, and not a tensor.
        if use_real or freqs_cis.is_complex():
            return original(
                x, freqs_cis, use_real=use_real, use_real_unbind_dim=use_real_unbind_dim
            )
        return apply_rope_real(x, freqs_cis)

    apply_rotary_emb_qwen.__gpujobs_real_rope__ = True  # type: ignore[attr-defined]
    return apply_rotary_emb_qwen


def _tables_as_real(
    _module: Any, _args: Any, tables: tuple[torch.Tensor, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward hook of ``pos_embed``: (image, text) complex tables as real ``[S, D/2, 2]`` views."""
    image, text = tables
    return torch.view_as_real(image), torch.view_as_real(text)
