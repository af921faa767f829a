"""The PostgreSQL writer on the real server: operations whose only write is a ``Sql.last``
run grouped (one pipelined statement per kind for a whole batch), the others in one
transaction, and a failing member of a group fails only its own caller."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from hypereal.domain import jobs, keys, ledger
from hypereal.domain.errors import InsufficientCredits, NotFound, Unauthorized
from hypereal.store.db import Database
from hypereal.store.ops import ConstraintViolation, Dialect, Ops, Sql
from tests.support.infra import migrated_postgres


@pytest.fixture
async def db() -> AsyncIterator[Database]:
    async with migrated_postgres() as database:
        yield database


def _record(db: Database, account: str, job_id: str, debit_id: int | None) -> Any:
    return jobs.record_completed(
        db,
        job_id=job_id,
        account_id=account,
        type="image",
        model="m",
        input={"prompt": "x"},
        credits=3,
        debit_entry_id=debit_id,
        output_url=None,
    )


def _rename(_: Dialect, account: str, name: str) -> Ops[int]:
    """An operation of two statements (not grouped): runs in the batch's transaction."""
    yield Sql.one("SELECT id FROM accounts WHERE id = :id FOR UPDATE", id=account)
    changed = yield Sql.run(
        "UPDATE accounts SET name = :name WHERE id = :id", id=account, name=name
    )
    return int(changed)


def _name(_: Dialect, account: str) -> Ops[str]:
    row = yield Sql.one("SELECT name FROM accounts WHERE id = :id", id=account)
    return str(row[0])


async def test_a_batch_of_grouped_and_plain_operations_each_gets_its_own_result(
    db: Database,
) -> None:
    rich = await keys.create_account(db, "rich")
    poor = await keys.create_account(db, "poor")
    await ledger.grant(db, rich, 100)
    await ledger.grant(db, poor, 5)
    # One event-loop turn: every write below is queued before the writer's next batch.
    results = await asyncio.gather(
        *(ledger.debit(db, rich, 10, reference=f"r{i}", description="d") for i in range(4)),
        ledger.debit(db, poor, 3, reference="p1", description="d"),
        ledger.debit(db, poor, 3, reference="p2", description="d"),  # 2 left: refused
        ledger.debit(db, "acct_missing", 1, reference="m", description="d"),
        db.write(_rename, rich, "renamed"),
        _record(db, rich, "res_a", None),
        _record(db, rich, "res_b", None),
        return_exceptions=True,
    )
    assert [r.balance_after for r in results[:4]] == [90, 80, 70, 60]  # type: ignore[union-attr]
    assert results[4].balance_after == 2  # type: ignore[union-attr]
    refused = results[5]
    assert isinstance(refused, InsufficientCredits)
    assert (refused.required, refused.available) == (3, 2)
    assert isinstance(results[6], NotFound)
    assert results[7] == 1
    assert {results[8].id, results[9].id} == {"res_a", "res_b"}  # type: ignore[union-attr]
    assert await ledger.balance(db, rich) == 60
    assert await ledger.ledger_sum(db, rich) == 60
    assert await ledger.balance(db, poor) == 2
    assert await ledger.ledger_sum(db, poor) == 2
    assert await db.read(_name, rich) == "renamed"


async def test_a_failing_member_of_a_group_fails_alone_and_the_rest_commit(db: Database) -> None:
    account = await keys.create_account(db, "dupes")
    await ledger.grant(db, account, 50)
    results = await asyncio.gather(
        _record(db, account, "res_same", None),
        ledger.debit(db, account, 5, reference="d1", description="d"),
        _record(db, account, "res_same", None),  # the same id: a unique violation
        _record(db, account, "res_other", None),
        ledger.debit(db, account, 5, reference="d2", description="d"),
        return_exceptions=True,
    )
    violations = [r for r in results if isinstance(r, ConstraintViolation)]
    assert len(violations) == 1  # one of the two res_same, the other is recorded
    assert results[3].id == "res_other"  # type: ignore[union-attr]
    assert sorted(r.balance_after for r in (results[1], results[4])) == [40, 45]  # type: ignore[union-attr]
    assert (await jobs.get_job(db, account, "res_same")).state == "completed"
    assert (await jobs.get_job(db, account, "res_other")).state == "completed"
    assert await ledger.balance(db, account) == 40
    assert await ledger.ledger_sum(db, account) == 40


