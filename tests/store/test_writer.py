"""The SQLite writer: a turn's writes commit together on the loop's thread; when another
connection holds the lock they wait for it on the writer thread instead of failing; one
failing operation fails only its own caller."""

from __future__ import annotations

import asyncio
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import select

from hypereal.domain import keys, ledger
from hypereal.domain.errors import InsufficientCredits
from hypereal.store.db import Database
from hypereal.store.migrate import upgrade_to_head
from hypereal.store.models import Account
from hypereal.store.ops import ConstraintViolation, Dialect, Ops, Sql
from hypereal.store.sqlite_writer import WriteLock
from hypereal.store.writer import connect_sqlite


@pytest.fixture
async def db(tmp_path: Path) -> Database:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    await upgrade_to_head(database.engine)
    yield database  # type: ignore[misc]
    await database.dispose()


async def test_writes_wait_for_a_lock_held_by_another_connection(
    db: Database, tmp_path: Path
) -> None:
    account = await keys.create_account(db, "locked")
    await ledger.grant(db, account, 100)
    other = connect_sqlite(str(tmp_path / "w.db"))
    other.execute("BEGIN IMMEDIATE")  # another process holds the write lock
    debits = [
        asyncio.ensure_future(ledger.debit(db, account, 10, reference=f"r{i}", description="d"))
        for i in range(5)
    ]
    await asyncio.sleep(0.3)
    assert not any(d.done() for d in debits)  # waiting, not failed
    other.execute("COMMIT")
    other.close()
    entries = await asyncio.wait_for(asyncio.gather(*debits), timeout=30)
    assert [e.amount for e in entries] == [-10] * 5
    assert await ledger.balance(db, account) == 50
    assert await ledger.ledger_sum(db, account) == 50


async def test_writes_wait_for_the_write_lock_of_another_process(
    db: Database, tmp_path: Path
) -> None:
    """Another process's writer holds the flock beside the database (between its BEGIN and
    COMMIT): this process's writes neither fail nor start a transaction of their own (the
    loop's fast path sees the lock taken), and go through once it is let go."""
    account = await keys.create_account(db, "flocked")
    await ledger.grant(db, account, 100)
    other = WriteLock(str(tmp_path / "w.db"))
    assert other.try_acquire()
    debits = [
        asyncio.ensure_future(ledger.debit(db, account, 10, reference=f"f{i}", description="d"))
        for i in range(3)
    ]
    await asyncio.sleep(0.3)
    assert not any(d.done() for d in debits)  # waiting on the lock, not failed
    probe = connect_sqlite(str(tmp_path / "w.db"))
    probe.execute("BEGIN IMMEDIATE")  # SQLite's own lock is free: nobody began meanwhile
    probe.execute("ROLLBACK")
    probe.close()
    other.release()
    entries = await asyncio.wait_for(asyncio.gather(*debits), timeout=30)
    assert [e.amount for e in entries] == [-10] * 3
    assert await ledger.balance(db, account) == 70
    mine = WriteLock(str(tmp_path / "w.db"))
    assert mine.try_acquire()  # the writer let go of it after committing
    mine.release()
    mine.close()
    other.close()


async def test_one_turn_commits_together_and_a_refused_debit_fails_alone(db: Database) -> None:
    account = await keys.create_account(db, "turn")
    await ledger.grant(db, account, 25)
    results = await asyncio.gather(
        *(ledger.debit(db, account, 10, reference=f"t{i}", description="d") for i in range(3)),
        return_exceptions=True,
    )
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(refused) == 1 and (refused[0].required, refused[0].available) == (10, 5)
    assert await ledger.balance(db, account) == 5
    assert await ledger.ledger_sum(db, account) == 5


async def test_the_wal_is_checkpointed_after_loop_thread_commits(
    db: Database, tmp_path: Path
) -> None:
    account = await keys.create_account(db, "wal")
    await ledger.grant(db, account, 10_000)
    for i in range(200):
        await ledger.debit(db, account, 1, reference=f"w{i}", description="d")
    # Only the main file, without its WAL: it holds the writes once they are checkpointed.
    main_file, copy = tmp_path / "w.db", tmp_path / "main-only.db"
    balance = None
    for _ in range(60):  # the writer thread checkpoints a second after the writes
        await asyncio.sleep(0.1)
        copy.write_bytes(main_file.read_bytes())
        probe = sqlite3.connect(str(copy))
        try:
            row = probe.execute("SELECT balance FROM accounts WHERE id = ?", (account,)).fetchone()
        except sqlite3.OperationalError:  # not even the tables are in the main file yet
            row = None
        finally:
            probe.close()
        balance = row[0] if row else None
        if balance == 10_000 - 200:
            break
    assert balance == 10_000 - 200


