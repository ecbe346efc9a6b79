"""``VastRunner``: jobs on a Vast.ai instance that the runner rents, watches and destroys.

Vast has no job API: the instance runs the reference worker's pod server
(``DEPLOYMENT_MODE=pod``), and jobs go through its job API exactly as on a RunPod Pod
(:class:`gpujobs.providers._machine.MachineRunner`). What is Vast's lives in two modules:

* :mod:`gpujobs.providers._vast_api` — the ``vastai`` SDK's calls (search offers, create, show,
  list by label, destroy), each in a worker thread, the SDK's own retries turned off, errors
  mapped onto the tree; its docstring says why the SDK is fit for this and how it is tamed;
* :mod:`gpujobs.providers._vast_machine` — :class:`VastMachine`: one instance, never two (a
  unique label, reconcile by label after any failed create), waited for until ``running``,
  its ``8000/tcp`` mapping and the worker's ``/health`` say ready; destroyed when dead, idle,
  or the runner closes.

Vast's facts relied on (``docs.vast.ai``: search offers, create instance, show instance(s),
checked 2026-11): offers carry ``dph_total`` (USD per hour, storage included at the
``allocated_storage`` searched with), ``reliability``, ``direct_port_count``; ``runtype`` ``args``
keeps the image's entrypoint; env keys ``-p 8000:8000`` open a port; storage bills from creation,
the GPU from ``running``.
"""

from __future__ import annotations

import os
import re
import secrets
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING

from gpujobs._errors import ConfigurationError
from gpujobs._polling import PollSchedule
from gpujobs._retry import RetryPolicy
from gpujobs.providers._machine import MachineRunner
from gpujobs.providers._vast_api import VastApi
from gpujobs.providers._vast_machine import VastMachine
from gpujobs.providers._worker_api import WorkerApi

if TYPE_CHECKING:
    import httpx

__all__ = ["VastRunner"]

#: How often a starting instance is looked at: Vast takes minutes to pull and start an image.
START_POLL = PollSchedule(first_s=1.0, factor=1.5, max_interval_s=5.0, jitter=0.1)
_LABEL_OK = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


