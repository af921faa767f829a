"""At-least-once delivery of job events to the user's ``webhook_url``.

Each delivery row (written with the job's terminal state) is POSTed, signed per Standard
Webhooks with the account's secret, until the receiver answers 2xx. Anything else (3xx
included: redirects are not followed) is retried on ``webhook_retry_schedule`` with the
same ``webhook-id``; 410 Gone stops the retries.

The schedule has one entry per attempt. ``schedule[0]`` is 0 (the settings insist on it):
the first attempt goes out as the job ends. ``schedule[n]`` is the wait after attempt ``n``
(counting from 1) fails, before attempt ``n + 1``; when all ``len(schedule)`` attempts have
failed, the delivery is ``failed``. The default ``0, 5, 300, ...`` is thus "immediately,
then 5 s, 5 min, ... later".

The schedule lives in the database (``next_attempt_at``), so retries survive restarts; any
consuming process may send a due delivery, and a conditional UPDATE (with a lease) lets
exactly one of them try at a time. Connections go through the SSRF-guarded client
(``allowed_private_networks`` applies).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from sqlalchemy import select, update
from standardwebhooks import Webhook

from hypereal.domain.errors import HyperealError
from hypereal.domain.ids import as_utc
from hypereal.media.fetch import guarded_http_client
from hypereal.settings import Settings
from hypereal.store.db import Database
from hypereal.store.models import WebhookAttempt, WebhookDelivery, utcnow
from hypereal.webhooks.secrets import webhook_secret

log = logging.getLogger("hypereal.webhooks")

USER_AGENT = "hypereal-webhooks/1.0"


@dataclass(frozen=True)
class Attempt:
    attempt: int
    status_code: int | None
    error: str | None
    duration_ms: int
    started_at: datetime


@dataclass(frozen=True)
class Delivery:
    id: str
    job_id: str
    url: str
    event: str
    state: str  # pending | delivered | failed
    attempts: int
    next_attempt_at: datetime | None
    last_status_code: int | None
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None
    log: Sequence[Attempt]


def _maybe_utc(moment: datetime | None) -> datetime | None:
    return as_utc(moment) if moment else None


async def deliveries_for_job(db: Database, job_id: str) -> list[Delivery]:
    """Every delivery of a job with its attempt log, oldest first."""
    async with db.session() as session:
        rows = (
            await session.scalars(
                select(WebhookDelivery)
                .where(WebhookDelivery.job_id == job_id)
                .order_by(WebhookDelivery.created_at)
            )
        ).all()
        attempts = (
            await session.scalars(
                select(WebhookAttempt)
                .where(WebhookAttempt.delivery_id.in_([r.id for r in rows]))
                .order_by(WebhookAttempt.attempt)
            )
        ).all()
    return [
        Delivery(
            id=row.id,
            job_id=row.job_id,
            url=row.url,
            event=row.event,
            state=row.state,
            attempts=row.attempts,
            next_attempt_at=_maybe_utc(row.next_attempt_at) if row.state == "pending" else None,
            last_status_code=row.last_status_code,
            last_error=row.last_error,
            created_at=as_utc(row.created_at),
            delivered_at=_maybe_utc(row.delivered_at),
            log=[
                Attempt(a.attempt, a.status_code, a.error, a.duration_ms, as_utc(a.started_at))
                for a in attempts
                if a.delivery_id == row.id
            ],
        )
        for row in rows
    ]


def signed_headers(secret: str, message_id: str, body: str, at: datetime) -> dict[str, str]:
    """Standard Webhooks headers for ``body``."""
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": Webhook(secret).sign(message_id, at, body),
    }


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


class WebhookSender:
    """Sends due deliveries; safe to run in any number of processes at once."""

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.schedule = list(settings.webhook_retry_schedule) or [0.0]
        self.timeout = settings.webhook_timeout_seconds

    async def due(self, limit: int = 20) -> list[str]:
        """Ids of pending deliveries whose next attempt is due and that nobody is sending."""
        now = utcnow()
        async with self.db.session() as session:
            ids = await session.scalars(
                select(WebhookDelivery.id)
                .where(
                    WebhookDelivery.state == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    (WebhookDelivery.lease_until.is_(None)) | (WebhookDelivery.lease_until < now),
                )
                .order_by(WebhookDelivery.next_attempt_at)
                .limit(limit)
            )
            return list(ids.all())

    async def _claim(self, delivery_id: str) -> WebhookDelivery | None:
        now = utcnow()
        async with self.db.session.begin() as session:
            row: WebhookDelivery | None = await session.scalar(
                update(WebhookDelivery)
                .where(
                    WebhookDelivery.id == delivery_id,
                    WebhookDelivery.state == "pending",
                    WebhookDelivery.next_attempt_at <= now,
                    (WebhookDelivery.lease_until.is_(None)) | (WebhookDelivery.lease_until < now),
                )
                .values(
                    attempts=WebhookDelivery.attempts + 1,
                    lease_until=now + timedelta(seconds=self.timeout + 30),
                )
                .returning(WebhookDelivery)
            )
        return row

    async def deliver(self, delivery_id: str) -> None:
        """Make the due attempt of one delivery, if no other process is making it."""
        row = await self._claim(delivery_id)
        if row is None:
            return
        started = utcnow()
        clock = time.monotonic()
        outcome = await self._post(row, started)
        await self._record(row, outcome, started, int((time.monotonic() - clock) * 1000))

    async def _post(self, row: WebhookDelivery, at: datetime) -> _Outcome:
        body = json.dumps(row.payload, separators=(",", ":"))
        try:
            secret = await webhook_secret(self.db, row.account_id)
            headers = signed_headers(secret, row.id, body, at)
            async with guarded_http_client(self.settings, self.timeout) as client:
                response = await client.post(row.url, content=body.encode(), headers=headers)
        except HyperealError as exc:  # refused by the SSRF guard
            return _Outcome(None, exc.message)
        except httpx.HTTPError as exc:
            return _Outcome(None, f"{exc.__class__.__name__}: {exc}".rstrip(": "))
        if 200 <= response.status_code < 300:
            return _Outcome(response.status_code, None)
        return _Outcome(response.status_code, f"receiver answered HTTP {response.status_code}")

    async def _record(
        self, row: WebhookDelivery, outcome: _Outcome, started: datetime, duration_ms: int
    ) -> None:
        attempt = row.attempts
        values: dict[str, object] = {
            "lease_until": None,
            "last_status_code": outcome.status_code,
            "last_error": outcome.error,
        }
        if outcome.delivered:
            values.update(state="delivered", delivered_at=utcnow())
        elif outcome.status_code == 410:
            values.update(state="failed", last_error="receiver answered 410 Gone; retries stopped")
        elif attempt >= len(self.schedule):  # every attempt of the schedule was made
            values.update(state="failed")
        else:  # attempt n (1-based) failed: attempt n + 1 waits schedule[n]
            values.update(next_attempt_at=utcnow() + timedelta(seconds=self.schedule[attempt]))
        async with self.db.session.begin() as session:
            session.add(
                WebhookAttempt(
                    delivery_id=row.id,
                    attempt=attempt,
                    status_code=outcome.status_code,
                    error=values["last_error"],
                    duration_ms=duration_ms,
                    started_at=started,
                )
            )
            await session.execute(
                update(WebhookDelivery).where(WebhookDelivery.id == row.id).values(**values)
            )
        if not outcome.delivered:
            log.info(
                "webhook %s attempt %d for job %s: %s", row.id, attempt, row.job_id, outcome.error
            )
