"""The worker's pipeline layer, on the tiny random-weight model, on CPU, offline."""

from __future__ import annotations

import functools
import json
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("diffusers", reason="needs the worker extra")

import huggingface_hub
import huggingface_hub.file_download
import numpy as np
from PIL import Image

from gpujobs.worker import fetch_weights, tiny
from gpujobs.worker.pipeline import (
    MODEL_ID,
    WEIGHTS_MARKER,
    Generation,
    LayeredPipeline,
    WeightsMissingError,
    check_weights,
    load_pipeline,
)

PROMPT = "a red square on a blue ground"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def picture(size: tuple[int, int] = (96, 64), mode: str = "RGBA") -> Image.Image:
    """A red square on blue, 3:2 by default."""
    image = Image.new("RGBA", size, (20, 40, 200, 255))
    w, h = size
    image.paste((220, 30, 30, 255), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    return image if mode == "RGBA" else image.convert(mode)


def small_job(pipe: LayeredPipeline, image: Image.Image | None = None, **kwargs: Any) -> Generation:
    """Two layers, two steps: the cheapest job that still runs CFG and the full loop."""
    options: dict[str, Any] = {"layers": 2, "num_inference_steps": 2, "prompt": PROMPT}
    options.update(kwargs)
    return pipe.generate(image or picture(), **options)


def pixels(generation: Generation) -> list[np.ndarray]:
    return [np.asarray(layer) for layer in generation.layers]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any connection or Hub download attempt fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)
    monkeypatch.setattr(huggingface_hub.file_download, "hf_hub_download", refuse)


@pytest.fixture(scope="module")
def four_layers(tiny_pipeline: LayeredPipeline) -> tuple[Generation, list[tuple[int, int]]]:
    """One 4-layer job on a 3:2 picture, with the on_step calls it made."""
    steps: list[tuple[int, int]] = []
    generation = tiny_pipeline.generate(
        picture((96, 64)),
        layers=4,
        prompt=PROMPT,
        num_inference_steps=2,
        seed=11,
        on_step=lambda step, total: steps.append((step, total)),
    )
    return generation, steps


# --- loading -------------------------------------------------------------------------------


def test_loads_from_a_folder_without_the_network(tiny_model_dir: Path, no_network: None) -> None:
    pipe = load_pipeline(tiny_model_dir, device="cpu")

    assert pipe.info.model_path == str(tiny_model_dir.resolve())
    assert pipe.info.revision == tiny.TINY_REVISION
    assert pipe.info.device == "cpu"
    assert pipe.info.dtype == "float32"
    assert pipe.info.load_s > 0
    assert not pipe.can_caption


def test_a_missing_folder_is_a_clear_start_up_error(tmp_path: Path, no_network: None) -> None:
    missing = tmp_path / "weights"

    with pytest.raises(WeightsMissingError) as caught:
        load_pipeline(missing, device="cpu")

    message = str(caught.value)
    assert "MODEL_PATH" in message
    assert str(missing) in message
    assert "python -m gpujobs.worker.fetch_weights" in message
    assert "does not exist" in message
    assert caught.value.model_path == str(missing.resolve())


def test_an_empty_folder_is_a_clear_start_up_error(tmp_path: Path, no_network: None) -> None:
    with pytest.raises(WeightsMissingError, match=r"empty.*fetch_weights"):
        load_pipeline(tmp_path, device="cpu")


def test_a_missing_component_is_named(
    tiny_model_dir: Path, tmp_path: Path, no_network: None
) -> None:
    partial = shutil.copytree(tiny_model_dir, tmp_path / "partial")
    shutil.rmtree(partial / "transformer")

    with pytest.raises(WeightsMissingError, match="transformer/ folder is missing"):
        load_pipeline(partial, device="cpu")


def test_a_missing_shard_is_named(tiny_model_dir: Path, tmp_path: Path) -> None:
    partial = shutil.copytree(tiny_model_dir, tmp_path / "partial")
    index = {"weight_map": {"a.weight": "model-00001-of-00002.safetensors"}}
    (partial / "vae" / "model.safetensors.index.json").write_text(json.dumps(index))

    with pytest.raises(WeightsMissingError, match=r"vae/model-00001-of-00002\.safetensors"):
        check_weights(partial)


