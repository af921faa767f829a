"""The operation language of the store's hot path (see :mod:`hypereal.store.writer`): an
operation is a generator yielding :class:`Sql` statements for a :class:`Dialect`, plus the
value conversions both databases share and the bookkeeping both writers use."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
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
    final: bool = False
    takes_lock: bool = False

    @classmethod
    def one(cls, text: str, **params: Any) -> Sql:
        """The first row (or None)."""
        return cls(text, params, "one")

    @classmethod
    def last(cls, text: str, **params: Any) -> Sql:
        """Exactly one row, from a statement after which the operation writes nothing.

        When it is an operation's first statement, the PostgreSQL store runs it together
        with the same statement of other such operations, in one pipelined round trip
        (asyncpg's ``fetchmany``): a write batch's, committed together (its own implicit
        transaction, so no lock is held across a round trip), or the reads queued in one
        event-loop turn. The statement must return exactly one row every time (``INSERT ...
        RETURNING``, a ``LEFT JOIN`` onto a one-row ``SELECT`` of the parameters, or a
        ``SELECT`` of scalar subqueries, over a data-modifying ``WITH`` for a write), so that
        the rows map back to their operations; statements the operation yields after it run
        after that commit, so they must only read. SQLite runs it like any other."""
        return cls(text, params, "one", True)

    @classmethod
    def lock(cls, text: str, **params: Any) -> Sql:
        """A transaction-scoped lock (``pg_advisory_xact_lock``), held to the commit.

        In a write batch's transaction the PostgreSQL store runs the operation up to this
        statement, then the other operations of the batch, and only then the locks (in the
        order of their parameters, so that two batches never wait on each other's locks) and
        what each operation yields after its lock: the lock is held for the statements that
        need it and the commit, not across the round trips of the whole batch. The same lock
        asked for again in that transaction is not taken twice. So the operation must not
        count on statements of its own after the lock running right after those before it,
        only on what the lock guards. The result is None; SQLite runs it like any other."""
        return cls(text, params, "none", takes_lock=True)

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

    @property
    def skip_locked(self) -> str:
        """A row-locking clause for a sub-``SELECT`` that picks a row to update: on
        PostgreSQL a row another transaction holds is passed over instead of waited for
        (SQLite has one writer at a time: nothing to add)."""
        return " FOR UPDATE SKIP LOCKED" if self.pg else ""


SQLITE = Dialect(pg=False)
POSTGRES = Dialect(pg=True)

Operation = Callable[Concatenate[Dialect, P], Ops[T]]


class ConstraintViolation(Exception):
    """A unique or foreign-key constraint refused a write (either database)."""


def as_violation(
    exc: BaseException, driver_violation: type[BaseException] | tuple[type[BaseException], ...]
) -> BaseException:
    """``exc`` as a ConstraintViolation (caused by it) when it is the driver's
    ``driver_violation``; any other error as it is."""
    if isinstance(exc, driver_violation):
        violation = ConstraintViolation(str(exc))
        violation.__cause__ = exc
        return violation
    return exc


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


def rows_changed(rows: Sequence[Row] | int) -> int:
    return rows if isinstance(rows, int) else len(rows)
