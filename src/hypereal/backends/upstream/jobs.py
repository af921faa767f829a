"""The one submit -> poll -> fetch driver every job-style upstream runs through (fal.ai's
queue, Replicate predictions, a hosted Hypereal account's jobs), and its progress reports.

:func:`run_job` takes a small per-provider object (:class:`UpstreamJob`: ``submit``,
``status``, ``cancel``, ``result``) and applies one policy to all of them:

- the whole job (submit and polls) runs under ``asyncio.timeout(timeout)``;
- when the timeout passes, or our task is cancelled (a user's cancel, shutdown), the upstream
  job is cancelled too, so nothing keeps running (and billing) upstream; a cancel that
  arrives while the submission is in flight waits for it (up to ``submit_grace`` seconds) so
  the job it created can be cancelled;
- polls come every ``poll_interval`` seconds (a provider may end a wait early, e.g. on a
  webhook), each reported as monotonic progress;
- the result is fetched after the timed part, through the provider's guarded client.

A provider whose API has no cancel call sets ``cancellable = False``: its job is then left
running upstream when we stop waiting, and the timeout message says so.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

from hypereal.backends.base import BackendError, ProgressCallback
from hypereal.backends.upstream.http import UpstreamHttp, capitalized
from hypereal.backends.upstream.options import JobOptions

logger = logging.getLogger(__name__)

T = TypeVar("T")
H = TypeVar("H")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)

_TQDM_PERCENT = re.compile(r"(\d{1,3}(?:\.\d+)?)%\s*\|")
# Longest wait for an upstream cancel call: the caller is already unwinding.
CANCEL_TIMEOUT = 10.0


@dataclass(frozen=True)
class JobStatus:
    """Where an upstream job stands: ``queued`` (``position`` ahead when known), ``running``
    (tqdm-style ``logs`` refine the progress) or ``done`` (the result can be fetched). A job
    that failed upstream is reported by ``status`` raising BackendError."""

    state: Literal["queued", "running", "done"]
    position: int | None = None
    logs: str | None = None


class UpstreamJob(Protocol[H, R_co]):
    """One provider's protocol for one job, driven by :func:`run_job`."""

    @property
    def cancellable(self) -> bool:
        """Whether the provider's API can cancel a job."""
        ...

    @property
    def queued_on_submit(self) -> bool:
        """Whether an accepted job is reported as queued before its first status."""
        ...

    async def submit(self) -> H:
        """Start the job upstream; its handle."""
        ...

    async def status(self, handle: H) -> JobStatus:
        """Poll the job once. Raises BackendError when it failed upstream."""
        ...

    async def wait(self, handle: H, seconds: float) -> None:
        """Wait before the next poll (``seconds``, or less when told the job changed)."""
        ...

    async def cancel(self, handle: H) -> None:
        """Cancel the job upstream (only called when ``cancellable``)."""
        ...

    async def result(self, handle: H) -> R_co:
        """The finished job's result."""
        ...


async def run_job(
    job: UpstreamJob[H, R],
    *,
    provider: str,
    timeout: float,
    poll_interval: float,
    submit_grace: float,
    reporter: ProgressReporter | None = None,
) -> R:
    """Submit ``job``, poll it to ``done`` and return its result, per the module doc.

    ``reporter`` (none for a synchronous request) hears queued, running and fetching; the
    caller reports ``done`` once it holds the output. Raises BackendError when the provider
    refuses or fails the job, or ``timeout`` passes (then the upstream job is cancelled when
    ``job.cancellable``); re-raises CancelledError after cancelling the upstream job."""
    cancel = _quiet_cancel(provider, job.cancel) if job.cancellable else None
    try:
        async with asyncio.timeout(timeout):
            if cancel is not None:
                handle = await create_then_guard(job.submit(), cancel, grace=submit_grace)
            else:
                handle = await job.submit()
            try:
                if reporter and job.queued_on_submit:
                    await reporter.queued(None)
                while True:
                    status = await job.status(handle)
                    if status.state == "done":
                        break
                    if reporter and status.state == "queued":
                        await reporter.queued(status.position)
                    elif reporter:
                        await reporter.running(status.logs)
                    await job.wait(handle, poll_interval)
            except asyncio.CancelledError:
                if cancel is not None:
                    await cancel(handle)
                raise
    except TimeoutError:
        outcome = (
            "it was cancelled upstream"
            if cancel is not None
            else "it may still run upstream, which has no cancel call"
        )
        raise BackendError(
            f"{capitalized(provider)} job did not finish within {timeout:g} s; {outcome}"
        ) from None
    if reporter:
        await reporter.fetching()
    return await job.result(handle)