def test_another_pipeline_is_refused(tiny_model_dir: Path, tmp_path: Path) -> None:
    other = shutil.copytree(tiny_model_dir, tmp_path / "other")
    index = json.loads((other / "model_index.json").read_text())
    index["_class_name"] = "QwenImagePipeline"
    (other / "model_index.json").write_text(json.dumps(index))

    with pytest.raises(WeightsMissingError, match="not QwenImageLayeredPipeline"):
        check_weights(other)


def test_importing_the_worker_modules_does_not_import_torch() -> None:
    code = (
        "import sys, gpujobs.worker.pipeline, gpujobs.worker.fetch_weights, gpujobs.worker.tiny\n"
        "heavy = ('torch', 'diffusers', 'transformers', 'PIL')\n"
        "print(sorted(m for m in heavy if m in sys.modules))"
    )
    src = Path(__file__).resolve().parents[2] / "src"
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(src)},
    )
    assert result.stdout.strip() == "[]"


# --- generating ----------------------------------------------------------------------------


def test_returns_the_asked_number_of_rgba_layers_at_the_input_aspect(
    four_layers: tuple[Generation, list[tuple[int, int]]],
) -> None:
    generation, _ = four_layers

    assert len(generation.layers) == 4
    assert {layer.mode for layer in generation.layers} == {"RGBA"}
    assert {layer.size for layer in generation.layers} == {(generation.width, generation.height)}
    # 3:2 input at resolution 640: about 640² pixels, sides multiples of 16.
    assert (generation.width, generation.height) == (768, 512)
    assert generation.width % 16 == 0
    assert generation.height % 16 == 0


def test_compositing_the_layers_in_order_gives_a_picture_of_the_same_size(
    four_layers: tuple[Generation, list[tuple[int, int]]],
) -> None:
    generation, _ = four_layers

    composite = functools.reduce(Image.alpha_composite, generation.layers)

    assert composite.mode == "RGBA"
    assert composite.size == (generation.width, generation.height)


def test_reports_how_the_layers_were_made(
    four_layers: tuple[Generation, list[tuple[int, int]]],
) -> None:
    generation, _ = four_layers

    assert generation.seed == 11
    assert generation.resolution == 640
    assert generation.steps == 2
    assert generation.true_cfg_scale == 4.0
    assert generation.inference_s > 0
    assert generation.peak_gpu_memory_bytes is None  # CPU


def test_on_step_is_called_after_every_step(
    four_layers: tuple[Generation, list[tuple[int, int]]],
) -> None:
    _, steps = four_layers

    assert steps == [(1, 2), (2, 2)]


def test_the_same_seed_gives_the_same_pixels_and_another_seed_others(
    tiny_pipeline: LayeredPipeline,
) -> None:
    first = pixels(small_job(tiny_pipeline, seed=5))
    again = pixels(small_job(tiny_pipeline, seed=5))
    other = pixels(small_job(tiny_pipeline, seed=6))

    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(first, other, strict=True))


def test_a_missing_seed_is_drawn_and_reported(tiny_pipeline: LayeredPipeline) -> None:
    drawn = small_job(tiny_pipeline, seed=None)
    replayed = small_job(tiny_pipeline, seed=drawn.seed)

    assert isinstance(drawn.seed, int)
    assert drawn.seed >= 0
    assert all(np.array_equal(a, b) for a, b in zip(pixels(drawn), pixels(replayed), strict=True))


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_images_without_alpha_are_accepted(tiny_pipeline: LayeredPipeline, mode: str) -> None:
    generation = small_job(tiny_pipeline, picture((64, 64), mode=mode), seed=1)

    assert [layer.mode for layer in generation.layers] == ["RGBA", "RGBA"]
    assert (generation.width, generation.height) == (640, 640)


@pytest.mark.parametrize("prompt", [None, "", "   "])
def test_without_a_processor_a_prompt_is_required(
    tiny_pipeline: LayeredPipeline, prompt: str | None
) -> None:
    with pytest.raises(ValueError, match="prompt is required"):
        tiny_pipeline.generate(picture(), prompt=prompt, num_inference_steps=2)


