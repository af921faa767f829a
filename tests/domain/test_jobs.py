"""The job state machine on its own (``domain/jobs.py``), on a real SQLite database and on a
real PostgreSQL database (where claims take the model's advisory lock, and an end hands its
slot over without it): submit
debits, claim takes a free slot of the model or leaves the job queued, each end is reached
once, failures and cancels refund exactly once, the oldest queued job is handed the slot an
ending job frees, and leases expire into a re-queue."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from hypereal.domain import job_maintenance as maintenance
from hypereal.domain import jobs, keys, ledger
from hypereal.domain.errors import Conflict, InsufficientCredits, JobNotFound
from hypereal.store.db import Database
from hypereal.store.models import utcnow
from tests.support.infra import migrated_database, migrated_postgres


@pytest.fixture(params=["sqlite", "postgresql"])
async def db(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Database]:
    async with migrated_database(request.param, tmp_path) as database:
        yield database


async def account(db: Database, credits: int = 100) -> str:
    account_id = await keys.create_account(db, "jobs")
    if credits:
        await ledger.grant(db, account_id, credits)
    return account_id


async def submit(
    db: Database, account_id: str, *, model: str = "m", credits: int = 10, webhook: bool = False
) -> jobs.JobView:
    submitted = await jobs.submit(
        db,
        jobs.NewJob(
            account_id=account_id,
            type="video",
            model=model,
            input={"prompt": "x"},
            credits=credits,
            media={},
            webhook_url="https://example.com/hook" if webhook else None,
        ),
    )
    return submitted.job


def complete_taking(
    db: Database, job_id: str, worker: str = "w1", slots: int = 1
) -> Coroutine[Any, Any, jobs.Ended | None]:
    """Complete ``worker``'s job, taking the model's next queued job for that worker."""
    return jobs.complete_job(
        db,
        job_id,
        worker,
        output_url="u",
        output_key="k",
        result=None,
        take_next=jobs.Taker(worker, lease_seconds=60, concurrency=slots),
    )


@dataclass(frozen=True)
class Claimed:
    """A claim's answer, told apart for the tests: ``claimed`` (``job`` set), ``busy`` (the
    job is still queued: its model had no free slot) or ``gone`` (not a queued job of
    that model)."""

    outcome: str
    job: jobs.JobView | None = None


async def claim(
    db: Database, job_id: str, worker: str = "w1", limit: int = 1, model: str = "m"
) -> Claimed:
    job = await jobs.claim_job(db, job_id, model, worker, concurrency=limit, lease_seconds=60)
    if job is not None:
        return Claimed("claimed", job)
    now = await jobs.load_job(db, job_id)
    waiting = now is not None and now.state == "queued" and now.model == model
    return Claimed("busy" if waiting else "gone")


async def test_submit_debits_and_queues(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner)
    assert (job.state, job.credits, job.attempts, job.worker_id) == ("queued", 10, 0, None)
    assert job.debit_entry_id is not None
    assert await ledger.balance(db, owner) == 90
    assert await jobs.get_job(db, owner, job.id) == job


async def test_submit_without_the_credits_writes_nothing(db: Database) -> None:
    owner = await account(db, credits=5)
    with pytest.raises(InsufficientCredits):
        await submit(db, owner)
    assert await ledger.balance(db, owner) == 5
    assert await jobs.list_jobs(db, owner, limit=10) == []


async def test_claim_takes_a_free_slot_once(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner)
    # A message naming another model claims nothing.
    assert (await claim(db, job.id, model="other")).outcome == "gone"
    unchanged = await jobs.load_job(db, job.id)
    assert unchanged is not None and unchanged.state == "queued"
    first = await claim(db, job.id)
    assert first.outcome == "claimed" and first.job is not None
    assert (first.job.state, first.job.worker_id, first.job.attempts) == ("processing", "w1", 1)
    # A redelivered message, or another worker: the job is not queued any more.
    assert (await claim(db, job.id, "w2")).outcome == "gone"


async def test_a_full_model_leaves_the_job_queued_and_an_ending_job_hands_over_its_slot(
    db: Database,
) -> None:
    owner = await account(db)
    running, waiting, other_model = (
        await submit(db, owner),
        await submit(db, owner),
        await submit(db, owner, model="other"),
    )
    assert (await claim(db, running.id)).outcome == "claimed"
    assert (await claim(db, waiting.id)).outcome == "busy"  # one slot, taken: it waits
    assert (
        await claim(db, other_model.id, model="other")
    ).outcome == "claimed"  # slots are per model
    ended = await jobs.complete_job(
        db, running.id, "w1", output_url="http://x/o.mp4", output_key="o.mp4", result=None
    )
    assert ended is not None and ended.job.state == "completed"
    assert ended.next_job_id == waiting.id  # the waiting job is sent again
    assert (await claim(db, waiting.id)).outcome == "claimed"


async def test_an_ending_job_takes_the_oldest_queued_job_for_its_worker(db: Database) -> None:
    owner = await account(db)
    running, first, second = [await submit(db, owner) for _ in range(3)]
    assert (await claim(db, running.id)).outcome == "claimed"
    assert [(await claim(db, job.id)).outcome for job in (first, second)] == ["busy", "busy"]
    taker = jobs.Taker("w1", lease_seconds=60, concurrency=1)
    ended = await jobs.complete_job(
        db, running.id, "w1", output_url="u", output_key="k", result=None, take_next=taker
    )
    assert ended is not None and ended.next_job_id is None  # claimed, not sent
    assert ended.taken is not None and ended.taken.id == first.id  # the oldest queued job
    assert (ended.taken.state, ended.taken.worker_id, ended.taken.attempts) == (
        "processing",
        "w1",
        1,
    )
    assert await jobs.load_job(db, first.id) == ended.taken
    assert (await claim(db, first.id, "w2")).outcome == "gone"  # a late message finds it taken
    # A failure takes the next one the same way; its refund commits with it.
    failed = await jobs.fail_job(db, first.id, "boom", worker_id="w1", take_next=taker)
    assert failed is not None and failed.job.refund_entry_id is not None
    assert failed.taken is not None and failed.taken.id == second.id
    assert await ledger.balance(db, owner) == 80  # two charged, the failed one refunded


async def test_a_taker_takes_no_job_beyond_the_models_slots(db: Database) -> None:
    owner = await account(db)
    a, b, waiting = [await submit(db, owner) for _ in range(3)]
    assert (await claim(db, a.id, "w1", limit=2)).outcome == "claimed"
    assert (await claim(db, b.id, "w2", limit=2)).outcome == "claimed"
    assert (await claim(db, waiting.id, "w1", limit=2)).outcome == "busy"
    # The slot count fell to 1 (configuration changed): w1's end frees no slot for the queued
    # job while w2's job still runs, and w2's end then hands it over.
    narrow = jobs.Taker("w1", lease_seconds=60, concurrency=1)
    ended = await jobs.complete_job(
        db, a.id, "w1", output_url="u", output_key="k", result=None, take_next=narrow
    )
    assert ended is not None and ended.taken is None and ended.next_job_id is None
    still = await jobs.load_job(db, waiting.id)
    assert still is not None and still.state == "queued"
    ended = await jobs.complete_job(
        db,
        b.id,
        "w2",
        output_url="u",
        output_key="k",
        result=None,
        take_next=jobs.Taker("w2", lease_seconds=60, concurrency=1),
    )
    assert ended is not None and ended.taken is not None and ended.taken.id == waiting.id


async def test_the_sweep_resends_lost_messages_only_into_free_slots(db: Database) -> None:
    """Queued jobs whose message may be lost are sent again, oldest first, no more of a
    model than it has free slots: a busy model's jobs are taken by its enders instead."""
    owner = await account(db, credits=1000)
    running = await submit(db, owner)  # model m: 2 slots, 1 taken
    waiting = [await submit(db, owner) for _ in range(3)]
    other = [await submit(db, owner, model="other") for _ in range(2)]  # 1 slot, free
    full = await submit(db, owner, model="full")  # 1 slot, taken
    full_waiting = await submit(db, owner, model="full")
    assert (await claim(db, running.id, limit=2)).outcome == "claimed"
    assert (await claim(db, full.id, model="full")).outcome == "claimed"
    slots = {"m": 2, "other": 1, "full": 1}.__getitem__
    await asyncio.sleep(0.01)
    submitted_before = utcnow()
    await asyncio.sleep(0.01)

    resent = await maintenance.jobs_to_resend(db, kicked_before=submitted_before, slots=slots)
    assert sorted(resent) == sorted([(waiting[0].id, "m"), (other[0].id, "other")])
    # Those two are marked as sent now: the next sweep with that cutoff takes the next ones.
    again = await maintenance.jobs_to_resend(db, kicked_before=submitted_before, slots=slots)
    assert sorted(again) == sorted([(waiting[1].id, "m"), (other[1].id, "other")])
    # At start-up every queued job counts, still no more of a model than its free slots.
    startup = await maintenance.jobs_to_resend(db, kicked_before=None, slots=slots)
    assert sorted(startup) == sorted([(waiting[0].id, "m"), (other[0].id, "other")])
    assert full_waiting.id not in {job_id for job_id, _ in resent + again + startup}


