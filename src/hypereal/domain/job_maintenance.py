"""Job maintenance: leases that ran out (re-queue or fail), leases ended for a dead worker,
queued jobs whose message may be lost, and refunds an ender did not note. Every step is a
conditional statement, so any number of processes may run it at once (see
``engine/engine.py``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from hypereal.domain.job_view import JobView, _view
from hypereal.domain.jobs import Ended, _end_op, _lock_model, _this_row
from hypereal.store.db import Database
from hypereal.store.models import utcnow
from hypereal.store.writer import Dialect, Ops, Sql


def _expired_op(_: Dialect, limit: int) -> Ops[list[JobView]]:
    rows = yield Sql.all(
        "SELECT * FROM jobs WHERE state = 'processing' AND lease_until < :now "
        "ORDER BY lease_until LIMIT :limit",
        now=utcnow(),
        limit=limit,
    )
    return [_view(row) for row in rows]


async def expired_jobs(db: Database, limit: int = 100) -> list[JobView]:
    """Running jobs whose lease ran out: their worker died or hangs."""
    return await db.read(_expired_op, limit)


def _running_op(_: Dialect, limit: int) -> Ops[list[JobView]]:
    rows = yield Sql.all(
        "SELECT * FROM jobs WHERE state = 'processing' ORDER BY started_at, id LIMIT :limit",
        limit=limit,
    )
    return [_view(row) for row in rows]


async def running_jobs(db: Database, limit: int = 1000) -> list[JobView]:
    """Every running job, whatever its lease."""
    return await db.read(_running_op, limit)


def _end_lease_op(_: Dialect, job_id: str, worker_id: str | None) -> Ops[bool]:
    changed = yield Sql.run(
        "UPDATE jobs SET lease_until = :ended "
        "WHERE id = :id AND state || '' = 'processing' AND worker_id = :worker",
        ended=utcnow() - timedelta(seconds=1),
        id=job_id,
        worker=worker_id,
    )
    return bool(changed)


async def end_lease(db: Database, job: JobView) -> bool:
    """End a running job's lease now: its worker is known to be gone. The next sweep
    (:func:`expired_jobs`) re-queues it, or fails it when out of attempts, as if the lease had
    run out. False when the job is no longer that worker's."""
    return await db.write(_end_lease_op, job.id, job.worker_id)


# state || '': the primary key finds the row (see jobs._RUNNING's note).
_EXPIRED_WHERE = (
    "id = :id AND state || '' = 'processing' AND worker_id = :worker AND lease_until < :expired"
)


def _requeue_op(_: Dialect, job_id: str, worker_id: str | None) -> Ops[bool]:
    now = utcnow()
    changed = yield Sql.run(
        "UPDATE jobs SET state = 'queued', worker_id = NULL, lease_until = NULL, "
        f"kicked_at = :now WHERE {_EXPIRED_WHERE}",
        now=now,
        id=job_id,
        worker=worker_id,
        expired=now,
    )
    return bool(changed)


async def requeue_expired(db: Database, job: JobView) -> bool:
    """Put an expired job back in the queue (if nobody else did). True when this call did
    (the caller then sends it)."""
    return await db.write(_requeue_op, job.id, job.worker_id)


async def fail_expired(db: Database, job: JobView, error: str) -> Ended | None:
    return await db.write(
        _end_op,
        _EXPIRED_WHERE,
        {"id": job.id, "worker": job.worker_id, "expired": utcnow(), "error": error},
        "state = 'failed', error = :error",
    )


def _stale_where(kicked_before: datetime | None) -> tuple[str, dict[str, Any]]:
    # A job never sent (its model was busy at submit) is due at once: see jobs.submit.
    if kicked_before is None:
        return "", {}
    return " AND (kicked_at IS NULL OR kicked_at < :before)", {"before": kicked_before}


def _stale_op(
    _: Dialect, kicked_before: datetime | None, slots: Callable[[str], int], limit: int
) -> Ops[dict[str, list[str]]]:
    """Per model, the queued jobs whose message may be lost (see :func:`jobs_to_resend`),
    oldest first, no more than the model's free slots. Reads only."""
    stale, since = _stale_where(kicked_before)
    waiting = yield Sql.all(
        f"SELECT DISTINCT model FROM jobs WHERE state = 'queued'{stale}", **since
    )
    if not waiting:
        return {}
    running = yield Sql.all(
        "SELECT model, count(*) AS n FROM jobs WHERE state = 'processing' "
        "AND lease_until >= :now GROUP BY model",
        now=utcnow(),
    )
    busy = {row["model"]: int(row["n"]) for row in running}
    found: dict[str, list[str]] = {}
    total = 0
    for model in sorted(row["model"] for row in waiting):
        free = min(slots(model) - busy.get(model, 0), limit - total)
        if free <= 0:
            continue
        rows = yield Sql.all(
            f"SELECT id FROM jobs WHERE model = :model AND state = 'queued'{stale} "
            "ORDER BY created_at, id LIMIT :free",
            model=model,
            free=free,
            **since,
        )
        if rows:
            found[model] = [row["id"] for row in rows]
            total += len(rows)
    return found


def _mark_sent_op(
    d: Dialect, model: str, job_ids: list[str], kicked_before: datetime | None
) -> Ops[list[str]]:
    """Mark the jobs (of ``model``) as sent now, those still queued and due. Under the
    model's lock, which every write that counts its slots takes first; a job another
    transaction holds (an end taking it, see ``jobs._this_row``) is passed over, and a row
    is never held here before the lock (an end taking a queued job under the lock would
    wait for it: a deadlock)."""
    yield from _lock_model(d, model)
    stale, since = _stale_where(kicked_before)
    now = utcnow()
    marked = []
    for job_id in job_ids:
        changed = yield Sql.run(
            f"UPDATE jobs SET kicked_at = :now WHERE {_this_row(d)} AND state || '' = 'queued'"
            f"{stale}",
            now=now,
            id=job_id,
            **since,
        )
        if changed:
            marked.append(job_id)
    return marked


async def jobs_to_resend(
    db: Database,
    *,
    kicked_before: datetime | None,
    slots: Callable[[str], int],
    limit: int = 1000,
) -> list[tuple[str, str]]:
    """Queued jobs to put on the queue again, marked as sent now: at start-up every queued
    one (an in-process queue does not outlive its process), later those whose message is
    older than ``kicked_before`` (lost with a crashed process) or that were never sent; of
    each model no more than its free slots (``slots(model)`` minus its running jobs), since
    the rest are taken by the next of its jobs to end."""
    due = await db.read(_stale_op, kicked_before, slots, limit)
    found: list[tuple[str, str]] = []
    for model, job_ids in due.items():
        found += [
            (job_id, model)
            for job_id in await db.write(_mark_sent_op, model, job_ids, kicked_before)
        ]
    return found


def _unrefunded_op(_: Dialect, cutoff: datetime) -> Ops[list[JobView]]:
    rows = yield Sql.all(
        "SELECT * FROM jobs WHERE state IN ('failed', 'canceled') AND debit_entry_id IS NOT NULL "
        "AND refund_entry_id IS NULL AND credits > 0 AND completed_at < :cutoff LIMIT 100",
        cutoff=cutoff,
    )
    return [_view(row) for row in rows]


async def unrefunded_jobs(db: Database, older_than_seconds: float) -> list[JobView]:
    """Failed/canceled jobs whose refund was not noted (the ender crashed in between)."""
    return await db.read(_unrefunded_op, utcnow() - timedelta(seconds=older_than_seconds))
