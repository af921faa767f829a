"""Generation jobs: async video/audio/3D jobs and recorded sync results (images).

States: ``queued -> processing -> completed | failed | canceled`` (and ``queued ->
canceled|failed``). Every transition is one conditional UPDATE, so whichever process gets
there first wins and every other one sees zero rows: a job is never run by two workers at
once, ends exactly once, and a failed or canceled job is refunded exactly once (the ledger's
unique ``refund_of`` backs that up). A job's webhook delivery row is written in the same
transaction as its terminal state, so the event cannot be lost.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select

from hypereal.domain import ledger
from hypereal.domain.errors import BadRequest, Conflict, JobNotFound
from hypereal.domain.ids import new_id
from hypereal.domain.job_view import ACTIVE as ACTIVE
from hypereal.domain.job_view import TERMINAL as TERMINAL
from hypereal.domain.job_view import WEBHOOK_STATES as WEBHOOK_STATES
from hypereal.domain.job_view import JobView as JobView
from hypereal.domain.job_view import _orm_view, _view
from hypereal.domain.job_view import webhook_payload as webhook_payload
from hypereal.observability.logs import annotate
from hypereal.store.db import Database
from hypereal.store.models import Job, utcnow
from hypereal.store.writer import Dialect, Ops, Sql, as_datetime, to_json

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
    # The model's slot count: given, a job whose model has no free slot as it is inserted is
    # not sent to the queue (Submitted.send False); the next of its model's jobs to end takes
    # it. None: always sent.
    slots: int | None = None


@dataclass(frozen=True)
class Submitted:
    """A submitted job, and whether to put it on the queue now (see ``NewJob.slots``)."""

    job: JobView
    send: bool


_JOB_COLUMNS = (
    "INSERT INTO jobs (id, account_id, type, model, state, input, webhook_url, credits, "
    "debit_entry_id, output_url, output_key, result, error, progress, progress_message, "
    "attempts, worker_id, lease_until, cancel_requested, created_at, started_at, completed_at, "
    "media, kicked_at, refund_entry_id)"
)
_JOB_VALUES = (
    ":id, :account, :type, :model, :state, :input, "
    ":webhook_url, :credits, :debit, :output_url, :output_key, :result, NULL, :progress, NULL, "
    ":attempts, NULL, NULL, :false, :now, :started_at, :completed_at, :media, :kicked_at, NULL"
)
_INSERT_JOB = f"{_JOB_COLUMNS} VALUES ({_JOB_VALUES}) RETURNING *"
# PostgreSQL: a job's submission in one statement (a Sql.last): the debit, its ledger row and
# the job row, whose debit_entry_id is the new entry's; one row every time, the job's, or
# NULLs when the balance could not cover it. The debit's parameters are ledger.PG_DEBITED's.
_PG_SUBMIT = (
    f"{ledger.PG_DEBITED}, job AS ({_JOB_COLUMNS} "
    f"SELECT {_JOB_VALUES.replace(':debit', 'entry.id')} FROM entry RETURNING *) "
    "SELECT job.* FROM (SELECT 1) AS one LEFT JOIN job ON true"
)


def _insert_job(
    *,
    pg_submit: dict[str, Any] | None = None,
    job_id: str,
    account_id: str,
    type: str,
    model: str,
    state: str,
    input: Mapping[str, Any],
    credits: int,
    debit_entry_id: int | None,
    media: Mapping[str, str] | None = None,
    webhook_url: str | None = None,
    output_url: str | None = None,
    output_key: str | None = None,
    result: Mapping[str, Any] | None = None,
    slots: int | None = None,
) -> Ops[Submitted]:
    now = utcnow()
    finished = state == "completed"
    sql = _INSERT_JOB if pg_submit is None else _PG_SUBMIT
    if slots is not None:
        sql = _sent_if_free(sql)
    row = yield Sql(  # the last write of every operation that inserts a job
        sql,
        dict(
            **(pg_submit or {}),
            id=job_id,
            account=account_id,
            type=type,
            model=model,
            state=state,
            input=to_json(dict(input)),
            webhook_url=webhook_url,
            credits=credits,
            debit=debit_entry_id,
            output_url=output_url,
            output_key=output_key,
            result=to_json(dict(result)) if result is not None else None,
            progress=1.0 if finished else 0.0,
            attempts=1 if finished else 0,
            false=False,
            now=now,
            started_at=now if finished else None,
            completed_at=now if finished else None,
            media=to_json(dict(media)) if media is not None else None,
            kicked_at=None if finished else now,
            **({} if slots is None else {"slots": max(1, slots), "counted_model": model}),
        ),
        "one",
        True,
    )
    if row["id"] is None:  # _PG_SUBMIT's debit was refused: nothing was written
        assert pg_submit is not None
        yield from ledger.refused_op(account_id, pg_submit["amount"])
    return Submitted(_view(row), row["kicked_at"] is not None)


@functools.cache
def _sent_if_free(insert: str) -> str:
    """``insert`` with the job marked as sent only when its model has a free slot
    (``NewJob.slots``). The count's model is a parameter of its own: PostgreSQL deduces one
    type per parameter, and the job's model column is varchar(100)."""
    running = _RUNNING.replace(":model", ":counted_model")
    return insert.replace(":kicked_at", f"CASE WHEN {running} < :slots THEN :now END")