async def test_a_job_submitted_to_a_busy_model_is_not_sent_and_an_end_takes_it(
    db: Database,
) -> None:
    """With the model's slot count, a job whose model has no free slot as it is inserted is
    not sent (no queue message, no claim): the next end takes it; and the lease sweep sends
    such a job at once once its model has a free slot."""
    owner = await account(db)

    def new() -> jobs.NewJob:
        return jobs.NewJob(
            account_id=owner, type="video", model="m", input={}, credits=10, media={}, slots=1
        )

    first = await jobs.submit(db, new())
    assert first.send  # a free slot: sent
    assert (await claim(db, first.job.id)).outcome == "claimed"
    second = await jobs.submit(db, new())
    assert not second.send and second.job.state == "queued"
    a_while_ago = utcnow() - timedelta(hours=1)
    # Still busy: the sweep leaves it to the end; with a second slot it is due at once.
    assert await maintenance.jobs_to_resend(db, kicked_before=a_while_ago, slots={"m": 1}.get) == []
    due = await maintenance.jobs_to_resend(db, kicked_before=a_while_ago, slots={"m": 2}.get)
    assert due == [(second.job.id, "m")]
    taker = jobs.Taker("w1", lease_seconds=60, concurrency=1)
    ended = await jobs.complete_job(
        db, first.job.id, "w1", output_url="u", output_key="k", result=None, take_next=taker
    )
    assert ended is not None and ended.taken is not None and ended.taken.id == second.job.id


