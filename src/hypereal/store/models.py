"""ORM tables. The database is the source of truth for keys, balances, ledger and jobs."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


def utcnow() -> datetime:
    return datetime.now(UTC)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, datetime: DateTime(timezone=True)}


class Account(Base):
    __tablename__ = "accounts"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    name: Mapped[str] = mapped_column(String(200))
    is_admin: Mapped[bool] = mapped_column(Boolean, default=False)
    balance: Mapped[int] = mapped_column(BigInteger, default=0)
    webhook_secret: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"), index=True)
    # SHA-256 hex of the full key; the key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    # First characters of the key, shown in listings so a user can tell keys apart.
    prefix: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(String(200), default="")
    rate_limit_per_hour: Mapped[int | None] = mapped_column(Integer, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Per-key controls (domain/keys.py): the models it may use (slugs or fnmatch patterns, a
    # JSON list; null = all), when it stops working, and its budgets in credits.
    models: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    expires_at: Mapped[datetime | None] = mapped_column(nullable=True)
    budget_daily: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_monthly: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    budget_total: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    # What the key has spent (net of refunds) while it has a budget: in the UTC day named by
    # spent_day_of ('YYYY-MM-DD'), the month spent_month_of ('YYYY-MM'), and in all.
    spent_day: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    spent_day_of: Mapped[str | None] = mapped_column(String(10), nullable=True)
    spent_month: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")
    spent_month_of: Mapped[str | None] = mapped_column(String(7), nullable=True)
    spent_total: Mapped[int] = mapped_column(BigInteger, default=0, server_default="0")


class LedgerEntry(Base):
    """Append-only: rows are inserted, never updated or deleted."""

    __tablename__ = "ledger_entries"
    __table_args__ = (Index("ix_ledger_account_id_id", "account_id", "id"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    kind: Mapped[str] = mapped_column(String(16))  # grant | debit | refund
    amount: Mapped[int] = mapped_column(BigInteger)  # signed: debits are negative
    balance_after: Mapped[int] = mapped_column(BigInteger)
    # What the entry is for: a job id, a chat completion id, "admin grant" ...
    reference: Mapped[str | None] = mapped_column(String(100), nullable=True)
    description: Mapped[str] = mapped_column(String(300), default="")
    # A refund names the debit it reverses; unique, so a debit is refunded at most once.
    refund_of: Mapped[int | None] = mapped_column(
        ForeignKey("ledger_entries.id"), unique=True, nullable=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # The API key that spent (debits and their refunds) and the model it was spent on.
    key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    model: Mapped[str | None] = mapped_column(String(100), nullable=True)


class IdempotencyRecord(Base):
    __tablename__ = "idempotency_records"
    __table_args__ = (UniqueConstraint("account_id", "key"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    key: Mapped[str] = mapped_column(String(255))
    request_hash: Mapped[str] = mapped_column(String(64))
    # Null while the first request is still being processed.
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    response_body: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    content_type: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


# A job waiting for a slot of its model.
_QUEUED = text("state = 'queued'")


class Job(Base):
    """One generation: async jobs (video, audio, 3D) and recorded sync results (images)."""

    __tablename__ = "jobs"
    __table_args__ = (
        Index("ix_jobs_account_created", "account_id", "created_at"),
        Index("ix_jobs_state_lease", "state", "lease_until"),
        Index("ix_jobs_model_state", "model", "state"),
        # The queued jobs of a model, oldest first: the job that takes a freed slot is the
        # first entry, not a scan of every job of the model (``jobs._NEXT_QUEUED``).
        Index(
            "ix_jobs_queued",
            "model",
            "created_at",
            "id",
            sqlite_where=_QUEUED,
            postgresql_where=_QUEUED,
        ),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    type: Mapped[str] = mapped_column(String(16))  # video | audio | 3d | image | chat
    model: Mapped[str] = mapped_column(String(100))
    # queued | processing | completed | failed | canceled
    state: Mapped[str] = mapped_column(String(16), default="queued")
    input: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    webhook_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    credits: Mapped[int] = mapped_column(BigInteger, default=0)
    debit_entry_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    output_url: Mapped[str | None] = mapped_column(Text, nullable=True)
    output_key: Mapped[str | None] = mapped_column(String(300), nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    progress: Mapped[float] = mapped_column(default=0.0)
    progress_message: Mapped[str | None] = mapped_column(String(300), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    worker_id: Mapped[str | None] = mapped_column(String(100), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    completed_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # Input media fetched at submission: field name -> media store key.
    media: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # Last time a message for this job was put on the queue (lost messages are re-sent).
    kicked_at: Mapped[datetime | None] = mapped_column(nullable=True)
    # The refund of a failed or canceled job (set once the refund is booked).
    refund_entry_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)


class WebhookDelivery(Base):
    """One event for a webhook URL; its id is the Standard Webhooks ``webhook-id``, the same
    on every attempt. Written with the job's terminal state, in the same transaction."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (Index("ix_webhook_deliveries_due", "state", "next_attempt_at"),)

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("jobs.id"), index=True)
    account_id: Mapped[str] = mapped_column(ForeignKey("accounts.id"))
    url: Mapped[str] = mapped_column(Text)
    event: Mapped[str] = mapped_column(String(40))  # job.completed | job.failed
    payload: Mapped[dict[str, Any]] = mapped_column(JSON)
    # pending | delivered | failed (retries exhausted or the receiver answered 410)
    state: Mapped[str] = mapped_column(String(16), default="pending")
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[datetime | None] = mapped_column(nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(nullable=True)
    last_status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(nullable=True)


class WebhookAttempt(Base):
    """Append-only log of every POST made for a delivery."""

    __tablename__ = "webhook_attempts"
    __table_args__ = (UniqueConstraint("delivery_id", "attempt"),)

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    delivery_id: Mapped[str] = mapped_column(ForeignKey("webhook_deliveries.id"))
    attempt: Mapped[int] = mapped_column(Integer)
    status_code: Mapped[int | None] = mapped_column(Integer, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    duration_ms: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Append-only record of an admin action: who (key, account), what, when."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow)
    actor_key_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    actor_account_id: Mapped[str | None] = mapped_column(String(40), nullable=True)
    # account.created | key.created | key.revoked | key.updated | credits.granted |
    # webhook_secret.rotated
    action: Mapped[str] = mapped_column(String(40), index=True)
    target_type: Mapped[str] = mapped_column(String(20))
    target_id: Mapped[str] = mapped_column(String(100))
    # The account the target belongs to (filters the log by account).
    account_id: Mapped[str | None] = mapped_column(String(40), nullable=True, index=True)
    details: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