@pytest.mark.parametrize(
    ("arguments", "complaint"),
    [
        ({"resolution": 512}, "resolution must be one of"),
        ({"layers": 0}, "layers must be at least 1"),
        ({"num_inference_steps": 1}, "num_inference_steps must be at least 2"),
        ({"seed": -1}, "seed must be between"),
        ({"true_cfg_scale": float("nan")}, "true_cfg_scale must be a finite number"),
    ],
)
def test_out_of_range_arguments_are_refused_before_any_work(
    tiny_pipeline: LayeredPipeline, arguments: dict[str, Any], complaint: str
) -> None:
    with pytest.raises(ValueError, match=complaint):
        tiny_pipeline.generate(picture(), prompt=PROMPT, **arguments)


def test_an_exception_from_on_step_aborts_the_job(tiny_pipeline: LayeredPipeline) -> None:
    class CancelledError(Exception):
        pass

    def cancel(step: int, total: int) -> None:
        raise CancelledError

    with pytest.raises(CancelledError):
        small_job(tiny_pipeline, on_step=cancel)
    # The pipeline is free for the next job.
    assert len(small_job(tiny_pipeline, seed=2).layers) == 2


# --- optimization: real-valued RoPE and compiled blocks ------------------------------------


@pytest.fixture
def eager_compile(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[dict[str, Any]]]:
    """``torch.compile`` with the ``eager`` backend: Dynamo traces (graph breaks and recompiles
    show), but no code is generated, so it takes ~2 s on CPU instead of ~12 s with Inductor.

    Yields the keyword arguments of every ``torch.compile`` call.
    """
    import torch  # noqa: PLC0415  # after the module's importorskip

    calls: list[dict[str, Any]] = []
    real_compile = torch.compile

    def compile_eagerly(model: Any, **kwargs: Any) -> Any:
        calls.append(kwargs)
        return real_compile(model, **{**kwargs, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eagerly)
    yield calls
    torch._dynamo.reset()  # forget the traced blocks: other tests must not depend on them


@pytest.mark.parametrize(("dtype", "tolerance"), [("float32", 1e-6), ("bfloat16", 1e-2)])
def test_real_valued_rope_rotates_like_the_complex_one(dtype: str, tolerance: float) -> None:
    import torch  # noqa: PLC0415
    from diffusers.models.transformers import transformer_qwenimage  # noqa: PLC0415

    from gpujobs.worker import _speedups  # noqa: PLC0415

    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 37, 3, 16, generator=generator).to(getattr(torch, dtype))  # [B, S, H, D]
    angles = torch.rand(37, 8, generator=generator) * 100  # [S, D/2], beyond a few turns
    freqs = torch.polar(torch.ones_like(angles), angles)

    expected = transformer_qwenimage.apply_rotary_emb_qwen(x, freqs, use_real=False)
    actual = _speedups.apply_rope_real(x, torch.view_as_real(freqs))

    assert actual.dtype == x.dtype
    assert actual.shape == x.shape
    torch.testing.assert_close(actual, expected, rtol=tolerance, atol=tolerance)


def test_nothing_is_optimized_or_compiled_on_cpu_by_default(
    tiny_model_dir: Path, eager_compile: list[dict[str, Any]]
) -> None:
    pipe = load_pipeline(tiny_model_dir, device="cpu")
    generation = small_job(pipe, seed=3)

    assert not pipe.info.optimized
    assert eager_compile == []
    assert generation.compile_s is None
    assert not load_pipeline(tiny_model_dir, device="cpu", optimize=False).info.optimized


