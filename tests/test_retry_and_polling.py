from __future__ import annotations

import anyio
import pytest

from gpujobs import (
    AuthenticationError,
    JobLostError,
    JobState,
    JobStatus,
    JobTimeoutError,
    PollSchedule,
    ProviderError,
    ProviderUnavailableError,
    RateLimitedError,
    RetryPolicy,
)
from gpujobs._polling import Deadline, poll_until_terminal
from gpujobs._retry import call_with_retries, should_retry

FAST = RetryPolicy(attempts=4, initial_backoff_s=0.001, max_backoff_s=0.01, max_time_s=5)


def test_classification() -> None:
    sent_5xx = ProviderError("500", status_code=500)
    not_sent = ProviderUnavailableError("refused", request_sent=False)
    assert should_retry(sent_5xx, idempotent=True)
    # A request that may have queued a job is never sent again blindly.
    assert not should_retry(sent_5xx, idempotent=False)
    assert should_retry(not_sent, idempotent=False)
    assert should_retry(RateLimitedError("429"), idempotent=False)
    assert not should_retry(AuthenticationError("401"), idempotent=True)
    assert not should_retry(JobLostError("gone"), idempotent=True)
    assert not should_retry(ValueError("bug"), idempotent=True)


class Flaky:
    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "ok"


@pytest.mark.anyio
async def test_retries_are_bounded_in_attempts() -> None:
    flaky = Flaky(*[ProviderError("500") for _ in range(10)])
    with pytest.raises(ProviderError):
        await call_with_retries(flaky, policy=FAST, idempotent=True)
    assert flaky.calls == 4


@pytest.mark.anyio
async def test_non_idempotent_request_is_tried_once_after_an_ambiguous_failure() -> None:
    flaky = Flaky(ProviderError("connection cut mid-response"))
    with pytest.raises(ProviderError):
        await call_with_retries(flaky, policy=FAST, idempotent=False)
    assert flaky.calls == 1


@pytest.mark.anyio
async def test_retry_after_is_honoured() -> None:
    flaky = Flaky(RateLimitedError("429", retry_after=0.2))
    started = anyio.current_time()
    assert await call_with_retries(flaky, policy=FAST, idempotent=False) == "ok"
    assert anyio.current_time() - started >= 0.2
    assert flaky.calls == 2


@pytest.mark.anyio
async def test_no_retry_sleeps_past_the_deadline() -> None:
    flaky = Flaky(RateLimitedError("429", retry_after=30))
    started = anyio.current_time()
    with pytest.raises(RateLimitedError):
        await call_with_retries(flaky, policy=FAST, idempotent=True, deadline=Deadline.after(1))
    assert anyio.current_time() - started < 0.5
    assert flaky.calls == 1


def state(status: JobStatus) -> JobState:
    return JobState(id="j", provider="p", status=status, provider_status=status.value)


SCHEDULE = PollSchedule(first_s=0.001, max_interval_s=0.005, max_consecutive_errors=3)


@pytest.mark.anyio
async def test_polling_rides_out_transient_errors() -> None:
    answers: list[JobState | Exception] = [
        state(JobStatus.QUEUED),
        ProviderError("502"),
        RateLimitedError("429"),
        state(JobStatus.RUNNING),
        state(JobStatus.COMPLETED),
    ]

    async def look() -> JobState:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    done = await poll_until_terminal(
        look, deadline=Deadline.after(5), schedule=SCHEDULE, job_id="j", provider="p"
    )
    assert done.status is JobStatus.COMPLETED
    assert not answers


@pytest.mark.anyio
async def test_polling_gives_up_after_consecutive_errors_and_on_fatal_ones() -> None:
    calls = 0

    async def broken() -> JobState:
        nonlocal calls
        calls += 1
        raise ProviderError("500")

    with pytest.raises(ProviderError):
        await poll_until_terminal(
            broken, deadline=Deadline.after(5), schedule=SCHEDULE, job_id="j", provider="p"
        )
    assert calls == 3

    async def lost() -> JobState:
        raise JobLostError("404")

    with pytest.raises(JobLostError):
        await poll_until_terminal(
            lost, deadline=Deadline.after(5), schedule=SCHEDULE, job_id="j", provider="p"
        )


@pytest.mark.anyio
async def test_unknown_status_polling_ends_at_the_deadline() -> None:
    async def forever() -> JobState:
        return JobState(id="j", provider="p", status=JobStatus.RUNNING, provider_status="ABORTED?")

    started = anyio.current_time()
    with pytest.raises(JobTimeoutError) as info:
        await poll_until_terminal(
            forever, deadline=Deadline.after(0.2), schedule=SCHEDULE, job_id="j", provider="p"
        )
    assert 0.2 <= anyio.current_time() - started < 0.4
    assert info.value.job_id == "j"


@pytest.mark.anyio
async def test_a_hung_look_does_not_outlive_the_deadline() -> None:
    async def hung() -> JobState:
        await anyio.sleep(60)
        raise AssertionError

    started = anyio.current_time()
    with pytest.raises(JobTimeoutError):
        await poll_until_terminal(
            hung, deadline=Deadline.after(0.1), schedule=SCHEDULE, job_id="j", provider="p"
        )
    assert anyio.current_time() - started < 0.3


def test_schedule_backs_off_to_its_ceiling() -> None:
    intervals = PollSchedule(first_s=0.1, factor=2, max_interval_s=1, jitter=0).intervals()
    assert [next(intervals) for _ in range(6)] == [0.1, 0.2, 0.4, 0.8, 1, 1]
