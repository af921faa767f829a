"""The ledger never overspends, sums to the balance, and refunds a debit at most once,
on SQLite and on the real PostgreSQL server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from hypereal.domain import keys, ledger
from hypereal.domain.errors import BadRequest, InsufficientCredits
from hypereal.services import Services
from hypereal.store.db import Database
from tests.support.infra import migrated_database


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with migrated_database(request.param, tmp_path) as database:
        yield database


async def test_debit_never_overspends_under_500_concurrent_debits(db: Database) -> None:
    account = await keys.create_account(db, "concurrency")
    await ledger.grant(db, account, 1000)
    cost = 7

    async def attempt(i: int) -> bool:
        try:
            await ledger.debit(db, account, cost, reference=f"r{i}", description="test")
            return True
        except InsufficientCredits:
            return False

    results = await asyncio.gather(*(attempt(i) for i in range(500)))
    successes = sum(results)
    assert successes == 1000 // cost
    balance = await ledger.balance(db, account)
    assert balance == 1000 - successes * cost
    assert balance >= 0
    assert await ledger.ledger_sum(db, account) == balance


async def test_insufficient_credits_charges_nothing_and_reports_amounts(db: Database) -> None:
    account = await keys.create_account(db, "poor")
    await ledger.grant(db, account, 10)
    with pytest.raises(InsufficientCredits) as caught:
        await ledger.debit(db, account, 69, reference="job", description="video")
    assert (caught.value.required, caught.value.available) == (69, 10)
    assert caught.value.body() == {"error": "Insufficient credits", "required": 69, "available": 10}
    assert await ledger.balance(db, account) == 10
    assert [e.kind for e in await ledger.entries(db, account)] == ["grant"]


async def test_refund_happens_exactly_once_even_when_raced(db: Database) -> None:
    account = await keys.create_account(db, "refunds")
    await ledger.grant(db, account, 100)
    entry = await ledger.debit(db, account, 40, reference="job_1", description="video")
    results = await asyncio.gather(*(ledger.refund(db, entry.id) for _ in range(20)))
    refunds = [r for r in results if r is not None]
    assert len(refunds) == 1
    assert refunds[0].amount == 40 and refunds[0].refund_of == entry.id
    assert await ledger.balance(db, account) == 100
    assert await ledger.ledger_sum(db, account) == 100


async def test_partial_refund_settles_a_reservation(db: Database) -> None:
    account = await keys.create_account(db, "settle")
    await ledger.grant(db, account, 50)
    reserved = await ledger.debit(db, account, 10, reference="chat_1", description="chat")
    refund = await ledger.refund(db, reserved.id, amount=7, description="settle")
    assert refund is not None and refund.balance_after == 47
    assert await ledger.refund(db, reserved.id) is None  # already settled once
    assert await ledger.balance(db, account) == 47


async def test_entries_are_paginated_newest_first(db: Database) -> None:
    account = await keys.create_account(db, "pages")
    for amount in range(1, 6):
        await ledger.grant(db, account, amount)
    first = await ledger.entries(db, account, limit=2)
    second = await ledger.entries(db, account, limit=2, before_id=first[-1].id)
    assert [e.amount for e in first] == [5, 4]
    assert [e.amount for e in second] == [3, 2]


@pytest.mark.parametrize("amount", [0, -1, ledger.MAX_GRANT + 1, 2**63])
async def test_grant_outside_1_to_max_is_refused_and_changes_nothing(
    services: Services, amount: int
) -> None:
    account = await keys.create_account(services.db, "bounded")
    await ledger.grant(services.db, account, ledger.MAX_GRANT)
    with pytest.raises(BadRequest):
        await ledger.grant(services.db, account, amount)
    balance = await ledger.balance(services.db, account)
    assert balance == ledger.MAX_GRANT and isinstance(balance, int)
    assert await ledger.ledger_sum(services.db, account) == balance


async def test_a_charge_settles_at_once_when_it_refunds_nothing(db: Database) -> None:
    """``Charge.settles_at_once``: no refund to write (all of the reservation used), or the
    charge settled already; then ``settle`` answers without waiting, so even a cancellation
    pending on the task does not stop it (the chat turn needs no shield then)."""
    from hypereal.domain.generation import Charge

    account = await keys.create_account(db, "at-once")
    await ledger.grant(db, account, 50)
    whole = await Charge.reserve(db, account, 10, reference="chat_a", label="chat")
    assert whole.settles_at_once(10) and whole.settles_at_once(None) and whole.settles_at_once(12)
    assert not whole.settles_at_once(3)
    answers: list[int] = []

    async def settle_with_a_cancel_pending() -> None:
        task = asyncio.current_task()
        assert task is not None
        task.cancel()
        answers.append(await whole.settle(10))

    with pytest.raises(asyncio.CancelledError):
        await asyncio.create_task(settle_with_a_cancel_pending())
    assert answers == [10] and whole.used == 10
    assert whole.settles_at_once(3) and await whole.settle(3) == 10  # the first call decided
    part = await Charge.reserve(db, account, 10, reference="chat_b", label="chat")
    assert not part.settles_at_once(4)
    assert await part.settle(4) == 4
    assert part.settles_at_once(0) and await part.settle(0) == 4
    assert await ledger.balance(db, account) == 50 - 10 - 4
    assert await ledger.ledger_sum(db, account) == 36
