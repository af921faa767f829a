"""Generation jobs: async video/audio/3D jobs and recorded sync results (images).

States: ``queued -> processing -> completed | failed | canceled`` (and ``queued ->
canceled|failed``). Every transition is one conditional UPDATE, so whichever process gets
there first wins and every other one sees zero rows: a job is never run by two workers at
once, ends exactly once, and a failed or canceled job is refunded exactly once (the ledger's
unique ``refund_of`` backs that up). A job's webhook delivery row is written in the same
transaction as its terminal state, so the event cannot be lost.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any, Literal

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from hypereal.domain import ledger
from hypereal.domain.errors import BadRequest, Conflict, JobNotFound
from hypereal.domain.ids import as_utc, new_id
from hypereal.store.db import Database
from hypereal.store.models import Job, LedgerEntry, WebhookDelivery, utcnow

ACTIVE = ("queued", "processing")
TERMINAL = ("completed", "failed", "canceled")
WEBHOOK_STATES = ("completed", "failed")


@dataclass(frozen=True)
class JobView:
    id: str
    account_id: str
    type: str
    model: str
    state: str
    input: Mapping[str, Any]
    media: Mapping[str, str]
    webhook_url: str | None
    credits: int
    debit_entry_id: int | None
    refund_entry_id: int | None
    output_url: str | None
    result: Mapping[str, Any] | None
    error: str | None
    progress: float
    progress_message: str | None
    attempts: int
    worker_id: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None

    @property
    def status(self) -> str:
        """What the API reports: ``processing`` while queued or running (as the spec)."""
        return "processing" if self.state in ACTIVE else self.state

    @property
    def stage(self) -> str:
        """The finer state: ``queued`` | ``running`` | ``completed`` | ``failed`` | ``canceled``."""
        return "running" if self.state == "processing" else self.state

    @property
    def credits_used(self) -> int:
        """Credits the job costs in the end: failed and canceled jobs are refunded in full."""
        return 0 if self.state in ("failed", "canceled") else self.credits


def _view(row: Job) -> JobView:
    return JobView(
        id=row.id,
        account_id=row.account_id,
        type=row.type,
        model=row.model,
        state=row.state,
        input=row.input or {},
        media=row.media or {},
        webhook_url=row.webhook_url,
        credits=row.credits,
        debit_entry_id=row.debit_entry_id,
        refund_entry_id=row.refund_entry_id,
        output_url=row.output_url,
        result=row.result,
        error=row.error,
        progress=row.progress,
        progress_message=row.progress_message,
        attempts=row.attempts,
        worker_id=row.worker_id,
        created_at=as_utc(row.created_at),
        started_at=as_utc(row.started_at) if row.started_at else None,
        completed_at=as_utc(row.completed_at) if row.completed_at else None,
    )


def webhook_payload(job: JobView) -> dict[str, Any]:
    """The spec's webhook body for a finished job."""
    payload: dict[str, Any] = {
        "status": job.status,
        "outputUrl": job.output_url,
        "jobId": job.id,
        "type": job.type,
        "model": job.model,
        "creditsUsed": job.credits_used,
    }
    if job.error is not None:
        payload["error"] = job.error
    return payload


# ------------------------------------------------------------------------- submit


@dataclass(frozen=True)
class NewJob:
    account_id: str
    type: str  # video | audio | 3d
    model: str
    input: Mapping[str, Any]
    credits: int
    media: Mapping[str, str]  # field name -> media store key of the fetched input
    webhook_url: str | None = None


async def submit(db: Database, new: NewJob) -> JobView:
    """Debit the credits and create the queued job (the caller then puts it on the queue).

    Raises InsufficientCredits. The debit's reference is the job id; if the job row cannot be
    written, the debit is refunded before the error propagates.
    """
    job_id = new_id("job")
    entry = await ledger.debit(
        db,
        new.account_id,
        new.credits,
        reference=job_id,
        description=f"{new.type} generation ({new.model})",
    )
    now = utcnow()
    row = Job(
        id=job_id,
        account_id=new.account_id,
        type=new.type,
        model=new.model,
        state="queued",
        input=dict(new.input),
        media=dict(new.media),
        webhook_url=new.webhook_url,
        credits=new.credits,
        debit_entry_id=entry.id,
        progress=0.0,
        attempts=0,
        cancel_requested=False,
        created_at=now,
        kicked_at=now,
    )
    try:
        async with db.session.begin() as session:
            session.add(row)
    except BaseException:
        await ledger.refund(db, entry.id, description=f"refund: job {job_id} was not created")
        raise
    return _view(row)


