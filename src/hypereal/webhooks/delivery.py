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
exactly one of them try at a time. Each process sends through one long-lived pooled client
whose connections all go through the SSRF guard (``allowed_private_networks`` applies), at
most ``webhook_max_concurrency`` deliveries at once; each attempt must end within
``webhook_timeout_seconds``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import aiohttp
from standardwebhooks import Webhook

from hypereal.domain.errors import HyperealError
from hypereal.domain.webhook_secrets import webhook_secret
from hypereal.media.fetch import FetchRefused, parse_networks
from hypereal.media.guarded_session import LazySession, guarded_session
from hypereal.settings import Settings
from hypereal.store.db import Database
from hypereal.store.models import utcnow
from hypereal.store.writer import Dialect, Ops, Sql, as_datetime, from_json
from hypereal.webhooks.secrets import signer

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


def _deliveries_op(_: Dialect, job_id: str) -> Ops[list[Delivery]]:
    rows = yield Sql.all(
        "SELECT id, job_id, url, event, state, attempts, next_attempt_at, last_status_code, "
        "last_error, created_at, delivered_at FROM webhook_deliveries WHERE job_id = :job "
        "ORDER BY created_at",
        job=job_id,
    )
    attempts = yield Sql.all(
        "SELECT a.delivery_id, a.attempt, a.status_code, a.error, a.duration_ms, a.started_at "
        "FROM webhook_attempts a JOIN webhook_deliveries d ON d.id = a.delivery_id "
        "WHERE d.job_id = :job ORDER BY a.attempt",
        job=job_id,
    )
    return [
        Delivery(
            id=str(row["id"]),
            job_id=str(row["job_id"]),
            url=str(row["url"]),
            event=str(row["event"]),
            state=str(row["state"]),
            attempts=int(row["attempts"]),
            next_attempt_at=(
                as_datetime(row["next_attempt_at"]) if row["state"] == "pending" else None
            ),
            last_status_code=row["last_status_code"],
            last_error=row["last_error"],
            created_at=_as_utc(row["created_at"]),
            delivered_at=as_datetime(row["delivered_at"]),
            log=[
                Attempt(
                    int(a["attempt"]),
                    a["status_code"],
                    a["error"],
                    int(a["duration_ms"]),
                    _as_utc(a["started_at"]),
                )
                for a in attempts
                if a["delivery_id"] == row["id"]
            ],
        )
        for row in rows
    ]


def _as_utc(value: Any) -> datetime:
    moment = as_datetime(value)
    assert moment is not None
    return moment


async def deliveries_for_job(db: Database, job_id: str) -> list[Delivery]:
    """Every delivery of a job with its attempt log, oldest first, read from one snapshot
    (a delivery's state always agrees with its log)."""
    return await db.read_snapshot(_deliveries_op, job_id)


def signed_headers(
    secret: str | Webhook, message_id: str, body: str, at: datetime
) -> dict[str, str]:
    """Standard Webhooks headers for ``body`` (``secret``: the secret or its signer)."""
    signing = secret if isinstance(secret, Webhook) else Webhook(secret)
    return {
        "content-type": "application/json",
        "user-agent": USER_AGENT,
        "webhook-id": message_id,
        "webhook-timestamp": str(int(at.timestamp())),
        "webhook-signature": signing.sign(message_id, at, body),
    }


@dataclass(frozen=True)
class _Outcome:
    status_code: int | None
    error: str | None

    @property
    def delivered(self) -> bool:
        return self.status_code is not None and 200 <= self.status_code < 300


@dataclass(frozen=True)
class _Claimed:
    """One attempt this process claimed: the delivery and the account's current secret."""

    id: str
    job_id: str
    account_id: str
    url: str
    payload: Any
    attempt: int  # this attempt's number, from 1
    secret: str | None


# A receiver's answer body is read (so the connection can be kept) up to this size.
_MAX_ANSWER_BYTES = 64 * 1024


