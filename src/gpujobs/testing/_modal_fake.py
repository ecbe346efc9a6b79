"""A fake Modal for tests: spawn / get / cancel as Modal documents them, and its web layer.

There is no offline Modal. :class:`FakeModal` implements
:class:`~gpujobs.providers.modal.ModalCalls` (the seam ``ModalRunner`` and the worker's web app
ask Modal through) by running a Python function in this event loop, and behaves as the modal
SDK 1.6.4 and Modal's guides describe:

* ``spawn`` returns an ``"fc-..."`` id at once; the call waits for one of ``max_containers``;
* ``get(timeout=)`` returns the output, or raises the builtin ``TimeoutError`` while there is
  none (queued and running look the same), ``OutputExpiredError`` once the output is older than
  ``result_ttl_s`` (7 days on Modal) or :meth:`expire` was called, ``FunctionTimeoutError`` when
  the function ran past ``timeout_s``, the function's own exception (a pickled copy) when it
  raised, ``RemoteError`` once the call was cancelled (its input ends ``TERMINATED``), and
  ``NotFoundError`` for an id it never gave;
* :meth:`preempt` stops a running call and starts it again on the same input, as Modal does
  after a preemption (the caller sees nothing but a longer wait);
* inputs and outputs go through pickle, as they do to and from Modal.

:class:`ModalWebEmulator` serves the worker's web app (:mod:`gpujobs.worker._modal_web`) over a
``FakeModal`` behind what Modal's web layer adds: proxy auth (``Modal-Key``/``Modal-Secret``,
401 without) and the request cap (150 s on Modal), past which a request is answered ``303``
pointing at a result URL that waits for the same request.

Raising Modal's own exception types needs the ``modal`` extra.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import inspect
import pickle
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final
from urllib.parse import parse_qs

import anyio
import anyio.to_thread

from gpujobs._handler import Handler
from gpujobs.testing._emulator_server import ASGIApp, Message, Receive, Scope, Send

__all__ = ["FakeModal", "ModalWebEmulator"]

_SEVEN_DAYS_S: Final = 7 * 24 * 3600.0
_RESULT_PARAM: Final = "__modal_function_call_id"


def _errors() -> Any:
    import modal.exception  # noqa: PLC0415 - the modal extra, for Modal's own exception types

    return modal.exception


def _copy(value: Any) -> Any:
    """What crosses Modal's wire: a pickled copy."""
    return pickle.loads(pickle.dumps(value))  # noqa: S301 - our own bytes, just made


@dataclass(eq=False)
class _Call:
    id: str
    payload: Any
    outcome: str = "PENDING"  # SUCCESS, FAILURE, TIMEOUT, TERMINATED once ended
    value: Any = None
    error: BaseException | None = None
    started: bool = False
    ended_at: float | None = None
    expired: bool = False
    preempted: bool = False
    done: anyio.Event = field(default_factory=anyio.Event)
    task: asyncio.Task[None] | None = None
    attempt: asyncio.Future[None] | None = None

    def end(self, outcome: str, *, value: Any = None, error: BaseException | None = None) -> None:
        if self.done.is_set():
            return
        self.outcome, self.value, self.error = outcome, value, error
        self.ended_at = time.monotonic()
        self.done.set()


