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
  loop's thread (``BEGIN IMMEDIATE`` ... ``COMMIT``, a savepoint per operation), by a
  connection that never waits; when the lock is taken, the batch goes to a writer thread
  that waits for it (:class:`SqliteWriter`). Other processes on the same file meet SQLite's
  file lock and busy timeout, so several API processes never overdraw: every debit is a
  conditional ``UPDATE`` inside an immediate transaction.
- PostgreSQL: the writer is a task on the event loop with an asyncpg connection; a debit is
  one statement (a CTE that updates the balance and appends the ledger row). Row locks make
  concurrent debits from any number of processes exact.

**Reads** on SQLite run synchronously on the calling thread's own connection: an indexed
lookup in WAL mode takes microseconds and never waits for writers, far less than a hop to a
thread. On PostgreSQL they are one round trip on a pooled asyncpg connection (no
``pool_pre_ping``: a dead connection fails its statement, which is retried once on another).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sqlite3
import threading
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, Literal, ParamSpec, TypeVar

log = logging.getLogger("hypereal.store")

P = ParamSpec("P")
T = TypeVar("T")

Row = Any  # sqlite3.Row or asyncpg.Record: both index by column name and position
Fetch = Literal["one", "all", "none"]


@dataclass(frozen=True)
class Sql:
    """One statement with ``:name`` parameters, and what to fetch of its result."""

    text: str
    params: dict[str, Any] = field(default_factory=dict)
    fetch: Fetch = "all"

    @classmethod
    def one(cls, text: str, **params: Any) -> Sql:
        """The first row (or None)."""
        return cls(text, params, "one")

    @classmethod
    def all(cls, text: str, **params: Any) -> Sql:
        """Every row."""
        return cls(text, params, "all")

    @classmethod
    def run(cls, text: str, **params: Any) -> Sql:
        """Nothing: the number of rows changed."""
        return cls(text, params, "none")


Ops = Generator[Sql, Any, T]


@dataclass(frozen=True)
class Dialect:
    pg: bool

    @property
    def greatest(self) -> str:
        """The two-argument maximum function (``max`` on SQLite)."""
        return "greatest" if self.pg else "max"


SQLITE = Dialect(pg=False)
POSTGRES = Dialect(pg=True)

Operation = Callable[Concatenate[Dialect, P], Ops[T]]


class ConstraintViolation(Exception):
    """A unique or foreign-key constraint refused a write (either database)."""


class WriterClosed(RuntimeError):
    pass


def to_json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, separators=(",", ":"))


def from_json(value: Any) -> Any:
    """A JSON column as read: text on both databases (the columns are ``json``)."""
    if value is None or not isinstance(value, str | bytes):
        return value
    return json.loads(value)


