"""An asyncio event loop on virtual time: an hour of timers runs in a blink.

:class:`VirtualClockLoop` is a plain :class:`asyncio.SelectorEventLoop` whose ``time()`` reads a
virtual clock, and whose selector, when nothing is ready, moves that clock forward to the next
timer instead of sleeping. Everything that reads the loop's clock — ``asyncio.sleep``,
``asyncio.timeout``, ``asyncio.wait(..., timeout=)``, anyio's ``sleep``, ``move_on_after`` and
``fail_after``, gpujobs' :class:`Deadline` — runs unchanged, so the real :class:`Router` and
:class:`BaseRunner` code can be driven by simulated runners.

Real I/O still works (the selector looks first, without waiting), but a loop that waits on real
sockets while timers are pending jumps past them: use it for in-process simulations. Wall-clock
readings (``time.time()``, ``time.monotonic()``) do not move with the virtual clock.

::

    async def main() -> float:
        loop = asyncio.get_running_loop()
        await asyncio.sleep(3600)
        return loop.time()

    assert run_virtual(main()) == 3600.0  # in milliseconds of wall time
"""

from __future__ import annotations

import asyncio
import selectors
from collections.abc import Coroutine
from typing import Any, TypeVar

__all__ = ["VirtualClockLoop", "run_virtual"]

T = TypeVar("T")


class _Clock:
    def __init__(self, start: float) -> None:
        self.now = start


class _VirtualSelector(selectors.DefaultSelector):
    """Looks at real file descriptors without waiting; a wait becomes a jump of the clock."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self._clock = clock

    def select(self, timeout: float | None = None) -> list[tuple[selectors.SelectorKey, int]]:
        """Ready events now; else advance the clock by ``timeout`` (block only without one)."""
        ready = super().select(0)
        if ready or (timeout is not None and timeout <= 0):
            return ready
        if timeout is None:  # no timer pending: only another thread or real I/O can wake us
            return super().select(None)
        self._clock.now += timeout
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """A selector event loop whose clock is virtual and jumps to the next timer when idle.

    Args:
        start: the clock's reading when the loop starts.
    """

    def __init__(self, start: float = 0.0) -> None:
        self._virtual = _Clock(start)
        super().__init__(selector=_VirtualSelector(self._virtual))

    def time(self) -> float:
        """The virtual clock, in seconds."""
        return self._virtual.now


def run_virtual(coro: Coroutine[Any, Any, T], *, start: float = 0.0) -> T:
    """Run ``coro`` to completion on a fresh :class:`VirtualClockLoop`, like ``asyncio.run``.

    Must be called where no event loop is running (a plain function, a sync test).
    """
    with asyncio.Runner(loop_factory=lambda: VirtualClockLoop(start)) as runner:
        return runner.run(coro)
