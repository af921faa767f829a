"""The audit log: every admin action (keys created, changed, revoked; credits granted;
accounts created; webhook secrets rotated) with who did it and when. Append-only."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select

from hypereal.domain.keys import Principal
from hypereal.store.db import Database
from hypereal.store.models import AuditEntry, utcnow

ACTIONS = (
    "account.created",
    "key.created",
    "key.revoked",
    "key.updated",
    "credits.granted",
    "webhook_secret.rotated",
)


@dataclass(frozen=True)
class Record:
    id: int
    at: datetime
    actor_key_id: str | None
    actor_account_id: str | None
    action: str
    target_type: str
    target_id: str
    account_id: str | None
    details: dict[str, Any]


def _record(row: AuditEntry) -> Record:
    return Record(
        id=row.id,
        at=row.at,
        actor_key_id=row.actor_key_id,
        actor_account_id=row.actor_account_id,
        action=row.action,
        target_type=row.target_type,
        target_id=row.target_id,
        account_id=row.account_id,
        details=dict(row.details or {}),
    )


async def record(
    db: Database,
    actor: Principal | None,
    action: str,
    *,
    target_type: str,
    target_id: str,
    account_id: str | None,
    details: Mapping[str, Any] | None = None,
) -> Record:
    """Append one entry. ``actor`` is the API key that acted; None for the operator's CLI
    (recorded as ``"actor": "cli"`` in the details)."""
    if action not in ACTIONS:
        raise ValueError(f"unknown audit action: {action}")
    shown = dict(details or {})
    if actor is None:
        shown.setdefault("actor", "cli")
    row = AuditEntry(
        at=utcnow(),
        actor_key_id=actor.key_id if actor else None,
        actor_account_id=actor.account_id if actor else None,
        action=action,
        target_type=target_type,
        target_id=target_id,
        account_id=account_id,
        details=shown,
    )
    async with db.session.begin() as session:
        session.add(row)
    return _record(row)


async def entries(
    db: Database,
    *,
    limit: int = 50,
    before_id: int | None = None,
    action: str | None = None,
    account_id: str | None = None,
) -> list[Record]:
    """Newest first; page with ``before_id`` = the last id of the previous page."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if before_id is not None:
        query = query.where(AuditEntry.id < before_id)
    if action is not None:
        query = query.where(AuditEntry.action == action)
    if account_id is not None:
        query = query.where(AuditEntry.account_id == account_id)
    async with db.session() as session:
        return [_record(row) for row in (await session.scalars(query)).all()]
