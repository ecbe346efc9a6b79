"""The lean HTTP/1.1 client against a raw socket server that answers exactly as scripted."""

from __future__ import annotations

import asyncio
import gzip
import socket
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from gpujobs._wire import Http11Wire, HttpxWire, WireError, _Connection, make_wire

Answer = Callable[[bytes], bytes | None]  # request bytes -> raw response (None: hang up)


class RawServer:
    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.connections = 0
        self.requests: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                request = head + await reader.readexactly(length)
                self.requests.append(request)
                response = self.answer(request)
                if response is None:
                    break
                writer.write(response)
                await writer.drain()
                if b"connection: close" in response.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def serve() -> AsyncIterator[Callable[[Answer], asyncio.Future[tuple[str, RawServer]]]]:
    servers: list[asyncio.Server] = []

    async def start(answer: Answer) -> tuple[str, RawServer]:
        raw = RawServer(answer)
        server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
        servers.append(server)
        port = server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}", raw

    yield start  # type: ignore[misc]
    for server in servers:
        server.close()
        await server.wait_closed()


def ok(body: bytes, *headers: str) -> bytes:
    head = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{head}\r\n".encode() + body


pytestmark = pytest.mark.anyio


async def test_keep_alive_reuses_one_connection(serve) -> None:
    url, raw = await serve(lambda _: ok(b'{"a":1}'))
    wire = Http11Wire()
    for _ in range(5):
        response = await wire.request("GET", f"{url}/status/1", headers={}, timeout=5)
        assert (response.status, response.body) == (200, b'{"a":1}')
    await wire.aclose()
    assert raw.connections == 1
    assert raw.requests[0].startswith(b"GET /status/1 HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_request_line_headers_and_body_are_sent_as_given(serve) -> None:
    url, raw = await serve(lambda _: ok(b"{}"))
    wire = Http11Wire()
    await wire.request(
        "POST",
        f"{url}/runsync?wait=5000",
        headers={"Authorization": "Bearer k"},
        body=b'{"x":1}',
        timeout=5,
    )
    await wire.aclose()
    request = raw.requests[0]
    assert request.startswith(b"POST /runsync?wait=5000 HTTP/1.1\r\n")
    assert b"\r\nAuthorization: Bearer k\r\n" in request
    assert b"\r\nContent-Length: 7\r\n" in request
    assert request.endswith(b'\r\n\r\n{"x":1}')


async def test_chunked_gzip_and_interim_responses(serve) -> None:
    payload = b'{"output": "' + b"x" * 5000 + b'"}'
    packed = gzip.compress(payload)
    chunks = b"".join(
        f"{len(packed[i : i + 999]):x}\r\n".encode() + packed[i : i + 999] + b"\r\n"
        for i in range(0, len(packed), 999)
    )
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Encoding: gzip\r\n\r\n"
        + chunks
        + b"0\r\n\r\n"
    )
    url, _ = await serve(lambda _: response)
    wire = Http11Wire()
    got = await wire.request("GET", f"{url}/x", headers={}, timeout=5)
    await wire.aclose()
    assert got.body == payload
    assert got.headers["content-encoding"] == "gzip"