async def test_two_slots_run_two_jobs_of_a_model(db: Database) -> None:
    owner = await account(db)
    first, second, third = [await submit(db, owner) for _ in range(3)]
    assert (await claim(db, first.id, limit=2)).outcome == "claimed"
    assert (await claim(db, second.id, limit=2)).outcome == "claimed"
    assert (await claim(db, third.id, limit=2)).outcome == "busy"


async def test_completion_is_this_workers_and_happens_once(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner, webhook=True)
    await claim(db, job.id)
    done = {"output_url": "http://x/o.mp4", "output_key": "o.mp4", "result": {"a": 1}}
    assert await jobs.complete_job(db, job.id, "someone-else", **done) is None
    ended = await jobs.complete_job(db, job.id, "w1", **done)
    assert ended is not None
    assert (ended.job.state, ended.job.progress, ended.job.output_url) == (
        "completed",
        1.0,
        "http://x/o.mp4",
    )
    assert ended.delivery_id is not None  # the webhook row commits with the end
    assert await jobs.complete_job(db, job.id, "w1", **done) is None
    assert await ledger.balance(db, owner) == 90  # charged, not refunded


async def test_failure_refunds_once(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner, webhook=True)
    await claim(db, job.id)
    ended = await jobs.fail_job(db, job.id, "boom", worker_id="w1")
    assert ended is not None
    assert (ended.job.state, ended.job.error) == ("failed", "boom")
    assert ended.job.refund_entry_id is not None and ended.delivery_id is not None
    assert await ledger.balance(db, owner) == 100
    assert await jobs.fail_job(db, job.id, "again") is None
    assert await jobs.settle_refund(db, ended.job) == ended.job  # noted already: nothing
    assert await ledger.balance(db, owner) == 100


async def test_cancel_refunds_once_and_a_finished_job_is_a_conflict(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner, webhook=True)
    ended, view = await jobs.cancel_job(db, owner, job.id)
    assert ended is not None and view.state == "canceled" and view.credits_used == 0
    assert ended.delivery_id is None  # canceled jobs send no webhook
    assert await ledger.balance(db, owner) == 100
    again, view_again = await jobs.cancel_job(db, owner, job.id)
    assert again is None and view_again.state == "canceled"
    assert await ledger.balance(db, owner) == 100

    done = await submit(db, owner)
    await claim(db, done.id)
    await jobs.complete_job(db, done.id, "w1", output_url="u", output_key="k", result=None)
    with pytest.raises(Conflict, match="already completed"):
        await jobs.cancel_job(db, owner, done.id)


