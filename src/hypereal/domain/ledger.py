"""The credits ledger: integer balances with append-only grant/debit/refund entries.

Every change is one transaction holding a conditional UPDATE of the balance and the ledger
row, so the balance never goes below zero under any concurrency, on SQLite and PostgreSQL.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any, NoReturn, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from hypereal.domain import key_budget, keys
from hypereal.domain.errors import BadRequest, InsufficientCredits, NotFound
from hypereal.observability.logs import annotate
from hypereal.store.db import Database
from hypereal.store.models import Account, LedgerEntry, utcnow
from hypereal.store.writer import ConstraintViolation, Dialect, Ops, Sql, as_datetime


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
    key_id: str | None = None
    model: str | None = None


_ENTRY_FIELDS = tuple(field.name for field in fields(Entry))


def _entry(row: LedgerEntry) -> Entry:
    return Entry(**{name: getattr(row, name) for name in _ENTRY_FIELDS})


_BALANCE = "SELECT balance FROM accounts WHERE id = :account"


def balance_op(_: Dialect, account_id: str) -> Ops[int]:
    # One row every time (a Sql.last, read with the turn's other balance reads): NULL for
    # an unknown account.
    row = yield Sql.last(
        "SELECT (SELECT balance FROM accounts WHERE id = :account)", account=account_id
    )
    if row[0] is None:
        raise NotFound(f"Account not found: {account_id}")
    return int(row[0])


async def balance(db: Database, account_id: str) -> int:
    """The account's balance. Raises NotFound."""
    return await db.read(balance_op, account_id)


# Largest single grant: keeps every balance far inside a signed 64-bit integer.
MAX_GRANT = 10**12

# The job engine's transactions (domain/jobs.py) still refund through SQLAlchemy.
Executor = AsyncSession | AsyncConnection

_ledger = cast(Table, LedgerEntry.__table__)
_accounts = cast(Table, Account.__table__)

# The ledger's hot statements: operations for the process's writer (store/writer.py), so a
# debit or a settlement on every chat turn is a few microseconds of SQL in a group commit.
_INSERT_ENTRY = (
    "INSERT INTO ledger_entries (account_id, kind, amount, balance_after, reference, "
    "description, refund_of, created_at, key_id, model) VALUES (:account_id, :kind, :amount, "
    ":balance_after, :reference, :description, :refund_of, :created_at, :key_id, :model) "
    "RETURNING id"
)
# PostgreSQL: the conditional debit and its ledger row, as the first two CTEs of a statement
# (``entry`` holds the new row's id and balance after, or nothing when the balance could not
# cover it or the account does not exist). Parameters: amount, account, reference,
# description, created_at, key_id, model.
PG_DEBITED = (
    "WITH debited AS (UPDATE accounts SET balance = balance - :amount "
    "WHERE id = :account AND balance >= :amount RETURNING balance), "
    "entry AS (INSERT INTO ledger_entries (account_id, kind, amount, balance_after, reference, "
    "description, refund_of, created_at, key_id, model) SELECT :account, 'debit', -:amount, "
    "balance, :reference, :description, NULL, :created_at, :key_id, :model FROM debited "
    "RETURNING id, balance_after)"
)
# The debit in one statement (one round trip), one row every time (a Sql.last): the entry's
# id and balance after, or two NULLs.
_PG_DEBIT = PG_DEBITED + " SELECT (SELECT id FROM entry), (SELECT balance_after FROM entry)"


def _append(
    *,
    account_id: str,
    kind: str,
    amount: int,
    balance_after: int,
    reference: str | None = None,
    description: str = "",
    refund_of: int | None = None,
    key_id: str | None = None,
    model: str | None = None,
) -> Ops[Entry]:
    values: dict[str, Any] = dict(
        account_id=account_id,
        kind=kind,
        amount=amount,
        balance_after=balance_after,
        reference=reference,
        description=description,
        refund_of=refund_of,
        created_at=utcnow(),
        key_id=key_id,
        model=model,
    )
    row = yield Sql.one(_INSERT_ENTRY, **values)
    return Entry(id=int(row[0]), **values)


def grant_op(_: Dialect, account_id: str, amount: int, description: str) -> Ops[Entry]:
    row = yield Sql.one(
        "UPDATE accounts SET balance = balance + :amount WHERE id = :account RETURNING balance",
        amount=amount,
        account=account_id,
    )
    if row is None:
        raise NotFound(f"Account not found: {account_id}")
    return (
        yield from _append(
            account_id=account_id,
            kind="grant",
            amount=amount,
            balance_after=int(row[0]),
            description=description,
        )
    )