def _due_op(_: Dialect, now: datetime, limit: int) -> Ops[list[str]]:
    rows = yield Sql.all(
        "SELECT id FROM webhook_deliveries WHERE state = 'pending' AND next_attempt_at <= :now "
        "AND (lease_until IS NULL OR lease_until < :now) ORDER BY next_attempt_at LIMIT :limit",
        now=now,
        limit=limit,
    )
    return [str(row["id"]) for row in rows]


def _claim_op(_: Dialect, delivery_id: str, now: datetime, lease: datetime) -> Ops[_Claimed | None]:
    # One statement: the lease, the attempt count and the account's secret as it is now. The
    # primary key finds the row; ``state || ''`` keeps ix_webhook_deliveries_due out of it
    # (see domain/jobs.py's note on _RUNNING).
    row = yield Sql.one(
        "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_until = :lease "
        "WHERE id = :id AND state || '' = 'pending' AND next_attempt_at <= :now "
        "AND (lease_until IS NULL OR lease_until < :now) "
        "RETURNING id, job_id, account_id, url, payload, attempts, "
        "(SELECT webhook_secret FROM accounts WHERE accounts.id = webhook_deliveries.account_id)"
        " AS secret",
        id=delivery_id,
        now=now,
        lease=lease,
    )
    if row is None:
        return None
    return _Claimed(
        id=str(row["id"]),
        job_id=str(row["job_id"]),
        account_id=str(row["account_id"]),
        url=str(row["url"]),
        payload=from_json(row["payload"]),
        attempt=int(row["attempts"]),
        secret=row["secret"],
    )


def _record_op(
    _: Dialect,
    claimed: _Claimed,
    outcome: _Outcome,
    started: datetime,
    duration_ms: int,
    changes: dict[str, Any],
) -> Ops[None]:
    # The attempt's log row and the delivery's new state, in one transaction.
    yield Sql.run(
        "INSERT INTO webhook_attempts (delivery_id, attempt, status_code, error, duration_ms, "
        "started_at) VALUES (:id, :attempt, :status, :error, :duration, :started)",
        id=claimed.id,
        attempt=claimed.attempt,
        status=outcome.status_code,
        error=changes["last_error"],
        duration=duration_ms,
        started=started,
    )
    yield Sql.run(
        "UPDATE webhook_deliveries SET lease_until = NULL, state = :state, "
        "last_status_code = :status, last_error = :error, "
        "next_attempt_at = COALESCE(:next, next_attempt_at), "
        "delivered_at = COALESCE(:delivered, delivered_at) WHERE id = :id",
        id=claimed.id,
        state=changes["state"],
        status=outcome.status_code,
        error=changes["last_error"],
        next=changes["next_attempt_at"],
        delivered=changes["delivered_at"],
    )


