"""Usage summaries from the ledger: credits spent (debited less refunded) by model, by API
key and by UTC day, over a time range."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import case, func, select

from hypereal.domain.errors import BadRequest
from hypereal.store.db import Database
from hypereal.store.models import LedgerEntry

GROUPS = ("model", "key", "day")
DEFAULT_DAYS = 30


@dataclass(frozen=True)
class Summary:
    group_by: tuple[str, ...]
    start: datetime
    end: datetime
    rows: list[dict[str, Any]]
    total: dict[str, int]


def parse_group_by(value: str | None) -> tuple[str, ...]:
    """``"day,model"`` -> ("day", "model"). Raises BadRequest naming ``groupBy``."""
    names = tuple(dict.fromkeys(p.strip() for p in (value or "model").split(",") if p.strip()))
    wrong = [name for name in names if name not in GROUPS]
    if wrong or not names:
        raise BadRequest(
            f"Invalid value for 'groupBy': {value!r}; use one or more of model, key, day "
            "separated by commas"
        )
    return names


def parse_moment(value: str | None, name: str, *, end: bool = False) -> datetime | None:
    """An ISO-8601 date or datetime (UTC unless it names a zone). A bare date as ``to`` means
    the end of that day. Raises BadRequest naming the parameter."""
    if value is None or value == "":
        return None
    try:
        if len(value) == 10:
            day = date.fromisoformat(value)
            moment = datetime.combine(day + timedelta(days=1) if end else day, time(), UTC)
        else:
            moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise BadRequest(
            f"Invalid value for '{name}': {value!r} is not an ISO-8601 date or datetime"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


async def summary(
    db: Database,
    account_id: str,
    group_by: tuple[str, ...],
    start: datetime | None = None,
    end: datetime | None = None,
) -> Summary:
    """Credits the account spent in [start, end) (default: the last 30 days), grouped."""
    end = end or datetime.now(UTC)
    start = start or end - timedelta(days=DEFAULT_DAYS)
    if start >= end:
        raise BadRequest("Invalid range: 'from' must be before 'to'")
    ledger = LedgerEntry
    if db.is_sqlite:
        day = func.substr(ledger.created_at, 1, 10)
    else:
        day = func.to_char(func.timezone("UTC", ledger.created_at), "YYYY-MM-DD")
    columns: dict[str, Any] = {"model": ledger.model, "key": ledger.key_id, "day": day}
    keys = [columns[name].label(name) for name in group_by]
    debited = func.sum(case((ledger.kind == "debit", -ledger.amount), else_=0))
    refunded = func.sum(case((ledger.kind == "refund", ledger.amount), else_=0))
    requests = func.sum(case((ledger.kind == "debit", 1), else_=0))
    low: datetime = start.astimezone(UTC)
    high: datetime = end.astimezone(UTC)
    if db.is_sqlite:  # stored as naive UTC text
        low, high = low.replace(tzinfo=None), high.replace(tzinfo=None)
    query = (
        select(*keys, debited.label("debited"), refunded.label("refunded"), requests.label("n"))
        .where(
            ledger.account_id == account_id,
            ledger.kind.in_(("debit", "refund")),
            ledger.created_at >= low,
            ledger.created_at < high,
        )
        .group_by(*(columns[name] for name in group_by))
        .order_by(*(columns[name] for name in group_by))
    )
    async with db.session() as session:
        result = (await session.execute(query)).all()
    rows: list[dict[str, Any]] = []
    total = {"credits": 0, "debited": 0, "refunded": 0, "requests": 0}
    for row in result:
        mapping = row._mapping
        entry: dict[str, Any] = {}
        for name in group_by:
            entry["keyId" if name == "key" else name] = mapping[name]
        figures = {
            "debited": int(mapping["debited"] or 0),
            "refunded": int(mapping["refunded"] or 0),
            "requests": int(mapping["n"] or 0),
        }
        figures["credits"] = figures["debited"] - figures["refunded"]
        entry.update(figures)
        rows.append(entry)
        for name, value in figures.items():
            total[name] += value
    return Summary(group_by, start, end, rows, total)
