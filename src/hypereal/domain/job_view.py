"""A job as the API and the engine see it (:class:`JobView`), read from a row on either
database, and the body of its webhook."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from hypereal.domain.ids import as_utc
from hypereal.store.models import Job
from hypereal.store.writer import Row, as_datetime, from_json

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


def _view(row: Row) -> JobView:
    """A job row (``SELECT *`` / ``RETURNING *``) as read on either database."""
    created_at = as_datetime(row["created_at"])
    assert created_at is not None
    return JobView(
        id=row["id"],
        account_id=row["account_id"],
        type=row["type"],
        model=row["model"],
        state=row["state"],
        input=from_json(row["input"]) or {},
        media=from_json(row["media"]) or {},
        webhook_url=row["webhook_url"],
        credits=int(row["credits"]),
        debit_entry_id=row["debit_entry_id"],
        refund_entry_id=row["refund_entry_id"],
        output_url=row["output_url"],
        result=from_json(row["result"]),
        error=row["error"],
        progress=float(row["progress"]),
        progress_message=row["progress_message"],
        attempts=int(row["attempts"]),
        worker_id=row["worker_id"],
        created_at=created_at,
        started_at=as_datetime(row["started_at"]),
        completed_at=as_datetime(row["completed_at"]),
    )


def _orm_view(row: Job) -> JobView:
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