async def test_reads_of_one_turn_are_answered_each_by_its_own_row(db: Database) -> None:
    """Key lookups and balance reads queued in one event-loop turn go in one round trip per
    statement: each caller still gets its own key, its own 401, its own NotFound."""
    accounts = [await keys.create_account(db, f"reader {i}") for i in range(3)]
    for i, account in enumerate(accounts):
        await ledger.grant(db, account, 10 + i)
    created = [await keys.create_key(db, account) for account in accounts]
    await keys.revoke_key(db, created[1].info.id)

    async def auth(secret: str) -> str:
        try:
            return (await keys.authenticate(db, f"Bearer {secret}")).account_id
        except Unauthorized as exc:
            return exc.message

    abandoned = asyncio.ensure_future(ledger.balance(db, accounts[0]))
    await asyncio.sleep(0)  # its read is queued for the end of the turn
    abandoned.cancel()  # and its caller goes away: the others still get their answers
    results = await asyncio.gather(
        *(auth(key.secret) for key in created),
        auth("ck_not_a_key"),
        *(ledger.balance(db, account) for account in accounts),
        ledger.balance(db, "acct_missing"),
        return_exceptions=True,
    )
    assert results[0] == accounts[0] and results[2] == accounts[2]
    assert results[1] == "Unauthorized. This API key has been revoked"
    assert results[3] == "Unauthorized. Invalid API key"
    assert results[4:7] == [10, 11, 12]
    assert isinstance(results[7], NotFound)
    assert await ledger.balance(db, accounts[1]) == 11


async def test_job_submissions_debit_and_insert_in_one_statement_exactly(db: Database) -> None:
    """On PostgreSQL a submission is one grouped statement (the debit, its ledger row and the
    job row): concurrent submissions spend the balance exactly, each job points at its own
    debit, and a refused one writes nothing and reports what is available."""
    account = await keys.create_account(db, "submitter")
    await ledger.grant(db, account, 100)

    def new() -> jobs.NewJob:
        return jobs.NewJob(
            account_id=account, type="video", model="noop-video", input={}, credits=7, media={}
        )

    results = await asyncio.gather(
        *(jobs.submit(db, new()) for _ in range(20)), return_exceptions=True
    )
    submitted = [r.job for r in results if isinstance(r, jobs.Submitted)]
    refused = [r for r in results if isinstance(r, InsufficientCredits)]
    assert len(submitted) == 100 // 7 and len(refused) == 20 - 100 // 7
    assert all(r.required == 7 and 0 <= r.available < 7 for r in refused)
    debits = {e.id: e for e in await ledger.entries(db, account) if e.kind == "debit"}
    assert len(debits) == len(submitted)
    for job in submitted:
        assert job.state == "queued" and job.credits == 7
        entry = debits[job.debit_entry_id]  # type: ignore[index]
        assert entry.reference == job.id and entry.amount == -7
    assert await ledger.balance(db, account) == 100 % 7
    assert await ledger.ledger_sum(db, account) == 100 % 7