def test_an_optimized_pipeline_compiles_once_and_gives_the_same_layers(
    tiny_model_dir: Path, tiny_pipeline: LayeredPipeline, eager_compile: list[dict[str, Any]]
) -> None:
    stock_before = pixels(small_job(tiny_pipeline, seed=4))

    optimized = load_pipeline(tiny_model_dir, device="cpu", optimize=True)
    warm = optimized.warm_up(layers=1)
    # Another prompt length, aspect ratio and layer count than the warm-up's.
    job = small_job(optimized, seed=4)

    assert optimized.info.optimized
    assert len(eager_compile) == 2  # the tiny transformer's two blocks
    assert {(c["fullgraph"], c["dynamic"]) for c in eager_compile} == {(True, True)}
    assert warm.compile_s is not None
    assert warm.compile_s > 0
    assert optimized.info.compile_s == warm.compile_s
    assert job.compile_s == 0.0  # dynamic shapes: the warm-up's compilation serves every job
    # Same arithmetic in another order: fp32 rounding, at most one level of a pixel.
    for a, b in zip(pixels(job), stock_before, strict=True):
        assert np.abs(a.astype(np.int16) - b.astype(np.int16)).max() <= 1
    # The RoPE replacement is process-wide, but a pipeline that was not optimized is untouched.
    stock_after = pixels(small_job(tiny_pipeline, seed=4))
    assert all(np.array_equal(a, b) for a, b in zip(stock_after, stock_before, strict=True))


def test_warm_up_runs_a_small_job_and_records_no_compilation_when_not_optimized(
    tiny_pipeline: LayeredPipeline,
) -> None:
    generation = tiny_pipeline.warm_up(layers=2)

    assert len(generation.layers) == 2
    assert (generation.width, generation.height) == (640, 640)
    assert generation.steps == 2
    assert generation.compile_s is None
    assert tiny_pipeline.info.compile_s is None


# --- the tiny model and fetch_weights ------------------------------------------------------


def test_tiny_command_saves_a_small_loadable_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = tmp_path / "tiny"

    assert tiny.main([str(target)]) == 0

    check_weights(target)
    assert json.loads((target / WEIGHTS_MARKER).read_text())["revision"] == tiny.TINY_REVISION
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    assert size < 5_000_000
    assert "saved a tiny Qwen-Image-Layered" in capsys.readouterr().out


class FakeHub:
    """Stands in for ``huggingface_hub.snapshot_download``: records the call, fills the folder."""

    def __init__(self, source: Path | None) -> None:
        self.source = source
        self.calls: list[dict[str, Any]] = []

    def __call__(self, **kwargs: Any) -> str:
        self.calls.append(kwargs)
        local_dir = Path(kwargs["local_dir"])
        if self.source is not None:
            shutil.copytree(self.source, local_dir, dirs_exist_ok=True)
            metadata = local_dir / ".cache" / "huggingface" / "download"
            metadata.mkdir(parents=True, exist_ok=True)
            (metadata / "model_index.json.metadata").write_text(f"{COMMIT}\netag\n1.0\n")
        return str(local_dir)


def test_fetch_weights_downloads_the_pipeline_and_records_the_commit(
    tiny_model_dir: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    hub = FakeHub(tiny_model_dir)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)
    dest = tmp_path / "volume" / "qwen"

    assert fetch_weights.main([str(dest), "--revision", "v1"]) == 0

    (call,) = hub.calls
    assert call["repo_id"] == MODEL_ID == "Qwen/Qwen-Image-Layered"
    assert call["revision"] == "v1"
    assert Path(call["local_dir"]) == dest.resolve()
    assert set(call["allow_patterns"]) >= {"model_index.json", "transformer/*", "vae/*"}
    marker = json.loads((dest / WEIGHTS_MARKER).read_text())
    assert marker["revision"] == "v1"
    assert marker["commit"] == COMMIT
    assert f"MODEL_PATH={dest.resolve()}" in capsys.readouterr().out
    assert load_pipeline(dest, device="cpu").info.revision == COMMIT


def test_fetch_weights_takes_the_default_branch_without_revision(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = FakeHub(tiny_model_dir)
    monkeypatch.setattr("huggingface_hub.snapshot_download", hub)

    fetch_weights.fetch_weights(tmp_path / "w")

    assert hub.calls[0]["revision"] is None
    assert hub.calls[0]["repo_id"] == MODEL_ID


def test_fetch_weights_fails_when_the_download_left_the_folder_incomplete(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr("huggingface_hub.snapshot_download", FakeHub(None))

    assert fetch_weights.main([str(tmp_path / "w")]) == 1

    assert "MODEL_PATH" in capsys.readouterr().err
    assert not (tmp_path / "w" / WEIGHTS_MARKER).exists()


def test_fetch_weights_needs_a_destination(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        fetch_weights.main([])

    assert exited.value.code == 2
    assert "dest" in capsys.readouterr().err
