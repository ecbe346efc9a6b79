"""Handlers whose behaviour is scripted by their input, for tests and benchmarks.

Both follow the runpod SDK's handler contract: they receive the job dict ``{"id": ..., "input":
{...}}`` that RunPod hands a serverless handler. The same functions run under the RunPod emulator
(:class:`gpujobs.testing.RunPodEmulator`) and in-process (``LocalRunner``), so ``progress`` is an
optional keyword argument that a runner may leave out.

Example::

    await scripted_handler({"id": "j1", "input": {"sleep_s": 0.01, "output": 42}})  # -> 42
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import anyio

__all__ = ["scripted_handler", "scripted_stream_handler"]

# Pause between progress updates, so a poller can see each one.
_DEFAULT_PROGRESS_INTERVAL_S = 0.01


def _input_of(job: Mapping[str, Any]) -> Mapping[str, Any]:
    value = job.get("input")
    return value if isinstance(value, Mapping) else {}


async def scripted_handler(
    job: Mapping[str, Any],
    *,
    progress: Callable[[Any], None] | None = None,
) -> Any:
    """Do what the job's input says, in this order.

    Input keys (all optional):

    - ``progress`` (list): report each item through ``progress`` (when given), pausing
      ``progress_interval_s`` (default 0.01) after each;
    - ``sleep_s`` (float): then sleep that long;
    - ``raise`` (str): then raise ``RuntimeError(message)``;
    - ``error`` (str): else return ``{"error": message}`` (a failed job in RunPod's terms);
    - ``output`` (any): else return it; without it, return ``{"echo": input}``.

    Args:
        job: The RunPod job dict, ``{"id": ..., "input": {...}}``.
        progress: Sets the job's partial output while it runs; runners without progress updates
            leave it out.

    Returns:
        The job's output.

    Raises:
        RuntimeError: When the input has a ``raise`` key.
    """
    script = _input_of(job)
    interval = float(script.get("progress_interval_s", _DEFAULT_PROGRESS_INTERVAL_S))
    for update in script.get("progress", ()):
        if progress is not None:
            progress(update)
        await anyio.sleep(interval)
    if sleep_s := float(script.get("sleep_s", 0.0)):
        await anyio.sleep(sleep_s)
    if "raise" in script:
        raise RuntimeError(str(script["raise"]))
    if "error" in script:
        return {"error": str(script["error"])}
    if "output" in script:
        return script["output"]
    return {"echo": dict(script)}


async def scripted_stream_handler(job: Mapping[str, Any]) -> AsyncIterator[Any]:
    """Yield each item of the input's ``stream`` list, sleeping ``sleep_s`` between items.

    With a ``raise`` key, raise ``RuntimeError(message)`` after the last item, so tests can
    check what a stream that fails midway looks like.

    Args:
        job: The RunPod job dict, ``{"id": ..., "input": {"stream": [...], "sleep_s": 0.01}}``.

    Yields:
        The items of ``stream``, one by one (RunPod's stream chunks).

    Raises:
        RuntimeError: When the input has a ``raise`` key.
    """
    script = _input_of(job)
    sleep_s = float(script.get("sleep_s", 0.0))
    for index, item in enumerate(script.get("stream", ())):
        if index and sleep_s:
            await anyio.sleep(sleep_s)
        yield item
    if "raise" in script:
        raise RuntimeError(str(script["raise"]))
