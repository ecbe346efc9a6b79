"""The ready-made hooks: logging, OpenTelemetry spans, Prometheus metrics."""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from prometheus_client import CollectorRegistry

from gpujobs import JobFailedError, RunPodServerless
from gpujobs.routing import LoggingHook, Router, RouterEvent
from gpujobs.routing.hooks import OpenTelemetryHook, PrometheusHook
from gpujobs.testing import RunPodEmulator

Emulated = tuple[RunPodEmulator, RunPodServerless]
Emulators = Callable[..., AbstractAsyncContextManager[list[Emulated]]]

pytestmark = pytest.mark.anyio


async def test_prometheus_counts_jobs_failovers_and_time(emulators: Emulators) -> None:
    registry = CollectorRegistry()
    async with emulators("pod", "serverless") as [(first, a), (_, b)]:
        router = Router([a, b], hooks=[PrometheusHook(registry)])
        first.inject("runsync", "server_error", status=500)
        for n in range(3):
            await router.run({"output": n, "sleep_s": 0.01})
        with pytest.raises(JobFailedError):
            await router.run({"raise": "bad"})

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, {"router": "router", **labels})

    assert sample("gpujobs_jobs_total", runner="pod", outcome="completed") == 2
    assert sample("gpujobs_jobs_total", runner="serverless", outcome="completed") == 1
    assert sample("gpujobs_jobs_total", runner="pod", outcome="failed") == 1
    assert sample("gpujobs_failovers_total", runner="pod", error="ProviderError") == 1
    assert sample("gpujobs_job_seconds_count", runner="pod") == 2


async def test_opentelemetry_makes_one_span_per_job(emulators: Emulators) -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    hook = OpenTelemetryHook(provider.get_tracer("test"))
    async with emulators("pod", "serverless") as [(first, a), (_, b)]:
        router = Router([a, b], hooks=[hook])
        first.inject("runsync", "server_error", status=500)
        await router.run({"output": 1})
        with pytest.raises(JobFailedError):
            await router.run({"raise": "bad"})
    done, failed = sorted(exporter.get_finished_spans(), key=lambda s: s.status.status_code.value)
    assert done.name == "gpujobs.job"
    assert done.attributes is not None
    assert done.attributes["gpujobs.runner"] == "serverless"
    assert [e.name for e in done.events] == [
        "submitted",
        "started",
        "failed_over",
        "started",
        "completed",
    ]
    assert failed.status.status_code is StatusCode.ERROR


async def test_logging_hook_and_a_raising_hook(
    emulators: Emulators, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: RouterEvent) -> None:
        raise RuntimeError(event.kind)

    caplog.set_level(logging.INFO, logger="gpujobs.routing")
    async with emulators("pod") as [(_, a)]:
        result = await Router([a], hooks=[broken, LoggingHook()]).run({"output": 1})
    assert result.output == 1  # a raising hook never fails a job
    messages = [r.getMessage() for r in caplog.records]
    assert any("completed on pod" in m for m in messages)
    assert any("hook raised" in m for m in messages)