async def grant(db: Database, account_id: str, amount: int, description: str = "grant") -> Entry:
    """Add credits. Raises BadRequest for an amount outside 1..MAX_GRANT, NotFound for no
    account."""
    if not 0 < amount <= MAX_GRANT:
        raise BadRequest(
            f"Invalid value for 'amount': must be a positive integer of at most {MAX_GRANT}"
        )
    return await db.write(grant_op, account_id, amount, description)


@dataclass(frozen=True)
class Spender:
    """Who spends, for the ledger row: the API key (and whether it has a budget to reserve
    against) and the model."""

    key_id: str | None = None
    model: str | None = None
    budgeted: bool = False


NOBODY = Spender()


def spender(account_id: str, model: str | None) -> Spender:
    """The request's key (``keys.CALLER``) when it spends from ``account_id``, and ``model``.
    Raises ModelNotAllowed (403) when the key may not use ``model``."""
    if model is not None:
        annotate(model=model)
    caller = keys.CALLER.get()
    if caller is None or caller.account_id != account_id:
        return Spender(model=model)
    if model is not None:
        keys.check_model(model)
    return Spender(caller.key_id, model, caller.budgeted)


def debit_op(
    d: Dialect,
    account_id: str,
    amount: int,
    reference: str,
    description: str,
    by: Spender = NOBODY,
    *,
    last_write: bool = False,
) -> Ops[Entry]:
    """Take ``amount`` or nothing: a conditional UPDATE (balance >= amount) and the ledger row,
    and with a budgeted key, the reservation against the key's budget (key_budget.py).
    Raises KeyBudgetExceeded / InsufficientCredits / NotFound, having written nothing.
    ``last_write``: the operation writes nothing after the debit (see Sql.last)."""
    created_at = utcnow()
    if by.budgeted and by.key_id is not None:
        yield from key_budget.reserve_op(d, by.key_id, amount, created_at)
    try:
        return (
            yield from _debit_account(d, account_id, amount, reference, description, by, last_write)
        )
    except Exception:
        if by.budgeted and by.key_id is not None:  # undo the key's reservation
            yield from key_budget.release_op(d, by.key_id, amount, created_at)
        raise


def _debit_account(
    d: Dialect,
    account_id: str,
    amount: int,
    reference: str,
    description: str,
    by: Spender,
    last_write: bool,
) -> Ops[Entry]:
    created_at = utcnow()
    if d.pg:
        row = yield Sql(
            _PG_DEBIT,
            dict(
                amount=amount,
                account=account_id,
                reference=reference,
                description=description,
                created_at=created_at,
                key_id=by.key_id,
                model=by.model,
            ),
            "one",
            last_write,
        )
        if row[0] is not None:
            return Entry(
                id=int(row[0]),
                account_id=account_id,
                kind="debit",
                amount=-amount,
                balance_after=int(row[1]),
                reference=reference,
                description=description,
                refund_of=None,
                created_at=created_at,
                key_id=by.key_id,
                model=by.model,
            )
    else:
        row = yield Sql.one(
            "UPDATE accounts SET balance = balance - :amount "
            "WHERE id = :account AND balance >= :amount RETURNING balance",
            amount=amount,
            account=account_id,
        )
        if row is not None:
            return (
                yield from _append(
                    account_id=account_id,
                    kind="debit",
                    amount=-amount,
                    balance_after=int(row[0]),
                    reference=reference,
                    description=description,
                    key_id=by.key_id,
                    model=by.model,
                )
            )
    return (yield from refused_op(account_id, amount))


def refused_op(account_id: str, amount: int) -> Ops[NoReturn]:
    """The error for a debit of ``amount`` that the balance could not cover (read afresh:
    the debit's own snapshot may predate a concurrent commit). Raises NotFound or
    InsufficientCredits."""
    available = yield Sql.one(_BALANCE, account=account_id)
    if available is None:
        raise NotFound(f"Account not found: {account_id}")
    raise InsufficientCredits(required=amount, available=int(available[0]))


async def debit(
    db: Database,
    account_id: str,
    amount: int,
    *,
    reference: str,
    description: str,
    model: str | None = None,
) -> Entry:
    """Take ``amount`` credits, or nothing at all.

    Raises InsufficientCredits(required, available) when the balance can't cover it. The
    request's API key (``keys.CALLER``) is recorded with ``model``; its allow-list (403) and
    budget (KeyBudgetExceeded, 402) apply. A caller cancelled while the debit is queued does
    not lose the credits: the debit, which commits anyway, is refunded as soon as it has.
    """
    if amount < 0:
        raise ValueError("debit amount must be >= 0")
    by = spender(account_id, model)
    future = db.submit(debit_op, account_id, amount, reference, description, by, last_write=True)
    try:
        return await asyncio.shield(future)
    except asyncio.CancelledError:
        future.add_done_callback(lambda done: _refund_orphan(db, done))
        raise


