"""Waiting for a job to end, cheaply: synchronous answers and ``Prefer: wait=N``.

A request that waits registers a future under the job's id; the engine resolves it when it
ends the job in this process (:meth:`JobWaiters.ended`, called from ``Engine.job_ended``).
A job ended by another process (``hypereal worker`` behind a Redis broker) is seen by a slow
re-read of its row, once every ``recheck_seconds``: no tight polling of the database.
"""

from __future__ import annotations

import asyncio
from contextlib import suppress

from hypereal.domain import jobs
from hypereal.store.db import Database

RECHECK_SECONDS = 1.0


class JobWaiters:
    """Futures of requests waiting for jobs, by job id."""

    def __init__(self, recheck_seconds: float = RECHECK_SECONDS) -> None:
        self.recheck_seconds = recheck_seconds
        self._waiting: dict[str, set[asyncio.Future[jobs.JobView]]] = {}

    def ended(self, job: jobs.JobView) -> None:
        """The job reached a terminal state here: wake everyone waiting for it."""
        for future in self._waiting.pop(job.id, set()):
            if not future.done():
                future.set_result(job)

    @property
    def waiting(self) -> int:
        """Requests waiting now (for tests and metrics)."""
        return sum(len(futures) for futures in self._waiting.values())

    async def wait(self, db: Database, job: jobs.JobView, timeout: float) -> jobs.JobView:
        """The job once it has ended, or as it stands after ``timeout`` seconds."""
        if job.state in jobs.TERMINAL or timeout <= 0:
            return job
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        future: asyncio.Future[jobs.JobView] = loop.create_future()
        self._waiting.setdefault(job.id, set()).add(future)
        try:
            while True:
                # Registered before reading: an end between the read and the wait is not lost.
                current = await jobs.load_job(db, job.id)
                if current is None:
                    return job
                if current.state in jobs.TERMINAL:
                    return current
                remaining = deadline - loop.time()
                if remaining <= 0:
                    return current
                with suppress(TimeoutError):
                    return await asyncio.wait_for(
                        asyncio.shield(future), min(remaining, self.recheck_seconds)
                    )
        finally:
            futures = self._waiting.get(job.id)
            if futures is not None:
                futures.discard(future)
                if not futures:
                    del self._waiting[job.id]
            future.cancel()
