"""The worker's Modal app: it describes itself without a GPU or credentials, takes its settings
from the environment, and its GPU method answers the worker contract in the runner's envelope."""

from __future__ import annotations

import base64
import importlib
import io
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("modal", reason="needs the modal extra")
pytest.importorskip("fastapi", reason="needs the worker extra")
pytest.importorskip("PIL", reason="needs the worker extra")

import modal
from PIL import Image

from gpujobs import JobFailedError, ModalRunner, PollSchedule
from gpujobs.testing import FakeModal
from gpujobs.worker import modal_app
from gpujobs.worker.modal_app import ModalAppSettings

LOCAL_RUN = "ignore:The Worker.run function is executing locally"


def picture() -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (200, 30, 30)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_the_app_is_described_without_a_gpu_or_credentials(tmp_path: Path) -> None:
    code = (
        "import sys, modal, gpujobs.worker.modal_app as m;"
        "assert isinstance(m.app, modal.App) and m.app.name == 'gpujobs-qwen-layered';"
        "assert isinstance(m.Worker, modal.Cls) and isinstance(m.web, modal.Function);"
        "assert 'torch' not in sys.modules and 'diffusers' not in sys.modules;"
        "print('ok')"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MODAL_", "GPUJOBS_"))}
    env["HOME"] = str(tmp_path)  # no ~/.modal.toml either
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, dict[str, Any]]]:
    """The keyword arguments the module hands modal's decorators, when reloaded."""
    seen: dict[str, dict[str, Any]] = {}

    def spy(name: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen[name] = kwargs
            return real(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(modal.App, "cls", spy("cls", modal.App.cls))
    monkeypatch.setattr(modal.App, "function", spy("function", modal.App.function))
    monkeypatch.setattr(modal, "asgi_app", spy("asgi_app", modal.asgi_app))
    yield seen
    monkeypatch.undo()
    for name in list(os.environ):
        if name.startswith("GPUJOBS_MODAL_"):
            del os.environ[name]
    importlib.reload(modal_app)  # back to the defaults for the other tests


def test_settings_from_the_environment_reach_the_app(
    monkeypatch: pytest.MonkeyPatch, recorded: dict[str, dict[str, Any]]
) -> None:
    monkeypatch.setenv("GPUJOBS_MODAL_APP", "layers-prod")
    monkeypatch.setenv("GPUJOBS_MODAL_GPUS", "H200, H100")
    monkeypatch.setenv("GPUJOBS_MODAL_TIMEOUT_S", "300")
    monkeypatch.setenv("GPUJOBS_MODAL_STARTUP_TIMEOUT_S", "1200")
    monkeypatch.setenv("GPUJOBS_MODAL_SCALEDOWN_S", "30")
    monkeypatch.setenv("GPUJOBS_MODAL_MAX_CONTAINERS", "3")
    monkeypatch.setenv("GPUJOBS_MODAL_PROXY_AUTH", "0")
    module = importlib.reload(modal_app)
    assert module.app.name == "layers-prod"
    gpu = recorded["cls"]
    assert gpu["gpu"] == ["H200", "H100"]  # fallbacks, in order of preference
    assert gpu["timeout"] == 300
    assert gpu["startup_timeout"] == 1200
    assert gpu["scaledown_window"] == 30
    assert gpu["max_containers"] == 3
    assert list(gpu["volumes"]) == [modal_app.MODELS_DIR]
    assert gpu["env"]["GPUJOBS_MODAL_APP"] == "layers-prod"  # the containers see the same
    assert recorded["function"]["timeout"] == 300
    assert recorded["asgi_app"] == {"requires_proxy_auth": False}


def test_settings_round_trip_through_the_environment() -> None:
    settings = ModalAppSettings(
        app_name="a", gpus=("L40S",), max_containers=2, image="registry/worker:1", proxy_auth=False
    )
    assert ModalAppSettings.from_env(settings.as_env()) == settings
    assert ModalAppSettings.from_env({}) == ModalAppSettings()


def test_the_web_function_serves_the_job_routes() -> None:
    web_app = modal_app.web.local()
    paths = {route.path for route in web_app.routes}
    assert {"/submit", "/result/{call_id}", "/cancel/{call_id}", "/health"} <= paths


@pytest.mark.anyio
@pytest.mark.filterwarnings(LOCAL_RUN)
async def test_the_gpu_method_answers_the_contract_through_modal_runner(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GPUJOBS_WORKER_FAKE", "1")  # the torch-free pipeline
    worker = modal_app.Worker()

    async def method(payload: Any) -> Any:
        return await worker.run.local(payload)

    fake = FakeModal(method)
    poll = PollSchedule(first_s=0.01, max_interval_s=0.05)
    request = {"image": picture(), "layers": 2, "num_inference_steps": 2, "prompt": "a square"}
    async with ModalRunner(calls=fake, poll=poll, usd_per_s=0.001) as runner:
        first = await runner.run(request, timeout=30)
        second = await runner.run(request, timeout=30)
        with pytest.raises(JobFailedError, match="layers"):
            await runner.run({**request, "layers": 0}, timeout=30)
    await fake.aclose()
    assert len(first.output["layers"]) == 2
    assert first.output["metadata"]["resolution"] == 640
    assert first.timings.cold_start is True
    assert second.timings.cold_start is False
    assert first.cost is not None
    assert first.cost.billed_s == first.timings.execution_s