_orphan_refunds: set[asyncio.Future[Any]] = set()


def _refund_orphan(db: Database, done: asyncio.Future[Entry]) -> None:
    if done.cancelled() or done.exception() is not None:
        return
    entry = done.result()
    refund = db.submit(
        refund_op, entry.id, None, "refund: the request was cancelled before it started"
    )
    _orphan_refunds.add(refund)
    refund.add_done_callback(_orphan_refunds.discard)


def refund_op(
    d: Dialect, debit_entry_id: int, amount: int | None, description: str
) -> Ops[Entry | None]:
    """Give back a debit (all of it, or ``amount`` of it) unless it was refunded already."""
    original = yield Sql.one(
        "SELECT l.account_id, l.kind, l.amount, l.reference, l.key_id, l.model, l.created_at, "
        "(SELECT e.id FROM ledger_entries e WHERE e.refund_of = l.id) AS refunded_by, "
        "(k.budget_daily IS NOT NULL OR k.budget_monthly IS NOT NULL "
        "OR k.budget_total IS NOT NULL) AS budgeted "
        "FROM ledger_entries l LEFT JOIN api_keys k ON k.id = l.key_id WHERE l.id = :id",
        id=debit_entry_id,
    )
    if original is None or original["kind"] != "debit":
        raise NotFound(f"Debit entry not found: {debit_entry_id}")
    debited = -int(original["amount"])
    value = debited if amount is None else amount
    if not 0 <= value <= debited:
        raise ValueError(f"refund of {value} exceeds the debit of {debited}")
    if value == 0 or original["refunded_by"] is not None:
        return None
    row = yield Sql.one(
        "UPDATE accounts SET balance = balance + :amount WHERE id = :account RETURNING balance",
        amount=value,
        account=original["account_id"],
    )
    if original["budgeted"]:
        debited_at = as_datetime(original["created_at"]) or utcnow()
        yield from key_budget.release_op(d, original["key_id"], value, debited_at)
    return (
        yield from _append(
            account_id=original["account_id"],
            kind="refund",
            amount=value,
            balance_after=int(row[0]),
            reference=original["reference"],
            description=description,
            refund_of=debit_entry_id,
            key_id=original["key_id"],
            model=original["model"],
        )
    )


async def refund(
    db: Database, debit_entry_id: int, *, amount: int | None = None, description: str = "refund"
) -> Entry | None:
    """Give back a debit (all of it, or ``amount`` of it) exactly once.

    Returns the refund entry, or None when that debit was already refunded (or ``amount``
    is 0). The unique ``refund_of`` column makes a second refund of one debit impossible,
    also when two workers race.
    """
    return await asyncio.shield(submit_refund(db, debit_entry_id, amount, description))


def submit_refund(
    db: Database, debit_entry_id: int, amount: int | None, description: str
) -> asyncio.Future[Entry | None]:
    """:func:`refund` queued to the writer, no task: the future has its answer. The refund
    commits whatever happens to those awaiting it."""
    refunded: asyncio.Future[Entry | None] = asyncio.get_running_loop().create_future()
    if amount == 0:  # nothing to give back (a chat turn that used all it reserved)
        refunded.set_result(None)
        return refunded

    def written(write: asyncio.Future[Entry | None]) -> None:
        if write.cancelled():  # the writer shut down before running it
            refunded.cancel()
        elif write.exception() is None:
            refunded.set_result(write.result())
        elif isinstance(write.exception(), ConstraintViolation):
            refunded.set_result(None)  # refunded already, by someone else
        else:
            refunded.set_exception(write.exception())  # type: ignore[arg-type]

    db.submit(refund_op, debit_entry_id, amount, description).add_done_callback(written)
    return refunded


async def refund_in(
    conn: Executor,
    debit_entry_id: int,
    *,
    amount: int | None = None,
    description: str = "refund",
) -> Entry | None:
    """:func:`refund` inside the caller's SQLAlchemy transaction, so that the refund commits
    together with what caused it (a job ending failed or canceled). A concurrent duplicate
    makes the caller's commit fail on the unique ``refund_of``; one already committed returns
    None."""
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
    values: dict[str, Any] = dict(
        account_id=original.account_id,
        kind="refund",
        amount=value,
        balance_after=int(new_balance or 0),
        reference=original.reference,
        description=description,
        refund_of=debit_entry_id,
        created_at=utcnow(),
    )
    entry_id = await conn.scalar(insert(_ledger).values(**values).returning(_ledger.c.id))
    assert entry_id is not None
    return Entry(id=int(entry_id), **values)


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
