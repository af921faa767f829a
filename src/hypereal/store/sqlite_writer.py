"""SQLite: the process's one writer with group commit (:class:`SqliteWriter`) and the
synchronous statement driver reads use (see :mod:`hypereal.store.writer`)."""

from __future__ import annotations

import asyncio
import fcntl
import os
import sqlite3
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from hypereal.store.ops import (
    Ops,
    Sql,
    T,
    WriterClosed,
    _Pending,
    _resolve,
    as_violation,
    log,
)


def _sqlite_datetime(value: datetime) -> str:
    """A datetime parameter as SQLAlchemy's SQLite DateTime writes it (naive UTC,
    "YYYY-MM-DD HH:MM:SS.ffffff", microseconds always written), so both read each other's."""
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(" ", "microseconds")


# Registered for the process: sqlite3 adapts a datetime parameter from C, instead of a
# Python pass over every statement's parameters (a twentieth of a job's CPU). SQLAlchemy's
# SQLite dialect binds datetimes as strings itself, so its statements never reach this.
sqlite3.register_adapter(datetime, _sqlite_datetime)


def _sqlite_execute(conn: sqlite3.Connection, sql: Sql) -> Any:
    cursor = conn.execute(sql.text, sql.params)
    try:
        if sql.fetch == "one":
            # Read every row: a RETURNING statement finishes its writes only when stepped out.
            rows = cursor.fetchall()
            return rows[0] if rows else None
        if sql.fetch == "all":
            return cursor.fetchall()
        cursor.fetchall()
        return cursor.rowcount
    finally:
        cursor.close()


