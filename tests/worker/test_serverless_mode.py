"""Serverless mode: the handler in-process, then the real entry point under runpod's own local
test server (``python -m gpujobs.worker --rp_serve_api``), called with our ``RunPodServerless``.

The local server runs ``GPUJOBS_WORKER_FAKE=1`` (the torch-free test seam) for the plumbing,
and the tiny random-weight model for the one test that matters most: pod mode and serverless
mode answer the same request with the same layers, byte for byte (``-k tiny`` selects it).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import os
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("runpod", reason="needs the runpod extra")
pytest.importorskip("PIL", reason="needs the worker extra")

import httpx
from PIL import Image

import gpujobs
from gpujobs import JobFailedError, JobStatus, PollSchedule, RunPodServerless
from gpujobs.testing import runpod_local_server, serve_app_in_thread
from gpujobs.worker.fake import FakePipeline
from gpujobs.worker.pipeline import WeightsMissingError
from gpujobs.worker.pod import create_app
from gpujobs.worker.serverless import make_handler
from gpujobs.worker.service import InferenceService

PROMPT = "a red square on a blue ground"


def picture() -> str:
    image = Image.new("RGB", (96, 64), (20, 40, 200))
    image.paste((220, 30, 30), (24, 16, 72, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


IMAGE = picture()


def request(**fields: Any) -> dict[str, Any]:
    return {"image": IMAGE, "num_inference_steps": 2, "seed": 7, **fields}


# -- the handler, in-process ------------------------------------------------------------------


class Recorder:
    def __init__(self) -> None:
        self.updates: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, job: Mapping[str, Any], progress: dict[str, Any]) -> None:
        self.updates.append((job["id"], progress))


@pytest.mark.anyio
async def test_the_handler_answers_the_contracts_response() -> None:
    handler = make_handler(InferenceService(FakePipeline()))
    output = await handler({"id": "job-1", "input": request(layers=3)})
    assert set(output) == {"layers", "metadata"}
    assert len(output["layers"]) == 3
    assert output["metadata"]["seed"] == 7


@pytest.mark.anyio
async def test_a_job_delivered_twice_runs_once() -> None:
    pipeline = FakePipeline(step_s=0.01)
    handler = make_handler(InferenceService(pipeline))
    delivery = {"id": "job-1", "input": request(seed=None)}
    # RunPod re-delivering a long job: while it runs, and after it finished.
    first, second = await asyncio.gather(handler(delivery), handler(delivery))
    third = await handler(delivery)
    assert first == second == third
    assert pipeline.calls == 1
    await handler({"id": "job-2", "input": request(seed=None)})
    assert pipeline.calls == 2


@pytest.mark.anyio
async def test_a_job_id_reused_for_another_request_is_refused() -> None:
    handler = make_handler(InferenceService(FakePipeline()))
    await handler({"id": "job-1", "input": request()})
    answer = await handler({"id": "job-1", "input": request(layers=5)})
    assert answer == {
        "error": "invalid request: job id 'job-1' was already used for a different request; "
        "use a new id"
    }


@pytest.mark.anyio
async def test_recent_answers_are_bounded() -> None:
    pipeline = FakePipeline()
    service = InferenceService(pipeline, cache_size=2)
    handler = make_handler(service)
    for n in range(3):
        await handler({"id": f"job-{n}", "input": request()})
    assert service.cached("job-0") is None
    assert service.cached("job-2") is not None
    await handler({"id": "job-0", "input": request()})
    assert pipeline.calls == 4


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("job_input", "says"),
    [
        ({"image": "%%%"}, "image: is not valid base64"),
        (request(layers=11), "layers: must be at most 10"),
        (request(resolution=800), "resolution: must be 640 or 1024"),
        (request(steps=3), "steps: is not a field"),
        ("an image please", "must be a JSON object, not a string"),
        (None, "must be a JSON object, not null"),
    ],
)
async def test_bad_input_fails_the_job_with_a_readable_error(job_input: Any, says: str) -> None:
    handler = make_handler(InferenceService(FakePipeline()))
    answer = await handler({"id": "job-1", "input": job_input})
    assert set(answer) == {"error"}
    assert answer["error"].startswith("invalid request: ")
    assert says in answer["error"]


@pytest.mark.anyio
async def test_an_unexpected_failure_is_an_error_without_a_traceback() -> None:
    class Broken(FakePipeline):
        def generate(self, *_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("CUDA out of memory")

    handler = make_handler(InferenceService(Broken()))
    answer = await handler({"id": "job-1", "input": request()})
    assert answer == {"error": "inference failed: RuntimeError: CUDA out of memory"}


@pytest.mark.anyio
async def test_a_worker_whose_model_did_not_load_fails_every_job_with_the_reason(
    tmp_path: Path,
) -> None:
    reason = str(WeightsMissingError(tmp_path / "empty", "the folder is empty"))
    handler = make_handler(None, load_error=reason)
    answer = await handler({"id": "job-1", "input": request()})
    assert answer["error"].startswith("the model failed to load: no usable")
    assert "MODEL_PATH=" in answer["error"]


@pytest.mark.anyio
async def test_progress_updates_are_throttled_and_end_with_the_last_step() -> None:
    every = Recorder()
    handler = make_handler(
        InferenceService(FakePipeline()), send_progress=every, progress_interval_s=0
    )
    await handler({"id": "job-1", "input": request(num_inference_steps=4)})
    assert every.updates == [("job-1", {"progress": {"step": n, "total": 4}}) for n in (1, 2, 3, 4)]
    throttled = Recorder()
    handler = make_handler(
        InferenceService(FakePipeline()), send_progress=throttled, progress_interval_s=60
    )
    await handler({"id": "job-2", "input": request(num_inference_steps=4)})
    assert [update["progress"]["step"] for _, update in throttled.updates] == [1, 4]


@pytest.mark.anyio
async def test_a_failing_progress_sender_does_not_fail_the_job(
    caplog: pytest.LogCaptureFixture,
) -> None:
    def broken(_job: Mapping[str, Any], _progress: dict[str, Any]) -> None:
        raise ConnectionError("no webhook")

    handler = make_handler(InferenceService(FakePipeline()), send_progress=broken)
    answer = await handler({"id": "job-1", "input": request()})
    assert "layers" in answer
    assert "progress callback failed" in caplog.text


# -- runpod's local test server ---------------------------------------------------------------


def worker_env(**extra: str) -> dict[str, str]:
    src = str(Path(gpujobs.__file__).resolve().parents[1])
    env = {k: v for k, v in os.environ.items() if not k.startswith("RUNPOD_WEBHOOK")}
    return env | {
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        "RUNPOD_LOG_LEVEL": "ERROR",
        "UVICORN_LOG_LEVEL": "warning",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": "1",
        "DEPLOYMENT_MODE": "serverless",
        **extra,
    }


def start_local_server(env: dict[str, str]) -> contextlib.AbstractContextManager[str]:
    # The model loads before the worker listens: allow for it.
    return runpod_local_server([sys.executable, "-m", "gpujobs.worker"], env=env, within_s=90)


@pytest.fixture(scope="module")
def fake_worker() -> Iterator[str]:
    with start_local_server(worker_env(GPUJOBS_WORKER_FAKE="1")) as url:
        yield url


def runner(url: str) -> RunPodServerless:
    return RunPodServerless(
        endpoint_url=url, poll=PollSchedule(first_s=0.01, max_interval_s=0.1), name="rp-local"
    )


@pytest.mark.anyio
async def test_runsync_through_the_local_server(fake_worker: str) -> None:
    async with runner(fake_worker) as r:
        result = await r.run(request(layers=3), timeout=60)
    assert result.status is JobStatus.COMPLETED
    assert len(result.output["layers"]) == 3
    assert result.output["metadata"]["model"] == "fake"
    layer = Image.open(io.BytesIO(base64.b64decode(result.output["layers"][0])))
    assert layer.mode == "RGBA"


@pytest.mark.anyio
async def test_submit_and_wait_through_the_local_server(fake_worker: str) -> None:
    async with runner(fake_worker) as r:
        handles = [await r.submit(request(seed=n), timeout=60) for n in range(3)]
        results = await asyncio.gather(*(r.wait(h, timeout=60) for h in handles))
    assert [result.output["metadata"]["seed"] for result in results] == [0, 1, 2]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("job_input", "says"),
    [
        (request(layers=1), "layers: must be at least 2"),
        ({"image": base64.b64encode(b"GIF89a" + bytes(32)).decode()}, "image: is a GIF"),
    ],
)
async def test_bad_input_is_a_failed_job_with_a_readable_error(
    fake_worker: str, job_input: dict[str, Any], says: str
) -> None:
    async with runner(fake_worker) as r:
        with pytest.raises(JobFailedError) as info:
            await r.run(job_input, timeout=60)
    error = info.value.error
    assert isinstance(error, str)
    assert error.startswith("invalid request: ")
    assert says in error
    assert "Traceback" not in error


# -- the same answer from both modes ----------------------------------------------------------


def test_tiny_model_pod_and_serverless_answer_the_same_layers(
    tiny_model_dir: Path, tiny_pipeline: Any
) -> None:
    same = request(layers=2, prompt=PROMPT, seed=1234)
    with (
        serve_app_in_thread(create_app(lambda: tiny_pipeline)) as pod,
        httpx.Client(timeout=120) as client,
    ):
        deadline = time.monotonic() + 30
        while client.get(f"{pod}/health").json()["status"] != "ready":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        from_pod = client.post(f"{pod}/inference", json=same).json()

    env = worker_env(MODEL_PATH=str(tiny_model_dir), WORKER_DEVICE="cpu")
    with start_local_server(env) as url:
        from_serverless = asyncio.run(_run_once(url, same)).output

    assert len(from_pod["layers"]) == 2
    assert from_serverless["layers"] == from_pod["layers"]  # byte-identical PNGs
    keys = ("seed", "resolution", "width", "height", "layers", "steps", "model", "revision")
    assert {k: from_serverless["metadata"][k] for k in keys} == {
        k: from_pod["metadata"][k] for k in keys
    }


async def _run_once(url: str, payload: dict[str, Any]) -> Any:
    async with runner(url) as r:
        return await r.run(payload, timeout=120)
