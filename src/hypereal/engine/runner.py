"""Runs one claimed job: fetch its stored inputs, call the backend under the model's timeout
while renewing the lease, store the output, and end the job.

The generation runs as a child task watched by a heartbeat loop. The heartbeat both renews
the lease and tells the worker when the job is no longer its own (canceled by the user,
re-queued after a lost lease); the work is then cancelled and its output discarded.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass, replace

from hypereal.backends.base import JobRequest, JobResult, MediaBlob
from hypereal.domain import jobs
from hypereal.domain.catalogue import ModelSpec
from hypereal.domain.generation import client_error
from hypereal.domain.ids import new_id
from hypereal.engine.context import JobServices
from hypereal.observability import metrics
from hypereal.observability.logs import LOG_CONTEXT

log = logging.getLogger("hypereal.engine")

MODALITY_METHODS = {"video": "generate_video", "audio": "generate_audio", "3d": "generate_mesh"}
MEDIA_KINDS = {"video": "video", "audio": "audio", "3d": "model"}
PROGRESS_MIN_INTERVAL = 1.0
# Jobs taken by an end whose queue message may still come (see JobRunner.taken): remembered
# up to this many (a message that never comes, e.g. lost with a restart, leaves its id here).
TAKEN_MEMORY = 100_000

JobEnded = Callable[[jobs.Ended], Awaitable[None]]


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{new_id('w')[2:8]}"


@dataclass(frozen=True)
class _Output:
    url: str
    key: str
    result: JobResult


class JobRunner:
    """Claims and runs jobs for one process; ``on_end`` is told about every job it ends."""

    def __init__(
        self, services: JobServices, on_end: JobEnded, worker_id: str | None = None
    ) -> None:
        self.services = services
        self.settings = services.settings
        self.pipeline = services.pipeline
        self.on_end = on_end
        self.worker_id = worker_id or new_worker_id()
        self.lease = self.settings.job_lease_seconds
        self.heartbeat_every = max(0.1, min(self.lease / 4, 2.0))
        self.work: dict[str, asyncio.Task[_Output]] = {}
        self.releasing = False
        self.released: list[tuple[str, str]] = []
        # Progress reported since the last write, per running job (written at most once a
        # PROGRESS_MIN_INTERVAL, with the lease).
        self.progress: dict[str, tuple[float, str]] = {}
        self._limits: dict[str, int] = {}
        # Set by an engine whose queue only this process fills (in-process): the ids of the
        # jobs this runner took at an end (``Ended.taken``) while their queue message was
        # still waiting. That message is then dropped with no claim; the engine forgets an id
        # when it sends the job again (a re-queue), whose message must run.
        self.taken: OrderedDict[str, None] | None = None
        self._executing = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def concurrency(self, spec: ModelSpec) -> int:
        """The model's slot count (configuration: looked up once per model)."""
        limit = self._limits.get(spec.slug)
        if limit is None:
            limit = self._limits[spec.slug] = self.services.backends.concurrency(spec)
        return limit

    async def run(self, job_id: str, model: str) -> None:
        """Run ``job_id`` (a job of ``model``) if it is queued and its model has a free slot;
        otherwise do nothing (a busy model's job waits queued: the next of its jobs to end
        takes it). Each job this run ends claims the model's oldest queued job in its end's
        transaction, and this run goes on with it in the slot it freed."""
        if self.releasing:
            return
        if self.taken is not None and job_id in self.taken:
            del self.taken[job_id]  # its message, after an end took it: nothing to claim
            return
        db = self.services.db
        spec = self.services.catalogue.find(model)
        if spec is None:
            await self._end(await jobs.fail_job(db, job_id, f"Model {model} was removed"))
            return
        job: jobs.JobView | None = await jobs.claim_job(
            db,
            job_id,
            model,
            self.worker_id,
            concurrency=self.concurrency(spec),
            lease_seconds=self.lease,
        )
        if job is None:
            return
        self._executing += 1
        self._idle.clear()
        try:
            while job is not None:
                if self.releasing:  # taken while this process began to shut down
                    await self._release(job)
                    break
                job = await self._execute(job, spec)
                if job is not None and self.taken is not None:
                    self.taken[job.id] = None
                    if len(self.taken) > TAKEN_MEMORY:
                        self.taken.popitem(last=False)
        finally:
            self._executing -= 1
            if self._executing == 0:
                self._idle.set()

    def abort(self, job_id: str) -> None:
        """Stop this process's work on a job that was just canceled (no wait for a heartbeat)."""
        work = self.work.get(job_id)
        if work is not None:
            work.cancel()

    async def release_all(self) -> list[tuple[str, str]]:
        """Shutting down: stop every running job and give it back to the queue; returns the
        (id, model) of each given back (to be re-sent for another worker)."""
        self.releasing = True
        for work in list(self.work.values()):
            work.cancel()
        with suppress(TimeoutError):  # let the executions record the releases
            await asyncio.wait_for(self._idle.wait(), timeout=15)
        return list(self.released)

    def _taker(self, spec: ModelSpec) -> jobs.Taker | None:
        """What an end of this worker's job passes to take the model's oldest queued job
        (nothing while shutting down)."""
        if self.releasing:
            return None
        return jobs.Taker(self.worker_id, self.lease, self.concurrency(spec))

    async def _execute(self, job: jobs.JobView, spec: ModelSpec) -> jobs.JobView | None:
        """Run a claimed job to its end; returns the job its end took (see ``run``)."""
        db = self.services.db
        LOG_CONTEXT.set({"job_id": job.id, "model": job.model})
        started = time.perf_counter()
        work = asyncio.create_task(self._generate(job, spec))
        self.work[job.id] = work
        try:
            outcome = await self._watch(job, spec, work)
        except asyncio.CancelledError:
            work.cancel()
            await asyncio.shield(self._release(job))
            raise
        finally:
            self.work.pop(job.id, None)
            self.progress.pop(job.id, None)
        ran = time.perf_counter() - started
        if outcome == "lost":
            log.info("job %s is no longer ours (canceled or re-queued); stopped", job.id)
            return None
        if outcome == "timeout":
            error: str | None = client_error(
                TimeoutError(), timeout_seconds=spec.timeout_seconds
            ).message
        elif work.cancelled():
            if self.releasing:
                await self._release(job)
            return None
        elif (exc := work.exception()) is not None:
            error = failure_message(exc)
        else:
            error = None
        metrics.observe_job(job.model, "completed" if error is None else "failed", ran)
        if error is not None:
            ended = await jobs.fail_job(
                db, job.id, error, worker_id=self.worker_id, take_next=self._taker(spec)
            )
        else:
            output = work.result()
            ended = await jobs.complete_job(
                db,
                job.id,
                self.worker_id,
                output_url=output.url,
                output_key=output.key,
                result=output.result.data,
                credits=output.result.credits,
                take_next=self._taker(spec),
            )
        await self._end(ended)
        return ended.taken if ended is not None else None

    async def _release(self, job: jobs.JobView) -> None:
        if await jobs.release_job(self.services.db, job.id, self.worker_id):
            self.released.append((job.id, job.model))

    async def _watch(self, job: jobs.JobView, spec: ModelSpec, work: asyncio.Task[_Output]) -> str:
        """Heartbeat until the work finishes; 'done', 'timeout' or 'lost' (not ours).

        The lease is renewed every ``heartbeat_every``; progress the job reported is written
        with it, or on its own at most once a PROGRESS_MIN_INTERVAL (a job that ends within
        a second writes none: its end sets progress 1)."""
        now = time.monotonic()
        deadline = now + spec.timeout_seconds
        renew_at = now + self.heartbeat_every
        while True:
            now = time.monotonic()
            remaining = deadline - now
            if remaining <= 0:
                work.cancel()
                await asyncio.wait({work})
                return "timeout"
            wait = min(PROGRESS_MIN_INTERVAL, renew_at - now, remaining)
            await asyncio.wait({work}, timeout=max(0.0, wait))
            if work.done():
                return "done"
            progress = self.progress.pop(job.id, None)
            if progress is None and time.monotonic() < renew_at:
                continue
            renew_at = time.monotonic() + self.heartbeat_every
            if not await jobs.heartbeat(
                self.services.db, job.id, self.worker_id, self.lease, progress=progress
            ):
                work.cancel()
                await asyncio.wait({work})
                return "lost"

    async def _generate(self, job: jobs.JobView, spec: ModelSpec) -> _Output:
        resolved = self.pipeline.resolve(spec)
        method = getattr(resolved.backend, MODALITY_METHODS[job.type])
        media_fields = {field.split("[")[0] for field in job.media}
        request = JobRequest(
            job_id=job.id,
            input={k: v for k, v in job.input.items() if k not in media_fields},
            media=await self._inputs(job),
            upstream_model=resolved.upstream_model,
            upstream_bill={} if spec.pass_through is not None else None,
        )
        result: JobResult = await method(request, self._progress_callback(job))
        if spec.pass_through is not None:  # settled with the job's end: the bill x markup
            used = spec.pass_through.charge((request.upstream_bill or {}).get("credits_used"))
            result = replace(result, credits=min(used, job.credits))
        stored = await self.pipeline.store(result.output, MEDIA_KINDS.get(job.type, job.type))
        return _Output(stored.url, stored.key, result)

    async def _inputs(self, job: jobs.JobView) -> dict[str, MediaBlob]:
        return {field: await self.pipeline.load(key, field) for field, key in job.media.items()}

    def _progress_callback(self, job: jobs.JobView) -> Callable[[float, str], Awaitable[None]]:
        async def progress(fraction: float, message: str) -> None:
            # Kept until the watch loop writes it (coalesced: see _watch).
            self.progress[job.id] = (float(fraction), str(message))

        return progress

    async def _end(self, ended: jobs.Ended | None) -> None:
        if ended is not None:
            await self.on_end(ended)


def failure_message(exc: BaseException) -> str:
    """The ``error`` a client sees for a failed generation."""
    return client_error(exc).message
