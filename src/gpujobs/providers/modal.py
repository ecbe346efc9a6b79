"""``ModalRunner``: jobs on a deployed Modal function or class method, or on its web endpoints.

What this module relies on (the modal SDK 1.6.4 source: ``modal/_functions.py``, ``cls.py``,
``client.py``, ``exception.py``, ``types.py``; Modal's guides "Job processing", "Request
timeouts", "Proxy auth tokens" and "Preemption"):

* ``modal.Function.from_name(app, name, environment_name=, client=)`` and
  ``modal.Cls.from_name(app, cls, ...)`` (then ``Cls()`` and the method) are lazy: nothing is
  asked of Modal until the first call;
* ``.spawn.aio(*args)`` → a ``FunctionCall`` whose ``object_id`` is ``"fc-..."``;
* ``modal.FunctionCall.from_id(id, client=)`` (a plain classmethod), then ``.get.aio(timeout=)``:
  the builtin ``TimeoutError`` while the call has no output yet (``timeout=0`` polls),
  ``OutputExpiredError`` once the output is gone (kept 7 days after completion),
  ``FunctionTimeoutError`` when the function outlived its ``timeout``, the user's own exception
  when it raised, ``RemoteError`` otherwise (a cancelled call's inputs end ``TERMINATED``, which
  ``get`` reports as ``RemoteError``);
* ``.cancel.aio(terminate_containers=)``; ``modal.Client.from_credentials.aio(id, secret)``;
  ``Function.get_current_stats.aio()`` → ``backlog``, ``num_total_runners``,
  ``num_running_inputs``;
* Modal restarts an input after a preemption (same input, new container): a job may run twice,
  so workers must be idempotent.

What Modal does not tell a caller: whether a call waits for a container or runs (both are
"no output yet", reported as ``RUNNING``), progress, and timings. The worker's Modal app
(:mod:`gpujobs.worker.modal_app`) returns its output in an envelope that carries when the job
started, how long it ran and whether it was the container's first job; a plain function's output
comes back as it is, without timings.

The SDK sits behind a small seam, :class:`ModalCalls` (spawn / get / cancel / stats), so the
runner is tested against :class:`gpujobs.testing.FakeModal`, and the web-endpoint mode
(:mod:`gpujobs.providers._modal_web`) speaks HTTP to the worker's web app instead.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final, Protocol

from gpujobs._errors import ConfigurationError, GpuJobsError, InvalidInputError, ProviderError
from gpujobs._models import Cost, Health, JobHandle, JobState, JobTimings
from gpujobs._polling import Deadline, PollSchedule, poll_until_terminal
from gpujobs._retry import RetryPolicy, call_with_retries
from gpujobs._runner import BaseRunner
from gpujobs.providers._modal_calls import (
    ModalCalls,
    ModalCallState,
    ModalSdkCalls,
    look_call,
    modal_exceptions,
    sdk_error_for,
)

if TYPE_CHECKING:
    import httpx

__all__ = ["ModalCallState", "ModalCalls", "ModalRunner", "ModalSdkCalls"]

_FORGET_CANCELLED_AFTER: Final = 10_000


class _Transport(Protocol):
    async def submit(self, payload: Mapping[str, Any], deadline: Deadline) -> str: ...
    async def look(self, call_id: str, wait_s: float) -> ModalCallState: ...
    async def cancel(self, call_id: str) -> None: ...
    async def stats(self) -> Mapping[str, int]: ...
    async def aclose(self) -> None: ...


class _SdkTransport:
    """The runner's side of :class:`ModalCalls`: errors translated, cancelled calls remembered."""

    def __init__(
        self, calls: ModalCalls, *, provider: str, terminate_containers: bool, owned: bool
    ) -> None:
        self._calls = calls
        self._owned = owned
        self._provider = provider
        self._terminate_containers = terminate_containers
        self._cancelled: OrderedDict[str, None] = OrderedDict()

    async def submit(self, payload: Mapping[str, Any], deadline: Deadline) -> str:
        del deadline  # Modal's own timeout is the function's; the runner cancels at the deadline
        try:
            return await self._calls.spawn(payload)
        except Exception as exc:  # noqa: BLE001 - every SDK failure becomes the tree's error
            raise self._spawn_error(exc) from None

    def _spawn_error(self, exc: Exception) -> GpuJobsError:
        common: dict[str, Any] = {"provider": self._provider}
        if isinstance(exc, GpuJobsError):
            return exc
        errors = modal_exceptions()
        if errors is not None and isinstance(exc, errors.NotFoundError):
            return ConfigurationError(f"no such deployed Modal function ({exc})", **common)
        if errors is not None and isinstance(exc, errors.InvalidError):
            return InvalidInputError(f"Modal refused the call ({exc})", **common)
        known = sdk_error_for(exc, what="spawn", common=common)
        return known or ProviderError(f"Modal spawn failed: {type(exc).__name__}: {exc}", **common)

    async def look(self, call_id: str, wait_s: float) -> ModalCallState:
        return await look_call(
            self._calls,
            call_id,
            timeout=wait_s,
            cancelled=call_id in self._cancelled,
            provider=self._provider,
        )

    async def cancel(self, call_id: str) -> None:
        self._cancelled[call_id] = None
        while len(self._cancelled) > _FORGET_CANCELLED_AFTER:
            self._cancelled.popitem(last=False)
        common: dict[str, Any] = {"provider": self._provider, "job_id": call_id}
        try:
            await self._calls.cancel(call_id, terminate_containers=self._terminate_containers)
        except Exception as exc:  # noqa: BLE001 - every SDK failure becomes the tree's error
            errors = modal_exceptions()
            if errors is not None and isinstance(exc, errors.NotFoundError):
                return  # nothing left to cancel
            known = sdk_error_for(exc, what="cancel", common=common)
            raise known or ProviderError(f"Modal cancel failed: {exc}", **common) from None

    async def stats(self) -> Mapping[str, int]:
        try:
            return await self._calls.stats()
        except Exception as exc:  # noqa: BLE001 - every SDK failure becomes the tree's error
            known = sdk_error_for(exc, what="stats", common={"provider": self._provider})
            raise known or ProviderError(f"Modal stats: {exc}", provider=self._provider) from None

    async def aclose(self) -> None:
        # Calls handed in belong to the caller: their jobs keep running, as at Modal.
        close = getattr(self._calls, "aclose", None) if self._owned else None
        if close is not None:
            await close()


