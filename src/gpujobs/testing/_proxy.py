"""A loopback reverse proxy that cuts held requests, as RunPod's pod proxy does.

RunPod reaches a pod's HTTP port through ``https://{pod_id}-{port}.proxy.runpod.net``, which sits
behind Cloudflare: a request whose answer has not begun within 100 s gets ``524 A Timeout
Occurred`` (Cloudflare's "Error 524" page: the default Proxy Read Timeout is 100 seconds), while
the origin carries on working. A stopped pod's proxy answers an error page instead of the worker.

:class:`CuttingProxy` forwards every request to ``upstream`` and answers 524 when the upstream
takes longer than ``cut_after_s`` (scaled down in tests), 502 while ``gate()`` says the pod is
not running. Serve it with :func:`gpujobs.testing.serve`.

Example::

    async with serve(HandlerWorker(scripted_handler)) as worker:
        async with serve(CuttingProxy(worker.url, cut_after_s=0.5)) as proxy:
            runner = RunPodPod(base_url=proxy.url)
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Final

import httpx

from gpujobs.testing._emulator_server import (
    ASGIApp,
    Receive,
    Reply,
    Scope,
    Send,
    read_body,
    send_reply,
)

__all__ = ["CuttingProxy"]

_TIMEOUT_PAGE: Final = (
    b"<html><head><title>524 A timeout occurred</title></head>"
    b"<body>Error 524: the origin web server timed out responding to this request.</body></html>"
)
_DOWN_PAGE: Final = b"<html><head><title>502 Bad Gateway</title></head><body>502</body></html>"
_HOP_BY_HOP: Final = frozenset(
    {b"host", b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"te"}
)
_MAX_BODY: Final = 64 * 1024 * 1024


class CuttingProxy:
    """Forwards to ``upstream``; cuts requests held longer than ``cut_after_s`` with a 524.

    Attributes:
        forwarded: requests passed to the upstream.
        cut: requests answered 524 because the upstream took too long.
        refused: requests answered 502 because ``gate()`` said the pod is down.
    """

    def __init__(
        self,
        upstream: str,
        *,
        cut_after_s: float = 100.0,
        gate: Callable[[], bool] | None = None,
    ) -> None:
        self._upstream = upstream.rstrip("/")
        self._cut_after_s = cut_after_s
        self._gate = gate
        self._client: httpx.AsyncClient | None = None
        self.forwarded = 0
        self.cut = 0
        self.refused = 0

    @property
    def app(self) -> ASGIApp:
        """The ASGI app."""
        return self._handle

    @property
    def base_path(self) -> str:
        """Nothing: the upstream's paths are the proxy's."""
        return ""

    async def start(self) -> None:
        """Open the connection pool to the upstream."""
        self._client = httpx.AsyncClient(timeout=None)  # noqa: S113 - the cut is the timeout

    async def aclose(self) -> None:
        """Close the connection pool."""
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def _handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        body = await read_body(receive, _MAX_BODY) or b""
        if self._gate is not None and not self._gate():
            self.refused += 1
            await send_reply(send, Reply(502, _DOWN_PAGE, content_type=b"text/html"))
            return
        assert self._client is not None  # noqa: S101 - served between start() and aclose()
        query = scope.get("query_string", b"").decode("latin-1")
        url = self._upstream + scope["path"] + (f"?{query}" if query else "")
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in _HOP_BY_HOP]
        self.forwarded += 1
        try:
            async with asyncio.timeout(self._cut_after_s):
                response = await self._client.request(
                    scope["method"], url, headers=headers, content=body
                )
        except TimeoutError:
            self.cut += 1
            await send_reply(send, Reply(524, _TIMEOUT_PAGE, content_type=b"text/html"))
            return
        except httpx.TransportError:
            await send_reply(send, Reply(502, _DOWN_PAGE, content_type=b"text/html"))
            return
        kept = tuple(
            (k.encode("latin-1"), v.encode("latin-1"))
            for k, v in response.headers.items()
            if k.lower().encode() not in _HOP_BY_HOP | {b"content-type", b"content-encoding"}
        )
        content_type = response.headers.get("content-type", "application/json").encode()
        await send_reply(send, Reply(response.status_code, response.content, kept, content_type))
