"""The Vast emulator speaks what the ``vastai`` SDK sends and reads: the SDK itself is the client.

And the SDK facade (``providers/_vast_api.py``) maps what goes wrong onto the error tree.
"""

from __future__ import annotations

import functools
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import anyio
import pytest

pytest.importorskip("vastai", reason="needs the vast extra")

from gpujobs import (
    AuthenticationError,
    ConfigurationError,
    ProviderError,
    ProviderUnavailableError,
    RetryPolicy,
)
from gpujobs._polling import Deadline
from gpujobs.providers._vast_api import VastApi
from gpujobs.testing import EmulatorServer, free_port, serve
from gpujobs.testing._vast_emulator import VastEmulator

pytestmark = pytest.mark.anyio

KEY = "vast-secret-key"
T = TypeVar("T")


@asynccontextmanager
async def emulated(**options: Any) -> AsyncIterator[EmulatorServer[VastEmulator]]:
    async with serve(VastEmulator(api_key=KEY, **options)) as server:
        yield server


async def with_sdk(server: EmulatorServer[VastEmulator], call: Callable[[Any], T]) -> T:
    def in_thread() -> T:
        from vastai import VastAI  # type: ignore[import-untyped]  # noqa: PLC0415

        return call(VastAI(api_key=KEY, server_url=server.url, retry=1))

    return await anyio.to_thread.run_sync(in_thread)


def api_for(url: str, *, api_key: str = KEY, attempts: int = 1) -> VastApi:
    retry = RetryPolicy(attempts=attempts, initial_backoff_s=0.01, max_backoff_s=0.02)
    return VastApi(
        api_key=api_key, server_url=url, provider="vast", request_timeout_s=2.0, retry=retry
    )


async def test_an_instance_goes_from_provisioning_to_loading_to_running() -> None:
    async with emulated(provision_s=0.1, boot_s=0.1) as server:
        created = await with_sdk(
            server,
            lambda sdk: sdk.create_instance(
                1002, image="img", disk=16, env={"-p 8000:8000": "1", "A": "b"}, label="l"
            ),
        )
        assert created == {"success": True, "new_contract": created["new_contract"]}
        instance_id = created["new_contract"]
        seen: list[str | None] = []
        with anyio.fail_after(5):
            while not seen or seen[-1] != "running":
                row = await with_sdk(server, lambda sdk: sdk.show_instance(instance_id))
                if not seen or seen[-1] != row["actual_status"]:
                    seen.append(row["actual_status"])
                await anyio.sleep(0.01)
        assert seen == [None, "loading", "running"]
        assert row["extra_env"] == {"-p 8000:8000": "1", "A": "b"}  # the SDK made it a dict
        assert row["label"] == "l"
        assert row["ports"]["8000/tcp"][0]["HostPort"].isdigit()
        assert row["dph_total"] == pytest.approx(0.45 + 0.15 * 16 / 720)


async def test_only_ports_asked_for_are_mapped() -> None:
    async with emulated() as server:
        created = await with_sdk(server, lambda sdk: sdk.create_instance(1001, image="img"))
        row = await with_sdk(server, lambda sdk: sdk.show_instance(created["new_contract"]))
        assert row["actual_status"] == "running"
        assert row["ports"] == {}


def create_labelled(sdk: Any, label: str) -> Any:
    return sdk.create_instance(1001, image="i", label=label)


async def test_listing_pages_through_and_filters_by_label() -> None:
    async with emulated() as server:
        for n in range(30):
            label = "mine" if n % 10 == 0 else f"other-{n}"
            await with_sdk(server, functools.partial(create_labelled, label=label))
        everything = await with_sdk(server, lambda sdk: sdk.show_instances())
        assert len(everything) == 30  # two pages of 25 and 5
        mine = await api_for(server.url).instances_labelled("mine", Deadline(None))
        assert len(mine) == 3
        assert {i.label for i in mine} == {"mine"}


async def test_destroy_label_and_show_after_destroy() -> None:
    async with emulated() as server:
        created = await with_sdk(server, lambda sdk: sdk.create_instance(1001, image="i"))
        instance_id = created["new_contract"]
        assert await with_sdk(server, lambda sdk: sdk.label_instance(instance_id, "x")) == {
            "success": True
        }
        assert server.emulator.instances()[0]["label"] == "x"
        await with_sdk(server, lambda sdk: sdk.destroy_instance(instance_id))
        assert await with_sdk(server, lambda sdk: sdk.show_instance(instance_id)) is None
        api = api_for(server.url)
        assert await api.show_instance(instance_id, Deadline(None)) is None
        await api.destroy_instance(instance_id, Deadline(None))  # gone already: not an error
        assert server.emulator.instances(include_destroyed=True)[0]["destroyed"]


async def test_billing_counts_storage_from_creation_and_the_gpu_from_running() -> None:
    async with emulated(boot_s=60) as server:
        started = time.monotonic()
        await with_sdk(server, lambda sdk: sdk.create_instance(1003, image="i", disk=480))
        billed = server.emulator.billed_usd()
        # Loading: only the disk bills (0.15 $/GB/month × 480 GB = 0.1 $/h), not the GPU.
        assert 0 < billed <= 0.1 * (time.monotonic() - started) / 3600
        assert server.emulator.instances()[0]["actual_status"] == "loading"


async def test_a_wrong_key_is_refused_and_never_shown() -> None:
    async with emulated() as server:
        api = api_for(server.url, api_key="wrong-key")
        with pytest.raises(AuthenticationError) as info:
            await api.search_offers("gpu_name=RTX_4090", order="dph_total", storage_gb=5,
                                    deadline=Deadline(None))  # fmt: skip
        assert "wrong-key" not in str(info.value)
        assert "wrong-key" not in repr(api)


async def test_reads_ride_out_throttling_and_server_errors() -> None:
    async with emulated() as server:
        server.emulator.inject("search", "rate_limit", retry_after_s=0.01)
        server.emulator.inject("search", "server_error", status=502, html=True)
        offers = await api_for(server.url, attempts=3).search_offers(
            "gpu_name=RTX_4090", order="dph_total", storage_gb=5, deadline=Deadline(None)
        )
        assert [o.id for o in offers] == [1001, 1002, 1003]
        assert server.emulator.requests("search") == 3


async def test_a_create_is_sent_once_even_on_a_429() -> None:
    async with emulated() as server:
        server.emulator.inject("create", "rate_limit", retry_after_s=0.01)
        api = api_for(server.url, attempts=5)
        with pytest.raises(ProviderError, match="rate limited"):
            await api.create_instance(1001, image="i", disk_gb=10, env={}, label="l")
        assert server.emulator.requests("create") == 1


async def test_a_refused_connection_was_never_sent() -> None:
    api = api_for(f"http://127.0.0.1:{free_port()}")
    with pytest.raises(ProviderUnavailableError) as info:
        await api.show_instance(1, Deadline(None))
    assert info.value.request_sent is False


async def test_garbage_is_a_provider_error() -> None:
    async with emulated() as server:
        server.emulator.inject("show", "drop_connection")
        with pytest.raises(ProviderError) as info:
            await api_for(server.url).show_instance(1, Deadline(None))
        assert info.value.retryable


async def test_no_key_anywhere_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("HOME", "/nonexistent")
    monkeypatch.setenv("XDG_CONFIG_HOME", "/nonexistent")
    api = VastApi(
        api_key=None, server_url="http://127.0.0.1:9", provider="vast", request_timeout_s=1,
        retry=RetryPolicy(attempts=1),
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="VAST_API_KEY"):
        await api.show_instance(1, Deadline(None))
