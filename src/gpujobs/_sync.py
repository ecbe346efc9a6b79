"""A blocking facade over any runner, for code that is not async.

It holds no logic of its own: every call is the async runner's, run on an event loop in a
background thread through an anyio ``BlockingPortal``.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any, Self, TypeVar

from anyio.from_thread import BlockingPortal, start_blocking_portal

from gpujobs._models import Health, JobHandle, JobResult, JobState
from gpujobs._runner import JobRunner

__all__ = ["SyncRunner"]

T = TypeVar("T")


class SyncRunner:
    """Call a :class:`JobRunner` from synchronous code.

    Example::

        with SyncRunner(RunPodServerless("endpoint-id")) as runner:
            result = runner.run({"image": b64, "layers": 4}, timeout=300)
    """

    def __init__(self, runner: JobRunner) -> None:
        self._runner = runner
        self._portal_cm: AbstractContextManager[BlockingPortal] | None = None
        self._portal: BlockingPortal | None = None

    def __enter__(self) -> Self:
        self._portal_cm = start_blocking_portal()
        self._portal = self._portal_cm.__enter__()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._portal_cm is None:
            return
        try:
            self._call(self._runner.aclose)
        finally:
            self._portal_cm.__exit__(exc_type, exc, tb)
            self._portal_cm = self._portal = None

    def _call(self, function: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        if self._portal is None:
            raise RuntimeError("use SyncRunner as a context manager: with SyncRunner(...) as r:")
        return self._portal.call(functools.partial(function, *args, **kwargs))

    @property
    def name(self) -> str:
        """The wrapped runner's name."""
        return self._runner.name

    def submit(self, payload: Mapping[str, Any], **kwargs: Any) -> JobHandle:
        """See :meth:`JobRunner.submit`."""
        return self._call(self._runner.submit, payload, **kwargs)

    def status(self, handle: JobHandle) -> JobState:
        """See :meth:`JobRunner.status`."""
        return self._call(self._runner.status, handle)

    def wait(self, handle: JobHandle, **kwargs: Any) -> JobResult:
        """See :meth:`JobRunner.wait`."""
        return self._call(self._runner.wait, handle, **kwargs)

    def cancel(self, handle: JobHandle) -> None:
        """See :meth:`JobRunner.cancel`."""
        self._call(self._runner.cancel, handle)

    def run(self, payload: Mapping[str, Any], **kwargs: Any) -> JobResult:
        """See :meth:`JobRunner.run`."""
        return self._call(self._runner.run, payload, **kwargs)

    def health(self) -> Health:
        """See :meth:`JobRunner.health`."""
        return self._call(self._runner.health)
