"""How a rented machine comes and goes under ``MachineRunner``.

:class:`Machine` is what a provider implements; :class:`Lifecycle` drives it: one start shared by
every caller, releases that never overlap a start, and release after a spell with no job in
flight.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import anyio

from gpujobs._errors import GpuJobsError
from gpujobs._polling import Deadline

__all__ = ["Lifecycle", "Machine"]

_log = logging.getLogger("gpujobs")


class Machine(Protocol):
    """A machine we rent that runs the worker's pod server (DESIGN.md, worker contract).

    ``MachineRunner`` never calls ``ready`` twice at once, nor ``ready`` and ``release`` at once,
    but an implementation may be shared: keep its own lock.
    """

    #: The pod id / the instance label, for errors and logs.
    name: str
    # An implementation may also set ``always_on = True``: a worker this runner never starts
    # (its jobs are never flagged as cold starts).

    async def ready(self, deadline: Deadline) -> str:
        """Start / resume / rent as needed, wait until ``GET /health`` says ready; the base URL.

        Concurrent callers share one start: never two resumes or rentals at once. Raises
        :class:`ProviderUnavailableError` (or another :class:`ProviderError`) when the machine
        cannot be made ready by ``deadline``.
        """
        ...

    async def check(self) -> bool:
        """Is the machine still alive (provider's view)? Used after a connection error mid-job."""
        ...

    async def release(self) -> None:
        """Stop (pod) or destroy (instance). Idempotent."""
        ...

    def hourly_usd(self) -> float | None:
        """The provider's current price in USD per hour, ``None`` if unknown."""
        ...

    def uptime_s(self) -> float:
        """Billed seconds of the current run so far (0 when never started)."""
        ...


class Lifecycle:
    """One start shared by every caller, releases that never overlap a start, idle release."""

    def __init__(
        self,
        machine: Machine,
        *,
        start_timeout_s: float,
        idle_release_s: float | None,
        in_flight: Callable[[], int],
        is_idle: Callable[[], Awaitable[bool]],
    ) -> None:
        self.machine = machine
        self.url: str | None = None
        self.generation = 0  # +1 per start: jobs of an earlier run died with it
        self.started_at: float | None = None
        self.start_s: float | None = None  # how long the last start took
        self._start_timeout_s = start_timeout_s
        self._idle_release_s = idle_release_s
        self._in_flight = in_flight
        self._is_idle = is_idle
        self._lock = asyncio.Lock()
        self._starting: asyncio.Task[str] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._last_active = 0.0

    def touch(self) -> None:
        """Jobs came or went: the idle clock restarts from now."""
        self._last_active = time.monotonic()
        self._changed.set()

    # -- start -------------------------------------------------------------------------------

    async def ready(self, deadline: Deadline) -> tuple[str, bool]:
        """The worker's base URL, starting the machine if needed; ``(url, waited_for_start)``."""
        if self.url is not None:
            return self.url, False
        if self._starting is None or self._starting.done():
            self._starting = asyncio.ensure_future(self._start())
            self._starting.add_done_callback(_retrieve)
        starting = self._starting
        if deadline.at is None:
            return await asyncio.shield(starting), True
        try:
            async with asyncio.timeout_at(deadline.at):
                return await asyncio.shield(starting), True
        except TimeoutError:
            if starting.done() and not starting.cancelled() and starting.exception() is None:
                return starting.result(), True
            raise

    async def _start(self) -> str:
        async with self._lock:
            if self.url is not None:
                return self.url
            began = time.monotonic()
            url = await self.machine.ready(Deadline.after(self._start_timeout_s))
            self.url, self.generation = url, self.generation + 1
            self.started_at = self._last_active = time.monotonic()
            self.start_s = self.started_at - began
            if self._idle_release_s is not None and (self._watcher is None or self._watcher.done()):
                self._watcher = asyncio.ensure_future(self._watch_idle(self._idle_release_s))
                self._watcher.add_done_callback(_retrieve)
            return url

    def forget(self) -> None:
        """The machine died: the next job starts it again."""
        self.url = None
        self._changed.set()

    # -- release -----------------------------------------------------------------------------

    async def release(self) -> None:
        """Release the machine; if that fails, it is taken as still up (and still watched)."""
        async with self._lock:
            url, self.url = self.url, None
            self._changed.set()
            try:
                await self.machine.release()
            except BaseException:
                self.url = url
                raise

    async def _watch_idle(self, idle_s: float) -> None:
        while self.url is not None:
            self._changed.clear()
            if self._in_flight():
                # Jobs whose callers gave up drop out of the count without a word: look again.
                with anyio.move_on_after(idle_s):
                    await self._changed.wait()
                continue
            left = self._last_active + idle_s - time.monotonic()
            if left > 0:
                with anyio.move_on_after(left):
                    await self._changed.wait()
                continue
            if not await self._is_idle():
                self._last_active = time.monotonic()  # someone else's job: look again later
                continue
            if self._in_flight():  # a job came while the worker was asked
                continue
            _log.info("releasing %s after %.0f s idle", self.machine.name, idle_s)
            try:
                await self.release()
            except GpuJobsError as exc:
                _log.warning(
                    "could not release %s (trying again later): %s", self.machine.name, exc
                )
                self._last_active = time.monotonic()

    async def aclose(self, *, release: bool) -> None:
        for task in (self._watcher, self._starting):
            if task is not None and not task.done():
                task.cancel()
                await asyncio.wait([task])  # its end, without raising what it raised
        if release:
            await self.release()


def _retrieve(task: asyncio.Task[Any]) -> None:
    # A start whose every waiter gave up may still fail, a watcher may meet an error nobody
    # waits for: logged here, not as "never retrieved" at garbage collection.
    if not task.cancelled() and (error := task.exception()) is not None:
        _log.warning("background task of a machine runner failed: %r", error)
