"""PostgreSQL: the writer task with group commit and pooled one-round-trip reads on asyncpg
(:class:`PgStore`; see :mod:`hypereal.store.writer`)."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from hypereal.store.ops import (
    Ops,
    Sql,
    T,
    WriterClosed,
    _resolve,
    as_violation,
    log,
)

_NAMED = re.compile(r"(?<![:\w]):([A-Za-z_]\w*)")
# An operation that PostgreSQL rolls back to break a deadlock is run again this many times.
DEADLOCK_RETRIES = 2


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


@dataclass(frozen=True)
class _Paused:
    """An operation of a batch's transaction stopped at its first :meth:`Sql.lock`."""

    ops: Ops[Any]
    lock: Sql


async def _drive_to_lock(conn: Any, operation: Callable[[], Ops[T]]) -> T | _Paused:
    """Run ``operation`` until it ends (its value) or yields a :meth:`Sql.lock` (paused
    there, to be finished by :func:`_resume` once the batch's other statements ran)."""
    ops = operation()
    try:
        statement = next(ops)
        while not statement.takes_lock:
            statement = ops.send(await _pg_execute(conn, statement))
    except StopIteration as done:
        ops.close()
        return done.value  # type: ignore[no-any-return]
    except BaseException:
        ops.close()
        raise
    return _Paused(ops, statement)


def _lock_order(lock: Sql) -> tuple[str, tuple[Any, ...]]:
    return lock.text, tuple(sorted(lock.params.items()))


async def _resume(
    conn: Any, ops: Ops[T], statement: Sql, taken: set[tuple[str, tuple[Any, ...]]]
) -> T:
    """Finish a paused operation from its lock on; a lock already in ``taken`` (this
    transaction holds it) is not asked for again."""
    try:
        while True:
            result = None
            if statement.takes_lock:
                key = _lock_order(statement)
                if key not in taken:
                    await _pg_execute(conn, statement)
                    taken.add(key)
            else:
                result = await _pg_execute(conn, statement)
            statement = ops.send(result)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    finally:
        ops.close()


_GroupedRead = tuple[Callable[[], Ops[Any]], Ops[Any], Sql, "asyncio.Future[Any]"]


def _chain(done: asyncio.Future[Any], future: asyncio.Future[Any]) -> None:
    if future.done():
        return
    if done.cancelled():
        future.cancel()
    elif done.exception() is not None:
        future.set_exception(done.exception())  # type: ignore[arg-type]
    else:
        future.set_result(done.result())


async def _fetch_group(conn: Any, text: str, statements: list[Sql]) -> list[Any]:
    """Run one :meth:`Sql.last` statement for each of ``statements`` (its parameters) in one
    pipelined round trip; their rows, in order."""
    statement = _PgStatement.of(text)
    rows: list[Any] = await conn.fetchmany(
        statement.text, [[sql.params[name] for name in statement.names] for sql in statements]
    )
    if len(rows) != len(statements):  # a Sql.last that broke its contract
        raise AssertionError(f"{len(rows)} rows for {len(statements)} of {text!r}")
    return rows


async def _finish(conn: Any, ops: Ops[T], row: Any) -> tuple[bool, Any]:
    """Send an operation its grouped statement's (committed) row and run what it yields
    after it (reads, see :meth:`Sql.last`) one statement at a time."""
    try:
        statement = ops.send(row)
        while True:
            statement = ops.send(await _pg_execute(conn, statement))
    except StopIteration as done:
        return True, done.value
    except Exception as exc:
        return False, _pg_error(exc)
    finally:
        ops.close()


def _pg_error(exc: BaseException) -> BaseException:
    import asyncpg

    return as_violation(exc, asyncpg.IntegrityConstraintViolationError)


def asyncpg_dsn(url: str) -> str:
    """``postgresql+asyncpg://...`` (SQLAlchemy's form) as asyncpg takes it."""
    scheme, sep, rest = url.partition("://")
    return "postgresql" + sep + rest if "+" in scheme else url