async def test_a_canceled_running_job_loses_its_heartbeat(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner)
    await claim(db, job.id)
    assert await jobs.heartbeat(db, job.id, "w1", 60, progress=(0.5, "half"))
    view = await jobs.get_job(db, owner, job.id)
    assert (view.progress, view.progress_message) == (0.5, "half")
    await jobs.cancel_job(db, owner, job.id)
    assert not await jobs.heartbeat(db, job.id, "w1", 60)  # the worker must stop


async def test_jobs_are_private_to_their_account(db: Database) -> None:
    owner, stranger = await account(db), await account(db)
    job = await submit(db, owner)
    with pytest.raises(JobNotFound):
        await jobs.get_job(db, stranger, job.id)
    with pytest.raises(JobNotFound):
        await jobs.cancel_job(db, stranger, job.id)


async def test_release_gives_the_job_back_without_counting_an_attempt(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner)
    await claim(db, job.id)
    assert not await jobs.release_job(db, job.id, "w2")
    assert await jobs.release_job(db, job.id, "w1")
    view = await jobs.get_job(db, owner, job.id)
    assert (view.state, view.attempts, view.worker_id) == ("queued", 0, None)


async def test_an_expired_lease_is_requeued_then_failed(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner)
    await jobs.claim_job(db, job.id, "m", "w1", concurrency=1, lease_seconds=-1)  # lapsed at once
    [expired] = await maintenance.expired_jobs(db)
    assert expired.id == job.id
    assert await maintenance.requeue_expired(db, expired)
    assert (await jobs.get_job(db, owner, job.id)).state == "queued"
    await jobs.claim_job(db, job.id, "m", "w2", concurrency=1, lease_seconds=-1)
    [expired] = await maintenance.expired_jobs(db)
    ended = await maintenance.fail_expired(db, expired, "lost")
    assert ended is not None and ended.job.state == "failed" and ended.job.attempts == 2
    assert await ledger.balance(db, owner) == 100


async def test_webhook_payload_of_an_ended_job(db: Database) -> None:
    owner = await account(db)
    job = await submit(db, owner, webhook=True)
    ended = await jobs.fail_job(db, job.id, "boom")
    assert ended is not None
    assert jobs.webhook_payload(ended.job) == {
        "status": "failed",
        "outputUrl": None,
        "jobId": job.id,
        "type": "video",
        "model": "m",
        "creditsUsed": 0,
        "error": "boom",
    }


async def test_concurrent_claims_from_three_writers_fill_exactly_the_slots() -> None:
    """PostgreSQL: claims of one model sent at once by three writers (as three worker
    processes would, each committing its claims in one batch transaction that takes the
    model's lock after its other statements) take exactly the model's slots; every other job
    waits queued, and each end hands its slot to one of them."""
    async with migrated_postgres() as first:
        others = [Database(first.url), Database(first.url)]
        try:
            owner = await account(first, credits=1000)
            queued = [await submit(first, owner) for _ in range(30)]
            writers = [first, *others]
            outcomes = await asyncio.gather(
                *(
                    claim(writers[i % 3], job.id, f"w{i % 3}", limit=4)
                    for i, job in enumerate(queued)
                )
            )
            claimed = [o.job for o in outcomes if o.outcome == "claimed"]
            assert len(claimed) == 4
            assert sum(o.outcome == "busy" for o in outcomes) == 26
            ended = [
                await jobs.complete_job(
                    first, job.id, job.worker_id or "", output_url="u", output_key="k", result=None
                )
                for job in claimed
                if job is not None
            ]
            handed = [e.next_job_id for e in ended if e is not None]
            assert len(handed) == 4 and len(set(handed)) == 4 and None not in handed
            again = await asyncio.gather(
                *(
                    claim(writers[i % 3], job_id, f"w{i % 3}", limit=4)
                    for i, job_id in enumerate(handed)
                )
            )
            assert [o.outcome for o in again] == ["claimed"] * 4
            # Ends from the three writers at once, each taking the oldest queued job for its
            # worker: four distinct jobs, the slots still exactly full.
            taken = await asyncio.gather(
                *(
                    jobs.complete_job(
                        writers[i % 3],
                        o.job.id,
                        f"w{i % 3}",
                        output_url="u",
                        output_key="k",
                        result=None,
                        take_next=jobs.Taker(f"w{i % 3}", lease_seconds=60, concurrency=4),
                    )
                    for i, o in enumerate(again)
                    if o.job is not None
                )
            )
            ids = {e.taken.id for e in taken if e is not None and e.taken is not None}
            assert len(ids) == 4 and not ids & set(handed)
            running = [await jobs.load_job(first, job.id) for job in queued if job.id not in handed]
            assert sum(j is not None and j.state == "processing" for j in running) == 4
        finally:
            for database in others:
                await database.dispose()