class WebhookSender:
    """Sends due deliveries; safe to run in any number of processes at once.

    One long-lived pooled aiohttp session carries every delivery of the sender (made on first
    use on the running loop, closed by :meth:`aclose`), every connection through the SSRF
    guard (:mod:`hypereal.media.guarded_session`, ``allowed_private_networks`` applies);
    redirects are not followed. At most ``webhook_max_concurrency`` deliveries are in flight
    at once; more wait their turn. An attempt is two writes: its claim (one statement, which
    also reads the signing secret) and its record (the attempt row and the delivery's new
    state, one transaction).
    """

    def __init__(self, settings: Settings, db: Database) -> None:
        self.settings = settings
        self.db = db
        self.schedule = list(settings.webhook_retry_schedule) or [0.0]
        self.timeout = settings.webhook_timeout_seconds
        self.max_concurrency = settings.webhook_max_concurrency
        self._slots = asyncio.Semaphore(self.max_concurrency)
        # Deliveries waiting for a slot or in flight here: asking again is a no-op.
        self._in_hand: set[str] = set()
        allowed = parse_networks(settings.allowed_private_networks)
        # The whole attempt (connect, send, answer) within the timeout, so it ends well inside
        # its lease (timeout + 30 s) and no other process can start the same attempt.
        limits = aiohttp.ClientTimeout(total=self.timeout)
        self._session = LazySession(
            lambda: guarded_session(allowed, timeout=limits, limit=self.max_concurrency)
        )

    async def due(self, limit: int = 100) -> list[str]:
        """Ids of pending deliveries whose next attempt is due and that nobody is sending."""
        return await self.db.read(_due_op, utcnow(), limit)

    async def deliver(self, delivery_id: str) -> None:
        """Make the due attempt of one delivery, if no other process is making it."""
        if delivery_id in self._in_hand:
            return
        self._in_hand.add(delivery_id)
        try:
            async with self._slots:
                await self._attempt(delivery_id)
        finally:
            self._in_hand.discard(delivery_id)

    async def _attempt(self, delivery_id: str) -> None:
        now = utcnow()
        lease = now + timedelta(seconds=self.timeout + 30)
        claimed = await self.db.write(_claim_op, delivery_id, now, lease)
        if claimed is None:
            return
        started = utcnow()
        clock = time.monotonic()
        outcome = await self._post(claimed, started)
        duration_ms = int((time.monotonic() - clock) * 1000)
        await self.db.write(
            _record_op, claimed, outcome, started, duration_ms, self._changes(claimed, outcome)
        )
        if not outcome.delivered:
            log.info(
                "webhook %s attempt %d for job %s: %s",
                claimed.id,
                claimed.attempt,
                claimed.job_id,
                outcome.error,
            )

    async def _post(self, claimed: _Claimed, at: datetime) -> _Outcome:
        body = json.dumps(claimed.payload, separators=(",", ":"))
        try:
            secret = claimed.secret or await webhook_secret(self.db, claimed.account_id)
            headers = signed_headers(signer(claimed.account_id, secret), claimed.id, body, at)
            session = self._session.get()
            async with session.post(
                claimed.url, data=body.encode(), headers=headers, allow_redirects=False
            ) as response:
                status = response.status
                await _discard_answer(response)
        except (FetchRefused, HyperealError) as exc:  # refused by the SSRF guard
            return _Outcome(None, exc.message)
        except (aiohttp.ClientError, TimeoutError) as exc:
            return _Outcome(None, f"{exc.__class__.__name__}: {exc}".rstrip(": "))
        if 200 <= status < 300:
            return _Outcome(status, None)
        return _Outcome(status, f"receiver answered HTTP {status}")

    def _changes(self, claimed: _Claimed, outcome: _Outcome) -> dict[str, Any]:
        attempt = claimed.attempt
        changes: dict[str, Any] = {
            "state": "pending",
            "last_error": outcome.error,
            "next_attempt_at": None,
            "delivered_at": None,
        }
        if outcome.delivered:
            changes.update(state="delivered", delivered_at=utcnow())
        elif outcome.status_code == 410:
            changes.update(state="failed", last_error="receiver answered 410 Gone; retries stopped")
        elif attempt >= len(self.schedule):  # every attempt of the schedule was made
            changes.update(state="failed")
        else:  # attempt n (1-based) failed: attempt n + 1 waits schedule[n]
            changes.update(next_attempt_at=utcnow() + timedelta(seconds=self.schedule[attempt]))
        return changes

    async def aclose(self) -> None:
        """Close the connection pool (a later delivery opens a new one)."""
        await self._session.aclose()


async def _discard_answer(response: aiohttp.ClientResponse) -> None:
    """Read the receiver's answer body, up to a limit, so the connection can be kept for the
    next delivery; a longer or broken one closes the connection (the status stands)."""
    seen = 0
    try:
        async for chunk in response.content.iter_any():
            seen += len(chunk)
            if seen > _MAX_ANSWER_BYTES:
                response.close()
                return
    except (aiohttp.ClientError, TimeoutError):
        response.close()
