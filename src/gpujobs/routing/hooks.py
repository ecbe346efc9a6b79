"""Ready-made router hooks for OpenTelemetry traces and Prometheus metrics (optional extras).

::

    from gpujobs.routing.hooks import OpenTelemetryHook, PrometheusHook

    router = Router([pod, serverless], hooks=[OpenTelemetryHook(), PrometheusHook()])

``OpenTelemetryHook`` needs the ``otel`` extra (``opentelemetry-api``; configure an SDK and
exporter in your application as usual); ``PrometheusHook`` needs the ``prometheus`` extra.
Both are imported lazily: importing ``gpujobs.routing`` imports neither library.
"""

from __future__ import annotations

import importlib
from typing import Any

from gpujobs._errors import ConfigurationError
from gpujobs.routing._events import EventKind, RouterEvent

__all__ = ["OpenTelemetryHook", "PrometheusHook"]

_ENDED = {EventKind.COMPLETED, EventKind.FAILED}


def _require(module: str, extra: str) -> Any:
    try:
        return importlib.import_module(module)
    except ImportError:
        msg = f"{module} is not installed: pip install 'gpujobs[{extra}]'"
        raise ConfigurationError(msg) from None


class OpenTelemetryHook:
    """One span per job (``gpujobs.job``), from the router taking it to its end.

    Each step (started, failed over, hedged...) is a span event carrying the runner and the
    reason; the span ends with the runner that served the job, its cost and, on failure, the
    error (status ERROR). Spans of jobs still running are kept by job id (at most ``max_open``).
    """

    def __init__(self, tracer: Any = None, *, max_open: int = 100_000) -> None:
        trace = _require("opentelemetry.trace", "otel")
        self._trace = trace
        self._tracer = tracer or trace.get_tracer("gpujobs.routing")
        self._spans: dict[str, Any] = {}
        self._max_open = max_open

    def __call__(self, event: RouterEvent) -> None:
        """Open, annotate or end the job's span."""
        if event.kind is EventKind.PROGRESS:
            return
        span = self._spans.get(event.job_id)
        if span is None:
            if len(self._spans) >= self._max_open:
                return
            span = self._tracer.start_span(
                "gpujobs.job", attributes={"gpujobs.router": event.router}
            )
            self._spans[event.job_id] = span
        attributes = {
            key: value
            for key, value in {
                "gpujobs.runner": event.runner,
                "gpujobs.reason": event.reason,
                "gpujobs.error_type": event.error_type,
                "gpujobs.attempt": event.attempt,
            }.items()
            if value is not None
        }
        span.add_event(event.kind.value, attributes=attributes)
        if event.kind not in _ENDED:
            return
        del self._spans[event.job_id]
        span.set_attribute("gpujobs.attempts", event.attempt)
        if event.runner:
            span.set_attribute("gpujobs.runner", event.runner)
        if event.cost is not None:
            span.set_attribute("gpujobs.cost_usd", event.cost.usd)
        if event.kind is EventKind.FAILED:
            status = self._trace.Status(self._trace.StatusCode.ERROR, event.error_type)
            span.set_status(status)
        span.end()


class PrometheusHook:
    """Counters and a histogram of jobs by router and runner.

    ``{namespace}_jobs_total{router,runner,outcome}``, ``{namespace}_job_seconds{router,runner}``
    (time at the runner that served the job), ``{namespace}_failovers_total{router,runner,error}``,
    ``{namespace}_hedges_total{router,runner}``, ``{namespace}_overflows_total{router,runner}``
    and ``{namespace}_cost_usd_total{router,runner}``.
    """

    def __init__(self, registry: Any = None, *, namespace: str = "gpujobs") -> None:
        prometheus = _require("prometheus_client", "prometheus")
        options = {"namespace": namespace, "registry": registry or prometheus.REGISTRY}
        both = ["router", "runner"]
        self._jobs = prometheus.Counter(
            "jobs", "Jobs ended, by outcome", [*both, "outcome"], **options
        )
        self._seconds = prometheus.Histogram(
            "job_seconds",
            "Seconds at the runner that served the job",
            both,
            buckets=(1, 5, 10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1800),
            **options,
        )
        self._failovers = prometheus.Counter(
            "failovers", "Attempts that failed over, by error", [*both, "error"], **options
        )
        self._hedges = prometheus.Counter("hedges", "Hedged copies started", both, **options)
        self._overflows = prometheus.Counter(
            "overflows", "Jobs sent past the primary", both, **options
        )
        self._cost = prometheus.Counter("cost_usd", "Cost of ended jobs, USD", both, **options)

    def __call__(self, event: RouterEvent) -> None:
        """Count the event."""
        runner = event.runner or ""
        labels = (event.router, runner)
        if event.kind is EventKind.COMPLETED:
            self._jobs.labels(*labels, "completed").inc()
            if event.elapsed_s is not None:
                self._seconds.labels(*labels).observe(event.elapsed_s)
            if event.cost is not None:
                self._cost.labels(*labels).inc(event.cost.usd)
        elif event.kind is EventKind.FAILED:
            self._jobs.labels(*labels, "failed").inc()
        elif event.kind is EventKind.FAILED_OVER:
            self._failovers.labels(*labels, event.error_type or "").inc()
        elif event.kind is EventKind.HEDGED:
            self._hedges.labels(*labels).inc()
        elif event.kind is EventKind.OVERFLOWED:
            self._overflows.labels(*labels).inc()