def _debit_description(new: NewJob) -> str:
    return f"{new.type} generation ({new.model})"


def _submit_op(d: Dialect, job_id: str, new: NewJob, by: ledger.Spender) -> Ops[Submitted]:
    pg_submit: dict[str, Any] | None = None
    debit_entry_id: int | None = None
    if d.pg and not by.budgeted:  # the debit and the job row in one statement
        pg_submit = dict(
            amount=new.credits,
            reference=job_id,
            description=_debit_description(new),
            created_at=utcnow(),
            key_id=by.key_id,
        )
    else:
        entry = yield from ledger.debit_op(
            d, new.account_id, new.credits, job_id, _debit_description(new), by
        )
        debit_entry_id = entry.id
    return (
        yield from _insert_job(
            pg_submit=pg_submit,
            job_id=job_id,
            account_id=new.account_id,
            type=new.type,
            model=new.model,
            state="queued",
            input=new.input,
            credits=new.credits,
            debit_entry_id=debit_entry_id,
            media=new.media,
            webhook_url=new.webhook_url,
            slots=new.slots,
        )
    )


async def submit(db: Database, new: NewJob) -> Submitted:
    """Debit the credits and create the queued job in one transaction (the caller then puts
    it on the queue, when ``send``). Raises InsufficientCredits (or, for the calling key,
    ModelNotAllowed or KeyBudgetExceeded), and then nothing is written.

    With ``new.slots``, a job whose model has no free slot is left unsent: on PostgreSQL the
    count is not under the model's lock, so an end racing the insert may miss it, and the
    lease sweep sends it within a poll interval (a queued job never sent is due at once
    when its model has a free slot)."""
    by = ledger.spender(new.account_id, new.model)
    job_id = new_id("job")
    annotate(job_id=job_id)
    return await db.write(_submit_op, job_id, new, by)


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

    def record(_: Dialect) -> Ops[Submitted]:
        return _insert_job(
            job_id=job_id,
            account_id=account_id,
            type=type,
            model=model,
            state="completed",
            input=input,
            credits=credits,
            debit_entry_id=debit_entry_id,
            output_url=output_url,
            output_key=output_key,
            result=result,
        )

    return (await db.write(record)).job


# ------------------------------------------------------------------------- reading


def _load_op(_: Dialect, job_id: str) -> Ops[JobView | None]:
    row = yield Sql.one("SELECT * FROM jobs WHERE id = :id", id=job_id)
    return _view(row) if row is not None else None


async def get_job(db: Database, account_id: str, job_id: str) -> JobView:
    """The caller's job. Raises JobNotFound for an unknown id or another account's job."""
    job = await db.read(_load_op, job_id)
    if job is None or job.account_id != account_id:
        raise JobNotFound()
    return job


