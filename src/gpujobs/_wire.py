"""The transport seam under every runner's HTTP: one request in, one buffered response out.

Two implementations:

* :class:`HttpxWire` wraps an ``httpx.AsyncClient`` — the one you hand a runner with
  ``http_client=`` (proxies, custom TLS, ``respx`` mocks, event hooks all keep working);
* :class:`Http11Wire`, the default: a small HTTP/1.1 client on asyncio protocols with a
  keep-alive pool. A job API's requests are small JSON exchanges, often thousands in flight at
  once; httpx spends ~150 µs of CPU per request above its transport, and its connection pool scans
  every connection on every request (quadratic in requests in flight). This client spends a few
  tens of µs and its pool is O(1). It speaks what job APIs need: Content-Length and chunked
  bodies, gzip/deflate, keep-alive and ``Connection: close``, TLS; not proxies (a runner uses
  httpx when a proxy is configured), not HTTP/2, not redirects.

Both raise :class:`WireError` for a request that got no complete answer, saying whether the
request can have reached the server (``sent``).
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
import socket
import ssl
import time
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, Final, Protocol, cast
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import httpx

__all__ = ["Http11Wire", "HttpxWire", "Wire", "WireError", "WireResponse"]

#: Close connections idle longer than this: servers drop idle keep-alive connections (uvicorn
#: after 5 s), and a request written into a connection the server is closing gets no answer.
_KEEPALIVE_EXPIRY_S: Final = 4.0
_MAX_HEADER_BYTES: Final = 64 * 1024
_DNS_TTL_S: Final = 60.0


@dataclass(frozen=True, slots=True)
class WireResponse:
    """A complete response: status, headers (names lower-cased) and the decoded body."""

    status: int
    headers: Mapping[str, str]
    body: bytes
    reason: str = ""


class WireError(Exception):
    """A request got no complete answer.

    ``sent`` is ``False`` only when the request cannot have reached the server (the connection
    could not be opened), so repeating it cannot run anything twice.
    """

    def __init__(self, message: str, *, sent: bool) -> None:
        super().__init__(message)
        self.sent = sent


class Wire(Protocol):
    """What a runner needs from HTTP."""

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        timeout: float,
        on_abandoned: Callable[[asyncio.Future[WireResponse]], None] | None = None,
    ) -> WireResponse:
        """Send one request and return the whole response; raise :class:`WireError`.

        If the caller is cancelled while the request is out and ``on_abandoned`` is given, the
        request is left to finish (within ``timeout``) and ``on_abandoned`` gets the future of
        its response (a held request's answer may name a job that now needs cancelling).
        """
        ...

    async def aclose(self) -> None:
        """Close every connection."""
        ...


class HttpxWire:
    """The seam over an ``httpx.AsyncClient`` (which the caller may own)."""

    def __init__(self, client: httpx.AsyncClient, *, owned: bool) -> None:
        self._client = client
        self._owned = owned

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        timeout: float,
        on_abandoned: Callable[[asyncio.Future[WireResponse]], None] | None = None,
    ) -> WireResponse:
        """Send one request through httpx."""
        exchange = self._exchange(method, url, headers, body, timeout)
        if on_abandoned is None:
            return await exchange
        task = asyncio.ensure_future(exchange)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            on_abandoned(task)
            raise

    async def _exchange(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        timeout: float,
    ) -> WireResponse:
        import httpx  # noqa: PLC0415 - loaded by whoever built the client; not at import

        try:
            response = await self._client.request(
                method,
                url,
                headers=headers,
                content=body,
                timeout=httpx.Timeout(timeout, pool=None),
            )
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            raise WireError(type(exc).__name__, sent=False) from None
        except httpx.TransportError as exc:
            raise WireError(type(exc).__name__, sent=True) from None
        return WireResponse(
            status=response.status_code,
            headers={k.lower(): v for k, v in response.headers.items()},
            body=response.content,
            reason=response.reason_phrase,
        )

    async def aclose(self) -> None:
        """Close the client if this wire built it."""
        if self._owned:
            await self._client.aclose()


class _Origin:
    """Where connections go, and the bytes every request to it starts with."""

    __slots__ = ("host", "host_header", "is_ip", "port", "tls")

    def __init__(self, scheme: str, host: str, port: int | None) -> None:
        self.tls = scheme == "https"
        self.host = host
        default = 443 if self.tls else 80
        self.port = port or default
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.is_ip = _is_ip_literal(host)


class _Connection(asyncio.Protocol):
    """One keep-alive connection: one request at a time, the response parsed as it arrives."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._buffer = bytearray()
        self._waiter: asyncio.Future[WireResponse] | None = None
        # status, reason, headers, where the body starts
        self._head: tuple[int, str, dict[str, str], int] | None = None

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport, though not always a subclass of asyncio.Transport (uvloop's isn't).
        self.transport = cast("asyncio.Transport", transport)

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        if self._waiter is not None and not self._waiter.done():
            try:
                self._try_complete()
            except WireError as exc:
                self._fail(exc)

    def eof_received(self) -> bool:
        self._finish_at_eof()
        return False

    def _finish_at_eof(self) -> None:
        # A body delimited by the end of the connection ends here.
        if self._waiter is not None and not self._waiter.done() and self._head is not None:
            status, reason, headers, end = self._head
            if "content-length" not in headers and "chunked" not in headers.get(
                "transfer-encoding", ""
            ):
                self._finish(status, reason, headers, bytes(self._buffer[end:]))

    def connection_lost(self, exc: Exception | None) -> None:  # noqa: ARG002 - the why is moot
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(
                WireError("the connection closed before a complete response", sent=True)
            )

    # requests

    def send(self, request: bytes) -> asyncio.Future[WireResponse]:
        assert self.transport is not None  # noqa: S101
        self._buffer.clear()
        self._head = None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(request)
        return self._waiter

    def answer_elsewhere(self) -> asyncio.Future[WireResponse]:
        """A new future for the response in flight, whose first one was cancelled."""
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            self._try_complete()  # it may all be here already
        except WireError as exc:
            self._fail(exc)
        if self.closed:  # and maybe ended by the close, unseen while nobody waited
            self._finish_at_eof()
            self.connection_lost(None)
        return waiter

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _fail(self, exc: WireError) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(exc)
        self.abort()

    def _finish(self, status: int, reason: str, headers: dict[str, str], body: bytes) -> None:
        encoding = headers.get("content-encoding", "")
        if encoding in {"gzip", "deflate"}:
            try:
                body = zlib.decompress(body, wbits=31 if encoding == "gzip" else 15)
            except zlib.error as exc:
                self._fail(WireError(f"undecodable {encoding} body: {exc}", sent=True))
                return
        if headers.get("connection", "").lower() == "close":
            self.closed = True
        assert self._waiter is not None  # noqa: S101
        if not self._waiter.done():
            self._waiter.set_result(WireResponse(status, headers, body, reason))

    def _try_complete(self) -> None:
        """Finish the response if all of it has arrived."""
        if self._head is None:
            end = self._buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buffer) > _MAX_HEADER_BYTES:
                    raise WireError("response headers too large", sent=True)
                return
            status, reason, headers = _parse_head(bytes(self._buffer[:end]))
            if 100 <= status < 200:  # noqa: PLR2004 - an interim response: skip it
                del self._buffer[: end + 4]
                self._try_complete()
                return
            self._head = (status, reason, headers, end + 4)
        status, reason, headers, start = self._head
        body = _complete_body(status, headers, self._buffer, start)
        if body is not None:
            self._finish(status, reason, headers, body)