class ModalRunner(BaseRunner):
    """Jobs on Modal: a deployed function or class method, or the worker's web endpoints.

    Example::

        # the SDK: a deployed class method, with this runner's own credentials
        runner = ModalRunner("gpujobs-qwen-layered", "Worker.run",
                             token_id="ak-...", token_secret="as-...",
                             usd_per_s=0.0011)  # your container's price per second
        # plain HTTP: the worker app's web endpoints behind proxy auth
        runner = ModalRunner(web_url="https://ws--gpujobs-qwen-layered-web.modal.run",
                             proxy_token_id="wk-...", proxy_token_secret="ws-...")
        async with runner:
            result = await runner.run({"image": b64, "layers": 4}, timeout=300)

    ``submit`` spawns the call and returns its ``FunctionCall`` id; ``wait`` holds one long
    ``get`` at a time (``long_poll_s``), bounded by the deadline, through the shared polling
    loop; at the deadline the call is cancelled. Modal tells no queued from running (both are
    ``RUNNING``) and sends no progress.

    Args:
        app_name: the deployed app (SDK mode, with ``function_name``).
        function_name: ``"function"`` or ``"Class.method"``.
        web_url: base URL of the worker's web endpoints (web mode), instead of the two above.
        token_id: Modal API token id for this runner (SDK mode; default: the SDK's config).
        token_secret: its secret.
        environment_name: the Modal environment to look the app up in.
        proxy_token_id: ``Modal-Key`` for web endpoints that require proxy auth.
        proxy_token_secret: ``Modal-Secret``.
        calls: a :class:`ModalCalls` to use instead of the SDK (tests: ``FakeModal``).
        name: label of this runner (default ``"modal"``).
        usd_per_s: what a second of the function's container costs (GPU + CPU + memory), for
            :attr:`JobResult.cost` from the worker's execution time.
        terminate_containers: cancel with ``terminate_containers=True`` (stops code that
            ignores cancellation, at the price of the container).
        long_poll_s: the longest single ``get`` (web mode: under Modal's 150 s request cap).
        http_client: an ``httpx.AsyncClient`` for web mode.
        retry: how requests that may be retried are retried.
        poll: how ``wait`` spaces its looks.
        request_timeout_s: timeout of one ordinary HTTP request (web mode).
        default_timeout_s: the deadline of a ``run``/``wait`` called without one.
    """

    kind = "modal"

    def __init__(
        self,
        app_name: str | None = None,
        function_name: str | None = None,
        *,
        web_url: str | None = None,
        token_id: str | None = None,
        token_secret: str | None = None,
        environment_name: str | None = None,
        proxy_token_id: str | None = None,
        proxy_token_secret: str | None = None,
        calls: ModalCalls | None = None,
        name: str | None = None,
        usd_per_s: float | None = None,
        terminate_containers: bool = False,
        long_poll_s: float = 30.0,
        http_client: httpx.AsyncClient | None = None,
        retry: RetryPolicy | None = None,
        poll: PollSchedule | None = None,
        request_timeout_s: float = 30.0,
        default_timeout_s: float = 3600.0,
    ) -> None:
        super().__init__(name=name, default_timeout_s=default_timeout_s, poll=poll)
        modes = [app_name is not None, web_url is not None, calls is not None]
        if sum(modes) != 1 or (app_name is None) != (function_name is None):
            raise ConfigurationError(
                "give app_name and function_name, or web_url, or calls", provider=self.name
            )
        self._usd_per_s = usd_per_s
        self._long_poll_s = long_poll_s
        self._retry = retry or RetryPolicy()
        self._transport: _Transport
        if web_url is not None:
            from gpujobs.providers._modal_web import WebTransport  # noqa: PLC0415 - one mode

            self._transport = WebTransport(
                web_url,
                provider=self.name,
                proxy_token_id=proxy_token_id,
                proxy_token_secret=proxy_token_secret,
                http_client=http_client,
                retry=self._retry,
                request_timeout_s=request_timeout_s,
            )
            self._where = web_url
            return
        owned = calls is None
        if calls is None:
            assert app_name is not None  # noqa: S101 - checked above, for the type checker
            assert function_name is not None  # noqa: S101
            calls = ModalSdkCalls(
                app_name,
                function_name,
                token_id=token_id,
                token_secret=token_secret,
                environment_name=environment_name,
            )
        self._where = f"{app_name}/{function_name}" if app_name else repr(calls)
        self._transport = _SdkTransport(
            calls, provider=self.name, terminate_containers=terminate_containers, owned=owned
        )

    def __repr__(self) -> str:
        return f"ModalRunner(name={self.name!r}, target={self._where!r})"

    async def aclose(self) -> None:
        """Close this runner's connections (and its own Modal client, if it opened one)."""
        await self._transport.aclose()

    async def _submit(self, payload: Mapping[str, Any], deadline: Deadline) -> JobHandle:
        submitted_at = time.time()
        call_id = await self._transport.submit(payload, deadline)
        return JobHandle(id=call_id, provider=self.name, submitted_at=submitted_at)

    def _state(self, handle: JobHandle, call: ModalCallState) -> JobState:
        queue_s = None
        if call.started_at is not None and handle.submitted_at > 0:
            queue_s = max(0.0, call.started_at - handle.submitted_at)  # two clocks: never < 0
        return JobState(
            id=handle.id,
            provider=self.name,
            status=call.status,
            provider_status=call.provider_status,
            output=call.output,
            error=call.error,
            timings=JobTimings(
                queue_s=queue_s, execution_s=call.execution_s, cold_start=call.cold_start
            ),
        )

    async def _look(self, handle: JobHandle) -> JobState:
        return self._state(handle, await self._transport.look(handle.id, 0.0))

    async def status(self, handle: JobHandle) -> JobState:
        """One look (``get`` with ``timeout=0``), retried within the retry policy."""
        return await call_with_retries(
            lambda: self._look(handle), policy=self._retry, idempotent=True
        )

    async def _await_terminal(self, handle: JobHandle, deadline: Deadline) -> JobState:
        async def long_look() -> JobState:
            wait_s = deadline.cap(self._long_poll_s)
            return self._state(handle, await self._transport.look(handle.id, wait_s))

        return await poll_until_terminal(
            long_look, deadline=deadline, schedule=self._poll, job_id=handle.id, provider=self.name
        )

    async def _cancel(self, handle: JobHandle) -> None:
        await call_with_retries(
            lambda: self._transport.cancel(handle.id), policy=self._retry, idempotent=True
        )

    def _cost(self, state: JobState) -> Cost | None:
        if self._usd_per_s is None or state.timings.execution_s is None:
            return None
        return Cost.of_execution(state.timings.execution_s, self._usd_per_s)

    async def health(self) -> Health:
        """The function's containers and backlog; ``ok=False`` when Modal cannot be asked."""
        try:
            stats = await self._transport.stats()
        except GpuJobsError as exc:
            return Health(provider=self.name, ok=False, detail=str(exc))
        return Health(
            provider=self.name,
            ok=True,
            workers={"runners": int(stats.get("runners", 0))},
            jobs={
                "backlog": int(stats.get("backlog", 0)),
                "running": int(stats.get("running", 0)),
            },
        )
