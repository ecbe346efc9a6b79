"""The seam in front of Modal (spawn / get / cancel / stats), and what a call's answers mean.

Shared by :class:`gpujobs.ModalRunner` (SDK mode) and the worker's web app
(:mod:`gpujobs.worker._modal_web`), which both ask Modal through a :class:`ModalCalls`: the real
SDK (:class:`ModalSdkCalls`) in production, :class:`gpujobs.testing.FakeModal` in tests. See
:mod:`gpujobs.providers.modal` for the SDK facts this relies on.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, Protocol

from gpujobs._errors import (
    AuthenticationError,
    ConfigurationError,
    GpuJobsError,
    InvalidInputError,
    JobLostError,
    ProviderError,
    RateLimitedError,
)
from gpujobs._http import Secret
from gpujobs._models import JobStatus
from gpujobs.providers._worker_api import worker_status

__all__ = [
    "ENVELOPE_KEY",
    "ModalCallState",
    "ModalCalls",
    "ModalSdkCalls",
    "import_modal",
    "job_envelope",
    "look_call",
    "modal_exceptions",
    "sdk_error_for",
]

#: Marks the worker's envelope around a job's output (see :func:`job_envelope`).
ENVELOPE_KEY: Final = "gpujobs_modal_job"


class ModalCalls(Protocol):
    """The seam in front of Modal: what a runner (or the worker's web app) asks of it.

    ``get`` behaves as ``FunctionCall.get``: it returns the output, raises the builtin
    ``TimeoutError`` while there is none yet, and raises Modal's exceptions (or the function's
    own) otherwise.
    """

    async def spawn(self, payload: Mapping[str, Any]) -> str:
        """Start the function on ``payload``; the call's id."""
        ...

    async def get(self, call_id: str, *, timeout: float) -> Any:
        """The call's output, waiting at most ``timeout`` seconds for it."""
        ...

    async def cancel(self, call_id: str, *, terminate_containers: bool) -> None:
        """Cancel the call."""
        ...

    async def stats(self) -> Mapping[str, int]:
        """``backlog``, ``runners`` and ``running`` right now."""
        ...


@dataclass(frozen=True, slots=True)
class ModalCallState:
    """One look at a call, in gpujobs' terms, with the timings the worker's envelope carries."""

    status: JobStatus
    provider_status: str
    output: Any = None
    error: Any = None
    started_at: float | None = None
    execution_s: float | None = None
    cold_start: bool | None = None

    @classmethod
    def of_output(cls, value: Any) -> ModalCallState:
        """What a call's output says: the worker's envelope, or a plain function's value."""
        if not (isinstance(value, Mapping) and value.get(ENVELOPE_KEY) == 1):
            return cls(JobStatus.COMPLETED, "SUCCESS", output=value)
        failed = value.get("error") is not None
        return cls(
            JobStatus.FAILED if failed else JobStatus.COMPLETED,
            "FAILURE" if failed else "SUCCESS",
            output=None if failed else value.get("output"),
            error=value.get("error"),
            started_at=_number(value.get("started_at")),
            execution_s=_number(value.get("execution_s")),
            cold_start=value.get("cold_start")
            if isinstance(value.get("cold_start"), bool)
            else None,
        )

    def to_json(self, call_id: str) -> dict[str, Any]:
        """The job record the worker's web app answers (``GET /result/{id}``)."""
        record: dict[str, Any] = {
            "id": call_id,
            "status": self.status.value,
            "provider_status": self.provider_status,
        }
        if self.output is not None:
            record["output"] = self.output
        if self.error is not None:
            record["error"] = self.error
        timings = {
            "started_at": self.started_at,
            "execution_s": self.execution_s,
            "cold_start": self.cold_start,
        }
        record["timings"] = {key: value for key, value in timings.items() if value is not None}
        return record

    @classmethod
    def from_json(cls, record: Any) -> ModalCallState:
        """Read a job record tolerantly; ``ValueError`` when it is not one."""
        if not isinstance(record, Mapping):
            raise ValueError("a job record is a JSON object")  # noqa: TRY004 - a parse error
        status = worker_status(record.get("status"))
        timings = record.get("timings")
        timings = timings if isinstance(timings, Mapping) else {}
        cold = timings.get("cold_start")
        return cls(
            status,
            str(record.get("provider_status") or record.get("status")),
            output=record.get("output"),
            error=record.get("error"),
            started_at=_number(timings.get("started_at")),
            execution_s=_number(timings.get("execution_s")),
            cold_start=cold if isinstance(cold, bool) else None,
        )


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def job_envelope(
    *, output: Any, error: Any, started_at: float, execution_s: float, cold_start: bool | None
) -> dict[str, Any]:
    """What the worker's Modal function returns: the output (or error) and its timings."""
    return {
        ENVELOPE_KEY: 1,
        "output": output,
        "error": error,
        "started_at": started_at,
        "execution_s": execution_s,
        "cold_start": cold_start,
    }