async def load_job(db: Database, job_id: str) -> JobView | None:
    return await db.read(_load_op, job_id)


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
        return [_orm_view(row) for row in (await session.scalars(query)).all()]


# ------------------------------------------------------------------------ running


def _model_lock_key(model: str) -> int:
    return int.from_bytes(hashlib.sha256(model.encode()).digest()[:8], "big", signed=True)


def _lock_model(d: Dialect, model: str) -> Ops[None]:
    """PostgreSQL: serialise the writes that count one model's slots (claims, an end whose
    lease lapsed, re-sends; held to commit; a batch takes it after its other statements, see
    ``Sql.lock``). A hand-over of a live slot needs none (see :func:`_end_op`). SQLite's
    writers are serial already."""
    if d.pg:
        yield Sql.lock("SELECT pg_advisory_xact_lock(:key)", key=_model_lock_key(model))


# ``id = :id AND state || '' = 'queued'``: the primary key finds the row and the state is only
# a filter. With ``state = 'queued'`` PostgreSQL could read ix_jobs_state_lease instead: a
# plan made while the table looked empty rated both indexes alike, and the cached plan then
# walked every (dead) queued or running version of every job on each claim and finish (2,000
# index entries per statement after a few thousand jobs; with 4 workers, PostgreSQL used more
# CPU than any of our processes). ``model || ''`` likewise keeps a claim off
# ix_jobs_model_state. The same holds in job_maintenance and webhooks/delivery.
_RUNNING = (
    "(SELECT count(*) FROM jobs r WHERE r.model = :model AND r.state = 'processing' "
    "AND r.lease_until >= :now)"
)
# A queued job becomes ``worker``'s (the WHERE says which job and that its model has a slot).
_CLAIM = (
    "UPDATE jobs SET state = 'processing', worker_id = :worker, lease_until = :lease, "
    "attempts = attempts + 1, started_at = coalesce(started_at, :now), progress = 0, "
    "progress_message = NULL"
)


def _this_row(d: Dialect) -> str:
    """``id = :id``; on PostgreSQL, not while another transaction holds the row. Every write
    under a model's lock picks its rows so: an end handing its slot over holds the job it
    takes without that lock (see :func:`_take_next`), and may wait for the lock itself
    later in its batch; waiting for its row here, lock in hand, would deadlock."""
    if not d.pg:
        return "id = :id"
    return f"id = (SELECT id FROM jobs WHERE id = :id{d.skip_locked})"


def _claim_op(
    d: Dialect, job_id: str, model: str, worker_id: str, concurrency: int, lease_seconds: float
) -> Ops[JobView | None]:
    yield from _lock_model(d, model)
    now = utcnow()
    row = yield Sql.one(
        f"{_CLAIM} WHERE {_this_row(d)} AND model || '' = :model AND state || '' = 'queued' "
        f"AND {_RUNNING} < :limit RETURNING *",
        worker=worker_id,
        lease=now + timedelta(seconds=lease_seconds),
        now=now,
        id=job_id,
        model=model,
        limit=max(1, concurrency),
    )
    return _view(row) if row is not None else None


async def claim_job(
    db: Database,
    job_id: str,
    model: str,
    worker_id: str,
    *,
    concurrency: int,
    lease_seconds: float,
) -> JobView | None:
    """Take a queued job of ``model`` for ``worker_id`` if the model has a free slot; the job,
    or None: not queued any more (ran, running, ended: a redelivered message, another
    worker), or its model is at its slot count. A job left waiting for a slot is not
    marked: the next of its model's jobs to end takes the oldest queued one (see
    :func:`complete_job`).

    One conditional UPDATE (``state = 'queued'`` and fewer than ``concurrency`` running). On
    PostgreSQL the model's advisory lock, taken first, makes the slot count exact across
    concurrent claims (a hand-over of a live slot leaves the count as it is); SQLite
    serialises writers.
    """
    return await db.write(_claim_op, job_id, model, worker_id, concurrency, lease_seconds)