def _complete_body(
    status: int, headers: Mapping[str, str], buffer: bytearray, start: int
) -> bytes | None:
    """The body once all of it is in ``buffer``; ``None`` while more is to come."""
    if "chunked" in headers.get("transfer-encoding", ""):
        return _dechunk(buffer, start)
    if "content-length" in headers:
        try:
            length = int(headers["content-length"])
        except ValueError:
            raise WireError("malformed Content-Length", sent=True) from None
        return bytes(buffer[start : start + length]) if len(buffer) - start >= length else None
    if status in {204, 304}:
        return b""
    return None  # delimited by the end of the connection (see eof_received)


def _parse_head(head: bytes) -> tuple[int, str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/") or not parts[1].isdigit():  # noqa: PLR2004
        raise WireError(f"not an HTTP response: {lines[0][:60]!r}", sent=True)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise WireError("malformed response header", sent=True)
        headers[name.strip().lower()] = value.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers  # noqa: PLR2004


def _dechunk(buffer: bytearray, start: int) -> bytes | None:
    """The body of a complete chunked message, or ``None`` while it is incomplete."""
    body = bytearray()
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            return None
        try:
            size = int(bytes(buffer[at:line_end]).split(b";", 1)[0], 16)
        except ValueError:
            raise WireError("malformed chunk size", sent=True) from None
        at = line_end + 2
        if size == 0:
            # Trailers (if any) end with an empty line.
            return bytes(body) if buffer.find(b"\r\n", at) >= 0 else None
        if len(buffer) < at + size + 2:
            return None
        body += buffer[at : at + size]
        at += size + 2


class Http11Wire:
    """A lean HTTP/1.1 client with a keep-alive pool of at most ``max_connections``."""

    def __init__(self, *, max_connections: int = 400, connect_timeout_s: float = 10.0) -> None:
        self._slots = asyncio.Semaphore(max_connections)
        self._connect_timeout_s = connect_timeout_s
        self._idle: dict[tuple[str, int, bool], list[_Connection]] = {}
        self._origins: dict[str, tuple[_Origin, str]] = {}
        self._ssl: ssl.SSLContext | None = None
        self._addresses: dict[str, tuple[float, asyncio.Future[list[Any]]]] = {}

    def _split(self, url: str) -> tuple[_Origin, str]:
        # URLs repeat (same endpoint, different job ids): cache by the part before the path.
        scheme_end = url.index("://") + 3
        path_start = url.find("/", scheme_end)
        root, target = (url, "/") if path_start < 0 else (url[:path_start], url[path_start:])
        if (known := self._origins.get(root)) is None:
            parts = urlsplit(root)
            if parts.scheme not in {"http", "https"} or not parts.hostname:
                raise ValueError(f"not an http(s) URL: {root!r}")
            origin = _Origin(parts.scheme, parts.hostname, parts.port)
            known = self._origins[root] = (origin, origin.host_header)
        return known[0], target

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        timeout: float,
        on_abandoned: Callable[[asyncio.Future[WireResponse]], None] | None = None,
    ) -> WireResponse:
        """Send one request on a pooled connection and return the whole response."""
        origin, target = self._split(url)
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"]
        lines += [f"{name}: {value}\r\n" for name, value in headers.items()]
        if body is not None or method in {"POST", "PUT", "PATCH"}:
            lines.append(f"Content-Length: {len(body or b'')}\r\n")
        lines.append("\r\n")
        request = "".join(lines).encode("latin-1") + (body or b"")
        loop = asyncio.get_running_loop()
        started = loop.time()
        async with self._slots:
            connection = await self._connection(origin, timeout)
            waiter = connection.send(request)
            left = max(0.0, timeout - (loop.time() - started))
            timer = loop.call_later(left, _expire, waiter)
            try:
                response = await waiter
            except asyncio.CancelledError:
                timer.cancel()
                if on_abandoned is None:
                    connection.abort()
                    raise
                if waiter.cancelled():
                    # The caller gave up first (which cancelled the waiter): let the exchange
                    # end, within its timeout, into a future of its own.
                    waiter = connection.answer_elsewhere()
                    timer = loop.call_at(timer.when(), _expire, waiter)
                    waiter.add_done_callback(partial(_end_abandoned, connection, timer))
                else:  # answered as the caller gave up: the answer is in hand
                    connection.abort()
                on_abandoned(waiter)
                raise
            except BaseException:
                # Failed mid-exchange: the connection's state is unknown.
                timer.cancel()
                connection.abort()
                raise
            timer.cancel()
            self._release(origin, connection)
            return response

    async def _connection(self, origin: _Origin, timeout: float) -> _Connection:
        idle = self._idle.get((origin.host, origin.port, origin.tls))
        now = time.monotonic()
        while idle:
            connection = idle.pop()
            if not connection.closed and now - connection.idle_since < _KEEPALIVE_EXPIRY_S:
                return connection
            connection.abort()
        loop = asyncio.get_running_loop()
        context = None
        if origin.tls:
            if self._ssl is None:
                self._ssl = ssl.create_default_context()
            context = self._ssl
        try:
            async with asyncio.timeout(min(timeout, self._connect_timeout_s)):
                addresses = await self._resolve(origin)
                for n, address in enumerate(addresses):  # in the resolver's order, as asyncio
                    try:
                        sock = await _connect(loop, address, origin.port)
                        _, connection = await loop.create_connection(
                            _Connection,
                            sock=sock,
                            ssl=context,
                            server_hostname=origin.host if context else None,
                        )
                    except OSError:
                        if n == len(addresses) - 1:
                            raise
                    else:
                        return connection
        except (OSError, TimeoutError) as exc:
            raise WireError(f"could not connect: {type(exc).__name__}", sent=False) from None
        raise WireError("the host name resolved to no address", sent=False)

    async def _resolve(self, origin: _Origin) -> list[str]:
        """The host's addresses, looked up at most once per ``_DNS_TTL_S`` (lookups share).

        asyncio resolves a host name in a worker thread for every new connection; a burst of new
        connections to one API would make as many lookups.
        """
        if origin.is_ip:
            return [origin.host]
        now = time.monotonic()
        known = self._addresses.get(origin.host)
        if known is None or known[0] < now:
            lookup = asyncio.ensure_future(
                asyncio.get_running_loop().getaddrinfo(
                    origin.host, origin.port, type=socket.SOCK_STREAM
                )
            )
            known = self._addresses[origin.host] = (now + _DNS_TTL_S, lookup)
        try:
            infos = await asyncio.shield(known[1])
        except OSError:
            self._addresses.pop(origin.host, None)  # don't cache a failure
            raise
        return list(dict.fromkeys(str(info[4][0]) for info in infos))

    def _release(self, origin: _Origin, connection: _Connection) -> None:
        if connection.closed:
            connection.abort()
            return
        connection.idle_since = time.monotonic()
        self._idle.setdefault((origin.host, origin.port, origin.tls), []).append(connection)

    async def aclose(self) -> None:
        """Close every idle connection (busy ones close when their request ends)."""
        for connections in self._idle.values():
            for connection in connections:
                if connection.transport is not None:
                    connection.transport.close()
        self._idle.clear()


