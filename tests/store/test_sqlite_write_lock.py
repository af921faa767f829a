"""SQLite writers in one process queue on the database's asyncio write lock (taken at the first
write statement, given back when the transaction ends) instead of sleeping in SQLite's busy
handler."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from hypereal.store import db as db_module
from hypereal.store.db import Database


async def _table(db: Database) -> None:
    async with db.engine.begin() as conn:
        await conn.execute(text("CREATE TABLE t (n INTEGER)"))


async def test_second_writer_waits_on_the_lock_until_the_first_commits(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    try:
        await _table(db)
        order: list[str] = []
        first_wrote = asyncio.Event()
        release_first = asyncio.Event()

        async def first() -> None:
            async with db.engine.begin() as conn:
                raw = await conn.get_raw_connection()
                assert raw.driver_connection.writing is False
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                assert raw.driver_connection.writing is True
                first_wrote.set()
                await release_first.wait()
                order.append("first commits")

        async def second() -> None:
            await first_wrote.wait()
            async with db.engine.begin() as conn:
                await conn.execute(text("SELECT count(*) FROM t"))  # reads do not wait
                order.append("second read")
                await conn.execute(text("INSERT INTO t VALUES (2)"))
                order.append("second wrote")

        tasks = [asyncio.create_task(first()), asyncio.create_task(second())]
        await first_wrote.wait()
        for _ in range(50):  # let the second writer reach the lock
            await asyncio.sleep(0.01)
        assert order == ["second read"]
        release_first.set()
        await asyncio.gather(*tasks)
        assert order == ["second read", "first commits", "second wrote"]
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM t ORDER BY n"))).scalars().all() == [
                1,
                2,
            ]
    finally:
        await db.dispose()


async def test_a_failed_transaction_gives_the_lock_back(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    try:
        await _table(db)

        async def failing() -> None:
            async with db.engine.begin() as conn:
                await conn.execute(text("INSERT INTO t VALUES (1)"))
                raise RuntimeError("boom")

        for _ in range(3):
            try:
                await failing()
            except RuntimeError:
                pass
        async with db.engine.begin() as conn:  # would wait 60 s on a lock never given back
            await asyncio.wait_for(conn.execute(text("INSERT INTO t VALUES (2)")), timeout=10)
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM t"))).scalars().all() == [2]
    finally:
        await db.dispose()


async def test_many_concurrent_writers_all_commit(tmp_path: Path) -> None:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    try:
        await _table(db)

        async def write(n: int) -> None:
            async with db.session.begin() as session:
                await session.execute(text("SELECT count(*) FROM t"))
                await session.execute(text("INSERT INTO t VALUES (:n)"), {"n": n})
                await session.execute(text("UPDATE t SET n = n WHERE n = :n"), {"n": n})

        await asyncio.gather(*(write(n) for n in range(200)))
        async with db.engine.connect() as conn:
            count = (await conn.execute(text("SELECT count(*) FROM t"))).scalar_one()
        assert count == 200
    finally:
        await db.dispose()


async def test_a_writer_that_cannot_get_the_lock_in_time_fails_as_locked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The wait is the lock's, not SQLite's busy handler (whose timeout is 60 s).
    monkeypatch.setattr(db_module, "WRITE_LOCK_TIMEOUT", 0.2)
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'w.db'}")
    try:
        await _table(db)
        async with db.engine.begin() as holder:
            await holder.execute(text("INSERT INTO t VALUES (1)"))
            async with db.engine.connect() as other:
                with pytest.raises(OperationalError, match="database is locked"):
                    await other.execute(text("INSERT INTO t VALUES (2)"))
                await other.rollback()
        async with db.engine.connect() as conn:
            assert (await conn.execute(text("SELECT n FROM t"))).scalars().all() == [1]
    finally:
        await db.dispose()
