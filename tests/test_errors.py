from __future__ import annotations

import logging

import httpx
import pytest
import respx

from gpujobs import (
    AuthenticationError,
    CapacityError,
    GpuJobsError,
    InvalidInputError,
    JobError,
    JobFailedError,
    JobLostError,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
    RunPodServerless,
)
from gpujobs._http import Secret, error_for_response, retry_after_s
from gpujobs._wire import WireResponse

SECRET = "rpa_SUPERSECRETKEY0123456789"


def test_the_tree_matches_the_design() -> None:
    assert issubclass(RateLimitedError, ProviderError)
    assert issubclass(CapacityError, ProviderError)
    assert issubclass(ProviderUnavailableError, ProviderError)
    assert issubclass(JobFailedError, JobError)
    assert issubclass(JobLostError, JobError)
    for cls in (AuthenticationError, InvalidInputError, ProviderError, JobError):
        assert issubclass(cls, GpuJobsError)


def test_errors_carry_provider_job_and_retryability() -> None:
    exc = RateLimitedError("slow down", provider="rp", job_id="j1", retry_after=2.5)
    assert (exc.provider, exc.job_id, exc.retryable, exc.retry_after) == ("rp", "j1", True, 2.5)
    assert "job_id=j1" in str(exc)
    assert AuthenticationError("no").retryable is False
    assert InvalidInputError("no").retryable is False


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (401, AuthenticationError),
        (403, AuthenticationError),
        (400, InvalidInputError),
        (413, InvalidInputError),
        (429, RateLimitedError),
        (503, CapacityError),
        (500, ProviderError),
    ],
)
def test_status_codes_map_to_one_exception_each(status: int, expected: type) -> None:
    response = WireResponse(status, {}, b'{"error": "nope"}')
    error = error_for_response(response, what="POST /run", provider="rp")
    assert type(error) is expected
    assert "nope" in str(error)


def test_retry_after_reads_both_forms() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s(None) is None
    assert retry_after_s("garbage") is None
    assert retry_after_s("Wed, 21 Oct 2015 07:28:00 GMT") == 0.0


def test_secret_never_shows_itself() -> None:
    secret = Secret(SECRET)
    assert SECRET not in repr(secret)
    assert SECRET not in str(secret)
    assert SECRET not in f"{secret}"
    assert secret.reveal() == SECRET


@pytest.mark.anyio
async def test_api_key_appears_in_no_repr_log_or_error(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with respx.mock(assert_all_called=False) as mock:
        mock.post("https://api.runpod.ai/v2/ep/run").respond(401, json={"error": "bad key"})
        mock.post("https://api.runpod.ai/v2/ep/runsync").respond(500, text="<html>oops</html>")
        runner = RunPodServerless("ep", api_key=SECRET, http_client=httpx.AsyncClient())
        texts = [repr(runner), str(vars(runner))]
        for call in (runner.submit({"x": 1}), runner.run({"x": 1})):
            with pytest.raises(GpuJobsError) as info:
                await call
            texts += [str(info.value), repr(info.value)]
        assert mock.calls.last.request.headers["Authorization"] == f"Bearer {SECRET}"
        await runner.aclose()
    texts += [record.getMessage() for record in caplog.records]
    assert all(SECRET not in text for text in texts)