def _heartbeat_op(
    _: Dialect,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    progress: tuple[float, str] | None,
) -> Ops[bool]:
    lease = utcnow() + timedelta(seconds=lease_seconds)
    where = "WHERE id = :id AND state || '' = 'processing' AND worker_id = :worker"
    if progress is None:
        changed = yield Sql.run(
            f"UPDATE jobs SET lease_until = :lease {where}",
            lease=lease,
            id=job_id,
            worker=worker_id,
        )
    else:
        changed = yield Sql.run(
            f"UPDATE jobs SET lease_until = :lease, progress = :progress, "
            f"progress_message = :message {where}",
            lease=lease,
            progress=min(1.0, max(0.0, progress[0])),
            message=progress[1][:300],
            id=job_id,
            worker=worker_id,
        )
    return bool(changed)


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
    return await db.write(_heartbeat_op, job_id, worker_id, lease_seconds, progress)


def _release_op(d: Dialect, job_id: str, worker_id: str) -> Ops[bool]:
    changed = yield Sql.run(
        "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_until = NULL, "
        f"attempts = {d.greatest}(attempts - 1, 0), kicked_at = :now "
        "WHERE id = :id AND state || '' = 'processing' AND worker_id = :worker",
        now=utcnow(),
        id=job_id,
        worker=worker_id,
    )
    return bool(changed)


async def release_job(db: Database, job_id: str, worker_id: str) -> bool:
    """Give a running job back to the queue (worker shutting down); the interrupted run
    does not count as an attempt. False when it was not this worker's any more."""
    return await db.write(_release_op, job_id, worker_id)


# ------------------------------------------------------------------------- ending


@dataclass(frozen=True)
class Taker:
    """The worker ending its own job, ready to run the model's oldest queued job in the slot
    that the end frees: that job is claimed for it in the end's transaction."""

    worker_id: str
    lease_seconds: float
    concurrency: int


@dataclass(frozen=True)
class Ended:
    """A job that this call moved to a terminal state, its webhook delivery, if any, and
    the queued job of its model that now takes its slot: ``next_job_id`` to be put on the
    queue, or ``taken``, claimed already for the ending worker (see :class:`Taker`)."""

    job: JobView
    delivery_id: str | None
    next_job_id: str | None = None
    taken: JobView | None = None


def _end_op(
    d: Dialect, where: str, params: dict[str, Any], values: str, taker: Taker | None = None
) -> Ops[Ended | None]:
    now = utcnow()
    # On PostgreSQL an end that hands its slot over also reads the lease it held (see below).
    held = d.pg and taker is not None
    row = yield Sql.one(
        f"UPDATE jobs SET completed_at = :ended_at, lease_until = NULL, {values} "
        + (_HELD_FROM if held else "")
        + f"WHERE {where} RETURNING "
        + ("jobs.*, held.held_until" if held else "*"),
        ended_at=now,
        **params,
    )
    if row is None:
        return None
    job = _view(row)
    if job.state in ("failed", "canceled") and job.debit_entry_id is not None:
        # The refund commits with the job's end: a failed or canceled job is never seen
        # unrefunded, and a crash in between cannot lose the refund.
        entry = yield from ledger.refund_op(
            d, job.debit_entry_id, None, f"refund: {job.type} job {job.id} {job.state}"
        )
        if entry is not None:
            yield Sql.run(
                "UPDATE jobs SET refund_entry_id = :entry WHERE id = :id",
                entry=entry.id,
                id=job.id,
            )
            job = replace(job, refund_entry_id=entry.id)
    delivery_id = yield from _add_delivery(job, now)
    if row["worker_id"] is None:  # it held no slot of its model
        return Ended(job, delivery_id)
    if taker is not None and row["worker_id"] == taker.worker_id:
        # Its lease was live (counted among the model's running jobs): the slot passes to the
        # job taken, and the running count cannot change, so no lock is needed. A lapsed
        # lease was not counted, and a concurrent claim may have taken its place.
        handover = held and _held(row["held_until"], now, taker)
        taken = yield from _take_next(d, job.model, now, taker, locked=not handover)
        return Ended(job, delivery_id, taken=taken)
    next_job_id = yield from _resend_next(d, job.model, now)
    return Ended(job, delivery_id, next_job_id)