class FakeModal:
    """A deployed Modal function, faked in this process (see the module docstring).

    Example::

        modal = FakeModal(lambda payload: {"doubled": payload["x"] * 2}, max_containers=2)
        async with ModalRunner(calls=modal) as runner:
            assert (await runner.run({"x": 21})).output == {"doubled": 42}

    Args:
        function: what the deployed function does with its one argument (sync or async).
        max_containers: how many calls run at once; the others wait.
        min_containers: containers kept warm (reported by :meth:`stats`).
        timeout_s: the function's ``timeout``: a call running longer ends in
            ``FunctionTimeoutError``.
        result_ttl_s: how long an output stays available after the call ended.

    Attributes:
        spawned: calls spawned. executions: runs started, re-runs after preemption included.
        cancels: cancel requests received.
    """

    def __init__(
        self,
        function: Callable[[Any], Any],
        *,
        max_containers: int = 4,
        min_containers: int = 0,
        timeout_s: float | None = None,
        result_ttl_s: float = _SEVEN_DAYS_S,
    ) -> None:
        self._function = function
        self._slots = asyncio.Semaphore(max_containers)
        self._min_containers = min_containers
        self._timeout_s = timeout_s
        self._result_ttl_s = result_ttl_s
        self._calls: dict[str, _Call] = {}
        self.spawned = 0
        self.executions = 0
        self.cancels = 0

    @classmethod
    def for_handler(cls, handler: Handler, **options: Any) -> FakeModal:
        """The worker's Modal method around a RunPod-style handler (its envelope included)."""
        from gpujobs.worker._modal_web import run_modal_job  # noqa: PLC0415 - worker extra

        async def worker_method(payload: Any) -> Any:
            return await run_modal_job(handler, payload, job_id=None, cold_start=None)

        return cls(worker_method, **options)

    # -- the seam ---------------------------------------------------------------------------

    async def spawn(self, payload: Mapping[str, Any]) -> str:
        """Start a call; its id at once."""
        call = _Call(id=f"fc-{uuid.uuid4().hex[:26]}", payload=_copy(dict(payload)))
        self._calls[call.id] = call
        self.spawned += 1
        call.task = asyncio.get_running_loop().create_task(self._execute(call))
        return call.id

    async def get(self, call_id: str, *, timeout: float) -> Any:
        """As ``FunctionCall.get(timeout=)``."""
        errors = _errors()
        call = self._calls.get(call_id)
        if call is None:
            raise errors.NotFoundError(f"Function call {call_id} not found")
        if not call.done.is_set():
            with anyio.move_on_after(timeout):
                await call.done.wait()
        if not call.done.is_set():
            raise TimeoutError
        if call.expired or time.monotonic() - (call.ended_at or 0.0) > self._result_ttl_s:
            call.expired = True
            raise errors.OutputExpiredError
        if call.outcome == "SUCCESS":
            return _copy(call.value)
        if call.outcome == "TIMEOUT":
            raise errors.FunctionTimeoutError(f"Function timed out after {self._timeout_s} s")
        if call.outcome == "TERMINATED":
            raise errors.RemoteError("the input was terminated")
        assert call.error is not None  # noqa: S101 - FAILURE always holds the exception
        raise _copy(call.error)

    async def cancel(self, call_id: str, *, terminate_containers: bool = False) -> None:
        """As ``FunctionCall.cancel()``: the input ends ``TERMINATED`` and stops running."""
        del terminate_containers  # one call per container here: the same either way
        call = self._calls.get(call_id)
        if call is None:
            raise _errors().NotFoundError(f"Function call {call_id} not found")
        self.cancels += 1
        call.end("TERMINATED")
        if call.task is not None and not call.task.done():
            call.task.cancel()
            # Modal stops the input soon after; here, before answering, so tests can see it.
            await asyncio.gather(call.task, return_exceptions=True)

    async def stats(self) -> Mapping[str, int]:
        """Backlog, containers and running inputs (``get_current_stats``)."""
        live = [call for call in self._calls.values() if not call.done.is_set()]
        running = sum(call.started for call in live)
        return {
            "backlog": len(live) - running,
            "runners": max(self._min_containers, running),
            "running": running,
        }

    async def aclose(self) -> None:
        """Stop every call still running."""
        tasks = [c.task for c in self._calls.values() if c.task is not None and not c.task.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- for tests ----------------------------------------------------------------------------

    def preempt(self, call_id: str) -> bool:
        """Interrupt a running call; Modal runs it again. ``False`` if it was not running."""
        call = self._calls[call_id]
        if call.attempt is None or call.attempt.done() or call.done.is_set():
            return False
        call.preempted = True
        call.attempt.cancel()
        return True

    def expire(self, call_id: str) -> None:
        """Make an ended call's output expire now."""
        self._calls[call_id].expired = True

    def is_running(self, call_id: str) -> bool:
        """Whether the function is running for this call right now."""
        attempt = self._calls[call_id].attempt
        return attempt is not None and not attempt.done()

    # -- inside ---------------------------------------------------------------------------------

    async def _execute(self, call: _Call) -> None:
        async with self._slots:
            call.started = True
            while not call.done.is_set():
                call.preempted = False
                call.attempt = asyncio.ensure_future(self._attempt(call))
                self.executions += 1
                try:
                    await call.attempt
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if call.preempted and current is not None and not current.cancelling():
                        continue  # preempted: the same input runs again
                    raise

    async def _attempt(self, call: _Call) -> None:
        with anyio.move_on_after(self._timeout_s) as scope:
            try:
                value = await self._invoke(call.payload)
            except Exception as exc:  # noqa: BLE001 - the function's error is the call's outcome
                call.end("FAILURE", error=_copy(exc))
                return
        if scope.cancelled_caught:
            call.end("TIMEOUT")
        else:
            call.end("SUCCESS", value=_copy(value))

    async def _invoke(self, payload: Any) -> Any:
        if inspect.iscoroutinefunction(self._function):
            return await self._function(payload)
        result = await anyio.to_thread.run_sync(
            functools.partial(self._function, payload), abandon_on_cancel=True
        )
        return await result if inspect.isawaitable(result) else result


class _ModalWebLayer:
    """What Modal's web layer does in front of an ASGI app: proxy auth and the request cap."""

    def __init__(
        self, app: ASGIApp, *, token: tuple[str, str] | None, request_cap_s: float
    ) -> None:
        self._app = app
        self._token = token
        self._cap_s = request_cap_s
        self._held: dict[str, asyncio.Task[list[Message]]] = {}
        self.redirects = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        headers = {k.decode("latin-1").lower(): v.decode() for k, v in scope["headers"]}
        if self._token is not None and not self._authorised(headers):
            await _send(send, 401, b"modal-http: missing credentials for proxy authorization")
            return
        query = parse_qs(scope.get("query_string", b"").decode())
        request_id = (query.get(_RESULT_PARAM) or [None])[0]
        if request_id is None:
            body = await _read_body(receive)
            request_id = uuid.uuid4().hex
            task = asyncio.ensure_future(self._capture(scope, body))
        elif (held := self._held.get(request_id)) is not None:
            task = held
        else:
            await _send(send, 404, b"modal-http: unknown result URL")
            return
        done, _ = await asyncio.wait({task}, timeout=self._cap_s)
        if not done:
            self._held[request_id] = task
            self.redirects += 1
            location = f"{scope['path']}?{_RESULT_PARAM}={request_id}"
            await _send(send, 303, b"", [(b"location", location.encode())])
            return
        self._held.pop(request_id, None)
        for message in task.result():
            await send(message)

    def _authorised(self, headers: Mapping[str, str]) -> bool:
        assert self._token is not None  # noqa: S101 - checked by the caller
        key, secret = self._token
        return hmac.compare_digest(headers.get("modal-key", ""), key) and hmac.compare_digest(
            headers.get("modal-secret", ""), secret
        )

    async def _capture(self, scope: Scope, body: bytes) -> list[Message]:
        messages: list[Message] = []
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            await asyncio.Event().wait()  # the client stays connected, as far as the app knows
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            messages.append(message)

        await self._app(scope, receive, send)
        return messages

    async def aclose(self) -> None:
        for task in self._held.values():
            task.cancel()
        await asyncio.gather(*self._held.values(), return_exceptions=True)
        self._held.clear()


async def _read_body(receive: Receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


async def _send(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or []})
    await send({"type": "http.response.body", "body": body})


class ModalWebEmulator:
    """The worker's Modal web app over a :class:`FakeModal`, behind Modal's web layer.

    Example::

        modal = FakeModal.for_handler(scripted_handler)
        async with serve(ModalWebEmulator(modal, proxy_token=("wk-1", "ws-1"))) as server:
            runner = ModalRunner(web_url=server.url, proxy_token_id="wk-1",
                                 proxy_token_secret="ws-1")

    Args:
        calls: the fake function the web app spawns calls on.
        proxy_token: ``(Modal-Key, Modal-Secret)`` the web layer requires; ``None``: open.
        request_cap_s: how long a request may run before a 303 to its result URL (150 s).
    """

    def __init__(
        self,
        calls: FakeModal,
        *,
        proxy_token: tuple[str, str] | None = None,
        request_cap_s: float = 150.0,
    ) -> None:
        from gpujobs.worker._modal_web import create_modal_web_app  # noqa: PLC0415 - worker extra

        self.calls = calls
        self.web = _ModalWebLayer(
            create_modal_web_app(calls), token=proxy_token, request_cap_s=request_cap_s
        )

    @property
    def app(self) -> ASGIApp:
        """The ASGI app, web layer included."""
        return self.web

    @property
    def base_path(self) -> str:
        """The web endpoints sit at the root of their URL."""
        return ""

    async def start(self) -> None:
        """Nothing to start."""

    async def aclose(self) -> None:
        """Drop held requests and stop the fake's calls."""
        await self.web.aclose()
        await self.calls.aclose()
