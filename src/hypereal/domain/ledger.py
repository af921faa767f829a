"""The credits ledger: integer balances with append-only grant/debit/refund entries.

Every change is one transaction holding a conditional UPDATE of the balance and the ledger
row, so the balance never goes below zero under any concurrency, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from hypereal.domain.errors import BadRequest, InsufficientCredits, NotFound
from hypereal.store.db import Database
from hypereal.store.models import Account, LedgerEntry, utcnow


@dataclass(frozen=True)
class Entry:
    id: int
    account_id: str
    kind: str
    amount: int
    balance_after: int
    reference: str | None
    description: str
    refund_of: int | None
    created_at: datetime


def _entry(row: LedgerEntry) -> Entry:
    return Entry(
        id=row.id,
        account_id=row.account_id,
        kind=row.kind,
        amount=row.amount,
        balance_after=row.balance_after,
        reference=row.reference,
        description=row.description,
        refund_of=row.refund_of,
        created_at=row.created_at,
    )


async def balance(db: Database, account_id: str) -> int:
    """The account's balance. Raises NotFound."""
    async with db.session() as session:
        value = await session.scalar(select(Account.balance).where(Account.id == account_id))
    if value is None:
        raise NotFound(f"Account not found: {account_id}")
    return int(value)


# Largest single grant: keeps every balance far inside a signed 64-bit integer.
MAX_GRANT = 10**12

# Reads and writes here are Core statements on a plain connection: a debit and a settlement
# run on every chat turn and image, where the ORM unit of work cost more than the SQL itself.
Executor = AsyncSession | AsyncConnection

_ledger = cast(Table, LedgerEntry.__table__)
_accounts = cast(Table, Account.__table__)


async def _append(
    conn: Executor,
    *,
    account_id: str,
    kind: str,
    amount: int,
    balance_after: int,
    reference: str | None = None,
    description: str = "",
    refund_of: int | None = None,
) -> Entry:
    created_at = utcnow()
    entry_id = await conn.scalar(
        insert(_ledger)
        .values(
            account_id=account_id,
            kind=kind,
            amount=amount,
            balance_after=balance_after,
            reference=reference,
            description=description,
            refund_of=refund_of,
            created_at=created_at,
        )
        .returning(_ledger.c.id)
    )
    assert entry_id is not None
    return Entry(
        id=int(entry_id),
        account_id=account_id,
        kind=kind,
        amount=amount,
        balance_after=balance_after,
        reference=reference,
        description=description,
        refund_of=refund_of,
        created_at=created_at,
    )


async def grant(db: Database, account_id: str, amount: int, description: str = "grant") -> Entry:
    """Add credits. Raises BadRequest for an amount outside 1..MAX_GRANT, NotFound for no
    account."""
    if not 0 < amount <= MAX_GRANT:
        raise BadRequest(
            f"Invalid value for 'amount': must be a positive integer of at most {MAX_GRANT}"
        )
    async with db.engine.begin() as conn:
        new_balance = await conn.scalar(
            update(_accounts)
            .where(_accounts.c.id == account_id)
            .values(balance=_accounts.c.balance + amount)
            .returning(_accounts.c.balance)
        )
        if new_balance is None:
            raise NotFound(f"Account not found: {account_id}")
        return await _append(
            conn,
            account_id=account_id,
            kind="grant",
            amount=amount,
            balance_after=int(new_balance),
            description=description,
        )


async def debit(
    db: Database, account_id: str, amount: int, *, reference: str, description: str
) -> Entry:
    """Take ``amount`` credits, or nothing at all.

    Raises InsufficientCredits(required, available) when the balance can't cover it.
    """
    if amount < 0:
        raise ValueError("debit amount must be >= 0")
    async with db.engine.begin() as conn:
        new_balance = await conn.scalar(
            update(_accounts)
            .where(_accounts.c.id == account_id, _accounts.c.balance >= amount)
            .values(balance=_accounts.c.balance - amount)
            .returning(_accounts.c.balance)
        )
        if new_balance is None:
            available = await conn.scalar(
                select(_accounts.c.balance).where(_accounts.c.id == account_id)
            )
            if available is None:
                raise NotFound(f"Account not found: {account_id}")
            raise InsufficientCredits(required=amount, available=int(available))
        return await _append(
            conn,
            account_id=account_id,
            kind="debit",
            amount=-amount,
            balance_after=int(new_balance),
            reference=reference,
            description=description,
        )


async def refund(
    db: Database, debit_entry_id: int, *, amount: int | None = None, description: str = "refund"
) -> Entry | None:
    """Give back a debit (all of it, or ``amount`` of it) exactly once.

    Returns the refund entry, or None when that debit was already refunded (or ``amount``
    is 0). The unique ``refund_of`` column makes a second refund of one debit impossible,
    also when two workers race.
    """
    if amount == 0:
        return None  # nothing to give back (a chat turn that used all it reserved)
    try:
        async with db.engine.begin() as conn:
            return await refund_in(conn, debit_entry_id, amount=amount, description=description)
    except IntegrityError:
        return None


async def refund_in(
    conn: Executor,
    debit_entry_id: int,
    *,
    amount: int | None = None,
    description: str = "refund",
) -> Entry | None:
    """:func:`refund` inside the caller's transaction, so that the refund commits together
    with what caused it (a job ending failed or canceled). A concurrent duplicate makes the
    caller's commit fail on the unique ``refund_of``; one already committed returns None."""
    earlier = _ledger.alias("earlier")
    original = (
        await conn.execute(
            select(
                _ledger.c.account_id,
                _ledger.c.kind,
                _ledger.c.amount,
                _ledger.c.reference,
                select(earlier.c.id)
                .where(earlier.c.refund_of == _ledger.c.id)
                .scalar_subquery()
                .label("refunded_by"),
            ).where(_ledger.c.id == debit_entry_id)
        )
    ).first()
    if original is None or original.kind != "debit":
        raise NotFound(f"Debit entry not found: {debit_entry_id}")
    value = -original.amount if amount is None else amount
    if not 0 <= value <= -original.amount:
        raise ValueError(f"refund of {value} exceeds the debit of {-original.amount}")
    if value == 0 or original.refunded_by is not None:
        return None
    new_balance = await conn.scalar(
        update(_accounts)
        .where(_accounts.c.id == original.account_id)
        .values(balance=_accounts.c.balance + value)
        .returning(_accounts.c.balance)
    )
    return await _append(
        conn,
        account_id=original.account_id,
        kind="refund",
        amount=value,
        balance_after=int(new_balance or 0),
        reference=original.reference,
        description=description,
        refund_of=debit_entry_id,
    )


async def entries(
    db: Database, account_id: str, *, limit: int = 50, before_id: int | None = None
) -> list[Entry]:
    """Newest first; page with ``before_id`` = the last id of the previous page."""
    query = (
        select(LedgerEntry)
        .where(LedgerEntry.account_id == account_id)
        .order_by(LedgerEntry.id.desc())
        .limit(limit)
    )
    if before_id is not None:
        query = query.where(LedgerEntry.id < before_id)
    async with db.session() as session:
        return [_entry(row) for row in (await session.scalars(query)).all()]


async def ledger_sum(db: Database, account_id: str) -> int:
    """Sum of every entry's amount: always equal to the balance (an invariant tests check)."""
    async with db.session() as session:
        total = await session.scalar(
            select(func.coalesce(func.sum(LedgerEntry.amount), 0)).where(
                LedgerEntry.account_id == account_id
            )
        )
    return int(total or 0)