# The lease the ended job held, read by its end's UPDATE (RETURNING gives the new row).
_HELD_FROM = "FROM (SELECT lease_until AS held_until FROM jobs WHERE id = :id) held "


def _held(held_until: Any, now: datetime, taker: Taker) -> bool:
    """Whether the ended job's lease was live by a safe margin (half a lease: a worker
    renews it every quarter lease at most), so that every worker counted it as running
    whatever its clock."""
    until = as_datetime(held_until)
    return until is not None and until >= now + timedelta(seconds=taker.lease_seconds / 2)


def _next_queued(d: Dialect) -> str:
    """The oldest queued job of a model (``ix_jobs_queued``); on PostgreSQL one that no other
    transaction holds (two ends at once take two jobs)."""
    return (
        "id = (SELECT id FROM jobs WHERE model = :model AND state = 'queued' "
        f"ORDER BY created_at, id LIMIT 1{d.skip_locked}) AND state || '' = 'queued'"
    )


def _resend_next(d: Dialect, model: str, now: datetime) -> Ops[str | None]:
    """The queued job of ``model`` sent longest ago (that is, the oldest one, unless it was
    sent again since), marked as sent now: to be put on the queue. Several ends in a row
    send as many different jobs, one for each slot they free."""
    yield from _lock_model(d, model)
    row = yield Sql.one(
        "UPDATE jobs SET kicked_at = :now WHERE id = (SELECT id FROM jobs WHERE model = :model "
        "AND state = 'queued' ORDER BY coalesce(kicked_at, created_at), created_at, id "
        f"LIMIT 1{d.skip_locked}) AND state || '' = 'queued' RETURNING id",
        now=now,
        model=model,
    )
    return row["id"] if row is not None else None


def _take_next(
    d: Dialect, model: str, now: datetime, taker: Taker, *, locked: bool = True
) -> Ops[JobView | None]:
    """The oldest queued job of ``model``, claimed for the worker whose job just ended: no
    message, no second claim, and the slot count is checked as a claim checks it. A message
    still on its way for that job finds it claimed. ``locked=False``: a hand-over of a
    counted slot (see :func:`_end_op`), without the model's lock."""
    if locked:
        yield from _lock_model(d, model)
    row = yield Sql.one(
        f"{_CLAIM}, kicked_at = :now WHERE {_next_queued(d)} AND {_RUNNING} < :limit RETURNING *",
        worker=taker.worker_id,
        lease=now + timedelta(seconds=taker.lease_seconds),
        now=now,
        model=model,
        limit=max(1, taker.concurrency),
    )
    return _view(row) if row is not None else None


def _add_delivery(job: JobView, now: datetime) -> Ops[str | None]:
    if not job.webhook_url or job.state not in WEBHOOK_STATES:
        return None
    delivery_id = new_id("msg")
    yield Sql.run(
        "INSERT INTO webhook_deliveries (id, job_id, account_id, url, event, payload, state, "
        "attempts, next_attempt_at, lease_until, last_status_code, last_error, created_at, "
        "delivered_at) VALUES (:id, :job, :account, :url, :event, :payload, 'pending', 0, "
        ":now, NULL, NULL, NULL, :now, NULL)",
        id=delivery_id,
        job=job.id,
        account=job.account_id,
        url=job.webhook_url,
        event=f"job.{job.state}",
        payload=to_json(webhook_payload(job)),
        now=now,
    )
    return delivery_id


async def complete_job(
    db: Database,
    job_id: str,
    worker_id: str,
    *,
    output_url: str,
    output_key: str,
    result: Mapping[str, Any] | None,
    credits: int | None = None,
    take_next: Taker | None = None,
) -> Ended | None:
    """Mark this worker's running job completed. None when it is not ours any more
    (canceled meanwhile, or re-queued): the output is then discarded. ``credits``: settle
    the job at that many credits (less than reserved; the rest refunded in the same
    transaction), for a model whose charge is known only at the end. ``take_next``: claim
    the model's oldest queued job for this worker in the same transaction (``Ended.taken``);
    without it, that job is marked to be put on the queue (``Ended.next_job_id``)."""
    params: dict[str, Any] = {
        "id": job_id,
        "worker": worker_id,
        "output_url": output_url,
        "output_key": output_key,
        "result": to_json(dict(result)) if result is not None else None,
    }
    values = (
        "state = 'completed', output_url = :output_url, output_key = :output_key, "
        "result = :result, progress = 1, error = NULL"
    )
    where = "id = :id AND state || '' = 'processing' AND worker_id = :worker"
    if credits is None:
        return await db.write(_end_op, where, params, values, take_next)
    return await db.write(_settle_end_op, where, {**params, "credits": credits}, values, take_next)


