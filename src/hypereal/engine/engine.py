"""The job engine: puts job ids on the queue, runs them (when this process consumes), and
keeps the database and the queue in step.

A consuming process (``hypereal serve`` with the in-process broker, or ``hypereal worker``)
also runs the maintenance loop: re-queue jobs whose worker died (lease expired), fail those
out of attempts, re-send queued jobs whose message was lost, settle refunds an ender did
not note, and send due webhook deliveries. Every step is a conditional UPDATE, so any
number of processes may run it at once.

An embedded server (no broker) is the only worker of its jobs: at start it ends the leases
of the running jobs its predecessor left (``kill -9``, a crash), so they run again at once
instead of holding their model's slots until the leases run out (see
:meth:`Engine.take_back_predecessors_jobs`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from datetime import timedelta
from typing import Any

from taskiq import AsyncBroker

from hypereal.domain import job_maintenance as maintenance
from hypereal.domain import jobs
from hypereal.engine.broker import build_broker
from hypereal.engine.context import JobServices
from hypereal.engine.runner import JobRunner
from hypereal.engine.waiters import JobWaiters
from hypereal.store.models import utcnow
from hypereal.webhooks.delivery import WebhookSender

log = logging.getLogger("hypereal.engine")

RUN_JOB_TASK = "hypereal.run_job"
LOST_WORKER_ERROR = (
    "The worker running this job stopped responding (its lease expired) {attempts} time(s); "
    "giving up"
)


class Engine:
    """``consume=False``: only enqueue (an API process in front of ``hypereal worker``s).

    Without a broker URL the queue is a plain asyncio queue drained by
    ``worker_concurrency`` tasks of this process; with one, taskiq's Redis Streams broker.
    A message is ``(job id, model)``; the database says whether and where it runs."""

    def __init__(self, services: JobServices, *, consume: bool) -> None:
        self.services = services
        self.settings = services.settings
        self.consume = consume
        self.broker: AsyncBroker | None = None
        self.queue: asyncio.Queue[tuple[str, str]] | None = None
        if self.settings.broker_url:
            self.broker = build_broker(self.settings)

            async def run_job(job_id: str, model: str) -> None:  # taskiq renames it
                await self._run_job(job_id, model)

            self.task = self.broker.register_task(run_job, task_name=RUN_JOB_TASK)
        else:
            self.queue = asyncio.Queue()
        self.runner = JobRunner(services, self.job_ended)
        if self.queue is not None:  # every message of the queue is this engine's (see kick)
            self.runner.taken = OrderedDict()
        # Requests waiting for jobs to end (synchronous answers, Prefer: wait).
        self.waiters = JobWaiters()
        self.webhooks = WebhookSender(self.settings, services.db)
        self._background: set[asyncio.Task[Any]] = set()
        self._consumers: list[asyncio.Task[None]] = []
        self._maintainer: asyncio.Task[None] | None = None

    @property
    def worker_id(self) -> str:
        return self.runner.worker_id

    async def _run_job(self, job_id: str, model: str) -> None:
        try:
            await self.runner.run(job_id, model)
        except Exception:
            log.exception("job %s: the runner failed; the lease sweep will retry it", job_id)

    async def _consume(self, queue: asyncio.Queue[tuple[str, str]]) -> None:
        while True:
            job_id, model = await queue.get()
            await self._run_job(job_id, model)

    async def start(self) -> None:
        """Start the queue; a consumer also re-sends what an earlier run left behind."""
        if self.broker is not None:
            await self.broker.startup()
        if self.consume:
            if self.queue is not None:
                workers = max(1, self.settings.worker_concurrency)
                self._consumers = [
                    asyncio.create_task(self._consume(self.queue)) for _ in range(workers)
                ]
            await self.maintain(startup=True)
            self._maintainer = asyncio.create_task(self._maintain_forever())

    async def stop(self) -> None:
        """Give running jobs back to the queue, stop maintenance, shut the broker down."""
        if self._maintainer is not None:
            self._maintainer.cancel()
            with suppress(asyncio.CancelledError):
                await self._maintainer
        if self.consume:
            released = await self.runner.release_all()
            if self.broker is not None:  # a shared queue: another worker takes them now
                for job_id, model in released:
                    await self.kick(job_id, model)
        for task in [*self._consumers, *self._background]:
            task.cancel()
        pending = {*self._consumers, *self._background}
        if pending:
            await asyncio.wait(pending, timeout=5)
        if self.broker is not None:
            await self.broker.shutdown()
        await self.webhooks.aclose()

    async def kick(self, job_id: str, model: str) -> None:
        """Put a job on the queue (its row is already committed)."""
        if self.queue is not None:
            if self.runner.taken is not None:  # sent again: this message must run
                self.runner.taken.pop(job_id, None)
            self.queue.put_nowait((job_id, model))
        else:
            await self.task.kiq(job_id, model)

    async def job_ended(self, ended: jobs.Ended) -> None:
        """After a job ends: wake the requests waiting for it, send its webhook now, and
        start the job that takes its slot."""
        self.waiters.ended(ended.job)
        if ended.delivery_id is not None:
            self._spawn(self.webhooks.deliver(ended.delivery_id))
        if ended.next_job_id is not None:
            await self.kick(ended.next_job_id, ended.job.model)

    async def cancel(self, account_id: str, job_id: str) -> jobs.JobView:
        """Cancel and refund a caller's job; stops its work if it runs in this process (other
        workers stop at their next heartbeat)."""
        ended, job = await jobs.cancel_job(self.services.db, account_id, job_id)
        if ended is not None:
            self.runner.abort(job_id)
            await self.job_ended(ended)
        return job

    # ----------------------------------------------------------------- maintenance

    async def _maintain_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.engine_poll_seconds)
            try:
                await self.maintain()
            except Exception:
                log.exception("engine maintenance failed; retrying")

    async def maintain(self, *, startup: bool = False) -> None:
        """One maintenance pass (see the module doc). At start-up, every queued job is
        re-sent (an in-process queue does not outlive its process)."""
        db = self.services.db
        if startup and self.queue is not None:
            await self.take_back_predecessors_jobs()
        for job in await maintenance.expired_jobs(db):
            if job.attempts < self.settings.job_max_attempts:
                if await maintenance.requeue_expired(db, job):
                    log.warning(
                        "job %s: worker %s lost its lease; re-queued", job.id, job.worker_id
                    )
                    await self.kick(job.id, job.model)
                continue
            error = LOST_WORKER_ERROR.format(attempts=job.attempts)
            ended = await maintenance.fail_expired(db, job, error)
            if ended is not None:
                await self.job_ended(ended)
        stale = None if startup else utcnow() - timedelta(seconds=self.settings.job_lease_seconds)
        for job_id, model in await maintenance.jobs_to_resend(
            db, kicked_before=stale, slots=self.slots
        ):
            await self.kick(job_id, model)
        for job in await maintenance.unrefunded_jobs(db, older_than_seconds=30):
            await jobs.settle_refund(db, job)
        for delivery_id in await self.webhooks.due():
            self._spawn(self.webhooks.deliver(delivery_id))

    def slots(self, model: str) -> int:
        """A model's slot count; 1 for a model no longer in the catalogue (its job is sent,
        and the runner fails it)."""
        spec = self.services.catalogue.find(model)
        return 1 if spec is None else self.runner.concurrency(spec)

    async def take_back_predecessors_jobs(self) -> None:
        """Embedded (no broker), this server runs the jobs: a running job it finds at start was
        left by a process that died without handing it back. Its lease ends now, and the
        sweep re-runs it (or fails it, out of attempts). Only a job of a process still alive on
        this host (another embedded server on the same database) keeps its lease. Never
        called with a broker: there, other workers may be running, and leases are the rule."""
        for job in await maintenance.running_jobs(self.services.db):
            if job.worker_id == self.worker_id or worker_alive_here(job.worker_id):
                continue
            if await maintenance.end_lease(self.services.db, job):
                log.warning(
                    "job %s: its worker %s is gone (this server restarted); taking it back",
                    job.id,
                    job.worker_id,
                )

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def worker_alive_here(worker_id: str | None) -> bool:
    """Whether ``worker_id`` (``host:pid:tag``) is a live process of this host other than this
    one. A worker of this process id is an earlier run of it (a container restarted as pid
    1); one of another host cannot be checked (False)."""
    host, _, rest = (worker_id or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


@asynccontextmanager
async def engine_lifespan(services: JobServices) -> AsyncIterator[Engine]:
    """The app's engine: consuming in-process by default; enqueue-only when a broker URL
    is set (``hypereal worker`` processes run the jobs). The app keeps what it yields as
    ``app.state.engine``, which the job routes hand to the parts that need it."""
    engine = Engine(services, consume=not services.settings.broker_url)
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