def as_datetime(value: Any) -> datetime | None:
    """A timestamp column as read: SQLite keeps naive UTC text, PostgreSQL an aware value."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def _sqlite_value(value: Any) -> Any:
    # The format SQLAlchemy's SQLite DateTime writes (naive UTC), so both read each other's.
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        return value.strftime("%Y-%m-%d %H:%M:%S.%f")
    return value


def _sqlite_params(params: dict[str, Any]) -> dict[str, Any]:
    # Most statements carry no timestamp: pass their parameters as they are.
    if not any(type(value) is datetime for value in params.values()):
        return params
    return {name: _sqlite_value(value) for name, value in params.items()}


def _sqlite_execute(conn: sqlite3.Connection, sql: Sql) -> Any:
    cursor = conn.execute(sql.text, _sqlite_params(sql.params))
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


@dataclass
class _Pending:
    operation: Callable[[], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]


def _resolve(results: list[tuple[asyncio.Future[Any], bool, Any]]) -> None:
    for future, ok, value in results:
        if future.done():
            continue  # the caller was cancelled; the write stands (see Database.write)
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)


class SqliteWriter:
    """The process's SQLite writer (see the module doc).

    Operations submitted during one turn of an event loop are committed together at the end
    of that turn, on the loop's own thread, by a connection that never waits for the lock
    (``busy_timeout=0``): with WAL and ``synchronous=NORMAL`` a commit is a few microseconds
    of file writes, far less than two thread hops. When the lock is taken (by another
    process, or by this writer's thread) the batch goes to the writer thread instead, which
    waits for the lock under the busy timeout. The loop's connection never checkpoints (a
    checkpoint syncs the file); the thread runs a passive checkpoint a second after writes.
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
        self._local_connections: list[sqlite3.Connection] = []
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

    def _turn_connection(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = connect_sqlite(self.path, busy_timeout_ms=0)
            conn.execute("PRAGMA wal_autocheckpoint=0")
            self._local.conn = conn
            with self._wake:
                self._local_connections.append(conn)
        return conn

    def _commit_turn(self, loop: asyncio.AbstractEventLoop) -> None:
        batch = self._turns.pop(loop, [])
        if not batch:
            return
        try:
            conn = self._turn_connection()
            conn.execute("BEGIN IMMEDIATE")
        except sqlite3.OperationalError:  # the lock is taken: the thread waits for it
            self._enqueue(batch)
            return
        except Exception as exc:
            _resolve([(p.future, False, exc) for p in batch])
            return
        outcomes = self._commit(conn, batch, begun=True)
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
        for conn in connections:
            conn.close()
        self._local = threading.local()

    def _run(self) -> None:
        conn = connect_sqlite(self.path)
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
                self._deliver(batch, self._commit(conn, batch))
        finally:
            self._checkpoint(conn)
            conn.close()

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
            outcomes: list[tuple[bool, Any]] = []
            for pending in batch:
                conn.execute("SAVEPOINT op")
                try:
                    outcomes.append((True, _drive_sync(conn, pending.operation)))
                except Exception as exc:
                    conn.execute("ROLLBACK TO op")
                    outcomes.append((False, _sqlite_error(exc)))
                conn.execute("RELEASE op")
            conn.execute("COMMIT")
            return outcomes
        except Exception as exc:  # the commit itself failed (I/O, lock timeout)
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            log.warning("SQLite group commit of %d operations failed: %s", len(batch), exc)
            error = _sqlite_error(exc)
            return [(False, error) for _ in batch]

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


def _sqlite_error(exc: Exception) -> Exception:
    if isinstance(exc, sqlite3.IntegrityError):
        violation = ConstraintViolation(str(exc))
        violation.__cause__ = exc
        return violation
    return exc


_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")


class _PgStatement:
    """A ``:name`` statement turned into asyncpg's ``$n`` form (cached per text)."""

    _cache: dict[str, _PgStatement] = {}

    def __init__(self, text: str) -> None:
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            name = match.group(1)
            if name not in names:
                names.append(name)
            return f"${names.index(name) + 1}"

        self.text = _NAMED.sub(number, text)
        self.names = names

    @classmethod
    def of(cls, text: str) -> _PgStatement:
        found = cls._cache.get(text)
        if found is None:
            found = cls._cache[text] = cls(text)
        return found


async def _pg_execute(conn: Any, sql: Sql) -> Any:
    statement = _PgStatement.of(sql.text)
    args = [sql.params[name] for name in statement.names]
    if sql.fetch == "one":
        return await conn.fetchrow(statement.text, *args)
    if sql.fetch == "all":
        return await conn.fetch(statement.text, *args)
    status: str = await conn.execute(statement.text, *args)
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


async def _drive_async(conn: Any, operation: Callable[[], Ops[T]]) -> T:
    ops = operation()
    try:
        statement = next(ops)
        while True:
            statement = ops.send(await _pg_execute(conn, statement))
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        ops.close()


def _pg_error(exc: BaseException) -> BaseException:
    import asyncpg

    if isinstance(exc, asyncpg.IntegrityConstraintViolationError):
        violation = ConstraintViolation(str(exc))
        violation.__cause__ = exc
        return violation
    return exc


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy's form) as asyncpg takes it."""
    scheme, sep, rest = url.partition("://")
    return "postgresql" + sep + rest if "+" in scheme else url


class PgStore:
    """asyncpg pool and writer task for one event loop (see the module doc)."""

    def __init__(self, dsn: str, pool_size: int) -> None:
        self.dsn = dsn
        self.pool_size = pool_size
        self._pool: Any = None
        self._opening: asyncio.Lock | None = None
        self._queue: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def pool(self) -> Any:
        if self._pool is None:
            if self._opening is None:
                self._opening = asyncio.Lock()
            async with self._opening:
                if self._pool is None:
                    import asyncpg

                    self._pool = await asyncpg.create_pool(
                        self.dsn,
                        min_size=1,
                        max_size=self.pool_size,
                        max_inactive_connection_lifetime=300,
                    )
        return self._pool

    async def read(self, operation: Callable[[], Ops[T]], *, snapshot: bool = False) -> T:
        import asyncpg

        pool = await self.pool()
        for attempt in (1, 2):
            try:
                async with pool.acquire() as conn:
                    if not snapshot:
                        return await _drive_async(conn, operation)
                    async with conn.transaction(isolation="repeatable_read", readonly=True):
                        return await _drive_async(conn, operation)
            except (asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError):
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def submit(self, operation: Callable[[], Any]) -> asyncio.Future[Any]:
        if self._closing:
            raise WriterClosed("the database writer is closed")
        future = asyncio.get_running_loop().create_future()
        self._queue.append((operation, future))
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="hypereal-pg-writer")
        return future

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            batch, self._queue = self._queue, []
            if not batch:
                if self._closing:
                    return
                continue
            try:
                outcomes = await self._commit(batch)
            except Exception as exc:  # could not even get a connection
                outcomes = [(False, exc) for _ in batch]
            _resolve(
                [
                    (future, ok, value)
                    for (_, future), (ok, value) in zip(batch, outcomes, strict=True)
                ]
            )

    async def _commit(
        self, batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]]
    ) -> list[tuple[bool, Any]]:
        import asyncpg

        pool = await self.pool()
        async with pool.acquire() as conn:
            if len(batch) > 1:
                try:
                    outcomes: list[tuple[bool, Any]] = []
                    async with conn.transaction():
                        for operation, _ in batch:
                            try:
                                outcomes.append((True, await _drive_async(conn, operation)))
                            except asyncpg.PostgresError:
                                raise  # the transaction is aborted: re-run one by one
                            except Exception as exc:  # a domain error, raised before writing
                                outcomes.append((False, exc))
                    return outcomes
                except asyncpg.PostgresError as exc:
                    log.debug("group commit of %d rolled back (%s); one by one", len(batch), exc)
            outcomes = []
            for operation, _ in batch:
                try:
                    async with conn.transaction():
                        outcomes.append((True, await _drive_async(conn, operation)))
                except Exception as exc:
                    outcomes.append((False, _pg_error(exc)))
            return outcomes

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()


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


def rows_changed(rows: Sequence[Row] | int) -> int:
    return rows if isinstance(rows, int) else len(rows)
