"""The shared submit -> poll -> fetch driver (``backends/upstream/jobs.py``) with in-memory
provider objects: one timeout and one upstream-cancel policy for every provider."""

from __future__ import annotations

import asyncio

import pytest

from hypereal.backends.base import BackendError
from hypereal.backends.upstream.jobs import JobStatus, ProgressReporter, run_job
from tests.support.observe import ProgressRecorder


class FakeJob:
    """A provider job: ``statuses`` answered in turn (the last one repeated)."""

    queued_on_submit = False

    def __init__(
        self,
        statuses: list[JobStatus],
        *,
        cancellable: bool = True,
        submit_delay: float = 0.0,
        fail_at: int | None = None,
    ) -> None:
        self.cancellable = cancellable
        self.statuses = statuses
        self.submit_delay = submit_delay
        self.fail_at = fail_at
        self.submitted = 0
        self.polls = 0
        self.cancelled: list[str] = []

    async def submit(self) -> str:
        await asyncio.sleep(self.submit_delay)
        self.submitted += 1
        return "job-1"

    async def status(self, handle: str) -> JobStatus:
        self.polls += 1
        if self.fail_at is not None and self.polls >= self.fail_at:
            raise BackendError("upstream job failed")
        return self.statuses[min(self.polls, len(self.statuses)) - 1]

    async def wait(self, handle: str, seconds: float) -> None:
        await asyncio.sleep(seconds)

    async def cancel(self, handle: str) -> None:
        self.cancelled.append(handle)

    async def result(self, handle: str) -> str:
        return f"result of {handle}"


RUNNING = JobStatus("running", logs=" 50%|#####     | 5/10")


async def run(
    job: FakeJob, *, timeout: float = 5.0, reporter: ProgressReporter | None = None
) -> str:
    return await run_job(
        job,
        provider="the test upstream",
        timeout=timeout,
        poll_interval=0.01,
        submit_grace=1.0,
        reporter=reporter,
    )


async def test_polls_to_done_reports_progress_and_returns_the_result() -> None:
    job = FakeJob([JobStatus("queued", position=2), RUNNING, JobStatus("done")])
    progress = ProgressRecorder()

    assert await run(job, reporter=ProgressReporter(progress)) == "result of job-1"

    assert progress.messages == [
        "Queued upstream (position 2)",
        "Generating (50%)",
        "Fetching output",
    ]
    assert job.cancelled == []


async def test_timeout_cancels_a_cancellable_job_upstream() -> None:
    job = FakeJob([RUNNING])

    with pytest.raises(BackendError) as caught:
        await run(job, timeout=0.1)

    assert caught.value.message == (
        "The test upstream job did not finish within 0.1 s; it was cancelled upstream"
    )
    assert not caught.value.client_error
    assert job.cancelled == ["job-1"]


async def test_timeout_of_a_job_without_cancel_call_says_it_may_still_run() -> None:
    job = FakeJob([RUNNING], cancellable=False)

    with pytest.raises(BackendError, match="may still run upstream"):
        await run(job, timeout=0.1)

    assert job.cancelled == []


async def test_cancelling_our_task_cancels_the_job_upstream() -> None:
    job = FakeJob([RUNNING])
    task = asyncio.create_task(run(job))
    while job.polls < 2:  # noqa: ASYNC110
        await asyncio.sleep(0.01)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert job.cancelled == ["job-1"]


async def test_a_cancel_during_submission_cancels_what_it_created() -> None:
    job = FakeJob([RUNNING], submit_delay=0.2)
    task = asyncio.create_task(run(job))
    await asyncio.sleep(0.05)

    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert job.submitted == 1 and job.polls == 0
    assert job.cancelled == ["job-1"]


async def test_a_job_failing_upstream_raises_without_a_cancel() -> None:
    job = FakeJob([RUNNING], fail_at=2)

    with pytest.raises(BackendError, match="upstream job failed"):
        await run(job)

    assert job.cancelled == []
