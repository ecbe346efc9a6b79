"""Calling a worker handler the way the runpod SDK does, so every in-process peer agrees.

A handler receives the job dict ``{"id": ..., "input": ...}`` and may be a plain function (run in a
worker thread so it cannot block the event loop), a coroutine function, or a sync or async
generator (each item is a stream chunk; the output is the list of chunks, like runpod's
``return_aggregate_stream``). As in the runpod SDK, a raised exception or a returned dict with an
``"error"`` key fails the job. A handler that takes a ``progress`` keyword gets a callable that
publishes a partial output while the job runs.
"""

from __future__ import annotations

import functools
import inspect
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import anyio.to_thread

__all__ = ["Handler", "HandlerOutcome", "invoke_handler"]

Handler = Callable[..., Any]
"""A worker handler: ``handler(job)`` or ``handler(job, progress=...)``."""


@dataclass(frozen=True, slots=True)
class HandlerOutcome:
    """What a handler produced: an output, or an error (never both)."""

    output: Any = None
    error: Any = None

    @property
    def failed(self) -> bool:
        """Whether the handler failed the job."""
        return self.error is not None


def _takes_progress(handler: Handler) -> bool:
    try:
        parameters = inspect.signature(handler).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "progress" or p.kind is p.VAR_KEYWORD for p in parameters)


def error_info(exc: BaseException) -> dict[str, str]:
    """The error record the runpod SDK builds for a handler exception."""
    return {
        "error_type": str(type(exc)),
        "error_message": str(exc),
        "error_traceback": "".join(traceback.format_exception(exc)),
    }


async def invoke_handler(
    handler: Handler,
    job: Mapping[str, Any],
    *,
    progress: Callable[[Any], None] | None = None,
    on_chunk: Callable[[Any], None] | None = None,
) -> HandlerOutcome:
    """Run ``handler`` on ``job`` and report its outcome; cancellation propagates."""
    kwargs: dict[str, Any] = {}
    if progress is not None and _takes_progress(handler):
        kwargs["progress"] = progress
    try:
        if inspect.isasyncgenfunction(handler):
            chunks = [chunk async for chunk in _observed(handler(job, **kwargs), on_chunk)]
            return HandlerOutcome(output=chunks)
        if inspect.isgeneratorfunction(handler):
            return HandlerOutcome(output=await _drain_in_thread(handler(job, **kwargs), on_chunk))
        if inspect.iscoroutinefunction(handler):
            result = await handler(job, **kwargs)
        else:
            result = await anyio.to_thread.run_sync(
                functools.partial(handler, job, **kwargs), abandon_on_cancel=True
            )
    except Exception as exc:  # noqa: BLE001 - any handler error fails the job, as in the SDK
        return HandlerOutcome(error=error_info(exc))
    if isinstance(result, Mapping) and "error" in result:
        return HandlerOutcome(error=result["error"])
    return HandlerOutcome(output=result)


async def _observed(chunks: Any, on_chunk: Callable[[Any], None] | None) -> Any:
    async for chunk in chunks:
        if on_chunk is not None:
            on_chunk(chunk)
        yield chunk


_DONE = object()


async def _drain_in_thread(generator: Any, on_chunk: Callable[[Any], None] | None) -> list[Any]:
    chunks: list[Any] = []
    while True:
        chunk = await anyio.to_thread.run_sync(next, generator, _DONE, abandon_on_cancel=True)
        if chunk is _DONE:
            return chunks
        if on_chunk is not None:
            on_chunk(chunk)
        chunks.append(chunk)
