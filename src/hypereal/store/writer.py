"""The hot data path: one writer per process with group commit, and one-round-trip reads.

Every hot statement (key lookup, reserve, settle, job claim and transitions, webhook claims)
is written once, as an *operation*: a generator that yields :class:`Sql` statements and gets
their rows back. The same operation runs on SQLite and on PostgreSQL::

    def debit(d: Dialect, account_id: str, amount: int) -> Ops[int]:
        row = yield Sql.one("UPDATE accounts SET balance = balance - :n "
                            "WHERE id = :id AND balance >= :n RETURNING balance",
                            id=account_id, n=amount)
        ...

    balance = await db.write(debit, "acct_1", 3)

**Writes** are queued to the process's one writer, which takes every operation queued since
its last turn and runs them in one transaction (group commit); each caller awaits its own
result, delivered after the commit. No lock is held across an ``await``. An operation that
raises a domain error (``InsufficientCredits``) must do so before its first write; its
neighbours in the batch are unaffected. A database error (a constraint, a deadlock between
processes) rolls the batch back and the writer re-runs each of its operations alone, so one
bad operation fails only its own caller.

- SQLite: the operations of one event-loop turn are committed at the end of that turn on the
  loop's thread (``BEGIN IMMEDIATE`` ... ``COMMIT``; a failure that left writes behind
  runs the batch again with a savepoint per operation), by a connection that never waits;
  when the lock is taken, the batch goes to a writer thread that waits for it
  (:class:`SqliteWriter`). Other processes on the same file meet SQLite's
  file lock and busy timeout, so several API processes never overdraw: every debit is a
  conditional ``UPDATE`` inside an immediate transaction.
- PostgreSQL: the writer is a task on the event loop with an asyncpg connection; a debit is
  one statement (a CTE that updates the balance and appends the ledger row). Row locks make
  concurrent debits from any number of processes exact. An operation whose only write is
  its first statement marks it :meth:`Sql.last`; the writer runs that statement for all
  such operations of a batch in one pipelined round trip, its own implicit transaction, so
  a contended row (one account's balance) is locked for the server's few microseconds of
  work, not across the round trips of a whole batch. The other operations of the batch run
  one statement per round trip in one transaction.

**Reads** on SQLite run synchronously on the calling thread's own connection: an indexed
lookup in WAL mode takes microseconds and never waits for writers, far less than a hop to a
thread. On PostgreSQL they are one round trip on a pooled asyncpg connection (no
``pool_pre_ping``: a dead connection fails its statement, which is retried once on another).
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path
from typing import Any

from hypereal.store.ops import (
    POSTGRES,
    SQLITE,
    ConstraintViolation,
    Dialect,
    Fetch,
    Operation,
    Ops,
    P,
    Row,
    Sql,
    T,
    WriterClosed,
    as_datetime,
    from_json,
    log,
    rows_changed,
    to_json,
)
from hypereal.store.pg_writer import PgStore, asyncpg_dsn
from hypereal.store.sqlite_writer import SqliteWriter, _drive_sync, connect_sqlite

__all__ = [
    "POSTGRES",
    "SQLITE",
    "ConstraintViolation",
    "Dialect",
    "FastStore",
    "Fetch",
    "Operation",
    "Ops",
    "PgStore",
    "Row",
    "Sql",
    "SqliteWriter",
    "WriterClosed",
    "as_datetime",
    "asyncpg_dsn",
    "connect_sqlite",
    "from_json",
    "rows_changed",
    "to_json",
]


class FastStore:
    """The hot path's reads and writes for one database URL (either kind)."""

    def __init__(self, url: str, *, sqlite_path: str | None, pool_size: int = 10) -> None:
        self.dialect = SQLITE if sqlite_path is not None else POSTGRES
        self._sqlite_path = sqlite_path
        self._sqlite_writer = SqliteWriter(sqlite_path) if sqlite_path is not None else None
        self._readers = threading.local()
        self._reader_connections: list[sqlite3.Connection] = []
        self._readers_lock = threading.Lock()
        self._pg: dict[asyncio.AbstractEventLoop, PgStore] = {}
        self._dsn = asyncpg_dsn(url)
        self._pool_size = pool_size

    def _pg_store(self) -> PgStore:
        loop = asyncio.get_running_loop()
        store = self._pg.get(loop)
        if store is None:
            for old in [old for old in self._pg if old.is_closed()]:
                del self._pg[old]
            store = self._pg[loop] = PgStore(self._dsn, self._pool_size)
        return store

    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._readers, "conn", None)
        if conn is None:
            assert self._sqlite_path is not None
            Path(self._sqlite_path).parent.mkdir(parents=True, exist_ok=True)
            conn = connect_sqlite(self._sqlite_path, busy_timeout_ms=5000)
            self._readers.conn = conn
            with self._readers_lock:
                self._reader_connections.append(conn)
        return conn

    async def read(self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run a read-only operation (one round trip per statement)."""

        def bound() -> Ops[T]:
            return operation(self.dialect, *args, **kwargs)

        if self._sqlite_writer is not None:
            return _drive_sync(self._reader(), bound)
        return await self._pg_store().read(bound)

    async def read_snapshot(
        self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """:meth:`read` with every statement of the operation reading one snapshot of the
        database (a read transaction), for reads of several statements that must agree,
        e.g. a row and its children. Single-statement reads need no snapshot: use read."""

        def bound() -> Ops[T]:
            return operation(self.dialect, *args, **kwargs)

        if self._sqlite_writer is not None:
            conn = self._reader()
            conn.execute("BEGIN")
            try:
                return _drive_sync(conn, bound)
            finally:
                conn.execute("COMMIT")
        return await self._pg_store().read(bound, snapshot=True)

    def submit(
        self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs
    ) -> asyncio.Future[T]:
        """Queue a write operation for the next group commit; the future has its result.

        Once queued, the operation runs whatever happens to the future: cancelling a caller
        that awaits it does not undo a write (see :func:`hypereal.domain.ledger.debit`)."""

        def bound() -> Ops[T]:
            return operation(self.dialect, *args, **kwargs)

        writer = self._sqlite_writer
        return writer.submit(bound) if writer is not None else self._pg_store().submit(bound)

    async def write(self, operation: Operation[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """:meth:`submit` and wait for the result (shielded: the write stands either way)."""
        future = self.submit(operation, *args, **kwargs)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(_retrieve)
            raise

    async def close(self) -> None:
        if self._sqlite_writer is not None:
            await asyncio.to_thread(self._sqlite_writer.close)
        with self._readers_lock:
            connections, self._reader_connections = self._reader_connections, []
        for conn in connections:
            conn.close()
        self._readers = threading.local()
        stores, self._pg = list(self._pg.items()), {}
        for loop, store in stores:
            if loop is asyncio.get_running_loop():
                await store.close()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled() and future.exception() is not None:
        log.warning("a write whose caller went away failed: %s", future.exception())
