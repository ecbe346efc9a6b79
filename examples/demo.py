"""The hybrid story: an always-on pod as primary, serverless for overflow, one Router in front.

Everything runs here, on loopback, with the real code of every part:

- the reference worker (a tiny random-weight Qwen-Image-Layered, on the CPU) served in pod mode,
  reached through ``RunPodPod``: one job at a time, like a real pod;
- the RunPod Serverless emulator running the same worker's serverless handler, its workers
  starting cold, reached through ``RunPodServerless``;
- a ``Router`` with the cold-start-aware ``Overflow`` policy in front of both.

A burst of layered-image jobs goes out at once with ``asyncio.gather``. The pod keeps the jobs it
can finish before a cold serverless worker would; the rest overflow. Each job's layers are
written to ``./demo-output/``. Run it with ``make demo``.
"""

from __future__ import annotations

import asyncio
import base64
import io
import tempfile
from collections import defaultdict
from pathlib import Path

import anyio
import httpx
from PIL import Image

from gpujobs import GpuJobsError, JobResult, RunPodPod, RunPodServerless
from gpujobs.routing import EventKind, Overflow, Priors, Route, Router, RouterEvent
from gpujobs.testing import RunPodEmulator, serve, serve_app_in_thread
from gpujobs.worker.pipeline import load_pipeline
from gpujobs.worker.pod import create_app
from gpujobs.worker.serverless import make_handler
from gpujobs.worker.service import InferenceService
from gpujobs.worker.tiny import save_tiny_pipeline

JOBS = 6
SERVERLESS_WORKERS = 3
COLD_START_S = 2.0
POD_USD_PER_HOUR = 1.89  # an A100 pod (the price examples in docs/)
SERVERLESS_USD_PER_S = 0.00076  # an A100 serverless worker
OUTPUT = Path("demo-output")
PROMPTS = ["a red kite over a green field", "a lighthouse at dusk", "three apples on a table"]


def picture(n: int) -> str:
    """A small PNG, different for every job, as base64."""
    image = Image.new("RGB", (96, 64), (20 + 30 * n, 40, 200 - 20 * n))
    image.paste((220, 30 + 25 * n, 30), (16 + 4 * n, 12, 64, 48))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request(n: int) -> dict[str, object]:
    """A layered-image job; 2 steps and 2 layers keep the tiny model at ~1.5 s on a CPU."""
    return {
        "image": picture(n),
        "layers": 2,
        "num_inference_steps": 2,
        "prompt": PROMPTS[n % len(PROMPTS)],
        "seed": n,
    }


class Journal:
    """A router hook: each job's way through the router, by the router's job id."""

    def __init__(self) -> None:
        self.events: dict[str, list[RouterEvent]] = defaultdict(list)

    def __call__(self, event: RouterEvent) -> None:
        self.events[event.job_id].append(event)

    def why(self, job_id: str) -> str:
        """The reason the runner that served the job was chosen."""
        started = [e for e in self.events[job_id] if e.kind is EventKind.STARTED]
        return started[-1].reason or "" if started else ""


async def worker_ready(url: str) -> None:
    """Wait (bounded) until the worker's ``/health`` says its model is loaded."""
    async with httpx.AsyncClient(base_url=url) as client:
        with anyio.fail_after(60):
            while (await client.get("/health")).json().get("status") != "ready":  # noqa: ASYNC110 - a remote state
                await anyio.sleep(0.1)


async def one(router: Router, n: int) -> tuple[str, JobResult | GpuJobsError]:
    """Submit job ``n`` and wait for it; the handle's id ties it to the journal."""
    handle = await router.submit(request(n))
    try:
        return handle.id, await router.wait(handle)
    except GpuJobsError as exc:
        return handle.id, exc


def save_layers(n: int, result: JobResult) -> int:
    """Write the job's RGBA layers as PNG files; how many."""
    layers = result.output["layers"]
    for index, layer in enumerate(layers):
        (OUTPUT / f"job-{n:02d}-layer-{index}.png").write_bytes(base64.b64decode(layer))
    return len(layers)


def report(outcomes: list[tuple[str, JobResult | GpuJobsError]], journal: Journal) -> None:
    """One line per job, then totals."""
    OUTPUT.mkdir(exist_ok=True)
    header = f"{'job':>3}  {'runner':<10} {'queue s':>7} {'exec s':>6} {'cold':>4} {'cost $':>9}"
    print(f"\n{header}  why this runner")
    spent: dict[str, float] = defaultdict(float)
    for n, (job_id, outcome) in enumerate(outcomes):
        if isinstance(outcome, GpuJobsError):
            print(f"{n:>3}  FAILED: {type(outcome).__name__}: {outcome.message}")
            continue
        t = outcome.timings
        usd = outcome.cost.usd if outcome.cost else 0.0
        spent[outcome.provider] += usd
        cold = {True: "yes", False: "no", None: "?"}[t.cold_start]
        layers = save_layers(n, outcome)
        print(
            f"{n:>3}  {outcome.provider:<10} {t.queue_s or 0:>7.2f} {t.execution_s or 0:>6.2f}"
            f" {cold:>4} {usd:>9.6f}  {journal.why(job_id)} [{layers} layers]"
        )
    done = [o for _, o in outcomes if isinstance(o, JobResult)]
    by_runner = {name: sum(r.provider == name for r in done) for name in ("pod", "serverless")}
    print(
        f"\n{len(done)}/{len(outcomes)} completed: {by_runner['pod']} on the pod, "
        f"{by_runner['serverless']} overflowed to serverless; layers in ./{OUTPUT}/"
    )
    print(
        f"cost: pod ${spent['pod']:.6f} (its share of the hourly bill), "
        f"serverless ${spent['serverless']:.6f} (per second of execution)"
    )


async def main() -> None:
    """Start the worker and the emulator, route a burst through both, print what happened."""
    with tempfile.TemporaryDirectory() as folder:
        print("building the tiny model and starting the pod worker and the serverless emulator…")
        model = save_tiny_pipeline(Path(folder) / "tiny-qwen-image-layered")
        pod_app = create_app(lambda: load_pipeline(model, device="cpu"))
        handler = make_handler(InferenceService(load_pipeline(model, device="cpu")))
        emulator = RunPodEmulator(
            handler, workers=SERVERLESS_WORKERS, cold_start_s=COLD_START_S, idle_timeout_s=60
        )
        journal = Journal()
        with serve_app_in_thread(pod_app) as pod_url:
            await worker_ready(pod_url)  # an always-on pod has its model loaded before traffic
            pod = RunPodPod(base_url=pod_url, name="pod", usd_per_hour=POD_USD_PER_HOUR)
            async with (
                serve(emulator) as server,
                Router(
                    [
                        Route(pod, priors=Priors(concurrency=1, service_s=1.5, dispatch_s=0.1)),
                        Route(
                            RunPodServerless(
                                endpoint_url=server.url,
                                api_key="demo-key",
                                name="serverless",
                                usd_per_s=SERVERLESS_USD_PER_S,
                                cold_start_threshold_s=COLD_START_S / 2,
                            ),
                            priors=Priors(
                                service_s=1.5,
                                cold_start_s=COLD_START_S,
                                cold_probability=1.0,
                                dispatch_s=0.1,
                            ),
                        ),
                    ],
                    policy=Overflow(),
                    hooks=[journal],
                ) as router,
            ):
                print(f"a burst of {JOBS} layered-image jobs, all at once:")
                outcomes = await asyncio.gather(*(one(router, n) for n in range(JOBS)))
        report(list(outcomes), journal)


if __name__ == "__main__":
    asyncio.run(main())
