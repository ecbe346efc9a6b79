"""ModalRunner through its SDK seam: against FakeModal (Modal's documented behaviours), and the
real SDK path with the SDK's own objects patched at the seam."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest

pytest.importorskip("modal", reason="needs the modal extra")

import modal

from gpujobs import (
    AuthenticationError,
    ConfigurationError,
    JobCancelledError,
    JobFailedError,
    JobHandle,
    JobLostError,
    JobStatus,
    JobTimeoutError,
    ModalRunner,
    PollSchedule,
    RetryPolicy,
)
from gpujobs.providers.modal import ModalSdkCalls
from gpujobs.testing import FakeModal, scripted_handler

pytestmark = pytest.mark.anyio

FAST_POLL = PollSchedule(first_s=0.01, max_interval_s=0.05)
FAST_RETRY = RetryPolicy(attempts=2, initial_backoff_s=0.01, max_backoff_s=0.02)
TOKEN_SECRET = "as-very-secret"  # a test credential, checked never to leak
TOKEN_ONE, TOKEN_TWO, SECRET_TWO = "ak-one", "ak-two", "as-two"
PROXY_KEY = "wk-1"


class WrongImageError(Exception):
    """A user exception, raised remotely and re-raised by get (module level: picklable)."""


@asynccontextmanager
async def fake_runner(
    function: Callable[[Any], Any] | None = None, **options: Any
) -> AsyncIterator[tuple[FakeModal, ModalRunner]]:
    runner_options = {
        key: options.pop(key) for key in ("usd_per_s", "long_poll_s") if key in options
    }
    fake = FakeModal(function, **options) if function else FakeModal.for_handler(scripted_handler)
    runner = ModalRunner(calls=fake, poll=FAST_POLL, retry=FAST_RETRY, **runner_options)
    try:
        async with runner:
            yield fake, runner
    finally:
        await fake.aclose()


async def until_running(fake: FakeModal, call_id: str) -> None:
    with anyio.fail_after(5):
        while not fake.is_running(call_id):  # noqa: ASYNC110 - the fake's state, no event
            await anyio.sleep(0.005)


async def test_the_worker_envelope_gives_timings_and_cost() -> None:
    async with fake_runner() as (_, runner):
        runner._usd_per_s = 0.001
        result = await runner.run({"output": {"layers": 4}, "sleep_s": 0.05}, timeout=10)
    assert result.output == {"layers": 4}
    assert result.id.startswith("fc-")
    assert result.timings.execution_s is not None
    assert result.timings.execution_s >= 0.04
    assert result.timings.queue_s is not None
    assert result.cost is not None
    assert result.cost.usd == pytest.approx(0.001 * result.timings.execution_s)
    assert result.cost.basis == "execution"


async def test_a_plain_function_answers_its_value_without_timings() -> None:
    async with fake_runner(lambda payload: {"doubled": payload["x"] * 2}, usd_per_s=1.0) as (
        _,
        runner,
    ):
        result = await runner.run({"x": 21}, timeout=10)
    assert result.output == {"doubled": 42}
    assert result.timings.execution_s is None
    assert result.cost is None  # Modal does not tell how long it ran


async def test_a_remote_exception_fails_the_job_with_its_message() -> None:
    def broken(payload: Any) -> Any:
        raise WrongImageError(f"not an image: {payload['name']}")

    async with fake_runner(broken) as (_, runner):
        with pytest.raises(JobFailedError, match=r"not an image: cat\.txt") as info:
            await runner.run({"name": "cat.txt"}, timeout=10)
    assert info.value.error["error_type"] == "WrongImageError"
    assert info.value.job_id is not None
    assert info.value.job_id.startswith("fc-")


async def test_a_call_past_the_function_timeout_is_timed_out_by_modal() -> None:
    async def slow(_: Any) -> Any:
        await anyio.sleep(5)

    async with fake_runner(slow, timeout_s=0.05) as (_, runner):
        handle = await runner.submit({}, timeout=10)
        with pytest.raises(JobTimeoutError, match="provider timed the job out"):
            await runner.wait(handle, timeout=5)
        assert (await runner.status(handle)).status is JobStatus.TIMED_OUT


async def test_a_call_without_output_yet_is_running_at_modal() -> None:
    async with fake_runner() as (fake, runner):
        handle = await runner.submit({"sleep_s": 5}, timeout=10)
        state = await runner.status(handle)
        assert state.status is JobStatus.RUNNING
        assert state.provider_status == "PENDING"
        await runner.cancel(handle)
        assert fake.cancels == 1


async def test_an_expired_output_is_lost() -> None:
    async with fake_runner() as (fake, runner):
        result = await runner.run({"output": 1}, timeout=10)
        fake.expire(result.id)
        handle = JobHandle(id=result.id, provider=runner.name, submitted_at=0.0)
        with pytest.raises(JobLostError) as info:
            await runner.status(handle)
        assert info.value.job_id == result.id
        with pytest.raises(JobLostError):
            await runner.wait(handle, timeout=5)


async def test_outputs_expire_after_their_retention() -> None:
    async with fake_runner(lambda _: 1, result_ttl_s=0.0) as (_, runner):
        handle = await runner.submit({}, timeout=10)
        with pytest.raises(JobLostError):
            await runner.wait(handle, timeout=5)


async def test_a_preempted_call_runs_again_and_the_caller_sees_only_the_result() -> None:
    runs = 0

    async def counted(payload: Any) -> Any:
        nonlocal runs
        runs += 1
        await anyio.sleep(payload["sleep_s"])
        return {"run": runs}

    async with fake_runner(counted) as (fake, runner):
        handle = await runner.submit({"sleep_s": 0.2}, timeout=10)
        await until_running(fake, handle.id)
        assert fake.preempt(handle.id)
        result = await runner.wait(handle, timeout=10)
    assert result.output == {"run": 2}  # the same input ran twice: workers must be idempotent
    assert fake.executions == 2


async def test_cancel_stops_the_call_and_it_reads_cancelled() -> None:
    async with fake_runner() as (fake, runner):
        handle = await runner.submit({"sleep_s": 30}, timeout=60)
        await until_running(fake, handle.id)
        await runner.cancel(handle)
        assert not fake.is_running(handle.id)
        assert (await runner.status(handle)).status is JobStatus.CANCELLED
        with pytest.raises(JobCancelledError):
            await runner.wait(handle, timeout=5)
        await runner.cancel(handle)  # an ended call: not an error


async def test_the_deadline_cancels_the_call_at_modal() -> None:
    async with fake_runner(long_poll_s=10) as (fake, runner):
        with anyio.fail_after(3), pytest.raises(JobTimeoutError) as info:
            await runner.run({"sleep_s": 30}, timeout=0.2)
        assert info.value.job_id is not None
        assert fake.cancels == 1
        assert not fake.is_running(info.value.job_id)


async def test_a_long_get_brings_the_result_without_polling() -> None:
    gets = 0
    fake = FakeModal.for_handler(scripted_handler)
    real_get = fake.get

    async def counting_get(call_id: str, *, timeout: float) -> Any:
        nonlocal gets
        gets += 1
        return await real_get(call_id, timeout=timeout)

    fake.get = counting_get  # type: ignore[method-assign]
    async with ModalRunner(calls=fake, long_poll_s=10, poll=FAST_POLL) as runner:
        result = await runner.run({"output": "x", "sleep_s": 0.3}, timeout=10)
    await fake.aclose()
    assert result.output == "x"
    assert gets == 1


async def test_health_reports_the_functions_containers() -> None:
    async with fake_runner(lambda _: 1, min_containers=2) as (_, runner):
        health = await runner.health()
    assert health.ok
    assert health.workers == {"runners": 2}
    assert health.jobs == {"backlog": 0, "running": 0}


async def test_health_is_not_ok_when_modal_cannot_be_asked() -> None:
    class Down(FakeModal):
        async def stats(self) -> Any:
            raise modal.exception.ConnectionError("cannot reach Modal")

    async with ModalRunner(calls=Down(lambda _: 1)) as runner:
        health = await runner.health()
    assert not health.ok
    assert health.detail is not None
    assert "cannot reach Modal" in health.detail


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (modal.exception.NotFoundError("App 'x' not found"), ConfigurationError),
        (modal.exception.AuthError("Token ID is malformed"), AuthenticationError),
    ],
)
async def test_spawn_errors_are_the_trees(error: Exception, expected: type[Exception]) -> None:
    class Refusing(FakeModal):
        async def spawn(self, payload: Any) -> str:
            del payload
            raise error

    async with ModalRunner(calls=Refusing(lambda _: 1)) as runner:
        with pytest.raises(expected):
            await runner.submit({}, timeout=5)


def test_configuration_errors() -> None:
    with pytest.raises(ConfigurationError):
        ModalRunner()
    with pytest.raises(ConfigurationError):
        ModalRunner("app", "fn", web_url="http://127.0.0.1:1")
    with pytest.raises(ConfigurationError):
        ModalRunner("app")
    with pytest.raises(ConfigurationError):
        ModalSdkCalls("app", "fn", token_id=TOKEN_ONE)


def test_import_gpujobs_imports_no_modal() -> None:
    code = "import sys, gpujobs; print('modal' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# -- the real SDK path, with the SDK's objects patched at the seam -----------------------------


class FakeAio:
    """A synchronicity method: ``await obj.aio(...)``, recording the calls."""

    def __init__(self, answer: Callable[..., Any]) -> None:
        self.calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
        self._answer = answer

    async def aio(self, *args: Any, **kwargs: Any) -> Any:
        self.calls.append((args, kwargs))
        return self._answer(*args, **kwargs)


class FakeCall:
    def __init__(self, call_id: str, outcome: Callable[..., Any]) -> None:
        self.object_id = call_id
        self.get = FakeAio(outcome)
        self.cancel = FakeAio(lambda **_: None)


class SdkRecorder:
    """What ModalSdkCalls asked of modal.Function/Cls/FunctionCall/Client."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, outcome: Callable[..., Any]) -> None:
        self.lookups: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []
        self.calls: dict[str, FakeCall] = {}
        self.clients: list[tuple[str, str]] = []
        self.function = type("Fn", (), {})()
        self.function.spawn = FakeAio(lambda _payload: FakeCall("fc-1", outcome))
        stats = type("S", (), {"backlog": 3, "num_total_runners": 2, "num_running_inputs": 1})
        self.function.get_current_stats = FakeAio(lambda: stats)
        recorder = self

        def function_from_name(*args: Any, **kwargs: Any) -> Any:
            recorder.lookups.append(("Function", args, kwargs))
            return recorder.function

        def cls_from_name(*args: Any, **kwargs: Any) -> Any:
            recorder.lookups.append(("Cls", args, kwargs))
            return type("Instance", (), {"run": recorder.function})

        def from_id(call_id: str, client: Any = None) -> FakeCall:
            recorder.lookups.append(("FunctionCall", (call_id,), {"client": client}))
            return recorder.calls.setdefault(call_id, FakeCall(call_id, outcome))

        self.closed = FakeAio(lambda: None)

        def from_credentials(token_id: str, token_secret: str) -> Any:
            recorder.clients.append((token_id, token_secret))
            return type("Client", (), {"close": recorder.closed})()

        monkeypatch.setattr(modal.Function, "from_name", function_from_name)
        monkeypatch.setattr(modal.Cls, "from_name", cls_from_name)
        monkeypatch.setattr(modal.FunctionCall, "from_id", from_id)
        monkeypatch.setattr(modal.Client, "from_credentials", FakeAio(from_credentials))