async def test_a_snapshot_read_sees_one_state_of_the_database(db: Database, tmp_path: Path) -> None:
    """A write committed by another connection between an operation's two statements is
    seen by a plain read's second statement, never by a snapshot read's."""

    account = await keys.create_account(db, "snapshot")
    other = connect_sqlite(str(tmp_path / "w.db"))

    def op(_: Dialect) -> Ops[tuple[int, int]]:
        first = yield Sql.one("SELECT balance FROM accounts WHERE id = :id", id=account)
        other.execute("UPDATE accounts SET balance = balance + 1 WHERE id = ?", (account,))
        second = yield Sql.one("SELECT balance FROM accounts WHERE id = :id", id=account)
        return int(first["balance"]), int(second["balance"])

    try:
        plain = await db.read(op)
        snapshot = await db.read_snapshot(op)
    finally:
        other.close()
    assert plain[1] == plain[0] + 1  # the plain read saw the write in between
    assert snapshot[0] == snapshot[1] == plain[1]  # the snapshot read did not
    assert await ledger.balance(db, account) == plain[1] + 1


async def test_datetimes_written_by_the_writer_read_back_through_sqlalchemy(db: Database) -> None:
    account = await keys.create_account(db, "times")
    paris = timezone(timedelta(hours=1))
    when = datetime(2026, 3, 4, 5, 6, 7, 89, tzinfo=paris)  # 04:06:07.000089 UTC

    def stamp(dialect: Dialect) -> Ops[int]:
        changed: int = yield Sql.run(
            "UPDATE accounts SET created_at = :at WHERE id = :id", at=when, id=account
        )
        return changed

    assert await db.write(stamp) == 1
    async with db.session() as session:
        stored = (await session.execute(select(Account.created_at).filter_by(id=account))).scalar()
    assert stored == datetime(2026, 3, 4, 4, 6, 7, 89)  # naive UTC, microseconds kept
    raw = await db.read(
        lambda _: (yield Sql.one("SELECT created_at FROM accounts WHERE id = :id", id=account))
    )
    assert raw[0] == "2026-03-04 04:06:07.000089"  # SQLAlchemy's own SQLite format


def _rename_then(_: Dialect, account: str, name: str, then: str) -> Ops[str]:
    """Renames the account, then: ``ok``, a domain error (``raise``) or a database error
    (``duplicate``: the accounts' primary key) after that write."""
    yield Sql.run("UPDATE accounts SET name = :name WHERE id = :id", name=name, id=account)
    if then == "raise":
        raise ValueError("changed its mind after writing")
    if then == "duplicate":
        yield Sql.run(
            "INSERT INTO accounts (id, name, balance, created_at) "
            "SELECT id, name, balance, created_at FROM accounts WHERE id = :id",
            id=account,
        )
    return name


@pytest.mark.parametrize("then", ["raise", "duplicate"])
async def test_an_operation_failing_after_a_write_is_undone_alone(db: Database, then: str) -> None:
    """A batch runs without a savepoint per operation; an operation that fails after writing
    (a database error, or a domain error against the contract) has its writes undone while
    the batch's other operations commit and answer their callers."""
    first, second, third = [await keys.create_account(db, f"a{i}") for i in range(3)]
    results = await asyncio.gather(
        db.write(_rename_then, first, "one", "ok"),
        db.write(_rename_then, second, "two", then),
        db.write(_rename_then, third, "three", "ok"),
        return_exceptions=True,
    )
    assert results[0] == "one" and results[2] == "three"
    assert isinstance(results[1], ValueError if then == "raise" else ConstraintViolation)
    async with db.session() as session:
        names = dict((await session.execute(select(Account.id, Account.name))).all())
    assert (names[first], names[second], names[third]) == ("one", "a1", "three")