async def record_completed(
    db: Database,
    *,
    job_id: str,
    account_id: str,
    type: str,
    model: str,
    input: Mapping[str, Any],
    credits: int,
    debit_entry_id: int | None,
    output_url: str | None,
    output_key: str | None = None,
    result: Mapping[str, Any] | None = None,
) -> JobView:
    """Record a finished synchronous generation (e.g. ``type='image'``, ``job_id`` = its
    ``resultId``) so ``GET /v1/jobs/{job_id}`` and ``GET /v1/jobs`` show it like a job.

    No queueing and no webhook: the row is written directly as ``completed``.
    """
    now = utcnow()
    row = Job(
        id=job_id,
        account_id=account_id,
        type=type,
        model=model,
        state="completed",
        input=dict(input),
        credits=credits,
        debit_entry_id=debit_entry_id,
        output_url=output_url,
        output_key=output_key,
        result=dict(result) if result is not None else None,
        progress=1.0,
        attempts=1,
        cancel_requested=False,
        created_at=now,
        started_at=now,
        completed_at=now,
    )
    async with db.session.begin() as session:
        session.add(row)
    return _view(row)


# ------------------------------------------------------------------------- reading


async def get_job(db: Database, account_id: str, job_id: str) -> JobView:
    """The caller's job. Raises JobNotFound for an unknown id or another account's job."""
    async with db.session() as session:
        row = await session.get(Job, job_id)
    if row is None or row.account_id != account_id:
        raise JobNotFound()
    return _view(row)


async def load_job(db: Database, job_id: str) -> JobView | None:
    async with db.session() as session:
        row = await session.get(Job, job_id)
    return _view(row) if row else None