def modal_exceptions() -> Any:
    try:
        import modal.exception  # noqa: PLC0415 - the modal extra, only once Modal answered
    except ImportError:
        return None
    return modal.exception


def _error_record(exc: BaseException) -> dict[str, str]:
    return {"error_type": type(exc).__name__, "error_message": str(exc) or type(exc).__name__}


async def look_call(
    calls: ModalCalls, call_id: str, *, timeout: float, cancelled: bool, provider: str
) -> ModalCallState:
    """One ``get`` (waiting at most ``timeout``), translated; raises the tree's errors.

    ``cancelled``: this process cancelled the call, so a call that ends without output was
    cancelled (Modal reports a terminated input as a plain ``RemoteError``).
    """
    common: dict[str, Any] = {"provider": provider, "job_id": call_id}
    try:
        value = await calls.get(call_id, timeout=timeout)
    except TimeoutError:  # the builtin one: no output yet
        return ModalCallState(JobStatus.RUNNING, "PENDING")
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # noqa: BLE001 - Modal's errors and the function's own
        return _state_of_error(exc, cancelled=cancelled, common=common)
    except BaseException as exc:
        if type(exc).__name__ == "InputCancellation":  # modal's, a BaseException
            return ModalCallState(JobStatus.CANCELLED, "TERMINATED", error=_error_record(exc))
        raise
    return ModalCallState.of_output(value)


def _state_of_error(exc: Exception, *, cancelled: bool, common: dict[str, Any]) -> ModalCallState:
    errors = modal_exceptions()
    if errors is not None:
        if isinstance(exc, errors.OutputExpiredError | errors.NotFoundError):
            raise JobLostError(
                "Modal no longer knows the call (its output expired after 7 days, or the id "
                "is wrong)",
                retryable=True,
                **common,
            ) from None
        if isinstance(exc, errors.FunctionTimeoutError):
            return ModalCallState(JobStatus.TIMED_OUT, "TIMEOUT", error=_error_record(exc))
        sdk_error = sdk_error_for(exc, what="get", common=common)
        if sdk_error is not None:
            raise sdk_error from None
    if cancelled:
        return ModalCallState(JobStatus.CANCELLED, "TERMINATED", error=_error_record(exc))
    return ModalCallState(JobStatus.FAILED, "FAILURE", error=_error_record(exc))


def sdk_error_for(exc: Exception, *, what: str, common: dict[str, Any]) -> GpuJobsError | None:
    """Modal's own failures (not the function's) as the tree's errors; ``None`` otherwise."""
    errors = modal_exceptions()
    if errors is None:
        return None
    message = f"Modal {what}: {type(exc).__name__}: {exc}"
    if isinstance(exc, errors.AuthError | errors.PermissionDeniedError):
        return AuthenticationError(message, **common)
    if isinstance(exc, errors.ResourceExhaustedError):
        return RateLimitedError(message, **common)
    if isinstance(exc, errors.RequestSizeError | errors.SerializationError):
        return InvalidInputError(message, **common)
    transient = (
        errors.ConnectionError,
        errors.InternalError,
        errors.ServiceError,
        errors.ClientClosed,
    )
    if isinstance(exc, transient):
        return ProviderError(message, **common)
    return None