async def test_a_claim_waits_for_the_models_lock_that_an_ending_job_takes() -> None:
    """PostgreSQL: a claim takes its model's advisory lock: while another transaction holds
    that lock, a claim of the model waits, and it runs once the lock is let go."""
    import asyncpg

    async with migrated_postgres() as db:
        owner = await account(db)
        job = await submit(db, owner, model="vidéo-model")
        holder = await asyncpg.connect(db.url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            lock = holder.transaction()
            await lock.start()
            await holder.execute(
                "SELECT pg_advisory_xact_lock($1)", jobs._model_lock_key("vidéo-model")
            )
            waiting = asyncio.ensure_future(claim(db, job.id, model="vidéo-model"))
            for _ in range(200):  # until the claim is seen waiting on the advisory lock
                waiters = await holder.fetchval(
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND wait_event = 'advisory' AND datname = current_database()"
                )
                if waiters:
                    break
                await asyncio.sleep(0.025)
            assert waiters == 1 and not waiting.done()
            await lock.commit()
            assert (await waiting).outcome == "claimed"
        finally:
            await holder.close()


class _Holder:
    """PostgreSQL: a second connection with a transaction open, to hold a model's advisory
    lock or a job's row while the code under test runs, and to see who waits on what."""

    def __init__(self, db: Database) -> None:
        self.db = db

    async def __aenter__(self) -> _Holder:
        import asyncpg

        self.conn = await asyncpg.connect(
            self.db.url.replace("postgresql+asyncpg://", "postgresql://")
        )
        self.transaction = self.conn.transaction()
        await self.transaction.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.conn.is_in_transaction():
            await self.transaction.rollback()
        await self.conn.close()

    async def lock_model(self, model: str) -> None:
        await self.conn.execute("SELECT pg_advisory_xact_lock($1)", jobs._model_lock_key(model))

    async def hold_row(self, job_id: str) -> None:
        await self.conn.execute("SELECT id FROM jobs WHERE id = $1 FOR UPDATE", job_id)

    async def waiters(self, event: str) -> int:
        """Sessions of this database waiting on a lock of that kind ('advisory', 'tuple',
        'transactionid')."""
        return int(
            await self.conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND wait_event = $1 AND datname = current_database()",
                event,
            )
        )

    async def until_waiting(self, event: str, task: asyncio.Future[object]) -> int:
        for _ in range(400):
            if task.done() or await self.waiters(event):
                break
            await asyncio.sleep(0.025)
        return await self.waiters(event)


async def test_an_end_hands_its_live_slot_over_without_the_models_lock() -> None:
    """PostgreSQL: an end whose job held a live lease passes its slot to the oldest queued
    job with no advisory lock (the running count cannot change), so ends of one model in
    several worker processes do not queue behind each other's commits; a claim of the model
    meanwhile still waits for the lock."""
    async with migrated_postgres() as db:
        owner = await account(db)
        running, waiting, other = [await submit(db, owner) for _ in range(3)]
        assert (await claim(db, running.id)).outcome == "claimed"
        async with _Holder(db) as holder:
            await holder.lock_model("m")
            ended = await asyncio.wait_for(complete_taking(db, running.id), timeout=60)
            assert ended is not None and ended.taken is not None and ended.taken.id == waiting.id
            # A claim of the model still takes the lock: it waits for the holder.
            blocked = asyncio.ensure_future(claim(db, other.id))
            assert await holder.until_waiting("advisory", blocked) == 1
            await holder.transaction.commit()
            assert (await blocked).outcome == "busy"  # the one slot is the taken job's


