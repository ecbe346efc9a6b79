"""Fixtures for the reference worker's tests: a tiny random-weight Qwen-Image-Layered.

``tiny_model_dir`` builds the model once per test session (~2 s, ~2 MB) into a temporary
folder, saved exactly as real weights are; ``tiny_pipeline`` loads it on CPU through
``load_pipeline``. Both skip the test when the ``worker`` extra (torch, diffusers) is missing.
The tiny pipeline has no processor: send a prompt with every job. Use 2 steps (1 step gives
NaN with the model's scheduler) and, where the count does not matter, 2 layers: a job then
takes ~1.5 s on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from gpujobs.worker.pipeline import LayeredPipeline


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder holding the tiny model, as ``fetch_weights`` would hold the real one."""
    pytest.importorskip("diffusers", reason="needs the worker extra")
    from gpujobs.worker.tiny import save_tiny_pipeline  # noqa: PLC0415  # after the skip check

    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-qwen-image-layered"))


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_model_dir: Path) -> LayeredPipeline:
    """The tiny model loaded on CPU (fp32), shared by the whole session."""
    from gpujobs.worker.pipeline import load_pipeline  # noqa: PLC0415  # after the skip check

    return load_pipeline(tiny_model_dir, device="cpu")