async def test_body_delimited_by_close(serve) -> None:
    url, raw = await serve(lambda _: b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nthe end")
    wire = Http11Wire()
    for _ in range(2):
        got = await wire.request("GET", f"{url}/x", headers={}, timeout=5)
        assert got.body == b"the end"
    await wire.aclose()
    assert raw.connections == 2  # a closed connection is not reused


async def test_a_hang_up_before_the_answer_may_have_been_processed(serve) -> None:
    url, _ = await serve(lambda _: None)
    wire = Http11Wire()
    with pytest.raises(WireError) as info:
        await wire.request("POST", f"{url}/run", headers={}, body=b"{}", timeout=5)
    assert info.value.sent is True


async def test_a_cut_response_is_an_error(serve) -> None:
    url, _ = await serve(
        lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nConnection: close\r\n\r\npartial"
    )
    wire = Http11Wire()
    with pytest.raises(WireError, match="closed before a complete response"):
        await wire.request("GET", f"{url}/x", headers={}, timeout=5)


async def test_garbage_is_an_error_not_a_hang(serve) -> None:
    url, _ = await serve(lambda _: b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    wire = Http11Wire()
    with pytest.raises(WireError, match="not an HTTP response"):
        await wire.request("GET", f"{url}/x", headers={}, timeout=5)


async def test_a_slow_answer_times_out(serve) -> None:
    url, _ = await serve(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    wire = Http11Wire()
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(WireError, match="timed out") as info:
        await wire.request("GET", f"{url}/x", headers={}, timeout=0.2)
    assert info.value.sent is True
    assert loop.time() - started < 1


async def test_a_refused_connection_was_never_sent() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    wire = Http11Wire()
    with pytest.raises(WireError) as info:
        await wire.request("GET", f"http://127.0.0.1:{port}/x", headers={}, timeout=5)
    assert info.value.sent is False


async def test_connections_are_capped(serve) -> None:
    url, raw = await serve(lambda _: ok(b"{}"))
    wire = Http11Wire(max_connections=3)
    await asyncio.gather(
        *(wire.request("GET", f"{url}/x", headers={}, timeout=5) for _ in range(20))
    )
    await wire.aclose()
    assert raw.connections <= 3
    assert len(raw.requests) == 20


async def test_host_names_are_resolved_once_and_every_address_is_tried(
    serve, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, raw = await serve(lambda _: ok(b"{}"))
    port = int(url.rsplit(":", 1)[1])
    lookups = []
    loop = asyncio.get_running_loop()

    async def fake_getaddrinfo(host: str, port: int, **kwargs: object) -> list[tuple]:
        lookups.append(host)
        # The first address refuses (nothing listens on ::1 here); the second answers.
        return [
            (socket.AF_INET6, socket.SOCK_STREAM, 6, "", ("::1", port, 0, 0)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", port)),
        ]

    monkeypatch.setattr(loop, "getaddrinfo", fake_getaddrinfo)
    wire = Http11Wire(max_connections=10)
    await asyncio.gather(
        *(
            wire.request("GET", f"http://api.example:{port}/x", headers={}, timeout=5)
            for _ in range(5)
        )
    )
    await wire.aclose()
    assert lookups == ["api.example"]
    assert raw.connections == 5
    assert b"\r\nHost: api.example:" in raw.requests[0]


async def test_a_configured_proxy_means_httpx_built_on_first_use(
    serve: Callable[[Answer], asyncio.Future[tuple[str, RawServer]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The lean client knows no proxies: with one in the environment, runners use httpx, which
    # honours it (and NO_PROXY, which keeps this loopback test direct).
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)
        monkeypatch.delenv(name.lower(), raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    url, _ = await serve(lambda _: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    wire = make_wire(None, max_connections=4)
    assert not isinstance(wire, Http11Wire | HttpxWire)  # nothing built yet
    response = await wire.request("GET", url + "/", headers={}, timeout=5)
    assert (response.status, response.body) == (200, b"ok")
    await wire.aclose()
    monkeypatch.delenv("HTTP_PROXY")
    assert isinstance(make_wire(None, max_connections=4), Http11Wire)


class HeldServer:
    """Answers each request only when the test says so (or hangs up)."""

    def __init__(self) -> None:
        self.received = asyncio.Event()
        self.reply: asyncio.Future[bytes | None] = asyncio.get_running_loop().create_future()
        self.saw_eof = asyncio.Event()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        self.received.set()
        waiting_for_eof = asyncio.ensure_future(reader.read())
        either: set[asyncio.Future[Any]] = {waiting_for_eof, self.reply}
        done, _ = await asyncio.wait(either, return_when="FIRST_COMPLETED")
        if waiting_for_eof in done:
            self.saw_eof.set()
        elif (answer := self.reply.result()) is not None:
            writer.write(answer)
            await writer.drain()
        waiting_for_eof.cancel()
        writer.close()


@pytest.fixture
async def held() -> AsyncIterator[tuple[str, HeldServer]]:
    raw = HeldServer()
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/held", raw
    server.close()


async def _abandon(wire: Http11Wire, url: str, raw: HeldServer) -> asyncio.Future[object]:
    """Start a request with ``on_abandoned``, cancel its caller once the server holds it."""
    handed: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    caller = asyncio.ensure_future(
        wire.request("POST", url, headers={}, body=b"{}", timeout=5, on_abandoned=handed.set_result)
    )
    await raw.received.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    return handed


async def test_an_abandoned_request_hands_its_later_answer_over(
    held: tuple[str, HeldServer],
) -> None:
    url, raw = held
    wire = Http11Wire()
    handed = await _abandon(wire, url, raw)
    answer = await asyncio.wait_for(handed, 5)
    assert isinstance(answer, asyncio.Future)
    assert not answer.done()  # the caller left before the server answered
    raw.reply.set_result(b'HTTP/1.1 200 OK\r\nContent-Length: 11\r\n\r\n{"id":"j1"}')
    response = await asyncio.wait_for(answer, 5)
    assert (response.status, response.body) == (200, b'{"id":"j1"}')
    await wire.aclose()


async def test_an_abandoned_request_whose_server_hangs_up_hands_over_an_error(
    held: tuple[str, HeldServer],
) -> None:
    url, raw = held
    wire = Http11Wire()
    answer = await asyncio.wait_for(await _abandon(wire, url, raw), 5)
    assert isinstance(answer, asyncio.Future)
    raw.reply.set_result(None)
    with pytest.raises(WireError, match="closed before a complete response"):
        await asyncio.wait_for(answer, 5)
    await wire.aclose()


async def test_a_cancelled_request_without_a_taker_closes_its_connection(
    held: tuple[str, HeldServer],
) -> None:
    url, raw = held
    wire = Http11Wire()
    caller = asyncio.ensure_future(wire.request("POST", url, headers={}, body=b"{}", timeout=5))
    await raw.received.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(raw.saw_eof.wait(), 5)
    await wire.aclose()


class _Transport:
    """Enough of a transport for a connection driven by hand."""

    def __init__(self) -> None:
        self.written = b""

    def write(self, data: bytes) -> None:
        self.written += data

    def abort(self) -> None:
        pass


async def test_an_answer_ended_by_the_close_while_its_caller_gives_up_is_handed_over() -> None:
    # Within one loop pass: the caller is cancelled (which cancels its waiter), then a body
    # delimited by the end of the connection arrives and the connection closes.
    connection = _Connection()
    connection.connection_made(_Transport())  # type: ignore[arg-type]
    first = connection.send(b"POST /runsync HTTP/1.1\r\n\r\n")
    first.cancel()
    connection.data_received(b'HTTP/1.1 200 OK\r\n\r\n{"id":"j","status":"IN_PROGRESS"}')
    connection.eof_received()
    connection.connection_lost(None)
    answer = connection.answer_elsewhere()
    assert answer.result().body == b'{"id":"j","status":"IN_PROGRESS"}'