class ModalSdkCalls:
    """:class:`ModalCalls` through the modal SDK, for one deployed function or class method.

    ``target`` is ``"function_name"`` or ``"ClassName.method"``. With ``token_id`` and
    ``token_secret`` it opens its own client (``Client.from_credentials``), so one process can
    serve two workspaces; without them the SDK reads its usual configuration. Nothing is asked
    of Modal before the first call.
    """

    def __init__(
        self,
        app_name: str,
        target: str,
        *,
        token_id: str | None = None,
        token_secret: str | None = None,
        environment_name: str | None = None,
        function: Any = None,
    ) -> None:
        if (token_id is None) != (token_secret is None):
            raise ConfigurationError("give both token_id and token_secret, or neither")
        self._app_name = app_name
        self._target = target
        self._token_id = token_id
        self._token_secret = Secret(token_secret) if token_secret is not None else None
        self._environment_name = environment_name
        self._function = function
        self._client: Any = None
        self._client_lock = asyncio.Lock()

    def __repr__(self) -> str:
        return f"ModalSdkCalls(app={self._app_name!r}, target={self._target!r})"

    @classmethod
    def for_function(cls, function: Any) -> ModalSdkCalls:
        """Calls to a function (or bound method) object already at hand, e.g. inside its app."""
        return cls("", "", function=function)

    async def _modal_client(self) -> Any:
        if self._token_id is None or self._token_secret is None:
            return None
        async with self._client_lock:
            if self._client is None:
                modal = import_modal()
                self._client = await modal.Client.from_credentials.aio(
                    self._token_id, self._token_secret.reveal()
                )
        return self._client

    async def _target_function(self) -> Any:
        if self._function is None:
            modal = import_modal()
            client = await self._modal_client()
            options = {"environment_name": self._environment_name, "client": client}
            class_name, _, method = self._target.partition(".")
            if method:
                service = modal.Cls.from_name(self._app_name, class_name, **options)
                self._function = getattr(service(), method)
            else:
                self._function = modal.Function.from_name(self._app_name, class_name, **options)
        return self._function

    async def spawn(self, payload: Mapping[str, Any]) -> str:
        """``spawn.aio(payload)`` → the ``FunctionCall``'s id."""
        function = await self._target_function()
        call = await function.spawn.aio(dict(payload))
        return str(call.object_id)

    async def _call(self, call_id: str) -> Any:
        modal = import_modal()
        return modal.FunctionCall.from_id(call_id, client=await self._modal_client())

    async def get(self, call_id: str, *, timeout: float) -> Any:
        """``FunctionCall.from_id(id).get.aio(timeout=)``."""
        return await (await self._call(call_id)).get.aio(timeout=timeout)

    async def cancel(self, call_id: str, *, terminate_containers: bool) -> None:
        """``FunctionCall.from_id(id).cancel.aio(terminate_containers=)``."""
        await (await self._call(call_id)).cancel.aio(terminate_containers=terminate_containers)

    async def stats(self) -> Mapping[str, int]:
        """``get_current_stats.aio()``."""
        stats = await (await self._target_function()).get_current_stats.aio()
        return {
            "backlog": int(stats.backlog),
            "runners": int(stats.num_total_runners),
            "running": int(stats.num_running_inputs),
        }

    async def aclose(self) -> None:
        """Close the client this opened (not the SDK's default one)."""
        client, self._client = self._client, None
        if client is not None:
            await client.close.aio()


def import_modal() -> Any:
    try:
        import modal  # noqa: PLC0415 - the modal extra, imported on first use
    except ImportError as exc:
        raise ConfigurationError(
            "ModalRunner needs the modal SDK: pip install 'gpujobs[modal]'", provider="modal"
        ) from exc
    return modal
