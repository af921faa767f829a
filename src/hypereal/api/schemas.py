"""Response shapes shared by routers (camelCase on the wire, as the spec uses)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Annotated, Any

from fastapi import Query

from hypereal.domain.audit import Record
from hypereal.domain.ids import as_utc
from hypereal.domain.keys import KeyInfo
from hypereal.domain.ledger import Entry

# A ledger cursor is an entry id, a 64-bit INTEGER in SQLite and PostgreSQL: a number outside
# that range is a 400 naming ``before`` instead of an OverflowError in the driver.
LedgerCursor = Annotated[
    int | None,
    Query(ge=-(2**63), le=2**63 - 1, description="nextCursor of the previous page"),
]


def iso(moment: datetime | None) -> str | None:
    return as_utc(moment).isoformat().replace("+00:00", "Z") if moment else None


def entry_json(entry: Entry) -> dict[str, Any]:
    return {
        "id": entry.id,
        "type": entry.kind,
        "amount": entry.amount,
        "balanceAfter": entry.balance_after,
        "reference": entry.reference,
        "description": entry.description,
        "refundOf": entry.refund_of,
        "createdAt": iso(entry.created_at),
        "keyId": entry.key_id,
        "model": entry.model,
    }


def key_json(info: KeyInfo) -> dict[str, Any]:
    return {
        "id": info.id,
        "accountId": info.account_id,
        "name": info.name,
        "prefix": info.prefix,
        "rateLimitPerHour": info.rate_limit_per_hour,
        "createdAt": iso(info.created_at),
        "revokedAt": iso(info.revoked_at),
        "active": info.revoked_at is None and not info.expired,
        "models": list(info.models) if info.models is not None else None,
        "expiresAt": iso(info.expires_at),
        "expired": info.expired,
        "dailyBudget": info.budget_daily,
        "monthlyBudget": info.budget_monthly,
        "maxBudget": info.budget_total,
        "spend": {"day": info.spent_day, "month": info.spent_month, "total": info.spent_total},
    }


def audit_json(record: Record) -> dict[str, Any]:
    return {
        "id": record.id,
        "at": iso(record.at),
        "actorKeyId": record.actor_key_id,
        "actorAccountId": record.actor_account_id,
        "action": record.action,
        "targetType": record.target_type,
        "targetId": record.target_id,
        "accountId": record.account_id,
        "details": record.details,
    }


def page(entries: list[Entry], limit: int) -> dict[str, Any]:
    """A page of ledger entries (see :func:`paged`)."""
    return paged(entries, limit, entry_json)


def paged(
    rows: Sequence[Any], limit: int, render: Callable[[Any], dict[str, Any]]
) -> dict[str, Any]:
    """A page of ``rows`` (each with an ``id``, newest first) as ``render`` shows them;
    ``rows`` holds up to ``limit + 1``, the extra one only telling whether there is a next
    page (``nextCursor``: the last id shown, for ``before=``)."""
    shown = rows[:limit]
    more = len(rows) > limit
    return {
        "data": [render(row) for row in shown],
        "hasMore": more,
        "nextCursor": shown[-1].id if more and shown else None,
    }