async def list_jobs(
    db: Database,
    account_id: str,
    *,
    limit: int,
    before: str | None = None,
    type: str | None = None,
) -> list[JobView]:
    """The account's jobs, newest first; ``before`` is the last job id of the previous page
    (an unknown cursor raises BadRequest naming ``before``)."""
    query = select(Job).where(Job.account_id == account_id)
    if type is not None:
        query = query.where(Job.type == type)
    if before is not None:
        try:
            cursor = await get_job(db, account_id, before)
        except JobNotFound:
            raise BadRequest(
                "Invalid value for 'before': not a job of this account (use nextCursor)"
            ) from None
        query = query.where(
            (Job.created_at < cursor.created_at)
            | ((Job.created_at == cursor.created_at) & (Job.id < cursor.id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit)
    async with db.session() as session:
        return [_view(row) for row in (await session.scalars(query)).all()]


# ------------------------------------------------------------------------ running


@dataclass(frozen=True)
class ClaimOutcome:
    """``claimed`` (the job is ours, ``job`` set), ``busy`` (the model is at its concurrency
    limit; the job stays queued) or ``gone`` (not queued any more: ran, running, ended)."""

    outcome: Literal["claimed", "busy", "gone"]
    job: JobView | None = None


def _model_lock_key(model: str) -> int:
    return int.from_bytes(hashlib.sha256(model.encode()).digest()[:8], "big", signed=True)


def running_count(model: str, now: datetime) -> Any:
    """Jobs of ``model`` running under a live lease (a dead worker's job frees its slot)."""
    return (
        select(func.count())
        .select_from(Job)
        .where(Job.model == model, Job.state == "processing", Job.lease_until >= now)
        .scalar_subquery()
    )


async def claim_job(
    db: Database, job_id: str, worker_id: str, *, concurrency: int, lease_seconds: float
) -> ClaimOutcome:
    """Take a queued job for ``worker_id`` if its model has a free slot.

    One conditional UPDATE (``state = 'queued'`` and fewer than ``concurrency`` running), so a
    redelivered message or a second worker gets ``gone``. On PostgreSQL a per-model advisory
    lock makes the slot count exact across concurrent claims; SQLite serialises writers.
    """
    async with db.session() as session:
        model = await session.scalar(select(Job.model).where(Job.id == job_id))
    if model is None:
        return ClaimOutcome("gone")
    now = utcnow()
    async with db.session.begin() as session:
        if not db.is_sqlite:
            await session.execute(select(func.pg_advisory_xact_lock(_model_lock_key(model))))
        row = await session.scalar(
            update(Job)
            .where(
                Job.id == job_id,
                Job.state == "queued",
                running_count(model, now) < max(1, concurrency),
            )
            .values(
                state="processing",
                worker_id=worker_id,
                lease_until=now + timedelta(seconds=lease_seconds),
                attempts=Job.attempts + 1,
                started_at=func.coalesce(Job.started_at, now),
                progress=0.0,
                progress_message=None,
            )
            .returning(Job)
        )
        if row is not None:
            return ClaimOutcome("claimed", _view(row))
        state = await session.scalar(select(Job.state).where(Job.id == job_id))
    return ClaimOutcome("busy" if state == "queued" else "gone")


async def heartbeat(
    db: Database,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    *,
    progress: tuple[float, str] | None = None,
) -> bool:
    """Extend the lease (and record progress). False when the job is no longer this
    worker's: canceled, or re-queued after the lease ran out; the worker must stop."""
    values: dict[str, Any] = {"lease_until": utcnow() + timedelta(seconds=lease_seconds)}
    if progress is not None:
        values.update(progress=min(1.0, max(0.0, progress[0])), progress_message=progress[1][:300])
    async with db.session.begin() as session:
        found = await session.scalar(
            update(Job)
            .where(Job.id == job_id, Job.state == "processing", Job.worker_id == worker_id)
            .values(**values)
            .returning(Job.id)
        )
    return found is not None


async def release_job(db: Database, job_id: str, worker_id: str) -> bool:
    """Give a running job back to the queue (worker shutting down); the interrupted run
    does not count as an attempt. False when it was not this worker's any more."""
    async with db.session.begin() as session:
        found = await session.scalar(
            update(Job)
            .where(Job.id == job_id, Job.state == "processing", Job.worker_id == worker_id)
            .values(
                state="queued",
                worker_id=None,
                lease_until=None,
                attempts=func.max(Job.attempts - 1, 0)
                if db.is_sqlite
                else func.greatest(Job.attempts - 1, 0),
            )
            .returning(Job.id)
        )
    return found is not None


# ------------------------------------------------------------------------- ending


@dataclass(frozen=True)
class Ended:
    """A job that this call moved to a terminal state, and its webhook delivery, if any."""

    job: JobView
    delivery_id: str | None


async def _end(db: Database, conditions: list[Any], values: dict[str, Any]) -> Ended | None:
    now = utcnow()
    async with db.session.begin() as session:
        row = await session.scalar(
            update(Job)
            .where(*conditions)
            .values(completed_at=now, lease_until=None, **values)
            .returning(Job)
        )
        if row is None:
            return None
        job = _view(row)
        if job.state in ("failed", "canceled") and job.debit_entry_id is not None:
            # The refund commits with the job's end: a failed or canceled job is never seen
            # unrefunded, and a crash in between cannot lose the refund.
            entry = await ledger.refund_in(
                session,
                job.debit_entry_id,
                description=f"refund: {job.type} job {job.id} {job.state}",
            )
            if entry is not None:
                await session.execute(
                    update(Job).where(Job.id == job.id).values(refund_entry_id=entry.id)
                )
                job = replace(job, refund_entry_id=entry.id)
        delivery_id = _add_delivery(session, job, now)
    return Ended(job, delivery_id)


def _add_delivery(session: AsyncSession, job: JobView, now: datetime) -> str | None:
    if not job.webhook_url or job.state not in WEBHOOK_STATES:
        return None
    delivery = WebhookDelivery(
        id=new_id("msg"),
        job_id=job.id,
        account_id=job.account_id,
        url=job.webhook_url,
        event=f"job.{job.state}",
        payload=webhook_payload(job),
        state="pending",
        attempts=0,
        next_attempt_at=now,
        created_at=now,
    )
    session.add(delivery)
    return delivery.id


async def complete_job(
    db: Database,
    job_id: str,
    worker_id: str,
    *,
    output_url: str,
    output_key: str,
    result: Mapping[str, Any] | None,
) -> Ended | None:
    """Mark this worker's running job completed. None when it is not ours any more
    (canceled meanwhile, or re-queued): the output is then discarded."""
    return await _end(
        db,
        [Job.id == job_id, Job.state == "processing", Job.worker_id == worker_id],
        {
            "state": "completed",
            "output_url": output_url,
            "output_key": output_key,
            "result": dict(result) if result is not None else None,
            "progress": 1.0,
            "error": None,
        },
    )


async def fail_job(
    db: Database, job_id: str, error: str, *, worker_id: str | None = None
) -> Ended | None:
    """Fail an active job (this worker's, when ``worker_id`` is given) and refund it."""
    conditions = [Job.id == job_id, Job.state.in_(ACTIVE)]
    if worker_id is not None:
        conditions += [Job.state == "processing", Job.worker_id == worker_id]
    return await _end(db, conditions, {"state": "failed", "error": error})


async def cancel_job(db: Database, account_id: str, job_id: str) -> tuple[JobView, bool]:
    """Cancel the caller's queued or running job and refund it; a running worker notices at
    its next heartbeat and stops. Returns (job, whether this call canceled it); canceling a
    canceled job again is a no-op. Raises JobNotFound, or Conflict for a finished job."""
    ended = await _end(
        db,
        [Job.id == job_id, Job.account_id == account_id, Job.state.in_(ACTIVE)],
        {"state": "canceled", "error": "Canceled by the user", "cancel_requested": True},
    )
    if ended is not None:
        return ended.job, True
    job = await get_job(db, account_id, job_id)
    if job.state == "canceled":
        return job, False
    raise Conflict(f"Job is already {job.state} and cannot be canceled")


async def settle_refund(db: Database, job: JobView) -> JobView:
    """Refund a failed or canceled job's debit (once, whoever calls) and note it on the job."""
    if job.debit_entry_id is None or job.refund_entry_id is not None:
        return job
    entry = await ledger.refund(
        db, job.debit_entry_id, description=f"refund: {job.type} job {job.id} {job.state}"
    )
    refund_id: int | None
    if entry is not None:
        refund_id = entry.id
    else:  # refunded already (by a racing caller), or a free job
        async with db.session() as session:
            refund_id = await session.scalar(
                select(LedgerEntry.id).where(LedgerEntry.refund_of == job.debit_entry_id)
            )
    if refund_id is None:
        return job
    async with db.session.begin() as session:
        await session.execute(update(Job).where(Job.id == job.id).values(refund_entry_id=refund_id))
    return replace(job, refund_entry_id=refund_id)


# --------------------------------------------------------------------- maintenance


async def expired_jobs(db: Database, limit: int = 100) -> list[JobView]:
    """Running jobs whose lease ran out: their worker died or hangs."""
    async with db.session() as session:
        rows = await session.scalars(
            select(Job)
            .where(Job.state == "processing", Job.lease_until < utcnow())
            .order_by(Job.lease_until)
            .limit(limit)
        )
        return [_view(row) for row in rows.all()]


async def requeue_expired(db: Database, job: JobView) -> bool:
    """Put an expired job back in the queue (if nobody else did). True when this call did."""
    async with db.session.begin() as session:
        found = await session.scalar(
            update(Job)
            .where(
                Job.id == job.id,
                Job.state == "processing",
                Job.worker_id == job.worker_id,
                Job.lease_until < utcnow(),
            )
            .values(state="queued", worker_id=None, lease_until=None)
            .returning(Job.id)
        )
    return found is not None


async def fail_expired(db: Database, job: JobView, error: str) -> Ended | None:
    return await _end(
        db,
        [
            Job.id == job.id,
            Job.state == "processing",
            Job.worker_id == job.worker_id,
            Job.lease_until < utcnow(),
        ],
        {"state": "failed", "error": error},
    )


async def jobs_to_kick(
    db: Database,
    model_limits: Mapping[str, int],
    *,
    kicked_before: datetime | None,
    model: str | None = None,
) -> list[str]:
    """Oldest queued jobs per model (or of ``model``), as many as the model has free slots
    (``model_limits``, default 1), that were last put on the queue before ``kicked_before``
    (None: regardless). Marks them kicked now."""
    now = utcnow()
    if model is not None:
        models: Sequence[str] = [model]
    else:
        async with db.session() as session:
            query = select(Job.model).where(Job.state == "queued").distinct()
            models = (await session.scalars(query)).all()
    chosen: list[str] = []
    for slug in models:
        async with db.session() as session:
            running = int(await session.scalar(select(running_count(slug, now))) or 0)
            free = model_limits.get(slug, 1) - running
            if free <= 0:
                continue
            query = select(Job.id).where(Job.model == slug, Job.state == "queued")
            if kicked_before is not None:
                query = query.where((Job.kicked_at.is_(None)) | (Job.kicked_at < kicked_before))
            ids = (await session.scalars(query.order_by(Job.created_at).limit(free))).all()
        chosen.extend(ids)
    if chosen:
        await mark_kicked(db, chosen)
    return chosen


async def mark_kicked(db: Database, job_ids: list[str]) -> None:
    async with db.session.begin() as session:
        await session.execute(update(Job).where(Job.id.in_(job_ids)).values(kicked_at=utcnow()))


async def unrefunded_jobs(db: Database, older_than_seconds: float) -> list[JobView]:
    """Failed/canceled jobs whose refund was not noted (the ender crashed in between)."""
    cutoff = utcnow() - timedelta(seconds=older_than_seconds)
    async with db.session() as session:
        rows = await session.scalars(
            select(Job)
            .where(
                Job.state.in_(("failed", "canceled")),
                Job.debit_entry_id.is_not(None),
                Job.refund_entry_id.is_(None),
                Job.credits > 0,
                Job.completed_at < cutoff,
            )
            .limit(100)
        )
        return [_view(row) for row in rows.all()]