async def _connect(loop: asyncio.AbstractEventLoop, address: str, port: int) -> socket.socket:
    """A connected non-blocking socket.

    ``loop.create_connection(host, port)`` re-parses the address and converts socket enums on
    every call, a third of the CPU of opening a connection; a job API opens one per long-poll.
    """
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)  # noqa: FBT003 - the socket API's own signature
        error = sock.connect_ex((address, port))
        if error in {errno.EINPROGRESS, errno.EWOULDBLOCK, errno.EAGAIN}:
            writable = loop.create_future()
            loop.add_writer(sock.fileno(), _set_done, writable)
            try:
                await writable
            finally:
                loop.remove_writer(sock.fileno())
            error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            raise OSError(error, os.strerror(error))  # noqa: TRY301 - closes the socket below
    except BaseException:
        sock.close()
        raise
    return sock


def _set_done(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _end_abandoned(
    connection: _Connection, timer: asyncio.TimerHandle, _: asyncio.Future[WireResponse]
) -> None:
    timer.cancel()
    connection.abort()  # not back to the pool: nobody waits on this exchange any more


def _expire(waiter: asyncio.Future[WireResponse]) -> None:
    if not waiter.done():
        waiter.set_exception(WireError("timed out waiting for the response", sent=True))


def make_wire(http_client: httpx.AsyncClient | None, *, max_connections: int) -> Wire:
    """The wire a runner should use, built without I/O or noticeable CPU.

    The caller's httpx client if given; else the lean HTTP/1.1 client, unless the environment
    names a proxy (which only httpx knows how to use): then an httpx client of our own, built
    on the first request (building one costs ~30 ms of CPU for its SSL context).
    """
    if http_client is not None:
        return HttpxWire(http_client, owned=False)
    if _proxy_configured():
        return _LazyHttpxWire(max_connections)
    return Http11Wire(max_connections=max_connections)


class _LazyHttpxWire:
    """An httpx client of our own, built on the first request."""

    def __init__(self, max_connections: int) -> None:
        self._max_connections = max_connections
        self._wire: HttpxWire | None = None

    async def request(
        self,
        method: str,
        url: str,
        *,
        headers: Mapping[str, str],
        body: bytes | None = None,
        timeout: float,
        on_abandoned: Callable[[asyncio.Future[WireResponse]], None] | None = None,
    ) -> WireResponse:
        """One request, through the client built on the first."""
        if self._wire is None:
            import httpx  # noqa: PLC0415 - ~20,000 objects; only a proxy setting needs it

            n = self._max_connections
            limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
            self._wire = HttpxWire(httpx.AsyncClient(limits=limits), owned=True)
        return await self._wire.request(
            method, url, headers=headers, body=body, timeout=timeout, on_abandoned=on_abandoned
        )

    async def aclose(self) -> None:
        """Close the client, if one was built."""
        if self._wire is not None:
            await self._wire.aclose()
            self._wire = None


def _proxy_configured() -> bool:
    """Whether the environment names a proxy (what ``urllib.request.getproxies`` reads)."""
    names = ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY")
    return any(os.environ.get(name) or os.environ.get(name.lower()) for name in names)
