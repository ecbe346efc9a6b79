"""Calling a worker handler the way the runpod SDK does, so every in-process peer agrees.

``LocalRunner`` and the RunPod emulator both run handlers through :func:`invoke_handler`. A
handler receives the job dict ``{"id": ..., "input": ...}`` and may be a plain function (run in a
worker thread so it cannot block the event loop), a coroutine function, or a sync or async
generator (each item is a stream chunk; the output is the list of chunks, like runpod's
``return_aggregate_stream``). Semantics follow the runpod SDK 1.12 (``rp_job.run_job`` and
``run_job_generator``):

* an exception fails the job with the SDK's error record (``error_type``, ``error_message``,
  ``error_traceback``, ``hostname``, ``worker_id``);
* a returned dict with a truthy ``"error"`` fails the job; ``"error"`` and ``"refresh_worker"``
  are control keys, and what remains (if anything) is the output;
* a generator that raises fails the job with the SDK's text ``"handler: ... traceback: ..."``,
  and a yielded dict with a truthy ``"error"`` fails it with that error.

A handler that takes a ``progress`` keyword gets a callable that publishes a partial output while
the job runs (from a worker thread too: it is handed back to the event loop).
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import traceback
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Final

import anyio.to_thread

__all__ = ["Handler", "HandlerOutcome", "invoke_handler"]

Handler = Callable[..., Any]
"""A worker handler: ``handler(job)`` or ``handler(job, progress=...)``."""

_CONTROL_KEYS: Final = frozenset({"error", "refresh_worker"})


@dataclass(frozen=True, slots=True)
class HandlerOutcome:
    """What a handler produced. ``has_output`` is ``False`` when it produced none at all."""

    output: Any = None
    error: Any = None
    has_output: bool = True

    @property
    def failed(self) -> bool:
        """Whether the handler failed the job."""
        return self.error is not None


def takes_progress(handler: Handler) -> bool:
    """Whether ``handler`` accepts a ``progress`` keyword."""
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):  # some C callables have no signature
        return False
    return any(p.name == "progress" or p.kind is p.VAR_KEYWORD for p in parameters)


def error_record(exc: BaseException, *, worker_id: str, hostname: str) -> dict[str, str]:
    """The error record the runpod SDK builds for a handler exception."""
    return {
        "error_type": str(type(exc)),
        "error_message": str(exc),
        "error_traceback": "".join(traceback.format_exception(exc)),
        "hostname": hostname,
        "worker_id": worker_id,
    }


def _returned(result: Any) -> HandlerOutcome:
    if not isinstance(result, Mapping):
        return HandlerOutcome(output=result)
    rest = {k: v for k, v in result.items() if k not in _CONTROL_KEYS}
    return HandlerOutcome(
        output=rest or None, error=result.get("error") or None, has_output=bool(rest)
    )


async def invoke_handler(
    handler: Handler,
    job: Mapping[str, Any],
    *,
    progress: Callable[[Any], None] | None = None,
    on_chunk: Callable[[Any], None] | None = None,
    executor: Executor | None = None,
    worker_id: str = "local",
    hostname: str = "localhost",
) -> HandlerOutcome:
    """Run ``handler`` on ``job`` and report its outcome; cancellation propagates.

    Args:
        handler: the worker handler.
        job: ``{"id": ..., "input": ...}``.
        progress: receives partial outputs, on the event loop's thread.
        on_chunk: receives each chunk of a generator handler as it comes.
        executor: where sync handlers run (default: anyio's worker threads).
        worker_id: named in the error record, as the SDK does.
        hostname: likewise.
    """
    loop = asyncio.get_running_loop()
    kwargs: dict[str, Any] = {}
    if progress is not None and takes_progress(handler):
        kwargs["progress"] = functools.partial(_on_loop, loop, progress)

    async def in_thread(call: Callable[[], Any]) -> Any:
        if executor is not None:
            return await loop.run_in_executor(executor, call)
        return await anyio.to_thread.run_sync(call, abandon_on_cancel=True)

    if inspect.isasyncgenfunction(handler):
        return await _collect(handler(job, **kwargs), on_chunk)
    if inspect.isgeneratorfunction(handler):
        return await _collect(_in_thread(handler(job, **kwargs), in_thread), on_chunk)
    try:
        if inspect.iscoroutinefunction(handler):
            result = await handler(job, **kwargs)
        else:
            result = await in_thread(functools.partial(handler, job, **kwargs))
            if inspect.isawaitable(result):
                result = await result
    except Exception as exc:  # noqa: BLE001 - any handler error fails the job, as in the SDK
        return HandlerOutcome(
            error=error_record(exc, worker_id=worker_id, hostname=hostname), has_output=False
        )
    return _returned(result)


def _on_loop(loop: asyncio.AbstractEventLoop, callback: Callable[[Any], None], value: Any) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        callback(value)
    else:  # from a sync handler's thread: apply in loop order, ahead of the handler's result
        loop.call_soon_threadsafe(callback, value)


async def _collect(
    chunks: AsyncIterator[Any], on_chunk: Callable[[Any], None] | None
) -> HandlerOutcome:
    collected: list[Any] = []
    try:
        async for chunk in chunks:
            if isinstance(chunk, Mapping) and chunk.get("error"):
                return HandlerOutcome(error=str(chunk["error"]), has_output=False)
            collected.append(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
    except Exception as exc:  # noqa: BLE001 - the SDK's text (rp_job.run_job_generator)
        return HandlerOutcome(
            error=f"handler: {exc} \ntraceback: {traceback.format_exc()}", has_output=False
        )
    finally:
        if inspect.isasyncgen(chunks):
            await chunks.aclose()
    return HandlerOutcome(output=collected)


async def _in_thread(
    items: Iterator[Any], in_thread: Callable[[Callable[[], Any]], Any]
) -> AsyncIterator[Any]:
    end = object()
    while (item := await in_thread(functools.partial(next, items, end))) is not end:
        yield item
