"""The credits ledger: integer balances with append-only grant/debit/refund entries.

Every change is one transaction holding a conditional UPDATE of the balance and the ledger
row, so the balance never goes below zero under any concurrency, on SQLite and PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

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


async def grant(db: Database, account_id: str, amount: int, description: str = "grant") -> Entry:
    """Add credits. Raises BadRequest for a non-positive amount, NotFound for no account."""
    if amount <= 0:
        raise BadRequest("Invalid value for 'amount': must be a positive integer")
    async with db.session.begin() as session:
        new_balance = await session.scalar(
            update(Account)
            .where(Account.id == account_id)
            .values(balance=Account.balance + amount)
            .returning(Account.balance)
        )
        if new_balance is None:
            raise NotFound(f"Account not found: {account_id}")
        row = LedgerEntry(
            account_id=account_id,
            kind="grant",
            amount=amount,
            balance_after=new_balance,
            description=description,
            created_at=utcnow(),
        )
        session.add(row)
    return _entry(row)


async def debit(
    db: Database, account_id: str, amount: int, *, reference: str, description: str
) -> Entry:
    """Take ``amount`` credits, or nothing at all.

    Raises InsufficientCredits(required, available) when the balance can't cover it.
    """
    if amount < 0:
        raise ValueError("debit amount must be >= 0")
    async with db.session.begin() as session:
        new_balance = await session.scalar(
            update(Account)
            .where(Account.id == account_id, Account.balance >= amount)
            .values(balance=Account.balance - amount)
            .returning(Account.balance)
        )
        if new_balance is None:
            available = await session.scalar(
                select(Account.balance).where(Account.id == account_id)
            )
            if available is None:
                raise NotFound(f"Account not found: {account_id}")
            raise InsufficientCredits(required=amount, available=int(available))
        row = LedgerEntry(
            account_id=account_id,
            kind="debit",
            amount=-amount,
            balance_after=new_balance,
            reference=reference,
            description=description,
            created_at=utcnow(),
        )
        session.add(row)
    return _entry(row)


async def refund(
    db: Database, debit_entry_id: int, *, amount: int | None = None, description: str = "refund"
) -> Entry | None:
    """Give back a debit (all of it, or ``amount`` of it) exactly once.

    Returns the refund entry, or None when that debit was already refunded (or ``amount``
    is 0). The unique ``refund_of`` column makes a second refund of one debit impossible,
    also when two workers race.
    """
    try:
        async with db.session.begin() as session:
            return await refund_in(session, debit_entry_id, amount=amount, description=description)
    except IntegrityError:
        return None


async def refund_in(
    session: AsyncSession,
    debit_entry_id: int,
    *,
    amount: int | None = None,
    description: str = "refund",
) -> Entry | None:
    """:func:`refund` inside the caller's transaction, so that the refund commits together
    with what caused it (a job ending failed or canceled). A concurrent duplicate makes the
    caller's commit fail on the unique ``refund_of``; one already committed returns None."""
    original = await session.get(LedgerEntry, debit_entry_id)
    if original is None or original.kind != "debit":
        raise NotFound(f"Debit entry not found: {debit_entry_id}")
    value = -original.amount if amount is None else amount
    if not 0 <= value <= -original.amount:
        raise ValueError(f"refund of {value} exceeds the debit of {-original.amount}")
    if value == 0:
        return None
    done = await session.scalar(
        select(LedgerEntry.id).where(LedgerEntry.refund_of == debit_entry_id)
    )
    if done is not None:
        return None
    new_balance = await session.scalar(
        update(Account)
        .where(Account.id == original.account_id)
        .values(balance=Account.balance + value)
        .returning(Account.balance)
    )
    row = LedgerEntry(
        account_id=original.account_id,
        kind="refund",
        amount=value,
        balance_after=int(new_balance or 0),
        reference=original.reference,
        description=description,
        refund_of=original.id,
        created_at=utcnow(),
    )
    session.add(row)
    await session.flush()
    return _entry(row)


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