async def test_the_sdk_path_spawns_gets_and_cancels(monkeypatch: pytest.MonkeyPatch) -> None:
    def pending(**_: Any) -> Any:
        raise TimeoutError

    sdk = SdkRecorder(monkeypatch, pending)
    async with ModalRunner("my-app", "infer", environment_name="prod") as runner:
        handle = await runner.submit({"x": 1}, timeout=5)
        assert handle.id == "fc-1"
        assert (await runner.status(handle)).status is JobStatus.RUNNING
        await runner.cancel(handle)
        health = await runner.health()
    assert sdk.lookups[0] == (
        "Function",
        ("my-app", "infer"),
        {"environment_name": "prod", "client": None},
    )
    assert sdk.function.spawn.calls == [(({"x": 1},), {})]
    call = sdk.calls["fc-1"]
    assert call.get.calls == [((), {"timeout": 0.0})]
    assert call.cancel.calls == [((), {"terminate_containers": False})]
    assert health.workers == {"runners": 2}
    assert health.jobs == {"backlog": 3, "running": 1}
    assert sdk.clients == []  # no credentials given: the SDK's own configuration


async def test_the_sdk_path_reads_outputs_and_modal_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    outcomes: list[Callable[[], Any]] = [
        lambda: {"layers": 2},
        lambda: (_ for _ in ()).throw(modal.exception.FunctionTimeoutError("too long")),
        lambda: (_ for _ in ()).throw(modal.exception.OutputExpiredError()),
    ]
    sdk = SdkRecorder(monkeypatch, lambda **_: outcomes.pop(0)())
    async with ModalRunner("my-app", "infer") as runner:
        handle = await runner.submit({}, timeout=5)
        assert (await runner.status(handle)).output == {"layers": 2}
        assert (await runner.status(handle)).status is JobStatus.TIMED_OUT
        with pytest.raises(JobLostError):
            await runner.status(handle)
    assert len(sdk.calls["fc-1"].get.calls) == 3