def _drive_sync(conn: sqlite3.Connection, operation: Callable[[], Ops[T]]) -> T:
    ops = operation()
    try:
        statement = next(ops)
        while True:
            statement = ops.send(_sqlite_execute(conn, statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        ops.close()


def connect_sqlite(path: str, *, busy_timeout_ms: int = 60000) -> sqlite3.Connection:
    """A connection in autocommit mode (transactions are explicit), WAL, rows by name."""
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    # Pages read through a shared mapping: a reader whose cache another connection's commit
    # invalidated re-reads without a system call per page.
    conn.execute("PRAGMA mmap_size=268435456")
    return conn


class WriteLock:
    """A lock between the writers of every process on one SQLite file: ``flock`` on a file
    beside it, one open file (so one lock) per thread that writes. SQLite's own lock still
    guards the data; this one only makes waiting cheap. A writer that finds SQLite's lock
    taken polls it, sleeping 1, 2, 5, 10... ms between tries (its busy handler), so two busy
    processes on one file lost milliseconds at every collision; a writer blocked in
    ``flock`` is woken by the kernel the moment the other lets go."""

    def __init__(self, database_path: str) -> None:
        self._fd = os.open(database_path + "-writelock", os.O_RDWR | os.O_CREAT, 0o600)

    def try_acquire(self) -> bool:
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True

    def acquire(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def release(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        os.close(self._fd)


class SqliteWriter:
    """The process's SQLite writer (see the module doc).

    Operations submitted during one turn of an event loop are committed together at the end
    of that turn, on the loop's own thread, by a connection that never waits for the lock
    (``busy_timeout=0``): with WAL and ``synchronous=NORMAL`` a commit is a few microseconds
    of file writes, far less than two thread hops. When the lock is taken (by another
    process, or by this writer's thread) the batch goes to the writer thread instead, which
    waits for the lock under the busy timeout. The loop's connection never checkpoints (a
    checkpoint syncs the file); the thread runs a passive checkpoint a second after writes.
    Writers of every process also take a :class:`WriteLock` around each transaction.
    """

    CHECKPOINT_AFTER = 1.0

    def __init__(self, path: str) -> None:
        self.path = path
        self._queue: list[_Pending] = []
        self._wake = threading.Condition()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._turns: dict[asyncio.AbstractEventLoop, list[_Pending]] = {}
        self._local = threading.local()
        self._local_connections: list[tuple[sqlite3.Connection, WriteLock]] = []
        self._unchecked = False

    def submit(self, operation: Callable[[], Any]) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if self._closing:
            raise WriterClosed("the database writer is closed")
        self._start_thread()
        turn = self._turns.get(loop)
        if turn is None:
            turn = self._turns[loop] = []
            loop.call_soon(self._commit_turn, loop)
        turn.append(_Pending(operation, loop, future))
        return future

    def _start_thread(self) -> None:
        if self._thread is None:
            with self._wake:
                if self._thread is None:
                    self._thread = threading.Thread(
                        target=self._run, name="hypereal-sqlite-writer", daemon=True
                    )
                    self._thread.start()

    def _enqueue(self, batch: list[_Pending]) -> None:
        with self._wake:
            if self._closing:
                error = WriterClosed("the database writer is closed")
                _resolve([(p.future, False, error) for p in batch])
                return
            self._queue.extend(batch)
            self._wake.notify()

    def _turn_connection(self) -> tuple[sqlite3.Connection, WriteLock]:
        local: tuple[sqlite3.Connection, WriteLock] | None = getattr(self._local, "conn", None)
        if local is None:
            conn = connect_sqlite(self.path, busy_timeout_ms=0)
            conn.execute("PRAGMA wal_autocheckpoint=0")
            local = self._local.conn = (conn, WriteLock(self.path))
            with self._wake:
                self._local_connections.append(local)
        return local

    def _commit_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._turns.pop(loop, [])
        if not batch:
            return
        try:
            conn, lock = self._turn_connection()
        except Exception as exc:
            _resolve([(p.future, False, exc) for p in batch])
            return
        if not lock.try_acquire():  # another writer is in a transaction: the thread waits
            self._enqueue(batch)
            return
        try:
            try:
                conn.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError:  # a writer outside the lock has the database
                self._enqueue(batch)
                return
            except Exception as exc:
                _resolve([(p.future, False, exc) for p in batch])
                return
            outcomes = self._commit(conn, batch, begun=True)
        finally:
            lock.release()
        _resolve([(p.future, ok, value) for p, (ok, value) in zip(batch, outcomes, strict=True)])
        if not self._unchecked:
            with self._wake:
                self._unchecked = True
                self._wake.notify()

    def close(self) -> None:
        with self._wake:
            self._closing = True
            self._wake.notify()
            thread = self._thread
            connections, self._local_connections = self._local_connections, []
        if thread is not None:
            thread.join()
        for conn, lock in connections:
            conn.close()
            lock.close()
        self._local = threading.local()

    def _run(self) -> None:
        conn = connect_sqlite(self.path)
        lock = WriteLock(self.path)
        try:
            while True:
                with self._wake:
                    while not self._queue and not self._closing:
                        if self._unchecked and not self._wake.wait(self.CHECKPOINT_AFTER):
                            break  # a second without work after loop-thread commits
                        if not self._unchecked:
                            self._wake.wait()
                    batch, self._queue = self._queue, []
                    checkpoint = self._unchecked and not batch
                    if checkpoint:
                        self._unchecked = False
                if checkpoint:
                    self._checkpoint(conn)
                    continue
                if not batch:
                    return  # closing, and nothing left to write
                lock.acquire()
                try:
                    outcomes = self._commit(conn, batch)
                finally:
                    lock.release()
                self._deliver(batch, outcomes)
        finally:
            self._checkpoint(conn)
            conn.close()
            lock.close()

    @staticmethod
    def _checkpoint(conn: sqlite3.Connection) -> None:
        try:
            conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        except sqlite3.Error as exc:  # busy or closing: the next one catches up
            log.debug("SQLite checkpoint skipped: %s", exc)

    def _commit(
        self, conn: sqlite3.Connection, batch: list[_Pending], *, begun: bool = False
    ) -> list[tuple[bool, Any]]:
        try:
            if not begun:
                conn.execute("BEGIN IMMEDIATE")
            if len(batch) == 1:  # alone in its transaction: no savepoint needed
                try:
                    outcome: tuple[bool, Any] = (True, _drive_sync(conn, batch[0].operation))
                except Exception as exc:
                    conn.execute("ROLLBACK")
                    return [(False, _sqlite_error(exc))]
                conn.execute("COMMIT")
                return [outcome]
            outcomes = self._run_batch(conn, batch)
            conn.execute("COMMIT")
            return outcomes
        except Exception as exc:  # the commit itself failed (I/O, lock timeout)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("SQLite group commit of %d operations failed: %s", len(batch), exc)
            error = _sqlite_error(exc)
            return [(False, error) for _ in batch]

    @staticmethod
    def _run_batch(conn: sqlite3.Connection, batch: list[_Pending]) -> list[tuple[bool, Any]]:
        """Run ``batch`` in the open transaction: every operation's outcome.

        An operation raises a domain error before its first write (the writer's contract),
        so the batch runs without a savepoint per operation; one whose failure left writes
        behind (a database error, or a domain error after a write: ``total_changes`` moved)
        sends the batch back to its start and runs it again with a savepoint around each
        operation, so that only that operation's writes are undone."""
        outcomes: list[tuple[bool, Any]] = []
        conn.execute("SAVEPOINT batch")
        for pending in batch:
            before = conn.total_changes
            try:
                outcomes.append((True, _drive_sync(conn, pending.operation)))
            except Exception as exc:
                if isinstance(exc, sqlite3.Error) or conn.total_changes != before:
                    break
                outcomes.append((False, _sqlite_error(exc)))
        else:
            conn.execute("RELEASE batch")
            return outcomes
        conn.execute("ROLLBACK TO batch")
        outcomes = []
        for pending in batch:
            conn.execute("SAVEPOINT op")
            try:
                outcomes.append((True, _drive_sync(conn, pending.operation)))
            except Exception as exc:
                conn.execute("ROLLBACK TO op")
                outcomes.append((False, _sqlite_error(exc)))
            conn.execute("RELEASE op")
        conn.execute("RELEASE batch")
        return outcomes

    @staticmethod
    def _deliver(batch: list[_Pending], outcomes: list[tuple[bool, Any]]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], bool, Any]]] = {}
        for pending, (ok, value) in zip(batch, outcomes, strict=True):
            by_loop.setdefault(pending.loop, []).append((pending.future, ok, value))
        for loop, results in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve, results)
            except RuntimeError:  # that loop is closed: nobody waits any more
                pass


def _sqlite_error(exc: Exception) -> BaseException:
    return as_violation(exc, sqlite3.IntegrityError)