async def run_provider_job(
    job: UpstreamJob[H, R],
    http: UpstreamHttp,
    options: JobOptions,
    reporter: ProgressReporter | None,
    *,
    extra_grace: float = 0.0,
) -> R:
    """:func:`run_job` with a provider's job options, naming the provider as its HTTP client
    does; a submission may take one call's timeout plus ``extra_grace`` seconds."""
    return await run_job(
        job,
        provider=http.provider,
        timeout=options.timeout,
        poll_interval=options.poll_interval,
        submit_grace=http.options.request_timeout + extra_grace,
        reporter=reporter,
    )


def _quiet_cancel(
    provider: str, cancel: Callable[[H], Awaitable[None]]
) -> Callable[[H], Awaitable[None]]:
    async def quietly(handle: H) -> None:
        await cancel_quietly(provider, cancel(handle))

    return quietly


# ---------------------------------------------------------------------- cancellation


async def create_then_guard(
    create: Awaitable[T], cancel: Callable[[T], Awaitable[None]], *, grace: float
) -> T:
    """Await ``create`` (submitting a job upstream); if our task is cancelled meanwhile, let the
    submission finish (up to ``grace`` seconds) and cancel the job it created before re-raising,
    so a user's cancel never leaves a billed job running at the provider."""
    pending = asyncio.ensure_future(create)
    try:
        return await asyncio.shield(pending)
    except asyncio.CancelledError:
        try:
            created = await asyncio.wait_for(pending, grace)
        except Exception:  # the submission failed or is too slow: nothing we can cancel
            logger.warning(
                "Cancelled while submitting, and the submission did not complete within %g s; "
                "if it was accepted, the upstream job keeps running",
                grace,
            )
        else:
            await cancel(created)
        raise


async def cancel_quietly(provider: str, cancel: Awaitable[object]) -> None:
    """Run an upstream cancel call and log, rather than raise, its failure: the caller is
    already unwinding a cancellation or a failure that must not be masked."""
    try:
        await cancel
    except Exception as exc:
        logger.warning("Could not cancel the %s job: %s", provider, exc)


# -------------------------------------------------------------------------- progress


class ProgressReporter:
    """Turns provider states into monotonic ``progress`` calls, skipping repeats so a poll loop
    does not write the same progress row every second."""

    def __init__(self, progress: ProgressCallback) -> None:
        self._progress = progress
        self._last: tuple[float, str] | None = None
        self._fraction = 0.0

    async def queued(self, position: int | None) -> None:
        """The job waits upstream (``position`` ahead of it when known)."""
        where = f" (position {position})" if position is not None else ""
        await self._report(0.0, f"Queued upstream{where}")

    async def running(self, logs: str | None) -> None:
        """The job runs; a tqdm-style percentage in ``logs`` refines the fraction."""
        percent = percent_from_logs(logs or "")
        if percent is None:
            await self._report(0.05, "Generating")
        else:
            await self._report(0.05 + 0.9 * percent, f"Generating ({round(percent * 100)}%)")

    async def fetching(self) -> None:
        """The upstream finished; the output is being downloaded."""
        await self._report(0.95, "Fetching output")

    async def done(self) -> None:
        """The output is in hand."""
        await self._report(1.0, "Completed")

    async def _report(self, fraction: float, message: str) -> None:
        # Never go backwards: a model with two stages starts a second progress bar at 0%.
        self._fraction = max(self._fraction, min(fraction, 1.0))
        current = (self._fraction, message)
        if current != self._last:
            self._last = current
            await self._progress(*current)


def percent_from_logs(logs: str) -> float | None:
    """The last tqdm percentage (``" 45%|████ | 9/20"``) in ``logs`` as 0..1, if any."""
    matches = _TQDM_PERCENT.findall(logs)
    if not matches:
        return None
    return min(float(matches[-1]) / 100.0, 1.0)
