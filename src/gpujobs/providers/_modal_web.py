"""``ModalRunner``'s web-endpoint mode: the worker app's job routes over plain HTTP.

For teams that reach Modal over HTTP rather than through the SDK. The routes are the worker's
web app (:mod:`gpujobs.worker._modal_web`): ``POST /submit`` → ``{"id"}``, ``GET
/result/{id}?wait=S`` (202 while running, 200 with the job record, 404 once the output expired
or for an unknown id), ``POST /cancel/{id}``, ``GET /health``.

What Modal's web layer adds (Modal's guides "Request timeouts" and "Proxy auth tokens"): a
request still running after 150 s is answered ``303 See Other`` pointing at a result URL that
blocks until the request completes (curl needs ``-L``), so every redirect is followed here, with
the same headers, for as long as the deadline allows; endpoints deployed with
``requires_proxy_auth=True`` want the proxy auth token in ``Modal-Key`` and ``Modal-Secret``
(401 without). ``?wait=`` stays below the 150 s cap, so a long poll is usually one request.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urljoin

from gpujobs._errors import (
    GpuJobsError,
    JobLostError,
    ProviderError,
)
from gpujobs._http import (
    SecretHeaders,
    encode_json,
    error_for_response,
    error_for_wire,
    parse_json,
)
from gpujobs._polling import Deadline
from gpujobs._retry import RetryPolicy, queue_job
from gpujobs._wire import WireError, WireResponse, make_wire
from gpujobs.providers._modal_calls import ModalCallState

if TYPE_CHECKING:
    import httpx

__all__ = ["WebTransport"]

_REDIRECTS: Final = frozenset({301, 302, 303, 307, 308})
#: Modal's result URLs answer after at most 150 s each: 20 hops is 50 minutes, as in a browser.
_MAX_REDIRECTS: Final = 20
_MAX_CONNECTIONS: Final = 400
_RUNNING: Final = 202


class WebTransport:
    """The job routes of the worker's Modal web app, over a :class:`~gpujobs._wire.Wire`."""

    def __init__(
        self,
        base_url: str,
        *,
        provider: str,
        proxy_token_id: str | None,
        proxy_token_secret: str | None,
        http_client: httpx.AsyncClient | None,
        retry: RetryPolicy,
        request_timeout_s: float,
    ) -> None:
        self._base_url = base_url.rstrip("/")
        self._provider = provider
        self._headers = SecretHeaders()
        if proxy_token_id and proxy_token_secret:
            self._headers["Modal-Key"] = proxy_token_id
            self._headers["Modal-Secret"] = proxy_token_secret
        self._json_headers = SecretHeaders({**self._headers, "Content-Type": "application/json"})
        self._wire = make_wire(http_client, max_connections=_MAX_CONNECTIONS)
        self._retry = retry
        self._request_timeout_s = request_timeout_s

    async def aclose(self) -> None:
        """Close the connections this opened (not an ``http_client`` handed in)."""
        await self._wire.aclose()

    async def _exchange(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        timeout: float,
        job_id: str | None = None,
    ) -> WireResponse:
        """One request, following Modal's redirects to the result URL."""
        url = self._base_url + path
        for _ in range(_MAX_REDIRECTS + 1):
            try:
                response = await self._wire.request(
                    method,
                    url,
                    headers=self._json_headers if body is not None else self._headers,
                    body=body,
                    timeout=timeout,
                )
            except WireError as exc:
                raise error_for_wire(exc, provider=self._provider, job_id=job_id) from None
            location = response.headers.get("location")
            if response.status not in _REDIRECTS or not location:
                return response
            url = urljoin(url, location)
            if response.status == 303:  # noqa: PLR2004 - See Other: fetch the result with GET
                method, body = "GET", None
        raise ProviderError(
            f"more than {_MAX_REDIRECTS} redirects", provider=self._provider, job_id=job_id
        )

    def _error(self, response: WireResponse, what: str, job_id: str | None) -> GpuJobsError:
        return error_for_response(response, what=what, provider=self._provider, job_id=job_id)

    async def submit(self, payload: Mapping[str, Any], deadline: Deadline) -> str:
        """``POST /submit``; retried only where it cannot have started a call."""
        body = encode_json(dict(payload), provider=self._provider)
        timeout = deadline.cap(self._request_timeout_s)

        async def send() -> str:
            response = await self._exchange("POST", "/submit", body=body, timeout=timeout)
            if not 200 <= response.status < 300:  # noqa: PLR2004
                raise self._error(response, "POST /submit", None)
            answer = parse_json(response, provider=self._provider)
            if not isinstance(answer, Mapping) or not isinstance(answer.get("id"), str):
                raise ProviderError("POST /submit answered no call id", provider=self._provider)
            return str(answer["id"])

        return await queue_job(send, policy=self._retry, deadline=deadline, provider=self._provider)

    async def look(self, call_id: str, wait_s: float) -> ModalCallState:
        """``GET /result/{id}?wait=S``: 202 running, 200 ended, 404 lost."""
        wait_s = max(0.0, wait_s)
        response = await self._exchange(
            "GET",
            f"/result/{call_id}?wait={wait_s:g}",
            timeout=wait_s + self._request_timeout_s,
            job_id=call_id,
        )
        if response.status == 404:  # noqa: PLR2004
            raise JobLostError(
                "Modal no longer knows the call (its output expired, or the id is wrong)",
                provider=self._provider,
                job_id=call_id,
            )
        if response.status not in {200, _RUNNING}:
            raise self._error(response, "GET /result", call_id)
        record = parse_json(response, provider=self._provider, job_id=call_id)
        try:
            state = ModalCallState.from_json(record)
        except ValueError:
            raise ProviderError(
                "GET /result answered something that is not a job record",
                provider=self._provider,
                job_id=call_id,
            ) from None
        if response.status == _RUNNING and state.status.is_terminal:
            raise ProviderError("a 202 with a final status", provider=self._provider)
        return state

    async def cancel(self, call_id: str) -> None:
        """``POST /cancel/{id}``; an unknown call is not an error."""
        response = await self._exchange(
            "POST", f"/cancel/{call_id}", timeout=self._request_timeout_s, job_id=call_id
        )
        if response.status != 404 and not 200 <= response.status < 300:  # noqa: PLR2004
            raise self._error(response, "POST /cancel", call_id)

    async def stats(self) -> Mapping[str, int]:
        """``GET /health``'s counters."""
        response = await self._exchange("GET", "/health", timeout=self._request_timeout_s)
        if not 200 <= response.status < 300:  # noqa: PLR2004
            raise self._error(response, "GET /health", None)
        answer = parse_json(response, provider=self._provider)
        if not isinstance(answer, Mapping):
            raise ProviderError("GET /health answered no object", provider=self._provider)
        return {
            key: int(value)
            for key, value in answer.items()
            if isinstance(value, int) and not isinstance(value, bool)
        }
