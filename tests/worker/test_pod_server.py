"""The pod server over real HTTP: uvicorn on 127.0.0.1, httpx as the client.

Most tests serve ``FakePipeline`` (instant, no torch); the tests named ``*tiny*`` serve the tiny
random-weight model end to end (select or skip them with ``-k tiny``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi", reason="needs the worker extra")
pytest.importorskip("PIL", reason="needs the worker extra")

import httpx
from PIL import Image

import gpujobs
from gpujobs.testing import serve_app_in_thread
from gpujobs.worker.fake import FakePipeline, layer_size
from gpujobs.worker.pipeline import WeightsMissingError, load_pipeline
from gpujobs.worker.pod import PodSettings, create_app
from gpujobs.worker.service import PipelineLike

TOKEN = "s3cret-token"
PROMPT = "a red square on a blue ground"


def picture_bytes(size: tuple[int, int] = (96, 64), image_format: str = "PNG") -> bytes:
    image = Image.new("RGB", size, (20, 40, 200))
    w, h = size
    image.paste((220, 30, 30), (w // 4, h // 4, 3 * w // 4, 3 * h // 4))
    buffer = io.BytesIO()
    image.save(buffer, format=image_format)
    return buffer.getvalue()


PICTURE = picture_bytes()
IMAGE = base64.b64encode(PICTURE).decode()


def job(**fields: Any) -> dict[str, Any]:
    return {"image": IMAGE, "num_inference_steps": 2, "seed": 7, **fields}


def wait_for(predicate: Callable[[], Any], within_s: float = 10.0) -> Any:
    deadline = time.monotonic() + within_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def serve() -> Iterator[Callable[..., httpx.Client]]:
    """``serve(factory, **settings)`` → a client for a pod server whose model is loaded."""
    with contextlib.ExitStack() as stack:

        def start(
            factory: Callable[[], PipelineLike], *, wait_ready: bool = True, **settings: Any
        ) -> httpx.Client:
            url = stack.enter_context(
                serve_app_in_thread(create_app(factory, PodSettings(**settings)))
            )
            token = settings.get("api_token")
            headers = {"Authorization": f"Bearer {token}"} if token else {}
            client = stack.enter_context(httpx.Client(base_url=url, headers=headers, timeout=30))
            if wait_ready:
                wait_for(lambda: client.get("/health").json()["status"] == "ready")
            return client

        yield start


def poll(client: httpx.Client, job_id: str, *states: str) -> dict[str, Any]:
    def look() -> dict[str, Any] | None:
        body: dict[str, Any] = client.get(f"/jobs/{job_id}").json()
        return body if body["status"] in states else None

    result: dict[str, Any] = wait_for(look)
    return result


def layer_images(response: dict[str, Any]) -> list[Image.Image]:
    return [Image.open(io.BytesIO(base64.b64decode(layer))) for layer in response["layers"]]


# -- inference --------------------------------------------------------------------------------


def test_json_inference_answers_rgba_layers_and_metadata(
    serve: Callable[..., httpx.Client],
) -> None:
    client = serve(FakePipeline)
    response = client.post("/inference", json=job(layers=3, prompt=PROMPT))
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"layers", "metadata"}
    layers = layer_images(body)
    assert [layer.mode for layer in layers] == ["RGBA"] * 3
    assert {layer.format for layer in layers} == {"PNG"}
    metadata = body["metadata"]
    assert [layer.size for layer in layers] == [(metadata["width"], metadata["height"])] * 3
    assert (metadata["width"], metadata["height"]) == layer_size((96, 64), 640)
    assert metadata["seed"] == 7
    assert metadata["layers"] == 3
    assert metadata["steps"] == 2
    assert metadata["resolution"] == 640
    assert metadata["true_cfg_scale"] == 4.0
    assert metadata["device"] == "cpu"
    assert metadata["dtype"] == "float32"
    assert metadata["model"] == "fake"
    assert metadata["revision"] == "fake-1"
    assert metadata["peak_gpu_memory_bytes"] is None
    assert set(metadata["timings"]) == {"load_s", "queue_s", "inference_s", "encode_s"}
    assert response.headers["X-Job-Id"]


def test_pptx_package_has_every_layer_full_slide_in_order(
    serve: Callable[..., httpx.Client],
) -> None:
    pptx = pytest.importorskip("pptx")
    client = serve(FakePipeline)
    body = client.post("/inference", json=job(layers=4, output_format="pptx")).json()
    presentation = pptx.Presentation(io.BytesIO(base64.b64decode(body["package"])))
    width, height = body["metadata"]["width"], body["metadata"]["height"]
    assert presentation.slide_width == width * 914_400 // 96
    assert presentation.slide_height == height * 914_400 // 96
    (slide,) = presentation.slides
    pictures = list(slide.shapes)
    assert [p.shape_type for p in pictures] == [pptx.enum.shapes.MSO_SHAPE_TYPE.PICTURE] * 4
    assert all((p.left, p.top) == (0, 0) for p in pictures)
    assert all(
        (p.width, p.height) == (presentation.slide_width, presentation.slide_height)
        for p in pictures
    )
    assert [p.image.blob for p in pictures] == [base64.b64decode(layer) for layer in body["layers"]]


def test_multipart_upload_gives_the_same_layers_as_json(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline)
    uploaded = client.post(
        "/inference/upload",
        files={"file": ("picture.png", PICTURE, "image/png")},
        data={
            "layers": "3",
            "seed": "7",
            "num_inference_steps": "2",
            "prompt": PROMPT,
            "true_cfg_scale": "4",
        },
    )
    assert uploaded.status_code == 200, uploaded.text
    posted = client.post("/inference", json=job(layers=3, prompt=PROMPT)).json()
    assert uploaded.json()["layers"] == posted["layers"]


@pytest.mark.parametrize(
    ("files", "data", "status", "says"),
    [
        (None, {"layers": "3"}, 415, "multipart/form-data"),
        ({"other": ("a.png", PICTURE, "image/png")}, {"layers": "3"}, 422, "file: is required"),
        ({"file": ("a.gif", b"GIF89a" + bytes(20), "image/gif")}, {}, 422, "is a GIF"),
        (
            {"file": ("a.png", PICTURE, "image/png")},
            {"layers": "many"},
            422,
            "layers: must be an integer",
        ),
        (
            {"file": ("a.png", PICTURE, "image/png")},
            {"colour": "red"},
            422,
            "colour: is not a field",
        ),
    ],
)
def test_multipart_upload_refuses_bad_forms_readably(
    serve: Callable[..., httpx.Client],
    files: dict[str, Any] | None,
    data: dict[str, str],
    status: int,
    says: str,
) -> None:
    client = serve(FakePipeline)
    response = client.post("/inference/upload", files=files, data=data)
    assert response.status_code == status
    assert says in response.json()["error"]


def png_header_only(width: int, height: int) -> bytes:
    import struct  # noqa: PLC0415
    import zlib  # noqa: PLC0415

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


BAD_INPUTS = [
    pytest.param({"image": "%%% not base64 %%%"}, "image: is not valid base64", id="not-base64"),
    pytest.param({"image": b64(b"hello, I am text")}, "image: is not an image", id="not-an-image"),
    pytest.param({"image": b64(picture_bytes(image_format="GIF"))}, "image: is a GIF", id="gif"),
    pytest.param({"image": b64(picture_bytes(image_format="BMP"))}, "image: is a BMP", id="bmp"),
    pytest.param(
        {"image": b64(b"\x89PNG\r\n\x1a\n" + bytes(20 * 1024 * 1024))},
        "MB once decoded",
        id="too-many-bytes",
    ),
    pytest.param(
        {"image": b64(png_header_only(100_000, 100_000))}, "too many pixels", id="too-many-pixels"
    ),
    pytest.param({"layers": 1}, "layers: must be at least 2", id="layers-1"),
    pytest.param({"layers": 11}, "layers: must be at most 10", id="layers-11"),
    pytest.param({"resolution": 800}, "resolution: must be 640 or 1024", id="resolution-800"),
    pytest.param({"colour": "red"}, "colour: is not a field", id="unknown-field"),
    pytest.param(
        {"num_inference_steps": 0}, "num_inference_steps: must be at least 1", id="steps-0"
    ),
]


@pytest.mark.parametrize("route", ["/inference", "/jobs"])
@pytest.mark.parametrize(("change", "says"), BAD_INPUTS)
def test_bad_input_is_a_4xx_with_a_readable_message(
    serve: Callable[..., httpx.Client], route: str, change: dict[str, Any], says: str
) -> None:
    client = serve(FakePipeline)
    response = client.post(route, json=job(**change))
    assert response.status_code == 422
    body = response.json()
    assert set(body) == {"error"}
    assert body["error"].startswith("invalid request: ")
    assert says in body["error"]
    assert "Traceback" not in response.text
    assert "pydantic" not in response.text


@pytest.mark.parametrize(
    ("content", "says"),
    [(b"{", "not valid JSON"), (b"[1]", "JSON object"), (b"", "not valid JSON")],
)
def test_a_body_that_is_not_a_json_object_is_refused(
    serve: Callable[..., httpx.Client], content: bytes, says: str
) -> None:
    client = serve(FakePipeline)
    response = client.post(
        "/inference", content=content, headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 422
    assert says in response.json()["error"]


def test_a_body_over_the_limit_is_413(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline, max_body_bytes=64 * 1024)
    big = job(prompt="x" * 100_000)
    assert client.post("/inference", json=big).status_code == 413

    def chunked() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"image": "'
        yield b"A" * 100_000
        yield b'"}'

    response = client.post("/jobs", content=chunked(), headers={"Content-Type": "application/json"})
    assert response.status_code == 413
    assert "too large" in response.json()["error"]


def test_a_pipeline_refusal_is_a_readable_4xx(serve: Callable[..., httpx.Client]) -> None:
    class NeedsTwoSteps(FakePipeline):
        def generate(self, image: Any, **kwargs: Any) -> Any:
            if kwargs["num_inference_steps"] < 2:
                raise ValueError("num_inference_steps must be at least 2, not 1")
            return super().generate(image, **kwargs)

    client = serve(NeedsTwoSteps)
    response = client.post("/inference", json=job(num_inference_steps=1))
    assert response.status_code == 422
    assert response.json() == {
        "error": "invalid request: num_inference_steps must be at least 2, not 1"
    }


def test_a_worker_failure_is_a_500_without_a_traceback(serve: Callable[..., httpx.Client]) -> None:
    class Broken(FakePipeline):
        def generate(self, *_args: Any, **_kwargs: Any) -> Any:
            raise RuntimeError("CUDA out of memory")

    client = serve(Broken)
    response = client.post("/inference", json=job())
    assert response.status_code == 500
    assert response.json() == {"error": "inference failed: RuntimeError: CUDA out of memory"}
    submitted = client.post("/jobs", json=job()).json()
    failed = poll(client, submitted["id"], "FAILED")
    assert failed["error"] == "inference failed: RuntimeError: CUDA out of memory"
    assert "output" not in failed


# -- the job API ------------------------------------------------------------------------------


def test_submit_then_poll_until_completed(serve: Callable[..., httpx.Client]) -> None:
    client = serve(lambda: FakePipeline(step_s=0.01))
    submitted = client.post("/jobs", json=job(layers=2, num_inference_steps=5))
    assert submitted.status_code == 202
    job_id = submitted.json()["id"]
    assert submitted.headers["Location"] == f"/jobs/{job_id}"
    done = poll(client, job_id, "COMPLETED")
    assert len(done["output"]["layers"]) == 2
    assert done["progress"] == {"step": 5, "total": 5}
    assert done["timings"]["execution_s"] >= 0.04
    assert done["timings"]["queue_s"] >= 0
    assert "error" not in done
    # Same request, same seed: the synchronous route answers the same layers.
    assert (
        client.post("/inference", json=job(layers=2, num_inference_steps=5)).json()["layers"]
        == done["output"]["layers"]
    )


def test_progress_is_visible_while_the_job_runs(serve: Callable[..., httpx.Client]) -> None:
    gate = threading.Event()
    client = serve(lambda: FakePipeline(gate=gate))
    job_id = client.post("/jobs", json=job(num_inference_steps=3)).json()["id"]
    running = poll(client, job_id, "RUNNING")
    wait_for(lambda: client.get(f"/jobs/{job_id}").json().get("progress"))
    assert client.get(f"/jobs/{job_id}").json()["progress"] == {"step": 1, "total": 3}
    assert running["timings"]["execution_s"] is not None
    gate.set()
    poll(client, job_id, "COMPLETED")


def test_cancelling_a_queued_job_means_it_never_runs(serve: Callable[..., httpx.Client]) -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    client = serve(lambda: pipeline)
    first = client.post("/jobs", json=job()).json()["id"]
    poll(client, first, "RUNNING")
    second = client.post("/jobs", json=job(seed=8)).json()["id"]
    assert client.get(f"/jobs/{second}").json()["status"] == "QUEUED"
    cancelled = client.delete(f"/jobs/{second}")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "CANCELLED"
    gate.set()
    poll(client, first, "COMPLETED")
    assert client.get(f"/jobs/{second}").json()["status"] == "CANCELLED"
    assert "output" not in client.get(f"/jobs/{second}").json()
    assert pipeline.calls == 1


def test_cancelling_a_running_job_drops_its_result(serve: Callable[..., httpx.Client]) -> None:
    gate = threading.Event()
    pipeline = FakePipeline(gate=gate)
    client = serve(lambda: pipeline)
    job_id = client.post("/jobs", json=job(num_inference_steps=10)).json()["id"]
    poll(client, job_id, "RUNNING")
    assert client.delete(f"/jobs/{job_id}").json()["status"] == "CANCELLED"
    gate.set()
    wait_for(lambda: client.get("/health").json()["status"] == "ready")
    final = client.get(f"/jobs/{job_id}").json()
    assert final["status"] == "CANCELLED"
    assert "output" not in final
    # The worker is free again and still works.
    assert client.post("/inference", json=job()).status_code == 200


def test_cancelling_a_finished_job_changes_nothing(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline)
    job_id = client.post("/jobs", json=job()).json()["id"]
    poll(client, job_id, "COMPLETED")
    assert client.delete(f"/jobs/{job_id}").json()["status"] == "COMPLETED"
    assert "output" in client.get(f"/jobs/{job_id}").json()


def test_unknown_jobs_are_404_with_an_error(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline)
    for response in (client.get("/jobs/nope"), client.delete("/jobs/nope")):
        assert response.status_code == 404
        assert "no job 'nope'" in response.json()["error"]


def test_results_expire_after_their_time(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline, result_ttl_s=0.2)
    job_id = client.post("/jobs", json=job()).json()["id"]
    poll(client, job_id, "COMPLETED")
    time.sleep(0.3)
    assert client.get(f"/jobs/{job_id}").status_code == 404


def test_an_idempotency_key_names_the_job_and_runs_it_once(
    serve: Callable[..., httpx.Client],
) -> None:
    pipeline = FakePipeline()
    client = serve(lambda: pipeline)
    key = {"Idempotency-Key": "order-17"}
    first = client.post("/jobs", json=job(), headers=key).json()
    again = client.post("/jobs", json=job(), headers=key).json()
    assert first["id"] == again["id"] == "order-17"
    done = poll(client, "order-17", "COMPLETED")
    replay = client.post("/inference", json=job(), headers=key)
    assert replay.json() == done["output"]
    assert pipeline.calls == 1
    bad = client.post("/jobs", json=job(), headers={"Idempotency-Key": "no spaces allowed"})
    assert bad.status_code == 400
    reused = client.post("/jobs", json=job(layers=5), headers=key)
    assert reused.status_code == 422
    assert "already used for a different request" in reused.json()["error"]


def test_a_full_queue_answers_503_with_retry_after(serve: Callable[..., httpx.Client]) -> None:
    gate = threading.Event()
    client = serve(lambda: FakePipeline(gate=gate), max_queue=2, default_job_s=42)
    running = client.post("/jobs", json=job()).json()["id"]
    poll(client, running, "RUNNING")
    queued = [client.post("/jobs", json=job(seed=s)) for s in (1, 2)]
    assert [r.status_code for r in queued] == [202, 202]
    for route in ("/jobs", "/inference"):
        full = client.post(route, json=job(seed=3))
        assert full.status_code == 503
        retry_after = int(full.headers["Retry-After"])
        assert 1 <= retry_after <= 42
        assert "busy" in full.json()["error"]
    assert client.get("/health").json()["queue_length"] == 2
    gate.set()
    for response in queued:
        poll(client, response.json()["id"], "COMPLETED")
    assert client.post("/jobs", json=job(seed=3)).status_code == 202


def test_retry_after_follows_the_observed_job_time(serve: Callable[..., httpx.Client]) -> None:
    gate = threading.Event()
    gate.set()
    client = serve(lambda: FakePipeline(step_s=0.5, gate=gate), max_queue=0, default_job_s=600)
    client.post("/inference", json=job(num_inference_steps=4))  # observed: ~2 s
    gate.clear()
    client.post("/jobs", json=job(num_inference_steps=4))
    wait_for(lambda: client.get("/health").json()["status"] == "busy")
    full = client.post("/jobs", json=job())
    assert full.status_code == 503
    assert 1 <= int(full.headers["Retry-After"]) <= 3
    gate.set()


# -- health and start-up ----------------------------------------------------------------------


def test_health_goes_loading_then_ready_then_busy(serve: Callable[..., httpx.Client]) -> None:
    loaded = threading.Event()
    gate = threading.Event()

    def slow_load() -> FakePipeline:
        loaded.wait(10)
        return FakePipeline(gate=gate)

    client = serve(slow_load, wait_ready=False)
    health = client.get("/health").json()
    assert health == {"status": "loading", "queue_length": 0, "model": None, "device": None}
    not_yet = client.post("/inference", json=job())
    assert not_yet.status_code == 503
    assert "loading" in not_yet.json()["error"]
    assert not_yet.headers["Retry-After"]
    loaded.set()
    wait_for(lambda: client.get("/health").json()["status"] == "ready")
    assert client.get("/health").json() == {
        "status": "ready",
        "queue_length": 0,
        "model": "fake",
        "device": "cpu",
    }
    first = client.post("/jobs", json=job()).json()["id"]
    poll(client, first, "RUNNING")
    client.post("/jobs", json=job(seed=1))
    busy = client.get("/health").json()
    assert busy["status"] == "busy"
    assert busy["queue_length"] == 1
    gate.set()
    wait_for(lambda: client.get("/health").json()["status"] == "ready")


def test_missing_weights_make_health_say_error_with_the_reason(
    serve: Callable[..., httpx.Client], tmp_path: Path
) -> None:
    missing = tmp_path / "no-weights-here"
    client = serve(lambda: load_pipeline(missing), wait_ready=False)
    health = wait_for(lambda: (h := client.get("/health").json())["status"] == "error" and h)
    assert str(missing) in health["error"]
    assert "fetch_weights" in health["error"]
    refused = client.post("/inference", json=job())
    assert refused.status_code == 503
    assert "failed to load" in refused.json()["error"]
    with pytest.raises(WeightsMissingError):
        load_pipeline(missing)


def test_service_info_and_swagger_docs(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline)
    info = client.get("/").json()
    assert info["service"] == "gpujobs-worker"
    assert info["version"] == gpujobs.__version__
    assert info["mode"] == "pod"
    assert info["status"] == "ready"
    assert info["model"] == "fake"
    assert info["limits"]["layers"] == [2, 10]
    assert "POST /jobs" in info["routes"]
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    schema = client.get("/openapi.json").json()
    assert {"/inference", "/inference/upload", "/jobs", "/jobs/{job_id}", "/health"} <= set(
        schema["paths"]
    )
    body = schema["paths"]["/inference"]["post"]["requestBody"]["content"]["application/json"]
    assert "layers" in body["schema"]["properties"]


def test_an_unknown_route_is_a_json_404(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline)
    response = client.get("/nowhere")
    assert response.status_code == 404
    assert response.json() == {"error": "Not Found"}
    assert client.put("/jobs").status_code == 405


# -- auth -------------------------------------------------------------------------------------


def test_a_token_guards_everything_but_health(serve: Callable[..., httpx.Client]) -> None:
    client = serve(FakePipeline, api_token=TOKEN)
    anonymous = httpx.Client(base_url=str(client.base_url), timeout=10)
    wrong = httpx.Client(
        base_url=str(client.base_url), headers={"Authorization": "Bearer nope"}, timeout=10
    )
    basic = httpx.Client(
        base_url=str(client.base_url), headers={"Authorization": f"Basic {TOKEN}"}, timeout=10
    )
    with anonymous, wrong, basic:
        assert anonymous.get("/health").json()["status"] == "ready"
        for other in (anonymous, wrong, basic):
            for method, path in [
                ("GET", "/"),
                ("GET", "/docs"),
                ("POST", "/inference"),
                ("POST", "/jobs"),
                ("GET", "/jobs/x"),
            ]:
                response = other.request(method, path, json=job())
                assert response.status_code == 401, (method, path)
                assert "bearer token" in response.json()["error"]
                assert response.headers["WWW-Authenticate"] == "Bearer"
    assert client.post("/inference", json=job()).status_code == 200
    assert client.get("/").status_code == 200


# -- the entry point --------------------------------------------------------------------------


def test_python_m_gpujobs_worker_serves_pod_mode_and_passes_its_healthcheck(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    src = str(Path(gpujobs.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])),
        "DEPLOYMENT_MODE": "pod",
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "GPUJOBS_WORKER_FAKE": "1",
        "WORKER_API_TOKEN": TOKEN,
        "LOG_LEVEL": "WARNING",
    }
    check = [sys.executable, "-m", "gpujobs.worker", "healthcheck"]
    assert subprocess.run(check, env=env, capture_output=True, check=False).returncode == 1
    process = subprocess.Popen(
        [sys.executable, "-m", "gpujobs.worker"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:

            def ready() -> bool:
                assert process.poll() is None, process.stderr.read() if process.stderr else ""
                try:
                    return bool(client.get("/health").json()["status"] == "ready")
                except httpx.TransportError:
                    return False

            wait_for(ready, within_s=30)
            answer = client.post(
                "/inference", json=job(), headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert answer.status_code == 200
            assert answer.json()["metadata"]["model"] == "fake"
        assert subprocess.run(check, env=env, capture_output=True, check=False).returncode == 0
        serverless_env = {**env, "DEPLOYMENT_MODE": "serverless"}
        assert subprocess.run(check, env=serverless_env, check=False).returncode == 0
        bad_mode = subprocess.run(
            [sys.executable, "-m", "gpujobs.worker"],
            env={**env, "DEPLOYMENT_MODE": "batch"},
            capture_output=True,
            text=True,
            check=False,
        )
        assert bad_mode.returncode == 2
        assert "DEPLOYMENT_MODE" in bad_mode.stderr
    finally:
        process.terminate()
        process.wait(timeout=15)
        if process.stderr:
            process.stderr.close()


# -- the tiny model, end to end ---------------------------------------------------------------


def test_tiny_model_through_the_pod_servers_job_api(
    serve: Callable[..., httpx.Client], tiny_pipeline: Any
) -> None:
    client = serve(lambda: tiny_pipeline)
    request = job(layers=2, prompt=PROMPT, output_format="pptx")
    submitted = client.post("/jobs", json=request).json()
    done = poll(client, submitted["id"], "COMPLETED", "FAILED")
    assert done["status"] == "COMPLETED", done
    assert done["progress"] == {"step": 2, "total": 2}
    body = done["output"]
    layers = layer_images(body)
    metadata = body["metadata"]
    assert [layer.mode for layer in layers] == ["RGBA", "RGBA"]
    assert metadata["model"] == "gpujobs/tiny-random-qwen-image-layered"
    assert metadata["revision"] == "tiny-random-1"
    assert (metadata["width"], metadata["height"]) == layers[0].size == layer_size((96, 64), 640)
    assert metadata["timings"]["inference_s"] > 0
    assert metadata["timings"]["load_s"] > 0
    assert Image.alpha_composite(layers[0], layers[1]).size == layers[0].size
    assert body["package"]