async def _keep_session(connection: Any) -> None:
    """The pool's reset of a released connection: nothing more than asyncpg's own step
    before it (which rolls back a transaction left open). Our statements leave no session
    state (no SET, LISTEN, cursor or session-level advisory lock; the job claim's advisory
    lock is per transaction), so the default reset query (``RESET ALL``, ``UNLISTEN *`` ...)
    would only add a round trip to every read."""


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
        # Reads whose first statement is a Sql.last, by statement, until the turn ends.
        self._reads: dict[str, list[_GroupedRead]] = {}
        self._reads_flush: asyncio.Handle | None = None
        self._read_tasks: set[asyncio.Task[None]] = set()

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
                        reset=_keep_session,
                    )
        return self._pool

    async def read(self, operation: Callable[[], Ops[T]], *, snapshot: bool = False) -> T:
        if not snapshot:
            ops = operation()
            try:
                first = next(ops)
            except StopIteration as done:
                return done.value  # type: ignore[no-any-return]
            if first.final:
                return await self._read_grouped(operation, ops, first)
            ops.close()
        return await self._read_alone(operation, snapshot)

    async def _read_alone(self, operation: Callable[[], Ops[T]], snapshot: bool = False) -> T:
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

    def _read_grouped(
        self, operation: Callable[[], Ops[T]], ops: Ops[T], first: Sql
    ) -> asyncio.Future[T]:
        """Queue a read for the end of this event-loop turn, when every read of the same
        statement queued meanwhile goes in one pipelined round trip (a pooled read costs
        about 100 us of this process's CPU; one of a group of 64, 5 us)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._reads.setdefault(first.text, []).append((operation, ops, first, future))
        if self._reads_flush is None:
            self._reads_flush = loop.call_soon(self._flush_reads)
        return future

    def _flush_reads(self) -> None:
        self._reads_flush = None
        groups, self._reads = self._reads, {}
        task = asyncio.ensure_future(self._run_reads(groups))
        self._read_tasks.add(task)
        task.add_done_callback(self._read_tasks.discard)

    async def _run_reads(self, groups: dict[str, list[_GroupedRead]]) -> None:
        import asyncpg

        try:
            pool = await self.pool()
            async with pool.acquire() as conn:
                for text, members in groups.items():
                    live = [member for member in members if not member[3].done()]
                    for member in members:
                        if member[3].done():  # the caller went away
                            member[1].close()
                    if not live:
                        continue
                    try:
                        rows = await _fetch_group(conn, text, [sql for *_, sql, _ in live])
                    except (asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                        log.debug("grouped read of %d failed (%s); one by one", len(live), exc)
                        for operation, ops, _, future in live:
                            ops.close()
                            self._finish_alone(operation, future)
                        continue
                    for (_, ops, _, future), row in zip(live, rows, strict=True):
                        ok, value = await _finish(conn, ops, row)
                        _resolve([(future, ok, value)])
        except Exception as exc:
            for members in groups.values():
                for _, ops, _, future in members:
                    ops.close()
                    _resolve([(future, False, exc)])

    def _finish_alone(self, operation: Callable[[], Ops[Any]], future: asyncio.Future[Any]) -> None:
        task = asyncio.ensure_future(self._read_alone(operation))
        self._read_tasks.add(task)
        task.add_done_callback(self._read_tasks.discard)
        task.add_done_callback(lambda done: _chain(done, future))

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
        pool = await self.pool()
        async with pool.acquire() as conn:
            outcomes: list[tuple[bool, Any] | None] = [None] * len(batch)
            try:
                alone = await self._run_grouped(conn, batch, outcomes)
                if alone:
                    await self._run_in_transaction(conn, batch, alone, outcomes)
            except Exception as exc:  # e.g. the connection is lost midway
                # A group that committed before keeps its results (its callers' writes
                # stand: a debit must reach its caller, to be refunded if need be); the
                # operations not yet answered fail.
                outcomes = [(False, exc) if outcome is None else outcome for outcome in outcomes]
            finished = [outcome for outcome in outcomes if outcome is not None]
            assert len(finished) == len(batch)
            return finished

    async def _run_grouped(
        self,
        conn: Any,
        batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]],
        outcomes: list[tuple[bool, Any] | None],
    ) -> list[int]:
        """Run the operations whose first statement is a :meth:`Sql.last`, each such statement
        for all of them in one pipelined round trip; fill their ``outcomes``. Returns the
        positions of the others (and of a group that failed), to run one transaction."""
        import asyncpg

        groups: dict[str, list[tuple[int, Ops[Any], Sql]]] = {}
        others: list[int] = []
        for position, (operation, _) in enumerate(batch):
            try:
                ops = operation()
                first = next(ops)
            except StopIteration as done:  # wrote nothing
                outcomes[position] = (True, done.value)
                continue
            except Exception as exc:  # a domain error, raised before writing
                outcomes[position] = (False, exc)
                continue
            if first.final:
                groups.setdefault(first.text, []).append((position, ops, first))
            else:
                ops.close()
                others.append(position)
        for text, members in groups.items():
            try:
                rows = await _fetch_group(conn, text, [sql for _, _, sql in members])
            except asyncpg.PostgresError as exc:  # all rolled back: each alone, below
                log.debug("group of %d rolled back (%s); one by one", len(members), exc)
                for _, ops, _ in members:
                    ops.close()
                others.extend(position for position, _, _ in members)
                continue
            for (position, ops, _), row in zip(members, rows, strict=True):
                outcomes[position] = await _finish(conn, ops, row)
        return sorted(others)

    async def _run_in_transaction(
        self,
        conn: Any,
        batch: list[tuple[Callable[[], Any], asyncio.Future[Any]]],
        positions: list[int],
        outcomes: list[tuple[bool, Any] | None],
    ) -> None:
        import asyncpg

        if len(positions) > 1:
            try:
                done: dict[int, tuple[bool, Any]] = {}
                waiting: list[tuple[int, Ops[Any], Sql]] = []  # paused at a Sql.lock
                async with conn.transaction():
                    for position in positions:
                        try:
                            paused = await _drive_to_lock(conn, batch[position][0])
                        except asyncpg.PostgresError:
                            raise  # the transaction is aborted: re-run one by one
                        except Exception as exc:  # a domain error, raised before writing
                            done[position] = (False, exc)
                            continue
                        if isinstance(paused, _Paused):
                            waiting.append((position, paused.ops, paused.lock))
                        else:
                            done[position] = (True, paused)
                    # The locks last, in one order (see Sql.lock), each taken once.
                    waiting.sort(key=lambda entry: _lock_order(entry[2]))
                    taken: set[tuple[str, tuple[Any, ...]]] = set()
                    for position, ops, lock in waiting:
                        try:
                            done[position] = (True, await _resume(conn, ops, lock, taken))
                        except asyncpg.PostgresError:
                            raise
                        except Exception as exc:
                            done[position] = (False, exc)
                for position in positions:
                    outcomes[position] = done[position]
                return
            except asyncpg.PostgresError as exc:
                log.debug("group commit of %d rolled back (%s); one by one", len(positions), exc)
        for position in positions:
            for attempt in range(DEADLOCK_RETRIES + 1):
                try:
                    async with conn.transaction():
                        outcomes[position] = (True, await _drive_async(conn, batch[position][0]))
                except asyncpg.DeadlockDetectedError as exc:
                    # PostgreSQL chose this transaction to break a lock cycle with another
                    # process: nothing of it stands, and alone again it usually goes through.
                    outcomes[position] = (False, _pg_error(exc))
                    if attempt < DEADLOCK_RETRIES:
                        log.info("operation rolled back by a deadlock; running it again")
                        continue
                except Exception as exc:
                    outcomes[position] = (False, _pg_error(exc))
                break

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        while self._reads_flush is not None or self._read_tasks:
            await asyncio.gather(asyncio.sleep(0), *self._read_tasks, return_exceptions=True)
        if self._pool is not None:
            await self._pool.close()
