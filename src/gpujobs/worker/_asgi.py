"""ASGI plumbing of the worker's servers: bearer auth, a body limit, JSON errors."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping, MutableMapping
from typing import Any, Final

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from gpujobs.worker.schemas import InvalidRequest

__all__ = ["Refusal", "install_error_handlers", "protect"]

logger = logging.getLogger("gpujobs.worker.pod")

_Scope = MutableMapping[str, Any]
_Message = MutableMapping[str, Any]
_Receive = Callable[[], Awaitable[_Message]]
_Send = Callable[[_Message], Awaitable[None]]
_ASGIApp = Callable[[_Scope, _Receive, _Send], Awaitable[None]]

_OPEN_PATHS: Final = frozenset({"/health"})


def protect(app: FastAPI, *, token: str | None, max_body_bytes: int) -> None:
    """Refuse bodies over ``max_body_bytes`` (413) and, with a token, requests without it."""
    app.add_middleware(_BodyLimit, limit=max_body_bytes)
    if token:
        app.add_middleware(_BearerAuth, token=token)


class _BodyTooLargeError(Exception):
    pass


# -- ASGI middleware --------------------------------------------------------------------------


async def _send_json(send: _Send, status: int, body: bytes, headers: list[Any]) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


class _BearerAuth:
    """Every route but the open ones needs ``Authorization: Bearer <token>``."""

    def __init__(self, app: _ASGIApp, token: str) -> None:
        self._app = app
        self._token = token.encode()

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http" or scope.get("path") in _OPEN_PATHS:
            await self._app(scope, receive, send)
            return
        given = b""
        for name, value in scope.get("headers", []):
            if name.lower() == b"authorization":
                scheme, _, given = bytes(value).partition(b" ")
                if scheme.lower() != b"bearer":
                    given = b""
                break
        if not hmac.compare_digest(given.strip(), self._token):
            await _send_json(
                send,
                401,
                b'{"error":"missing or wrong bearer token (Authorization: Bearer <token>)"}',
                [(b"www-authenticate", b"Bearer")],
            )
            return
        await self._app(scope, receive, send)


class _BodyLimit:
    """Refuses bodies over the limit: by Content-Length up front, else while reading."""

    def __init__(self, app: _ASGIApp, limit: int) -> None:
        self._app = app
        self._limit = limit

    async def __call__(self, scope: _Scope, receive: _Receive, send: _Send) -> None:
        if scope["type"] != "http":
            await self._app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name.lower() == b"content-length" and value.isdigit():
                if int(value) > self._limit:
                    await _send_json(send, 413, _too_large_body(self._limit), [])
                    return
                break
        received = 0

        async def limited() -> _Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self._limit:
                    raise _BodyTooLargeError
            return message

        await self._app(scope, limited, send)


def _too_large_body(limit: int) -> bytes:
    mb = limit / (1024 * 1024)
    return f'{{"error":"the request body is larger than {mb:.0f} MB"}}'.encode()


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=dict(headers or {}))


class Refusal(Exception):  # noqa: N818  # not an error of the server: an answer
    """An answer other than success, raised from a route: ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.headers = dict(headers or {})


def install_error_handlers(app: FastAPI) -> None:
    """Every error becomes ``{"error": "<readable message>"}``, never a traceback."""

    async def refusal(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Refusal)  # noqa: S101
        return _error(exc.status, str(exc), exc.headers)

    async def invalid(_request: Request, exc: Exception) -> JSONResponse:
        return _error(422, str(exc))

    async def too_large(_request: Request, _exc: Exception) -> JSONResponse:
        return _error(413, "the request body is too large")

    async def http_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)  # noqa: S101
        return _error(exc.status_code, str(exc.detail), exc.headers)

    async def validation_error(_request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)  # noqa: S101
        fields = ", ".join(
            ".".join(str(part) for part in error.get("loc", ())) for error in exc.errors()
        )
        return _error(422, f"invalid request: check {fields or 'the request'}")

    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        logger.error("unhandled error", exc_info=exc)
        return _error(500, "internal error; the worker's log has the details")

    app.add_exception_handler(Refusal, refusal)
    app.add_exception_handler(InvalidRequest, invalid)
    app.add_exception_handler(_BodyTooLargeError, too_large)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(Exception, unexpected)