def _settle_end_op(
    d: Dialect, where: str, params: dict[str, Any], values: str, taker: Taker | None
) -> Ops[Ended | None]:
    """Complete the job at ``params['credits']`` and refund the rest of what it reserved."""
    before = yield Sql.one("SELECT credits FROM jobs WHERE id = :id", id=params["id"])
    settled = params["credits"]
    ended = yield from _end_op(d, where, params, values + ", credits = :credits", taker)
    if ended is None or before is None or ended.job.debit_entry_id is None:
        return ended
    rest = int(before["credits"]) - settled
    if rest > 0:
        yield from ledger.refund_op(
            d,
            ended.job.debit_entry_id,
            rest,
            f"{ended.job.type} job {ended.job.id}: settled at "
            f"{settled} of {before['credits']} (upstream bill x markup)",
        )
    return ended


async def fail_job(
    db: Database,
    job_id: str,
    error: str,
    *,
    worker_id: str | None = None,
    take_next: Taker | None = None,
) -> Ended | None:
    """Fail an active job (this worker's, when ``worker_id`` is given) and refund it;
    ``take_next`` as for :func:`complete_job`."""
    where = "id = :id AND state || '' IN ('queued', 'processing')"
    params: dict[str, Any] = {"id": job_id, "error": error}
    if worker_id is not None:
        where = "id = :id AND state || '' = 'processing' AND worker_id = :worker"
        params["worker"] = worker_id
    return await db.write(_end_op, where, params, "state = 'failed', error = :error", take_next)


async def cancel_job(db: Database, account_id: str, job_id: str) -> tuple[Ended | None, JobView]:
    """Cancel the caller's queued or running job and refund it; a running worker notices at
    its next heartbeat and stops. Returns (what this call ended, or None when the job was
    canceled already, and the job). Raises JobNotFound, or Conflict for a finished job."""
    ended = await db.write(
        _end_op,
        "id = :id AND account_id = :account AND state IN ('queued', 'processing')",
        {"id": job_id, "account": account_id, "error": "Canceled by the user", "true": True},
        "state = 'canceled', error = :error, cancel_requested = :true",
    )
    if ended is not None:
        return ended, ended.job
    job = await get_job(db, account_id, job_id)
    if job.state == "canceled":
        return None, job
    raise Conflict(f"Job is already {job.state} and cannot be canceled")


def _settle_refund_op(d: Dialect, job: JobView) -> Ops[JobView]:
    assert job.debit_entry_id is not None
    entry = yield from ledger.refund_op(
        d, job.debit_entry_id, None, f"refund: {job.type} job {job.id} {job.state}"
    )
    if entry is not None:
        refund_id: int | None = entry.id
    else:  # refunded already (by a racing caller), or a free job
        row = yield Sql.one(
            "SELECT id FROM ledger_entries WHERE refund_of = :debit", debit=job.debit_entry_id
        )
        refund_id = row["id"] if row is not None else None
    if refund_id is None:
        return job
    yield Sql.run(
        "UPDATE jobs SET refund_entry_id = :entry WHERE id = :id", entry=refund_id, id=job.id
    )
    return replace(job, refund_entry_id=refund_id)


async def settle_refund(db: Database, job: JobView) -> JobView:
    """Refund a failed or canceled job's debit (once, whoever calls) and note it on the job."""
    if job.debit_entry_id is None or job.refund_entry_id is not None:
        return job
    return await db.write(_settle_refund_op, job)
