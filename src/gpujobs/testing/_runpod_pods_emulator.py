"""RunPod's pod API emulated in-process: pod states that change over time, start, stop, price.

Wire format of RunPod's REST API (docs.runpod.io, "API reference → Pods", read 2026-11):
``GET /v1/pods/{podId}`` → the pod, with ``desiredStatus`` (``RUNNING``, ``EXITED``,
``TERMINATED``), ``costPerHr`` (a string in the documented example), ``adjustedCostPerHr`` (a
number) and ``lastStartedAt``; ``POST /v1/pods/{podId}/start`` and ``/stop`` → a short message;
``Authorization: Bearer <key>``. The finer ``status`` of the newer API (``PROVISIONING`` →
``STARTING`` → ``RUNNING``; ``EXITED``, ``ERROR``, ``TERMINATED``) is sent too unless
``report_status=False``.

A started pod spends ``provision_s`` PROVISIONING and ``start_s`` STARTING before it runs; the
worker behind it (served apart, e.g. behind :class:`gpujobs.testing.CuttingProxy` gated by
:meth:`RunPodPodsEmulator.is_running`) is reachable only while it runs. Faults: a start refused
for want of a free GPU on the host (``no_gpu``), a pod that goes ``ERROR`` while starting
(``fail_start``), one-shot request faults via :meth:`RunPodPodsEmulator.inject`, and a pod
stopped behind the client's back (:meth:`RunPodPodsEmulator.stop_now`). Counters per pod:
``starts``, ``stops``, and the seconds billed.

Raw ASGI on the standard library, served with :func:`gpujobs.testing.serve`.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from gpujobs.testing._emulator_server import (
    ASGIApp,
    Fault,
    FaultInjector,
    Faults,
    Receive,
    Reply,
    Scope,
    Send,
    error_reply,
    json_reply,
    read_body,
    send_reply,
)

__all__ = ["RunPodPodsEmulator"]

_NO_GPU: Final = "There are not enough free GPUs on the host machine to start this pod."


@dataclass(eq=False)
class _Pod:
    id: str
    cost_per_hr: float
    provision_s: float
    start_s: float
    desired: str = "EXITED"  # RUNNING | EXITED | TERMINATED
    started_at: float | None = None  # monotonic, of the last start
    started_wall: float | None = None
    billed_before_s: float = 0.0
    starts: int = 0
    stops: int = 0
    no_gpu: bool = False
    fail_start: bool = False
    on_stop: Callable[[], None] | None = None

    def status(self, now: float) -> str:
        if self.desired != "RUNNING" or self.started_at is None:
            return self.desired
        age = now - self.started_at
        if age < self.provision_s:
            return "PROVISIONING"
        if self.fail_start:
            return "ERROR"
        return "STARTING" if age < self.provision_s + self.start_s else "RUNNING"

    def billed_s(self, now: float) -> float:
        running = now - self.started_at if self.started_at is not None else 0.0
        return self.billed_before_s + (running if self.desired == "RUNNING" else 0.0)


class RunPodPodsEmulator:
    """RunPod's pod API for a few pods, with states that change over time.

    Example::

        emulator = RunPodPodsEmulator(api_key="k")
        emulator.add_pod("pod1", running=False, cost_per_hr=0.69, provision_s=0.05)
        async with serve(emulator) as api:
            runner = RunPodPod("pod1", api_key="k", api_url=api.url, worker_url=...)

    Args:
        api_key: the key requests must carry (``None``: any).
        report_status: send the finer ``status`` beside ``desiredStatus``.
    """

    def __init__(self, *, api_key: str | None = None, report_status: bool = True) -> None:
        self._api_key = api_key
        self._report_status = report_status
        self._pods: dict[str, _Pod] = {}
        self._faults = FaultInjector(Faults())
        self.requests: list[tuple[str, str]] = []  # (method, path) as received

    # -- controls -----------------------------------------------------------------------------

    def add_pod(
        self,
        pod_id: str,
        *,
        running: bool = False,
        cost_per_hr: float = 0.69,
        provision_s: float = 0.0,
        start_s: float = 0.0,
        on_stop: Callable[[], None] | None = None,
    ) -> None:
        """Add a pod, stopped (``EXITED``) or already running.

        ``on_stop`` is called whenever the pod stops (e.g. ``HandlerWorker.restart``: a stopped
        pod's container loses its jobs).
        """
        pod = _Pod(pod_id, cost_per_hr, provision_s, start_s, on_stop=on_stop)
        if running:
            pod.desired, pod.started_at, pod.started_wall = "RUNNING", time.monotonic(), time.time()
            pod.provision_s = pod.start_s = 0.0
        self._pods[pod_id] = pod

    def set_faults(self, pod_id: str, *, no_gpu: bool = False, fail_start: bool = False) -> None:
        """``no_gpu``: starts are refused; ``fail_start``: a started pod goes ``ERROR``."""
        pod = self._pods[pod_id]
        pod.no_gpu, pod.fail_start = no_gpu, fail_start

    def inject(self, route: str, kind: str, *, times: int = 1, **params: Any) -> None:
        """The next ``times`` requests to ``route`` (``get``, ``start``, ``stop``) get a fault.

        ``kind``: ``server_error`` (``status``, ``html``), ``rate_limit`` (``retry_after_s``),
        ``drop_connection``.
        """
        self._faults.inject(route, Fault(kind, params), times)

    def stop_now(self, pod_id: str) -> None:
        """Stop the pod behind the client's back (a console click, a host failure)."""
        self._stop(self._pods[pod_id], time.monotonic())

    def is_running(self, pod_id: str) -> bool:
        """Whether the pod's worker is reachable (state ``RUNNING``)."""
        return self._pods[pod_id].status(time.monotonic()) == "RUNNING"

    def status(self, pod_id: str) -> str:
        """The pod's state now."""
        return self._pods[pod_id].status(time.monotonic())

    def starts(self, pod_id: str) -> int:
        """Start calls that the pod accepted or refused."""
        return self._pods[pod_id].starts

    def stops(self, pod_id: str) -> int:
        """Stop calls received for the pod."""
        return self._pods[pod_id].stops

    def billed_s(self, pod_id: str) -> float:
        """Seconds the pod has been billed for running."""
        return self._pods[pod_id].billed_s(time.monotonic())

    # -- serving --------------------------------------------------------------------------------

    @property
    def app(self) -> ASGIApp:
        """The ASGI app."""
        return self._handle

    @property
    def base_path(self) -> str:
        """The API's root, as in ``https://rest.runpod.io/v1``."""
        return "/v1"

    async def start(self) -> None:
        """Nothing runs in the background: states follow the clock."""

    async def aclose(self) -> None:
        """Nothing to stop."""

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        await read_body(receive, 1024 * 1024)
        await send_reply(send, self._answer(scope))

    def _answer(self, scope: Scope) -> Reply:
        route = self._route(scope)
        if isinstance(route, Reply):
            return route
        pod_id, action = route
        fault = self._faults.take(action, idempotent=True)
        if fault is not None and fault.kind != "drop_connection":
            return self._faults.reply(fault, None, "pod not found")
        pod = self._pods.get(pod_id)
        if pod is None:
            return error_reply(404, "pod not found")
        now = time.monotonic()
        if action == "start":
            reply = self._start(pod, now)
        elif action == "stop":
            self._stop(pod, now)
            reply = json_reply(200, {"message": "Pod successfully stopped."})
        else:
            reply = json_reply(200, self._view(pod, now))
        if fault is not None:  # drop_connection: done, but the answer is cut
            return Reply(reply.status, reply.body, drop=True)
        return reply

    def _route(self, scope: Scope) -> tuple[str, str] | Reply:
        """``(pod id, action)``, or the error reply for a request that names none."""
        method, path = scope["method"], scope["path"]
        self.requests.append((method, path))
        if not self._authorised(scope):
            return error_reply(401, "Unauthorized.")
        parts = path.strip("/").split("/")
        if len(parts) not in {3, 4} or parts[:2] != ["v1", "pods"]:
            return error_reply(404, "not found")
        action = parts[3] if len(parts) == 4 else "get"  # noqa: PLR2004
        if action not in {"get", "start", "stop"}:
            return error_reply(404, "not found")
        if method != ("GET" if action == "get" else "POST"):
            return error_reply(405, "method not allowed")
        return parts[2], action

    def _authorised(self, scope: Scope) -> bool:
        if self._api_key is None:
            return True
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                return hmac.compare_digest(bytes(value), f"Bearer {self._api_key}".encode())
        return False

    def _start(self, pod: _Pod, now: float) -> Reply:
        pod.starts += 1
        if pod.desired == "TERMINATED":
            return error_reply(400, "the pod is terminated")
        if pod.no_gpu:
            return error_reply(500, _NO_GPU)
        if pod.desired != "RUNNING":
            pod.desired, pod.started_at, pod.started_wall = "RUNNING", now, time.time()
        return json_reply(200, {"message": "Pod successfully started."})

    def _stop(self, pod: _Pod, now: float) -> None:
        pod.stops += 1
        if pod.desired == "RUNNING":
            pod.billed_before_s = pod.billed_s(now)
            pod.desired = "EXITED"
            if pod.on_stop is not None:
                pod.on_stop()

    def _view(self, pod: _Pod, now: float) -> dict[str, Any]:
        view: dict[str, Any] = {
            "id": pod.id,
            "name": f"gpujobs-{pod.id}",
            "desiredStatus": pod.desired,
            "costPerHr": f"{pod.cost_per_hr:.2f}",
            "adjustedCostPerHr": pod.cost_per_hr,
            "gpu": {"count": 1, "displayName": "RTX 4090"},
            "lastStartedAt": (
                None
                if pod.started_wall is None
                else datetime.fromtimestamp(pod.started_wall, UTC).isoformat()
            ),
            "ports": ["8000/http"],
        }
        if self._report_status:
            view["status"] = pod.status(now)
        return view