class VastRunner(MachineRunner):
    """Jobs on a Vast.ai instance running the reference worker, rented on the first job.

    Example::

        async with VastRunner("registry.example.com/you/qwen-layered-worker:1.0", gpu="RTX 4090",
                              max_usd_per_hour=0.6, disk_gb=80) as runner:
            result = await runner.run({"image": b64, "layers": 4}, timeout=900)

    The first job rents the cheapest offer matching the query (within ``max_usd_per_hour``),
    waits for the instance and the worker, and every job then runs there, one at a time. The
    instance is destroyed after ``idle_release_s`` without jobs and when the runner closes; one
    that dies fails its jobs with a retryable :class:`ProviderUnavailableError` and is destroyed,
    and the next job rents another. See ``docs/providers/vast.md``.

    Args:
        image: the worker image Vast pulls.
        api_key: the Vast API key; read from ``VAST_API_KEY`` when not given, else the ``vastai``
            CLI's key file.
        server_url: the console API's URL (an emulator's, in tests).
        gpu: ``gpu_name`` to search for (``"RTX 4090"``).
        num_gpus: GPUs per instance.
        min_reliability: lowest host ``reliability`` accepted.
        max_usd_per_hour: offers whose ``dph_total`` is above this are refused (``None``: any).
        disk_gb: disk to rent (image and weights), also the offers' least ``disk_space``.
        query: extra search terms in the SDK's query language, e.g. ``"cuda_vers>=12.4"``.
        order: the SDK's sort order for offers; cheapest first by default.
        model_path: ``MODEL_PATH`` for the worker (weights baked into the image or mounted).
        worker_token: the worker's ``WORKER_API_TOKEN``; a random one per runner by default
            (its port is public). Give a fixed one together with ``label`` to adopt an instance
            across restarts.
        env: more environment variables for the worker.
        label: the label that marks this runner's instance (default: unique per runner).
        reconcile_s: after a create that may have rented, how long to look for the instance.
        name: label of this runner (default ``"vast"``).
        queue_limit: jobs allowed to wait behind the running one before ``CapacityError``.
        idle_release_s: destroy the instance after this long without jobs (``None``: never).
        release_on_close: destroy the instance when the runner closes.
        http_client: an ``httpx.AsyncClient`` for the requests to the worker.
        retry: how requests that may be retried are retried (Vast's reads and the worker's).
        poll: how ``wait`` spaces its looks at the worker's ``GET /jobs/{id}``.
        start_poll: how a starting instance and worker are looked at.
        request_timeout_s: timeout of one request (to Vast, through the SDK, or to the worker).
        start_timeout_s: renting, pulling, starting and loading together may take this long;
            an instance not ready by then is destroyed.
        default_timeout_s: the deadline of a ``run``/``wait`` called without one.

    Attributes:
        machine: the instance's keeper: ``instance_id`` (``None`` while none is rented) and
            ``spent_usd()``, the bill of every instance this runner rented, as Vast bills it.
    """

    kind = "vast"

    def __init__(
        self,
        image: str,
        *,
        api_key: str | None = None,
        server_url: str | None = None,
        gpu: str = "RTX 4090",
        num_gpus: int = 1,
        min_reliability: float = 0.98,
        max_usd_per_hour: float | None = None,
        disk_gb: float = 80.0,
        query: str = "",
        order: str = "dph_total",
        model_path: str | None = "/models/qwen-image-layered",
        worker_token: str | None = None,
        env: Mapping[str, str] | None = None,
        label: str | None = None,
        reconcile_s: float = 30.0,
        name: str | None = None,
        queue_limit: int = 8,
        idle_release_s: float | None = 600.0,
        release_on_close: bool = True,
        http_client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        poll: PollSchedule | None = None,
        start_poll: PollSchedule | None = None,
        request_timeout_s: float = 30.0,
        start_timeout_s: float = 1200.0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        runner_name = name or self.kind
        if not image:
            raise ConfigurationError("give the worker image Vast should run", provider=runner_name)
        if max_usd_per_hour is not None and max_usd_per_hour <= 0:
            raise ConfigurationError("max_usd_per_hour must be positive", provider=runner_name)
        label = label or f"gpujobs-{uuid.uuid4().hex[:16]}"
        if not _LABEL_OK.match(label):
            raise ConfigurationError(
                "a label is 1-64 letters, digits, '.', '_', ':' or '-'", provider=runner_name
            )
        token = worker_token or secrets.token_urlsafe(24)
        retry = retry or RetryPolicy()
        vast = VastApi(
            api_key=api_key or os.environ.get("VAST_API_KEY") or None,
            server_url=server_url,
            provider=runner_name,
            request_timeout_s=request_timeout_s,
            retry=retry,
        )
        self._health_api = WorkerApi(
            provider=runner_name,
            api_token=None,  # /health needs no token
            http_client=http_client,
            retry=retry,
            request_timeout_s=request_timeout_s,
        )
        worker_env = {
            **(env or {}),
            "-p 8000:8000": "1",
            "DEPLOYMENT_MODE": "pod",
            "WORKER_API_TOKEN": token,
        }
        if model_path:
            worker_env["MODEL_PATH"] = model_path
        machine = VastMachine(
            vast,
            name=runner_name,
            image=image,
            query=_search_query(
                gpu=gpu,
                num_gpus=num_gpus,
                min_reliability=min_reliability,
                disk_gb=disk_gb,
                max_usd_per_hour=max_usd_per_hour,
                extra=query,
            ),
            order=order,
            disk_gb=disk_gb,
            env=worker_env,
            label=label,
            max_usd_per_hour=max_usd_per_hour,
            reconcile_s=reconcile_s,
            poll=start_poll or START_POLL,
            worker=self._health_api,
            request_timeout_s=request_timeout_s,
        )
        super().__init__(
            machine,
            name=runner_name,
            api_token=token,
            queue_limit=queue_limit,
            idle_release_s=idle_release_s,
            release_on_close=release_on_close,
            http_client=http_client,
            retry=retry,
            poll=poll,
            request_timeout_s=request_timeout_s,
            start_timeout_s=start_timeout_s,
            default_timeout_s=default_timeout_s,
        )
        self.machine = machine

    async def aclose(self) -> None:
        """Destroy the instance (with ``release_on_close``) and close connections."""
        try:
            await super().aclose()
        finally:
            await self._health_api.aclose()


def _search_query(
    *,
    gpu: str,
    num_gpus: int,
    min_reliability: float,
    disk_gb: float,
    max_usd_per_hour: float | None,
    extra: str,
) -> str:
    """The SDK's query string: the runner's requirements, then the caller's own terms."""
    terms = [
        f"gpu_name={gpu.strip().replace(' ', '_')}",
        f"num_gpus={num_gpus}",
        f"reliability>={min_reliability:g}",
        "direct_port_count>=1",  # the worker is reached on a public port
        f"disk_space>={disk_gb:g}",
    ]
    if max_usd_per_hour is not None:
        terms.append(f"dph_total<={max_usd_per_hour:g}")
    return " ".join([*terms, extra.strip()]).strip()
