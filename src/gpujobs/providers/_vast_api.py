"""The five calls the Vast.ai runner makes, through the ``vastai`` SDK, each in a worker thread.

What the SDK (``vastai`` 1.9.1, read in ``vastai/api/client.py``, ``api/offers.py``,
``api/instances.py``, ``sdk.py``) does, and what this module does about it:

* **Retries.** ``VastClient._request`` sends each request up to ``retry`` times (default 3),
  again on 429/502/503/504 and on ``ConnectionError``/``Timeout`` — for every method, including
  ``create_instance`` (``PUT /api/v0/asks/{offer_id}/``). A create whose answer is lost after
  Vast rented the machine would rent a second one (``tests/test_vast_machine.py`` shows it
  against the emulator). ``retry`` counts attempts, so ``retry=1`` turns retries off
  (``retry=0`` sends nothing and returns ``None``). Here every call runs with ``retry=1``;
  reads are retried by :func:`gpujobs._retry.call_with_retries` (one retry layer), the create
  never is: :class:`gpujobs.providers._vast_machine.VastMachine` reconciles by label instead.
* **Blocking.** The SDK is synchronous (``requests``, a new session per request, a 120 s default
  timeout). Each call runs in a worker thread (``anyio.to_thread``) with the client's
  ``timeout`` set to ``request_timeout_s``, so a call holds its thread at most that long; the
  event loop never blocks. ``import vastai`` (0.4 s, aiohttp and the serverless client; it also
  gives its ``vastai`` logger a stream handler of its own, ``propagate=False``) happens in that
  thread too, the first time a runner talks to Vast, never on ``import gpujobs``. Measured on
  loopback against the emulator: 1.3 ms per call (thread, new session) against 0.9 ms for the
  same request through httpx; a rental takes a list by label, a search, the create and one
  show per poll until the instance runs: negligible beside the minutes an image takes to start.
* **Its answers.** ``raise_for_status`` errors (``requests.HTTPError``) become the error tree
  through :func:`gpujobs._http.error_for_response`; ``show_instance`` returns ``None`` for an
  instance that is gone (the API answers ``{"instances": null}``), and the SDK itself reads
  ``start_date`` and ``extra_env`` of every row (a row without them raises ``KeyError``, taken
  here as a provider error). Offers and instances are parsed tolerantly (unknown fields ignored).

So the SDK is fit once its retries are off; the REST API is called through it rather than
around it. The wire format is the one ``gpujobs.testing.VastEmulator`` serves.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final, TypeVar

import anyio.to_thread
from pydantic import BaseModel, ConfigDict, ValidationError

from gpujobs._errors import (
    ConfigurationError,
    GpuJobsError,
    ProviderError,
    ProviderUnavailableError,
)
from gpujobs._http import Secret, error_for_response
from gpujobs._polling import Deadline
from gpujobs._retry import RetryPolicy, call_with_retries
from gpujobs._wire import WireResponse

if TYPE_CHECKING:
    import requests

__all__ = ["VastApi", "VastInstance", "VastOffer"]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)
_NOT_FOUND: Final = 404
_MAX_PAGES: Final = 40  # 25 instances a page: 1,000 instances with our label is a runaway


class VastOffer(BaseModel):
    """An offer from ``search_offers``; prices in USD per hour."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    dph_total: float | None = None
    reliability: float | None = None
    reliability2: float | None = None
    direct_port_count: int | None = None
    gpu_name: str | None = None
    num_gpus: int | None = None