async def test_a_group_lost_midway_keeps_the_results_of_the_groups_committed_before_it(
    db: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each group commits on its own: when the connection fails on a later group, the callers
    of an earlier one still get their (committed) debits, never an error for a write that
    stands; only the operations not yet run fail."""
    import asyncpg

    account = await keys.create_account(db, "midway")
    await ledger.grant(db, account, 30)
    fetchmany = asyncpg.Connection.fetchmany

    async def failing(self: asyncpg.Connection, query: str, args: Any, **kw: Any) -> Any:
        if query.startswith("INSERT INTO jobs"):
            raise asyncpg.InterfaceError("connection lost")
        return await fetchmany(self, query, args, **kw)

    monkeypatch.setattr(asyncpg.Connection, "fetchmany", failing)
    results = await asyncio.gather(
        ledger.debit(db, account, 10, reference="m1", description="d"),
        ledger.debit(db, account, 10, reference="m2", description="d"),
        _record(db, account, "res_lost", None),
        return_exceptions=True,
    )
    monkeypatch.undo()
    assert sorted(r.balance_after for r in results[:2]) == [10, 20]  # type: ignore[union-attr]
    assert isinstance(results[2], asyncpg.InterfaceError)
    assert await ledger.balance(db, account) == 10
    assert await ledger.ledger_sum(db, account) == 10
    assert await db.read(_job_count, account) == 0


def _job_count(_: Dialect, account: str) -> Ops[int]:
    row = yield Sql.one("SELECT count(*) FROM jobs WHERE account_id = :id", id=account)
    return int(row[0])


def _traced(_: Dialect, label: str, key: int | None) -> Ops[str]:
    """A plain operation that writes its steps, in the order they run, to ``trace``; with a
    ``key``, it takes that advisory lock between its two steps (a ``Sql.lock``)."""
    step = "INSERT INTO trace (label) VALUES (:label)"
    yield Sql.run(step, label=f"{label}:before")
    if key is not None:
        yield Sql.lock("SELECT pg_advisory_xact_lock(:key)", key=key)
    yield Sql.run(step, label=f"{label}:after")
    held = yield Sql.one(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()"
    )
    return f"{label}:{held[0]}"


async def test_a_batch_takes_its_locks_after_its_other_statements_in_key_order(
    db: Database,
) -> None:
    """In a batch's transaction the statements before each operation's lock run first, then
    the locks (sorted by key, the same key once) with what follows each, so a lock is held
    for the statements that need it and the commit only; every operation still gets its
    result, and all of it commits."""
    async with db.engine.begin() as conn:
        await conn.exec_driver_sql(
            "CREATE TABLE trace (seq bigserial PRIMARY KEY, label text NOT NULL)"
        )
    futures = [
        db.submit(_traced, "a", 7),
        db.submit(_traced, "b", None),
        db.submit(_traced, "c", 3),
        db.submit(_traced, "d", 7),
    ]
    results = await asyncio.gather(*futures)
    # a and d share the lock of key 7 (held once), c takes key 3: two locks held at the end.
    assert results == ["a:2", "b:0", "c:1", "d:2"]
    async with db.engine.connect() as conn:
        labels = [
            row[0] for row in await conn.exec_driver_sql("SELECT label FROM trace ORDER BY seq")
        ]
    assert labels == [
        "a:before",
        "b:before",
        "b:after",  # no lock: runs through in its turn
        "c:before",
        "d:before",
        "c:after",  # key 3 before key 7
        "a:after",
        "d:after",
    ]


async def test_an_operation_rolled_back_to_break_a_deadlock_runs_again(db: Database) -> None:
    """Another connection and an operation lock two accounts in opposite orders. PostgreSQL
    breaks the cycle by rolling back the operation (the other connection waits longer
    before it checks): the writer runs the operation again, and it commits."""
    import asyncpg

    first = await keys.create_account(db, "first")
    second = await keys.create_account(db, "second")
    dsn = db.url.replace("postgresql+asyncpg://", "postgresql://")
    other = await asyncpg.connect(dsn)
    runs = 0

    def rename_both(_: Dialect) -> Ops[None]:
        nonlocal runs
        runs += 1
        yield Sql.run("UPDATE accounts SET name = 'op' WHERE id = :id", id=second)
        yield Sql.run("UPDATE accounts SET name = 'op' WHERE id = :id", id=first)

    try:
        await other.execute("SET deadlock_timeout = '20s'")  # the writer's check comes first
        transaction = other.transaction()
        await transaction.start()
        await other.execute("UPDATE accounts SET name = 'other' WHERE id = $1", first)
        operation = asyncio.ensure_future(db.write(rename_both))
        for _ in range(200):  # until the operation waits for the first account's row
            waiting = await db.read(
                lambda _: (
                    yield Sql.one(
                        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND datname = current_database()"
                    )
                )
            )
            if waiting[0]:
                break
            await asyncio.sleep(0.02)
        # Now the other connection wants the second account: a cycle, found by the writer's
        # connection after its 1 s deadlock_timeout; the operation is rolled back.
        await other.execute("UPDATE accounts SET name = 'other' WHERE id = $1", second)
        await transaction.commit()
        await operation
    finally:
        await other.close()
    assert runs >= 2  # rolled back once at least, then run again
    assert await db.read(_name, first) == "op" and await db.read(_name, second) == "op"
