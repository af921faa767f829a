"""Job maintenance: leases that ran out (re-queue or fail), leases ended for a dead worker,
queued jobs whose message may be lost, and refunds an ender did not note. Every step is a
conditional statement, so any number of processes may run it at once (see
``engine/engine.py``)."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from hypereal.domain.job_view import JobView, _view
from hypereal.domain.jobs import Ended, _end_op
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


def _stale_op(
    _: Dialect, kicked_before: datetime | None, slots: Callable[[str], int], limit: int
) -> Ops[list[tuple[str, str]]]:
    """Queued jobs whose message may be lost (sent before ``kicked_before``; None: every
    queued job), oldest first, at most as many of a model as it has free slots (``slots``:
    a model's slot count), marked as sent now. A job waiting for a slot of a busy model is
    not one of them: the next of its model's jobs to end takes it."""
    now = utcnow()
    stale = "" if kicked_before is None else " AND kicked_at < :before"
    since = {} if kicked_before is None else {"before": kicked_before}
    waiting = yield Sql.all(
        f"SELECT DISTINCT model FROM jobs WHERE state = 'queued'{stale}", **since
    )
    if not waiting:
        return []
    running = yield Sql.all(
        "SELECT model, count(*) AS n FROM jobs WHERE state = 'processing' "
        "AND lease_until >= :now GROUP BY model",
        now=now,
    )
    busy = {row["model"]: int(row["n"]) for row in running}
    found: list[tuple[str, str]] = []
    for model in sorted(row["model"] for row in waiting):
        free = min(slots(model) - busy.get(model, 0), limit - len(found))
        if free <= 0:
            continue
        rows = yield Sql.all(
            f"SELECT id FROM jobs WHERE model = :model AND state = 'queued'{stale} "
            "ORDER BY created_at, id LIMIT :free",
            model=model,
            free=free,
            **since,
        )
        found += [(row["id"], model) for row in rows]
    for job_id in [job_id for job_id, _model in found]:
        yield Sql.run("UPDATE jobs SET kicked_at = :now WHERE id = :id", now=now, id=job_id)
    return found


async def jobs_to_resend(
    db: Database,
    *,
    kicked_before: datetime | None,
    slots: Callable[[str], int],
    limit: int = 1000,
) -> list[tuple[str, str]]:
    """Queued jobs to put on the queue again: at start-up every queued one (an in-process
    queue does not outlive its process), later those whose message is older than
    ``kicked_before`` (lost with a crashed process); of each model no more than its free
    slots (``slots(model)`` minus its running jobs), since the rest are taken by the next of
    its jobs to end."""
    return await db.write(_stale_op, kicked_before, slots, limit)


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