class VastInstance(BaseModel):
    """An instance as ``show_instance`` describes it."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    id: int
    label: str | None = None
    actual_status: str | None = None
    status_msg: str | None = None
    public_ipaddr: str | None = None
    ports: Any = None
    dph_total: float | None = None
    storage_total_cost: float | None = None
    start_date: float | None = None

    def host_port(self, container_port: int = 8000) -> int | None:
        """The public port mapped to ``container_port``/tcp, once Vast shows the mapping."""
        ports = self.ports if isinstance(self.ports, Mapping) else {}
        bindings = ports.get(f"{container_port}/tcp")
        if not isinstance(bindings, list) or not bindings:
            return None
        first = bindings[0]
        host_port = first.get("HostPort") if isinstance(first, Mapping) else None
        try:
            return int(host_port) if host_port is not None else None
        except (TypeError, ValueError):
            return None


class VastApi:
    """The SDK calls, each in a worker thread, their errors mapped onto the error tree.

    Args:
        api_key: the Vast API key; ``None`` lets the SDK find it (``VAST_API_KEY``, then its
            config files) when the first call is made.
        server_url: the console API's root URL (``None``: the SDK's, ``https://console.vast.ai``).
        provider: the runner's name, for errors.
        request_timeout_s: the SDK client's per-request timeout.
        retry: how reads (search, show, list, destroy) are retried.
    """

    def __init__(
        self,
        *,
        api_key: str | None,
        server_url: str | None,
        provider: str,
        request_timeout_s: float,
        retry: RetryPolicy,
    ) -> None:
        self._key = None if api_key is None else Secret(api_key)
        self._server_url = server_url
        self._provider = provider
        self._timeout_s = request_timeout_s
        self._retry = retry
        self._sdk: Any = None

    def __repr__(self) -> str:
        return f"VastApi(server_url={self._server_url!r})"

    # -- calls ----------------------------------------------------------------------------------

    async def search_offers(
        self, query: str, *, order: str, storage_gb: float, deadline: Deadline
    ) -> list[VastOffer]:
        """Offers matching ``query`` (the SDK's query language), best first by ``order``."""
        rows = await self._read(
            "search offers",
            lambda sdk: sdk.search_offers(query=query, order=order, storage=storage_gb),
            deadline,
        )
        return [o for o in (self._parse(VastOffer, r) for r in _rows(rows)) if o is not None]

    async def create_instance(
        self, offer_id: int, *, image: str, disk_gb: float, env: Mapping[str, str], label: str
    ) -> int:
        """Rent the offer; the new instance's id. Sent once: never retried here."""

        def create(sdk: Any) -> Any:
            # runtype "args" keeps the image's own entrypoint (ssh/jupyter replace it).
            return sdk.create_instance(
                offer_id, image=image, disk=disk_gb, env=dict(env), label=label, runtype="args"
            )

        answer = await self._call("create instance", create)
        contract = answer.get("new_contract") if isinstance(answer, Mapping) else None
        if not isinstance(answer, Mapping) or not answer.get("success") or contract is None:
            why = answer.get("msg") or answer.get("error") if isinstance(answer, Mapping) else None
            raise ProviderError(
                f"Vast did not create the instance: {str(why or 'no new_contract')[:200]}",
                status_code=200,  # an answer, not a lost one: nothing was rented
                provider=self._provider,
            )
        try:
            return int(contract)
        except (TypeError, ValueError):
            raise ProviderError(
                "Vast answered with a bad instance id", provider=self._provider
            ) from None

    async def show_instance(self, instance_id: int, deadline: Deadline) -> VastInstance | None:
        """The instance, or ``None`` when Vast no longer has it."""

        def show(sdk: Any) -> Any:
            try:
                return sdk.show_instance(instance_id)
            except _http_error() as exc:
                if exc.response is not None and exc.response.status_code == _NOT_FOUND:
                    return None
                raise

        row = await self._read(f"show instance {instance_id}", show, deadline)
        return None if row is None else self._parse(VastInstance, row)

    async def instances_labelled(self, label: str, deadline: Deadline) -> list[VastInstance]:
        """This account's instances carrying ``label`` (checked here too, whatever the filter)."""

        def page_through(sdk: Any) -> list[Any]:
            params: dict[str, Any] = {"select_filters": {"label": {"eq": label}}, "limit": 25}
            rows: list[Any] = []
            for _ in range(_MAX_PAGES):
                page = sdk.show_instances_v1(dict(params))
                rows.extend(_rows(page.get("instances") if isinstance(page, Mapping) else None))
                token = page.get("next_token") if isinstance(page, Mapping) else None
                if not token:
                    break
                params["after_token"] = token
            return rows

        rows = await self._read("list instances", page_through, deadline)
        found = (self._parse(VastInstance, r) for r in rows)
        return [i for i in found if i is not None and i.label == label]

    async def destroy_instance(self, instance_id: int, deadline: Deadline) -> None:
        """Destroy the instance; one that is already gone is not an error."""

        def destroy(sdk: Any) -> None:
            try:
                sdk.destroy_instance(instance_id)
            except _http_error() as exc:
                if exc.response is None or exc.response.status_code != _NOT_FOUND:
                    raise

        await self._read(f"destroy instance {instance_id}", destroy, deadline)

    # -- plumbing -------------------------------------------------------------------------------

    async def _read(self, what: str, call: Callable[[Any], T], deadline: Deadline) -> T:
        return await call_with_retries(
            lambda: self._call(what, call), policy=self._retry, idempotent=True, deadline=deadline
        )

    async def _call(self, what: str, call: Callable[[Any], T]) -> T:
        """``call(sdk)`` in a worker thread, its exceptions translated."""

        def in_thread() -> T:
            if self._sdk is None:
                self._sdk = self._build_sdk()
            return call(self._sdk)

        try:
            return await anyio.to_thread.run_sync(in_thread)
        except GpuJobsError:
            raise
        except Exception as exc:  # noqa: BLE001 - everything the SDK and requests raise
            raise self._translate(what, exc) from None

    def _build_sdk(self) -> Any:
        try:
            from vastai import VastAI  # type: ignore[import-untyped]  # noqa: PLC0415 - optional extra
        except ImportError as exc:
            raise ConfigurationError(
                "the Vast runner needs the vastai SDK: pip install 'gpujobs[vast]'",
                provider=self._provider,
            ) from exc
        key = None if self._key is None else self._key.reveal()
        try:
            sdk = VastAI(api_key=key, server_url=self._server_url, retry=1)
        except RuntimeError:  # the SDK found no key anywhere
            raise ConfigurationError(
                "no Vast API key: pass api_key= or set VAST_API_KEY", provider=self._provider
            ) from None
        sdk.client.timeout = self._timeout_s
        return sdk

    def _translate(self, what: str, exc: Exception) -> GpuJobsError:
        import requests  # noqa: PLC0415 - present whenever the SDK is

        response = getattr(exc, "response", None)
        if isinstance(exc, requests.HTTPError) and response is not None:
            wire = WireResponse(
                status=response.status_code,
                headers={k.lower(): v for k, v in response.headers.items()},
                body=response.content or b"",
                reason=response.reason or "",
            )
            return error_for_response(wire, what=what, provider=self._provider)
        name = type(exc).__name__
        if isinstance(exc, requests.ConnectTimeout) or _never_connected(exc):
            return ProviderUnavailableError(
                f"could not connect to Vast ({what}: {name})",
                request_sent=False,
                provider=self._provider,
            )
        if isinstance(exc, requests.RequestException):
            return ProviderError(
                f"no complete answer from Vast ({what}: {name})", provider=self._provider
            )
        return ProviderError(
            f"Vast answered unexpectedly ({what}: {name})", provider=self._provider
        )

    @staticmethod
    def _parse(model: type[M], row: Any) -> M | None:
        try:
            return model.model_validate(row)
        except ValidationError:
            return None


def _rows(value: Any) -> list[Any]:
    return [r for r in value if isinstance(r, Mapping)] if isinstance(value, list) else []


def _http_error() -> type[requests.HTTPError]:
    import requests  # noqa: PLC0415 - present whenever the SDK is

    return requests.HTTPError


def _never_connected(exc: BaseException) -> bool:
    """Whether ``exc`` (from requests) says no connection was ever opened."""
    from urllib3.exceptions import NewConnectionError  # noqa: PLC0415

    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, NewConnectionError):
            return True
        reason = getattr(seen, "reason", None)
        nested = seen.args[0] if seen.args and isinstance(seen.args[0], BaseException) else None
        seen = reason if isinstance(reason, BaseException) else nested or seen.__context__
    return False