async def test_each_runner_has_its_own_workspace_client(monkeypatch: pytest.MonkeyPatch) -> None:
    sdk = SdkRecorder(monkeypatch, lambda **_: 1)
    first = ModalRunner("app", "Worker.run", token_id=TOKEN_ONE, token_secret=TOKEN_SECRET)
    second = ModalRunner("app", "Worker.run", token_id=TOKEN_TWO, token_secret=SECRET_TWO)
    async with first, second:
        await first.submit({}, timeout=5)
        await first.submit({}, timeout=5)
        await second.submit({}, timeout=5)
    assert sdk.clients == [(TOKEN_ONE, TOKEN_SECRET), (TOKEN_TWO, SECRET_TWO)]  # one client each
    assert len(sdk.closed.calls) == 2  # each runner closes the client it opened
    cls_lookups = [lookup for lookup in sdk.lookups if lookup[0] == "Cls"]
    assert [lookup[1] for lookup in cls_lookups] == [("app", "Worker"), ("app", "Worker")]
    assert all(lookup[2]["client"] is not None for lookup in cls_lookups)


def test_credentials_never_show() -> None:
    runner = ModalRunner("app", "fn", token_id=TOKEN_ONE, token_secret=TOKEN_SECRET)
    calls = ModalSdkCalls("app", "fn", token_id=TOKEN_ONE, token_secret=TOKEN_SECRET)
    web = ModalRunner(
        web_url="http://127.0.0.1:1", proxy_token_id=PROXY_KEY, proxy_token_secret=TOKEN_SECRET
    )
    shown = [repr(runner), str(runner), repr(calls), repr(web), repr(vars(calls))]
    shown.append(repr(vars(web._transport)))
    assert all(TOKEN_SECRET not in text for text in shown)


async def test_closing_the_runner_leaves_submitted_calls_running() -> None:
    fake = FakeModal.for_handler(scripted_handler)
    async with ModalRunner(calls=fake, poll=FAST_POLL) as runner:
        handle = await runner.submit({"sleep_s": 30}, timeout=60)
        await until_running(fake, handle.id)
    assert fake.is_running(handle.id)  # jobs submitted keep running at the provider
    await fake.aclose()