async def test_an_end_whose_lease_lapsed_takes_the_next_job_under_the_models_lock() -> None:
    """PostgreSQL: a job whose lease ran out was not counted as running, and a claim may
    have filled its slot meanwhile: its end takes a queued job only under the model's lock,
    and only into a free slot."""
    async with migrated_postgres() as db:
        owner = await account(db)
        running, waiting = [await submit(db, owner) for _ in range(2)]
        assert (await claim(db, running.id)).outcome == "claimed"
        async with _Holder(db) as holder:
            # Less than half a lease left: the job's worker stalled past its renewals.
            await holder.conn.execute(
                "UPDATE jobs SET lease_until = $1 WHERE id = $2",
                utcnow() + timedelta(seconds=20),
                running.id,
            )
            await holder.transaction.commit()
        async with _Holder(db) as holder:
            await holder.lock_model("m")
            ending = asyncio.ensure_future(complete_taking(db, running.id))
            assert await holder.until_waiting("advisory", ending) == 1
            await holder.transaction.commit()
            ended = await ending
        assert ended is not None and ended.taken is not None and ended.taken.id == waiting.id


async def test_writes_under_the_models_lock_pass_over_a_job_another_transaction_holds() -> None:
    """PostgreSQL: an end handing its slot over holds the job it takes, without the model's
    lock, and its batch may take that lock later; so a claim, a taker-less end and the
    sweep, lock in hand, never wait for a held queued job (a deadlock with that batch):
    they pass over it, and each sees it again once it is let go."""
    async with migrated_postgres() as db:
        owner = await account(db, credits=1000)
        running, held, free = [await submit(db, owner) for _ in range(3)]
        assert (await claim(db, running.id, limit=2)).outcome == "claimed"
        async with _Holder(db) as holder:
            await holder.hold_row(held.id)
            # A claim of the held job: passed over at once, the job stays queued.
            assert (await asyncio.wait_for(claim(db, held.id, limit=2), 60)).outcome == "busy"
            # The sweep sends the next free job instead.
            due = await asyncio.wait_for(
                maintenance.jobs_to_resend(db, kicked_before=None, slots={"m": 3}.get), 60
            )
            assert due == [(free.id, "m")]
            # A taker-less end (a cancel) re-sends the queued job sent longest ago that is
            # not held: the free one, sent just now by the sweep, since the held one is.
            ended, _ = await asyncio.wait_for(jobs.cancel_job(db, owner, running.id), 60)
            assert ended is not None and ended.next_job_id == free.id
            assert await holder.waiters("tuple") == 0
            assert await holder.waiters("transactionid") == 0
        # Let go: the job is claimed as any other.
        assert (await claim(db, held.id, limit=2)).outcome == "claimed"


async def test_concurrent_claims_and_hand_overs_never_exceed_the_slots() -> None:
    """PostgreSQL, three writers (three worker processes): in each round every running job
    ends and hands its slot over (no lock) while claims of queued jobs arrive from messages
    (under the lock); after every round the model runs no more jobs than its slots, and in
    the end every job ran exactly once."""
    import random

    async with migrated_postgres() as first:
        others = [Database(first.url), Database(first.url)]
        writers = [first, *others]
        slots = 4
        try:
            owner = await account(first, credits=10_000)
            queued = [await submit(first, owner) for _ in range(60)]
            rng = random.Random(12)
            running: dict[str, str] = {}  # job id -> worker
            completed: list[str] = []
            for round_ in range(40):
                waiting = [j.id for j in queued if j.id not in running and j.id not in completed]
                claims = rng.sample(waiting, min(len(waiting), 3))
                ends = list(running.items())

                outcomes = await asyncio.gather(
                    *(
                        complete_taking(writers[i % 3], job_id, worker, slots)
                        for i, (job_id, worker) in enumerate(ends)
                    ),
                    *(
                        claim(writers[i % 3], job_id, f"w{i % 3}", limit=slots)
                        for i, job_id in enumerate(claims)
                    ),
                )
                for (job_id, _), ended in zip(ends, outcomes[: len(ends)], strict=True):
                    assert isinstance(ended, jobs.Ended)
                    completed.append(job_id)
                    del running[job_id]
                    if ended.taken is not None:
                        running[ended.taken.id] = ended.taken.worker_id or ""
                for outcome in outcomes[len(ends) :]:
                    assert isinstance(outcome, Claimed)
                    if outcome.job is not None:
                        running[outcome.job.id] = outcome.job.worker_id or ""
                states = [await jobs.load_job(first, j.id) for j in queued]
                processing = {s.id for s in states if s is not None and s.state == "processing"}
                assert processing == set(running), round_
                assert len(processing) <= slots, round_
                if len(completed) == len(queued):
                    break
            assert sorted(completed) == sorted(j.id for j in queued)
            assert len(set(completed)) == len(completed)
        finally:
            for database in others:
                await database.dispose()
