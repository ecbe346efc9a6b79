"""The part of Vast.ai's console API that the ``vastai`` SDK calls, emulated in-process.

Wire format as the ``vastai`` SDK 1.9.1 sends and reads it (``vastai/api/client.py``,
``api/offers.py``, ``api/instances.py``), checked against Vast's API reference
(``docs.vast.ai/api-reference``: create instance, show instance(s)), read 2026-11:

=====================================  ==========================================================
``POST /api/v0/bundles/``              search offers: body = the query dict (``{"gpu_name":
                                       {"eq": "RTX 4090"}, "dph_total": {"lte": "0.6"}, ...}``
                                       plus ``order``, ``type``, ``limit``, ``allocated_storage``)
                                       → ``{"offers": [...]}``
``PUT /api/v0/asks/{offer_id}/``       create (rent): body ``image, env, disk, label, onstart,
                                       runtype...`` → ``{"success": true, "new_contract": id}``
``GET /api/v0/instances/{id}/``        show: ``?owner=me`` → ``{"instances": row}`` (``null`` once
                                       destroyed); rows carry ``start_date`` and ``extra_env``
                                       (a list of pairs), which the SDK reads unconditionally
``GET /api/v1/instances/``             list: ``select_filters``, ``order_by``, ``limit``,
                                       ``after_token`` (JSON in the query) → ``{"instances",
                                       "next_token", "total_instances"}``
``DELETE /api/v0/instances/{id}/``     destroy → ``{"success": true}``
``PUT /api/v0/instances/{id}/``        label: body ``{"label": ...}`` → ``{"success": true}``
=====================================  ==========================================================

An instance goes ``null`` (provisioning) → ``loading`` → ``running``; its ``ports`` mapping
(``{"8000/tcp": [{"HostIp", "HostPort": "<str>"}]}``) appears ``ports_delay_s`` after it runs,
and only for the ports its ``env`` asked for (``"-p 8000:8000": "1"``). Each instance runs a
real worker (``worker(env)`` → an ASGI app, served on loopback with its lifespan) from creation
until it is destroyed or :meth:`VastEmulator.kill` ends it, so a dead instance is unreachable.
Storage bills from creation, the GPU from ``running`` (Vast's billing rule), in
:meth:`VastEmulator.billed_usd`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs

from gpujobs.testing._emulator_server import (
    ASGIApp,
    Fault,
    FaultInjector,
    Faults,
    Receive,
    Reply,
    Scope,
    Send,
    StatsRecorder,
    json_reply,
    read_body,
    send_reply,
    serve_in_thread,
)
from gpujobs.testing._local_servers import serve_app_in_thread
from gpujobs.testing._vast_offers import HOURS_PER_MONTH, default_offers, matches, search

__all__ = ["VastEmulator", "default_offers"]

WorkerFactory = Callable[[Mapping[str, str]], Any]
"""Builds what an instance runs from its environment variables: an ASGI app (served with its
lifespan), or an emulator-like server with ``app``/``start``/``aclose`` (``HandlerWorker``)."""

_IDEMPOTENT: Final = frozenset({"search", "show", "list", "destroy", "label"})
_NOT_FOUND: Final = "no_such_instance"


@dataclass(eq=False)
class _Instance:
    id: int
    offer: Mapping[str, Any]
    label: str | None
    env: dict[str, str]
    image: str
    disk_gb: float
    created: float  # time.time()
    created_mono: float
    worker_port: int | None = None
    dead: str | None = None  # "exited", "offline"...: killed
    died_at: float | None = None
    destroyed_at: float | None = None
    stop_worker: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def storage_usd_per_h(self) -> float:
        return float(self.offer.get("storage_cost", 0.0)) * self.disk_gb / HOURS_PER_MONTH

    @property
    def dph_total(self) -> float:
        return float(self.offer.get("dph_base", 0.0)) + self.storage_usd_per_h


class VastEmulator:
    """Vast.ai's console API for one account, in this process, with rented instances that run.

    Serve it with :func:`gpujobs.testing.serve` and point the SDK (or
    :class:`gpujobs.VastRunner`) at ``server.url``.

    Example::

        emulator = VastEmulator(lambda env: create_app(FakePipeline, PodSettings.from_env(env)))
        async with serve(emulator) as server:
            emulator.inject("create", "slow_response", delay_s=5, after_processing=True)
            ...  # VastRunner(server_url=server.url, api_key="key", ...)

    Args:
        worker: builds what each instance serves on its port 8000 from the instance's
            environment (see :data:`WorkerFactory`); ``None``: instances run nothing (their
            port refuses connections).
        offers: the marketplace (dicts of offer fields); :func:`default_offers` by default.
        api_key: requests need ``Authorization: Bearer <key>`` when set.
        provision_s: time an instance spends with ``actual_status`` ``null``.
        boot_s: then ``loading`` (image pull, container start) for this long.
        ports_delay_s: its port mapping appears this long after it runs.
        honour_price_filter: ``False`` ignores ``dph_total`` filters in searches, to test that a
            client checks prices itself.
        faults: random request faults (see :class:`Faults`; job faults do not apply).
    """

    def __init__(
        self,
        worker: WorkerFactory | None = None,
        *,
        offers: Sequence[Mapping[str, Any]] | None = None,
        api_key: str | None = None,
        provision_s: float = 0.0,
        boot_s: float = 0.0,
        ports_delay_s: float = 0.0,
        honour_price_filter: bool = True,
        faults: Faults | None = None,
    ) -> None:
        self._worker = worker
        self._offers = [dict(o) for o in (default_offers() if offers is None else offers)]
        self._api_key = api_key
        self._provision_s, self._boot_s, self._ports_delay_s = provision_s, boot_s, ports_delay_s
        self._honour_price_filter = honour_price_filter
        self._faults = FaultInjector(faults or Faults())
        self._stats = StatsRecorder()
        self._instances: dict[int, _Instance] = {}
        self._ids = itertools.count(7_000_001)
        self._closing = asyncio.Event()

    # -- serving ------------------------------------------------------------------------------

    @property
    def app(self) -> ASGIApp:
        """The ASGI application."""
        return self._asgi

    @property
    def base_path(self) -> str:
        """Empty: the SDK's ``server_url`` is the root URL."""
        return ""

    async def start(self) -> None:
        """Nothing runs in the background: instance states follow from the clock."""
        self._closing = asyncio.Event()

    async def aclose(self) -> None:
        """Stop every instance's worker (the instances stay on record)."""
        self._closing.set()
        for instance in self._instances.values():
            await asyncio.to_thread(instance.stop_worker.close)

    # -- controls for tests ---------------------------------------------------------------------

    def inject(self, route: str, fault: str, times: int = 1, **params: Any) -> None:
        """Make the next ``times`` requests to ``route`` meet ``fault``.

        Routes: ``search``, ``create``, ``show``, ``list``, ``destroy``, ``label``. Faults:
        ``rate_limit`` (``retry_after_s``), ``server_error`` (``status``, ``html``, ``message``),
        ``drop_connection``, ``slow_response`` (``delay_s``). With ``after_processing=True`` the
        request is carried out first: a create that rents the machine and then answers 504, cuts
        the connection, or answers only after ``delay_s`` (past the client's timeout). And
        ``reprice`` (``dph_base``) on ``create``: the host raised the offer's price between the
        client's search and its create.
        """
        self._faults.inject(route, Fault(fault, params), times)

    async def kill(self, instance_id: int, status: str = "exited") -> None:
        """The instance dies: ``actual_status`` becomes ``status`` and its worker stops.

        ``status="running"`` is a host cut off from the network: Vast still lists it as running,
        but nothing answers on its port.
        """
        instance = self._instances[instance_id]
        instance.dead, instance.died_at = status, time.monotonic()
        await asyncio.to_thread(instance.stop_worker.close)

    def instances(self, *, include_destroyed: bool = False) -> list[dict[str, Any]]:
        """Rows of the account's instances as ``show_instance`` gives them."""
        now = time.monotonic()
        return [
            self._row(i, now) | {"destroyed": i.destroyed_at is not None}
            for i in self._instances.values()
            if include_destroyed or i.destroyed_at is None
        ]

    @property
    def created_count(self) -> int:
        """Instances rented so far (destroyed ones included)."""
        return len(self._instances)

    def billed_usd(self) -> float:
        """What every instance has cost so far: storage since creation, GPU since running."""
        now = time.monotonic()
        total = 0.0
        for i in self._instances.values():
            end = min(t for t in (i.destroyed_at, now) if t is not None)
            died = i.died_at if i.dead != "running" else None  # unreachable still bills
            gpu_end = min(t for t in (i.destroyed_at, died, now) if t is not None)
            running_at = i.created_mono + self._provision_s + self._boot_s
            total += i.storage_usd_per_h * (end - i.created_mono) / 3600
            total += float(i.offer.get("dph_base", 0.0)) * max(0.0, gpu_end - running_at) / 3600
        return total

    def requests(self, route: str) -> int:
        """How many requests ``route`` received."""
        return self._stats.snapshot().requests.get(route, 0)

    # -- HTTP ---------------------------------------------------------------------------------

    async def _asgi(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        route, key = self._match(scope["method"], scope["path"])
        body = await read_body(receive, 1024 * 1024) or b""
        if route is None:
            await send_reply(send, json_reply(404, {"success": False, "error": "not_found"}))
            return
        self._stats.request(route)
        reply = await self._answer(route, key, scope, body)
        self._stats.response(reply)
        await send_reply(send, reply)

    @staticmethod
    def _match(method: str, path: str) -> tuple[str | None, int | None]:
        parts = [p for p in path.split("/") if p]  # api, v0, instances, id
        if parts[:2] == ["api", "v1"] and parts[2:] == ["instances"] and method == "GET":
            return "list", None
        if parts[:2] != ["api", "v0"] or len(parts) < 3:  # noqa: PLR2004
            return None, None
        key = int(parts[3]) if len(parts) == 4 and parts[3].isdigit() else None  # noqa: PLR2004
        routes = {
            ("POST", "bundles", False): "search", ("PUT", "asks", True): "create",
            ("GET", "instances", True): "show", ("DELETE", "instances", True): "destroy",
            ("PUT", "instances", True): "label",
        }  # fmt: skip
        return routes.get((method, parts[2], key is not None)), key

    async def _answer(self, route: str, key: int | None, scope: Scope, body: bytes) -> Reply:
        if self._api_key is not None and not self._authorized(scope):
            return json_reply(401, {"success": False, "error": "auth_error", "msg": "bad key"})
        fault = self._faults.take(route, idempotent=route in _IDEMPOTENT)
        if fault is not None and fault.kind == "reprice":  # the host's price moved meanwhile
            self._reprice(key, float(fault.params["dph_base"]))
            fault = None
        after = fault is not None and bool(fault.params.get("after_processing", False))
        if fault is not None and not after:
            if fault.kind == "slow_response":
                await self._pause(fault)
            else:
                return self._faults.reply(fault, None, _NOT_FOUND)
        try:
            payload = json.loads(body) if body else {}
        except ValueError:
            return json_reply(400, {"success": False, "error": "invalid_json"})
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        reply = await self._route(route, key, payload, query)
        if fault is None or not after:
            return reply
        if fault.kind == "slow_response":
            await self._pause(fault)
            return reply
        return self._faults.reply(fault, reply, _NOT_FOUND)

    def _reprice(self, offer_id: int | None, dph_base: float) -> None:
        for offer in self._offers:
            if offer.get("id") == offer_id:
                offer["dph_base"] = dph_base

    def _authorized(self, scope: Scope) -> bool:
        expected = f"Bearer {self._api_key}".encode()
        return any(k == b"authorization" and v == expected for k, v in scope["headers"])

    async def _pause(self, fault: Fault) -> None:
        with contextlib.suppress(TimeoutError):
            delay = float(fault.params.get("delay_s", self._faults.faults.slow_response_s))
            await asyncio.wait_for(self._closing.wait(), delay)

    async def _route(  # noqa: PLR0911 - one answer per route
        self, route: str, key: int | None, payload: Any, query: Mapping[str, str]
    ) -> Reply:
        if not isinstance(payload, dict):
            return json_reply(400, {"success": False, "error": "invalid_args"})
        if route == "search":
            return self._search(payload)
        if route == "list":
            return self._list(query)
        if route == "create":
            return await self._create(int(key or 0), payload)
        instance = self._instances.get(int(key or 0))
        live = instance is not None and instance.destroyed_at is None
        if route == "show":
            row = self._row(instance, time.monotonic()) if instance is not None and live else None
            return json_reply(200, {"instances": row})
        if instance is None or not live:
            return json_reply(404, {"success": False, "error": _NOT_FOUND, "msg": "no instance"})
        if route == "destroy":
            instance.destroyed_at = time.monotonic()
            await asyncio.to_thread(instance.stop_worker.close)
            return json_reply(200, {"success": True})
        if "label" in payload:  # label; other instance updates are not emulated
            instance.label = str(payload["label"])
            return json_reply(200, {"success": True})
        return json_reply(400, {"success": False, "error": "invalid_args", "msg": "unsupported"})

    # -- routes -------------------------------------------------------------------------------

    def _search(self, q: Mapping[str, Any]) -> Reply:
        found = search(self._offers, q, honour_price_filter=self._honour_price_filter)
        return json_reply(200, {"offers": found})

    async def _create(self, offer_id: int, body: Mapping[str, Any]) -> Reply:
        offer = next((o for o in self._offers if o.get("id") == offer_id), None)
        if offer is None or not offer.get("rentable", True):
            return json_reply(404, {"success": False, "error": "no_such_ask", "msg": "gone"})
        if not body.get("image") and not body.get("template_hash_id"):
            return json_reply(400, {"success": False, "error": "invalid_args", "msg": "image"})
        env = {str(k): str(v) for k, v in (body.get("env") or {}).items()}
        disk = float(body.get("disk") or 8.0)
        if disk > float(offer.get("disk_space", disk)):
            return json_reply(400, {"success": False, "error": "invalid_args", "msg": "disk"})
        label = body.get("label")
        instance = _Instance(
            id=next(self._ids), offer=dict(offer), label=None if label is None else str(label),
            env=env, image=str(body.get("image")), disk_gb=disk, created=time.time(),
            created_mono=time.monotonic(),
        )  # fmt: skip
        self._instances[instance.id] = instance
        if self._worker is not None:
            instance.worker_port = await asyncio.to_thread(
                _start_worker, self._worker(dict(env)), instance.stop_worker
            )
        return json_reply(200, {"success": True, "new_contract": instance.id})

    def _list(self, query: Mapping[str, str]) -> Reply:
        filters = json.loads(query.get("select_filters") or "{}")
        limit = int(json.loads(query.get("limit") or "25"))
        after = int(query.get("after_token") or 0)
        now = time.monotonic()
        rows = [
            self._row(i, now)
            for i in sorted(self._instances.values(), key=lambda i: i.id)
            if i.destroyed_at is None and i.id > after
        ]
        rows = [r for r in rows if all(matches(r.get(k), ops) for k, ops in filters.items())]
        page, more = rows[:limit], len(rows) > limit
        body = {"instances": page, "total_instances": len(rows)}
        body["next_token"] = str(page[-1]["id"]) if more else None
        return json_reply(200, body)

    def _row(self, i: _Instance, now: float) -> dict[str, Any]:
        age = now - i.created_mono
        status: str | None = None
        if i.dead is not None:
            status = i.dead
        elif age >= self._provision_s + self._boot_s:
            status = "running"
        elif age >= self._provision_s:
            status = "loading"
        ports: dict[str, Any] = {}
        if status == "running" and age >= self._provision_s + self._boot_s + self._ports_delay_s:
            ports = {
                f"{key.split(':')[-1]}/tcp": [
                    {"HostIp": "0.0.0.0", "HostPort": str(i.worker_port or 1)}  # noqa: S104
                ]
                for key in i.env
                if key.startswith("-p ") and key.endswith(":8000")
            }
        o = i.offer
        return {
            "id": i.id, "label": i.label, "actual_status": status, "intended_status": "running",
            "cur_state": "running", "next_state": "running", "status_msg": None,
            "image_uuid": i.image, "image_runtype": "args", "start_date": i.created,
            "extra_env": [[k, v] for k, v in i.env.items()], "machine_id": o.get("machine_id"),
            "host_id": o.get("host_id"), "gpu_name": o.get("gpu_name"),
            "num_gpus": o.get("num_gpus"), "disk_space": i.disk_gb,
            "public_ipaddr": "127.0.0.1", "ports": ports, "dph_base": o.get("dph_base"),
            "storage_cost": o.get("storage_cost"), "storage_total_cost": i.storage_usd_per_h,
            "dph_total": i.dph_total, "direct_port_count": o.get("direct_port_count"),
            "reliability2": o.get("reliability2"),
        }  # fmt: skip


def _start_worker(worker: Any, stack: contextlib.ExitStack) -> int:
    """Serve ``worker`` from a thread until ``stack`` closes; its port.

    An emulator-like worker (``app``, ``start``, ``aclose``: e.g. ``HandlerWorker``) is served
    as emulators are; a plain ASGI app is served with its lifespan (the pod server's loads the
    model and runs the queue).
    """
    if all(hasattr(worker, name) for name in ("app", "start", "aclose")):
        return stack.enter_context(serve_in_thread(worker)).port
    url = stack.enter_context(serve_app_in_thread(worker))
    return int(url.rsplit(":", 1)[1])
