"""``VastMachine`` against the Vast emulator, through the real ``vastai`` SDK, with real workers.

Each rented instance runs the worker's pod server (fake pipeline) on loopback; the emulator's
port mapping points at it, so a dead instance is really unreachable.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import anyio
import httpx
import pytest

pytest.importorskip("vastai", reason="needs the vast extra")
pytest.importorskip("fastapi", reason="needs the worker extra")

from gpujobs import (
    AuthenticationError,
    CapacityError,
    PollSchedule,
    ProviderUnavailableError,
    RetryPolicy,
)
from gpujobs._polling import Deadline
from gpujobs.providers._vast_api import VastApi
from gpujobs.providers._vast_machine import VastMachine
from gpujobs.providers._worker_api import WorkerApi
from gpujobs.testing import EmulatorServer, serve
from gpujobs.testing._vast_emulator import VastEmulator, default_offers
from gpujobs.worker.fake import FakePipeline
from gpujobs.worker.pod import PodSettings, create_app

pytestmark = pytest.mark.anyio

KEY = "vast-secret-key"
TOKEN = "worker-secret-token"
FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=4, initial_backoff_s=0.01, max_backoff_s=0.05)
ENV = {"-p 8000:8000": "1", "DEPLOYMENT_MODE": "pod", "WORKER_API_TOKEN": TOKEN}


def pod_worker(env: Mapping[str, str]) -> Any:
    return create_app(FakePipeline, PodSettings.from_env(env))


def broken_worker(env: Mapping[str, str]) -> Any:
    def no_weights() -> FakePipeline:
        raise FileNotFoundError("no weights under /models")

    return create_app(no_weights, PodSettings.from_env(env))


Machines = Callable[..., AbstractAsyncContextManager[VastMachine]]


@asynccontextmanager
async def emulated(**options: Any) -> AsyncIterator[EmulatorServer[VastEmulator]]:
    options.setdefault("worker", pod_worker)
    async with serve(VastEmulator(api_key=KEY, **options)) as server:
        yield server


@asynccontextmanager
async def machine_at(
    server: EmulatorServer[VastEmulator], **options: Any
) -> AsyncIterator[VastMachine]:
    settings: dict[str, Any] = {
        "name": "vast-test", "image": "gpujobs/worker:test", "order": "dph_total",
        "query": "gpu_name=RTX_4090 num_gpus=1 reliability>0.98 direct_port_count>=1",
        "disk_gb": 40.0, "env": ENV, "label": "gpujobs-test-1", "max_usd_per_hour": 0.6,
        "reconcile_s": 2.0, "poll": FAST_POLL,
        "request_timeout_s": 5.0,
    }  # fmt: skip
    api_key = options.pop("api_key", KEY)
    settings.update(options)
    api = VastApi(
        api_key=api_key,
        server_url=server.url,
        provider="vast-test",
        request_timeout_s=settings["request_timeout_s"],
        retry=FAST_RETRY,
    )
    worker = WorkerApi(
        provider="vast-test", api_token=None, http_client=None, retry=FAST_RETRY,
        request_timeout_s=settings["request_timeout_s"],
    )  # fmt: skip
    machine = VastMachine(api, worker=worker, **settings)
    try:
        yield machine
    finally:
        await machine.release()
        await worker.aclose()


async def ready(machine: VastMachine, within_s: float = 20.0) -> str:
    return await machine.ready(Deadline.after(within_s))


async def test_ready_rents_the_cheapest_offer_and_the_worker_answers() -> None:
    async with emulated(boot_s=0.1) as server, machine_at(server) as machine:
        url = await ready(machine)
        async with httpx.AsyncClient(base_url=url) as client:
            assert (await client.get("/health")).json()["status"] == "ready"
            assert (await client.get("/")).status_code == 401  # the token reached the worker
            answer = await client.get("/", headers={"Authorization": f"Bearer {TOKEN}"})
            assert answer.status_code == 200
        [row] = server.emulator.instances()
        assert row["id"] == machine.instance_id
        assert row["label"] == "gpujobs-test-1"
        assert row["dph_base"] == 0.35  # the cheapest of the three
        assert machine.hourly_usd() == pytest.approx(row["dph_total"])
        assert await ready(machine) == url  # started once


async def test_the_bill_follows_vasts_rule_storage_from_creation_gpu_from_running() -> None:
    async with emulated(boot_s=0.3) as server, machine_at(server) as machine:
        await ready(machine)
        await anyio.sleep(0.5)  # let the bill grow: a measurement, not a synchronisation
        spent, billed = machine.spent_usd(), server.emulator.billed_usd()
        assert spent == pytest.approx(billed, rel=0.2)
        hourly = machine.hourly_usd()
        assert hourly is not None
        assert hourly * machine.uptime_s() / 3600 == pytest.approx(machine.spent_usd(), rel=0.01)
        # The 0.3 s of loading count for storage only (2 % of the price), not at full price.
        since_creation = time.time() - server.emulator.instances()[0]["start_date"]
        assert machine.uptime_s() < since_creation - 0.25


async def test_concurrent_callers_share_one_rental() -> None:
    async with emulated(boot_s=0.2) as server, machine_at(server) as machine:
        urls: list[str] = []

        async def one() -> None:
            urls.append(await ready(machine))

        async with anyio.create_task_group() as tasks:
            for _ in range(5):
                tasks.start_soon(one)
        assert len(set(urls)) == 1
        assert server.emulator.created_count == 1


async def test_a_create_that_times_out_after_renting_leaves_exactly_one_instance() -> None:
    async with emulated() as server, machine_at(server, request_timeout_s=0.5) as machine:
        server.emulator.inject("create", "slow_response", delay_s=3, after_processing=True)
        await ready(machine)
        assert server.emulator.created_count == 1
        assert server.emulator.requests("create") == 1
        assert [r["id"] for r in server.emulator.instances()] == [machine.instance_id]


@pytest.mark.parametrize("fault", ["server_error", "drop_connection"])
async def test_a_create_that_fails_after_renting_leaves_exactly_one_instance(fault: str) -> None:
    async with emulated() as server, machine_at(server) as machine:
        server.emulator.inject("create", fault, status=504, after_processing=True)
        await ready(machine)
        assert server.emulator.created_count == 1
        assert server.emulator.requests("create") == 1


async def test_a_create_refused_before_renting_moves_on_to_the_next_offer() -> None:
    async with emulated() as server, machine_at(server, reconcile_s=30.0) as machine:
        # Taken by someone else between the search and the create: a clean refusal.
        server.emulator.inject("create", "server_error", status=404, message="no_such_ask")
        with anyio.fail_after(10):  # a refusal needs no wait for a late instance
            await ready(machine)
        [row] = server.emulator.instances()
        assert row["dph_base"] == 0.45  # the second offer
        assert server.emulator.requests("create") == 2


async def test_the_sdk_with_its_own_retries_rents_twice() -> None:
    # Why create goes out with the SDK's retries off: its default retries a 504 on PUT /asks/.
    async with emulated() as server:
        server.emulator.inject("create", "server_error", status=504, after_processing=True)

        def create() -> None:
            from vastai import VastAI  # type: ignore[import-untyped]  # noqa: PLC0415

            sdk = VastAI(api_key=KEY, server_url=server.url)
            sdk.create_instance(1001, image="img", disk=10, label="x", runtype="args")

        await anyio.to_thread.run_sync(create)
        assert server.emulator.created_count == 2


async def test_offers_above_the_cap_are_refused() -> None:
    async with emulated() as server, machine_at(server, max_usd_per_hour=0.3) as machine:
        with pytest.raises(CapacityError, match=r"0\.3 \$/h"):
            await ready(machine)
        assert server.emulator.created_count == 0


async def test_the_cap_holds_when_the_search_ignores_the_price_filter() -> None:
    async with (
        emulated(honour_price_filter=False) as server,
        machine_at(server, max_usd_per_hour=0.3, query="gpu_name=RTX_4090 dph<=0.3") as machine,
    ):
        with pytest.raises(CapacityError, match="3 found above the cap"):
            await ready(machine)
        assert server.emulator.created_count == 0


async def test_an_instance_priced_above_the_cap_after_the_search_is_destroyed() -> None:
    async with emulated() as server, machine_at(server, max_usd_per_hour=0.6) as machine:
        server.emulator.inject("create", "reprice", dph_base=0.9)
        with pytest.raises(CapacityError, match=r"above the cap of 0\.6 \$/h; destroyed it"):
            await ready(machine)
        assert server.emulator.created_count == 1
        assert server.emulator.instances() == []


async def test_ports_that_appear_late_are_waited_for() -> None:
    async with (
        emulated(provision_s=0.05, boot_s=0.05, ports_delay_s=0.3) as server,
        machine_at(server) as machine,
    ):
        url = await ready(machine)
        assert url.startswith("http://127.0.0.1:")


async def test_an_instance_not_ready_by_the_deadline_is_destroyed() -> None:
    async with emulated(boot_s=60) as server, machine_at(server) as machine:
        with pytest.raises(ProviderUnavailableError, match="was not ready after"):
            await ready(machine, within_s=0.5)
        assert server.emulator.instances() == []


async def test_a_dead_instance_is_destroyed_and_the_next_start_rents_again() -> None:
    async with emulated() as server, machine_at(server) as machine:
        await ready(machine)
        first = machine.instance_id
        assert first is not None
        assert await machine.check()
        await server.emulator.kill(first, "offline")
        assert not await machine.check()
        assert server.emulator.instances() == []  # destroyed
        await ready(machine)
        assert machine.instance_id not in {None, first}
        assert server.emulator.created_count == 2


async def test_a_running_instance_whose_worker_stays_unreachable_is_dead() -> None:
    async with emulated() as server, machine_at(server) as machine:
        await ready(machine)
        assert machine.instance_id is not None
        await server.emulator.kill(machine.instance_id, "running")
        assert await machine.check()  # once or twice may be a blip
        assert await machine.check()
        assert not await machine.check()
        assert server.emulator.instances() == []


async def test_a_worker_that_fails_to_load_is_not_kept() -> None:
    async with emulated(worker=broken_worker) as server, machine_at(server) as machine:
        with pytest.raises(ProviderUnavailableError, match="no weights") as info:
            await ready(machine)
        assert not info.value.retryable
        assert server.emulator.instances() == []


async def test_an_instance_with_the_label_is_adopted_not_rented_again() -> None:
    async with emulated() as server, machine_at(server) as first:
        await ready(first)
        async with machine_at(server) as second:  # same label: e.g. a restarted process
            await ready(second)
            assert second.instance_id == first.instance_id
        assert server.emulator.created_count == 1


async def test_release_destroys_and_is_idempotent() -> None:
    async with emulated() as server, machine_at(server) as machine:
        await ready(machine)
        await machine.release()
        await machine.release()
        assert server.emulator.instances() == []
        assert machine.instance_id is None
        assert machine.spent_usd() > 0


async def test_a_wrong_key_is_an_authentication_error_without_the_key() -> None:
    async with emulated() as server, machine_at(server, api_key="wrong-key") as machine:
        with pytest.raises(AuthenticationError) as info:
            await ready(machine)
        assert "wrong-key" not in str(info.value)
        assert "wrong-key" not in repr(info.value)
        assert not info.value.retryable


async def test_the_emulator_search_applies_the_sdk_query() -> None:
    async with emulated() as server:

        def search() -> list[dict[str, Any]]:
            from vastai import VastAI  # noqa: PLC0415

            sdk = VastAI(api_key=KEY, server_url=server.url, retry=1)
            offers: list[dict[str, Any]] = sdk.search_offers(
                query="gpu_name=RTX_4090 reliability>0.996 dph<=0.6", order="dph_total-"
            )
            return offers

        offers = await anyio.to_thread.run_sync(search)
        assert [o["id"] for o in offers] == [1002]
        assert len(default_offers()) == 3
