"""The async engine and session factory for SQLite (WAL) or PostgreSQL.

SQLite lets one connection write at a time. Left to itself, a writer that finds the database
locked sleeps in SQLite's busy handler (1, 2, 5 ... 100 ms steps) and polls again; under
concurrent requests the connections spent most of their time asleep there. So writers in one
process queue on an asyncio lock instead: a connection takes it before its first write
statement (when pysqlite opens the transaction) and gives it back when that transaction
commits or rolls back, and the next writer starts the moment it is free. Other processes on
the same file (``hypereal migrate`` while serving) still meet the busy timeout.
"""

from __future__ import annotations

import asyncio
import sqlite3
from typing import Any

import aiosqlite
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.util import await_only

from hypereal.store.writer import FastStore


def is_sqlite(url: str) -> bool:
    return make_url(url).get_backend_name() == "sqlite"


def create_engine(url: str) -> AsyncEngine:
    """Create the engine; SQLite gets WAL, a busy timeout and foreign keys on every connection."""
    if not is_sqlite(url):
        # No pre-ping (3 round trips per checkout): connections are recycled instead, and the
        # hot statements run on asyncpg directly (store/writer.py).
        return create_async_engine(url, pool_size=10, max_overflow=20, pool_recycle=300)
    db_path = make_url(url).database
    if db_path and db_path != ":memory:":
        from pathlib import Path

        Path(db_path).parent.mkdir(parents=True, exist_ok=True)
    locks = _WriteLocks()
    parsed = make_url(url)
    connect_args, connect_kwargs = parsed.get_dialect()().create_connect_args(parsed)

    sqlite_connect: Any = sqlite3.connect  # the dialect's arguments, as aiosqlite would pass them

    def connect() -> aiosqlite.Connection:
        return _LockingConnection(lambda: sqlite_connect(*connect_args, **connect_kwargs), locks)

    engine = create_async_engine(
        url, pool_size=10, max_overflow=20, pool_timeout=120, async_creator=connect
    )

    @event.listens_for(engine.sync_engine, "before_cursor_execute")
    def _take_write_lock(conn: Any, _cursor: Any, statement: str, *_args: Any, **_kw: Any) -> None:
        driver = conn.connection.driver_connection
        if isinstance(driver, _LockingConnection) and not driver.writing:
            if statement.lstrip()[:7].upper().startswith(WRITE_STATEMENTS):
                await_only(driver.take_write_lock())

    @event.listens_for(engine.sync_engine, "connect")
    def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
        # Writers wait for each other instead of failing with "database is locked".
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.close()

    return engine


WRITE_STATEMENTS = ("INSERT", "UPDATE", "DELETE", "REPLACE", "CREATE", "DROP", "ALTER")
WRITE_LOCK_TIMEOUT = 60.0  # as long as the busy timeout


class _WriteLocks:
    """One asyncio lock per event loop (tests and ``hypereal migrate`` run their own loops)."""

    def __init__(self) -> None:
        self._locks: dict[asyncio.AbstractEventLoop, asyncio.Lock] = {}

    def get(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            for old in [old for old in self._locks if old.is_closed()]:
                del self._locks[old]
            lock = self._locks[loop] = asyncio.Lock()
        return lock


class _LockingConnection(aiosqlite.Connection):
    """An aiosqlite connection that holds the process's write lock from its first write
    statement until its transaction ends."""

    def __init__(self, connector: Any, locks: _WriteLocks) -> None:
        super().__init__(connector, iter_chunk_size=64)
        self._locks = locks
        self._held: asyncio.Lock | None = None

    @property
    def writing(self) -> bool:
        return self._held is not None

    async def take_write_lock(self) -> None:
        lock = self._locks.get()
        try:
            await asyncio.wait_for(lock.acquire(), WRITE_LOCK_TIMEOUT)
        except TimeoutError:
            raise sqlite3.OperationalError("database is locked") from None
        self._held = lock

    def _give_back(self) -> None:
        held, self._held = self._held, None
        if held is not None:
            held.release()

    async def commit(self) -> None:
        try:
            await super().commit()
        finally:
            self._give_back()

    async def rollback(self) -> None:
        try:
            await super().rollback()
        finally:
            self._give_back()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            self._give_back()


def session_factory(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


class Database:
    """The engine plus a session factory for the cold paths (admin, listings, migrations),
    and :class:`~hypereal.store.writer.FastStore` (``read`` / ``write`` / ``submit``) for the
    hot ones: one writer per process with group commit, raw SQL, one round trip each."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = create_engine(url)
        self.session = session_factory(self.engine)
        sqlite_path = make_url(url).database if is_sqlite(url) else None
        self.fast = FastStore(url, sqlite_path=sqlite_path or None)
        self.read = self.fast.read
        self.read_snapshot = self.fast.read_snapshot
        self.write = self.fast.write
        self.submit = self.fast.submit

    @property
    def is_sqlite(self) -> bool:
        return is_sqlite(self.url)

    async def dispose(self) -> None:
        await self.fast.close()
        await self.engine.dispose()
